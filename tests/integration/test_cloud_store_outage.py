"""The store goes away under traffic: victoria-metrics stopped while batches keep coming, then
started again. The cloud acknowledges nothing it has not stored, so the broker keeps it, and
every record arrives once the store is back."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.test_cloud_scaleout import BATCHES, GATEWAYS, RECORDS, _publish_fleet, _worker
from tests.rig import Mosquitto, MqttProbe, VictoriaMetrics
from tests.rig.programs import Programs


def _health(probe: MqttProbe) -> dict:
    reports = [json.loads(m.payload) for m in probe.messages if m.topic == "fl-cloud/cloud-a/health"]
    return reports[-1] if reports else {}


def test_a_store_outage_under_traffic_loses_nothing(
    programs: Programs, mosquitto: Mosquitto, victoria: VictoriaMetrics, tmp_path: Path
) -> None:
    worker = programs.cloud(_worker(tmp_path, "cloud-a", mosquitto, victoria, ""), name="cloud-a")
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/+/health"]) as probe:
        worker.start()
        probe.wait_for(lambda ms: _health(probe).get("broker") == "connected", 20)
        victoria.stop()
        sent = _publish_fleet(mosquitto.port, first_seq=1)
        # The worker tries, fails, keeps the messages unacknowledged and retries with backoff.
        probe.wait_for(lambda ms: _health(probe).get("store_failures", 0) >= 2, 20)
        assert _health(probe)["records_stored"] == 0
        victoria.start()
        probe.wait_for(lambda ms: _health(probe).get("records_stored", 0) >= sent, 40)
        health = _health(probe)
    assert worker.stop() == 0
    assert health["records_stored"] == sent
    series = victoria.wait_for_samples('{__name__="fieldlink_level"}', sent, timeout=20)
    assert len(series) == len(GATEWAYS) * RECORDS
    assert all(len(s["timestamps"]) == len(set(s["timestamps"])) == BATCHES for s in series)
