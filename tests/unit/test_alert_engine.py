"""The rule engine on its own: each rule kind, hysteresis, durations, late records."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from cloud.alerting.config import RuleConfig
from cloud.alerting.engine import Engine
from fieldlink.wire import Quality, Record, Value, ValueType

T0 = 1_700_000_000_000
RULE = TypeAdapter(RuleConfig)


def rule(**fields: Any) -> Any:
    return RULE.validate_python({"name": "r", "metric": "temp", **fields})


def rec(t_s: float, value: float | None, device: str = "boiler-1", metric: str = "temp", **extra: Any) -> Record:
    quality = Quality.GOOD if value is not None else Quality.BAD
    return Record(
        "plant-a",
        "gw-01",
        device,
        int(t_s * 1000),
        T0 + int(t_s * 1000),
        {metric: Value(value, "degC", quality, ValueType.FLOAT)},
    )


def feed(engine: Engine, *points: tuple[float, float | None], device: str = "boiler-1") -> list[tuple[str, float, str]]:
    """(event, record time in s, severity) for every transition the points caused."""
    out = []
    for t_s, value in points:
        engine.observe_records([rec(t_s, value, device)], T0 + int(t_s * 1000))
        for entry in engine.take_changes().history:
            out.append((entry.event, entry.detail.get("ts"), entry.detail["severity"]))
    return [(event, (_ms(ts) - T0) / 1000 if ts else -1, severity) for event, ts, severity in out]


def _ms(iso_ts: str) -> int:
    from datetime import datetime  # noqa: PLC0415

    return int(datetime.fromisoformat(iso_ts.replace("Z", "+00:00")).timestamp() * 1000)


def test_hysteresis_a_value_hovering_around_the_threshold_fires_once() -> None:
    engine = Engine([rule(above=80, clear=75)])
    events = feed(engine, (0, 70), (1, 81), (2, 79), (3, 81), (4, 79.5), (5, 80.5), (6, 76), (7, 74), (8, 81))
    assert events == [("firing", 1, "warning"), ("resolved", 7, "warning"), ("firing", 8, "warning")]


def test_below_rule_with_its_clear_level() -> None:
    engine = Engine([rule(below=2.0, clear=2.5, severity="major")])
    assert feed(engine, (0, 3), (1, 1.9), (2, 2.2), (3, 2.6)) == [("firing", 1, "major"), ("resolved", 3, "major")]


def test_for_needs_the_condition_to_hold_that_long_in_record_time() -> None:
    engine = Engine([rule(above=80, **{"for": "10s"})])
    events = feed(engine, (0, 81), (5, 82), (7, 70), (20, 85), (25, 85), (30, 85))
    assert [e for e in events if e[0] == "firing"] == [("firing", 20, "warning")]  # since when it began
    assert ("pending_cancelled", 7, "warning") in events
    firing = next(a for a in engine.alerts.values() if a.state == "firing")
    assert firing.since_ms == T0 + 20_000


def test_keep_firing_for_holds_the_alert_until_the_clear_lasts() -> None:
    engine = Engine([rule(above=80, keep_firing_for="10s")])
    events = feed(engine, (0, 81), (1, 70), (5, 85), (6, 70), (10, 70), (16, 70))
    assert events == [("firing", 0, "warning"), ("resolved", 16, "warning")]


def test_several_levels_escalate_and_step_down_with_their_own_clear_levels() -> None:
    engine = Engine(
        [
            rule(
                levels=[
                    {"severity": "warning", "above": 85, "clear": 80},
                    {"severity": "critical", "above": 95, "clear": 90},
                ]
            )
        ]
    )
    events = feed(engine, (0, 86), (1, 96), (2, 92), (3, 89), (4, 82), (5, 79))
    assert events == [
        ("firing", 0, "warning"),
        ("severity", 1, "critical"),
        ("severity", 3, "warning"),
        ("resolved", 5, "warning"),
    ]


def test_rate_rule_compares_the_change_per_period() -> None:
    engine = Engine([rule(kind="rate", per="1m", above=5, severity="minor")])
    # +1 per 10 s = 6/min: fires; +0.5 per 10 s = 3/min: resolves.
    events = feed(engine, (0, 10), (10, 10.5), (20, 11.5), (30, 12), (40, 12.5))
    assert events == [("firing", 20, "minor"), ("resolved", 30, "minor")]


def test_bad_quality_nan_and_strings_are_not_evaluated() -> None:
    engine = Engine([rule(above=80)])
    assert feed(engine, (0, None), (1, float("nan")), (2, float("inf"))) == []


def test_matchers_limit_a_rule_to_devices() -> None:
    engine = Engine([rule(above=80, match={"device": "boiler-*"})])
    assert feed(engine, (0, 90), device="pump-1") == []
    assert feed(engine, (0, 90), device="boiler-2") == [("firing", 0, "warning")]


def test_negated_matcher() -> None:
    engine = Engine([rule(above=80, match={"device": "!boiler-2"})])
    assert feed(engine, (0, 90), device="boiler-2") == []
    assert feed(engine, (0, 90), device="boiler-1") == [("firing", 0, "warning")]


def test_a_record_seen_again_is_never_evaluated_twice() -> None:
    engine = Engine([rule(above=80)])
    assert feed(engine, (0, 90), (1, 70)) == [("firing", 0, "warning"), ("resolved", 1, "warning")]
    assert feed(engine, (0, 90), (1, 70)) == []  # a redelivery, or a second replay of a backlog


def test_a_backlog_episode_that_began_and_ended_offline_is_reported_once_replayed() -> None:
    engine = Engine([rule(above=80, clear=75)])
    # Live: 0 s (ok), then the uplink is down 10..60 s; live resumes at 60 s (ok).
    assert feed(engine, (0, 70), (60, 70)) == []
    # The backlog arrives after: 20..30 s above the threshold.
    events = feed(engine, (10, 70), (20, 85), (25, 90), (30, 70), (40, 70))
    assert events == [("replayed", 20, "warning")]
    replayed = [a for a in engine.alerts.values() if a.replayed]
    assert len(replayed) == 1
    assert replayed[0].state == "resolved"
    assert (replayed[0].since_ms, replayed[0].ended_ms, replayed[0].value) == (T0 + 20_000, T0 + 30_000, 90)
    # The same backlog again (a second cloud worker redelivery): nothing new.
    assert feed(engine, (20, 85), (25, 90), (30, 70)) == []


def test_a_backlog_episode_running_into_a_live_alert_moves_its_start_earlier() -> None:
    engine = Engine([rule(above=80)])
    assert feed(engine, (0, 70), (60, 90)) == [("firing", 60, "warning")]
    assert feed(engine, (20, 85), (40, 88), (59, 90)) == []
    engine.tick(T0 + 60_000 + 31_000)  # no more backlog: it ran into the live alert
    assert [(e.event, e.detail["ts"]) for e in engine.take_changes().history] == [
        ("began_earlier", "2023-11-14T22:13:40.000Z")
    ]
    live = engine.alerts[next(iter(engine.alerts))]
    assert live.state == "firing"
    assert live.since_ms == T0 + 20_000


def test_a_backlog_while_a_live_alert_was_already_firing_adds_nothing() -> None:
    engine = Engine([rule(above=80)])
    assert feed(engine, (0, 90), (60, 91)) == [("firing", 0, "warning")]
    assert feed(engine, (20, 95), (30, 70), (40, 96)) == []


def test_deadman_fires_after_silence_and_clears_when_data_returns() -> None:
    engine = Engine([RULE.validate_python({"name": "silent", "kind": "deadman", "silent_for": "30s"})])
    engine.observe_records([rec(0, 1.0)], T0)
    engine.tick(T0 + 29_000)
    assert not [a for a in engine.alerts.values() if a.state == "firing"]
    engine.tick(T0 + 31_000)
    firing = [a for a in engine.alerts.values() if a.state == "firing"]
    assert len(firing) == 1
    assert firing[0].since_ms == T0
    assert firing[0].severity == "major"
    engine.tick(T0 + 40_000)  # still silent: one alert, still firing (the repeat is the dispatcher's)
    assert [e.event for e in engine.take_changes().history] == ["firing"]
    engine.observe_records([rec(45, 1.0)], T0 + 45_000)
    assert [e.event for e in engine.take_changes().history] == ["resolved"]


def test_deadman_on_one_metric_ignores_records_without_it() -> None:
    engine = Engine([RULE.validate_python({"name": "s", "kind": "deadman", "metric": "flow", "silent_for": "10s"})])
    engine.observe_records([rec(0, 1.0, metric="flow")], T0)
    engine.observe_records([rec(5, 1.0, metric="temp")], T0 + 5000)
    engine.tick(T0 + 11_000)
    assert [a.metric for a in engine.alerts.values() if a.state == "firing"] == ["flow"]


def test_offline_from_status_messages_with_for() -> None:
    engine = Engine([RULE.validate_python({"name": "gw-off", "kind": "offline", "for": "5s"})])
    engine.observe_status("plant-a", "gw-01", None, "offline", "connection lost", T0, T0)
    assert [e.event for e in engine.take_changes().history] == ["pending"]
    engine.tick(T0 + 4000)
    assert engine.take_changes().history == []
    engine.tick(T0 + 5000)
    assert [e.event for e in engine.take_changes().history] == ["firing"]
    alert = next(iter(engine.alerts.values()))
    assert alert.extra["reason"] == "connection lost"
    assert "offline (connection lost)" in alert.summary()
    engine.observe_status("plant-a", "gw-01", None, "offline", "connection lost", T0 + 8000, T0 + 8000)
    assert engine.take_changes().history == []  # the retained status again (a reconnect): nothing new
    engine.observe_status("plant-a", "gw-01", None, "online", None, T0 + 9000, T0 + 9000)
    assert [e.event for e in engine.take_changes().history] == ["resolved"]


def test_device_offline_rule_ignores_gateway_statuses() -> None:
    engine = Engine([RULE.validate_python({"name": "dev-off", "kind": "offline", "target": "device"})])
    engine.observe_status("plant-a", "gw-01", None, "offline", None, T0, T0)
    assert not engine.alerts
    engine.observe_status("plant-a", "gw-01", "pump-1", "offline", "timeout", T0, T0)
    assert [a.device for a in engine.alerts.values() if a.state == "firing"] == ["pump-1"]


def test_backlog_age_from_health_reports() -> None:
    engine = Engine([RULE.validate_python({"name": "lag", "kind": "backlog", "above": "10m", "clear": "1m"})])
    engine.observe_health("plant-a", "gw-01", {"buffer": {"oldest_age_s": 30}}, T0, T0)
    engine.observe_health("plant-a", "gw-01", {"buffer": {"oldest_age_s": 700}}, T0 + 1, T0 + 1)
    engine.observe_health("plant-a", "gw-01", {"buffer": {"oldest_age_s": 300}}, T0 + 2, T0 + 2)
    engine.observe_health("plant-a", "gw-01", {"buffer": {"oldest_age_s": None}}, T0 + 3, T0 + 3)
    assert [e.event for e in engine.take_changes().history] == ["firing", "resolved"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"above": 1, "below": 2}, "exactly one of"),
        ({"above": 80, "clear": 90}, "must not be above"),
        ({"clear": 3}, "need 'above' or 'below'"),
        ({}, "give 'above' or 'below'"),
        ({"levels": [{"above": 1, "severity": "major"}, {"below": 0, "severity": "minor"}]}, "same way"),
        ({"levels": [{"above": 1}, {"above": 2}]}, "its own severity"),
        ({"above": 1, "name": "a/b"}, "must not contain"),
    ],
)
def test_bad_rules_are_refused_with_a_reason(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        rule(**fields)
