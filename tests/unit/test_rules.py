"""Threshold rules with hysteresis: fire on crossing, resolve past the clear level, ignore replays."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from cloud.rules import AlertEvent, RuleConfig, RuleEngine, Severity
from fieldlink.wire import Quality, Record, Value, ValueType


def rule(**options: Any) -> RuleConfig:
    return RuleConfig.model_validate({"name": "boiler-hot", "metric": "temp", **options})


def reading(ts: int, value: float, *, device: str = "boiler-1", metric: str = "temp") -> Record:
    return Record("plant-1", "gw-1", device, ts, ts, {metric: Value.of(value, "degC")})


def states(engine: RuleEngine, *points: tuple[int, float]) -> list[tuple[str, int, float]]:
    """Feed one record per (ts, value), one at a time; the transitions as (state, ts, value)."""
    out = []
    for ts, value in points:
        out += [(e.state, e.ts, e.value) for e in engine.evaluate([reading(ts, value)])]
    return out


def test_above_rule_fires_once_when_crossing() -> None:
    engine = RuleEngine([rule(above=80.0, clear=75.0)])
    assert states(engine, (1, 70.0), (2, 80.0)) == []  # reaching the threshold is not crossing it
    assert states(engine, (3, 81.0)) == [("firing", 3, 81.0)]
    assert states(engine, (4, 90.0), (5, 85.0), (6, 80.5)) == []  # still above: no repeat
    assert engine.fired_total == 1
    assert engine.firing() == 1


def test_above_rule_resolves_only_below_the_clear_level() -> None:
    engine = RuleEngine([rule(above=80.0, clear=75.0)])
    assert states(engine, (1, 85.0)) == [("firing", 1, 85.0)]
    assert states(engine, (2, 79.0), (3, 76.0), (4, 75.0)) == []  # between clear and threshold: keeps firing
    assert engine.firing() == 1
    assert states(engine, (5, 74.9)) == [("resolved", 5, 74.9)]
    assert engine.firing() == 0
    assert engine.resolved_total == 1


def test_above_rule_fires_again_after_resolving() -> None:
    engine = RuleEngine([rule(above=80.0, clear=75.0)])
    assert states(engine, (1, 81.0), (2, 70.0), (3, 78.0), (4, 82.0), (5, 60.0)) == [
        ("firing", 1, 81.0),
        ("resolved", 2, 70.0),
        ("firing", 4, 82.0),
        ("resolved", 5, 60.0),
    ]
    assert (engine.fired_total, engine.resolved_total) == (2, 2)


def test_without_clear_the_threshold_is_the_clear_level() -> None:
    engine = RuleEngine([rule(above=80.0)])
    assert states(engine, (1, 81.0), (2, 80.0), (3, 79.0)) == [("firing", 1, 81.0), ("resolved", 3, 79.0)]


def test_below_rule_mirrors_above() -> None:
    engine = RuleEngine([rule(name="pressure-low", metric="temp", below=2.0, clear=2.5)])
    assert states(engine, (1, 3.0), (2, 2.0)) == []
    assert states(engine, (3, 1.9)) == [("firing", 3, 1.9)]
    assert states(engine, (4, 1.0), (5, 2.2), (6, 2.5)) == []  # between threshold and clear: keeps firing
    assert states(engine, (7, 2.6)) == [("resolved", 7, 2.6)]
    assert states(engine, (8, 1.5)) == [("firing", 8, 1.5)]


def test_one_batch_yields_every_transition_in_order() -> None:
    engine = RuleEngine([rule(above=80.0, clear=75.0)])
    events = engine.evaluate([reading(ts, v) for ts, v in [(1, 90.0), (2, 70.0), (3, 95.0)]])
    assert [(e.state, e.ts) for e in events] == [("firing", 1), ("resolved", 2), ("firing", 3)]


def test_integer_values_count() -> None:
    engine = RuleEngine([rule(above=80.0)])
    (event,) = engine.evaluate([reading(1, 81)])
    assert (event.state, event.value, event.unit) == ("firing", 81.0, "degC")


def test_device_glob_filters_devices() -> None:
    engine = RuleEngine([rule(above=80.0, devices="boiler-*")])
    events = engine.evaluate(
        [reading(1, 90.0, device="boiler-1"), reading(1, 90.0, device="pump-1"), reading(1, 90.0, device="Boiler-2")]
    )
    assert [e.device for e in events] == ["boiler-1"]  # the glob is case-sensitive
    assert engine.firing() == 1


def test_other_metrics_are_ignored() -> None:
    engine = RuleEngine([rule(above=80.0)])
    assert engine.evaluate([reading(1, 90.0, metric="pressure")]) == []
    assert engine.firing() == 0


@pytest.mark.parametrize(
    "value",
    [
        Value(95.0, "degC", Quality.BAD, ValueType.FLOAT),
        Value(95.0, "degC", Quality.UNCERTAIN, ValueType.FLOAT),
        Value(None, "degC", Quality.BAD, ValueType.FLOAT),
        Value.of("95"),
        Value.of(True),
        Value(True, None, Quality.GOOD, ValueType.INT),  # a bool dressed up as an int
    ],
    ids=["bad", "uncertain", "null", "string", "bool", "bool-as-int"],
)
def test_bad_quality_and_non_numeric_values_are_ignored(value: Value) -> None:
    engine = RuleEngine([rule(above=0.5)])
    assert engine.evaluate([Record("plant-1", "gw-1", "boiler-1", 1, 1, {"temp": value})]) == []
    assert engine.firing() == 0
    # An ignored value does not count as evaluated: an older good one still does.
    assert [e.state for e in engine.evaluate([reading(0, 95.0)])] == ["firing"]


def test_nan_neither_fires_nor_resolves() -> None:
    engine = RuleEngine([rule(above=80.0)])
    assert states(engine, (1, math.nan)) == []
    assert states(engine, (2, 90.0), (3, math.nan)) == [("firing", 2, 90.0)]
    assert engine.firing() == 1


def test_replayed_or_late_records_change_nothing() -> None:
    engine = RuleEngine([rule(above=80.0, clear=75.0)])
    assert states(engine, (10, 90.0)) == [("firing", 10, 90.0)]
    assert states(engine, (10, 50.0), (9, 50.0), (1, 50.0)) == []  # same ts (replay) and older ones
    assert engine.firing() == 1
    assert states(engine, (11, 50.0)) == [("resolved", 11, 50.0)]
    assert states(engine, (10, 99.0)) == []  # a replay of an old high does not re-fire
    assert engine.firing() == 0
    assert (engine.fired_total, engine.resolved_total) == (1, 1)


def test_state_is_per_device() -> None:
    engine = RuleEngine([rule(above=80.0, clear=75.0)])
    events = engine.evaluate([reading(5, 90.0, device="boiler-1"), reading(1, 90.0, device="boiler-2")])
    assert [(e.device, e.state) for e in events] == [("boiler-1", "firing"), ("boiler-2", "firing")]
    # boiler-2's clock is its own: ts 2 is new for it even though boiler-1 is at 5.
    events = engine.evaluate([reading(2, 70.0, device="boiler-2"), reading(6, 85.0, device="boiler-1")])
    assert [(e.device, e.state) for e in events] == [("boiler-2", "resolved")]
    assert engine.firing() == 1


def test_state_is_per_gateway_and_site() -> None:
    engine = RuleEngine([rule(above=80.0)])
    hot = Value.of(90.0)
    records = [
        Record("plant-1", "gw-1", "boiler-1", 1, 1, {"temp": hot}),
        Record("plant-1", "gw-2", "boiler-1", 1, 1, {"temp": hot}),
        Record("plant-2", "gw-1", "boiler-1", 1, 1, {"temp": hot}),
    ]
    assert [(e.site, e.gateway) for e in engine.evaluate(records)] == [
        ("plant-1", "gw-1"),
        ("plant-1", "gw-2"),
        ("plant-2", "gw-1"),
    ]


def test_rules_keep_separate_state() -> None:
    warn = rule(name="warm", above=60.0)
    crit = rule(name="hot", above=90.0, severity="critical")
    engine = RuleEngine([warn, crit])
    assert [(e.rule.name, e.state) for e in engine.evaluate([reading(1, 70.0)])] == [("warm", "firing")]
    assert [(e.rule.name, e.state) for e in engine.evaluate([reading(2, 95.0)])] == [("hot", "firing")]
    assert [(e.rule.name, e.state) for e in engine.evaluate([reading(3, 50.0)])] == [
        ("warm", "resolved"),
        ("hot", "resolved"),
    ]


# --- config -----------------------------------------------------------------------------


def test_rule_config_defaults_and_properties() -> None:
    above = rule(above=80.0, clear=75.0)
    assert (above.devices, above.severity, above.notify) == ("*", Severity.WARNING, [])
    assert (above.direction, above.threshold, above.clear_level) == ("above", 80.0, 75.0)
    below = rule(below=2.0)
    assert (below.direction, below.threshold, below.clear_level) == ("below", 2.0, 2.0)
    assert rule(above=80.0, clear=80.0).clear_level == 80.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"above": 80.0, "below": 10.0}, "give exactly one of 'above' or 'below'"),
        ({}, "give exactly one of 'above' or 'below'"),
        ({"clear": 5.0}, "give exactly one of 'above' or 'below'"),
        ({"above": 80.0, "clear": 85.0}, r"clear \(85.0\) must not be above 'above' \(80.0\)"),
        ({"below": 10.0, "clear": 5.0}, r"clear \(5.0\) must not be below 'below' \(10.0\)"),
        ({"above": 80.0, "severity": "panic"}, "severity"),
        ({"above": 80.0, "metric": ""}, "metric"),
        ({"above": 80.0, "treshold": 1}, "treshold"),
    ],
)
def test_rule_config_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        rule(**options)


# --- events -------------------------------------------------------------------------------


def event(config: RuleConfig, state: str) -> AlertEvent:
    return AlertEvent(config, state, "plant-1", "gw-1", "boiler-1", 81.5, "degC", 1_700_000_000_000)  # type: ignore[arg-type]


def test_comparison_text() -> None:
    above = rule(above=80.0, clear=75.5)
    below = rule(below=0.25)
    assert event(above, "firing").comparison == "> 80"
    assert event(above, "resolved").comparison == "< 75.5 (clear level)"
    assert event(below, "firing").comparison == "< 0.25"
    assert event(below, "resolved").comparison == "> 0.25 (clear level)"


def test_event_key_names_the_transition() -> None:
    config = rule(above=80.0)
    assert event(config, "firing").key == "boiler-hot/plant-1/gw-1/boiler-1/firing/1700000000000"
    assert event(config, "resolved").key == "boiler-hot/plant-1/gw-1/boiler-1/resolved/1700000000000"
    assert event(config, "firing").key != event(config, "resolved").key
