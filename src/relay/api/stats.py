"""`GET /v1/stats`: the relay-wide numbers behind the dashboard, for an admin key only (a key
without domains that holds the admin scope): the queue is everyone's mail, so a key that may
see only some domains' mail gets a 403 rather than a partial or leaked view."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..store import SQLiteStore
from ..store.stats import Stats
from . import auth
from .errors import ApiError
from .views import iso


class StatsApi:
    def __init__(self, store: SQLiteStore, clock: Callable[[], float] = time.time) -> None:
        self._store, self._clock = store, clock

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/stats", self.stats)]

    async def stats(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        if key.domains:
            raise ApiError(403, "the relay-wide stats need an admin key without domains; "
                                f"this key is limited to {', '.join(key.domains)}")
        found = await self._store.stats(self._clock())
        return web.json_response(stats_json(found), headers={"Cache-Control": "no-store"})


def stats_json(s: Stats) -> dict[str, Any]:
    return {
        "at": iso(s.at),
        "windowSeconds": s.window,
        "queue": s.queue,
        "destinations": [{"domain": d.domain, "total": d.total, "counts": d.counts}
                         for d in s.destinations],
        "outcomes": [{"hour": iso(h.start), **h.counts} for h in s.hours],
        "failures": [{"at": iso(f.at), "messageId": f.message_id, "recipient": f.recipient,
                      "outcome": f.outcome, "code": f.code, "enhanced": f.enhanced,
                      "reply": f.reply, "mxHost": f.mx_host} for f in s.failures],
        "bounceReasons": [{"reason": r, "count": n} for r, n in s.bounce_reasons],
        "webhooks": {
            "pending": s.webhook_pending,
            "oldestPendingAt": iso(s.webhook_oldest),
            "failingEndpoints": [
                {"id": e.id, "url": e.url, "enabled": e.enabled,
                 "failingSince": iso(e.failing_since), "disabledReason": e.disabled_reason,
                 "pending": e.pending} for e in s.failing_endpoints],
        },
    }
