"""relay.aio: the stop of a service's tasks, one way everywhere."""

from __future__ import annotations

import asyncio
import logging

import pytest

from relay.aio import cancel_and_wait


async def test_the_tasks_are_cancelled_and_have_ended_when_it_returns() -> None:
    ended: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.01)  # its own clean-up takes a moment
            ended.append(name)

    tasks = [asyncio.create_task(forever(n)) for n in "ab"]
    await asyncio.sleep(0)
    await cancel_and_wait(tasks[0], None, tasks[1])  # None: a task never started
    assert sorted(ended) == ["a", "b"] and all(t.cancelled() for t in tasks)
    await cancel_and_wait()  # nothing to stop


async def test_an_error_a_task_had_ended_with_is_logged_not_raised(
        caplog: pytest.LogCaptureFixture) -> None:
    async def fails() -> None:
        raise RuntimeError("the writer broke")

    task = asyncio.create_task(fails(), name="store-writer")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="relay.aio"):
        await cancel_and_wait(task)
    (record,) = caplog.records
    assert record.getMessage() == "store-writer had ended with an error"
    assert record.exc_info is not None and "the writer broke" in str(record.exc_info[1])


async def test_the_callers_own_cancellation_is_raised() -> None:
    stopping = asyncio.Event()

    async def stubborn() -> None:  # takes a while to end after it is cancelled
        try:
            await asyncio.sleep(3600)
        finally:
            stopping.set()
            await asyncio.sleep(3600)

    inner = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    outer = asyncio.create_task(cancel_and_wait(inner))
    await stopping.wait()
    outer.cancel()  # the stopper is itself stopped while it waits
    with pytest.raises(asyncio.CancelledError):
        await outer
    await asyncio.sleep(0)
    assert inner.cancelled()  # and what it waited for was cancelled again
