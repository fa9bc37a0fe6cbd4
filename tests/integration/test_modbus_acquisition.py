"""The gateway's Modbus source against firmware-sim, over TCP and RTU on a pty pair.

The source runs in-process with a sink that records readings and device states, so
tests see exactly what the gateway would buffer; the simulator counts the requests
it served. Everything waits on conditions with deadlines, never on sleeps.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fieldlink.wire import Quality
from firmware_sim.config import load_sim_config
from firmware_sim.faults import Fault
from firmware_sim.fleet import SimFleet
from gateway.sources.base import CommandError, DeviceState, Reading
from gateway.sources.modbus.client import BusSpec, DeviceTimeout, ModbusBus
from gateway.sources.modbus.config import ModbusRtuConfig, ModbusRtuTcpConfig, ModbusTcpConfig
from gateway.sources.modbus.source import ModbusSource
from tests.rig import free_port

T = TypeVar("T")


@dataclass
class Collector:
    """A ReadingSink that keeps everything, with monotonic receive times."""

    readings: list[tuple[float, Reading]] = field(default_factory=list)
    states: list[tuple[str, DeviceState, str | None]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def submit_reading(self, reading: Reading) -> None:
        self.readings.append((time.monotonic(), reading))
        self.changed.set()

    async def device_state(self, device: str, state: DeviceState, reason: str | None) -> None:
        self.states.append((device, state, reason))
        self.changed.set()

    def of(self, device: str) -> list[Reading]:
        return [r for _, r in self.readings if r.device == device]

    def state(self, device: str) -> tuple[DeviceState, str | None] | None:
        found = [(s, why) for d, s, why in self.states if d == device]
        return found[-1] if found else None

    async def wait(self, condition: Callable[[], Any], timeout: float = 10) -> Any:
        async with asyncio.timeout(timeout):
            while not (result := condition()):
                self.changed.clear()
                await self.changed.wait()
        return result


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def sim(tmp_path: Path, text: str) -> SimFleet:
    path = tmp_path / "sim.toml"
    path.write_text(text)
    return SimFleet(load_sim_config(path))


@asynccontextmanager
async def polling(config: dict[str, Any], sink: Collector) -> AsyncIterator[ModbusSource]:
    model = ModbusRtuConfig if config["kind"] == "modbus_rtu" else ModbusTcpConfig
    source = ModbusSource(model.model_validate(config))
    task = asyncio.create_task(source.run(sink))
    try:
        yield source
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def tcp(port: int, devices: list[dict[str, Any]], **bus: Any) -> dict[str, Any]:
    return {"kind": "modbus_tcp", "name": "bus", "host": "127.0.0.1", "port": port, "devices": devices, **bus}


# --- values and qualities ------------------------------------------------------------------

TYPES_SIM = """
[[servers]]
name = "plc"
port = {port}
  [[servers.devices]]
  unit = 1
    [[servers.devices.registers]]
    address = 0
    type = "float32"
    signal = {{ kind = "constant", value = 21.5 }}
    [[servers.devices.registers]]
    address = 2
    type = "int16"
    scale = 0.01
    signal = {{ kind = "constant", value = -1.65 }}
    [[servers.devices.registers]]
    address = 3
    type = "uint32"
    byte_order = "CDAB"
    signal = {{ kind = "constant", value = 70000 }}
    [[servers.devices.registers]]
    address = 10
    type = "int64"
    byte_order = "DCBA"
    signal = {{ kind = "constant", value = -5000000000 }}
    [[servers.devices.registers]]
    address = 14
    type = "float64"
    byte_order = "BADC"
    signal = {{ kind = "constant", value = 0.125 }}
    [[servers.devices.registers]]
    address = 20
    type = "bool"
    bit = 3
    signal = {{ kind = "constant", value = 1 }}
    [[servers.devices.registers]]
    address = 5
    table = "coil"
    type = "bool"
    signal = {{ kind = "constant", value = 1 }}
    [[servers.devices.registers]]
    address = 6
    table = "discrete_input"
    type = "bool"
    signal = {{ kind = "constant", value = 0 }}
    [[servers.devices.registers]]
    address = 0
    table = "input"
    type = "uint16"
    signal = {{ kind = "constant", value = 7 }}
