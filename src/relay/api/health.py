"""`/healthz` (the loop answers) and `/readyz` (relay can take and deliver mail): what a load
balancer, Kubernetes or a monitoring check asks. Neither needs a key; they tell only whether
each part works, never what the queue holds.

The API does not know the service that runs it: `/readyz` calls a `Readiness`, a callable
the master hands to `make_app`, that answers one `Check` per part."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web


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
