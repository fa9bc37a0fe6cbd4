"""An SQLite file used from asyncio: one connection, confined to one worker thread.

Every call runs on that thread, in order, so the event loop never blocks on disk and
the connection never crosses threads. WAL journal; ``synchronous=FULL`` by default,
because what these files hold (outbox, points) must survive a power cut once
committed.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

__all__ = ["SqliteFile"]

T = TypeVar("T")


class SqliteFile:
    def __init__(self, path: Path, schema: str, *, name: str, synchronous: str = "FULL") -> None:
        self.path = path
        self._schema = schema
        self._synchronous = synchronous
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self.run(lambda _db: None)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` on the file's thread (opening the file on first use)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            db.executescript(self._schema)
            self._db = db
        return fn(self._db)

    async def close(self) -> None:
        def close(db: sqlite3.Connection) -> None:
            db.close()
            self._db = None

        if self._db is not None:
            await self.run(close)
        self._thread.shutdown(wait=True)