"""

TYPES_TAGS = [
    {"name": "temp", "address": 0, "type": "float32", "unit": "degC"},
    {"name": "pressure", "address": 2, "type": "int16", "scale": 0.01},
    {"name": "total", "address": 3, "type": "uint32", "byte_order": "CDAB"},
    {"name": "energy", "address": 10, "type": "int64", "byte_order": "HGFEDCBA"},
    {"name": "ratio", "address": 14, "type": "float64", "byte_order": "BADC"},
    {"name": "running", "address": 20, "type": "bool", "bit": 3},
    {"name": "stopped", "address": 20, "type": "bool", "bit": 4},
    {"name": "pump", "address": 5, "table": "coil"},
    {"name": "door", "address": 6, "table": "discrete_input"},
    {"name": "status", "address": 0, "table": "input", "type": "uint16"},
    {"name": "missing", "address": 300, "type": "uint16"},  # the device does not map it
]


def test_every_table_and_type_over_tcp_with_a_bad_tag_isolated(tmp_path: Path) -> None:
    port = free_port()

    async def scenario() -> None:
        sink = Collector()
        async with sim(tmp_path, TYPES_SIM.format(port=port)) as fleet:
            device = {"name": "plc1", "unit": 1, "poll_interval": "1h", "registers": TYPES_TAGS}
            async with polling(tcp(port, [device]), sink) as source:
                await sink.wait(lambda: sink.of("plc1"))
                values = sink.of("plc1")[0].values
                assert {name: v.value for name, v in values.items()} == {
                    "temp": 21.5,
                    "pressure": -1.65,
                    "total": 70000,
                    "energy": -5000000000,
                    "ratio": 0.125,
                    "running": True,
                    "stopped": False,
                    "pump": True,
                    "door": False,
                    "status": 7,
                    "missing": None,
                }
                assert values["missing"].quality is Quality.BAD
                assert all(v.quality is Quality.GOOD for n, v in values.items() if n != "missing")
                assert values["temp"].unit == "degC"
                assert sink.state("plc1") == (DeviceState.ONLINE, None)
                stats = source.counters()["devices"]["plc1"]
                # Refused twice with "illegal data address": the merged read of holding 0..21 (the
                # sim maps nothing at 5..9), which then falls back to one read per tag, and "missing".
                assert stats["exceptions"] == {"2": 2}
                assert fleet.served("plc", 1).reads >= 4

    run(scenario())


# --- coalescing ----------------------------------------------------------------------------

COALESCE_SIM = """
[[servers]]
name = "plc"
port = {port}
  [[servers.devices]]
  unit = 1
{registers}
"""

# The device maps holding and input registers 0..49 and coils 0..15; the gateway polls a
# sample of them: holding 0..3 contiguous, 8 (gap of 4), 40 (far), 41; input 0, 2; coils 0, 9.
DEVICE_MEMORY = [("holding", a, "uint16") for a in range(50)] + [("input", a, "uint16") for a in range(50)]
DEVICE_MEMORY += [("coil", a, "bool") for a in range(16)]
SAMPLE_MAP = [
    ("holding", 0, "float32"),
    ("holding", 2, "uint16"),
    ("holding", 3, "int16"),
    ("holding", 8, "uint16"),
    ("holding", 40, "uint32"),
    ("input", 0, "uint16"),
    ("input", 2, "uint16"),
    ("coil", 0, "bool"),
    ("coil", 9, "bool"),
]


def _sim_registers(layout: list[tuple[str, int, str]]) -> str:
    lines = []
    for table, address, kind in layout:
        lines += [
            "    [[servers.devices.registers]]",
            f'    table = "{table}"',
            f"    address = {address}",
            f'    type = "{kind}"',
            '    signal = { kind = "constant", value = 1 }',
        ]
    return "\n".join(lines)


@pytest.mark.parametrize(
    ("options", "requests"),
    [
        # max_gap 16 (default): holding 0..8 and 40..41 are too far apart -> 2; input 0..2 -> 1; coils 0..9 -> 1.
        ({}, 4),
        # no gap allowed: holding 0..3, 8, 40 -> 3; input 0, 2 -> 2; coils 0, 9 -> 2.
        ({"max_gap": 0}, 7),
        # everything near enough merges: holding 0..41 -> 1; input 1; coils 1.
        ({"max_gap": 40}, 3),
        # ... unless the device refuses long reads: holding in reads of at most 10 -> 0..8, 40..41.
        ({"max_gap": 40, "max_registers_per_request": 10}, 4),
    ],
)
def test_requests_on_the_wire_for_a_sample_map(tmp_path: Path, options: dict[str, Any], requests: int) -> None:
    port = free_port()
    tags = [
        {"name": f"{table}{address}", "table": table, "address": address, "type": kind}
        for table, address, kind in SAMPLE_MAP
    ]

    async def scenario() -> None:
        sink = Collector()
        async with sim(tmp_path, COALESCE_SIM.format(port=port, registers=_sim_registers(DEVICE_MEMORY))) as fleet:
            device = {"name": "plc1", "unit": 1, "poll_interval": "1h", "registers": tags}
            async with polling(tcp(port, [device], **options), sink):
                await sink.wait(lambda: sink.of("plc1"))
                values = sink.of("plc1")[0].values
                assert all(v.quality is Quality.GOOD for v in values.values())
                assert len(values) == len(SAMPLE_MAP)
                assert fleet.served("plc", 1).reads == requests

    run(scenario())


def test_a_merged_read_over_an_unmapped_gap_falls_back_to_one_read_per_tag(tmp_path: Path) -> None:
    port = free_port()
    layout = [("holding", 0, "uint16"), ("holding", 5, "uint16")]  # 1..4 unmapped: the sim refuses them

    async def scenario() -> None:
        sink = Collector()
        async with sim(tmp_path, COALESCE_SIM.format(port=port, registers=_sim_registers(layout))):
            tags = [{"name": f"r{a}", "address": a, "type": k} for _, a, k in layout]
            device = {"name": "plc1", "unit": 1, "poll_interval": "100ms", "registers": tags}
            async with polling(tcp(port, [device]), sink) as source:
                await sink.wait(lambda: len(sink.of("plc1")) >= 2)
                assert {n: v.value for n, v in sink.of("plc1")[-1].values.items()} == {"r0": 1, "r5": 1}
                assert [len(g.reads) for g in source.pollers["plc1"].groups] == [2]

    run(scenario())


# --- report-by-exception ---------------------------------------------------------------------

RBE_SIM = """
[[servers]]
name = "plc"
port = {port}
  [[servers.devices]]
  unit = 1
    [[servers.devices.registers]]
    address = 0
    type = "float32"
    signal = {{ kind = "ramp", start = 0, slope = 20 }}
    [[servers.devices.registers]]
    address = 2
    type = "uint16"
    signal = {{ kind = "constant", value = 5 }}
