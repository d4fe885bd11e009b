"""The store on both backends (SQLite, PostgreSQL): schema, group commit, isolation of a bad
write, durability settings."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from relay.delivery.leases import Leases
from relay.errors import StoreError
from relay.store import NewMessage, NewRecipient, SQLiteStore
from relay.store.delivery import NEXT_DUE, PICK_DUE, DueRecipient, on_pending
from relay.store.operator import Selector, list_query
from relay.store.pgconn import is_postgresql, skip_locked
from relay.store.schema import MIGRATIONS
from relay.submit import new_message_id


def new_message(i: int = 0, **kw: object) -> NewMessage:
    fields: dict[str, object] = dict(
        id=new_message_id(), created_at=1_800_000_000.0 + i, mail_from="a@example.com",
        recipients=(NewRecipient(address=f"r{i}@example.org", domain="example.org"),),
        body=b"From: a@example.com\r\n\r\nbody\r\n", source="smtp")
    fields.update(kw)
    return NewMessage(**fields)  # type: ignore[arg-type]


@pytest.fixture
async def store(store_url: str):  # type: ignore[no-untyped-def]
    s = SQLiteStore(store_url)
    await s.open()
    yield s
    await s.close()


async def test_wal_and_synced_commits(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "q.sqlite")
    await store.open()
    assert store.writer is not None
    async with store.writer.conn.execute("PRAGMA journal_mode") as cur:
        assert (await cur.fetchone()) == ("wal",)
    # the writer syncs each commit itself (store/walsync.py; tests/test_groupcommit.py), as
    # FULL would inside the commit; every other connection is FULL
    async with store.writer.conn.execute("PRAGMA synchronous") as cur:
        assert (await cur.fetchone()) == (1,)  # NORMAL
    async with store._reader.execute("PRAGMA synchronous") as cur:
        assert (await cur.fetchone()) == (2,)  # FULL
    assert store.path is not None and (store.path.stat().st_mode & 0o777) == 0o600
    await store.close()


async def test_schema_is_versioned_and_reopening_is_idempotent(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "q.sqlite")
    await s.open()
    await s.close()
    await s.open()
    async with s._reader.execute("SELECT version FROM schema_version") as cur:
        assert await cur.fetchall() == [(len(MIGRATIONS),)]
    await s.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    async with aiosqlite.connect(path) as conn:
        await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        await conn.execute("INSERT INTO schema_version VALUES (999)")
        await conn.commit()
    with pytest.raises(StoreError, match="newer than this relay knows"):
        await SQLiteStore(path).open()


async def test_concurrent_writes_share_one_commit(store: SQLiteStore) -> None:
    assert store.writer is not None
    before = store.writer.batches
    results = await asyncio.gather(*(store.enqueue(new_message(i)) for i in range(50)))
    assert len({r.message_id for r in results}) == 50
    commits = store.writer.batches - before
    assert commits < 50  # grouped: far fewer fsyncs than messages
    page = await store.list_messages(limit=100)
    assert len(page.items) == 50


async def test_one_bad_write_does_not_fail_its_batch(store: SQLiteStore) -> None:
    dup = new_message(1)
    await store.enqueue(dup)
    outcomes = await asyncio.gather(
        store.enqueue(new_message(2)), store.enqueue(dup), store.enqueue(new_message(3)),
        return_exceptions=True)
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    assert not isinstance(outcomes[0], BaseException) and not isinstance(outcomes[2], BaseException)
    assert len((await store.list_messages()).items) == 3


async def test_failed_commit_leaves_nothing_half_written(store: SQLiteStore) -> None:
    assert store.writer is not None
    read_only = ("SET default_transaction_read_only = {}" if store.postgresql
                 else "PRAGMA query_only = {}")
    await store.writer.conn.execute(read_only.format("on"))
    with pytest.raises(StoreError):
        await store.enqueue(new_message(1))
    await store.writer.conn.execute(read_only.format("off"))
    for table in ("messages", "bodies", "recipients", "events"):
        async with store._reader.execute(f"SELECT count(*) FROM {table}") as cur:
            assert await cur.fetchone() == (0,), table


async def test_enqueue_records_queued_events(store: SQLiteStore) -> None:
    m = new_message(1, recipients=(NewRecipient(address="x@a.org", domain="a.org"),
                                   NewRecipient(address="y@b.org", domain="b.org")))
    await store.enqueue(m)
    detail = await store.get_message(m.id)
    assert detail is not None
    assert [e.type for e in detail.events] == ["email.queued", "email.queued"]
    assert [e.data["email"] for e in detail.events] == ["x@a.org", "y@b.org"]
    assert await store.get_body(m.id) == m.body


async def test_idempotency_key_returns_the_first_message(store: SQLiteStore) -> None:
    first = new_message(1, idempotency_key="k1", idempotency_scope="rk_a")
    again = new_message(2, idempotency_key="k1", idempotency_scope="rk_a")
    other_scope = new_message(3, idempotency_key="k1", idempotency_scope="rk_b")
    r1, r2, r3 = (await store.enqueue(first), await store.enqueue(again),
                  await store.enqueue(other_scope))
    assert r2.duplicate and r2.message_id == r1.message_id == first.id
    assert not r3.duplicate
    assert len((await store.list_messages()).items) == 2


async def test_idempotency_window_is_24_hours(store: SQLiteStore) -> None:
    first = new_message(0, idempotency_key="k")
    later = new_message(0, idempotency_key="k", created_at=first.created_at + 24 * 3600 + 1)
    await store.enqueue(first)
    assert not (await store.enqueue(later)).duplicate


async def test_list_messages_paginates_newest_first(store: SQLiteStore) -> None:
    ids = [(await store.enqueue(new_message(i))).message_id for i in range(5)]
    page1 = await store.list_messages(limit=2)
    assert [d.message.id for d in page1.items] == ids[::-1][:2]
    page2 = await store.list_messages(limit=2, cursor=page1.next_cursor)
    assert [d.message.id for d in page2.items] == ids[::-1][2:4]
    page3 = await store.list_messages(limit=2, cursor=page2.next_cursor)
    assert [d.message.id for d in page3.items] == ids[:1] and page3.next_cursor is None


async def test_message_ids_sort_by_time() -> None:
    a, b = new_message_id(1_800_000_000.0), new_message_id(1_800_000_000.002)
    assert a.startswith("msg_") and len(a) == 30 and a < b


def test_message_id_is_its_time_and_eighty_random_bits() -> None:
    """26 Crockford characters of one 130-bit number: 48 bits of milliseconds first, then 80
    random bits, then two zero bits; however the characters are made."""
    alphabet = "0123456789abcdefghjkmnpqrstvwxyz"
    ids = [new_message_id((1_800_000_000_123 + i + 0.5) / 1000) for i in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    randoms = []
    for i, mid in enumerate(ids):
        value = 0
        for ch in mid.removeprefix("msg_"):
            value = value << 5 | alphabet.index(ch)
        assert value >> 82 == 1_800_000_000_123 + i and value & 3 == 0
        randoms.append(value >> 2 & (1 << 80) - 1)
    # every one of the 80 bits is random: each is set in about half the ids
    for bit in range(80):
        ones = sum(r >> bit & 1 for r in randoms)
        assert 800 < ones < 1200, (bit, ones)


# -- picking due work on a long queue (issue 23) -------------------------------------------


def _plan(db: Any, sql: str, args: tuple[Any, ...]) -> str:
    """The query's plan as one text: SQLite's EXPLAIN QUERY PLAN details, or PostgreSQL's
    EXPLAIN with sequential scans priced out (a test's few rows would be read whole)."""
    if is_postgresql(db):
        db.execute("SET enable_seqscan = off")
        try:
            return "\n".join(r[0] for r in db.execute("EXPLAIN " + sql, args).fetchall())
        finally:
            db.execute("RESET enable_seqscan")
    return "\n".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall())


