"""Imports every built-in source plugin so that each registers itself."""

from gateway.sources import modbus, serial  # noqa: F401