"""


def test_deadband_and_heartbeat_on_live_polls(tmp_path: Path) -> None:
    port = free_port()
    tags = [
        # ramps 20/s, polled every 50 ms (1 per poll): reported only past 5 units, about every 250 ms.
        {"name": "level", "address": 0, "type": "float32", "report": "change", "deadband": 5},
        # never changes: reported at start, then only as a heartbeat every 500 ms.
        {"name": "mode", "address": 2, "type": "uint16", "report": "change", "max_interval": "500ms"},
    ]

    async def scenario() -> None:
        sink = Collector()
        async with sim(tmp_path, RBE_SIM.format(port=port)) as fleet:
            device = {"name": "plc1", "unit": 1, "poll_interval": "50ms", "registers": tags}
            async with polling(tcp(port, [device]), sink):
                await sink.wait(lambda: sum("mode" in r.values for r in sink.of("plc1")) >= 5, timeout=15)
                polls = fleet.served("plc", 1).reads
        readings = sink.readings
        levels = [(t, r.values["level"].value) for t, r in readings if "level" in r.values]
        modes = [t for t, r in readings if "mode" in r.values]
        # Every reported level moved more than the deadband since the previous report.
        steps = [b - a for (_, a), (_, b) in itertools.pairwise(levels)]
        assert steps, levels
        assert all(step > 5 for step in steps), steps
        assert len(levels) < polls / 2  # most polls were not reported
        # Heartbeats: one every 500 ms (polls are 50 ms apart, so within a poll of it); never
        # sooner, and typically on time (a loaded machine may delay one poll, not the rule).
        gaps = sorted(b - a for a, b in itertools.pairwise(modes))
        assert gaps[0] >= 0.45, gaps
        assert gaps[len(gaps) // 2] <= 0.6, gaps

    run(scenario())


# --- writes ------------------------------------------------------------------------------------

WRITE_SIM = """
[[servers]]
name = "plc"
port = {port}
  [[servers.devices]]
  unit = 1
    [[servers.devices.registers]]
    address = 10
    type = "int16"
    scale = 0.1
    signal = {{ kind = "constant", value = 20.0 }}
    [[servers.devices.registers]]
    address = 12
    type = "float32"
    byte_order = "CDAB"
    signal = {{ kind = "constant", value = 1.0 }}
    [[servers.devices.registers]]
    address = 3
    table = "coil"
    type = "bool"
    signal = {{ kind = "constant", value = 0 }}
    [[servers.devices.registers]]
    address = 20
    type = "uint16"
    signal = {{ kind = "constant", value = 99 }}
