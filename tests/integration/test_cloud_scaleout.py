"""Cloud workers scaled out on the broker: two workers on one Mosquitto share a fleet's
messages through a shared subscription, or own a partition of sites each; victoria-metrics
ends with every record once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from fieldlink.wire import Encoding, Record, Value, encode_batch
from tests.integration.fleet import cloud_toml, influx_store
from tests.rig import Mosquitto, MqttProbe, VictoriaMetrics
from tests.rig.programs import Programs

GATEWAYS = [("plant-a", f"gw-{i}") for i in range(4)] + [("plant-b", f"gw-{i}") for i in range(4)]
BATCHES = 25  # per gateway
RECORDS = 4  # per batch, one per device


def _worker(tmp_path: Path, name: str, mosquitto: Mosquitto, victoria: VictoriaMetrics, broker_keys: str) -> str:
    config = cloud_toml(tmp_path / name, mosquitto.url, influx_store(victoria.url))
    config = config.replace('name = "cloud-t"', f'name = "{name}"')
    return config.replace("[broker]\n", f"[broker]\n{broker_keys}\n") + "[dashboard]\nenabled = false\n"


def _publish_fleet(port: int, first_seq: int = 1, round_: int = 0) -> int:
    """Batch envelopes of 8 gateways x 4 devices at QoS 1; returns the records sent."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fleet-publisher-{round_}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    sent, infos = 0, []
    start = time.time_ns() // 1_000_000 - 600_000 + round_ * 1000  # distinct timestamps per round
    for b in range(BATCHES):
        for g, (site, gateway) in enumerate(GATEWAYS):
            records = [
                Record(
                    site,
                    gateway,
                    f"dev-{d}",
                    first_seq + b,
                    start + b * 10 + g,
                    {"level": Value.of(float(b * 100 + d))},
                )
                for d in range(RECORDS)
            ]
            payload = encode_batch(site, gateway, records, Encoding.MSGPACK)
            infos.append(client.publish(f"fl/{site}/{gateway}/batch", payload, qos=1))
            sent += len(records)
    for info in infos:
        info.wait_for_publish(timeout=10)
    client.loop_stop()
    client.disconnect()
    return sent


def _health(probe: MqttProbe, name: str) -> dict:
    reports = [json.loads(m.payload) for m in probe.messages if m.topic == f"fl-cloud/{name}/health"]
    return reports[-1] if reports else {}


def _run_two_workers(
    programs: Programs, mosquitto: Mosquitto, victoria: VictoriaMetrics, tmp_path: Path, keys: tuple[str, str]
) -> tuple[dict, dict, int]:
    workers = [
        programs.cloud(_worker(tmp_path, name, mosquitto, victoria, broker), name=name)
        for name, broker in zip(("cloud-a", "cloud-b"), keys, strict=True)
    ]
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/+/health"]) as probe:
        for worker in workers:
            worker.start()
        probe.wait_for(
            lambda ms: all(_health(probe, n).get("broker") == "connected" for n in ("cloud-a", "cloud-b")), 20
        )
        sent = _publish_fleet(mosquitto.port)
        probe.wait_for(
            lambda ms: sum(_health(probe, n).get("records_stored", 0) for n in ("cloud-a", "cloud-b")) >= sent, 30
        )
        a, b = _health(probe, "cloud-a"), _health(probe, "cloud-b")
    for worker in workers:
        assert worker.stop() == 0
    return a, b, sent


def test_two_workers_on_a_shared_subscription_split_the_load_and_store_each_record_once(
    programs: Programs, mosquitto: Mosquitto, victoria: VictoriaMetrics, tmp_path: Path
) -> None:
    shared = 'shared_group = "ingest"'
    a, b, sent = _run_two_workers(programs, mosquitto, victoria, tmp_path, (shared, shared))
    # Both took part, neither took everything twice: the broker split the messages.
    assert a["records_stored"] > 0
    assert b["records_stored"] > 0
    assert a["records_stored"] + b["records_stored"] == sent
    series = victoria.wait_for_samples('{__name__="fieldlink_level"}', sent, timeout=20)
    assert len(series) == len(GATEWAYS) * RECORDS
    for s in series:
        assert len(s["timestamps"]) == BATCHES  # each record once
        assert len(set(s["timestamps"])) == BATCHES


def test_site_partitions_give_each_worker_whole_sites(
    programs: Programs, mosquitto: Mosquitto, victoria: VictoriaMetrics, tmp_path: Path
) -> None:
    """Partitioned by site, each worker sees every record of its devices (per-device state stays whole)."""
    a, b, sent = _run_two_workers(
        programs, mosquitto, victoria, tmp_path, ('sites = ["plant-a"]', 'sites = ["plant-b"]')
    )
    half = sent // 2
    assert (a["records_stored"], b["records_stored"]) == (half, half)
    series = victoria.wait_for_samples('{__name__="fieldlink_level"}', sent, timeout=20)
    sites = {s["metric"]["site"] for s in series}
    assert sites == {"plant-a", "plant-b"}
    assert all(len(s["timestamps"]) == BATCHES for s in series)
