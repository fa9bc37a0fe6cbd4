"""Routing, grouping, inhibition, silences, quiet hours, escalation and rate limits, on a simulated clock."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import TypeAdapter

from cloud.alerting.config import AlertingSection, RuleConfig
from cloud.alerting.dispatch import Dispatcher, Notification, Silence
from cloud.alerting.engine import Engine
from fieldlink.wire import Quality, Record, Value, ValueType

T0 = int(datetime(2026, 11, 27, 12, 0, tzinfo=UTC).timestamp() * 1000)  # a Friday, noon UTC
RULES = TypeAdapter(list[RuleConfig])


class Rig:
    """Engine + dispatcher driven like the service does it, with a clock in seconds from T0."""

    def __init__(
        self, rules: list[dict[str, Any]], alerting: dict[str, Any], receivers: tuple[str, ...] = ("mail", "sms")
    ) -> None:
        self.rules = RULES.validate_python(rules)
        self.config = AlertingSection.model_validate(alerting)
        self.engine = Engine(self.rules)
        self.dispatcher = Dispatcher(self.config, self.rules, list(receivers))
        self.sent: list[tuple[float, Notification]] = []
        self.seq = 0

    def at(self, t_s: float) -> int:
        return T0 + int(t_s * 1000)

    def value(
        self, t_s: float, value: float, device: str = "boiler-1", site: str = "plant-a", gateway: str = "gw-01"
    ) -> None:
        self.seq += 1
        record = Record(
            site, gateway, device, self.seq, self.at(t_s), {"temp": Value(value, "degC", Quality.GOOD, ValueType.FLOAT)}
        )
        self.engine.observe_records([record], self.at(t_s))
        self.step(t_s)

    def status(self, t_s: float, state: str, gateway: str = "gw-01") -> None:
        self.engine.observe_status("plant-a", gateway, None, state, "connection lost", self.at(t_s), self.at(t_s))
        self.step(t_s)

    def step(self, t_s: float) -> None:
        now = self.at(t_s)
        for alert in self.engine.take_changes().alerts.values():
            self.dispatcher.on_change(alert, now)
        self.sent += [(t_s, n) for n in self.dispatcher.tick(self.engine.alerts, now)]

    def run_until(self, t_s: float, start: float, every: float = 1.0) -> None:
        t = start
        while t <= t_s:
            self.engine.tick(self.at(t))
            self.step(t)
            t += every

    def summary(self) -> list[tuple[float, str, str, int]]:
        return [(t, n.receiver, n.payload["status"], len(n.payload["alerts"])) for t, n in self.sent]


HOT = {"name": "hot", "metric": "temp", "above": 80, "clear": 75}


def test_a_new_alert_goes_out_at_once_and_its_resolution_after_group_interval() -> None:
    rig = Rig([HOT], {"routing": {"receivers": ["mail"], "group_interval": "30s"}})
    rig.value(0, 90)
    rig.value(5, 70)
    rig.run_until(40, start=6)
    assert rig.summary() == [(0, "mail", "firing", 1), (30, "mail", "resolved", 1)]
    firing, resolved = (n.payload for _, n in rig.sent)
    assert firing["subject"].startswith("[FIRING warning] hot: plant-a/gw-01/boiler-1 temp = 90 degC (> 80)")
    assert "Acknowledge: fieldlink-cloud alerts ack hot:plant-a:gw-01:boiler-1 --by <name>" in firing["body"]
    assert (
        resolved["subject"] == "[RESOLVED warning] hot: plant-a/gw-01/boiler-1 temp back to 70 degC, resolved after 5 s"
    )
    assert "Lasted:    5 s" in resolved["body"]


def test_group_wait_swallows_an_alert_that_resolved_before_it() -> None:
    rig = Rig([HOT], {"routing": {"receivers": ["mail"], "group_wait": "10s"}})
    rig.value(0, 90)
    rig.value(3, 70)
    rig.run_until(30, start=4)
    assert rig.sent == []


def test_grouping_by_site_makes_one_message_for_many_devices() -> None:
    rig = Rig([HOT], {"routing": {"receivers": ["mail"], "group_by": ["site"], "group_wait": "5s"}})
    for i in range(3):
        rig.value(i, 90, device=f"boiler-{i}")
    rig.run_until(10, start=3)
    assert rig.summary() == [(5, "mail", "firing", 3)]
    assert rig.sent[0][1].payload["subject"].startswith("[FIRING warning] 3 firing: ")


def test_routing_tree_sends_critical_to_a_child_and_the_rest_to_the_root() -> None:
    rules = [HOT, {"name": "very-hot", "metric": "temp", "above": 95, "severity": "critical"}]
    routing = {"receivers": ["mail"], "routes": [{"severities": ["critical"], "receivers": ["sms"]}]}
    rig = Rig(rules, {"routing": routing})
    rig.value(0, 99)
    assert sorted((n.receiver, n.payload["alerts"][0]["rule"]) for _, n in rig.sent) == [
        ("mail", "hot"),
        ("sms", "very-hot"),
    ]


def test_continue_sends_to_a_sibling_too() -> None:
    routing = {
        "receivers": ["mail"],
        "routes": [{"match": {"site": "plant-*"}, "receivers": ["sms"], "continue": True}, {"receivers": ["mail"]}],
    }
    rig = Rig([HOT], {"routing": routing})
    rig.value(0, 90)
    assert sorted(n.receiver for _, n in rig.sent) == ["mail", "sms"]


def test_rule_notify_is_a_route_of_its_own() -> None:
    rig = Rig([{**HOT, "notify": ["sms"]}], {"routing": {"receivers": ["mail"]}})
    rig.value(0, 90)
    assert [n.receiver for _, n in rig.sent] == ["sms"]


def test_inhibition_a_gateway_offline_mutes_its_devices() -> None:
    rules = [HOT, {"name": "gw-off", "kind": "offline", "severity": "critical"}]
    inhibit = [{"source": {"rule": "gw-off"}, "target": {"rule": "!gw-off"}, "equal": ["site", "gateway"]}]
    rig = Rig(rules, {"routing": {"receivers": ["mail"]}, "inhibit": inhibit})
    rig.status(0, "offline")
    rig.value(1, 90)  # gw-01's device: muted
    rig.value(2, 90, gateway="gw-02")  # another gateway's device: sent
    assert [(n.payload["alerts"][0]["rule"], n.payload["alerts"][0]["gateway"]) for _, n in rig.sent] == [
        ("gw-off", "gw-01"),
        ("hot", "gw-02"),
    ]
    assert rig.dispatcher.muted_total >= 1


def test_silence_mutes_until_its_end_then_what_still_fires_goes_out() -> None:
    rig = Rig([HOT], {"routing": {"receivers": ["mail"], "group_interval": "10s"}})
    rig.dispatcher.add_silence(Silence("s1", {"device": "boiler-1"}, rig.at(60), "alice", "maintenance"))
    rig.value(0, 90)
    rig.value(0.5, 90, device="boiler-2")
    rig.run_until(75, start=1)
    assert [(t, n.payload["alerts"][0]["device"]) for t, n in rig.sent] == [(0.5, "boiler-2"), (60, "boiler-1")]


def test_quiet_hours_hold_notifications_until_they_end_in_the_route_time_zone() -> None:
    # 12:00 UTC is 13:00 in Berlin: quiet 12:30-13:30 Berlin time, so 30 more minutes.
    quiet = [{"times": ["12:30-13:30"], "timezone": "Europe/Berlin"}]
    rig = Rig([HOT], {"routing": {"receivers": ["mail"], "quiet_hours": quiet}})
    rig.value(0, 90)
    rig.run_until(1900, start=60, every=60)
    assert rig.summary() == [(1800, "mail", "firing", 1)]


def test_quiet_hours_let_excepted_severities_through() -> None:
    quiet = [{"times": ["00:00-24:00"], "except_severities": ["critical"]}]
    rules = [HOT, {"name": "very-hot", "metric": "temp", "above": 95, "severity": "critical"}]
    rig = Rig(rules, {"routing": {"receivers": ["mail"], "quiet_hours": quiet}})
    rig.value(0, 99)
    assert [n.payload["alerts"][0]["rule"] for _, n in rig.sent] == ["very-hot"]


def test_escalation_when_a_critical_alert_is_not_acknowledged_in_time() -> None:
    rule = {"name": "very-hot", "metric": "temp", "above": 95, "severity": "critical"}
    routing = {"receivers": ["mail"], "escalate_after": "60s", "escalate_to": ["sms"]}
    rig = Rig([rule], {"routing": routing})
    rig.value(0, 99)
    rig.value(1, 99, device="boiler-2")
    rig.engine.ack("very-hot:plant-a:gw-01:boiler-2", "bob", "on it", rig.at(30))
    rig.step(30)
    rig.run_until(200, start=31, every=5)
    escalations = [
        (t, n.receiver, n.payload["alerts"][0]["device"]) for t, n in rig.sent if n.payload["status"] == "escalation"
    ]
    assert escalations == [(61, "sms", "boiler-1")]  # once, and not for the acknowledged one
    assert rig.sent[-1][1].payload["subject"].startswith("[ESCALATED critical]")


def test_reminders_at_repeat_interval_but_not_for_acknowledged_alerts() -> None:
    rig = Rig([HOT], {"routing": {"receivers": ["mail"], "repeat_interval": "100s", "group_interval": "10s"}})
    rig.value(0, 90)
    rig.run_until(250, start=1, every=5)
    assert [(t, s) for t, _, s, _ in rig.summary()] == [(0, "firing"), (101, "reminder"), (201, "reminder")]
    rig.engine.ack("hot:plant-a:gw-01:boiler-1", "bob", None, rig.at(251))
    rig.step(251)
    rig.run_until(500, start=255, every=5)
    assert len(rig.sent) == 3


def test_deadman_repeats_at_its_own_interval() -> None:
    rules = [{"name": "silent", "kind": "deadman", "silent_for": "30s", "repeat_interval": "60s"}]
    rig = Rig(rules, {"routing": {"receivers": ["mail"]}})
    rig.value(0, 1)
    rig.run_until(200, start=1)
    assert [(t, s) for t, _, s, _ in rig.summary()] == [(31, "firing"), (91, "reminder"), (151, "reminder")]


def test_a_storm_of_500_alerts_becomes_a_few_messages_and_one_summary() -> None:
    rig = Rig([HOT], {"routing": {"receivers": ["mail"]}, "rate_limit": {"count": 10, "per": "60s"}})
    for i in range(500):
        rig.value(0, 90, device=f"dev-{i:03d}")
    rig.run_until(130, start=1, every=5)
    statuses = [n.payload["status"] for _, n in rig.sent]
    assert statuses.count("firing") == 10
    assert statuses.count("summary") == 1
    summary = next(n.payload for _, n in rig.sent if n.payload["status"] == "summary")
    assert summary["subject"] == "[SUMMARY] 490 alert notifications held back by the rate limit of mail (1 min)"
    assert summary["body"].count("\n  - ") == 200  # listed up to 200, the rest counted
    assert rig.dispatcher.rate_limited_total == 490


def test_idempotency_keys_are_stable_for_the_same_transition() -> None:
    keys = []
    for _ in range(2):
        rig = Rig([HOT], {"routing": {"receivers": ["mail", "sms"]}})
        rig.value(0, 90)
        keys.append([n.payload["key"] for _, n in rig.sent])
    assert keys[0] == keys[1]
    assert len(set(keys[0])) == 2  # one per receiver


def test_replayed_episode_is_notified_once_although_it_is_already_resolved() -> None:
    rig = Rig([HOT], {"routing": {"receivers": ["mail"]}})
    rig.value(0, 70)
    rig.value(60, 70)
    for t, v in ((20, 90), (25, 95), (30, 70)):
        rig.value(t, v)
    assert rig.summary() == [(30, "mail", "resolved", 1)]
    payload = rig.sent[0][1].payload
    assert "while the gateway was cut off" in payload["subject"]
    assert payload["alerts"][0]["replayed"] is True


def test_dispatcher_state_survives_a_reload() -> None:
    rig = Rig([HOT], {"routing": {"receivers": ["mail"], "group_interval": "30s"}})
    rig.value(0, 90)
    groups, meta = rig.dispatcher.dirty_state()
    again = Dispatcher(rig.config, rig.rules, ["mail"])
    again.load([g for g in groups.values() if g], meta or {}, [])
    again.tick(rig.engine.alerts, rig.at(10))
    assert again.tick(rig.engine.alerts, rig.at(10)) == []  # already sent: not again
