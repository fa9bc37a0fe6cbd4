"""Wires the cloud together: broker connection -> ingest pipeline -> store, rules, outbox, dashboards."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import time
from typing import Any

from cloud.alerting.service import AlertService
from cloud.config import CloudConfig
from cloud.dashboard import DashboardPublisher
from cloud.ingest import IngestPipeline
from cloud.metrics import cloud_metrics
from cloud.notify.registry import build_notifier
from cloud.spool import Spool
from cloud.stores.registry import build_store
from cloud.web import DashboardWebServer
from fieldlink import sdnotify
from fieldlink.embedded_broker import EmbeddedBroker
from fieldlink.metrics import MetricsExporter
from fieldlink.mqtt import ConnectFailed, ConnectionLost, MqttConnection
from fieldlink.snapshot import LAST_HEALTH_FILE, write_snapshot
from fieldlink.status_socket import CONTROL_SOCKET, StatusServer

__all__ = ["CloudApp", "cloud_health_topic", "dead_letter_topic"]

log = logging.getLogger(__name__)


def cloud_health_topic(name: str) -> str:
    return f"fl-cloud/{name}/health"


def dead_letter_topic(name: str) -> str:
    return f"fl-cloud/{name}/dead-letter"


def _publish_retained(conn: MqttConnection, topic: str, payload: bytes, retain: bool) -> None:
    conn.publish(topic, payload, qos=1, retain=retain)


class CloudApp:
    def __init__(self, config: CloudConfig) -> None:
        self.config = config
        state_dir = config.cloud.state_dir
        self.store = build_store(config.store, config)
        self.notifiers = {n.name: build_notifier(n) for n in config.notifiers}
        dashboard = DashboardPublisher(config.dashboard.prefix) if config.dashboard.enabled else None
        self.alerts = AlertService(
            config.alerting,
            list(config.rules),
            self.notifiers,
            state_dir / "alerts.db",
            config.dashboard.prefix if config.dashboard.enabled else None,
        )
        self.topic_prefix = config.broker.topic_prefix
        self.spool = Spool(state_dir / "spool.db") if config.ingest.spool else None
        self.pipeline = IngestPipeline(
            self.store,
            self.alerts,
            dashboard,
            topic_prefix=self.topic_prefix,
            dead_letter_topic=config.ingest.dead_letter_topic or dead_letter_topic(config.cloud.name),
            max_message_bytes=config.ingest.max_message_bytes,
            worker=config.cloud.name,
            spool=self.spool,
            spool_after=config.ingest.spool_after,
        )
        self.broker = (
            EmbeddedBroker(config.broker.bind, ws_bind=config.broker.ws_bind) if config.broker.embedded else None
        )
        web_mqtt_url = config.web.browser_mqtt_url(config.broker)  # the config check made sure it is set
        self.web = (
            DashboardWebServer(config.web.bind, mqtt_url=web_mqtt_url, prefix=config.dashboard.prefix)
            if config.web.enabled and web_mqtt_url
            else None
        )
        self.mqtt_settings = config.broker.effective()
        self.client_id = config.broker.client_id or f"fieldlink-cloud-{config.cloud.name}"
        self.broker_state = "connecting"
        self._conn: MqttConnection | None = None
        self._started = time.monotonic()
        self.metrics = MetricsExporter(cloud_metrics)
        self._rate_mark = (self._started, 0, 0)
        # Rates cover the time between two published reports; health() asked for `status` or at
        # the stop shows the last ones rather than a split second's (noisy).
        self._last_rates: dict[str, float] = {}
        # `fieldlink-cloud status` asks this socket for the health report. HOOK: a part with
        # more to show adds a section: self.status.add_section("alerting", callable returning a dict).
        self.status = StatusServer(state_dir / CONTROL_SOCKET, self.health)

    async def _consume_forever(self) -> None:
        failures = 0
        while True:
            # Persistent session with manual acks: what we have not acknowledged, the broker keeps.
            conn = MqttConnection(self.mqtt_settings, client_id=self.client_id, clean_session=False, manual_ack=True)
            try:
                await conn.open()
                engine = self.alerts.engine
                filters = self.config.broker.filters(
                    statuses=self.config.dashboard.enabled or engine.needs_status, health=engine.needs_health
                )
                # Alert commands are not shared: every worker hears them and acts on its own alerts.
                filters += [self.config.alerting.ack_topic, self.config.alerting.silence_topic]
                await conn.subscribe([(topic_filter, 1) for topic_filter in filters])
            except (ConnectFailed, ConnectionLost) as exc:
                failures += 1
                self.broker_state = "disconnected"
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(
                    level,
                    "cloud broker unreachable",
                    extra={"broker": self.mqtt_settings.url, "reason": str(exc)},
                )
                conn.abort()
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0))
                continue
            failures = 0
            self._conn = conn
            self.alerts.connected(functools.partial(_publish_retained, conn))
            self.broker_state = "connected"
            log.info(
                "subscribed",
                extra={"broker": self.mqtt_settings.url, "session_present": conn.session_present},
            )
            try:
                await self.pipeline.consume(conn)
            finally:
                self._conn = None
                self.alerts.connected(None)
                await conn.close(timeout=1)
            self.broker_state = "disconnected"
            log.warning("cloud broker connection lost", extra={"reason": conn.closed.result()})

    async def health(self) -> dict[str, Any]:
        c = self.pipeline.counters
        latency = sorted(self.pipeline.write_latency)
        spool = self.spool
        now_ms = time.time_ns() // 1_000_000
        return {
            "ts": time.time_ns() // 1_000_000,
            "cloud": self.config.cloud.name,
            "uptime_s": round(time.monotonic() - self._started, 1),
            "broker": self.broker_state,
            "messages": c.messages,
            "records": c.records,
            "records_stored": c.records_stored,
            "rates": self._last_rates,
            "records_rejected": c.records_rejected,
            "duplicates_dropped": self.pipeline.dedup.dropped_total,
            "scanned_messages": c.scanned_messages,  # batches read by the fast path (docs/config-cloud.md)
            "bad_messages": c.bad_messages,
            "dead_letters": c.dead_letters,
            "store_failures": c.store_failures,
            "store_write_ms": {
                "p50": round(latency[len(latency) // 2] * 1000, 1) if latency else None,
                "p99": round(latency[min(len(latency) - 1, int(len(latency) * 0.99))] * 1000, 1) if latency else None,
            },
            "spool": None
            if spool is None
            else {
                "records": spool.records,
                "oldest_age_s": None if spool.oldest_ms is None else round((now_ms - spool.oldest_ms) / 1000, 1),
                "spooled": spool.spooled_total,
                "drained": spool.drained_total,
            },
            "alerts": self.alerts.health(),
        }

    def _rates(self, records: int, stored: int) -> dict[str, float]:
        """Records per second decoded and stored since the previous report."""
        now = time.monotonic()
        then, records_before, stored_before = self._rate_mark
        self._rate_mark = (now, records, stored)
        elapsed = max(now - then, 1e-3)
        return {
            "records_in_per_s": round((records - records_before) / elapsed, 1),
            "records_stored_per_s": round((stored - stored_before) / elapsed, 1),
        }

    async def _health_loop(self) -> None:
        topic = cloud_health_topic(self.config.cloud.name)
        while True:
            conn = self._conn
            counters = self.pipeline.counters
            self._last_rates = self._rates(counters.records, counters.records_stored)
            report = await self.health()
            self.metrics.report = report
            if conn is not None and conn.is_open:
                payload = json.dumps(report, separators=(",", ":")).encode()
                with contextlib.suppress(ConnectionLost):
                    conn.publish(topic, payload, qos=0, retain=True)
            await asyncio.sleep(self.config.cloud.health_interval)

    async def serve(self, stop: asyncio.Event) -> None:
        await self.store.open()
        await self.alerts.open()
        if self.config.metrics.bind:
            self.metrics.start(self.config.metrics.bind)
        if self.spool is not None:
            await self.spool.open()
        try:
            await self.status.start()
            if self.broker is not None:
                await self.broker.start()
            if self.web is not None:  # after the broker: the page connects to its WebSocket listener at once
                await self.web.start()
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._consume_forever(), name="ingest"),
                    group.create_task(self.alerts.run(), name="alerting"),
                    group.create_task(self._health_loop(), name="health"),
                ]
                if self.spool is not None:
                    tasks.append(group.create_task(self.spool.drain(self.pipeline.drain_write), name="spool"))
                tasks.append(group.create_task(sdnotify.watchdog_loop(), name="watchdog"))
                log.info("cloud running", extra={"cloud": self.config.cloud.name, "store": self.store.name})
                sdnotify.notify("READY=1", f"STATUS=cloud {self.config.cloud.name} running")
                await stop.wait()
                log.info("stopping")
                sdnotify.notify("STOPPING=1")
                await self.alerts.stop()  # a notification on its way is finished and recorded
                # Unacknowledged messages stay with the broker; nothing to drain here.
                for task in tasks:
                    task.cancel()
        finally:
            await self.status.stop()  # before the stores close: a status answer reads them
            if self.web is not None:
                await self.web.stop()
            if self.broker is not None:
                await self.broker.stop()
            final = await self.health()
            await self.alerts.close()
            if self.spool is not None:
                await self.spool.close()
            await self.store.close()
            write_snapshot(self.config.cloud.state_dir / LAST_HEALTH_FILE, final)
            self.metrics.stop()
            log.info("cloud stopped", extra={"records_stored": final["records_stored"]})
