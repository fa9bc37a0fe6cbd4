"""The text of ``fieldlink-gateway status`` and ``fieldlink-cloud status``, from a status report.

Pure functions of the JSON a program serves on its control socket (its health report
plus sections, see :mod:`fieldlink.status_socket`); keys it does not know are shown as
they are, so a section added later (alerting) appears without a change here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from fieldlink.status_socket import format_age, format_time

__all__ = ["render_cloud", "render_gateway"]

_MODBUS_SHOWN = ("requests", "responses", "timeouts", "connect_failures", "crc_errors", "writes", "write_errors")


def _size(n: Any) -> str:
    if not isinstance(n, int | float):
        return "?"
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{int(n)} B"


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{value}s"


def _since(ms: Any) -> str:
    if not isinstance(ms, int | float):
        return ""
    return f" since {format_time(ms)} ({format_age(time.time() - ms / 1000)} ago)"


def _counts(counts: Mapping[str, Any]) -> str:
    shown = [f"{k} {v}" for k, v in counts.items() if isinstance(v, int | float) and not isinstance(v, bool) and v]
    return ", ".join(shown) or "none"


def _header(kind: str, name: str, r: Mapping[str, Any]) -> str:
    uptime = r.get("uptime_s")
    up = format_age(uptime) if isinstance(uptime, int | float) else "?"
    at = format_time(r["ts"]) if isinstance(r.get("ts"), int | float) else "?"
    return f"{kind} {name}   running, pid {r.get('pid', '?')}, up {up}   (report of {at})"


def _problems(r: Mapping[str, Any]) -> list[str]:
    problems = r.get("recent_problems") or []
    if not problems:
        return ["recent problems: none"]
    return ["recent problems (newest last):", *(f"  {line}" for line in problems)]


def _extra(r: Mapping[str, Any], known: set[str]) -> list[str]:
    """Sections the renderer does not know (added with StatusServer.add_section)."""
    lines = []
    for name, value in r.items():
        if name in known:
            continue
        if isinstance(value, Mapping):
            lines.append(f"{name}:")
            lines += [f"  {k}: {v}" for k, v in value.items()]
        else:
            lines.append(f"{name}: {value}")
    return lines


def _device_line(name: str, state: str, reason: str | None, counters: Mapping[str, Any] | None, width: int) -> str:
    line = f"  {name:<{width}}  {state:<9}"
    if counters:
        if "requests" in counters:  # a Modbus device
            shown = {k: counters.get(k, 0) for k in _MODBUS_SHOWN}
            shown["exceptions"] = sum((counters.get("exceptions") or {}).values())
            latency = (counters.get("latency_ms") or {}).get("p50")
            line += f"  {_counts(shown)}"
            if latency is not None:
                line += f", latency p50 {latency} ms"
        else:
            line += f"  {_counts(counters)}"
    if reason:
        line += f"\n  {'':<{width}}  reason: {reason}"
    return line


def render_gateway(r: Mapping[str, Any], device_sources: Mapping[str, str] | None = None) -> str:
    """``device_sources`` (device -> source name, from the config) lists devices not yet reported too."""
    device_sources = device_sources or {}
    lines = [_header("gateway", f"{r.get('site', '?')}/{r.get('gateway', '?')}", r)]

    uplink = r.get("uplink") or {}
    state = uplink.get("state", "?")
    lines.append(f"uplink    {state}{_since(uplink.get('since_ms'))}, {uplink.get('connects', 0)} connects")
    detail = [f"in flight {uplink.get('inflight', 0)}"]
    if uplink.get("replaying"):
        detail.append(f"replaying the backlog, lag {_seconds(uplink.get('replay_lag_s'))}")
    detail.append(f"last error: {uplink.get('last_error') or 'none'}")
    lines.append("          " + "; ".join(detail))

    buffer = r.get("buffer") or {}
    lines.append(
        f"buffer    {buffer.get('messages', '?')} messages ({buffer.get('records', '?')} records), "
        f"{_size(buffer.get('bytes'))} of {_size(buffer.get('max_bytes'))}, "
        f"oldest {_seconds(buffer.get('oldest_age_s'))}; {buffer.get('durability', '?')}"
    )
    drops = _counts(r.get("drops") or {})
    lines.append(f"          dropped: {drops}; readings not buffered: {r.get('readings_dropped', 0)}")
    rates = r.get("rates") or {}
    records_in, records_out = rates.get("records_in_per_s", "?"), rates.get("records_out_per_s", "?")
    lines.append(f"rates     in {records_in} records/s, out {records_out} records/s")

    local = r.get("local_broker")
    if isinstance(local, Mapping):
        access = "logins required" if local.get("auth") else "anonymous"
        if local.get("acl"):
            access += ", topic rules"
        lines.append(
            f"local     broker {local.get('bind', '')} ({access}); refused: {local.get('refused_logins', 0)} logins, "
            f"{local.get('refused_topics', 0)} publish/subscribe"
        )
    else:
        lines.append("local     no broker (local_broker.enabled = false)")

    commands = r.get("commands") or {}
    lines.append(
        f"commands  executed {commands.get('executed', 0)}, failed {commands.get('failed', 0)}"
        f" (refused {commands.get('refused', 0)})"
    )

    states: Mapping[str, str] = r.get("devices") or {}
    reasons: Mapping[str, str] = r.get("device_reasons") or {}
    names = list(dict.fromkeys([*device_sources, *states]))
    lines.append(f"devices   {len(names)}")
    width = max((len(n) for n in names), default=0)
    sources: Mapping[str, Any] = r.get("sources") or {}
    for name in names:
        source_name = device_sources.get(name) or next(
            (n for n, c in sources.items() if isinstance(c, Mapping) and name in (c.get("devices") or {})), ""
        )  # from the config; else the Modbus source whose counters list the device
        source = sources.get(source_name, {})
        per_device = source.get("devices") if isinstance(source, Mapping) else None
        counters = per_device.get(name) if isinstance(per_device, Mapping) else source
        lines.append(_device_line(name, states.get(name, "no state yet"), reasons.get(name), counters, width))

    lines += _problems(r)
    known = {
        "ts", "site", "gateway", "uptime_s", "pid", "uplink", "buffer", "drops", "rates", "local_broker",
        "commands", "devices", "device_reasons", "sources", "recent_problems", "readings_published",
        "records_buffered", "records_delivered", "messages_delivered", "local_rejected", "local_overflow",
        "readings_dropped", "states_dropped", "buffer_write_failures", "control_drops", "last_seq",
    }  # fmt: skip
    return "\n".join(lines + _extra(r, known))


def render_cloud(r: Mapping[str, Any]) -> str:
    lines = [_header("cloud", str(r.get("cloud", "?")), r)]
    lines.append(f"broker    {r.get('broker', '?')}")
    rates = r.get("rates") or {}
    lines.append(
        f"ingest    {rates.get('records_in_per_s', '?')} records/s decoded, "
        f"{rates.get('records_stored_per_s', '?')} records/s stored; {r.get('messages', 0)} messages, "
        f"{r.get('records', 0)} records so far"
    )
    lines.append(
        f"          rejected {r.get('records_rejected', 0)}, duplicates {r.get('duplicates_dropped', 0)}, "
        f"bad messages {r.get('bad_messages', 0)}, dead letters {r.get('dead_letters', 0)}"
    )
    write_ms = r.get("store_write_ms") or {}
    lines.append(
        f"store     {r.get('records_stored', 0)} records stored, {r.get('store_failures', 0)} failures, "
        f"write p50 {write_ms.get('p50', '-')} ms, p99 {write_ms.get('p99', '-')} ms"
    )
    spool = r.get("spool")
    if isinstance(spool, Mapping):
        lines.append(
            f"spool     {spool.get('records', 0)} records waiting, oldest {_seconds(spool.get('oldest_age_s'))}; "
            f"spooled {spool.get('spooled', 0)}, drained {spool.get('drained', 0)}"
        )
    else:
        lines.append("spool     off")
    alerts = r.get("alerts")
    if isinstance(alerts, Mapping):
        lines.append(
            f"alerts    {alerts.get('firing', 0)} firing ({alerts.get('acknowledged', 0)} acknowledged), "
            f"{alerts.get('pending', 0)} pending; fired {alerts.get('fired_total', 0)}, "
            f"resolved {alerts.get('resolved_total', 0)}; {alerts.get('silences', 0)} silences"
        )
        lines.append(
            f"outbox    {alerts.get('outbox_pending', 0)} pending; sent {alerts.get('notifications_sent', 0)}, "
            f"failed attempts {alerts.get('notification_failures', 0)}, "
            f"refused for good {alerts.get('notifications_failed_permanently', 0)}"
        )
    lines += _problems(r)
    known = {
        "ts", "cloud", "uptime_s", "pid", "broker", "rates", "messages", "records", "records_stored",
        "records_rejected", "duplicates_dropped", "bad_messages", "dead_letters", "store_failures",
        "store_write_ms", "spool", "alerts", "recent_problems",
    }  # fmt: skip
    return "\n".join(lines + _extra(r, known))
