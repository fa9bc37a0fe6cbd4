"""Subscribe, decode, deduplicate, store, evaluate rules, republish, then acknowledge.

The cloud acknowledges an MQTT message only after everything it must do with it is
durable: its points are in the store and any notification it raised is in the
outbox. Until then the broker keeps it (persistent session, manual acks), so a crash
of this process loses nothing; the redelivery is dropped by the deduplicator.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from cloud.alerting.service import AlertService
from cloud.dashboard import DashboardPublisher
from cloud.dedup import Deduplicator
from cloud.spool import Spool
from cloud.stores.base import Store, StoreRejected, StoreUnavailable
from fieldlink.mqtt import ConnectionLost, Message, MqttConnection, PublishRefused
from fieldlink.wire import Record, Topic, TopicKind, WireError, decode, decode_state

__all__ = ["IngestCounters", "IngestPipeline"]

log = logging.getLogger(__name__)

MAX_BATCH = 1000

DeadLetter = asyncio.Future[None]  # a dead letter on its way: done at its PUBACK
View = tuple[str, bytes, bool]  # a dashboard message: topic, payload, retain


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


def _decode_checked(message: Message, topic_prefix: str) -> list[Record]:
    """Records of a message, after checking that the envelope matches its topic."""
    if not message.topic.startswith(topic_prefix):
        raise WireError(f"topic {message.topic!r} is outside the prefix {topic_prefix!r}")
    parsed = Topic.parse(message.topic[len(topic_prefix) :])
    if parsed.kind not in (TopicKind.TELEMETRY, TopicKind.BATCH):
        raise WireError(f"topic {message.topic!r} carries no telemetry")
    records = decode(message.payload)
    for record in records:
        if (record.site, record.gateway) != (parsed.site, parsed.gateway):
            raise WireError(f"envelope of {record.site}/{record.gateway} published on {message.topic!r}")
        if parsed.device is not None and record.device != parsed.device:
            raise WireError(f"record of device {record.device!r} published on {message.topic!r}")
    return records


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
        self._alert_inputs: list[tuple[str, Message]] = []
        self.dashboard = dashboard
        self.dedup = Deduplicator()
        self.counters = IngestCounters()

    async def consume(self, conn: MqttConnection) -> None:
        """Process messages of one connection until it closes."""
        closed = object()
        conn.closed.add_done_callback(lambda _: conn.messages.put_nowait(closed))  # type: ignore[arg-type]
        while True:
            first = await conn.messages.get()
            if first is closed:
                return
            batch = [first]
            while len(batch) < MAX_BATCH and not conn.messages.empty():
                message = conn.messages.get_nowait()
                if message is closed:
                    conn.messages.put_nowait(message)
                    break
                batch.append(message)
            await self.handle(conn, batch)

    async def handle(self, conn: MqttConnection, batch: Sequence[Message]) -> None:
        records, dead, views = self._decode(conn, batch)
        fresh = self.dedup.fresh(records)
        if fresh:
            fresh = await self._store_or_spool(fresh)
            self.dedup.commit(fresh)
            # Alert changes and their notifications are committed before the ack below.
            await self.alerts.observe(fresh)
            if self.dashboard is not None:
                views += self.dashboard.messages(fresh)
        if self._alert_inputs:
            inputs, self._alert_inputs = self._alert_inputs, []
            await self._alert_messages(inputs)
        if views and conn.is_open:
            with contextlib.suppress(ConnectionLost):  # dashboards are a view; the batch is redelivered anyway
                for topic_name, payload, retain in views:
                    conn.publish(topic_name, payload, qos=1 if retain else 0, retain=retain)
        if not await self._settle(dead):
            return  # the connection is gone: nothing is acknowledged, the broker redelivers the batch
        for message in batch:
            conn.ack(message)

    def _decode(
        self, conn: MqttConnection, batch: Sequence[Message]
    ) -> tuple[list[Record], list[DeadLetter | None], list[View]]:
        """The records of a batch, and the dashboard views of its status messages.

        Each bad message goes to the dead-letter topic (its PUBACK pending).
        """
        records: list[Record] = []
        dead: list[DeadLetter | None] = []
        views: list[View] = []
        for message in batch:
            self.counters.messages += 1
            reason = None
            if len(message.payload) > self.max_message_bytes:
                reason = f"oversized: {len(message.payload)} bytes, the limit is {self.max_message_bytes}"
            else:
                try:
                    if message.topic in self.command_topics:
                        self._alert_inputs.append(("command", message))
                        continue
                    if message.topic.endswith("/health"):
                        self._alert_inputs.append(("health", message))
                        continue
                    if message.topic.endswith("/status") and self.alerts.engine.needs_status:
                        self._alert_inputs.append(("status", message))
                        views += self._status(message) or []
                        continue
                    status = self._status(message)
                    if status is not None:
                        views += status
                    else:
                        records.extend(_decode_checked(message, self.topic_prefix))
                except WireError as exc:
                    reason = str(exc)
                except Exception:  # a decoder bug must not turn one message into a crash loop
                    log.exception("bad message (unexpected error)", extra={"topic": message.topic})
                    reason = "undecodable (unexpected error; see the worker's log)"
            if reason is not None:
                # Counted, logged, set aside: a bad message must never block the ones behind it.
                self.counters.bad_messages += 1
                log.warning("bad message to the dead-letter topic", extra={"topic": message.topic, "reason": reason})
                dead.append(self._dead_letter(conn, message, reason))
        self.counters.records += len(records)
        return records, dead, views

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

    async def _store_or_spool(self, records: Sequence[Record]) -> list[Record]:
        """The records that are durable now: in the store, or in the spool when the store is down.

        While the spool holds anything, new records join it (the drainer writes in
        order and the store is not hammered); otherwise the store gets ``spool_after``
        seconds of retries before the records go to the spool.
        """
        spool = self.spool
        if spool is None:
            stored = await self._store(records)
            self.counters.records_stored += len(stored)
            return stored
        if spool.empty:
            try:
                stored = await self._store(records, give_up_after=self.spool_after)
            except StoreUnavailable as exc:
                log.warning("store unavailable; spooling", extra={"records": len(records), "reason": str(exc)})
            else:
                self.counters.records_stored += len(stored)
                return stored
        await spool.add(records)
        return list(records)

    async def drain_write(self, records: Sequence[Record]) -> None:
        """Write spooled records to the store, retrying until it takes them."""
        stored = await self._store(records)
        self.counters.records_stored += len(stored)

    async def _store(self, records: Sequence[Record], give_up_after: float | None = None) -> list[Record]:
        """Write until the store takes it (meanwhile the messages stay unacknowledged).

        Returns the records stored: if the store refuses the batch for good, each record
        is tried alone and the ones it still refuses are reported and left out. With
        ``give_up_after``, StoreUnavailable is raised once retrying takes longer.
        """
        try:
            await self._write_with_retry(records, give_up_after)
        except StoreRejected as exc:
            if len(records) == 1:
                self._rejected(records[0], str(exc))
                return []
        else:
            return list(records)
        stored = []
        for record in records:
            try:
                await self._write_with_retry([record], give_up_after)
            except StoreRejected as exc:
                self._rejected(record, str(exc))
            else:
                stored.append(record)
        return stored

    def _rejected(self, record: Record, reason: str) -> None:
        self.counters.records_rejected += 1
        log.error(
            "record refused by the store; skipped",
            extra={"gateway": record.gateway, "device": record.device, "seq": record.seq, "reason": reason},
        )

    async def _write_with_retry(self, records: Sequence[Record], give_up_after: float | None = None) -> None:
        delay = 0.5
        deadline = None if give_up_after is None else time.monotonic() + give_up_after
        while True:
            started = time.monotonic()
            try:
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
