"""The native API at /v1 (Drin's shape, seed 003): each request becomes one Submission and goes
through `submit`, the single way into the queue that SMTP mail takes too."""

from __future__ import annotations

import dataclasses
import email
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import pydantic
from aiohttp import web

from .. import compose, templates
from ..config import Config
from ..errors import ValidationError
from ..store import NewMessage, Remembered, SQLiteStore
from ..submit import Submitter
from ..types import (
    ApiKey,
    Composition,
    EnvelopeRecipient,
    RecipientStatus,
    Stream,
    Submission,
    SubmitResult,
)
from . import auth
from .errors import ApiError
from .idempotency import Answer, Claim, Idempotency, replay
from .mailboxes import mailbox, mailboxes, unique
from .owned import found_message, owned_message
from .parts import checked_headers, decode_attachments
from .pruned import raise_if_pruned
from .requests import address_param, int_param, json_body, parse
from .schemas import ReplyEmail, SendBatch, SendEmail, ValidBatch
from .stored import attachments_json, stored_mime, thread_of
from .submitting import Expansion, check_broadcast, prepare, store_call, suppressed_error
from .views import message_json


class NativeApi:
    def __init__(self, config: Config, store: SQLiteStore, submitter: Submitter) -> None:
        self._config = config
        self._store = store
        self._submitter = submitter
        self._idempotency = Idempotency(store)

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/emails", self.send),
            web.post("/v1/emails/batch", self.send_batch),
            web.get("/v1/emails", self.list),
            web.get("/v1/emails/{id}", self.get),
            web.get("/v1/emails/{id}/body", self.body),
            web.post("/v1/emails/{id}/cancel", self.cancel),
            web.post("/v1/emails/{id}/reply", self.reply),
            web.get("/v1/emails/{id}/attachments", self.attachments),
        ]

    # -- sending -------------------------------------------------------------------------

    async def send(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        raw = await json_body(request)

        async def model() -> SendEmail:
            return parse(SendEmail, raw)

        return await self._send(request, key, raw, model)

    async def reply(self, request: web.Request) -> web.Response:
        """A send in the thread of a stored message of the key's: In-Reply-To and References
        from its Message-ID and chain, "Re: " its subject, from its From. Drin's parents are
        mostly mail that came in, whose sender is the other party; relay keeps only the mail
        it sends, whose other party is its To, so the reply goes there unless `to` is given."""
        key = await auth.require(request, self._store)
        raw = await json_body(request)
        message_id = request.match_info["id"]
        detail = await found_message(self._store, key, message_id)

        async def build() -> SendEmail:
            given = parse(ReplyEmail, raw)
            for name in given.headers:
                if name.lower() in ("in-reply-to", "references"):
                    raise ApiError(422, f"the {name} header of a reply is set from the email "
                                   "it answers", param=f"headers.{name}")
            thread = thread_of(await stored_mime(self._store, message_id),
                               detail.message.subject or "")
            fields = given.model_dump(by_alias=True, exclude_unset=True, exclude_none=True)
            fields.setdefault("from", thread.sender)
            fields.setdefault("to", thread.to)
            fields.setdefault("subject", thread.subject)
            if fields["from"] is None:
                raise ApiError(422, "the email has no From to reply from; give from",
                               param="from")
            if not fields["to"]:
                raise ApiError(422, "the email has no To to reply to; give to", param="to")
            fields["headers"] = {**given.headers, "In-Reply-To": thread.message_id,
                                 "References": thread.references}
            return parse(SendEmail, fields)

        return await self._send(request, key, raw, build)

    async def _send(self, request: web.Request, key: ApiKey, raw: bytes,
                    model: Callable[[], Awaitable[SendEmail]]) -> web.Response:
        """Queue one email (a send or a reply) under the request's Idempotency-Key."""
        async def produce(claim: Claim | None) -> Answer:
            message = self._prepare(await model(), key)
            answer = Answer.of(202, {"id": message.id, "status": _status(message)})
            if claim is not None:
                message = dataclasses.replace(
                    message, idempotency_scope=claim.scope, idempotency_key=claim.key,
                    idempotency_fingerprint=claim.fingerprint, idempotency_status=answer.status,
                    idempotency_response=answer.body)
            await self._checked(message)
            result = await store_call(self._submitter.commit(message))
            if result.duplicate and claim is not None:  # the key was taken meanwhile
                found = await self._store.recall(claim.scope, claim.key, time.time())
                if found is not None:
                    return replay(found, claim)
            if result.status == "suppressed":
                raise suppressed_error(result)
            return answer

        return await self._idempotency.answer(request, key.id, raw, produce)

    async def send_batch(self, request: web.Request) -> web.Response:
        """Always 207: each item validated on its own and reported by index; the valid ones
        are queued together in one transaction (with the idempotency key's answer)."""
        key = await auth.require(request, self._store)
        raw = await json_body(request)

        async def produce(claim: Claim | None) -> Answer:
            items = _valid_batch(raw) or parse(SendBatch, raw).emails
            failed: dict[int, dict[str, Any]] = {}
            messages, indexes = [], []
            # past the budget, this item and the rest are refused (413) and not built
            budget = Expansion(self._config.limits.max_request_expansion)
            for i, item in enumerate(items):
                try:
                    budget.check(f"emails[{i}]")
                    if not isinstance(item, (dict, SendEmail)):
                        raise ApiError(422, f"emails[{i}]: an email is a JSON object, not "
                                       f"{_json_kind(item)}", param=f"emails[{i}]")
                    model = item if isinstance(item, SendEmail) else \
                        parse(SendEmail, item, prefix=f"emails[{i}]")
                    message = self._prepare(model, key)
                    budget.spend(message, f"emails[{i}]")
                    await self._checked(message)
                except ApiError as exc:
                    failed[i] = _error_body(exc, f"emails[{i}]")
                    continue
                messages.append(message)
                indexes.append(i)

            def answer(queued: list[SubmitResult]) -> Answer:
                """Made inside the transaction, once screening has said who is suppressed."""
                by_index = dict(zip(indexes, queued, strict=True))
                return Answer.of(207, {"results": [
                    {"index": i, "error": failed[i]} if i in failed else _batch_item(i, by_index[i])
                    for i in range(len(items))]})

            made: list[Answer] = []

            def remembered(queued: list[SubmitResult]) -> Remembered:
                made.append(answer(queued))
                assert claim is not None
                return claim.record(made[0])

            queued, existing = await store_call(self._submitter.commit_all(
                messages, (claim.scope, claim.key, time.time()) if claim else None,
                remembered if claim else None))
            if existing is not None and claim is not None:
                return replay(existing, claim)
            return made[0] if made else answer(queued)

        return await self._idempotency.answer(request, key.id, raw, produce)

    def _prepare(self, model: SendEmail, key: ApiKey) -> NewMessage:
        try:
            sub = to_submission(model, key, self._config)
        except ValidationError as exc:  # a template's: an ApiError, so a batch item says it
            status = 413 if exc.smtp.startswith("552") else 422  # filled past the size limit
            raise ApiError(status, str(exc), param=exc.param) from None
        return prepare(self._submitter, sub)

    async def _checked(self, message: NewMessage) -> None:
        await check_broadcast(self._submitter, message)

    # -- reading -------------------------------------------------------------------------

    async def list(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        q = request.query
        limit = int_param(q.get("limit"), "limit", default=50, low=1, high=100)
        status = q.get("status") or None
        if status is not None and status not in {s.value for s in RecipientStatus}:
            raise ApiError(422, f"status must be one of {', '.join(RecipientStatus)}",
                           param="status")
        page = await self._store.list_messages(
            limit=limit, cursor=q.get("cursor") or None, status=status,
            tag=q.get("tag") or None, to=address_param(q.get("to"), "to"),
            sender=address_param(q.get("from"), "from"), since=_time_param(q.get("since")),
            within=auth.reach(key))
        return web.json_response({"data": [message_json(d) for d in page.items],
                                  "nextCursor": page.next_cursor})

    async def get(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        detail = await found_message(self._store, key, request.match_info["id"])
        return web.json_response(message_json(detail, full=True))

    async def body(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        message_id = request.match_info["id"]
        await owned_message(self._store, key, message_id)
        stored = await self._store.get_outgoing(message_id)
        if stored is None:
            await raise_if_pruned(self._store, message_id)
            raise ApiError(404, f"no email {message_id}", param="id")
        raw = compose.materialize(stored.body, stored.kind)
        parsed = email.message_from_bytes(raw)
        text = html = None
        for part in parsed.walk():
            if part.get_content_maintype() == "multipart" or part.get_filename():
                continue
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes):
                continue
            decoded = payload.decode(part.get_content_charset() or "utf-8", "replace")
            if part.get_content_type() == "text/plain" and text is None:
                text = decoded
            elif part.get_content_type() == "text/html" and html is None:
                html = decoded
        return web.json_response({"id": message_id, "text": text, "html": html,
                                  "raw": raw.decode("utf-8", "replace")})

    async def attachments(self, request: web.Request) -> web.Response:
        """The files of a message of the key's: metadata only, as Drin lists them (410 when
        retention has dropped the body: the files went with it)."""
        key = await auth.require(request, self._store)
        message_id = request.match_info["id"]
        await owned_message(self._store, key, message_id)
        parsed = await stored_mime(self._store, message_id)
        return web.json_response({"data": attachments_json(parsed)})

    async def cancel(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        message_id = request.match_info["id"]
        detail = await found_message(self._store, key, message_id)
        count = await self._store.cancel(message_id, f"api:{key.id}", time.time(),
                                         only=("scheduled",))
        if not count:
            raise ApiError(409, f"{message_id} is {detail.message.status}; only a scheduled "
                           "email can be cancelled")
        return web.json_response({"id": message_id, "status": "cancelled"})


# -- request → Submission ---------------------------------------------------------------------

def to_submission(m: SendEmail, key: ApiKey, config: Config) -> Submission:
    data = m.data or {}
    limit = config.limits.max_message_size
    subject = templates.render(m.subject or "", data, escape=False, param="subject",
                               header=True, limit=limit)
    text = templates.render(m.text, data, escape=False, param="text",
                            limit=limit) if m.text else m.text
    html = templates.render(m.html, data, escape=True, param="html",
                            limit=limit) if m.html else m.html
    if text is None and html is None and not m.icalEvent:
        raise ApiError(422, "an email needs text, html or an icalEvent", param="text")
    stream = _STREAMS[m.stream]
    headers = checked_headers(m.headers.items(), stream)
    sender = mailbox(m.from_, "from")
    seen: set[str] = set()  # one copy of each address: to first, then cc, then bcc
    to = unique(mailboxes(m.to, "to"), seen)
    cc = unique(mailboxes(m.cc, "cc"), seen)
    bcc = unique(mailboxes(m.bcc, "bcc"), seen)
    if not (to or cc or bcc):
        raise ApiError(422, "an email needs at least one recipient in to, cc or bcc",
                       param="to")
    composition = Composition(
        sender=sender, to=to, cc=cc, reply_to=mailboxes(m.replyTo or [], "replyTo"),
        subject=subject, text=text, html=html, headers=tuple(headers), ical=m.icalEvent,
        attachments=decode_attachments(m.attachments, max_file=config.limits.max_attachment_size,
                                       max_total=config.limits.max_attachments_size))
    every = (*to, *cc, *bcc)
    utf8 = not (sender.email.isascii() and all([mb.email.isascii() for mb in every]))
    return Submission(
        mail_from=sender.email,
        recipients=tuple([EnvelopeRecipient(address=mb.email) for mb in every]),
        composition=composition,
        source="api", api_key_id=key.id, allowed_domains=key.domains,
        tags=tuple([t.name + (f":{t.value}" if t.value else "") for t in m.tags]),
        metadata=m.metadata, stream=stream, smtputf8=utf8, refuse_if_suppressed=True,
        track_opens=m.trackOpens, track_clicks=m.trackClicks, pool=m.pool or "",
        scheduled_at=m.scheduledAt.timestamp() if m.scheduledAt else None)


def _valid_batch(raw: bytes) -> list[SendEmail] | None:
    """Every item of a batch at once, when every one is valid (the usual case): one pass of
    pydantic over the body, not a pass to Python objects and another per item. Else None,
    and each item is validated on its own, for its own error."""
    try:
        return ValidBatch.model_validate_json(raw).emails
    except pydantic.ValidationError:
        return None


_STREAMS = {s.value: s for s in Stream}


def _time_param(raw: str | None) -> float | None:
    if not raw:
        return None
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(422, "since must be an ISO-8601 time with an offset or Z",
                       param="since") from None
    if when.tzinfo is None:
        raise ApiError(422, "since needs an offset or Z", param="since")
    return when.timestamp()


def _batch_item(index: int, result: SubmitResult) -> dict[str, Any]:
    if result.status == "suppressed":
        return {"index": index, "error": suppressed_error(result).body()["error"]}
    return {"index": index, "id": result.message_id, "status": result.status}


def _json_kind(value: Any) -> str:
    """What a JSON value is, in words, for an error about a value of the wrong type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "a string" if isinstance(value, str) else "an array"


def _status(message: NewMessage) -> str:
    return "scheduled" if message.scheduled_at else "queued"


def _error_body(exc: ApiError, prefix: str) -> dict[str, Any]:
    body = exc.body()["error"]
    if body.get("param") and not str(body["param"]).startswith(prefix):
        body["param"] = f"{prefix}.{body['param']}"
    return dict(body)
