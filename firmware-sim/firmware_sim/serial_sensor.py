"""A serial sensor on a pty: lines of kv, csv, JSON or NMEA 0183, with faults switched at run time.

The sensor owns a pty pair and writes to its master end; the gateway opens the slave
end through a stable symlink (``<directory>/<name>``), as it would open
``/dev/serial/by-id/...``. Unplugging closes the pty and removes the symlink (the
gateway's read fails with EIO, its reopen finds no file); plugging in makes a new
pty behind the same symlink.

    sensor = SerialSensor(SerialSensorConfig(name="ws1", format="nmea"), tmp_path)
    await sensor.start()          # the symlink exists when this returns
    sensor.faults.garbage = True  # a line of noise after every good line
    await sensor.unplug(); await sensor.plug()
    await sensor.stop()

Faults add lines; good lines keep coming at their pace unless the sensor is silent:

- ``garbage``: a line of noise (alternately non-UTF-8 bytes and ASCII junk);
- ``partial``: the first half of the line, then the line ending (bytes lost mid-line);
- ``bad_checksum``: NMEA only, a copy of each sentence with a wrong checksum;
- ``silent``: nothing at all is written while it is on (the port stays).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from fieldlink.configkit import Schema, parse_duration

from .pty_port import PtyPort
from .signal_specs import SignalSpec
from .signals import Signal

__all__ = ["SerialFaults", "SerialSensor", "SerialSensorConfig", "nmea_sentence"]

PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
NmeaSentence = Literal["GGA", "RMC", "MWV", "MTW", "XDR"]

# NMEA fields taken from signals of these names; any other signal goes into XDR.
_NMEA_DEFAULTS = {
    "latitude": 48.1173,
    "longitude": 11.5167,
    "altitude": 545.4,
    "wind_angle": 0.0,
    "wind_speed": 0.0,  # m/s, sent with unit M
    "water_temperature": 15.0,
    "speed_over_ground": 0.0,
    "course_over_ground": 0.0,
}


class SerialSensorConfig(Schema):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="symlink name in the sensor directory")
    format: Literal["kv", "csv", "json", "nmea"] = "kv"
    interval: PositiveDuration = 1.0
    fields: dict[str, SignalSpec] = Field(default_factory=dict)
    decimals: int = Field(default=2, ge=0, le=9)
    line_ending: str = Field(default="", description='default: "\\r\\n" for nmea, "\\n" otherwise')
    sentences: list[NmeaSentence] = Field(default_factory=lambda: ["GGA", "MWV", "MTW", "XDR"])
    talker: str = Field(default="GP", pattern=r"^[A-Z]{2}$")
    seed: int | None = None

    @model_validator(mode="after")
    def _has_fields(self) -> SerialSensorConfig:
        if self.format != "nmea" and not self.fields:
            raise ValueError(f"format {self.format!r} needs at least one entry in fields")
        return self

    @property
    def ending(self) -> bytes:
        return (self.line_ending or ("\r\n" if self.format == "nmea" else "\n")).encode()


@dataclass
class SerialFaults:
    garbage: bool = False
    partial: bool = False
    bad_checksum: bool = False
    silent: bool = False  # the sensor stops talking, the port stays (a powered-off sensor behind an adapter)


def _nmea_checksum(body: str) -> str:
    return f"{reduce(lambda acc, c: acc ^ ord(c), body, 0):02X}"


def nmea_sentence(body: str) -> str:
    """``$<body>*<checksum>`` for a body such as ``GPMTW,15.2,C``."""
    return f"${body}*{_nmea_checksum(body)}"


def _ddmm(degrees: float, positive: str, negative: str, width: int) -> tuple[str, str]:
    hemisphere = positive if degrees >= 0 else negative
    degrees = abs(degrees)
    whole = int(degrees)
    minutes = (degrees - whole) * 60
    return f"{whole:0{width}d}{minutes:07.4f}", hemisphere


class SerialSensor:
    def __init__(
        self,
        config: SerialSensorConfig,
        directory: Path,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.config = config
        self.path = Path(directory) / config.name
        self.faults = SerialFaults()
        self.counters: Counter[str] = Counter()  # lines, garbage, partial, bad_checksum, overruns
        rng = random.Random(config.seed)
        self._rng = rng
        self._signals: dict[str, Signal] = {name: spec.build(rng) for name, spec in config.fields.items()}
        self._clock = clock
        self._port = PtyPort(self.path)
        self._task: asyncio.Task[None] | None = None
        self._start = 0.0

    @property
    def plugged(self) -> bool:
        return self._port.is_open

    async def start(self) -> None:
        """Make the pty and the symlink, start writing; the path can be opened when this returns."""
        loop = asyncio.get_running_loop()
        self._start = loop.time()
        self._port.open()
        self._task = asyncio.create_task(self._write_forever(), name=f"serial-sensor-{self.config.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._port.close()

    async def unplug(self) -> None:
        """The port disappears: the pty closes (readers get EIO), the symlink goes."""
        self._port.close()

    async def plug(self) -> None:
        """The port comes back: a new pty behind the same symlink."""
        if not self._port.is_open:
            self._port.open()

    async def __aenter__(self) -> SerialSensor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- writing -----------------------------------------------------------------------

    async def _write_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            if self._port.is_open and not self.faults.silent:
                t = self._clock() if self._clock is not None else loop.time() - self._start
                for line in self._lines(t):
                    self._write(line)
            next_tick = max(next_tick + self.config.interval, loop.time())
            await asyncio.sleep(next_tick - loop.time())

    def write_raw(self, data: bytes) -> None:
        """Send bytes as they are, between two ticks (a test's own noise); nothing if unplugged."""
        if self._port.is_open:
            self._write(data)

    def _write(self, data: bytes) -> None:
        # Nobody reads and the kernel buffer is full: the rest is lost, as on a wire.
        if self._port.write(data) < len(data):
            self.counters["overruns"] += 1

    def _lines(self, t: float) -> list[bytes]:
        """The good lines of one tick, and the faulty ones switched on."""
        ending = self.config.ending
        lines: list[bytes] = []
        for text in self.render(t):
            lines.append(text.encode() + ending)
            self.counters["lines"] += 1
            if self.faults.partial:
                lines.append(text[: len(text) // 2].encode() + ending)
                self.counters["partial"] += 1
            if self.faults.bad_checksum and self.config.format == "nmea":
                body, _, given = text[1:].rpartition("*")
                wrong = f"{(int(given, 16) + 1) % 256:02X}"
                lines.append(f"${body}*{wrong}".encode() + ending)
                self.counters["bad_checksum"] += 1
            if self.faults.garbage:
                lines.append(self._garbage() + ending)
                self.counters["garbage"] += 1
        return lines

    def _garbage(self) -> bytes:
        if self.counters["garbage"] % 2:
            return bytes(self._rng.choice(b"#@!~%^&*()<>?|") for _ in range(12))
        return bytes(self._rng.randrange(0x80, 0x100) for _ in range(12))  # never valid UTF-8 or ASCII

    def value(self, name: str, t: float) -> float:
        signal = self._signals.get(name)
        if signal is not None:
            return signal(t)
        return _NMEA_DEFAULTS.get(name, 0.0)

    def render(self, t: float) -> list[str]:
        """The text of the good lines at ``t`` seconds (without line endings)."""
        d = self.config.decimals
        values = {name: round(signal(t), d) for name, signal in self._signals.items()}
        match self.config.format:
            case "kv":
                return [" ".join(f"{name}={value:.{d}f}" for name, value in values.items())]
            case "csv":
                return [",".join(f"{value:.{d}f}" for value in values.values())]
            case "json":
                return [json.dumps(values, separators=(",", ":"))]
            case _:
                return [nmea_sentence(self._nmea_body(kind, t)) for kind in self.config.sentences]

    def _nmea_body(self, kind: str, t: float) -> str:
        d = self.config.decimals
        talker = self.config.talker
        lat, ns = _ddmm(self.value("latitude", t), "N", "S", 2)
        lon, ew = _ddmm(self.value("longitude", t), "E", "W", 3)
        clock = f"{int(t) // 3600 % 24:02d}{int(t) // 60 % 60:02d}{t % 60:05.2f}"
        if kind == "GGA":
            altitude = self.value("altitude", t)
            return f"{talker}GGA,{clock},{lat},{ns},{lon},{ew},1,08,0.9,{altitude:.1f},M,46.9,M,,"
        if kind == "RMC":
            sog, cog = self.value("speed_over_ground", t), self.value("course_over_ground", t)
            return f"{talker}RMC,{clock},A,{lat},{ns},{lon},{ew},{sog:.1f},{cog:.1f},010125,,,A"
        if kind == "MWV":
            angle, speed = self.value("wind_angle", t) % 360, self.value("wind_speed", t)
            return f"WIMWV,{angle:.1f},R,{speed:.{d}f},M,A"
        if kind == "MTW":
            return f"YXMTW,{self.value('water_temperature', t):.{d}f},C"
        # XDR: every signal the other sentences do not use, as a generic transducer.
        quads = [f"G,{signal(t):.{d}f},,{name}" for name, signal in self._signals.items() if name not in _NMEA_DEFAULTS]
        return "IIXDR," + ",".join(quads or ["G,0,,none"])
