"""Pruning old rows, one small batch per call: the SQL behind relay's [retention] pass.

Each call is one short transaction on the writer (or, for a dry run, one read), bounded by
`limit` rows looked at, so a submission waits behind at most one batch, never a whole prune.
Every batch walks an index by age (migration 15), so it is a range scan, not a table scan.
A message is pruned only once it is final: every recipient in a final status with no DSN
still to send, and no webhook delivery pending to an enabled endpoint. `failed` is not
final (it is parked for an operator), and neither is anything scheduled, queued, deferred
or held: those are kept however old they are.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..types import FINAL_STATUSES
from .thread import DbThread

Key = tuple[float, str]  # (created_at, id) of the last message a batch looked at
START: Key = (-1.0, "")

_FINAL = ", ".join(f"'{s.value}'" for s in sorted(FINAL_STATUSES))

# Messages created before the cutoff (a message cannot be final before it exists), oldest
# first from a cursor, each with what says whether it may go: when its last recipient
# changed, whether one is still busy (not final, or a DSN to send), and whether a webhook
# delivery of its events is still pending.
_SCAN = f"""
SELECT m.id, m.created_at,
    (SELECT max(r.updated_at) FROM recipients r WHERE r.message_id = m.id),
    EXISTS (SELECT 1 FROM recipients r WHERE r.message_id = m.id
            AND (r.status NOT IN ({_FINAL}) OR r.dsn_pending IS NOT NULL)),
    EXISTS (SELECT 1 FROM events e JOIN webhook_outbox o ON o.event_id = e.id
            JOIN webhook_endpoints w ON w.id = o.endpoint_id
            WHERE e.message_id = m.id AND o.delivered_at IS NULL
            AND o.next_attempt_at IS NOT NULL AND w.enabled <> 0)
FROM messages m
WHERE m.created_at < ? AND (m.created_at, m.id) > (?, ?) {{extra}}
ORDER BY m.created_at, m.id LIMIT ?
"""
MESSAGES_SCAN = _SCAN.format(extra="")
BODIES_SCAN = _SCAN.format(extra="AND m.body_pruned_at IS NULL")

_IDS = "SELECT value FROM json_each(?)"

# Tables pruned by age alone: (table, key, which rows are old enough given the cutoff, the
# order they go in) per kind. Each is a range scan of one of migration 15's indexes.
ROWS: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    "webhook_outbox": (
        ("webhook_outbox", "id", "delivered_at IS NOT NULL AND delivered_at < ?",
         "delivered_at"),
        # given up: no next attempt, never delivered (counted from its event's time)
        ("webhook_outbox", "id",
         "delivered_at IS NULL AND next_attempt_at IS NULL AND created_at < ?", "created_at"),
    ),
    # its primary key as a row value: rowid is SQLite's alone
    "idempotency": (("idempotency", "scope, key", "created_at < ?", "created_at"),),
    "contact_events": (("contact_events", "id", "created_at < ?", "created_at"),),
    # reports matched to a message go with it; these matched none
    "inbound_reports": (("inbound_reports", "id", "message_id IS NULL AND received_at < ?",
                         "received_at"),),
}


@dataclass(frozen=True, kw_only=True)
class Step:
    """What one batch did: rows pruned (or that would be), and where the next one starts
    (None: nothing is left to look at)."""

    count: int
    after: Key | None


class RetentionQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: DbThread

    async def prune_messages(self, *, before: float, after: Key = START, limit: int,
                             dry_run: bool = False) -> Step:
        """Delete whole messages final before `before`: recipients, attempts, events, their
        webhook deliveries, matched reports, body, parts no other message names."""
        step: Step = await self._prune(partial(_messages_batch, before=before, after=after,
                                               limit=limit, dry_run=dry_run), dry_run)
        return step

    async def prune_bodies(self, *, before: float, now: float, after: Key = START, limit: int,
                           dry_run: bool = False, unless_before: float | None = None) -> Step:
        """Drop the bodies of messages final before `before` (and a DKIM key given with
        one), marking when. A dry run leaves out messages final before `unless_before`:
        the messages step would have deleted them whole."""
        step: Step = await self._prune(partial(_bodies_batch, before=before, now=now,
                                               after=after, limit=limit, dry_run=dry_run,
                                               unless_before=unless_before), dry_run)
        return step

    async def prune_rows(self, kind: str, *, before: float, limit: int,
                         dry_run: bool = False) -> int:
        """One batch of a table pruned by age (ROWS); a dry run counts them all at once."""
        count: int = await self._prune(partial(_rows_batch, kind=kind, before=before,
                                               limit=limit, dry_run=dry_run), dry_run)
        return count

    async def body_pruned_at(self, message_id: str) -> float | None:
        """When retention dropped a message's body; None if it did not (or no message)."""
        def op(db: sqlite3.Connection) -> float | None:
            row = db.execute("SELECT body_pruned_at FROM messages WHERE id = ?",
                             (message_id,)).fetchone()
            return float(row[0]) if row and row[0] is not None else None

        found: float | None = await self._reader.run(op)
        return found

    async def _prune(self, op: Callable[[sqlite3.Connection], Any], dry_run: bool) -> Any:
        # a dry run only reads: on the reader, so it never takes the write lock
        return await (self._reader.run(op) if dry_run else self._write(op))


