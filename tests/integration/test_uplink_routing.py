"""Topic routing across the uplink: a tenant prefix on a shared cloud broker, commands
relayed from the cloud down to the gateway's local broker, command results up again."""

from __future__ import annotations

import json
from pathlib import Path

from paho.mqtt import publish

from fieldlink.wire import decode_state
from tests.integration.fleet import (
    GATEWAY,
    SITE,
    SQLITE_STORE,
    cloud_toml,
    gateway_toml,
    modbus_source,
    produced,
    sim_toml,
    wire_records,
)
from tests.rig import Mosquitto, MqttProbe, ProbeMessage, free_port
from tests.rig.programs import Programs

PREFIX = "tenant-a"


def test_a_topic_prefix_namespaces_everything_and_commands_travel_down_and_results_up(
    programs: Programs, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    modbus_port, local_port = free_port(), free_port()
    programs.simulator(sim_toml(modbus_port)).start().wait_port(modbus_port)
    gateway_state = tmp_path / "gateway"
    gateway_config = gateway_toml(gateway_state, local_port, mosquitto.url, modbus_source("line", modbus_port))
    gateway = programs.gateway(gateway_config.replace("[uplink]\n", f'[uplink]\ntopic_prefix = "{PREFIX}/"\n'))
    cloud_config = cloud_toml(tmp_path / "cloud", mosquitto.url, SQLITE_STORE)
    cloud = programs.cloud(cloud_config.replace("[broker]\n", f'[broker]\ntopic_prefix = "{PREFIX}"\n'))
    base = f"fl/{SITE}/{GATEWAY}"
    command_topic = f"{base}/dev/boiler-1/cmd"
    command = json.dumps({"id": "c-1", "op": "write", "tag": "setpoint", "value": 71.5}).encode()

    with MqttProbe("127.0.0.1", mosquitto.port, ["#", "fl-cloud/#"]) as cloud_side:
        cloud.start()
        cloud_side.wait_for(lambda ms: any(m.topic == "fl-cloud/cloud-t/health" for m in ms), timeout=20)
        gateway.start().wait_port(local_port)
        status_topic = f"{PREFIX}/{base}/status"
        status = cloud_side.wait_for(lambda ms: any(m.topic == status_topic for m in ms), timeout=20)
        assert decode_state(next(m for m in status if m.topic == status_topic).payload)["state"] == "online"

        with MqttProbe("127.0.0.1", local_port, [command_topic]) as device_side:
            # Down: the cloud publishes under the tenant prefix; the device side sees the plain topic.
            publish.single(f"{PREFIX}/{command_topic}", command, qos=1, hostname="127.0.0.1", port=mosquitto.port)
            (relayed,) = device_side.wait_for(1, timeout=15)
            assert (relayed.topic, relayed.payload) == (command_topic, command)

        # Up: a device-side result goes through the buffer as a control message.
        result = json.dumps({"id": "c-1", "status": "ok"}).encode()
        publish.single(f"{command_topic}/result", result, qos=1, hostname="127.0.0.1", port=local_port)
        cloud_side.wait_for(
            lambda ms: any(m.topic == f"{PREFIX}/{command_topic}/result" and m.payload == result for m in ms),
            timeout=15,
        )
        assert gateway.stop() == 0
        expected = produced(gateway_state)
        assert expected

        def unprefixed(messages: list[ProbeMessage]) -> list[ProbeMessage]:
            inside = [m for m in messages if m.topic.startswith(f"{PREFIX}/")]
            return [m._replace(topic=m.topic.removeprefix(f"{PREFIX}/")) for m in inside]

        cloud_side.wait_for(lambda ms: expected <= set(wire_records(unprefixed(ms))), timeout=15)
        # Nothing of ours leaked outside the namespace.
        assert not [m.topic for m in cloud_side.messages if m.topic.startswith("fl/")]
        cloud_side.wait_for(
            lambda ms: any(
                m.topic == "fl-cloud/cloud-t/health" and json.loads(m.payload)["records"] >= len(expected) for m in ms
            ),
            timeout=15,
        )
    assert cloud.stop() == 0
    health = json.loads((tmp_path / "cloud" / "last-health.json").read_text())
    assert health["bad_messages"] == 0
    assert health["records_stored"] + health["duplicates_dropped"] >= len(expected)
