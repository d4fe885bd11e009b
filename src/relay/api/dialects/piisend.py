"""PiiSend's API (seed 001) at /api/v1/emails: send, list by offset, detail, cancel and
resend, each a translation to or from the one Submission and the store's messages.

The seed leaves the response bodies *unclear*. Chosen here, as a FastAPI service (which its
`from_` field betrays) answers and its SDKs model: one email object for every answer (send,
list items, cancel, resend), the detail adding the fields a debugger wants; lists as
{data, limit, offset, has_more}; errors as FastAPI's {"detail": message} plus `type` and
`field` (null when no one field is at fault)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from aiohttp import web

from ... import compose, rawmail, templates
from ...addresses import normalize_domain, self_and_parents
from ...config import Config
from ...errors import ValidationError
from ...keys import may_send_as
from ...store import SQLiteStore
from ...store.domains import ID_PREFIX as DOMAIN_ID_PREFIX
from ...submit import Submitter
from ...types import ApiKey, Composition, EnvelopeRecipient, Mailbox, Stream, Submission
from .. import auth
from ..errors import ApiError
from ..idempotency import Answer, Claim, Idempotency, replay
from ..mailboxes import mailbox, mailboxes, unique
from ..owned import found_message
from ..pruned import raise_if_pruned
from ..requests import int_param, json_body, parse
from ..submitting import commit, prepare, store_call
from .common import in_shape, named, reshaped
from .piisend_emails import (
    LISTED,
    content_json,
    email_json,
    history_json,
    new_email_json,
    status_of,
)
from .piisend_request import PsSend, attachments, scheduled

BASE = "/api/v1/emails"


def error_body(exc: ApiError) -> dict[str, Any]:
    return {"detail": named(exc), "type": exc.type, "field": exc.param}


class PiiSendApi:
    def __init__(self, config: Config, store: SQLiteStore, submitter: Submitter) -> None:
        self._config = config
        self._store = store
        self._submitter = submitter
        self._idempotency = Idempotency(store)

    def routes(self) -> list[web.RouteDef]:
        shaped = in_shape(error_body)
        return [
            web.post(BASE, shaped(self.send)),
            web.get(BASE, shaped(self.list)),
            web.get(BASE + "/{id}", shaped(self.get)),
            web.post(BASE + "/{id}/cancel", shaped(self.cancel)),
            web.post(BASE + "/{id}/resend", shaped(self.resend)),
        ]

    # -- sending -------------------------------------------------------------------------

    async def send(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        raw = await json_body(request)

        async def produce(claim: Claim | None) -> Answer:
            try:
                m = parse(PsSend, raw, renames={})
                sub = await self._submission(m, key)
                return await self._queue(sub, claim)
            except (ApiError, ValidationError) as exc:  # remembered in this shape too
                raise reshaped(exc, error_body) from None

        return await self._idempotency.answer(request, key.id, raw, produce)

    async def _queue(self, sub: Submission, claim: Claim | None) -> Answer:
        message = prepare(self._submitter, sub)
        answer = Answer.of(202, new_email_json(message))
        if claim is not None:
            message = dataclasses.replace(
                message, idempotency_scope=claim.scope, idempotency_key=claim.key,
                idempotency_fingerprint=claim.fingerprint, idempotency_status=answer.status,
                idempotency_response=answer.body)
        result = await commit(self._submitter, message)
        if result.duplicate and claim is not None:  # the key was taken meanwhile
            found = await self._store.recall(claim.scope, claim.key, time.time())
            if found is not None:
                return replay(found, claim)
        if result.status == "suppressed":
            why = ", ".join(f"{address} ({reason})" for address, reason in result.suppressed)
            raise ApiError(409, f"every recipient is on the suppression list: {why}",
                           type="suppressed", param="to")
        return answer

    async def _submission(self, m: PsSend, key: ApiKey) -> Submission:
        raw_content = m.subject is not None or m.html is not None or m.text is not None
        if m.template_id is not None and raw_content:
            given = [n for n in ("subject", "html", "text") if getattr(m, n) is not None]
            raise ApiError(400, f"send a template_id or raw content, not both ({', '.join(given)}"
                           " given)", param="template_id")
        if m.template_vars and m.template_id is None:
            raise ApiError(400, "template_vars go with a template_id; raw content takes no "
                           "variables", param="template_vars")
        subject, html, text = m.subject, m.html, m.text
        template_sender = None
        if m.template_id is not None:
            filled = await self._template(m.template_id, m.template_vars, key)
            subject, html, text = filled.subject, filled.html, filled.text
            if filled.template.from_email:
                template_sender = Mailbox(email=filled.template.from_email,
                                          name=filled.template.from_name)
        elif html is None and text is None:
            raise ApiError(422, "an email needs html or text (or a template_id)", param="html")
        elif subject is None:
            raise ApiError(422, "raw content needs a subject", param="subject")
        domain = await self._domain(m.domain_id, key)
        if m.from_ is not None:
            sender = mailbox(m.from_, "from_")
        elif template_sender is not None:
            sender = mailbox(template_sender.email, "template_id")
            sender = Mailbox(email=sender.email, name=template_sender.name)
        elif domain is not None:
            sender = Mailbox(email=f"noreply@{domain}")
        else:
            raise ApiError(422, "give from_ or a domain_id to send from", param="from_")
        if domain is not None and domain not in self_and_parents(sender.email.rpartition("@")[2]):
            raise ApiError(422, f"from_ {sender.email} is not an address at {domain}",
                           param="from_")
        seen: set[str] = set()
        to = unique(mailboxes(m.to, "to"), seen)
        cc = unique(mailboxes(m.cc, "cc"), seen)
        stream = Stream.BROADCAST if m.enable_unsubscribe else Stream.TRANSACTIONAL
        composition = Composition(
            sender=sender, to=to, cc=cc, reply_to=mailboxes(m.reply_to, "reply_to"),
            subject=subject or "", text=text, html=html, attachments=attachments(m))
        utf8 = not all(mb.email.isascii() for mb in (sender, *to, *cc))
        return Submission(
            mail_from=sender.email,
            recipients=tuple(EnvelopeRecipient(address=mb.email) for mb in (*to, *cc)),
            composition=composition, source="api", api_key_id=key.id,
            # a domain_id narrows what the mail may be sent and signed as to that domain
            allowed_domains=(domain,) if domain else key.domains,
            stream=stream, smtputf8=utf8, refuse_if_suppressed=True,
            track_opens=m.track_opens, track_clicks=m.track_clicks,
            scheduled_at=scheduled(m.scheduled_at))

    async def _template(self, template_id: str, data: dict[str, Any],
                        key: ApiKey) -> templates.Filled:
        """A stored template of the key's filled with template_vars (a variable it lacks is
        the caller's error, named as template_vars.<name>)."""
        try:
            return await templates.render_stored(self._store, template_id, data,
                                                 param="template_id", within=auth.reach(key),
                                                 limit=self._config.limits.max_message_size)
        except templates.UnknownTemplate as exc:
            raise ApiError(404, str(exc), param="template_id") from None
        except ValidationError as exc:
            param = exc.param or "template_vars"
            message = str(exc).replace("data does not", "template_vars does not")
            if param.startswith("data."):
                param = "template_vars." + param.removeprefix("data.")
                message = message.replace(f"{exc.param}:", f"{param}:")
            raise ApiError(422, message, param=param) from None

    async def _domain(self, domain_id: str | None, key: ApiKey) -> str | None:
        """A domain_id is a sending domain's id ("dom_…", `relay domains list`) or its name.
        An id names only a domain the key may send as: another's answers as an unknown one,
        so an id tells nothing about domains beyond the key's reach."""
        if domain_id is None:
            return None
        given = domain_id.strip()
        if given.startswith(DOMAIN_ID_PREFIX):
            found = await self._store.domain_by_id(given)
            if found is None or not may_send_as(key.domains, found.name):
                raise ApiError(422, f"no sending domain with id {given} (relay domains list)",
                               param="domain_id")
            return found.name
        try:
            name = normalize_domain(given, param="domain_id")
        except ValidationError as exc:
            raise ApiError(422, str(exc), param="domain_id") from None
        if await self._store.get_domain(name) is None:
            raise ApiError(422, f"no sending domain {name} (relay domains add)",
                           param="domain_id")
        if not may_send_as(key.domains, name):
            raise ApiError(403, f"this API key may not send as {name}", param="domain_id")
        return name

    # -- reading -------------------------------------------------------------------------

    async def list(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        q = request.query
        limit = int_param(q.get("limit"), "limit", default=50, low=1, high=100)
        offset = int_param(q.get("offset"), "offset", default=0, low=0, high=10**9)
        status = q.get("status") or None
        if status is not None and status not in LISTED:
            raise ApiError(422, f"status must be one of {', '.join(LISTED)}", param="status")
        page = await self._store.page_by_offset(
            statuses=LISTED[status] if status else (), limit=limit, offset=offset,
            within=auth.reach(key))
        return web.json_response({"data": [email_json(d) for d in page.items], "limit": limit,
                                  "offset": offset, "has_more": page.next_cursor is not None})

    async def get(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        detail = await found_message(self._store, key, request.match_info["id"])
        stored = await self._store.get_outgoing(detail.message.id)
        raw = compose.materialize(stored.body, stored.kind) if stored is not None else b""
        return web.json_response({**email_json(detail), **content_json(raw), **history_json(detail),
                                  "resends": await self._store.resends_of(detail.message.id)})

    # -- changing ------------------------------------------------------------------------

    async def cancel(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        detail = await found_message(self._store, key, request.match_info["id"])
        count = await store_call(self._store.cancel(
            detail.message.id, f"api:{key.id}", time.time(), only=("scheduled",)))
        if not count:
            raise ApiError(409, f"{detail.message.id} is {status_of(detail)}; only a scheduled "
                           "email can be cancelled", type="conflict", param="id")
        return web.json_response(email_json(await found_message(self._store, key,
                                                            detail.message.id)))

    async def resend(self, request: web.Request) -> web.Response:
        """A new message with the first one's content, recipients, stream and tracking; its
        metadata names the first (resend_of), whose detail lists it among its resends."""
        key = await auth.require(request, self._store)
        detail = await found_message(self._store, key, request.match_info["id"])
        stored = await self._store.get_outgoing(detail.message.id)
        if stored is None:
            await raise_if_pruned(self._store, detail.message.id)
            raise ApiError(404, f"no email {detail.message.id}", param="id")
        m = detail.message
        opens, clicks = await self._store.tracking_of(m.id)
        content: dict[str, Any]
        if stored.kind == "raw":  # new Message-ID and Date from submit
            headers, body = rawmail.split(stored.body)
            kept = [h for h in headers if h.key not in ("message-id", "date")]
            content = {"data": rawmail.join(kept, body)}
        else:
            content = {"composition": compose.loads(stored.body)[0]}
        sub = Submission(
            mail_from=m.mail_from,
            recipients=tuple(EnvelopeRecipient(address=r.address) for r in detail.recipients),
            source="api", api_key_id=key.id, allowed_domains=key.domains, tags=m.tags,
            metadata={**m.metadata, "resend_of": m.id}, stream=m.stream, smtputf8=m.smtputf8,
            refuse_if_suppressed=True, track_opens=opens, track_clicks=clicks, **content)
        answer = await self._queue(sub, None)
        return answer.response()
