"""Modbus sources, one kind per transport: ``modbus_tcp``, ``modbus_rtu``, ``modbus_rtu_tcp``."""

from gateway.sources.modbus.config import ModbusRtuConfig, ModbusRtuTcpConfig, ModbusTcpConfig
from gateway.sources.modbus.source import ModbusSource
from gateway.sources.registry import register_source

register_source("modbus_tcp", ModbusTcpConfig, ModbusSource)
register_source("modbus_rtu", ModbusRtuConfig, ModbusSource)
register_source("modbus_rtu_tcp", ModbusRtuTcpConfig, ModbusSource)

__all__ = ["ModbusRtuConfig", "ModbusRtuTcpConfig", "ModbusSource", "ModbusTcpConfig"]
