"""Secrets from the environment and from files (systemd credentials style) reach the brokers and
the store, and no log line of a full run contains them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.fleet import gateway_toml, influx_store, modbus_source, sim_toml
from tests.rig import Mosquitto, MqttProbe, VictoriaMetrics, free_port
from tests.rig.programs import Programs

# Test credentials, made up for this run.
GATEWAY_PASSWORD = "gw-Pa55-from-a-file"  # noqa: S105
CLOUD_PASSWORD = "cloud-Pa55-from-the-env"  # noqa: S105
INFLUX_TOKEN = "influx-t0ken-from-a-file"  # noqa: S105


def test_secrets_from_files_and_environment_never_reach_a_log(
    programs: Programs, victoria: VictoriaMetrics, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = Mosquitto(tmp_path / "auth-mosquitto", users={"gw": GATEWAY_PASSWORD, "cloud": CLOUD_PASSWORD})
    broker.start()
    try:
        credentials = tmp_path / "credentials"
        credentials.mkdir()
        (credentials / "uplink").write_text(GATEWAY_PASSWORD + "\n")
        (credentials / "influx").write_text(INFLUX_TOKEN)
        monkeypatch.setenv("FIELDLINK_CLOUD_PASSWORD", CLOUD_PASSWORD)

        token_file = f'token_file = "{credentials / "influx"}"'
        store = influx_store(victoria.url).replace('token = "${TEST_INFLUX_TOKEN:-not-a-secret}"', token_file)
        assert token_file in store
        cloud_config = f"""
[cloud]
name = "cloud-t"
state_dir = "{tmp_path / "cloud"}"
health_interval = "250ms"
[broker]
url = "{broker.url}"
username = "cloud"
password = "${{FIELDLINK_CLOUD_PASSWORD}}"
{store}
[logging]
level = "debug"
"""
        cloud = programs.cloud(cloud_config).start()
        modbus_port, local_port = free_port(), free_port()
        programs.simulator(sim_toml(modbus_port)).start().wait_port(modbus_port)
        config = gateway_toml(tmp_path / "gw", local_port, broker.url, modbus_source("line", modbus_port, "100ms"))
        config = config.replace(
            "[uplink]\n", f'[uplink]\nusername = "gw"\npassword_file = "{credentials / "uplink"}"\n'
        )
        gateway = programs.gateway(config + '[logging]\nlevel = "debug"\n').start()
        gateway.wait_port(local_port)

        # Everything flows: the passwords and the token were right.
        victoria.wait_for_samples('{__name__="fieldlink_pressure"}', 5, timeout=30)
        with MqttProbe("127.0.0.1", local_port, ["fl/+/+/health"]) as probe:
            report = json.loads(probe.wait_for(1, timeout=15)[0].payload)
            assert report["uplink"]["state"] == "connected"
        assert gateway.stop() == 0
        assert cloud.stop() == 0
    finally:
        broker.stop()

    logs = {path.name: path.read_text(errors="replace") for path in (programs.workdir / "logs").glob("*.log")}
    assert {"gateway.log", "cloud.log"} <= set(logs)
    for name, text in logs.items():
        for secret in (GATEWAY_PASSWORD, CLOUD_PASSWORD, INFLUX_TOKEN):
            assert secret not in text, f"{secret!r} in {name}"
    assert "uplink connected" in logs["gateway.log"]
    assert "msg=subscribed" in logs["cloud.log"]
