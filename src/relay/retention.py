"""The pruner: applies [retention] in passes of small batches, so the database stops growing.

A pass walks each kind of row in turn (whole messages first, then the bodies of the ones
kept, then webhook deliveries, idempotency keys, contact events and unmatched reports),
one short writer transaction per batch with a yield to the event loop between them: a
submission queued meanwhile commits after at most one batch. `relay serve` runs a pass
every `interval` seconds (Pruner.start); `relay prune` runs one now.

SQLite reuses the pages a prune frees; the file itself does not shrink (VACUUM it while
relay is stopped to give the space back).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .aio import cancel_and_wait
from .config import RetentionConfig
from .errors import StoreError
from .store import SQLiteStore
from .store.idempotency import IDEMPOTENCY_WINDOW
from .store.retention import START, Key, Step

log = logging.getLogger(__name__)

DAY = 86400.0
FIRST_PASS_AFTER = 60.0  # seconds after start-up, or `interval` if that is shorter

KINDS = ("messages", "bodies", "webhook_outbox", "idempotency", "contact_events",
         "inbound_reports")


@dataclass(kw_only=True)
class PassResult:
    """Rows pruned (or that would be, in a dry run) and transactions taken, per kind."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    batches: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    seconds: float = 0.0

    def summary(self) -> str:
        return ", ".join(f"{kind} {self.counts[kind]}" for kind in KINDS)


class Pruner:
    """One pass on demand, or one every `interval` seconds while started."""

    def __init__(self, config: RetentionConfig, store: SQLiteStore, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._every_interval(), name="retention")

    async def stop(self) -> None:
        """Stop at once: a batch being written still commits whole (it is one transaction)."""
        await cancel_and_wait(self._task)
        self._task = None

    async def run_pass(self, *, now: float | None = None, dry_run: bool = False) -> PassResult:
        now = self.clock() if now is None else now
        started = time.monotonic()
        result = PassResult()
        cfg = self.config
        limit = cfg.batch_size
        messages_cutoff = now - cfg.messages_days * DAY if cfg.messages_days else None
        if messages_cutoff is not None:
            await self._walk(result, "messages", lambda after: self.store.prune_messages(
                before=messages_cutoff, after=after, limit=limit, dry_run=dry_run))
        if cfg.bodies_days:
            await self._walk(result, "bodies", lambda after: self.store.prune_bodies(
                before=now - cfg.bodies_days * DAY, now=now, after=after, limit=limit,
                dry_run=dry_run, unless_before=messages_cutoff))
        windows = {"webhook_outbox": cfg.webhook_outbox_days * DAY,
                   "idempotency": IDEMPOTENCY_WINDOW,
                   "contact_events": cfg.contact_events_days * DAY,
                   "inbound_reports": cfg.messages_days * DAY}
        for kind, window in windows.items():
            if window:
                await self._rows(result, kind, now - window, dry_run)
        result.seconds = time.monotonic() - started
        return result

    async def _walk(self, result: PassResult, kind: str,
                    batch: Callable[[Key], Awaitable[Step]]) -> None:
        """Batches of messages from the oldest, each starting where the last stopped."""
        after = START
        while True:
            step = await batch(after)
            result.counts[kind] += step.count
            result.batches[kind] += 1
            if step.after is None:
                return
            after = step.after
            await asyncio.sleep(0)  # let the loop (and a waiting submission) in

    async def _rows(self, result: PassResult, kind: str, before: float, dry_run: bool) -> None:
        limit = self.config.batch_size
        while True:
            count = await self.store.prune_rows(kind, before=before, limit=limit,
                                                dry_run=dry_run)
            result.counts[kind] += count
            result.batches[kind] += 1
            if dry_run or count < limit:
                return
            await asyncio.sleep(0)

    async def _every_interval(self) -> None:
        await asyncio.sleep(min(FIRST_PASS_AFTER, self.config.interval))
        while True:
            try:
                result = await self.run_pass()
            except StoreError as exc:  # the disk, most likely: said, and tried again later
                log.warning("retention pass failed: %s", exc)
            else:
                log.info("retention pass: pruned %s in %.2fs", result.summary(), result.seconds)
            await asyncio.sleep(self.config.interval)
