"""Alerting through the running cloud: real Mosquitto, real gateway processes, aiosmtpd for
mail and a loopback HTTP server standing in for the SMS provider."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import paho.mqtt.publish as mqtt_publish
import pytest

from fieldlink.wire import Record, Value, encode_batch
from tests.integration.fleet import (
    GATEWAY,
    SITE,
    SQLITE_STORE,
    cloud_ready,
    email_notifier,
    gateway_toml,
    health_reports,
)
from tests.rig import Mosquitto, MqttProbe, SmtpSink, free_port
from tests.rig.http_recorder import Answer, HttpRecorder
from tests.rig.programs import BIN, Programs

pytestmark = pytest.mark.slow


HOT = """
[[rules]]
name = "hot"
metric = "temperature"
above = 80.0
clear = 75.0
severity = "critical"
"""


def config(tmp_path: Path, mosquitto: Mosquitto, body: str, alerting: str = "") -> str:
    return f"""
[cloud]
name = "cloud-t"
state_dir = "{tmp_path / "cloud"}"
health_interval = "200ms"
[broker]
url = "{mosquitto.url}"
{SQLITE_STORE}
[alerting]
tick = "100ms"
{alerting}
{body}
"""


def send(mosquitto: Mosquitto, *records: Record) -> None:
    """One batch envelope, as a gateway sends it."""
    payload = encode_batch(SITE, GATEWAY, records)
    mqtt_publish.single(f"fl/{SITE}/{GATEWAY}/batch", payload, qos=1, port=mosquitto.port)


def reading(device: str, seq: int, value: float, ts: int | None = None) -> Record:
    now = time.time_ns() // 1_000_000
    return Record(SITE, GATEWAY, device, seq, now if ts is None else ts, {"temperature": Value.of(value, "degC")})


def iso_ms(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts // 1000)) + f".{ts % 1000:03d}Z"


def cloud_health(probe: MqttProbe, predicate, timeout: float = 15) -> dict:
    def matching(messages):
        return [
            h for h in health_reports([m for m in messages if m.topic == "fl-cloud/cloud-t/health"]) if predicate(h)
        ]

    return matching(probe.wait_for(lambda ms: bool(matching(ms)), timeout=timeout))[-1]


def cli(cloud_config: Path, *args: str) -> str:
    result = subprocess.run(
        [BIN / "fieldlink-cloud", *args, "--config", str(cloud_config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_gateway_offline_from_its_last_will_fires_and_clears(
    programs: Programs, mosquitto: Mosquitto, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    rules = """
[[rules]]
name = "gateway-offline"
kind = "offline"
target = "gateway"
severity = "critical"
notify = ["ops"]
[alerting.routing]
group_interval = "0s"
"""
    cloud = programs.cloud(config(tmp_path, mosquitto, email_notifier(smtp_sink.port) + rules)).start()
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/#", "dash/#"]) as probe:
        cloud_ready(probe)
        gateway_text = gateway_toml(tmp_path / "gw", free_port(), mosquitto.url, sources="")
        gateway = programs.gateway(gateway_text).start()
        cloud_health(probe, lambda h: h["alerts"]["rules"] == 1 and h["messages"] >= 1)
        gateway.kill()  # vanishes: Mosquitto publishes its last will
        (firing,) = smtp_sink.wait_for(1, timeout=20)
        assert firing["Subject"] == (
            f"[FIRING critical] gateway-offline: {SITE}/{GATEWAY} offline (connection lost)"
        ), firing["Subject"]
        body = firing.get_content()
        assert "Reason:    connection lost" in body
        assert f"fieldlink-cloud alerts ack gateway-offline:{SITE}:{GATEWAY} --by <name>" in body
        alert_topic = f"dash/{SITE}/alerts/gateway-offline:{SITE}:{GATEWAY}"
        probe.wait_for(
            lambda ms: any(m.topic == alert_topic and json.loads(m.payload)["state"] == "firing" for m in ms)
        )
        gateway.start()  # back: online again
        mails = smtp_sink.wait_for(2, timeout=20)
        assert mails[1]["Subject"].startswith(f"[RESOLVED critical] gateway-offline: {SITE}/{GATEWAY}, resolved after ")
        probe.wait_for(
            lambda ms: any(m.topic == alert_topic and json.loads(m.payload)["state"] == "resolved" for m in ms)
        )
        assert gateway.stop() == 0
    assert cloud.stop() == 0


def test_ack_from_the_cli_stops_reminders_and_shows_on_the_dashboard_and_in_the_history(
    programs: Programs, mosquitto: Mosquitto, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    routing = """
