"""``fieldlink-gateway``: check a config, run the gateway, or probe a Modbus device."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from fieldlink.configkit import ConfigError
from fieldlink.logs import setup_logging
from fieldlink.runner import run_async
from gateway.config import GatewayConfig, load_gateway_config
from gateway.probe import add_probe_parser, run_probe

log = logging.getLogger("gateway")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fieldlink-gateway", description="fieldlink edge gateway")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check-config", help="validate a config file and print every problem")
    check.add_argument("file")

    run = commands.add_parser("run", help="run the gateway")
    run.add_argument("--config", required=True)
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", choices=["kv", "json"])

    add_probe_parser(commands)
    return parser


def _check(path: str) -> int:
    try:
        config = load_gateway_config(path)
    except ConfigError as exc:
        print("\n".join(exc.lines()))
        return 1
    devices = sum(len(s.devices) for s in config.sources)
    print(f"{path}: ok ({len(config.sources)} sources, {devices} devices)")
    return 0


async def _serve(path: str, config: GatewayConfig) -> None:
    """Run until SIGTERM/SIGINT. SIGHUP reloads the config file: a bad one is reported and ignored."""
    from gateway.app import GatewayApp  # noqa: PLC0415 (keeps check-config free of broker imports)

    stop = asyncio.Event()
    reload = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    while True:
        app_stop = asyncio.Event()
        app = GatewayApp(config)
        serving = asyncio.create_task(app.serve(app_stop))
        while True:
            waits = [asyncio.create_task(e.wait()) for e in (stop, reload)]
            await asyncio.wait([serving, *waits], return_when=asyncio.FIRST_COMPLETED)
            for task in waits:
                task.cancel()
            if serving.done() or stop.is_set():
                app_stop.set()
                await serving
                return
            reload.clear()
            try:
                new_config = load_gateway_config(path)
            except ConfigError as exc:
                log.error("config reload refused; running on", extra={"problems": " | ".join(exc.lines())})
                continue
            break
        # The buffer is a file, not part of the config object: stopping without a drain and
        # starting again on the new config keeps every message (and its sequence numbers).
        log.info("reloading config", extra={"config": path})
        app.drain_on_stop = False
        app_stop.set()
        await serving
        config = new_config
        setup_logging(config.logging.level, config.logging.format)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check(args.file)
    if args.command == "probe":
        return run_probe(args)
    try:
        config = load_gateway_config(args.config)
    except ConfigError as exc:
        print("\n".join(exc.lines()), file=sys.stderr)
        return 2
    setup_logging(args.log_level or config.logging.level, args.log_format or config.logging.format)
    return run_async(_serve(args.config, config), log)


if __name__ == "__main__":
    sys.exit(main())
