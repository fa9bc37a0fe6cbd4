"""Store-and-forward buffer as the rest of the gateway sees it (asyncio side).

Everything bound for the cloud enters here first. Readings get their per-device
sequence number here, so ``seq`` is restart-safe. The uplink takes entries in id
order and ``accept``s each one after its PUBACK; only then is it deleted.

Two durability modes (``[buffer] durability``):

- ``durable``: a message counts as buffered once its transaction is committed with
  ``synchronous=FULL``. One writer task performs group commit: whatever arrived since
  the last commit (new messages and acknowledged ids alike) is one transaction.
- ``spill``: messages are held in memory and handed to the uplink at once; those not
  acknowledged within ``spill_after`` (or beyond ``spill_memory`` bytes) are written
  to disk. A fast uplink means almost no disk writes (SD cards); a power cut loses
  what was only in memory. Sequence numbers stay restart-safe through reservations
  written ahead in blocks.

Bounds (``max_bytes``, ``max_age``, ``min_free_disk``) are enforced in the same
transaction that adds messages: ``drop-oldest`` evicts the oldest telemetry, and
control messages (status, command results) only once no telemetry is left;
``reject-new`` refuses new telemetry instead. Every drop is counted by reason.

The newest entries are also kept in memory (the *tail*), so the uplink's live lane
reads them without touching SQLite; older ones come from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fieldlink.wire import Encoding, Record, TopicKind, encode_record, topic
from gateway.buffer.config import BufferConfig, DropReason, Durability, Eviction
from gateway.buffer.sqlite_store import (
    BufferStats,
    Commit,
    CommitResult,
    Entry,
    NewMessage,
    Priority,
    SqliteStore,
)
from gateway.sources.base import Reading

__all__ = ["BufferError", "StoreAndForwardBuffer"]

log = logging.getLogger(__name__)

TAIL_ENTRIES = 8192  # durable mode: newest committed entries kept in memory for the live lane
WRITER_PASS = 4096  # messages built and committed per writer pass at most
DELETE_LINGER = 0.25  # seconds acknowledged deletes wait for an append commit to ride along
DELETE_BATCH = 20_000  # ... unless this many are waiting
SEQ_RESERVATION = 10_000  # spill mode: sequence numbers reserved on disk per write, per device


class BufferError(Exception):
    """A message was not buffered; ``reason`` says why (a DropReason value)."""

    def __init__(self, message: str, reason: DropReason = DropReason.WRITE_ERROR) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class _Pending:
    reading: Reading | None
    topic: str | None
    payload: bytes | None
    retain: bool
    priority: Priority
    done: asyncio.Future[tuple[Record, bytes] | None]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class StoreAndForwardBuffer:
    def __init__(
        self,
        path: Path,
        *,
        site: str,
        gateway: str,
        encoding: Encoding = Encoding.MSGPACK,
        config: BufferConfig | None = None,
    ) -> None:
        self.path = path
        self.site, self.gateway, self.encoding = site, gateway, encoding
        self.config = config or BufferConfig()
        self.spill = self.config.durability is Durability.SPILL
        self._store = SqliteStore(path)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="buffer")
        self._read_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="buffer-read")
        self._queue: list[_Pending] = []
        self._accepted: list[int] = []  # acknowledged ids on disk, deleted with the next commit
        self._deleting: set[int] = set()  # acknowledged, delete not yet committed
        self._tail: dict[int, Entry] = {}  # newest entries, id order; spill mode: not yet on disk
        self._tail_floor = 0  # every existing entry with id > floor is in the tail
        self._spilling: set[int] = set()  # spill mode: being written to disk right now
        self._memory_bytes = 0  # spill mode: bytes only in memory
        self._next_id = 1
        self._visible_id = 0  # the uplink may read entries up to here
        self._work = asyncio.Event()
        self._idle = asyncio.Event()
        self._flushing = 0  # callers waiting in flush(): deletes do not linger for them
        self._admitting = False  # spill mode: the writer has given out ids it has not published yet
        self._closing = False
        self._accepted_since = 0.0
        self._accepted_bytes = 0  # of the acknowledged entries awaiting deletion, as far as known
        self._writer: asyncio.Task[None] | None = None
        self._last_seq: dict[str, int] = {}  # handed out (includes the writer's batch in progress)
        self._buffered_seq: dict[str, int] = {}  # committed (spill mode: admitted)
        self._reserved_seq: dict[str, int] = {}
        self._seq_floor = 0
        self._next_expiry = 0.0
        self._listeners: list[Callable[[], None]] = []
        self.appended_total = 0
        self.records_appended = 0
        self.accepted_total = 0
        self.spilled_total = 0  # spill mode: messages that had to go to disk
        self.drops: Counter[str] = Counter()  # messages lost, by DropReason
        self.control_drops = 0  # of which control messages (status, command results)
        self.recovered_from: Path | None = None
        self.write_failures = 0  # consecutive failed commits (disk full, I/O error)
        self._bound_reason: DropReason | None = None  # the bound being enforced (logged once per episode)
        self._count: dict[Priority, int] = dict.fromkeys(Priority, 0)
        self._bytes: dict[Priority, int] = dict.fromkeys(Priority, 0)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def _read(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._read_thread, fn, *args)

    # --- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        self.recovered_from = await self._run(self._store.open)
        if self.recovered_from is not None:
            # The old sequence numbers are gone with the corrupt file. Restart above any
            # value they can have reached (one record per millisecond since 1970), and
            # keep that floor in the new file, so the cloud never mistakes new records
            # for replays of old ones, not even after the next restart.
            await self._run(self._store.set_seq_floor, _now_ms())
        self._seq_floor = await self._run(self._store.seq_floor)
        self._last_seq = await self._run(self._store.sequences)
        self._reserved_seq = dict(self._last_seq)
        self._buffered_seq = dict(self._last_seq)
        # Totals as of the last commit this (loop) side has seen: consistent with _deleting.
        self._count, self._bytes = dict(self._store.count), dict(self._store.bytes)
        max_id = await self._run(self._store.max_id)
        self._next_id = max_id + 1
        self._visible_id = self._tail_floor = max_id
        self._writer = asyncio.create_task(self._write_loop(), name="buffer-writer")
        stats = await self.stats()
        log.info(
            "buffer open",
            extra={
                "path": str(self.path),
                "durability": self.config.durability.value,
                "messages": stats.messages,
                "bytes": stats.bytes,
            },
        )

    async def close(self) -> None:
        """Commit what is queued (appends and acknowledgements), spill memory, then close the file."""
        if self._writer is not None:
            await self.flush()
            # Let the writer finish its pass (a spill may be half-way in the buffer thread;
            # cancelling the await would not stop the thread, only lose track of it).
            self._closing = True
            self._work.set()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
            if self.spill:
                try:
                    await self._spill(everything=True, accepted=self._accepted)
                    # A clean stop records the true sequence numbers, not the reservations.
                    await self._run(self._store.write_sequences, self._last_seq)
                except Exception as exc:
                    lost = [e for e in self._tail.values() if e.id not in self._spilling]
                    self._count_drops(DropReason.WRITE_ERROR, [e.priority for e in lost])
                    log.error("buffer could not keep what was in memory", extra={"error": str(exc), "lost": len(lost)})
        self._read_thread.shutdown(wait=True)
        await self._run(self._store.close)
        self._thread.shutdown(wait=True)

    # --- producers -----------------------------------------------------------------------

    async def add_reading(self, reading: Reading) -> tuple[Record, bytes]:
        """Buffer a reading; once it is buffered, returns the record (with its seq) and its payload."""
        done = asyncio.get_running_loop().create_future()
        pending = _Pending(reading, None, None, False, Priority.TELEMETRY, done)
        if (
            self.spill
            and not self._queue
            and not self._admitting  # ids must become visible in order: none may be skipped
            and self._writer is not None
            and self._seq_reserved(reading.device)
        ):
            # Spill mode, sequence number already reserved on disk: nothing to wait for, so
            # admit it here rather than wake the writer task for every reading.
            built = self._build([pending])
            if not built:  # refused (it cannot be encoded): the reason is on its future
                raise pending.done.exception()  # type: ignore[misc]
            ((_, message, value),) = built
            self._admit([message])
            assert value is not None
            return value
        result = await self._enqueue(pending)
        assert result is not None
        return result

    async def add_readings(self, readings: list[Reading]) -> list[tuple[Record, bytes] | BufferError]:
        """Buffer many readings at once (one wake-up, one group commit); a result or error for each."""
        results: list[tuple[Record, bytes] | BufferError | None] = []
        waiting: list[asyncio.Future[tuple[Record, bytes] | None]] = []
        loop = asyncio.get_running_loop()
        if self.spill and not self._queue and not self._admitting and self._writer is not None:
            needed = Counter(r.device for r in readings)
            if all(
                max(self._last_seq.get(d, 0), self._seq_floor) + n <= self._reserved_seq.get(d, 0)
                for d, n in needed.items()
            ):
                # Spill mode, every sequence number already reserved: the whole chunk at once.
                pendings = [_Pending(r, None, None, False, Priority.TELEMETRY, loop.create_future()) for r in readings]
                built = self._build(pendings)
                self._admit([m for _, m, _ in built])
                by_pending = {id(p): value for p, _, value in built}
                return [
                    by_pending[id(p)] if id(p) in by_pending else p.done.exception()  # type: ignore[misc]
                    for p in pendings
                ]
        for reading in readings:
            if self.spill and not self._queue and not self._admitting and self._seq_reserved(reading.device):
                try:
                    results.append(await self.add_reading(reading))  # the fast path: returns at once
                except BufferError as exc:
                    results.append(exc)
                continue
            done: asyncio.Future[tuple[Record, bytes] | None] = loop.create_future()
            self._queue.append(_Pending(reading, None, None, False, Priority.TELEMETRY, done))
            waiting.append(done)
            results.append(None)  # filled in below
        if waiting:
            if self._writer is None:
                raise BufferError("buffer is not open")
            self._idle.clear()
            self._work.set()
            await asyncio.wait(waiting)
            outcomes = iter(waiting)
            for i, result in enumerate(results):
                if result is None:
                    future = next(outcomes)
                    error = future.exception()
                    if error is not None and not isinstance(error, BufferError):
                        raise error
                    results[i] = error if error is not None else future.result()
        return [r for r in results if r is not None]

    async def add_message(
        self, topic_name: str, payload: bytes, *, retain: bool = False, priority: Priority = Priority.CONTROL
    ) -> None:
        """Buffer a message other than a reading (device status, command result, ...) in order with the rest."""
        done = asyncio.get_running_loop().create_future()
        await self._enqueue(_Pending(None, topic_name, payload, retain, priority, done))

    async def _enqueue(self, pending: _Pending) -> tuple[Record, bytes] | None:
        if self._writer is None:
            raise BufferError("buffer is not open")
        self._queue.append(pending)
        self._idle.clear()
        self._work.set()
        return await pending.done

    # --- consumer (the uplink) -----------------------------------------------------------

    @property
    def last_id(self) -> int:
        """The newest entry the uplink can read now (the boundary between backlog and live)."""
        return self._visible_id

    async def take(self, after_id: int, limit: int) -> list[Entry]:
        """Up to ``limit`` entries of any class with id > after_id, oldest first, not yet acknowledged."""
        return await self._take(after_id, limit, lambda e: True, self._store.read_upto)

    async def take_backlog(self, after_id: int, upto_id: int, limit: int) -> list[Entry]:
        """Telemetry with after_id < id <= upto_id: the uplink's backlog lane."""
        return await self._take(
            after_id,
            limit,
            lambda e: e.id <= upto_id and e.priority is Priority.TELEMETRY,
            lambda after, upto, n: self._store.read_backlog(after, min(upto, upto_id), n),
            upto_id,
        )

    async def take_live(self, after_id: int, boundary: int, limit: int) -> list[Entry]:
        """Control messages of any age, and everything newer than ``boundary``: the live lane."""
        return await self._take(
            after_id,
            limit,
            lambda e: e.id > boundary or e.priority is not Priority.TELEMETRY,
            lambda after, upto, n: self._store.read_live(after, boundary, n, upto),
        )

    async def _take(
        self,
        after_id: int,
        limit: int,
        wanted: Callable[[Entry], bool],
        read_disk: Callable[[int, int, int], list[Entry]],
        upto_id: int | None = None,
    ) -> list[Entry]:
        result: list[Entry] = []
        while after_id < (floor := self._tail_floor):
            # Below the tail: from SQLite (only up to the floor: newer ones may be only in memory).
            # Acknowledged rows not yet deleted are skipped: ask for that many more (only those
            # past the cursor count, or every read would fetch rows it throws away).
            asked = limit - len(result) + sum(1 for i in self._deleting if i > after_id)
            rows: list[Entry] = await self._read(read_disk, after_id, floor, asked)
            result += [e for e in rows if e.id not in self._deleting][: limit - len(result)]
            if len(rows) == asked or len(result) >= limit:
                return result  # more may wait on disk: continue from here next time
            # Everything up to the floor is read. If the tail moved up during the read (a commit
            # or a spill), what is between the old and the new floor is on disk now: read on.
            # (A short answer would tell the lane that nothing more waits.)
            after_id = floor
        last = min(self._visible_id, upto_id if upto_id is not None else self._visible_id)
        # Ids are dense, so walking them from the cursor (or from the oldest entry still in the
        # tail, if newer) touches only entries newer than it.
        start = max(after_id + 1, next(iter(self._tail), last + 1))
        for entry_id in range(start, last + 1):
            if len(result) >= limit:
                break
            entry = self._tail.get(entry_id)
            if entry is not None and entry_id not in self._deleting and wanted(entry):
                result.append(entry)
        return result

    def accept(self, acknowledged: Iterable[int | Entry]) -> None:
        """The broker acknowledged these entries (ids, or the entries); deleted with the next commit.

        Passing entries lets the bounds count their bytes as free at once (acknowledged
        entries make room before anything is dropped); for bare ids the buffer knows the
        size only of those still in its in-memory tail.
        """
        on_disk: list[int] = []
        for item in acknowledged:
            entry_id, size = (item.id, item.size) if isinstance(item, Entry) else (item, None)
            self.accepted_total += 1
            cached = self._tail.pop(entry_id, None)
            if self.spill and cached is not None and entry_id not in self._spilling:
                self._memory_bytes -= cached.size  # never reached the disk, never will
                continue
            if size is None and cached is not None:
                size = cached.size
            self._accepted_bytes += size or 0
            on_disk.append(entry_id)
        if on_disk:
            if not self._accepted:
                self._accepted_since = time.monotonic()
            self._accepted.extend(on_disk)
            self._deleting.update(on_disk)
            self._idle.clear()
            self._work.set()

    def discard(self, entries: Iterable[Entry], reason: DropReason) -> None:
        """Delete entries that will never be delivered (the broker refused them), counting them."""
        entries = list(entries)
        self._count_drops(reason, [e.priority for e in entries])
        self.accept(e.id for e in entries)
        self.accepted_total -= len(entries)

    async def flush(self) -> None:
        """Wait until everything queued so far is committed (spill mode: admitted to memory)."""
        if self._queue or self._accepted or not self._idle.is_set():
            self._flushing += 1
            try:
                self._work.set()
                await self._idle.wait()
            finally:
                self._flushing -= 1

    async def stats(self) -> BufferStats:
        store = self._store
        oldest = await self._read(store.oldest_created_ms)
        memory = [e for e in self._tail.values() if e.id not in self._spilling] if self.spill else []
        if oldest is None and memory:
            oldest = memory[0].created_ms
        deleting = len(self._deleting)
        return BufferStats(
            messages=max(0, sum(self._count.values()) - deleting) + len(memory),
            records=max(0, self._count[Priority.TELEMETRY] - deleting) + sum(e.is_record for e in memory),
            bytes=sum(self._bytes.values()) + self._memory_bytes,
            oldest_ms=oldest,
            memory_messages=len(memory),
            file_bytes=store.file_bytes(),
        )

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever new entries became readable (the uplink wakes up)."""
        self._listeners.append(listener)

    def last_seq(self) -> dict[str, int]:
        """The last sequence number per device that is buffered (readable by the uplink)."""
        return dict(self._buffered_seq)

    # --- the writer ----------------------------------------------------------------------

    def _tick(self) -> float:
        ticks = [60.0]
        if self.config.max_age is not None:
            ticks.append(max(1.0, self.config.max_age / 20))
        if self.spill:
            ticks.append(max(0.05, self.config.spill_after / 4))
        return min(ticks)

    def _deletes_wait(self) -> float | None:
        """Seconds acknowledged deletes may still wait to ride along with the next append commit.

        A commit costs page writes however little it carries (SD cards wear by the write),
        and a late delete costs nothing: acknowledged entries are hidden from the uplink at
        once. None means commit now.
        """
        if self._queue or not self._accepted or self._flushing or len(self._accepted) >= DELETE_BATCH:
            return None
        left = self._accepted_since + DELETE_LINGER - time.monotonic()
        return left if left > 0 else None

    async def _write_loop(self) -> None:
        while not self._closing:
            wait = self._tick()
            lingering = self._deletes_wait()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait if lingering is None else min(wait, lingering)):
                    await self._work.wait()
            self._work.clear()
            if self._deletes_wait() is not None and not self._closing:
                continue
            # A bounded pass keeps the event loop responsive (encoding runs on it); the rest waits.
            batch, self._queue = self._queue[:WRITER_PASS], self._queue[WRITER_PASS:]
            if self._queue:
                self._work.set()
            accepted, self._accepted = self._accepted, []
            freed, self._accepted_bytes = self._accepted_bytes, 0
            try:
                if self.spill:
                    await self._admit_to_memory(batch)
                    await self._spill(everything=False, accepted=accepted, freed=freed)
                else:
                    await self._commit(batch, accepted, freed)
            except Exception as exc:  # disk full, I/O error: report, keep running
                await self._write_failed(exc, batch, accepted, freed)
            else:
                if self.write_failures:
                    log.warning("buffer writes again", extra={"failed_commits": self.write_failures})
                    self.write_failures = 0
            if not self._queue and not self._accepted:
                self._idle.set()

    async def _write_failed(self, exc: Exception, batch: list[_Pending], accepted: list[int], freed: int) -> None:
        """A pass could not write: its new messages are dropped (counted), its deletes retried."""
        self.write_failures += 1
        if self.write_failures == 1:  # once per episode, not once per reading
            log.error("buffer write failed", extra={"error": str(exc), "messages": len(batch)})
        self._accepted[:0] = accepted  # retry the deletes with the next commit
        self._accepted_bytes += freed
        failed = [p for p in batch if not p.done.done()]
        self._count_drops(DropReason.WRITE_ERROR, [p.priority for p in failed])
        for pending in failed:
            pending.done.set_exception(BufferError(str(exc)))
        if self.spill:
            self._shed_memory()
            # Every admission over spill_memory wakes the writer: without a pause a failing
            # disk would be retried in a tight loop (memory is shed meanwhile). Durable mode
            # needs none: producers wait for their commit, so the writer retries at most as
            # often as they poll.
            await asyncio.sleep(min(0.25, 0.02 * 2 ** min(self.write_failures, 4)))

    def _build(self, batch: list[_Pending]) -> list[tuple[_Pending, NewMessage, tuple[Record, bytes] | None]]:
        """Give each pending message its id (and a reading its seq and payload), in arrival order."""
        now = _now_ms()
        built = []
        for pending in batch:
            if pending.reading is None:
                assert pending.topic is not None
                assert pending.payload is not None
                message = NewMessage(
                    self._next_id, pending.topic, pending.payload, pending.retain, pending.priority, now
                )
                built.append((pending, message, None))
            else:
                reading = pending.reading
                seq = max(self._last_seq.get(reading.device, 0), self._seq_floor) + 1
                record = Record(self.site, self.gateway, reading.device, seq, reading.ts, reading.values)
                try:
                    payload = encode_record(record, self.encoding)
                except (ValueError, OverflowError, TypeError) as exc:
                    # A reading the wire cannot carry (a local app's lone surrogate, a ts out of
                    # range): refused alone, without a seq, and the rest of the batch goes on.
                    self._count_drops(DropReason.INVALID, [Priority.TELEMETRY])
                    if not pending.done.done():
                        pending.done.set_exception(BufferError(f"cannot encode: {exc}", DropReason.INVALID))
                        pending.done.exception()
                    continue
                self._last_seq[reading.device] = seq
                telemetry_topic = topic(TopicKind.TELEMETRY, self.site, self.gateway, reading.device)
                message = NewMessage(
                    self._next_id, telemetry_topic, payload, False, Priority.TELEMETRY, now, reading.device, seq
                )
                built.append((pending, message, (record, payload)))
            self._next_id += 1
        return built

    def _bounds(
        self, incoming: list[NewMessage], freed: int = 0
    ) -> tuple[list[NewMessage], int, DropReason, list[NewMessage]]:
        """Which new messages fit, and how many bytes to evict for them: (admitted, evict, reason, rejected)."""
        if not incoming:
            return incoming, 0, DropReason.MAX_BYTES, []
        stored = sum(self._bytes.values()) - freed  # the commit deletes acknowledged entries first
        incoming_bytes = sum(m.size for m in incoming)
        cap, reason = self._cap(stored, incoming_bytes)
        room = cap - stored  # negative after an overshoot: the next commit evicts back under the cap
        if incoming_bytes <= room:
            if room - incoming_bytes >= cap // 20:
                self._bound_released()  # with 5 % to spare: an episode is not logged per commit
            return incoming, 0, reason, []
        self._bound_reached(reason, cap)
        telemetry = max(0, self._bytes[Priority.TELEMETRY] - freed)
        if self.config.eviction is Eviction.DROP_OLDEST:
            admitted, evict, rejected = self._drop_oldest(incoming, room, telemetry, max(0, stored))
        else:
            admitted, evict, rejected = self._reject_new(incoming, room, max(0, stored))
        return admitted, evict, reason, rejected

    def _cap(self, stored: int, incoming_bytes: int) -> tuple[int, DropReason]:
        """The bound in force: max_bytes, or less when the disk is short of min_free_disk."""
        try:
            vfs = os.statvfs(self.path.parent)
        except OSError:
            return self.config.max_bytes, DropReason.MAX_BYTES
        free = vfs.f_bavail * vfs.f_frsize
        if free - incoming_bytes < self.config.min_free_disk:
            # Let the database grow only into what stays above the watermark, and into its own
            # free pages: a drained file does not shrink, but SQLite reuses its space.
            disk_cap = stored + self._store.free_page_bytes + max(0, free - self.config.min_free_disk)
            if disk_cap < self.config.max_bytes:
                return disk_cap, DropReason.MIN_FREE_DISK
        return self.config.max_bytes, DropReason.MAX_BYTES

    def _drop_oldest(
        self, incoming: list[NewMessage], room: int, telemetry: int, stored: int
    ) -> tuple[list[NewMessage], int, list[NewMessage]]:
        """Old telemetry makes room; control messages are evicted only for other control messages."""
        incoming_bytes = sum(m.size for m in incoming)
        if incoming_bytes - room <= telemetry or self._count[Priority.CONTROL] == 0:
            # Stored telemetry makes room for all of it, or there is no control message to
            # protect: admit everything (a batch bigger than the cap overshoots by itself
            # until the next commit evicts again).
            return incoming, incoming_bytes - room, []
        keep: set[int] = set()
        used = 0
        for message in incoming:  # control messages first: they outrank telemetry
            if message.priority is Priority.CONTROL and used + message.size <= room + stored:
                keep.add(message.id)
                used += message.size
        # Then telemetry, newest first: what does not fit are the oldest of the batch.
        telemetry_budget = room + telemetry - used
        for message in reversed(incoming):
            if message.priority is Priority.TELEMETRY and message.size <= telemetry_budget:
                keep.add(message.id)
                telemetry_budget -= message.size
                used += message.size
        admitted = [m for m in incoming if m.id in keep]
        return admitted, max(0, used - room), [m for m in incoming if m.id not in keep]

    @staticmethod
    def _reject_new(
        incoming: list[NewMessage], room: int, stored: int
    ) -> tuple[list[NewMessage], int, list[NewMessage]]:
        """New telemetry only while it fits; a control message evicts telemetry first, then control."""
        admitted, rejected, evict = [], [], 0
        for message in incoming:
            if message.size <= room:
                admitted.append(message)
                room -= message.size
                continue
            need = message.size - max(room, 0)
            if message.priority is Priority.CONTROL and need <= stored - evict:
                admitted.append(message)
                evict += need
                room = 0
            else:
                rejected.append(message)
        return admitted, evict, rejected

    def _bound_reached(self, reason: DropReason, cap: int) -> None:
        if self._bound_reason is None:
            log.warning(
                "buffer full; dropping per policy",
                extra={"bound": reason.value, "cap_bytes": cap, "eviction": self.config.eviction.value},
            )
        self._bound_reason = reason

    def _bound_released(self) -> None:
        if self._bound_reason is not None:
            log.info("buffer below its bounds again", extra={"drops": dict(self.drops)})
            self._bound_reason = None

    def _expiry_due(self) -> int | None:
        if self.config.max_age is None or time.monotonic() < self._next_expiry:
            return None
        self._next_expiry = time.monotonic() + max(1.0, self.config.max_age / 20)
        return _now_ms() - round(self.config.max_age * 1000)

    def _count_drops(self, reason: DropReason, priorities: Iterable[Priority]) -> None:
        for priority in priorities:
            self.drops[reason.value] += 1
            self.control_drops += priority is Priority.CONTROL

    def _apply_removals(self, result: CommitResult, reason: DropReason) -> None:
        """Evicted and expired entries: counted, and forgotten by the tail and the uplink."""
        self._count, self._bytes = result.count, result.bytes
        for priority, n in result.evicted.items():
            self.drops[reason.value] += n
            if priority is Priority.CONTROL:
                self.control_drops += n
        self.drops[DropReason.MAX_AGE.value] += result.expired
        for entry_id in (*result.evicted_ids, *result.expired_ids):
            self._tail.pop(entry_id, None)
            self._deleting.discard(entry_id)

    async def _commit(self, batch: list[_Pending], accepted: list[int], freed: int) -> None:
        """Durable mode: one transaction for everything that arrived since the last one."""
        saved_next_id, saved_seqs = self._next_id, dict(self._last_seq)
        built = self._build(batch)
        admitted, evict, reason, rejected = self._bounds([m for _, m, _ in built], freed)
        rejected_ids = {m.id for m in rejected}
        if rejected:
            # Rejected readings must not use up sequence numbers: renumber the admitted ones.
            # (A copy: saved_seqs must stay as it was in case the commit fails.)
            self._next_id, self._last_seq = saved_next_id, dict(saved_seqs)
            refused = [p for p, m, _ in built if m.id in rejected_ids]
            kept = [(p, m, r) for p, m, r in built if m.id not in rejected_ids]
            built = self._build([p for p, _, _ in kept])
            admitted = [m for _, m, _ in built]
            self._count_drops(reason, [m.priority for m in rejected])
            # Refused now: a commit that then fails must not count them again, as write errors.
            self._fail_rejected(refused, reason)
        expire = self._expiry_due()
        if not admitted and not accepted and not evict and expire is None:
            self._fail_rejected(batch, reason)
            return
        changed = {m.device: m.seq for m in admitted if m.device is not None and m.seq is not None}
        plan = Commit(evict, expire, admitted, changed, accepted, durable=bool(admitted))
        try:
            result: CommitResult = await self._run(self._store.commit, plan)
        except BaseException:
            # Nothing was written: the sequence numbers were not used after all.
            self._last_seq = saved_seqs
            raise
        self._deleting.difference_update(accepted)
        self._apply_removals(result, reason)
        self.appended_total += len(admitted)
        self.records_appended += sum(m.priority is Priority.TELEMETRY for m in admitted)
        self._publish(admitted)
        for pending, _, value in built:
            # A producer cancelled while waiting (a source stopped at shutdown) no longer
            # wants the answer, but its message is committed: the listeners heard of it.
            if not pending.done.done():
                pending.done.set_result(value)
        self._fail_rejected(batch, reason)

    def _fail_rejected(self, batch: list[_Pending], reason: DropReason) -> None:
        for pending in batch:
            if not pending.done.done():
                pending.done.set_exception(BufferError(f"buffer full ({reason.value}); rejected", reason))

    def _publish(self, messages: list[NewMessage]) -> None:
        """Make committed (or, in spill mode, admitted) messages readable by the uplink."""
        if not messages:
            return
        for message in messages:
            self._tail[message.id] = message.entry()
            if message.device is not None and message.seq is not None:
                self._buffered_seq[message.device] = message.seq
        self._visible_id = messages[-1].id
        if not self.spill:
            while len(self._tail) > TAIL_ENTRIES:
                oldest = next(iter(self._tail))
                del self._tail[oldest]
                self._tail_floor = oldest
        for listener in self._listeners:
            listener()

    # --- spill mode ----------------------------------------------------------------------

    async def _admit_to_memory(self, batch: list[_Pending]) -> None:
        self._admitting = True
        try:
            await self._admit_batch(batch)
        finally:
            self._admitting = False

    async def _admit_batch(self, batch: list[_Pending]) -> None:
        saved_seqs = dict(self._last_seq)
        built = self._build(batch)
        short = {d: s + SEQ_RESERVATION for d, s in self._last_seq.items() if s > self._reserved_seq.get(d, 0)}
        if short:
            # Reserve sequence numbers on disk before any record using them leaves this process.
            try:
                await self._run(self._store.write_sequences, short)
            except BaseException:
                self._last_seq = saved_seqs
                raise
            self._reserved_seq.update(short)
        self._admit([m for _, m, _ in built])
        for pending, _, value in built:
            if not pending.done.done():
                pending.done.set_result(value)

    def _seq_reserved(self, device: str) -> bool:
        return max(self._last_seq.get(device, 0), self._seq_floor) < self._reserved_seq.get(device, 0)

    def _admit(self, messages: list[NewMessage]) -> None:
        """Spill mode: into memory, readable by the uplink at once."""
        for message in messages:
            self._memory_bytes += message.size
        self.appended_total += len(messages)
        self.records_appended += sum(m.priority is Priority.TELEMETRY for m in messages)
        self._publish(messages)
        if self._memory_bytes > self.config.spill_memory:
            if self.write_failures:
                self._shed_memory()  # the disk refuses spills: memory must not wait for the writer
            self._work.set()  # over the memory bound: the writer spills the oldest now

    def _shed_memory(self) -> None:
        """The disk refuses spills: keep memory bounded by dropping its oldest telemetry."""
        over = self._memory_bytes - self.config.spill_memory
        if over <= 0:
            return
        dropped = []
        for entry in list(self._tail.values()):
            if over <= 0:
                break
            if entry.is_record and entry.id not in self._spilling:
                del self._tail[entry.id]
                self._memory_bytes -= entry.size
                over -= entry.size
                dropped.append(entry.priority)
        self._count_drops(DropReason.WRITE_ERROR, dropped)

    async def _spill(self, *, everything: bool, accepted: list[int] | None = None, freed: int = 0) -> None:
        """Write to disk what waited too long for its PUBACK (or overflows memory)."""
        accepted = accepted or []
        if self.write_failures:
            self._shed_memory()  # before choosing: entries being spilled cannot be shed meanwhile
        cutoff = _now_ms() - round(self.config.spill_after * 1000)
        memory = [e for e in self._tail.values() if e.id not in self._spilling]
        over = self._memory_bytes - self.config.spill_memory
        chosen: list[Entry] = []
        for entry in memory:  # oldest first
            if not (everything or entry.created_ms <= cutoff or over > 0):
                break
            chosen.append(entry)
            over -= entry.size
        expire = self._expiry_due()
        if not chosen and not accepted and expire is None:
            return
        incoming = [NewMessage(e.id, e.topic, e.payload, e.retain, e.priority, e.created_ms) for e in chosen]
        admitted, evict, reason, rejected = self._bounds(incoming, freed)
        plan = Commit(evict, expire, admitted, {}, accepted, durable=bool(admitted))
        self._spilling.update(e.id for e in chosen)
        try:
            result: CommitResult = await self._run(self._store.commit, plan)
        except BaseException:
            self._spilling.difference_update(e.id for e in chosen)
            for entry in chosen:
                if entry.id not in self._tail:
                    # Acknowledged during the failed write: it never reached the disk after all.
                    self._memory_bytes -= entry.size
                    self._deleting.discard(entry.id)
                    with contextlib.suppress(ValueError):
                        self._accepted.remove(entry.id)
            raise
        self._spilling.difference_update(e.id for e in chosen)
        self._deleting.difference_update(accepted)
        self._apply_removals(result, reason)
        self._count_drops(reason, [m.priority for m in rejected])
        self.spilled_total += len(admitted)
        for entry in chosen:
            # Off to disk (or rejected): no longer memory's. Acknowledged meanwhile: already popped.
            # (One acknowledged during the write was queued for deletion by accept().)
            self._tail.pop(entry.id, None)
            self._memory_bytes -= entry.size
        if chosen:
            self._tail_floor = max(self._tail_floor, chosen[-1].id)
