"""One writer task that owns the write connection and commits waiting writes together.

Every caller hands in an operation and awaits its own commit. Operations that
arrive while a commit is in progress are taken as one batch: one transaction,
one fsync. If an operation raises, the batch is rolled back and each of its
operations is retried in a transaction of its own, so one bad write cannot
fail the others. Nothing is ever half-written: a failed commit rolls back and
every caller of that batch gets `StoreError`.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from typing import Any, Awaitable, Callable

import aiosqlite

from ..errors import StoreError

log = logging.getLogger(__name__)

Operation = Callable[[aiosqlite.Connection], Awaitable[Any]]

MAX_BATCH = 512


class GroupCommitWriter:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn
        self._queue: asyncio.Queue[tuple[Operation, asyncio.Future[Any]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # commits made; lets tests and benches see the grouping
        self.operations = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="store-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(StoreError("the store is closing"))

    async def write(self, op: Operation) -> Any:
        if self._task is None or self._task.done():
            raise StoreError("the store is not open")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put((op, fut))
        return await fut

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            live = [(op, fut) for op, fut in batch if not fut.cancelled()]
            if live:
                await self._commit(live)

    async def _commit(self, batch: list[tuple[Operation, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._transaction([op for op, _ in batch])
        except _OperationFailed:
            # Isolate the failing operation: each one alone.
            for op, fut in batch:
                try:
                    (result,) = await self._transaction([op])
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

    async def _transaction(self, ops: list[Operation]) -> list[Any]:
        conn = self.conn
        try:
            await conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot begin a transaction: {exc}") from exc
        results = []
        try:
            for op in ops:
                try:
                    results.append(await op(conn))
                except (sqlite3.IntegrityError, sqlite3.ProgrammingError) as exc:
                    raise _OperationFailed() from exc
                except sqlite3.Error as exc:
                    # disk full, I/O error, read-only, locked: the store itself failed
                    raise StoreError(f"write failed: {exc}") from exc
                except Exception as exc:
                    raise _OperationFailed() from exc
            try:
                await conn.commit()
            except sqlite3.Error as exc:
                raise StoreError(f"commit failed: {exc}") from exc
        except BaseException:
            try:
                await conn.rollback()
            except sqlite3.Error:
                log.exception("rollback failed")
            raise
        self.batches += 1
        self.operations += len(ops)
        return results


class _OperationFailed(Exception):
    """An operation raised an error of its own (not the store's)."""


def _settle(fut: asyncio.Future[Any], *, result: Any = None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