"""

WRITE_TAGS = [
    {"name": "setpoint", "address": 10, "type": "int16", "scale": 0.1, "writable": True, "report": "change"},
    {"name": "gain", "address": 12, "type": "float32", "byte_order": "CDAB", "writable": True},
    {"name": "pump", "address": 3, "table": "coil", "writable": True},
    {"name": "alarm_limit", "address": 20, "type": "uint16"},  # not writable
]


def test_writes_go_through_the_tag_encoding_and_are_read_back(tmp_path: Path) -> None:
    port = free_port()

    async def scenario() -> None:
        sink = Collector()
        async with sim(tmp_path, WRITE_SIM.format(port=port)) as fleet:
            device = {"name": "plc1", "unit": 1, "poll_interval": "10s", "registers": WRITE_TAGS}
            async with polling(tcp(port, [device]), sink) as source:
                await sink.wait(lambda: sink.of("plc1"))
                assert sink.of("plc1")[0].values["setpoint"].value == 20.0

                await source.write("plc1", "setpoint", 72.5)
                assert fleet.words("plc", 1, 10) == [725]
                await source.write("plc1", "gain", -3.25)
                assert fleet.decoded("plc", 1, 12) == -3.25  # the sim decodes CDAB on its own
                await source.write("plc1", "pump", True)
                assert fleet.decoded("plc", 1, 3, "coil") == 1

                # The written values are polled at once (not in 10 s) and reported even with report = "change".
                await sink.wait(
                    lambda: any(
                        r.values.get("setpoint") and r.values["setpoint"].value == 72.5 for r in sink.of("plc1")
                    ),
                    timeout=3,
                )
                await sink.wait(
                    lambda: any(r.values.get("pump") and r.values["pump"].value is True for r in sink.of("plc1")),
                    timeout=3,
                )

                with pytest.raises(CommandError, match="'alarm_limit' of device 'plc1' is not writable"):
                    await source.write("plc1", "alarm_limit", 1)
                with pytest.raises(CommandError, match="has no tag 'nope'"):
                    await source.write("plc1", "nope", 1)
                with pytest.raises(CommandError, match="outside the range of int16"):
                    await source.write("plc1", "setpoint", 5000)
                assert fleet.served("plc", 1).writes == 3
                assert fleet.words("plc", 1, 20) == [99]

                fleet.set_fault("plc", 1, Fault.no_response())
                with pytest.raises(CommandError) as timed_out:
                    await source.write("plc1", "setpoint", 10)
                assert timed_out.value.status == "timeout"
                fleet.set_fault("plc", 1, Fault.exception(4))
                with pytest.raises(
                    CommandError, match=r"device refused the write: exception 4 \(device failure\)"
                ) as refused:
                    await source.write("plc1", "setpoint", 10)
                assert refused.value.status == "error"

    run(scenario())


# --- isolation ---------------------------------------------------------------------------------

ISOLATION_SIM = """
[[servers]]
name = "bus-a"
port = {port_a}
  [[servers.devices]]
  unit = 1
  count = 4
    [[servers.devices.registers]]
    address = 0
    type = "uint16"
    signal = {{ kind = "ramp", start = 0, slope = 1 }}
