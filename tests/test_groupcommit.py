"""The SQLite writers of every process take turns by the store's write lock (an flock beside
the file): a commit waits while another process holds it, and goes ahead once it is given
back. Another relay process is stood in for by a second open file description of the lock
file, which flock treats as another owner; the wait is seen in /proc/locks, where a blocked
flock is listed with "->"."""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

import pytest

from relay.store import SQLiteStore

from .test_store import new_message
from .test_webhooks import until


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
    try:
        fcntl.flock(other, fcntl.LOCK_EX)  # another process's writer, mid-transaction
        queued = asyncio.create_task(store.enqueue(new_message(1)))
        await until(waiting_for_flock, timeout=10)
        assert not queued.done()
        fcntl.flock(other, fcntl.LOCK_UN)
        result = await asyncio.wait_for(queued, timeout=10)
        assert await store.get_message(result.message_id) is not None
        # and the lock is given back after each transaction: the other process gets it
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_UN)
    finally:
        os.close(other)
        await store.close()
