"""Config schema of the Modbus sources: one bus, the devices (unit ids) on it, their tags.

Three kinds share it, one per transport: ``modbus_tcp``, ``modbus_rtu`` (a serial
port) and ``modbus_rtu_tcp`` (RTU frames through a TCP serial device server).
Settings that usually hold for a whole bus (timeout, retries, address base, byte
order, request sizes) are set on the source and may be overridden per device.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from fieldlink.configkit import Duration, Port, Schema, TopicLevel
from gateway.sources.modbus.codec import ByteOrder, RegisterType

__all__ = [
    "BIT_TABLES",
    "MAX_BITS_PER_READ",
    "MAX_REGISTERS_PER_READ",
    "DeviceConfig",
    "ModbusBusConfig",
    "ModbusRtuConfig",
    "ModbusRtuTcpConfig",
    "ModbusTcpConfig",
    "RegisterConfig",
    "Table",
]

MAX_REGISTERS_PER_READ = 125  # the Modbus limit for function codes 3 and 4
MAX_BITS_PER_READ = 2000  # ... and for 1 and 2

Table = Literal["coil", "discrete_input", "holding", "input"]
BIT_TABLES: frozenset[str] = frozenset({"coil", "discrete_input"})
WRITABLE_TABLES: frozenset[str] = frozenset({"coil", "holding"})

ByteOrderName = Annotated[ByteOrder, BeforeValidator(lambda v: ByteOrder.parse(v) if isinstance(v, str) else v)]
AddressBase = Literal[0, 1]


def _decimal_places(number: float) -> int:
    exponent = Decimal(repr(number)).normalize().as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def _positive(value: float | None) -> float | None:
    if value is not None and value <= 0:
        raise ValueError(f"must be more than 0, got {value}")
    return value


class RegisterConfig(Schema):
    """One tag: where it lives, how to decode it, when to report it, whether it may be written."""

    name: str = Field(min_length=1)
    table: Table = "holding"
    address: int = Field(ge=0, le=65536, description="in the device's address_base")
    type: RegisterType | None = None  # default: bool in coil/discrete_input tables and with `bit`
    bit: int | None = Field(default=None, ge=0, le=15, description="a bool taken from one bit of a register")
    length: int | None = Field(default=None, ge=1, le=MAX_REGISTERS_PER_READ, description="string: registers")
    byte_order: ByteOrderName | None = None  # default: the device's, then the source's
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None
    poll_interval: Duration | None = None  # default: the group's, then the device's
    group: str | None = None
    # Report-by-exception: "poll" reports every poll; "change" only when the value moves
    # past the deadband (or its quality changes).
    report: Literal["poll", "change"] = "poll"
    deadband: float | None = Field(default=None, ge=0)
    deadband_percent: float | None = Field(default=None, gt=0)
    min_interval: Duration = 0.0  # report at most this often
    max_interval: Duration | None = None  # report at least this often, changed or not (heartbeat)
    writable: bool = False

    _check_interval = field_validator("poll_interval", "max_interval")(_positive)

    @model_validator(mode="after")
    def _consistent(self) -> RegisterConfig:
        kind = self.kind
        if self.type is None and self.table not in BIT_TABLES and self.bit is None:
            raise ValueError(f"type is required for {self.table} registers")
        if self.table in BIT_TABLES:
            if kind is not RegisterType.BOOL:
                raise ValueError(f"a {self.table} holds one bit: type must be bool, got {kind.value}")
            if self.bit is not None:
                raise ValueError(f"bit applies to registers, not to a {self.table}")
        if self.bit is not None and kind is not RegisterType.BOOL:
            raise ValueError("bit selects a bool from a register: type must be bool")
        if kind is RegisterType.BOOL and self.table not in BIT_TABLES and self.bit is None:
            raise ValueError("a bool in a register needs `bit` (0..15)")
        if (kind is RegisterType.STRING) != (self.length is not None):
            raise ValueError("length (registers) is required for a string, and only for one")
        if (self.scale != 1.0 or self.offset != 0.0) and not kind.is_numeric:
            raise ValueError(f"scale and offset apply to numbers, not to {kind.value}")
        if self.scale == 0:
            raise ValueError("scale must not be 0")
        return self

    @model_validator(mode="after")
    def _reporting(self) -> RegisterConfig:
        kind = self.kind
        if self.report == "poll" and (self.deadband is not None or self.deadband_percent is not None):
            raise ValueError('a deadband applies to report = "change"')
        if (self.deadband is not None or self.deadband_percent is not None) and not kind.is_numeric:
            raise ValueError(f"a deadband applies to numbers, not to {kind.value}")
        if self.max_interval is not None and self.min_interval >= self.max_interval:
            raise ValueError(f"min_interval ({self.min_interval:g}s) must be below max_interval")
        if self.writable and self.table not in WRITABLE_TABLES:
            raise ValueError(f"a {self.table} cannot be written (only coils and holding registers)")
        if self.poll_interval is not None and self.group is not None:
            raise ValueError("set poll_interval or group, not both")
        return self

    @property
    def kind(self) -> RegisterType:
        return self.type or RegisterType.BOOL

    @property
    def width(self) -> int:
        """Registers (or bits) the tag occupies."""
        if self.table in BIT_TABLES or self.bit is not None:
            return 1
        return self.length if self.kind is RegisterType.STRING and self.length else self.kind.width

    @property
    def is_bit_table(self) -> bool:
        return self.table in BIT_TABLES

    @property
    def decimals(self) -> int:
        """Decimal places an integer register can carry after scale and offset (0.01 -> 2).

        Rounding to them turns 165 * 0.01 into 1.65 instead of 1.6500000000000001.
        """
        return max(_decimal_places(self.scale), _decimal_places(self.offset))

    @property
    def keeps_integer(self) -> bool:
        """An integer register stays an integer field unless scale/offset make it a measurement."""
        return self.kind.is_integer and self.scale == 1.0 and self.offset == 0.0


class DeviceConfig(Schema):
    name: TopicLevel
    unit: int = Field(default=1, ge=0, le=255, description="Modbus unit id")
    poll_interval: Duration = 1.0
    groups: dict[str, Duration] = Field(default_factory=dict, description="poll interval per group name")
    # Overrides of the source's settings; unset: the source's value.
    timeout: Duration | None = None
    retries: int | None = Field(default=None, ge=0, le=10)
    address_base: AddressBase | None = None
    byte_order: ByteOrderName | None = None
    max_registers_per_request: int | None = Field(default=None, ge=1, le=MAX_REGISTERS_PER_READ)
    max_gap: int | None = Field(default=None, ge=0, le=MAX_REGISTERS_PER_READ)
    registers: list[RegisterConfig] = Field(min_length=1)

    _check_interval = field_validator("poll_interval", "timeout")(_positive)

    @field_validator("groups")
    @classmethod
    def _positive_groups(cls, groups: dict[str, float]) -> dict[str, float]:
        for name, interval in groups.items():
            if interval <= 0:
                raise ValueError(f"group {name!r}: interval must be more than 0, got {interval}")
        return groups

    @model_validator(mode="after")
    def _tags(self) -> DeviceConfig:
        seen: set[str] = set()
        for register in self.registers:
            if register.name in seen:
                raise ValueError(f"register name {register.name!r} is used twice")
            seen.add(register.name)
            if register.group is not None and register.group not in self.groups:
                known = ", ".join(sorted(self.groups)) or "none defined"
                raise ValueError(f"register {register.name!r}: no group {register.group!r} ({known})")
        return self

    def interval_of(self, register: RegisterConfig) -> float:
        if register.poll_interval is not None:
            return register.poll_interval
        if register.group is not None:
            return self.groups[register.group]
        return self.poll_interval


class ModbusBusConfig(Schema):
    """What every Modbus transport shares: the bus, its timing, the defaults for its devices."""

    name: str = Field(min_length=1)
    timeout: Duration = 1.0  # per request
    retries: int = Field(default=1, ge=0, le=10)  # extra attempts after a timeout
    inter_frame_delay: Duration | None = None  # quiet time between requests; default 0 (TCP), 3.5 chars (RTU)
    retry_min: Duration = 1.0  # backoff of a failing device, doubling up to retry_max
    retry_max: Duration = 60.0
    breaker_threshold: int = Field(default=3, ge=1)  # failed polls in a row before a device is degraded
    offline_after: int = Field(default=10, ge=1)  # failed polls in a row before it is offline
    address_base: AddressBase = 0
    byte_order: ByteOrderName = ByteOrder.ABCD
    max_registers_per_request: int = Field(default=MAX_REGISTERS_PER_READ, ge=1, le=MAX_REGISTERS_PER_READ)
    max_gap: int = Field(default=16, ge=0, le=MAX_REGISTERS_PER_READ)  # unused registers a merged read may span
    devices: list[DeviceConfig] = Field(min_length=1)

    _check_timeout = field_validator("timeout")(_positive)

    @model_validator(mode="after")
    def _devices(self) -> ModbusBusConfig:
        if self.retry_max < self.retry_min:
            raise ValueError(f"retry_max ({self.retry_max:g}s) must be at least retry_min ({self.retry_min:g}s)")
        if self.offline_after < self.breaker_threshold:
            raise ValueError("offline_after must be at least breaker_threshold")
        units: dict[int, str] = {}
        for device in self.devices:
            if device.unit in units:
                raise ValueError(f"devices {units[device.unit]!r} and {device.name!r} share unit {device.unit}")
            units[device.unit] = device.name
            base = self.address_base if device.address_base is None else device.address_base
            for register in device.registers:
                if register.address < base:
                    raise ValueError(
                        f"device {device.name!r} register {register.name!r}: address {register.address}"
                        f" is below address_base {base}"
                    )
                if register.address - base + register.width > 65536:
                    raise ValueError(f"device {device.name!r} register {register.name!r} runs past the last address")
        return self

    @property
    def endpoint(self) -> str:
        raise NotImplementedError


class ModbusTcpConfig(ModbusBusConfig):
    kind: Literal["modbus_tcp"]
    host: str
    port: Port = 502

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.port}"


class ModbusRtuTcpConfig(ModbusBusConfig):
    """RTU frames (with CRC) over TCP: serial device servers in transparent mode."""

    kind: Literal["modbus_rtu_tcp"]
    host: str
    port: Port

    @property
    def endpoint(self) -> str:
        return f"rtu+tcp://{self.host}:{self.port}"


Parity = Literal["N", "E", "O"]
_PARITY_NAMES = {"none": "N", "even": "E", "odd": "O"}


class ModbusRtuConfig(ModbusBusConfig):
    kind: Literal["modbus_rtu"]
    serial_port: str = Field(min_length=1, description="e.g. /dev/ttyUSB0")
    baudrate: int = Field(default=19200, gt=0)
    parity: Annotated[Parity, BeforeValidator(lambda v: _PARITY_NAMES.get(str(v).lower(), v))] = "E"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8

    @property
    def endpoint(self) -> str:
        return f"rtu://{self.serial_port}"

    @property
    def char_time(self) -> float:
        """Seconds one character takes on the line (start + data + parity + stop bits)."""
        bits = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return bits / self.baudrate