[[servers]]
name = "bus-b"
port = {port_b}
  [[servers.devices]]
  unit = 1
    [[servers.devices.registers]]
    address = 0
    type = "uint16"
    signal = {{ kind = "ramp", start = 0, slope = 1 }}
"""

POLL = 0.2  # seconds, every device
WINDOW = 3.0  # seconds of steady state measured


def _rate(sink: Collector, device: str, start: float, end: float) -> float:
    return sum(1 for t, r in sink.readings if r.device == device and start <= t < end) / (end - start)


def test_dead_and_slow_devices_do_not_stall_their_neighbours(tmp_path: Path) -> None:
    """Units 3 (dead) and 4 (slow) share bus A with healthy units 1 and 2; bus B is healthy."""
    port_a, port_b = free_port(), free_port()
    tag = [{"name": "counter", "address": 0, "type": "uint16"}]
    bus_a = tcp(
        port_a,
        [{"name": f"a{unit}", "unit": unit, "poll_interval": POLL, "registers": tag} for unit in (1, 2, 3, 4)],
        timeout="300ms",
        retries=1,
        retry_min="1s",
        retry_max="2s",
        breaker_threshold=2,
        offline_after=4,
    )
    bus_a["name"] = "bus-a"
    bus_b = tcp(port_b, [{"name": "b1", "unit": 1, "poll_interval": POLL, "registers": tag}])
    bus_b["name"] = "bus-b"

    async def scenario() -> None:
        sink = Collector()
        async with sim(tmp_path, ISOLATION_SIM.format(port_a=port_a, port_b=port_b)) as fleet:
            fleet.set_fault("bus-a", 3, Fault.no_response())
            fleet.set_fault("bus-a", 4, Fault.slow(0.05))
            async with polling(bus_a, sink), polling(bus_b, sink):
                started = time.monotonic()
                # The dead unit's breaker opens (degraded), then it goes offline; no poll task dies.
                await sink.wait(lambda: (sink.state("a3") or (None,))[0] is DeviceState.DEGRADED, timeout=10)
                assert "2 polls in a row failed" in (sink.state("a3") or ("", ""))[1]
                await sink.wait(lambda: (sink.state("a3") or (None,))[0] is DeviceState.OFFLINE, timeout=15)
                assert "did not answer within 0.3s" in (sink.state("a3") or ("", ""))[1]
                steady = time.monotonic()
                await asyncio.sleep(WINDOW)  # measuring a rate over a window, not synchronising
                end = time.monotonic()
                # Tolerance: 80 % of the configured rate (polls skipped by a loaded machine's
                # stalls count against it; measured here: 100-107 %).
                # Bus B never noticed anything, from the very start.
                assert _rate(sink, "b1", started, end) >= 0.8 / POLL
                # The healthy units of bus A keep their rate once the breaker is open.
                for device in ("a1", "a2"):
                    assert _rate(sink, device, steady, end) >= 0.8 / POLL, device
                # The slow unit is answered too (50 ms late, well within its timeout).
                assert _rate(sink, "a4", steady, end) >= 0.7 / POLL
                assert sink.state("a4") == (DeviceState.ONLINE, None)
                # The dead unit costs its bus a probe per backoff (1-2 s), not a timeout per poll.
                probes = fleet.served("bus-a", 3).reads
                await asyncio.sleep(WINDOW)
                assert fleet.served("bus-a", 3).reads - probes <= WINDOW / 0.8 + 1

                # Both come back.
                fleet.clear_fault("bus-a")
                await sink.wait(lambda: sink.state("a3") == (DeviceState.ONLINE, None), timeout=5)
                back = time.monotonic()
                await sink.wait(lambda: len([t for t, r in sink.readings if r.device == "a3" and t > back]) >= 5)
        counters = sink  # the last word: per-device counters say what happened
        assert counters

    run(scenario())


# --- RTU on a pty pair -------------------------------------------------------------------------

RTU_SIM = """
[[servers]]
name = "rs485"
transport = "rtu"
serial_port = "{path}"
  [[servers.devices]]
  unit = 1
  count = 3
    [[servers.devices.registers]]
    address = 0
    type = "float32"
    signal = {{ kind = "constant", value = 12.5 }}
    [[servers.devices.registers]]
    address = 2
    type = "uint16"
    signal = {{ kind = "constant", value = 3 }}
