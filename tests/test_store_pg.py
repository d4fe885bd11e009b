"""Many nodes on one PostgreSQL queue: claims never overlap, a node frees only its own
leases, NOTIFY wakes the others, and the PostgreSQL schema keeps up with SQLite's."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import pytest

from relay.store import SQLiteStore, schema, schema_pg
from relay.store.pgconn import translate
from relay.types import WebhookEndpoint

from .test_store import new_message

Two = tuple[SQLiteStore, SQLiteStore]


@pytest.fixture
async def two(pg_url: str) -> AsyncIterator[Two]:
    """Two nodes' stores on one database, closed after the test."""
    a, b = SQLiteStore(pg_url, node="node-a"), SQLiteStore(pg_url, node="node-b")
    await a.open()
    await b.open()
    yield a, b
    await a.close()
    await b.close()


def test_every_sqlite_migration_after_the_baseline_has_a_postgresql_twin() -> None:
    newer = range(schema_pg.BASELINE_VERSION + 1, len(schema.MIGRATIONS) + 1)
    assert sorted(schema_pg.MIGRATIONS) == list(newer)


def test_placeholders_are_numbered_outside_quotes_and_comments() -> None:
    text, rows = translate("SELECT '?', \"a?\", x FROM t -- why?\nWHERE a = ? AND b = ?")
    assert text == "SELECT '?', \"a?\", x FROM t -- why?\nWHERE a = $1 AND b = $2"
    assert rows
    assert translate("UPDATE t SET a = ? WHERE b = 'RETURNING'") == (
        "UPDATE t SET a = $1 WHERE b = 'RETURNING'", False)
    assert translate("UPDATE t SET a = ? RETURNING id")[1]
    assert translate("BEGIN IMMEDIATE") == ("BEGIN", False)


async def test_two_nodes_never_lease_the_same_recipient(two: Two) -> None:
    a, b = two
    await asyncio.gather(*(a.enqueue(new_message(i, created_at=time.time() - 60))
                           for i in range(300)))
    now = time.time()
    got = await asyncio.gather(*(s.lease_due(now, 20, 600) for _ in range(12)
                                 for s in (a, b)))
    ids = [r.id for batch in got for r in batch]
    assert len(ids) == 300 and len(set(ids)) == 300  # all taken, none twice
    holders = await a._reader.run(lambda db: db.execute(
        "SELECT leased_by, count(*) FROM recipients GROUP BY leased_by").fetchall())
    assert {h for h, _ in holders} == {"node-a", "node-b"}
    # node-a starts again: its leases are void, node-b's stand
    freed = await a.recover()
    assert freed == dict(holders)["node-a"]
    again = await b.lease_due(time.time(), 1000, 600)
    assert len(again) == freed


async def test_a_dead_nodes_lease_lapses_for_the_others(two: Two) -> None:
    a, b = two
    await a.enqueue(new_message(1, created_at=time.time() - 60))
    now = time.time()
    assert len(await a.lease_due(now, 10, 5)) == 1
    assert await b.lease_due(now + 1, 10, 5) == []  # held
    assert len(await b.lease_due(now + 6, 10, 5)) == 1  # lapsed: b takes it


async def test_two_nodes_never_lease_the_same_webhook_delivery(two: Two) -> None:
    a, b = two
    await a.add_endpoint(WebhookEndpoint(id="wh_1", url="https://hooks.example/x",
                                        secret="s" * 32, events=(), enabled=True,
                                        created_at=time.time()))
    await asyncio.gather(*(a.enqueue(new_message(i, created_at=time.time() - 60))
                           for i in range(100)))
    now = time.time() + 10
    got = await asyncio.gather(*(s.lease_deliveries(now, 10, 120) for _ in range(8)
                                 for s in (a, b)))
    ids = [d.outbox_id for batch in got for d in batch]
    assert len(ids) == 100 and len(set(ids)) == 100


