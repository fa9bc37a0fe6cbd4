"""A cloud worker killed with kill -9 in the middle of a stream and started again: the broker
redelivers what was not acknowledged, nothing is lost, and no record becomes two points."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from tests.integration.test_cloud_scaleout import GATEWAYS, RECORDS, _publish_fleet, _worker
from tests.rig import Mosquitto, MqttProbe, VictoriaMetrics
from tests.rig.programs import Programs

ROUNDS = 8  # of the fleet's 25 batches per gateway, seq continuing


def _stored(probe: MqttProbe) -> int:
    reports = [json.loads(m.payload) for m in probe.messages if m.topic == "fl-cloud/cloud-a/health"]
    return reports[-1].get("records_stored", 0) if reports else 0


def test_kill_9_mid_stream_loses_nothing_and_duplicates_nothing(
    programs: Programs, mosquitto: Mosquitto, victoria: VictoriaMetrics, tmp_path: Path
) -> None:
    config = _worker(tmp_path, "cloud-a", mosquitto, victoria, "")
    worker = programs.cloud(config, name="cloud-a")
    sent: list[int] = []

    def publish() -> None:
        for r in range(ROUNDS):
            sent.append(_publish_fleet(mosquitto.port, first_seq=1 + r * 25, round_=r))

    with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/+/health"]) as probe:
        worker.start()
        probe.wait_for(lambda ms: _stored(probe) == 0 and len(ms) > 0, 20)
        publisher = threading.Thread(target=publish)
        publisher.start()
        probe.wait_for(lambda ms: _stored(probe) > 0, 30)  # mid-stream
        worker.kill()
        publisher.join(60)
        assert not publisher.is_alive()
        programs.cloud(config, name="cloud-a-again").start()
        total = sum(sent)
        series = victoria.wait_for_samples('{__name__="fieldlink_level"}', total, timeout=60)
    assert len(series) == len(GATEWAYS) * RECORDS
    for s in series:
        # Every record once: a redelivered one rewrote its own point.
        assert len(s["timestamps"]) == len(set(s["timestamps"])) == total // (len(GATEWAYS) * RECORDS)
