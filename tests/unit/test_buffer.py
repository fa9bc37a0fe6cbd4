"""The store-and-forward buffer on a real SQLite file: sequence numbers, take/accept, recovery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from fieldlink.wire import Encoding, Quality, Record, TopicKind, Value, ValueType, decode, encode_record, topic
from gateway.buffer import BufferError, StoreAndForwardBuffer
from gateway.buffer.sqlite_store import SqliteStore
from gateway.sources.base import Reading

T = TypeVar("T")
SITE, GATEWAY = "plant-1", "gw-1"


def reading(device: str = "boiler-1", ts: int = 1_700_000_000_000) -> Reading:
    return Reading(device, ts, {"t": Value.of(1.5, "degC")})


def with_buffer(path: Path, body: Callable[[StoreAndForwardBuffer], Awaitable[T]], **options: object) -> T:
    """Open a buffer on ``path``, run ``body`` with it, close it; all bounded by a deadline."""

    async def main() -> T:
        async with asyncio.timeout(10):
            buffer = StoreAndForwardBuffer(path, site=SITE, gateway=GATEWAY, **options)  # type: ignore[arg-type]
            await buffer.open()
            try:
                return await body(buffer)
            finally:
                await buffer.close()

    return asyncio.run(main())


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "buffer" / "buffer.db"


# --- sequence numbers ---------------------------------------------------------------------


def test_sequence_numbers_start_at_one_and_are_contiguous_per_device(db: Path) -> None:
    async def body(buffer: StoreAndForwardBuffer) -> list[tuple[str, int]]:
        out = []
        for device in ["a", "b", "a", "a", "b", "c"]:
            record, _ = await buffer.add_reading(reading(device))
            out.append((record.device, record.seq))
        return out

    assert with_buffer(db, body) == [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2), ("c", 1)]


def test_add_reading_returns_the_record_and_its_payload(db: Path) -> None:
    async def body(buffer: StoreAndForwardBuffer) -> tuple[Record, bytes]:
        return await buffer.add_reading(reading("boiler-1", ts=1234))

    record, payload = with_buffer(db, body)
    assert record == Record(SITE, GATEWAY, "boiler-1", 1, 1234, {"t": Value.of(1.5, "degC")})
    assert decode(payload) == [record]
    assert payload[:1] != b"{"  # msgpack by default


def test_json_encoding_is_honoured(db: Path) -> None:
    async def body(buffer: StoreAndForwardBuffer) -> bytes:
        _, payload = await buffer.add_reading(reading())
        return payload

    payload = with_buffer(db, body, encoding=Encoding.JSON)
    assert payload[:1] == b"{"
    assert decode(payload)[0].seq == 1


def test_sequence_numbers_survive_a_restart(db: Path) -> None:
    async def first_run(buffer: StoreAndForwardBuffer) -> list[int]:
        seqs = [(await buffer.add_reading(reading("a")))[0].seq for _ in range(3)]
        await buffer.add_reading(reading("b"))
        # Everything delivered and deleted: the sequence numbers must still be remembered.
        buffer.accept(e.id for e in await buffer.take(0, 100))
        await buffer.flush()
        return seqs

    async def second_run(buffer: StoreAndForwardBuffer) -> tuple[dict[str, int], int, int, int]:
        last = buffer.last_seq()
        a = (await buffer.add_reading(reading("a")))[0].seq
        b = (await buffer.add_reading(reading("b")))[0].seq
        new = (await buffer.add_reading(reading("new")))[0].seq
        return last, a, b, new

    assert with_buffer(db, first_run) == [1, 2, 3]
    assert with_buffer(db, second_run) == ({"a": 3, "b": 1}, 4, 2, 1)


def test_adding_to_a_closed_buffer_is_a_buffer_error(db: Path) -> None:
    async def main() -> None:
        buffer = StoreAndForwardBuffer(db, site=SITE, gateway=GATEWAY)
        with pytest.raises(BufferError, match="not open"):
            await buffer.add_reading(reading())
        with pytest.raises(BufferError, match="not open"):
            await buffer.add_message("fl/plant-1/gw-1/status", b"{}")

    asyncio.run(main())


# --- take / accept ------------------------------------------------------------------------


def test_take_returns_entries_oldest_first(db: Path) -> None:
    async def body(buffer: StoreAndForwardBuffer) -> None:
        records = [(await buffer.add_reading(reading("a", ts=i)))[0] for i in range(5)]
        first = await buffer.take(0, 3)
        assert [decode(e.payload)[0] for e in first] == records[:3]
        assert [e.id for e in first] == sorted(e.id for e in first)
        assert all(e.is_record and not e.retain for e in first)
        assert {e.topic for e in first} == {topic(TopicKind.TELEMETRY, SITE, GATEWAY, "a")}
        rest = await buffer.take(first[-1].id, 10)
        assert [decode(e.payload)[0] for e in rest] == records[3:]
        assert await buffer.take(rest[-1].id, 10) == []
        assert await buffer.take(0, 0) == []

    with_buffer(db, body)


def test_accepted_entries_are_never_taken_again(db: Path) -> None:
    async def body(buffer: StoreAndForwardBuffer) -> None:
        for i in range(6):
            await buffer.add_reading(reading("a", ts=i))
        entries = await buffer.take(0, 10)
        acked = [entries[0].id, entries[2].id, entries[3].id]
        buffer.accept(acked)
        # The delete is not committed yet (the writer has not run): take must hide them anyway.
        assert [e.id for e in await buffer.take(0, 10)] == [entries[1].id, entries[4].id, entries[5].id]
        assert [e.id for e in await buffer.take(0, 2)] == [entries[1].id, entries[4].id]
        assert (await buffer.stats()).messages == 3
        await buffer.flush()
        assert [e.id for e in await buffer.take(0, 10)] == [entries[1].id, entries[4].id, entries[5].id]
        assert (await buffer.stats()).messages == 3
        assert buffer.accepted_total == 3

    with_buffer(db, body)
    # Deleted on disk, not just hidden: a fresh open sees three entries.
    store = SqliteStore(db)
    store.open()
    try:
        assert sum(store.count.values()) == 3
        assert [decode(e.payload)[0].ts for e in store.read(0, 10)] == [1, 4, 5]
    finally:
        store.close()


def test_ids_are_never_reused_after_the_buffer_drained(db: Path) -> None:
    async def body(buffer: StoreAndForwardBuffer) -> None:
        await buffer.add_reading(reading())
        (entry,) = await buffer.take(0, 10)
        buffer.accept([entry.id])
        await buffer.flush()
        await buffer.add_reading(reading())
        (later,) = await buffer.take(entry.id, 10)
        assert later.id > entry.id

    with_buffer(db, body)


def test_messages_interleave_in_order_with_readings(db: Path) -> None:
    status = topic(TopicKind.DEVICE_STATUS, SITE, GATEWAY, "a")

    async def body(buffer: StoreAndForwardBuffer) -> list[tuple[str, bytes | int, bool, bool]]:
        await buffer.add_reading(reading("a", ts=1))
        await buffer.add_message(status, b'{"state":"offline","ts":2}', retain=True)
        await buffer.add_reading(reading("a", ts=3))
        await buffer.add_message(status, b'{"state":"online","ts":4}')
        out: list[tuple[str, bytes | int, bool, bool]] = []
        for e in await buffer.take(0, 10):
            body_ = decode(e.payload)[0].ts if e.is_record else e.payload
            out.append((e.topic, body_, e.retain, e.is_record))
        return out

    telemetry = topic(TopicKind.TELEMETRY, SITE, GATEWAY, "a")
    assert with_buffer(db, body) == [
        (telemetry, 1, False, True),
        (status, b'{"state":"offline","ts":2}', True, False),
        (telemetry, 3, False, True),
        (status, b'{"state":"online","ts":4}', False, False),
    ]


def test_stats_count_records_and_bytes(db: Path) -> None:
    async def body(buffer: StoreAndForwardBuffer) -> None:
        empty = await buffer.stats()
        assert (empty.messages, empty.bytes, empty.oldest_ms) == (0, 0, None)
        before = time.time_ns() // 1_000_000
        payloads = [(await buffer.add_reading(reading()))[1] for _ in range(3)]
        await buffer.add_message("fl/plant-1/gw-1/status", b"12345")
        after = time.time_ns() // 1_000_000
        stats = await buffer.stats()
        assert (stats.messages, stats.records) == (4, 3)
        telemetry_topic = len("fl/plant-1/gw-1/dev/boiler-1/telemetry")
        status = len("fl/plant-1/gw-1/status") + 5
        # The bounds count what a message occupies: its topic and its payload.
        assert stats.bytes == sum(telemetry_topic + len(p) for p in payloads) + status
        assert stats.oldest_ms is not None
        assert before <= stats.oldest_ms <= after
        entries = await buffer.take(0, 10)
        buffer.accept([entries[0].id])
        await buffer.flush()
        stats = await buffer.stats()
        assert (stats.messages, stats.bytes) == (3, sum(telemetry_topic + len(p) for p in payloads[1:]) + status)
        assert buffer.appended_total == 4

    with_buffer(db, body)


def test_on_commit_listeners_hear_about_new_entries(db: Path) -> None:
    calls: list[int] = []

    async def body(buffer: StoreAndForwardBuffer) -> None:
        buffer.on_commit(lambda: calls.append(1))
        await buffer.add_reading(reading())
        assert len(calls) == 1
        buffer.accept(e.id for e in await buffer.take(0, 10))
        await buffer.flush()
        assert len(calls) == 1  # a commit of deletes only brings nothing new to send

    with_buffer(db, body)


def test_a_producer_cancelled_while_waiting_still_gets_its_entry_committed_and_announced(db: Path) -> None:
    # At shutdown a source is cancelled while it awaits its reading's commit. The reading
    # is committed all the same; the uplink must hear of it, or the drain stalls on it.
    calls: list[int] = []

    async def body(buffer: StoreAndForwardBuffer) -> None:
        buffer.on_commit(lambda: calls.append(1))
        waiter = asyncio.create_task(buffer.add_reading(reading()))
        await asyncio.sleep(0)  # the reading is queued for the writer
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        await buffer.flush()
        assert calls == [1]
        assert buffer.write_failures == 0
        assert [e.is_record for e in await buffer.take(0, 10)] == [True]
        assert (await buffer.add_reading(reading(ts=1_700_000_000_001)))[0].seq == 2

    with_buffer(db, body)


# --- corruption ---------------------------------------------------------------------------


def test_a_corrupt_file_is_moved_aside_and_sequences_restart_above_the_clock(db: Path) -> None:
    db.parent.mkdir(parents=True)
    garbage = b"this is not an SQLite database\x00\xff" * 200
    db.write_bytes(garbage)
    before_ms = time.time_ns() // 1_000_000

    async def body(buffer: StoreAndForwardBuffer) -> tuple[Path | None, list[int], int]:
        seqs = [(await buffer.add_reading(reading("a")))[0].seq for _ in range(3)]
        other = (await buffer.add_reading(reading("b")))[0].seq
        return buffer.recovered_from, seqs, other

    recovered_from, seqs, other = with_buffer(db, body)
    after_ms = time.time_ns() // 1_000_000
    assert recovered_from is not None
    assert recovered_from.name.startswith("buffer.db.corrupt-")
    assert recovered_from.read_bytes() == garbage
    assert list(db.parent.glob("buffer.db.corrupt-*")) == [recovered_from]
    assert seqs[0] > before_ms
    assert seqs[0] <= after_ms + 1
    assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]  # still contiguous
    assert other > before_ms


def test_a_healthy_file_is_not_recovered(db: Path) -> None:
    async def body(buffer: StoreAndForwardBuffer) -> Path | None:
        await buffer.add_reading(reading())
        return buffer.recovered_from

    assert with_buffer(db, body) is None
    assert with_buffer(db, body) is None
    assert list(db.parent.glob("*.corrupt-*")) == []


def test_the_recovery_floor_survives_the_next_restart(db: Path) -> None:
    db.parent.mkdir(parents=True)
    db.write_bytes(b"garbage" * 500)
    before_ms = time.time_ns() // 1_000_000

    # Regression: the floor used to live only in memory, so "b" (silent between the recovery
    # and the next restart) started again at seq 1, colliding with its old sequence numbers.
    async def recover(buffer: StoreAndForwardBuffer) -> Path | None:
        await buffer.add_reading(reading("a"))  # "b" is offline until after the next restart
        return buffer.recovered_from

    async def restart(buffer: StoreAndForwardBuffer) -> int:
        return (await buffer.add_reading(reading("b")))[0].seq

    assert with_buffer(db, recover) is not None
    assert with_buffer(db, restart) > before_ms


# --- group commit -------------------------------------------------------------------------


def test_concurrent_readings_are_group_committed(db: Path) -> None:
    commits: list[int] = []

    async def body(buffer: StoreAndForwardBuffer) -> list[int]:
        buffer.on_commit(lambda: commits.append(1))
        results = await asyncio.gather(*(buffer.add_reading(reading("a", ts=i)) for i in range(200)))
        return [record.seq for record, _ in results]

    seqs = with_buffer(db, body)
    assert sorted(seqs) == list(range(1, 201))
    assert len(set(seqs)) == 200
    # on_commit fires once per transaction that added entries: far fewer than one per reading.
    assert 1 <= len(commits) <= 10


def test_spill_mode_never_makes_an_id_visible_before_an_older_one(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A reading whose sequence number needs a reservation waits for the disk; readings of other
    # devices meanwhile must not become readable past it, or the uplink's cursor skips it.
    from gateway.buffer import BufferConfig, Durability  # noqa: PLC0415

    reserving = asyncio.Event()
    release = asyncio.Event()

    async def body(buffer: StoreAndForwardBuffer) -> None:
        await buffer.add_reading(reading("warm"))  # reserves for "warm"
        loop = asyncio.get_running_loop()
        write_sequences = buffer._store.write_sequences

        def slow_reservation(sequences: dict[str, int]) -> None:
            loop.call_soon_threadsafe(reserving.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(timeout=5)
            write_sequences(sequences)

        monkeypatch.setattr(buffer._store, "write_sequences", slow_reservation)
        first = asyncio.create_task(buffer.add_reading(reading("new")))  # needs a reservation
        await reserving.wait()
        others = [asyncio.create_task(buffer.add_reading(reading("warm", ts=i))) for i in range(3)]
        await asyncio.sleep(0)  # let them try to overtake
        seen = await buffer.take_live(0, 0, 100)
        assert len(seen) == 1  # only the warm-up: nothing newer than the waiting reading is readable yet
        release.set()
        await asyncio.gather(first, *others)
        later = await buffer.take_live(seen[-1].id, 0, 100)
        ids = [e.id for e in seen + later]
        assert ids == sorted(ids)
        assert len(ids) == 1 + 1 + len(others)  # the warm-up, the reserved one, the others: none skipped

    with_buffer(db, body, config=BufferConfig(durability=Durability.SPILL))


@pytest.mark.parametrize("durability", ["durable", "spill"])
def test_add_readings_buffers_a_chunk_in_one_go_with_a_result_for_each(db: Path, durability: str) -> None:
    from gateway.buffer import BufferConfig, Durability  # noqa: PLC0415

    async def body(buffer: StoreAndForwardBuffer) -> None:
        commits_before = buffer.appended_total
        results = await buffer.add_readings([reading("a", ts=i) for i in range(50)] + [reading("b")])
        assert [r[0].seq for r in results if not isinstance(r, BufferError)] == [*range(1, 51), 1]
        assert buffer.appended_total - commits_before == 51
        entries = await buffer.take(0, 100)
        assert [decode(e.payload)[0].ts for e in entries][:3] == [0, 1, 2]

    with_buffer(db, body, config=BufferConfig(durability=Durability(durability)))


def test_add_readings_reports_each_refused_reading(db: Path) -> None:
    from gateway.buffer import BufferConfig, DropReason, Eviction  # noqa: PLC0415

    size = len(topic(TopicKind.TELEMETRY, SITE, GATEWAY, "a")) + len(
        encode_record(Record(SITE, GATEWAY, "a", 1, 0, {"t": Value.of(1.5, "degC")}))
    )
    config = BufferConfig(max_bytes=3 * size, eviction=Eviction.REJECT_NEW, min_free_disk=0, max_age=None)

    async def body(buffer: StoreAndForwardBuffer) -> None:
        results = await buffer.add_readings([reading("a", ts=0) for _ in range(5)])
        refused = [r for r in results if isinstance(r, BufferError)]
        assert len(results) == 5
        assert len(refused) == 2
        assert all(r.reason is DropReason.MAX_BYTES for r in refused)

    with_buffer(db, body, config=config)


@pytest.mark.parametrize("durability", ["durable", "spill"])
def test_a_reading_the_wire_cannot_carry_is_refused_alone(db: Path, durability: str) -> None:
    # A local application can send what decodes but does not encode again (a lone surrogate
    # in a JSON string, a ts beyond 64 bits): only that reading is refused, without a seq.
    from gateway.buffer import BufferConfig, DropReason, Durability  # noqa: PLC0415

    bad_text = Reading("a", 1, {"s": Value("\ud800", None, Quality.GOOD, ValueType.STRING)})
    bad_ts = Reading("a", 10**23, {"t": Value.of(1.0)})

    async def body(buffer: StoreAndForwardBuffer) -> None:
        results = await buffer.add_readings([reading("a"), bad_text, reading("a"), bad_ts, reading("a")])
        refused = [r for r in results if isinstance(r, BufferError)]
        assert [r.reason for r in refused] == [DropReason.INVALID, DropReason.INVALID]
        assert [r[0].seq for r in results if not isinstance(r, BufferError)] == [1, 2, 3]
        assert buffer.drops[DropReason.INVALID.value] == 2
        assert buffer.write_failures == 0
        with pytest.raises(BufferError, match="cannot encode"):
            await buffer.add_reading(bad_text)
        assert (await buffer.add_reading(reading("a")))[0].seq == 4

    with_buffer(db, body, config=BufferConfig(durability=Durability(durability)))
