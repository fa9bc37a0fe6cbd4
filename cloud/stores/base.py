"""What every time-series store promises the ingest pipeline.

``write`` returns only when the records are durable in the store, or raises
:class:`StoreUnavailable` (the pipeline keeps the MQTT messages unacknowledged and
retries) or :class:`StoreRejected` (the pipeline isolates the records the store
refuses, reports them and goes on: one bad record must not stall the rest).

Writes are idempotent: a record written twice is one point, because points are
keyed by series (site, gateway, device, metric) and timestamp.

Records come as :class:`Record` or, from the ingest hot path, as :class:`ScannedRecord`
(values without Value objects); a store that has no use for the latter's compact form
calls :func:`fieldlink.wire.as_record` on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from fieldlink.wire import Record, ScannedRecord

__all__ = ["PreparingStore", "Store", "StoreRejected", "StoreUnavailable"]


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

    async def write(self, records: Sequence[Record | ScannedRecord]) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class PreparingStore(Store, Protocol):
    """Optional: a store that turns records into its own request text ahead of the write.

    ``prepare`` is pure and returns one item per record, in order; the ingest pipeline
    calls it as messages are decoded (while the previous round is being written), drops
    the items of the records it does not keep (duplicates) and hands the rest to
    ``write_prepared``, which promises what ``write`` promises.
    """

    def prepare(self, records: Sequence[Record | ScannedRecord]) -> list[str]: ...

    async def write_prepared(self, prepared: Sequence[str]) -> None: ...