notify = ["ops"]
[alerting.routing]
repeat_interval = "1s"
group_interval = "0s"
"""
    text = config(tmp_path, mosquitto, email_notifier(smtp_sink.port) + HOT + routing)
    path = programs.config("cloud-ack", text)
    cloud = programs.program("cloud", "fieldlink-cloud", "run", "--config", str(path)).start()
    alert_id = f"hot:{SITE}:{GATEWAY}:boiler-1"
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/#", "dash/+/alerts/#"]) as probe:
        cloud_ready(probe)
        send(mosquitto, reading("boiler-1", 1, 90.0))
        mails = smtp_sink.wait_for(2, timeout=15)  # the alert, then a reminder a second later
        assert mails[0]["Subject"].startswith("[FIRING critical] hot:")
        assert mails[1]["Subject"].startswith("[STILL FIRING critical] hot:")
        assert "sent to fl-cloud/alerts/ack" in cli(
            path, "alerts", "ack", alert_id, "--by", "alice", "--comment", "on it"
        )
        shown = probe.wait_for(
            lambda ms: any(json.loads(m.payload).get("acknowledged_by") == "alice" for m in ms if m.payload), timeout=10
        )
        view = json.loads(next(m.payload for m in shown if m.payload and json.loads(m.payload).get("acknowledged_by")))
        assert (view["id"], view["state"], view["severity"]) == (alert_id, "firing", "critical")
        before = len(smtp_sink.messages)
        # Positive control: another device's alert fires and is reminded; boiler-1 no longer is.
        send(mosquitto, reading("boiler-2", 1, 91.0))
        smtp_sink.wait_for(
            lambda ms: sum("STILL FIRING" in m["Subject"] and "boiler-2" in m["Subject"] for m in ms) >= 2, timeout=15
        )
        later = smtp_sink.messages[before:]
        assert not [m["Subject"] for m in later if "boiler-1" in m["Subject"]]
    assert cloud.stop() == 0
    history = cli(path, "alerts", "history", "--alert", alert_id)
    events = [line.split()[1] for line in history.splitlines()]
    assert events[:2] == ["firing", "queued"]
    assert "acknowledged" in events
    assert "by=alice comment=on it" in history
    assert "notified" in events
    listing = cli(path, "alerts", "list")
    assert f"firing   critical {alert_id}" in listing
    assert "acked by alice" in listing


def test_a_replayed_backlog_is_evaluated_at_its_own_time_and_never_fires_twice(
    programs: Programs, mosquitto: Mosquitto, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    text = config(tmp_path, mosquitto, email_notifier(smtp_sink.port) + HOT + 'notify = ["ops"]\n')
    cloud = programs.cloud(text).start()
    now = time.time_ns() // 1_000_000
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/#"]) as probe:
        cloud_ready(probe)
        # Live records before and after an uplink outage; the backlog follows them.
        send(mosquitto, reading("boiler-1", 1, 70.0, now - 60_000), reading("boiler-1", 9, 70.0, now))
        backlog = [
            reading("boiler-1", seq, value, now - 60_000 + seq * 5000)
            for seq, value in ((2, 70), (3, 85), (4, 90), (5, 70))
        ]
        send(mosquitto, *backlog)
        (mail,) = smtp_sink.wait_for(1, timeout=15)
        assert "while the gateway was cut off" in mail["Subject"], mail["Subject"]
        assert mail["Subject"].startswith(
            f"[RESOLVED critical] hot: {SITE}/{GATEWAY}/boiler-1 temperature reached 90 degC"
        )
        assert "reported late" in mail.get_content()
        # The same backlog again (a gateway that replays it after losing its acks): nothing new.
        send(mosquitto, *backlog)
        send(
            mosquitto,
            *[reading("boiler-1", seq + 100, r.values["temperature"].value, r.ts) for seq, r in enumerate(backlog)],
        )
        # Positive control: a live crossing afterwards is mailed, and it is the second mail.
        send(mosquitto, reading("boiler-1", 10, 95.0, now + 1000))
        mails = smtp_sink.wait_for(2, timeout=15)
        assert mails[1]["Subject"].startswith("[FIRING critical] hot:")
        health = cloud_health(
            probe, lambda h: h["alerts"]["outbox_pending"] == 0 and h["alerts"]["notifications_sent"] == 2
        )
        assert health["alerts"]["fired_total"] == 2
    assert cloud.stop() == 0
    assert len(smtp_sink.messages) == 2


def test_a_restart_neither_resends_nor_forgets_a_firing_alert(
    programs: Programs, mosquitto: Mosquitto, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    text = config(
        tmp_path,
        mosquitto,
        email_notifier(smtp_sink.port) + HOT + 'notify = ["ops"]\n[alerting.routing]\ngroup_interval = "0s"\n',
    )
    cloud = programs.cloud(text).start()
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/#"]) as probe:
        cloud_ready(probe)
        send(mosquitto, reading("boiler-1", 1, 90.0))
        smtp_sink.wait_for(1, timeout=15)
    assert cloud.stop() == 0
    restarted = time.time_ns() // 1_000_000
    cloud.start()
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/#"]) as probe:
        health = cloud_health(probe, lambda h: h["ts"] > restarted and h["broker"] == "connected")
        assert health["alerts"]["firing"] == 1  # remembered
        send(mosquitto, reading("boiler-1", 2, 70.0))
        mails = smtp_sink.wait_for(2, timeout=15)
    assert cloud.stop() == 0
    assert [m["Subject"].split("]")[0] for m in mails] == ["[FIRING critical", "[RESOLVED critical"]


def test_sms_provider_errors_are_retried_or_reported(programs: Programs, mosquitto: Mosquitto, tmp_path: Path) -> None:
    with HttpRecorder() as provider:
        sms = f"""