async def test_a_pick_walks_the_pending_index_and_sorts_nothing(store: SQLiteStore) -> None:
    """A pick and the idle scheduler's next-due question read the pending recipients in
    next_attempt_at order from recipients_pending and stop at their LIMIT: no temp b-tree
    (SQLite) or Sort (PostgreSQL) over every pending row, which made each pick O(n)."""
    for i in range(3):
        await store.enqueue(new_message(i))
    now = 1_900_000_000.0

    def plans(db: Any) -> tuple[str, str]:
        pick = on_pending(PICK_DUE, db) + skip_locked(db)
        return _plan(db, pick, (now, now, 100)), _plan(db, on_pending(NEXT_DUE, db), ())

    pick, nxt = await store._reader.run(plans)
    for plan in (pick, nxt):
        assert "recipients_pending" in plan, plan
        assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan
        assert "SCAN recipients" not in plan and "Seq Scan" not in plan, plan


async def test_a_pick_takes_the_soonest_due_and_passes_leased_and_held(
        store: SQLiteStore) -> None:
    ids = [(await store.enqueue(new_message(i))).message_id for i in (5, 1, 3, 2, 4)]
    at = {m: 1_800_000_000.0 + i for m, i in zip(ids, (5, 1, 3, 2, 4))}
    await store.hold(ids[1], "test", 1_800_000_000.0)  # due first, but held: never picked

    def soonest_first(due: list[DueRecipient]) -> list[str]:
        return sorted((r.message_id for r in due), key=at.__getitem__)

    # at +3.5: +2 and +3 are due (+1 is held, +4 and +5 are not due yet)
    assert soonest_first(await store.lease_due(1_800_000_003.5, 10, 600)) == [ids[3], ids[2]]
    assert await store.next_due_at() == at[ids[4]]  # +4: the soonest neither leased nor held
    now = 1_800_000_100.0
    assert soonest_first(await store.lease_due(now, 1, 600)) == [ids[4]]  # the LIMIT
    assert soonest_first(await store.lease_due(now, 10, 600)) == [ids[0]]
    assert await store.lease_due(now, 10, 600) == []  # every one is leased
    assert await store.next_due_at() is None
    assert len(await store.lease_due(now + 700, 10, 600)) == 4  # leases lapse


