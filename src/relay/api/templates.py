"""/v1/templates: stored templates (subject, html, text with {{var}}, a type and a default
sender) that the native API and the dialects send by id. Scope templates:manage."""

from __future__ import annotations

import secrets
import time
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field, StringConstraints

from .. import templates
from ..compose import check_header_text
from ..errors import ValidationError
from ..store import SQLiteStore
from ..types import Template
from . import auth
from .errors import ApiError
from .mailboxes import mailbox
from .owned import found_template
from .requests import int_param, json_body, parse
from .schemas import Address, Strict
from .views import iso

Name = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\r\n]*$")]
Subject = Annotated[str, StringConstraints(max_length=998, pattern=r"^[^\r\n]*$")]


class CreateTemplate(Strict):
    name: Name
    type: Literal["transactional", "marketing"] = "transactional"
    subject: Subject
    html: str = Field(min_length=1)
    text: str | None = None
    from_: Address | None = Field(default=None, alias="from",
                                  description="the default sender; a request's from beats it")


class UpdateTemplate(Strict):
    name: Name | None = None
    type: Literal["transactional", "marketing"] | None = None
    subject: Subject | None = None
    html: str | None = Field(default=None, min_length=1)
    text: str | None = None
    from_: Address | None = Field(default=None, alias="from")


class TemplatesApi:
    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/templates", self.create),
            web.get("/v1/templates", self.list),
            web.get("/v1/templates/{id}", self.get),
            web.patch("/v1/templates/{id}", self.update),
            web.delete("/v1/templates/{id}", self.delete),
        ]

    async def create(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        t = new_template(parse(CreateTemplate, await json_body(request)), owner=key.domains)
        await self._store.add_template(t)
        return web.json_response(template_json(t), status=201)

    async def list(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        q = request.query
        limit = int_param(q.get("limit"), "limit", default=100, low=1, high=1000)
        found = await self._store.list_templates(limit=limit + 1, after=q.get("cursor"),
                                                 within=auth.reach(key))
        more = len(found) > limit
        found = found[:limit]
        return web.json_response({"data": [template_json(t) for t in found],
                                  "nextCursor": found[-1].id if more and found else None})

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response(template_json(await self._found(request)))

    async def update(self, request: web.Request) -> web.Response:
        old = await self._found(request)
        body = parse(UpdateTemplate, await json_body(request))
        given = body.model_fields_set
        for name in ("name", "type", "subject", "html"):
            if name in given and getattr(body, name) is None:
                raise ApiError(422, f"{name} cannot be null", param=name)
        changes: dict[str, Any] = {n: getattr(body, n) for n in
                                   ("name", "type", "subject", "html", "text") if n in given}
        if "from_" in given:
            sender = mailbox(body.from_, "from") if body.from_ is not None else None
            changes["from_email"] = sender.email if sender else None
            changes["from_name"] = sender.name if sender else None
        checked(changes.get("subject", old.subject), changes.get("html", old.html),
                changes.get("text", old.text))
        changes["updated_at"] = time.time()
        t = await self._store.update_template(old.id, changes)
        if t is None:  # deleted meanwhile
            raise ApiError(404, f"no template {old.id}", param="id")
        return web.json_response(template_json(t))

    async def delete(self, request: web.Request) -> web.Response:
        t = await self._found(request)
        if not await self._store.delete_template(t.id):
            raise ApiError(404, f"no template {t.id}", param="id")
        return web.json_response({"id": t.id, "deleted": True})

    async def _found(self, request: web.Request) -> Template:
        key = await auth.require(request, self._store)
        return await found_template(self._store, key.domains, request.match_info["id"])


def new_template(body: CreateTemplate, owner: tuple[str, ...] = ()) -> Template:
    """A new template from a checked request (the API's or the CLI's)."""
    checked(body.subject, body.html, body.text)
    sender = mailbox(body.from_, "from") if body.from_ is not None else None
    now = time.time()
    return Template(id="tpl_" + secrets.token_hex(8), name=body.name, type=body.type,
                    subject=body.subject, html=body.html, text=body.text,
                    from_email=sender.email if sender else None,
                    from_name=sender.name if sender else None, created_at=now, updated_at=now,
                    owner=owner)


def checked(subject: str, html: str, text: str | None) -> None:
    """Each part must be a template the renderer reads: filled with fallbacks only, any
    {{var}} without one is fine (it needs data at send time), a broken tag is not; the
    subject, a header, has no line break (its values are checked when it is sent)."""
    for param, value in (("subject", subject), ("html", html), ("text", text or "")):
        if value.count("{{") != len(templates.tags(value)):
            raise ApiError(422, f"{param} has a {{{{ that is not a {{{{var}}}} or "
                           "{{var ?? 'fallback'}} tag", param=param)
    try:  # a fallback too: {{name ?? '...'}} is written into the Subject header as it is
        check_header_text(subject, "subject")
    except ValidationError as exc:
        raise ApiError(422, str(exc), param=exc.param) from None


def template_json(t: Template) -> dict[str, Any]:
    sender: dict[str, Any] | None = None
    if t.from_email:
        sender = {"email": t.from_email, "name": t.from_name}
    return {"id": t.id, "name": t.name, "type": t.type, "subject": t.subject, "html": t.html,
            "text": t.text, "from": sender, "createdAt": iso(t.created_at),
            "updatedAt": iso(t.updated_at)}
