"""/v1/contacts: the people relay mails, their data (which fills {{var}} in what they get)
and whether they are subscribed to marketing mail. Scope contacts:manage."""

from __future__ import annotations

import time
from typing import Annotated, Any

from aiohttp import web
from pydantic import Field, StrictBool, StringConstraints

from ..config import Config
from ..store import SQLiteStore
from ..store.contacts import ContactChange
from ..types import Contact
from . import auth
from .errors import ApiError
from .requests import address_param, int_param, json_body, parse
from .schemas import Strict
from .views import iso

FieldName = Annotated[str, StringConstraints(min_length=1, max_length=100,
                                             pattern=r"^[^\r\n{}]*$")]


class UpsertContact(Strict):
    email: Annotated[str, StringConstraints(min_length=3, max_length=320)]
    subscribed: StrictBool | None = Field(
        default=None, description="omitted: a new contact is unsubscribed, an existing one "
                                  "keeps its state")
    data: dict[FieldName, Any] = Field(default_factory=dict,
                                       description="fields to set; a null deletes the field")


class ContactsApi:
    def __init__(self, config: Config, store: SQLiteStore) -> None:
        self._config = config
        self._store = store

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/contacts", self.upsert),
            web.get("/v1/contacts", self.list),
            web.get("/v1/contacts/{id}", self.get),
            web.delete("/v1/contacts/{id}", self.delete),
        ]

    async def upsert(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        body = parse(UpsertContact, await json_body(request))
        email = address_param(body.email, "email") or ""
        (done,) = await self._store.upsert_contacts([contact_change(
            email, body.data, subscribed=body.subscribed, owner=key.domains,
            max_data=self._config.limits.max_metadata_size)], time.time())
        return web.json_response(contact_json(done.contact), status=201 if done.created else 200)

    async def list(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        q = request.query
        limit = int_param(q.get("limit"), "limit", default=100, low=1, high=1000)
        raw = q.get("subscribed")
        if raw not in (None, "true", "false"):
            raise ApiError(422, "subscribed must be true or false", param="subscribed")
        found = await self._store.list_contacts(limit=limit + 1, after=q.get("cursor"),
                                                subscribed=None if raw is None else raw == "true",
                                                within=auth.reach(key))
        more = len(found) > limit
        found = found[:limit]
        return web.json_response({"data": [contact_json(c) for c in found],
                                  "nextCursor": found[-1].email if more and found else None})

    async def get(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        found = await self._store.get_contact(request.match_info["id"], auth.reach(key))
        if found is None:
            raise ApiError(404, f"no contact {request.match_info['id']}", param="id")
        return web.json_response(contact_json(found))

    async def delete(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        ident = request.match_info["id"]
        if not await self._store.delete_contact(ident, auth.reach(key)):
            raise ApiError(404, f"no contact {ident}", param="id")
        return web.json_response({"id": ident, "deleted": True})


def contact_change(email: str, data: dict[str, Any], *, subscribed: bool | None,
                   subscribed_if_new: bool = False, owner: tuple[str, ...] = (),
                   max_data: int | None = None) -> ContactChange:
    """A request's data as a change: a value sets the field, a null deletes it."""
    return ContactChange(email=email, subscribed=subscribed, owner=owner, max_data=max_data,
                         subscribed_if_new=subscribed_if_new,
                         data={k: v for k, v in data.items() if v is not None},
                         remove=tuple(k for k, v in data.items() if v is None))


def contact_json(c: Contact) -> dict[str, Any]:
    return {"id": c.id, "email": c.email, "subscribed": c.subscribed, "data": c.data,
            "createdAt": iso(c.created_at), "updatedAt": iso(c.updated_at)}
