"""From alert transitions to notifications: routing, grouping, silences, inhibition, quiet
hours, escalation and rate limits (the Alertmanager model, plus acknowledgement).

Like the engine it is plain state driven by ``now_ms`` arguments, so ``rules test``
runs it with a simulated clock. :meth:`Dispatcher.tick` returns the notifications that
are due; the caller stores them in the outbox in the same transaction as the
dispatcher's state (:meth:`Dispatcher.dirty_state`), so a restart never sends twice.

- Routing: the tree in ``[alerting.routing]``; children inherit unset settings; the first
  matching child wins unless it says ``continue``; no child matching means the node itself.
- Grouping: alerts of a route with equal ``group_by`` labels share messages. A new group
  waits ``group_wait``; later changes go out at most every ``group_interval``; firing,
  unacknowledged alerts are repeated every ``repeat_interval`` (a dead-man rule's own
  ``repeat_interval`` when shorter).
- An alert resolved before it was ever notified is dropped (flapping below ``group_wait``),
  except a replayed one, which only exists resolved.
- Muted alerts (silenced, inhibited, or in quiet hours) are not notified; when the mute
  ends, what is still firing goes out.
- Escalation: a critical alert still firing and not acknowledged ``escalate_after`` after
  it fired is sent once to ``escalate_to``.
- Rate limit per receiver: over ``count`` messages per ``per``, the rest become one summary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from cloud.alerting.config import (
    AlertingSection,
    InhibitConfig,
    Matchers,
    QuietHours,
    RateLimit,
    RouteConfig,
    RuleConfig,
    Severity,
    matches,
)
from cloud.alerting.messages import render
from cloud.alerting.model import Alert

__all__ = ["Dispatcher", "Notification", "Route", "Silence"]

DEFAULT_GROUP_BY = ["rule", "site", "gateway", "device"]
_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class Notification:
    receiver: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Route:
    """A node of the routing tree with its inherited settings resolved."""

    id: str
    match: Matchers
    severities: tuple[str, ...]
    receivers: tuple[str, ...]
    group_by: tuple[str, ...]
    group_wait: float
    group_interval: float
    repeat_interval: float
    send_resolved: bool
    quiet_hours: tuple[QuietHours, ...]
    escalate_after: float | None
    escalate_to: tuple[str, ...]
    continue_: bool
    children: tuple[Route, ...]

    def accepts(self, labels: dict[str, str]) -> bool:
        return matches(self.match, labels) and (not self.severities or labels.get("severity", "") in self.severities)


def build_routes(config: RouteConfig, rules: list[RuleConfig]) -> Route:
    root = _route(config, None, "root")
    # `notify = [...]` on a rule is a route of its own, tried first.
    shortcuts = tuple(
        _route(RouteConfig(match={"rule": rule.name}, receivers=rule.notify, routes=[]), root, f"rule:{rule.name}")
        for rule in rules
        if rule.notify
    )
    return Route(**{**root.__dict__, "children": shortcuts + root.children})


def _route(config: RouteConfig, parent: Route | None, route_id: str) -> Route:
    def pick(name: str, default: Any) -> Any:
        value = getattr(config, name)
        if value is not None:
            return value
        return getattr(parent, name) if parent is not None else default

    node = Route(
        id=route_id,
        match=dict(config.match),
        severities=tuple(s.value for s in config.severities),
        receivers=tuple(pick("receivers", ())),
        group_by=tuple(pick("group_by", DEFAULT_GROUP_BY)),
        group_wait=pick("group_wait", 0.0),
        group_interval=pick("group_interval", 10.0),
        repeat_interval=pick("repeat_interval", 4 * 3600.0),
        send_resolved=pick("send_resolved", True),
        quiet_hours=tuple(pick("quiet_hours", ())),
        escalate_after=pick("escalate_after", None),
        escalate_to=tuple(pick("escalate_to", ())),
        continue_=config.continue_,
        children=(),
    )
    children = tuple(_route(child, node, f"{route_id}.{i}") for i, child in enumerate(config.routes))
    return Route(**{**node.__dict__, "children": children})


def route_alert(root: Route, labels: dict[str, str]) -> list[Route]:
    """The routes an alert goes to (Alertmanager's matching: deepest match, `continue`)."""
    if not root.accepts(labels):
        return []
    found: list[Route] = []
    for child in root.children:
        matched = route_alert(child, labels)
        if matched:
            found += matched
            if not child.continue_:
                break
    return found or [root]


@dataclass
class Silence:
    id: str
    matchers: Matchers
    ends_ms: int
    created_by: str
    comment: str = ""
    starts_ms: int = 0

    def active(self, now_ms: int) -> bool:
        return self.starts_ms <= now_ms < self.ends_ms

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def in_quiet_hours(hours: QuietHours, now_ms: int) -> int | None:
    """If ``now_ms`` falls in these quiet hours, when (ms) they end; else None."""
    zone = ZoneInfo(hours.timezone)
    local = datetime.fromtimestamp(now_ms / 1000, UTC).astimezone(zone)
    now_t = local.time()
    for start, end in hours.ranges():
        if start <= end:
            inside, started_today = start <= now_t < end, True
        else:  # crosses midnight: 22:00-06:00
            inside, started_today = (now_t >= start or now_t < end), now_t >= start
        if not inside:
            continue
        start_day = local if started_today else local - _ONE_DAY
        if _WEEKDAYS[start_day.weekday()] not in hours.weekdays:
            continue
        end_local = local.replace(hour=end.hour, minute=end.minute, second=end.second, microsecond=end.microsecond)
        if end_local <= local:
            end_local = end_local + _ONE_DAY
        return int(end_local.timestamp() * 1000)
    return None


_ONE_DAY = timedelta(days=1)


@dataclass
class _Group:
    key: str
    route: str
    first_ms: int
    next_ms: int | None = None  # a flush is due at
    last_sent_ms: int | None = None
    sent: dict[str, str] = field(default_factory=dict)  # alert id -> token last notified
    members: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _token(alert: Alert) -> str:
    return f"{alert.state}:{alert.severity}:{alert.episode}"


class Dispatcher:
    def __init__(self, config: AlertingSection, rules: list[RuleConfig], receivers: list[str]) -> None:
        self.config = config
        self.root = build_routes(config.routing, rules)
        self._routes: dict[str, Route] = {}
        self._index(self.root)
        self.receivers = set(receivers)
        self.rules = {rule.name: rule for rule in rules}
        self.inhibit: list[InhibitConfig] = list(config.inhibit)
        self.silences: dict[str, Silence] = {}
        self.groups: dict[str, _Group] = {}
        self.escalated: dict[str, int] = {}  # alert id -> episode escalated
        self.rate: dict[str, dict[str, Any]] = {}  # receiver -> {"start", "count", "held": [...]}
        self._dirty_groups: set[str] = set()
        self._dirty_meta = False
        self.muted_total = 0
        self.rate_limited_total = 0

    def _index(self, route: Route) -> None:
        self._routes[route.id] = route
        for child in route.children:
            self._index(child)

    # --- persistence ------------------------------------------------------------------

    def load(self, groups: list[dict[str, Any]], meta: dict[str, Any], silences: list[dict[str, Any]]) -> None:
        for body in groups:
            group = _Group(**body)
            if group.route in self._routes:  # a route removed from the config: its groups go too
                self.groups[group.key] = group
        self.escalated = dict(meta.get("escalated", {}))
        self.rate = dict(meta.get("rate", {}))
        self.silences = {s["id"]: Silence(**s) for s in silences}

    def dirty_state(self) -> tuple[dict[str, dict[str, Any] | None], dict[str, Any] | None]:
        """Groups changed since the last call (None = deleted), and the meta state if changed."""
        groups = {key: (self.groups[key].to_json() if key in self.groups else None) for key in self._dirty_groups}
        meta = {"escalated": self.escalated, "rate": self.rate} if self._dirty_meta else None
        self._dirty_groups.clear()
        self._dirty_meta = False
        return groups, meta

    # --- silences ------------------------------------------------------------------------

    def add_silence(self, silence: Silence) -> None:
        self.silences[silence.id] = silence

    def silenced_by(self, alert: Alert, now_ms: int) -> Silence | None:
        for silence in self.silences.values():
            if silence.active(now_ms) and matches(silence.matchers, alert.labels):
                return silence
        return None

    def expired_silences(self, now_ms: int) -> list[str]:
        gone = [s.id for s in self.silences.values() if s.ends_ms <= now_ms]
        for silence_id in gone:
            del self.silences[silence_id]
        return gone

    def inhibited_by(self, alert: Alert, alerts: dict[str, Alert]) -> Alert | None:
        for rule in self.inhibit:
            if not matches(rule.target, alert.labels):
                continue
            for source in alerts.values():
                if source.id == alert.id or source.state != "firing" or not matches(rule.source, source.labels):
                    continue
                if all(source.labels.get(name, "") == alert.labels.get(name, "") for name in rule.equal):
                    return source
        return None

    # --- the pipeline ----------------------------------------------------------------------

    def on_change(self, alert: Alert, now_ms: int) -> None:
        """An alert changed (fired, resolved, severity): put it in its groups."""
        if alert.state == "pending":
            return
        for route in route_alert(self.root, alert.labels):
            values = "|".join(f"{name}={alert.labels.get(name, '')}" for name in route.group_by)
            key = f"{route.id}/{values}"
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = _Group(key, route.id, now_ms, next_ms=now_ms + int(route.group_wait * 1000))
            if alert.id not in group.members:
                group.members.append(alert.id)
            if group.next_ms is None:
                earliest = (group.last_sent_ms or 0) + int(route.group_interval * 1000)
                group.next_ms = max(now_ms, earliest)
            self._dirty_groups.add(key)

    def tick(self, alerts: dict[str, Alert], now_ms: int) -> list[Notification]:
        out: list[Notification] = []
        for group in list(self.groups.values()):
            route = self._routes[group.route]
            due = group.next_ms is not None and group.next_ms <= now_ms
            repeat_due = group.last_sent_ms is not None and now_ms >= group.last_sent_ms + self._repeat_ms(
                route, group, alerts
            )
            if due or repeat_due:
                out += self._flush(group, route, alerts, now_ms, repeat=repeat_due and not due)
        out += self._escalations(alerts, now_ms)
        out += self._summaries(now_ms)
        return out

    def _repeat_ms(self, route: Route, group: _Group, alerts: dict[str, Alert]) -> int:
        repeat = route.repeat_interval
        for alert_id in group.members:
            rule = self.rules.get(alerts[alert_id].rule) if alert_id in alerts else None
            own = getattr(rule, "repeat_interval", None)
            if own is not None:
                repeat = min(repeat, own)
        return int(repeat * 1000)

    def _muted(self, alert: Alert, route: Route, alerts: dict[str, Alert], now_ms: int) -> int | bool:
        """False, True (silenced or inhibited), or when quiet hours end (ms)."""
        if self.silenced_by(alert, now_ms) is not None or self.inhibited_by(alert, alerts) is not None:
            return True
        for hours in route.quiet_hours:
            if alert.severity in {s.value if isinstance(s, Severity) else s for s in hours.except_severities}:
                continue
            ends = in_quiet_hours(hours, now_ms)
            if ends is not None:
                return ends
        return False

    def _flush(
        self, group: _Group, route: Route, alerts: dict[str, Alert], now_ms: int, *, repeat: bool
    ) -> list[Notification]:
        self._dirty_groups.add(group.key)
        group.next_ms = None
        new, still, resolved, retry_at = self._sort_members(group, route, alerts, now_ms)
        if retry_at is not None:
            group.next_ms = retry_at  # quiet hours: look again when they end
        if not group.members:
            del self.groups[group.key]
        if new or resolved:
            status = "firing" if new else "resolved"
            shown = new + still + resolved
        elif repeat and still:
            status, shown = "reminder", still
        else:
            if repeat:
                group.last_sent_ms = now_ms  # nothing to repeat now; look again a repeat interval later
            return []
        for alert in shown:
            group.sent[alert.id] = _token(alert)
        group.last_sent_ms = now_ms
        tokens = ",".join(sorted(f"{a.id}={_token(a)}" for a in shown))
        if status == "reminder":
            tokens += f"#{now_ms // max(1, self._repeat_ms(route, group, alerts))}"
        return self._send(route.receivers, status, shown, key=(group.key, tokens), now_ms=now_ms)

    def _sort_members(
        self, group: _Group, route: Route, alerts: dict[str, Alert], now_ms: int
    ) -> tuple[list[Alert], list[Alert], list[Alert], int | None]:
        """A group's alerts: newly firing (or changed severity), still firing (not acknowledged),
        resolved since notified; and when quiet hours end if they hold something back.
        Resolved alerts leave the group."""
        new: list[Alert] = []
        still: list[Alert] = []
        resolved: list[Alert] = []
        retry_at: int | None = None
        for alert_id in list(group.members):
            alert = alerts.get(alert_id)
            muted = False if alert is None else self._muted(alert, route, alerts, now_ms)
            if muted is not False and not isinstance(muted, bool):
                retry_at = muted if retry_at is None else min(retry_at, muted)
            if alert is None or alert.state == "resolved":
                if alert is not None and muted is not False and not isinstance(muted, bool):
                    continue  # in quiet hours: the resolved message waits for their end
                sent = group.sent.pop(alert_id, None)
                group.members.remove(alert_id)
                notified = sent is not None and sent.startswith("firing") and route.send_resolved
                if alert is not None and muted is False and (notified or (alert.replayed and sent is None)):
                    resolved.append(alert)
                continue
            if alert.state != "firing":
                continue
            if muted is True:
                # Silenced or inhibited: look again when the silence ends, or a group interval later.
                self.muted_total += 1
                silence = self.silenced_by(alert, now_ms)
                again = now_ms + int(route.group_interval * 1000)
                again = min(again, silence.ends_ms) if silence is not None else again
                retry_at = again if retry_at is None else min(retry_at, again)
            elif muted is False:
                if group.sent.get(alert_id) != _token(alert):
                    new.append(alert)
                elif not alert.acked_by:
                    still.append(alert)
        return new, still, resolved, retry_at

    def _send(
        self, receivers: tuple[str, ...], status: str, shown: list[Alert], *, key: tuple[str, str], now_ms: int
    ) -> list[Notification]:
        """One message per receiver; its idempotency key depends only on what it says."""
        out = []
        group_key, tokens = key
        digest = hashlib.sha256(f"{group_key}|{status}|{tokens}".encode()).hexdigest()[:24]
        for receiver in receivers:
            key = f"{status}/{receiver}/{digest}"
            payload = render(
                status,
                shown,
                now_ms=now_ms,
                key=key,
                ack_hint=self.config.ack_hint,
                max_alerts=self.config.max_message_alerts,
            )
            if self._over_limit(receiver, payload["subject"], now_ms):
                continue
            out.append(Notification(receiver, payload))
        return out

    # --- escalation ----------------------------------------------------------------------

    def _escalations(self, alerts: dict[str, Alert], now_ms: int) -> list[Notification]:
        out: list[Notification] = []
        for alert in alerts.values():
            if alert.state != "firing" or alert.acked_by or alert.severity != Severity.CRITICAL.value:
                continue
            if self.escalated.get(alert.id) == alert.episode:
                continue
            for route in route_alert(self.root, alert.labels):
                if route.escalate_after is None or not route.escalate_to:
                    continue
                fired_ms = alert.extra.get("fired_ms", alert.changed_ms)
                if now_ms - fired_ms < route.escalate_after * 1000:
                    continue
                if self._muted(alert, route, alerts, now_ms) is not False:
                    continue
                self.escalated[alert.id] = alert.episode
                self._dirty_meta = True
                tokens = f"{alert.id}={alert.episode}"
                out += self._send(
                    route.escalate_to, "escalation", [alert], key=(f"escalate/{route.id}", tokens), now_ms=now_ms
                )
        for alert_id in [a for a in self.escalated if a not in alerts]:
            del self.escalated[alert_id]
            self._dirty_meta = True
        return out

    # --- rate limits ----------------------------------------------------------------------

    def _limit(self, receiver: str) -> RateLimit | None:
        return self.config.rate_limits.get(receiver, self.config.rate_limit)

    def _over_limit(self, receiver: str, subject: str, now_ms: int) -> bool:
        limit = self._limit(receiver)
        if limit is None:
            return False
        window = self.rate.get(receiver)
        if window is None or now_ms >= window["start"] + limit.per * 1000:
            if window is not None and window["held"]:
                return self._hold(window, subject)  # the summary of the old window goes first
            window = self.rate[receiver] = {"start": now_ms, "count": 0, "held": []}
        self._dirty_meta = True
        if window["count"] < limit.count:
            window["count"] += 1
            return False
        return self._hold(window, subject)

    def _hold(self, window: dict[str, Any], subject: str) -> bool:
        window["held"].append(subject)
        self.rate_limited_total += 1
        self._dirty_meta = True
        return True

    def _summaries(self, now_ms: int) -> list[Notification]:
        out = []
        for receiver, window in self.rate.items():
            limit = self._limit(receiver)
            if limit is None or not window["held"] or now_ms < window["start"] + limit.per * 1000:
                continue
            held = window["held"]
            key = f"summary/{receiver}/{window['start']}"
            per = f"{limit.per:g} s" if limit.per < 60 else f"{limit.per / 60:g} min"
            payload = render(
                "summary", [], now_ms=now_ms, key=key, ack_hint="", held=held, receiver=receiver, window=per
            )
            out.append(Notification(receiver, payload))
            # The summary opens the next window and counts in it.
            self.rate[receiver] = {"start": now_ms, "count": 1, "held": []}
            self._dirty_meta = True
        return out