"""


def test_several_units_on_an_rtu_bus_with_silence_and_crc_errors(tmp_path: Path) -> None:
    path = tmp_path / "ttyGW"
    tags = [{"name": "temp", "address": 0, "type": "float32"}, {"name": "mode", "address": 2, "type": "uint16"}]
    devices = [
        {"name": f"rtu{unit}", "unit": unit, "poll_interval": "100ms", "registers": tags} for unit in (1, 2, 3, 9)
    ]
    config = {
        "kind": "modbus_rtu",
        "name": "rs485",
        "serial_port": str(path),
        "baudrate": 19200,
        "parity": "N",
        "timeout": "500ms",
        "retries": 0,
        "retry_min": "500ms",
        "retry_max": "1s",
        "breaker_threshold": 2,
        "offline_after": 3,
        "devices": devices,
    }

    async def scenario() -> None:
        sink = Collector()
        async with sim(tmp_path, RTU_SIM.format(path=path)) as fleet, polling(config, sink) as source:
            for unit in (1, 2, 3):
                await sink.wait(lambda u=unit: sink.of(f"rtu{u}"))
                values = sink.of(f"rtu{unit}")[0].values
                assert {n: v.value for n, v in values.items()} == {"temp": 12.5, "mode": 3}
            # Unit 9 is on nobody's list: the bus stays silent, as RS-485 does.
            await sink.wait(lambda: (sink.state("rtu9") or (None,))[0] is DeviceState.OFFLINE)
            assert "unit 9 did not answer within 0.5s" in (sink.state("rtu9") or ("", ""))[1]

            fleet.set_fault("rs485", 2, Fault.bad_crc())
            await sink.wait(lambda: source.counters()["devices"]["rtu2"]["crc_errors"] >= 2)
            await sink.wait(lambda: (sink.state("rtu2") or (None,))[0] is not DeviceState.ONLINE)
            fleet.clear_fault("rs485", 2)
            await sink.wait(lambda: sink.state("rtu2") == (DeviceState.ONLINE, None), timeout=5)
            # Units 1 and 3 never stopped, and the CRC errors are counted where they happened.
            devices = source.counters()["devices"]
            assert (devices["rtu1"]["crc_errors"], devices["rtu3"]["crc_errors"]) == (0, 0)
            assert sink.state("rtu1") == (DeviceState.ONLINE, None)
            assert sink.state("rtu3") == (DeviceState.ONLINE, None)

    run(scenario())


RTU_TCP_SIM = """
[[servers]]
name = "serial-server"
transport = "rtu_tcp"
port = {port}
  [[servers.devices]]
  unit = 5
    [[servers.devices.registers]]
    address = 0
    type = "float32"
    byte_order = "CDAB"
    signal = {{ kind = "constant", value = 12.5 }}
