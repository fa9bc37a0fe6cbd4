"""Topic routing across the uplink: a tenant prefix on a shared cloud broker; commands from
the cloud carried out on the gateway's own Modbus devices (results up again), or relayed to
the local broker for devices the gateway does not own."""

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
    source = modbus_source("line", modbus_port).replace(
        '{ name = "count", address = 3, type = "uint16" }',
        '{ name = "count", address = 3, type = "uint16", writable = true }',
    )
    gateway_config = gateway_toml(gateway_state, local_port, mosquitto.url, source)
    gateway_config += '\n[commands]\nallow_from = ["cloud", "local"]\n'  # a local HMI commands below too
    gateway = programs.gateway(gateway_config.replace("[uplink]\n", f'[uplink]\ntopic_prefix = "{PREFIX}/"\n'))
    cloud_config = cloud_toml(tmp_path / "cloud", mosquitto.url, SQLITE_STORE)
    cloud = programs.cloud(cloud_config.replace("[broker]\n", f'[broker]\ntopic_prefix = "{PREFIX}"\n'))
    base = f"fl/{SITE}/{GATEWAY}"
    command_topic = f"{base}/dev/lab-pump/cmd"  # a device of a local application, not of a gateway source
    command = json.dumps({"id": "c-1", "op": "write", "tag": "setpoint", "value": 71.5}).encode()
    modbus_command_topic = f"{base}/dev/boiler-1/cmd"

    def unprefixed(messages: list[ProbeMessage]) -> list[ProbeMessage]:
        inside = [m for m in messages if m.topic.startswith(f"{PREFIX}/")]
        return [m._replace(topic=m.topic.removeprefix(f"{PREFIX}/")) for m in inside]

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

        # A command for a device of the gateway's own Modbus source is carried out by the gateway.
        def results(messages: list[ProbeMessage]) -> dict[str, dict]:
            topic = f"{PREFIX}/{modbus_command_topic}/result"
            return {json.loads(m.payload)["id"]: json.loads(m.payload) for m in messages if m.topic == topic}

        for body in (
            {"id": "c-2", "op": "write", "tag": "count", "value": 321},
            {"id": "c-3", "op": "write", "tag": "temperature", "value": 1.0},
            {"id": "c-4", "tag": "count"},
        ):
            payload = json.dumps(body).encode()
            publish.single(
                f"{PREFIX}/{modbus_command_topic}", payload, qos=1, hostname="127.0.0.1", port=mosquitto.port
            )
        done = results(cloud_side.wait_for(lambda ms: len(results(ms)) == 3, timeout=15))
        assert done["c-2"]["status"] == "ok"
        assert (done["c-2"]["device"], done["c-2"]["tag"], done["c-2"]["value"]) == ("boiler-1", "count", 321)
        assert done["c-3"]["status"] == "error"
        assert done["c-3"]["reason"] == (
            "tag 'temperature' of device 'boiler-1' is not writable (writable = true in the config)"
        )
        assert (done["c-4"]["status"], done["c-4"]["reason"]) == ("error", "bad command: command needs a value")
        # A local client (an HMI on the plant network) may command the same devices.
        with MqttProbe("127.0.0.1", local_port, [f"{modbus_command_topic}/result"]) as local_side:
            local = json.dumps({"id": "hmi-1", "tag": "count", "value": 322}).encode()
            publish.single(modbus_command_topic, local, qos=1, hostname="127.0.0.1", port=local_port)
            (answer,) = local_side.wait_for(1, timeout=15)
            assert json.loads(answer.payload)["status"] == "ok"
        cloud_side.wait_for(lambda ms: "hmi-1" in results(ms), timeout=15)

        # The written value is read back and sent up with the next poll.
        cloud_side.wait_for(
            lambda ms: any(
                r.device == "boiler-1" and "count" in r.values and r.values["count"].value == 322
                for r in wire_records(unprefixed(ms)).values()
            ),
            timeout=15,
        )
        assert gateway.stop() == 0
        expected = produced(gateway_state)
        assert expected

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
