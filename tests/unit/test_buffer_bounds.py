"""The buffer's bounds, eviction classes, spill mode, crashes, migration and lanes, on real SQLite files.

Each test opens a StoreAndForwardBuffer with a small BufferConfig in its tmp dir.
Where a test needs time to pass (max_age, spill_after) it waits on the buffer's
own counters with a deadline; crashes are real SIGKILLs of a subprocess.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from fieldlink.wire import Record, TopicKind, Value, decode, encode_record, topic
from gateway.buffer import (
    BufferConfig,
    BufferError,
    DropReason,
    Durability,
    Entry,
    Eviction,
    Priority,
    StoreAndForwardBuffer,
)
from gateway.buffer import service as buffer_service
from gateway.sources.base import Reading
from tests.rig.smallfs import free_bytes, require_small_filesystem

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
SITE, GATEWAY = "plant-1", "gw-1"
TELEMETRY = topic(TopicKind.TELEMETRY, SITE, GATEWAY, "x")
STATUS = topic(TopicKind.DEVICE_STATUS, SITE, GATEWAY, "x")
ROOT = Path(__file__).resolve().parents[2]


BASE_TS = 1_700_000_000_000


def reading(device: str = "a", ts: int = 0) -> Reading:
    """A reading stamped ``ts`` ms after BASE_TS (so that every reading has the same size)."""
    return Reading(device, BASE_TS + ts, {"t": Value.of(1.5, "degC")})


def ts_of(entry: Entry) -> int:
    return decode(entry.payload)[0].ts - BASE_TS


def seq_of(entry: Entry) -> int:
    return decode(entry.payload)[0].seq


def reading_size(device: str = "a", seq: int = 1) -> int:
    """What one ``reading(device)`` counts against max_bytes (topic + payload; seq < 128)."""
    record = Record(SITE, GATEWAY, device, seq, BASE_TS, {"t": Value.of(1.5, "degC")})
    return len(topic(TopicKind.TELEMETRY, SITE, GATEWAY, device)) + len(encode_record(record))


def config(**options: object) -> BufferConfig:
    """A BufferConfig without the bounds a test does not exercise (min_free_disk would see the host disk)."""
    defaults: dict[str, object] = {"min_free_disk": 0, "max_age": None}
    return BufferConfig(**{**defaults, **options})  # type: ignore[arg-type]


def run(path: Path, body: Callable[[StoreAndForwardBuffer], Awaitable[T]], cfg: BufferConfig, timeout: float = 30) -> T:
    """Open a buffer on ``path``, run ``body`` with it, close it; all bounded by a deadline."""

    async def main() -> T:
        async with asyncio.timeout(timeout):
            buffer = StoreAndForwardBuffer(path, site=SITE, gateway=GATEWAY, config=cfg)
            await buffer.open()
            try:
                return await body(buffer)
            finally:
                await buffer.close()

    return asyncio.run(main())


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (every 20 ms) until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def rows_on_disk(path: Path) -> list[tuple[int, int, int | None, str | None]]:
    """(id, priority, seq, device) of every row of the messages table, read by a separate connection."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT id, priority, seq, device FROM messages ORDER BY id").fetchall()
    finally:
        db.close()


def sequences_on_disk(path: Path) -> dict[str, int]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT device, last_seq FROM sequences").fetchall())
    finally:
        db.close()


def drops(buffer: StoreAndForwardBuffer) -> dict[str, int]:
    """The drop counters that are not zero."""
    return {reason: n for reason, n in buffer.drops.items() if n}


def message(size: int, priority: Priority) -> tuple[str, bytes, Priority]:
    """A message of exactly ``size`` bytes (topic + payload) in the given class."""
    name = TELEMETRY if priority is Priority.TELEMETRY else STATUS
    return name, b"p" * (size - len(name.encode())), priority


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "buffer" / "buffer.db"


# --- max_bytes, drop-oldest --------------------------------------------------------------


@dataclass
class Model:
    """What drop-oldest must keep: evict the oldest telemetry first, control only once no telemetry is left."""

    cap: int
    stored: list[tuple[int, Priority, int]]  # (id, class, size) in id order
    next_id: int = 1
    evicted: int = 0
    control_evicted: int = 0

    def add(self, size: int, priority: Priority) -> None:
        needed = sum(s for _, _, s in self.stored) + size - self.cap
        for cls in Priority:
            for item in [m for m in self.stored if m[1] is cls]:
                if needed <= 0:
                    break
                # A new record making a control message go is another question (see the burst tests).
                assert priority is Priority.CONTROL or cls is Priority.TELEMETRY, "not a case for this model"
                self.stored.remove(item)
                needed -= item[2]
                self.evicted += 1
                self.control_evicted += cls is Priority.CONTROL
        self.stored.append((self.next_id, priority, size))
        self.next_id += 1