def _prunable(rows: list[Any], before: float) -> list[tuple[str, float]]:
    """(id, final time) of the scanned messages that are final, idle and old enough."""
    out = []
    for m_id, created_at, last_change, busy, webhooks_pending in rows:
        final_at = created_at if last_change is None else last_change
        if not busy and not webhooks_pending and final_at < before:
            out.append((m_id, final_at))
    return out


def _next(rows: list[Any], limit: int) -> Key | None:
    return (rows[-1][1], rows[-1][0]) if len(rows) == limit else None


def _messages_batch(db: sqlite3.Connection, *, before: float, after: Key, limit: int,
                    dry_run: bool) -> Step:
    rows = db.execute(MESSAGES_SCAN, (before, *after, limit)).fetchall()
    ids = [m_id for m_id, _ in _prunable(rows, before)]
    if ids and not dry_run:
        delete_messages(db, ids)
    return Step(count=len(ids), after=_next(rows, limit))


def delete_messages(db: sqlite3.Connection, ids: list[str]) -> None:
    """Everything of these messages. Events, attempts and reports name a message without a
    foreign key, so they go by hand; the rest cascades from the message row (parts by the
    trigger of migration 14)."""
    arg = (json.dumps(ids),)
    db.execute("DELETE FROM webhook_outbox WHERE event_id IN"
               f" (SELECT id FROM events WHERE message_id IN ({_IDS}))", arg)
    db.execute(f"DELETE FROM events WHERE message_id IN ({_IDS})", arg)
    db.execute(f"DELETE FROM attempts WHERE message_id IN ({_IDS})", arg)
    db.execute(f"DELETE FROM inbound_reports WHERE message_id IN ({_IDS})", arg)
    db.execute(f"DELETE FROM messages WHERE id IN ({_IDS})", arg)


def _bodies_batch(db: sqlite3.Connection, *, before: float, now: float, after: Key,
                  limit: int, dry_run: bool, unless_before: float | None) -> Step:
    rows = db.execute(BODIES_SCAN, (before, *after, limit)).fetchall()
    found = _prunable(rows, before)
    if dry_run:
        skip = unless_before if unless_before is not None else float("-inf")
        return Step(count=sum(1 for _, final_at in found if final_at >= skip),
                    after=_next(rows, limit))
    ids = [m_id for m_id, _ in found]
    if ids:
        arg = (json.dumps(ids),)
        db.execute(f"UPDATE messages SET body_pruned_at = ? WHERE id IN ({_IDS})", (now, *arg))
        db.execute(f"DELETE FROM bodies WHERE message_id IN ({_IDS})", arg)
        db.execute(f"DELETE FROM message_parts WHERE message_id IN ({_IDS})", arg)
        # a key given with the message signed it and is needed no more: wiped with the body
        db.execute(f"DELETE FROM message_dkim WHERE message_id IN ({_IDS})", arg)
    return Step(count=len(ids), after=_next(rows, limit))


def _rows_batch(db: sqlite3.Connection, *, kind: str, before: float, limit: int,
                dry_run: bool) -> int:
    total = 0
    for table, key, where, order in ROWS[kind]:
        if dry_run:
            total += db.execute(f"SELECT count(*) FROM {table} WHERE {where}",
                                (before,)).fetchone()[0]
            continue
        total += db.execute(f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table}"
                            f" WHERE {where} ORDER BY {order} LIMIT ?)",
                            (before, limit - total)).rowcount
        if total >= limit:
            break
    return total
