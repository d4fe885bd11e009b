"""Is this relay ready to take and deliver mail? One check per part, for `/readyz` and the
systemd watchdog: the store takes a write, delivery runs (or is paused on purpose), every
SMTP listener is bound."""

from __future__ import annotations

import asyncio
from typing import Protocol

from ..api.health import Check, check_store
from ..config import Config
from ..delivery.scheduler import Scheduler
from ..delivery.supervise import WorkerProcess
from ..handoff import Acceptor
from ..store import SQLiteStore


class Parts(Protocol):
    """What the checks look at (the Service has them all)."""

    config: Config
    store: SQLiteStore
    servers: list[asyncio.base_events.Server | Acceptor]
    worker: WorkerProcess | None
    scheduler: Scheduler | None


async def check_all(parts: Parts) -> list[Check]:
    return [await check_store(parts.store), check_delivery(parts), check_listeners(parts)]


def master_checks(parts: Parts) -> list[Check]:
    """What only the master knows: whether delivery runs and its SMTP listeners are bound
    (an API worker process answers these as the master last told it)."""
    return [check_delivery(parts), check_listeners(parts)]


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
