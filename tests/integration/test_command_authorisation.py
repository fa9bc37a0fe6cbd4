"""Who may have the gateway write to a device: ``[commands] allow_from`` and ``local_users``.

A real gateway polls boiler-1 on the simulator; commands come from the cloud broker
(mosquitto, through the uplink) and from clients of the local broker. A refused command
gets a result saying why, is not written (the device's write counter says so), and the
log names who asked, as it does for every write carried out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt import publish
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from fieldlink.broker_auth import set_password
from tests.integration.fleet import (
    GATEWAY,
    SITE,
    gateway_toml,
    modbus_source,
    sim_toml,
    wait_local_health,
    with_keys,
)
from tests.rig import LOOPBACK, Mosquitto, MqttProbe, ProbeMessage, free_port
from tests.rig.programs import Program, Programs

pytestmark = pytest.mark.timeout(90)

BASE = f"fl/{SITE}/{GATEWAY}"
COMMAND = f"{BASE}/dev/boiler-1/cmd"
RESULT = f"{COMMAND}/result"
PASSWORDS = {"hmi": "panel-2 secret", "viewer": "look only"}


class LoginProbe(MqttProbe):
    """The rig's probe, logged in (it connects anonymously otherwise)."""

    def __init__(self, port: int, topics: list[str], user: str, password: str) -> None:
        super().__init__(LOOPBACK, port, topics)
        self._client.username_pw_set(user, password)


def start(
    programs: Programs, mosquitto: Mosquitto, tmp_path: Path, extra: str = "", local: str = ""
) -> tuple[int, Program]:
    """Simulator and gateway (boiler-1's `count` writable); returns the local port once the uplink is up."""
    modbus_port, local_port = free_port(), free_port()
    programs.simulator(sim_toml(modbus_port)).start().wait_port(modbus_port)
    source = modbus_source("line", modbus_port).replace(
        '{ name = "count", address = 3, type = "uint16" }',
        '{ name = "count", address = 3, type = "uint16", writable = true }',
    )
    config = gateway_toml(tmp_path / "gateway", local_port, mosquitto.url, source)
    if local:
        config = with_keys(config, "local_broker", local)
    with MqttProbe(LOOPBACK, mosquitto.port, [f"{BASE}/status"]) as cloud_side:
        gateway = programs.gateway(config + extra).start()
        gateway.wait_port(local_port)
        # The uplink subscribes to commands before it says online: cloud commands arrive from here on.
        cloud_side.wait_for(lambda ms: any(json.loads(m.payload)["state"] == "online" for m in ms), timeout=20)
    return local_port, gateway


