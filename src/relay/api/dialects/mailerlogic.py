"""MailerLogic's API (seed 002): POST /api/v1/send with X-API-Key, one email to one `to`,
translated into the one Submission; answers 200 {to, submitted_at, message_id, email_id,
status, message} and errors {error, message, reason?}."""

from __future__ import annotations

import binascii
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field, StringConstraints

from ...addresses import normalize_domain, self_and_parents
from ...config import Config
from ...errors import ValidationError
from ...keys import may_send_as
from ...store import SQLiteStore
from ...submit import Submitter
from ...types import ApiKey, Attachment, Composition, EnvelopeRecipient, Mailbox, Stream, Submission
from .. import auth
from ..errors import ApiError
from ..mailboxes import mailbox, mailboxes, unique
from ..parts import checked_headers
from ..requests import json_body, parse
from ..schemas import Strict
from ..submitting import commit, prepare
from ..views import iso
from .common import decode_base64, in_shape, named

PATH = "/api/v1/send"

Line = Annotated[str, StringConstraints(max_length=998, pattern=r"^[^\r\n]*$")]
AddressText = Annotated[str, StringConstraints(min_length=3, max_length=600,
                                               pattern=r"^[^\r\n]*$")]


class MlAttachment(Strict):
    filename: Annotated[str, StringConstraints(min_length=1, max_length=255,
                                               pattern=r"^[^\r\n/\\]*$")]
    content: str
    contentType: Annotated[str, StringConstraints(
        pattern=r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")]
    # base64 is the documented default; the others are what Node's Buffer (which that
    # service's clients use) names
    encoding: Literal["base64", "utf-8", "utf8", "hex", "binary", "latin1"] = "base64"


class MlSend(Strict):
    domain: Annotated[str, StringConstraints(min_length=1, max_length=253)] | None = None
    from_: AddressText | None = Field(default=None, alias="from")
    to: AddressText
    reply_to: AddressText | None = None
    cc: list[AddressText] = Field(default_factory=list)
    bcc: list[AddressText] = Field(default_factory=list)
    subject: Line
    html: str | None = None
    text: str | None = None
    track_opens: bool = False  # "default: account setting"; relay's accounts track nothing
    track_clicks: bool = False
    headers: dict[str, Any] = Field(default_factory=dict)
    tag: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    stream_type: Literal["transactional", "broadcast", "shared"] = "shared"
    metadata: dict[str, Any] = Field(default_factory=dict)
    attachments: list[MlAttachment] = Field(default_factory=list, max_length=100)
    icalEvent: str | None = None


# MailerLogic documents 400, 403, 404 and 500: bad input of every kind (relay's 422), an
# attachment over its limit and a body that is not JSON are its 400
STATUSES = {413: 400, 415: 400, 422: 400}
_PHRASES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 429: "Too Many Requests",
            503: "Service Unavailable"}


def error_body(exc: ApiError) -> dict[str, Any]:
    """{error, message}, and on a 403 the `reason`, a short code. The seed names no values
    for `error` (*unclear*): the HTTP reason phrase, as Express-style services answer."""
    out: dict[str, Any] = {"error": _PHRASES.get(exc.status, "Internal Server Error"),
                           "message": named(exc)}
    if exc.status == 403:
        if exc.type != "permission_error":  # one of this module's own reasons
            out["reason"] = exc.type
        else:  # the key's scopes (auth) or its sender domains (submit)
            out["reason"] = "missing_scope" if "scope" in exc.message else "domain_not_allowed"
    return out


class MailerLogicApi:
    def __init__(self, config: Config, store: SQLiteStore, submitter: Submitter) -> None:
        self._config = config
        self._store = store
        self._submitter = submitter

    def routes(self) -> list[web.RouteDef]:
        return [web.post(PATH, in_shape(error_body, STATUSES)(self.send))]

    async def send(self, request: web.Request) -> web.Response:
        key = await auth.require(request, self._store, header="X-API-Key")
        m = parse(MlSend, await json_body(request))
        domain = await self._domain(m, key)
        message = prepare(self._submitter, self._submission(m, key, domain))
        result = await commit(self._submitter, message)
        if result.status == "suppressed":
            why = ", ".join(f"{a} ({r})" for a, r in result.suppressed)
            raise ApiError(400, f"every recipient is on the suppression list: {why}",
                           param="to")
        return web.json_response({
            "to": message.recipients[0].address,
            "submitted_at": iso(message.created_at),
            "message_id": self._submitter.message_id_header(message.id),
            "email_id": message.id,
            "status": "queued",
            "message": "Email queued for delivery",
        })

    async def _domain(self, m: MlSend, key: ApiKey) -> str:
        """The sending domain: the one given, else the one `from` falls under, else the key's
        first verified domain. Verified: relay holds an active DKIM key for it (or a parent)."""
        known = sorted(await self._store.list_domains(), key=lambda d: (d.created_at, d.name))
        verified = [d.name for d in known if any(k.state == "active" for k in d.keys)]
        sender = mailbox(m.from_, "from").email if m.from_ else None
        if m.domain is not None:
            try:
                name = normalize_domain(m.domain.strip(), param="domain")
            except ValidationError as exc:
                raise ApiError(422, str(exc), param="domain") from None
            mine = self_and_parents(name)
            if not any(d.name in mine for d in known):
                raise ApiError(404, f"domain {name} is not a sending domain of this relay",
                               param="domain")
            if not any(d in mine for d in verified):
                raise ApiError(403, f"domain {name} is not verified: it has no active DKIM "
                               "key (relay domains add)", type="domain_not_verified",
                               param="domain")
            if not may_send_as(key.domains, name):
                raise ApiError(403, f"this API key may not send as {name}",
                               type="domain_not_allowed", param="domain")
            if sender is not None and name not in self_and_parents(sender.rpartition("@")[2]):
                raise ApiError(403, f"from {sender} is not an address at {name}",
                               type="from_domain_mismatch", param="from")
            return name
        usable = [d for d in verified if may_send_as(key.domains, d)]
        if sender is not None:
            parents = self_and_parents(sender.rpartition("@")[2])
            found = [d for d in usable if d in parents]
            if not found:
                raise ApiError(403, f"from {sender} is not at a verified domain this API key "
                               "may use", type="domain_not_verified", param="from")
            return sender.rpartition("@")[2]
        if not usable:
            raise ApiError(403, "this API key has no verified sending domain (relay domains "
                           "add)", type="no_verified_domain", param="domain")
        return usable[0]

    def _submission(self, m: MlSend, key: ApiKey, domain: str) -> Submission:
        stream = Stream.BROADCAST if m.stream_type == "broadcast" else Stream.TRANSACTIONAL
        if m.text is None and m.html is None and not m.icalEvent:
            raise ApiError(422, "an email needs text, html or an icalEvent", param="text")
        sender = mailbox(m.from_, "from") if m.from_ else Mailbox(email=f"noreply@{domain}")
        reply_to = mailboxes(m.reply_to, "reply_to") if m.reply_to else ()
        given = []
        for name, value in m.headers.items():
            if name.lower() != "reply-to":
                given.append((name, value))
                continue
            # the service documents Reply-To among `headers`: it becomes the Reply-To
            if not isinstance(value, str):
                raise ApiError(422, "headers.Reply-To: a header value is a string",
                               param=f"headers.{name}")
            from_header = mailbox(value, f"headers.{name}")
            if reply_to and reply_to != (from_header,):
                raise ApiError(422, "reply_to and headers.Reply-To name different addresses; "
                               "give one", param=f"headers.{name}")
            reply_to = (from_header,)
        headers = checked_headers(given, stream)
        seen: set[str] = set()
        to = unique(mailboxes(m.to, "to"), seen)
        cc = unique(mailboxes(m.cc, "cc"), seen)
        bcc = unique(mailboxes(m.bcc, "bcc"), seen)
        composition = Composition(
            sender=sender, to=to, cc=cc, reply_to=reply_to, subject=m.subject, text=m.text,
            html=m.html, headers=headers, ical=m.icalEvent,
            attachments=self._attachments(m))
        utf8 = not all(mb.email.isascii() for mb in (sender, *to, *cc, *bcc))
        return Submission(
            mail_from=sender.email,
            recipients=tuple(EnvelopeRecipient(address=mb.email) for mb in (*to, *cc, *bcc)),
            composition=composition, source="api", api_key_id=key.id,
            allowed_domains=key.domains, tags=(m.tag,) if m.tag else (), metadata=m.metadata,
            # "Headers are included in webhook payloads alongside metadata": as given,
            # Reply-To too (it is sent); checked above, so every value is a string
            webhook_headers={str(n): str(v) for n, v in m.headers.items()},
            stream=stream, smtputf8=utf8, refuse_if_suppressed=True,
            track_opens=m.track_opens, track_clicks=m.track_clicks)

    def _attachments(self, m: MlSend) -> tuple[Attachment, ...]:
        """At most 10 MB a file and 25 MB in all, the html and text counted in (relay's
        [limits] max_attachment_size and max_attachments_size, 10 and 25 MiB by default)."""
        limits = self._config.limits
        total = sum(len(x.encode()) for x in (m.html, m.text) if x)
        out = []
        for i, a in enumerate(m.attachments):
            content = _decoded(a, f"attachments[{i}].content")
            if len(content) > limits.max_attachment_size:
                raise ApiError(413, f"attachments[{i}]: {a.filename} is {len(content)} bytes; "
                               f"at most {limits.max_attachment_size} a file",
                               param=f"attachments[{i}]")
            total += len(content)
            if total > limits.max_attachments_size:
                raise ApiError(413, f"attachments: over {limits.max_attachments_size} bytes in "
                               "all, the html and text included", param="attachments")
            out.append(Attachment(filename=a.filename, content=content,
                                  content_type=a.contentType))
        return tuple(out)


def _decoded(a: MlAttachment, param: str) -> bytes:
    if a.encoding == "base64":
        return decode_base64(a.content, param)
    if a.encoding == "hex":
        try:
            return bytes.fromhex(a.content)
        except (ValueError, binascii.Error):
            raise ApiError(422, f"{param}: not valid hex", param=param) from None
    if a.encoding in ("binary", "latin1"):
        try:
            return a.content.encode("latin-1")
        except UnicodeEncodeError:
            raise ApiError(422, f"{param}: binary content holds only characters up to "
                           "U+00FF", param=param) from None
    return a.content.encode("utf-8")

