"""``fieldlink-cloud rules test``: replay a CSV series through the configured rules and
routing with a simulated clock, sending nothing, and print every notification that would
go out (as ``promtool test rules`` does for Prometheus).

CSV header: ``time,site,gateway,device,metric,value``. ``time`` is seconds from the start
of the series (``0``, ``12.5``) or ISO 8601 with a zone; the output uses the same form.
Rows may come in any order; they are replayed in time order, each as one record that
arrives when it was measured. Timers (``for``, dead-man silences, group waits, repeats,
escalation, rate-limit summaries) run on the simulated clock, every ``tick`` of the config
(at most one second); after the last row the clock runs on for ``--extra`` seconds.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from cloud.alerting.config import AlertingSection, RuleConfig
from cloud.alerting.dispatch import Dispatcher, Notification
from cloud.alerting.engine import Engine
from fieldlink.wire import Quality, Record, Value, ValueType

__all__ = ["SeriesError", "read_series", "replay"]

HEADER = ["time", "site", "gateway", "device", "metric", "value"]
EPOCH_MS = 1_700_000_000_000  # where relative series start on the simulated clock


class SeriesError(ValueError):
    """A CSV row that cannot be replayed; the message names the file and line."""


@dataclass(frozen=True)
class Row:
    ts: int
    site: str
    gateway: str
    device: str
    metric: str
    value: Value


def _value(text: str) -> Value:
    text = text.strip()
    if text.lower() in ("true", "false"):
        return Value(text.lower() == "true", None, Quality.GOOD, ValueType.BOOL)
    try:
        return Value(int(text), None, Quality.GOOD, ValueType.INT)
    except ValueError:
        pass
    try:
        return Value(float(text), None, Quality.GOOD, ValueType.FLOAT)
    except ValueError:
        pass
    if text == "":
        return Value(None, None, Quality.BAD, ValueType.FLOAT)
    return Value(text, None, Quality.GOOD, ValueType.STRING)


def read_series(path: Path) -> tuple[list[Row], bool]:
    """The rows in time order, and whether times were ISO 8601 (else relative seconds)."""
    rows: list[Row] = []
    iso_times: bool | None = None
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != HEADER:
            raise SeriesError(f"{path}:1: the header must be {','.join(HEADER)}, got {','.join(header or [])}")
        for number, fields in enumerate(reader, start=2):
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != len(HEADER):
                raise SeriesError(f"{path}:{number}: expected {len(HEADER)} fields, got {len(fields)}")
            when, site, gateway, device, metric, value = (f.strip() for f in fields)
            try:
                ts = EPOCH_MS + round(float(when) * 1000)
                is_iso = False
            except ValueError:
                try:
                    moment = datetime.fromisoformat(when.replace("Z", "+00:00"))
                except ValueError:
                    raise SeriesError(f"{path}:{number}: time {when!r} is neither seconds nor ISO 8601") from None
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=UTC)
                ts, is_iso = int(moment.timestamp() * 1000), True
            if iso_times is not None and iso_times != is_iso:
                raise SeriesError(f"{path}:{number}: mixes ISO 8601 and relative times")
            iso_times = is_iso
            if not (site and gateway and device and metric):
                raise SeriesError(f"{path}:{number}: site, gateway, device and metric must not be empty")
            rows.append(Row(ts, site, gateway, device, metric, _value(value)))
    rows.sort(key=lambda r: r.ts)
    return rows, bool(iso_times)


def replay(
    rows: list[Row],
    *,
    iso_times: bool,
    rules: list[RuleConfig],
    config: AlertingSection,
    receivers: list[str],
    extra_s: float,
) -> Iterator[dict[str, Any]]:
    engine = Engine(rules)
    dispatcher = Dispatcher(config, rules, receivers)
    step_ms = int(min(config.tick, 1.0) * 1000)
    seqs: dict[tuple[str, str, str], int] = {}

    def when(ts: int) -> Any:
        if iso_times:
            return datetime.fromtimestamp(ts / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return round((ts - EPOCH_MS) / 1000, 3)

    def step(now: int) -> Iterator[dict[str, Any]]:
        for alert in engine.take_changes().alerts.values():
            dispatcher.on_change(alert, now)
        for notification in dispatcher.tick(engine.alerts, now):
            yield from _lines(notification, when(now))
        dispatcher.dirty_state()

    if not rows:
        return
    clock = rows[0].ts
    end = rows[-1].ts + int(extra_s * 1000)
    index = 0
    while clock <= end:
        while index < len(rows) and rows[index].ts <= clock:
            row = rows[index]
            index += 1
            key = (row.site, row.gateway, row.device)
            seqs[key] = seqs.get(key, 0) + 1
            record = Record(row.site, row.gateway, row.device, seqs[key], row.ts, {row.metric: row.value})
            engine.observe_records([record], row.ts)
            yield from step(row.ts)
        engine.tick(clock)
        yield from step(clock)
        clock += step_ms


def _lines(notification: Notification, time_value: Any) -> Iterator[dict[str, Any]]:
    payload = notification.payload
    base = {"time": time_value, "receiver": notification.receiver, "status": payload["status"], "key": payload["key"]}
    if not payload["alerts"]:
        yield {
            **base,
            "rule": None,
            "device": None,
            "state": payload["status"],
            "severity": payload["severity"],
            "subject": payload["subject"],
        }
        return
    for alert in payload["alerts"]:
        yield {
            **base,
            "rule": alert["rule"],
            "site": alert["site"],
            "gateway": alert["gateway"],
            "device": alert["device"],
            "metric": alert["metric"],
            "state": alert["state"],
            "severity": alert["severity"],
            "value": alert["value"],
            "subject": payload["subject"],
        }


def print_lines(lines: Iterator[dict[str, Any]], out: TextIO) -> int:
    count = 0
    for line in lines:
        out.write(json.dumps(line) + "\n")
        count += 1
    return count
