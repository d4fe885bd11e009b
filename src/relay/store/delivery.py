"""The delivery side of the SQLite queue: leases, outcomes, reports and operator actions."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..frozen import quick_init
from ..types import EventType, RecipientStatus
from .base import MessageDetail, NewMessage
from .groupcommit import Batched
from .pgconn import is_postgresql, skip_locked
from .rows import insert_messages, load_detail_sync
from .suppressions import suppress_for_mail
from .thread import DbThread

log = logging.getLogger("relay.delivery")  # a line per operator change, as per outcome

PENDING = ("queued", "deferred", "scheduled")

# The recipients due now and not leased, soonest first (now, now, limit); and when the next
# unleased one falls due (how long an idle scheduler may sleep). Both walk the partial index
# recipients_pending (migration 21) in order and stop at once: a pick reads its LIMIT and
# the leases in flight, however long the queue. SQLite is told to (without ANALYZE's
# statistics it takes recipients_due, status first, and sorts), PostgreSQL finds it itself.
PICK_DUE = (
    "SELECT id FROM recipients{} WHERE status IN ('queued', 'deferred', 'scheduled')"
    " AND next_attempt_at <= ? AND (leased_until IS NULL OR leased_until < ?)"
    " ORDER BY next_attempt_at LIMIT ?")
NEXT_DUE = (
    "SELECT min(next_attempt_at) FROM recipients{}"
    " WHERE status IN ('queued', 'deferred', 'scheduled') AND leased_until IS NULL")


def on_pending(sql: str, db: Any) -> str:
    """PICK_DUE or NEXT_DUE for this connection's database."""
    return sql.format("" if is_postgresql(db) else " INDEXED BY recipients_pending")


@quick_init
@dataclass(frozen=True, kw_only=True)
class DueRecipient:
    """A leased recipient with what delivery needs of its message."""

    id: int
    message_id: str
    address: str
    domain: str
    attempts: int
    notify: tuple[str, ...]
    orcpt: str | None
    mail_from: str
    created_at: float
    smtputf8: bool
    dsn_ret: str | None
    dsn_envid: str | None
    stream: str = "transactional"
    sender_domain: str = ""
    track: str = ""
    keep_mail_from: bool = False  # the submitter's envelope sender goes out, not VERP
    pool: str = ""  # the source pool the submitter asked for ([[delivery.pools]])


@quick_init
@dataclass(frozen=True, kw_only=True)
class AttemptRecord:
    started_at: float
    duration: float
    mx_host: str | None
    ip: str | None
    port: int | None
    tls_version: str | None
    tls_cipher: str | None
    code: int | None
    enhanced: str | None
    text: str
    outcome: str
    signed: str | None = None
    source_ip: str | None = None
    tls_policy: str | None = None
    tls_failure: str | None = None


@quick_init
@dataclass(frozen=True, kw_only=True)
class Outcome:
    """What became of one leased recipient: its new status, the attempt and the event."""

    recipient_id: int
    message_id: str
    status: RecipientStatus
    at: float
    event: EventType
    event_data: dict[str, Any] = field(default_factory=dict)
    attempt: AttemptRecord | None = None
    next_attempt_at: float | None = None
    last_reply: str | None = None
    bounce_class: str | None = None
    dsn: str | None = None  # "failed" | "delayed" | "delivered": a report to send the sender


# Makes the report on a message for its marked recipients ({recipient id: action}); None = none.
MakeReport = Callable[[MessageDetail, dict[int, str]], NewMessage | None]


