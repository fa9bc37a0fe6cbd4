"""The serial source against the pty sensor of firmware-sim: real ptys, real pyserial, no mocks.

Every wait is bounded by DEADLINE and wakes on what the sink receives (no sleeps).
The unplug test runs on both loops: production runs on uvloop, and the port is read
through the loop's add_reader.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import serial
import uvloop

from fieldlink.wire import Value
from firmware_sim.serial_sensor import SerialSensor, SerialSensorConfig
from gateway.sources.base import DeviceState, Reading
from gateway.sources.serial import SerialConfig, SerialSource

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
DEADLINE = 5.0
INTERVAL = 0.02  # the sensor's line interval
POLL = 0.02  # counters are not events: conditions on them are checked this often
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop] | None] = {"asyncio": None, "uvloop": uvloop.new_event_loop}


def run(coro: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    async def bounded() -> T:
        async with asyncio.timeout(DEADLINE * 4):
            return await coro

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(bounded())


class CollectingSink:
    """A ReadingSink that keeps what it gets and wakes waiters on every change."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.states: list[tuple[str, DeviceState, str | None]] = []
        self._changed = asyncio.Condition()
        self.source: SerialSource | None = None

    async def submit_reading(self, reading: Reading) -> None:
        self.readings.append(reading)
        async with self._changed:
            self._changed.notify_all()

    async def device_state(self, device: str, state: DeviceState, reason: str | None) -> None:
        self.states.append((device, state, reason))
        async with self._changed:
            self._changed.notify_all()

    @property
    def state(self) -> DeviceState | None:
        return self.states[-1][1] if self.states else None

    def values(self, name: str) -> list[Value]:
        return [r.values[name] for r in self.readings if name in r.values]

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait for ``predicate``: woken by the sink, and polled for the source's counters."""
        try:
            async with asyncio.timeout(DEADLINE), self._changed:
                while not predicate():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), POLL)
        except TimeoutError:
            counters = self.source.counters() if self.source is not None else {}
            raise AssertionError(
                f"no {what} within {DEADLINE}s; states={self.states} readings={len(self.readings)} {counters}"
            ) from None


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, sensor: dict[str, Any], source: dict[str, Any], *, start_sensor: bool = True
) -> AsyncIterator[tuple[SerialSensor, SerialSource, CollectingSink]]:
    simulated = SerialSensor(SerialSensorConfig.model_validate({"interval": INTERVAL, **sensor}), tmp_path)
    config = SerialConfig.model_validate(
        {
            "kind": "serial",
            "name": "port-1",
            "port": str(simulated.path),
            "device": "sensor-1",
            "retry_min": "50ms",
            "retry_max": "200ms",
            **source,
        }
    )
    serial_source = SerialSource(config)
    sink = CollectingSink()
    sink.source = serial_source
    if start_sensor:
        await simulated.start()
    task = asyncio.create_task(serial_source.run(sink))
    try:
        yield simulated, serial_source, sink
    finally:
        task.cancel()
        # Cancellation is honoured promptly, and run() never ends on its own.
        done, _ = await asyncio.wait([task], timeout=1.0)
        await simulated.stop()
        assert done, "run() did not end within 1s of being cancelled"
        assert task.cancelled(), f"run() ended with {task.exception()!r} instead of being cancelled"


def const(value: float) -> dict[str, Any]:
    return {"kind": "constant", "value": value}


TH = {"T": const(21.5), "H": const(40)}