def test_drop_oldest_evicts_the_oldest_telemetry_first_and_control_only_when_no_telemetry_is_left(db: Path) -> None:
    cap = 1000
    T_, C_ = Priority.TELEMETRY, Priority.CONTROL
    script = [(100, C_), *[(100, T_)] * 9]  # exactly at the cap
    script += [(100, T_)]  # evicts the oldest record
    script += [(300, C_)]  # evicts three records, not the older control message
    script += [(400, C_)]  # four more records
    script += [(300, C_)]  # the last two records, then the oldest control message
    script += [(100, C_)]  # no telemetry left: the oldest control message goes
    script += [(50, T_), (50, T_), (100, T_)]  # up to the cap again
    script += [(100, T_)]  # records evict records again; control stays

    async def body(buffer: StoreAndForwardBuffer) -> Model:
        model = Model(cap, [])
        for step, (size, priority) in enumerate(script):
            name, payload, cls = message(size, priority)
            await buffer.add_message(name, payload, priority=cls, retain=cls is C_)
            model.add(size, priority)
            kept = await buffer.take(0, 100)
            assert [(e.id, e.priority, e.size) for e in kept] == model.stored, f"step {step}"
            stats = await buffer.stats()
            assert stats.bytes == sum(s for _, _, s in model.stored) <= cap, f"step {step}"
            assert stats.messages == len(model.stored)
            assert drops(buffer) == ({"max_bytes": model.evicted} if model.evicted else {}), f"step {step}"
            assert buffer.control_drops == model.control_evicted, f"step {step}"
        return model

    model = run(db, body, config(max_bytes=cap))
    # The script really went through every case.
    assert (model.evicted, model.control_evicted) == (14, 2)
    assert [(p, s) for _, p, s in model.stored] == [(C_, 400), (C_, 300), (C_, 100), (T_, 100), (T_, 100)]


def test_drop_oldest_keeps_the_newest_readings_in_order_and_counts_what_it_evicted(db: Path) -> None:
    size = reading_size()
    cap = 10 * size + size // 2  # room for ten readings, not eleven

    async def body(buffer: StoreAndForwardBuffer) -> None:
        seqs = [(await buffer.add_reading(reading(ts=i)))[0].seq for i in range(40)]
        assert seqs == list(range(1, 41))  # evictions do not touch sequence numbers
        kept = await buffer.take(0, 100)
        assert [seq_of(e) for e in kept] == list(range(31, 41))
        assert [ts_of(e) for e in kept] == list(range(30, 40))
        assert buffer.drops[DropReason.MAX_BYTES] == 30
        assert (await buffer.stats()).bytes == 10 * size <= cap

        # A group commit bigger than the room: the whole batch is admitted, the stored ones make room.
        results = await asyncio.gather(*(buffer.add_reading(reading(ts=100 + i)) for i in range(25)))
        assert [r.seq for r, _ in results] == list(range(41, 66))
        stats = await buffer.stats()
        assert stats.bytes <= cap + 25 * size
        assert buffer.drops[DropReason.MAX_BYTES] + stats.records == 65
        await buffer.add_reading(reading(ts=200))
        stats = await buffer.stats()
        assert stats.bytes <= cap
        assert buffer.drops[DropReason.MAX_BYTES] + stats.records == 66
        kept = await buffer.take(0, 100)
        assert [seq_of(e) for e in kept] == list(range(57, 67))
        assert buffer.control_drops == 0

    run(db, body, config(max_bytes=cap))


@pytest.mark.parametrize(("controls", "records", "burst"), [(3, 0, 1), (2, 5, 8)])
def test_drop_oldest_never_evicts_a_control_message_to_keep_a_new_record(
    db: Path, controls: int, records: int, burst: int
) -> None:
    # The buffer is full; new records arrive (one, or a group commit of several) and evicting
    # all the stored telemetry does not make room for them. Control messages go only once no
    # telemetry is left: the new records that do not fit go (the oldest of a burst first).
    size = reading_size()
    status_size = 200
    cap = controls * status_size + records * size + size // 2

    async def body(buffer: StoreAndForwardBuffer) -> None:
        for _ in range(controls):
            name, payload, _ = message(status_size, Priority.CONTROL)
            await buffer.add_message(name, payload, retain=True)
        for i in range(records):
            await buffer.add_reading(reading(ts=i))
        outcomes = await asyncio.gather(
            *(buffer.add_reading(reading(ts=10 + i)) for i in range(burst)), return_exceptions=True
        )
        kept = await buffer.take(0, 100)
        assert [e.priority for e in kept].count(Priority.CONTROL) == controls, (
            f"a control message was evicted while {sum(e.is_record for e in kept)} records were kept"
        )
        assert buffer.control_drops == 0
        assert (await buffer.stats()).bytes <= cap
        # Every record is either kept or counted as dropped; the newest are kept.
        kept_records = [ts_of(e) for e in kept if e.is_record]
        assert len(kept_records) + buffer.drops[DropReason.MAX_BYTES] == records + burst
        assert kept_records == list(range(10 + burst - len(kept_records), 10 + burst))
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        assert all(isinstance(o, BufferError) and o.reason is DropReason.MAX_BYTES for o in refused)

    run(db, body, config(max_bytes=cap))


# --- max_bytes, reject-new ---------------------------------------------------------------


