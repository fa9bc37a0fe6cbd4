"""``fieldlink-cloud rules test`` and ``fieldlink-cloud alerts list|history|ack|silence``.

``list`` and ``history`` read the worker's ``alerts.db`` (read-only, beside a running
worker); ``ack`` and ``silence`` publish on the alert command topics through the cloud
broker, so they reach the running workers (each acts on its own alerts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from cloud.alerting import store
from cloud.alerting.model import iso

__all__ = ["add_parsers", "run"]


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rules = commands.add_parser("rules", help="test alert rules against a recorded series")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    test = rules_sub.add_parser("test", help="replay SERIES.csv through rules and routing; print what would be sent")
    test.add_argument("--config", required=True)
    test.add_argument("series", help="CSV with the header time,site,gateway,device,metric,value")
    test.add_argument("--extra", type=float, default=0.0, help="seconds to run the clock on after the last row")

    alerts = commands.add_parser("alerts", help="list, acknowledge and silence alerts; print their history")
    sub = alerts.add_subparsers(dest="alerts_command", required=True)
    listing = sub.add_parser("list", help="current alerts (pending, firing, recently resolved)")
    listing.add_argument("--config", required=True)
    listing.add_argument("--json", action="store_true")
    history = sub.add_parser("history", help="every transition and notification attempt, oldest first")
    history.add_argument("--config", required=True)
    history.add_argument("--alert", help="only this alert id")
    history.add_argument("--limit", type=int, default=200)
    history.add_argument("--json", action="store_true")
    ack = sub.add_parser("ack", help="acknowledge a firing alert (stops reminders and escalation)")
    ack.add_argument("id")
    ack.add_argument("--by", required=True, help="who acknowledges (kept in the history)")
    ack.add_argument("--comment")
    ack.add_argument("--config", required=True)
    silence = sub.add_parser("silence", help="mute notifications for alerts matching labels until a time")
    silence.add_argument("--config", required=True)
    silence.add_argument("--match", action="append", required=True, help="LABEL=GLOB, repeatable (all must hold)")
    ends = silence.add_mutually_exclusive_group(required=True)
    ends.add_argument("--for", dest="duration", help="e.g. 2h")
    ends.add_argument("--until", help="ISO 8601 with a zone")
    silence.add_argument("--by", required=True)
    silence.add_argument("--comment", default="")


def run(args: argparse.Namespace, config: Any) -> int:
    if args.command == "rules":
        return _rules_test(args, config)
    if args.alerts_command in ("list", "history"):
        path = Path(config.cloud.state_dir) / "alerts.db"
        if not path.exists():
            print(f"no alert state at {path} (has this cloud run yet?)", file=sys.stderr)
            return 1
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return _list(db, args) if args.alerts_command == "list" else _history(db, args)
        finally:
            db.close()
    if args.alerts_command == "ack":
        body: dict[str, Any] = {"id": args.id, "by": args.by, "comment": args.comment}
        return _publish(config, config.alerting.ack_topic, body)
    matchers = {}
    for item in args.match:
        name, sep, pattern = item.partition("=")
        if not sep or not name:
            print(f"--match wants LABEL=GLOB, got {item!r}", file=sys.stderr)
            return 2
        matchers[name] = pattern
    body = {"matchers": matchers, "by": args.by, "comment": args.comment}
    body.update({"for": args.duration} if args.duration else {"ends": args.until})
    return _publish(config, config.alerting.silence_topic, body)


def _rules_test(args: argparse.Namespace, config: Any) -> int:
    from cloud.alerting.replay import SeriesError, print_lines, read_series, replay  # noqa: PLC0415

    try:
        rows, iso_times = read_series(Path(args.series))
    except (SeriesError, OSError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    lines = replay(
        rows,
        iso_times=iso_times,
        rules=list(config.rules),
        config=config.alerting,
        receivers=[n.name for n in config.notifiers],
        extra_s=args.extra,
    )
    count = print_lines(lines, sys.stdout)
    print(f"{len(rows)} rows replayed, {count} notifications would be sent", file=sys.stderr)
    return 0


def _list(db: sqlite3.Connection, args: argparse.Namespace) -> int:
    alerts = store.list_alerts(db)
    if args.json:
        for alert in alerts:
            print(json.dumps(alert.view()))
        return 0
    if not alerts:
        print("no alerts")
    order = {"firing": 0, "pending": 1, "resolved": 2}
    for alert in sorted(alerts, key=lambda a: (order[a.state], a.severity, a.id)):
        ack = f"  acked by {alert.acked_by} {iso(alert.acked_ms)}" if alert.acked_by else ""
        ended = f" -> {iso(alert.ended_ms)}" if alert.state == "resolved" else ""
        print(f"{alert.state:<8} {alert.severity:<8} {alert.id}")
        print(f"         {alert.summary()}  since {iso(alert.since_ms)}{ended}{ack}")
    return 0


def _history(db: sqlite3.Connection, args: argparse.Namespace) -> int:
    for entry in store.history(db, args.alert, args.limit):
        if args.json:
            print(json.dumps(entry))
            continue
        ts, alert_id, event = entry.pop("ts_ms"), entry.pop("alert_id"), entry.pop("event")
        detail = " ".join(f"{k}={v}" for k, v in entry.items())
        print(f"{iso(ts)}  {event:<14} {alert_id}  {detail}")
    return 0


def _publish(config: Any, topic: str, body: dict[str, Any]) -> int:
    from fieldlink.mqtt import ConnectFailed, ConnectionLost, MqttConnection, PublishRefused  # noqa: PLC0415

    async def send() -> None:
        conn = MqttConnection(config.broker.effective(), client_id=f"fieldlink-cloud-cli-{time.time_ns() % 10**9}")
        await conn.open()
        try:
            await asyncio.wait_for(conn.publish(topic, json.dumps(body).encode(), qos=1), 10)
        finally:
            await conn.close()

    try:
        asyncio.run(send())
    except (ConnectFailed, ConnectionLost, PublishRefused, TimeoutError) as exc:
        print(f"could not reach the cloud broker {config.broker.effective().url}: {exc}", file=sys.stderr)
        return 1
    print(f"sent to {topic}: {json.dumps(body)}")
    return 0
