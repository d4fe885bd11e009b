"""The leases a scheduler holds, kept alive while their work waits.

A pick leases enough recipients to fill every free session, but a site's connection limit
or rate can keep a job waiting longer than the lease lasts. Once a lease lapses, another
pick (this scheduler's, a reloaded worker's, another node's) may take the same recipients
and send them, and the waiting job would then send them a second time. So the scheduler
renews the leases of all the work it still holds, a quarter of the lease before they could
lapse, and a job about to send drops the recipients whose lease it can no longer vouch for
(the store could not be written to renew them): those lapse and are picked again, once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from ..aio import cancel_and_wait
from ..errors import StoreError
from ..store import SQLiteStore

log = logging.getLogger(__name__)


class Leases:
    def __init__(self, store: SQLiteStore, lease: float, clock: Callable[[], float]) -> None:
        self._store = store
        self._lease = lease
        self._clock = clock
        self._until: dict[int, float] = {}  # recipient id -> when its lease lapses
        self._task: asyncio.Task[None] | None = None

    @property
    def every(self) -> float:
        """How often the held leases are renewed."""
        return self._lease / 4

    @property
    def margin(self) -> float:
        """How much of its lease a recipient must have left to be sent: a session started
        with less might outlast it."""
        return min(self._lease / 4, 60.0)

    def taken(self, ids: Iterable[int], at: float) -> None:
        """A pick at `at` leased these."""
        until = at + self._lease
        for i in ids:
            self._until[i] = until

    def done(self, ids: Iterable[int]) -> None:
        """These need their lease no more: recorded, or left to lapse."""
        for i in ids:
            self._until.pop(i, None)

    def sendable(self, ids: Iterable[int]) -> tuple[list[int], list[int]]:
        """(still ours for long enough, not): the second are forgotten, to lapse."""
        deadline = self._clock() + self.margin
        keep: list[int] = []
        lapse: list[int] = []
        for i in ids:
            (keep if self._until.get(i, 0.0) > deadline else lapse).append(i)
        self.done(lapse)
        return keep, lapse

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lease renewal")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def renew(self) -> None:
        """Push every held lease a whole lease ahead; a recipient the store no longer has
        leased to this node (recorded meanwhile, deleted by an operator) is let go."""
        now = self._clock()
        # one that lapsed by our own clock may be another's by now: never take it back
        self.done([i for i, until in self._until.items() if until <= now])
        ids = list(self._until)
        if not ids:
            return
        renewed = set(await self._store.renew_leases(ids, now + self._lease))
        for i in ids:
            if i in renewed:
                if i in self._until:  # not recorded while the store was renewing it
                    self._until[i] = now + self._lease
            else:
                self._until.pop(i, None)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                await self.renew()
            except StoreError:
                log.warning("could not renew the leases of %d recipients waiting to be sent; "
                            "those whose lease runs short are left to be picked again",
                            len(self._until), exc_info=True)
