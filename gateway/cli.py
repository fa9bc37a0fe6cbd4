"""``fieldlink-gateway``: check a config, run the gateway, ask it for its status, probe a Modbus device,
or write the local broker's password file."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from fieldlink import sdnotify
from fieldlink.configkit import ConfigError
from fieldlink.logs import setup_logging
from fieldlink.runner import run_async
from gateway.config import GatewayConfig, GatewaySection, load_gateway_config
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

    status = commands.add_parser("status", help="print what the running gateway is doing (exit 3: not running)")
    status.add_argument("--config", required=True)
    status.add_argument("--json", action="store_true", help="the raw status report")

    passwd = commands.add_parser("passwd", help="add a user to the local broker's password file, or change it")
    passwd.add_argument("file", help="the file named by local_broker.users_file (created if missing)")
    passwd.add_argument("user")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from stdin, not a prompt")
    passwd.add_argument("--delete", action="store_true", help="remove the user")

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
                sdnotify.notify("STOPPING=1")
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
        sdnotify.notify("RELOADING=1")  # READY=1 follows when the new config runs
        app.drain_on_stop = False
        app_stop.set()
        await serving
        config = new_config
        setup_logging(config.logging.level, config.logging.format)


def _status(args: argparse.Namespace) -> int:
    from fieldlink.status_socket import state_dir_of, status_command  # noqa: PLC0415 (the others do without)
    from fieldlink.status_view import render_gateway  # noqa: PLC0415

    try:
        config = load_gateway_config(args.config)
    except ConfigError as exc:
        # Secrets the service gets from its environment or credentials are missing in an
        # operator's shell: find the socket anyway, and list the devices the report names.
        try:
            state_dir = state_dir_of(args.config, "gateway", GatewaySection.model_fields["state_dir"].default)
        except ValueError:
            print("\n".join(exc.lines()), file=sys.stderr)
            return 2
        devices: dict[str, str] = {}
    else:
        state_dir = config.gateway.state_dir
        devices = {device.name: source.name for source in config.sources for device in source.devices}
    return status_command(
        "fieldlink-gateway", state_dir, lambda report: render_gateway(report, devices), as_json=args.json
    )


def _passwd(args: argparse.Namespace) -> int:
    from fieldlink.broker_auth import PasswordFileError, remove_user, set_password  # noqa: PLC0415

    path = Path(args.file)
    try:
        if args.delete:
            if not remove_user(path, args.user):
                print(f"{path}: no user {args.user!r}", file=sys.stderr)
                return 1
            print(f"{path}: removed {args.user!r}; reload the gateway (SIGHUP) to apply")
            return 0
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = getpass.getpass(f"password for {args.user}: ")
            if getpass.getpass("again: ") != password:
                print("the passwords differ; nothing changed", file=sys.stderr)
                return 1
        added = set_password(path, args.user, password)
    except PasswordFileError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{path}: {'added' if added else 'changed'} {args.user!r}; reload the gateway (SIGHUP) to apply")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check(args.file)
    if args.command == "probe":
        return run_probe(args)
    if args.command == "status":
        return _status(args)
    if args.command == "passwd":
        return _passwd(args)
    try:
        config = load_gateway_config(args.config)
    except ConfigError as exc:
        print("\n".join(exc.lines()), file=sys.stderr)
        return 2
    setup_logging(args.log_level or config.logging.level, args.log_format or config.logging.format)
    return run_async(_serve(args.config, config), log)


if __name__ == "__main__":
    sys.exit(main())
