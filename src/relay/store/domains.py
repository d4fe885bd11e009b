"""Sending domains and their DKIM keys in the SQLite store (the private halves stay in files)."""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable
from typing import Any

from ..types import DkimKeyInfo, Domain
from .thread import DbThread

ID_PREFIX = "dom_"  # a domain name holds no "_", so an id is never taken for a name
_KEY_COLUMNS = ("domain, selector, algorithm, public_key, path, state, created_at, activated_at,"
                " retire_after")


class DomainQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: DbThread

    async def save_domain(self, domain: Domain, *, replace: bool = False) -> None:
        """Insert the domain with its keys; with `replace`, its old keys are dropped first.
        Raises ValueError when it exists and `replace` is false. A domain saved anew gets
        its id here (its own, if it has one); a replaced one keeps the id it had."""
        def op(db: sqlite3.Connection) -> None:
            exists = db.execute("SELECT 1 FROM domains WHERE name = ?", (domain.name,)).fetchall()
            if exists and not replace:
                raise ValueError(f"{domain.name} exists")
            db.execute("DELETE FROM dkim_keys WHERE domain = ?", (domain.name,))
            db.execute("INSERT INTO domains (name, created_at, return_path, id)"
                       " VALUES (?, ?, ?, ?)"
                       " ON CONFLICT (name) DO UPDATE SET return_path = excluded.return_path",
                       (domain.name, domain.created_at, domain.return_path,
                        domain.id or new_domain_id()))
            db.executemany(
                f"INSERT INTO dkim_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(k.domain, k.selector, k.algorithm, k.public_key, k.path, k.state,
                  k.created_at, k.activated_at, k.retire_after) for k in domain.keys])

        await self._write(op)

    async def get_domain(self, name: str) -> Domain | None:
        found: list[Domain] = await self._reader.run(_domains, name)
        return found[0] if found else None

    async def domain_by_id(self, domain_id: str) -> Domain | None:
        def op(db: sqlite3.Connection) -> list[Domain]:
            row = db.execute("SELECT name FROM domains WHERE id = ?", (domain_id,)).fetchone()
            return _domains(db, row[0]) if row else []

        found: list[Domain] = await self._reader.run(op)
        return found[0] if found else None

    async def list_domains(self) -> list[Domain]:
        found: list[Domain] = await self._reader.run(_domains, None)
        return found

    async def remove_domain(self, name: str) -> bool:
        def op(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM domains WHERE name = ?", (name,)).rowcount == 1

        removed: bool = await self._write(op)
        return removed

    async def return_paths(self) -> dict[str, str]:
        """{domain: its return-path host}, for the envelope sender of its mail."""
        def op(db: sqlite3.Connection) -> dict[str, str]:
            return dict(db.execute("SELECT name, return_path FROM domains").fetchall())

        paths: dict[str, str] = await self._reader.run(op)
        return paths

    async def signing_version(self) -> tuple[object, ...]:
        """What changes when a domain is added or removed or a key activated (their counts
        and latest times): the delivery worker re-reads its keys when it does."""
        def op(db: sqlite3.Connection) -> tuple[object, ...]:
            return tuple(db.execute(
                "SELECT (SELECT count(*) FROM domains), (SELECT max(created_at) FROM domains),"
                " count(*), max(created_at), max(activated_at) FROM dkim_keys"
                " WHERE state = 'active'").fetchone())

        version: tuple[object, ...] = await self._reader.run(op)
        return version

    async def signing_keys(self) -> list[DkimKeyInfo]:
        """Every active key of every domain."""
        def op(db: sqlite3.Connection) -> list[DkimKeyInfo]:
            return [_key_row(r) for r in db.execute(
                f"SELECT {_KEY_COLUMNS} FROM dkim_keys WHERE state = 'active'"
                " ORDER BY domain, algorithm DESC")]

        keys: list[DkimKeyInfo] = await self._reader.run(op)
        return keys


def _domains(db: sqlite3.Connection, name: str | None) -> list[Domain]:
    where, args = ("WHERE name = ?", (name,)) if name is not None else ("", ())
    domains = db.execute(
        f"SELECT name, created_at, return_path, id FROM domains {where} ORDER BY name", args
    ).fetchall()
    keys: dict[str, list[DkimKeyInfo]] = {}
    key_where = "WHERE domain = ?" if name is not None else ""
    for r in db.execute(f"SELECT {_KEY_COLUMNS} FROM dkim_keys {key_where}"
                        " ORDER BY created_at, algorithm DESC", args):
        keys.setdefault(r[0], []).append(_key_row(r))
    return [Domain(name=d[0], created_at=d[1], return_path=d[2], keys=tuple(keys.get(d[0], ())),
                   id=d[3]) for d in domains]


def new_domain_id() -> str:
    """"dom_" and 64 random bits in hex, as migration 20 gave the domains that existed."""
    return ID_PREFIX + secrets.token_hex(8)


def _key_row(r: sqlite3.Row | tuple[Any, ...]) -> DkimKeyInfo:
    return DkimKeyInfo(domain=r[0], selector=r[1], algorithm=r[2], public_key=r[3], path=r[4],
                       state=r[5], created_at=r[6], activated_at=r[7], retire_after=r[8])
