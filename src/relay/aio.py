"""asyncio helpers that more than one long-running loop needs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run a process's main coroutine on uvloop's event loop where it is installed (a core
    dependency on Linux), on asyncio's otherwise. relay's processes spend their time in
    sessions' reads, writes, replies and timers, which uvloop does in C: about a fifth less
    CPU a message, accepting and delivering (bench/deliver.py)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


async def sleep_until_set(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for `event` at most `timeout` seconds (None: no limit); True when it was set.

    Not asyncio.wait_for: on Python 3.11, a task cancelled in the same turn of the loop as
    the event is set gets the event's result from wait_for instead of CancelledError
    (CPython gh-86296, fixed in 3.12). A service loop that sleeps that way loses the
    cancellation that was its stop, and whoever awaits it waits forever: the scheduler did,
    when a delivery job ended just as the service stopped. asyncio.timeout() is not affected.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel the tasks (None: no task) and wait until each has ended: a stop.

    How each ended is its own: its cancellation is not raised here, nor an error it had
    ended with before, which is logged (no one else awaits it now). A cancellation of the
    caller itself, while it waits, is raised (asyncio.gather passes it on, and cancels the
    tasks again)."""
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    if not live:
        return
    for task, outcome in zip(live, await asyncio.gather(*live, return_exceptions=True)):
        if isinstance(outcome, Exception):  # not CancelledError, a BaseException
            name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
            log.error("%s had ended with an error", name, exc_info=outcome)
