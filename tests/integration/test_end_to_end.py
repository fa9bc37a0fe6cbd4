"""The walking skeleton end to end, every part a real process or server:

firmware-sim (Modbus TCP) -> fieldlink-gateway (embedded amqtt, SQLite buffer)
-> Debian mosquitto (cloud broker) -> fieldlink-cloud -> victoria-metrics / SQLite store,
aiosmtpd (alert mail), and a paho subscriber on the dashboard topics.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest

from fieldlink.wire import ValueType
from tests.integration.fleet import (
    CLOUD_DATA_TOPICS,
    COUNT,
    GATEWAY,
    PRESSURE,
    SITE,
    SQLITE_STORE,
    cloud_ready,
    cloud_toml,
    gateway_toml,
    influx_store,
    modbus_source,
    produced,
    sim_toml,
    wire_records,
)
from tests.rig import Mosquitto, MqttProbe, SmtpSink, VictoriaMetrics, free_port, sample_count
from tests.rig.programs import BIN, Programs


class _AnyTimestamp:
    """Equal to any plausible ms timestamp (after 2020), for comparing state payloads."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, int) and other > 1_577_836_800_000

    def __hash__(self) -> int:
        return 0


ANY_TS = _AnyTimestamp()


def _start_fleet(programs: Programs) -> int:
    port = free_port()
    programs.simulator(sim_toml(port)).start().wait_port(port)
    return port