def connect_as(port: int, user: str, password: str, client_id: str) -> ReasonCode:
    """The local broker's answer to one CONNECT."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.username_pw_set(user, password)
    answers: list[ReasonCode] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: answers.append(reason)
    client.connect(LOOPBACK, port)
    deadline = time.monotonic() + 10
    while not answers and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    client.disconnect()
    assert answers, "no CONNACK within 10 s"
    return answers[0]


def results(messages: list[ProbeMessage]) -> dict[str, dict[str, Any]]:
    return {json.loads(m.payload)["id"]: json.loads(m.payload) for m in messages if m.topic == RESULT}


def command(command_id: str, value: int) -> str:
    return json.dumps({"id": command_id, "op": "write", "tag": "count", "value": value})


def boiler_writes(health: dict[str, Any]) -> int:
    return health["sources"]["line"]["devices"]["boiler-1"]["writes"]


def test_by_default_only_the_cloud_commands(programs: Programs, mosquitto: Mosquitto, tmp_path: Path) -> None:
    local_port, gateway = start(programs, mosquitto, tmp_path)
    with MqttProbe(LOOPBACK, local_port, [RESULT]) as local_side:
        publish.single(COMMAND, command("c-local", 100), qos=1, hostname=LOOPBACK, port=local_port, client_id="hmi-7")
        publish.single(COMMAND, command("c-cloud", 321), qos=1, hostname=LOOPBACK, port=mosquitto.port)
        done = results(local_side.wait_for(lambda ms: len(results(ms)) == 2, timeout=20))
    assert (done["c-local"]["status"], done["c-local"]["reason"]) == ("error", "commands from local are not allowed")
    assert done["c-cloud"]["status"] == "ok"
    health = wait_local_health(local_port, lambda h: h["commands"]["refused"] == 1)
    assert health["commands"] == {"executed": 1, "failed": 1, "refused": 1}
    assert boiler_writes(health) == 1  # the refused one never reached the device

    assert gateway.stop() == 0
    log = gateway.log()
    assert (
        'msg="command refused" id=c-local origin=local:hmi-7 user=- device=boiler-1 tag=count value=100 '
        'reason="commands from local are not allowed"'
    ) in log
    assert 'msg="device write" id=c-cloud origin=cloud user=- device=boiler-1 tag=count value=321 status=ok' in log


def test_local_commands_from_listed_users_only(programs: Programs, mosquitto: Mosquitto, tmp_path: Path) -> None:
    users = tmp_path / "local-users"
    for user, password in PASSWORDS.items():
        set_password(users, user, password)
    allow_local = '\n[commands]\nallow_from = ["local"]\nlocal_users = ["hmi"]\n'
    local_port, gateway = start(programs, mosquitto, tmp_path, allow_local, local=f'users_file = "{users}"')

    def local_command(command_id: str, value: int, user: str) -> None:
        auth = {"username": user, "password": PASSWORDS[user]}
        payload = command(command_id, value)
        publish.single(COMMAND, payload, qos=1, hostname=LOOPBACK, port=local_port, client_id=f"{user}-1", auth=auth)

    with LoginProbe(local_port, [RESULT], "viewer", PASSWORDS["viewer"]) as local_side:
        local_command("c-hmi", 111, "hmi")
        local_command("c-viewer", 222, "viewer")
        publish.single(COMMAND, command("c-cloud", 333), qos=1, hostname=LOOPBACK, port=mosquitto.port)
        # A CONNECT with the id of viewer's live connection, claiming to be hmi with a wrong
        # password, is refused and leaves that connection viewer's (in amqtt alone, the user
        # name of the refused CONNECT became the one the gateway saw for that client id).
        viewer_id = local_side.client_id
        refused = connect_as(local_port, "hmi", "wrong", viewer_id)
        assert refused.is_failure
        sneaky = local_side._client.publish(COMMAND, command("c-sneaky", 444), qos=1)
        sneaky.wait_for_publish(10)
        done = results(local_side.wait_for(lambda ms: len(results(ms)) == 4, timeout=20))
    assert done["c-sneaky"]["reason"] == "commands from local user 'viewer' are not allowed"
    assert done["c-hmi"]["status"] == "ok"
    assert done["c-viewer"]["reason"] == "commands from local user 'viewer' are not allowed"
    assert done["c-cloud"]["reason"] == "commands from cloud are not allowed"
    assert done["c-viewer"]["status"] == done["c-cloud"]["status"] == "error"
    with LoginProbe(local_port, [f"{BASE}/health"], "viewer", PASSWORDS["viewer"]) as watcher:
        reports = watcher.wait_for(lambda ms: any(json.loads(m.payload)["commands"]["refused"] == 3 for m in ms))
    health = json.loads(reports[-1].payload)
    assert health["commands"] == {"executed": 1, "failed": 3, "refused": 3}
    assert boiler_writes(health) == 1

    assert gateway.stop() == 0
    log = gateway.log()
    who = "origin=local:hmi-1 user=hmi device=boiler-1 tag=count value=111 status=ok"
    assert f'msg="device write" id=c-hmi {who}' in log
    assert 'msg="command refused" id=c-viewer origin=local:viewer-1 user=viewer device=boiler-1' in log
    assert 'msg="command refused" id=c-cloud origin=cloud user=- device=boiler-1' in log
    assert f'msg="command refused" id=c-sneaky origin=local:{viewer_id} user=viewer device=boiler-1' in log