[[notifiers]]
kind = "sms"
name = "oncall"
base_url = "{provider.url}"
account_sid = "AC0123456789abcdef0123456789abcdef"
auth_token = "${{TEST_SMS_TOKEN:-not-a-secret}}"
from = "+15005550006"
to = ["+4915112345678"]
"""
        created = Answer(201, b'{"sid": "SM1", "status": "queued"}', {"Content-Type": "application/json"})
        busy = Answer(429, b'{"code": 20429, "message": "Too Many Requests"}', {"Retry-After": "1"})
        failed = Answer(500, b"{}")
        refused = Answer(
            400, b'{"code": 21211, "message": "The To number is not valid"}', {"Content-Type": "application/json"}
        )
        provider.answers = [busy, failed, created, refused]
        text = config(tmp_path, mosquitto, sms + HOT + 'notify = ["oncall"]\n')
        cloud = programs.cloud(text).start()
        with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/#"]) as probe:
            cloud_ready(probe)
            send(mosquitto, reading("boiler-1", 1, 90.0))
            health = cloud_health(probe, lambda h: h["alerts"]["notifications_sent"] == 1, timeout=20)
            assert health["alerts"]["notification_failures"] == 2
            assert len(provider.requests) == 3  # 429, 500, then delivered: retried until it went through
            send(mosquitto, reading("boiler-2", 1, 90.0))  # refused for good (400): reported, not retried
            health = cloud_health(probe, lambda h: h["alerts"]["notifications_failed_permanently"] == 1, timeout=20)
            assert health["alerts"]["outbox_pending"] == 0
        assert cloud.stop() == 0
    assert len(provider.requests) == 4
    request = provider.requests[0]
    assert request.path == "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json"
    path = tmp_path / "c.toml"
    path.write_text(text)
    history = cli(path, "alerts", "history")
    assert "notify_failed" in history
    assert "The To number is not valid" in history


def test_a_storm_of_500_alerts_is_rate_limited_into_one_summary(
    programs: Programs, mosquitto: Mosquitto, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    limit = 'rate_limit = { count = 5, per = "3s" }'
    text = config(tmp_path, mosquitto, email_notifier(smtp_sink.port) + HOT + 'notify = ["ops"]\n', limit)
    cloud = programs.cloud(text).start()
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/#"]) as probe:
        cloud_ready(probe)
        send(mosquitto, *[reading(f"dev-{i:03d}", 1, 90.0) for i in range(500)])
        mails = smtp_sink.wait_for(6, timeout=30)
        health = cloud_health(probe, lambda h: h["alerts"]["firing"] == 500 and h["alerts"]["outbox_pending"] == 0)
        assert health["alerts"]["rate_limited_total"] == 495
    assert cloud.stop() == 0
    subjects = [m["Subject"] for m in mails]
    assert sum(s.startswith("[FIRING critical]") for s in subjects) == 5
    assert subjects[5] == "[SUMMARY] 495 alert notifications held back by the rate limit of ops (3 s)"
    assert len(smtp_sink.messages) == 6


def test_each_rule_kind_through_the_running_cloud_to_a_webhook(
    programs: Programs, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    with HttpRecorder() as hook:
        body = f"""
