"""The native API at /v1 (Drin's shape, seed 003): each request becomes one Submission and goes
through `submit`, the single way into the queue that SMTP mail takes too."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import email.utils
import mimetypes
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import pydantic
from aiohttp import web

from .. import compose, templates
from ..addresses import normalize_address
from ..config import Config
from ..errors import StoreError, ValidationError
from ..store import NewMessage, Remembered, SQLiteStore
from ..submit import Submitter
from ..types import (
    ApiKey,
    Attachment,
    Composition,
    EnvelopeRecipient,
    Mailbox,
    RecipientStatus,
    Stream,
    Submission,
    SubmitResult,
)
from . import auth
from .errors import ApiError
from .idempotency import Answer, Claim, Idempotency, replay
from .owned import found_message, owned_message
from .schemas import BROADCAST_HEADERS, RESERVED_HEADERS, AttachmentIn, SendBatch, SendEmail
from .views import message_json

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_TYPE_TAG = re.compile(r"[\[\]]|^constrained-|^function-")  # union members pydantic names
_SPECIAL = re.compile(r'[<"(,;]')  # none of these: a bare address
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')  # a quoted display name, which may hold : or ;
_GROUP = re.compile(r"[:;]")  # outside quotes: RFC 5322 group syntax, not one mailbox
_NAME_ADDR = re.compile(r"^\s*([^<>\"(),;:@\\]*?)\s*<([^<>\s\"(),;\\]+@[^<>\s\"(),;\\]+)>\s*$")
_MODEL_NAMES = frozenset({"AddressObject", "AttachmentIn", "TagIn", "SendEmail", "str"})
_NATIVE_NAMES = {"from_": "from"}  # a field's Python name → its JSON name, in error params


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
        ]

    # -- sending -------------------------------------------------------------------------

    async def send(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        raw = await json_body(request)

        async def produce(claim: Claim | None) -> Answer:
            message = self._prepare(parse(SendEmail, raw), key)
            answer = Answer.of(202, {"id": message.id, "status": _status(message)})
            if claim is not None:
                message = dataclasses.replace(
                    message, idempotency_scope=claim.scope, idempotency_key=claim.key,
                    idempotency_fingerprint=claim.fingerprint, idempotency_status=answer.status,
                    idempotency_response=answer.body)
            await self._checked(message)
            result = await self._store_call(self._submitter.commit(message))
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
            batch = parse(SendBatch, raw)
            failed: dict[int, dict[str, Any]] = {}
            messages, indexes = [], []
            # {{var}}s can make items far larger than the request: once the built messages
            # pass [limits] max_request_expansion, this item and the rest are refused (413)
            budget = limit = self._config.limits.max_request_expansion
            for i, item in enumerate(batch.emails):
                over = ApiError(413, f"the batch's messages come to more than {limit} octets "
                                "([limits] max_request_expansion)", param=f"emails[{i}]")
                try:
                    if budget < 0:
                        raise over
                    message = self._prepare(parse(SendEmail, item, prefix=f"emails[{i}]"), key)
                    budget -= message.size or len(message.body)
                    if budget < 0:
                        raise over
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
                    for i in range(len(batch.emails))]})

            made: list[Answer] = []

            def remembered(queued: list[SubmitResult]) -> Remembered:
                made.append(answer(queued))
                assert claim is not None
                return claim.record(made[0])

            queued, existing = await self._store_call(self._submitter.commit_all(
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

    @staticmethod
    async def _store_call(call: Awaitable[T]) -> T:
        try:
            return await call
        except StoreError as exc:
            raise ApiError(503, f"the queue cannot take mail now: {exc}", type="internal_error",
                           headers={"Retry-After": "5"}) from None

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

def prepare(submitter: Submitter, sub: Submission) -> NewMessage:
    """submit's checks and the built message, its refusals as the API's errors."""
    try:
        return submitter.prepare(sub)
    except ValidationError as exc:
        if exc.smtp.startswith("552"):  # too large: what makes a JSON email large
            raise ApiError(413, f"the built message is too large: {exc}",
                           param="attachments") from None
        if " 5.7.1" in exc.smtp:  # a sender domain this key may not use
            raise ApiError(403, str(exc), param=exc.param) from None
        raise ApiError(422, str(exc), param=exc.param) from None


async def check_broadcast(submitter: Submitter, message: NewMessage) -> None:
    try:
        await submitter.check_broadcast(message)
    except ValidationError as exc:
        raise ApiError(422, str(exc), param=exc.param) from None


async def json_body(request: web.Request) -> bytes:
    if request.content_type != "application/json":
        raise ApiError(415, "send the body as JSON (Content-Type: application/json)")
    return await request.read()


M = TypeVar("M", bound=pydantic.BaseModel)
T = TypeVar("T")


def parse(model: type[M], raw: bytes | dict[str, Any], *, prefix: str = "",
          renames: Mapping[str, str] = _NATIVE_NAMES) -> M:
    try:
        if isinstance(raw, bytes):
            return model.model_validate_json(raw)
        return model.model_validate(raw)
    except pydantic.ValidationError as exc:
        found = exc.errors(include_url=False)
        if found[0]["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {found[0]['msg']}") from None
        # of a union's alternatives, the error that went deepest says what is wrong
        best = max(found, key=lambda e: len(_param(e["loc"], "")))
        param = _param(best["loc"], prefix, renames)
        raise ApiError(422, f"{param or 'body'}: {best['msg']}", param=param or None) from None


def _param(loc: tuple[int | str, ...], prefix: str,
           renames: Mapping[str, str] = _NATIVE_NAMES) -> str:
    """pydantic's error location as a field path, e.g. to[0].name or headers.X-Campaign."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.search(part) and part not in _MODEL_NAMES:
            name = renames.get(part, part)
            out += f".{name}" if out else name
    return out


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
    stream = Stream(m.stream)
    headers = checked_headers(m.headers.items(), stream)
    sender = mailbox(m.from_, "from")
    seen: set[str] = set()  # one copy of each address: to first, then cc, then bcc
    to = _unique(_mailboxes(m.to, "to"), seen)
    cc = _unique(_mailboxes(m.cc, "cc"), seen)
    bcc = _unique(_mailboxes(m.bcc, "bcc"), seen)
    if not (to or cc or bcc):
        raise ApiError(422, "an email needs at least one recipient in to, cc or bcc",
                       param="to")
    composition = Composition(
        sender=sender, to=to, cc=cc, reply_to=_mailboxes(m.replyTo or [], "replyTo"),
        subject=subject, text=text, html=html, headers=tuple(headers), ical=m.icalEvent,
        attachments=decode_attachments(m.attachments, max_file=config.limits.max_attachment_size,
                                       max_total=config.limits.max_attachments_size))
    utf8 = not all(mb.email.isascii() for mb in (sender, *to, *cc, *bcc))
    return Submission(
        mail_from=sender.email,
        recipients=tuple(EnvelopeRecipient(address=mb.email) for mb in (*to, *cc, *bcc)),
        composition=composition,
        source="api", api_key_id=key.id, allowed_domains=key.domains,
        tags=tuple(t.name + (f":{t.value}" if t.value else "") for t in m.tags),
        metadata=m.metadata, stream=stream, smtputf8=utf8, refuse_if_suppressed=True,
        track_opens=m.trackOpens, track_clicks=m.trackClicks,
        scheduled_at=m.scheduledAt.timestamp() if m.scheduledAt else None)


