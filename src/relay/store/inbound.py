"""What came back, in the SQLite store: the recipients a report can be about, and a report's
effects (status, attempt, event, suppression, a DSN to send on) in one transaction with its
own record in inbound_reports, matched or not."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..types import EventType, RecipientStatus
from .delivery import AttemptRecord, wipe_given_keys
from .suppressions import suppress_for_mail
from .thread import DbThread


@dataclass(frozen=True, kw_only=True)
class SentTo:
    """A recipient of relay's mail that a report may be about."""

    recipient_id: int
    message_id: str
    address: str
    status: str
    notify: tuple[str, ...] = ()
    source: str = ""  # the message's: smtp | api | dsn


@dataclass(frozen=True, kw_only=True)
class Effect:
    """What one report does to one recipient."""

    recipient_id: int
    message_id: str
    event: EventType  # email.bounced | email.delayed | email.complained
    event_data: dict[str, Any] = field(default_factory=dict)
    attempt: AttemptRecord | None = None  # a bounce: the remote's answer, as an attempt
    last_reply: str | None = None
    bounce_class: str | None = None
    suppress: str | None = None  # hard_bounce | complaint: a suppression of all mail
    address: str = ""
    dsn: bool = False  # tell the SMTP sender (its NOTIFY asked for failures)


@dataclass(frozen=True, kw_only=True)
class InboundRecord:
    received_at: float
    envelope_to: str
    mail_from: str
    type: str  # dsn | arf | mdn | unsubscribe | autoreply | unknown
    message_id: str | None
    recipient_id: int | None
    outcome: str  # bounced | delayed | complained | unsubscribed | recorded | unmatched
    summary: dict[str, Any] = field(default_factory=dict)


class InboundQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: DbThread

    async def sent_to(self, *, recipient_id: int | None = None,
                      message_id: str | None = None) -> list[SentTo]:
        """One recipient by id, or all of a message's."""
        def op(db: sqlite3.Connection) -> list[SentTo]:
            where, arg = ("id = ?", recipient_id) if recipient_id is not None \
                else ("message_id = ?", message_id)
            return [SentTo(recipient_id=r[0], message_id=r[1], address=r[2], status=r[3],
                           notify=tuple(n for n in r[4].split(",") if n), source=r[5])
                    for r in db.execute(
                        "SELECT r.id, r.message_id, r.address, r.status, r.notify, m.source"
                        " FROM recipients r JOIN messages m ON m.id = r.message_id"
                        f" WHERE r.{where} ORDER BY r.id", (arg,))]

        found: list[SentTo] = await self._reader.run(op)
        return found

    async def record_inbound(self, record: InboundRecord, effects: Sequence[Effect]) -> list[str]:
        """Apply a report's effects and keep its record, in one commit. A recipient bounced
        already, or already complained about, gets no second event. Returns the messages
        whose SMTP senders are now owed a DSN."""
        def op(db: sqlite3.Connection) -> list[str]:
            owed = []
            for e in effects:
                if _apply(db, e, record.received_at) and e.dsn:
                    owed.append(e.message_id)
            db.execute(
                "INSERT INTO inbound_reports (received_at, envelope_to, mail_from, type,"
                " message_id, recipient_id, outcome, summary) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (record.received_at, record.envelope_to, record.mail_from, record.type,
                 record.message_id, record.recipient_id, record.outcome,
                 json.dumps(record.summary)))
            return sorted(set(owed))

        owed: list[str] = await self._write(op)
        return owed

    async def inbound_reports(self, message_id: str) -> list[InboundRecord]:
        def op(db: sqlite3.Connection) -> list[InboundRecord]:
            return [InboundRecord(received_at=r[0], envelope_to=r[1], mail_from=r[2], type=r[3],
                                  message_id=r[4], recipient_id=r[5], outcome=r[6],
                                  summary=json.loads(r[7]))
                    for r in db.execute(
                        "SELECT received_at, envelope_to, mail_from, type, message_id,"
                        " recipient_id, outcome, summary FROM inbound_reports"
                        " WHERE message_id = ? ORDER BY id", (message_id,))]

        found: list[InboundRecord] = await self._reader.run(op)
        return found


_SOURCE = {EventType.BOUNCED: "bounce", EventType.COMPLAINED: "complaint"}


def _apply(db: sqlite3.Connection, e: Effect, now: float) -> bool:
    """One effect; False when it was had already (nothing written)."""
    if e.event == EventType.BOUNCED:
        changed = db.execute(
            "UPDATE recipients SET status = ?, updated_at = ?, leased_until = NULL,"
            " next_attempt_at = NULL, last_reply = coalesce(?, last_reply), bounce_class = ?,"
            " dsn_pending = CASE WHEN ? THEN 'failed' ELSE dsn_pending END"
            " WHERE id = ? AND status != ?",
            (RecipientStatus.BOUNCED.value, now, e.last_reply, e.bounce_class, e.dsn,
             e.recipient_id, RecipientStatus.BOUNCED.value)).rowcount
        if not changed:
            return False
        if (a := e.attempt) is not None:
            db.execute(
                "INSERT INTO attempts (recipient_id, message_id, started_at, duration, mx_host,"
                " ip, port, tls_version, tls_cipher, code, enhanced, text, outcome, signed)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (e.recipient_id, e.message_id, a.started_at, a.duration, a.mx_host, a.ip,
                 a.port, a.tls_version, a.tls_cipher, a.code, a.enhanced, a.text, a.outcome,
                 a.signed))
        wipe_given_keys(db, [e.message_id])
    elif e.event == EventType.COMPLAINED:
        had = db.execute("SELECT 1 FROM events WHERE recipient_id = ? AND type = ?",
                         (e.recipient_id, e.event.value)).fetchone()
        if had:
            return False
    if e.suppress:
        suppress_for_mail(db, e.address, e.suppress, f"{_SOURCE[e.event]}:{e.message_id}",
                          now, e.message_id)
    db.execute("INSERT INTO events (message_id, recipient_id, type, created_at, data)"
               " VALUES (?, ?, ?, ?, ?)",
               (e.message_id, e.recipient_id, e.event.value, now, json.dumps(e.event_data)))
    return True
