"""``firmware-sim``: run the simulated devices, check a config, catch mail.

Exit status: 0 done, 1 ``check-config`` found problems, 2 a config could not be
loaded or a server could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fieldlink.configkit import ConfigError
from fieldlink.logs import setup_logging

from . import SimulatorError
from .config import load_sim_config
from .fleet import SimFleet
from .mailcatcher import DEFAULT_PORT, MailCatcher

__all__ = ["build_parser", "main"]

log = logging.getLogger("firmware_sim")

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

T = TypeVar("T")


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="kv", choices=["kv", "json"])


def build_parser() -> argparse.ArgumentParser:
    """The parser; each subcommand sets ``handler``: namespace -> exit status.

    A new subcommand (``demo``) adds its subparser here and a ``cmd_*`` function.
    """
    parser = argparse.ArgumentParser(prog="firmware-sim", description="Simulated devices for fieldlink.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="serve the configured devices until SIGINT/SIGTERM")
    run.add_argument("--config", required=True, type=Path, metavar="FILE")
    add_logging_options(run)
    run.set_defaults(handler=cmd_run)

    check = commands.add_parser("check-config", help="print every problem of a config file")
    check.add_argument("config", type=Path, metavar="FILE")
    check.set_defaults(handler=cmd_check_config)

    mail = commands.add_parser("mailcatcher", help="accept mail over SMTP and save each as a .eml file")
    mail.add_argument("--host", default="127.0.0.1")
    mail.add_argument("--port", type=int, default=DEFAULT_PORT)
    mail.add_argument("--folder", required=True, type=Path, metavar="DIR")
    add_logging_options(mail)
    mail.set_defaults(handler=cmd_mailcatcher)

    demo = commands.add_parser("demo", help="run simulator, cloud, mail catcher and gateway together")
    demo.add_argument("--duration", type=float, help="stop after this many seconds (default: on Ctrl-C)")
    demo.add_argument("--configs", type=Path, default=Path("configs/demo"), metavar="DIR")
    demo.add_argument("--dir", type=Path, default=Path(".demo"), metavar="DIR", help="logs, state and mails")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


# --- subcommands ---------------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        load_sim_config(args.config)
    except ConfigError as exc:
        print("\n".join(exc.lines()))
        return 1
    print(f"{args.config}: ok")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = load_sim_config(args.config)
    except ConfigError as exc:
        print("\n".join(exc.lines()), file=sys.stderr)
        return 2
    setup_logging(args.log_level, args.log_format)
    return run_async(_serve(SimFleet(config)))


async def _serve(fleet: SimFleet) -> int:
    try:
        await fleet.start()
    except SimulatorError as exc:
        print(f"firmware-sim: {exc}", file=sys.stderr)
        return 2
    # Serial ports are paths a person has to type into the gateway's config: say where.
    for server in fleet.servers:
        if server.serial_port is not None:
            units = ",".join(map(str, server.units))
            print(f"{server.name}: Modbus RTU on {server.serial_port} (units {units})", flush=True)
    for sensor in fleet.sensors:
        print(f"{sensor.config.name}: serial sensor ({sensor.config.format}) on {sensor.path}", flush=True)
    try:
        await _until_stop_signal()
    finally:
        await fleet.stop()
    return 0


def cmd_mailcatcher(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format)
    catcher = MailCatcher(args.folder, host=args.host, port=args.port)
    # aiosmtpd serves from its own thread: the main thread only waits for a signal.
    stop = threading.Event()
    for signum in _STOP_SIGNALS:
        signal.signal(signum, lambda *_: stop.set())
    try:
        catcher.start()
    except SimulatorError as exc:
        print(f"firmware-sim: {exc}", file=sys.stderr)
        return 2
    try:
        stop.wait()
    finally:
        catcher.stop()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoError, run_demo  # noqa: PLC0415 (only the demo needs the MQTT client)

    bin_dir = Path(sys.executable).parent  # the console scripts of this installation
    try:
        summary = run_async(run_demo(args.configs, args.dir.resolve(), args.duration, bin_dir))
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary), flush=True)
    return 0 if summary["records_lost"] == 0 else 1


# --- running asyncio -------------------------------------------------------------------


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (it is on Linux), else on the default loop."""
    try:
        import uvloop  # noqa: PLC0415 (optional dependency)
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def _until_stop_signal() -> None:
    """Return on the first SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)
    log.info("stopping")


if __name__ == "__main__":
    sys.exit(main())
