"""The store's numbers for monitoring: how much waits in the queue and in the webhook outbox.

Read on the reader thread, never the writer's: a scrape (or systemd's STATUS= line, or the
dashboard) must not wait behind a group commit nor delay one. Both counts are index range
scans (recipients_due on status, and the partial webhook_outbox_due index), so they cost
little however much history the tables keep.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from ..types import WAITING_STATUSES
from .thread import DbThread


@dataclass(frozen=True)
class Counts:
    queue: dict[str, int]  # recipients by waiting status (every one of WAITING present)
    webhook_backlog: int  # outbox rows not yet delivered that will still be tried


WAITING_SQL = (f"SELECT status, count(*) FROM recipients WHERE status IN"
               f" ({','.join('?' * len(WAITING_STATUSES))}) GROUP BY status")


class CountQueries:
    """Mixed into SQLiteStore."""

    _reader: DbThread

    async def counts(self) -> Counts:
        found: Counts = await self._reader.run(_counts)
        return found

    async def count_waiting(self) -> dict[str, int]:
        """Recipients per waiting status, every one named (0 when none)."""
        found: dict[str, int] = await self._reader.run(waiting)
        return found


def waiting(db: sqlite3.Connection) -> dict[str, int]:
    """Recipients per waiting status, through the recipients_due index (status first)."""
    queue = dict.fromkeys(WAITING_STATUSES, 0)
    queue.update(db.execute(WAITING_SQL, WAITING_STATUSES))
    return queue


def _counts(db: sqlite3.Connection) -> Counts:
    queue = waiting(db)
    (backlog,) = db.execute("SELECT count(*) FROM webhook_outbox WHERE delivered_at IS NULL"
                            " AND next_attempt_at IS NOT NULL").fetchone()
    return Counts(queue=queue, webhook_backlog=backlog)
