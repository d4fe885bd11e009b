"""Outbound shaping's shared state: sites a remote's reply held back (every node and
`relay queue` see them) and the messages each source address sent per day (warm-up caps
hold across nodes)."""

from __future__ import annotations

import datetime
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .thread import DbThread


@dataclass(frozen=True, kw_only=True)
class SiteHold:
    site: str
    until: float
    rate: float | None  # messages per second while held; None: suspended (no sessions)
    reason: str  # the reply that matched
    since: float


class ShapingQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: DbThread

    async def site_holds(self, now: float) -> list[SiteHold]:
        """The holds in force at `now`."""
        rows = await self._reader.run(lambda db: db.execute(
            "SELECT site, until, rate, reason, since FROM site_backoff WHERE until > ?"
            " ORDER BY site", (now,)).fetchall())
        return [SiteHold(site=r[0], until=r[1], rate=r[2], reason=r[3], since=r[4])
                for r in rows]

    async def hold_site(self, hold: SiteHold) -> None:
        """Record a hold; a longer one already in force stands. Lapsed holds go."""
        def op(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM site_backoff WHERE until <= ?", (hold.since,))
            db.execute(
                "INSERT INTO site_backoff (site, until, rate, reason, since)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (site) DO UPDATE SET until = excluded.until,"
                " rate = excluded.rate, reason = excluded.reason, since = excluded.since"
                " WHERE site_backoff.until < excluded.until",
                (hold.site, hold.until, hold.rate, hold.reason, hold.since))

        await self._write(op)

    async def release_site(self, site: str) -> bool:
        """End a site's hold now (`relay queue release-site`); False when there was none."""
        def op(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM site_backoff WHERE site = ?", (site,)).rowcount > 0

        released: bool = await self._write(op)
        return released

    async def take_source_quota(self, address: str, day: str, count: int, cap: int) -> int:
        """Up to `count` of `address`'s `cap` messages on `day`, taken at once across nodes;
        returns how many were granted (0 when the day's cap is spent)."""
        def op(db: sqlite3.Connection) -> int:
            sent = int(db.execute(
                "INSERT INTO source_usage (address, day, sent) VALUES (?, ?, ?)"
                " ON CONFLICT (address, day) DO UPDATE SET sent = source_usage.sent + excluded.sent"
                " RETURNING sent", (address, day, count)).fetchone()[0])
            over = max(0, min(count, sent - cap))
            if over:
                db.execute("UPDATE source_usage SET sent = sent - ? WHERE address = ? AND day = ?",
                           (over, address, day))
            db.execute("DELETE FROM source_usage WHERE day < ?", (_days_before(day, 31),))
            return count - over

        granted: int = await self._write(op)
        return granted

    async def source_usage(self, addresses: Sequence[str], day: str) -> dict[str, int]:
        if not addresses:
            return {}
        rows = await self._reader.run(lambda db: db.execute(
            f"SELECT address, sent FROM source_usage WHERE day = ? AND address IN"
            f" ({','.join('?' * len(addresses))})", (day, *addresses)).fetchall())
        return {r[0]: int(r[1]) for r in rows}


def _days_before(day: str, days: int) -> str:
    return (datetime.date.fromisoformat(day) - datetime.timedelta(days=days)).isoformat()
