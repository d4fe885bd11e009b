"""Contacts and their events in the SQLite store. An upsert merges data and keeps or sets the
subscription state in one step of the single writer, so concurrent sends cannot lose a field."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosqlite

from ..types import Contact
from .groupcommit import run_sync

_COLUMNS = "id, email, subscribed, data, created_at, updated_at"


@dataclass(frozen=True, kw_only=True)
class ContactChange:
    """What a request says about one address."""

    email: str
    subscribed: bool | None = None  # None: an existing contact keeps its state
    subscribed_if_new: bool = False  # the state of a contact this change creates
    data: dict[str, Any] = field(default_factory=dict)  # set these fields
    remove: tuple[str, ...] = ()  # and delete these


@dataclass(frozen=True, kw_only=True)
class Upserted:
    contact: Contact
    created: bool


class ContactQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: aiosqlite.Connection

    async def upsert_contacts(self, changes: Sequence[ContactChange], now: float
                              ) -> list[Upserted]:
        """Each change applied in order, all in one transaction."""
        def op(db: sqlite3.Connection) -> list[Upserted]:
            return [_upsert(db, change, now) for change in changes]

        done: list[Upserted] = await self._write(op)
        return done

    async def track_contact_event(self, change: ContactChange, name: str,
                                  data: dict[str, Any], now: float) -> tuple[Upserted, int]:
        """Upsert the contact and record an event of theirs; (the contact, the event id)."""
        def op(db: sqlite3.Connection) -> tuple[Upserted, int]:
            upserted = _upsert(db, change, now)
            cur = db.execute("INSERT INTO contact_events (contact_id, name, data, created_at)"
                             " VALUES (?, ?, ?, ?)",
                             (upserted.contact.id, name, json.dumps(data), now))
            return upserted, int(cur.lastrowid or 0)

        done: tuple[Upserted, int] = await self._write(op)
        return done

    async def get_contact(self, id_or_email: str) -> Contact | None:
        def op(db: sqlite3.Connection) -> Contact | None:
            column = "email" if "@" in id_or_email else "id"
            row = db.execute(f"SELECT {_COLUMNS} FROM contacts WHERE {column} = ?",
                             (id_or_email,)).fetchone()
            return _contact(row) if row else None

        found: Contact | None = await run_sync(self._reader, op)
        return found

    async def list_contacts(self, *, limit: int = 100, after: str | None = None,
                            subscribed: bool | None = None) -> list[Contact]:
        """By address; `after` is the last address of the previous page."""
        def op(db: sqlite3.Connection) -> list[Contact]:
            where: list[str] = []
            args: list[Any] = []
            if after:
                where.append("email > ?")
                args.append(after)
            if subscribed is not None:
                where.append("subscribed = ?")
                args.append(int(subscribed))
            sql = f"SELECT {_COLUMNS} FROM contacts"
            if where:
                sql += " WHERE " + " AND ".join(where)
            return [_contact(r) for r in db.execute(sql + " ORDER BY email LIMIT ?",
                                                    (*args, limit))]

        found: list[Contact] = await run_sync(self._reader, op)
        return found

    async def contact_events(self, contact_id: str) -> list[tuple[str, dict[str, Any], float]]:
        """(name, data, time) of a contact's events, oldest first."""
        def op(db: sqlite3.Connection) -> list[tuple[str, dict[str, Any], float]]:
            return [(r[0], json.loads(r[1]), r[2]) for r in db.execute(
                "SELECT name, data, created_at FROM contact_events WHERE contact_id = ?"
                " ORDER BY id", (contact_id,))]

        found: list[tuple[str, dict[str, Any], float]] = await run_sync(self._reader, op)
        return found

    async def delete_contact(self, id_or_email: str) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            column = "email" if "@" in id_or_email else "id"
            return db.execute(f"DELETE FROM contacts WHERE {column} = ?",
                              (id_or_email,)).rowcount == 1

        done: bool = await self._write(op)
        return done


def _upsert(db: sqlite3.Connection, change: ContactChange, now: float) -> Upserted:
    row = db.execute(f"SELECT {_COLUMNS} FROM contacts WHERE email = ?",
                     (change.email,)).fetchone()
    if row is None:
        data = {k: v for k, v in change.data.items() if k not in change.remove}
        subscribed = (change.subscribed if change.subscribed is not None
                      else change.subscribed_if_new)
        contact = Contact(id=str(uuid.uuid4()), email=change.email, subscribed=subscribed,
                          data=data, created_at=now, updated_at=now)
        db.execute(f"INSERT INTO contacts ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                   (contact.id, contact.email, int(contact.subscribed), json.dumps(data),
                    now, now))
        return Upserted(contact=contact, created=True)
    old = _contact(row)
    data = {**old.data, **change.data}
    for name in change.remove:
        data.pop(name, None)
    subscribed = old.subscribed if change.subscribed is None else change.subscribed
    if data == old.data and subscribed == old.subscribed:
        return Upserted(contact=old, created=False)
    db.execute("UPDATE contacts SET subscribed = ?, data = ?, updated_at = ? WHERE id = ?",
               (int(subscribed), json.dumps(data), now, old.id))
    return Upserted(contact=Contact(id=old.id, email=old.email, subscribed=subscribed,
                                    data=data, created_at=old.created_at, updated_at=now),
                    created=False)


def _contact(row: tuple[Any, ...]) -> Contact:
    return Contact(id=row[0], email=row[1], subscribed=bool(row[2]), data=json.loads(row[3]),
                   created_at=row[4], updated_at=row[5])