def test_readings_reach_influxdb_dashboard_and_inbox(
    programs: Programs,
    mosquitto: Mosquitto,
    victoria: VictoriaMetrics,
    smtp_sink: SmtpSink,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_INFLUX_TOKEN", "s3cret-token-8d1f")  # the store's token comes from the environment
    modbus_port, local_port = _start_fleet(programs), free_port()
    cloud_config = cloud_toml(tmp_path / "cloud", mosquitto.url, influx_store(victoria.url), smtp_sink.port)
    cloud = programs.cloud(cloud_config + '\n[logging]\nlevel = "debug"\n')
    gateway_state = tmp_path / "gateway"
    gateway = programs.gateway(
        gateway_toml(gateway_state, local_port, mosquitto.url, modbus_source("line", modbus_port))
    )
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl/#", "dash/#", "fl-cloud/#"]) as probe:
        cloud.start()
        cloud_ready(probe)
        gateway.start().wait_port(local_port)

        # The ramp crosses 80 degC and wraps below 78 within seconds: a firing mail, then a resolved one.
        mails = smtp_sink.wait_for(2, timeout=30)
        assert gateway.stop() == 0
        expected = produced(gateway_state)
        seen = wire_records(probe.wait_for(lambda m: expected <= set(wire_records(m)), timeout=10))
        assert set(seen) == expected, "the wire carried exactly the records the gateway produced"

        by_device: dict[str, list] = defaultdict(list)
        for (device, _seq), record in sorted(seen.items()):
            by_device[device].append(record)
        boiler = by_device["boiler-1"]
        victoria.wait_for_samples('{__name__="fieldlink_pressure"}', len(boiler), timeout=15)
        victoria.wait_for_samples('{__name__="fieldlink_power"}', len(by_device["meter-1"]), timeout=15)
        dashboard = [m for m in probe.messages if m.topic.startswith("dash/")]
        assert cloud.stop() == 0
    assert "s3cret-token-8d1f" not in cloud.log(), "a secret reached the log (at debug level)"

    # Exact values, tags and timestamps in the store, one sample per record (no duplicates).
    for metric, device in (
        ("temperature", "boiler-1"),
        ("pressure", "boiler-1"),
        ("count", "boiler-1"),
        ("power", "meter-1"),
    ):
        series = victoria.export(f'{{__name__="fieldlink_{metric}"}}')
        assert [s["metric"] for s in series] == [
            {"__name__": f"fieldlink_{metric}", "site": SITE, "gateway": GATEWAY, "device": device}
        ]
        stored = dict(zip(series[0]["timestamps"], series[0]["values"], strict=True))
        assert len(series[0]["timestamps"]) == len(by_device[device]), f"{metric}: one sample per record"
        sent = {r.ts: r.values[metric].value for r in by_device[device]}
        assert stored.keys() == sent.keys(), f"{metric}: the timestamps of the records"
        # victoria-metrics keeps about 12 significant digits of a float; we send all 17.
        assert all(math.isclose(stored[ts], sent[ts], rel_tol=1e-11) for ts in sent), metric
    assert {r.values["pressure"].value for r in boiler} == {PRESSURE}
    assert {r.values["count"].value for r in boiler} == {COUNT}
    assert {r.values["count"].type for r in boiler} == {ValueType.INT}
    assert sample_count(victoria.export('{__name__=~"fieldlink_.*"}')) == 3 * len(boiler) + len(by_device["meter-1"])

    # The alert mail, then the clear mail, naming the device, the value and the threshold.
    firing, resolved = mails[0], mails[1]
    where = f"{SITE}/{GATEWAY}/boiler-1"
    assert firing["Subject"].startswith(f"[FIRING critical] boiler-overheat: {where} temperature = ")
    assert firing["Subject"].endswith("degC (> 80)")
    body = firing.get_content()
    assert "Device:    boiler-1" in body
    assert "Threshold: > 80 degC" in body
    assert "Acknowledge: fieldlink-cloud alerts ack boiler-overheat:" in body
    fired_value = float(firing["Subject"].split(" = ")[1].split()[0])
    assert fired_value > 80
    assert f"Value:     {fired_value:g} degC" in body
    assert resolved["Subject"].startswith(f"[RESOLVED critical] boiler-overheat: {where} temperature back to ")
    assert " degC, resolved after " in resolved["Subject"]
    assert "Lasted:" in resolved.get_content()

    # Dashboard topics: decoded JSON per record, and a retained latest value per device.
    stream = [json.loads(m.payload) for m in dashboard if m.topic == f"dash/{SITE}/{GATEWAY}/boiler-1/telemetry"]
    assert len(stream) == len(boiler)
    first = stream[0]
    assert first["values"]["pressure"] == {"value": PRESSURE, "type": "float", "quality": "good", "unit": "bar"}
    assert first["values"]["count"] == {"value": COUNT, "type": "int", "quality": "good"}
    assert (first["site"], first["gateway"], first["device"]) == (SITE, GATEWAY, "boiler-1")
    with MqttProbe("127.0.0.1", mosquitto.port, ["dash/+/+/+/latest"]) as late:
        retained = late.wait_for(2, timeout=5)
    latest = {m.topic: json.loads(m.payload) for m in retained}
    boiler_latest = latest[f"dash/{SITE}/{GATEWAY}/boiler-1/latest"]
    assert boiler_latest["ts"] == max(r.ts for r in boiler)
    assert (
        boiler_latest["values"]["temperature"]["value"] == max(boiler, key=lambda r: r.ts).values["temperature"].value
    )
    assert all(m.retain for m in retained)


def test_readings_reach_the_embedded_sqlite_store(programs: Programs, mosquitto: Mosquitto, tmp_path: Path) -> None:
    modbus_port, local_port = _start_fleet(programs), free_port()
    cloud_config = cloud_toml(tmp_path / "cloud", mosquitto.url, SQLITE_STORE)
    cloud = programs.cloud(cloud_config)
    gateway_state = tmp_path / "gateway"
    gateway = programs.gateway(
        gateway_toml(gateway_state, local_port, mosquitto.url, modbus_source("line", modbus_port), encoding="json")
    )
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl/#", "fl-cloud/#"]) as probe:
        cloud.start()
        cloud_ready(probe)
        gateway.start().wait_port(local_port)
        probe.wait_for(lambda m: len(wire_records(m)) >= 12, timeout=20)
        assert gateway.stop() == 0
        expected = produced(gateway_state)
        seen = wire_records(probe.wait_for(lambda m: expected <= set(wire_records(m)), timeout=10))

        # Read back through the CLI, as an operator would, while the cloud runs.
        config_path = tmp_path / "programs" / "cloud.toml"
        deadline = time.monotonic() + 15
        while True:
            out = subprocess.run(
                [str(BIN / "fieldlink-cloud"), "query", "--config", str(config_path), "--json", "--limit", "100000"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            rows = [json.loads(line) for line in out.stdout.splitlines()]
            if {(r["device"], r["seq"]) for r in rows} >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert cloud.stop() == 0

    assert out.returncode == 0, out.stderr
    keys = [(r["device"], r["seq"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)), "one row per record and metric"
    assert {(r["device"], r["seq"]) for r in rows} == expected
    for row in rows:
        record = seen[(row["device"], row["seq"])]
        assert row["ts"] == record.ts
        assert row["value"] == record.values[row["metric"]].value
        assert (row["site"], row["gateway"]) == (SITE, GATEWAY)
    assert {r["value"] for r in rows if r["metric"] == "pressure"} == {PRESSURE}
    assert {type(r["value"]) for r in rows if r["metric"] == "count"} == {int}


def test_cloud_broker_outage_and_gateway_crash_lose_nothing_and_duplicate_nothing(
    programs: Programs, mosquitto: Mosquitto, victoria: VictoriaMetrics, tmp_path: Path
) -> None:
    modbus_port, local_port = _start_fleet(programs), free_port()
    cloud = programs.cloud(cloud_toml(tmp_path / "cloud", mosquitto.url, influx_store(victoria.url)))
    gateway_state = tmp_path / "gateway"
    gateway_config = gateway_toml(gateway_state, local_port, mosquitto.url, modbus_source("line", modbus_port, "100ms"))
    gateway = programs.gateway(gateway_config)
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/#"]) as probe:
        cloud.start()
        cloud_ready(probe)
    gateway.start().wait_port(local_port)

    def wait_local_health(predicate, timeout: float = 20) -> None:
        with MqttProbe("127.0.0.1", local_port, [f"fl/{SITE}/{GATEWAY}/health"]) as local:
            local.wait_for(lambda msgs: any(predicate(json.loads(m.payload)) for m in msgs), timeout=timeout)

    victoria.wait_for_samples('{__name__="fieldlink_pressure"}', 5, timeout=15)  # flowing before the outage
    assert mosquitto.stop() == 0
    wait_local_health(lambda h: h["buffer"]["messages"] >= 20)  # readings pile up while the broker is down
    assert gateway.kill() == -9  # and the gateway crashes, buffer and all
    gateway.start().wait_port(local_port)
    wait_local_health(lambda h: h["buffer"]["messages"] >= 40)  # the old records survived; new ones join them
    mosquitto.start()
    # The uplink reconnects on its own (with backoff) and replays the backlog.
    wait_local_health(lambda h: h["uplink"]["state"] == "connected" and h["buffer"]["messages"] <= 2, timeout=30)
    assert gateway.stop() == 0
    per_device: dict[str, int] = defaultdict(int)
    for device, _ in produced(gateway_state):
        per_device[device] += 1
    victoria.wait_for_samples('{__name__="fieldlink_pressure"}', per_device["boiler-1"], timeout=20)
    victoria.wait_for_samples('{__name__="fieldlink_power"}', per_device["meter-1"], timeout=20)
    assert cloud.stop() == 0

    for metric, device in (("pressure", "boiler-1"), ("power", "meter-1")):
        (series,) = victoria.export(f'{{__name__="fieldlink_{metric}"}}')
        timestamps = series["timestamps"]
        assert len(timestamps) == len(set(timestamps)), f"{metric}: a record was stored twice"
        assert len(timestamps) == per_device[device], f"{metric}: every record arrived"


def test_gateway_status_last_will_and_sigterm_without_uplink_keeps_the_buffer(
    programs: Programs, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    modbus_port, local_port = _start_fleet(programs), free_port()
    state = tmp_path / "gateway"
    sources = modbus_source("line", modbus_port, "100ms")
    status_topic = f"fl/{SITE}/{GATEWAY}/status"

    def status(probe: MqttProbe, state_name: str) -> dict:
        def matches(messages: list) -> bool:
            last = [m for m in messages if m.topic == status_topic]
            return bool(last) and json.loads(last[-1].payload)["state"] == state_name

        return json.loads([m for m in probe.wait_for(matches, timeout=15) if m.topic == status_topic][-1].payload)

    with MqttProbe("127.0.0.1", mosquitto.port, [status_topic, *CLOUD_DATA_TOPICS]) as probe:
        # Connected: retained "online". Killed: the broker publishes the last will.
        first = programs.gateway(gateway_toml(state, local_port, mosquitto.url, sources), name="gw-first")
        first.start().wait_port(local_port)
        assert "reason" not in status(probe, "online")
        assert first.kill() == -9
        assert status(probe, "offline") == {"state": "offline", "reason": "connection lost"}

        # No uplink at all: SIGTERM exits cleanly at once and keeps every record for the next start.
        nowhere = f"mqtt://127.0.0.1:{free_port()}"
        offline = programs.gateway(gateway_toml(state, local_port, nowhere, sources), name="gw-offline")
        offline.start().wait_port(local_port)
        with MqttProbe("127.0.0.1", local_port, [f"fl/{SITE}/{GATEWAY}/health"]) as local:
            local.wait_for(lambda ms: any(json.loads(m.payload)["buffer"]["messages"] >= 20 for m in ms), timeout=15)
        assert offline.stop() == 0
        left = json.loads((state / "last-health.json").read_text())["buffer"]["messages"]
        assert left >= 20

        # The next start (a changed config: the real uplink again) delivers all of it, then leaves cleanly.
        last = programs.gateway(gateway_toml(state, local_port, mosquitto.url, sources), name="gw-last")
        last.start().wait_port(local_port)
        status(probe, "online")
        expected_before_restart = produced(state)
        probe.wait_for(lambda ms: expected_before_restart <= set(wire_records(ms)), timeout=20)
        assert last.stop() == 0
        assert status(probe, "offline") == {"state": "offline", "ts": ANY_TS, "reason": "shutdown"}
        assert produced(state) <= set(wire_records(probe.messages)), "the drain at SIGTERM forwarded the rest"
