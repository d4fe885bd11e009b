"""One writer task that owns the write connection and commits waiting writes together.

Every caller hands in an operation and awaits its own commit. Operations that
arrive while a commit is in progress are taken as one batch: one transaction,
one fsync. Operations of the same `Batched` kind are run together (one
`executemany` per table instead of a statement per item). If an operation
raises, the batch is rolled back and each of its operations is retried in a
transaction of its own, so one bad write cannot fail the others. Nothing is
ever half-written: a failed commit rolls back and every caller of that batch
gets `StoreError`. On SQLite, the writers of every process take turns by a `WriteLock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import metrics
from ..aio import cancel_and_wait, sleep_until_set
from ..errors import StoreError
from .pgconn import Conflict
from .thread import DbThread

log = logging.getLogger(__name__)

# Both run on the writer's thread, inside the batch's transaction, and must not block on I/O.
Operation = Callable[[sqlite3.Connection], Any]
RunMany = Callable[[sqlite3.Connection, Sequence[Any]], list[Any]]

MAX_BATCH = 512
LINGER = 0.02  # seconds a lingering write waits for company (GroupCommitWriter.write)
CONFLICT_RETRIES = 5


@dataclass(frozen=True)
class Batched:
    """An item for `run_many`, which writes many items at once and returns one result each."""

    run_many: RunMany
    item: Any


Work = Operation | Batched


class WriteLock:
    """An flock on a file beside the SQLite file, held by a process's writer for each of its
    transactions: the master, the delivery worker and a command take turns. SQLite alone
    makes a writer that finds the file locked poll, sleeping 1, 2, 5 ... 100 ms between
    tries, so a process committing back to back (the master under load) starves another:
    two processes group-committing API sends into one file, the second made 2-8 % of the
    commits and the p99 latency was 100-550 ms; taking turns here, about half each, p99
    27-43 ms. A waiter is woken when the lock is given back; a process that dies gives it
    back with its file descriptors."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def beside(cls, database: Path) -> WriteLock | None:
        """The lock of this SQLite file, owned as the file is (root running a command must
        not leave one the service cannot open, as SQLite does for its -wal and -shm); None
        when it cannot be opened: the writers then wait in SQLite's busy handler only."""
        path = database.with_name(database.name + "-writer.lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.warning("%s: cannot open the writers' lock (%s); SQLite's locking only",
                        path, exc.strerror or exc)
            return None
        if os.geteuid() == 0:
            owner = os.stat(database)
            os.fchown(fd, owner.st_uid, owner.st_gid)
        return cls(path, fd)

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # on the writer's thread; the GIL is let go

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Once the writer's thread has ended."""
        os.close(self._fd)


