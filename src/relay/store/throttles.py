"""Failed SMTP logins counted in the store, so a client blocked on one node is blocked on
every node sharing the queue (smtp/handler.py uses these on PostgreSQL)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from .thread import DbThread

FORGET_AFTER = 86400.0  # a client's count is dropped a day after its last failure


class ThrottleQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: DbThread

    async def auth_failures(self, scope: str, client: str, since: float) -> int:
        """Failed logins of `client` on `scope`, if the last was after `since`; else 0."""
        row = await self._reader.run(_count, scope, client, since)
        return int(row)

    async def auth_failed(self, scope: str, client: str, now: float, since: float) -> int:
        """One more failed login; returns the count (started again when the last failure
        was before `since`)."""
        def op(db: sqlite3.Connection) -> int:
            db.execute("DELETE FROM auth_failures WHERE last_at < ?", (now - FORGET_AFTER,))
            return int(db.execute(
                "INSERT INTO auth_failures (scope, client, failures, last_at)"
                " VALUES (?, ?, 1, ?) ON CONFLICT (scope, client) DO UPDATE SET"
                " failures = CASE WHEN auth_failures.last_at >= ?"
                " THEN auth_failures.failures + 1 ELSE 1 END, last_at = excluded.last_at"
                " RETURNING failures", (scope, client, now, since)).fetchone()[0])

        count: int = await self._write(op)
        return count

    async def auth_cleared(self, scope: str, client: str) -> None:
        await self._write(lambda db: db.execute(
            "DELETE FROM auth_failures WHERE scope = ? AND client = ?", (scope, client)))


def _count(db: sqlite3.Connection, scope: str, client: str, since: float) -> int:
    row = db.execute("SELECT failures FROM auth_failures WHERE scope = ? AND client = ?"
                     " AND last_at >= ?", (scope, client, since)).fetchone()
    return int(row[0]) if row else 0
