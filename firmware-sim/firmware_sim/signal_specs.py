"""The ``signal = { kind = ... }`` tables of the simulator config, each building its Signal.

A registry by ``kind``: adding a signal adds a class here and to ``SignalSpec``,
nothing elsewhere. Random signals draw from the RNG the fleet hands to ``build``,
seeded from the config's ``seed`` and the register's identity.
"""

from __future__ import annotations

import random
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

from fieldlink.configkit import Duration, Schema, parse_duration

from .signals import Constant, Ramp, RandomWalk, Signal, Sine, Step

__all__ = [
    "SIGNAL_KINDS",
    "ConstantSignal",
    "RampSignal",
    "RandomWalkSignal",
    "SignalSpec",
    "SineSignal",
    "StepSignal",
]

PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


class ConstantSignal(Schema):
    kind: Literal["constant"]
    # A number; a text for a string register. An int stays an int, so a 64-bit
    # value is exact (a float holds 53 bits).
    value: int | float | str

    def build(self, rng: random.Random) -> Signal:
        return Constant(self.value)


class RampSignal(Schema):
    kind: Literal["ramp"]
    start: float = 0.0
    slope: float  # units per second
    min: float | None = None  # with max: wrap around between min and max (a sawtooth)
    max: float | None = None

    def build(self, rng: random.Random) -> Signal:
        return Ramp(self.start, self.slope, self.min, self.max)


class SineSignal(Schema):
    kind: Literal["sine"]
    offset: float = 0.0
    amplitude: float
    period: PositiveDuration
    phase: Duration = 0.0  # seconds added to the elapsed time
    noise: float = Field(default=0.0, ge=0)  # standard deviation of gaussian noise

    def build(self, rng: random.Random) -> Signal:
        return Sine(self.offset, self.amplitude, self.period, self.phase, self.noise, rng)


class StepSignal(Schema):
    kind: Literal["step"]
    values: list[float] = Field(min_length=1)
    # How long each value is held: one duration for all, or one per value.
    hold: PositiveDuration | list[PositiveDuration]

    def holds(self) -> list[float]:
        return list(self.hold) if isinstance(self.hold, list) else [self.hold] * len(self.values)

    def build(self, rng: random.Random) -> Signal:
        return Step(tuple(self.values), tuple(self.holds()))


class RandomWalkSignal(Schema):
    kind: Literal["random_walk"]
    start: float = 0.0
    step: float = Field(ge=0)  # standard deviation of one step
    per: Literal["second", "sample"] = "second"  # a step per second of time, or per read
    min: float | None = None  # the walk reflects off these bounds
    max: float | None = None

    def build(self, rng: random.Random) -> Signal:
        return RandomWalk(self.start, self.step, self.per == "second", self.min, self.max, rng)


SignalSpec = Annotated[
    ConstantSignal | RampSignal | SineSignal | StepSignal | RandomWalkSignal,
    Field(discriminator="kind"),
]
SIGNAL_KINDS = ("constant", "ramp", "sine", "step", "random_walk")
