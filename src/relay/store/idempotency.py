"""Idempotency keys in the SQLite store: the first answer to a key, kept for 24 hours and
written in the same transaction as the mail it queued."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import aiosqlite

from ..types import SubmitResult
from .base import NewMessage, Remembered
from .groupcommit import run_sync
from .rows import insert_messages

IDEMPOTENCY_WINDOW = 24 * 3600.0


class IdempotencyQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: aiosqlite.Connection

    async def recall(self, scope: str, key: str, now: float) -> Remembered | None:
        found: Remembered | None = await run_sync(self._reader, _recall, scope, key, now)
        return found

    async def remember(self, record: Remembered) -> Remembered | None:
        """Store an answer that queued nothing; returns the one already there, if any."""
        def op(db: sqlite3.Connection) -> Remembered | None:
            existing = _recall(db, record.scope, record.key, record.created_at)
            if existing is None:
                _insert(db, record)
            return existing

        found: Remembered | None = await self._write(op)
        return found

    async def enqueue_all(self, messages: Sequence[NewMessage], record: Remembered | None
                          ) -> tuple[list[SubmitResult], Remembered | None]:
        """Many messages (a batch) in one transaction with the key's answer. If the key has an
        answer already, nothing is queued and that answer is returned instead."""
        def op(db: sqlite3.Connection) -> tuple[list[SubmitResult], Remembered | None]:
            if record is not None:
                existing = _recall(db, record.scope, record.key, record.created_at)
                if existing is not None:
                    return [], existing
                _insert(db, record)
            if messages:
                insert_messages(db, list(messages))
            return [SubmitResult(message_id=m.id,
                                 status="scheduled" if m.scheduled_at else "queued")
                    for m in messages], None

        done: tuple[list[SubmitResult], Remembered | None] = await self._write(op)
        return done


def _recall(db: sqlite3.Connection, scope: str, key: str, now: float) -> Remembered | None:
    row = db.execute(
        "SELECT fingerprint, status, response, message_id, created_at FROM idempotency"
        " WHERE scope = ? AND key = ? AND created_at > ?",
        (scope, key, now - IDEMPOTENCY_WINDOW)).fetchone()
    if row is None:
        return None
    return Remembered(scope=scope, key=key, fingerprint=row[0], status=row[1],
                      response=bytes(row[2]) if row[2] is not None else None,
                      message_id=row[3], created_at=row[4])


def _insert(db: sqlite3.Connection, r: Remembered) -> None:
    # a row past the window may still be there: it is replaced
    db.execute(
        "INSERT OR REPLACE INTO idempotency (scope, key, fingerprint, message_id, created_at,"
        " status, response) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (r.scope, r.key, r.fingerprint, r.message_id, r.created_at, r.status, r.response))
