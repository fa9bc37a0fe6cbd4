"""Wires the gateway together: sources -> buffer -> (local broker, uplink).

Data path, top-down:

1. Sources poll devices and hand each poll to :meth:`GatewayApp.submit_reading`.
2. The reading gets its sequence number and is committed to the store-and-forward
   buffer; only then is it published on the local broker for local subscribers.
3. The uplink forwards the buffer to the cloud broker and deletes after PUBACK.

Local applications may publish record envelopes on this gateway's telemetry topics;
the local broker's tap hands them to the same buffer (re-sequenced by us).

Shutdown is two-phase: stop taking input, drain the buffer with a deadline, then
close; whatever did not drain stays in the buffer for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from fieldlink import sdnotify
from fieldlink.embedded_broker import EmbeddedBroker, TopicRules
from fieldlink.metrics import MetricsExporter
from fieldlink.snapshot import LAST_HEALTH_FILE, write_snapshot
from fieldlink.status_socket import CONTROL_SOCKET, StatusServer
from fieldlink.wire import (
    BadCommand,
    Command,
    Topic,
    TopicKind,
    WireError,
    decode,
    decode_command,
    encode_command_result,
    encode_state,
    topic,
)
from gateway.buffer import BufferError, DropReason, StoreAndForwardBuffer
from gateway.config import GatewayConfig
from gateway.metrics import gateway_metrics
from gateway.sources.base import CommandError, DeviceState, Reading, WritableSource
from gateway.sources.registry import build_source
from gateway.uplink import Uplink

__all__ = ["GatewayApp"]

log = logging.getLogger(__name__)

LOCAL_INTAKE_CONCURRENCY = 8  # chunks of local records on their way into the buffer at once
LOCAL_INTAKE_CHUNK_BYTES = 256_000  # payload bytes of local messages per chunk
LOCAL_INBOX_BYTES = 8_000_000  # payload bytes from local publishers waiting for the buffer (bounds memory)
COMMAND_DEADLINE = 30.0  # seconds a device write may wait for its bus and its answer
# A retained command reaches the gateway again on every connection: carrying it out
# would repeat the write after each reconnect.
RETAINED_REFUSED = "retained commands are not carried out (they would run again on every reconnect)"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class CommandOrigin:
    """Who asked for a command: the cloud (through the uplink), or a client of the local broker."""

    source: Literal["cloud", "local"]
    client_id: str | None = None
    user: str | None = None  # the local broker login; None without one

    def __str__(self) -> str:
        return self.source if self.client_id is None else f"{self.source}:{self.client_id}"


class GatewayApp:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.site, self.gateway_id = config.gateway.site, config.gateway.id
        self.buffer = StoreAndForwardBuffer(
            config.buffer_path,
            site=self.site,
            gateway=self.gateway_id,
            encoding=config.uplink.encoding,
            config=config.buffer,
        )
        self.uplink = Uplink(
            config.uplink, self.buffer, site=self.site, gateway=self.gateway_id, on_command=self._relay_command
        )
        local = config.local_broker
        self.broker = (
            EmbeddedBroker(
                local.bind,
                tap=self._on_local_publish,
                users_file=local.users_file,
                acl=None
                if local.acl is None
                else {user: TopicRules(tuple(r.publish), tuple(r.subscribe)) for user, r in local.acl.items()},
            )
            if local.enabled
            else None
        )
        self.sources = [build_source(source) for source in config.sources]
        # Devices whose source executes writes: their commands are carried out here, not relayed.
        self._writers: dict[str, WritableSource] = {
            device: source  # type: ignore[misc]
            for source in self.sources
            if callable(getattr(source, "write", None))
            for device in source.devices
        }
        self._commands: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.commands_executed = 0
        self.commands_failed = 0
        self.commands_refused = 0  # not allowed from where they came ([commands]); counted in failed too
        self.readings_published = 0  # polls of our own sources, buffered and published locally
        self.records_buffered = 0  # telemetry records that entered the buffer (ours and local apps')
        self.local_rejected_total = 0
        self.local_overflow = 0  # local messages dropped: the inbox was full, or the gateway stopping
        self._taking_local = True
        self._local_inbox_bytes = 0
        self.readings_dropped = 0  # could not be buffered (disk full, I/O error)
        self.states_dropped = 0
        self.device_states: dict[str, DeviceState] = {}
        self.device_reasons: dict[str, str] = {}  # why a device is degraded or offline
        self._local_inbox: asyncio.Queue[tuple[Topic, bytes]] = asyncio.Queue()
        self._started = time.monotonic()
        self._rate_mark = (self._started, 0, 0)
        # Rates cover the time between two published reports; health() asked for `status` or at
        # the stop shows the last ones rather than a split second's (noisy).
        self._last_rates: dict[str, float] = {}
        self.drain_on_stop = True  # off for a config reload: the buffer is kept for the next app anyway
        self.metrics = MetricsExporter(gateway_metrics)
        self.status = StatusServer(config.gateway.state_dir / CONTROL_SOCKET, self.health)

    # --- ReadingSink, called by the sources ----------------------------------------------

    async def submit_reading(self, reading: Reading) -> None:
        try:
            _, payload = await self.buffer.add_reading(reading)
        except BufferError:
            # Disk full or failing: the reading is lost. Counted (health: readings_dropped) and
            # reported by the buffer once per episode; polling goes on.
            self.readings_dropped += 1
            return
        self.records_buffered += 1
        if self.broker is not None:
            await self.broker.publish(topic(TopicKind.TELEMETRY, self.site, self.gateway_id, reading.device), payload)
        self.readings_published += 1

    async def device_state(self, device: str, state: DeviceState, reason: str | None) -> None:
        self.device_states[device] = state
        if reason:
            self.device_reasons[device] = reason
        else:
            self.device_reasons.pop(device, None)
        status_topic = topic(TopicKind.DEVICE_STATUS, self.site, self.gateway_id, device)
        payload = encode_state(state.value, _now_ms(), reason)
        # Through the buffer, so the cloud sees state changes in order with the data.
        try:
            await self.buffer.add_message(status_topic, payload, retain=True)
        except BufferError:
            self.states_dropped += 1  # reported by the buffer, once per episode
        if self.broker is not None:
            await self.broker.publish(status_topic, payload, retain=True)

    # --- local publishers (through the embedded broker) ----------------------------------

    def _on_local_publish(self, client_id: str, topic_name: str, payload: bytes) -> None:
        try:
            parsed = Topic.parse(topic_name)
        except WireError:
            return  # not ours: local traffic of other applications
        if (parsed.site, parsed.gateway) != (self.site, self.gateway_id):
            return
        if parsed.kind is TopicKind.COMMAND and parsed.device in self._writers:
            user = self.broker.username(client_id) if self.broker is not None else None
            self._start_command(parsed.device, payload, CommandOrigin("local", client_id, user))
            return
        if parsed.kind in (TopicKind.TELEMETRY, TopicKind.COMMAND_RESULT):
            if not self._taking_local:
                self.local_overflow += 1  # stopping: the intake has already been drained
                return
            if self._local_inbox_bytes >= LOCAL_INBOX_BYTES:
                # amqtt has already acknowledged it: all we can do is count it and say so.
                self.local_overflow += 1
                if self.local_overflow == 1 or self.local_overflow % 10_000 == 0:
                    log.error("local publishers outpace the buffer; dropping", extra={"dropped": self.local_overflow})
                return
            self._local_inbox_bytes += len(payload)
            self._local_inbox.put_nowait((parsed, payload))

    async def _local_intake(self) -> None:
        # Whatever has arrived goes to the buffer as one chunk, and several chunks are in
        # flight at once: local publishers share group commits, and no task per record.
        slots = asyncio.Semaphore(LOCAL_INTAKE_CONCURRENCY)
        tasks: set[asyncio.Task[None]] = set()
        inbox = self._local_inbox
        readings: list[Reading] = []
        try:
            while True:
                chunk = [await inbox.get()]
                size = len(chunk[0][1])
                # Bounded in bytes, not messages: one local message may carry a batch of records.
                while size < LOCAL_INTAKE_CHUNK_BYTES and not inbox.empty():
                    chunk.append(inbox.get_nowait())
                    size += len(chunk[-1][1])
                self._local_inbox_bytes -= size
                readings = self._local_readings(chunk, tasks)
                if readings:
                    await slots.acquire()
                    self._spawn(tasks, slots, self._buffer_local(readings))
                    readings = []
        finally:
            # Stopping: the local broker has acknowledged what is in the inbox, so it is
            # buffered now, not abandoned; what comes after this point is counted as dropped.
            self._taking_local = False
            rest: list[tuple[Topic, bytes]] = []
            while not inbox.empty():
                rest.append(inbox.get_nowait())
            self._local_inbox_bytes = 0
            readings += self._local_readings(rest, tasks)
            if readings:
                tasks.add(asyncio.create_task(self._buffer_local(readings)))
            if tasks:
                await asyncio.wait(tasks)

    def _local_readings(self, chunk: list[tuple[Topic, bytes]], tasks: set[asyncio.Task[None]]) -> list[Reading]:
        """Readings from local record envelopes (bad ones counted); command results sent on their way."""
        readings: list[Reading] = []
        for parsed, payload in chunk:
            if parsed.kind is TopicKind.COMMAND_RESULT:
                # Command results travel as control messages: evicted only after all telemetry.
                task = asyncio.create_task(self._buffer_message(str(parsed), payload))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                continue
            try:
                records = decode(payload)
            except WireError as exc:
                self.local_rejected_total += 1
                log.warning("local telemetry rejected", extra={"topic": str(parsed), "reason": str(exc)})
                continue
            # The topic names the device; sequence numbers are ours to give.
            readings += [Reading(parsed.device or r.device, r.ts, r.values) for r in records]
        return readings

    @staticmethod
    def _spawn(tasks: set[asyncio.Task[None]], slots: asyncio.Semaphore, work: Any) -> None:
        task = asyncio.create_task(work)
        tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            tasks.discard(t)
            slots.release()

        task.add_done_callback(done)

    async def _buffer_local(self, readings: list[Reading]) -> None:
        for outcome in await self.buffer.add_readings(readings):
            if isinstance(outcome, BufferError):
                self.readings_dropped += 1  # counted by reason and reported by the buffer
            else:
                self.records_buffered += 1

    async def _buffer_message(self, topic_name: str, payload: bytes) -> None:
        with contextlib.suppress(BufferError):  # counted by reason and reported by the buffer
            await self.buffer.add_message(topic_name, payload)

    async def _relay_command(self, topic_name: str, payload: bytes, retained: bool = False) -> bool:
        """A command from the cloud: carried out if the device is ours (False), else relayed locally (True)."""
        with contextlib.suppress(WireError):
            parsed = Topic.parse(topic_name)
            if parsed.device in self._writers:
                self._start_command(parsed.device, payload, CommandOrigin("cloud"), retained=retained)
                return False
        if self.broker is None:
            raise RuntimeError("no local broker to relay commands to (local_broker.enabled = false)")
        await self.broker.publish(topic_name, payload)
        return True

    # --- commands to our own devices --------------------------------------------------------

    def _start_command(self, device: str, payload: bytes, origin: CommandOrigin, retained: bool = False) -> None:
        if self._stopping:
            # The sources are stopping or stopped: a write now would reopen their buses.
            self.commands_failed += 1
            log.warning(
                "command refused: gateway stopping",
                extra={"device": device, "origin": str(origin), "user": origin.user or "-"},
            )
            return
        # Its own task: a write waits for its bus, and neither the uplink nor the local
        # broker may wait for that.
        task = asyncio.create_task(self._execute_command(device, payload, origin, retained), name=f"command-{device}")
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    def _refusal(self, origin: CommandOrigin) -> str | None:
        """Why a command from ``origin`` may not be carried out ([commands]); None if it may."""
        allowed = self.config.commands
        if origin.source not in allowed.allow_from:
            return f"commands from {origin.source} are not allowed"
        if origin.source == "local" and allowed.local_users is not None and origin.user not in allowed.local_users:
            who = f"user {origin.user!r}" if origin.user else "clients without a login"
            return f"commands from local {who} are not allowed"
        return None

    async def _write(self, device: str, command: Command) -> tuple[str, str | None]:
        """Status and reason of one write."""
        try:
            async with asyncio.timeout(COMMAND_DEADLINE):
                await self._writers[device].write(device, command.tag, command.value)
        except CommandError as exc:
            return exc.status, exc.reason
        except TimeoutError:
            reason = f"not done within {COMMAND_DEADLINE:g}s (bus busy); the write may or may not have happened"
            return "timeout", reason
        except Exception:  # a bug must not lose the answer: the command still gets one
            log.exception("device write failed", extra={"device": device, "tag": command.tag})
            return "error", "internal error (see the gateway's log)"
        return "ok", None

    async def _execute_command(self, device: str, payload: bytes, origin: CommandOrigin, retained: bool) -> None:
        """Carry out one command and publish its result (ok / error / timeout, with the reason)."""
        details: dict[str, Any] = {"device": device}
        refusal = self._refusal(origin)
        try:
            command = decode_command(payload)
        except BadCommand as exc:
            command_id, status, reason = exc.command_id, "error", refusal or f"bad command: {exc}"
        else:
            command_id = command.id
            details.update(tag=command.tag, value=command.value)
            if refusal:
                status, reason = "error", refusal
            elif retained:
                status, reason = "error", RETAINED_REFUSED
            else:
                status, reason = await self._write(device, command)
        if status == "ok":
            self.commands_executed += 1
        else:
            self.commands_failed += 1
        # Every command is logged with who asked for it: source, MQTT client id, local login.
        who = {"id": command_id, "origin": str(origin), "user": origin.user or "-"}
        if refusal:
            self.commands_refused += 1
            log.warning("command refused", extra={**who, **details, "reason": refusal})
        else:
            log.log(
                logging.INFO if status == "ok" else logging.WARNING,
                "device write",
                extra={**who, **details, "status": status, "reason": reason or "-"},
            )
        result_topic = topic(TopicKind.COMMAND_RESULT, self.site, self.gateway_id, device)
        result = encode_command_result(command_id, status, _now_ms(), reason, **details)
        await self._buffer_message(result_topic, result)
        if self.broker is not None:
            await self.broker.publish(result_topic, result)

    # --- health ----------------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        stats = await self.buffer.stats()
        now = _now_ms()
        buffer = self.buffer
        return {
            "ts": now,
            "site": self.site,
            "gateway": self.gateway_id,
            "uptime_s": round(time.monotonic() - self._started, 1),
            "readings_published": self.readings_published,
            "records_buffered": self.records_buffered,
            "records_delivered": self.uplink.records_delivered,
            "messages_delivered": self.uplink.delivered_total,
            "rates": self._last_rates,
            "local_rejected": self.local_rejected_total,
            "local_overflow": self.local_overflow,
            "readings_dropped": self.readings_dropped,
            "states_dropped": self.states_dropped,
            "buffer_write_failures": buffer.write_failures,
            "buffer": {
                "durability": buffer.config.durability.value,
                "messages": stats.messages,
                "records": stats.records,
                "bytes": stats.bytes,
                "max_bytes": buffer.config.max_bytes,
                "file_bytes": stats.file_bytes,
                "memory_messages": stats.memory_messages,
                "spilled": buffer.spilled_total,
                "oldest_age_s": None if stats.oldest_ms is None else round((now - stats.oldest_ms) / 1000, 1),
            },
            # Messages that left the buffer without reaching the cloud, by reason.
            "drops": {reason.value: buffer.drops[reason.value] for reason in DropReason},
            "control_drops": buffer.control_drops,
            "uplink": self.uplink.metrics(),
            "devices": {name: state.value for name, state in self.device_states.items()},
            "device_reasons": dict(self.device_reasons),
            "local_broker": None if self.broker is None else self.broker.counters(),
            "commands": {
                "executed": self.commands_executed,
                "failed": self.commands_failed,
                "refused": self.commands_refused,
            },
            "last_seq": buffer.last_seq(),
            "sources": {source.name: source.counters() for source in self.sources},
        }

    def _rates(self) -> dict[str, float]:
        """Records per second into the buffer and out to the cloud since the last health report."""
        now = time.monotonic()
        buffered, delivered = self.buffer.records_appended, self.uplink.records_delivered
        then, buffered_before, delivered_before = self._rate_mark
        self._rate_mark = (now, buffered, delivered)
        elapsed = max(now - then, 1e-3)
        return {
            "records_in_per_s": round((buffered - buffered_before) / elapsed, 1),
            "records_out_per_s": round((delivered - delivered_before) / elapsed, 1),
        }

    async def _health_loop(self) -> None:
        health_topic = topic(TopicKind.GATEWAY_HEALTH, self.site, self.gateway_id)
        while True:
            self._last_rates = self._rates()
            report = await self.health()
            self.metrics.report = report
            payload = json.dumps(report, separators=(",", ":")).encode()
            if self.broker is not None:
                await self.broker.publish(health_topic, payload, retain=True)
            self.uplink.publish_direct(health_topic, payload)
            await asyncio.sleep(self.config.gateway.health_interval)

    async def _local_status(self, state: str, reason: str | None = None) -> None:
        if self.broker is not None:
            status_topic = topic(TopicKind.GATEWAY_STATUS, self.site, self.gateway_id)
            await self.broker.publish(status_topic, encode_state(state, _now_ms(), reason), retain=True)

    # --- lifecycle -----------------------------------------------------------------------

    @staticmethod
    async def _stop_inputs(inputs: list[asyncio.Task[None]]) -> None:
        """Cancel the inputs and wait for them, cancelling again if one swallowed it.

        On Python 3.11, asyncio.wait_for (used inside client libraries such as pymodbus) can
        swallow a cancellation that arrives as its inner call completes; a poll loop then
        runs on and the stop would hang.
        """
        pending = set(inputs)
        for attempt in range(20):
            if attempt and pending:
                log.warning("an input ignored its cancellation; cancelling again", extra={"attempt": attempt})
            for task in pending:
                task.cancel()
            if not pending:
                return
            _, pending = await asyncio.wait(pending, timeout=0.5)
        log.error("inputs did not stop", extra={"tasks": ", ".join(t.get_name() for t in pending)})

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then shut down in two phases (no drain if ``drain_on_stop`` is off)."""
        await self.buffer.open()
        if self.config.metrics.bind:
            self.metrics.start(self.config.metrics.bind)
        if self.buffer.recovered_from is not None:
            log.error(
                "started a new buffer; the corrupt one was kept",
                extra={"kept": str(self.buffer.recovered_from)},
            )
        try:
            if self.broker is not None:
                await self.broker.start()
                await self._local_status("online")
            await self.status.start()
            async with asyncio.TaskGroup() as group:
                uplink = group.create_task(self.uplink.run(), name="uplink")
                inputs = [group.create_task(s.run(self), name=f"source-{s.name}") for s in self.sources]
                if self.broker is not None:
                    inputs.append(group.create_task(self._local_intake(), name="local-intake"))
                health = group.create_task(self._health_loop(), name="health")
                watchdog = group.create_task(sdnotify.watchdog_loop(), name="watchdog")
                log.info(
                    "gateway running",
                    extra={"site": self.site, "gateway": self.gateway_id, "sources": len(self.sources)},
                )
                sdnotify.notify("READY=1", f"STATUS=gateway {self.site}/{self.gateway_id} running")
                await stop.wait()

                log.info("stopping: inputs")
                self._stopping = True
                await self._stop_inputs([*inputs, *self._commands])
                drained = self.drain_on_stop and await self.uplink.wait_drained(self.config.gateway.drain_timeout)
                remaining = (await self.buffer.stats()).messages
                log.info("stopping: drain done", extra={"drained": drained, "left_in_buffer": remaining})
                health.cancel()
                uplink.cancel()
                watchdog.cancel()
        finally:
            await self.status.stop()  # before the buffer closes: a status answer reads it
            await self._local_status("offline", "shutdown")
            if self.broker is not None:
                await self.broker.stop()
            await self.buffer.flush()
            final = await self.health()
            await self.buffer.close()
            write_snapshot(self.config.gateway.state_dir / LAST_HEALTH_FILE, final)
            self.metrics.stop()
            log.info(
                "gateway stopped",
                extra={"records_buffered": final["records_buffered"], "left_in_buffer": final["buffer"]["messages"]},
            )
