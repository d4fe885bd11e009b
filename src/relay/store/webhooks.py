"""Webhook endpoints and the outbox in the SQLite store. The outbox is filled by a trigger on
the events table, so each event's deliveries are written in that event's own transaction."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import owners
from ..owners import Within
from ..types import EventType, WebhookEndpoint
from .pgconn import skip_locked
from .thread import DbThread

_COLUMNS = ("id, url, secret, events, enabled, created_at, disabled_at, disabled_reason,"
            " failing_since, format, owner")


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """One event for one endpoint, leased for an attempt."""

    outbox_id: int
    attempts: int
    endpoint: WebhookEndpoint
    event_id: int
    event_type: str
    created_at: float
    data: dict[str, Any]
    sender: str = ""  # the message's From (some formats name it)
    api_key_id: str | None = None  # the key that sent the message


@dataclass(frozen=True, kw_only=True)
class Attempted:
    """An event's delivery to an endpoint that was attempted (what MailChannels calls a
    webhook batch: relay posts one event at a time)."""

    id: int  # the outbox row's
    endpoint_id: str
    url: str
    event_id: int
    created_at: float
    attempts: int
    last_status: int | None
    delivered_at: float | None


_STATUS_CLASSES = {"1xx": 100, "2xx": 200, "3xx": 300, "4xx": 400, "5xx": 500}


class WebhookQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: DbThread
    node: str

    async def add_endpoint(self, ep: WebhookEndpoint) -> None:
        def op(db: sqlite3.Connection) -> None:
            db.execute(f"INSERT INTO webhook_endpoints ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       (ep.id, ep.url, ep.secret, json.dumps(list(ep.events)), int(ep.enabled),
                        ep.created_at, ep.disabled_at, ep.disabled_reason, ep.failing_since,
                        ep.format, owners.encode(ep.owner)))

        await self._write(op)

    async def list_endpoints(self, within: Within = None) -> list[WebhookEndpoint]:
        """Those within a caller's reach (all of them for None), oldest first."""
        def op(db: sqlite3.Connection) -> list[WebhookEndpoint]:
            where, args = owners.owner_sql(within)
            return [_endpoint(r) for r in db.execute(
                f"SELECT {_COLUMNS} FROM webhook_endpoints WHERE {where} ORDER BY created_at",
                args)]

        found: list[WebhookEndpoint] = await self._reader.run(op)
        return found

    async def get_endpoint(self, endpoint_id: str) -> WebhookEndpoint | None:
        def op(db: sqlite3.Connection) -> WebhookEndpoint | None:
            row = db.execute(f"SELECT {_COLUMNS} FROM webhook_endpoints WHERE id = ?",
                             (endpoint_id,)).fetchone()
            return _endpoint(row) if row else None

        found: WebhookEndpoint | None = await self._reader.run(op)
        return found

    async def update_endpoint(self, endpoint_id: str, *, enabled: bool | None = None,
                              secret: str | None = None, now: float = 0.0) -> bool:
        """Enable (failures forgotten) or disable by hand, or set a new secret."""
        def op(db: sqlite3.Connection) -> bool:
            changed = False
            if enabled is not None:
                changed |= db.execute(
                    "UPDATE webhook_endpoints SET enabled = ?, disabled_at = ?,"
                    " disabled_reason = ?, failing_since = NULL WHERE id = ?",
                    (int(enabled), None if enabled else now,
                     None if enabled else "disabled by an operator", endpoint_id)).rowcount > 0
            if secret is not None:
                changed |= db.execute("UPDATE webhook_endpoints SET secret = ? WHERE id = ?",
                                      (secret, endpoint_id)).rowcount > 0
            return changed

        done: bool = await self._write(op)
        return done

    async def delete_endpoint(self, endpoint_id: str) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM webhook_endpoints WHERE id = ?",
                              (endpoint_id,)).rowcount == 1

        done: bool = await self._write(op)
        return done

    async def redeliver(self, endpoint_id: str, event_id: int, now: float) -> bool:
        """Queue one event for one endpoint again, due now; False when either is unknown or
        the event is not the endpoint's owner's (it would never have gone there)."""
        def op(db: sqlite3.Connection) -> bool:
            return db.execute(
                "INSERT INTO webhook_outbox (endpoint_id, event_id, next_attempt_at, created_at)"
                " SELECT w.id, e.id, ?, ? FROM webhook_endpoints w, events e"
                " LEFT JOIN messages m ON m.id = e.message_id WHERE w.id = ? AND e.id = ?"
                f" AND {owners.covered_sql('w.owner', 'm.sender_domain')}",
                (now, now, endpoint_id, event_id)).rowcount == 1

        done: bool = await self._write(op)
        return done

    async def lease_deliveries(self, now: float, limit: int, lease_for: float,
                               max_octets: int | None = None) -> list[Delivery]:
        """Up to `limit` due deliveries, oldest first. With `max_octets`, they stop once the
        event data, metadata, tags and headers they carry (as stored JSON) pass it, though
        the first is always taken: each delivery holds its own copy in memory until it is
        sent, and a message's metadata goes to every recipient's events."""
        budget = -1 if max_octets is None else max_octets

        def op(db: sqlite3.Connection) -> list[Delivery]:
            # the due rows claimed first (passed over while another node claims them), then
            # cut where the octets they carry pass the budget
            ids = [r[0] for r in db.execute(
                "WITH due AS (SELECT o.id, o.next_attempt_at, length(e.data)"
                " + coalesce(length(m.metadata) + length(m.tags), 0)"
                " + coalesce(length(m.webhook_headers), 0) AS own"
                " FROM webhook_outbox o JOIN webhook_endpoints w ON w.id = o.endpoint_id"
                " JOIN events e ON e.id = o.event_id LEFT JOIN messages m ON m.id = e.message_id"
                " WHERE o.delivered_at IS NULL AND w.enabled <> 0"
                " AND o.next_attempt_at <= ? AND (o.leased_until IS NULL OR o.leased_until < ?)"
                f" ORDER BY o.next_attempt_at, o.id LIMIT ?{skip_locked(db, of='o')})"
                " UPDATE webhook_outbox SET leased_until = ?, leased_by = ? WHERE id IN ("
                " SELECT id FROM (SELECT id, own, sum(own) OVER (ORDER BY next_attempt_at, id"
                " ROWS UNBOUNDED PRECEDING) AS upto FROM due) AS budgeted"
                " WHERE ? < 0 OR upto - own < ?) RETURNING id",
                (now, now, limit, now + lease_for, self.node, budget, budget))]
            if not ids:
                return []
            rows = db.execute(
                f"SELECT o.id, o.attempts, e.id, e.type, e.created_at, e.data, e.message_id,"
                f" m.metadata, m.tags, m.header_from, m.api_key_id, m.webhook_headers,"
                f" {', '.join('w.' + c.strip() for c in _COLUMNS.split(','))}"
                " FROM webhook_outbox o JOIN events e ON e.id = o.event_id"
                " JOIN webhook_endpoints w ON w.id = o.endpoint_id"
                " LEFT JOIN messages m ON m.id = e.message_id"
                f" WHERE o.id IN ({','.join('?' * len(ids))}) ORDER BY o.id", ids).fetchall()
            out = []
            # a message's metadata and headers read once, shared by its events
            parsed: dict[str, Any] = {}
            headers: dict[str, Any] = {}
            for r in rows:
                data = {"messageId": r[6], **json.loads(r[5] or "{}")}
                if r[7] is not None:
                    if r[6] not in parsed:
                        parsed[r[6]] = json.loads(r[7])
                    data["metadata"] = parsed[r[6]]
                    data["campaignId"] = data["metadata"].get("campaignId")
                    data["tags"] = [{"name": n, "value": v} for n, _, v in
                                    (t.partition(":") for t in json.loads(r[8]))]
                if r[11] is not None:  # beside the metadata, as MailerLogic documents
                    if r[6] not in headers:
                        headers[r[6]] = json.loads(r[11])
                    data["headers"] = headers[r[6]]
                out.append(Delivery(outbox_id=r[0], attempts=r[1], endpoint=_endpoint(r[12:]),
                                    event_id=r[2], event_type=r[3], created_at=r[4], data=data,
                                    sender=r[9] or "", api_key_id=r[10]))
            return out

        leased: list[Delivery] = await self._write(op)
        return leased

    async def next_delivery_at(self) -> float | None:
        def op(db: sqlite3.Connection) -> float | None:
            row = db.execute("SELECT min(next_attempt_at) FROM webhook_outbox"
                             " WHERE delivered_at IS NULL AND next_attempt_at IS NOT NULL"
                             " AND leased_until IS NULL").fetchone()
            return row[0] if row else None

        found: float | None = await self._reader.run(op)
        return found

    async def record_delivery(self, d: Delivery, *, now: float, status: int | None,
                              error: str | None, next_at: float | None,
                              disable: str | None = None) -> None:
        """An attempt's outcome: delivered (2xx), to be retried at `next_at`, or given up
        (`next_at` None). `disable` disables the endpoint and records webhook.disabled."""
        ok = status is not None and 200 <= status < 300

        def op(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE webhook_outbox SET attempts = attempts + 1, leased_until = NULL,"
                " last_status = ?, last_error = ?, delivered_at = ?, next_attempt_at = ?"
                " WHERE id = ?", (status, error, now if ok else None,
                                  None if ok else next_at, d.outbox_id))
            if ok:
                db.execute("UPDATE webhook_endpoints SET failing_since = NULL WHERE id = ?",
                           (d.endpoint.id,))
            else:
                db.execute("UPDATE webhook_endpoints SET failing_since ="
                           " coalesce(failing_since, ?) WHERE id = ?", (now, d.endpoint.id))
            if disable and db.execute(
                    "UPDATE webhook_endpoints SET enabled = 0, disabled_at = ?,"
                    " disabled_reason = ? WHERE id = ? AND enabled <> 0",
                    (now, disable, d.endpoint.id)).rowcount:
                db.execute("INSERT INTO events (message_id, recipient_id, type, created_at, data)"
                           " VALUES (NULL, NULL, ?, ?, ?)",
                           (EventType.WEBHOOK_DISABLED.value, now, json.dumps(
                               {"endpointId": d.endpoint.id, "url": d.endpoint.url,
                                "reason": disable})))

        await self._write(op)

    async def attempted(self, *, format: str, within: Within, batch_id: int | None = None,
                        url: str | None = None, statuses: tuple[str, ...] = (),
                        created_after: float | None = None,
                        created_before: float | None = None, limit: int = 100,
                        offset: int = 0) -> list[Attempted]:
        """Attempted deliveries to the endpoints of one format within a caller's reach,
        newest first; `statuses` are classes ("2xx") or "no_response" (no HTTP answer)."""
        def op(db: sqlite3.Connection) -> list[Attempted]:
            reach, args = owners.owner_sql(within, "w.owner")
            where, values = ["o.attempts > 0", "w.format = ?", reach], [format, *args]
            if batch_id is not None:
                where.append("o.id = ?")
                values.append(batch_id)
            if url is not None:
                where.append("w.url = ?")
                values.append(url)
            if statuses:
                ors = []
                for status in statuses:
                    if status == "no_response":
                        ors.append("o.last_status IS NULL")
                    else:
                        ors.append("(o.last_status >= ? AND o.last_status < ?)")
                        low = _STATUS_CLASSES[status]
                        values += [low, low + 100]
                where.append("(" + " OR ".join(ors) + ")")
            if created_after is not None:
                where.append("o.created_at >= ?")
                values.append(created_after)
            if created_before is not None:
                where.append("o.created_at < ?")
                values.append(created_before)
            rows = db.execute(
                "SELECT o.id, w.id, w.url, o.event_id, o.created_at, o.attempts,"
                " o.last_status, o.delivered_at FROM webhook_outbox o"
                " JOIN webhook_endpoints w ON w.id = o.endpoint_id"
                f" WHERE {' AND '.join(where)} ORDER BY o.id DESC LIMIT ? OFFSET ?",
                (*values, limit, offset)).fetchall()
            return [Attempted(id=r[0], endpoint_id=r[1], url=r[2], event_id=r[3],
                              created_at=r[4], attempts=r[5], last_status=r[6],
                              delivered_at=r[7]) for r in rows]

        found: list[Attempted] = await self._reader.run(op)
        return found

    async def outbox(self, endpoint_id: str) -> list[dict[str, Any]]:
        """An endpoint's deliveries, oldest first (for tests and operators)."""
        def op(db: sqlite3.Connection) -> list[dict[str, Any]]:
            cols = ("id", "event_id", "attempts", "next_attempt_at", "delivered_at",
                    "last_status", "last_error")
            return [dict(zip(cols, r, strict=True)) for r in db.execute(
                f"SELECT {', '.join(cols)} FROM webhook_outbox WHERE endpoint_id = ?"
                " ORDER BY id", (endpoint_id,))]

        found: list[dict[str, Any]] = await self._reader.run(op)
        return found


def _endpoint(r: Any) -> WebhookEndpoint:
    return WebhookEndpoint(id=r[0], url=r[1], secret=r[2], events=tuple(json.loads(r[3])),
                           enabled=bool(r[4]), created_at=r[5], disabled_at=r[6],
                           disabled_reason=r[7], failing_since=r[8], format=r[9],
                           owner=owners.decode(r[10]))
