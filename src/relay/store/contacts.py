"""Contacts and their events in the SQLite store. An upsert merges data and keeps or sets the
subscription state in one step of the single writer, so concurrent sends cannot lose a field."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import owners
from ..errors import ValidationError
from ..owners import Within
from ..types import Contact
from .thread import DbThread

_COLUMNS = "id, email, subscribed, data, created_at, updated_at, owner"


@dataclass(frozen=True, kw_only=True)
class ContactChange:
    """What a request says about one address."""

    email: str
    subscribed: bool | None = None  # None: an existing contact keeps its state
    subscribed_if_new: bool = False  # the state of a contact this change creates
    data: dict[str, Any] = field(default_factory=dict)  # set these fields
    remove: tuple[str, ...] = ()  # and delete these
    owner: tuple[str, ...] = ()  # whose contact: the caller's key's domains (() = relay)
    max_data: int | None = None  # octets of the contact's data as JSON, once merged


@dataclass(frozen=True, kw_only=True)
class Upserted:
    contact: Contact
    created: bool


class ContactQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: DbThread

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
            row = db.execute("INSERT INTO contact_events (contact_id, name, data, created_at)"
                             " VALUES (?, ?, ?, ?) RETURNING id",
                             (upserted.contact.id, name, json.dumps(data), now)).fetchone()
            return upserted, int(row[0])

        done: tuple[Upserted, int] = await self._write(op)
        return done

    async def get_contact(self, id_or_email: str, within: Within = None) -> Contact | None:
        """By id, within a caller's reach; by address, the caller's own contact (the one
        owned by exactly its domains, the one an upsert of the caller's changes)."""
        found: Contact | None = await self._reader.run(_find, id_or_email, within)
        return found

    async def list_contacts(self, *, limit: int = 100, after: str | None = None,
                            subscribed: bool | None = None,
                            within: Within = None) -> list[Contact]:
        """By address; `after` is the last address of the previous page."""
        def op(db: sqlite3.Connection) -> list[Contact]:
            clause, owner_args = owners.owner_sql(within)
            where: list[str] = [clause]
            args: list[Any] = list(owner_args)
            if after:
                where.append("email > ?")
                args.append(after)
            if subscribed is not None:
                where.append("subscribed = ?")
                args.append(int(subscribed))
            sql = f"SELECT {_COLUMNS} FROM contacts WHERE " + " AND ".join(where)
            return [_contact(r) for r in db.execute(sql + " ORDER BY email, owner LIMIT ?",
                                                    (*args, limit))]

        found: list[Contact] = await self._reader.run(op)
        return found

    async def contact_events(self, contact_id: str) -> list[tuple[str, dict[str, Any], float]]:
        """(name, data, time) of a contact's events, oldest first."""
        def op(db: sqlite3.Connection) -> list[tuple[str, dict[str, Any], float]]:
            return [(r[0], json.loads(r[1]), r[2]) for r in db.execute(
                "SELECT name, data, created_at FROM contact_events WHERE contact_id = ?"
                " ORDER BY id", (contact_id,))]

        found: list[tuple[str, dict[str, Any], float]] = await self._reader.run(op)
        return found

    async def delete_contact(self, id_or_email: str, within: Within = None) -> bool:
        """Deletes the contact `get_contact` would find for this caller."""
        def op(db: sqlite3.Connection) -> bool:
            found = _find(db, id_or_email, within)
            return found is not None and db.execute(
                "DELETE FROM contacts WHERE id = ?", (found.id,)).rowcount == 1

        done: bool = await self._write(op)
        return done


def _find(db: sqlite3.Connection, id_or_email: str, within: Within) -> Contact | None:
    if "@" not in id_or_email:
        row = db.execute(f"SELECT {_COLUMNS} FROM contacts WHERE id = ?",
                         (id_or_email,)).fetchone()
        found = _contact(row) if row else None
        return found if found is not None and owners.sees(within, found.owner) else None
    row = db.execute(f"SELECT {_COLUMNS} FROM contacts WHERE email = ? AND owner = ?",
                     (id_or_email, owners.encode(within or ()))).fetchone()
    return _contact(row) if row else None


def _upsert(db: sqlite3.Connection, change: ContactChange, now: float) -> Upserted:
    owner = owners.encode(change.owner)
    row = db.execute(f"SELECT {_COLUMNS} FROM contacts WHERE email = ? AND owner = ?",
                     (change.email, owner)).fetchone()
    if row is None:
        data = {k: v for k, v in change.data.items() if k not in change.remove}
        subscribed = (change.subscribed if change.subscribed is not None
                      else change.subscribed_if_new)
        contact = Contact(id=str(uuid.uuid4()), email=change.email, subscribed=subscribed,
                          data=data, created_at=now, updated_at=now,
                          owner=owners.decode(owner))
        db.execute(f"INSERT INTO contacts ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (contact.id, contact.email, int(contact.subscribed), _stored(data, change),
                    now, now, owner))
        return Upserted(contact=contact, created=True)
    old = _contact(row)
    data = {**old.data, **change.data}
    for name in change.remove:
        data.pop(name, None)
    subscribed = old.subscribed if change.subscribed is None else change.subscribed
    if data == old.data and subscribed == old.subscribed:
        return Upserted(contact=old, created=False)
    db.execute("UPDATE contacts SET subscribed = ?, data = ?, updated_at = ? WHERE id = ?",
               (int(subscribed), _stored(data, change), now, old.id))
    return Upserted(contact=Contact(id=old.id, email=old.email, subscribed=subscribed,
                                    data=data, created_at=old.created_at, updated_at=now,
                                    owner=old.owner),
                    created=False)


def _stored(data: dict[str, Any], change: ContactChange) -> str:
    """The data as stored, held to the change's limit once merged: it fills every later
    send's variables, so field after field must not grow it without bound."""
    text = json.dumps(data)
    if change.max_data is not None and len(text) > change.max_data:
        raise ValidationError(f"the contact's data would be {len(text)} octets as JSON; at "
                              f"most {change.max_data} ([limits] max_metadata_size)",
                              param="data")
    return text


def _contact(row: tuple[Any, ...]) -> Contact:
    return Contact(id=row[0], email=row[1], subscribed=bool(row[2]), data=json.loads(row[3]),
                   created_at=row[4], updated_at=row[5], owner=owners.decode(row[6]))
