"""Row shapes shared by the SQLite queries: columns, row → value mappers, message inserts."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import orjson

from .. import compose
from ..types import (
    ApiKey,
    Attempt,
    Event,
    EventType,
    Message,
    Recipient,
    RecipientStatus,
    Stream,
    message_status,
)
from .base import MessageDetail, NewMessage
from .pgconn import QUEUE_CHANNEL, notify
from .thread import DbThread

MESSAGE_COLUMNS = (
    "id, created_at, mail_from, size, source, api_key_id, tags, metadata, stream, "
    "subject, header_from, dsn_ret, dsn_envid, smtputf8, keep_mail_from, sender_domain"
)
RECIPIENT_COLUMNS = (
    "id, message_id, address, domain, status, attempts, next_attempt_at, last_reply, "
    "notify, orcpt, updated_at"
)


def _first_status(m: NewMessage, suppressed_for: str | None) -> str:
    if suppressed_for:
        return RecipientStatus.SUPPRESSED.value
    return (RecipientStatus.SCHEDULED if m.scheduled_at else RecipientStatus.QUEUED).value


def _json(value: Any) -> str:
    """orjson where it can (about 15x faster), json where it cannot (integers past 64 bits)."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value)


def insert_messages(db: sqlite3.Connection, batch: list[NewMessage],
                    suppressed: dict[str, dict[str, str]] | None = None) -> None:
    """Insert messages with their bodies, recipients and first events; a recipient in
    `suppressed` ({message id: {address: reason}}) is stored suppressed, with a dropped event."""
    suppressed = suppressed or {}
    db.executemany(
        "INSERT INTO messages (id, created_at, mail_from, size, source, api_key_id, tags, "
        "metadata, stream, subject, header_from, dsn_ret, dsn_envid, smtputf8, scheduled_at, "
        "sign_domains, sender_domain, track, keep_mail_from, pool, webhook_headers)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(m.id, m.created_at, m.mail_from, m.size or len(m.body), m.source, m.api_key_id,
          _json(m.tags), _json(m.metadata), m.stream.value, m.subject,
          m.header_from, m.dsn_ret, m.dsn_envid, int(m.smtputf8), m.scheduled_at,
          _json(m.sign_domains), m.sender_domain, m.track, int(m.keep_mail_from),
          m.pool or None, None if m.webhook_headers is None else _json(m.webhook_headers))
         for m in batch],
    )
    given = [m for m in batch if m.dkim is not None]
    if given:
        db.executemany(
            "INSERT INTO message_dkim (message_id, domain, selector, private_key)"
            " VALUES (?, ?, ?, ?)",
            [(m.id, k.domain, k.selector, k.private_key)
             for m in given if (k := m.dkim) is not None])
    db.executemany("INSERT INTO bodies (message_id, data, kind) VALUES (?, ?, ?)",
                   [(m.id, m.body, m.body_kind) for m in batch])
    # a part shared by many messages (or already stored for another) is written once
    parts = {part: data for m in batch for part, data in m.parts}
    if parts:
        db.executemany("INSERT INTO parts (id, data) VALUES (?, ?) ON CONFLICT DO NOTHING",
                       parts.items())
        db.executemany("INSERT INTO message_parts (message_id, part_id) VALUES (?, ?)",
                       [(m.id, part) for m in batch for part in dict(m.parts)])
    db.executemany(
        "INSERT INTO recipients (message_id, address, domain, status, next_attempt_at, notify, "
        "orcpt, updated_at, last_reply) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(m.id, r.address, r.domain, _first_status(m, why), None if why else
          (m.scheduled_at or m.created_at), ",".join(r.notify), r.orcpt, m.created_at,
          f"suppressed: {why}" if why else None)
         for m in batch for r in m.recipients
         for why in (suppressed.get(m.id, {}).get(r.address),)],
    )
    for i in range(0, len(batch), 500):  # stay under SQLite's limit on bound parameters
        ids = [m.id for m in batch[i:i + 500]]
        db.execute(
            "INSERT INTO events (message_id, recipient_id, type, created_at, data) "
            "SELECT message_id, id, CASE status WHEN 'scheduled' THEN ? WHEN 'suppressed' THEN ?"
            " ELSE ? END, updated_at, CASE status WHEN 'suppressed' THEN json_object('email',"
            " address, 'reason', substr(last_reply, 13), 'stage', 'submit')"
            " ELSE json_object('email', address) END FROM recipients "
            f"WHERE message_id IN ({','.join('?' * len(ids))}) ORDER BY id",
            (EventType.SCHEDULED.value, EventType.DROPPED.value, EventType.QUEUED.value, *ids),
        )
    keyed = [m for m in batch if m.idempotency_key is not None]
    if keyed:
        db.executemany(
            "INSERT INTO idempotency (scope, key, fingerprint, message_id, created_at, status,"
            " response) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(m.idempotency_scope, m.idempotency_key, m.idempotency_fingerprint, m.id,
              m.created_at, m.idempotency_status, m.idempotency_response) for m in keyed],
        )
    notify(db, QUEUE_CHANNEL)  # idle nodes look at the queue when this commits


