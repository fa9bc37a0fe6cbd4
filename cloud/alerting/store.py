"""The alerting state on disk (``<state_dir>/alerts.db``): alerts, per-series rule state,
notification groups, silences, the outbox and the history, in one SQLite file.

One file on purpose: a step's alert changes, the notifications they cause and the
rule state that says which records were evaluated are committed in one transaction,
before the telemetry that caused them is acknowledged. A crash before the commit
redoes the step from the redelivered messages; after it, nothing is redone.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cloud.alerting.dispatch import Notification
from cloud.alerting.engine import Changes
from cloud.alerting.model import Alert, HistoryEntry

__all__ = ["SCHEMA", "Loaded", "Step", "commit", "history", "list_alerts", "load"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (key TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS groups (key TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS silences (id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms INTEGER NOT NULL,
    alert_id TEXT NOT NULL,
    event TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_alert ON history (alert_id, id);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,              -- idempotency key of the transition, per receiver
    receiver TEXT NOT NULL,
    target TEXT NOT NULL,           -- one row per receiver target (an SMS number, ...)
    payload TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    last_error TEXT,
    UNIQUE (key, target)
);
"""


@dataclass
class Loaded:
    alerts: list[Alert]
    series: dict[str, dict[str, Any]]
    groups: list[dict[str, Any]]
    meta: dict[str, Any]
    silences: list[dict[str, Any]]


@dataclass
class Step:
    """Everything one evaluation step writes, in one transaction."""

    changes: Changes = field(default_factory=Changes)
    forgotten: list[str] = field(default_factory=list)  # resolved alerts dropped from the list
    groups: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    meta: dict[str, Any] | None = None
    silences_added: list[dict[str, Any]] = field(default_factory=list)
    silences_removed: list[str] = field(default_factory=list)
    outbox: list[tuple[Notification, str]] = field(default_factory=list)  # (notification, target)
    history: list[HistoryEntry] = field(default_factory=list)
    history_before_ms: int | None = None  # prune history older than this

    def empty(self) -> bool:
        return not (
            self.changes
            or self.forgotten
            or self.groups
            or self.meta is not None
            or self.silences_added
            or self.silences_removed
            or self.outbox
            or self.history
        )


def load(db: sqlite3.Connection) -> Loaded:
    return Loaded(
        alerts=[Alert.from_json(json.loads(b)) for (b,) in db.execute("SELECT body FROM alerts")],
        series={k: json.loads(b) for k, b in db.execute("SELECT key, body FROM series")},
        groups=[json.loads(b) for (b,) in db.execute("SELECT body FROM groups")],
        meta={k: json.loads(b) for k, b in db.execute("SELECT key, body FROM meta")}.get("dispatch", {}),
        silences=[json.loads(b) for (b,) in db.execute("SELECT body FROM silences")],
    )


def _history_rows(entries: Iterable[HistoryEntry]) -> list[tuple[int, str, str, str]]:
    return [(e.ts_ms, e.alert_id, e.event, json.dumps(e.detail, default=str)) for e in entries]


def commit(db: sqlite3.Connection, step: Step, now_ms: int) -> int:
    """Write a step; returns how many outbox rows were new (an idempotency key seen before adds none)."""
    changes = step.changes
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT OR REPLACE INTO alerts (id, body) VALUES (?, ?)",
            [(a.id, json.dumps(a.to_json())) for a in changes.alerts.values() if a.id not in step.forgotten],
        )
        db.executemany("DELETE FROM alerts WHERE id = ?", [(i,) for i in step.forgotten])
        db.executemany(
            "INSERT OR REPLACE INTO series (key, body) VALUES (?, ?)",
            [(k, json.dumps(v)) for k, v in changes.series.items()],
        )
        db.executemany("DELETE FROM groups WHERE key = ?", [(k,) for k, v in step.groups.items() if v is None])
        db.executemany(
            "INSERT OR REPLACE INTO groups (key, body) VALUES (?, ?)",
            [(k, json.dumps(v)) for k, v in step.groups.items() if v is not None],
        )
        if step.meta is not None:
            db.execute("INSERT OR REPLACE INTO meta (key, body) VALUES ('dispatch', ?)", (json.dumps(step.meta),))
        db.executemany(
            "INSERT OR REPLACE INTO silences (id, body) VALUES (?, ?)",
            [(s["id"], json.dumps(s)) for s in step.silences_added],
        )
        db.executemany("DELETE FROM silences WHERE id = ?", [(i,) for i in step.silences_removed])
        db.executemany(
            "INSERT INTO history (ts_ms, alert_id, event, detail) VALUES (?, ?, ?, ?)",
            _history_rows([*changes.history, *step.history]),
        )
        before = db.total_changes
        db.executemany(
            "INSERT OR IGNORE INTO outbox (key, receiver, target, payload, created_ms, next_attempt_ms)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                (n.payload["key"], n.receiver, target, json.dumps(n.payload), now_ms, now_ms)
                for n, target in step.outbox
            ],
        )
        added = db.total_changes - before
        if step.history_before_ms is not None:
            db.execute("DELETE FROM history WHERE ts_ms < ?", (step.history_before_ms,))
    return added


def history(db: sqlite3.Connection, alert_id: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    where, args = ("WHERE alert_id = ? OR alert_id LIKE ?", (alert_id, f"{alert_id}@%")) if alert_id else ("", ())
    rows = db.execute(
        f"SELECT ts_ms, alert_id, event, detail FROM (SELECT * FROM history {where} ORDER BY id DESC LIMIT ?)"
        " ORDER BY id",
        (*args, limit),
    ).fetchall()
    return [{"ts_ms": t, "alert_id": a, "event": e, **json.loads(d)} for t, a, e, d in rows]


def list_alerts(db: sqlite3.Connection) -> list[Alert]:
    return [Alert.from_json(json.loads(b)) for (b,) in db.execute("SELECT body FROM alerts ORDER BY id")]
