"""Bad input gets a clear report and loses nothing; the processes keep running."""

from __future__ import annotations

import base64
import json
import resource
import subprocess
import time
from pathlib import Path

import paho.mqtt.publish as mqtt_publish

from fieldlink.wire import Encoding, Record, Value, encode_batch, encode_record
from tests.integration.fleet import (
    CLOUD_DATA_TOPICS,
    GATEWAY,
    SITE,
    SQLITE_STORE,
    cloud_toml,
    gateway_toml,
    health_reports,
    modbus_source,
    sim_toml,
    wire_records,
)
from tests.rig import Mosquitto, MqttProbe, SmtpSink, free_port
from tests.rig.programs import BIN, Programs

HEALTH = f"fl/{SITE}/{GATEWAY}/health"


def test_unreachable_modbus_device_goes_offline_with_reason_and_recovers(
    programs: Programs, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    live_port, dead_port, local_port = free_port(), free_port(), free_port()
    programs.simulator(sim_toml(live_port), name="sim-live").start().wait_port(live_port)
    dead_source = (
        modbus_source("dead-line", dead_port, poll="100ms")
        .replace("boiler-1", "far-boiler")
        .replace("meter-1", "far-meter")
    )
    gateway = programs.gateway(
        gateway_toml(tmp_path / "gw", local_port, mosquitto.url, modbus_source("line", live_port) + dead_source)
    )
    gateway.start().wait_port(local_port)
    status_topic = f"fl/{SITE}/{GATEWAY}/dev/far-boiler/status"
    with MqttProbe("127.0.0.1", local_port, [status_topic, HEALTH, f"fl/{SITE}/{GATEWAY}/dev/+/telemetry"]) as probe:
        offline = probe.wait_for(lambda ms: any(m.topic == status_topic for m in ms), timeout=10)
        state = json.loads(next(m for m in offline if m.topic == status_topic).payload)
        assert state["state"] == "offline"
        assert state["reason"] == f"cannot connect to 127.0.0.1:{dead_port}: Connection refused"

        # Retries with backoff (200 ms doubling to 1 s), not at the 100 ms poll rate.
        def failures(ms: list) -> list[tuple[int, int]]:
            return [(h["ts"], h["sources"].get("dead-line", {}).get("connect_failures", 0)) for h in health_reports(ms)]

        first = failures(probe.wait_for(lambda ms: len(failures(ms)) >= 1, timeout=5))[-1]
        later = failures(probe.wait_for(lambda ms: failures(ms)[-1][0] - first[0] >= 4000, timeout=10))[-1]
        attempts = later[1] - first[1]
        assert 2 <= attempts <= 16, f"{attempts} attempts in {later[0] - first[0]} ms"

        # The healthy bus kept reporting all along; the gateway never stopped.
        assert {r[0] for r in wire_records(probe.messages)} == {"boiler-1", "meter-1"}
        assert gateway.running

        # The device comes back: online again, without a restart.
        programs.simulator(sim_toml(dead_port), name="sim-revived").start().wait_port(dead_port)
        probe.wait_for(
            lambda ms: any(m.topic == status_topic and json.loads(m.payload)["state"] == "online" for m in ms),
            timeout=10,
        )
        probe.wait_for(lambda ms: any(r[0] == "far-boiler" for r in wire_records(ms)), timeout=10)
    assert gateway.stop() == 0


def _record(device: str, seq: int, temperature: float, ts: int | None = None) -> Record:
    return Record(
        SITE,
        GATEWAY,
        device,
        seq,
        ts or time.time_ns() // 1_000_000,
        {"temperature": Value.of(temperature, "degC")},
    )


def _cloud_health(probe: MqttProbe, predicate, timeout: float = 15) -> dict:
    messages = probe.wait_for(
        lambda ms: any(predicate(h) for h in health_reports([m for m in ms if m.topic.startswith("fl-cloud/")])),
        timeout=timeout,
    )
    return next(h for h in reversed(health_reports(messages)) if predicate(h))


def test_malformed_payloads_go_to_the_dead_letter_topic_with_their_reason(
    programs: Programs, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    config = cloud_toml(tmp_path / "cloud", mosquitto.url, SQLITE_STORE) + "[ingest]\nmax_message_bytes = 2000\n"
    cloud = programs.cloud(config).start()
    dead_letters = "fl-cloud/cloud-t/dead-letter"
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/#"]) as probe:
        _cloud_health(probe, lambda h: h["broker"] == "connected")
        topic = f"fl/{SITE}/{GATEWAY}/dev/boiler-1/telemetry"
        bad = {
            b"\xc1 not msgpack": "not valid msgpack",  # undecodable
            b'{"ver": 1, "kind": "record", "site": "plant-t"}': "gw",  # wrong schema: a key is missing
            b'{"ver": 99, "kind": "record"}': "unsupported envelope version 99",  # unknown version
            encode_record(_record("other-device", 1, 20.0)): "record of device 'other-device' published on",
            b"x" * 2001: "oversized: 2001 bytes, the limit is 2000",
        }
        for payload in bad:
            mqtt_publish.single(topic, payload, qos=1, hostname="127.0.0.1", port=mosquitto.port)
        good = _record("boiler-1", 1, 21.5)
        mqtt_publish.single(topic, encode_record(good, Encoding.JSON), qos=1, hostname="127.0.0.1", port=mosquitto.port)
        health = _cloud_health(probe, lambda h: h["records_stored"] >= 1 and h["dead_letters"] >= len(bad))
        assert (health["bad_messages"], health["dead_letters"], health["records_stored"]) == (len(bad), len(bad), 1)
        letters = [json.loads(m.payload) for m in probe.messages if m.topic == dead_letters]
        assert len(letters) == len(bad)
        for letter, (payload, reason) in zip(letters, bad.items(), strict=True):
            assert reason in letter["reason"], (letter, reason)
            assert (letter["topic"], letter["worker"], letter["bytes"]) == (topic, "cloud-t", len(payload))
            # The original travels with it, to inspect or replay; not when it is oversized.
            expected = None if len(payload) > 2000 else base64.b64encode(payload).decode()
            assert letter["payload_b64"] == expected
        assert cloud.running
    assert cloud.stop() == 0
    assert "bad message to the dead-letter topic" in cloud.log()


def test_alert_mail_waits_out_an_smtp_outage_and_a_cloud_restart(
    programs: Programs, mosquitto: Mosquitto, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    smtp_sink.stop()  # the relay is down when the alert fires
    config = cloud_toml(tmp_path / "cloud", mosquitto.url, SQLITE_STORE, smtp_sink.port)
    cloud = programs.cloud(config).start()
    topic = f"fl/{SITE}/{GATEWAY}/dev/boiler-1/telemetry"
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/#"]) as probe:
        _cloud_health(probe, lambda h: h["broker"] == "connected")
        mqtt_publish.single(topic, encode_record(_record("boiler-1", 1, 95.0)), qos=1, port=mosquitto.port)
        health = _cloud_health(probe, lambda h: h["alerts"]["notification_failures"] >= 1)
        assert health["alerts"]["fired_total"] == 1
        assert health["alerts"]["outbox_pending"] == 1
    # The cloud restarts before the relay comes back: the notification is on disk.
    assert cloud.stop() == 0
    cloud.start()
    smtp_sink.start()
    (mail,) = smtp_sink.wait_for(1, timeout=20)
    assert (
        mail["Subject"] == f"[FIRING critical] boiler-overheat: {SITE}/{GATEWAY}/boiler-1 temperature = 95 degC (> 80)"
    )
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/#"]) as probe:
        _cloud_health(probe, lambda h: h["alerts"]["outbox_pending"] == 0 and h["alerts"]["notifications_sent"] == 1)
    assert cloud.stop() == 0
    assert len(smtp_sink.messages) == 1


def test_local_apps_publish_through_the_gateway_buffer(
    programs: Programs, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    local_port = free_port()
    gateway = programs.gateway(gateway_toml(tmp_path / "gw", local_port, mosquitto.url, sources=""))
    gateway.start().wait_port(local_port)
    topic = f"fl/{SITE}/{GATEWAY}/dev/lab-sensor/telemetry"
    with MqttProbe("127.0.0.1", mosquitto.port, CLOUD_DATA_TOPICS) as cloud_side:
        # The local app's own seq is ignored: the gateway numbers records in its buffer.
        envelope = encode_record(_record("lab-sensor", 777, 19.5), Encoding.JSON)
        mqtt_publish.single(topic, envelope, qos=1, hostname="127.0.0.1", port=local_port)
        mqtt_publish.single(topic, b"not an envelope", qos=1, hostname="127.0.0.1", port=local_port)
        mqtt_publish.single(topic, envelope, qos=1, hostname="127.0.0.1", port=local_port)
        # Two records, in two messages or one batch (the uplink lingers 5 ms to batch fresh records).
        records = wire_records(cloud_side.wait_for(lambda ms: len(wire_records(ms)) >= 2, timeout=10))
    assert sorted(records) == [("lab-sensor", 1), ("lab-sensor", 2)]
    assert records[("lab-sensor", 1)].values["temperature"].value == 19.5
    with MqttProbe("127.0.0.1", local_port, [HEALTH]) as local:
        fresh = local.wait_for(lambda ms: any(h["records_buffered"] >= 2 for h in health_reports(ms)), timeout=5)
        health = health_reports(fresh)[-1]
    assert health["local_rejected"] == 1
    assert health["records_buffered"] == 2
    assert gateway.stop() == 0


def test_a_record_the_store_refuses_is_skipped_without_stalling_the_rest(
    programs: Programs, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    cloud = programs.cloud(cloud_toml(tmp_path / "cloud", mosquitto.url, SQLITE_STORE)).start()
    big = 2**64 - 1  # allowed by the wire; beyond SQLite's signed 64-bit integers
    records = [
        _record("boiler-1", 1, 20.0),
        _record("boiler-1", big, 21.0),  # a seq the store cannot key: refused
        Record(SITE, GATEWAY, "boiler-1", 2, time.time_ns() // 1_000_000 + 1, {"energy": Value.of(big, "Wh")}),
    ]
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/#"]) as probe:
        _cloud_health(probe, lambda h: h["broker"] == "connected")
        batch = encode_batch(SITE, GATEWAY, records)
        mqtt_publish.single(f"fl/{SITE}/{GATEWAY}/batch", batch, qos=1, hostname="127.0.0.1", port=mosquitto.port)
        health = _cloud_health(probe, lambda h: h["records_stored"] + h["records_rejected"] >= 3)
        assert (health["records_stored"], health["records_rejected"]) == (2, 1)
    assert cloud.stop() == 0
    assert "record refused by the store; skipped" in cloud.log()
    query = subprocess.run(
        [BIN / "fieldlink-cloud", "query", "--config", str(tmp_path / "programs" / "cloud.toml"), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    rows = {(r["seq"], r["metric"]): r["value"] for r in map(json.loads, query.stdout.splitlines())}
    assert rows == {(1, "temperature"): 20.0, (2, "energy"): big}


def _limit_file_size() -> None:
    # A full disk, for this process only: writes past 256 KiB fail with EFBIG
    # (Python ignores SIGXFSZ, so the write returns an error instead of killing it).
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def test_a_full_disk_drops_readings_with_a_count_and_the_gateway_keeps_running(
    programs: Programs, tmp_path: Path
) -> None:
    modbus_port, local_port = free_port(), free_port()
    programs.simulator(sim_toml(modbus_port)).start().wait_port(modbus_port)
    unreachable_cloud = f"mqtt://127.0.0.1:{free_port()}"  # nothing drains the buffer: it only grows
    gateway = programs.gateway(
        gateway_toml(tmp_path / "gw", local_port, unreachable_cloud, modbus_source("line", modbus_port, "50ms"))
    )
    gateway.start(preexec_fn=_limit_file_size).wait_port(local_port)
    with MqttProbe("127.0.0.1", local_port, [HEALTH, f"fl/{SITE}/{GATEWAY}/dev/+/telemetry"]) as probe:
        full = health_reports(
            probe.wait_for(lambda ms: any(h["readings_dropped"] > 0 for h in health_reports(ms)), timeout=30)
        )
        dropping = next(h for h in full if h["readings_dropped"] > 0)
        later = health_reports(
            probe.wait_for(lambda ms: health_reports(ms)[-1]["ts"] >= dropping["ts"] + 1000, timeout=10)
        )[-1]
    assert later["readings_dropped"] > dropping["readings_dropped"], "still polling, still counting"
    assert later["buffer_write_failures"] > 0
    assert later["devices"] == {"boiler-1": "online", "meter-1": "online"}
    assert gateway.running
    assert gateway.stop() == 0
    assert gateway.log().count("buffer write failed") == 1, "reported once per episode, not per reading"