def test_reject_new_refuses_telemetry_without_using_up_sequence_numbers(db: Path) -> None:
    size = reading_size()
    cap = 5 * size + size // 2

    async def body(buffer: StoreAndForwardBuffer) -> None:
        seqs = [(await buffer.add_reading(reading(ts=i)))[0].seq for i in range(5)]
        assert seqs == [1, 2, 3, 4, 5]
        for i in range(3):
            with pytest.raises(BufferError) as refused:
                await buffer.add_reading(reading(ts=10 + i))
            assert refused.value.reason is DropReason.MAX_BYTES
        assert drops(buffer) == {"max_bytes": 3}
        assert buffer.last_seq() == {"a": 5}
        kept = await buffer.take(0, 100)
        assert [ts_of(e) for e in kept] == [0, 1, 2, 3, 4]  # the old ones stay

        # Control messages are still admitted: they evict the oldest telemetry.
        name, payload, _ = message(2 * size, Priority.CONTROL)
        await buffer.add_message(name, payload, retain=True)
        kept = await buffer.take(0, 100)
        assert [ts_of(e) for e in kept if e.is_record] == [2, 3, 4]
        assert kept[-1].priority is Priority.CONTROL
        assert drops(buffer) == {"max_bytes": 5}
        assert buffer.control_drops == 0
        assert (await buffer.stats()).bytes <= cap

        # A burst: what fits is admitted with contiguous sequence numbers, the rest refused.
        buffer.accept([kept[0].id, kept[1].id])  # delivered: room for two readings
        await buffer.flush()
        outcomes = await asyncio.gather(
            *(buffer.add_reading(reading(ts=20 + i)) for i in range(6)), return_exceptions=True
        )
        admitted = [o[0].seq for o in outcomes if not isinstance(o, BaseException)]
        refused_now = [o for o in outcomes if isinstance(o, BaseException)]
        assert admitted == [6, 7]
        assert len(refused_now) == 4
        assert all(isinstance(o, BufferError) and o.reason is DropReason.MAX_BYTES for o in refused_now)
        assert drops(buffer) == {"max_bytes": 9}
        kept = await buffer.take(0, 100)
        assert [seq_of(e) for e in kept if e.is_record] == [5, 6, 7]

    run(db, body, config(max_bytes=cap, eviction=Eviction.REJECT_NEW))

    # Restart: the sequence table says 7, not 11.
    async def after(buffer: StoreAndForwardBuffer) -> int:
        return (await buffer.add_reading(reading()))[0].seq

    assert run(db, after, config(max_bytes=100_000, eviction=Eviction.REJECT_NEW)) == 8


def test_reject_new_evicts_the_oldest_control_message_for_a_new_one_when_no_telemetry_is_left(db: Path) -> None:
    async def body(buffer: StoreAndForwardBuffer) -> None:
        for n in range(3):
            name, payload, _ = message(300, Priority.CONTROL)
            await buffer.add_message(name, payload + bytes([n]))
        kept = await buffer.take(0, 10)
        assert [e.payload[-1] for e in kept] == [1, 2]  # the first one (0) made room for the third
        assert drops(buffer) == {"max_bytes": 1}
        assert buffer.control_drops == 1
        with pytest.raises(BufferError):
            await buffer.add_reading(reading())
        assert drops(buffer) == {"max_bytes": 2}

    run(db, body, config(max_bytes=700, eviction=Eviction.REJECT_NEW))


@pytest.mark.parametrize("eviction", list(Eviction))
def test_acknowledged_entries_make_room_before_anything_is_dropped(db: Path, eviction: Eviction) -> None:
    # The uplink's acknowledgements and new readings often share a commit. The deletes free
    # the room: nothing may be evicted (a delivered record counted as lost) nor refused.
    size = reading_size()
    cap = 10 * size + size // 2

    async def body(buffer: StoreAndForwardBuffer) -> None:
        for i in range(10):
            await buffer.add_reading(reading(ts=i))
        delivered = await buffer.take(0, 5)
        # Readings and acknowledgements that arrive while a commit runs share the next one.
        adding = [asyncio.create_task(buffer.add_reading(reading(ts=100 + i))) for i in range(3)]
        buffer.accept(e.id for e in delivered)
        results = await asyncio.gather(*adding)
        assert [r.seq for r, _ in results] == [11, 12, 13]
        assert not drops(buffer), f"dropped {drops(buffer)} although acknowledgements freed the room"
        kept = await buffer.take(0, 100)
        assert [seq_of(e) for e in kept] == [6, 7, 8, 9, 10, 11, 12, 13]

    run(db, body, config(max_bytes=cap, eviction=eviction))


def test_sizes_agree_between_memory_and_disk_so_the_totals_do_not_drift_with_non_ascii_topics(db: Path) -> None:
    # Device names may be any UTF-8 (check_topic_level): "kessel-süd" is 10 characters, 11 bytes.
    async def drift(buffer: StoreAndForwardBuffer) -> list[int]:
        for _ in range(50):
            await buffer.add_reading(reading("kessel-süd"))
            buffer.accept(e.id for e in await buffer.take(0, 10))
            await buffer.flush()
        stats = await buffer.stats()
        assert (stats.messages, stats.bytes) == (0, 0)
        for _ in range(3):
            await buffer.add_reading(reading("kessel-süd"))
        return [e.size for e in await buffer.take(0, 10)]  # from the in-memory tail

    async def reopened(buffer: StoreAndForwardBuffer) -> tuple[list[int], int]:
        return [e.size for e in await buffer.take(0, 10)], (await buffer.stats()).bytes  # from SQLite

    in_memory = run(db, drift, config())
    on_disk, total = run(db, reopened, config())
    assert in_memory == on_disk
    assert total == sum(on_disk)


# --- max_age -----------------------------------------------------------------------------


