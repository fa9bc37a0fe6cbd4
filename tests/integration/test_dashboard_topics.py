"""Dashboard topics for states: gateways' and devices' online/offline (with reasons) and a
per-site summary, retained; and the embedded broker's MQTT-over-WebSocket listener that a
browser dashboard subscribes through."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import paho.mqtt.publish as mqtt_publish

from fieldlink.wire import encode_state
from tests.integration.fleet import SQLITE_STORE, cloud_toml
from tests.rig import Mosquitto, MqttProbe, free_port
from tests.rig.programs import Programs

STATES = {
    "fl/plant-a/gw-1/status": encode_state("online", 1_700_000_000_000),
    "fl/plant-a/gw-1/dev/boiler-1/status": encode_state("online", 1_700_000_000_100),
    "fl/plant-a/gw-1/dev/pump-2/status": encode_state("degraded", 1_700_000_000_200, "3 polls in a row failed"),
    "fl/plant-a/gw-2/status": encode_state("offline", None, "connection lost"),
}


def _latest(messages: list, topic: str) -> dict:
    found = [json.loads(m.payload) for m in messages if m.topic == topic]
    return found[-1] if found else {}


def test_states_and_site_summary_are_retained_dashboard_topics(
    programs: Programs, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    for topic, payload in STATES.items():  # retained before the cloud starts, as gateways leave them
        mqtt_publish.single(topic, payload, qos=1, retain=True, hostname="127.0.0.1", port=mosquitto.port)
    cloud = programs.cloud(cloud_toml(tmp_path / "cloud", mosquitto.url, SQLITE_STORE)).start()
    with MqttProbe("127.0.0.1", mosquitto.port, ["dash/#"]) as probe:
        probe.wait_for(lambda ms: _latest(ms, "dash/plant-a/summary").get("devices_total") == 2, 20)
        summary = _latest(probe.messages, "dash/plant-a/summary")
        assert summary["gateways"] == {"gw-1": "online", "gw-2": "offline"}
        assert summary["devices"] == {"gw-1/boiler-1": "online", "gw-1/pump-2": "degraded"}
        assert (summary["devices_online"], summary["gateways_online"]) == (1, 1)
        pump = _latest(probe.messages, "dash/plant-a/gw-1/pump-2/status")
        assert pump == {
            "site": "plant-a",
            "gateway": "gw-1",
            "device": "pump-2",
            "state": "degraded",
            "ts": 1_700_000_000_200,
            "reason": "3 polls in a row failed",
            "time": "2023-11-14T22:13:20.200Z",
        }
        assert _latest(probe.messages, "dash/plant-a/gw-2/status")["reason"] == "connection lost"
    # Retained: a dashboard that subscribes later gets them at once.
    with MqttProbe("127.0.0.1", mosquitto.port, ["dash/+/+/status", "dash/+/summary"]) as late:
        late.wait_for(lambda ms: len({m.topic for m in ms}) == 3, 10)
        assert all(m.retain for m in late.messages)
    assert cloud.stop() == 0


def test_a_browser_dashboard_subscribes_over_websocket(programs: Programs, tmp_path: Path) -> None:
    tcp_port, ws_port = free_port(), free_port()
    config = f"""
[cloud]
name = "cloud-t"
state_dir = "{tmp_path / "cloud"}"
health_interval = "250ms"
[broker]
embedded = true
bind = "127.0.0.1:{tcp_port}"
ws_bind = "127.0.0.1:{ws_port}"
[store]
kind = "sqlite"
"""
    cloud = programs.cloud(config).start()
    cloud.wait_port(ws_port)
    got: list[mqtt.MQTTMessage] = []
    subscribed, arrived = threading.Event(), threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="browser", transport="websockets")
    client.on_connect = lambda c, *_: c.subscribe("dash/#", qos=0)
    client.on_subscribe = lambda *_: subscribed.set()

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        got.append(message)
        if message.topic == "dash/plant-a/gw-1/status":
            arrived.set()

    client.on_message = on_message
    client.connect("127.0.0.1", ws_port)
    client.loop_start()
    try:
        assert subscribed.wait(10)
        mqtt_publish.single("fl/plant-a/gw-1/status", STATES["fl/plant-a/gw-1/status"], qos=1, port=tcp_port)
        assert arrived.wait(15)
        status = json.loads(next(m.payload for m in got if m.topic == "dash/plant-a/gw-1/status"))
        assert (status["gateway"], status["state"]) == ("gw-1", "online")
    finally:
        client.loop_stop()
        client.disconnect()
    assert cloud.stop() == 0
