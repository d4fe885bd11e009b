"""Plunk's API (seed 004) at /v1/send and /v1/track, beside the native routes under /v1: each
recipient of a send is its own contact upsert and its own Submission through `submit`;
answers and errors in Plunk's shapes. Plunk's other routes are not served.

Readings where Plunk's docs leave room (chosen so that @plunk/node 3.x works unchanged):
- Errors carry Plunk's envelope {success: false, error: {code, message, statusCode,
  requestId, errors?}, timestamp} and also a top-level `message`, the field that SDK's
  client reads for the text of the Error it throws.
- A marketing template is sent as broadcast mail (List-Unsubscribe, RFC 8058); a recipient
  it may not reach (unsubscribed, or suppressed) is in the answer with `email: null` and a
  `skipped` reason, and gets no mail.
- `from` absent from the request and the template: noreply@ the key's first sender domain,
  else the first domain relay signs for, else [server] hostname.
- A contact that /v1/track creates is subscribed unless `subscribed` says otherwise (the
  SDK's documented default); one that /v1/send creates is not (Plunk's send docs).
- An Idempotency-Key reused with a different request is 409; with the same request the
  first answer comes again (the core's rule, as for every relay API).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Annotated, Any, Literal

import orjson
from aiohttp import web
from pydantic import Field, StrictBool, StringConstraints

from ... import templates
from ...compose import check_header_text
from ...config import Config
from ...errors import StoreError, ValidationError
from ...store import Remembered, SQLiteStore
from ...store.contacts import ContactChange
from ...submit import Submitter, check_metadata_size
from ...types import (
    ApiKey,
    Attachment,
    Composition,
    Contact,
    EnvelopeRecipient,
    Mailbox,
    Stream,
    Submission,
    SubmitResult,
    Template,
)
from .. import auth
from ..errors import ApiError
from ..idempotency import Answer, Claim, Idempotency, replay
from ..mailboxes import mailbox
from ..owned import found_template
from ..parts import checked_headers, decode_attachments
from ..request_ids import REQUEST_ID
from ..requests import Handler, json_body, parse
from ..schemas import Address, AttachmentIn, HeaderName, HeaderValue, Strict
from ..submitting import Expansion, check_broadcast, prepare
from ..views import iso

MAX_RECIPIENTS = 100
MAX_ATTACHMENTS = 10
MAX_ATTACHMENTS_SIZE = 10 * 1024 * 1024

CODES = {400: "BAD_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND",
         405: "METHOD_NOT_ALLOWED", 409: "CONFLICT", 413: "PAYLOAD_TOO_LARGE",
         415: "UNSUPPORTED_MEDIA_TYPE", 422: "VALIDATION_ERROR", 429: "RATE_LIMIT_EXCEEDED",
         503: "SERVICE_UNAVAILABLE"}

Line = Annotated[str, StringConstraints(max_length=998, pattern=r"^[^\r\n]*$")]


class PlunkAttachment(AttachmentIn):
    contentType: Annotated[str, StringConstraints(  # required in Plunk's docs
        pattern=r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")]


class PlunkSend(Strict):
    to: list[Address] | Address = Field(description="an address, {name, email}, or a list")
    subject: Line | None = None
    body: str | None = Field(default=None, description="html with {{var}} and fallbacks")
    from_: Address | None = Field(default=None, alias="from")
    name: Annotated[str, StringConstraints(max_length=256, pattern=r"^[^\r\n]*$")] | None = None
    reply: Annotated[str, StringConstraints(min_length=3, max_length=320)] | None = None
    template: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    attachments: list[PlunkAttachment] = Field(default_factory=list,
                                               max_length=MAX_ATTACHMENTS)
    subscribed: StrictBool | None = None
    type: Literal["html", "markdown"] = "html"


class PlunkTrack(Strict):
    event: Annotated[str, StringConstraints(min_length=1, max_length=200,
                                            pattern=r"^[^\r\n]*$")]
    email: Annotated[str, StringConstraints(min_length=3, max_length=320)]
    subscribed: StrictBool | None = None
    data: dict[str, Any] = Field(default_factory=dict)


PATHS = ("/v1/send", "/v1/track")  # beside the native routes under /v1

class PlunkApi:
    def __init__(self, config: Config, store: SQLiteStore, submitter: Submitter) -> None:
        self._config = config
        self._store = store
        self._submitter = submitter
        self._idempotency = Idempotency(store)

    def routes(self) -> list[web.RouteDef]:
        return [web.post(PATHS[0], plunk_errors(self.send)),
                web.post(PATHS[1], plunk_errors(self.track))]

    # -- /v1/send ------------------------------------------------------------------------

    async def send(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        raw = await json_body(request)

        async def produce(claim: Claim | None) -> Answer:
            try:
                return await self._send(parse(PlunkSend, raw), key, claim)
            except ApiError as exc:  # a 4xx answer in Plunk's shape (5xx: the caller's)
                if exc.status >= 500 or exc.status == 429:
                    raise
                return Answer(exc.status, orjson.dumps(error_body(exc, request)))
            except ValidationError as exc:  # e.g. a {{var}} that data does not give
                return Answer(422, orjson.dumps(error_body(
                    ApiError(422, str(exc), param=exc.param), request)))

        return await self._idempotency.answer(request, key.id, raw, produce)

    async def _send(self, m: PlunkSend, key: ApiKey, claim: Claim | None) -> Answer:
        """Every recipient's email is built and checked before anything is written; then
        the contacts are upserted, then the mail is queued in one transaction with the
        idempotency key's answer (which is 200 only once that has committed)."""
        if m.type == "markdown":
            raise ApiError(422, "relay sends html bodies; markdown is not rendered",
                           param="type")
        # data is kept on each contact (and read into every later send): metadata's limit
        check_metadata_size(m.data, (), self._config.limits.max_metadata_size, param="data")
        recipients = _recipients(m.to)
        template = await self._template(m.template, key)
        stream = Stream.BROADCAST if template and template.type == "marketing" else \
            Stream.TRANSACTIONAL
        kept, send_only, removed = split_data(m.data)
        default_from = await self._default_sender(key)
        # one message per recipient: attachments decoded once and shared (stored once, too),
        # and what all of them come to held to [limits] max_request_expansion up front
        attachments = decode_attachments(
            m.attachments, max_file=self._config.limits.max_attachment_size,
            max_total=min(MAX_ATTACHMENTS_SIZE, self._config.limits.max_attachments_size))
        each = sum(len(a.content) for a in attachments) + len(m.body or "") + \
            len(m.subject or "")
        budget = Expansion(self._config.limits.max_request_expansion)
        if each * len(recipients) > budget.limit:
            raise ApiError(413, f"{len(recipients)} recipients x {each} octets each come to "
                           f"more than {budget.limit} ([limits] max_request_expansion); send "
                           "fewer recipients per request", param="to")
        now = time.time()
        changes, messages, skipped = [], {}, {}
        for mb in recipients:
            found = await self._store.get_contact(mb.email, auth.reach(key))
            contact_data = {**(found.data if found else {}), **kept}
            for name in removed:
                contact_data.pop(name, None)
            subscribed = m.subscribed if m.subscribed is not None else \
                bool(found and found.subscribed)
            changes.append(ContactChange(email=mb.email, subscribed=m.subscribed,
                                         data=kept, remove=removed, owner=key.domains,
                                         max_data=self._config.limits.max_metadata_size))
            if stream is Stream.BROADCAST and not subscribed:
                skipped[mb.email] = "unsubscribed"
                continue
            sub = self._submission(m, key, template, stream, mb, default_from,
                                   {**contact_data, **send_only}, attachments)
            message = prepare(self._submitter, sub)
            budget.spend(message, "to")  # a template's {{var}}s may make them larger
            if not await self._submitter.will_sign(message):  # Plunk: a verified domain only
                raise ApiError(422, f"{message.sender_domain or 'the sender'} is not a verified "
                               "sending domain of this relay (relay domains add)", param="from")
            try:
                await check_broadcast(self._submitter, message)
            except ApiError as exc:  # Plunk has no stream field: the template made it so
                raise ApiError(exc.status, exc.message, param="template") from None
            messages[mb.email] = message
        upserted = await self._store_call(self._store.upsert_contacts(changes, now))
        contacts = {mb.email: u for mb, u in zip(recipients, upserted, strict=True)}

        def answer(results: list[SubmitResult]) -> Answer:
            by_address = dict(zip(messages, results, strict=True))
            return Answer.of(200, {"success": True, "data": {"emails": [
                _email_item(contacts[mb.email].contact, by_address.get(mb.email),
                            skipped.get(mb.email)) for mb in recipients],
                "timestamp": iso(now)}})

        made: list[Answer] = []

        def remembered(results: list[SubmitResult]) -> Remembered:
            made.append(answer(results))
            assert claim is not None
            return claim.record(made[0])

        results, existing = await self._store_call(self._submitter.commit_all(
            list(messages.values()), (claim.scope, claim.key, now) if claim else None,
            remembered if claim else None))
        if existing is not None and claim is not None:  # the key was taken meanwhile
            return replay(existing, claim)
        return made[0] if made else answer(results)

    async def _template(self, template_id: str | None, key: ApiKey) -> Template | None:
        if template_id is None:
            return None
        return await found_template(self._store, key.domains, template_id, param="template")

    def _submission(self, m: PlunkSend, key: ApiKey, template: Template | None,
                    stream: Stream, to: Mailbox, default_from: str,
                    data: dict[str, Any], attachments: tuple[Attachment, ...]) -> Submission:
        if template is not None:
            filled = templates.fill(template, data, subject=m.subject, html=m.body,
                                    limit=self._config.limits.max_message_size)
            subject, html, text = filled.subject, filled.html, filled.text
        else:
            if m.subject is None:
                raise ApiError(422, "subject is required without a template", param="subject")
            if m.body is None:
                raise ApiError(422, "body is required without a template", param="body")
            limit = self._config.limits.max_message_size
            subject = templates.render(m.subject, data, escape=False, param="subject",
                                       header=True, limit=limit)
            html = templates.render(m.body, data, escape=True, param="body", limit=limit)
            text = None
        sender = _sender(m, template, default_from)
        reply = (mailbox(m.reply, "reply"),) if m.reply else ()
        composition = Composition(
            sender=sender, to=(to,), reply_to=reply, subject=subject, html=html, text=text,
            headers=checked_headers(m.headers.items(), stream), attachments=attachments)
        metadata: dict[str, Any] = {"plunk": {"template": template.id}} if template else {}
        return Submission(
            mail_from=sender.email, recipients=(EnvelopeRecipient(address=to.email),),
            composition=composition, source="api", api_key_id=key.id,
            allowed_domains=key.domains, metadata=metadata, stream=stream,
            smtputf8=not (sender.email.isascii() and to.email.isascii()),
            refuse_if_suppressed=True)

    async def _default_sender(self, key: ApiKey) -> str:
        """noreply@ the key's first sender domain, else the first domain relay signs for,
        else the server's host name: Plunk sends from the project's domain when neither the
        request nor the template names a sender."""
        if key.domains:
            return f"noreply@{key.domains[0]}"
        known = await self._store.list_domains()
        return f"noreply@{known[0].name if known else self._config.server.hostname}"

    # -- /v1/track -----------------------------------------------------------------------

    async def track(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store)
        m = parse(PlunkTrack, await json_body(request))
        email = mailbox(m.email, "email").email
        kept, send_only, removed = split_data(m.data)
        change = ContactChange(email=email, subscribed=m.subscribed, subscribed_if_new=True,
                               data=kept, remove=removed, owner=key.domains,
                               max_data=self._config.limits.max_metadata_size)
        now = time.time()
        done, event_id = await self._store_call(self._store.track_contact_event(
            change, m.event, {**kept, **send_only}, now))
        return web.json_response({"success": True, "data": {
            "contact": done.contact.id, "event": f"evt_{event_id}", "timestamp": iso(now)}})

    @staticmethod
    async def _store_call(call: Awaitable[Any]) -> Any:
        try:
            return await call
        except StoreError as exc:
            raise ApiError(503, f"the queue cannot take mail now: {exc}",
                           headers={"Retry-After": "5"}) from None


