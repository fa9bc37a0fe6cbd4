"""Subscribe, decode, deduplicate, store, evaluate rules, republish, then acknowledge.

The cloud acknowledges an MQTT message only after everything it must do with it is
durable: its points are in the store and any notification it raised is in the
outbox. Until then the broker keeps it (persistent session, manual acks), so a crash
of this process loses nothing; the redelivery is dropped by the deduplicator.

The hot path is built so that a record costs little more than its line of line
protocol (bench/ingest.py has the figures): batch envelopes of shapes seen before are
read straight from their bytes (:class:`fieldlink.wire.BatchScanner`: ScannedRecords,
no Value objects), a store that can (PreparingStore) formats them with a template per
shape as they are decoded, and Records with decoded values are made only in
:meth:`IngestPipeline._stored`, and only when alert rules or dashboards read them.
``consume`` decodes the next round while the store writes the previous one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import logging
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from cloud.alerting.service import AlertService
from cloud.dashboard import DashboardPublisher
from cloud.dedup import Deduplicator
from cloud.spool import Spool
from cloud.stores.base import PreparingStore, Store, StoreRejected, StoreUnavailable
from fieldlink.mqtt import ConnectionLost, Message, MqttConnection, PublishRefused
from fieldlink.wire import (
    BatchScanner,
    Record,
    ScannedRecord,
    Topic,
    TopicKind,
    WireError,
    as_record,
    decode,
    decode_state,
)

__all__ = ["IngestCounters", "IngestPipeline"]

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # messages per round (one store write, then their acks)
# Records per round: enough that a write's fixed costs vanish, few enough that a round of
# big batch envelopes neither holds much memory nor delays its acks for long.
MAX_BATCH_RECORDS = 20_000
MAX_TOPICS = 10_000  # parsed topic names kept (one per gateway or device)
GC_YOUNG_THRESHOLD = 50_000  # see _relax_gc

DeadLetter = asyncio.Future[None]  # a dead letter on its way: done at its PUBACK
View = tuple[str, bytes, bool]  # a dashboard message: topic, payload, retain
Stored = Record | ScannedRecord  # a record on its way through the pipeline


@dataclass
class IngestCounters:
    messages: int = 0
    records: int = 0
    records_stored: int = 0
    records_rejected: int = 0
    bad_messages: int = 0
    dead_letters: int = 0  # bad messages republished on the dead-letter topic (PUBACK received)
    statuses: int = 0  # gateway and device status messages shown on the dashboard topics
    store_failures: int = 0
    scanned_messages: int = 0  # batch envelopes read by the scanner (the rest went through decode())


def _relax_gc() -> None:
    """Collect young objects every 50,000 container allocations instead of every 700.

    A round holds tens of thousands of records (a tuple and a list each) until it is
    stored; with CPython's default threshold each of them was promoted to and walked in
    the older generations, a fifth of the worker's CPU (bench-ingest: 0.94 s of 4.6 s).
    They die together at the end of the round, before the next collection. Process-wide,
    once: a cloud worker is this pipeline.
    """
    if gc.get_threshold()[0] < GC_YOUNG_THRESHOLD:
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


@dataclass
class _Round:
    """Messages taken together: one store write, then their acks."""

    messages: list[Message] = field(default_factory=list)
    records: list[Stored] = field(default_factory=list)
    dead: list[DeadLetter | None] = field(default_factory=list)
    views: list[View] = field(default_factory=list)
    alert_inputs: list[tuple[str, Message]] = field(default_factory=list)  # statuses, health, commands
    prepared: list[str] = field(default_factory=list)  # the store's text of each record (PreparingStore)

    @property
    def full(self) -> bool:
        return len(self.messages) >= MAX_BATCH or len(self.records) >= MAX_BATCH_RECORDS


class IngestPipeline:
    def __init__(
        self,
        store: Store,
        alerts: AlertService,
        dashboard: DashboardPublisher | None,
        *,
        topic_prefix: str = "",
        dead_letter_topic: str = "fl-cloud/dead-letter",
        max_message_bytes: int = 1_000_000,
        worker: str = "",
        spool: Spool | None = None,
        spool_after: float = 2.0,
    ) -> None:
        self.spool = spool
        self.spool_after = spool_after
        self.write_latency: deque[float] = deque(maxlen=1024)  # seconds per successful store write
        self.topic_prefix = topic_prefix
        self.dead_letter_topic = dead_letter_topic
        self.max_message_bytes = max_message_bytes
        self.worker = worker
        self.store = store
        self.alerts = alerts
        # Alert commands (ack, silence) arrive beside telemetry; statuses and health feed rules.
        self.command_topics = {alerts.config.ack_topic, alerts.config.silence_topic}
        self.dashboard = dashboard
        self.dedup = Deduplicator()
        self.counters = IngestCounters()
        self.scanner = BatchScanner()
        self._topics: dict[str, Topic] = {}
        # A store that formats ahead does it as messages are decoded, off the write's path.
        self._prepare = store.prepare if isinstance(store, PreparingStore) else None

    async def consume(self, conn: MqttConnection) -> None:
        """Process messages of one connection until it closes.

        A reader decodes each message as it arrives into the current round; a writer takes
        the round when it is free and the reader has caught up (or the round is full), stores
        it and acknowledges its messages. So decoding overlaps the store's own work (in its
        own process), a backlog goes out in big rounds and a trickle with little delay. Rounds
        complete one after the other: the store sees records in order and acknowledgements
        go out in the order the messages came (MQTT 3.1.1 requires it).
        """
        _relax_gc()
        closed = object()
        queue = conn.messages
        conn.closed.add_done_callback(lambda _: queue.put_nowait(closed))  # type: ignore[arg-type]
        current = _Round()
        filled = asyncio.Event()  # the current round holds something
        taken = asyncio.Event()  # the writer took the current round: there is room again
        finished = False  # the reader stopped taking messages

        async def write_rounds() -> None:
            nonlocal current
            while True:
                if not filled.is_set():
                    if finished:
                        return
                    await filled.wait()
                filled.clear()
                work, current = current, _Round()
                taken.set()
                if work.messages:
                    await self._complete(conn, work)

        def wake_reader(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                taken.set()
                queue.put_nowait(closed)  # type: ignore[arg-type]

        writer = asyncio.create_task(write_rounds(), name="ingest-writer")
        writer.add_done_callback(wake_reader)
        try:
            while not writer.done():
                if current.full:
                    taken.clear()
                    await taken.wait()  # the round is full: wait for the writer to take it
                    continue
                message = await queue.get()
                if message is closed:
                    break
                self._take(conn, message, current)
                # The writer gets the round once the reader has caught up (or it is full): a
                # backlog is written in big rounds, a trickle message by message.
                if queue.empty() or current.full:
                    filled.set()
                # Queue.get() does not yield while messages are waiting: let the writer and the
                # socket's reader run between messages.
                await asyncio.sleep(0)
            finished = True
            filled.set()
            await writer  # the rounds taken so far are stored, as if the connection had not closed
        finally:
            if not writer.done():
                writer.cancel()  # we are being cancelled (shutdown): the broker keeps the messages

    async def handle(self, conn: MqttConnection, batch: Sequence[Message]) -> None:
        """Process these messages as one round."""
        work = _Round()
        for message in batch:
            self._take(conn, message, work)
        await self._complete(conn, work)

    @property
    def wants_values(self) -> bool:
        """Whether anything reads the values of stored records (else they are never decoded)."""
        return self.alerts.enabled or self.dashboard is not None

    async def _stored(self, stored: list[Stored]) -> list[View]:
        """The one place where records are known to be stored (or spooled): everything that
        reacts to stored records starts here, before the messages are acknowledged.

        Returns the dashboard messages to publish. ``records`` below are full Records with
        their values, made only when ``wants_values``.
        """
        self.dedup.commit(stored)
        if not self.wants_values:
            return []
        records = [as_record(r) for r in stored]
        # Alert changes and their notifications are committed before the ack.
        await self.alerts.observe(records)
        return self.dashboard.messages(records) if self.dashboard is not None else []

    async def _complete(self, conn: MqttConnection, work: _Round) -> None:
        """Store the round's records, let what depends on them run, then acknowledge its messages."""
        views = work.views
        fresh = self.dedup.fresh(work.records)
        prepared: list[str] | None = None
        if self._prepare is not None:
            prepared = work.prepared
            if len(fresh) < len(work.records):  # leave the duplicates' text out too
                kept = set(map(id, fresh))
                prepared = [text for r, text in zip(work.records, prepared, strict=True) if id(r) in kept]
        if fresh:
            views += await self._stored(await self._store_or_spool(fresh, prepared))
        if work.alert_inputs:
            await self._alert_messages(work.alert_inputs)
        if views and conn.is_open:
            with contextlib.suppress(ConnectionLost):  # dashboards are a view; the batch is redelivered anyway
                for topic_name, payload, retain in views:
                    conn.publish(topic_name, payload, qos=1 if retain else 0, retain=retain)
        if not await self._settle(work.dead):
            return  # the connection is gone: nothing is acknowledged, the broker redelivers the round
        for message in work.messages:
            conn.ack(message)

    def _take(self, conn: MqttConnection, message: Message, work: _Round) -> None:
        """Add a message to the round: its records, or the dashboard views of a status message.

        A bad message goes to the dead-letter topic (its PUBACK pending).
        """
        work.messages.append(message)
        self.counters.messages += 1
        reason = None
        if len(message.payload) > self.max_message_bytes:
            reason = f"oversized: {len(message.payload)} bytes, the limit is {self.max_message_bytes}"
        else:
            try:
                if message.topic in self.command_topics:
                    work.alert_inputs.append(("command", message))
                    return
                if message.topic.endswith("/health"):
                    work.alert_inputs.append(("health", message))
                    return
                if message.topic.endswith("/status") and self.alerts.engine.needs_status:
                    work.alert_inputs.append(("status", message))
                    work.views += self._status(message) or []
                    return
                status = self._status(message)
                if status is not None:
                    work.views += status
                else:
                    records = self._records(message)
                    prepared = self._prepare(records) if self._prepare is not None else ()
                    work.records += records
                    work.prepared += prepared
                    self.counters.records += len(records)
            except WireError as exc:
                reason = str(exc)
            except Exception:  # a decoder bug must not turn one message into a crash loop
                log.exception("bad message (unexpected error)", extra={"topic": message.topic})
                reason = "undecodable (unexpected error; see the worker's log)"
        if reason is not None:
            # Counted, logged, set aside: a bad message must never block the ones behind it.
            self.counters.bad_messages += 1
            log.warning("bad message to the dead-letter topic", extra={"topic": message.topic, "reason": reason})
            work.dead.append(self._dead_letter(conn, message, reason))

    def _records(self, message: Message) -> list[Stored]:
        """Records of a message, after checking that the envelope matches its topic."""
        name, payload = message.topic, message.payload
        parsed = self._topics.get(name)
        if parsed is None:
            if not name.startswith(self.topic_prefix):
                raise WireError(f"topic {name!r} is outside the prefix {self.topic_prefix!r}")
            parsed = Topic.parse(name[len(self.topic_prefix) :])
            if len(self._topics) >= MAX_TOPICS:
                self._topics.clear()
            self._topics[name] = parsed
        if parsed.kind is TopicKind.BATCH:
            scanned = self.scanner.scan(payload)
            if scanned is not None:
                site, gateway, found = scanned
                if found and (site, gateway) != (parsed.site, parsed.gateway):
                    raise WireError(f"envelope of {site}/{gateway} published on {name!r}")
                self.counters.scanned_messages += 1
                return found  # type: ignore[return-value]
        elif parsed.kind is not TopicKind.TELEMETRY:
            raise WireError(f"topic {name!r} carries no telemetry")
        records = decode(payload)
        for record in records:
            if (record.site, record.gateway) != (parsed.site, parsed.gateway):
                raise WireError(f"envelope of {record.site}/{record.gateway} published on {name!r}")
            if parsed.device is not None and record.device != parsed.device:
                raise WireError(f"record of device {record.device!r} published on {name!r}")
        if parsed.kind is TopicKind.BATCH:
            self.scanner.learn(payload, records)  # the next batch of these shapes is scanned
        return records  # type: ignore[return-value]

    async def _alert_messages(self, inputs: list[tuple[str, Message]]) -> None:
        """Statuses and health reports for status rules, and alert commands (never dead letters:
        a bad one is logged by the alerting service and dropped)."""
        for kind, message in inputs:
            if kind == "command":
                await self.alerts.command(message.topic, message.payload)
                continue
            try:
                parsed = Topic.parse(message.topic.removeprefix(self.topic_prefix))
                if kind == "status":
                    state = decode_state(message.payload)
                    ts = state.get("ts") if isinstance(state.get("ts"), int) else int(time.time() * 1000)
                    await self.alerts.observe_status(
                        parsed.site, parsed.gateway, parsed.device, state["state"], state.get("reason"), ts
                    )
                else:
                    body = json.loads(message.payload)
                    if isinstance(body, dict):
                        ts = body.get("ts") if isinstance(body.get("ts"), int) else int(time.time() * 1000)
                        await self.alerts.observe_health(parsed.site, parsed.gateway, body, ts)
            except (WireError, ValueError, KeyError) as exc:
                log.warning(
                    "status or health message not usable by rules", extra={"topic": message.topic, "reason": str(exc)}
                )

    def _status(self, message: Message) -> list[View] | None:
        """Dashboard views of a gateway or device status message; None if it is not one."""
        if self.dashboard is None or not message.topic.endswith("/status"):
            return None
        parsed = Topic.parse(message.topic.removeprefix(self.topic_prefix))
        if parsed.kind not in (TopicKind.GATEWAY_STATUS, TopicKind.DEVICE_STATUS):
            return None
        self.counters.statuses += 1
        return self.dashboard.status_messages(parsed.site, parsed.gateway, parsed.device, decode_state(message.payload))

    async def _settle(self, dead: list[DeadLetter | None]) -> bool:
        """Wait for the dead letters' PUBACKs: a bad message is acknowledged only once it is set aside.

        A crash in between makes the broker redeliver it, and it is set aside again.
        False if the connection was lost meanwhile (then nothing may be acknowledged).
        """
        intact = True
        for letter in dead:
            if letter is None:
                intact = False
                continue
            try:
                await letter
            except PublishRefused as exc:
                extra = {"topic": self.dead_letter_topic, "reason": str(exc)}
                log.error("dead letter refused by the broker", extra=extra)
            except ConnectionLost:
                intact = False
            else:
                self.counters.dead_letters += 1
        return intact

    def _dead_letter(self, conn: MqttConnection, message: Message, reason: str) -> DeadLetter | None:
        """Publish the dead letter of a bad message; None if the connection is already gone."""
        oversized = len(message.payload) > self.max_message_bytes
        letter = {
            "ts": time.time_ns() // 1_000_000,
            "worker": self.worker,
            "topic": message.topic,
            "reason": reason,
            "bytes": len(message.payload),
            # The original, to inspect or replay (left out when oversized).
            "payload_b64": None if oversized else base64.b64encode(message.payload).decode(),
        }
        try:
            return conn.publish(self.dead_letter_topic, json.dumps(letter, separators=(",", ":")).encode(), qos=1)
        except ConnectionLost:
            return None

    async def _store_or_spool(self, records: Sequence[Stored], prepared: Sequence[str] | None) -> list[Stored]:
        """The records that are durable now: in the store, or in the spool when the store is down.

        While the spool holds anything, new records join it (the drainer writes in
        order and the store is not hammered); otherwise the store gets ``spool_after``
        seconds of retries before the records go to the spool. ``prepared``: the store's
        text of each record (PreparingStore), or None.
        """
        spool = self.spool
        if spool is None:
            stored = await self._store(records, prepared)
            self.counters.records_stored += len(stored)
            return stored
        if spool.empty:
            try:
                stored = await self._store(records, prepared, give_up_after=self.spool_after)
            except StoreUnavailable as exc:
                log.warning("store unavailable; spooling", extra={"records": len(records), "reason": str(exc)})
            else:
                self.counters.records_stored += len(stored)
                return stored
        await spool.add([as_record(r) for r in records])
        return list(records)

    async def drain_write(self, records: Sequence[Record]) -> None:
        """Write spooled records to the store, retrying until it takes them."""
        stored = await self._store(records, None)
        self.counters.records_stored += len(stored)

    async def _store(
        self, records: Sequence[Stored], prepared: Sequence[str] | None, give_up_after: float | None = None
    ) -> list[Stored]:
        """Write until the store takes it (meanwhile the messages stay unacknowledged).

        Returns the records stored: if the store refuses the batch for good, each record
        is tried alone and the ones it still refuses are reported and left out. With
        ``give_up_after``, StoreUnavailable is raised once retrying takes longer.
        """
        try:
            await self._write_with_retry(records, prepared, give_up_after)
        except StoreRejected as exc:
            if len(records) == 1:
                self._rejected(records[0], str(exc))
                return []
        else:
            return list(records)
        stored = []
        for i, record in enumerate(records):
            try:
                await self._write_with_retry([record], None if prepared is None else [prepared[i]], give_up_after)
            except StoreRejected as exc:
                self._rejected(record, str(exc))
            else:
                stored.append(record)
        return stored

    def _rejected(self, record: Stored, reason: str) -> None:
        self.counters.records_rejected += 1
        log.error(
            "record refused by the store; skipped",
            extra={"gateway": record.gateway, "device": record.device, "seq": record.seq, "reason": reason},
        )

    async def _write_with_retry(
        self, records: Sequence[Stored], prepared: Sequence[str] | None, give_up_after: float | None = None
    ) -> None:
        delay = 0.5
        deadline = None if give_up_after is None else time.monotonic() + give_up_after
        while True:
            started = time.monotonic()
            try:
                if prepared is not None:
                    await self.store.write_prepared(prepared)  # type: ignore[attr-defined]
                else:
                    await self.store.write(records)
            except StoreUnavailable as exc:
                self.counters.store_failures += 1
                wait = exc.retry_after if exc.retry_after is not None else delay * random.uniform(0.8, 1.0)
                if deadline is not None and time.monotonic() + wait > deadline:
                    raise
                log.warning("store write failed; retrying", extra={"reason": str(exc), "retry_in_s": round(wait, 1)})
                await asyncio.sleep(wait)
                delay = min(30.0, delay * 2)
                continue
            self.write_latency.append(time.monotonic() - started)
            if delay > 0.5:
                log.info("store writes again", extra={"records": len(records)})
            return
