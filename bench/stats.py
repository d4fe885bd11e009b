#!/usr/bin/env python3
"""How long `GET /v1/stats` (the dashboard's numbers, store/stats.py) takes on a big queue.

Seeds a store with N recipients over 500 domains (8 in 11 delivered, the rest deferred,
bounced or queued) and E events spread over 7 days, then times `store.stats()` and prints
each query's plan (each must SEARCH an index, never SCAN a table). The dashboard asks once
every 10 seconds per open tab.

    python bench/stats.py [recipients=100000] [events=500000]
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from relay.store import SQLiteStore
from relay.store.stats import FAILURES, LIVE, OUTCOMES

KINDS = ["email.queued", "email.delivered", "email.delivered", "email.deferred",
         "email.bounced", "email.opened"]


def marks(values: tuple[str, ...]) -> str:
    return ", ".join("?" * len(values))


def seed(path: Path, recipients: int, events: int, now: float) -> None:
    """Straight into SQLite: the store's own write path would take minutes for this many."""
    rng = random.Random(19)
    statuses = ["delivered"] * 8 + ["deferred", "bounced", "queued"]
    db = sqlite3.connect(path)
    db.executemany("INSERT INTO messages (id, created_at, mail_from, size, source)"
                   " VALUES (?, ?, 'a@b.test', 100, 'api')",
                   [(f"m{i}", now - rng.uniform(0, 7 * 86400)) for i in range(recipients)])
    db.executemany("INSERT INTO recipients (message_id, address, domain, status, updated_at)"
                   " VALUES (?, ?, ?, ?, ?)",
                   [(f"m{i}", f"u{i}@d{i % 500}.test", f"d{i % 500}.test",
                     rng.choice(statuses), now) for i in range(recipients)])
    data = json.dumps({"email": "u@d.test", "reply": "5.1.1 no such user", "code": 550,
                       "reason": "userunknown"})
    db.executemany("INSERT INTO events (message_id, recipient_id, type, created_at, data)"
                   " VALUES (?, ?, ?, ?, ?)",
                   [(f"m{i % recipients}", i % recipients + 1, rng.choice(KINDS),
                     now - rng.uniform(0, 7 * 86400), data) for i in range(events)])
    db.commit()
    for sql, args in (
            ((f"SELECT type, count(*) FROM events WHERE type IN ({marks(OUTCOMES)})"
              " AND created_at >= ? AND created_at <= ? GROUP BY 1"),
             (*OUTCOMES, now - 86400, now)),
            ((f"SELECT data FROM events WHERE type IN ({marks(FAILURES)}) AND created_at >= ?"
              " ORDER BY created_at DESC, id DESC LIMIT 25"), (*FAILURES, now - 86400)),
            ((f"SELECT domain, status, count(*) FROM recipients WHERE status IN ({marks(LIVE)})"
              " GROUP BY domain, status"), LIVE)):
        plan = db.execute("EXPLAIN QUERY PLAN " + sql, args)
        print("  plan:", "; ".join(r[3] for r in plan))
    db.close()


async def main(recipients: int, events: int) -> None:
    path = Path(tempfile.mkdtemp()) / "queue.db"
    store = SQLiteStore(path)
    await store.open()  # the schema, with its indexes
    await store.close()
    now = time.time()
    seed(path, recipients, events, now)
    await store.open()
    try:
        start = time.perf_counter()
        stats = await store.stats(now)
        first = time.perf_counter() - start
        runs = 10
        start = time.perf_counter()
        for _ in range(runs):
            await store.stats(now)
        each = (time.perf_counter() - start) / runs
    finally:
        await store.close()
    day = sum(sum(h.counts.values()) for h in stats.hours)
    print(f"{recipients} recipients, {events} events ({day} outcomes in the last 24 h): "
          f"stats {first * 1000:.0f} ms cold, {each * 1000:.0f} ms warm")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    asyncio.run(main(*(args + [100_000, 500_000][len(args):])))
