"""The MailChannels dialect (seed 000) at /tx/v1, auth X-Api-Key: /send and /send-async,
each personalization its own message through the one Submission; the webhook enrolment
(/webhook?endpoint=) and the public key its signatures verify with.

Readings where MailChannels' docs leave room (chosen so that the `mailchannels` SDK works
unchanged):
- A personalization's dkim_domain, dkim_selector and dkim_private_key each fall back to the
  root's; a selector without a domain takes the From domain; a domain without a selector,
  or a key without a selector, is a 400. Without a private key, the domain and selector
  must name a key relay holds (`relay domains add`), which then signs as relay's keys do.
  A private key is PEM or base64 DER (what MailChannels' docs make with openssl).
- `/send` answers once the messages are on disk: "sent" there means queued for delivery,
  "failed" (with a reason) a personalization whose every recipient is suppressed.
- Mustache (`template_type: "mustache"`) fills the content with the personalization's
  dynamic_template_data; html is escaped as mustache escapes, plain text is not.
- The dry run answers each message as relay would queue it, signed with the key given
  with it; relay's own keys, the VERP return path and List-Unsubscribe are added at
  delivery, per recipient, and are not in it.
- Settings relay cannot honour (custom tracking or unsubscribe domains, `substitutions`)
  are a 400 naming the field, never a silent drop.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import pystache
import pystache.parser
from aiohttp import web
from pydantic import Field, StrictBool, StringConstraints

from ... import compose, dkim, webhooks, webhooks_mailchannels
from ...addresses import self_and_parents
from ...config import Config
from ...errors import ValidationError
from ...store import NewMessage, SQLiteStore
from ...submit import Submitter
from ...types import (
    ApiKey,
    Composition,
    EnvelopeRecipient,
    GivenDkimKey,
    Mailbox,
    Stream,
    Submission,
    WebhookEndpoint,
)
from ...webhooks_mailchannels import Signer
from .. import auth
from ..errors import ApiError
from ..hooks import SCOPE as WEBHOOKS_SCOPE
from ..hooks import check_target
from ..native import _unique, decode_attachments, json_body, mailbox, parse
from ..schemas import RESERVED_HEADERS, AddressObject, AttachmentIn, Strict
from ..views import iso
from .common import checked_headers, in_shape, named, prepare, store_call

MAX_PERSONALIZATIONS = 1000
# the headers MailChannels' `headers` may not set (seed 000), beside relay's own list
RESERVED = frozenset({
    "authentication-results", "bcc", "cc", "content-transfer-encoding", "content-type",
    "dkim-signature", "from", "message-id", "received", "reply-to", "subject", "to",
}) | RESERVED_HEADERS

HeaderMap = dict[Annotated[str, StringConstraints(min_length=1, max_length=76)], str]
Selector = Annotated[str, StringConstraints(min_length=1, max_length=63,
                                            pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")]
DomainName = Annotated[str, StringConstraints(min_length=1, max_length=253)]


class McToggle(Strict):
    enable: StrictBool = False
    custom_domain_name: str | None = None


class McTracking(Strict):
    click_tracking: McToggle | None = None
    open_tracking: McToggle | None = None


class McUnsubscribe(Strict):
    custom_domain_name: str | None = None


class McContent(Strict):
    type: str
    value: str
    template_type: Literal["mustache"] | None = None


class McAttachment(Strict):
    content: str
    filename: Annotated[str, StringConstraints(min_length=1, max_length=255,
                                               pattern=r"^[^\r\n/\\]*$")]
    type: Annotated[str, StringConstraints(
        pattern=r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")] | None = None
    disposition: Literal["attachment", "inline"] = "attachment"
    content_id: Annotated[str, StringConstraints(
        min_length=1, max_length=200, pattern=r"^[^\s<>\"]+$")] | None = None


class McDkim(Strict):
    dkim_domain: DomainName | None = None
    dkim_selector: Selector | None = None
    dkim_private_key: Annotated[str, StringConstraints(min_length=1)] | None = None


class McPersonalization(McDkim):
    to: list[AddressObject] = Field(min_length=1, max_length=1000)
    cc: list[AddressObject] = Field(default_factory=list, max_length=1000)
    bcc: list[AddressObject] = Field(default_factory=list, max_length=1000)
    subject: Annotated[str, StringConstraints(max_length=998)] | None = None
    from_: AddressObject | None = Field(default=None, alias="from")
    reply_to: AddressObject | None = None
    envelope_from: AddressObject | None = None
    headers: HeaderMap = Field(default_factory=dict)
    dynamic_template_data: dict[str, Any] = Field(default_factory=dict)
    substitutions: dict[str, str] | None = None


class McSend(McDkim):
    personalizations: list[McPersonalization] = Field(min_length=1,
                                                      max_length=MAX_PERSONALIZATIONS)
    from_: AddressObject = Field(alias="from")
    subject: Annotated[str, StringConstraints(max_length=998)] | None = None
    content: list[McContent] = Field(min_length=1, max_length=2)
    reply_to: AddressObject | None = None
    envelope_from: AddressObject | None = None
    headers: HeaderMap = Field(default_factory=dict)
    attachments: list[McAttachment] = Field(default_factory=list, max_length=100)
    transactional: StrictBool = True
    campaign_id: str | None = None
    tracking_settings: McTracking | None = None
    unsubscribe_settings: McUnsubscribe | None = None


# MailChannels answers bad input with 400 and a too-large one with 413
_STATUSES = {415: 400, 422: 400}


def error_body(exc: ApiError) -> dict[str, Any]:
    """MailChannels' error shape ({"errors": [...]}), with the message and field named."""
    message = named(exc)
    out: dict[str, Any] = {"errors": [message], "message": message}
    if exc.param:
        out["param"] = exc.param
    return out


