"""Drops records the cloud already stored: replays after a lost PUBACK, broker redeliveries.

Per (site, gateway, device) it remembers the most recent ``window`` sequence numbers.
A record is marked seen only after it was stored (``commit``), so a failed write
followed by a redelivery is never mistaken for a duplicate. Records older than the
window pass through; the store is idempotent and rules ignore stale records anyway.

Both methods run once per record on the ingest hot path. A ScannedRecord's shape keeps
a reference to its series' window (``RecordShape.formats``), so most records cost a
dict lookup by identity and two set operations on ints.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from heapq import heappush, heappushpop
from typing import TypeVar

from fieldlink.wire import Record, ScannedRecord

__all__ = ["Deduplicator"]

R = TypeVar("R", bound=Record | ScannedRecord)
Series = tuple[str, str, str]


class _Window:
    __slots__ = ("batch", "heap", "round", "seen")

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.heap: list[int] = []  # the same seqs, the lowest first: the next to forget
        self.round = 0  # the fresh() call that ``batch`` belongs to
        self.batch: set[int] = set()  # seqs of this series in that call


class Deduplicator:
    def __init__(self, window: int = 4096) -> None:
        self.window = window
        self._series: dict[Series, _Window] = {}
        self._rounds = 0
        self._key = object()  # this deduplicator's entry in RecordShape.formats
        self.dropped_total = 0

    def _window(self, record: Record | ScannedRecord) -> _Window:
        if type(record) is ScannedRecord:
            shape = record[0]
            window: _Window | None = shape.formats.get(self._key)
            if window is None:
                window = shape.formats[self._key] = self._window_of(shape.series)
            return window
        return self._window_of((record.site, record.gateway, record.device))

    def _window_of(self, series: Series) -> _Window:
        window = self._series.get(series)
        if window is None:
            window = self._series[series] = _Window()
        return window

    def fresh(self, records: Sequence[R]) -> list[R]:
        """The records not seen before (and not repeated within this batch)."""
        self._rounds += 1
        this_round = self._rounds
        out: list[R] = []
        dropped = 0
        for r in records:
            window = self._window(r)
            seq = r[1] if type(r) is ScannedRecord else r.seq  # type: ignore[index,union-attr]
            if window.round != this_round:
                window.round, window.batch = this_round, set()
            if seq in window.seen or seq in window.batch:
                dropped += 1
                continue
            window.batch.add(seq)
            out.append(r)
        self.dropped_total += dropped
        return out

    def commit(self, records: Iterable[Record | ScannedRecord]) -> None:
        """Remember these records as stored."""
        limit = self.window
        for r in records:
            window = self._window(r)
            seq = r[1] if type(r) is ScannedRecord else r.seq  # type: ignore[index,union-attr]
            seen = window.seen
            if seq in seen:
                continue
            seen.add(seq)
            if len(window.heap) < limit:
                heappush(window.heap, seq)
            else:
                seen.discard(heappushpop(window.heap, seq))