async def test_a_message_queued_on_one_node_wakes_the_other(two: Two) -> None:
    a, b = two
    woken = asyncio.Event()
    listener = await b.listen(woken.set)
    assert listener is not None
    try:
        await asyncio.wait_for(listener.listening.wait(), 10)
        woken.clear()  # the wake every connect gives
        await a.enqueue(new_message(1))
        await asyncio.wait_for(woken.wait(), 5)
    finally:
        await listener.close()


async def test_sqlite_has_nothing_to_listen_to(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = SQLiteStore(tmp_path / "q.sqlite")
    await s.open()
    try:
        assert await s.listen(lambda: None) is None
    finally:
        await s.close()


async def test_a_deadlock_between_nodes_is_run_again(two: Two) -> None:
    """Two batches that lock two rows in opposite orders: PostgreSQL kills one of them as a
    deadlock, and the writer runs it again instead of failing its callers."""
    a, b = two
    first, second = new_message(1), new_message(2)
    await a.enqueue(first)
    await a.enqueue(second)
    both = threading.Barrier(2)  # each holds its first row before taking the other's
    runs: list[str] = []

    def locker(one: str, two: str):  # type: ignore[no-untyped-def]
        def op(db):  # type: ignore[no-untyped-def]
            runs.append(one)
            db.execute("UPDATE messages SET subject = 'x' WHERE id = ?", (one,))
            if runs.count(one) == 1:
                both.wait(10)
            db.execute("UPDATE messages SET subject = 'y' WHERE id = ?", (two,))
            return "done"
        return op

    results = await asyncio.wait_for(asyncio.gather(
        a._write(locker(first.id, second.id)), b._write(locker(second.id, first.id))), 30)
    assert results == ["done", "done"]
    assert len(runs) == 3  # one of them ran twice


@pytest.mark.parametrize("bad", ["postgresql://relay@127.0.0.1:1/none"])
async def test_an_unreachable_database_is_a_store_error(bad: str) -> None:
    from relay.errors import StoreError

    with pytest.raises(StoreError, match="cannot connect to PostgreSQL"):
        await SQLiteStore(bad).open()


async def test_the_per_destination_limit_holds_across_nodes(two: Two) -> None:
    """Limit 2 to a destination: node A holds both slots, so node B waits until A gives
    one back; another destination is not held up; a dead node's slots come back."""
    a, b = two
    async with a.slots.hold("mx.example", 2) as first, a.slots.hold("mx.example", 2) as second:
        assert {first, second} == {0, 1}
        waiting = asyncio.create_task(b.slots.hold("mx.example", 2).__aenter__())
        await asyncio.sleep(0.6)
        assert not waiting.done()  # both of the cluster's slots are A's
        async with b.slots.hold("other.example", 2) as other:
            assert other == 0
    assert await asyncio.wait_for(waiting, 5) in (0, 1)
    # node B dies holding it: its connection goes, and the slot with it
    await b.close()
    async with a.slots.hold("mx.example", 1) as again:
        assert again == 0


async def test_one_idempotency_key_sent_to_two_nodes_at_once_queues_one_message(
        two: Two) -> None:
    a, b = two
    for round_ in range(20):
        key = f"k{round_}"
        results = await asyncio.gather(
            a.enqueue(new_message(1, idempotency_key=key, idempotency_scope="rk_a")),
            b.enqueue(new_message(2, idempotency_key=key, idempotency_scope="rk_a")))
        assert len({r.message_id for r in results}) == 1, results
        assert sorted(r.duplicate for r in results) == [False, True]
    assert len((await a.list_messages(limit=100)).items) == 20


async def test_a_domain_added_on_one_node_changes_the_signing_version_on_the_other(
        two: Two, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The delivery worker's keyring looks at signing_version once a second and re-reads
    the keys when it changed (render.KeyRing), on PostgreSQL as on SQLite."""
    from relay import domains

    from .conftest import make_config

    a, b = two
    before = await b.signing_version()
    await a.save_domain(domains.make_domain(make_config(tmp_path), "pg-late.test", time.time()))
    after = await b.signing_version()
    assert after != before and after == await a.signing_version()
    assert {k.domain for k in await b.signing_keys()} >= {"pg-late.test"}
