"""The durable half of store-and-forward: an SQLite (WAL) table of messages awaiting PUBACK.

Synchronous and confined to one thread (the async facade in ``service.py`` owns that
thread). One ``write`` call is one transaction: new messages, the sequence numbers
they consumed, and the deletions of messages the cloud broker acknowledged. That is
group commit: durability costs one fsync per batch, not one per record.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BufferStats", "Entry", "NewMessage", "SqliteStore", "StoreCorrupt", "produced_records"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- AUTOINCREMENT: ids are never reused, so "everything after id N" stays meaningful
-- for the uplink even after the table was emptied.
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0,
    device TEXT,
    seq INTEGER,
    created_ms INTEGER NOT NULL
);
-- The last sequence number handed out per device. Kept apart from messages so that
-- it survives the messages being delivered and deleted.
CREATE TABLE IF NOT EXISTS sequences (device TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
"""


class StoreCorrupt(Exception):
    """The database file is unreadable; the caller moves it aside and starts a new one."""


@dataclass(frozen=True, slots=True)
class NewMessage:
    topic: str
    payload: bytes
    retain: bool = False
    device: str | None = None
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class Entry:
    """A buffered message: sent, and deleted once the broker acknowledged it."""

    id: int
    topic: str
    payload: bytes
    retain: bool
    is_record: bool  # telemetry (has a device sequence number), as opposed to status messages


@dataclass(frozen=True, slots=True)
class BufferStats:
    messages: int  # telemetry records and status messages awaiting PUBACK
    bytes: int
    oldest_ms: int | None


class SqliteStore:
    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self.path = path
        self._synchronous = synchronous
        self._db: sqlite3.Connection | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def open(self) -> Path | None:
        """Open or create the database. A corrupt file is moved aside: returns where it went."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._connect()
        except (sqlite3.DatabaseError, StoreCorrupt) as exc:
            self.close()
            moved = self._move_aside()
            log.error("buffer database corrupt; moved aside", extra={"path": str(moved), "error": str(exc)})
            self._connect()
            return moved
        return None

    def _connect(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise StoreCorrupt("quick_check failed")
        db.executescript(_SCHEMA)
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} was written by a newer fieldlink (schema {row[0]}, this one knows {SCHEMA_VERSION})"
            )

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                source.rename(Path(f"{target}{suffix}"))
        return target

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("buffer store is not open")
        return self._db

    # --- operations ----------------------------------------------------------------------

    def write(
        self, messages: Iterable[NewMessage], sequences: Mapping[str, int], delete_ids: Iterable[int]
    ) -> list[int]:
        """One transaction: append messages, record sequence numbers, delete acknowledged ids."""
        now = time.time_ns() // 1_000_000
        ids: list[int] = []
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for m in messages:
                cursor = db.execute(
                    "INSERT INTO messages (topic, payload, retain, device, seq, created_ms) VALUES (?, ?, ?, ?, ?, ?)",
                    (m.topic, m.payload, int(m.retain), m.device, m.seq, now),
                )
                ids.append(int(cursor.lastrowid or 0))
            if sequences:
                db.executemany(
                    "INSERT INTO sequences (device, last_seq) VALUES (?, ?) "
                    "ON CONFLICT(device) DO UPDATE SET last_seq = excluded.last_seq",
                    sequences.items(),
                )
            deletes = [(i,) for i in delete_ids]
            if deletes:
                db.executemany("DELETE FROM messages WHERE id = ?", deletes)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return ids

    def read(self, after_id: int, limit: int) -> list[Entry]:
        rows = self.db.execute(
            "SELECT id, topic, payload, retain, seq IS NOT NULL FROM messages WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [Entry(r[0], r[1], bytes(r[2]), bool(r[3]), bool(r[4])) for r in rows]

    def seq_floor(self) -> int:
        """Sequence numbers of every device start above this (set after a corrupt file was replaced)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'seq_floor'").fetchone()
        return 0 if row is None else int(row[0])

    def set_seq_floor(self, floor: int) -> None:
        self.db.execute(
            "INSERT INTO meta VALUES ('seq_floor', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (str(floor),),
        )

    def sequences(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT device, last_seq FROM sequences").fetchall())

    def stats(self) -> BufferStats:
        count, size, oldest = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), MIN(created_ms) FROM messages"
        ).fetchone()
        return BufferStats(int(count), int(size), oldest)


def produced_records(path: Path) -> set[tuple[str, int]]:
    """Every (device, seq) a buffer file has handed out, read-only (works beside a running gateway).

    Sequence numbers are contiguous from 1 per device, so the sequence table says it
    all; the demo and the tests compare this with what the cloud stored.
    """
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        floor_row = db.execute("SELECT value FROM meta WHERE key = 'seq_floor'").fetchone()
        rows = db.execute("SELECT device, last_seq FROM sequences").fetchall()
    finally:
        db.close()
    floor = 0 if floor_row is None else int(floor_row[0])
    return {(device, seq) for device, last in rows for seq in range(floor + 1, last + 1)}
