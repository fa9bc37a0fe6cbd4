"""The rig itself, against the real servers: if these fail, nothing else can be trusted."""

from __future__ import annotations

import smtplib
import uuid
from email.message import EmailMessage
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from influxdb_client import InfluxDBClient, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from paho.mqtt.enums import CallbackAPIVersion

from tests.rig import Mosquitto, MqttProbe, ProbeMessage, SmtpSink, VictoriaMetrics, port_accepts
from tests.rig.servers import require_binary


def unique_topic() -> str:
    return f"fieldlink-rig/{uuid.uuid4().hex[:12]}"


def publish(broker: Mosquitto, topic: str, payload: bytes, *, retain: bool = False) -> None:
    """Publish at QoS 1 and return once the broker sent its PUBACK."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"rig-pub-{uuid.uuid4().hex[:8]}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=5)
        assert info.is_published(), f"no PUBACK from {broker!r}"
    finally:
        client.disconnect()
        client.loop_stop()


def test_mosquitto_delivers_a_qos1_publish(mosquitto: Mosquitto) -> None:
    topic = unique_topic()
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    with MqttProbe(mosquitto.host, mosquitto.port, [f"{topic}/#"]) as probe:
        publish(mosquitto, f"{topic}/a", b"\x00\x01payload")
        messages = probe.wait_for(1, timeout=5)
    assert messages == [ProbeMessage(f"{topic}/a", b"\x00\x01payload", False)]


def test_retained_message_survives_a_restart(mosquitto: Mosquitto) -> None:
    topic = unique_topic()
    publish(mosquitto, topic, b"kept", retain=True)
    port = mosquitto.port

    assert mosquitto.stop() == 0
    assert not mosquitto.running
    assert not port_accepts(mosquitto.host, port)
    mosquitto.start()

    assert mosquitto.port == port
    with MqttProbe(mosquitto.host, mosquitto.port, [topic]) as probe:
        messages = probe.wait_for(1, timeout=5)
    assert messages == [ProbeMessage(topic, b"kept", True)]


def test_save_then_kill_keeps_the_retained_message(mosquitto: Mosquitto) -> None:
    topic = unique_topic()
    publish(mosquitto, topic, b"saved", retain=True)

    mosquitto.save()
    assert mosquitto.kill() == -9
    mosquitto.start()

    with MqttProbe(mosquitto.host, mosquitto.port, [topic]) as probe:
        messages = probe.wait_for(1, timeout=5)
    assert messages == [ProbeMessage(topic, b"saved", True)]


def test_without_persistence_a_restart_forgets(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "mosquitto", persistence=False)
    broker.start()
    try:
        topic = unique_topic()
        publish(broker, topic, b"lost", retain=True)
        broker.stop()
        broker.start()
        with MqttProbe(broker.host, broker.port, [topic, unique_topic()]) as probe:
            # The probe's own retained-free topic proves the subscription is live.
            publish(broker, probe.topics[1], b"marker")
            messages = probe.wait_for(1, timeout=5)
        assert [m.payload for m in messages] == [b"marker"]
    finally:
        broker.stop()


def test_victoria_metrics_stores_influx_line_protocol(victoria: VictoriaMetrics) -> None:
    # victoria-metrics accepts any token and org.
    with InfluxDBClient(url=victoria.url, token="t", org="o") as client:  # noqa: S106
        client.write_api(write_options=SYNCHRONOUS).write(
            bucket="b", record="m,tag=v f1=1.5,f2=2i 1700000000000", write_precision=WritePrecision.MS
        )

    series = victoria.wait_for_samples('{__name__=~"m_f[12]"}', count=2, timeout=10)

    by_name = {s["metric"]["__name__"]: s for s in series}
    assert by_name["m_f1"]["metric"] == {"__name__": "m_f1", "tag": "v"}
    assert by_name["m_f1"]["values"] == [1.5]
    assert by_name["m_f1"]["timestamps"] == [1700000000000]
    assert by_name["m_f2"]["metric"] == {"__name__": "m_f2", "tag": "v"}
    assert by_name["m_f2"]["values"] == [2]  # stored as a float: integer-ness is not kept
    assert by_name["m_f2"]["timestamps"] == [1700000000000]


def test_smtp_sink_keeps_a_message(smtp_sink: SmtpSink) -> None:
    message = EmailMessage()
    message["From"] = "gateway@example.org"
    message["To"] = "ops@example.org"
    message["Subject"] = "pump 3 pressure high"
    message.set_content("4.2 bar")

    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5) as client:
        client.send_message(message)

    [received] = smtp_sink.wait_for(1, timeout=5)
    assert received["Subject"] == "pump 3 pressure high"
    assert received.get_content().strip() == "4.2 bar"
    [mail] = smtp_sink.received
    assert mail.mail_from == "gateway@example.org"
    assert mail.rcpt_tos == ["ops@example.org"]


def test_smtp_sink_fail_with_rejects_data(smtp_sink: SmtpSink) -> None:
    smtp_sink.fail_with = "451 try later"

    with (
        smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5) as client,
        pytest.raises(smtplib.SMTPDataError) as excinfo,
    ):
        client.sendmail("gateway@example.org", ["ops@example.org"], b"Subject: x\r\n\r\nbody\r\n")

    assert excinfo.value.smtp_code == 451
    assert smtp_sink.messages == []
    assert smtp_sink.rejected == 1


def test_smtp_sink_restart_keeps_port_and_messages(smtp_sink: SmtpSink) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, timeout=5) as client:
        client.sendmail("a@example.org", ["b@example.org"], b"Subject: one\r\n\r\n1\r\n")
    port = smtp_sink.port

    smtp_sink.stop()
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP(smtp_sink.host, port, timeout=5)
    smtp_sink.start()

    with smtplib.SMTP(smtp_sink.host, port, timeout=5) as client:
        client.sendmail("a@example.org", ["b@example.org"], b"Subject: two\r\n\r\n2\r\n")
    assert [m["Subject"] for m in smtp_sink.wait_for(2, timeout=5)] == ["one", "two"]


def test_missing_binary_skips_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Debian package 'no-such-pkg'"):
        require_binary("fieldlink-no-such-binary", "no-such-pkg")


def test_missing_binary_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="Debian package 'no-such-pkg'"):
        require_binary("fieldlink-no-such-binary", "no-such-pkg")
