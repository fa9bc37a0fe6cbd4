"""What the alerting engine keeps: alerts, and the history entries of their transitions."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["Alert", "AlertState", "HistoryEntry", "iso", "now_ms"]

AlertState = Literal["pending", "firing", "resolved"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso(ts_ms: int | None) -> str | None:
    if ts_ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts_ms // 1000)) + f".{ts_ms % 1000:03d}Z"


@dataclass
class Alert:
    """One alert: a rule's condition for one device (or gateway), through its episodes.

    ``since_ms`` and ``ended_ms`` are measurement times (the records' own ``ts``; for
    dead-man and status rules, when the silence or the status began); ``changed_ms``
    is wall-clock time of the last transition. An alert that fires again after it
    resolved starts a new episode: ``episode`` is the ``since_ms`` of the current one.
    """

    id: str
    rule: str
    kind: str
    labels: dict[str, str]
    severity: str
    state: AlertState
    value: float | None = None
    unit: str | None = None
    threshold: str = ""
    description: str = ""
    since_ms: int | None = None  # firing (or pending) since
    ended_ms: int | None = None  # resolved at
    changed_ms: int = 0
    acked_by: str | None = None
    acked_ms: int | None = None
    ack_comment: str | None = None
    replayed: bool = False  # raised and cleared inside a gateway's backlog (reported after the fact)
    episode: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def site(self) -> str:
        return self.labels.get("site", "")

    @property
    def gateway(self) -> str:
        return self.labels.get("gateway", "")

    @property
    def device(self) -> str:
        return self.labels.get("device", "")

    @property
    def metric(self) -> str:
        return self.labels.get("metric", "")

    @property
    def topic_key(self) -> str:
        """A topic level naming this alert (ids are made of topic-safe parts)."""
        return self.id

    def where(self) -> str:
        return "/".join(p for p in (self.site, self.gateway, self.device) if p)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Alert:
        return cls(**body)

    def view(self) -> dict[str, Any]:
        """The dashboard / webhook form (docs/alerting.md#dashboard-topics)."""
        return {
            "id": self.id,
            "rule": self.rule,
            "kind": self.kind,
            "severity": self.severity,
            "state": self.state,
            "site": self.site,
            "gateway": self.gateway,
            "device": self.device or None,
            "metric": self.metric or None,
            "value": self.value,
            "unit": self.unit,
            "threshold": self.threshold,
            "summary": self.summary(),
            "since": iso(self.since_ms),
            "ended": iso(self.ended_ms),
            "acknowledged_by": self.acked_by,
            "acknowledged_at": iso(self.acked_ms),
            "replayed": self.replayed,
            "labels": self.labels,
        }

    def summary(self) -> str:
        """One readable line: what, where, how much."""
        subject = self.where()
        if self.kind in ("threshold", "rate"):
            unit = f" {self.unit}" if self.unit else ""
            what = f"{self.metric}{'/' + self.extra.get('per', '') if self.kind == 'rate' else ''}"
            value = "?" if self.value is None else f"{self.value:g}"
            return f"{self.rule}: {subject} {what} = {value}{unit} ({self.threshold})"
        if self.kind == "deadman":
            what = f" {self.metric}" if self.metric else ""
            return f"{self.rule}: {subject}{what} silent for more than {self.threshold}"
        if self.kind == "offline":
            reason = self.extra.get("reason")
            return f"{self.rule}: {subject} offline" + (f" ({reason})" if reason else "")
        if self.kind == "backlog":
            value = "?" if self.value is None else f"{self.value:g}"
            return f"{self.rule}: {subject} backlog is {value} s old ({self.threshold})"
        return f"{self.rule}: {subject}"


@dataclass(frozen=True)
class HistoryEntry:
    """One line of the alert history: a transition, an acknowledgement, a notification attempt."""

    ts_ms: int  # wall clock
    alert_id: str
    event: str  # pending, firing, severity, resolved, acknowledged, notified, notify_failed, ...
    detail: dict[str, Any]
