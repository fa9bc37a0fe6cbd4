"""The durable notification outbox: an alert's notifications are on disk before the
telemetry that raised it is acknowledged, and leave the outbox only once delivered.

A notifier that fails (SMTP down, 4xx) is retried with exponential backoff, forever;
a permanent refusal (5xx) is retried too, at the slowest pace, and logged as an
error each time, because dropping an alert is worse than a late one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cloud.notify.base import Notifier, NotifyFailed
from fieldlink.sqlite_file import SqliteFile

__all__ = ["Outbox"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    notifier TEXT NOT NULL,
    payload TEXT NOT NULL,        -- what the notifier rendered, as JSON
    created_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_error TEXT
);
"""

MAX_BACKOFF_S = 300.0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Outbox:
    def __init__(self, path: Path, notifiers: Mapping[str, Notifier]) -> None:
        self.path = path
        self.notifiers = dict(notifiers)
        self._file = SqliteFile(path, _SCHEMA, name="outbox")
        self._wake = asyncio.Event()
        self.sent_total = 0
        self.failed_attempts_total = 0

    async def open(self) -> None:
        await self._file.open()

    async def close(self) -> None:
        await self._file.close()

    async def enqueue(self, items: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Store (notifier name, rendered payload) pairs durably; returns once committed."""
        if not items:
            return
        now = _now_ms()
        rows = [(name, json.dumps(payload), now, now) for name, payload in items]

        def insert(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN")
                db.executemany(
                    "INSERT INTO outbox (notifier, payload, created_ms, next_attempt_ms) VALUES (?, ?, ?, ?)", rows
                )

        await self._file.run(insert)
        self._wake.set()

    async def pending(self) -> int:
        return await self._file.run(lambda db: int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]))

    # --- the sender ----------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            self._wake.clear()
            now = _now_ms()
            rows, next_due = await self._file.run(lambda db, now=now: self._due(db, now))
            for row_id, notifier_name, payload, attempts in rows:
                await self._attempt(row_id, notifier_name, json.loads(payload), attempts)
            if rows:
                continue
            wait = 3600.0 if next_due is None else max(0.0, (next_due - _now_ms()) / 1000)
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass

    @staticmethod
    def _due(db: sqlite3.Connection, now: int) -> tuple[list[tuple[int, str, str, int]], int | None]:
        rows = db.execute(
            "SELECT id, notifier, payload, attempts FROM outbox WHERE next_attempt_ms <= ? ORDER BY id LIMIT 50",
            (now,),
        ).fetchall()
        next_due = db.execute("SELECT MIN(next_attempt_ms) FROM outbox").fetchone()[0]
        return rows, next_due

    async def _attempt(self, row_id: int, notifier_name: str, payload: dict[str, Any], attempts: int) -> None:
        notifier = self.notifiers.get(notifier_name)
        try:
            await self._send(notifier_name, notifier, payload)
        except NotifyFailed as exc:
            self.failed_attempts_total += 1
            attempts += 1
            delay = MAX_BACKOFF_S if exc.permanent else min(MAX_BACKOFF_S, 2.0 ** (attempts - 1))
            delay *= random.uniform(0.8, 1.0)
            log.log(
                logging.ERROR if exc.permanent else logging.WARNING,
                "notification not delivered; will retry",
                extra={
                    "notifier": notifier_name,
                    "attempt": attempts,
                    "retry_in_s": round(delay, 1),
                    "reason": str(exc),
                },
            )
            next_ms, error = _now_ms() + int(delay * 1000), str(exc)
            await self._file.run(
                lambda db: db.execute(
                    "UPDATE outbox SET attempts = ?, next_attempt_ms = ?, last_error = ? WHERE id = ?",
                    (attempts, next_ms, error, row_id),
                )
            )
            return
        await self._file.run(lambda db: db.execute("DELETE FROM outbox WHERE id = ?", (row_id,)))
        self.sent_total += 1
        log.info("notification sent", extra={"notifier": notifier_name, "subject": payload.get("subject")})

    @staticmethod
    async def _send(name: str, notifier: Notifier | None, payload: dict[str, Any]) -> None:
        if notifier is None:
            # Removed from the config while notifications were queued: keep them for when it returns.
            raise NotifyFailed(f"notifier {name!r} is not configured", permanent=True)
        await notifier.send(payload)
