"""The alerting part of the cloud config: rules, routing, inhibition, silences, timers.

Every key is documented in ``docs/alerting.md``; ``configs/alerts.toml`` uses each of them.
Labels of an alert are ``site``, ``gateway``, ``device``, ``metric``, ``rule``, ``severity``
and ``kind``, plus whatever the rule adds in ``labels``; matchers are globs on them.
"""

from __future__ import annotations

import fnmatch
import re
from datetime import time as dtime
from enum import StrEnum
from typing import Annotated, Any, Literal, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from fieldlink.configkit import Duration, Schema

__all__ = [
    "SEVERITY_RANK",
    "AlertingSection",
    "BacklogRule",
    "DeadmanRule",
    "InhibitConfig",
    "Level",
    "Matchers",
    "OfflineRule",
    "QuietHours",
    "RateLimit",
    "RateRule",
    "RouteConfig",
    "RuleConfig",
    "Severity",
    "SilenceConfig",
    "ThresholdRule",
    "matches",
]


class Severity(StrEnum):
    CRITICAL = "critical"
    MAJOR = "major"
    MINOR = "minor"
    WARNING = "warning"
    INFO = "info"


SEVERITY_RANK = {Severity.CRITICAL: 0, Severity.MAJOR: 1, Severity.MINOR: 2, Severity.WARNING: 3, Severity.INFO: 4}

Matchers = dict[str, str]
"""Label name -> glob (``*``, ``?``, ``[abc]``); a leading ``!`` negates. All must hold."""


def matches(matchers: Matchers, labels: dict[str, str]) -> bool:
    """A missing label is matched as the empty string (as Alertmanager does)."""
    for name, pattern in matchers.items():
        value = labels.get(name, "")
        if pattern.startswith("!"):
            if fnmatch.fnmatchcase(value, pattern[1:]):
                return False
        elif not fnmatch.fnmatchcase(value, pattern):
            return False
    return True


class Level(Schema):
    """One severity of a threshold or rate rule: raise past ``above``/``below``, clear past ``clear``."""

    severity: Severity = Severity.WARNING
    above: float | None = None
    below: float | None = None
    clear: float | None = None  # hysteresis: the level the value must come back past; default the threshold

    @model_validator(mode="after")
    def _one_direction(self) -> Level:
        if (self.above is None) == (self.below is None):
            raise ValueError("give exactly one of 'above' or 'below'")
        if self.clear is not None:
            if self.above is not None and self.clear > self.above:
                raise ValueError(f"clear ({self.clear}) must not be above 'above' ({self.above})")
            if self.below is not None and self.clear < self.below:
                raise ValueError(f"clear ({self.clear}) must not be below 'below' ({self.below})")
        return self

    @property
    def threshold(self) -> float:
        return self.above if self.above is not None else self.below  # type: ignore[return-value]

    @property
    def clear_level(self) -> float:
        return self.threshold if self.clear is None else self.clear

    def raises(self, value: float) -> bool:
        return value > self.threshold if self.above is not None else value < self.threshold

    def holds(self, value: float) -> bool:
        """Still in (not cleared): the hysteresis band counts as in."""
        return value >= self.clear_level if self.above is not None else value <= self.clear_level

    def describe(self) -> str:
        return f"> {self.threshold:g}" if self.above is not None else f"< {self.threshold:g}"


class _RuleBase(Schema):
    name: str = Field(min_length=1)
    match: Matchers = Field(default_factory=dict)  # on site / gateway / device (and metric)
    devices: str | None = None  # shorthand for match.device
    labels: dict[str, str] = Field(default_factory=dict)  # added to the alert's labels, for routing
    notify: list[str] = Field(default_factory=list)  # shorthand: a route to these receivers first
    description: str = ""  # one line added to the message

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if any(c in name for c in "/+#\0"):
            raise ValueError(f"must not contain '/', '+', '#' or NUL (it is part of topics), got {name!r}")
        return name

    def matchers(self) -> Matchers:
        return {**self.match, **({"device": self.devices} if self.devices else {})}