async def test_held_leases_are_renewed_and_a_lapsed_one_is_never_sent(
        store: SQLiteStore) -> None:
    """A scheduler renews the leases of the work it holds, so a later pick passes them; what
    was recorded, held by an operator, or lapsed by the scheduler's own clock (the store
    could not be written in time) is let go, and a lapsed one is not sendable."""
    ids = [(await store.enqueue(new_message(i))).message_id for i in range(4)]
    now = [1_800_000_100.0]
    leases = Leases(store, 600.0, lambda: now[0])
    due = await store.lease_due(now[0], 10, 600)
    leases.taken((r.id for r in due), now[0])
    by_message = {r.message_id: r.id for r in due}
    await store.hold(ids[1], "test", now[0])  # the operator holds one meanwhile
    leases.done([by_message[ids[2]]])  # one was recorded
    now[0] += 500  # 100 s of the lease left: renewed a whole lease ahead
    await leases.renew()
    # past the first lease only the one let go is picked again
    assert [r.message_id for r in await store.lease_due(now[0] + 400, 10, 600)] == [ids[2]]
    keep, lapse = leases.sendable(by_message.values())
    assert sorted(keep) == sorted([by_message[ids[0]], by_message[ids[3]]])
    now[0] += 590  # the renewals failed: 10 s left, less than the margin: not sent
    keep, lapse = leases.sendable([by_message[ids[0]]])
    assert (keep, lapse) == ([], [by_message[ids[0]]])
    now[0] += 20  # lapsed by its own clock: never renewed again, though the store has it
    await leases.renew()
    assert leases.sendable([by_message[ids[3]]]) == ([], [by_message[ids[3]]])


async def test_listing_a_rare_status_looks_its_recipients_up(store: SQLiteStore) -> None:
    """`queue list --status held` on a queue of queued mail: the few held recipients are
    found through recipients_due, not by walking every message newest first (which read a
    million messages to list none)."""
    ids = [(await store.enqueue(new_message(i))).message_id for i in range(6)]
    for held in (ids[1], ids[4]):
        await store.hold(held, "test", 1_800_000_010.0)
    held_sel = Selector(statuses=("held",))
    assert await store.select_messages(held_sel, 10) == [ids[4], ids[1]]  # newest first
    assert await store.select_messages(held_sel, 1) == [ids[4]]
    assert await store.select_messages(Selector(statuses=("held",), domain="example.org",
                                                created_before=1_800_000_004.0), 10) == [ids[1]]
    assert await store.select_messages(Selector(statuses=("queued",)), 2) == [ids[5], ids[3]]
    plan = await store._reader.run(lambda db: _plan(db, *list_query(db, held_sel, 10)))
    assert "recipients_due" in plan and "messages_created" not in plan, plan
