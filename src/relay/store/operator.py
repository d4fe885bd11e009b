"""The operator's view of the queue (`relay queue`, like Postfix's postqueue, postsuper and
qshape): recipients picked by message, destination domain, sender and age, acted on in one
statement each, and the queue's shape by destination and age.

Every selection is one SQL statement with a LIMIT. The not-yet-final recipients, which are
what an operator acts on (and qshape counts), are found through the `recipients_due (status,
...)` index, a message id's through `recipients_message`; a listing walks `messages_created`
newest first (an age is a range of it) and stops at its limit."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..types import EventType, RecipientStatus
from .delivery import wipe_given_keys
from .thread import DbThread

NOT_FINAL = ("queued", "deferred", "scheduled", "held", "failed")
MAX_SELECT = 100_000  # recipients one command acts on; run it again for more
FEW = 50_000  # `queue list --status`: fewer recipients than this are looked up by status

# qshape's columns: the upper bound of each age bucket in minutes (the last is open-ended)
AGE_BUCKETS: tuple[int, ...] = (5, 10, 20, 40, 80, 160, 320, 640, 1280)


@dataclass(frozen=True, kw_only=True)
class Selector:
    """Which recipients: all given conditions hold (an empty selector picks every one)."""

    message_id: str | None = None
    statuses: tuple[str, ...] = ()
    domain: str | None = None  # the recipient's domain
    sender: str | None = None  # an envelope sender address, or a domain: its addresses
    created_before: float | None = None  # queued before this time (older than)
    created_after: float | None = None  # queued at or after this time (newer than)

    def where(self) -> tuple[str, list[Any]]:
        """The SQL condition over `recipients r JOIN messages m`, and its arguments."""
        (m_where, m_args), (r_where, r_args) = self.message_where(), self.recipient_where()
        return f"{m_where} AND {r_where}", [*m_args, *r_args]

    def message_where(self) -> tuple[str, list[Any]]:
        """The conditions on the message (`messages m`)."""
        clauses: list[str] = []
        args: list[Any] = []
        if self.message_id is not None:
            clauses.append("m.id = ?")
            args.append(self.message_id)
        if self.sender is not None:
            if "@" in self.sender:
                clauses.append("m.mail_from = ?")
                args.append(self.sender)
            else:
                clauses.append("lower(substr(m.mail_from, instr(m.mail_from, '@') + 1)) = ?")
                args.append(self.sender.lower())
        if self.created_before is not None:
            clauses.append("m.created_at < ?")
            args.append(self.created_before)
        if self.created_after is not None:
            clauses.append("m.created_at >= ?")
            args.append(self.created_after)
        return (" AND ".join(clauses) or "1 = 1"), args

    def recipient_where(self) -> tuple[str, list[Any]]:
        """The conditions on the recipient (`recipients r`)."""
        clauses: list[str] = []
        args: list[Any] = []
        if self.statuses:
            clauses.append(f"r.status IN ({','.join('?' * len(self.statuses))})")
            args += self.statuses
        if self.domain is not None:
            clauses.append("r.domain = ?")
            args.append(self.domain.lower())
        return (" AND ".join(clauses) or "1 = 1"), args


@dataclass(frozen=True)
class Action:
    """What an operator does to the selected recipients: from which statuses, to which."""

    event: EventType
    to: RecipientStatus
    from_statuses: tuple[str, ...]
    due_now: bool = False  # make it due at once (release, retry)


ACTIONS: dict[str, Action] = {
    "hold": Action(EventType.HELD, RecipientStatus.HELD, NOT_FINAL[:3] + ("failed",)),
    "release": Action(EventType.RELEASED, RecipientStatus.QUEUED, ("held", "failed"),
                      due_now=True),
    "delete": Action(EventType.CANCELLED, RecipientStatus.CANCELLED, NOT_FINAL),
    "bounce": Action(EventType.BOUNCED, RecipientStatus.BOUNCED, NOT_FINAL),
}
BOUNCE_REPLY = "550 5.0.0 given up by the operator (relay queue bounce)"


@dataclass(frozen=True, kw_only=True)
class Acted:
    """What an action changed: how many recipients, of which messages."""

    count: int
    message_ids: tuple[str, ...]


class OperatorQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: DbThread

    async def select_messages(self, sel: Selector, limit: int) -> list[str]:
        """Ids of the messages with a selected recipient, newest first."""
        def op(db: sqlite3.Connection) -> list[str]:
            return [r[0] for r in db.execute(*list_query(db, sel, limit))]

        ids: list[str] = await self._reader.run(op)
        return ids

    async def act(self, sel: Selector, action: str, by: str, now: float,
                  limit: int = MAX_SELECT) -> Acted:
        """Apply one of ACTIONS to the selected recipients that are in its from-statuses, in
        one transaction, with an event for each. A bounce marks a failure report (a DSN) for
        the recipients whose NOTIFY asks for one; `emit_report` then makes it."""
        what = ACTIONS[action]
        where, args = sel.where()
        marks = ",".join("?" * len(what.from_statuses))
        bounce = what.to is RecipientStatus.BOUNCED

        def op(db: sqlite3.Connection) -> Acted:
            rows = db.execute(
                "UPDATE recipients SET status = ?, updated_at = ?, leased_until = NULL,"
                " next_attempt_at = coalesce(?, next_attempt_at),"
                " last_reply = coalesce(?, last_reply), bounce_class = coalesce(?, bounce_class),"
                " dsn_pending = CASE WHEN ? = 1 AND upper(notify) NOT LIKE '%NEVER%'"
                "  AND (notify = '' OR upper(notify) LIKE '%FAILURE%') THEN 'failed'"
                "  ELSE dsn_pending END"
                " WHERE id IN (SELECT r.id FROM recipients r JOIN messages m"
                f"  ON m.id = r.message_id WHERE r.status IN ({marks}) AND {where} LIMIT ?)"
                " RETURNING id, message_id, address",
                (what.to.value, now, now if what.due_now else None,
                 BOUNCE_REPLY if bounce else None, "soft" if bounce else None, int(bounce),
                 *what.from_statuses, *args, limit)).fetchall()
            extra = ({"class": "soft", "reason": "undefined", "status": "5.0.0",
                      "diagnostic": BOUNCE_REPLY} if bounce else {})
            db.executemany(
                "INSERT INTO events (message_id, recipient_id, type, created_at, data)"
                " VALUES (?, ?, ?, ?, ?)",
                [(r[1], r[0], what.event.value, now,
                  json.dumps({"email": r[2], "by": by, **extra})) for r in rows])
            ids = sorted({r[1] for r in rows})
            if what.to.final:
                wipe_given_keys(db, ids)
            return Acted(count=len(rows), message_ids=tuple(ids))

        acted: Acted = await self._write(op)
        return acted

    async def retry_selected(self, sel: Selector, now: float, limit: int = MAX_SELECT) -> int:
        """Make the selected queued or deferred recipients due now (postsuper -r, postqueue -i)."""
        where, args = sel.where()

        def op(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE recipients SET next_attempt_at = ? WHERE id IN (SELECT r.id FROM"
                " recipients r JOIN messages m ON m.id = r.message_id"
                f" WHERE r.status IN ('queued', 'deferred') AND {where} LIMIT ?)",
                (now, *args, limit)).rowcount

        count: int = await self._write(op)
        return count

    async def queue_shape(self, now: float, *, by: str = "domain",
                          statuses: Sequence[str] = NOT_FINAL) -> dict[str, list[int]]:
        """qshape: {destination (or sender) domain: [total, count per AGE_BUCKETS column,
        count older than the last]} over the not-yet-final recipients, by message age."""
        sql, args = shape_sql(now, by, statuses)

        def op(db: sqlite3.Connection) -> list[tuple[str, int, int]]:
            return db.execute(sql, args).fetchall()

        shape: dict[str, list[int]] = {}
        for name, bucket, count in await self._reader.run(op):
            row = shape.setdefault(name, [0] * (len(AGE_BUCKETS) + 2))
            row[0] += count
            row[bucket + 1] += count
        return shape

    async def move_key_paths(self, old_dir: str, new_dir: str) -> int:
        """After a restore into another data dir: the DKIM keys' files moved with it."""
        old_dir, new_dir = old_dir.rstrip("/") + "/", new_dir.rstrip("/") + "/"

        def op(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE dkim_keys SET path = ? || substr(path, ?) WHERE substr(path, 1, ?) = ?",
                (new_dir, len(old_dir) + 1, len(old_dir), old_dir)).rowcount

        count: int = await self._write(op)
        return count


