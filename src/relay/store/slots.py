"""Cluster-wide delivery slots: at most N sessions to one destination across every node.

On PostgreSQL, a slot is a session-level advisory lock (destination's key, slot number)
held on a connection of this node's own: taking one is `pg_try_advisory_lock`, giving it
back `pg_advisory_unlock`, and a node that dies gives all of its back with its connection,
so nothing has to expire. A node never asks for a slot it already holds (the locks are
re-entrant within a connection). On SQLite one node owns the queue and its scheduler's
own semaphore is already the whole limit: `hold` is then free.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator
from typing import Any

from .thread import DbThread

RETRY = 0.25  # seconds between tries while every slot is held elsewhere


def key(destination: str) -> int:
    """A destination's advisory-lock key: a signed 32-bit number (a collision only makes
    two destinations share a limit)."""
    return zlib.crc32(destination.lower().encode()) - 2 ** 31


class Slots:
    def __init__(self, conn: DbThread | None) -> None:
        self._conn = conn  # None: SQLite
        self._held: dict[str, set[int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, destination: str, limit: int) -> AsyncIterator[int | None]:
        """One of `limit` slots for `destination`, waited for; yields its number (None on
        SQLite)."""
        if self._conn is None:
            yield None
            return
        slot = await self._take(destination, limit)
        try:
            yield slot
        finally:
            self._held[destination].discard(slot)
            if not self._held[destination]:
                del self._held[destination]
            with contextlib.suppress(Exception):  # a lost connection gave it back already
                await self._conn.run(_unlock, key(destination), slot)

    async def _take(self, destination: str, limit: int) -> int:
        assert self._conn is not None
        while True:
            mine = self._held.setdefault(destination, set())
            free = [n for n in range(limit) if n not in mine]
            slot = await self._conn.run(_try_lock, key(destination), free) if free else None
            if slot is not None:
                self._held.setdefault(destination, set()).add(slot)
                return int(slot)
            await asyncio.sleep(RETRY)


def _try_lock(db: Any, k: int, slots: list[int]) -> int | None:
    for n in slots:
        if db.execute("SELECT pg_try_advisory_lock(?, ?)", (k, n)).fetchone()[0]:
            return n
    return None


def _unlock(db: Any, k: int, slot: int) -> None:
    db.execute("SELECT pg_advisory_unlock(?, ?)", (k, slot))
