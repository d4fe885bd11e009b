"""The values that travel through relay. Imports nothing from the package but frozen.py."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .frozen import quick_init


class RecipientStatus(enum.StrEnum):
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    DEFERRED = "deferred"
    HELD = "held"
    FAILED = "failed"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    EXPIRED = "expired"
    SUPPRESSED = "suppressed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({RecipientStatus.DELIVERED, RecipientStatus.BOUNCED,
                            RecipientStatus.EXPIRED, RecipientStatus.SUPPRESSED,
                            RecipientStatus.CANCELLED})
# the statuses a recipient waits in (not final): what the queue's gauges and STATUS= count
WAITING_STATUSES: tuple[str, ...] = tuple(
    s.value for s in RecipientStatus if s not in FINAL_STATUSES)

# While any recipient is in one of these, the message takes the first that applies.
_PENDING_PRECEDENCE = (RecipientStatus.SCHEDULED, RecipientStatus.HELD, RecipientStatus.QUEUED,
                       RecipientStatus.DEFERRED, RecipientStatus.FAILED)


def message_status(statuses: list[RecipientStatus] | list[str]) -> str:
    """A message's status, derived from its recipients' (DESIGN.md section 3)."""
    present = {RecipientStatus(s) for s in statuses}
    for status in _PENDING_PRECEDENCE:
        if status in present:
            return status.value
    if not present:
        return RecipientStatus.QUEUED.value
    if present == {RecipientStatus.DELIVERED}:
        return "delivered"
    if RecipientStatus.DELIVERED in present:
        return "partially_delivered"
    if present & {RecipientStatus.BOUNCED, RecipientStatus.EXPIRED}:
        return "bounced"
    if present == {RecipientStatus.SUPPRESSED}:
        return "suppressed"
    if present == {RecipientStatus.CANCELLED}:
        return "cancelled"
    return "bounced" if RecipientStatus.SUPPRESSED in present else "cancelled"


class Stream(enum.StrEnum):
    TRANSACTIONAL = "transactional"
    BROADCAST = "broadcast"


class EventType(enum.StrEnum):
    QUEUED = "email.queued"
    SCHEDULED = "email.scheduled"
    DEFERRED = "email.deferred"
    DELIVERED = "email.delivered"
    BOUNCED = "email.bounced"
    EXPIRED = "email.expired"
    DELAYED = "email.delayed"
    DROPPED = "email.dropped"
    CANCELLED = "email.cancelled"
    HELD = "email.held"
    RELEASED = "email.released"
    FAILED = "email.failed"
    OPENED = "email.opened"
    CLICKED = "email.clicked"
    UNSUBSCRIBED = "email.unsubscribed"
    COMPLAINED = "email.complained"
    WEBHOOK_DISABLED = "webhook.disabled"


@quick_init
@dataclass(frozen=True, kw_only=True)
class EnvelopeRecipient:
    """One RCPT: the address and its DSN parameters (RFC 3461)."""

    address: str
    notify: tuple[str, ...] = ()  # NEVER | SUCCESS, FAILURE, DELAY; empty = default
    orcpt: str | None = None


@dataclass(frozen=True, kw_only=True)
class GivenDkimKey:
    """A DKIM key that comes with one message (the MailChannels shape); never shown again and
    wiped from the store when the message ends."""

    domain: str
    selector: str
    private_key: str  # PEM, or an Ed25519 seed in base64

    def __repr__(self) -> str:  # keeps the key out of logs and tracebacks
        return f"GivenDkimKey(domain={self.domain!r}, selector={self.selector!r})"


@quick_init
@dataclass(frozen=True, kw_only=True)
class Mailbox:
    email: str
    name: str | None = None


@dataclass(frozen=True, kw_only=True)
class Attachment:
    filename: str
    content: bytes  # decoded
    content_type: str = "application/octet-stream"
    content_id: str | None = None  # set: an inline part, referred to as cid:<content_id>


@quick_init
@dataclass(frozen=True, kw_only=True)
class Composition:
    """A message as the JSON APIs describe it; compose.py turns it into RFC 5322 bytes."""

    sender: Mailbox
    to: tuple[Mailbox, ...] = ()
    cc: tuple[Mailbox, ...] = ()
    reply_to: tuple[Mailbox, ...] = ()
    subject: str = ""
    text: str | None = None
    html: str | None = None
    attachments: tuple[Attachment, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()  # no reserved names; no line breaks (compose)
    ical: str | None = None  # a calendar invite: text/calendar alternative + invite.ics


@quick_init
@dataclass(frozen=True, kw_only=True)
class Submission:
    """What every entry point hands to `submit`: one message, its envelope and options."""

    mail_from: str  # envelope sender; "" is the null sender
    recipients: tuple[EnvelopeRecipient, ...]
    data: bytes = b""  # RFC 5322 bytes with CRLF line endings; or else:
    composition: Composition | None = None  # built into bytes at delivery (compose.py)
    source: str = "smtp"  # smtp | api
    listener: str = ""  # the SMTP listener that took it ("submission:587"), for the metrics
    api_key_id: str | None = None
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    # custom headers every webhook of the message carries beside its metadata (MailerLogic
    # documents so); None: its webhooks carry none
    webhook_headers: dict[str, str] | None = None
    stream: Stream = Stream.TRANSACTIONAL
    idempotency_key: str | None = None
    idempotency_fingerprint: str | None = None  # a hash of the request, to tell a replay from a reuse
    scheduled_at: float | None = None
    dsn_ret: str | None = None  # FULL | HDRS
    dsn_envid: str | None = None
    smtputf8: bool = False
    allowed_domains: tuple[str, ...] = ()  # sender domains the key may use; empty = any
    dkim: GivenDkimKey | None = None  # sign with this key instead of the domain's own
    refuse_if_suppressed: bool = False  # every recipient suppressed: queue nothing (the API)
    track_opens: bool = False  # an open pixel in the html (per recipient, at delivery)
    track_clicks: bool = False  # the html's links through signed redirects
    # the submitter chose the envelope sender: relay does not put its VERP return path there
    keep_mail_from: bool = False
    pool: str = ""  # a [[delivery.pools]] name: the source addresses the mail leaves from
    # trace for the Received: header, e.g. ("client.example ([192.0.2.1])", "ESMTPSA")
    received_from: str | None = None
    received_with: str | None = None


@quick_init
@dataclass(frozen=True, kw_only=True)
class SubmitResult:
    message_id: str
    duplicate: bool = False  # an idempotency key repeated: nothing new was queued
    status: str = "queued"  # queued | scheduled | suppressed (every recipient) | conflict
    suppressed: tuple[tuple[str, str], ...] = ()  # (address, reason) dropped at submit


@dataclass(frozen=True, kw_only=True)
class Message:
    id: str
    created_at: float
    mail_from: str
    size: int
    source: str
    api_key_id: str | None
    tags: tuple[str, ...]
    metadata: dict[str, Any]
    stream: Stream
    status: str
    subject: str = ""
    header_from: str = ""
    dsn_ret: str | None = None
    dsn_envid: str | None = None
    smtputf8: bool = False
    # bounces come back to relay's VERP return path ("verp"), or not: "kept" (the submitter
    # chose the envelope sender) or "none" (the null sender)
    return_path: str = "verp"
    sender_domain: str = ""  # the From domain: the message's owner (owners.py)


@dataclass(frozen=True, kw_only=True)
class Recipient:
    id: int
    message_id: str
    address: str
    domain: str
    status: RecipientStatus
    attempts: int = 0
    next_attempt_at: float | None = None
    last_reply: str | None = None
    notify: tuple[str, ...] = ()
    orcpt: str | None = None
    updated_at: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Attempt:
    id: int
    recipient_id: int
    message_id: str
    started_at: float
    duration: float
    mx_host: str | None
    ip: str | None
    port: int | None
    tls_version: str | None
    tls_cipher: str | None
    code: int | None
    enhanced: str | None
    text: str
    outcome: str  # delivered | deferred | bounced
    signed: str | None = None
    source_ip: str | None = None  # the local address it left from ([[delivery.pools]])
    tls_policy: str | None = None  # e.g. "may", "verify (mta-sts)", "dane (dane)"
    tls_failure: str | None = None  # RFC 8460 result type when the TLS policy failed


@dataclass(frozen=True, kw_only=True)
class Event:
    id: int
    message_id: str | None
    recipient_id: int | None
    type: str
    created_at: float
    data: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class DkimKeyInfo:
    """One of a sending domain's DKIM keys; the private half lives in a 0600 file at `path`."""

    domain: str
    selector: str
    algorithm: str  # rsa-sha256 | ed25519-sha256
    public_key: str  # the p= value
    path: str
    state: str  # pending (new, not signing yet) | active | retiring (kept published)
    created_at: float
    activated_at: float | None = None
    retire_after: float | None = None  # retiring: its record may go after this time


