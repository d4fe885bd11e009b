"""sqlite3.Connection's shape over one asyncpg connection, so the store's queries run on
PostgreSQL unchanged.

Every query of the store is a plain function of a connection, run on the connection's own
thread (store/thread.py); this class lets those functions take a PostgreSQL connection too.
It drives asyncpg from a private event loop on that thread, one statement at a time, so a
transaction still runs to its end without waiting for the main loop. What it translates:
`?` placeholders to `$1..$n` (outside quotes and comments), SQLite's `BEGIN IMMEDIATE` to
`BEGIN`, numeric results (sum, avg) to int or float, and asyncpg's errors to sqlite3's
classes, which the group-commit writer sorts by: an integrity or programming error is one
operation's fault, anything else the store's. A connection that broke is made again before
the next statement outside a transaction.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import asyncpg

from ..aio import cancel_and_wait

log = logging.getLogger("relay.store")

# a quoted string, a quoted name or a comment (kept as they are), or a placeholder
_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/|\?", re.DOTALL)
_ROWS = re.compile(r"^\s*(SELECT|WITH|VALUES|SHOW|TABLE|EXPLAIN)\b|\bRETURNING\b", re.IGNORECASE)
_CACHE_MAX = 2048

QUEUE_CHANNEL = "relay_queue"  # NOTIFY'd when messages are queued: idle nodes wake
CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0


def translate(sql: str) -> tuple[str, bool]:
    """The statement with $n placeholders, and whether it returns rows."""
    n = 0

    def number(m: re.Match[str]) -> str:
        nonlocal n
        if m.group(0) != "?":
            return m.group(0)
        n += 1
        return f"${n}"

    text = _TOKENS.sub(number, sql)
    if re.match(r"\s*BEGIN\s+(IMMEDIATE|EXCLUSIVE|DEFERRED)\b", text, re.IGNORECASE):
        text = "BEGIN"
    return text, bool(_ROWS.search(_TOKENS.sub(lambda m: "" if m.group(0) != "?" else "?",
                                                sql)))


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


async def _setup(conn: asyncpg.Connection) -> None:
    # sum() and avg() answer numeric: an int or a float here, as SQLite's would be
    await conn.set_type_codec("numeric", encoder=str, decoder=_number, schema="pg_catalog",
                              format="text")


class Conflict(sqlite3.OperationalError):
    """A deadlock or serialization failure between nodes: the transaction is rolled back
    and is run again (store/groupcommit.py)."""


def error(exc: BaseException) -> sqlite3.Error:
    """The sqlite3 error class the store's callers already handle, for an asyncpg error."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, asyncpg.TransactionRollbackError):
        return Conflict(text)
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return sqlite3.IntegrityError(text)
    if isinstance(exc, (asyncpg.SyntaxOrAccessError, asyncpg.DataError,
                        asyncpg.exceptions.UndefinedFunctionError)):
        return sqlite3.ProgrammingError(text)
    return sqlite3.OperationalError(text)


class PgCursor:
    """What one statement gave: its rows (tuples), or how many rows it changed."""

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int) -> None:
        self._rows = rows
        self._next = 0
        self.rowcount = rowcount
        self.lastrowid = None  # the store's SQL says RETURNING id instead

    def fetchone(self) -> tuple[Any, ...] | None:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> list[tuple[Any, ...]]:
        rest, self._next = self._rows[self._next:], len(self._rows)
        return rest

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.fetchall())


class PgConnection:
    """One asyncpg connection, used from one thread as a sqlite3 connection is."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._loop = asyncio.new_event_loop()
        self._conn: asyncpg.Connection | None = None
        self._sql: dict[str, tuple[str, bool]] = {}
        try:
            self._connect()
        except BaseException:
            self._loop.close()
            raise

    def _connect(self) -> None:
        try:
            self._conn = self._loop.run_until_complete(asyncpg.connect(
                self.url, timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT))
            self._loop.run_until_complete(_setup(self._conn))
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self._conn = None
            raise sqlite3.OperationalError(f"cannot connect to PostgreSQL: {exc}") from exc

    @property
    def in_transaction(self) -> bool:
        return self._conn is not None and self._conn.is_in_transaction()

    def _ready(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = None
            self._connect()
        assert self._conn is not None
        return self._conn

    def _run(self, coro: Any) -> Any:
        try:
            return self._loop.run_until_complete(coro)
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise error(exc) from exc
        except (TimeoutError, OSError) as exc:
            raise sqlite3.OperationalError(f"PostgreSQL: {exc!r}") from exc

    def _translated(self, sql: str) -> tuple[str, bool]:
        found = self._sql.get(sql)
        if found is None:
            if len(self._sql) >= _CACHE_MAX:
                self._sql.clear()
            found = self._sql[sql] = translate(sql)
        return found

    def execute(self, sql: str, params: Sequence[Any] = ()) -> PgCursor:
        conn = self._ready()
        text, returns_rows = self._translated(sql)
        if returns_rows:
            rows = [tuple(r) for r in self._run(conn.fetch(text, *params))]
            return PgCursor(rows, len(rows))
        status = self._run(conn.execute(text, *params))
        count = status.rsplit(" ", 1)[-1] if status else ""
        return PgCursor([], int(count) if count.isdigit() else -1)

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> PgCursor:
        args = [tuple(p) for p in seq]
        if args:
            text, _ = self._translated(sql)
            self._run(self._ready().executemany(text, args))
        return PgCursor([], -1)

    def executescript(self, sql: str) -> None:
        """Statements with no parameters, sent as one (the simple protocol)."""
        self._run(self._ready().execute(sql))

    def close(self) -> None:
        try:
            if self._conn is not None and not self._conn.is_closed():
                self._loop.run_until_complete(self._conn.close(timeout=5))
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            if self._conn is not None:
                self._conn.terminate()
        finally:
            self._conn = None
            self._loop.close()


def is_postgresql(db: Any) -> bool:
    """Whether a store function runs on PostgreSQL (for the few statements that differ)."""
    return isinstance(db, PgConnection)


def skip_locked(db: Any, of: str = "") -> str:
    """What ends a claim's SELECT: on PostgreSQL, where nodes claim side by side, rows
    another transaction is claiming are passed over, not waited for (nor taken twice);
    SQLite has one writer at a time and no such clause."""
    if not is_postgresql(db):
        return ""
    return f" FOR UPDATE OF {of} SKIP LOCKED" if of else " FOR UPDATE SKIP LOCKED"


def notify(db: Any, channel: str) -> None:
    """Wake the nodes listening on `channel` when this transaction commits (PostgreSQL;
    on SQLite the one node wakes itself)."""
    if is_postgresql(db):
        db.execute(f"NOTIFY {channel}")


class Listener:
    """LISTEN on a channel from the event loop, calling `wake` at each NOTIFY (and once on
    every connect, for what was queued while it was not listening). A lost connection is
    made again after a pause; until then the scheduler's idle poll still finds the work."""

    RECONNECT = 2.0

    def __init__(self, url: str, channel: str, wake: Callable[[], None]) -> None:
        self.url, self.channel, self.wake = url, channel, wake
        self._task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()  # set while connected (tests wait for it)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"listen-{self.channel}")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.url, timeout=CONNECT_TIMEOUT)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(self.channel, lambda *_: self.wake())
                self.listening.set()
                self.wake()
                await lost.wait()
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("store: cannot LISTEN %s (%s); again in %.0f s", self.channel,
                            exc, self.RECONNECT)
            finally:
                self.listening.clear()
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(self.RECONNECT)