def list_query(db: sqlite3.Connection, sel: Selector, limit: int
               ) -> tuple[str, tuple[Any, ...]]:
    """`queue list`'s query and its arguments. Most selections walk the messages newest
    first (list_sql) and stop at the limit; a status few recipients are in (held, failed,
    deferred in a queue of a million queued ones) would have that walk read every message,
    so those few are found through `recipients_due` (status first) and sorted."""
    (m_where, m_args), (r_where, r_args) = sel.message_where(), sel.recipient_where()
    if sel.statuses:
        (few,) = db.execute(
            "SELECT count(*) < ? FROM (SELECT 1 FROM recipients r WHERE r.status IN"
            f" ({','.join('?' * len(sel.statuses))}) LIMIT ?) s",
            (FEW, *sel.statuses, FEW)).fetchone()
        if few:
            # s CROSS JOIN m: SQLite keeps s the outer loop, as written
            sql = (f"SELECT m.id FROM (SELECT DISTINCT r.message_id FROM recipients r"
                   f" WHERE {r_where}) s CROSS JOIN messages m"
                   f" WHERE m.id = s.message_id AND {m_where}"
                   " ORDER BY m.created_at DESC, m.id DESC LIMIT ?")
            return sql, (*r_args, *m_args, limit)
    return list_sql(m_where, r_where), (*m_args, *r_args, limit)


def list_sql(m_where: str, r_where: str) -> str:
    """`queue list`'s message ids (m_where's and r_where's arguments, then the limit):
    newest first down `messages_created`, each message's recipients through
    `recipients_message`; it stops at the limit, and an age is a range of the index."""
    return (f"SELECT m.id FROM messages m WHERE {m_where} AND EXISTS (SELECT 1 FROM"
            f" recipients r WHERE r.message_id = m.id AND {r_where})"
            " ORDER BY m.created_at DESC, m.id DESC LIMIT ?")


def shape_sql(now: float, by: str, statuses: Sequence[str]) -> tuple[str, tuple[Any, ...]]:
    """qshape's counts by (domain, age bucket), and their arguments."""
    group = ("r.domain" if by == "domain" else
             "coalesce(nullif(lower(substr(m.mail_from, instr(m.mail_from, '@') + 1)),"
             " ''), '<>')")
    cases = " ".join(f"WHEN ? - m.created_at < {minutes * 60} THEN {i}"
                     for i, minutes in enumerate(AGE_BUCKETS))
    marks = ",".join("?" * len(statuses))
    sql = (f"SELECT {group}, CASE {cases} ELSE {len(AGE_BUCKETS)} END AS bucket, count(*)"
           " FROM recipients r JOIN messages m ON m.id = r.message_id"
           f" WHERE r.status IN ({marks}) GROUP BY 1, 2")
    return sql, (*[now] * len(AGE_BUCKETS), *statuses)
