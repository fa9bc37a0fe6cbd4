"""The durable half of store-and-forward: an SQLite (WAL) table of messages awaiting PUBACK.

Synchronous and confined to one thread (the async facade in ``service.py`` owns that
thread). One :meth:`SqliteStore.commit` is one transaction: evictions the bounds
demand, new messages, the sequence numbers they consumed, and the deletions of
messages the cloud broker acknowledged. That is group commit: durability costs one
fsync per batch, not one per record.

The store keeps running totals (messages and bytes per priority class) so that the
bounds and the health report never need a full-table scan.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "BufferStats",
    "Commit",
    "CommitResult",
    "Entry",
    "NewMessage",
    "Priority",
    "SqliteStore",
    "StoreCorrupt",
    "produced_records",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- The buffer assigns ids itself, counting on from the largest at open (spill mode hands
-- entries to the uplink before they reach the disk). No AUTOINCREMENT: it would rewrite
-- sqlite_sequence in every commit, a page write per commit for nothing (SD cards).
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0,
    device TEXT,
    seq INTEGER,
    created_ms INTEGER NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0
);
-- The last sequence number handed out per device. Kept apart from messages so that
-- it survives the messages being delivered and deleted.
CREATE TABLE IF NOT EXISTS sequences (device TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
"""

# Only the rare control messages are indexed: the uplink's live lane finds the ones
# inside an old backlog without scanning it, and telemetry inserts pay nothing.
_CONTROL_INDEX = "CREATE INDEX IF NOT EXISTS control_messages ON messages (id) WHERE priority > 0"

_MIGRATIONS = {
    # v1 -> v2: priority classes. v1 status messages were the rows without a sequence number.
    1: [
        "ALTER TABLE messages ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "UPDATE messages SET priority = 1 WHERE seq IS NULL",
    ],
}

_SIZE = "LENGTH(topic) + LENGTH(payload)"
_ENTRY_COLUMNS = f"id, topic, payload, retain, priority, created_ms, {_SIZE}"
EVICT_CHUNK = 2000


class Priority(enum.IntEnum):
    """Eviction classes: control messages go only after every telemetry record is gone."""

    TELEMETRY = 0
    CONTROL = 1  # device and gateway status, alarms, command results


class StoreCorrupt(Exception):
    """The database file is unreadable; the caller moves it aside and starts a new one."""


@dataclass(frozen=True, slots=True)
class NewMessage:
    id: int
    topic: str
    payload: bytes
    retain: bool
    priority: Priority
    created_ms: int
    device: str | None = None
    seq: int | None = None

    @property
    def size(self) -> int:
        # What SQLite's LENGTH() says for the same row: characters of the topic, bytes of the payload.
        return len(self.topic) + len(self.payload)

    def entry(self) -> Entry:
        return Entry(self.id, self.topic, self.payload, self.retain, self.priority, self.created_ms, self.size)


@dataclass(frozen=True, slots=True)
class Entry:
    """A buffered message: sent, and deleted once the broker acknowledged it."""

    id: int
    topic: str
    payload: bytes
    retain: bool
    priority: Priority
    created_ms: int
    size: int  # topic + payload bytes: what the bounds count

    @property
    def is_record(self) -> bool:
        return self.priority is Priority.TELEMETRY


@dataclass(frozen=True, slots=True)
class BufferStats:
    messages: int  # telemetry records and control messages awaiting PUBACK
    records: int  # of which telemetry records
    bytes: int  # topic + payload bytes (what max_bytes bounds)
    oldest_ms: int | None
    memory_messages: int = 0  # spill mode: held in memory, not yet on disk
    file_bytes: int = 0  # the database file and its WAL on disk


@dataclass(slots=True)
class Commit:
    """Everything one transaction does: delete, evict, expire, then append."""

    evict_bytes: int = 0  # free at least this many bytes: oldest telemetry first, then control
    expire_before_ms: int | None = None  # delete telemetry created before this
    messages: list[NewMessage] = field(default_factory=list)
    sequences: Mapping[str, int] = field(default_factory=dict)
    delete_ids: list[int] = field(default_factory=list)
    durable: bool = True  # False: deletes only; a lost delete after power loss is a harmless duplicate


