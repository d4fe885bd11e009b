"""`/healthz` (the loop answers) and `/readyz` (relay can take and deliver mail): what a load
balancer, Kubernetes or a monitoring check asks. Neither needs a key; they tell only whether
each part works, never what the queue holds.

The API does not know the service that runs it: `/readyz` calls a `Readiness`, a callable
the master hands to `make_app`, that answers one `Check` per part."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from ..errors import StoreError
from ..store import SQLiteStore

PROBE_TIMEOUT = 2.0  # a store that takes no write this long is as good as down


@dataclass(frozen=True)
class Check:
    name: str  # "store", "delivery", "listeners"
    ok: bool
    detail: str  # what was found, e.g. "worker pid 123 running" or why it failed


Readiness = Callable[[], Awaitable[list[Check]]]


class HealthRoutes:
    def __init__(self, readiness: Readiness | None) -> None:
        self._readiness = readiness

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/healthz", self.healthz), web.get("/readyz", self.readyz)]

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, headers=NO_CACHE)

    async def readyz(self, request: web.Request) -> web.Response:
        checks = await self._readiness() if self._readiness is not None else []
        failed = [c.name for c in checks if not c.ok]
        body = {"status": "not ready" if failed else "ready", "failed": failed,
                "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks}}
        return web.json_response(body, status=503 if failed else 200, headers=NO_CACHE)


NO_CACHE = {"Cache-Control": "no-store"}


async def check_store(store: SQLiteStore) -> Check:
    try:
        await asyncio.wait_for(store.probe_write(), PROBE_TIMEOUT)
    except TimeoutError:
        return Check("store", False, f"no write within {PROBE_TIMEOUT:g} s (the database is "
                                     "locked by another process, or the disk is stalled)")
    except StoreError as exc:
        return Check("store", False, str(exc))
    return Check("store", True, "takes writes")


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
            probe = self._probe = loop.create_task(self._probe_store(), name="readiness-store")
        store = await asyncio.shield(probe)
        return [store, *self._rest()]

    async def _probe_store(self) -> Check:
        # The time is set by the probe itself: a done callback runs a loop step after the task
        # is done, and a request in between saw a finished probe of age "now" and began another.
        try:
            return await check_store(self._store)
        finally:
            self._done_at = asyncio.get_running_loop().time()
