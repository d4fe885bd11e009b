"""The suppression list in the SQLite store, and the screening of recipients against it, which
runs inside the transaction that queues a message (no extra read on the way in)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .. import owners
from ..owners import Within
from ..types import EventType, Stream, SubmitResult, Suppression
from .base import NewMessage
from .thread import DbThread

_COLUMNS = "address, scope, reason, source, created_at, owner"


class SuppressionQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: DbThread

    async def add_suppression(self, entry: Suppression) -> bool:
        """Added (True) or already there (False; the first reason stays)."""
        def op(db: sqlite3.Connection) -> bool:
            cur = db.execute(f"INSERT INTO suppressions ({_COLUMNS})"
                             " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                             (entry.address, entry.scope, entry.reason, entry.source,
                              entry.created_at, owners.encode(entry.owner)))
            return cur.rowcount == 1

        added: bool = await self._write(op)
        return added

    async def remove_suppression(self, address: str, scope: str | None = None,
                                 within: Within = None, *,
                                 reasons: Sequence[str] | None = None) -> int:
        """Removes the address's entries (of one scope, or all of them; of some reasons, or
        any) within a caller's reach; returns how many."""
        def op(db: sqlite3.Connection) -> int:
            clause, args = owners.owner_sql(within)
            where, values = ["address = ?", clause], [address, *args]
            if scope is not None:
                where.append("scope = ?")
                values.append(scope)
            if reasons is not None:
                where.append(f"reason IN ({','.join('?' * len(reasons)) or 'NULL'})")
                values += reasons
            return db.execute("DELETE FROM suppressions WHERE " + " AND ".join(where),
                              values).rowcount

        count: int = await self._write(op)
        return count

    async def list_suppressions(self, *, limit: int = 100, after: str | None = None,
                                address: str | None = None, within: Within = None,
                                reasons: Sequence[str] | None = None,
                                created_after: float | None = None,
                                created_before: float | None = None,
                                offset: int = 0) -> list[Suppression]:
        """By address; `after` is the last address of the previous page (or skip `offset`
        entries); `reasons` and the creation times narrow it."""
        def op(db: sqlite3.Connection) -> list[Suppression]:
            clause, owner_args = owners.owner_sql(within)
            where, args = [clause], list(owner_args)
            if address:
                where.append("address = ?")
                args.append(address)
            if after:
                where.append("address > ?")
                args.append(after)
            if reasons is not None:
                where.append(f"reason IN ({','.join('?' * len(reasons)) or 'NULL'})")
                args += reasons
            if created_after is not None:
                where.append("created_at >= ?")
                args.append(created_after)
            if created_before is not None:
                where.append("created_at < ?")
                args.append(created_before)
            sql = f"SELECT {_COLUMNS} FROM suppressions WHERE " + " AND ".join(where)
            rows = db.execute(sql + " ORDER BY address, scope, owner LIMIT ? OFFSET ?",
                              (*args, limit, offset))
            return [Suppression(address=r[0], scope=r[1], reason=r[2], source=r[3],
                                created_at=r[4], owner=owners.decode(r[5])) for r in rows]

        found: list[Suppression] = await self._reader.run(op)
        return found

    async def unsubscribe(self, recipient_id: int, now: float) -> tuple[str, str] | None:
        """A recipient leaves its sender's broadcast mail: a suppression scoped to the sending
        domain and an email.unsubscribed event, once. (address, scope), or None."""
        def op(db: sqlite3.Connection) -> tuple[str, str] | None:
            row = db.execute(
                "SELECT r.address, m.sender_domain, r.message_id FROM recipients r"
                " JOIN messages m ON m.id = r.message_id WHERE r.id = ?",
                (recipient_id,)).fetchone()
            if row is None:
                return None
            address, scope, message_id = row
            added = db.execute(
                f"INSERT INTO suppressions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (address, scope, "unsubscribed", f"unsubscribe:{message_id}", now,
                 owner_of_mail(scope))).rowcount
            if added:
                db.execute("INSERT INTO events (message_id, recipient_id, type, created_at, data)"
                           " VALUES (?, ?, ?, ?, ?)",
                           (message_id, recipient_id, EventType.UNSUBSCRIBED.value, now,
                            json.dumps({"email": address, "scope": scope})))
            # a contact has one subscription state (Plunk's): leaving any list of its
            # owner's leaves it
            db.execute("UPDATE contacts SET subscribed = 0, updated_at = ?"
                       " WHERE email = ? AND subscribed = 1 AND"
                       f" {owners.covered_sql('owner', '?')}", (now, address, scope, scope, scope))
            return address, scope

        done: tuple[str, str] | None = await self._write(op)
        return done

    async def suppressed(self, addresses: Sequence[str], *, stream: Stream,
                         sender_domain: str) -> dict[str, str]:
        """{address: reason} of those that may not get this kind of mail now."""
        found: dict[str, str] = await self._reader.run(screen, addresses, stream,
                                                sender_domain)
        return found


