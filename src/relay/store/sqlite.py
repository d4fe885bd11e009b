"""The queue and every table: in one SQLite file (WAL, each commit synced before anyone is
told: walsync.py), or in a PostgreSQL database that many nodes share (store/pgconn.py) — the
same queries on either, via two DbThreads: the group-commit writer's connection and the
reader's."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import owners
from ..config.storeurl import is_postgresql, mask_url, sqlite_path
from ..errors import StoreError
from ..owners import Within
from ..types import ApiKey, GivenDkimKey, Recipient, SubmitResult
from . import schema_pg
from .base import MessageDetail, MessagePage, NewMessage, Outgoing
from .contacts import ContactQueries
from .counts import CountQueries
from .delivery import DeliveryQueries
from .domains import DomainQueries
from .emails import EmailQueries
from .events import EventQueries
from .groupcommit import Batched, GroupCommitWriter, WriteLock
from .health import HealthQueries
from .idempotency import IDEMPOTENCY_WINDOW, IdempotencyQueries
from .inbound import InboundQueries
from .mtasts import MtaStsQueries
from .operator import OperatorQueries
from .pgconn import QUEUE_CHANNEL, Listener, PgConnection
from .retention import RetentionQueries
from .rows import (
    MESSAGE_COLUMNS,
    RECIPIENT_COLUMNS,
    api_key_row,
    insert_messages,
    load_detail,
    message_row,
    recipient_row,
    with_parts,
)
from .schema import migrate
from .shaping import ShapingQueries
from .slots import Slots
from .stats import StatsQueries
from .suppressions import SuppressionQueries, listed, screened
from .templates import TemplateQueries
from .thread import DbThread
from .throttles import ThrottleQueries
from .tlsreports import TlsReportQueries
from .walsync import WalSync
from .webhooks import WebhookQueries


class SQLiteStore(ContactQueries, DeliveryQueries, DomainQueries, EmailQueries, EventQueries,
                  HealthQueries, IdempotencyQueries, InboundQueries, OperatorQueries,
                  StatsQueries, SuppressionQueries, TemplateQueries, WebhookQueries,
                  RetentionQueries, CountQueries, ThrottleQueries, MtaStsQueries,
                  ShapingQueries, TlsReportQueries):
    def __init__(self, path: Path | str, *, node: str = "") -> None:
        """`path` is the SQLite file, a sqlite:///path URL or a postgresql:// URL. `node`
        names this relay node in the leases it takes (on PostgreSQL, where nodes share
        the queue); by default the host's name."""
        self.url = ""
        if isinstance(path, str) and is_postgresql(path):
            self.url = path
        elif isinstance(path, str) and path.startswith("sqlite:"):
            path = sqlite_path(path)
        self.path = Path(path) if not self.url else None
        self.node = node or socket.gethostname()
        self._write_conn: DbThread | None = None
        self._read_conn: DbThread | None = None
        self.writer: GroupCommitWriter | None = None
        self._write_lock: WriteLock | None = None
        self._wal_sync: WalSync | None = None
        self._slots_conn: DbThread | None = None
        self.slots = Slots(None)  # cluster-wide delivery slots (store/slots.py)

    # -- lifecycle ---------------------------------------------------------

    @property
    def postgresql(self) -> bool:
        return bool(self.url)

    @property
    def where(self) -> str:
        """The store for a log line or an error: the file, or the URL without its password."""
        return mask_url(self.url) if self.url else str(self.path)

    def _thread(self, name: str) -> DbThread:
        """A connection on a thread of its own, to the file or to the PostgreSQL database."""
        if self.path is not None:
            return DbThread(self.path, name=name)
        url = self.url
        return DbThread(url, name=name, connect=lambda: PgConnection(url))

    async def open(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        write, read = self._thread("store-writer"), self._thread("store-reader")
        # PostgreSQL: a third connection holds the cluster's delivery slots (store/slots.py)
        slots = self._thread("store-slots") if self.url else None
        # each SQLite writer syncs its commits itself, out of the writers' lock (walsync.py)
        wal_sync = WalSync(self.path) if self.path is not None else None
        try:
            await write.open()
            await write.run(schema_pg.migrate if self.url else migrate)
            if wal_sync is not None:
                await write.run(wal_sync.prepare)
            await read.open()
            if slots is not None:
                await slots.open()
        except BaseException as exc:
            for conn in (slots, read, write):
                if conn is not None:
                    await conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"{self.where}: cannot open the database: {exc}") from exc
            raise
        if self.path is not None:
            os.chmod(self.path, 0o600)
        self._slots_conn, self.slots = slots, Slots(slots)
        self._write_conn, self._read_conn = write, read
        if self.path is not None:  # every process's writers take turns (groupcommit.py)
            self._write_lock = WriteLock.beside(self.path)
        self._wal_sync = wal_sync
        self.writer = GroupCommitWriter(write, self._write_lock,
                                        sync=wal_sync.sync if wal_sync is not None else None)
        self.writer.start()

    async def close(self) -> None:
        if self.writer is not None:
            await self.writer.stop()
            self.writer = None
        for conn in (self._slots_conn, self._read_conn, self._write_conn):
            if conn is not None:
                await conn.close()
        self._read_conn = self._write_conn = self._slots_conn = None
        if self._write_lock is not None:
            self._write_lock.close()
            self._write_lock = None
        if self._wal_sync is not None:
            self._wal_sync.close()
            self._wal_sync = None
        self.slots = Slots(None)

    async def listen(self, wake: Callable[[], None]) -> Listener | None:
        """On PostgreSQL, `wake` is called whenever any node queues messages (close the
        Listener when done); on SQLite, None: this node's own submitter wakes it."""
        if not self.url:
            return None
        listener = Listener(self.url, QUEUE_CHANNEL, wake)
        listener.start()
        return listener

    @property
    def _reader(self) -> DbThread:
        if self._read_conn is None:
            raise StoreError("the store is not open")
        return self._read_conn

    async def _write(self, op: Any, *, linger: bool = False) -> Any:
        if self.writer is None:
            raise StoreError("the store is not open")
        return await self.writer.write(op, linger=linger)

    # -- the way in ----------------------------------------------------------

    async def enqueue(self, message: NewMessage) -> SubmitResult:
        result: SubmitResult = await self._write(Batched(_enqueue_many, message))
        return result

    # -- reading ---------------------------------------------------------------

    async def get_message(self, message_id: str) -> MessageDetail | None:
        return await load_detail(self._reader, message_id)

    async def get_body(self, message_id: str) -> bytes | None:
        body: bytes | None = await self._reader.run(_body, message_id)
        return body

    async def get_outgoing(self, message_id: str) -> Outgoing | None:
        found = await self.get_outgoing_many([message_id])
        return found.get(message_id)

    async def get_outgoing_many(self, message_ids: list[str]) -> dict[str, Outgoing]:
        """What render needs of each message, in one read; deleted ones are left out."""
        found: dict[str, Outgoing] = await self._reader.run(_outgoing, message_ids)
        return found

    async def list_messages(
        self, *, limit: int = 50, cursor: str | None = None, status: str | None = None,
        tag: str | None = None, to: str | None = None, sender: str | None = None,
        since: float | None = None, within: Within = None,
    ) -> MessagePage:
        """Newest first; the cursor is the id of the last message of the previous page.
        `tag` matches a tag's name (or name:value), `to` a recipient, `sender` the envelope
        or From address, `since` the creation time, `within` a caller's reach."""
        where: list[str] = []
        args: list[Any] = []
        if within is not None:
            clause, more_args = owners.message_sql(within)
            where.append(clause)
            args += more_args
        if tag:
            where.append("EXISTS (SELECT 1 FROM json_each(messages.tags) t"
                         # lower(): SQLite's LIKE ignores ASCII case, PostgreSQL's does not
                         " WHERE t.value = ? OR lower(t.value) LIKE lower(?) ESCAPE '\\')")
            args += [tag, tag.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                     + ":%"]
        if to:
            where.append("id IN (SELECT message_id FROM recipients WHERE address = ?)")
            args.append(to)
        if sender:
            where.append("(mail_from = ? OR instr(lower(header_from), ?) > 0)")
            args += [sender, sender.lower()]
        if since is not None:
            where.append("created_at >= ?")
            args.append(since)
        if cursor:
            where.append("(created_at, id) < (SELECT created_at, id FROM messages WHERE id = ?)")
            args.append(cursor)
        if status:
            where.append("id IN (SELECT message_id FROM recipients WHERE status = ?)")
            args.append(status)
        sql = f"SELECT {MESSAGE_COLUMNS} FROM messages"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        async with self._reader.execute(sql, (*args, limit + 1)) as cur:
            rows = list(await cur.fetchall())
        more = len(rows) > limit
        rows = rows[:limit]
        recipients = await self._recipients([r[0] for r in rows])
        items = tuple(
            MessageDetail(message=message_row(r, recipients.get(r[0], ())),
                          recipients=recipients.get(r[0], ()))
            for r in rows
        )
        return MessagePage(items=items, next_cursor=rows[-1][0] if more and rows else None)

    async def _recipients(self, message_ids: list[str]) -> dict[str, tuple[Recipient, ...]]:
        if not message_ids:
            return {}
        marks = ",".join("?" * len(message_ids))
        out: dict[str, list[Recipient]] = {}
        async with self._reader.execute(
            f"SELECT {RECIPIENT_COLUMNS} FROM recipients WHERE message_id IN ({marks}) ORDER BY id",
            message_ids,
        ) as cur:
            for r in await cur.fetchall():
                out.setdefault(r[1], []).append(recipient_row(r))
        return {k: tuple(v) for k, v in out.items()}

    # -- API keys ----------------------------------------------------------------

    async def add_api_key(self, key: ApiKey, secret_hash: bytes) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO api_keys (id, name, hash, scopes, domains, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key.id, key.name, secret_hash, json.dumps(list(key.scopes)),
                 json.dumps(list(key.domains)), key.created_at),
            )

        await self._write(op)

    async def find_api_key(self, key_id: str) -> tuple[ApiKey, bytes] | None:
        async with self._reader.execute(
            "SELECT id, name, scopes, domains, created_at, revoked_at, last_used_at, hash "
            "FROM api_keys WHERE id = ?",
            (key_id,),
        ) as cur:
            row = await cur.fetchone()
        return (api_key_row(row), bytes(row[7])) if row else None

    async def list_api_keys(self) -> list[ApiKey]:
        async with self._reader.execute(
            "SELECT id, name, scopes, domains, created_at, revoked_at, last_used_at "
            "FROM api_keys ORDER BY created_at"
        ) as cur:
            return [api_key_row(r) for r in await cur.fetchall()]

    async def revoke_api_key(self, key_id: str, when: float) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (when, key_id),
            )
            return cur.rowcount == 1

        result: bool = await self._write(op)
        return result


