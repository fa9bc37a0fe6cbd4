"""Configs of a small test fleet, and readers of what the programs left on disk.

boiler-1 has one register of each kind the skeleton decodes, with known constants
where a test asserts exact values, and a temperature ramp that crosses the alert
threshold (80) about two seconds after the simulator starts and wraps back below
the clear level (78) three seconds later.
"""

from __future__ import annotations

from pathlib import Path

from fieldlink.wire import Record, Topic, TopicKind, WireError, decode
from gateway.buffer.sqlite_store import produced_records
from tests.rig import ProbeMessage

SITE = "plant-t"
GATEWAY = "gw-t"
# What the gateway sends the cloud broker: single records and batch envelopes.
CLOUD_DATA_TOPICS = [f"fl/{SITE}/{GATEWAY}/dev/+/telemetry", f"fl/{SITE}/{GATEWAY}/batch"]
PRESSURE = 1.25  # int16 125 with scale 0.01: exact after rounding
COUNT = 42  # uint16 without scale: stays an integer field


def sim_toml(port: int) -> str:
    return f"""
seed = 3
[[servers]]
name = "line"
port = {port}
  [[servers.devices]]
  unit = 1
  name = "boiler-1"
    [[servers.devices.registers]]
    address = 0
    type = "float32"
    signal = {{ kind = "ramp", start = 70.0, slope = 5.0, min = 70.0, max = 95.0 }}
    [[servers.devices.registers]]
    address = 2
    type = "int16"
    scale = 0.01
    signal = {{ kind = "constant", value = {PRESSURE} }}
    [[servers.devices.registers]]
    address = 3
    type = "uint16"
    signal = {{ kind = "constant", value = {COUNT} }}
  [[servers.devices]]
  unit = 2
  name = "meter-1"
    [[servers.devices.registers]]
    address = 0
    table = "input"
    type = "float32"
    signal = {{ kind = "sine", offset = 40.0, amplitude = 5.0, period = "10s" }}
"""


def modbus_source(name: str, port: int, poll: str = "250ms") -> str:
    return f"""
[[sources]]
kind = "modbus_tcp"
name = "{name}"
host = "127.0.0.1"
port = {port}
timeout = "500ms"
retry_min = "200ms"
retry_max = "1s"
  [[sources.devices]]
  name = "boiler-1"
  unit = 1
  poll_interval = "{poll}"
  registers = [
    {{ name = "temperature", address = 0, type = "float32", unit = "degC" }},
    {{ name = "pressure", address = 2, type = "int16", scale = 0.01, unit = "bar" }},
    {{ name = "count", address = 3, type = "uint16" }},
  ]
  [[sources.devices]]
  name = "meter-1"
  unit = 2
  poll_interval = "{poll}"
  registers = [{{ name = "power", address = 0, table = "input", type = "float32", unit = "kW" }}]
"""


def gateway_toml(state_dir: Path, local_port: int, uplink_url: str, sources: str, encoding: str = "msgpack") -> str:
    return f"""
[gateway]
site = "{SITE}"
id = "{GATEWAY}"
state_dir = "{state_dir}"
health_interval = "250ms"
drain_timeout = "10s"
[local_broker]
bind = "127.0.0.1:{local_port}"
[uplink]
url = "{uplink_url}"
encoding = "{encoding}"
reconnect_min = "100ms"
reconnect_max = "500ms"
{sources}
"""


def cloud_toml(state_dir: Path, broker_url: str, store: str, smtp_port: int | None = None) -> str:
    mail = ""
    if smtp_port is not None:
        mail = f"""
[[notifiers]]
kind = "email"
name = "ops"
host = "127.0.0.1"
port = {smtp_port}
timeout = "2s"
from = "fieldlink@test.invalid"
to = ["ops@test.invalid"]

[[rules]]
name = "boiler-overheat"
metric = "temperature"
devices = "boiler-*"
above = 80.0
clear = 78.0
severity = "critical"
notify = ["ops"]
"""
    return f"""
[cloud]
name = "cloud-t"
state_dir = "{state_dir}"
health_interval = "250ms"
[broker]
url = "{broker_url}"
{store}
{mail}
"""


def influx_store(url: str) -> str:
    return f"""
[store]
kind = "influxdb"
url = "{url}"
org = "test"
bucket = "fieldlink"
token = "${{TEST_INFLUX_TOKEN:-not-a-secret}}"
"""


SQLITE_STORE = """
[store]
kind = "sqlite"
"""


def produced(gateway_state: Path) -> set[tuple[str, int]]:
    """Every (device, seq) the gateway handed out, from its buffer's sequence table."""
    return produced_records(gateway_state / "buffer.db")


def wire_records(messages: list[ProbeMessage]) -> dict[tuple[str, int], Record]:
    """Telemetry records seen on the wire by a probe, keyed by (device, seq)."""
    records: dict[tuple[str, int], Record] = {}
    for message in messages:
        try:
            parsed = Topic.parse(message.topic)
        except WireError:
            continue
        if parsed.kind in (TopicKind.TELEMETRY, TopicKind.BATCH):
            for record in decode(message.payload):
                records[(record.device, record.seq)] = record
    return records
