"""Reads one serial port: frames become readings of its one device; trouble becomes device state.

The loop is the plain one: open (retried with backoff), read until the port is lost,
close, back off, open again. Every frame that arrives is one reading, stamped with
the time its bytes were read. Frames that cannot be read are counted by reason and
dropped, with at most one warning per ``WARN_INTERVAL``.

The device is ``online`` once a frame gave values, ``offline`` when the port cannot
be opened or is lost (the reason says which), or after ``silence_timeout`` without a
reading; data flowing again brings it back ``online``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter

from gateway.sources.base import DeviceState, Reading, ReadingSink
from gateway.sources.serial.config import SerialConfig
from gateway.sources.serial.framing import DelimiterFramer, FixedLengthFramer, Framer
from gateway.sources.serial.parsers import FrameError, build_parser
from gateway.sources.serial.port import PortError, PortLost, SerialPort
from gateway.sources.serial.values import FieldMapper

__all__ = ["WARN_INTERVAL", "SerialSource"]

log = logging.getLogger(__name__)

WARN_INTERVAL = 10.0  # seconds between two warnings about dropped frames


class SerialSource:
    def __init__(self, config: SerialConfig) -> None:
        self.config = config
        self.name = config.name
        self.device = config.device
        self._parser = build_parser(config.parser)
        self._mapper = FieldMapper(config.fields, config.keep_unlisted)
        self._framer: Framer = (
            FixedLengthFramer(config.frame_length)
            if config.frame_length is not None
            else DelimiterFramer(config.delimiter, config.max_frame)
        )
        self._counters: Counter[str] = Counter()
        self._state: DeviceState | None = None
        self._last_warning = -WARN_INTERVAL
        self._suppressed = 0

    @property
    def devices(self) -> list[str]:
        return [self.device]

    def counters(self) -> dict[str, int]:
        counters = dict(self._counters)
        for name, count in (
            ("dropped_overlong", self._framer.overlong),
            ("bad_values", self._mapper.bad_values),
            ("fields_untracked", self._mapper.untracked),
        ):
            if count:
                counters[name] = count
        return counters

    async def run(self, sink: ReadingSink) -> None:
        failures = 0
        while True:
            try:
                port = SerialPort.open(self.config)
            except PortError as exc:
                self._counters["open_failures"] += 1
                failures += 1
                await self._set_state(sink, DeviceState.OFFLINE, f"cannot open {self.config.port}: {exc}")
                await asyncio.sleep(self._backoff(failures))
                continue
            self._counters["opens"] += 1
            log.info("serial port open", extra={"source": self.name, "port": self.config.port})
            self._framer.reset()
            readings_before = self._counters["readings"]
            try:
                await self._pump(port, sink)
            except PortLost as exc:
                self._counters["disconnects"] += 1
                await self._set_state(sink, DeviceState.OFFLINE, f"{self.config.port}: {exc}")
            finally:
                port.close()
            # A port that worked for a while is retried promptly; one that dies at once backs off.
            failures = 1 if self._counters["readings"] > readings_before else failures + 1
            await asyncio.sleep(self._backoff(failures))

    async def _pump(self, port: SerialPort, sink: ReadingSink) -> None:
        """Read frames until the port is lost (PortLost); never returns otherwise."""
        loop = asyncio.get_running_loop()
        timeout = self.config.silence_timeout
        deadline = loop.time() + timeout if timeout is not None else None
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    data = await port.read()
            except TimeoutError:
                self._counters["silences"] += 1
                await self._set_state(sink, DeviceState.OFFLINE, f"no data for {timeout:g}s")
                deadline = None  # offline already; the next reading brings it back
                continue
            ts = time.time_ns() // 1_000_000
            self._counters["bytes"] += len(data)
            for frame in self._framer.feed(data):
                if await self._handle(frame, ts, sink) and timeout is not None:
                    deadline = loop.time() + timeout

    async def _handle(self, frame: bytes, ts: int, sink: ReadingSink) -> bool:
        """Turn one frame into a reading; True if it gave one."""
        self._counters["frames"] += 1
        try:
            text = frame.decode(self.config.encoding)
        except UnicodeDecodeError:
            self._drop("undecodable", frame, "not valid " + self.config.encoding)
            return False
        try:
            values = self._mapper.map(self._parser.parse(text.strip()))
        except FrameError as exc:
            self._drop(exc.reason, frame, str(exc))
            return False
        except Exception as exc:  # a bug in a parser must not stop the port being read
            log.exception("frame handling failed", extra={"source": self.name})
            self._drop("errors", frame, repr(exc))
            return False
        if not values:
            self._counters["frames_ignored"] += 1
            return False
        await self._set_state(sink, DeviceState.ONLINE, None)
        self._counters["readings"] += 1
        await sink.submit_reading(Reading(self.device, ts, values))
        return True

    def _drop(self, reason: str, frame: bytes, detail: str) -> None:
        self._counters[f"dropped_{reason}"] += 1
        now = time.monotonic()
        if now - self._last_warning < WARN_INTERVAL:
            self._suppressed += 1
            return
        log.warning(
            "frame dropped",
            extra={
                "source": self.name,
                "device": self.device,
                "reason": reason,
                "detail": detail,
                "frame": repr(frame[:60]),
                "suppressed": self._suppressed,  # drops not logged since the previous warning
            },
        )
        self._last_warning = now
        self._suppressed = 0

    async def _set_state(self, sink: ReadingSink, state: DeviceState, reason: str | None) -> None:
        if state is self._state:
            return
        self._state = state
        if state is DeviceState.ONLINE:
            log.info("device online", extra={"device": self.device, "source": self.name})
        else:
            log.warning("device offline", extra={"device": self.device, "reason": reason})
        await sink.device_state(self.device, state, reason)

    def _backoff(self, failures: int) -> float:
        """Exponential from retry_min to retry_max, with jitter."""
        delay = min(self.config.retry_max, self.config.retry_min * 2 ** min(failures - 1, 16))
        return delay * random.uniform(0.8, 1.0)