@dataclass(slots=True)
class CommitResult:
    evicted: dict[Priority, int] = field(default_factory=dict)  # messages removed to make room
    evicted_ids: list[int] = field(default_factory=list)
    expired: int = 0
    expired_ids: list[int] = field(default_factory=list)
    # The store's totals after this commit, for the asyncio side to take over atomically.
    count: dict[Priority, int] = field(default_factory=dict)
    bytes: dict[Priority, int] = field(default_factory=dict)


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        # A second connection for the uplink's reads, used from another thread: in WAL mode it
        # reads the last committed state while the writer commits, and SQLite releases the
        # GIL while it works, so replay reads and deletes run side by side on two cores.
        self._reader: sqlite3.Connection | None = None
        self._synchronous = ""
        # Running totals per priority class, set at open and kept exact from RETURNING clauses.
        self.free_page_bytes = 0  # unused pages inside the file, as of the last commit
        self._page_size = 4096
        self.count: dict[Priority, int] = dict.fromkeys(Priority, 0)
        self.bytes: dict[Priority, int] = dict.fromkeys(Priority, 0)

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
        self._set_synchronous("FULL")
        # Truncate the WAL after checkpoints so it does not keep the size of the largest burst.
        db.execute("PRAGMA journal_size_limit=8388608")
        if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise StoreCorrupt("quick_check failed")
        db.executescript(_SCHEMA)
        self._page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = SCHEMA_VERSION if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} was written by a newer fieldlink (schema {version}, this one knows {SCHEMA_VERSION})"
            )
        db.execute("BEGIN IMMEDIATE")
        for from_version in range(version, SCHEMA_VERSION):
            for statement in _MIGRATIONS[from_version]:
                db.execute(statement)
            log.info("buffer schema migrated", extra={"from": from_version, "to": from_version + 1})
        db.execute(_CONTROL_INDEX)
        # Totals saved by a clean close are exact; after a crash they are counted again (a full
        # scan: seconds for millions of rows). Taking the flag away makes a crash count again.
        saved = db.execute("DELETE FROM meta WHERE key = 'totals' RETURNING value").fetchone()
        db.execute(
            "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (str(SCHEMA_VERSION),),
        )
        db.execute("COMMIT")
        self._update_free_pages()
        self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._reader.execute("PRAGMA query_only=1")
        if saved is not None:
            for priority, (count, size) in json.loads(saved[0]).items():
                self.count[Priority(int(priority))], self.bytes[Priority(int(priority))] = count, size
            return
        for priority, count, size in db.execute(f"SELECT priority, COUNT(*), SUM({_SIZE}) FROM messages GROUP BY 1"):
            self.count[Priority(priority)] = int(count)
            self.bytes[Priority(priority)] = int(size or 0)

    def _set_synchronous(self, level: str) -> None:
        if level != self._synchronous:
            self.db.execute(f"PRAGMA synchronous={level}")
            self._synchronous = level

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                source.rename(Path(f"{target}{suffix}"))
        return target

    def close(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(sqlite3.Error):
                self._reader.close()
            self._reader = None
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                totals = {int(p): (self.count[p], self.bytes[p]) for p in Priority}
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('totals', ?)", (json.dumps(totals),))
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    @property
    def reader(self) -> sqlite3.Connection:
        """For reads only, from the reader thread (see ``SqliteStore.__init__``)."""
        if self._reader is None:
            raise RuntimeError("buffer store is not open")
        return self._reader

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("buffer store is not open")
        return self._db

    # --- the one write path --------------------------------------------------------------

    def commit(self, plan: Commit) -> CommitResult:
        """One transaction: delete acknowledged ids, evict, expire, append, record sequence numbers."""
        db = self.db
        result = CommitResult()
        self._set_synchronous("FULL" if plan.durable or plan.messages or plan.sequences else "NORMAL")
        # Totals change only once the transaction committed.
        count = dict(self.count)
        size = dict(self.bytes)
        db.execute("BEGIN IMMEDIATE")
        try:
            # Acknowledged entries go first: the room they free is not to be found by evicting.
            if plan.delete_ids:
                rows = db.execute(
                    f"DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?)) RETURNING priority, {_SIZE}",
                    (json.dumps(plan.delete_ids),),
                ).fetchall()
                for priority, n in rows:
                    count[_PRIORITY[priority]] -= 1
                    size[_PRIORITY[priority]] -= n
            if plan.evict_bytes > 0:
                self._evict(plan.evict_bytes, result, count, size)
            if plan.expire_before_ms is not None:
                self._expire(plan.expire_before_ms, result, count, size)
            if plan.messages:
                db.executemany(
                    "INSERT INTO messages (id, topic, payload, retain, device, seq, created_ms, priority) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (m.id, m.topic, m.payload, int(m.retain), m.device, m.seq, m.created_ms, int(m.priority))
                        for m in plan.messages
                    ],
                )
                for m in plan.messages:
                    count[m.priority] += 1
                    size[m.priority] += m.size
            if plan.sequences:
                db.executemany(
                    "INSERT INTO sequences (device, last_seq) VALUES (?, ?) "
                    "ON CONFLICT(device) DO UPDATE SET last_seq = excluded.last_seq",
                    plan.sequences.items(),
                )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self.count, self.bytes = count, size
        result.count, result.bytes = dict(count), dict(size)
        self._update_free_pages()
        return result

    def _update_free_pages(self) -> None:
        # Space inside the file that SQLite will reuse before it grows the file (min_free_disk).
        free_pages = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        self.free_page_bytes = int(free_pages) * self._page_size

    def _evict(self, needed: int, result: CommitResult, count: dict[Priority, int], size: dict[Priority, int]) -> None:
        freed = 0
        for priority in Priority:  # telemetry first: control messages only once it is all gone
            while freed < needed and count[priority] > 0:
                rows = self.db.execute(
                    f"SELECT id, {_SIZE} FROM messages WHERE priority = ? ORDER BY id LIMIT ?",
                    (int(priority), EVICT_CHUNK),
                ).fetchall()
                if not rows:
                    break
                cut = len(rows)
                running = 0
                for i, (_, n) in enumerate(rows):
                    running += n
                    if freed + running >= needed:
                        cut = i + 1
                        break
                ids = [row[0] for row in rows[:cut]]
                deleted = self.db.execute(
                    f"DELETE FROM messages WHERE priority = ? AND id <= ? RETURNING id, {_SIZE}",
                    (int(priority), ids[-1]),
                ).fetchall()
                for message_id, n in deleted:
                    freed += n
                    count[priority] -= 1
                    size[priority] -= n
                    result.evicted_ids.append(message_id)
                result.evicted[priority] = result.evicted.get(priority, 0) + len(deleted)

    def _expire(
        self, before_ms: int, result: CommitResult, count: dict[Priority, int], size: dict[Priority, int]
    ) -> None:
        # Ids grow with created_ms, so the expired records are a prefix of the telemetry.
        while True:
            deleted = self.db.execute(
                f"DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE priority = 0 ORDER BY id LIMIT ?) "
                f"AND created_ms < ? RETURNING id, {_SIZE}",
                (EVICT_CHUNK, before_ms),
            ).fetchall()
            for message_id, n in deleted:
                count[Priority.TELEMETRY] -= 1
                size[Priority.TELEMETRY] -= n
                result.expired_ids.append(message_id)
            result.expired += len(deleted)
            if len(deleted) < EVICT_CHUNK:
                return

    # --- reads ---------------------------------------------------------------------------

    def read(self, after_id: int, limit: int, upto_id: int | None = None) -> list[Entry]:
        """Every class, id order: after_id < id <= upto_id."""
        rows = self.reader.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM messages WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
            (after_id, _max_id(upto_id), limit),
        ).fetchall()
        return [_entry(r) for r in rows]

    def read_upto(self, after_id: int, upto_id: int, limit: int) -> list[Entry]:
        """:meth:`read` with the arguments in the order of the other lanes' reads."""
        return self.read(after_id, limit, upto_id)

    def read_backlog(self, after_id: int, upto_id: int, limit: int) -> list[Entry]:
        """Telemetry only, after_id < id <= upto_id: the uplink's backlog lane."""
        rows = self.reader.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM messages WHERE id > ? AND id <= ? AND priority = 0 ORDER BY id LIMIT ?",
            (after_id, upto_id, limit),
        ).fetchall()
        return [_entry(r) for r in rows]

    def read_live(self, after_id: int, boundary: int, limit: int, upto_id: int | None = None) -> list[Entry]:
        """Control messages of any age and everything above ``boundary``: the live lane."""
        rows = self.reader.execute(
            # A compound ORDER BY is a merge of two index walks, so LIMIT stops both early.
            f"SELECT {_ENTRY_COLUMNS} FROM messages WHERE priority > 0 AND id > ? AND id <= ? "
            f"UNION ALL SELECT {_ENTRY_COLUMNS} FROM messages WHERE id > ? AND id <= ? ORDER BY 1 LIMIT ?",
            (after_id, min(boundary, _max_id(upto_id)), max(after_id, boundary), _max_id(upto_id), limit),
        ).fetchall()
        return [_entry(r) for r in rows]

    def max_id(self) -> int:
        row = self.db.execute("SELECT MAX(id) FROM messages").fetchone()
        return 0 if row[0] is None else int(row[0])

    def oldest_created_ms(self) -> int | None:
        row = self.reader.execute("SELECT created_ms FROM messages ORDER BY id LIMIT 1").fetchone()
        return None if row is None else int(row[0])

    def file_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += Path(f"{self.path}{suffix}").stat().st_size
        return total

    # --- sequence numbers ----------------------------------------------------------------

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

    def write_sequences(self, sequences: Mapping[str, int]) -> None:
        self.commit(Commit(sequences=sequences))


def _max_id(upto_id: int | None) -> int:
    return (1 << 63) - 1 if upto_id is None else upto_id


_PRIORITY = tuple(Priority)  # by value: a tuple index is ~10x cheaper than Priority(n) per row


def _entry(row: tuple[int, str, bytes, int, int, int, int]) -> Entry:
    return Entry(row[0], row[1], row[2], row[3] == 1, _PRIORITY[row[4]], row[5], row[6])


def produced_records(path: Path) -> set[tuple[str, int]]:
    """Every (device, seq) a buffer file has handed out, read-only (works beside a running gateway).

    Sequence numbers are contiguous from 1 per device in durable mode, so the sequence
    table says it all; the demo and the tests compare this with what the cloud stored.
    (In spill mode the table holds reservations after a crash: an upper bound.)
    """
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        floor_row = db.execute("SELECT value FROM meta WHERE key = 'seq_floor'").fetchone()
        rows = db.execute("SELECT device, last_seq FROM sequences").fetchall()
    finally:
        db.close()
    floor = 0 if floor_row is None else int(floor_row[0])
    return {(device, seq) for device, last in rows for seq in range(floor + 1, last + 1)}