@dataclass(frozen=True, kw_only=True)
class Domain:
    name: str  # lower-case A-label
    created_at: float
    return_path: str  # the MAIL FROM host of its mail (SPF, bounces)
    keys: tuple[DkimKeyInfo, ...] = ()
    id: str = ""  # "dom_" + 16 hex, given by the store when first saved; kept on replace


@dataclass(frozen=True, kw_only=True)
class WebhookEndpoint:
    id: str  # "wh_" + 16 hex
    url: str
    secret: str  # whsec_…, shown once at creation
    events: tuple[str, ...]  # empty = every event
    enabled: bool = True
    created_at: float = 0.0
    disabled_at: float | None = None
    disabled_reason: str | None = None
    failing_since: float | None = None
    format: str = "native"  # the body and signing: native | mailchannels
    owner: tuple[str, ...] = ()  # the domains of the key that made it; () = the relay

    def __repr__(self) -> str:  # keeps the secret out of logs
        return f"WebhookEndpoint(id={self.id!r}, url={self.url!r}, enabled={self.enabled})"


SUPPRESSION_REASONS = ("unsubscribed", "hard_bounce", "complaint", "manual")


@dataclass(frozen=True, kw_only=True)
class Suppression:
    """Mail to `address` is not sent: all of it when `scope` is "", or else only broadcast
    mail from the sending domain `scope` (an unsubscribe leaves one sender's list only)."""

    address: str
    scope: str
    reason: str  # unsubscribed | hard_bounce | complaint | manual
    source: str
    created_at: float
    owner: tuple[str, ...] = ()  # it stops only this owner's mail; () = everyone's


