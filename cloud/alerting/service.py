"""The alerting runtime of a cloud worker: engine + dispatcher + alerts.db + outbox sender.

``observe*`` are called by the ingest pipeline *before* it acknowledges the messages:
they return once the step (alert changes, rule state, notifications) is committed.
A ticker runs the timers (``for``, dead-man, group waits, repeats, escalation, rate-limit
summaries, quiet hours); the sender delivers the outbox with retries and backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from cloud.alerting import store
from cloud.alerting.config import AlertingSection, RuleConfig
from cloud.alerting.dispatch import Dispatcher, Silence
from cloud.alerting.engine import Engine
from cloud.alerting.model import Alert, HistoryEntry, now_ms
from cloud.notify.base import Notifier, NotifyFailed
from cloud.notify.http import redacted
from fieldlink.configkit import parse_duration
from fieldlink.sqlite_file import SqliteFile
from fieldlink.wire import Record

__all__ = ["AlertService", "alert_topic", "parse_silence"]

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0
Publish = Callable[[str, bytes, bool], None]


def alert_topic(prefix: str, alert: Alert) -> str:
    return f"{prefix}/{alert.site or '-'}/alerts/{alert.topic_key}"


def parse_silence(body: Mapping[str, Any], now: int) -> Silence:
    """A silence from a command payload: {"matchers": {...}, "ends": ISO | "for": "2h", "by", "comment"}."""
    matchers = body.get("matchers")
    if not isinstance(matchers, dict) or not matchers or not all(isinstance(v, str) for v in matchers.values()):
        raise ValueError("'matchers' must be a non-empty table of label -> glob")
    if "ends" in body:
        ends = datetime.fromisoformat(str(body["ends"]).replace("Z", "+00:00"))
        if ends.tzinfo is None:
            raise ValueError("'ends' needs a time zone, e.g. 2026-12-01T06:00:00+01:00")
        ends_ms = int(ends.timestamp() * 1000)
    elif "for" in body:
        ends_ms = now + int(parse_duration(body["for"]) * 1000)
    else:
        raise ValueError("give 'ends' (ISO 8601) or 'for' (a duration)")
    by = str(body.get("by") or "unknown")
    return Silence(secrets.token_hex(4), dict(matchers), ends_ms, by, str(body.get("comment") or ""), now)


class AlertService:
    def __init__(
        self,
        config: AlertingSection,
        rules: list[RuleConfig],
        notifiers: Mapping[str, Notifier],
        path: Path,
        dashboard_prefix: str | None,
    ) -> None:
        self.config = config
        self.engine = Engine(rules)
        self.dispatcher = Dispatcher(config, rules, list(notifiers))
        self.notifiers = dict(notifiers)
        self.dashboard_prefix = dashboard_prefix
        self._file = SqliteFile(path, store.SCHEMA, name="alerts")
        self._lock = asyncio.Lock()
        self._wake_sender = asyncio.Event()
        self.publish: Publish | None = None
        self.enabled = bool(rules)
        self.sent_total = 0
        self.failed_attempts_total = 0
        self.failed_permanently_total = 0
        self.outbox_pending = 0
        self._pruned_ms = 0
        self._stopping = False
        self._sending = asyncio.Lock()  # held while a notification is on its way

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        loaded = await self._file.run(store.load)
        self.engine.load(loaded.alerts, loaded.series)
        self.dispatcher.load(loaded.groups, loaded.meta, loaded.silences)
        now = now_ms()
        step = store.Step()
        for i, silence in enumerate(self.config.silences):
            ends = datetime.fromisoformat(silence.ends.replace("Z", "+00:00"))
            item = Silence(
                f"config-{i}", dict(silence.matchers), int(ends.timestamp() * 1000), silence.created_by, silence.comment
            )
            self.dispatcher.add_silence(item)
        # Alerts whose rule left the config are resolved, not kept firing forever.
        for alert in list(self.engine.alerts.values()):
            if alert.rule not in self.engine.by_name and alert.state != "resolved":
                alert.state, alert.ended_ms, alert.changed_ms = "resolved", now, now
                step.changes.alerts[alert.id] = alert
                step.history.append(HistoryEntry(now, alert.id, "resolved", {"reason": "rule removed from the config"}))
        self.outbox_pending = await self._file.run(
            lambda db: int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        )
        if not step.empty():
            await self._file.run(lambda db: store.commit(db, step, now))
        firing = sum(1 for a in self.engine.alerts.values() if a.state == "firing")
        log.info(
            "alerting ready", extra={"rules": len(self.engine.rules), "firing": firing, "outbox": self.outbox_pending}
        )

    async def close(self) -> None:
        await self._file.close()

    async def stop(self, timeout: float = 15.0) -> None:
        """Let a notification on its way finish and be recorded: a send cut off between the
        provider's OK and our commit would be sent again after the restart."""
        self._stopping = True
        self._wake_sender.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._sending:
                pass

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._ticker(), name="alert-ticker")
            group.create_task(self._sender(), name="alert-sender")

    def connected(self, publish: Publish | None) -> None:
        """The worker (re)connected: dashboards get every current alert again (retained)."""
        self.publish = publish
        if publish is not None:
            for alert in self.engine.alerts.values():
                self._show(alert)

    # --- inputs (called before the messages are acknowledged) ---------------------------

    async def observe(self, records: Iterable[Record]) -> None:
        if not self.enabled:
            return
        now = now_ms()
        self.engine.observe_records(records, now)
        await self.step(now)

    async def observe_status(  # noqa: PLR0917 (a status message's fields, in wire order)
        self, site: str, gateway: str, device: str | None, state: str, reason: str | None, ts: int
    ) -> None:
        if self.engine.needs_status:
            now = now_ms()
            self.engine.observe_status(site, gateway, device, state, reason, ts, now)
            await self.step(now)

    async def observe_health(self, site: str, gateway: str, body: dict[str, Any], ts: int) -> None:
        if self.engine.needs_health:
            now = now_ms()
            self.engine.observe_health(site, gateway, body, ts, now)
            await self.step(now)

    async def ack(self, alert_id: str, by: str, comment: str | None) -> bool:
        now = now_ms()
        alert = self.engine.ack(alert_id, by, comment, now)
        if alert is None:
            return False
        log.info("alert acknowledged", extra={"alert": alert_id, "by": by})
        await self.step(now)
        return True

    async def silence(self, body: Mapping[str, Any]) -> Silence:
        now = now_ms()
        silence = parse_silence(body, now)
        self.dispatcher.add_silence(silence)
        step = store.Step(silences_added=[silence.to_json()])
        step.history.append(HistoryEntry(now, "*", "silence_added", silence.to_json()))
        await self._commit(step, now)
        log.info("silence added", extra={"matchers": silence.matchers, "by": silence.created_by, "id": silence.id})
        return silence

    async def command(self, topic: str, payload: bytes) -> None:
        """An ack or a silence from the command topics; bad ones are logged and dropped."""
        try:
            body = _command_body(topic == self.config.ack_topic, payload)
            if topic == self.config.ack_topic:
                if not await self.ack(body["id"], body["by"], body.get("comment")):
                    log.info("ack for an alert this worker does not have", extra={"alert": body["id"]})
            else:
                await self.silence(body)
        except (ValueError, TypeError) as exc:
            log.warning("bad alert command ignored", extra={"topic": topic, "reason": str(exc)})

    # --- one step ----------------------------------------------------------------------

    async def step(self, now: int) -> None:
        async with self._lock:
            changes = self.engine.take_changes()
            for alert in changes.alerts.values():
                self.dispatcher.on_change(alert, now)
            notifications = self.dispatcher.tick(self.engine.alerts, now)
            step = store.Step(changes=changes)
            step.groups, step.meta = self.dispatcher.dirty_state()
            step.silences_removed = self.dispatcher.expired_silences(now)
            forgotten = self.engine.forget_resolved(now - int(self.config.resolved_retention * 1000))
            step.forgotten = [a.id for a in forgotten]
            if now - self._pruned_ms > 3_600_000:
                step.history_before_ms, self._pruned_ms = now - int(self.config.history_retention * 1000), now
            for notification in notifications:
                for target in self._targets(notification.receiver):
                    step.outbox.append((notification, target))
                    step.history += [
                        HistoryEntry(
                            now,
                            a["id"],
                            "queued",
                            {"receiver": notification.receiver, "key": notification.payload["key"]},
                        )
                        for a in notification.payload["alerts"]
                    ]
            if step.empty():
                return
            await self._commit(step, now)
        for alert in changes.alerts.values():
            self._show(alert)
        for alert in forgotten:
            self._unshow(alert)
        if step.outbox:
            self._wake_sender.set()

    async def _commit(self, step: store.Step, now: int) -> None:
        added = await self._file.run(lambda db: store.commit(db, step, now))
        self.outbox_pending += added

    def _targets(self, receiver: str) -> list[str]:
        notifier = self.notifiers.get(receiver)
        return notifier.targets() if notifier is not None else ["*"]

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick)
            now = now_ms()
            if self.enabled:
                self.engine.tick(now)
            try:
                await self.step(now)
            except sqlite3.Error:
                log.exception("alert state could not be written; retrying at the next tick")

    # --- dashboards ---------------------------------------------------------------------

    def _show(self, alert: Alert) -> None:
        if self.publish is None or self.dashboard_prefix is None:
            return
        with contextlib.suppress(Exception):  # a view: the broker being gone must not stop alerting
            self.publish(alert_topic(self.dashboard_prefix, alert), json.dumps(alert.view()).encode(), True)

    def _unshow(self, alert: Alert) -> None:
        if self.publish is None or self.dashboard_prefix is None:
            return
        with contextlib.suppress(Exception):
            self.publish(alert_topic(self.dashboard_prefix, alert), b"", True)

    # --- the sender ---------------------------------------------------------------------

    async def _sender(self) -> None:
        while True:
            self._wake_sender.clear()
            now = now_ms()
            rows, next_due = await self._file.run(lambda db, now=now: _due(db, now))
            for row in rows:
                async with self._sending:
                    if self._stopping:
                        return
                    await self._attempt(*row)
            if rows:
                continue
            wait = 3600.0 if next_due is None else max(0.0, (next_due - now_ms()) / 1000)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake_sender.wait()

    async def _attempt(self, row_id: int, receiver: str, target: str, payload_text: str, attempts: int) -> None:
        payload = json.loads(payload_text)
        notifier = self.notifiers.get(receiver)
        shown = redacted(target) if "://" in target else target  # a webhook URL may hold its secret
        alert_ids = [a["id"] for a in payload.get("alerts", [])] or ["*"]
        now = now_ms()
        try:
            await _send(notifier, receiver, payload, target)
        except NotifyFailed as exc:
            attempts += 1
            self.failed_attempts_total += 1
            detail = {
                "receiver": receiver,
                "target": shown,
                "key": payload["key"],
                "attempt": attempts,
                "reason": str(exc),
            }
            if exc.permanent:
                # Retrying cannot help (a bad number, a refused login): reported, not retried.
                self.failed_permanently_total += 1
                log.error("notification refused for good; not retried", extra=detail)
                entries = [HistoryEntry(now, a, "notify_failed", {**detail, "permanent": True}) for a in alert_ids]
                await self._file.run(lambda db: _finish(db, row_id, entries))
                self.outbox_pending -= 1
                return
            delay = min(MAX_BACKOFF_S, 2.0 ** (attempts - 1)) * random.uniform(0.8, 1.0)
            retry_after = getattr(exc, "retry_after", None)
            if retry_after is not None:
                delay = max(delay, min(float(retry_after), MAX_BACKOFF_S * 4))
            log.warning("notification not delivered; will retry", extra={**detail, "retry_in_s": round(delay, 1)})
            entries = [HistoryEntry(now, a, "notify_retry", detail) for a in alert_ids]
            next_ms = now + int(delay * 1000)
            error = str(exc)
            await self._file.run(lambda db: _retry_later(db, row_id, (attempts, next_ms), error, entries))
            return
        self.sent_total += 1
        entries = [
            HistoryEntry(
                now,
                a,
                "notified",
                {"receiver": receiver, "target": shown, "key": payload["key"], "status": payload["status"]},
            )
            for a in alert_ids
        ]
        await self._file.run(lambda db: _finish(db, row_id, entries))
        self.outbox_pending -= 1
        log.info("notification sent", extra={"receiver": receiver, "target": shown, "subject": payload.get("subject")})

    # --- health ---------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        alerts = self.engine.alerts.values()
        return {
            "rules": len(self.engine.rules),
            "firing": sum(1 for a in alerts if a.state == "firing"),
            "pending": sum(1 for a in alerts if a.state == "pending"),
            "acknowledged": sum(1 for a in alerts if a.state == "firing" and a.acked_by),
            "fired_total": self.engine.fired_total,
            "resolved_total": self.engine.resolved_total,
            "late_records_ignored": self.engine.late_ignored,
            "silences": len(self.dispatcher.silences),
            "muted_total": self.dispatcher.muted_total,
            "rate_limited_total": self.dispatcher.rate_limited_total,
            "notifications_sent": self.sent_total,
            "notification_failures": self.failed_attempts_total,
            "notifications_failed_permanently": self.failed_permanently_total,
            "outbox_pending": self.outbox_pending,
        }