def _unique(boxes: tuple[Mailbox, ...], seen: set[str]) -> tuple[Mailbox, ...]:
    out = []
    for mb in boxes:
        if mb.email not in seen:
            seen.add(mb.email)
            out.append(mb)
    return tuple(out)


def _mailboxes(value: Any, param: str) -> tuple[Mailbox, ...]:
    if not value:
        return ()
    if not isinstance(value, list):
        return (mailbox(value, f"{param}[0]"),)
    return tuple([mailbox(v, f"{param}[{i}]") for i, v in enumerate(value)])


def mailbox(value: Any, param: str) -> Mailbox:
    simple = _NAME_ADDR.match(value) if isinstance(value, str) else None
    if isinstance(value, str) and not _SPECIAL.search(value):
        name, address = "", value.strip()  # a bare address, the common case: no parsing
    elif simple is not None:  # Name <address>, the other common case
        name, address = simple.group(1).strip(), simple.group(2)
    elif isinstance(value, str):
        # one mailbox per item: parseaddr would silently keep the first of a list
        # ("a@x, b@y") or read "Name: evil@x <good@y>" as a group naming evil@x
        found = email.utils.getaddresses([value])
        if len(found) != 1 or _GROUP.search(_QUOTED.sub("", value)):
            raise ApiError(422, f"{value!r} is not one email address (a list or a group; "
                           "give one address per item)", param=param)
        name, address = found[0]
        if not address or "@" not in address:
            raise ApiError(422, f"{value!r} is not an email address", param=param)
    else:
        name, address = value.name or "", value.email
    try:
        address, _ = normalize_address(address, smtputf8=True, param=param)
        # here, not only in submit, so that the error names the request's own field
        compose.check_header_text(name, param if isinstance(value, str) else f"{param}.name")
    except ValidationError as exc:
        raise ApiError(422, str(exc), param=exc.param) from None
    return Mailbox(email=address, name=name or None)


