"""`fieldlink-gateway status` and `fieldlink-cloud status` against running programs.

A gateway polls the simulator (boiler-1 and meter-1 answer; ghost-3, a unit nobody
serves, does not) and forwards to mosquitto, where a cloud ingests. The status commands
run as subprocesses, as an operator types them, and ask the programs over their control
sockets; once the programs are gone they say so and exit 3.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.fleet import SQLITE_STORE, cloud_toml, gateway_toml, modbus_source, sim_toml, with_keys
from tests.rig import Mosquitto, free_port
from tests.rig.programs import BIN, Programs

pytestmark = pytest.mark.timeout(120)

GHOST = """
  [[sources.devices]]
  name = "ghost-3"
  unit = 9
  poll_interval = "250ms"
  registers = [{ name = "x", address = 0, type = "uint16" }]
"""


# The service has it; the operator's shell, where `status` runs, does not.
SERVICE_ONLY = "FL_STATUS_TEST_CLIENT_ID"


def status(program: str, config: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / program), "status", "--config", str(config), *flags],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={k: v for k, v in os.environ.items() if k != SERVICE_ONLY},
    )


def status_until(
    program: str, config: Path, done: Callable[[str], bool], timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Ask again (each answer is a fresh report) until ``done(stdout)``; fail with the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        answer = status(program, config)
        if answer.returncode == 0 and done(answer.stdout):
            return answer
        if time.monotonic() > deadline:
            pytest.fail(f"{program} status never showed what we wait for:\n{answer.stdout}{answer.stderr}")
        time.sleep(0.3)  # polling an answer, with a deadline


def as_json(program: str, config: Path) -> dict[str, Any]:
    answer = status(program, config, "--json")
    assert answer.returncode == 0, answer.stderr
    return json.loads(answer.stdout)


def test_status_of_a_running_gateway_and_cloud_and_of_stopped_ones(
    programs: Programs, mosquitto: Mosquitto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modbus_port, local_port = free_port(), free_port()
    gateway_state, cloud_state = tmp_path / "gateway", tmp_path / "cloud"
    text = gateway_toml(gateway_state, local_port, mosquitto.url, modbus_source("line", modbus_port) + GHOST)
    # A value from the service's environment: `status` finds the gateway without it.
    gateway_config = programs.config("gateway", with_keys(text, "uplink", f'client_id = "${{{SERVICE_ONLY}}}"'))
    monkeypatch.setenv(SERVICE_ONLY, "gw-status-test")
    cloud_config = programs.config("cloud", cloud_toml(cloud_state, mosquitto.url, SQLITE_STORE))

    # Never started: nothing to ask, no snapshot either.
    never = status("fieldlink-gateway", gateway_config)
    assert never.returncode == 3
    assert f"fieldlink-gateway is not running: no control socket at {gateway_state}/control.sock" in never.stdout
    assert f"no health snapshot at {gateway_state}/last-health.json" in never.stdout

    programs.simulator(sim_toml(modbus_port)).start().wait_port(modbus_port)
    cloud = programs.program("cloud", "fieldlink-cloud", "run", "--config", str(cloud_config)).start()
    gateway = programs.program("gateway", "fieldlink-gateway", "run", "--config", str(gateway_config)).start()
    gateway.wait_port(local_port)

    def gateway_settled(out: str) -> bool:
        return (
            "uplink    connected since" in out
            and re.search(r"^  boiler-1\s+online\s+requests [1-9]", out, re.M) is not None
            and re.search(r"^  ghost-3\s+(degraded|offline)", out, re.M) is not None
        )

    shown = status_until("fieldlink-gateway", gateway_config, gateway_settled).stdout
    assert shown.startswith("gateway plant-t/gw-t   running, pid ")
    assert re.search(r"^  meter-1\s+online", shown, re.M)
    assert re.search(r"^  ghost-3\s+(degraded|offline) .*\n\s+reason: .+", shown, re.M), shown
    assert re.search(r"^buffer    \d+ messages \(\d+ records\), ", shown, re.M)
    assert re.search(r"^local     broker 127\.0\.0\.1:\d+ \(anonymous\)", shown, re.M)
    assert 'msg="device degraded"' in shown or 'msg="device offline"' in shown  # recent problems

    report = as_json("fieldlink-gateway", gateway_config)
    assert gateway.process is not None
    assert report["pid"] == gateway.process.pid
    assert report["uplink"]["state"] == "connected"
    assert report["devices"]["boiler-1"] == "online"
    assert report["device_reasons"]["ghost-3"]
    assert isinstance(report["buffer"]["messages"], int)
    socket_path = gateway_state / "control.sock"
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600  # the service user and root only

    cloud_shown = status_until(
        "fieldlink-cloud", cloud_config, lambda out: re.search(r"store     [1-9]\d* records stored", out) is not None
    ).stdout
    assert cloud_shown.startswith("cloud cloud-t   running, pid ")
    assert "broker    connected" in cloud_shown
    assert "firing" in cloud_shown  # the alerts: a line of their own, or the alerting section
    cloud_report = as_json("fieldlink-cloud", cloud_config)
    assert cloud_report["broker"] == "connected"
    assert cloud_report["records_stored"] > 0

    # Stopped cleanly: not running (exit 3), and when its last health snapshot was written.
    assert gateway.stop() == 0
    stopped = status("fieldlink-gateway", gateway_config)
    assert stopped.returncode == 3
    assert "fieldlink-gateway is not running" in stopped.stdout
    assert re.search(
        rf"last health snapshot: {gateway_state}/last-health\.json, written \d{{4}}-\d\d-\d\dT[\d:]+Z \(\d+s ago\)",
        stopped.stdout,
    ), stopped.stdout
    assert not socket_path.exists()
    assert status("fieldlink-gateway", gateway_config, "--json").returncode == 3

    # Killed: its socket is left behind, and nothing answers on it.
    cloud.kill()
    assert (cloud_state / "control.sock").exists()
    crashed = status("fieldlink-cloud", cloud_config)
    assert crashed.returncode == 3
    assert f"nothing listens on {cloud_state}/control.sock (left behind by a crash)" in crashed.stdout
    # The next start takes the socket over.
    cloud.start()
    status_until("fieldlink-cloud", cloud_config, lambda out: f"pid {cloud.process.pid}," in out)  # type: ignore[union-attr]
    assert os.access(cloud_state / "control.sock", os.F_OK)
