"""What every time-series store promises the ingest pipeline.

``write`` returns only when the records are durable in the store, or raises
:class:`StoreUnavailable` (the pipeline keeps the MQTT messages unacknowledged and
retries) or :class:`StoreRejected` (the pipeline isolates the records the store
refuses, reports them and goes on: one bad record must not stall the rest).

Writes are idempotent: a record written twice is one point, because points are
keyed by series (site, gateway, device, metric) and timestamp.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fieldlink.wire import Record

__all__ = ["Store", "StoreRejected", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """The store did not take the write (down, overloaded, refused); retry later."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class StoreRejected(Exception):
    """The store refused these records for good (malformed, field type conflict); retrying cannot help."""


class Store(Protocol):
    name: str

    async def open(self) -> None: ...

    async def write(self, records: Sequence[Record]) -> None: ...

    async def close(self) -> None: ...
