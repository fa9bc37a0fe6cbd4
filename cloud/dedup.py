"""Drops records the cloud already stored: replays after a lost PUBACK, broker redeliveries.

Per (site, gateway, device) it remembers the most recent ``window`` sequence numbers.
A record is marked seen only after it was stored (``commit``), so a failed write
followed by a redelivery is never mistaken for a duplicate. Records older than the
window pass through; the store is idempotent and rules ignore stale records anyway.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from fieldlink.wire import Record

__all__ = ["Deduplicator"]


class _Window:
    __slots__ = ("heap", "seen")

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.heap: list[int] = []


class Deduplicator:
    def __init__(self, window: int = 4096) -> None:
        self.window = window
        self._series: dict[tuple[str, str, str], _Window] = {}
        self.dropped_total = 0

    def fresh(self, records: Sequence[Record]) -> list[Record]:
        """The records not seen before (and not repeated within this batch)."""
        out: list[Record] = []
        batch: set[tuple[str, str, str, int]] = set()
        for r in records:
            key = (r.site, r.gateway, r.device, r.seq)
            window = self._series.get(key[:3])
            if key in batch or (window is not None and r.seq in window.seen):
                self.dropped_total += 1
                continue
            batch.add(key)
            out.append(r)
        return out

    def commit(self, records: Iterable[Record]) -> None:
        """Remember these records as stored."""
        for r in records:
            window = self._series.setdefault((r.site, r.gateway, r.device), _Window())
            if r.seq in window.seen:
                continue
            window.seen.add(r.seq)
            heapq.heappush(window.heap, r.seq)
            if len(window.heap) > self.window:
                window.seen.discard(heapq.heappop(window.heap))
