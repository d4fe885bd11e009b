"""The store's group commit.

The SQLite writers of every process take turns by the store's write lock (an flock beside
the file): a commit waits while another process holds it, and goes ahead once it is given
back. Another relay process is stood in for by a second open file description of the lock
file, which flock treats as another owner; the wait is seen in /proc/locks, where a blocked
flock is listed with "->".

A write nobody waits on (the delivery worker's leases and outcomes) lingers to share a
commit with those that follow; any other write ends the wait."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import sqlite3
import threading
import time
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any

import pytest

from relay import metrics
from relay.errors import StoreError
from relay.store import SQLiteStore
from relay.store import walsync
from relay.store.groupcommit import LINGER_MAX, GroupCommitWriter
from relay.store.delivery import Outcome
from relay.types import EventType, RecipientStatus

from .test_store import new_message
from .test_webhooks import until


def lock_waited() -> float:
    """This process's seconds waited for the writers' lock, as /metrics says them."""
    return metrics.REGISTRY.get_sample_value(
        "relay_store_lock_wait_seconds_sum", {"process": metrics.SETUP.process}) or 0.0


def waiting_for_flock() -> bool:
    """A thread of this process is blocked on an flock."""
    me = str(os.getpid())
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and "FLOCK" in fields and me in fields:
            return True
    return False


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks")
async def test_a_commit_waits_while_another_process_holds_the_write_lock(
        tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "relay.sqlite")
    await store.open()
    other = os.open(tmp_path / "relay.sqlite-writer.lock", os.O_RDWR)
    waited_before = lock_waited()
    try:
        fcntl.flock(other, fcntl.LOCK_EX)  # another process's writer, mid-transaction
        queued = asyncio.create_task(store.enqueue(new_message(1)))
        await until(waiting_for_flock, timeout=10)
        assert not queued.done()
        await asyncio.sleep(0.2)
        fcntl.flock(other, fcntl.LOCK_UN)
        result = await asyncio.wait_for(queued, timeout=10)
        assert await store.get_message(result.message_id) is not None
        # the wait is counted (relay_store_lock_wait_seconds), for an operator to see
        assert lock_waited() - waited_before >= 0.2
        # and the lock is given back after each transaction: the other process gets it
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_UN)
    finally:
        os.close(other)
        await store.close()


# -- each commit synced by the writer, out of the lock, before anyone is answered ------------

class HeldSync:
    """os.fdatasync and os.fsync as relay's writer calls them, each held until let go: what
    was synced, by path, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, error: OSError | None = None) -> None:
        self.synced: list[str] = []
        self.entered = threading.Event()
        self.go = threading.Event()
        self._error = error
        real_fdatasync, real_fsync = os.fdatasync, os.fsync

        def held(real: Any) -> Any:
            def call(fd: int) -> None:
                self.synced.append(os.readlink(f"/proc/self/fd/{fd}"))
                self.entered.set()
                assert self.go.wait(10)
                if self._error is not None:
                    raise self._error
                real(fd)
            return call

        monkeypatch.setattr(walsync.os, "fdatasync", held(real_fdatasync))
        monkeypatch.setattr(walsync.os, "fsync", held(real_fsync))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs Linux's /proc")
async def test_a_commit_is_answered_once_its_wal_is_synced_out_of_the_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SQLiteStore(tmp_path / "relay.sqlite")
    await store.open()
    sync = HeldSync(monkeypatch)
    other = os.open(tmp_path / "relay.sqlite-writer.lock", os.O_RDWR)
    try:
        queued = asyncio.create_task(store.enqueue(new_message(1)))
        await until(sync.entered.is_set, timeout=10)
        await asyncio.sleep(0.1)
        assert not queued.done()  # committed, not yet on disk: nobody is told
        # and the writers' lock is free meanwhile: another process commits while this syncs
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_UN)
        sync.go.set()
        result = await asyncio.wait_for(queued, timeout=10)
        assert await store.get_message(result.message_id) is not None
        await store.enqueue(new_message(2))
    finally:
        sync.go.set()
        os.close(other)
        await store.close()
    # the first sync puts the WAL's name on disk (its directory), then the WAL each commit
    assert sync.synced == [str(tmp_path), str(tmp_path / "relay.sqlite-wal"),
                           str(tmp_path / "relay.sqlite-wal")]


async def test_a_commit_that_cannot_be_synced_is_not_answered_as_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = SQLiteStore(tmp_path / "relay.sqlite")
    await store.open()
    sync = HeldSync(monkeypatch, error=OSError(errno.EIO, "Input/output error"))
    sync.go.set()
    try:
        with pytest.raises(StoreError, match="cannot sync the commit to disk"):
            await store.enqueue(new_message(1))
    finally:
        await store.close()