class MailChannelsApi:
    def __init__(self, config: Config, store: SQLiteStore, submitter: Submitter,
                 signer: Signer) -> None:
        self._config = config
        self._store = store
        self._submitter = submitter
        self._signer = signer

    def routes(self) -> list[web.RouteDef]:
        shaped = in_shape(error_body, _STATUSES)
        return [
            web.post("/tx/v1/send", shaped(self.send)),
            web.post("/tx/v1/send-async", shaped(self.send_async)),
            web.post("/tx/v1/webhook", shaped(self.enrol)),
            web.get("/tx/v1/webhook", shaped(self.webhooks)),
            web.delete("/tx/v1/webhook", shaped(self.unenrol)),
            web.get("/tx/v1/webhook/public-key", shaped(self.public_key)),
        ]

    # -- sending -------------------------------------------------------------------------

    async def send(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store, "emails:send")
        m = parse(McSend, await json_body(request))
        request_id = str(uuid.uuid4())
        messages = await self._prepared(m, key, request_id)
        if request.query.get("dry-run", "").lower() == "true":
            return web.json_response({"data": [self._dry_run(msg) for msg in messages]})
        results, _ = await store_call(self._submitter.commit_all(messages))
        out = []
        for i, (msg, result) in enumerate(zip(messages, results, strict=True)):
            item: dict[str, Any] = {"index": i, "message_id": msg.id, "status": "sent"}
            if result.status == "suppressed":
                item["status"] = "failed"
                item["reason"] = "every recipient is suppressed: " + ", ".join(
                    f"{a} ({r})" for a, r in result.suppressed)
            out.append(item)
        return web.json_response({"request_id": request_id, "results": out})

    async def send_async(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store, "emails:send")
        m = parse(McSend, await json_body(request))
        request_id = str(uuid.uuid4())
        messages = await self._prepared(m, key, request_id)
        await store_call(self._submitter.commit_all(messages))
        return web.json_response({"queued_at": iso(time.time()), "request_id": request_id},
                                 status=202)

    async def _prepared(self, m: McSend, key: ApiKey, request_id: str) -> list[NewMessage]:
        """Every personalization checked and built before anything is written: a bad one
        refuses the whole request, as MailChannels does."""
        _check_settings(m)
        metadata: dict[str, Any] = {"requestId": request_id}
        if m.campaign_id is not None:
            metadata["campaignId"] = _campaign_id(m.campaign_id)
        stream = Stream.TRANSACTIONAL if m.transactional else Stream.BROADCAST
        attachments = decode_attachments(
            [AttachmentIn(filename=a.filename, content=a.content, contentType=a.type,
                          contentId=a.content_id if a.disposition == "inline" else None)
             for a in m.attachments],
            max_file=self._config.limits.max_attachment_size,
            max_total=self._config.limits.max_attachments_size)
        out = []
        for i, p in enumerate(m.personalizations):
            where = f"personalizations[{i}]"
            if stream is Stream.BROADCAST and len(p.to) + len(p.cc) + len(p.bcc) != 1:
                raise ApiError(400, f"{where}: a non-transactional message has exactly one "
                               "recipient per personalization", param=f"{where}.to")
            sub = await self._submission(m, p, where, key, stream, metadata, attachments)
            message = prepare(self._submitter, sub)
            try:
                await self._submitter.check_broadcast(message)
            except ValidationError as exc:
                raise ApiError(400, f"transactional: false needs a DKIM signature: {exc}",
                               param="transactional") from None
            out.append(message)
        return out

    async def _submission(self, m: McSend, p: McPersonalization, where: str, key: ApiKey,
                          stream: Stream, metadata: dict[str, Any],
                          attachments: tuple[Any, ...]) -> Submission:
        sender = mailbox(p.from_ or m.from_, f"{where}.from" if p.from_ else "from")
        reply_to = p.reply_to or m.reply_to
        subject = p.subject if p.subject is not None else m.subject
        if subject is None:
            raise ApiError(400, "a subject is required, at the root or in each "
                           "personalization", param=f"{where}.subject")
        # here, not only in submit, so that the error names the subject's own place
        compose.check_header_text(subject, f"{where}.subject" if p.subject is not None
                                  else "subject")
        seen: set[str] = set()
        to = _unique(tuple(mailbox(a, f"{where}.to[{j}]") for j, a in enumerate(p.to)), seen)
        cc = _unique(tuple(mailbox(a, f"{where}.cc[{j}]") for j, a in enumerate(p.cc)), seen)
        bcc = _unique(tuple(mailbox(a, f"{where}.bcc[{j}]") for j, a in enumerate(p.bcc)),
                      seen)
        text, html = _content(m.content, p.dynamic_template_data)
        composition = Composition(
            sender=sender, to=to, cc=cc,
            reply_to=(mailbox(reply_to, f"{where}.reply_to" if p.reply_to else "reply_to"),)
            if reply_to else (),
            subject=subject, text=text, html=html, attachments=attachments,
            headers=_headers(m.headers, p.headers, where, stream))
        envelope = p.envelope_from or m.envelope_from
        mail_from = mailbox(envelope, f"{where}.envelope_from" if p.envelope_from
                            else "envelope_from").email if envelope else sender.email
        tracking = m.tracking_settings or McTracking()
        everyone = (sender, *to, *cc, *bcc)
        return Submission(
            mail_from=mail_from, keep_mail_from=envelope is not None,
            recipients=tuple(EnvelopeRecipient(address=b.email) for b in (*to, *cc, *bcc)),
            composition=composition, source="api", api_key_id=key.id,
            allowed_domains=key.domains, metadata=metadata, stream=stream,
            smtputf8=not all(b.email.isascii() for b in everyone), refuse_if_suppressed=True,
            dkim=await self._dkim(m, p, where, sender),
            track_opens=bool(tracking.open_tracking and tracking.open_tracking.enable),
            track_clicks=bool(tracking.click_tracking and tracking.click_tracking.enable))

    async def _dkim(self, m: McSend, p: McPersonalization, where: str,
                    sender: Mailbox) -> GivenDkimKey | None:
        """The personalization's DKIM fields, each falling back to the root's."""
        def pick(name: str) -> tuple[str | None, str]:
            own = getattr(p, name)
            return (own, f"{where}.{name}") if own is not None else (getattr(m, name), name)

        (domain, domain_at), (selector, selector_at), (private, private_at) = (
            pick("dkim_domain"), pick("dkim_selector"), pick("dkim_private_key"))
        if domain is None and selector is None and private is None:
            return None
        if selector is None:
            raise ApiError(400, "dkim_selector is required with dkim_domain or "
                           "dkim_private_key", param=selector_at)
        domain = (domain or sender.email.rpartition("@")[2]).lower()
        if private is not None:
            return GivenDkimKey(domain=domain, selector=selector, private_key=private)
        # a selector relay holds: it must be the From domain's own (relay's keys sign by it)
        found = await self._store.get_domain(domain)
        if found is None or not any(k.selector == selector and k.state == "active"
                                    for k in found.keys):
            raise ApiError(400, f"relay holds no active DKIM key {selector} for {domain}: "
                           "give dkim_private_key, or add the domain (relay domains add)",
                           param=selector_at if found else domain_at)
        if domain not in self_and_parents(sender.email.rpartition("@")[2]):
            raise ApiError(400, f"relay signs with its own keys for the From domain; "
                           f"{domain} is not {sender.email}'s domain: give dkim_private_key",
                           param=domain_at)
        return None

    def _dry_run(self, message: NewMessage) -> str:
        data = compose.materialize(message.body, message.body_kind)
        if message.dkim is not None:
            given = message.dkim
            data = dkim.sign(data, [dkim.SigningKey(
                given.domain, given.selector, dkim.load_private_key(given.private_key))])
        return data.decode("utf-8", "replace")

    # -- webhooks ------------------------------------------------------------------------

    async def enrol(self, request: web.Request) -> web.Response:
        """POST /webhook?endpoint=URL: events in MailChannels' shape go to URL."""
        await auth.require(request, self._store, WEBHOOKS_SCOPE)
        url = request.query.get("endpoint", "")
        if not url:
            raise ApiError(400, "the endpoint query parameter is required", param="endpoint")
        await check_target(url, self._config.webhooks.allow_private_targets)
        known = await self._store.list_endpoints()
        if any(e.format == "mailchannels" and e.url == url for e in known):
            raise ApiError(409, f"{url} is already enrolled", param="endpoint")
        await self._store.add_endpoint(WebhookEndpoint(
            id="wh_" + secrets.token_hex(8), url=url, secret=webhooks.new_secret(),
            events=webhooks_mailchannels.EVENTS, created_at=time.time(),
            format="mailchannels"))
        return web.Response(status=201)

    async def webhooks(self, request: web.Request) -> web.Response:
        await auth.require(request, self._store, WEBHOOKS_SCOPE)
        known = await self._store.list_endpoints()
        return web.json_response({"data": [{"webhook": e.url} for e in known
                                           if e.format == "mailchannels"]})

    async def unenrol(self, request: web.Request) -> web.Response:
        """DELETE /webhook: every endpoint of this format (MailChannels deletes them all)."""
        await auth.require(request, self._store, WEBHOOKS_SCOPE)
        for e in await self._store.list_endpoints():
            if e.format == "mailchannels":
                await self._store.delete_endpoint(e.id)
        return web.Response(status=204)

    async def public_key(self, request: web.Request) -> web.Response:
        """The key the webhook signatures verify with; no API key needed, as there."""
        key_id = request.query.get("id", "")
        if key_id != self._signer.key_id:
            raise ApiError(404, f"no webhook signing key {key_id!r}", param="id")
        return web.json_response(self._signer.public_key_json())


