"""The write connection's thread, which commits waiting writes together.

Every caller hands in an operation and awaits its own commit. Operations that
arrive while a commit is in progress are taken as one batch: one transaction,
one fsync. Operations of the same `Batched` kind are run together (one
`executemany` per table instead of a statement per item). If an operation
raises, the batch is rolled back and each of its operations is retried in a
transaction of its own, so one bad write cannot fail the others. Nothing is
ever half-written: a failed commit rolls back and every caller of that batch
gets `StoreError`. On SQLite, the writers of every process take turns by a `WriteLock`.
A write no client waits on may linger to share a commit with those that follow.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import metrics
from ..errors import StoreError
from .pgconn import Conflict
from .thread import DbThread

log = logging.getLogger(__name__)

# Both run on the writer's thread, inside the batch's transaction, and must not block on I/O.
Operation = Callable[[sqlite3.Connection], Any]
RunMany = Callable[[sqlite3.Connection, Sequence[Any]], list[Any]]

MAX_BATCH = 512
LINGER = 0.02  # seconds a lingering write waits for company (GroupCommitWriter.write)
# lingering writes that end the wait by their number: what a crash can find delivered and not
# yet recorded stays bounded by count as well as by time (tests/test_delivery.py's SIGKILL)
LINGER_MAX = 32
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
        self._since = 0.0  # when this process's writer last took it

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
        started = time.perf_counter()
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # on the writer's thread; the GIL is let go
        self._since = time.perf_counter()
        metrics.lock_waited(self._since - started)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        metrics.lock_held(time.perf_counter() - self._since)

    def close(self) -> None:
        """Once the writer's thread has ended."""
        os.close(self._fd)


class GroupCommitWriter:
    """Owns the write connection. Writes wait in a list; the connection's thread takes
    everything waiting, commits it in one transaction, hands each caller its result, and
    takes what came meanwhile, until nothing waits.

    The thread takes the next batch itself, as soon as a commit ends: when the event loop
    handed each batch over and took each result back, every commit was followed by two
    thread wake-ups (~1 ms together on a busy 2-core machine, a fifth of a commit's cycle)
    during which nothing was written while new mail waited."""

    def __init__(self, conn: DbThread, lock: WriteLock | None = None, *,
                 linger: float = LINGER, sync: Callable[[], None] | None = None) -> None:
        self.conn = conn
        self._lock = lock
        self._sync = sync  # after each COMMIT, out of the lock (SQLite: walsync.py)
        self.linger = linger
        self._cond = threading.Condition()  # guards the fields below it, loop and thread
        # (work, its caller's future, whether it may linger), in order of arrival
        self._pending: collections.deque[tuple[Work, asyncio.Future[Any], bool]] = \
            collections.deque()
        self._urgent = 0  # pending writes that may not linger
        self._draining = False  # the thread is taking batches (a _drain job is running)
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_job: asyncio.Task[None] | None = None
        self.batches = 0  # commits made; lets tests and benches see the grouping
        self.operations = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing = False

    async def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._fail_pending(StoreError("the store is closing"))
        job, self._drain_job = self._drain_job, None
        if job is not None:  # its transaction ends; nothing is left for it to take
            with contextlib.suppress(Exception):
                await job
        self._loop = None

    async def write(self, work: Work, *, linger: bool = False) -> Any:
        """Commit `work`, then return its result. With `linger`, the commit may wait up to
        `linger` seconds for other writes to share it (a write that is not lingering, or
        LINGER_MAX lingering ones, end the wait): for writes that no client waits on, such
        as the delivery worker's outcomes. Delivering 5 KB messages as fast as they came
        (bench/deliver.py), the worker committed ~5 outcomes at a time, each commit taking
        the writers' lock and an fsync, so the master's commits of new mail, which the
        clients do wait on, queued behind it: lingering 20 ms, the worker made a fifth of
        the commits and relay took 12-19 % more messages a second."""
        loop = self._loop
        if loop is None or self._closing:
            raise StoreError("the store is not open")
        fut: asyncio.Future[Any] = loop.create_future()
        lingers = linger and self.linger > 0
        with self._cond:
            self._pending.append((work, fut, lingers))
            if not lingers:
                self._urgent += 1
                self._cond.notify()
            elif len(self._pending) >= LINGER_MAX:
                self._cond.notify()
            start, self._draining = not self._draining, True
        if start:
            self._drain_job = asyncio.ensure_future(self.conn.run(self._drain))
            self._drain_job.add_done_callback(self._drain_ended)
        return await fut

    def _drain_ended(self, job: asyncio.Task[None]) -> None:
        """A drain that failed (the thread gone, a bug) fails what waits, never strands it."""
        if job.cancelled() or job.exception() is not None:
            why = "cancelled" if job.cancelled() else repr(job.exception())
            self._fail_pending(StoreError(f"the store's writer failed: {why}"))

    def _fail_pending(self, exc: StoreError) -> None:
        """Every waiting write gets `exc` (on the event loop); no drain is left running."""
        with self._cond:
            left, self._pending = list(self._pending), collections.deque()
            self._urgent, self._draining = 0, False
        for _, fut, _ in left:
            _settle(fut, exc=exc)

    def _drain(self, db: sqlite3.Connection) -> None:
        """On the connection's thread: batches until nothing waits."""
        while True:
            with self._cond:
                if self._pending and not self._urgent and not self._closing:
                    # only writes that may linger: wait for company, or for one that may not
                    self._cond.wait_for(lambda: self._urgent > 0 or self._closing
                                        or len(self._pending) >= LINGER_MAX,
                                        timeout=self.linger)
                if not self._pending or self._closing:
                    self._draining = False
                    return
                batch = [self._pending.popleft()
                         for _ in range(min(MAX_BATCH, len(self._pending)))]
                self._urgent -= sum(not lingers for _, _, lingers in batch)
            live = [(work, fut) for work, fut, _ in batch if not fut.cancelled()]
            try:
                if live:
                    self._commit(db, live)
            except BaseException as exc:  # a bug: the batch's callers are told, not stranded
                assert self._loop is not None
                self._loop.call_soon_threadsafe(_settle_all, [
                    (fut, None, StoreError(f"the store's writer failed: {exc!r}"))
                    for _, fut in live])
                raise

    def _commit(self, db: sqlite3.Connection,
                batch: list[tuple[Work, asyncio.Future[Any]]]) -> None:
        settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]]
        try:
            results = self._transaction(db, [work for work, _ in batch])
        except _OperationFailed:
            # Isolate the failing operation: each one alone.
            settled = []
            for work, fut in batch:
                try:
                    (result,) = self._transaction(db, [work])
                except _OperationFailed as exc:
                    settled.append((fut, None, exc.__cause__ or exc))
                except StoreError as exc:
                    settled.append((fut, None, exc))
                else:
                    settled.append((fut, result, None))
        except StoreError as exc:
            settled = [(fut, None, exc) for _, fut in batch]
        else:
            settled = [(fut, result, None) for (_, fut), result in zip(batch, results)]
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_settle_all, settled)

    def _transaction(self, db: sqlite3.Connection, works: list[Work]) -> list[Any]:
        started = time.perf_counter()
        results = _transaction(db, works, self._lock)
        if self._sync is not None:
            self._sync()  # on disk before anyone is answered; StoreError fails the batch
        metrics.commit_took(time.perf_counter() - started, len(works))
        self.batches += 1
        self.operations += len(works)
        return results


def _settle_all(settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, result, exc in settled:
        _settle(fut, result=result, exc=exc)


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


def _settle(fut: asyncio.Future[Any], *, result: Any = None,
            exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