def _body(db: sqlite3.Connection, message_id: str) -> bytes | None:
    rows = db.execute("SELECT data, kind FROM bodies WHERE message_id = ?",
                      (message_id,)).fetchall()
    return with_parts(db, bytes(rows[0][0]), rows[0][1]) if rows else None


def _outgoing(db: sqlite3.Connection, message_ids: list[str]) -> dict[str, Outgoing]:
    out = {}
    for i in range(0, len(message_ids), 500):
        ids = message_ids[i:i + 500]
        for m_id, data, kind, domains, k_domain, k_selector, k_private in db.execute(
                "SELECT m.id, b.data, b.kind, m.sign_domains, k.domain, k.selector,"
                " k.private_key"
                " FROM messages m JOIN bodies b ON b.message_id = m.id"
                " LEFT JOIN message_dkim k ON k.message_id = m.id"
                f" WHERE m.id IN ({','.join('?' * len(ids))})", ids):
            given = (GivenDkimKey(domain=k_domain, selector=k_selector, private_key=k_private)
                     if k_domain is not None else None)
            out[m_id] = Outgoing(body=with_parts(db, bytes(data), kind),
                                 sign_domains=tuple(json.loads(domains)),
                                 dkim=given, kind=kind)
    return out


def _enqueue_many(db: sqlite3.Connection, messages: Sequence[NewMessage]) -> list[SubmitResult]:
    """Insert a batch of messages with a few statements; idempotent repeats insert nothing."""
    results: list[SubmitResult] = []
    fresh: list[NewMessage] = []
    suppressed: dict[str, dict[str, str]] = {}
    candidates = listed(db, messages)
    seen: dict[tuple[str, str], SubmitResult] = {}
    for m in messages:
        hit = None
        if m.idempotency_key is not None:
            scope_key = (m.idempotency_scope, m.idempotency_key)
            hit = seen.get(scope_key) or _idempotent_hit(db, m)
            if hit is None:
                seen[scope_key] = SubmitResult(message_id=m.id, duplicate=True)
        if hit is None:
            hit, kept = screened(db, m, suppressed, candidates)
            if kept:
                fresh.append(m)
        results.append(hit)
    if fresh:
        insert_messages(db, fresh, suppressed)
    return results


def _idempotent_hit(db: sqlite3.Connection, message: NewMessage) -> SubmitResult | None:
    row = db.execute(
        "SELECT message_id, created_at, fingerprint FROM idempotency WHERE scope = ? AND key = ?",
        (message.idempotency_scope, message.idempotency_key),
    ).fetchone()
    if row is None:
        return None
    if row[1] < message.created_at - IDEMPOTENCY_WINDOW:
        db.execute(
            "DELETE FROM idempotency WHERE scope = ? AND key = ?",
            (message.idempotency_scope, message.idempotency_key),
        )
        return None
    if message.idempotency_fingerprint and row[2] and row[2] != message.idempotency_fingerprint:
        return SubmitResult(message_id=row[0], duplicate=True, status="conflict")
    return SubmitResult(message_id=row[0], duplicate=True)


