"""The cloud uplink: the buffer, forwarded at QoS 1 in two lanes, deleted only after PUBACK."""

from gateway.uplink.config import UplinkConfig
from gateway.uplink.link import CommandHandler, Uplink

__all__ = ["CommandHandler", "Uplink", "UplinkConfig"]
