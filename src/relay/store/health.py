"""What the master asks the store to know it is well: does it take a write, and how much
mail waits (for `/readyz`, systemd's watchdog and its STATUS= line)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from ..types import RecipientStatus
from .thread import SQLiteThread

# the statuses a sysadmin watches: mail that is not done yet
WAITING = tuple(s.value for s in RecipientStatus if not s.final)


class HealthQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: SQLiteThread

    async def probe_write(self) -> None:
        """A write transaction through the group-commit writer, changing nothing: it takes
        SQLite's write lock (BEGIN IMMEDIATE) and commits, so it fails as a submission
        would (locked by another process, read-only file system, disk gone). Raises
        StoreError."""
        await self._write(_touch)

    async def count_waiting(self) -> dict[str, int]:
        """Recipients per unfinished status, every one named (0 when none), counted on the
        reader through the status index (a write lock held for it would stall submissions)."""
        found: dict[str, int] = dict.fromkeys(WAITING, 0)
        rows: list[tuple[str, int]] = await self._reader.run(_count)
        found.update(rows)
        return found


def _touch(db: sqlite3.Connection) -> None:
    db.execute("SELECT 1").fetchall()


def _count(db: sqlite3.Connection) -> list[tuple[str, int]]:
    marks = ",".join("?" * len(WAITING))
    rows: list[tuple[str, int]] = db.execute(
        f"SELECT status, COUNT(*) FROM recipients WHERE status IN ({marks}) GROUP BY status",
        WAITING).fetchall()
    return rows
