"""The cloud uplink: forwards the buffer to the cloud broker at QoS 1.

Each connection replays the buffer from its oldest entry in two lanes (see
``lanes.py``), keeping at most ``max_inflight`` messages and ``max_inflight_bytes``
unacknowledged. Entries are accepted (deleted from the buffer) only when the PUBACK
of the message carrying them arrives. A lost connection loses nothing: the next one
starts again from what is still in the buffer.

A link can die silently (a stalled cellular modem, a NAT that forgot us): TCP keeps
the socket open and nothing comes back. A PUBACK missing for ``ack_timeout`` marks
the link dead; we drop it and reconnect with jittered exponential backoff.

The gateway's status topic is retained on the cloud broker: ``online`` when we
connect, ``offline`` (reason ``shutdown``) when we leave cleanly, and ``offline``
(reason ``connection lost``) from the broker, as our last will, when we vanish.

Commands published by the cloud on this gateway's device command topics are relayed
to the local broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial

from fieldlink.mqtt import ConnectFailed, ConnectionLost, MqttConnection, MqttError, PublishRefused, Will
from fieldlink.wire import BatchJoiner, Topic, TopicKind, WireError, encode_state, topic
from gateway.buffer import DropReason, StoreAndForwardBuffer
from gateway.uplink.config import UplinkConfig
from gateway.uplink.lanes import Lane, OutgoingMessage, RateLimit, pick_lane

__all__ = ["CommandHandler", "Uplink"]

READ_AHEAD_WINDOWS = 4

log = logging.getLogger(__name__)

# (topic without prefix, payload, retained) -> True if relayed to the local broker, False if carried out
CommandHandler = Callable[[str, bytes, bool], Awaitable[bool]]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Uplink:
    def __init__(
        self,
        config: UplinkConfig,
        buffer: StoreAndForwardBuffer,
        *,
        site: str,
        gateway: str,
        on_command: CommandHandler | None = None,
    ) -> None:
        self.config = config
        self.buffer = buffer
        self.site, self.gateway = site, gateway
        self.client_id = config.client_id or f"fieldlink-{site}-{gateway}"
        self.prefix = config.topic_prefix
        self.status_topic = self.prefix + topic(TopicKind.GATEWAY_STATUS, site, gateway)
        self.command_filter = self.prefix + topic(TopicKind.COMMAND, site, gateway, "+")
        self.on_command = on_command
        self.joiner = BatchJoiner(site, gateway, config.encoding)
        self.state = "connecting"
        self.last_error: str | None = None
        self.delivered_total = 0  # messages acknowledged by the cloud broker
        self.records_delivered = 0  # telemetry records in them
        self.connects_total = 0
        self.dead_links = 0  # connections dropped because a PUBACK did not come in time
        self.commands_relayed = 0
        self.commands_received = 0  # for the gateway's own devices: carried out, not relayed
        self.commands_dropped = 0
        self.lanes: list[Lane] = []
        self.backlog_boundary = 0
        self._conn: MqttConnection | None = None
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._inflight: deque[tuple[float, asyncio.Future[None]]] = deque()
        self._inflight_bytes = 0
        self._session = 0
        self._last_progress = 0.0  # the last PUBACK (or the send into an empty window)
        self._refused_topics: set[str] = set()
        self._message_rate = RateLimit(config.max_messages_per_s)
        self._byte_rate = RateLimit(config.max_bytes_per_s)
        buffer.on_commit(self._on_commit)

    @property
    def state(self) -> str:
        """connecting, connected, disconnected or stopped; ``state_since_ms`` says since when."""
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        if value != getattr(self, "_state", None):
            self._state, self.state_since_ms = value, _now_ms()

    def _on_commit(self) -> None:
        if self.lanes:
            self.lanes[0].more = True  # the live lane
        self._wake.set()

    # --- the connection loop -------------------------------------------------------------

    async def run(self) -> None:
        failures = 0
        try:
            while True:
                if failures:
                    await asyncio.sleep(self._backoff(failures))
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
                    continue
                failures = 0
                self._conn = conn
                self.state = "connected"
                self.connects_total += 1
                log.info("uplink connected", extra={"broker": self.config.url, "client_id": self.client_id})
                try:
                    async with asyncio.TaskGroup() as group:
                        # Commands first: once the gateway says "online", a command sent to it arrives.
                        if self.config.commands and self.on_command is not None and await self._subscribe(conn):
                            group.create_task(self._relay_commands(conn), name="uplink-commands")
                        conn.publish(self.status_topic, encode_state("online", _now_ms()), qos=1, retain=True)
                        await self._forward(conn)
                except* (ConnectionLost, MqttError) as group_error:
                    self._conn = None
                    self._down(str(group_error.exceptions[0]), first=True)
                    # A dropped link: reconnect soon, with jitter (a fleet must not reconnect in step).
                    failures = 1
                except* Exception as group_error:
                    # A bug must not end forwarding for good (polling and buffering go on without
                    # us): report it with its traceback, drop this connection, start a new one.
                    self._conn = None
                    conn.abort()
                    error = group_error.exceptions[0]
                    log.error("uplink failed; reconnecting", exc_info=(type(error), error, error.__traceback__))
                    self._down(f"internal error: {error!r}", first=False)
                    failures = 1
        finally:
            self._cancel_timer()
            await self._goodbye()

    def _down(self, reason: str, *, first: bool) -> None:
        self.state = "disconnected"
        self.last_error = reason
        level = logging.WARNING if first else logging.DEBUG
        log.log(level, "uplink down; buffering", extra={"broker": self.config.url, "reason": reason})

    def _backoff(self, failures: int) -> float:
        delay = min(self.config.reconnect_max, self.config.reconnect_min * 2 ** min(failures - 1, 16))
        return delay * random.uniform(0.5, 1.0)

    async def _subscribe(self, conn: MqttConnection) -> bool:
        """Subscribe to this gateway's commands; False if the broker refuses (data flows regardless)."""
        try:
            await conn.subscribe([(self.command_filter, 1)])
        except ConnectionLost:
            raise
        except MqttError as exc:
            # The broker's ACL may not allow it: data must flow regardless, so no commands then.
            log.warning("no commands from the cloud", extra={"filter": self.command_filter, "error": str(exc)})
            return False
        return True

    async def _relay_commands(self, conn: MqttConnection) -> None:
        while True:
            message = await conn.messages.get()
            local_topic = message.topic.removeprefix(self.prefix)
            try:
                parsed = Topic.parse(local_topic)
            except WireError:
                parsed = None
            if (
                parsed is None
                or not message.topic.startswith(self.prefix)
                or parsed.kind is not TopicKind.COMMAND
                or (parsed.site, parsed.gateway) != (self.site, self.gateway)
            ):
                # Only this gateway's command topics (some brokers deliver retained messages
                # of other topics on a wildcard subscription).
                self.commands_dropped += 1
                continue
            try:
                relayed = await self.on_command(local_topic, bytes(message.payload), bool(message.retain))  # type: ignore[misc]
                if relayed:
                    self.commands_relayed += 1
                else:
                    self.commands_received += 1
            except Exception as exc:  # the local side failed: report, keep the link
                self.commands_dropped += 1
                log.warning("command not relayed", extra={"topic": local_topic, "error": str(exc)})

    # --- forwarding ----------------------------------------------------------------------

    async def _forward(self, conn: MqttConnection) -> None:
        """Send from both lanes within the window and the rate limits until the connection ends."""
        cfg = self.config
        buffer = self.buffer
        boundary = self.backlog_boundary = buffer.last_id
        live = Lane("live", cfg.live_share, lambda after, n: buffer.take_live(after, boundary, n))
        backlog = Lane("backlog", 1 - cfg.live_share, lambda after, n: buffer.take_backlog(after, boundary, n))
        self.lanes = [live, backlog]
        self._inflight.clear()
        self._inflight_bytes = 0
        self._session += 1  # acknowledgements of an earlier connection no longer count against the window
        read_limit = max(cfg.max_inflight, cfg.batch_max_records) * READ_AHEAD_WINDOWS
        conn.closed.add_done_callback(lambda _: self._wake.set())

        while True:
            self._wake.clear()
            if conn.closed.done():
                raise ConnectionLost(conn.closed.result())
            self._check_acks(conn)
            refilled = False
            for lane in self.lanes:
                # Keep a batch or a window ahead of the socket; read more only when it runs low.
                if lane.more and len(lane.ready) < read_limit // 2:
                    refilled |= await lane.refill(read_limit)
            if refilled:
                continue  # the connection may have closed during the reads
            delay = self._send_ready(conn)
            if delay:
                self._arm_timer(delay)
            elif self._inflight:
                self._arm_timer(1.0)  # look at the PUBACK deadline again
            await self._wake.wait()

    def _send_ready(self, conn: MqttConnection) -> float:
        """Publish while the window allows; returns how long a rate limit wants us to wait."""
        cfg = self.config
        # An MQTT 5 broker may allow fewer unacknowledged messages (Receive Maximum) than we would send.
        window = min(cfg.max_inflight, conn.max_inflight)
        linger_ms = round(cfg.batch_linger * 1000)
        while len(self._inflight) < window and self._inflight_bytes < cfg.max_inflight_bytes:
            now_ms = _now_ms()
            holds = {lane.name: lane.hold(now_ms, linger_ms, cfg.batch_max_records) for lane in self.lanes}
            lane = pick_lane(self.lanes, frozenset(name for name, ms in holds.items() if ms > 0))
            if lane is None:
                waiting = [ms for ms in holds.values() if ms > 0]
                return min(waiting) / 1000 if waiting else 0.0
            wait = max(self._message_rate.wait_time(), self._byte_rate.wait_time())
            if wait > 0:
                return wait
            message = lane.next_message(self.joiner, cfg.batch_max_records, cfg.batch_max_bytes)
            future = conn.publish(self.prefix + message.topic, message.payload, qos=1, retain=message.retain)
            size = len(message.payload)
            self._message_rate.spend(1)
            self._byte_rate.spend(size)
            if not self._inflight:
                self._last_progress = time.monotonic()  # the clock starts with the first in flight
            self._inflight.append((time.monotonic(), future))
            self._inflight_bytes += size
            lane.sent(message, self._cost(size))
            future.add_done_callback(partial(self._acknowledged, self._session, message, size))
        return 0.0

    def _cost(self, size: int) -> float:
        """A message's share of the link: seconds of the binding rate limit, or its bytes if none.

        Sharing by bytes alone would let the live lane's many small messages take nearly
        every token of a messages/s cap while staying far below its share of the bytes.
        """
        cfg = self.config
        seconds = [1 / cfg.max_messages_per_s] if cfg.max_messages_per_s else []
        if cfg.max_bytes_per_s:
            seconds.append(size / cfg.max_bytes_per_s)
        return max(seconds) if seconds else float(size)

    def _acknowledged(self, session: int, message: OutgoingMessage, size: int, future: asyncio.Future[None]) -> None:
        if session == self._session:
            self._inflight_bytes -= size
        error = None if future.cancelled() else future.exception()
        if session == self._session:
            self._last_progress = time.monotonic()
        if not future.cancelled() and error is None:
            self.buffer.accept(message.entries)
            self.delivered_total += 1
            self.records_delivered += message.records
        elif isinstance(error, PublishRefused):
            # An MQTT 5 broker said no (an ACL, a quota): sending it again would get the same
            # answer on every reconnect forever. Counted as a drop, and said once per topic.
            self.buffer.discard(message.entries, DropReason.REFUSED)
            if message.topic not in self._refused_topics:
                self._refused_topics.add(message.topic)
                log.error("broker refused a message; dropped", extra={"topic": message.topic, "reason": str(error)})
        self._wake.set()

    def _check_acks(self, conn: MqttConnection) -> None:
        while self._inflight and self._inflight[0][1].done():
            self._inflight.popleft()
        # Dead means no progress: nothing acknowledged for ack_timeout while something waits.
        # (Not "the oldest message is that old": on a slow link a full window takes longer
        # than ack_timeout to go out, yet every PUBACK proves the link alive.)
        if self._inflight and time.monotonic() - self._last_progress > self.config.ack_timeout:
            self.state = "disconnected"  # before anyone (the health report) can see the count
            self.dead_links += 1
            conn.abort()
            raise ConnectionLost(f"no PUBACK within {self.config.ack_timeout:g}s; link presumed dead")

    def _arm_timer(self, delay: float) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay, self._wake.set)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- what the rest of the gateway uses -----------------------------------------------

    def metrics(self) -> dict[str, object]:
        now = _now_ms()
        backlog = self.lanes[1] if self.lanes else None
        replaying = backlog is not None and (backlog.more or bool(backlog.ready))
        lag = None
        if replaying and backlog is not None and backlog.last_sent_created_ms is not None:
            lag = round((now - backlog.last_sent_created_ms) / 1000, 1)
        return {
            "state": self.state,
            "since_ms": self.state_since_ms,
            "last_error": self.last_error,
            "connects": self.connects_total,
            "dead_links": self.dead_links,
            "inflight": len(self._inflight),
            "replaying": replaying,
            "replay_lag_s": lag,
            "lanes": {
                lane.name: {"messages": lane.sent_messages, "records": lane.sent_records, "bytes": lane.sent_bytes}
                for lane in self.lanes
            },
            "commands_relayed": self.commands_relayed,
            "commands_received": self.commands_received,
            "commands_dropped": self.commands_dropped,
        }

    def publish_direct(self, topic_name: str, payload: bytes) -> None:
        """Best effort, QoS 0, not buffered: for health data that is stale by the next period."""
        conn = self._conn
        if conn is not None and conn.is_open:
            with contextlib.suppress(ConnectionLost):
                conn.publish(self.prefix + topic_name, payload, qos=0)

    async def wait_drained(self, timeout: float) -> bool:
        """Wait until the buffer is empty (everything acknowledged) or the timeout passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            # Bounded: while PUBACKs stream in, the buffer is never idle for long.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
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
        # MqttError too: a broker may refuse the retained status (MQTT 5 ACL); leave cleanly anyway.
        with contextlib.suppress(MqttError, TimeoutError):
            async with asyncio.timeout(2):
                await conn.publish(self.status_topic, encode_state("offline", _now_ms(), "shutdown"), 1, True)
        await conn.close()
        log.info("uplink closed", extra={"broker": self.config.url})