def _command_body(is_ack: bool, payload: bytes) -> dict[str, Any]:
    body = json.loads(payload)
    if not isinstance(body, dict):
        raise ValueError("the payload must be a JSON object")
    if is_ack and (not isinstance(body.get("id"), str) or not isinstance(body.get("by"), str) or not body["by"]):
        raise ValueError("an ack needs 'id' and 'by' (strings)")
    return body


async def _send(notifier: Notifier | None, receiver: str, payload: dict[str, Any], target: str) -> None:
    if notifier is None:
        # Removed from the config while notifications were queued: reported, not retried.
        raise NotifyFailed(f"receiver {receiver!r} is not configured", permanent=True)
    await notifier.send(payload, target)


def _due(db: sqlite3.Connection, now: int) -> tuple[list[tuple[int, str, str, str, int]], int | None]:
    rows = db.execute(
        "SELECT id, receiver, target, payload, attempts FROM outbox WHERE next_attempt_ms <= ? ORDER BY id LIMIT 50",
        (now,),
    ).fetchall()
    next_due = db.execute("SELECT MIN(next_attempt_ms) FROM outbox").fetchone()[0]
    return rows, next_due


def _history_insert(db: sqlite3.Connection, entries: list[HistoryEntry]) -> None:
    db.executemany(
        "INSERT INTO history (ts_ms, alert_id, event, detail) VALUES (?, ?, ?, ?)",
        [(e.ts_ms, e.alert_id, e.event, json.dumps(e.detail, default=str)) for e in entries],
    )


def _finish(db: sqlite3.Connection, row_id: int, entries: list[HistoryEntry]) -> None:
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
        _history_insert(db, entries)


def _retry_later(
    db: sqlite3.Connection, row_id: int, when: tuple[int, int], error: str, entries: list[HistoryEntry]
) -> None:
    attempts, next_ms = when
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "UPDATE outbox SET attempts = ?, next_attempt_ms = ?, last_error = ? WHERE id = ?",
            (attempts, next_ms, error, row_id),
        )
        _history_insert(db, entries)
