"""One database connection on a thread of its own, running the event loop's callables in order.

The store owns two: the group-commit writer's and the reader's. A callable gets the raw
connection and runs to its end before the next one starts, so a transaction never waits
for the event loop between its statements (the write lock would be held meanwhile, and
another process would sleep in SQLite's busy handler for as long), and a read never
interleaves with another on the same connection (a cursor left open keeps its read
transaction: a read run beside it would see that older snapshot). Results come back to
the loop with `call_soon_threadsafe`. Public stdlib only: what aiosqlite does inside, ours.
The connection is an sqlite3 one by default; `connect` makes another of the same shape
(store/pgconn.py's, on PostgreSQL).
"""

from __future__ import annotations

import asyncio
import functools
import math
import sqlite3
import threading
import warnings
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from queue import SimpleQueue
from types import TracebackType
from typing import Any, TypeVar

from ..errors import StoreError

T = TypeVar("T")

# (the future to settle, or None when nobody waits; the callable; its arguments after the connection)
_Job = tuple["asyncio.Future[Any] | None", Callable[..., Any], tuple[Any, ...]]

# Set on every connection, the reader's too: WAL so readers never block the writer, FULL so
# a commit is on disk before anyone is told (a store's writer syncs its commits itself, out
# of the writers' lock: walsync.py), a busy timeout for the other process's writes.
PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
    "PRAGMA busy_timeout = 30000",
    # deleted rows are overwritten, not just unlinked: keys given with messages are wiped
    "PRAGMA secure_delete = ON",
)


class DbThread:
    def __init__(self, path: Path | str, *, name: str,
                 connect: Callable[[], Any] | None = None) -> None:
        self.path = path
        self.name = name
        self._connect: Callable[[], Any] = connect or functools.partial(_connect, Path(path))
        self._jobs: SimpleQueue[_Job] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._open = False

    async def open(self) -> None:
        """Start the thread and connect there; the connection never leaves it."""
        opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # The thread is given the queue, not self: a store dropped unclosed can be collected.
        self._thread = threading.Thread(target=_serve, args=(self._connect, opened, self._jobs),
                                        name=self.name)
        self._thread.start()
        try:
            await opened
        except BaseException:
            self._jobs.put((None, _close, ()))  # ends the thread if it connected after all
            self._thread.join()
            self._thread = None
            raise
        self._open = True

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(connection, *args) on the thread, after everything submitted before it."""
        if not self._open:
            raise StoreError("the store is not open")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((fut, fn, args))
        return await fut

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Fetch:
        """One statement, its rows all fetched in the same step. aiosqlite's shape, so
        `await conn.execute(sql)` and `async with conn.execute(sql) as cur` both work."""
        return Fetch(self, sql, params)

    async def close(self) -> None:
        """Run what is queued, close the connection, end the thread."""
        if not self._open or self._thread is None:
            return
        self._open = False
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._jobs.put((done, _close, ()))
        await done
        self._thread.join()  # it has nothing left to do but return
        self._thread = None

    def __del__(self) -> None:
        if self._open:
            warnings.warn(f"{self.name}: DbThread dropped without close()",
                          ResourceWarning, stacklevel=1)
            self._open = False
            self._jobs.put((None, _close, ()))


class Fetch:
    """The rows of one statement, run when awaited or entered."""

    def __init__(self, thread: DbThread, sql: str, params: Sequence[Any]) -> None:
        self._thread, self._sql, self._params = thread, sql, params

    def __await__(self) -> Generator[Any, None, Rows]:
        return self._rows().__await__()

    async def __aenter__(self) -> Rows:
        return await self._rows()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    async def _rows(self) -> Rows:
        return Rows(await self._thread.run(_fetch_all, self._sql, self._params))


class Rows:
    """Rows already fetched, read the way an aiosqlite cursor is."""

    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows
        self._next = 0

    async def fetchone(self) -> Any:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    async def fetchall(self) -> list[Any]:
        rest, self._next = self._rows[self._next:], len(self._rows)
        return rest


# -- on the thread ---------------------------------------------------------------------------


def _serve(connect: Callable[[], Any], opened: asyncio.Future[None],
           jobs: SimpleQueue[_Job]) -> None:
    """The thread's whole life: connect, run jobs in order until `_close`."""
    try:
        db = connect()
    except BaseException as exc:  # noqa: BLE001 - it is open()'s to raise
        _report(opened, exc=exc)
        return
    _report(opened)
    while True:
        fut, fn, args = jobs.get()
        try:
            result = fn(db, *args)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's await
            _report(fut, exc=exc)
        else:
            _report(fut, result=result)
        if fn is _close:
            return


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level None: no implicit BEGIN; the writer says BEGIN IMMEDIATE itself
    db = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    try:
        for pragma in PRAGMAS:
            db.execute(pragma)
        _ensure_floor(db)
    except BaseException:
        db.close()
        raise
    return db


def _ensure_floor(db: sqlite3.Connection) -> None:
    """floor(x), which the store's SQL shares with PostgreSQL (where CAST to an integer rounds
    rather than truncates), is built into SQLite only with its math functions: an SQLite
    built without them gets Python's."""
    try:
        db.execute("SELECT floor(1.5)")
    except sqlite3.OperationalError:
        db.create_function("floor", 1, _floor, deterministic=True)


def _floor(x: float | None) -> float | None:
    return None if x is None else float(math.floor(x))


def _close(db: Any) -> None:
    db.close()


def _fetch_all(db: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    return db.execute(sql, params).fetchall()


def _report(fut: asyncio.Future[Any] | None, *, result: Any = None,
            exc: BaseException | None = None) -> None:
    if fut is None:
        return
    try:
        if exc is None:
            fut.get_loop().call_soon_threadsafe(_set_result, fut, result)
        else:
            fut.get_loop().call_soon_threadsafe(_set_exception, fut, exc)
    except RuntimeError:
        pass  # the loop is closed: nobody waits for this any more


def _set_result(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