[[notifiers]]
kind = "webhook"
name = "hook"
url = "{hook.url}/alerts"

[[rules]]
name = "hover"
metric = "temperature"
match = {{ device = "hover-*" }}
above = 80.0
clear = 75.0

[[rules]]
name = "lasting"
metric = "temperature"
match = {{ device = "slow-*" }}
above = 80.0
for = "10s"

[[rules]]
name = "climbing"
kind = "rate"
metric = "temperature"
match = {{ device = "rate-*" }}
per = "1s"
above = 5.0

[[rules]]
name = "silent"
kind = "deadman"
match = {{ device = "quiet-*" }}
silent_for = "1s"
repeat_interval = "1h"

[alerting.routing]
receivers = ["hook"]
group_interval = "0s"
"""
        cloud = programs.cloud(config(tmp_path, mosquitto, body)).start()
        now = time.time_ns() // 1_000_000
        with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/#"]) as probe:
            cloud_ready(probe)
            # Hovering around 80 with a clear level of 75: one alert, not four.
            hover = [81, 79, 82, 78, 81, 76, 80.5]
            send(mosquitto, *[reading("hover-1", i + 1, v, now - 60_000 + i * 1000) for i, v in enumerate(hover)])
            # Above 80 for 5 s only, then for 12 s: `for = "10s"` fires once, since the second rise.
            slow = [(0, 85), (5, 85), (6, 70), (20, 85), (26, 86), (32, 87)]
            send(mosquitto, *[reading("slow-1", i + 1, v, now - 60_000 + t * 1000) for i, (t, v) in enumerate(slow)])
            # +10 per second: above 5 per second.
            send(mosquitto, reading("rate-1", 1, 20.0, now - 2000), reading("rate-1", 2, 30.0, now - 1000))
            # A device that falls silent: fires about a second later; data back resolves it.
            send(mosquitto, reading("quiet-1", 1, 20.0))
            cloud_health(probe, lambda h: h["alerts"]["notifications_sent"] >= 4, timeout=20)
            send(mosquitto, reading("quiet-1", 2, 20.0))
            cloud_health(probe, lambda h: h["alerts"]["notifications_sent"] >= 5, timeout=20)
        assert cloud.stop() == 0
    sent = [json.loads(r.body) for r in hook.requests]
    seen = sorted((p["alerts"][0]["rule"], p["status"]) for p in sent)
    assert seen == [
        ("climbing", "firing"),
        ("hover", "firing"),
        ("lasting", "firing"),
        ("silent", "firing"),
        ("silent", "resolved"),
    ]
    by_rule = {p["alerts"][0]["rule"]: p["alerts"][0] for p in sent if p["status"] == "firing"}
    assert by_rule["lasting"]["since"] == iso_ms(now - 40_000)  # the rise at 20 s, held 10 s
    assert by_rule["climbing"]["value"] == 10.0
    assert all(r.headers["Idempotency-Key"] == json.loads(r.body)["key"] for r in hook.requests)
