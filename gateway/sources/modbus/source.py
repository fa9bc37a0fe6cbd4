"""Polls the devices of one Modbus bus, turns register maps into readings, writes tags.

Each device has its own poll task; the bus (:class:`ModbusBus`) serializes their
requests. A device's tags are grouped by poll interval and each group is read with
as few requests as coalescing allows (:mod:`plan`); what a poll returns passes the
tags' report filters (:mod:`report`) and the rest becomes one :class:`Reading`.

Failure handling, per device:

* an exception response (illegal address, device busy) makes that read's tags
  ``bad`` and the device stays online: it answered. A merged read refused with
  "illegal data address" is split into one read per tag from then on, so a gap the
  device does not map costs one tag, not its neighbours.
* a timeout is retried ``retries`` times. A poll that still fails counts; after
  ``breaker_threshold`` failed polls in a row the breaker opens: the device is
  ``degraded`` and is only probed (one attempt, no retries) on an exponential
  backoff, so a dead device costs its bus one timeout per probe. After
  ``offline_after`` failed polls, or when the bus itself is unreachable, it is
  ``offline``. One good answer closes the breaker.
* a poll task never dies: anything unexpected is logged and treated as a failure.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from fieldlink.wire import Value
from gateway.sources.base import CommandError, DeviceState, Reading, ReadingSink
from gateway.sources.modbus.client import (
    BusSpec,
    BusUnavailable,
    DeviceException,
    DeviceTimeout,
    ModbusBus,
    ModbusError,
)
from gateway.sources.modbus.codec import (
    ByteOrder,
    CodecError,
    RegisterType,
    encode_registers,
    encode_string,
)
from gateway.sources.modbus.config import (
    BIT_TABLES,
    DeviceConfig,
    ModbusBusConfig,
    ModbusRtuConfig,
    ModbusRtuTcpConfig,
    ModbusTcpConfig,
    RegisterConfig,
)
from gateway.sources.modbus.decode import TagDecoder, decode_block
from gateway.sources.modbus.plan import ReadBlock, plan_reads
from gateway.sources.modbus.report import ReportFilter

__all__ = ["ModbusSource", "bus_spec"]

log = logging.getLogger(__name__)

ILLEGAL_DATA_ADDRESS = 2
LATENCY_WINDOW = 256  # recent request latencies kept per device for the health percentiles
CLOCK_SLACK = 0.001


def bus_spec(config: ModbusBusConfig) -> BusSpec:
    """The transport settings of a source config."""
    if isinstance(config, ModbusRtuConfig):
        # Modbus RTU wants 3.5 characters of silence between frames (1.75 ms above 19200 baud).
        gap = config.inter_frame_delay
        if gap is None:
            gap = max(3.5 * config.char_time, 0.00175) if config.baudrate <= 19200 else 0.00175
        return BusSpec(
            "rtu",
            serial_port=config.serial_port,
            baudrate=config.baudrate,
            parity=config.parity,
            stopbits=config.stopbits,
            bytesize=config.bytesize,
            timeout=config.timeout,
            inter_frame_delay=gap,
        )
    if isinstance(config, ModbusRtuTcpConfig):
        return BusSpec(
            "rtu_tcp",
            host=config.host,
            port=config.port,
            timeout=config.timeout,
            inter_frame_delay=config.inter_frame_delay or 0.0,
        )
    assert isinstance(config, ModbusTcpConfig)
    return BusSpec(
        "tcp",
        host=config.host,
        port=config.port,
        timeout=config.timeout,
        inter_frame_delay=config.inter_frame_delay or 0.0,
    )


@dataclass
class DeviceStats:
    """Counters of one device, published on the gateway health topic."""

    requests: int = 0
    responses: int = 0
    timeouts: int = 0
    connect_failures: int = 0
    crc_errors: int = 0
    exceptions: Counter[int] = field(default_factory=Counter)
    writes: int = 0
    write_errors: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    latency_max_ms: float = 0.0

    def record_latency(self, seconds: float) -> None:
        ms = seconds * 1000
        self.latencies_ms.append(ms)
        self.latency_max_ms = max(self.latency_max_ms, ms)

    def as_dict(self) -> dict[str, Any]:
        recent = sorted(self.latencies_ms)

        def pct(p: float) -> float | None:
            return round(recent[min(len(recent) - 1, int(p * len(recent)))], 2) if recent else None

        return {
            "requests": self.requests,
            "responses": self.responses,
            "timeouts": self.timeouts,
            "connect_failures": self.connect_failures,
            "crc_errors": self.crc_errors,
            "exceptions": {str(code): n for code, n in sorted(self.exceptions.items())},
            "writes": self.writes,
            "write_errors": self.write_errors,
            "latency_ms": {"p50": pct(0.5), "p99": pct(0.99), "max": round(self.latency_max_ms, 2)},
        }


@dataclass(frozen=True)
class PlannedRead:
    """A read of the plan with the decoders of its tags, prepared once."""

    block: ReadBlock
    decoders: tuple[TagDecoder, ...]
    bits: bool


@dataclass
class PollGroup:
    interval: float
    reads: list[PlannedRead]
    next_due: float = 0.0


class PollFailed(Exception):
    def __init__(self, cause: ModbusError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class DevicePoller:
    """One device on the bus: its schedule, breaker, report filters and counters."""

    def __init__(self, source: ModbusSource, device: DeviceConfig) -> None:
        bus = source.config
        self.source = source
        self.device = device
        self.name = device.name
        self.timeout = device.timeout or bus.timeout
        self.retries = bus.retries if device.retries is None else device.retries
        self.base = bus.address_base if device.address_base is None else device.address_base
        self.order = device.byte_order or bus.byte_order
        max_count = device.max_registers_per_request or bus.max_registers_per_request
        max_gap = bus.max_gap if device.max_gap is None else device.max_gap
        self.tags = {tag.name: tag for tag in device.registers}
        by_interval: dict[float, list[RegisterConfig]] = {}
        for tag in device.registers:
            by_interval.setdefault(device.interval_of(tag), []).append(tag)
        planning = {"address_base": self.base, "max_count": max_count, "max_gap": max_gap}
        self.groups = [
            PollGroup(interval, [self.planned(b) for b in plan_reads(tags, **planning)])
            for interval, tags in sorted(by_interval.items())
        ]
        # Only tags that may hold a value back need a filter; the others report every poll.
        self.filters = {tag.name: ReportFilter(tag) for tag in device.registers if ReportFilter.needed(tag)}
        self.stats = DeviceStats()
        self.state: DeviceState | None = None
        self.failures = 0
        self.wake = asyncio.Event()
        self.write_lock = asyncio.Lock()

    def order_of(self, tag: RegisterConfig) -> ByteOrder:
        return tag.byte_order or self.order

    def planned(self, block: ReadBlock) -> PlannedRead:
        decoders = tuple(
            TagDecoder(tag, self.order_of(tag), offset) for tag, offset in zip(block.tags, block.offsets, strict=True)
        )
        return PlannedRead(block, decoders, block.table in BIT_TABLES)

    # --- requests ------------------------------------------------------------------------

    async def request(self, call: Any, *args: Any, attempts: int) -> Any:
        """One request with its retries; counts requests, timeouts, CRC errors and latency."""
        bus = self.source.bus
        for attempt in range(attempts):
            self.stats.requests += 1
            try:
                result = await call(*args, timeout=self.timeout)
            except DeviceTimeout:
                self.stats.timeouts += 1
                self.stats.crc_errors += bus.last_crc_errors
                if attempt + 1 == attempts:
                    raise
                continue
            except BusUnavailable:
                self.stats.connect_failures += 1
                raise
            except DeviceException as exc:
                self.stats.responses += 1
                self.stats.exceptions[exc.code] += 1
                self.stats.record_latency(bus.last_latency)
                raise
            self.stats.responses += 1
            self.stats.crc_errors += bus.last_crc_errors
            self.stats.record_latency(bus.last_latency)
            return result
        raise AssertionError("unreachable")

    async def read_block(self, group: PollGroup, index: int, values: dict[str, Value], attempts: int) -> None:
        planned = group.reads[index]
        block = planned.block
        unit = self.device.unit
        try:
            words = await self.request(
                self.source.bus.read, block.table, unit, block.start, block.count, attempts=attempts
            )
        except DeviceException as exc:
            if exc.code == ILLEGAL_DATA_ADDRESS and len(block.tags) > 1:
                # A merged read the device refuses: from now on one read per tag, so only
                # the tags it really does not map go bad.
                log.warning(
                    "merged read refused; reading its tags one by one",
                    extra={"device": self.name, "address": block.start, "count": block.count, "reason": str(exc)},
                )
                # Tags on the same registers (bits of one word) keep sharing their read.
                spans: dict[tuple[int, int], list[RegisterConfig]] = {}
                for tag, offset in zip(block.tags, block.offsets, strict=True):
                    spans.setdefault((offset, tag.width), []).append(tag)
                singles = [
                    self.planned(ReadBlock(block.table, block.start + offset, width, tuple(tags), (0,) * len(tags)))
                    for (offset, width), tags in spans.items()
                ]
                group.reads[index : index + 1] = singles
                for i in range(index, index + len(singles)):
                    await self.read_block(group, i, values, attempts)
                return
            self.source.note_refusal(self.name, block, str(exc))
            values.update({d.name: d.bad for d in planned.decoders})
            return
        if self.source.refused:
            self.source.note_accepted(self.name, block)
        values.update(decode_block(planned.decoders, words, planned.bits))

    async def poll(self, groups: list[PollGroup], attempts: int) -> dict[str, Value]:
        values: dict[str, Value] = {}
        for group in groups:
            index = 0
            while index < len(group.reads):
                before = len(group.reads)
                try:
                    await self.read_block(group, index, values, attempts)
                except ModbusError as exc:
                    raise PollFailed(exc) from None
                index += 1 + len(group.reads) - before
        return values

    # --- the poll loop ---------------------------------------------------------------------

    async def run(self, sink: ReadingSink) -> None:
        loop = asyncio.get_running_loop()
        # Devices with the same interval stay in step on purpose: their readings then reach
        # the buffer together and share its group commits (spreading 200 devices over the
        # second measured 3x the gateway's CPU per reading, one durable commit each).
        now = loop.time()
        for group in self.groups:
            group.next_due = now
        task = asyncio.current_task()
        while True:
            if task is not None and task.cancelling():
                # A cancellation swallowed on the way (Python 3.11's asyncio.wait_for, inside
                # pymodbus, can lose one that arrives as the response does) still counts:
                # without this the poll loop runs on and the gateway's stop never ends.
                raise asyncio.CancelledError
            now = loop.time()
            breaker_open = self.failures >= self.source.config.breaker_threshold
            # Due within the loop clock's resolution (1 ms with uvloop) counts as due now:
            # sleeping for it would only wake the loop again for nothing.
            due = self.groups if breaker_open else [g for g in self.groups if g.next_due <= now + CLOCK_SLACK]
            if not due:
                await self._sleep_until(min(g.next_due for g in self.groups))
                continue
            ts = time.time_ns() // 1_000_000
            try:
                # With the breaker open a poll is a probe: one attempt, no retries.
                values = await self.poll(due, 1 if breaker_open else self.retries + 1)
            except PollFailed as failed:
                await self._failed(failed.cause, sink)
                delay = self._backoff() if self.failures >= self.source.config.breaker_threshold else None
                now = loop.time()
                for group in due:
                    group.next_due = now + (delay if delay is not None else group.interval)
                if delay is not None:
                    await self._sleep_until(now + delay)
                continue
            except Exception:  # a poll task never dies
                log.exception("unexpected poll failure", extra={"device": self.name})
                await self._failed(ModbusError("internal error (see the log)"), sink)
                await self._sleep_until(loop.time() + self._backoff())
                continue
            self._schedule(due, loop.time())
            try:
                await self._answered(sink)
                await self._report(values, ts, sink)
            except Exception:  # the sink's trouble: logged, and polling goes on
                log.exception("could not hand over a reading", extra={"device": self.name})

    def _schedule(self, groups: list[PollGroup], now: float) -> None:
        # Fixed rate: a slow poll shortens the next wait; a very late one skips ahead.
        for group in groups:
            group.next_due = max(group.next_due + group.interval, now)

    async def _sleep_until(self, deadline: float) -> None:
        """Sleep until ``deadline`` (loop time) or until a write asks for a poll now."""
        delay = deadline - asyncio.get_running_loop().time()
        if delay <= 0:
            return
        self.wake.clear()
        try:
            async with asyncio.timeout(delay):
                await self.wake.wait()
        except TimeoutError:
            pass

    async def _report(self, values: dict[str, Value], ts: int, sink: ReadingSink) -> None:
        if not self.filters:  # every tag reports every poll: nothing to decide
            await sink.submit_reading(Reading(self.name, ts, values))
            return
        now = time.monotonic()
        filters = self.filters
        sent = {name: value for name, value in values.items() if name not in filters or filters[name].offer(value, now)}
        if sent:
            await sink.submit_reading(Reading(self.name, ts, sent))

    async def _answered(self, sink: ReadingSink) -> None:
        self.failures = 0
        if self.state is not DeviceState.ONLINE:
            if self.state is not None:
                for report_filter in self.filters.values():
                    report_filter.reset()  # after an outage, send fresh values of every tag
            self.state = DeviceState.ONLINE
            log.info("device online", extra={"device": self.name, "source": self.source.name})
            await sink.device_state(self.name, DeviceState.ONLINE, None)

    async def _failed(self, cause: ModbusError, sink: ReadingSink) -> None:
        self.failures += 1
        config = self.source.config
        if isinstance(cause, BusUnavailable):
            # No connection at all: retrying at the poll rate would only hammer the peer,
            # so the breaker opens at once and reconnects follow the backoff.
            self.failures = max(self.failures, config.breaker_threshold)
        if isinstance(cause, BusUnavailable) or self.failures >= config.offline_after:
            state = DeviceState.OFFLINE
        elif self.failures >= config.breaker_threshold:
            state = DeviceState.DEGRADED
        else:
            return  # a transient failure: retried at the next poll
        reason = str(cause)
        if state is DeviceState.DEGRADED:
            reason = f"{self.failures} polls in a row failed, retrying with backoff: {cause}"
        if state is not self.state:
            self.state = state
            log.warning(f"device {state.value}", extra={"device": self.name, "reason": reason})
            await sink.device_state(self.name, state, reason)

    def _backoff(self) -> float:
        """Exponential from retry_min to retry_max, with jitter so devices do not retry in step."""
        config = self.source.config
        steps = max(0, self.failures - config.breaker_threshold)
        delay = min(config.retry_max, config.retry_min * 2 ** min(steps, 16))
        return delay * random.uniform(0.8, 1.0)

    # --- writes ----------------------------------------------------------------------------

    async def write(self, tag_name: str, value: object) -> None:
        tag = self.tags.get(tag_name)
        if tag is None:
            raise CommandError(f"device {self.name!r} has no tag {tag_name!r}")
        if not tag.writable:
            raise CommandError(
                f"tag {tag_name!r} of device {self.name!r} is not writable (writable = true in the config)"
            )
        bus, unit = self.source.bus, self.device.unit
        address = tag.address - self.base
        async with self.write_lock:
            try:
                if tag.table == "coil":
                    await self.request(bus.write_coil, unit, address, _as_bool(value), attempts=1)
                elif tag.bit is not None:
                    # One bit of a register: read, change the bit, write back (function 6).
                    state = _as_bool(value)
                    (word,) = await self.request(bus.read, "holding", unit, address, 1, attempts=self.retries + 1)
                    mask = 1 << tag.bit
                    word = word | mask if state else word & ~mask
                    await self.request(bus.write_registers, unit, address, [word], attempts=1)
                else:
                    words = _encode_tag(tag, value, self.order_of(tag))
                    await self.request(bus.write_registers, unit, address, words, attempts=1)
            except DeviceTimeout as exc:
                self.stats.write_errors += 1
                raise CommandError(str(exc), "timeout") from None
            except BusUnavailable as exc:
                self.stats.write_errors += 1
                raise CommandError(f"not written: {exc}") from None
            except ModbusError as exc:
                self.stats.write_errors += 1
                raise CommandError(f"device refused the write: {exc}") from None
            self.stats.writes += 1
        # Read the new value back soon and send it even if report-by-exception would not.
        if tag.name in self.filters:
            self.filters[tag.name].reset()
        interval = self.device.interval_of(tag)
        for group in self.groups:
            if group.interval == interval:
                group.next_due = 0.0
        self.wake.set()


def _as_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise CommandError(f"expected true or false, got {value!r}")


def _encode_tag(tag: RegisterConfig, value: object, order: ByteOrder) -> list[int]:
    """Registers for a value, through the same type, scale and byte order as reads."""
    kind = tag.kind
    try:
        if kind is RegisterType.STRING:
            if not isinstance(value, str):
                raise CommandError(f"expected a string, got {value!r}")
            return encode_string(value, tag.length or 1, order)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CommandError(f"expected a number, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise CommandError(f"expected a finite number, got {value!r}")
        raw: int | float = (value - tag.offset) / tag.scale if not tag.keeps_integer else value
        if kind.is_integer:
            rounded = round(raw)
            if not tag.keeps_integer:
                raw = rounded  # a scaled value becomes the nearest raw step
            elif rounded != raw:
                raise CommandError(f"{value!r} is not a whole number, as {kind.value} needs")
        return encode_registers(raw, kind, order)
    except CodecError as exc:
        raise CommandError(str(exc)) from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer too large to scale as a float
        raise CommandError(f"{value!r} cannot be written as {kind.value}: {exc}") from None


class ModbusSource:
    """All devices on one Modbus bus; requests on it never overlap."""

    def __init__(self, config: ModbusBusConfig) -> None:
        self.config = config
        self.name = config.name
        self.bus = ModbusBus(bus_spec(config))
        self.pollers = {device.name: DevicePoller(self, device) for device in config.devices}
        self.refused: dict[tuple[str, int], str] = {}  # (device, block start) -> reason, to log changes only

    @property
    def devices(self) -> list[str]:
        return [d.name for d in self.config.devices]

    def counters(self) -> dict[str, Any]:
        per_device = {name: poller.stats.as_dict() for name, poller in self.pollers.items()}
        totals: Counter[str] = Counter()
        for stats in per_device.values():
            for key in (
                "requests",
                "responses",
                "timeouts",
                "connect_failures",
                "crc_errors",
                "writes",
                "write_errors",
            ):
                totals[key] += stats[key]
            totals["exceptions"] += sum(stats["exceptions"].values())
        return {**{k: totals[k] for k in sorted(totals)}, "endpoint": self.config.endpoint, "devices": per_device}

    async def run(self, sink: ReadingSink) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for poller in self.pollers.values():
                    group.create_task(poller.run(sink), name=f"poll-{poller.name}")
        finally:
            self.bus.close()

    async def write(self, device: str, tag: str, value: object) -> None:
        poller = self.pollers.get(device)
        if poller is None:
            raise CommandError(f"no device {device!r} on source {self.name!r}")
        await poller.write(tag, value)

    def note_refusal(self, device: str, block: ReadBlock, reason: str) -> None:
        if self.refused.get((device, block.start)) != reason:
            self.refused[(device, block.start)] = reason
            log.warning(
                "read refused",
                extra={
                    "device": device,
                    "table": block.table,
                    "address": block.start,
                    "count": block.count,
                    "reason": reason,
                },
            )

    def note_accepted(self, device: str, block: ReadBlock) -> None:
        if self.refused.pop((device, block.start), None) is not None:
            log.info("read accepted again", extra={"device": device, "address": block.start})
