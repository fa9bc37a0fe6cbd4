"""Configs of a small test fleet, and readers of what the programs left on disk.

boiler-1 has one register of each kind the skeleton decodes, with known constants
where a test asserts exact values, and a temperature ramp that crosses the alert
threshold (80) about two seconds after the simulator starts and wraps back below
the clear level (78) three seconds later.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fieldlink.wire import Record, Topic, TopicKind, WireError, decode
from gateway.buffer.sqlite_store import produced_records
from tests.rig import LOOPBACK, MqttProbe, ProbeMessage
from tests.rig.programs import BIN

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


def _modbus_connection(name: str, port: int) -> str:
    """The [[sources]] header of a Modbus TCP source on the simulator: short timeouts and retries."""
    return f"""
[[sources]]
kind = "modbus_tcp"
name = "{name}"
host = "127.0.0.1"
port = {port}
timeout = "500ms"
retry_min = "200ms"
retry_max = "1s"
"""


def modbus_source(name: str, port: int, poll: str = "250ms") -> str:
    return (
        _modbus_connection(name, port)
        + f"""  [[sources.devices]]
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
    )


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


def email_notifier(smtp_port: int) -> str:
    """The `ops` mail receiver, pointing at an aiosmtpd sink."""
    return f"""
[[notifiers]]
kind = "email"
name = "ops"
host = "127.0.0.1"
port = {smtp_port}
timeout = "2s"
from = "fieldlink@test.invalid"
to = ["ops@test.invalid"]
"""


def cloud_toml(state_dir: Path, broker_url: str, store: str, smtp_port: int | None = None) -> str:
    mail = ""
    if smtp_port is not None:
        mail = (
            email_notifier(smtp_port)
            + """
[[rules]]
name = "boiler-overheat"
metric = "temperature"
devices = "boiler-*"
above = 80.0
clear = 78.0
severity = "critical"
notify = ["ops"]

[alerting.routing]
group_interval = "0s"  # every transition in its own mail, at once
"""
        )
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


# --- fault tests (test_store_and_forward.py, tests/chaos.py) ------------------------------

# Devices of the fault tests: each one a counter register that climbs one unit per second
# and a constant, so every poll is a record and a record's values are easy to check.
FAULT_DEVICES = ("pump-1", "pump-2", "pump-3", "pump-4")
HEALTH_TOPIC = f"fl/{SITE}/{GATEWAY}/health"
CLOUD_HEALTH_TOPIC = "fl-cloud/cloud-t/health"


def counter_sim_toml(port: int, devices: tuple[str, ...] = FAULT_DEVICES) -> str:
    """One Modbus TCP server with the given devices (unit ids 1, 2, ...)."""
    units = "".join(
        f"""
  [[servers.devices]]
  unit = {unit}
  name = "{name}"
    [[servers.devices.registers]]
    address = 0
    type = "float32"
    signal = {{ kind = "ramp", start = {unit * 1000}, slope = 1.0 }}
    [[servers.devices.registers]]
    address = 2
    type = "uint16"
    signal = {{ kind = "constant", value = {unit} }}
"""
        for unit, name in enumerate(devices, start=1)
    )
    return f"""
seed = 5
[[servers]]
name = "pumps"
port = {port}
{units}"""


def counter_source(name: str, port: int, poll: str = "50ms", devices: tuple[str, ...] = FAULT_DEVICES) -> str:
    """A modbus_tcp source polling every device of `counter_sim_toml` every `poll`."""
    units = "".join(
        f"""
  [[sources.devices]]
  name = "{device}"
  unit = {unit}
  poll_interval = "{poll}"
  registers = [
    {{ name = "counter", address = 0, type = "float32" }},
    {{ name = "unit", address = 2, type = "uint16" }},
  ]
"""
        for unit, device in enumerate(devices, start=1)
    )
    return _modbus_connection(name, port) + units


def with_keys(config_text: str, section: str, keys: str) -> str:
    """`config_text` with `keys` (TOML lines) added to its `[section]` table, which must exist."""
    header = f"\n[{section}]\n"
    if header not in config_text:
        raise ValueError(f"no [{section}] table in the config")
    return config_text.replace(header, f"{header}{keys.strip()}\n", 1)


def wire_record_counts(messages: list[ProbeMessage]) -> Counter[tuple[str, int]]:
    """How often each (device, seq) came by on the wire, in records and batch envelopes alike."""
    counts: Counter[tuple[str, int]] = Counter()
    for message in messages:
        try:
            parsed = Topic.parse(message.topic)
        except WireError:
            continue
        if parsed.kind in (TopicKind.TELEMETRY, TopicKind.BATCH):
            counts.update((record.device, record.seq) for record in decode(message.payload))
    return counts


def duplicates(counts: Counter[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """The (device, seq) that came more than once, with how often."""
    return {key: n for key, n in sorted(counts.items()) if n > 1}


def health_reports(messages: list[ProbeMessage]) -> list[dict[str, Any]]:
    """The JSON health reports among `messages` (gateway or cloud), in arrival order."""
    return [json.loads(m.payload) for m in messages if m.topic.endswith("/health")]


def cloud_ready(probe: MqttProbe, timeout: float = 20.0) -> None:
    """Wait until the cloud is subscribed: it publishes its health only then. `probe` listens on fl-cloud/#."""
    probe.wait_for(lambda msgs: any(m.topic == CLOUD_HEALTH_TOPIC for m in msgs), timeout=timeout)


def wait_local_health(
    local_port: int, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0
) -> dict[str, Any]:
    """The first gateway health report (on its local broker) for which `predicate` holds.

    Connects again while the local broker is away (a gateway restarting, or reloading
    its config, takes its embedded broker down for a moment).
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no gateway health report on port {local_port} matched within {timeout:.0f} s")
        try:
            with MqttProbe(LOOPBACK, local_port, [HEALTH_TOPIC]) as local:
                messages = local.wait_for(lambda ms: any(predicate(h) for h in health_reports(ms)), remaining)
                return next(h for h in health_reports(messages) if predicate(h))
        except (OSError, TimeoutError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)  # the local broker is restarting: try again (bounded by the deadline)


def cloud_rows(cloud_config: Path) -> list[dict[str, Any]]:
    """Every point of the cloud's embedded SQLite store, through `fieldlink-cloud query --json`."""
    out = subprocess.run(
        [str(BIN / "fieldlink-cloud"), "query", "--config", str(cloud_config), "--json", "--limit", "100000000"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if out.returncode == 1 and "no store at" in out.stderr:
        return []
    if out.returncode != 0:
        raise RuntimeError(f"fieldlink-cloud query failed ({out.returncode}): {out.stderr}")
    return [json.loads(line) for line in out.stdout.splitlines()]
