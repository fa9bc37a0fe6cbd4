"""Store-and-forward buffer as the rest of the gateway sees it (asyncio side).

Everything bound for the cloud enters here first. Readings get their per-device
sequence number here, in the same transaction that makes them durable, so ``seq``
is contiguous per device and survives restarts. The uplink takes entries in id
order and ``accept``s each one after its PUBACK; only then is it deleted.

One writer task performs group commit: whatever arrived since the last commit
(new messages and acknowledged ids alike) goes into one transaction, run on the
buffer's own thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fieldlink.wire import Encoding, Record, TopicKind, encode_record, topic
from gateway.buffer.sqlite_store import BufferStats, Entry, NewMessage, SqliteStore
from gateway.sources.base import Reading

__all__ = ["BufferError", "StoreAndForwardBuffer"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class BufferError(Exception):
    """A write to the buffer failed (disk full, I/O error); the message was not buffered."""


@dataclass(slots=True)
class _Pending:
    reading: Reading | None
    message: NewMessage | None
    done: asyncio.Future[tuple[Record, bytes] | None]


class StoreAndForwardBuffer:
    def __init__(self, path: Path, *, site: str, gateway: str, encoding: Encoding = Encoding.MSGPACK) -> None:
        self.path = path
        self.site, self.gateway, self.encoding = site, gateway, encoding
        self._store = SqliteStore(path)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="buffer")
        self._queue: list[_Pending] = []
        self._accepted: list[int] = []
        self._deleting: set[int] = set()  # acknowledged, delete not yet committed
        self._work = asyncio.Event()
        self._idle = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._last_seq: dict[str, int] = {}
        self._seq_floor = 0
        self._listeners: list[Callable[[], None]] = []
        self.appended_total = 0
        self.accepted_total = 0
        self.recovered_from: Path | None = None
        self.write_failures = 0  # consecutive failed commits (disk full, I/O error)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # --- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        self.recovered_from = await self._run(self._store.open)
        if self.recovered_from is not None:
            # The old sequence numbers are gone with the corrupt file. Restart above any
            # value they can have reached (one record per millisecond since 1970), and
            # keep that floor in the new file, so the cloud never mistakes new records
            # for replays of old ones, not even after the next restart.
            await self._run(self._store.set_seq_floor, time.time_ns() // 1_000_000)
        self._seq_floor = await self._run(self._store.seq_floor)
        self._last_seq = await self._run(self._store.sequences)
        self._writer = asyncio.create_task(self._write_loop(), name="buffer-writer")
        stats = await self.stats()
        log.info(
            "buffer open",
            extra={"path": str(self.path), "messages": stats.messages, "bytes": stats.bytes},
        )

    async def close(self) -> None:
        """Commit what is queued (appends and acknowledgements), then close the file."""
        if self._writer is not None:
            await self.flush()
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
        await self._run(self._store.close)
        self._thread.shutdown(wait=True)

    # --- producers -----------------------------------------------------------------------

    async def add_reading(self, reading: Reading) -> tuple[Record, bytes]:
        """Buffer a reading; once it is on disk, returns the record (with its seq) and its payload."""
        result = await self._enqueue(_Pending(reading, None, asyncio.get_running_loop().create_future()))
        assert result is not None
        return result

    async def add_message(self, topic_name: str, payload: bytes, *, retain: bool = False) -> None:
        """Buffer a non-telemetry message (device status, ...) in order with the rest."""
        pending = _Pending(None, NewMessage(topic_name, payload, retain), asyncio.get_running_loop().create_future())
        await self._enqueue(pending)

    async def _enqueue(self, pending: _Pending) -> tuple[Record, bytes] | None:
        if self._writer is None:
            raise BufferError("buffer is not open")
        self._queue.append(pending)
        self._idle.clear()
        self._work.set()
        return await pending.done

    # --- consumer (the uplink) -----------------------------------------------------------

    async def take(self, after_id: int, limit: int) -> list[Entry]:
        """Up to ``limit`` entries with id > after_id, oldest first, not yet acknowledged."""
        entries = await self._run(self._store.read, after_id, limit + len(self._deleting))
        return [e for e in entries if e.id not in self._deleting][:limit]

    def accept(self, ids: Iterable[int]) -> None:
        """The broker acknowledged these entries; they are deleted with the next commit."""
        ids = list(ids)
        self._accepted.extend(ids)
        self._deleting.update(ids)
        self.accepted_total += len(ids)
        self._idle.clear()
        self._work.set()

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        if self._queue or self._accepted or not self._idle.is_set():
            self._work.set()
            await self._idle.wait()

    async def stats(self) -> BufferStats:
        stats: BufferStats = await self._run(self._store.stats)
        pending_deletes = len(self._deleting)
        return BufferStats(max(0, stats.messages - pending_deletes), stats.bytes, stats.oldest_ms)

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever new entries were committed (the uplink wakes up)."""
        self._listeners.append(listener)

    def last_seq(self) -> dict[str, int]:
        return dict(self._last_seq)

    # --- the writer ----------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            batch, self._queue = self._queue, []
            accepted, self._accepted = self._accepted, []
            try:
                await self._commit(batch, accepted)
            except Exception as exc:  # disk full, I/O error: report, keep running
                self.write_failures += 1
                if self.write_failures == 1:  # once per episode, not once per reading
                    log.error("buffer write failed", extra={"error": str(exc), "messages": len(batch)})
                self._accepted[:0] = accepted  # retry the deletes with the next commit
                for pending in batch:
                    if not pending.done.done():
                        pending.done.set_exception(BufferError(str(exc)))
            else:
                if self.write_failures:
                    log.warning("buffer writes again", extra={"failed_commits": self.write_failures})
                    self.write_failures = 0
            if not self._queue and not self._accepted:
                self._idle.set()

    async def _commit(self, batch: list[_Pending], accepted: list[int]) -> None:
        messages: list[NewMessage] = []
        results: list[tuple[Record, bytes] | None] = []
        next_seq = dict(self._last_seq)
        for pending in batch:
            if pending.reading is None:
                assert pending.message is not None
                messages.append(pending.message)
                results.append(None)
                continue
            reading = pending.reading
            seq = max(next_seq.get(reading.device, 0), self._seq_floor) + 1
            next_seq[reading.device] = seq
            record = Record(self.site, self.gateway, reading.device, seq, reading.ts, reading.values)
            payload = encode_record(record, self.encoding)
            telemetry_topic = topic(TopicKind.TELEMETRY, self.site, self.gateway, reading.device)
            messages.append(NewMessage(telemetry_topic, payload, device=reading.device, seq=seq))
            results.append((record, payload))
        changed_seqs = {d: s for d, s in next_seq.items() if self._last_seq.get(d) != s}
        if not messages and not accepted:
            return
        await self._run(self._store.write, messages, changed_seqs, accepted)
        # Only now, with the transaction committed, do the sequence numbers count as used.
        self._last_seq = next_seq
        self._deleting.difference_update(accepted)
        self.appended_total += len(messages)
        for pending, result in zip(batch, results, strict=True):
            # A producer cancelled while waiting (a source stopped at shutdown) no longer
            # wants the answer, but its message is committed: the listeners must hear of it.
            if not pending.done.done():
                pending.done.set_result(result)
        if messages:
            for listener in self._listeners:
                listener()
