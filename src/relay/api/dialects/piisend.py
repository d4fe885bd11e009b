"""PiiSend's API (seed 001) at /api/v1/emails: send, list by offset, detail, cancel and
resend, each a translation to or from the one Submission and the store's messages.

The seed leaves the response bodies *unclear*. Chosen here, as a FastAPI service (which its
`from_` field betrays) answers and its SDKs model: one email object for every answer (send,
list items, cancel, resend), the detail adding the fields a debugger wants; lists as
{data, limit, offset, has_more}; errors as FastAPI's {"detail": message} plus `type` and
`field` (null when no one field is at fault)."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import email.utils
import time
from datetime import UTC, datetime
from typing import Annotated, Any

from aiohttp import web
from pydantic import Field, StringConstraints

from ... import compose, rawmail, templates
from ...addresses import normalize_domain, self_and_parents
from ...config import Config
from ...errors import ValidationError
from ...keys import may_send_as
from ...store import MessageDetail, NewMessage, SQLiteStore
from ...submit import Submitter
from ...types import ApiKey, Attachment, Composition, EnvelopeRecipient, Mailbox, Stream, Submission
from .. import auth
from ..errors import ApiError
from ..idempotency import Answer, Claim, Idempotency, replay
from ..mailboxes import mailbox, mailboxes, unique
from ..owned import found_message
from ..requests import int_param, json_body, parse
from ..schemas import Strict
from ..views import iso
from .common import commit, decode_base64, in_shape, named, prepare, reshaped, store_call

BASE = "/api/v1/emails"
MAX_FILES = 5
MAX_FILES_SIZE = 5 * 1024 * 1024  # decoded, all files together

# relay's message status (types.message_status) → PiiSend's lifecycle name. "queued+started"
# is a queued message some of whose recipients have had their attempt: handed on, "sent".
STATUSES = {
    "scheduled": "scheduled",
    "held": "queued",  # an operator holds it; to the app it still waits for the worker
    "queued": "queued",
    "queued+started": "sent",
    "deferred": "delivering",  # tried; the receiving server said "later"
    "failed": "failed",  # parked after an internal error
    "delivered": "delivered",
    "partially_delivered": "delivered",  # per recipient, the detail says which bounced
    "bounced": "bounced",  # expired is a kind of bounce
    "suppressed": "failed",
    "cancelled": "cancelled",
}
# and back, for ?status=: the recipient statuses a listed message has one of
LISTED = {
    "scheduled": ("scheduled",), "queued": ("queued", "held"), "sent": ("queued",),
    "delivering": ("deferred",), "failed": ("failed", "suppressed"),
    "delivered": ("delivered",), "bounced": ("bounced", "expired"),
    "cancelled": ("cancelled",),
}

AddressText = Annotated[str, StringConstraints(min_length=3, max_length=600,
                                               pattern=r"^[^\r\n]*$")]


class PsAttachment(Strict):
    filename: Annotated[str, StringConstraints(min_length=1, max_length=255,
                                               pattern=r"^[^\r\n/\\]*$")]
    content_type: Annotated[str, StringConstraints(
        pattern=r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")]
    content_b64: str


class PsSend(Strict):
    to: list[AddressText] = Field(min_length=1, max_length=1000)
    subject: Annotated[str, StringConstraints(max_length=998, pattern=r"^[^\r\n]*$")] | None = None
    html: str | None = None
    text: str | None = None
    from_: AddressText | None = None
    cc: list[AddressText] = Field(default_factory=list)
    reply_to: list[AddressText] = Field(default_factory=list)
    template_id: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    template_vars: dict[str, Any] = Field(default_factory=dict)
    domain_id: Annotated[str, StringConstraints(min_length=1, max_length=253)] | None = None
    track_opens: bool = False
    track_clicks: bool = False
    enable_unsubscribe: bool = False
    scheduled_at: datetime | None = None  # UTC; without an offset it is read as UTC
    attachments: list[PsAttachment] = Field(default_factory=list)


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
        answer = Answer.of(202, _new_email(message))
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
            subject=subject or "", text=text, html=html, attachments=_attachments(m))
        utf8 = not all(mb.email.isascii() for mb in (sender, *to, *cc))
        return Submission(
            mail_from=sender.email,
            recipients=tuple(EnvelopeRecipient(address=mb.email) for mb in (*to, *cc)),
            composition=composition, source="api", api_key_id=key.id,
            # a domain_id narrows what the mail may be sent and signed as to that domain
            allowed_domains=(domain,) if domain else key.domains,
            stream=stream, smtputf8=utf8, refuse_if_suppressed=True,
            track_opens=m.track_opens, track_clicks=m.track_clicks,
            scheduled_at=_scheduled(m.scheduled_at))

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
        """A domain_id is a sending domain's name (relay's domain objects are named so)."""
        if domain_id is None:
            return None
        try:
            name = normalize_domain(domain_id.strip(), param="domain_id")
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
        return web.json_response({"data": [_email(d) for d in page.items], "limit": limit,
                                  "offset": offset, "has_more": page.next_cursor is not None})

    async def get(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        detail = await found_message(self._store, key, request.match_info["id"])
        stored = await self._store.get_outgoing(detail.message.id)
        raw = compose.materialize(stored.body, stored.kind) if stored is not None else b""
        return web.json_response({**_email(detail), **_content(raw), **_history(detail),
                                  "resends": await self._store.resends_of(detail.message.id)})

    # -- changing ------------------------------------------------------------------------

    async def cancel(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        detail = await found_message(self._store, key, request.match_info["id"])
        count = await store_call(self._store.cancel(
            detail.message.id, f"api:{key.id}", time.time(), only=("scheduled",)))
        if not count:
            raise ApiError(409, f"{detail.message.id} is {_status(detail)}; only a scheduled "
                           "email can be cancelled", type="conflict", param="id")
        return web.json_response(_email(await found_message(self._store, key,
                                                            detail.message.id)))

    async def resend(self, request: web.Request) -> web.Response:
        """A new message with the first one's content, recipients, stream and tracking; its
        metadata names the first (resend_of), whose detail lists it among its resends."""
        key = await auth.require(request, self._store)
        detail = await found_message(self._store, key, request.match_info["id"])
        stored = await self._store.get_outgoing(detail.message.id)
        if stored is None:
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


# -- the email object -----------------------------------------------------------------------

def _status(d: MessageDetail) -> str:
    relay = d.message.status
    if relay == "queued" and any(r.attempts or r.status.final for r in d.recipients):
        relay = "queued+started"
    return STATUSES.get(relay, "queued")


def _email(d: MessageDetail) -> dict[str, Any]:
    m = d.message
    scheduled = [r.next_attempt_at for r in d.recipients
                 if r.status.value == "scheduled" and r.next_attempt_at]
    return {
        "id": m.id, "status": _status(d), "from_": m.header_from, "subject": m.subject,
        "recipients": [{"email": r.address, "status": STATUSES.get(r.status.value, "bounced")}
                       for r in d.recipients],
        "created_at": iso(m.created_at),
        "updated_at": iso(max([m.created_at, *(r.updated_at for r in d.recipients)])),
        "scheduled_at": iso(min(scheduled)) if scheduled else None,
        "resend_of": m.metadata.get("resend_of"),
    }


def _new_email(message: NewMessage) -> dict[str, Any]:
    """The email object of a message just prepared, before it is in the store to be read."""
    status = "scheduled" if message.scheduled_at else "queued"
    return {
        "id": message.id, "status": status, "from_": message.header_from,
        "subject": message.subject,
        "recipients": [{"email": r.address, "status": status} for r in message.recipients],
        "created_at": iso(message.created_at), "updated_at": iso(message.created_at),
        "scheduled_at": iso(message.scheduled_at),
        "resend_of": message.metadata.get("resend_of"),
    }


def _content(raw: bytes) -> dict[str, Any]:
    """The bodies and the attachments' metadata, read back from the message's bytes."""
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    text = html = None
    files = []
    for part in parsed.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        size = len(payload) if isinstance(payload, bytes) else 0
        if part.get_filename():
            files.append({"filename": part.get_filename(),
                          "content_type": part.get_content_type(), "size": size})
        elif part.get_content_type() == "text/plain" and text is None:
            text = part.get_content()
        elif part.get_content_type() == "text/html" and html is None:
            html = part.get_content()

    def addresses(name: str) -> list[str]:
        return [a for _, a in email.utils.getaddresses([str(v) for v in
                                                        parsed.get_all(name) or []]) if a]

    return {"to": addresses("To"), "cc": addresses("Cc"), "reply_to": addresses("Reply-To"),
            "message_id": parsed.get("Message-ID"), "text": text, "html": html,
            "attachments": files}


def _history(d: MessageDetail) -> dict[str, Any]:
    by_id = {r.id: r.address for r in d.recipients}
    delivered = [e.created_at for e in d.events if e.type == "email.delivered"]
    return {
        "attempts": [{"email": by_id.get(a.recipient_id), "at": iso(a.started_at),
                      "provider": a.mx_host, "ip": a.ip, "tls": a.tls_version, "code": a.code,
                      "enhanced_code": a.enhanced, "response": a.text, "outcome": a.outcome,
                      "duration_ms": round(a.duration * 1000)} for a in d.attempts],
        "events": [{"type": e.type, "at": iso(e.created_at),
                    "email": by_id.get(e.recipient_id) if e.recipient_id else None}
                   for e in d.events],
        "sent_at": iso(min(a.started_at for a in d.attempts)) if d.attempts else None,
        "delivered_at": iso(max(delivered)) if delivered else None,
    }


# -- request fields ------------------------------------------------------------------------

def _attachments(m: PsSend) -> tuple[Attachment, ...]:
    """PiiSend's own limits: at most 5 files (400) and 5 MiB decoded in all (413)."""
    if len(m.attachments) > MAX_FILES:
        raise ApiError(400, f"at most {MAX_FILES} attachments, not {len(m.attachments)}",
                       param="attachments")
    out, total = [], 0
    for i, a in enumerate(m.attachments):
        content = decode_base64(a.content_b64, f"attachments[{i}].content_b64")
        total += len(content)
        if total > MAX_FILES_SIZE:
            raise ApiError(413, f"the attachments are over {MAX_FILES_SIZE} bytes (5 MiB) "
                           "decoded in all", param="attachments")
        out.append(Attachment(filename=a.filename, content=content, content_type=a.content_type))
    return tuple(out)


def _scheduled(when: datetime | None) -> float | None:
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if when.timestamp() <= time.time():
        raise ApiError(422, "scheduled_at must be in the future (omit it to send now)",
                       param="scheduled_at")
    return when.timestamp()
