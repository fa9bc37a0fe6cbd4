"""Polls the devices of one Modbus TCP connection and turns register maps into readings."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from fieldlink.wire import Quality, Value, ValueType
from gateway.sources.base import DeviceState, Reading, ReadingSink
from gateway.sources.modbus.client import (
    BusUnavailable,
    DeviceException,
    DeviceTimeout,
    ModbusError,
    ModbusTcpClient,
)
from gateway.sources.modbus.codec import decode_registers
from gateway.sources.modbus.config import (
    MAX_REGISTERS_PER_READ,
    DeviceConfig,
    ModbusTcpConfig,
    RegisterConfig,
)

__all__ = ["ModbusSource", "ReadBlock", "plan_reads"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadBlock:
    """One request on the wire and the tags it serves."""

    table: str
    start: int
    count: int
    tags: tuple[RegisterConfig, ...]


def plan_reads(registers: Sequence[RegisterConfig], max_count: int = MAX_REGISTERS_PER_READ) -> list[ReadBlock]:
    """Merge tags whose registers touch or overlap into as few reads as possible."""
    blocks: list[ReadBlock] = []
    for table in ("holding", "input"):
        tags = sorted((r for r in registers if r.table == table), key=lambda r: r.address)
        current: list[RegisterConfig] = []
        start = end = 0
        for tag in tags:
            tag_end = tag.address + tag.type.width
            if current and tag.address <= end and max(end, tag_end) - start <= max_count:
                current.append(tag)
                end = max(end, tag_end)
                continue
            if current:
                blocks.append(ReadBlock(table, start, end - start, tuple(current)))
            current, start, end = [tag], tag.address, tag_end
        if current:
            blocks.append(ReadBlock(table, start, end - start, tuple(current)))
    return blocks


def _tag_value(tag: RegisterConfig, words: Sequence[int]) -> Value:
    raw = decode_registers(words, tag.type, tag.byte_order)
    if tag.keeps_integer:
        return Value(int(raw), tag.unit, Quality.GOOD, ValueType.INT)
    scaled = float(raw) * tag.scale + tag.offset
    if tag.type.is_integer:
        scaled = round(scaled, tag.decimals)
    return Value(scaled, tag.unit, Quality.GOOD, ValueType.FLOAT)


def _bad_value(tag: RegisterConfig) -> Value:
    return Value(None, tag.unit, Quality.BAD, ValueType.INT if tag.keeps_integer else ValueType.FLOAT)


class ModbusSource:
    """All devices behind one Modbus TCP endpoint; requests on the connection never overlap."""

    def __init__(self, config: ModbusTcpConfig) -> None:
        self.config = config
        self.name = config.name
        self._client = ModbusTcpClient(config.host, config.port, config.timeout)
        self._plans = {d.name: plan_reads(d.registers) for d in config.devices}
        self._counters: Counter[str] = Counter()
        self._refused: dict[tuple[str, int], str] = {}  # (device, block start) -> reason, to log changes only

    @property
    def devices(self) -> list[str]:
        return [d.name for d in self.config.devices]

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    async def run(self, sink: ReadingSink) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for device in self.config.devices:
                    group.create_task(self._poll_forever(device, sink), name=f"poll-{device.name}")
        finally:
            self._client.close()

    async def _poll_forever(self, device: DeviceConfig, sink: ReadingSink) -> None:
        loop = asyncio.get_running_loop()
        state: DeviceState | None = None
        failures = 0
        next_poll = loop.time()
        task = asyncio.current_task()
        while True:
            if task is not None and task.cancelling():
                # A cancellation swallowed on the way (Python 3.11's asyncio.wait_for, inside
                # pymodbus, can lose one that arrives as the response does) still counts:
                # without this the poll loop runs on and the gateway's stop never ends.
                raise asyncio.CancelledError
            try:
                reading = await self._poll(device)
            except Exception as exc:  # a poll task never dies: every failure is a device state
                failures += 1
                reason = str(exc)
                if not isinstance(exc, ModbusError):
                    log.exception("unexpected poll failure", extra={"device": device.name})
                if state is not DeviceState.OFFLINE:
                    state = DeviceState.OFFLINE
                    log.warning("device offline", extra={"device": device.name, "reason": reason})
                    await sink.device_state(device.name, state, reason)
                await asyncio.sleep(self._backoff(failures))
                next_poll = loop.time()
                continue
            failures = 0
            if state is not DeviceState.ONLINE:
                state = DeviceState.ONLINE
                log.info("device online", extra={"device": device.name, "source": self.name})
                await sink.device_state(device.name, state, None)
            await sink.submit_reading(reading)
            # Fixed rate: a slow poll shortens the next wait; a very late one skips ahead.
            next_poll += device.poll_interval
            now = loop.time()
            next_poll = max(next_poll, now)
            await asyncio.sleep(next_poll - now)

    def _backoff(self, failures: int) -> float:
        """Exponential from retry_min to retry_max, with jitter so devices do not retry in step."""
        delay = min(self.config.retry_max, self.config.retry_min * 2 ** min(failures - 1, 16))
        return delay * random.uniform(0.8, 1.0)

    async def _poll(self, device: DeviceConfig) -> Reading:
        ts = time.time_ns() // 1_000_000
        values: dict[str, Value] = {}
        for block in self._plans[device.name]:
            self._counters["requests"] += 1
            try:
                words = await self._client.read(block.table, device.unit, block.start, block.count)  # type: ignore[arg-type]
            except DeviceException as exc:
                # The device answered: it is online, these tags are bad, the rest still count.
                self._counters[f"exception_{exc.code}"] += 1
                log.warning(
                    "read refused",
                    extra={
                        "device": device.name,
                        "address": block.start,
                        "count": block.count,
                        "reason": str(exc),
                    },
                )
                values.update({tag.name: _bad_value(tag) for tag in block.tags})
                continue
            except DeviceTimeout:
                self._counters["timeouts"] += 1
                raise
            except BusUnavailable:
                self._counters["connect_failures"] += 1
                raise
            if self._refused.pop((device.name, block.start), None) is not None:
                log.info("read accepted again", extra={"device": device.name, "address": block.start})
            for tag in block.tags:
                offset = tag.address - block.start
                values[tag.name] = _tag_value(tag, words[offset : offset + tag.type.width])
        ordered = {tag.name: values[tag.name] for tag in device.registers}
        return Reading(device.name, ts, ordered)