class DeliveryQueries:
    """Mixed into SQLiteStore: every query the scheduler and the operator need."""

    _write: Callable[..., Any]
    _reader: DbThread
    node: str

    async def recover(self) -> int:
        """At start-up, every lease this node left by a crash is void: on SQLite, where one
        node owns the file, every lease; on PostgreSQL, the leases taken under this node's
        name (another node's stand, and lapse when it dies)."""
        def op(db: sqlite3.Connection) -> int:
            mine, args = ("leased_by = ?", (self.node,)) if is_postgresql(db) else ("1 = 1", ())
            cur = db.execute(
                "UPDATE recipients SET leased_until = NULL, leased_by = NULL"
                f" WHERE leased_until IS NOT NULL AND {mine}", args)
            return cur.rowcount

        count: int = await self._write(op)
        return count

    async def lease_due(self, now: float, limit: int, lease_for: float) -> list[DueRecipient]:
        def op(db: sqlite3.Connection) -> list[DueRecipient]:
            ids = [r[0] for r in db.execute(
                "UPDATE recipients SET leased_until = ?, leased_by = ? WHERE id IN ("
                f"{on_pending(PICK_DUE, db)}{skip_locked(db)}) RETURNING id",
                (now + lease_for, self.node, now, now, limit),
            ).fetchall()]
            if not ids:
                return []
            rows = db.execute(
                "SELECT r.id, r.message_id, r.address, r.domain, r.attempts, r.notify, r.orcpt,"
                " m.mail_from, m.created_at, m.smtputf8, m.dsn_ret, m.dsn_envid, m.stream,"
                " m.sender_domain, m.track, m.keep_mail_from, m.pool"
                " FROM recipients r JOIN messages m ON m.id = r.message_id"
                f" WHERE r.id IN ({','.join('?' * len(ids))}) ORDER BY r.id", ids,
            ).fetchall()
            return [DueRecipient(
                id=r[0], message_id=r[1], address=r[2], domain=r[3], attempts=r[4],
                notify=tuple(n for n in r[5].split(",") if n), orcpt=r[6], mail_from=r[7],
                created_at=r[8], smtputf8=bool(r[9]), dsn_ret=r[10], dsn_envid=r[11],
                stream=r[12], sender_domain=r[13], track=r[14], keep_mail_from=bool(r[15]),
                pool=r[16] or "",
            ) for r in rows]

        due: list[DueRecipient] = await self._write(op, linger=True)  # the worker's own
        return due

    async def renew_leases(self, ids: Sequence[int], until: float) -> list[int]:
        """Extend this node's leases on these recipients, still pending, to `until`; returns
        the ids renewed (not those recorded, deleted or no longer leased here meanwhile)."""
        def op(db: sqlite3.Connection) -> list[int]:
            renewed: list[int] = []
            for i in range(0, len(ids), 500):
                chunk = list(ids[i:i + 500])
                renewed += [r[0] for r in db.execute(
                    "UPDATE recipients SET leased_until = ? WHERE leased_by = ?"
                    " AND leased_until IS NOT NULL AND status IN ('queued', 'deferred',"
                    f" 'scheduled') AND id IN ({','.join('?' * len(chunk))}) RETURNING id",
                    (until, self.node, *chunk)).fetchall()]
            return renewed

        renewed: list[int] = await self._write(op, linger=True)
        return renewed

    async def next_due_at(self) -> float | None:
        due: float | None = await self._reader.run(_next_due_at)
        return due

    async def record(self, outcomes: Sequence[Outcome]) -> None:
        """Store each outcome: status, lease released, attempt row and event, in one commit,
        which may wait a moment for others to share it (groupcommit.LINGER): the mail is
        out, nobody waits on this write, and the writers' lock is better left to new mail."""
        await asyncio.gather(*(self._write(Batched(_record_many, o), linger=True)
                               for o in outcomes))

    async def pending_reports(self) -> list[str]:
        ids: list[str] = await self._reader.run(_pending_reports)
        return ids

    async def emit_report(self, message_id: str, make: MakeReport) -> str | None:
        """Make the report for a message's marked recipients, queue it, clear the marks."""
        def op(db: sqlite3.Connection) -> str | None:
            detail = load_detail_sync(db, message_id, with_body=True)
            marks = {r[0]: r[1] for r in db.execute(
                "SELECT id, dsn_pending FROM recipients WHERE message_id = ?"
                " AND dsn_pending IS NOT NULL", (message_id,))}
            db.execute("UPDATE recipients SET dsn_pending = NULL WHERE message_id = ?"
                       " AND dsn_pending IS NOT NULL", (message_id,))
            if detail is None or not marks:
                return None
            report = make(detail, marks)
            if report is None:
                return None
            insert_messages(db, [report])
            return report.id

        made: str | None = await self._write(op)
        return made

    # -- operator actions ------------------------------------------------------------

    async def hold(self, message_id: str, by: str, now: float) -> int:
        return await self._change(message_id, ("queued", "deferred", "scheduled", "failed"),
                                  RecipientStatus.HELD, EventType.HELD, by, now)

    async def release(self, message_id: str, by: str, now: float) -> int:
        return await self._change(message_id, ("held", "failed"), RecipientStatus.QUEUED,
                                  EventType.RELEASED, by, now, due=now)

    async def cancel(self, message_id: str, by: str, now: float,
                     only: tuple[str, ...] = ("queued", "deferred", "scheduled", "held",
                                              "failed")) -> int:
        return await self._change(message_id, only, RecipientStatus.CANCELLED,
                                  EventType.CANCELLED, by, now)

    async def retry_now(self, message_id: str | None, now: float) -> int:
        """Make deferred (or all pending) recipients due now; returns how many."""
        def op(db: sqlite3.Connection) -> int:
            where = "status IN ('queued', 'deferred')"
            args: tuple[Any, ...] = (now,)
            if message_id is not None:
                where += " AND message_id = ?"
                args += (message_id,)
            cur = db.execute(f"UPDATE recipients SET next_attempt_at = ? WHERE {where}", args)
            return cur.rowcount

        count: int = await self._write(op)
        return count

    async def _change(self, message_id: str, from_statuses: tuple[str, ...],
                      to: RecipientStatus, event: EventType, by: str, now: float,
                      due: float | None = None) -> int:
        def op(db: sqlite3.Connection) -> list[tuple[int, str]]:
            marks = ",".join("?" * len(from_statuses))
            rows = db.execute(
                f"UPDATE recipients SET status = ?, updated_at = ?,"
                f" next_attempt_at = coalesce(?, next_attempt_at), leased_until = NULL"
                f" WHERE message_id = ? AND status IN ({marks}) RETURNING id, address",
                (to.value, now, due, message_id, *from_statuses),
            ).fetchall()
            db.executemany(
                "INSERT INTO events (message_id, recipient_id, type, created_at, data)"
                " VALUES (?, ?, ?, ?, ?)",
                [(message_id, r[0], event.value, now, json.dumps({"email": r[1], "by": by}))
                 for r in rows],
            )
            if to.final:
                wipe_given_keys(db, [message_id])
            return [(r[0], r[1]) for r in rows]

        changed: list[tuple[int, str]] = await self._write(op)
        for _, address in changed:  # after the commit: an operator's change, a line each
            log.info("%s: to=<%s>, status=%s (by %s)", message_id, address, to.value, by,
                     extra={"queue_id": message_id, "to": address, "status": to.value,
                            "by": by})
        return len(changed)