def screen(db: sqlite3.Connection, addresses: Iterable[str], stream: Stream | str,
           sender_domain: str) -> dict[str, str]:
    """{address: reason} for the suppressed ones: a global entry stops all mail, a scoped one
    stops broadcast mail from that sending domain; either only the mail of its owner (a
    relay-wide entry, everyone's)."""
    wanted = list(dict.fromkeys(addresses))
    out: dict[str, str] = {}
    broadcast = str(stream) == Stream.BROADCAST.value
    for i in range(0, len(wanted), 500):
        chunk = wanted[i:i + 500]
        marks = ",".join("?" * len(chunk))
        for address, reason, owner in db.execute(
                f"SELECT address, reason, owner FROM suppressions WHERE address IN ({marks})"
                " AND (scope = '' OR (? AND scope = ?)) ORDER BY scope",
                (*chunk, broadcast, sender_domain)):
            if owner == "[]" or owners.covers(owners.decode(owner), sender_domain):
                out.setdefault(address, reason)
    return out


def suppress_for_mail(db: sqlite3.Connection, address: str, reason: str, source: str,
                      now: float, message_id: str) -> None:
    """A suppression of all mail to `address` that an outcome of message `message_id` makes
    (a hard bounce, during delivery or reported later; a complaint), owned as the message's
    sending domain is; the first reason for an address stays."""
    domain = db.execute("SELECT sender_domain FROM messages WHERE id = ?",
                        (message_id,)).fetchone()
    db.execute(f"INSERT INTO suppressions ({_COLUMNS}) VALUES (?, '', ?, ?, ?, ?)"
               " ON CONFLICT DO NOTHING",
               (address, reason, source, now, owner_of_mail(domain[0] if domain else "")))


def owner_of_mail(sender_domain: str) -> str:
    """The stored owner of what a message's outcome makes (a bounce's or unsubscribe's
    suppression): its sender domain, or the relay for mail without one."""
    return owners.encode((sender_domain,) if sender_domain else ())


def listed(db: sqlite3.Connection, messages: Sequence[NewMessage]) -> set[str]:
    """Which of these messages' recipients have any entry: one query for a whole group
    commit, so that the usual case (none) costs no query per message."""
    wanted = list({r.address for m in messages for r in m.recipients})
    out: set[str] = set()
    for i in range(0, len(wanted), 500):
        chunk = wanted[i:i + 500]
        out.update(r[0] for r in db.execute(
            f"SELECT DISTINCT address FROM suppressions WHERE address IN"
            f" ({','.join('?' * len(chunk))})", chunk))
    return out


def screened(db: sqlite3.Connection, m: NewMessage, suppressed: dict[str, dict[str, str]],
             candidates: set[str]) -> tuple[SubmitResult, bool]:
    """Screen a message's recipients; (its result, whether to insert it). `candidates` is
    what `listed` found for the transaction. A scheduled message is not screened now: the
    list is checked when it goes out (the scheduler's screen), not when it is scheduled, so
    an address listed or removed meanwhile counts as it is then (seed 003)."""
    if m.scheduled_at is not None:
        return SubmitResult(message_id=m.id, status="scheduled"), True
    if m.recipients and not candidates:  # the usual case: no recipient has an entry
        return SubmitResult(message_id=m.id, status="queued"), True
    addresses = [r.address for r in m.recipients if r.address in candidates]
    found = screen(db, addresses, m.stream, m.sender_domain) if addresses else {}
    if found:
        suppressed[m.id] = found
    every = len(found) == len({r.address for r in m.recipients})
    if every and m.refuse_if_suppressed:
        return SubmitResult(message_id=m.id, status="suppressed",
                            suppressed=tuple(found.items())), False
    status = "suppressed" if every else "scheduled" if m.scheduled_at else "queued"
    return SubmitResult(message_id=m.id, status=status, suppressed=tuple(found.items())), True