class _LevelledRule(_RuleBase):
    metric: str = Field(min_length=1)
    levels: list[Level] = Field(default_factory=list)  # or above/below/clear/severity for one level
    for_: Duration = Field(0.0, alias="for")  # the raise condition must hold this long (record time)
    keep_firing_for: Duration = 0.0  # the clear condition must hold this long

    @model_validator(mode="before")
    @classmethod
    def _levels(cls, data: Any) -> Any:
        """The one-level shorthand becomes ``levels``; levels go most severe first."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        shorthand = {k: data.pop(k) for k in ("above", "below", "clear", "severity") if k in data}
        if shorthand and data.get("levels"):
            raise ValueError("give either 'levels' or above/below/clear/severity on the rule, not both")
        if shorthand:
            if "above" not in shorthand and "below" not in shorthand:
                raise ValueError("'clear' and 'severity' on the rule need 'above' or 'below' beside them")
            data["levels"] = [shorthand]
        levels = data.get("levels")
        if isinstance(levels, list) and all(isinstance(level, dict) for level in levels):
            rank = {s.value: r for s, r in SEVERITY_RANK.items()}
            data["levels"] = sorted(levels, key=lambda level: rank.get(str(level.get("severity", "warning")), 9))
        return data

    @model_validator(mode="after")
    def _consistent(self) -> _LevelledRule:
        if not self.levels:
            raise ValueError("give 'above' or 'below' (or a list of 'levels')")
        if len({level.above is None for level in self.levels}) > 1:
            raise ValueError("all levels of a rule must go the same way (all 'above' or all 'below')")
        if len({level.severity for level in self.levels}) != len(self.levels):
            raise ValueError("each level needs its own severity")
        return self


class ThresholdRule(_LevelledRule):
    kind: Literal["threshold"] = "threshold"


class RateRule(_LevelledRule):
    """The change per ``per`` between consecutive records, compared with the levels."""

    kind: Literal["rate"]
    per: Duration = 60.0


class DeadmanRule(_RuleBase):
    """Fires when a device (or one metric of it) sent nothing for ``silent_for``."""

    kind: Literal["deadman"]
    metric: str | None = None  # None: any record of the device counts
    silent_for: Duration
    repeat_interval: Duration = 3600.0  # notified again while still silent
    severity: Severity = Severity.MAJOR


class OfflineRule(_RuleBase):
    """A gateway or device whose status topic says offline (the last will included)."""

    kind: Literal["offline"]
    target: Literal["gateway", "device"] = "gateway"
    for_: Duration = Field(0.0, alias="for")
    severity: Severity = Severity.MAJOR


class BacklogRule(_RuleBase):
    """A gateway whose oldest buffered record (from its health topic) is older than ``above``."""

    kind: Literal["backlog"]
    above: Duration
    clear: Duration | None = None
    severity: Severity = Severity.WARNING


def _rule_kind(data: Any) -> str:
    if isinstance(data, dict):
        return str(data.get("kind", "threshold"))
    return str(getattr(data, "kind", "threshold"))


RuleConfig = Annotated[
    Union[  # noqa: UP007 (Annotated tags need the Union spelled out)
        Annotated[ThresholdRule, Tag("threshold")],
        Annotated[RateRule, Tag("rate")],
        Annotated[DeadmanRule, Tag("deadman")],
        Annotated[OfflineRule, Tag("offline")],
        Annotated[BacklogRule, Tag("backlog")],
    ],
    Discriminator(_rule_kind),
]
RULE_KINDS = ("threshold", "rate", "deadman", "offline", "backlog")


_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME_RANGE = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")


class QuietHours(Schema):
    """Times (local to ``timezone``) when a route sends nothing; what changed is sent when they end."""

    times: list[str] = Field(min_length=1)  # "22:00-06:00" (may cross midnight)
    weekdays: list[str] = Field(default_factory=lambda: list(_WEEKDAYS))
    timezone: str = "UTC"
    except_severities: list[Severity] = Field(default_factory=list)  # e.g. critical still goes out

    @field_validator("times")
    @classmethod
    def _ranges(cls, times: list[str]) -> list[str]:
        for item in times:
            found = _TIME_RANGE.match(item)
            if not found or int(found[1]) > 24 or int(found[3]) > 24 or int(found[2]) > 59 or int(found[4]) > 59:
                raise ValueError(f"time ranges look like '22:00-06:00', got {item!r}")
        return times

    @field_validator("weekdays")
    @classmethod
    def _days(cls, days: list[str]) -> list[str]:
        bad = [d for d in days if d.lower()[:3] not in _WEEKDAYS]
        if bad:
            raise ValueError(f"weekdays are {', '.join(_WEEKDAYS)}; got {bad}")
        return [d.lower()[:3] for d in days]

    @field_validator("timezone")
    @classmethod
    def _zone(cls, zone: str) -> str:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {zone!r} (use an IANA name like 'Europe/Berlin')") from exc
        return zone

    def ranges(self) -> list[tuple[dtime, dtime]]:
        out = []
        for item in self.times:
            found = _TIME_RANGE.match(item)
            assert found is not None
            start = dtime(int(found[1]) % 24, int(found[2]))
            end = dtime(int(found[3]) % 24, int(found[4])) if int(found[3]) < 24 else dtime(23, 59, 59, 999999)
            out.append((start, end))
        return out


class RateLimit(Schema):
    """At most ``count`` messages per ``per`` to one receiver; the rest become one summary."""

    count: int = Field(ge=1)
    per: Duration


class RouteConfig(Schema):
    """A node of the routing tree; unset timers and receivers are inherited from the parent."""

    match: Matchers = Field(default_factory=dict)
    severities: list[Severity] = Field(default_factory=list)  # empty: any
    receivers: list[str] | None = None
    group_by: list[str] | None = None
    group_wait: Duration | None = None
    group_interval: Duration | None = None
    repeat_interval: Duration | None = None
    send_resolved: bool | None = None
    quiet_hours: list[QuietHours] | None = None
    escalate_after: Duration | None = None  # a critical alert not acknowledged by then ...
    escalate_to: list[str] | None = None  # ... is also sent to these receivers
    continue_: bool = Field(False, alias="continue")  # go on to the next sibling after a match
    routes: list[RouteConfig] = Field(default_factory=list)


class InhibitConfig(Schema):
    """While an alert matching ``source`` fires, alerts matching ``target`` with the same
    ``equal`` labels are not notified (they still show on dashboards and in the history)."""

    source: Matchers
    target: Matchers
    equal: list[str] = Field(default_factory=lambda: ["site", "gateway"])


class SilenceConfig(Schema):
    matchers: Matchers = Field(min_length=1)
    ends: str  # ISO 8601 with a zone, e.g. 2026-12-01T06:00:00+01:00
    comment: str = ""
    created_by: str = "config"


class AlertingSection(Schema):
    ack_topic: str = "fl-cloud/alerts/ack"  # {"id", "by", "comment"} acknowledges an alert
    silence_topic: str = "fl-cloud/alerts/silence"  # {"matchers", "ends"|"for", "by", "comment"}
    tick: Duration = 0.2  # how often timers (for, dead-man, group waits, escalation) are looked at
    history_retention: Duration = 90 * 86400.0
    resolved_retention: Duration = 86400.0  # resolved alerts stay listed (and retained on dashboards) this long
    max_message_alerts: int = Field(20, ge=1)  # alerts listed in one message; the rest are counted
    rate_limit: RateLimit | None = None  # default for every receiver
    rate_limits: dict[str, RateLimit] = Field(default_factory=dict)  # per receiver name
    routing: RouteConfig = RouteConfig()
    inhibit: list[InhibitConfig] = Field(default_factory=list)
    silences: list[SilenceConfig] = Field(default_factory=list)
    ack_hint: str = "fieldlink-cloud alerts ack {id} --by <name>"