def test_telemetry_older_than_max_age_expires_and_control_messages_stay(db: Path) -> None:
    async def body(buffer: StoreAndForwardBuffer) -> None:
        for i in range(3):
            await buffer.add_reading(reading(ts=i))
        await buffer.add_message(STATUS, b'{"state":"online"}', retain=True)
        await until(lambda: buffer.drops[DropReason.MAX_AGE] >= 3, 10, "three records to expire")
        assert drops(buffer) == {"max_age": 3}
        (left,) = await buffer.take(0, 10)
        assert (left.priority, left.payload) == (Priority.CONTROL, b'{"state":"online"}')
        stats = await buffer.stats()
        assert (stats.messages, stats.records) == (1, 0)
        # New readings are not expired at once, and keep their sequence numbers.
        record, _ = await buffer.add_reading(reading(ts=10))
        assert record.seq == 4
        assert [e.is_record for e in await buffer.take(0, 10)] == [False, True]

    run(db, body, config(max_age=0.2))
    assert [(p, seq) for _, p, seq, _ in rows_on_disk(db)] == [(Priority.CONTROL, None), (Priority.TELEMETRY, 4)]


# --- min_free_disk -----------------------------------------------------------------------

FS_SIZE = 8 << 20
BLOB = 4000  # bytes per filler message: fills the file system in a few hundred commits


async def fill_to_min_free_disk(buffer: StoreAndForwardBuffer) -> int:
    """Add big telemetry messages in group commits until min_free_disk bites; returns how many were refused."""
    name, payload, _ = message(BLOB, Priority.TELEMETRY)
    refused = 0
    deadline = time.monotonic() + 30
    while buffer.drops[DropReason.MIN_FREE_DISK] == 0:
        assert time.monotonic() < deadline, "min_free_disk never triggered"
        outcomes = await asyncio.gather(
            *(buffer.add_message(name, payload, priority=Priority.TELEMETRY) for _ in range(20)),
            return_exceptions=True,
        )
        refused += sum(isinstance(o, BufferError) for o in outcomes)
    return refused


async def drain(buffer: StoreAndForwardBuffer) -> int:
    """What a fast uplink does: take and acknowledge everything; returns how many entries."""
    total = 0
    while entries := await buffer.take(0, 1000):
        buffer.accept(e.id for e in entries)
        total += len(entries)
        await buffer.flush()
    return total


