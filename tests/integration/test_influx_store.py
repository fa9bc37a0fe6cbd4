"""The InfluxDB writer against victoria-metrics (its InfluxDB v2 write API): awkward names survive
line-protocol escaping, a record sent twice is one point, and the tag/unit/precision mapping."""

from __future__ import annotations

import json
from pathlib import Path

import paho.mqtt.publish as mqtt_publish

from fieldlink.wire import Encoding, Record, Value, encode_batch
from tests.integration.fleet import cloud_toml, influx_store
from tests.rig import Mosquitto, MqttProbe, VictoriaMetrics
from tests.rig.programs import Programs

TS = 1_700_000_000_123
SITE, GATEWAY = "plant, a=1", "gw 7"  # valid topic levels, awkward for line protocol
DEVICE = 'boiler "1",x=y'


def _run(programs: Programs, mosquitto: Mosquitto, tmp_path: Path, store: str, records: list[Record]) -> None:
    config = cloud_toml(tmp_path / "cloud", mosquitto.url, store) + "[dashboard]\nenabled = false\n"
    cloud = programs.cloud(config).start()
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/+/health"]) as probe:

        def health() -> dict:
            reports = [json.loads(m.payload) for m in probe.messages]
            return reports[-1] if reports else {}

        probe.wait_for(lambda ms: health().get("broker") == "connected", 20)
        payload = encode_batch(SITE, GATEWAY, records, Encoding.MSGPACK)
        for _ in range(2):  # the same batch twice: a replay
            mqtt_publish.single(f"fl/{SITE}/{GATEWAY}/batch", payload, qos=1, hostname="127.0.0.1", port=mosquitto.port)
        probe.wait_for(lambda ms: health().get("messages", 0) >= 2 and health().get("records_stored", 0) >= 1, 20)
    assert cloud.stop() == 0


def test_awkward_names_are_escaped_and_a_replay_is_one_point(
    programs: Programs, mosquitto: Mosquitto, victoria: VictoriaMetrics, tmp_path: Path
) -> None:
    values = {
        "temp °C": Value.of(21.5, "degC"),
        'say "hi"': Value.of("a \\ b"),
        "a,b=c d": Value.of(7),
        "on": Value.of(True),
    }
    records = [Record(SITE, GATEWAY, DEVICE, 1, TS, values), Record(SITE, GATEWAY, DEVICE, 2, TS + 1, values)]
    _run(programs, mosquitto, tmp_path, influx_store(victoria.url), records)
    series = victoria.wait_for_samples('{__name__=~"fieldlink_.*"}', 2 * 4, timeout=20)
    by_name = {s["metric"]["__name__"]: s for s in series}
    assert set(by_name) == {"fieldlink_temp °C", 'fieldlink_say "hi"', "fieldlink_a,b=c d", "fieldlink_on"}
    for s in series:
        assert {k: v for k, v in s["metric"].items() if k != "__name__"} == {
            "site": SITE,
            "gateway": GATEWAY,
            "device": DEVICE,
        }
        assert s["timestamps"] == [TS, TS + 1]  # sent twice, stored once each
    assert by_name["fieldlink_temp °C"]["values"] == [21.5, 21.5]
    assert by_name["fieldlink_a,b=c d"]["values"] == [7, 7]
    assert by_name["fieldlink_on"]["values"] == [1, 1]
    # victoria-metrics keeps no strings (it stores 0); the line it parsed had the field, escaped right.
    assert by_name['fieldlink_say "hi"']["values"] == [0, 0]


def test_units_as_tags_fewer_tags_and_microsecond_precision(
    programs: Programs, mosquitto: Mosquitto, victoria: VictoriaMetrics, tmp_path: Path
) -> None:
    store = influx_store(victoria.url) + 'tags = ["device"]\nunits = "tag"\nprecision = "us"\nmeasurement = "plant"\n'
    values = {"temp": Value.of(21.5, "degC"), "pressure": Value.of(1.25, "bar"), "count": Value.of(3)}
    _run(programs, mosquitto, tmp_path, store, [Record(SITE, GATEWAY, DEVICE, 1, TS, values)])
    series = victoria.wait_for_samples('{__name__=~"plant_.*"}', 3, timeout=20)
    labels = {s["metric"]["__name__"]: {k: v for k, v in s["metric"].items() if k != "__name__"} for s in series}
    assert labels == {
        "plant_temp": {"device": DEVICE, "unit": "degC"},
        "plant_pressure": {"device": DEVICE, "unit": "bar"},
        "plant_count": {"device": DEVICE},
    }
    assert all(s["timestamps"] == [TS] for s in series)  # microseconds on the wire, the same instant