def _sender(m: PlunkSend, template: Template | None, default_from: str) -> Mailbox:
    """The request's from, else the template's, else the default; `name` beats the rest."""
    if m.from_ is not None:
        given = mailbox(m.from_, "from")
    elif template is not None and template.from_email:
        given = Mailbox(email=template.from_email, name=template.from_name)
    else:
        given = Mailbox(email=default_from)
    if m.name:
        check_header_text(m.name, "name")  # submit would name it from.name
    name = m.name or given.name or (template.from_name if template else None)
    return Mailbox(email=given.email, name=name or None)


def split_data(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], tuple[str, ...]]:
    """(saved on the contact, for this send only, deleted from the contact): a value is
    saved, {value, persistent: false} is not, null deletes the field."""
    kept: dict[str, Any] = {}
    send_only: dict[str, Any] = {}
    removed: list[str] = []
    for name, value in data.items():
        if value is None:
            removed.append(name)
        elif isinstance(value, dict) and "value" in value and set(value) <= {"value",
                                                                           "persistent"}:
            persistent = value.get("persistent", True)
            if not isinstance(persistent, bool):
                raise ApiError(422, "persistent must be true or false",
                               param=f"data.{name}.persistent")
            (kept if persistent else send_only)[name] = value["value"]
        else:
            kept[name] = value
    return kept, send_only, tuple(removed)