def test_a_file_not_in_wal_mode_keeps_sqlites_own_syncs(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "relay.sqlite", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = DELETE")  # as where WAL cannot be had
        db.execute("PRAGMA synchronous = FULL")
        wal = walsync.WalSync(tmp_path / "relay.sqlite")
        wal.prepare(db)
        assert db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL: SQLite syncs
        db.execute("CREATE TABLE t (x)")
        wal.sync()  # nothing to sync, and no -wal file to look for
        wal.close()
    finally:
        db.close()


# -- lingering writes: the commit of a write nobody waits on may wait for company -----------

def _select(db: Any) -> int:
    return int(db.execute("SELECT 1").fetchone()[0])


@contextlib.asynccontextmanager
async def lingering_store(url: str | Path, linger: float
                          ) -> AsyncIterator[tuple[SQLiteStore, GroupCommitWriter]]:
    """An open store, and its writer, which lets lingering writes wait `linger` seconds."""
    store = SQLiteStore(url)
    await store.open()
    try:
        assert store.writer is not None
        store.writer.linger = linger
        yield store, store.writer
    finally:
        await store.close()


async def test_lingering_writes_wait_to_share_one_commit(store_url: str) -> None:
    async with lingering_store(store_url, 0.3) as (store, writer):
        before, started = writer.batches, time.monotonic()
        first = asyncio.create_task(writer.write(_select, linger=True))
        await asyncio.sleep(0.05)
        assert not first.done()  # waiting for company, not committed alone at once
        second = asyncio.create_task(writer.write(_select, linger=True))
        assert await asyncio.gather(first, second) == [1, 1]
        assert writer.batches - before == 1  # one transaction, one fsync for both
        assert time.monotonic() - started >= 0.25


async def test_a_write_that_may_not_linger_ends_the_wait(store_url: str) -> None:
    async with lingering_store(store_url, 5.0) as (store, writer):
        before, started = writer.batches, time.monotonic()
        lingering = asyncio.create_task(writer.write(_select, linger=True))
        await asyncio.sleep(0.05)
        assert await writer.write(_select) == 1  # a client's write: committed now
        assert await asyncio.wait_for(lingering, 1) == 1  # and the lingering one with it
        assert writer.batches - before == 1
        assert time.monotonic() - started < 2


async def test_enough_lingering_writes_end_the_wait(store_url: str) -> None:
    """LINGER_MAX writes waiting are committed at once: what a crash can find delivered and
    not recorded stays bounded by count, not by the linger's time alone."""
    async with lingering_store(store_url, 5.0) as (store, writer):
        before, started = writer.batches, time.monotonic()
        few = [asyncio.create_task(writer.write(_select, linger=True))
               for _ in range(LINGER_MAX - 1)]
        await asyncio.sleep(0.1)
        assert not any(t.done() for t in few)  # fewer: they wait
        last = writer.write(_select, linger=True)
        assert await asyncio.wait_for(asyncio.gather(*few, last), 2) == [1] * LINGER_MAX
        assert writer.batches - before == 1 and time.monotonic() - started < 2


async def test_a_lingering_write_fails_cleanly_when_the_store_closes(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "relay.sqlite")
    await store.open()
    writer = store.writer
    assert writer is not None
    writer.linger = 30.0
    lingering = asyncio.create_task(writer.write(_select, linger=True))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(store.close(), 5)
    with pytest.raises(StoreError, match="closing"):
        await asyncio.wait_for(lingering, 1)


async def test_the_delivery_workers_writes_linger(tmp_path: Path) -> None:
    """Leases and outcomes (no client waits on them) share commits; new mail does not wait."""
    async with lingering_store(tmp_path / "relay.sqlite", 0.3) as (store, writer):
        started = time.monotonic()
        result = await store.enqueue(new_message(1))
        assert time.monotonic() - started < 0.25  # a client waits on this one
        before = writer.batches
        leased = asyncio.create_task(store.lease_due(2_000_000_000.0, 10, 600))
        await asyncio.sleep(0.05)
        assert not leased.done()
        renewed = asyncio.create_task(store.renew_leases([1], 2_000_000_900.0))
        (due,), _ = await asyncio.gather(leased, renewed)
        assert due.message_id == result.message_id and writer.batches - before == 1
        before = writer.batches
        outcome = Outcome(
            recipient_id=due.id, message_id=due.message_id, status=RecipientStatus.DELIVERED,
            at=2_000_000_001.0, event=EventType.DELIVERED, last_reply="250 ok")
        recorded = asyncio.create_task(store.record([outcome]))
        await asyncio.sleep(0.05)
        assert not recorded.done()
        await recorded
        assert writer.batches - before == 1
        detail = await store.get_message(result.message_id)
        assert detail is not None and detail.recipients[0].status is RecipientStatus.DELIVERED
