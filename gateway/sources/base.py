"""What every source (Modbus bus, serial port, ...) promises the gateway.

A source owns its devices: it polls them, turns raw data into typed values and hands
each poll to the :class:`ReadingSink` as one :class:`Reading`. It reports every
device's state (online / offline with the reason) to the sink as well.

Contract of ``Source.run``: runs until cancelled, never returns and never raises
for device trouble (timeouts, refused connections, bad frames are reported as device
state and retried with backoff); cancellation closes its connections.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from fieldlink.wire import Value

__all__ = ["CommandError", "DeviceState", "Reading", "ReadingSink", "Source", "WritableSource"]


class DeviceState(StrEnum):
    ONLINE = "online"
    DEGRADED = "degraded"  # failing repeatedly: its circuit breaker is open, it is retried with backoff
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class Reading:
    """One poll of one device; ``ts`` is milliseconds since the Unix epoch."""

    device: str
    ts: int
    values: Mapping[str, Value]


class ReadingSink(Protocol):
    async def submit_reading(self, reading: Reading) -> None:
        """Take a reading; returns once it is durably buffered."""

    async def device_state(self, device: str, state: DeviceState, reason: str | None) -> None:
        """Record that a device changed state; called on changes only."""


class Source(Protocol):
    name: str

    @property
    def devices(self) -> list[str]: ...

    async def run(self, sink: ReadingSink) -> None: ...

    def counters(self) -> dict[str, int]:
        """Monotonic counters for the health topic (requests, errors, ...)."""
        ...


class CommandError(Exception):
    """A command a source refused or could not carry out.

    ``status`` is what the command result says: ``"error"`` (refused, or the device
    answered with an error) or ``"timeout"`` (the device did not answer).
    """

    def __init__(self, reason: str, status: str = "error") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class WritableSource(Source, Protocol):
    """A source whose devices accept writes (the gateway routes ``cmd`` topics to it)."""

    async def write(self, device: str, tag: str, value: object) -> None:
        """Write ``value`` to ``tag`` of ``device``; raises CommandError saying why not."""
        ...
