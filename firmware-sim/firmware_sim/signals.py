"""Signal generators and their encoding into Modbus register words.

A signal is a function of the seconds elapsed since the fleet started. Only the
noise of a sine is random, and it comes from an RNG the caller seeds, so a run is
reproducible. Encoding uses ``struct`` on purpose: the gateway has its own decoder,
and a test that decodes with a third implementation catches a bug in either.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

__all__ = [
    "REGISTER_WIDTH",
    "Clock",
    "Constant",
    "LiveRegister",
    "Ramp",
    "RegisterType",
    "Signal",
    "Sine",
    "Table",
    "encode",
]

RegisterType = Literal["uint16", "int16", "uint32", "int32", "float32"]
Table = Literal["holding", "input"]

#: Registers (16-bit words) one value of each type occupies.
REGISTER_WIDTH: Final[dict[str, int]] = {
    "uint16": 1,
    "int16": 1,
    "uint32": 2,
    "int32": 2,
    "float32": 2,
}

# struct format (big-endian bytes, so big-endian words: ABCD) and the range an
# integer type can hold; out-of-range values are clamped, as a real transmitter
# saturates instead of wrapping around.
_FORMATS: Final[dict[str, tuple[str, int, int]]] = {
    "uint16": (">H", 0, 0xFFFF),
    "int16": (">h", -0x8000, 0x7FFF),
    "uint32": (">I", 0, 0xFFFF_FFFF),
    "int32": (">i", -0x8000_0000, 0x7FFF_FFFF),
}
_FLOAT32_MAX: Final = struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]


class Signal(Protocol):
    """A value as a function of the seconds elapsed since the fleet started."""

    def __call__(self, t: float) -> float: ...


#: How the server and the fleet read the time: seconds since the fleet started.
Clock = Callable[[], float]


@dataclass(frozen=True)
class Constant:
    value: float

    def __call__(self, t: float) -> float:
        return self.value


@dataclass(frozen=True)
class Ramp:
    """``start + slope * t``; with both bounds it wraps into ``[low, high)`` (a sawtooth)."""

    start: float
    slope: float
    low: float | None = None
    high: float | None = None

    def __call__(self, t: float) -> float:
        value = self.start + self.slope * t
        if self.low is None or self.high is None:
            return value
        # Modulo wraps both ways: a rising ramp jumps from high to low, a falling
        # one from low to high.
        return self.low + (value - self.low) % (self.high - self.low)


@dataclass(frozen=True)
class Sine:
    """``offset + amplitude * sin(2π (t + phase) / period)`` plus gaussian noise."""

    offset: float
    amplitude: float
    period: float
    phase: float = 0.0
    noise: float = 0.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __call__(self, t: float) -> float:
        value = self.offset + self.amplitude * math.sin(2 * math.pi * (t + self.phase) / self.period)
        if self.noise > 0:
            value += self.rng.gauss(0.0, self.noise)
        return value


def encode(value: float, type_: RegisterType, scale: float = 1.0) -> list[int]:
    """Raw register words for ``value``: ``raw = value / scale``, big-endian words (ABCD).

    Integer types round half away from zero and clamp to their range; float32
    clamps to the largest finite float32 rather than failing on overflow.
    """
    raw = value / scale
    if type_ == "float32":
        packed = struct.pack(">f", max(-_FLOAT32_MAX, min(_FLOAT32_MAX, raw)))
    else:
        fmt, low, high = _FORMATS[type_]
        # Half away from zero, as device firmware usually rounds (round() would give
        # banker's rounding: 2.5 -> 2).
        rounded = int(math.copysign(math.floor(abs(raw) + 0.5), raw))
        packed = struct.pack(fmt, max(low, min(high, rounded)))
    return [int.from_bytes(packed[i : i + 2], "big") for i in range(0, len(packed), 2)]


@dataclass
class LiveRegister:
    """One configured register bound to its signal, as the server and the fleet see it.

    ``written`` holds the raw words a Modbus client wrote: from then on they replace
    the signal, the way a setpoint written to a real device stays put.
    """

    address: int
    table: Table
    type: RegisterType
    scale: float
    signal: Signal
    name: str = ""
    written: list[int] | None = None

    @property
    def width(self) -> int:
        return REGISTER_WIDTH[self.type]

    @property
    def end(self) -> int:
        """Last address this register occupies (inclusive)."""
        return self.address + self.width - 1

    def words(self, t: float) -> list[int]:
        if self.written is not None:
            return list(self.written)
        return encode(self.signal(t), self.type, self.scale)
