"""Modbus sources. Registers the ``modbus_tcp`` kind."""

from gateway.sources.modbus.config import ModbusTcpConfig
from gateway.sources.modbus.source import ModbusSource
from gateway.sources.registry import register_source

register_source("modbus_tcp", ModbusTcpConfig, ModbusSource)

__all__ = ["ModbusSource", "ModbusTcpConfig"]
