"""Is this relay ready to take and deliver mail? One check per part, for `/readyz` and the
systemd watchdog: the store takes a write, delivery runs (or is paused on purpose), every
SMTP listener is bound."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from ..api.health import Check
from ..config import Config
from ..delivery.scheduler import Scheduler
from ..delivery.supervise import WorkerProcess
from ..errors import StoreError
from ..store import SQLiteStore

PROBE_TIMEOUT = 2.0  # a store that takes no write this long is as good as down


class Parts(Protocol):
    """What the checks look at (the Service has them all)."""

    config: Config
    store: SQLiteStore
    servers: list[asyncio.base_events.Server]
    worker: WorkerProcess | None
    scheduler: Scheduler | None


async def check_all(parts: Parts) -> list[Check]:
    return [await check_store(parts.store), check_delivery(parts), check_listeners(parts)]


class SharedChecks:
    """`/readyz` is public: callers at the same moment share one store probe, and a probe
    younger than FRESH is answered again, so a flood of requests costs the store one write
    transaction a second, not one each. The other checks cost nothing and are always new."""

    FRESH = 1.0

    def __init__(self, store: SQLiteStore, rest: Callable[[], list[Check]]) -> None:
        self._store = store
        self._rest = rest  # the checks that follow the store's (the master's: delivery, listeners)
        self._probe: asyncio.Task[Check] | None = None
        self._done_at = 0.0

    async def __call__(self) -> list[Check]:
        loop = asyncio.get_running_loop()
        probe = self._probe
        if probe is None or (probe.done() and loop.time() - self._done_at > self.FRESH):
            probe = self._probe = loop.create_task(check_store(self._store),
                                                   name="readiness-store")
            probe.add_done_callback(lambda _: setattr(self, "_done_at", loop.time()))
        store = await asyncio.shield(probe)
        return [store, *self._rest()]


def master_checks(parts: Parts) -> list[Check]:
    """What only the master knows: whether delivery runs and its SMTP listeners are bound
    (an API worker process answers these as the master last told it)."""
    return [check_delivery(parts), check_listeners(parts)]


async def check_store(store: SQLiteStore) -> Check:
    try:
        await asyncio.wait_for(store.probe_write(), PROBE_TIMEOUT)
    except TimeoutError:
        return Check("store", False, f"no write within {PROBE_TIMEOUT:g} s (the database is "
                                     "locked by another process, or the disk is stalled)")
    except StoreError as exc:
        return Check("store", False, str(exc))
    return Check("store", True, "takes writes")


def check_delivery(parts: Parts) -> Check:
    if parts.config.delivery.paused:
        return Check("delivery", True, "paused by [delivery] paused = true; mail is queued")
    if parts.worker is not None:
        if parts.worker.alive:
            return Check("delivery", True, f"worker pid {parts.worker.pid} running")
        return Check("delivery", False, "the delivery worker process is not running "
                                        "(the master restarts it)")
    if parts.scheduler is not None and parts.scheduler.running:
        return Check("delivery", True, "scheduler running in the master")
    return Check("delivery", False, "delivery is not running")


def check_listeners(parts: Parts) -> Check:
    wanted = len(parts.config.smtp.listeners)
    serving = [s for s in parts.servers if s.is_serving() and s.sockets]
    if len(serving) < wanted:
        return Check("listeners", False, f"{len(serving)} of {wanted} SMTP listeners bound")
    return Check("listeners", True, f"{wanted} SMTP listeners bound")
