"""The simulator's config schema: servers, the devices behind them, their registers.

``configs/sim.toml`` is the annotated example. Everything the schema alone cannot
see (overlapping registers, duplicate units, names and listen addresses, ramp
bounds) is checked afterwards, and every problem is reported with its dotted key.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator

from fieldlink.configkit import ConfigError, Duration, Port, Problem, Schema, load_config, parse_duration

from .signals import REGISTER_WIDTH, Constant, Ramp, RegisterType, Signal, Sine, Table

__all__ = [
    "ConstantSignal",
    "Device",
    "RampSignal",
    "Register",
    "Server",
    "SignalSpec",
    "SimConfig",
    "SineSignal",
    "check_sim_config",
    "load_sim_config",
]

PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


class ConstantSignal(Schema):
    kind: Literal["constant"]
    value: float

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


SignalSpec = Annotated[ConstantSignal | RampSignal | SineSignal, Field(discriminator="kind")]
_SIGNAL_KINDS = ("constant", "ramp", "sine")


class Register(Schema):
    address: int = Field(ge=0, le=0xFFFF)  # 0-based, as on the wire
    table: Table = "holding"
    type: RegisterType = "uint16"
    scale: float = 1.0  # raw = value / scale
    name: str = ""  # informational, shows in logs
    signal: SignalSpec

    @field_validator("scale")
    @classmethod
    def _scale_not_zero(cls, value: float) -> float:
        if value == 0:
            raise ValueError("must not be 0 (raw = value / scale)")
        return value

    @property
    def width(self) -> int:
        return REGISTER_WIDTH[self.type]


class Device(Schema):
    unit: int = Field(ge=1, le=247)  # Modbus unit id (slave address)
    name: str = ""
    registers: list[Register] = Field(min_length=1)


class Server(Schema):
    name: str = Field(min_length=1)
    host: str = "127.0.0.1"
    port: Port
    devices: list[Device] = Field(min_length=1)


class SimConfig(Schema):
    servers: list[Server] = Field(min_length=1)
    seed: int | None = None  # seeds the noise so runs are reproducible; unset: random

    def server(self, name: str) -> Server:
        for server in self.servers:
            if server.name == name:
                return server
        raise KeyError(f"no server named {name!r}")


# --- checks that span keys ---------------------------------------------------------------


def _check_registers(key: str, device: Device) -> list[Problem]:
    problems: list[Problem] = []
    for i, reg in enumerate(device.registers):
        here = f"{key}.registers[{i}]"
        last = reg.address + reg.width - 1
        if last > 0xFFFF:
            message = f"{reg.type} takes addresses {reg.address}..{last}, past the last one (65535)"
            problems.append(Problem(f"{here}.address", message))
        for j, other in enumerate(device.registers[:i]):
            other_last = other.address + other.width - 1
            if other.table == reg.table and reg.address <= other_last and other.address <= last:
                problems.append(
                    Problem(
                        f"{here}.address",
                        f"overlaps registers[{j}] (addresses {other.address}..{other_last})",
                    )
                )
                break
        signal = reg.signal
        if isinstance(signal, RampSignal):
            if (signal.min is None) != (signal.max is None):
                missing = "min" if signal.min is None else "max"
                message = "a ramp wraps between min and max: set both or neither"
                problems.append(Problem(f"{here}.signal.{missing}", message))
            elif signal.min is not None and signal.max is not None and signal.max <= signal.min:
                message = f"must be > min ({signal.min}), got {signal.max}"
                problems.append(Problem(f"{here}.signal.max", message))
    return problems


def check_sim_config(config: SimConfig) -> list[Problem]:
    """Rules across keys: unique names, addresses and units; registers that fit together."""
    problems: list[Problem] = []
    names: dict[str, int] = {}
    endpoints: dict[tuple[str, int], int] = {}
    for s, server in enumerate(config.servers):
        key = f"servers[{s}]"
        if (first := names.setdefault(server.name, s)) != s:
            problems.append(Problem(f"{key}.name", f"{server.name!r} is already used by servers[{first}]"))
        if (first := endpoints.setdefault((server.host, server.port), s)) != s:
            message = f"{server.host}:{server.port} is already used by servers[{first}]"
            problems.append(Problem(f"{key}.port", message))
        units: dict[int, int] = {}
        for d, device in enumerate(server.devices):
            here = f"{key}.devices[{d}]"
            if (first := units.setdefault(device.unit, d)) != d:
                message = f"unit {device.unit} is already used by devices[{first}]"
                problems.append(Problem(f"{here}.unit", message))
            problems.extend(_check_registers(here, device))
    return problems


# configkit drops a union tag from a key only right after a list index; for ``signal``
# pydantic reports ``...signal.sine.period``, a ``sine`` the user never wrote.
_SIGNAL_TAG = re.compile(r"\.signal\.(?:{})(?=\.|$)".format("|".join(_SIGNAL_KINDS)))


def load_sim_config(path: str | Path) -> SimConfig:
    """Load and check a simulator config; raise ConfigError listing every problem."""
    try:
        return load_config(path, SimConfig, checks=check_sim_config)
    except ConfigError as exc:
        problems = [Problem(_SIGNAL_TAG.sub(".signal", p.key), p.message) for p in exc.problems]
        raise ConfigError(exc.path, problems) from None
