"""What the master asks the store to know it is well: does it take a write (for `/readyz`
and systemd's watchdog)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from .thread import DbThread


class HealthQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: DbThread

    async def probe_write(self) -> None:
        """A write transaction through the group-commit writer, changing nothing: it takes
        SQLite's write lock (BEGIN IMMEDIATE) and commits, so it fails as a submission
        would (locked by another process, read-only file system, disk gone). Raises
        StoreError."""
        await self._write(_touch)


def _touch(db: sqlite3.Connection) -> None:
    db.execute("SELECT 1").fetchall()

