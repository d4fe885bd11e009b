"""MTA-STS policies (RFC 8461) kept in the store: what delivery/mtasts.py fetched, so a
restart does not fetch them again and every node sharing the store uses the same."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .thread import DbThread


@dataclass(frozen=True, kw_only=True)
class CachedStsPolicy:
    """One domain's policy as fetched: the TXT record's id, the parsed fields, the text."""

    domain: str
    id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    fetched_at: float
    policy: str


class MtaStsQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: DbThread

    async def mta_sts_policy(self, domain: str) -> CachedStsPolicy | None:
        """The policy last saved for `domain`, expired or not."""
        found: CachedStsPolicy | None = await self._reader.run(_load, domain)
        return found

    async def save_mta_sts_policy(self, cached: CachedStsPolicy) -> None:
        """Saves the domain's policy, unless one fetched later is there already (another
        node's); policies past their max_age go (a domain that dropped MTA-STS)."""
        def op(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM mta_sts_policies WHERE fetched_at + max_age < ?"
                       " AND domain <> ?", (cached.fetched_at, cached.domain))
            db.execute(
                "INSERT INTO mta_sts_policies (domain, id, mode, mx, max_age, fetched_at,"
                " policy) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (domain) DO UPDATE SET"
                " id = excluded.id, mode = excluded.mode, mx = excluded.mx,"
                " max_age = excluded.max_age, fetched_at = excluded.fetched_at,"
                " policy = excluded.policy"
                " WHERE excluded.fetched_at >= mta_sts_policies.fetched_at",
                (cached.domain, cached.id, cached.mode, json.dumps(list(cached.mx)),
                 cached.max_age, cached.fetched_at, cached.policy))

        await self._write(op)


def _load(db: sqlite3.Connection, domain: str) -> CachedStsPolicy | None:
    row = db.execute("SELECT id, mode, mx, max_age, fetched_at, policy FROM mta_sts_policies"
                     " WHERE domain = ?", (domain,)).fetchone()
    if row is None:
        return None
    policy_id, mode, mx, max_age, fetched_at, text = row
    return CachedStsPolicy(domain=domain, id=policy_id, mode=mode, mx=tuple(json.loads(mx)),
                           max_age=int(max_age), fetched_at=float(fetched_at), policy=text)
