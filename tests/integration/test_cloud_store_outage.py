"""The store goes away under traffic: victoria-metrics stopped while batches keep coming.

The cloud retries for ``ingest.spool_after``, then commits the records to its own
spool (SQLite) and acknowledges their messages, so the broker's queues do not grow;
the spool drains when the store is back. A worker killed with ``kill -9`` while its
spool holds records drains it after the restart. Every record ends in the store once.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.test_cloud_scaleout import BATCHES, GATEWAYS, RECORDS, _publish_fleet, _worker
from tests.rig import Mosquitto, MqttProbe, VictoriaMetrics
from tests.rig.programs import Programs


def _health(probe: MqttProbe) -> dict:
    reports = [json.loads(m.payload) for m in probe.messages if m.topic == "fl-cloud/cloud-a/health"]
    return reports[-1] if reports else {}


def _config(tmp_path: Path, mosquitto: Mosquitto, victoria: VictoriaMetrics) -> str:
    return _worker(tmp_path, "cloud-a", mosquitto, victoria, "") + '[ingest]\nspool_after = "500ms"\n'


def _all_stored_once(victoria: VictoriaMetrics, sent: int) -> None:
    series = victoria.wait_for_samples('{__name__="fieldlink_level"}', sent, timeout=20)
    assert len(series) == len(GATEWAYS) * RECORDS
    assert all(len(s["timestamps"]) == len(set(s["timestamps"])) == BATCHES for s in series)


def test_a_store_outage_under_traffic_spools_and_drains(
    programs: Programs, mosquitto: Mosquitto, victoria: VictoriaMetrics, tmp_path: Path
) -> None:
    worker = programs.cloud(_config(tmp_path, mosquitto, victoria), name="cloud-a")
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/+/health"]) as probe:
        worker.start()
        probe.wait_for(lambda ms: _health(probe).get("broker") == "connected", 20)
        victoria.stop()
        sent = _publish_fleet(mosquitto.port)
        # Every record is in the spool and acknowledged, none in the store yet.
        probe.wait_for(lambda ms: (_health(probe).get("spool") or {}).get("spooled", 0) >= sent, 30)
        health = _health(probe)
        assert (health["spool"]["records"], health["records_stored"]) == (sent, 0)
        assert health["store_failures"] >= 1
        victoria.start()
        probe.wait_for(lambda ms: (_health(probe).get("spool") or {}).get("records", -1) == 0, 40)
        probe.wait_for(lambda ms: _health(probe).get("records_stored", 0) >= sent, 10)
        assert _health(probe)["spool"]["drained"] == sent
    assert worker.stop() == 0
    _all_stored_once(victoria, sent)


def test_a_spool_survives_kill_9_and_drains_after_the_restart(
    programs: Programs, mosquitto: Mosquitto, victoria: VictoriaMetrics, tmp_path: Path
) -> None:
    config = _config(tmp_path, mosquitto, victoria)
    worker = programs.cloud(config, name="cloud-a")
    with MqttProbe("127.0.0.1", mosquitto.port, ["fl-cloud/+/health"]) as probe:
        worker.start()
        probe.wait_for(lambda ms: _health(probe).get("broker") == "connected", 20)
        victoria.stop()
        sent = _publish_fleet(mosquitto.port)
        probe.wait_for(lambda ms: (_health(probe).get("spool") or {}).get("spooled", 0) >= sent, 30)
        worker.kill()
        victoria.start()
        programs.cloud(config, name="cloud-a-again").start()
        probe.wait_for(lambda ms: (_health(probe).get("spool") or {}).get("drained", 0) >= sent, 40)
    _all_stored_once(victoria, sent)
