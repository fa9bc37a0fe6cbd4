"""The cloud uplink: forwards the buffer to the cloud broker at QoS 1.

Each connection replays the buffer from its oldest entry, keeping a window of
``max_inflight`` messages unacknowledged; an entry is accepted (deleted from the
buffer) only when its PUBACK arrives. A lost connection loses nothing: the next
connection starts again from what is still in the buffer.

The gateway's status topic is retained on the cloud broker: ``online`` when we
connect, ``offline`` (reason ``shutdown``) when we leave cleanly, and ``offline``
(reason ``connection lost``) from the broker, as our last will, when we vanish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from functools import partial

from pydantic import Field

from fieldlink.configkit import Duration
from fieldlink.mqtt import ConnectFailed, ConnectionLost, MqttConnection, MqttSettings, Will
from fieldlink.wire import Encoding, TopicKind, encode_state, topic
from gateway.buffer import Entry, StoreAndForwardBuffer

__all__ = ["Uplink", "UplinkConfig"]

READ_AHEAD_WINDOWS = 4

log = logging.getLogger(__name__)


class UplinkConfig(MqttSettings):
    encoding: Encoding = Encoding.MSGPACK
    reconnect_min: Duration = 1.0
    reconnect_max: Duration = 60.0
    max_inflight: int = Field(default=50, ge=1, le=1000)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Uplink:
    def __init__(self, config: UplinkConfig, buffer: StoreAndForwardBuffer, *, site: str, gateway: str) -> None:
        self.config = config
        self.buffer = buffer
        self.client_id = config.client_id or f"fieldlink-{site}-{gateway}"
        self.status_topic = topic(TopicKind.GATEWAY_STATUS, site, gateway)
        self.state = "connecting"
        self.last_error: str | None = None
        self.delivered_total = 0  # messages acknowledged by the cloud broker
        self.records_delivered = 0  # of which telemetry records
        self.connects_total = 0
        self._conn: MqttConnection | None = None
        self._wake = asyncio.Event()
        self._new_entries = True  # the buffer committed entries since our last read
        buffer.on_commit(self._on_commit)

    def _on_commit(self) -> None:
        self._new_entries = True
        self._wake.set()

    # --- the connection loop -------------------------------------------------------------

    async def run(self) -> None:
        failures = 0
        try:
            while True:
                conn = MqttConnection(
                    self.config,
                    client_id=self.client_id,
                    will=Will(self.status_topic, encode_state("offline", None, "connection lost")),
                )
                try:
                    await conn.open()
                except ConnectFailed as exc:
                    failures += 1
                    self._down(str(exc), first=failures == 1)
                    await asyncio.sleep(self._backoff(failures))
                    continue
                failures = 0
                self._conn = conn
                self.state = "connected"
                self.connects_total += 1
                log.info("uplink connected", extra={"broker": self.config.url, "client_id": self.client_id})
                try:
                    conn.publish(self.status_topic, encode_state("online", _now_ms()), qos=1, retain=True)
                    await self._forward(conn)
                except ConnectionLost as exc:
                    self._conn = None
                    self._down(str(exc), first=True)
                    # Reconnect at once after a drop; back off only if that fails too.
                    failures = 1
        finally:
            await self._goodbye()

    def _down(self, reason: str, *, first: bool) -> None:
        self.state = "disconnected"
        self.last_error = reason
        level = logging.WARNING if first else logging.DEBUG
        log.log(level, "uplink down; buffering", extra={"broker": self.config.url, "reason": reason})

    def _backoff(self, failures: int) -> float:
        delay = min(self.config.reconnect_max, self.config.reconnect_min * 2 ** min(failures - 1, 16))
        return delay * random.uniform(0.5, 1.0)

    async def _forward(self, conn: MqttConnection) -> None:
        """Keep up to max_inflight entries unacknowledged until the connection ends."""
        cursor = 0  # highest entry id read from the buffer for this connection
        in_flight = 0
        window = self.config.max_inflight
        # Read ahead several windows at a time and top the window up from memory on every
        # PUBACK: one buffer read per READ_AHEAD_WINDOWS windows, and the socket never idles
        # (waiting for half a window lets the broker's PUBACKs sit behind Nagle's algorithm).
        read_ahead: deque[Entry] = deque()
        more_after_cursor = True  # the last read was full: the buffer may hold more
        conn.closed.add_done_callback(lambda _: self._wake.set())

        def acknowledged(entry: Entry, future: asyncio.Future[None]) -> None:
            nonlocal in_flight
            in_flight -= 1
            if not future.cancelled() and future.exception() is None:
                self.buffer.accept((entry.id,))
                self.delivered_total += 1
                self.records_delivered += entry.is_record
            self._wake.set()

        while True:
            self._wake.clear()
            if conn.closed.done():
                raise ConnectionLost(conn.closed.result())
            if not read_ahead and (more_after_cursor or self._new_entries):
                self._new_entries = False
                limit = window * READ_AHEAD_WINDOWS
                entries = await self.buffer.take(cursor, limit)
                more_after_cursor = len(entries) == limit
                if entries:
                    read_ahead.extend(entries)
                    cursor = entries[-1].id
                    continue  # the connection may have closed during the read
            while read_ahead and in_flight < window:
                entry = read_ahead.popleft()
                future = conn.publish(entry.topic, entry.payload, qos=1, retain=entry.retain)
                in_flight += 1
                future.add_done_callback(partial(acknowledged, entry))
            await self._wake.wait()

    # --- what the rest of the gateway uses -----------------------------------------------

    def publish_direct(self, topic_name: str, payload: bytes) -> None:
        """Best effort, QoS 0, not buffered: for health data that is stale by the next period."""
        conn = self._conn
        if conn is not None and conn.is_open:
            with contextlib.suppress(ConnectionLost):
                conn.publish(topic_name, payload, qos=0)

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until the buffer is empty (everything acknowledged) or the timeout passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            await self.buffer.flush()
            if (await self.buffer.stats()).messages == 0:
                return True
            if self._conn is None:
                return False  # no uplink: nothing will drain; keep the rest in the buffer
            await asyncio.sleep(0.05)
        return False

    async def _goodbye(self) -> None:
        """Leave the broker cleanly: retained status 'offline, shutdown', then DISCONNECT."""
        conn, self._conn = self._conn, None
        self.state = "stopped"
        if conn is None or not conn.is_open:
            return
        with contextlib.suppress(ConnectionLost, TimeoutError):
            async with asyncio.timeout(2):
                await conn.publish(self.status_topic, encode_state("offline", _now_ms(), "shutdown"), 1, True)
        await conn.close()
        log.info("uplink closed", extra={"broker": self.config.url})
