"""Events recorded for a recipient after delivery (opens, clicks), in the SQLite store."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

from ..types import EventType
from .thread import DbThread


class EventQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: DbThread

    async def delivered_at(self, recipient_id: int) -> float | None:
        def op(db: sqlite3.Connection) -> float | None:
            row = db.execute("SELECT max(created_at) FROM events WHERE recipient_id = ?"
                             " AND type = ?", (recipient_id, EventType.DELIVERED.value)).fetchone()
            return row[0] if row else None

        found: float | None = await self._reader.run(op)
        return found

    async def add_recipient_event(self, recipient_id: int, event: str, now: float,
                                  data: dict[str, Any]) -> bool:
        """An engagement event (opened, clicked) for a recipient; False if it is unknown."""
        def op(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT message_id, address FROM recipients WHERE id = ?",
                             (recipient_id,)).fetchone()
            if row is None:
                return False
            db.execute("INSERT INTO events (message_id, recipient_id, type, created_at, data)"
                       " VALUES (?, ?, ?, ?, ?)",
                       (row[0], recipient_id, event, now, json.dumps({"email": row[1], **data})))
            return True

        done: bool = await self._write(op)
        return done
