"""The MailChannels suppression list (/tx/v1/suppression-list) and webhook batches
(/tx/v1/webhook-batch), in the shapes the `mailchannels` SDK reads, kept in relay's own
suppression list and webhook outbox; a key reaches only what its owner owns.

Readings where relay's data and MailChannels' differ:
- A relay entry for all mail is MailChannels' ["transactional", "non-transactional"]; one
  scoped to a sending domain (an unsubscribe) is ["non-transactional"] with that domain as
  its sender. Entries made without suppression_types stop all mail, as relay's own do;
  ["non-transactional"] alone makes one entry per sending domain of the key (an admin key
  has none: 400); ["transactional"] alone is a 400, as relay has no entry that stops
  transactional mail but lets broadcast mail through.
- Sources: relay's reasons manual, unsubscribed, hard_bounce and complaint are api,
  unsubscribe_link (list_unsubscribe finds the same: relay does not tell the two apart),
  hard_bounce and spam_complaint. A delete without `source` removes the api entries, as
  MailChannels' does; `source=all` removes every one. `notes` are kept with the entry's
  source ("api: <notes>").
- relay posts one event per request, so a webhook batch is one attempted delivery of one
  event to a MailChannels-format endpoint (batch_id is its outbox row, event_count 1). A
  resend queues the event again (202) rather than sending it while the caller waits, so
  its status_code is null; the batch list shows the new attempt once made.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field, StrictBool, StringConstraints

from ...store import SQLiteStore
from ...store.webhooks import Attempted
from ...timefmt import iso
from ...types import ApiKey, Suppression
from .. import auth
from ..errors import ApiError
from ..requests import address_param, int_param, json_body, parse
from ..schemas import Strict
from .common import in_shape
from .mailchannels import STATUSES, caller, error_body
from .mailchannels_metrics import time_param

FORMAT = "mailchannels"
ALL_TYPES = ["transactional", "non-transactional"]
# MailChannels' source -> relay's reason; and back (unsubscribe_link for both of its own)
_REASONS = {"api": "manual", "unsubscribe_link": "unsubscribed",
            "list_unsubscribe": "unsubscribed", "hard_bounce": "hard_bounce",
            "spam_complaint": "complaint"}
_SOURCES = {"manual": "api", "unsubscribed": "unsubscribe_link",
            "hard_bounce": "hard_bounce", "complaint": "spam_complaint"}
_NOTES = "api: "
BATCH_STATUSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "no_response")

SuppressionType = Literal["transactional", "non-transactional"]


class McSuppressionEntry(Strict):
    recipient: Annotated[str, StringConstraints(min_length=3, max_length=320)]
    suppression_types: list[SuppressionType] | None = Field(default=None, min_length=1)
    notes: Annotated[str, StringConstraints(max_length=1024)] | None = None


class McSuppressionCreate(Strict):
    suppression_entries: list[McSuppressionEntry] = Field(min_length=1, max_length=1000)
    add_to_sub_accounts: StrictBool | None = None


class MailChannelsManageApi:
    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    def routes(self) -> list[web.RouteDef]:
        shaped = in_shape(error_body, STATUSES)
        return [
            web.get("/tx/v1/suppression-list", shaped(self.suppressions)),
            web.post("/tx/v1/suppression-list", shaped(self.suppress)),
            web.delete("/tx/v1/suppression-list/recipients/{email}",
                       shaped(self.unsuppress)),
            web.get("/tx/v1/webhook-batch", shaped(self.batches)),
            web.post("/tx/v1/webhook-batch/{id}/resend", shaped(self.resend)),
        ]

    # -- the suppression list ------------------------------------------------------------

    async def suppressions(self, request: web.Request) -> web.Response:
        key = await caller(request, self._store)
        q = request.query
        source = q.get("source")
        if source is not None and source not in _REASONS:
            raise ApiError(400, f"source {source!r}: one of {', '.join(_REASONS)}",
                           param="source")
        found = await self._store.list_suppressions(
            within=auth.reach(key), address=address_param(q.get("recipient"), "recipient"),
            reasons=(_REASONS[source],) if source else None,
            created_after=time_param(q.get("created_after"), "created_after"),
            created_before=time_param(q.get("created_before"), "created_before"),
            limit=int_param(q.get("limit"), "limit", default=1000, low=1, high=1000),
            offset=int_param(q.get("offset"), "offset", default=0, low=0, high=10**9))
        return web.json_response({"suppression_list": [_entry(e) for e in found]})

    async def suppress(self, request: web.Request) -> web.Response:
        key = await caller(request, self._store)
        body = parse(McSuppressionCreate, await json_body(request))
        if body.add_to_sub_accounts:
            raise ApiError(400, "relay has no sub-accounts", param="add_to_sub_accounts")
        entries: list[Suppression] = []
        now = time.time()
        for i, e in enumerate(body.suppression_entries):  # all checked before any is added
            where = f"suppression_entries[{i}]"
            address = address_param(e.recipient, f"{where}.recipient") or ""
            source = _NOTES + e.notes if e.notes else "api"
            for scope in _scopes(key, e.suppression_types, f"{where}.suppression_types"):
                entries.append(Suppression(address=address, scope=scope, reason="manual",
                                           source=source, created_at=now, owner=key.domains))
        for entry in entries:
            await self._store.add_suppression(entry)
        return web.Response(status=201)

    async def unsuppress(self, request: web.Request) -> web.Response:
        key = await caller(request, self._store)
        address = address_param(request.match_info["email"], "recipient") or ""
        source = request.query.get("source", "api")
        if source != "all" and source not in _REASONS:
            raise ApiError(400, f"source {source!r}: all or one of {', '.join(_REASONS)}",
                           param="source")
        reasons = None if source == "all" else (_REASONS[source],)
        if not await self._store.remove_suppression(address, within=auth.reach(key),
                                                    reasons=reasons):
            raise ApiError(404, f"{address} has no suppression entry from {source}",
                           param="recipient")
        return web.Response(status=204)

    # -- webhook batches -----------------------------------------------------------------

    async def batches(self, request: web.Request) -> web.Response:
        key = await caller(request, self._store)
        q = request.query
        statuses = tuple(s.strip() for s in q.get("statuses", "").split(",") if s.strip())
        unknown = [s for s in statuses if s not in BATCH_STATUSES]
        if unknown:
            raise ApiError(400, f"statuses {', '.join(unknown)}: each one of "
                           f"{', '.join(BATCH_STATUSES)}", param="statuses")
        found = await self._store.attempted(
            format=FORMAT, within=auth.reach(key), url=q.get("webhook") or None,
            statuses=statuses,
            created_after=time_param(q.get("created_after"), "created_after"),
            created_before=time_param(q.get("created_before"), "created_before"),
            limit=int_param(q.get("limit"), "limit", default=100, low=1, high=1000),
            offset=int_param(q.get("offset"), "offset", default=0, low=0, high=10**9))
        return web.json_response({"webhook_batches": [_batch(a, key) for a in found]})

    async def resend(self, request: web.Request) -> web.Response:
        key = await caller(request, self._store)
        raw = request.match_info["id"]
        if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
            raise ApiError(400, f"batch_id {raw!r} is not a batch id", param="batch_id")
        found = await self._store.attempted(format=FORMAT, within=auth.reach(key),
                                            batch_id=int(raw), limit=1)
        if not found or not await self._store.redeliver(found[0].endpoint_id,
                                                        found[0].event_id, time.time()):
            raise ApiError(404, f"no webhook batch {raw}", param="batch_id")
        a = found[0]
        return web.json_response({"batch_id": a.id, "customer_handle": key.id,
                                  "webhook": a.url, "created_at": iso(a.created_at),
                                  "event_count": 1, "status_code": None,
                                  "duration_in_ms": None}, status=202)


def _scopes(key: ApiKey, types: list[SuppressionType] | None, param: str) -> list[str]:
    """The relay entries (their scopes) that stop the mail `types` names."""
    wanted = set(types or ALL_TYPES)
    if wanted == set(ALL_TYPES):
        return [""]
    if "transactional" in wanted:
        raise ApiError(400, "relay cannot stop transactional mail alone: its entries stop "
                       "all mail, or a sending domain's non-transactional mail; give "
                       '["transactional", "non-transactional"]', param=param)
    if not key.domains:
        raise ApiError(400, "a non-transactional entry is scoped to the key's sending "
                       "domains, and this key has none: give both suppression types",
                       param=param)
    return list(key.domains)


def _entry(e: Suppression) -> dict[str, Any]:
    return {"recipient": e.address,
            "suppression_types": ["non-transactional"] if e.scope else ALL_TYPES,
            "notes": e.source.removeprefix(_NOTES) if e.source.startswith(_NOTES) else None,
            "source": _SOURCES.get(e.reason, "api"), "sender": e.scope or None,
            "created_at": iso(e.created_at)}


def _batch(a: Attempted, key: ApiKey) -> dict[str, Any]:
    status = "no_response" if a.last_status is None else f"{a.last_status // 100}xx"
    return {"batch_id": a.id, "customer_handle": key.id, "webhook": a.url,
            "status": status, "created_at": iso(a.created_at), "event_count": 1,
            "status_code": a.last_status}
