"""One simulated plant from a TOML scenario, read by the gateway as processes talk in the field.

firmware-sim runs a Modbus TCP PLC, an RS-485 bus (Modbus RTU on a pty pair: the
gateway opens the other end as its serial port) and an NMEA weather sensor on a
serial pty; the gateway reads all three kinds of source from one config and
publishes every device's readings and states, with per-device counters on its
health topic.
"""

from __future__ import annotations

import json
from pathlib import Path

from fieldlink.wire import decode, decode_state
from tests.integration.fleet import GATEWAY, SITE, gateway_toml, health_reports
from tests.rig import Mosquitto, MqttProbe, free_port
from tests.rig.programs import Programs

SCENARIO = """
seed = 7
serial_dir = "{dir}"

[[servers]]
name = "plc"
port = {tcp_port}
  [[servers.devices]]
  unit = 1
    [[servers.devices.registers]]
    address = 0
    type = "float32"
    signal = {{ kind = "sine", offset = 70, amplitude = 5, period = "20s" }}
    [[servers.devices.registers]]
    address = 2
    table = "coil"
    type = "bool"
    signal = {{ kind = "step", values = [0, 1], hold = "1s" }}

[[servers]]
name = "rs485"
transport = "rtu"
serial_port = "{dir}/ttyRS485"
  [[servers.devices]]
  unit = 10
  count = 2
    [[servers.devices.registers]]
    address = 0
    table = "input"
    type = "int16"
    scale = 0.1
    signal = {{ kind = "random_walk", start = 20, step = 0.5, min = 10, max = 30 }}

[[serial_sensors]]
name = "ttyWX"
format = "nmea"
interval = "200ms"
sentences = ["MTW", "MWV"]
"""

SOURCES = """
[[sources]]
kind = "modbus_tcp"
name = "plc"
host = "127.0.0.1"
port = {tcp_port}
  [[sources.devices]]
  name = "oven"
  unit = 1
  poll_interval = "200ms"
  registers = [
    {{ name = "temperature", address = 0, type = "float32", unit = "degC" }},
    {{ name = "door_open", address = 2, table = "coil" }},
  ]

[[sources]]
kind = "modbus_rtu"
name = "rs485"
serial_port = "{dir}/ttyRS485"
baudrate = 19200
parity = "N"
timeout = "300ms"
  [[sources.devices]]
  name = "zone-10"
  unit = 10
  poll_interval = "200ms"
  registers = [{{ name = "temperature", address = 0, table = "input", type = "int16", scale = 0.1, unit = "degC" }}]
  [[sources.devices]]
  name = "zone-11"
  unit = 11
  poll_interval = "200ms"
  registers = [{{ name = "temperature", address = 0, table = "input", type = "int16", scale = 0.1, unit = "degC" }}]

[[sources]]
kind = "serial"
name = "weather"
port = "{dir}/ttyWX"
device = "weather-1"
baudrate = 4800
parser = {{ kind = "nmea" }}
"""

DEVICES = {"oven", "zone-10", "zone-11", "weather-1"}


def test_tcp_rtu_and_serial_sources_from_one_scenario(programs: Programs, mosquitto: Mosquitto, tmp_path: Path) -> None:
    ports = tmp_path / "dev"
    tcp_port, local_port = free_port(), free_port()
    sim = programs.simulator(SCENARIO.format(dir=ports, tcp_port=tcp_port)).start()
    sim.wait_port(tcp_port)
    sources = SOURCES.format(dir=ports, tcp_port=tcp_port)
    gateway = programs.gateway(gateway_toml(tmp_path / "gw", local_port, mosquitto.url, sources))
    base = f"fl/{SITE}/{GATEWAY}"
    with MqttProbe("127.0.0.1", mosquitto.port, [f"{base}/#"]) as cloud:
        gateway.start().wait_port(local_port)

        def telemetry(messages: list) -> dict[str, list]:
            seen: dict[str, list] = {}
            for m in messages:
                if m.topic.endswith("/telemetry") or m.topic.endswith("/batch"):
                    for record in decode(m.payload):
                        seen.setdefault(record.device, []).append(record)
            return seen

        seen = telemetry(cloud.wait_for(lambda ms: all(len(telemetry(ms).get(d, [])) >= 3 for d in DEVICES), 30))
        oven = seen["oven"][-1].values
        assert 65 <= oven["temperature"].value <= 75
        assert oven["temperature"].unit == "degC"
        assert isinstance(oven["door_open"].value, bool)
        for zone in ("zone-10", "zone-11"):
            assert 10 <= seen[zone][-1].values["temperature"].value <= 30
        weather = {name for record in seen["weather-1"] for name in record.values}
        assert {"water_temperature", "wind_angle"} <= weather, weather

        def states(messages: list) -> dict[str, str]:
            return {
                m.topic.split("/")[-2]: decode_state(m.payload)["state"]
                for m in messages
                if m.topic.endswith("/status") and "/dev/" in m.topic
            }

        cloud.wait_for(lambda ms: states(ms) == dict.fromkeys(DEVICES, "online"), 15)

        def health(messages: list) -> dict:
            reports = health_reports([m for m in messages if m.topic == f"{base}/health"])
            return reports[-1] if reports else {}

        report = health(cloud.wait_for(lambda ms: health(ms).get("sources", {}).get("rs485"), 15))
        rtu = report["sources"]["rs485"]["devices"]["zone-10"]
        assert rtu["responses"] >= 1
        assert rtu["latency_ms"]["p50"] is not None
        assert report["sources"]["weather"]["frames"] >= 1
    assert gateway.stop() == 0
    assert sim.stop() == 0
    assert json.loads((tmp_path / "gw" / "last-health.json").read_text())["readings_dropped"] == 0
