"""Idempotency keys in the SQLite store: the first answer to a key, kept for 24 hours and
written in the same transaction as the mail it queued."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from ..types import SubmitResult
from .base import NewMessage, Remembered
from .rows import insert_messages
from .suppressions import listed, screened
from .thread import DbThread

IDEMPOTENCY_WINDOW = 24 * 3600.0


class IdempotencyQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: DbThread

    async def recall(self, scope: str, key: str, now: float) -> Remembered | None:
        found: Remembered | None = await self._reader.run(_recall, scope, key, now)
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

    async def enqueue_all(self, messages: Sequence[NewMessage],
                          claim: tuple[str, str, float] | None = None,
                          answer: Callable[[list[SubmitResult]], Remembered] | None = None,
                          ) -> tuple[list[SubmitResult], Remembered | None]:
        """Many messages (a batch) screened and queued in one transaction, with the answer
        `answer` makes of their results, kept for the idempotency key `claim` (scope, key,
        now). If that key has an answer already, nothing is queued and it comes back."""
        def op(db: sqlite3.Connection) -> tuple[list[SubmitResult], Remembered | None]:
            if claim is not None:
                existing = _recall(db, *claim)
                if existing is not None:
                    return [], existing
            suppressed: dict[str, dict[str, str]] = {}
            candidates = listed(db, messages)
            results, kept = [], []
            for m in messages:
                result, keep = screened(db, m, suppressed, candidates)
                results.append(result)
                if keep:
                    kept.append(m)
            if kept:
                insert_messages(db, kept, suppressed)
            if claim is not None and answer is not None:
                _insert(db, answer(results))
            return results, None

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
        "INSERT INTO idempotency (scope, key, fingerprint, message_id, created_at,"
        " status, response) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (scope, key) DO UPDATE"
        " SET fingerprint = excluded.fingerprint, message_id = excluded.message_id,"
        " created_at = excluded.created_at, status = excluded.status,"
        " response = excluded.response",
        (r.scope, r.key, r.fingerprint, r.message_id, r.created_at, r.status, r.response))
