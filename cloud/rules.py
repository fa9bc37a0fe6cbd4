"""Threshold rules with hysteresis: a rule fires when a metric crosses its threshold and
clears only when it comes back past a separate clear level.

State is kept per (rule, site, gateway, device). Records older than the last one a
rule evaluated for that series are ignored, so a replayed or late record never
flips an alert back.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from pydantic import Field, model_validator

from fieldlink.configkit import Schema
from fieldlink.wire import Quality, Record, ValueType

__all__ = ["AlertEvent", "RuleConfig", "RuleEngine", "Severity"]


class Severity(StrEnum):
    CRITICAL = "critical"
    MAJOR = "major"
    MINOR = "minor"
    WARNING = "warning"
    INFO = "info"


class RuleConfig(Schema):
    name: str = Field(min_length=1)
    metric: str = Field(min_length=1)
    devices: str = "*"  # glob on the device name
    above: float | None = None
    below: float | None = None
    clear: float | None = None  # hysteresis: the level the value must come back past; default the threshold
    severity: Severity = Severity.WARNING
    notify: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_direction(self) -> RuleConfig:
        if (self.above is None) == (self.below is None):
            raise ValueError("give exactly one of 'above' or 'below'")
        if self.clear is not None:
            if self.above is not None and self.clear > self.above:
                raise ValueError(f"clear ({self.clear}) must not be above 'above' ({self.above})")
            if self.below is not None and self.clear < self.below:
                raise ValueError(f"clear ({self.clear}) must not be below 'below' ({self.below})")
        return self

    @property
    def direction(self) -> Literal["above", "below"]:
        return "above" if self.above is not None else "below"

    @property
    def threshold(self) -> float:
        return self.above if self.above is not None else self.below  # type: ignore[return-value]

    @property
    def clear_level(self) -> float:
        return self.threshold if self.clear is None else self.clear

    def raises(self, value: float) -> bool:
        return value > self.threshold if self.direction == "above" else value < self.threshold

    def clears(self, value: float) -> bool:
        return value < self.clear_level if self.direction == "above" else value > self.clear_level


@dataclass(frozen=True)
class AlertEvent:
    """A rule changed state for one device: it started firing, or it resolved."""

    rule: RuleConfig
    state: Literal["firing", "resolved"]
    site: str
    gateway: str
    device: str
    value: float
    unit: str | None
    ts: int

    @property
    def key(self) -> str:
        """Stable identity of this transition (used as the email Message-ID)."""
        return f"{self.rule.name}/{self.site}/{self.gateway}/{self.device}/{self.state}/{self.ts}"

    @property
    def comparison(self) -> str:
        if self.state == "firing":
            op = ">" if self.rule.direction == "above" else "<"
            return f"{op} {self.rule.threshold:g}"
        op = "<" if self.rule.direction == "above" else ">"
        return f"{op} {self.rule.clear_level:g} (clear level)"


@dataclass
class _SeriesState:
    firing: bool = False
    last_ts: int = -1


class RuleEngine:
    def __init__(self, rules: Iterable[RuleConfig]) -> None:
        self.rules = list(rules)
        self._state: dict[tuple[str, str, str, str], _SeriesState] = {}
        self.fired_total = 0
        self.resolved_total = 0

    def evaluate(self, records: Iterable[Record]) -> list[AlertEvent]:
        events: list[AlertEvent] = []
        for record in records:
            for rule in self.rules:
                value = record.values.get(rule.metric)
                if value is None or value.quality is not Quality.GOOD or value.value is None:
                    continue
                if value.type not in (ValueType.FLOAT, ValueType.INT) or isinstance(value.value, bool | str):
                    continue
                if not fnmatch.fnmatchcase(record.device, rule.devices):
                    continue
                key = (rule.name, record.site, record.gateway, record.device)
                state = self._state.setdefault(key, _SeriesState())
                if record.ts <= state.last_ts:
                    continue  # a replay or a late record: never moves the alert state
                state.last_ts = record.ts
                number = float(value.value)
                if not state.firing and rule.raises(number):
                    state.firing = True
                    self.fired_total += 1
                    events.append(self._event(rule, "firing", record, number, value.unit))
                elif state.firing and rule.clears(number):
                    state.firing = False
                    self.resolved_total += 1
                    events.append(self._event(rule, "resolved", record, number, value.unit))
        return events

    @staticmethod
    def _event(
        rule: RuleConfig, state: Literal["firing", "resolved"], record: Record, value: float, unit: str | None
    ) -> AlertEvent:
        return AlertEvent(rule, state, record.site, record.gateway, record.device, value, unit, record.ts)

    def firing(self) -> int:
        return sum(1 for s in self._state.values() if s.firing)