def _check_settings(m: McSend) -> None:
    tracking = m.tracking_settings
    for name in ("click_tracking", "open_tracking"):
        toggle = getattr(tracking, name) if tracking else None
        if toggle is not None and toggle.custom_domain_name:
            raise ApiError(400, "relay's tracking links use its [api] public_url; a custom "
                           "tracking domain is not supported",
                           param=f"tracking_settings.{name}.custom_domain_name")
    if m.unsubscribe_settings is not None and m.unsubscribe_settings.custom_domain_name:
        raise ApiError(400, "relay's unsubscribe links use its [api] public_url; a custom "
                       "unsubscribe domain is not supported",
                       param="unsubscribe_settings.custom_domain_name")
    for i, p in enumerate(m.personalizations):
        if p.substitutions:
            raise ApiError(400, "substitutions are not supported: use a mustache template "
                           "and dynamic_template_data", param=f"personalizations[{i}].substitutions")


def _campaign_id(value: str) -> str:
    if len(value) > 48:
        raise ApiError(400, f"campaign_id is {len(value)} characters; at most 48",
                       param="campaign_id")
    if not value or any(c.isspace() for c in value):
        raise ApiError(400, "campaign_id must not be empty or contain spaces",
                       param="campaign_id")
    return value


def _content(content: list[McContent], data: Mapping[str, Any]) -> tuple[str | None, str | None]:
    found: dict[str, str] = {}
    for i, c in enumerate(content):
        kind = c.type.split(";")[0].strip().lower()
        if kind not in ("text/plain", "text/html"):
            raise ApiError(400, f"content type {c.type!r}: text/plain or text/html",
                           param=f"content[{i}].type")
        if kind in found:
            raise ApiError(400, f"more than one {kind} content", param=f"content[{i}].type")
        value = c.value
        if c.template_type == "mustache":
            value = _mustache(value, data, html=kind == "text/html", param=f"content[{i}]")
        found[kind] = value
    return found.get("text/plain"), found.get("text/html")


def _mustache(template: str, data: Mapping[str, Any], *, html: bool, param: str) -> str:
    renderer = pystache.Renderer(escape=None if html else (lambda s: s),
                                 missing_tags="ignore")
    try:
        return str(renderer.render(template, dict(data)))
    except pystache.parser.ParsingError as exc:
        raise ApiError(400, f"{param}: not a valid mustache template ({exc})",
                       param=f"{param}.value") from None


def _headers(root: Mapping[str, str], own: Mapping[str, str], where: str,
             stream: Stream) -> tuple[tuple[str, str], ...]:
    """The root's headers with the personalization's beating them, names compared without
    case; the reserved ones refused."""
    merged: dict[str, tuple[str, str, str]] = {}
    for source, headers in (("headers", root), (f"{where}.headers", own)):
        for name, value in headers.items():
            if name.lower() in RESERVED:
                raise ApiError(400, f"the {name} header is reserved; it cannot be set in "
                               "headers", param=f"{source}.{name}")
            merged[name.lower()] = (name, value, source)
    out: list[tuple[str, str]] = []
    for name, value, source in merged.values():
        out += checked_headers([(name, value)], stream, param=source)
    return tuple(out)