@pytest.mark.parametrize("eviction", list(Eviction))
def test_the_buffer_stops_growing_at_min_free_disk(tmp_path: Path, eviction: Eviction) -> None:
    with require_small_filesystem(tmp_path / "small", FS_SIZE) as fs:
        watermark = free_bytes(fs) - (2 << 20)  # room for about 2 MB of buffer file and WAL

        async def body(buffer: StoreAndForwardBuffer) -> None:
            refused = await fill_to_min_free_disk(buffer)
            at_bound = await buffer.stats()
            name, payload, _ = message(BLOB, Priority.TELEMETRY)
            # Keep going for as much again as the buffer holds: the bound must hold.
            for _ in range(at_bound.messages // 20 + 1):
                outcomes = await asyncio.gather(
                    *(buffer.add_message(name, payload, priority=Priority.TELEMETRY) for _ in range(20)),
                    return_exceptions=True,
                )
                for outcome in outcomes:
                    if isinstance(outcome, BaseException):
                        assert isinstance(outcome, BufferError)
                        assert outcome.reason is DropReason.MIN_FREE_DISK
                        refused += 1
                stats = await buffer.stats()
                assert stats.bytes <= at_bound.bytes + 20 * BLOB
                assert free_bytes(fs) > 0, "the file system filled up: the bound did not hold"
            assert buffer.drops[DropReason.WRITE_ERROR] == 0
            assert buffer.drops[DropReason.MAX_BYTES] == 0
            if eviction is Eviction.REJECT_NEW:
                assert refused == buffer.drops[DropReason.MIN_FREE_DISK] > at_bound.messages
                kept = await buffer.take(0, 1000)
                assert len(kept) == at_bound.messages  # the old ones stayed
            else:
                assert refused == 0
                assert buffer.drops[DropReason.MIN_FREE_DISK] >= at_bound.messages  # the old ones went
            # Control messages are still admitted, at the expense of telemetry.
            await buffer.add_message(STATUS, b"s" * 1000, retain=True)
            assert buffer.control_drops == 0
            kept = await buffer.take(0, 1000)
            assert kept[-1].priority is Priority.CONTROL

        run(fs / "buffer.db", body, config(min_free_disk=watermark, eviction=eviction), timeout=50)


@pytest.mark.parametrize("eviction", list(Eviction))
def test_after_a_min_free_disk_episode_a_drained_buffer_takes_readings_again(
    tmp_path: Path, eviction: Eviction
) -> None:
    # SQLite does not give freed pages back to the file system: after the uplink drained the
    # buffer, the file is as big as before, and free disk space is still below the watermark.
    # The freed pages inside the file are room all the same: new readings must fit in them.
    with require_small_filesystem(tmp_path / "small", FS_SIZE) as fs:
        watermark = free_bytes(fs) - (2 << 20)

        async def body(buffer: StoreAndForwardBuffer) -> None:
            await fill_to_min_free_disk(buffer)
            assert await drain(buffer) > 100
            stats = await buffer.stats()
            assert (stats.messages, stats.bytes) == (0, 0)
            before = drops(buffer)
            outcomes = await asyncio.gather(
                *(buffer.add_reading(reading(ts=i)) for i in range(50)), return_exceptions=True
            )
            for i in range(50, 60):
                outcomes += await asyncio.gather(buffer.add_reading(reading(ts=i)), return_exceptions=True)
            refused = [o for o in outcomes if isinstance(o, BaseException)]
            assert not refused, f"{len(refused)} of 60 readings refused by an empty buffer: {refused[0]!r}"
            assert drops(buffer) == before, "an empty buffer evicted readings"
            assert len(await buffer.take(0, 1000)) == 60

        run(fs / "buffer.db", body, config(min_free_disk=watermark, eviction=eviction), timeout=50)


# --- spill mode --------------------------------------------------------------------------


def spill(**options: object) -> BufferConfig:
    return config(durability=Durability.SPILL, **options)


def test_spill_mode_keeps_what_the_uplink_accepts_quickly_off_the_disk(db: Path) -> None:
    async def body(buffer: StoreAndForwardBuffer) -> None:
        cursor = 0
        for round_ in range(5):
            records = [(await buffer.add_reading(reading(ts=round_ * 10 + i)))[0] for i in range(10)]
            await buffer.add_message(STATUS, b'{"state":"online"}', retain=True)
            live = await buffer.take_live(cursor, 0, 100)
            cursor = live[-1].id
            assert len(live) == 11
            assert [decode(e.payload)[0] for e in live if e.is_record] == records
            assert live[-1].priority is Priority.CONTROL
            buffer.accept(e.id for e in live)
            await buffer.flush()
        assert buffer.spilled_total == 0
        assert rows_on_disk(db) == []  # not one message written ...
        assert sequences_on_disk(db)["a"] >= 50  # ... but the sequence numbers are reserved
        stats = await buffer.stats()
        assert (stats.messages, stats.memory_messages, stats.bytes) == (0, 0, 0)

    run(db, body, spill(spill_after=30))


def test_spill_mode_writes_what_waits_too_long_and_deletes_it_once_accepted(db: Path) -> None:
    async def body(buffer: StoreAndForwardBuffer) -> None:
        records = [(await buffer.add_reading(reading(ts=i)))[0] for i in range(20)]
        await buffer.add_message(STATUS, b"offline", retain=True)
        assert (await buffer.stats()).messages == 21
        await until(lambda: buffer.spilled_total == 21, 10, "everything to be spilled")
        stats = await buffer.stats()
        assert (stats.messages, stats.records, stats.memory_messages) == (21, 20, 0)
        on_disk = rows_on_disk(db)
        assert [p for _, p, _, _ in on_disk] == [Priority.TELEMETRY] * 20 + [Priority.CONTROL]
        # Still readable, now from SQLite, in the same order.
        entries = await buffer.take_live(0, 0, 100)
        assert [decode(e.payload)[0] for e in entries if e.is_record] == records
        assert [e.id for e in entries] == [r[0] for r in on_disk]
        # New ones go to memory again; the uplink sees old and new in one id order.
        newer = (await buffer.add_reading(reading(ts=100)))[0]
        entries = await buffer.take(0, 100)
        assert decode(entries[-1].payload)[0] == newer
        assert [e.id for e in entries] == sorted(e.id for e in entries)
        buffer.accept(e.id for e in entries)
        await buffer.flush()
        assert rows_on_disk(db) == []
        assert await buffer.take(0, 100) == []
        stats = await buffer.stats()
        assert (stats.messages, stats.bytes) == (0, 0)

    run(db, body, spill(spill_after=0.2))


def test_spill_mode_writes_everything_at_close_and_a_reopen_sees_every_unaccepted_entry(db: Path) -> None:
    async def first(buffer: StoreAndForwardBuffer) -> list[Entry]:
        for i in range(30):
            await buffer.add_reading(reading("ab"[i % 2], ts=i))
            if i % 10 == 0:
                await buffer.add_message(STATUS, f"status {i}".encode(), retain=True)
        entries = await buffer.take(0, 100)
        buffer.accept(e.id for e in entries[::3])  # every third delivered
        assert buffer.spilled_total == 0
        return [e for i, e in enumerate(entries) if i % 3]

    async def second(buffer: StoreAndForwardBuffer) -> tuple[list[Entry], dict[str, int], int]:
        entries, last_seq = await buffer.take(0, 100), buffer.last_seq()
        seq = (await buffer.add_reading(reading("a", ts=99)))[0].seq
        return entries, last_seq, seq

    left = run(db, first, spill(spill_after=30))
    assert len(left) == 22
    entries, last_seq, seq = run(db, second, config())  # durable mode reads the same file
    assert entries == left
    assert last_seq == {"a": 15, "b": 15}  # a clean stop records the true numbers, not the reservations
    assert seq == 16


SCRIPT = """
import asyncio, sys
from pathlib import Path
from fieldlink.wire import Value
from gateway.buffer import BufferConfig, StoreAndForwardBuffer
from gateway.sources.base import Reading

async def main() -> None:
    config = BufferConfig(durability=sys.argv[2], spill_after=3600, min_free_disk=0, max_age=None)
    buffer = StoreAndForwardBuffer(Path(sys.argv[1]), site="plant-1", gateway="gw-1", config=config)
    await buffer.open()
    print("open", flush=True)
    ts = 1_700_000_000_000
    while True:
        ts += 1
        readings = [Reading(d, ts, {"t": Value.of(1.5, "degC")}) for d in ("a", "b", "a", "c")]
        for record, _ in await asyncio.gather(*(buffer.add_reading(r) for r in readings)):
            print(record.device, record.seq, flush=True)

asyncio.run(main())
"""


def crash_while_adding(path: Path, durability: Durability, lines: int) -> dict[str, list[int]]:
    """Run a buffer in a subprocess adding readings; SIGKILL it once it reported ``lines`` of them.

    Returns the seqs each device got back from add_reading before the kill.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(path), durability.value],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    out: list[bytes] = []
    done = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if len(out) > lines:
                done.set()
        done.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        if not done.wait(30) or len(out) <= lines:
            pytest.fail(f"the writer reported {len(out)} lines; stderr: {proc.stderr.read() if proc.stderr else ''!r}")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    thread.join(10)
    got: dict[str, list[int]] = {}
    assert out[0] == b"open\n"
    for line in out[1:]:
        if line.endswith(b"\n"):
            device, seq = line.split()
            got.setdefault(device.decode(), []).append(int(seq))
    return got


def test_durable_mode_keeps_every_reading_add_reading_returned_for_through_a_kill(db: Path) -> None:
    got = crash_while_adding(db, Durability.DURABLE, 400)
    rows = rows_on_disk(db)
    stored: dict[str, list[int]] = {}
    for _, priority, seq, device in rows:
        assert priority == Priority.TELEMETRY
        assert device is not None
        assert seq is not None
        stored.setdefault(device, []).append(seq)
    sequences = sequences_on_disk(db)
    for device, seqs in got.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"{device}: seqs handed out are contiguous"
        assert set(seqs) <= set(stored[device]), f"{device}: a returned reading is missing"
        assert sorted(stored[device]) == list(range(1, len(stored[device]) + 1))
        assert sequences[device] == max(stored[device])

    async def after(buffer: StoreAndForwardBuffer) -> dict[str, int]:
        assert len(await buffer.take(0, 100_000)) == len(rows)
        return {d: (await buffer.add_reading(reading(d)))[0].seq for d in got}

    assert run(db, after, config()) == {d: max(stored[d]) + 1 for d in got}


def test_spill_mode_never_reuses_a_sequence_number_after_a_kill(db: Path) -> None:
    got = crash_while_adding(db, Durability.SPILL, 400)
    assert rows_on_disk(db) == []  # held in memory, lost with the process: the price of spill mode
    handed_out = {device: max(seqs) for device, seqs in got.items()}
    reserved = sequences_on_disk(db)
    assert all(reserved[d] >= handed_out[d] for d in handed_out)

    async def after(buffer: StoreAndForwardBuffer) -> dict[str, int]:
        return {d: (await buffer.add_reading(reading(d)))[0].seq for d in handed_out}

    first = run(db, after, spill())
    assert all(first[d] > handed_out[d] for d in handed_out), (first, handed_out)
    # Again, and once more after a crash of the second run: always above everything before.
    got_again = crash_while_adding(db, Durability.SPILL, 40)
    assert all(min(seqs) > first[d] for d, seqs in got_again.items())
    second = run(db, after, spill())
    assert all(second[d] > max(got_again[d]) for d in handed_out)


# --- schema v1 -> v2 ---------------------------------------------------------------------

# The v1 schema as fieldlink wrote it before priority classes (git show 4b8d7ac:gateway/buffer/sqlite_store.py).
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0,
    device TEXT,
    seq INTEGER,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sequences (device TEXT PRIMARY KEY, last_seq INTEGER NOT NULL);
"""


def test_a_v1_database_is_migrated_keeping_rows_and_sequence_numbers(db: Path) -> None:
    db.parent.mkdir(parents=True)
    created = int(time.time() * 1000)
    records = [Record(SITE, GATEWAY, "a", seq, BASE_TS + seq, {"t": Value.of(float(seq))}) for seq in (7, 8, 9)]
    status = topic(TopicKind.DEVICE_STATUS, SITE, GATEWAY, "a")
    v1 = sqlite3.connect(db)
    v1.execute("PRAGMA journal_mode=WAL")
    v1.executescript(V1_SCHEMA)
    v1.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    rows = [
        (topic(TopicKind.TELEMETRY, SITE, GATEWAY, "a"), encode_record(records[0]), 0, "a", 7, created),
        (status, b'{"state":"offline"}', 1, None, None, created + 1),
        (topic(TopicKind.TELEMETRY, SITE, GATEWAY, "a"), encode_record(records[1]), 0, "a", 8, created + 2),
        (topic(TopicKind.TELEMETRY, SITE, GATEWAY, "a"), encode_record(records[2]), 0, "a", 9, created + 3),
    ]
    v1.executemany(
        "INSERT INTO messages (topic, payload, retain, device, seq, created_ms) VALUES (?, ?, ?, ?, ?, ?)", rows
    )
    v1.execute("DELETE FROM messages WHERE seq = 7")  # delivered: ids are not reused after this
    v1.executemany("INSERT INTO sequences VALUES (?, ?)", [("a", 9), ("b", 3)])
    v1.commit()
    v1.close()

    async def body(buffer: StoreAndForwardBuffer) -> None:
        entries = await buffer.take(0, 10)
        assert [(e.id, e.priority, e.retain) for e in entries] == [
            (2, Priority.CONTROL, True),
            (3, Priority.TELEMETRY, False),
            (4, Priority.TELEMETRY, False),
        ]
        assert entries[0].payload == b'{"state":"offline"}'
        assert [decode(e.payload)[0] for e in entries[1:]] == records[1:]
        assert [e.created_ms for e in entries] == [created + 1, created + 2, created + 3]
        # The live lane finds the old status message without the backlog.
        assert [e.id for e in await buffer.take_live(0, 4, 10)] == [2]
        assert [e.id for e in await buffer.take_backlog(0, 4, 10)] == [3, 4]
        stats = await buffer.stats()
        assert (stats.messages, stats.records, stats.bytes) == (3, 2, sum(e.size for e in entries))
        assert buffer.last_seq() == {"a": 9, "b": 3}
        record, _ = await buffer.add_reading(reading("a"))
        assert record.seq == 10
        assert (await buffer.take(4, 10))[0].id == 5

    run(db, body, config())
    check = sqlite3.connect(db)
    try:
        assert check.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        index = check.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'")
        assert ("control_messages",) in index.fetchall()
    finally:
        check.close()
    assert run(db, lambda b: asyncio.sleep(0, b.recovered_from), config()) is None  # v2 opens as it is


def test_a_database_from_a_newer_fieldlink_is_refused_not_moved_aside(db: Path) -> None:
    async def body(buffer: StoreAndForwardBuffer) -> None:
        await buffer.add_reading(reading())

    run(db, body, config())
    newer = sqlite3.connect(db)
    newer.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    newer.commit()
    newer.close()
    with pytest.raises(RuntimeError, match="newer fieldlink"):
        run(db, body, config())
    assert list(db.parent.glob("*.corrupt-*")) == []
    assert len(rows_on_disk(db)) == 1


# --- corrupt files -----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["header", "pages"])
def test_a_corrupt_file_is_moved_aside_and_sequence_numbers_restart_above_the_old_range(db: Path, damage: str) -> None:
    async def fill(buffer: StoreAndForwardBuffer) -> dict[str, int]:
        for i in range(300):
            await buffer.add_message(STATUS, b"x" * 200)  # enough pages to damage the middle ones
            await buffer.add_reading(reading("ab"[i % 2], ts=i))
        return buffer.last_seq()

    old = run(db, fill, config())
    assert old == {"a": 150, "b": 150}
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 10 * page
    if damage == "header":
        data[:100] = b"\xff" * 100
    else:
        for n in range(2, len(data) // page, 3):  # every third b-tree page after the first ones
            data[n * page : n * page + 64] = os.urandom(64)
    db.write_bytes(bytes(data))
    before_ms = time.time_ns() // 1_000_000

    async def recover(buffer: StoreAndForwardBuffer) -> tuple[Path | None, list[int], list[Entry]]:
        seqs = [(await buffer.add_reading(reading("a", ts=i)))[0].seq for i in range(3)]
        return buffer.recovered_from, seqs, await buffer.take(0, 10)

    moved, seqs, entries = run(db, recover, config())
    assert moved is not None
    assert moved.read_bytes() == bytes(data)
    assert seqs[0] > max(before_ms, old["a"])
    assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]
    assert [seq_of(e) for e in entries] == seqs  # a new, empty buffer took them

    async def later(buffer: StoreAndForwardBuffer) -> tuple[Path | None, int]:
        return buffer.recovered_from, (await buffer.add_reading(reading("b")))[0].seq

    # The next start keeps the floor: "b", silent since the recovery, also starts above it.
    recovered, b_seq = run(db, later, config())
    assert recovered is None
    assert b_seq > before_ms


# --- take_backlog / take_live ------------------------------------------------------------


def backlog_oracle(entries: list[Entry], after: int, upto: int, limit: int) -> list[Entry]:
    return [e for e in entries if after < e.id <= upto and e.priority is Priority.TELEMETRY][:limit]


def live_oracle(entries: list[Entry], after: int, boundary: int, limit: int) -> list[Entry]:
    return [e for e in entries if e.id > after and (e.id > boundary or e.priority is Priority.CONTROL)][:limit]


@pytest.mark.parametrize("tail", [0, 1, 5, 12, 10_000])
def test_the_lanes_read_the_same_entries_from_memory_and_from_sqlite(
    db: Path, monkeypatch: pytest.MonkeyPatch, tail: int
) -> None:
    monkeypatch.setattr(buffer_service, "TAIL_ENTRIES", tail)

    async def body(buffer: StoreAndForwardBuffer) -> None:
        for i in range(36):
            if i % 5 == 2:
                await buffer.add_message(STATUS, f"status {i}".encode(), retain=i % 2 == 0)
            elif i % 7 == 3:  # a group commit now and then
                await asyncio.gather(*(buffer.add_reading(reading("ab"[j], ts=i)) for j in range(2)))
            else:
                await buffer.add_reading(reading(ts=i))
        everything = await buffer.take(0, 1000)
        ids = [e.id for e in everything]
        assert ids == list(range(1, len(everything) + 1))
        # Acknowledged (some deleted already, some only queued for deletion) are skipped by both lanes.
        buffer.accept([ids[0], ids[2], ids[7]])
        await buffer.flush()
        acked = {ids[0], ids[2], ids[7], ids[20], ids[-1], ids[-4]}
        buffer.accept([ids[20], ids[-1], ids[-4]])
        remaining = [e for e in everything if e.id not in acked]
        boundary = ids[len(ids) // 2]
        for after in range(len(ids) + 1):
            for limit in (1, 2, 5, 1000):
                got = await buffer.take_backlog(after, boundary, limit)
                assert got == backlog_oracle(remaining, after, boundary, limit), (after, limit)
                got = await buffer.take_live(after, boundary, limit)
                assert got == live_oracle(remaining, after, boundary, limit), (after, limit)
        # A lane walking with its cursor sees each of its entries exactly once.
        for lane, oracle in ((buffer.take_backlog, backlog_oracle), (buffer.take_live, live_oracle)):
            for limit in (1, 3):
                cursor, seen = 0, []
                while batch := await lane(cursor, boundary, limit):
                    seen += batch
                    cursor = batch[-1].id
                assert seen == oracle(remaining, 0, boundary, 1000)

    run(db, body, config())


def test_a_lane_read_is_not_cut_short_when_the_tail_moves_during_it(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The uplink's lanes stop reading when a read returns fewer than it asked for (Lane.more),
    # the backlog lane until the next connection. So a read racing a commit that moves the
    # in-memory tail must still return everything up to the limit.
    monkeypatch.setattr(buffer_service, "TAIL_ENTRIES", 4)

    async def body(buffer: StoreAndForwardBuffer) -> None:
        for i in range(20):
            await buffer.add_reading(reading(ts=i))
        boundary = buffer.last_id
        store = buffer._store  # the commit is held in the store's thread
        committing, release = threading.Event(), threading.Event()
        real_commit = store.commit

        def slow_commit(plan: object) -> object:
            committing.set()
            release.wait(10)
            return real_commit(plan)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "commit", slow_commit)
        adding = asyncio.gather(*(buffer.add_reading(reading(ts=100 + i)) for i in range(8)))
        await until(committing.is_set, 10, "the commit to start")
        # The read queues behind the commit; the commit's new entries push the tail up meanwhile.
        reading_task = asyncio.create_task(buffer.take_backlog(0, boundary, 50))
        await asyncio.sleep(0)
        release.set()
        await adding
        got = await reading_task
        assert [e.id for e in got] == list(range(1, boundary + 1)), "a short read stalls the backlog lane"

    run(db, body, config())


# --- write failures ----------------------------------------------------------------------


class FailingCommits:
    """Wraps the store's commit: fails while ``failing`` is set, as a full disk does."""

    def __init__(self, buffer: StoreAndForwardBuffer, monkeypatch: pytest.MonkeyPatch) -> None:
        store = buffer._store  # the disk is the store's business
        self.real = store.commit
        self.failing = False
        self.failed = 0
        monkeypatch.setattr(store, "commit", self)

    def __call__(self, plan: object) -> object:
        if self.failing:
            self.failed += 1
            raise sqlite3.OperationalError("database or disk is full")
        return self.real(plan)  # type: ignore[arg-type]


@pytest.mark.parametrize("eviction", list(Eviction))
def test_readings_that_failed_to_write_do_not_use_up_sequence_numbers(
    db: Path, monkeypatch: pytest.MonkeyPatch, eviction: Eviction
) -> None:
    size = reading_size()

    async def body(buffer: StoreAndForwardBuffer) -> None:
        disk = FailingCommits(buffer, monkeypatch)
        for i in range(3):
            await buffer.add_reading(reading(ts=i))
        disk.failing = True
        # A group commit that is partly over max_bytes (reject-new refuses two) and then fails to write.
        outcomes = await asyncio.gather(
            *(buffer.add_reading(reading(ts=10 + i)) for i in range(4)), return_exceptions=True
        )
        assert all(isinstance(o, BufferError) for o in outcomes)
        assert disk.failed == 1
        # Each lost reading counted once, under the reason it was lost for.
        assert drops(buffer) == (
            {"max_bytes": 2, "write_error": 2} if eviction is Eviction.REJECT_NEW else {"write_error": 4}
        )
        assert buffer.write_failures == 1
        disk.failing = False
        record, _ = await buffer.add_reading(reading(ts=20))
        assert record.seq == 4, "the failed readings used up sequence numbers"
        assert buffer.write_failures == 0
        assert [seq_of(e) for e in await buffer.take(0, 10)][-1] == 4

    run(db, body, config(max_bytes=5 * size + size // 2, eviction=eviction))


def test_spill_mode_memory_stays_bounded_while_the_disk_refuses_spills(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = reading_size()

    async def body(buffer: StoreAndForwardBuffer) -> None:
        await buffer.add_reading(reading())  # the sequence reservation is written
        disk = FailingCommits(buffer, monkeypatch)
        disk.failing = True
        await buffer.add_message(STATUS, b"online", retain=True)
        for i in range(200):
            await buffer.add_reading(reading(ts=i))
            stats = await buffer.stats()
            # spill_memory, plus what arrives while a failing spill is under way (its entries cannot be
            # shed meanwhile)
            assert stats.bytes <= 2 * 20 * size, f"memory grew to {stats.bytes} bytes"
        assert buffer.drops[DropReason.WRITE_ERROR] > 150
        assert buffer.control_drops == 0  # the status message is kept
        disk.failing = False
        await until(lambda: buffer.spilled_total > 0, 10, "spilling to resume")
        entries = await buffer.take(0, 1000)
        assert sum(not e.is_record for e in entries) == 1
        # What is kept is the newest, in order.
        assert [ts_of(e) for e in entries if e.is_record] == sorted(ts_of(e) for e in entries if e.is_record)
        assert ts_of(entries[-1]) == 199

    run(db, body, spill(spill_after=0.05, spill_memory=20 * size))


def test_spill_mode_spills_the_oldest_beyond_spill_memory_at_once(db: Path) -> None:
    size = reading_size()

    async def body(buffer: StoreAndForwardBuffer) -> None:
        for i in range(30):
            await buffer.add_reading(reading(ts=i))
        await buffer.flush()
        await until(lambda: buffer.spilled_total >= 20, 10, "the overflow to be spilled")
        stats = await buffer.stats()
        assert stats.memory_messages <= 10
        assert stats.messages == 30
        spilled = rows_on_disk(db)
        assert [r[0] for r in spilled] == list(range(1, len(spilled) + 1))  # the oldest went to disk
        assert [ts_of(e) for e in await buffer.take(0, 100)] == list(range(30))

    run(db, body, spill(spill_after=3600, spill_memory=10 * size))