def checked_headers(given: Iterable[tuple[str, Any]], stream: Stream, *, param: str = "headers",
                    reserved: frozenset[str] = RESERVED_HEADERS) -> tuple[tuple[str, str], ...]:
    """Custom headers: names relay writes itself are refused, as are line breaks in values
    (compose's one rule) and values past RFC 5322's 998 characters."""
    out = []
    for name, value in given:
        lower = name.lower()
        where = f"{param}.{name}"
        if lower in reserved or lower.startswith("x-relay-") or (
                stream is Stream.BROADCAST and lower in BROADCAST_HEADERS):
            raise ApiError(422, f"the {name} header is set by relay; it cannot be given",
                           param=where)
        if not isinstance(value, str):
            raise ApiError(422, f"{where}: a header value is a string", param=where)
        try:
            compose.check_header_text(value, where)
        except ValidationError as exc:
            raise ApiError(422, str(exc), param=where) from None
        if len(value) > 998:
            raise ApiError(422, f"{where}: a header value may not be longer than 998 "
                           "characters", param=where)
        if not name or len(name) > 76 or not all(33 <= ord(c) <= 126 and c != ":" for c in name):
            raise ApiError(422, f"{name!r} is not a header name", param=where)
        out.append((name, value))
    return tuple(out)


def decode_attachments(items: Sequence[AttachmentIn], *, max_file: int, max_total: int
                       ) -> tuple[Attachment, ...]:
    """Base64 contents decoded and held to the limits (octets, decoded): 413 past them."""
    out, total = [], 0
    for i, a in enumerate(items):
        try:
            content = base64.b64decode(a.content, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "content is not valid base64",
                           param=f"attachments[{i}].content") from None
        if len(content) > max_file:
            raise ApiError(413, f"{a.filename} is {len(content)} bytes; at most "
                           f"{max_file} a file", param=f"attachments[{i}]")
        total += len(content)
        if total > max_total:
            raise ApiError(413, f"the attachments are over {max_total} bytes in all",
                           param="attachments")
        out.append(Attachment(filename=a.filename, content=content,
                              content_type=a.contentType or _guess_type(a.filename),
                              content_id=a.contentId))
    return tuple(out)


def _guess_type(filename: str) -> str:
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"


def address_param(raw: str | None, name: str) -> str | None:
    if not raw:
        return None
    try:
        return normalize_address(raw.strip(), smtputf8=True, param=name)[0]
    except ValidationError as exc:
        raise ApiError(422, str(exc), param=name) from None


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


def int_param(raw: str | None, name: str, *, default: int, low: int, high: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, f"{name} must be an integer", param=name) from None
    if not low <= value <= high:
        raise ApiError(422, f"{name} must be between {low} and {high}", param=name)
    return value


def suppressed_error(result: SubmitResult) -> ApiError:
    why = ", ".join(f"{address} ({reason})" for address, reason in result.suppressed)
    return ApiError(409, f"every recipient is on the suppression list: {why}",
                    type="suppressed", param="to")


def _batch_item(index: int, result: SubmitResult) -> dict[str, Any]:
    if result.status == "suppressed":
        return {"index": index, "error": suppressed_error(result).body()["error"]}
    return {"index": index, "id": result.message_id, "status": result.status}


def _status(message: NewMessage) -> str:
    return "scheduled" if message.scheduled_at else "queued"


def _error_body(exc: ApiError, prefix: str) -> dict[str, Any]:
    body = exc.body()["error"]
    if body.get("param") and not str(body["param"]).startswith(prefix):
        body["param"] = f"{prefix}.{body['param']}"
    return dict(body)