@dataclass(frozen=True, kw_only=True)
class ApiKey:
    id: str  # the public prefix, e.g. "rk_3f9a…"
    name: str
    scopes: tuple[str, ...]
    domains: tuple[str, ...]  # empty = any sender domain
    created_at: float
    revoked_at: float | None = None
    last_used_at: float | None = None


SCOPES = (
    "emails:send",
    "emails:read",
    "domains:manage",
    "webhooks:manage",
    "suppressions:manage",
    "keys:manage",
    "templates:manage",
    "contacts:manage",
    "metrics:read",
    # the relay-wide view (the dashboard, GET /v1/stats); only with a key without domains
    "admin",
)


TEMPLATE_TYPES = ("transactional", "marketing")


@dataclass(frozen=True, kw_only=True)
class Template:
    """A stored message: subject, html and text with {{var}} placeholders, and a default
    sender. A marketing template is not sent to an unsubscribed contact."""

    id: str
    name: str
    type: str  # transactional | marketing
    subject: str
    html: str
    text: str | None = None
    from_email: str | None = None
    from_name: str | None = None
    created_at: float
    updated_at: float
    owner: tuple[str, ...] = ()  # the domains of the key that made it; () = the relay


@dataclass(frozen=True, kw_only=True)
class Contact:
    """Someone relay has mailed or been told about: their data fills {{var}} in the mail
    they get, and `subscribed` says whether marketing mail may reach them."""

    id: str
    email: str
    subscribed: bool
    data: dict[str, Any] = field(default_factory=dict)
    created_at: float
    updated_at: float
    owner: tuple[str, ...] = ()  # the domains of the key that made it; () = the relay
