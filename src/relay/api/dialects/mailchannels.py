"""The MailChannels dialect (seed 000) at /tx/v1, auth X-Api-Key: /send and /send-async,
each personalization its own message through the one Submission; the webhook enrolment
(/webhook?endpoint=), its validation (a signed test event to each endpoint, at once) and
the public key its signatures verify with.

Readings where MailChannels' docs leave room (chosen so that the `mailchannels` SDK works
unchanged):
- A personalization's dkim_domain, dkim_selector and dkim_private_key each fall back to the
  root's; a selector without a domain takes the From domain; a domain without a selector
  is a 400, and so is a private key without both (the seed). Without a private key, the
  domain and selector must name a key relay holds (`relay domains add`), which then signs
  as relay's keys do.
  A private key is PEM or base64 DER (what MailChannels' docs make with openssl).
- `/send` answers once the messages are on disk: "sent" there means queued for delivery,
  "failed" (with a reason) a personalization whose every recipient is suppressed. Such a
  message is kept, its recipients stored suppressed with a dropped event each (and its
  webhook), as a partly suppressed one's are: GET /v1/emails/{id} finds it.
- Mustache (`template_type: "mustache"`) fills the content with the personalization's
  dynamic_template_data; html is escaped as mustache escapes, plain text is not.
- The dry run answers each message as relay would queue it, signed with the key given
  with it; relay's own keys, the VERP return path and List-Unsubscribe are added at
  delivery, per recipient, and are not in it.
- Settings relay cannot honour (custom tracking or unsubscribe domains, `substitutions`)
  are a 400 naming the field, never a silent drop.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
import uuid
from typing import Any

import orjson
from aiohttp import web

from ... import compose
from ...addresses import self_and_parents
from ...config import Config
from ...delivery import dkim
from ...errors import ValidationError
from ...feedback import webhooks, webhooks_mailchannels
from ...feedback.webhooks_mailchannels import Signer
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
from .. import auth
from ..errors import ApiError
from ..hooks import check_target
from ..mailboxes import mailbox, unique
from ..parts import decode_attachments
from ..request_ids import REQUEST_ID
from ..requests import json_body, parse
from ..schemas import AttachmentIn
from ..submitting import prepare, store_call
from ..views import iso
from .common import in_shape, named
from .mailchannels_request import (
    McPersonalization,
    McSend,
    McTracking,
    McValidate,
    built_octets,
    campaign_id,
    check_expansion,
    check_settings,
    expansion,
    filled_content,
    merged_headers,
)

PREFIX = "/tx/v1/"  # every route of this dialect, and every error under it in its shape
# MailChannels answers bad input with 400 and a too-large one with 413
STATUSES = {415: 400, 422: 400}


def error_body(exc: ApiError) -> dict[str, Any]:
    """MailChannels' error shape ({"errors": [...]}), with the message and field named."""
    message = named(exc)
    out: dict[str, Any] = {"errors": [message], "message": message}
    if exc.param:
        out["param"] = exc.param
    return out


async def caller(request: web.Request, store: SQLiteStore) -> ApiKey:
    """auth.require, its 401 naming the header MailChannels' clients send the key in."""
    try:
        return await auth.require(request, store)
    except ApiError as exc:
        if exc.status != 401:
            raise
        missing = not auth.presented_key(request)
        raise ApiError(401, "an API key is required in the X-Api-Key header" if missing
                       else "the API key in X-Api-Key is not valid or was revoked",
                       param="X-Api-Key") from None