"""


def test_rtu_frames_over_tcp(tmp_path: Path) -> None:
    """A serial device server in transparent mode: RTU frames (with CRC) through a TCP socket."""
    port = free_port()
    config = tcp(
        port,
        [
            {
                "name": "remote",
                "unit": 5,
                "poll_interval": "1h",
                "registers": [{"name": "temp", "address": 0, "type": "float32", "byte_order": "CDAB"}],
            }
        ],
    )
    config["kind"] = "modbus_rtu_tcp"

    async def scenario() -> None:
        sink = Collector()
        async with sim(tmp_path, RTU_TCP_SIM.format(port=port)) as fleet:
            source = ModbusSource(ModbusRtuTcpConfig.model_validate(config))
            task = asyncio.create_task(source.run(sink))
            try:
                await sink.wait(lambda: sink.of("remote"))
                assert sink.of("remote")[0].values["temp"].value == 12.5
                assert fleet.served("serial-server", 5).reads == 1
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    run(scenario())


def test_a_unit_missing_behind_a_tcp_gateway_counts_as_silent_not_as_an_answer(tmp_path: Path) -> None:
    """Exception 11 (gateway target failed to respond) is a Modbus TCP gateway saying the unit is silent."""
    port = free_port()
    tags = [{"name": "mode", "address": 2, "type": "uint16"}]
    devices = [
        {"name": "here", "unit": 1, "poll_interval": "100ms", "registers": tags},
        {"name": "gone", "unit": 9, "poll_interval": "100ms", "registers": tags},
    ]

    async def scenario() -> None:
        sink = Collector()
        async with sim(tmp_path, RBE_SIM.format(port=port)):
            config = tcp(port, devices, breaker_threshold=2, offline_after=3, retry_min="100ms", retry_max="200ms")
            async with polling(config, sink) as source:
                await sink.wait(lambda: (sink.state("gone") or (None,))[0] is DeviceState.OFFLINE)
                state = sink.state("gone")
                assert state is not None
                says = "exception 11 (gateway target failed to respond)"
                assert state[1] == f"unit 9 did not answer (the Modbus gateway says: {says})"
                assert not sink.of("gone")
                assert sink.state("here") == (DeviceState.ONLINE, None)
                assert source.counters()["devices"]["gone"]["timeouts"] >= 3

    run(scenario())


def test_requests_on_a_bus_keep_the_inter_frame_delay_apart(tmp_path: Path) -> None:
    """Two units polled as fast as possible on one RTU bus: every request waits the quiet time after the last."""
    path = tmp_path / "ttyGW"
    tags = [{"name": "mode", "address": 2, "type": "uint16"}]
    devices = [{"name": f"rtu{unit}", "unit": unit, "poll_interval": "1ms", "registers": tags} for unit in (1, 2)]
    config = {
        "kind": "modbus_rtu",
        "name": "rs485",
        "serial_port": str(path),
        "parity": "N",
        "timeout": "500ms",
        "inter_frame_delay": "40ms",
        "devices": devices,
    }

    async def scenario() -> None:
        sink = Collector()
        async with sim(tmp_path, RTU_SIM.format(path=path)) as fleet, polling(config, sink):
            await sink.wait(lambda: len(sink.readings) >= 2)
            start, served = time.monotonic(), fleet.served("rs485").reads
            await sink.wait(lambda: fleet.served("rs485").reads >= served + 10, timeout=10)
            elapsed = time.monotonic() - start
        # 10 more requests need at least 9 quiet times between them (a lower bound:
        # a loaded machine can only make it slower); both units were served.
        assert elapsed >= 9 * 0.040, elapsed
        assert {r.device for _, r in sink.readings} == {"rtu1", "rtu2"}

    run(scenario())


LATE_SIM = """
[[servers]]
name = "rs485"
transport = "{transport}"
{where}
  [[servers.devices]]
  unit = 1
    [[servers.devices.registers]]
    address = 0
    signal = {{ kind = "constant", value = 1111 }}
    [[servers.devices.registers]]
    address = 1
    signal = {{ kind = "constant", value = 2222 }}
"""


@pytest.mark.parametrize("transport", ["rtu", "rtu_tcp"])
def test_a_late_rtu_reply_is_never_taken_for_the_next_answer(tmp_path: Path, transport: str) -> None:
    """RTU frames carry no transaction id: the answer to a timed-out read must not answer the next one."""
    path, port = tmp_path / "ttyGW", free_port()
    if transport == "rtu":
        where, spec = f'serial_port = "{path}"', BusSpec("rtu", serial_port=str(path), parity="N", timeout=0.2)
    else:
        where, spec = f"port = {port}", BusSpec("rtu_tcp", host="127.0.0.1", port=port, timeout=0.2)

    async def scenario() -> None:
        async with sim(tmp_path, LATE_SIM.format(transport=transport, where=where)) as fleet:
            bus = ModbusBus(spec)
            try:
                fleet.set_fault("rs485", 1, Fault.slow(0.25, addresses=range(1, 2)))
                with pytest.raises(DeviceTimeout):
                    await bus.read("holding", 1, 1, 1, timeout=0.2)  # its answer comes 50 ms too late
                assert await bus.read("holding", 1, 0, 1, timeout=0.2) == [1111]
                fleet.clear_fault("rs485")
                assert await bus.read("holding", 1, 1, 1, timeout=0.2) == [2222]
            finally:
                bus.close()

    run(scenario())
