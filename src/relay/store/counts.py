"""The store's numbers for monitoring: how much waits in the queue and in the webhook outbox.

Read on the reader thread, never the writer's: a scrape must not wait behind a group commit
nor delay one. Both counts are index range scans (recipients_due on status, and the partial
webhook_outbox_due index), so they cost little however much history the tables keep.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from ..metrics import WAITING
from .thread import SQLiteThread


@dataclass(frozen=True)
class Counts:
    queue: dict[str, int]  # recipients by waiting status (every one of WAITING present)
    webhook_backlog: int  # outbox rows not yet delivered that will still be tried


class CountQueries:
    """Mixed into SQLiteStore."""

    _reader: SQLiteThread

    async def counts(self) -> Counts:
        found: Counts = await self._reader.run(_counts)
        return found


def _counts(db: sqlite3.Connection) -> Counts:
    queue = dict.fromkeys(WAITING, 0)
    marks = ",".join("?" * len(WAITING))
    for status, n in db.execute(f"SELECT status, count(*) FROM recipients"
                                f" WHERE status IN ({marks}) GROUP BY status", WAITING):
        queue[status] = n
    (backlog,) = db.execute("SELECT count(*) FROM webhook_outbox WHERE delivered_at IS NULL"
                            " AND next_attempt_at IS NOT NULL").fetchone()
    return Counts(queue=queue, webhook_backlog=backlog)
