"""Config schema of the ``modbus_tcp`` source: one TCP connection, several unit ids, register maps."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fieldlink.configkit import Duration, Port, Schema, TopicLevel
from gateway.sources.modbus.codec import ByteOrder, RegisterType

__all__ = ["DeviceConfig", "ModbusTcpConfig", "RegisterConfig"]

MAX_REGISTERS_PER_READ = 125  # the Modbus limit for function codes 3 and 4


def _decimal_places(number: float) -> int:
    exponent = Decimal(repr(number)).normalize().as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


class RegisterConfig(Schema):
    """One tag: where it lives, how to decode it, and what it means."""

    name: str = Field(min_length=1)
    address: int = Field(ge=0, le=65535, description="0-based register address")
    table: Literal["holding", "input"] = "holding"
    type: RegisterType
    byte_order: ByteOrder = ByteOrder.ABCD
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None

    @model_validator(mode="after")
    def _fits(self) -> RegisterConfig:
        if self.address + self.type.width > 65536:
            raise ValueError(f"{self.type.value} at address {self.address} runs past register 65535")
        return self

    @property
    def decimals(self) -> int:
        """Decimal places an integer register can carry after scale and offset (0.01 -> 2).

        Rounding to them turns 165 * 0.01 into 1.65 instead of 1.6500000000000001.
        """
        return max(_decimal_places(self.scale), _decimal_places(self.offset))

    @property
    def keeps_integer(self) -> bool:
        """An integer register stays an integer field unless scale/offset make it a measurement."""
        return self.type.is_integer and self.scale == 1.0 and self.offset == 0.0


class DeviceConfig(Schema):
    name: TopicLevel
    unit: int = Field(default=1, ge=0, le=255, description="Modbus unit id")
    poll_interval: Duration = 1.0
    registers: list[RegisterConfig] = Field(min_length=1)

    @field_validator("poll_interval")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"must be more than 0, got {value}")
        return value

    @model_validator(mode="after")
    def _unique_tags(self) -> DeviceConfig:
        seen: set[str] = set()
        for register in self.registers:
            if register.name in seen:
                raise ValueError(f"register name {register.name!r} is used twice")
            seen.add(register.name)
        return self


class ModbusTcpConfig(Schema):
    kind: Literal["modbus_tcp"]
    name: str = Field(min_length=1)
    host: str
    port: Port = 502
    timeout: Duration = 1.0
    retry_min: Duration = 1.0
    retry_max: Duration = 60.0
    devices: list[DeviceConfig] = Field(min_length=1)
