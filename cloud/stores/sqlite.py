"""The embedded single-node store: points in an SQLite (WAL) file, read back by ``fieldlink-cloud query``.

Points are keyed like InfluxDB's (series + timestamp), so writing a record twice
rewrites the same rows. The record's sequence number is kept next to each point,
which lets the demo and the tests count records by (gateway, device, seq).
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cloud.stores.base import StoreRejected, StoreUnavailable
from cloud.stores.registry import register_store
from fieldlink.configkit import Schema
from fieldlink.sqlite_file import SqliteFile
from fieldlink.wire import Quality, Record, ScannedRecord, as_record

__all__ = ["Point", "SqliteStore", "SqliteStoreConfig", "query_points"]

_INT64_MAX = 2**63 - 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    site TEXT NOT NULL,
    gateway TEXT NOT NULL,
    device TEXT NOT NULL,
    metric TEXT NOT NULL,
    ts INTEGER NOT NULL,          -- ms since the Unix epoch
    value,                        -- SQLite keeps ints as ints and floats as floats
    type TEXT NOT NULL,
    unit TEXT,
    seq INTEGER NOT NULL,
    PRIMARY KEY (site, gateway, device, metric, ts)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS points_by_time ON points (ts);
"""


def _storable(value: object) -> object:
    # The wire allows uint64; SQLite integers are signed 64-bit. Larger values are kept as text.
    if isinstance(value, int) and not isinstance(value, bool) and value > _INT64_MAX:
        return str(value)
    return value


def _typed(value: object, kind: str) -> object:
    if kind == "bool":
        return bool(value)
    if kind == "int" and isinstance(value, str):
        return int(value)
    return value


def _finite(value: object) -> bool:
    # Like the InfluxDB path: NaN and infinity are not stored (SQLite would turn NaN into NULL).
    return not isinstance(value, float) or math.isfinite(value)


class SqliteStoreConfig(Schema):
    kind: Literal["sqlite"]
    path: Path = Path("points.db")  # relative paths are under cloud.state_dir


class SqliteStore:
    name = "sqlite"

    def __init__(self, config: SqliteStoreConfig, cloud_config: Any = None) -> None:
        state_dir = getattr(getattr(cloud_config, "cloud", None), "state_dir", Path("."))
        self.path = state_dir / config.path
        self._file = SqliteFile(self.path, _SCHEMA, name="sqlite-store")

    async def open(self) -> None:
        await self._file.open()

    async def write(self, records: Sequence[Record | ScannedRecord]) -> None:
        rows = [
            (r.site, r.gateway, r.device, name, r.ts, _storable(v.value), v.type.value, v.unit, r.seq)
            for r in map(as_record, records)
            for name, v in r.values.items()
            if v.quality is Quality.GOOD and v.value is not None and _finite(v.value)
        ]
        if rows:
            try:
                await self._file.run(lambda db: _write_rows(db, rows))
            except OverflowError as exc:  # a seq or ts beyond SQLite's 64-bit signed integers
                raise StoreRejected(f"sqlite store: {exc}") from None
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"sqlite store: {exc}") from None

    async def close(self) -> None:
        await self._file.close()


def _write_rows(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    with db:
        db.execute("BEGIN")
        db.executemany("INSERT OR REPLACE INTO points VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


@dataclass(frozen=True)
class Point:
    site: str
    gateway: str
    device: str
    metric: str
    ts: int
    value: Any
    type: str
    unit: str | None
    seq: int


def query_points(
    path: Path,
    *,
    device: str | None = None,
    metric: str | None = None,
    since_ms: int | None = None,
    limit: int | None = 20,
) -> list[Point]:
    """Most recent points first; opens the file read-only, so it works beside a running cloud."""
    clauses, args = [], []
    for column, value in (("device", device), ("metric", metric)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    if since_ms is not None:
        clauses.append("ts >= ?")
        args.append(since_ms)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    tail = "" if limit is None else f"LIMIT {int(limit)}"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            f"SELECT site, gateway, device, metric, ts, value, type, unit, seq FROM points {where} "
            f"ORDER BY ts DESC, device, metric {tail}",
            args,
        ).fetchall()
    finally:
        db.close()
    return [Point(*row[:5], _typed(row[5], row[6]), *row[6:]) for row in rows]


register_store("sqlite", SqliteStoreConfig, SqliteStore)