@pytest.mark.parametrize(
    ("sensor", "parser", "fields", "expected"),
    [
        pytest.param(
            {"format": "kv", "fields": TH},
            {"kind": "kv"},
            {"T": {"name": "temperature", "unit": "degC"}, "H": {"name": "humidity", "type": "int"}},
            {"temperature": Value.of(21.5, "degC"), "humidity": Value.of(40)},
            id="kv",
        ),
        pytest.param(
            {"format": "csv", "fields": TH},
            {"kind": "csv", "columns": ["temperature", "humidity"]},
            {},
            {"temperature": Value.of(21.5), "humidity": Value.of(40.0)},
            id="csv",
        ),
        pytest.param(
            {"format": "json", "fields": TH},
            {"kind": "json"},
            {"T": {"name": "temperature", "scale": 10}},
            {"temperature": Value.of(215.0)},
            id="json",
        ),
        pytest.param(
            {"format": "kv", "fields": TH},
            {"kind": "regex", "pattern": r"T=(?P<t>[-\d.]+) H=(?P<h>[-\d.]+)", "match": "full"},
            {},
            {"t": Value.of(21.5), "h": Value.of(40.0)},
            id="regex",
        ),
        pytest.param(
            {
                "format": "nmea",
                "sentences": ["MTW", "XDR"],
                "fields": {"water_temperature": const(12.5), "P": const(1.5)},
            },
            {"kind": "nmea"},
            {"water_temperature": {"name": "water"}, "P": {"name": "pressure"}},
            {"water": Value.of(12.5, "degC"), "pressure": Value.of(1.5)},
            id="nmea",
        ),
    ],
)
def test_values_arrive_for_each_parser(
    tmp_path: Path, sensor: dict[str, Any], parser: dict[str, Any], fields: dict[str, Any], expected: dict[str, Value]
) -> None:
    async def main() -> None:
        async with running(tmp_path, {"name": "dev0", **sensor}, {"parser": parser, "fields": fields}) as (
            _,
            src,
            sink,
        ):
            await sink.until(lambda: all(sink.values(name) for name in expected), f"values {sorted(expected)}")
            assert sink.states[0] == ("sensor-1", DeviceState.ONLINE, None)
            merged: dict[str, Value] = {}
            for reading in sink.readings:
                assert reading.device == "sensor-1"
                merged.update(reading.values)
            assert merged == expected
            counters = src.counters()
            assert not any(name.startswith("dropped_") for name in counters), counters
            assert counters["readings"] == len(sink.readings)

    run(main())


def test_noise_and_bad_checksums_are_counted_and_dropped_while_good_lines_flow(tmp_path: Path) -> None:
    sensor = {"name": "gps", "format": "nmea", "sentences": ["GGA", "MTW"]}

    async def main() -> None:
        async with running(tmp_path, sensor, {"parser": {"kind": "nmea"}, "delimiter": "\\r\\n"}) as (sim, src, sink):
            await sink.until(lambda: len(sink.readings) >= 4, "first readings")
            sim.faults.garbage = sim.faults.partial = sim.faults.bad_checksum = True
            before = len(sink.readings)

            def noisy() -> bool:
                c = src.counters()
                drops = ("dropped_bad_checksum", "dropped_no_checksum", "dropped_undecodable", "dropped_unparsable")
                return all(c.get(name, 0) >= 3 for name in drops) and len(sink.readings) >= before + 10

            await sink.until(noisy, "drops of every kind alongside good readings")
            sim.faults.garbage = sim.faults.partial = sim.faults.bad_checksum = False
            assert {s for _, s, _ in sink.states} == {DeviceState.ONLINE}  # noise is no outage
            for reading in sink.readings:  # nothing of the noise got through
                assert set(reading.values) in (
                    {"latitude", "longitude", "fix_quality", "satellites", "hdop", "altitude"},
                    {"water_temperature"},
                )
            assert sink.values("water_temperature")[-1] == Value.of(15.0, "degC")

    run(main())


