"""Republishes decoded records as JSON for dashboards (Grafana MQTT, Node-RED, web pages).

Topics (see docs/dashboard-topics.md)::

    <prefix>/<site>/<gateway>/<device>/telemetry   every record, as JSON, not retained
    <prefix>/<site>/<gateway>/<device>/latest      retained: the latest value of every metric
    <prefix>/<site>/<gateway>/<device>/status      retained: online / degraded / offline, with the reason
    <prefix>/<site>/<gateway>/status               retained: the gateway's online / offline
    <prefix>/<site>/summary                        retained: every gateway's and device's state, counts
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from typing import Any

from fieldlink.wire import Record, Value

__all__ = ["DashboardPublisher", "record_json"]

Message = tuple[str, bytes, bool]  # topic, payload, retain


def _iso(ts_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts_ms / 1000)) + f".{ts_ms % 1000:03d}Z"


def _value_json(value: Value) -> dict[str, Any]:
    v, quality = value.value, value.quality.value
    if isinstance(v, float) and not math.isfinite(v):
        v, quality = None, "bad"  # JSON has no NaN; a NaN register is a sensor fault more often than not
    body: dict[str, Any] = {"value": v, "type": value.type.value, "quality": quality}
    if value.unit:
        body["unit"] = value.unit
    return body


def record_json(record: Record) -> dict[str, Any]:
    return {
        "site": record.site,
        "gateway": record.gateway,
        "device": record.device,
        "seq": record.seq,
        "ts": record.ts,
        "time": _iso(record.ts),
        "values": {name: _value_json(v) for name, v in record.values.items()},
    }


class DashboardPublisher:
    """Builds (topic, payload, retain) messages; the caller publishes them."""

    def __init__(self, prefix: str = "dash") -> None:
        self.prefix = prefix
        self._latest: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._sites: dict[str, dict[str, Any]] = {}

    def status_messages(self, site: str, gateway: str, device: str | None, state: dict[str, Any]) -> list[Message]:
        """A gateway's or device's status as retained dashboard topics, and its site's summary."""
        body = {"site": site, "gateway": gateway, **({"device": device} if device else {}), **state}
        if isinstance(state.get("ts"), int):
            body["time"] = _iso(state["ts"])
        where = f"{self.prefix}/{site}/{gateway}" + (f"/{device}" if device else "")
        summary = self._sites.setdefault(site, {"site": site, "gateways": {}, "devices": {}})
        if device is None:
            summary["gateways"][gateway] = state["state"]
        else:
            summary["devices"][f"{gateway}/{device}"] = state["state"]
        devices = summary["devices"].values()
        summary["devices_online"] = sum(1 for s in devices if s == "online")
        summary["devices_total"] = len(summary["devices"])
        summary["gateways_online"] = sum(1 for s in summary["gateways"].values() if s == "online")
        summary["ts"] = time.time_ns() // 1_000_000
        return [
            (f"{where}/status", json.dumps(body, separators=(",", ":")).encode(), True),
            (f"{self.prefix}/{site}/summary", json.dumps(summary, separators=(",", ":")).encode(), True),
        ]

    def messages(self, records: Iterable[Record]) -> list[tuple[str, bytes, bool]]:
        out: list[tuple[str, bytes, bool]] = []
        touched: dict[tuple[str, str, str], None] = {}
        for record in records:
            body = record_json(record)
            base = f"{self.prefix}/{record.site}/{record.gateway}/{record.device}"
            out.append((f"{base}/telemetry", json.dumps(body, separators=(",", ":")).encode(), False))
            key = (record.site, record.gateway, record.device)
            latest = self._latest.setdefault(key, {"site": key[0], "gateway": key[1], "device": key[2], "values": {}})
            for name, value in body["values"].items():
                previous = latest["values"].get(name)
                if previous is None or previous["ts"] <= record.ts:
                    latest["values"][name] = {**value, "ts": record.ts, "time": body["time"]}
            latest["ts"] = max(latest.get("ts", 0), record.ts)
            touched[key] = None
        for key in touched:
            base = f"{self.prefix}/{key[0]}/{key[1]}/{key[2]}"
            out.append((f"{base}/latest", json.dumps(self._latest[key], separators=(",", ":")).encode(), True))
        return out