class GroupCommitWriter:
    """Owns the write connection; each transaction runs on its thread in one step."""

    def __init__(self, conn: DbThread, lock: WriteLock | None = None, *,
                 linger: float = LINGER) -> None:
        self.conn = conn
        self._lock = lock
        self.linger = linger
        # (work, its caller's future, whether it may linger)
        self._queue: asyncio.Queue[tuple[Work, asyncio.Future[Any], bool]] = asyncio.Queue()
        self._urgent = asyncio.Event()  # set when a write that may not linger is queued
        self._urgent_queued = 0  # such writes in the queue
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # commits made; lets tests and benches see the grouping
        self.operations = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="store-writer")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        while not self._queue.empty():
            _, fut, _ = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(StoreError("the store is closing"))
        self._urgent_queued = 0

    async def write(self, work: Work, *, linger: bool = False) -> Any:
        """Commit `work`, then return its result. With `linger`, the commit may wait up to
        `linger` seconds for other writes to share it (a write that is not lingering ends
        the wait): for writes that no client waits on, such as the delivery worker's
        outcomes. Delivering 5 KB messages as fast as they came (bench/deliver.py), the
        worker committed ~5 outcomes at a time, each commit taking the writers' lock and
        an fsync, so the master's commits of new mail, which the clients do wait on, queued
        behind it: lingering 20 ms, the worker made a fifth of the commits and relay took
        12-19 % more messages a second."""
        if self._task is None or self._task.done():
            raise StoreError("the store is not open")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        lingers = linger and self.linger > 0
        if not lingers:
            self._urgent_queued += 1
            self._urgent.set()
        await self._queue.put((work, fut, lingers))
        return await fut

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            if batch[0][2] and not self._urgent_queued:
                self._urgent.clear()
                try:
                    await sleep_until_set(self._urgent, self.linger)
                except asyncio.CancelledError:  # the store closes: as if still queued
                    _settle(batch[0][1], exc=StoreError("the store is closing"))
                    raise
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._urgent_queued -= sum(not lingers for _, _, lingers in batch)
            live = [(work, fut) for work, fut, _ in batch if not fut.cancelled()]
            if live:
                await self._commit(live)

    async def _commit(self, batch: list[tuple[Work, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._transaction([work for work, _ in batch])
        except _OperationFailed:
            # Isolate the failing operation: each one alone.
            for work, fut in batch:
                try:
                    (result,) = await self._transaction([work])
                except _OperationFailed as exc:
                    _settle(fut, exc=exc.__cause__ or exc)
                except StoreError as exc:
                    _settle(fut, exc=exc)
                else:
                    _settle(fut, result=result)
            return
        except StoreError as exc:
            for _, fut in batch:
                _settle(fut, exc=exc)
            return
        for (_, fut), result in zip(batch, results):
            _settle(fut, result=result)

    async def _transaction(self, works: list[Work]) -> list[Any]:
        started = time.perf_counter()
        results: list[Any] = await self.conn.run(_transaction, works, self._lock)
        metrics.commit_took(time.perf_counter() - started)
        self.batches += 1
        self.operations += len(works)
        return results


def _transaction(db: sqlite3.Connection, works: list[Work],
                 lock: WriteLock | None = None) -> list[Any]:
    """The works in one transaction, run again (a few times, after a short pause) when
    PostgreSQL rolled it back for a deadlock or serialization failure with another node.
    With `lock` (SQLite), inside it."""
    for attempt in range(CONFLICT_RETRIES):
        try:
            with lock if lock is not None else contextlib.nullcontext():
                return _once(db, works)
        except StoreError as exc:
            if not isinstance(exc.__cause__, Conflict) or attempt == CONFLICT_RETRIES - 1:
                raise
            log.info("store: a conflict with another node (%s); running the transaction again",
                     exc.__cause__)
            time.sleep(0.01 * 2 ** attempt + random.random() * 0.01)  # on the writer's thread
    raise AssertionError("unreachable")


def _once(db: sqlite3.Connection, works: list[Work]) -> list[Any]:
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot begin a transaction: {exc}") from exc
    try:
        results = _run_all(db, works)
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"commit failed: {exc}") from exc
    except BaseException:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("rollback failed")
        raise
    return results


def _run_all(db: sqlite3.Connection, works: list[Work]) -> list[Any]:
    """Run each operation; items of one `run_many` together, results in input order."""
    results: list[Any] = [None] * len(works)
    groups: dict[RunMany, list[int]] = {}
    for i, work in enumerate(works):
        if isinstance(work, Batched):
            groups.setdefault(work.run_many, []).append(i)
        else:
            results[i] = _guard(work, db)
    for run_many, indexes in groups.items():
        items = [works[i].item for i in indexes]  # type: ignore[union-attr]
        for i, result in zip(indexes, _guard(run_many, db, items)):
            results[i] = result
    return results


def _guard(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except (sqlite3.IntegrityError, sqlite3.ProgrammingError) as exc:
        raise _OperationFailed() from exc
    except sqlite3.Error as exc:
        # disk full, I/O error, read-only, locked: the store itself failed
        raise StoreError(f"write failed: {exc}") from exc
    except StoreError:
        raise
    except Exception as exc:
        raise _OperationFailed() from exc


class _OperationFailed(Exception):
    """An operation raised an error of its own (not the store's)."""


def _settle(fut: asyncio.Future[Any], *, result: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
