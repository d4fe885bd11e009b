"""/v1/webhooks: endpoints (the signing secret shown once), enable/disable, rotate the
secret, redeliver an event. A target must not be private unless [webhooks] allows it. An
endpoint belongs to the domains of the key that made it and gets only their mail's events."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from .. import owners
from ..config import Config
from ..feedback import webhooks
from ..store import SQLiteStore
from ..types import WebhookEndpoint
from . import auth
from .errors import ApiError
from .requests import json_body, parse
from .schemas import CreateWebhook, Redeliver, UpdateWebhook
from .views import iso


class HooksApi:
    def __init__(self, config: Config, store: SQLiteStore) -> None:
        self._config = config
        self._store = store

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/webhooks", self.create),
            web.get("/v1/webhooks", self.list),
            web.get("/v1/webhooks/{id}", self.get),
            web.patch("/v1/webhooks/{id}", self.update),
            web.delete("/v1/webhooks/{id}", self.delete),
            web.post("/v1/webhooks/{id}/rotate-secret", self.rotate),
            web.post("/v1/webhooks/{id}/redeliver", self.redeliver),
        ]

    async def create(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        body = parse(CreateWebhook, await json_body(request))
        await check_target(body.url, self._config.webhooks.allow_private_targets)
        ep = WebhookEndpoint(id="wh_" + secrets.token_hex(8), url=body.url,
                             secret=webhooks.new_secret(), events=tuple(dict.fromkeys(
                                 body.events)), created_at=time.time(), format=body.format,
                             owner=key.domains)
        await self._store.add_endpoint(ep)
        return web.json_response({**endpoint_json(ep), "signingSecret": ep.secret}, status=201)

    async def list(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        found = await self._store.list_endpoints(auth.reach(key))
        return web.json_response({"data": [endpoint_json(e) for e in found],
                                  "nextCursor": None})

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response(endpoint_json(await self._found(request)))

    async def update(self, request: web.Request) -> web.Response:
        ep = await self._found(request)
        body = parse(UpdateWebhook, await json_body(request))
        await self._store.update_endpoint(ep.id, enabled=body.enabled, now=time.time())
        return web.json_response(endpoint_json(await self._found(request)))

    async def delete(self, request: web.Request) -> web.Response:
        ep = await self._found(request)
        await self._store.delete_endpoint(ep.id)
        return web.json_response({"id": ep.id, "deleted": True})

    async def rotate(self, request: web.Request) -> web.Response:
        ep = await self._found(request)
        secret = webhooks.new_secret()
        await self._store.update_endpoint(ep.id, secret=secret)
        return web.json_response({"id": ep.id, "signingSecret": secret})

    async def redeliver(self, request: web.Request) -> web.Response:
        ep = await self._found(request)
        body = parse(Redeliver, await json_body(request))
        if not await self._store.redeliver(ep.id, int(body.eventId[4:]), time.time()):
            raise ApiError(404, f"no event {body.eventId}", param="eventId")
        return web.json_response({"id": ep.id, "eventId": body.eventId, "status": "queued"},
                                 status=202)

    async def _found(self, request: web.Request) -> WebhookEndpoint:
        """The caller's key checked, then its endpoint named in the path; another owner's is
        404, as if it did not exist."""
        key = await auth.require(request, self._store)
        ep = await self._store.get_endpoint(request.match_info["id"])
        if ep is None or not owners.sees(auth.reach(key), ep.owner):
            raise ApiError(404, f"no webhook {request.match_info['id']}", param="id")
        return ep


async def check_target(url: str, allow_private: bool) -> None:
    """Refuse a target that is, or resolves only to, private addresses (the dispatcher checks
    the address it connects to again at each delivery)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
        raise ApiError(422, "url must be http(s)://host/... without credentials", param="url")
    if allow_private:
        return
    refused = webhooks.literal_refused(url, allow_private)
    if refused:
        raise ApiError(422, refused, param="url")
    try:
        found = await asyncio.get_running_loop().getaddrinfo(
            parts.hostname, parts.port or 443, type=socket.SOCK_STREAM)
    except OSError:
        return  # not resolvable now: the check at delivery time still applies
    if found and all(webhooks.private(str(info[4][0])) for info in found):
        raise ApiError(422, f"{parts.hostname} resolves only to private addresses (set "
                       "[webhooks] allow_private_targets)", param="url")


def endpoint_json(e: WebhookEndpoint) -> dict[str, Any]:
    return {"id": e.id, "url": e.url, "format": e.format, "events": list(e.events),
            "enabled": e.enabled,
            "createdAt": iso(e.created_at), "disabledAt": iso(e.disabled_at),
            "disabledReason": e.disabled_reason, "failingSince": iso(e.failing_since)}
