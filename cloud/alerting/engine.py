"""Rule evaluation: records, status messages and health reports in, alert transitions out.

The engine is plain, synchronous state: time comes in as arguments (``now_ms`` is
wall-clock time, records carry their own ``ts``), so ``fieldlink-cloud rules test``
replays a CSV series through the very same code with a simulated clock. The caller
persists what changed (:meth:`Engine.take_changes`) before it acknowledges the
messages that caused it, so a restart neither forgets an alert nor evaluates a record twice.

Threshold and rate rules are evaluated per series (rule, site, gateway, device) in
record time. A record older than the newest one evaluated for its series is *late*:
after an uplink outage a gateway sends live records while its backlog drains. Late
records go through a second, simpler pass (:class:`_Late`) that reports an episode
that began and ended inside the backlog once, after the fact, marked ``replayed``;
an episode that runs into a live alert only moves that alert's ``since`` earlier.
Nothing is ever notified twice for the same record.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cloud.alerting.config import (
    BacklogRule,
    DeadmanRule,
    Level,
    OfflineRule,
    RateRule,
    RuleConfig,
    ThresholdRule,
    matches,
)
from cloud.alerting.model import Alert, HistoryEntry, iso
from fieldlink.wire import Quality, Record, ValueType

__all__ = ["Changes", "Engine", "format_duration"]

log = logging.getLogger(__name__)

LATE_CLOSE_MS = 30_000  # a backlog episode with no late record for this long is closed
TIMELINE_LENGTH = 32  # live transitions kept per series, to place late records


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size} {unit}")
            seconds %= size
    return " ".join(parts[:2])


@dataclass(frozen=True, slots=True)
class _Sample:
    record: Record
    metric: str
    value: float  # for a rate rule, the rate
    unit: str | None
    raw: float  # the metric's own value


@dataclass
class Changes:
    """What one evaluation step changed, to be persisted (and then published, notified)."""

    alerts: dict[str, Alert] = field(default_factory=dict)  # changed alerts by id
    history: list[HistoryEntry] = field(default_factory=list)
    series: dict[str, dict[str, Any]] = field(default_factory=dict)  # dirty series state by key

    def __bool__(self) -> bool:
        return bool(self.alerts or self.history or self.series)


def _number(record: Record, metric: str) -> tuple[float, str | None] | None:
    value = record.values.get(metric)
    if value is None or value.quality is not Quality.GOOD or value.value is None:
        return None
    if value.type not in (ValueType.FLOAT, ValueType.INT) or isinstance(value.value, bool | str):
        return None
    number = float(value.value)
    if math.isnan(number) or math.isinf(number):
        return None
    return number, value.unit


class Engine:
    def __init__(self, rules: Iterable[RuleConfig]) -> None:
        self.rules = list(rules)
        self.by_name = {rule.name: rule for rule in self.rules}
        self._levelled: dict[str, list[ThresholdRule | RateRule]] = {}
        for rule in self.rules:
            if isinstance(rule, ThresholdRule | RateRule):
                self._levelled.setdefault(rule.metric, []).append(rule)
        self._deadman = [r for r in self.rules if isinstance(r, DeadmanRule)]
        self._offline = [r for r in self.rules if isinstance(r, OfflineRule)]
        self._backlog = [r for r in self.rules if isinstance(r, BacklogRule)]
        self.alerts: dict[str, Alert] = {}
        self.series: dict[str, dict[str, Any]] = {}
        self._match_cache: dict[tuple[str, str, str, str, str], bool] = {}
        self._changes = Changes()
        self.late_ignored = 0
        self.fired_total = 0
        self.resolved_total = 0

    @property
    def needs_health(self) -> bool:
        return bool(self._backlog)

    @property
    def needs_status(self) -> bool:
        return bool(self._offline)

    # --- persistence -----------------------------------------------------------------

    def load(self, alerts: Iterable[Alert], series: dict[str, dict[str, Any]]) -> None:
        self.alerts = {a.id: a for a in alerts}
        self.series = dict(series)

    def take_changes(self) -> Changes:
        changes, self._changes = self._changes, Changes()
        return changes

    def forget_resolved(self, before_ms: int) -> list[Alert]:
        """Drop resolved alerts that changed before ``before_ms``; returns them."""
        gone = [a for a in self.alerts.values() if a.state == "resolved" and a.changed_ms < before_ms]
        for alert in gone:
            del self.alerts[alert.id]
        return gone

    # --- inputs ------------------------------------------------------------------------

    def observe_records(self, records: Iterable[Record], now_ms: int) -> None:
        deadman = self._deadman
        for record in records:
            for metric in record.values:
                rules = self._levelled.get(metric)
                if rules:
                    for rule in rules:
                        if self._applies(rule, record.site, record.gateway, record.device, metric):
                            self._levelled_step(rule, record, metric, now_ms)
            for rule in deadman:
                if rule.metric is not None and rule.metric not in record.values:
                    continue
                if self._applies(rule, record.site, record.gateway, record.device, rule.metric or ""):
                    self._deadman_seen(rule, record, now_ms)

    def observe_status(  # noqa: PLR0917 (a status message's fields, in wire order)
        self, site: str, gateway: str, device: str | None, state: str, reason: str | None, ts: int, now_ms: int
    ) -> None:
        target = "gateway" if device is None else "device"
        for rule in self._offline:
            if rule.target != target or not self._applies(rule, site, gateway, device or "", ""):
                continue
            key = self._key(rule.name, site, gateway, device or "")
            series = self._series(key)
            series["rule"] = rule.name
            if ts < series.get("last_ts", -1):
                continue  # an older status than the one we went by
            series["last_ts"] = ts
            offline = state == "offline"
            series["offline_since"] = (series.get("offline_since") or ts) if offline else None
            series["reason"] = reason
            self._changes.series[key] = series
            alert = self.alerts.get(key)
            if offline and alert is not None and alert.state == "firing":
                continue  # already firing (a retained status heard again after a reconnect)
            if offline and rule.for_ == 0:
                self._fire(rule, key, (site, gateway, device), ts=ts, now_ms=now_ms, reason=reason)
            elif offline and (alert is None or alert.state == "resolved"):
                self._pending(rule, key, (site, gateway, device), ts=ts, now_ms=now_ms, reason=reason)
            elif not offline and alert is not None and alert.state != "resolved":
                self._resolve(alert, ts, now_ms, None)

    def observe_health(self, site: str, gateway: str, body: dict[str, Any], ts: int, now_ms: int) -> None:
        buffer = body.get("buffer") if isinstance(body.get("buffer"), dict) else {}
        age = buffer.get("oldest_age_s") if buffer else None
        age = float(age) if isinstance(age, int | float) and not isinstance(age, bool) else 0.0
        for rule in self._backlog:
            if not self._applies(rule, site, gateway, "", ""):
                continue
            key = self._key(rule.name, site, gateway, "")
            alert = self.alerts.get(key)
            firing = alert is not None and alert.state == "firing"
            clear = rule.above if rule.clear is None else rule.clear
            if not firing and age > rule.above:
                self._fire(rule, key, (site, gateway, None), value=age, ts=ts, now_ms=now_ms)
            elif firing and age <= clear:
                assert alert is not None
                self._resolve(alert, ts, now_ms, age)
            elif firing and alert is not None:
                alert.value = age

    def tick(self, now_ms: int) -> None:
        """Timers: dead-man silences, offline ``for``, backlog episodes with no more late records."""
        for key, series in self.series.items():
            rule = self.by_name.get(series.get("rule", ""))
            if isinstance(rule, DeadmanRule):
                last = series["last_ts"]
                alert = self.alerts.get(key)
                if now_ms - last > rule.silent_for * 1000 and (alert is None or alert.state == "resolved"):
                    site, gateway, device = series["where"]
                    self._fire(rule, key, (site, gateway, device), metric=rule.metric, ts=last, now_ms=now_ms)
            elif isinstance(rule, OfflineRule):
                since = series.get("offline_since")
                alert = self.alerts.get(key)
                pending = since is not None and alert is not None and alert.state == "pending"
                if pending and now_ms - since >= rule.for_ * 1000:  # type: ignore[operator]
                    self._promote(alert, now_ms)  # type: ignore[arg-type]
            late = series.get("late")
            if late and late.get("start") is not None and now_ms - late["wall"] > LATE_CLOSE_MS:
                self._close_late(rule, key, series, late["last"], now_ms, cleared=False)

    def ack(self, alert_id: str, by: str, comment: str | None, now_ms: int) -> Alert | None:
        alert = self.alerts.get(alert_id)
        if alert is None:
            return None
        alert.acked_by, alert.acked_ms, alert.ack_comment = by, now_ms, comment
        alert.changed_ms = now_ms
        self._record(alert, "acknowledged", now_ms, by=by, comment=comment)
        return alert

    # --- helpers --------------------------------------------------------------------------

    def _applies(self, rule: RuleConfig, site: str, gateway: str, device: str, metric: str) -> bool:
        cache_key = (rule.name, site, gateway, device, metric)
        hit = self._match_cache.get(cache_key)
        if hit is None:
            labels = {"site": site, "gateway": gateway, "device": device, "metric": metric, "rule": rule.name}
            hit = matches(rule.matchers(), labels)
            if len(self._match_cache) > 100_000:
                self._match_cache.clear()
            self._match_cache[cache_key] = hit
        return hit

    @staticmethod
    def _key(rule: str, site: str, gateway: str, device: str) -> str:
        return ":".join(p for p in (rule, site, gateway, device) if p)

    def _series(self, key: str) -> dict[str, Any]:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = {}
        return series

    def _labels(
        self, rule: RuleConfig, site: str, gateway: str, device: str | None, metric: str | None
    ) -> dict[str, str]:
        labels = {"site": site, "gateway": gateway, "rule": rule.name, "kind": rule.kind}
        if device:
            labels["device"] = device
        if metric:
            labels["metric"] = metric
        return {**rule.labels, **labels}

    def _record(self, alert: Alert, event: str, now_ms: int, **detail: Any) -> None:
        self._changes.alerts[alert.id] = alert
        detail = {k: v for k, v in detail.items() if v is not None}
        self._changes.history.append(HistoryEntry(now_ms, alert.id, event, {"severity": alert.severity, **detail}))

    def _new_alert(self, rule: RuleConfig, key: str, labels: dict[str, str], severity: str, threshold: str) -> Alert:
        alert = self.alerts.get(key)
        if alert is None or alert.state == "resolved":
            alert = Alert(key, rule.name, rule.kind, labels, severity, "pending", threshold=threshold)
            alert.description = rule.description
            self.alerts[key] = alert
        return alert

    def _fire(
        self,
        rule: RuleConfig,
        key: str,
        where: tuple[str, str, str | None],
        *,
        metric: str | None = None,
        value: float | None = None,
        ts: int,
        now_ms: int,
        reason: str | None = None,
    ) -> None:
        site, gateway, device = where
        severity = rule.severity.value  # type: ignore[union-attr]
        threshold = self._threshold_text(rule)
        alert = self._new_alert(rule, key, self._labels(rule, site, gateway, device, metric), severity, threshold)
        since = alert.since_ms if alert.state == "pending" and alert.since_ms is not None else ts
        self._start(alert, since, value, now_ms, reason)

    def _pending(
        self,
        rule: RuleConfig,
        key: str,
        where: tuple[str, str, str | None],
        *,
        ts: int,
        now_ms: int,
        reason: str | None,
    ) -> None:
        site, gateway, device = where
        alert = self._new_alert(rule, key, self._labels(rule, site, gateway, device, None), rule.severity.value, "")  # type: ignore[union-attr]
        alert.state, alert.since_ms, alert.changed_ms = "pending", ts, now_ms
        alert.extra["reason"] = reason
        self._record(alert, "pending", now_ms, ts=iso(ts), reason=reason)

    def _start(self, alert: Alert, since: int, value: float | None, now_ms: int, reason: str | None = None) -> None:
        alert.state, alert.since_ms, alert.ended_ms, alert.value = "firing", since, None, value
        alert.episode, alert.changed_ms = since, now_ms
        alert.extra["fired_ms"] = now_ms  # wall clock: escalation counts from here
        alert.acked_by = alert.acked_ms = alert.ack_comment = None
        if reason is not None:
            alert.extra["reason"] = reason
        self.fired_total += 1
        self._record(alert, "firing", now_ms, ts=iso(since), value=value, reason=reason)

    def _promote(self, alert: Alert, now_ms: int) -> None:
        alert.state, alert.episode, alert.changed_ms = "firing", alert.since_ms or now_ms, now_ms
        alert.extra["fired_ms"] = now_ms
        self.fired_total += 1
        self._record(alert, "firing", now_ms, ts=iso(alert.since_ms), reason=alert.extra.get("reason"))

    def _resolve(self, alert: Alert, ts: int, now_ms: int, value: float | None) -> None:
        was = alert.state
        alert.state, alert.ended_ms, alert.changed_ms = "resolved", ts, now_ms
        if value is not None:
            alert.value = value
        if was == "pending":
            self._record(alert, "pending_cancelled", now_ms, ts=iso(ts))
            return
        self.resolved_total += 1
        lasted = None if alert.since_ms is None else format_duration(max(0, ts - alert.since_ms) / 1000)
        self._record(alert, "resolved", now_ms, ts=iso(ts), value=value, lasted=lasted)

    @staticmethod
    def _threshold_text(rule: RuleConfig) -> str:
        if isinstance(rule, DeadmanRule):
            return format_duration(rule.silent_for)
        if isinstance(rule, BacklogRule):
            return f"> {rule.above:g} s"
        return ""

    # --- dead-man ---------------------------------------------------------------------------

    def _deadman_seen(self, rule: DeadmanRule, record: Record, now_ms: int) -> None:
        key = self._key(rule.name, record.site, record.gateway, record.device) + (
            f":{rule.metric}" if rule.metric else ""
        )
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = {"rule": rule.name, "where": [record.site, record.gateway, record.device]}
        if record.ts <= series.get("last_ts", -1):
            return
        series["last_ts"] = record.ts
        self._changes.series[key] = series
        alert = self.alerts.get(key)
        if alert is not None and alert.state == "firing":
            self._resolve(alert, record.ts, now_ms, None)

    # --- threshold and rate -----------------------------------------------------------------

    def _levelled_step(self, rule: ThresholdRule | RateRule, record: Record, metric: str, now_ms: int) -> None:
        found = _number(record, metric)
        if found is None:
            return
        value, unit = found
        key = self._key(rule.name, record.site, record.gateway, record.device)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = {"rule": rule.name, "last_ts": -1, "level": None, "timeline": []}
        ts = record.ts
        if ts <= series["last_ts"]:
            self._late_step(rule, key, series, record, value=value, unit=unit, now_ms=now_ms)
            return
        series["last_ts"] = ts
        self._changes.series[key] = series
        raw = value
        if isinstance(rule, RateRule):
            previous = series.get("prev")
            series["prev"] = [ts, value]
            if previous is None or ts <= previous[0]:
                return
            value = (value - previous[1]) / ((ts - previous[0]) / 1000) * rule.per
        sample = _Sample(record, metric, value, unit, raw)
        current: int | None = series["level"]
        target = self._target_level(rule.levels, current, value)
        if target is not None and (current is None or target < current):
            self._raise(rule, key, series, sample, target=target, now_ms=now_ms)
        elif current is None:
            # Not firing and not raising: a pending condition is over.
            if series.get("pending") is not None:
                series["pending"] = None
                alert = self.alerts.get(key)
                if alert is not None and alert.state == "pending":
                    self._resolve(alert, ts, now_ms, value)
        else:
            self._lower(rule, key, series, sample, target=target, now_ms=now_ms)

    def _raise(
        self,
        rule: ThresholdRule | RateRule,
        key: str,
        series: dict[str, Any],
        sample: _Sample,
        *,
        target: int,
        now_ms: int,
    ) -> None:
        """Raise (or move to a more severe level); from nothing, wait for `for` first."""
        series["clearing_since"] = None
        ts, since = sample.record.ts, sample.record.ts
        if series["level"] is None and rule.for_ > 0:
            pending = series.get("pending")
            if pending is None:
                series["pending"] = [ts, target]
                level = rule.levels[target]
                labels = self._labels(
                    rule, sample.record.site, sample.record.gateway, sample.record.device, sample.metric
                )
                alert = self._new_alert(rule, key, labels, level.severity.value, level.describe())
                alert.state, alert.since_ms, alert.changed_ms = "pending", ts, now_ms
                alert.value, alert.unit = sample.value, sample.unit
                self._record(alert, "pending", now_ms, ts=iso(ts), value=sample.value)
                return
            if ts - pending[0] < rule.for_ * 1000:
                return
            target, since = min(target, pending[1]), pending[0]
        series["pending"] = None
        self._set_level(rule, key, series, sample, target=target, since=since, now_ms=now_ms)

    def _lower(
        self,
        rule: ThresholdRule | RateRule,
        key: str,
        series: dict[str, Any],
        sample: _Sample,
        *,
        target: int | None,
        now_ms: int,
    ) -> None:
        """Firing: stay, go to a less severe level, or resolve (after keep_firing_for)."""
        ts = sample.record.ts
        alert = self.alerts.get(key)
        if alert is not None:
            alert.value = sample.value
        if target == series["level"]:
            series["clearing_since"] = None
            return
        if rule.keep_firing_for > 0:
            # The new level (or the clear) must hold keep_firing_for; a different one restarts it.
            clearing = series.get("clearing_since")
            if clearing is None or series.get("clearing_to", -1) != target:
                series["clearing_since"], series["clearing_to"] = ts, target
                return
            if ts - clearing < rule.keep_firing_for * 1000:
                return
        series["clearing_since"] = None
        if target is None:
            series["level"] = None
            self._timeline(series, ts, None)
            if alert is not None and alert.state != "resolved":
                self._resolve(alert, ts, now_ms, sample.value)
            return
        self._set_level(rule, key, series, sample, target=target, since=ts, now_ms=now_ms)

    @staticmethod
    def _target_level(levels: list[Level], current: int | None, value: float) -> int | None:
        """The level the value asks for: the most severe that raises, else (hysteresis) the
        most severe at or below the current one that has not cleared."""
        for index, level in enumerate(levels):
            if level.raises(value):
                return index
            if current is not None and index >= current and level.holds(value):
                return index
        return None

    def _set_level(
        self,
        rule: ThresholdRule | RateRule,
        key: str,
        series: dict[str, Any],
        sample: _Sample,
        *,
        target: int,
        since: int,
        now_ms: int,
    ) -> None:
        record, metric, value, unit = sample.record, sample.metric, sample.value, sample.unit
        level = rule.levels[target]
        previous = series["level"]
        series["level"] = target
        self._timeline(series, since, target)
        alert = self.alerts.get(key)
        if previous is None or alert is None or alert.state == "resolved":
            labels = self._labels(rule, record.site, record.gateway, record.device, metric)
            alert = self._new_alert(rule, key, labels, level.severity.value, level.describe())
            alert.unit, alert.severity, alert.threshold = unit, level.severity.value, level.describe()
            alert.labels["severity"] = level.severity.value
            if isinstance(rule, RateRule):
                alert.extra["per"] = format_duration(rule.per).replace(" ", "")
                alert.extra["raw"] = sample.raw
            self._start(alert, since, value, now_ms)
            return
        alert.severity, alert.threshold, alert.value, alert.changed_ms = (
            level.severity.value,
            level.describe(),
            value,
            now_ms,
        )
        alert.labels["severity"] = level.severity.value
        self._record(alert, "severity", now_ms, ts=iso(record.ts), value=value, threshold=level.describe())

    @staticmethod
    def _timeline(series: dict[str, Any], ts: int, level: int | None) -> None:
        timeline = series.setdefault("timeline", [])
        timeline.append([ts, level])
        del timeline[:-TIMELINE_LENGTH]

    @staticmethod
    def _live_level_at(series: dict[str, Any], ts: int) -> tuple[int | None, int | None]:
        """The live level at ``ts`` and when the live series next changed after it."""
        level: int | None = None
        for at, lvl in series.get("timeline", []):
            if at > ts:
                return level, at
            level = lvl
        return level, None

    # --- late records (a gateway's backlog) -----------------------------------------------

    def _late_step(
        self,
        rule: ThresholdRule | RateRule,
        key: str,
        series: dict[str, Any],
        record: Record,
        *,
        value: float,
        unit: str | None,
        now_ms: int,
    ) -> None:
        if isinstance(rule, RateRule):
            self.late_ignored += 1  # a rate needs consecutive records; late ones are not
            return
        late = series.get("late") or {"last": -1}
        ts = record.ts
        if ts <= late["last"]:
            self.late_ignored += 1  # a duplicate or a third stream: never evaluated twice
            return
        late["last"], late["wall"] = ts, now_ms
        series["late"] = late
        self._changes.series[key] = series
        live_level, _ = self._live_level_at(series, ts)
        if live_level is not None:
            if late.get("start") is not None:
                # The backlog episode runs into a live alert: one episode that began earlier.
                alert = self.alerts.get(key)
                if alert is not None and alert.state == "firing" and (alert.since_ms or 0) > late["start"]:
                    alert.since_ms, alert.changed_ms = late["start"], now_ms
                    self._record(alert, "began_earlier", now_ms, ts=iso(late["start"]), source="gateway backlog")
                late["start"] = None
            return
        target = self._target_level(rule.levels, late.get("level"), value)
        if late.get("start") is None:
            if target is not None and rule.levels[target].raises(value):
                late.update(
                    start=ts, level=target, peak=value, unit=unit, where=[record.site, record.gateway, record.device]
                )
            return
        if target is None:
            self._close_late(rule, key, series, ts, now_ms, cleared=True)
            return
        late["level"] = min(late["level"], target)
        peak = late["peak"]
        late["peak"] = max(peak, value) if rule.levels[0].above is not None else min(peak, value)

    def _close_late(
        self, rule: RuleConfig | None, key: str, series: dict[str, Any], end: int, now_ms: int, *, cleared: bool
    ) -> None:
        late = series["late"]
        start = late.get("start")
        late["start"] = None
        self._changes.series[key] = series
        if not isinstance(rule, ThresholdRule) or start is None:
            return
        if not cleared:
            # The backlog ended still raising: if the live series fired next, it is one episode.
            _, next_change = self._live_level_at(series, late["last"])
            alert = self.alerts.get(key)
            if (
                next_change is not None
                and alert is not None
                and alert.state == "firing"
                and alert.since_ms == next_change
            ):
                alert.since_ms, alert.changed_ms = start, now_ms
                self._record(alert, "began_earlier", now_ms, ts=iso(start), source="gateway backlog")
                return
        if end - start < rule.for_ * 1000:
            return
        level = rule.levels[late["level"]]
        site, gateway, device = late["where"]
        alert = Alert(
            f"{key}@{start}",
            rule.name,
            rule.kind,
            {**self._labels(rule, site, gateway, device, rule.metric), "severity": level.severity.value},
            level.severity.value,
            "resolved",
            value=late["peak"],
            unit=late.get("unit"),
            threshold=level.describe(),
            description=rule.description,
            since_ms=start,
            ended_ms=end,
            changed_ms=now_ms,
            replayed=True,
            episode=start,
        )
        self.alerts[alert.id] = alert
        self.fired_total += 1
        self.resolved_total += 1
        lasted = format_duration((end - start) / 1000)
        self._record(alert, "replayed", now_ms, ts=iso(start), ended=iso(end), value=alert.value, lasted=lasted)
