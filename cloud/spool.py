"""The cloud's own durable spool: records the store could not take, kept until it can.

When the store is down, the ingest pipeline commits the batch's records here
(SQLite, ``synchronous=FULL``) and then acknowledges the MQTT messages, so an
outage of the store neither fills the broker's queues nor blocks the pipeline. A
drainer writes the spooled batches to the store, oldest first, and deletes each one
only after the store took it. A crash between the write and the delete writes the
batch again: the store is idempotent (a point is keyed by its tags and timestamp).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import msgpack

from fieldlink.sqlite_file import SqliteFile
from fieldlink.wire import Encoding, Record, decode, encode_record

__all__ = ["Spool"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    records INTEGER NOT NULL,
    body BLOB NOT NULL            -- msgpack list of record envelopes (msgpack)
);
"""

DRAIN_BATCHES = 8  # spooled batches written to the store per round


class Spool:
    def __init__(self, path: Path) -> None:
        self._file = SqliteFile(path, _SCHEMA, name="spool")
        self.records = 0  # records waiting in the spool
        self.oldest_ms: int | None = None
        self.spooled_total = 0
        self.drained_total = 0
        self._wake = asyncio.Event()
        # add() and the drainer's "is it empty?" must not interleave, or a batch added
        # while the drainer looks could be counted away and wait for the next outage.
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        def totals(db: sqlite3.Connection) -> tuple[int, int | None]:
            count, oldest = db.execute("SELECT COALESCE(SUM(records), 0), MIN(created_ms) FROM spool").fetchone()
            return int(count), oldest

        self.records, self.oldest_ms = await self._file.run(totals)
        if self.records:
            log.warning("spool holds records from before the restart; draining", extra={"records": self.records})
            self._wake.set()

    async def close(self) -> None:
        await self._file.close()

    @property
    def empty(self) -> bool:
        return self.records == 0

    async def add(self, records: Sequence[Record]) -> None:
        """Commit ``records`` to disk; returns once they survive a crash."""
        body = msgpack.packb([encode_record(r, Encoding.MSGPACK) for r in records])
        now = time.time_ns() // 1_000_000

        def insert(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO spool (created_ms, records, body) VALUES (?, ?, ?)", (now, len(records), body))

        async with self._lock:
            await self._file.run(insert)
            self.records += len(records)
            self.spooled_total += len(records)
            if self.oldest_ms is None:
                self.oldest_ms = now
            self._wake.set()

    async def drain(self, write: Callable[[Sequence[Record]], Awaitable[None]]) -> None:
        """Forever: hand the oldest spooled batches to ``write`` and delete them once it returns.

        ``write`` retries on its own until the store takes the records (or leaves out
        the ones the store refuses for good); an exception from it stops the drain.
        """
        while True:
            await self._wake.wait()
            async with self._lock:
                rows = await self._file.run(
                    lambda db: db.execute(
                        "SELECT id, records, body FROM spool ORDER BY id LIMIT ?", (DRAIN_BATCHES,)
                    ).fetchall()
                )
                if not rows:
                    self._wake.clear()
                    self.records, self.oldest_ms = 0, None
                    continue
            for row_id, count, body in rows:
                records = [record for envelope in msgpack.unpackb(body) for record in decode(envelope)]
                await write(records)
                await self._file.run(lambda db, i=row_id: db.execute("DELETE FROM spool WHERE id = ?", (i,)))
                self.records -= count
                self.drained_total += count
            oldest = await self._file.run(lambda db: db.execute("SELECT MIN(created_ms) FROM spool").fetchone()[0])
            self.oldest_ms = oldest
            if self.records == 0:
                log.info("spool drained", extra={"drained": self.drained_total})