def _next_due_at(db: sqlite3.Connection) -> float | None:
    rows = db.execute(on_pending(NEXT_DUE, db)).fetchall()
    return rows[0][0] if rows else None


def _pending_reports(db: sqlite3.Connection) -> list[str]:
    return [r[0] for r in db.execute(
        "SELECT DISTINCT message_id FROM recipients WHERE dsn_pending IS NOT NULL")]


def _record_many(db: sqlite3.Connection, outcomes: Sequence[Outcome]) -> list[None]:
    db.executemany(
        "UPDATE recipients SET status = ?, leased_until = NULL, updated_at = ?,"
        " next_attempt_at = ?, attempts = attempts + ?, last_reply = coalesce(?, last_reply),"
        " bounce_class = coalesce(?, bounce_class), dsn_pending = coalesce(?, dsn_pending)"
        " WHERE id = ?",
        [(o.status.value, o.at, o.next_attempt_at, 1 if o.attempt else 0, o.last_reply,
          o.bounce_class, o.dsn, o.recipient_id) for o in outcomes],
    )
    attempts = [(o.recipient_id, o.message_id, a.started_at, a.duration, a.mx_host, a.ip,
                 a.port, a.tls_version, a.tls_cipher, a.code, a.enhanced, a.text, a.outcome,
                 a.signed, a.source_ip, a.tls_policy, a.tls_failure)
                for o in outcomes if (a := o.attempt) is not None]
    if attempts:
        db.executemany(
            "INSERT INTO attempts (recipient_id, message_id, started_at, duration, mx_host, ip,"
            " port, tls_version, tls_cipher, code, enhanced, text, outcome, signed, source_ip,"
            " tls_policy, tls_failure) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            attempts)
    db.executemany(
        "INSERT INTO events (message_id, recipient_id, type, created_at, data)"
        " VALUES (?, ?, ?, ?, ?)",
        [(o.message_id, o.recipient_id, o.event.value, o.at, json.dumps(o.event_data))
         for o in outcomes],
    )
    for o in outcomes:
        if o.status == RecipientStatus.BOUNCED and o.bounce_class == "hard":
            # the address is bad for good: no more mail to it, as when a hard bounce comes
            # back later (inbound)
            (address,) = db.execute("SELECT address FROM recipients WHERE id = ?",
                                    (o.recipient_id,)).fetchone()
            suppress_for_mail(db, address, "hard_bounce", f"bounce:{o.message_id}", o.at,
                              o.message_id)
    wipe_given_keys(db, sorted({o.message_id for o in outcomes if o.status.final}))
    return [None] * len(outcomes)


def wipe_given_keys(db: sqlite3.Connection, message_ids: Sequence[str]) -> None:
    """A key given with a message goes as soon as no recipient of it is pending."""
    for i in range(0, len(message_ids), 500):
        ids = message_ids[i:i + 500]
        db.execute(
            f"DELETE FROM message_dkim WHERE message_id IN ({','.join('?' * len(ids))})"
            " AND NOT EXISTS (SELECT 1 FROM recipients r WHERE r.message_id ="
            " message_dkim.message_id AND r.status NOT IN"
            " ('delivered', 'bounced', 'expired', 'suppressed', 'cancelled'))", ids)
