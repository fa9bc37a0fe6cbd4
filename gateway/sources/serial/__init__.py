"""Serial sensors (RS-232/485 via pyserial): line or fixed-length frames, kv/csv/json/regex/NMEA parsers.

Registers the ``serial`` source kind. ``docs/sources-serial.md`` describes the config.
"""

from gateway.sources.registry import register_source
from gateway.sources.serial.config import SerialConfig
from gateway.sources.serial.source import SerialSource

register_source("serial", SerialConfig, SerialSource)

__all__ = ["SerialConfig", "SerialSource"]
