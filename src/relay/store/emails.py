"""Message queries the dialect APIs need beside the native ones: pages by offset over a set
of statuses, the messages resent from one, and a message's tracking options."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable

from .. import owners
from ..owners import Within
from ..types import Recipient
from .base import MessageDetail, MessagePage
from .rows import MESSAGE_COLUMNS, message_row
from .thread import DbThread


class EmailQueries:
    """Mixed into SQLiteStore."""

    _reader: DbThread
    _recipients: Callable[[list[str]], Awaitable[dict[str, tuple[Recipient, ...]]]]

    async def page_by_offset(self, *, statuses: tuple[str, ...] = (), limit: int = 50,
                             offset: int = 0, within: Within = None) -> MessagePage:
        """Newest first, `offset` messages skipped; with `statuses`, only messages with a
        recipient in one of them; with `within`, only a caller's. next_cursor is set (to
        the last id) when more follow."""
        clause, args = owners.message_sql(within)
        sql = f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE {clause}"
        if statuses:
            sql += (" AND id IN (SELECT message_id FROM recipients WHERE status IN"
                    f" ({','.join('?' * len(statuses))}))")
            args += statuses
        sql += " ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?"
        async with self._reader.execute(sql, (*args, limit + 1, offset)) as cur:
            rows = list(await cur.fetchall())
        more = len(rows) > limit
        rows = rows[:limit]
        recipients = await self._recipients([r[0] for r in rows])
        items = tuple(MessageDetail(message=message_row(r, recipients.get(r[0], ())),
                                    recipients=recipients.get(r[0], ())) for r in rows)
        return MessagePage(items=items, next_cursor=rows[-1][0] if more and rows else None)

    async def sender_domain_of(self, message_id: str) -> str | None:
        """A message's sender domain (its owner), or None when there is no such message."""
        def op(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT sender_domain FROM messages WHERE id = ?",
                             (message_id,)).fetchone()
            return str(row[0]) if row else None

        found: str | None = await self._reader.run(op)
        return found

    async def resends_of(self, message_id: str) -> list[str]:
        def op(db: sqlite3.Connection) -> list[str]:
            return [r[0] for r in db.execute(
                "SELECT id FROM messages WHERE json_extract(metadata, '$.resend_of') = ?"
                " ORDER BY created_at, id", (message_id,))]

        found: list[str] = await self._reader.run(op)
        return found

    async def tracking_of(self, message_id: str) -> tuple[bool, bool]:
        """(opens, clicks): what the message asked to track."""
        def op(db: sqlite3.Connection) -> str:
            row = db.execute("SELECT track FROM messages WHERE id = ?", (message_id,)).fetchone()
            return str(row[0]) if row else ""

        track: str = await self._reader.run(op)
        kinds = set(track.split(","))
        return "opens" in kinds, "clicks" in kinds
