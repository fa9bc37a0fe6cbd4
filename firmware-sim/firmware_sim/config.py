"""The simulator's config schema: servers, the devices behind them, their registers.

``configs/sim.toml`` is the annotated example. Everything the schema alone cannot
see (overlapping registers, duplicate units, names and endpoints after ``count``
expansion, types against tables and signals) is checked afterwards, and every
problem is reported with the dotted key the user wrote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fieldlink.configkit import ConfigError, Port, Problem, Schema, load_config

from .codec import BIT_TABLES, BYTE_ORDERS, REGISTER_WIDTH, ByteOrder, RegisterType, Table
from .register_checks import check_registers
from .serial_sensor import SerialSensorConfig
from .signal_specs import (
    SIGNAL_KINDS,
    ConstantSignal,
    RampSignal,
    RandomWalkSignal,
    SignalSpec,
    SineSignal,
    StepSignal,
)

__all__ = [
    "ConstantSignal",
    "Device",
    "ExpandedServer",
    "RampSignal",
    "RandomWalkSignal",
    "Register",
    "Server",
    "SignalSpec",
    "SimConfig",
    "SineSignal",
    "StepSignal",
    "check_sim_config",
    "load_sim_config",
]

ByteOrderName = Literal["ABCD", "CDAB", "BADC", "DCBA", "ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA"]
MAX_UNIT = 247


class Register(Schema):
    address: int = Field(ge=0, le=0xFFFF)  # 0-based, as on the wire
    table: Table = "holding"
    type: RegisterType = "uint16"
    scale: float = 1.0  # raw = value / scale
    byte_order: ByteOrderName = "ABCD"
    length: int | None = Field(default=None, ge=1, le=123)  # string: registers (2 characters each)
    bit: int | None = Field(default=None, ge=0, le=15)  # bool in a register table: its bit
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
        """Addresses taken: registers, or 1 for a bool (a coil, or a bit of one register)."""
        if self.type == "string":
            return self.length or 1
        return 1 if self.table in BIT_TABLES else REGISTER_WIDTH[self.type]

    @property
    def order(self) -> ByteOrder:
        return BYTE_ORDERS[self.byte_order]


class Device(Schema):
    unit: int = Field(ge=1, le=MAX_UNIT)  # Modbus unit id (slave address)
    count: int = Field(default=1, ge=1)  # that many units, unit..unit+count-1, same registers
    name: str = ""
    registers: list[Register] = Field(min_length=1)

    def units(self) -> range:
        return range(self.unit, self.unit + self.count)


class Server(Schema):
    name: str = Field(min_length=1)
    transport: Literal["tcp", "rtu", "rtu_tcp"] = "tcp"
    host: str = "127.0.0.1"  # tcp, rtu_tcp
    port: Port | None = None  # tcp, rtu_tcp
    serial_port: str | None = None  # rtu: the symlink the simulator creates to its pty
    count: int = Field(default=1, ge=1)  # that many servers: name-0.., consecutive ports
    devices: list[Device] = Field(min_length=1)


@dataclass(frozen=True)
class ExpandedServer:
    """One running server after ``count`` expansion; ``devices`` maps unit -> its spec."""

    name: str
    transport: Literal["tcp", "rtu", "rtu_tcp"]
    host: str
    port: int | None
    serial_port: str | None
    devices: dict[int, Device]
    source: int  # index in ``servers``, for messages

    @property
    def endpoint(self) -> str:
        return self.serial_port if self.serial_port is not None else f"{self.host}:{self.port}"


class SimConfig(Schema):
    servers: list[Server] = Field(default_factory=list)
    seed: int | None = None  # seeds random signals so runs are reproducible; unset: random
    # Serial sensors writing lines to ptys: each one's port is serial_dir/<name>.
    serial_dir: Path | None = None
    serial_sensors: list[SerialSensorConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _something_to_run(self) -> SimConfig:
        if not self.servers and not self.serial_sensors:
            raise ValueError("nothing to simulate: add [[servers]] or [[serial_sensors]]")
        if self.serial_sensors and self.serial_dir is None:
            raise ValueError("serial_dir is required with serial_sensors (the folder for their port symlinks)")
        names = [sensor.name for sensor in self.serial_sensors]
        if len(set(names)) < len(names):
            raise ValueError(f"serial sensor names must be unique, got {', '.join(sorted(names))}")
        return self

    def server(self, name: str) -> Server:
        for server in self.servers:
            if server.name == name:
                return server
        raise KeyError(f"no server named {name!r}")

    def expand(self) -> list[ExpandedServer]:
        """Every server and unit that runs: ``count`` copies get ``-0``, ``-1``... suffixes."""
        expanded = []
        for s, server in enumerate(self.servers):
            devices = {unit: device for device in server.devices for unit in device.units()}
            for i in range(server.count):
                many = server.count > 1
                expanded.append(
                    ExpandedServer(
                        name=f"{server.name}-{i}" if many else server.name,
                        transport=server.transport,
                        host=server.host,
                        port=None if server.port is None else server.port + i,
                        serial_port=f"{server.serial_port}-{i}" if many and server.serial_port else server.serial_port,
                        devices=devices,
                        source=s,
                    )
                )
        return expanded


# --- checks that span keys ---------------------------------------------------------------


def _check_transport(key: str, server: Server) -> list[Problem]:
    problems = []
    if server.transport == "rtu":
        if server.serial_port is None:
            problems.append(Problem(f"{key}.serial_port", "required key is missing (transport is rtu)"))
        if server.port is not None:
            problems.append(Problem(f"{key}.port", "an rtu server has a serial_port, not a port"))
    else:
        if server.port is None:
            problems.append(Problem(f"{key}.port", f"required key is missing (transport is {server.transport})"))
        if server.serial_port is not None:
            message = f"only an rtu server has one (transport is {server.transport})"
            problems.append(Problem(f"{key}.serial_port", message))
    if server.port is not None and (last := server.port + server.count - 1) > 65535:
        message = f"{server.count} servers take ports {server.port}..{last}, past 65535"
        problems.append(Problem(f"{key}.count", message))
    return problems


def _check_units(key: str, server: Server) -> list[Problem]:
    problems: list[Problem] = []
    owner: dict[int, int] = {}
    for d, device in enumerate(server.devices):
        here = f"{key}.devices[{d}]"
        if (last := device.unit + device.count - 1) > MAX_UNIT:
            message = f"{device.count} units take ids {device.unit}..{last}, past {MAX_UNIT}"
            problems.append(Problem(f"{here}.count", message))
        for unit in device.units():
            if (first := owner.setdefault(unit, d)) != d:
                problems.append(Problem(f"{here}.unit", f"unit {unit} is already used by devices[{first}]"))
                break
        problems.extend(check_registers(here, device.registers))
    return problems


def check_sim_config(config: SimConfig) -> list[Problem]:
    """Rules across keys: transports, unique names, endpoints and units; registers that fit."""
    transport = {s: _check_transport(f"servers[{s}]", server) for s, server in enumerate(config.servers)}
    clashes: dict[int, list[Problem]] = {s: [] for s in transport}
    if not any(transport.values()):  # expansion needs the ports and serial ports
        names: dict[str, int] = {}
        endpoints: dict[str, int] = {}
        for server in config.expand():
            s = server.source
            key = "serial_port" if server.serial_port else "port"
            for value, seen, field, shown in (
                (server.name, names, "name", repr(server.name)),
                (server.endpoint, endpoints, key, server.endpoint),
            ):
                if (first := seen.setdefault(value, s)) != s and not any(
                    p.key.endswith(f".{field}") for p in clashes[s]
                ):  # one message per key the user wrote, not one per copy
                    clashes[s].append(Problem(f"servers[{s}].{field}", f"{shown} is already used by servers[{first}]"))
    problems: list[Problem] = []
    for s, server in enumerate(config.servers):
        problems += transport[s] + clashes[s] + _check_units(f"servers[{s}]", server)
    return problems


# configkit drops a union tag from a key only right after a list index; for ``signal``
# pydantic reports ``...signal.sine.period``, a ``sine`` the user never wrote.
_SIGNAL_TAG = re.compile(r"\.signal\.(?:{})(?=\.|$)".format("|".join(SIGNAL_KINDS)))


def load_sim_config(path: str | Path) -> SimConfig:
    """Load and check a simulator config; raise ConfigError listing every problem."""
    try:
        return load_config(path, SimConfig, checks=check_sim_config)
    except ConfigError as exc:
        problems = [Problem(_SIGNAL_TAG.sub(".signal", p.key), p.message) for p in exc.problems]
        raise ConfigError(exc.path, problems) from None
