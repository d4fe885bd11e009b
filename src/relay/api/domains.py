"""GET /v1/domains: the caller's sending domains in Drin's shape, with the DNS records each
needs (dnsrecords.py). The domains themselves are made, verified and rotated with `relay
domains` (domains.py); this route only reads them."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import dnsrecords, owners
from ..config import Config
from ..store import SQLiteStore
from ..timefmt import iso
from ..types import Domain
from . import auth
from .errors import ApiError
from .requests import int_param

STATUSES = ("pending", "verified")
MAX_CURSOR = 253  # a cursor is a domain name


class DomainsApi:
    def __init__(self, config: Config, store: SQLiteStore) -> None:
        self._config = config
        self._store = store

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/domains", self.list)]

    async def list(self, request: web.Request) -> web.Response:
        """One page of the key's domains by name; `nextCursor` is the last name on it."""
        key = await auth.require(request, self._store)
        q = request.query
        limit = int_param(q.get("limit"), "limit", default=50, low=1, high=100)
        status = q.get("status") or None
        if status is not None and status not in STATUSES:
            raise ApiError(422, f"status must be one of {', '.join(STATUSES)}", param="status")
        cursor = q.get("cursor") or ""
        if len(cursor) > MAX_CURSOR:
            raise ApiError(422, "cursor is not one this API gave", param="cursor")
        reach = auth.reach(key)
        mine = [d for d in await self._store.list_domains()  # sorted by name
                if owners.sees_domain(reach, d.name) and d.name > cursor
                and (status is None or domain_status(d) == status)]
        page = mine[:limit]
        more = len(mine) > limit
        return web.json_response({"data": [self.domain_json(d) for d in page],
                                  "nextCursor": page[-1].name if more else None})

    def domain_json(self, d: Domain) -> dict[str, Any]:
        # the store's id ("dom_..."; PiiSend's domain_id takes it too). A record's own
        # `verified` flag is not given: a list does not look DNS up (`relay domains verify`
        # does), and a guess would read as an answer.
        return {"id": d.id or d.name, "domain": d.name, "status": domain_status(d),
                "createdAt": iso(d.created_at), "returnPath": d.return_path,
                "records": [{"type": r.type, "name": r.name, "value": r.value,
                             "purpose": r.purpose}
                            for r in dnsrecords.records(self._config, d)]}


def domain_status(d: Domain) -> str:
    """Verified: relay holds an active DKIM key for it, so its mail is signed (the rule the
    MailerLogic dialect and `Submitter.will_sign` use); pending otherwise."""
    return "verified" if any(k.state == "active" for k in d.keys) else "pending"
