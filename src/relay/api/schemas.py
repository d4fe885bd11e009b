"""Request bodies of the native API as pydantic models: the server validates with them and
/v1/openapi.json is generated from them, so the two cannot drift apart."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

MAX_BATCH = 100

# Headers relay writes itself; `headers` may not set them (case-insensitive). On broadcast
# mail List-Unsubscribe and List-Unsubscribe-Post are relay's too.
RESERVED_HEADERS = frozenset({
    "from", "to", "cc", "bcc", "subject", "message-id", "dkim-signature", "content-type",
    "content-transfer-encoding", "mime-version", "return-path", "received",
    "authentication-results", "reply-to", "date",
})
BROADCAST_HEADERS = frozenset({"list-unsubscribe", "list-unsubscribe-post"})

HeaderName = Annotated[str, StringConstraints(pattern=r"^[!-9;-~]{1,76}$")]
HeaderValue = Annotated[str, StringConstraints(pattern=r"^[^\r\n]*$", max_length=998)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class AddressObject(Strict):
    email: Annotated[str, StringConstraints(min_length=3, max_length=320)]
    name: Annotated[str, StringConstraints(max_length=256, pattern=r"^[^\r\n]*$")] | None = None


Address = Annotated[str, StringConstraints(min_length=3, max_length=600,
                                            pattern=r"^[^\r\n]*$")] | AddressObject


class AttachmentIn(Strict):
    filename: Annotated[str, StringConstraints(min_length=1, max_length=255,
                                                pattern=r"^[^\r\n/\\]*$")]
    content: str = Field(description="the file, base64")
    contentType: Annotated[str, StringConstraints(
        pattern=r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")] | None = None
    contentId: Annotated[str, StringConstraints(
        min_length=1, max_length=200, pattern=r"^[^\s<>\"]+$")] | None = Field(
        default=None, description="makes it an inline part, referred to as cid:<contentId>")


class TagIn(Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    value: Annotated[str, StringConstraints(max_length=256)] = ""


class SendEmail(Strict):
    from_: Address = Field(alias="from")
    to: list[Address] | Address = Field(default_factory=list)
    cc: list[Address] | Address = Field(default_factory=list)
    bcc: list[Address] | Address = Field(default_factory=list)
    replyTo: list[Address] | Address | None = None
    subject: Annotated[str, StringConstraints(max_length=998)] | None = None
    html: str | None = None
    text: str | None = None
    data: dict[str, Any] | None = Field(
        default=None, description="values for {{var}} and {{var ?? 'fallback'}} in the "
                                  "subject, html and text")
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    tags: list[TagIn] = Field(default_factory=list, max_length=50)
    attachments: list[AttachmentIn] = Field(default_factory=list, max_length=100)
    icalEvent: str | None = Field(default=None, description="an iCalendar invite (VCALENDAR)")
    scheduledAt: AwareDatetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict,
                                     description="stored with the message, never sent")
    stream: Literal["transactional", "broadcast"] = "transactional"
    pool: Annotated[str, StringConstraints(max_length=63)] | None = Field(
        default=None, description="the [[delivery.pools]] the mail leaves from; "
                                  "default: the pool serving its stream")
    trackOpens: bool = False
    trackClicks: bool = False


class SendBatch(Strict):
    # the items are any JSON values here: each is validated on its own as a SendEmail, so
    # one that is not an object fails alone, in its result, and the rest are queued (seed 003)
    emails: list[Any] = Field(min_length=1, max_length=MAX_BATCH,
                              description=f"1 to {MAX_BATCH} SendEmail objects, each "
                                          "validated and queued on its own")


class ValidBatch(Strict):
    """SendBatch when every item is a valid SendEmail: the fast path of /v1/emails/batch
    (not in the OpenAPI document; a batch it refuses is read as SendBatch, item by item)."""
    emails: list[SendEmail] = Field(min_length=1, max_length=MAX_BATCH)


class ReplyEmail(Strict):
    """POST /v1/emails/{id}/reply: every field overrides what the parent gives (from: its
    From; to: its To; subject: "Re: " and its subject); html or text is needed."""
    from_: Address | None = Field(default=None, alias="from")
    to: list[Address] | Address | None = None
    cc: list[Address] | Address = Field(default_factory=list)
    bcc: list[Address] | Address = Field(default_factory=list)
    replyTo: list[Address] | Address | None = None
    subject: Annotated[str, StringConstraints(max_length=998)] | None = None
    html: str | None = None
    text: str | None = None
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)
    tags: list[TagIn] = Field(default_factory=list, max_length=50)
    attachments: list[AttachmentIn] = Field(default_factory=list, max_length=100)
    scheduledAt: AwareDatetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict,
                                     description="stored with the message, never sent")
    trackOpens: bool = False
    trackClicks: bool = False


class Queued(BaseModel):
    id: str
    status: Literal["queued", "scheduled"]


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None


class BatchItem(BaseModel):
    index: int
    id: str | None = None
    status: Literal["queued", "scheduled"] | None = None
    error: ErrorDetail | None = None


class BatchResults(BaseModel):
    results: list[BatchItem]


class Page(BaseModel):
    data: list[dict[str, Any]]
    nextCursor: str | None


class EmailDetail(BaseModel):
    id: str
    status: str
    createdAt: str | None
    recipients: list[dict[str, Any]]


class Cancelled(BaseModel):
    id: str
    status: Literal["cancelled"]


class CreateApiKey(Strict):
    name: Annotated[str, StringConstraints(min_length=1, max_length=100,
                                            pattern=r"^[^\r\n]*$")]
    scopes: list[Literal["emails:send", "emails:read", "domains:manage", "webhooks:manage",
                         "suppressions:manage", "keys:manage", "templates:manage",
                         "contacts:manage", "metrics:read", "admin"]] = Field(
        default_factory=lambda: ["emails:send"], min_length=1)
    domains: list[Annotated[str, StringConstraints(min_length=1, max_length=253)]] = Field(
        default_factory=list, description="sender domains the key may use; empty = any")


class AddSuppression(Strict):
    email: Annotated[str, StringConstraints(min_length=3, max_length=320)]
    reason: Literal["unsubscribed", "hard_bounce", "complaint", "manual"] = "manual"
    scope: Annotated[str, StringConstraints(max_length=253)] = Field(
        default="", description="empty: all mail; a sending domain: that domain's broadcast "
                                "mail only")


EVENT_TYPES = Literal[
    "email.queued", "email.scheduled", "email.deferred", "email.delivered", "email.bounced",
    "email.expired", "email.delayed", "email.dropped", "email.cancelled", "email.held",
    "email.released", "email.failed", "email.opened", "email.clicked", "email.unsubscribed",
    "email.complained", "webhook.disabled"]


class CreateWebhook(Strict):
    url: Annotated[str, StringConstraints(min_length=8, max_length=2048,
                                          pattern=r"^https?://[^\s]+$")]
    events: list[EVENT_TYPES] = Field(default_factory=list,
                                      description="the event types to send; empty = all")
    format: Literal["native", "mailchannels"] = Field(
        default="native", description="the body and signing: relay's own, or MailChannels'")


class UpdateWebhook(Strict):
    enabled: bool


class Redeliver(Strict):
    eventId: Annotated[str, StringConstraints(pattern=r"^evt_[0-9]+$")]