def with_parts(db: sqlite3.Connection, body: bytes, kind: str) -> bytes:
    """A stored body as readers take it: a composition's parts put back in, so nothing
    above the store needs to know that large attachments are stored once, apart."""
    refs = compose.part_refs(body) if kind == "composition" else []
    if not refs:
        return body
    parts = {r[0]: bytes(r[1]) for r in db.execute(
        f"SELECT id, data FROM parts WHERE id IN ({','.join('?' * len(refs))})", refs)}
    return compose.inline_parts(body, parts)


ATTEMPT_FIELDS = (
    "id", "recipient_id", "message_id", "started_at", "duration", "mx_host", "ip", "port",
    "tls_version", "tls_cipher", "code", "enhanced", "text", "outcome", "signed", "source_ip",
    "tls_policy", "tls_failure",
)


def message_row(row: Any, recipients: tuple[Recipient, ...]) -> Message:
    return Message(
        id=row[0], created_at=row[1], mail_from=row[2], size=row[3], source=row[4],
        api_key_id=row[5], tags=tuple(json.loads(row[6])), metadata=json.loads(row[7]),
        stream=Stream(row[8]), subject=row[9], header_from=row[10], dsn_ret=row[11],
        dsn_envid=row[12], smtputf8=bool(row[13]),
        return_path="none" if not row[2] else "kept" if row[14] else "verp",
        status=message_status([r.status for r in recipients]), sender_domain=row[15],
    )


def recipient_row(row: Any) -> Recipient:
    return Recipient(
        id=row[0], message_id=row[1], address=row[2], domain=row[3],
        status=RecipientStatus(row[4]), attempts=row[5], next_attempt_at=row[6],
        last_reply=row[7], notify=tuple(n for n in row[8].split(",") if n), orcpt=row[9],
        updated_at=row[10],
    )


def event_row(row: Any) -> Event:
    return Event(id=row[0], message_id=row[1], recipient_id=row[2], type=row[3],
                 created_at=row[4], data=json.loads(row[5]))


def api_key_row(row: Any) -> ApiKey:
    return ApiKey(id=row[0], name=row[1], scopes=tuple(json.loads(row[2])),
                  domains=tuple(json.loads(row[3])), created_at=row[4], revoked_at=row[5],
                  last_used_at=row[6])



async def load_detail(conn: DbThread, message_id: str, *,
                      with_body: bool = False) -> MessageDetail | None:
    detail: MessageDetail | None = await conn.run(load_detail_sync, message_id, with_body)
    return detail


def load_detail_sync(db: sqlite3.Connection, message_id: str,
                     with_body: bool = False) -> MessageDetail | None:
    """A message with its recipients, attempts and events (and its bytes when asked)."""
    row = db.execute(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = ?",
                     (message_id,)).fetchone()
    if row is None:
        return None
    recipients = tuple(recipient_row(r) for r in db.execute(
        f"SELECT {RECIPIENT_COLUMNS} FROM recipients WHERE message_id = ? ORDER BY id",
        (message_id,)))
    attempts = tuple(Attempt(**dict(zip(ATTEMPT_FIELDS, r))) for r in db.execute(
        f"SELECT {', '.join(ATTEMPT_FIELDS)} FROM attempts WHERE message_id = ? ORDER BY id",
        (message_id,)))
    events = tuple(event_row(r) for r in db.execute(
        "SELECT id, message_id, recipient_id, type, created_at, data "
        "FROM events WHERE message_id = ? ORDER BY id", (message_id,)))
    body = None
    if with_body:
        found = db.execute("SELECT data, kind FROM bodies WHERE message_id = ?",
                           (message_id,)).fetchone()
        body = with_parts(db, bytes(found[0]), found[1]) if found else None
    pruned = db.execute("SELECT body_pruned_at FROM messages WHERE id = ?",
                        (message_id,)).fetchone()[0]
    return MessageDetail(message=message_row(row, recipients), recipients=recipients,
                         attempts=attempts, events=events, body=body, body_pruned_at=pruned)
