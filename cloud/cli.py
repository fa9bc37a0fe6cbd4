"""``fieldlink-cloud``: check a config, run the cloud, or query the embedded store."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from cloud.alerting import cli as alerting_cli
from cloud.config import CloudConfig, CloudSection, load_cloud_config
from fieldlink.configkit import ConfigError, parse_duration
from fieldlink.logs import setup_logging
from fieldlink.runner import run_async

log = logging.getLogger("cloud")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fieldlink-cloud", description="fieldlink cloud platform")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check-config", help="validate a config file and print every problem")
    check.add_argument("file")

    run = commands.add_parser("run", help="run the cloud")
    run.add_argument("--config", required=True)
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", choices=["kv", "json"])

    query = commands.add_parser("query", help="read recent points from the embedded SQLite store")
    query.add_argument("--config", required=True)
    query.add_argument("--device")
    query.add_argument("--metric")
    query.add_argument("--since", help="only points newer than this, e.g. 10m or 2h")
    query.add_argument("--limit", type=int, default=20)
    query.add_argument("--json", action="store_true", help="one JSON object per line")

    status = commands.add_parser("status", help="print what the running cloud is doing (exit 3: not running)")
    status.add_argument("--config", required=True)
    status.add_argument("--json", action="store_true", help="the raw status report")
    alerting_cli.add_parsers(commands)
    return parser


def _load(path: str, out: TextIO = sys.stderr) -> CloudConfig | None:
    try:
        return load_cloud_config(path)
    except ConfigError as exc:
        print("\n".join(exc.lines()), file=out)
        return None


def _check(path: str) -> int:
    config = _load(path, sys.stdout)
    if config is None:
        return 1
    print(f"{path}: ok (store {config.store.kind}, {len(config.rules)} rules, {len(config.notifiers)} notifiers)")
    return 0


def _query(args: argparse.Namespace) -> int:
    from cloud.stores.sqlite import query_points  # noqa: PLC0415

    config = _load(args.config)
    if config is None:
        return 2
    if config.store.kind != "sqlite":
        print(f"query reads the embedded SQLite store; this config uses {config.store.kind}", file=sys.stderr)
        return 2
    path = config.cloud.state_dir / config.store.path
    if not path.exists():
        print(f"no store at {path} yet", file=sys.stderr)
        return 1
    since = None if args.since is None else time.time_ns() // 1_000_000 - int(parse_duration(args.since) * 1000)
    points = query_points(path, device=args.device, metric=args.metric, since_ms=since, limit=args.limit)
    for p in points:
        if args.json:
            print(json.dumps(p.__dict__))
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(p.ts / 1000)) + f".{p.ts % 1000:03d}Z"
            unit = f" {p.unit}" if p.unit else ""
            print(f"{stamp}  {p.site}/{p.gateway}/{p.device}  {p.metric} = {p.value}{unit}  (seq {p.seq})")
    return 0


def _status(args: argparse.Namespace) -> int:
    from fieldlink.status_socket import state_dir_of, status_command  # noqa: PLC0415
    from fieldlink.status_view import render_cloud  # noqa: PLC0415

    try:
        state_dir = load_cloud_config(args.config).cloud.state_dir
    except ConfigError as exc:
        # Secrets the service gets from its environment or credentials are missing in an
        # operator's shell; the socket can be found without them.
        try:
            state_dir = state_dir_of(args.config, "cloud", CloudSection.model_fields["state_dir"].default)
        except ValueError:
            print("\n".join(exc.lines()), file=sys.stderr)
            return 2
    return status_command("fieldlink-cloud", state_dir, render_cloud, as_json=args.json)


async def _serve(config: CloudConfig) -> None:
    from cloud.app import CloudApp  # noqa: PLC0415 (keeps check-config free of broker imports)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await CloudApp(config).serve(stop)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return _check(args.file)
    if args.command == "query":
        return _query(args)
    if args.command == "status":
        return _status(args)
    config = _load(args.config)
    if config is None:
        return 2
    if args.command in ("rules", "alerts"):
        return alerting_cli.run(args, config)
    setup_logging(args.log_level or config.logging.level, args.log_format or config.logging.format)
    return run_async(_serve(config), log)


if __name__ == "__main__":
    sys.exit(main())
