"""Management routes of the native API: API keys (the secret is shown once, at creation) and
the suppression list. A key reaches only what its domains own (owners.py): it makes keys with
at most its own scopes and domains, and sees and revokes only such keys."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from .. import keys, owners
from ..addresses import normalize_domain
from ..errors import ValidationError
from ..store import SQLiteStore
from ..types import SCOPES, ApiKey, Suppression
from . import auth
from .errors import ApiError
from .requests import address_param, int_param, json_body, parse
from .schemas import AddSuppression, CreateApiKey
from .views import iso


class ManageApi:
    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/api-keys", self.create_key),
            web.get("/v1/api-keys", self.list_keys),
            web.delete("/v1/api-keys/{id}", self.revoke_key),
            web.get("/v1/suppressions", self.list_suppressions),
            web.post("/v1/suppressions", self.add_suppression),
            web.delete("/v1/suppressions/{email}", self.remove_suppression),
        ]

    async def list_suppressions(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        q = request.query
        limit = int_param(q.get("limit"), "limit", default=100, low=1, high=1000)
        email = address_param(q.get("email"), "email")
        found = await self._store.list_suppressions(limit=limit + 1, after=q.get("cursor"),
                                                    address=email, within=auth.reach(key))
        more = len(found) > limit
        found = found[:limit]
        return web.json_response({"data": [suppression_json(e) for e in found],
                                  "nextCursor": found[-1].address if more and found else None})

    async def add_suppression(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        body = parse(AddSuppression, await json_body(request))
        email = address_param(body.email, "email") or ""
        scope = normalize_domain(body.scope, param="scope") if body.scope else ""
        if scope and not owners.sees_domain(auth.reach(key), scope):
            raise ApiError(422, f"scope {scope} is not one of this key's domains",
                           param="scope")
        # it stops only the mail of the key's domains (an admin key's: everyone's)
        entry = Suppression(address=email, scope=scope, reason=body.reason, source="api",
                            created_at=time.time(), owner=key.domains)
        added = await self._store.add_suppression(entry)
        return web.json_response(suppression_json(entry), status=201 if added else 200)

    async def remove_suppression(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        email = address_param(request.match_info["email"], "email") or ""
        scope = request.query.get("scope")
        if not await self._store.remove_suppression(email, scope, within=auth.reach(key)):
            raise ApiError(404, f"{email} is not suppressed", param="email")
        return web.json_response({"email": email, "removed": True})

    async def create_key(self, request: web.Request) -> web.Response:
        caller = await auth.require(request, self._store)
        body = parse(CreateApiKey, await json_body(request))
        # a key makes keys with at most its own scopes and domains: never more than it has
        extra = sorted(set(body.scopes) & set(SCOPES) - set(caller.scopes))
        if extra:
            raise ApiError(403, f"this key cannot grant scopes it does not have: "
                           f"{', '.join(extra)}", param="scopes")
        if caller.domains and (not body.domains or not all(
                keys.may_send_as(caller.domains, d) for d in body.domains)):
            raise ApiError(403, "a key limited to domains can only make keys limited to "
                           "them", param="domains")
        try:
            key, secret = await keys.create_key(self._store, name=body.name,
                                                scopes=body.scopes, domains=body.domains)
        except ValidationError as exc:
            raise ApiError(422, str(exc), param=exc.param) from None
        return web.json_response({**key_json(key), "key": secret}, status=201)

    async def list_keys(self, request: web.Request) -> web.Response:
        caller = await auth.require(request, self._store)
        found = [k for k in await self._store.list_api_keys() if manages(caller, k)]
        return web.json_response({"data": [key_json(k) for k in found], "nextCursor": None})

    async def revoke_key(self, request: web.Request) -> web.Response:
        caller = await auth.require(request, self._store)
        key_id = request.match_info["id"]
        if key_id == caller.id:
            raise ApiError(409, "a key cannot revoke itself", param="id")
        found = await self._store.find_api_key(key_id)
        if found is None or not manages(caller, found[0]) or not await \
                self._store.revoke_api_key(key_id, time.time()):
            raise ApiError(404, f"no active key {key_id}", param="id")
        auth.forget()
        return web.json_response({"id": key_id, "revoked": True})


def manages(caller: ApiKey, key: ApiKey) -> bool:
    """Whether `caller` may see and revoke `key`: one it could have made (no scope it lacks,
    no domain outside its own)."""
    return set(key.scopes) <= set(caller.scopes) and owners.sees(auth.reach(caller),
                                                                  key.domains)


def suppression_json(e: Suppression) -> dict[str, Any]:
    return {"email": e.address, "scope": e.scope or None, "reason": e.reason,
            "source": e.source, "createdAt": iso(e.created_at), "domains": list(e.owner)}


def key_json(k: ApiKey) -> dict[str, Any]:
    return {"id": k.id, "name": k.name, "scopes": list(k.scopes), "domains": list(k.domains),
            "createdAt": iso(k.created_at), "revokedAt": iso(k.revoked_at),
            "lastUsedAt": iso(k.last_used_at)}
