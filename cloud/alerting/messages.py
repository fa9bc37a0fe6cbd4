"""Readable notification texts: subject, body and a short SMS form, for every kind of message.

Every message names the site, gateway, device, metric, value, threshold and since when,
and says how to acknowledge; a resolved message says how long it lasted. The examples
in ``docs/alerting.md`` are generated from these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cloud.alerting.engine import format_duration
from cloud.alerting.model import Alert, iso

__all__ = ["render"]

_TITLES = {"firing": "FIRING", "resolved": "RESOLVED", "reminder": "STILL FIRING", "escalation": "ESCALATED"}


def _value(alert: Alert) -> str:
    if alert.value is None:
        return "-"
    unit = f" {alert.unit}" if alert.unit else ""
    return f"{alert.value:g}{unit}"


def _lasted(alert: Alert) -> str | None:
    if alert.since_ms is None or alert.ended_ms is None:
        return None
    return format_duration(max(0, alert.ended_ms - alert.since_ms) / 1000)


def _headline(alert: Alert) -> str:
    where = alert.where()
    if alert.state == "resolved":
        lasted = _lasted(alert)
        what = f" {alert.metric}" if alert.kind == "threshold" else ""
        back = f"{what} back to {_value(alert)}" if alert.kind in ("threshold", "backlog") and alert.value else ""
        if alert.replayed:
            reached = f"{alert.metric} reached {_value(alert)} ({alert.threshold})"
            return f"{alert.rule}: {where} {reached} for {lasted} while the gateway was cut off"
        return f"{alert.rule}: {where}{back}, resolved after {lasted}"
    return alert.summary()


def _block(alert: Alert, now_ms: int, ack_hint: str) -> list[str]:
    lines = [_headline(alert), ""]
    lines.append(f"  Severity:  {alert.severity}")
    lines.append(f"  Site:      {alert.site}")
    lines.append(f"  Gateway:   {alert.gateway}")
    if alert.device:
        lines.append(f"  Device:    {alert.device}")
    if alert.metric:
        lines.append(f"  Metric:    {alert.metric}")
    if alert.kind in ("threshold", "rate", "backlog"):
        lines.append(f"  Value:     {_value(alert)}")
    if alert.threshold:
        unit = f" {alert.unit}" if alert.unit and alert.kind == "threshold" else ""
        lines.append(f"  Threshold: {alert.threshold}{unit}")
    if alert.extra.get("reason"):
        lines.append(f"  Reason:    {alert.extra['reason']}")
    if alert.since_ms is not None:
        ago = "" if alert.state == "resolved" else f" ({format_duration(max(0, now_ms - alert.since_ms) / 1000)} ago)"
        lines.append(f"  Since:     {iso(alert.since_ms)}{ago}")
    if alert.state == "resolved":
        lines.append(f"  Resolved:  {iso(alert.ended_ms)}")
        lines.append(f"  Lasted:    {_lasted(alert)}")
    if alert.replayed:
        lines.append("  Note:      reported late: it began and ended while the gateway's uplink was down")
    if alert.acked_by:
        lines.append(f"  Acknowledged by {alert.acked_by} at {iso(alert.acked_ms)}")
    if alert.description:
        lines.append(f"  {alert.description}")
    lines.append(f"  Alert id:  {alert.id}")
    if alert.state != "resolved" and not alert.acked_by:
        lines.append(f"  Acknowledge: {ack_hint.format(id=alert.id)}")
    return lines


def render(
    status: str,
    alerts: Sequence[Alert],
    *,
    now_ms: int,
    key: str,
    ack_hint: str,
    max_alerts: int = 20,
    held: Sequence[str] = (),
    receiver: str = "",
    window: str = "",
) -> dict[str, Any]:
    """The payload a notifier sends (docs/notifications.md#payload)."""
    if status == "summary":
        return _summary(held, now_ms=now_ms, key=key, receiver=receiver, window=window)
    firing = [a for a in alerts if a.state != "resolved"]
    resolved = [a for a in alerts if a.state == "resolved"]
    top = min(alerts, key=_rank)
    title = _TITLES.get(status, status.upper())
    if len(alerts) == 1:
        subject = f"[{title} {top.severity}] {_headline(top)}"
    else:
        counts = ", ".join(
            p for p in (f"{len(firing)} firing" if firing else "", f"{len(resolved)} resolved" if resolved else "") if p
        )
        subject = f"[{title} {top.severity}] {counts}: {_headline(top)} and {len(alerts) - 1} more"
    body: list[str] = []
    if status == "escalation":
        body += ["Not acknowledged in time: escalated to you.", ""]
    elif status == "reminder":
        body += ["Still firing:", ""]
    shown = sorted(alerts, key=lambda a: (a.state == "resolved", _rank(a)))
    for alert in shown[:max_alerts]:
        body += [*_block(alert, now_ms, ack_hint), ""]
    if len(shown) > max_alerts:
        body.append(f"... and {len(shown) - max_alerts} more alerts (fieldlink-cloud alerts list)")
    short = _short(title, top, len(alerts))
    return {
        "key": key,
        "status": status,
        "severity": top.severity,
        "subject": subject,
        "body": "\n".join(body).rstrip() + "\n",
        "short": short,
        "alerts": [a.view() for a in shown[:max_alerts]],
        "ack_hint": ack_hint.format(id=top.id),
    }


def _rank(alert: Alert) -> int:
    from cloud.alerting.config import SEVERITY_RANK, Severity  # noqa: PLC0415 (tiny; avoids a cycle)

    return SEVERITY_RANK.get(Severity(alert.severity), 9)


def _short(title: str, top: Alert, count: int) -> str:
    more = f" (+{count - 1} more)" if count > 1 else ""
    if top.state == "resolved":
        text = f"{title}: {top.rule} {top.where()} after {_lasted(top)}{more}"
    else:
        text = f"{title} {top.severity}: {top.summary()} since {iso(top.since_ms)}{more}. Ack: {top.id}"
    return text if len(text) <= 160 else text[:157] + "..."


def _summary(held: Sequence[str], *, now_ms: int, key: str, receiver: str, window: str) -> dict[str, Any]:
    subject = f"[SUMMARY] {len(held)} alert notifications held back by the rate limit of {receiver} ({window})"
    body = [
        f"{len(held)} notifications for {receiver} went over its rate limit in the last {window};",
        "instead of sending each, here they are in one message:",
        "",
        *(f"  - {line}" for line in held[:200]),
    ]
    if len(held) > 200:
        body.append(f"  ... and {len(held) - 200} more (fieldlink-cloud alerts list)")
    return {
        "key": key,
        "status": "summary",
        "severity": "info",
        "subject": subject,
        "body": "\n".join(body) + "\n",
        "short": f"{len(held)} alerts held back by the rate limit ({window}); see fieldlink-cloud alerts list"[:160],
        "alerts": [],
        "ack_hint": "fieldlink-cloud alerts list",
        "sent_at": iso(now_ms),
    }