class MailChannelsApi:
    def __init__(self, config: Config, store: SQLiteStore, submitter: Submitter,
                 signer: Signer) -> None:
        self._config = config
        self._store = store
        self._submitter = submitter
        self._signer = signer

    def routes(self) -> list[web.RouteDef]:
        shaped = in_shape(error_body, STATUSES)
        return [
            web.post("/tx/v1/send", shaped(self.send)),
            web.post("/tx/v1/send-async", shaped(self.send_async)),
            web.post("/tx/v1/webhook", shaped(self.enrol)),
            web.get("/tx/v1/webhook", shaped(self.webhooks)),
            web.delete("/tx/v1/webhook", shaped(self.unenrol)),
            web.get("/tx/v1/webhook/public-key", shaped(self.public_key)),
            web.post("/tx/v1/webhook/validate", shaped(self.validate)),
        ]

    # -- sending -------------------------------------------------------------------------

    async def send(self, request: web.Request) -> web.Response:
        key = await caller(request, self._store)
        m = parse(McSend, await json_body(request))
        request_id = str(uuid.uuid4())
        messages = await self._prepared(m, key, request_id)
        if request.query.get("dry-run", "").lower() == "true":
            return await self._dry_run_answer(request, messages)
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
        key = await caller(request, self._store)
        m = parse(McSend, await json_body(request))
        request_id = str(uuid.uuid4())
        messages = await self._prepared(m, key, request_id)
        await store_call(self._submitter.commit_all(messages))
        return web.json_response({"queued_at": iso(time.time()), "request_id": request_id},
                                 status=202)

    async def _prepared(self, m: McSend, key: ApiKey, request_id: str) -> list[NewMessage]:
        """Every personalization checked and built before anything is written: a bad one
        refuses the whole request, as MailChannels does. What the request expands into is
        counted first (and again as it is built: mustache can grow it), and the attachments
        are decoded once, one bytes object each that every message shares (and that the
        store keeps once)."""
        check_settings(m)
        limit = self._config.limits.max_request_expansion
        check_expansion(expansion(m), limit)
        metadata: dict[str, Any] = {"requestId": request_id}
        if m.campaign_id is not None:
            metadata["campaignId"] = campaign_id(m.campaign_id)
        stream = Stream.TRANSACTIONAL if m.transactional else Stream.BROADCAST
        attachments = decode_attachments(
            [AttachmentIn(filename=a.filename, content=a.content, contentType=a.type,
                          contentId=a.content_id if a.disposition == "inline" else None)
             for a in m.attachments],
            max_file=self._config.limits.max_attachment_size,
            max_total=self._config.limits.max_attachments_size)
        out: list[NewMessage] = []
        built = 0
        for i, p in enumerate(m.personalizations):
            where = f"personalizations[{i}]"
            if stream is Stream.BROADCAST and len(p.to) + len(p.cc) + len(p.bcc) != 1:
                raise ApiError(400, f"{where}: a non-transactional message has exactly one "
                               "recipient per personalization", param=f"{where}.to")
            sub = await self._submission(m, p, where, key, stream, metadata, attachments)
            message = prepare(self._submitter, sub)
            assert sub.composition is not None
            built += built_octets(sub.composition)
            check_expansion(built, limit, built=True)
            try:
                await self._submitter.check_broadcast(message)
            except ValidationError as exc:
                raise ApiError(400, f"transactional: false needs a DKIM signature: {exc}",
                               param="transactional") from None
            out.append(message)
            await asyncio.sleep(0)  # a thousand personalizations must not hold the loop
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
        to = unique(tuple(mailbox(a, f"{where}.to[{j}]") for j, a in enumerate(p.to)), seen)
        cc = unique(tuple(mailbox(a, f"{where}.cc[{j}]") for j, a in enumerate(p.cc)), seen)
        bcc = unique(tuple(mailbox(a, f"{where}.bcc[{j}]") for j, a in enumerate(p.bcc)),
                      seen)
        fill = functools.partial(filled_content, m.content, p.dynamic_template_data,
                                 limit=self._config.limits.max_request_expansion)
        # mustache can take a while within its budget: in a thread, the loop serves others
        mustache = any(c.template_type == "mustache" for c in m.content)
        text, html = await asyncio.to_thread(fill) if mustache else fill()
        composition = Composition(
            sender=sender, to=to, cc=cc,
            reply_to=(mailbox(reply_to, f"{where}.reply_to" if p.reply_to else "reply_to"),)
            if reply_to else (),
            subject=subject, text=text, html=html, attachments=attachments,
            headers=merged_headers(m.headers, p.headers, where, stream))
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
            # a personalization whose every recipient is suppressed is still recorded (its
            # recipients stored suppressed, each with a dropped event and its webhook), so
            # that its message_id can be looked up like any other
            smtputf8=not all(b.email.isascii() for b in everyone), refuse_if_suppressed=False,
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
        if private is not None and domain is None:
            # the seed: a key needs its dkim_domain too (named where the key is given)
            raise ApiError(400, f"dkim_domain is required with {private_at}",
                           param=private_at.removesuffix("dkim_private_key") + "dkim_domain")
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

    async def _dry_run_answer(self, request: web.Request,
                              messages: list[NewMessage]) -> web.StreamResponse:
        """{"data": [...]} written a message at a time: each is built (MIME, maybe a
        signature) and sent before the next, so one is held, not all of them, and the loop
        runs others in between."""
        response = web.StreamResponse(headers={"Content-Type": "application/json",
                                               "X-Request-Id": request.get(REQUEST_ID, "")})
        await response.prepare(request)
        await response.write(b'{"data": [')
        for i, message in enumerate(messages):
            await response.write((b", " if i else b"") + orjson.dumps(self._dry_run(message)))
            await asyncio.sleep(0)
        await response.write(b"]}")
        await response.write_eof()
        return response

    def _dry_run(self, message: NewMessage) -> str:
        data = compose.materialize(message.body, message.body_kind, dict(message.parts))
        if message.dkim is not None:
            given = message.dkim
            data = dkim.sign(data, [dkim.SigningKey(
                given.domain, given.selector, dkim.load_private_key(given.private_key))])
        return data.decode("utf-8", "replace")

    # -- webhooks ------------------------------------------------------------------------

    async def enrol(self, request: web.Request) -> web.Response:
        """POST /webhook?endpoint=URL: events in MailChannels' shape go to URL."""
        key = await caller(request, self._store)
        url = request.query.get("endpoint", "")
        if not url:
            raise ApiError(400, "the endpoint query parameter is required", param="endpoint")
        await check_target(url, self._config.webhooks.allow_private_targets)
        known = await self._store.list_endpoints(auth.reach(key))
        if any(e.format == "mailchannels" and e.url == url for e in known):
            raise ApiError(409, f"{url} is already enrolled", param="endpoint")
        await self._store.add_endpoint(WebhookEndpoint(
            id="wh_" + secrets.token_hex(8), url=url, secret=webhooks.new_secret(),
            events=webhooks_mailchannels.EVENTS, created_at=time.time(),
            format="mailchannels", owner=key.domains))
        return web.Response(status=201)

    async def webhooks(self, request: web.Request) -> web.Response:
        key = await caller(request, self._store)
        known = await self._store.list_endpoints(auth.reach(key))
        return web.json_response({"data": [{"webhook": e.url} for e in known
                                           if e.format == "mailchannels"]})

    async def unenrol(self, request: web.Request) -> web.Response:
        """DELETE /webhook: every endpoint of this format (MailChannels deletes them all)."""
        key = await caller(request, self._store)
        for e in await self._store.list_endpoints(auth.reach(key)):
            if e.format == "mailchannels":
                await self._store.delete_endpoint(e.id)
        return web.Response(status=204)

    async def validate(self, request: web.Request) -> web.Response:
        """POST /webhook/validate: a signed test event to each enrolled endpoint, now, and
        what each answered (passed: a 2xx). With none enrolled, nothing passed."""
        key = await caller(request, self._store)
        raw = await request.read()
        body = parse(McValidate, raw) if raw.strip() else McValidate()
        endpoints = [e for e in await self._store.list_endpoints(auth.reach(key))
                     if e.format == "mailchannels"]

        async def one(e: WebhookEndpoint) -> dict[str, Any]:
            now = time.time()
            event = webhooks_mailchannels.test_payload(key.id, body.request_id, now)
            status, answer = await webhooks.probe(self._config.webhooks, e.url, event,
                                                  self._signer.headers(event, now))
            passed = status is not None and 200 <= status < 300
            return {"webhook": e.url, "result": "passed" if passed else "failed",
                    "response": None if status is None else {"status": status,
                                                             "body": answer}}

        results = await asyncio.gather(*(one(e) for e in endpoints))
        return web.json_response({"all_passed": bool(results) and all(
            r["result"] == "passed" for r in results), "results": results})

    async def public_key(self, request: web.Request) -> web.Response:
        """The key the webhook signatures verify with; no API key needed, as there."""
        key_id = request.query.get("id", "")
        if key_id != self._signer.key_id:
            raise ApiError(404, f"no webhook signing key {key_id!r}", param="id")
        return web.json_response(self._signer.public_key_json())
