"""Signal generators, and a configured register bound to one.

A signal is a function of the seconds elapsed since the fleet started. Only the
noise of a sine and the steps of a random walk are random, and they come from an
RNG the caller seeds, so a run is reproducible. Encoding lives in ``codec``
(``struct`` only, never the gateway's decoder); it is re-exported here.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .codec import REGISTER_WIDTH, BitTable, ByteOrder, RegisterType, Table, Value, decode, encode, width

__all__ = [
    "REGISTER_WIDTH",
    "BitTable",
    "ByteOrder",
    "Clock",
    "Constant",
    "LiveRegister",
    "Ramp",
    "RandomWalk",
    "RegisterType",
    "Signal",
    "Sine",
    "Step",
    "Table",
    "encode",
]


class Signal(Protocol):
    """A value as a function of the seconds elapsed since the fleet started."""

    def __call__(self, t: float) -> Value: ...


#: How the server and the fleet read the time: seconds since the fleet started.
Clock = Callable[[], float]


@dataclass(frozen=True)
class Constant:
    """A fixed number, or a fixed text for a string register."""

    value: float | str

    def __call__(self, t: float) -> float | str:
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


@dataclass(frozen=True)
class Step:
    """``values[0]`` for ``holds[0]`` seconds, then ``values[1]`` ..., cycling forever.

    A square wave between low and high with period P is ``Step((low, high), (P/2, P/2))``.
    """

    values: Sequence[float]
    holds: Sequence[float]  # seconds each value is held, same length as values, all > 0
    _ends: list[float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.values) != len(self.holds) or not self.values:
            raise ValueError("a step needs one hold per value")
        object.__setattr__(self, "_ends", list(itertools.accumulate(self.holds)))

    def __call__(self, t: float) -> float:
        into = t % self._ends[-1]
        return self.values[bisect.bisect_right(self._ends, into)]


@dataclass
class RandomWalk:
    """Starts at ``start``; each sample adds gaussian steps, reflected into ``[low, high]``.

    ``per_second`` true: the step's standard deviation is per second of elapsed time
    (Brownian: a sample ``dt`` seconds after the last moves by ``step * sqrt(dt)``),
    so the walk's spread does not depend on how often clients read. False: every
    sample (every read) moves by one step of standard deviation ``step``.
    """

    start: float
    step: float
    per_second: bool = True
    low: float | None = None
    high: float | None = None
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)
    _value: float | None = field(default=None, init=False, repr=False)
    _last_t: float = field(default=0.0, init=False, repr=False)

    def __call__(self, t: float) -> float:
        if self._value is None:
            self._value, self._last_t = self.start, t
            return self.start
        sigma = self.step * math.sqrt(max(0.0, t - self._last_t)) if self.per_second else self.step
        self._last_t = max(self._last_t, t)
        self._value = self._reflect(self._value + self.rng.gauss(0.0, sigma) if sigma > 0 else self._value)
        return self._value

    def _reflect(self, value: float) -> float:
        # Reflecting (not clamping) keeps the walk from sticking to a bound.
        if self.low is None or self.high is None:
            low, high = self.low, self.high
            if low is not None and value < low:
                return 2 * low - value
            if high is not None and value > high:
                return 2 * high - value
            return value
        span = self.high - self.low
        folded = (value - self.low) % (2 * span)
        return self.low + (folded if folded <= span else 2 * span - folded)


@dataclass
class LiveRegister:
    """One configured value (register, coil, bit of a register) bound to its signal.

    ``written`` holds the raw words a Modbus client wrote, in the register's byte
    order as on the wire (for a bool: ``[0]`` or ``[1]``): from then on they replace
    the signal, the way a setpoint written to a real device stays put.
    ``bit`` places a bool in a register table at that bit of the word at ``address``.
    """

    address: int
    table: Table
    type: RegisterType
    scale: float
    signal: Signal
    name: str = ""
    byte_order: ByteOrder = "ABCD"
    length: int | None = None  # registers of a string
    bit: int | None = None
    written: list[int] | None = None

    @property
    def width(self) -> int:
        return width(self.type, self.length)

    @property
    def end(self) -> int:
        """Last address this register occupies (inclusive)."""
        return self.address + self.width - 1

    def words(self, t: float) -> list[int]:
        """The raw words (or ``[0]``/``[1]`` for a bool) a read returns at time ``t``."""
        if self.written is not None:
            return list(self.written)
        return encode(self.signal(t), self.type, self.scale, self.byte_order, self.length)

    def decoded(self, t: float) -> Value:
        """What a correct client decodes from ``words(t)``: the written value, if any."""
        return decode(self.words(t), self.type, self.scale, self.byte_order)