def _recipients(to: Any) -> list[Mailbox]:
    given = to if isinstance(to, list) else [to]
    if not given:
        raise ApiError(422, "to needs at least one recipient", param="to")
    if len(given) > MAX_RECIPIENTS:
        raise ApiError(422, f"at most {MAX_RECIPIENTS} recipients a request", param="to")
    out: dict[str, Mailbox] = {}
    for i, value in enumerate(given):
        mb = mailbox(value, f"to[{i}]" if isinstance(to, list) else "to")
        out.setdefault(mb.email.lower(), mb)  # one contact and one email per address
    return list(out.values())


def _email_item(contact: Contact, result: SubmitResult | None,
                skipped: str | None) -> dict[str, Any]:
    """One recipient's part of the answer: its contact and its email's id, or why none."""
    item: dict[str, Any] = {"contact": {"id": contact.id, "email": contact.email}}
    if result is not None and result.status != "suppressed":
        item["email"] = result.message_id
        return item
    if result is not None:
        reason = ", ".join(r for _, r in result.suppressed) or "suppressed"
        message = "the address is on the suppression list"
    else:
        reason = skipped or "unsubscribed"
        message = "a marketing template is not sent to an unsubscribed contact"
    item.update(email=None, skipped={"reason": reason, "message": message})
    return item


def error_body(exc: ApiError, request: web.Request) -> dict[str, Any]:
    error: dict[str, Any] = {"code": CODES.get(exc.status, "INTERNAL_SERVER_ERROR"),
                             "message": exc.message, "statusCode": exc.status,
                             "requestId": request.get(REQUEST_ID)}
    if exc.param:
        error["errors"] = [{"field": exc.param, "message": exc.message}]
    return {"success": False, "error": error, "message": exc.message,
            "timestamp": iso(time.time())}


def plunk_errors(handler: Handler) -> Handler:
    """The handler's failures in Plunk's shape (the app's middleware still adds the
    request id, and answers anything unexpected)."""
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return respond(exc, request)
        except ValidationError as exc:
            return respond(ApiError(422, str(exc), param=exc.param), request)
        except web.HTTPRequestEntityTooLarge:
            return respond(ApiError(413, "the request body is larger than this server "
                                      "takes"), request)

    return wrapped


def respond(exc: ApiError, request: web.Request) -> web.Response:
    return web.Response(status=exc.status, body=orjson.dumps(error_body(exc, request)),
                        content_type="application/json", headers=exc.headers)