def test_an_overlong_line_is_dropped_and_the_next_one_read(tmp_path: Path) -> None:
    async def main() -> None:
        source = {"parser": {"kind": "kv"}, "max_frame": 16}
        async with running(tmp_path, {"name": "kv", "fields": TH}, source) as (sim, src, sink):
            await sink.until(lambda: len(sink.readings) >= 2, "first readings")
            sim.write_raw(b"x" * 200)  # runs into the next good line, which is lost with it
            seen = len(sink.readings)
            await sink.until(lambda: len(sink.readings) >= seen + 3, "readings after the long line")
            await sink.until(lambda: src.counters().get("dropped_overlong") == 1, "dropped_overlong")

    run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_unplugged_port_goes_offline_and_comes_back(tmp_path: Path, loop: str) -> None:
    async def main() -> None:
        async with running(tmp_path, {"name": "usb0", "fields": TH}, {"parser": {"kind": "kv"}}) as (sim, src, sink):
            await sink.until(lambda: sink.state is DeviceState.ONLINE, "online")
            await sim.unplug()
            await sink.until(lambda: sink.state is DeviceState.OFFLINE, "offline after the unplug")
            _, _, reason = sink.states[-1]
            assert reason is not None
            assert str(sim.path) in reason
            assert "hung up" in reason or "Input/output error" in reason
            # It keeps trying to reopen the vanished port, with backoff.
            await sink.until(lambda: src.counters().get("open_failures", 0) >= 2, "reopen attempts")
            assert sink.states[-1][1] is DeviceState.OFFLINE  # reported once, not per attempt
            await sim.plug()
            seen = len(sink.readings)
            await sink.until(lambda: len(sink.readings) >= seen + 5, "readings after replugging")
            assert [state for _, state, _ in sink.states] == [
                DeviceState.ONLINE,
                DeviceState.OFFLINE,
                DeviceState.ONLINE,
            ]
            counters = src.counters()
            assert counters["disconnects"] == 1
            assert counters["opens"] == 2

    run(main(), loop)


def test_a_port_missing_at_start_is_offline_until_it_appears(tmp_path: Path) -> None:
    async def main() -> None:
        source = {"parser": {"kind": "kv"}}
        async with running(tmp_path, {"name": "late", "fields": TH}, source, start_sensor=False) as (sim, src, sink):
            await sink.until(lambda: sink.state is DeviceState.OFFLINE, "offline")
            reason = sink.states[-1][2] or ""
            assert reason.startswith(f"cannot open {sim.path}")
            assert "No such file or directory" in reason
            await sim.start()
            await sink.until(lambda: sink.state is DeviceState.ONLINE, "online once the port exists")
            assert src.counters()["open_failures"] >= 1

    run(main())


def test_silence_takes_the_device_offline_and_data_brings_it_back(tmp_path: Path) -> None:
    async def main() -> None:
        source = {"parser": {"kind": "kv"}, "silence_timeout": "1s"}
        async with running(tmp_path, {"name": "quiet", "fields": TH}, source) as (sim, src, sink):
            await sink.until(lambda: sink.state is DeviceState.ONLINE, "online")
            sim.faults.silent = True
            await sink.until(lambda: sink.state is DeviceState.OFFLINE, "offline after the silence")
            assert sink.states[-1][2] == "no data for 1s"
            sim.faults.silent = False
            await sink.until(lambda: sink.state is DeviceState.ONLINE, "online when data flows")
            # At least the one we made (a stalled loop on a loaded machine may add one before it).
            assert src.counters()["silences"] >= 1
            assert src.counters().get("disconnects", 0) == 0  # the port stayed open

    run(main())


def test_cancellation_closes_the_port(tmp_path: Path) -> None:
    async def main() -> None:
        async with SerialSensor(SerialSensorConfig(name="lock", fields=TH, interval=INTERVAL), tmp_path) as sim:
            config = {"kind": "serial", "name": "p", "port": str(sim.path), "device": "d", "parser": {"kind": "kv"}}
            sink = CollectingSink()
            task = asyncio.create_task(SerialSource(SerialConfig.model_validate(config)).run(sink))
            await sink.until(lambda: len(sink.readings) >= 1, "a reading")
            with pytest.raises(serial.SerialException, match="lock"):
                serial.Serial(str(sim.path), exclusive=True)  # the source holds it
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=1.0)
            assert done, "run() did not end within 1s of being cancelled"
            serial.Serial(str(sim.path), exclusive=True).close()  # released

    run(main())
