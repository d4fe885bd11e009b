"""The store interface every backend implements (SQLite now, PostgreSQL later)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..frozen import quick_init
from ..types import (
    ApiKey,
    Attempt,
    DkimKeyInfo,
    Domain,
    Event,
    GivenDkimKey,
    Message,
    Recipient,
    Stream,
    SubmitResult,
)


@quick_init
@dataclass(frozen=True, kw_only=True)
class NewRecipient:
    address: str
    domain: str  # lower-case A-label
    notify: tuple[str, ...] = ()
    orcpt: str | None = None


@quick_init
@dataclass(frozen=True, kw_only=True)
class NewMessage:
    """A validated message ready to commit, as `submit` prepares it."""

    id: str
    created_at: float
    mail_from: str
    recipients: tuple[NewRecipient, ...]
    body: bytes
    source: str
    listener: str = ""  # Submission.listener; not stored
    body_kind: str = "raw"  # raw | composition (compose.py builds it at delivery)
    size: int | None = None  # the built size when the body is a composition
    # attachments a composition names by part id, stored once however many messages share them
    parts: tuple[tuple[str, bytes], ...] = ()
    api_key_id: str | None = None
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    webhook_headers: dict[str, str] | None = None  # Submission.webhook_headers
    stream: Stream = Stream.TRANSACTIONAL
    subject: str = ""
    header_from: str = ""
    dsn_ret: str | None = None
    dsn_envid: str | None = None
    smtputf8: bool = False
    scheduled_at: float | None = None
    idempotency_scope: str = ""
    idempotency_key: str | None = None
    idempotency_fingerprint: str | None = None
    idempotency_status: int | None = None  # the API's answer, replayed for the same key
    idempotency_response: bytes | None = None
    sign_domains: tuple[str, ...] = ()  # domains its DKIM signature may name; empty = any
    sender_domain: str = ""  # the From domain: an unsubscribe's scope
    refuse_if_suppressed: bool = False  # every recipient suppressed: queue nothing (the API)
    track: str = ""  # "opens", "clicks", "opens,clicks" or ""
    dkim: GivenDkimKey | None = None
    keep_mail_from: bool = False  # no VERP return path: the submitter chose the envelope sender
    pool: str = ""  # the [[delivery.pools]] name the submitter asked for; "" = by stream


@quick_init
@dataclass(frozen=True, kw_only=True)
class Remembered:
    """An idempotency key's first answer, kept 24 h for its scope (the API key)."""

    scope: str
    key: str
    fingerprint: str | None
    status: int | None  # None: a key from SMTP, which has only the message id
    response: bytes | None
    message_id: str  # "" when the answer queued no single message
    created_at: float


@quick_init
@dataclass(frozen=True, kw_only=True)
class Outgoing:
    """What render needs of a message to be delivered."""

    body: bytes
    sign_domains: tuple[str, ...]
    dkim: GivenDkimKey | None
    kind: str = "raw"  # raw | composition


@dataclass(frozen=True, kw_only=True)
class MessageDetail:
    message: Message
    recipients: tuple[Recipient, ...]
    attempts: tuple[Attempt, ...] = ()
    events: tuple[Event, ...] = ()
    body: bytes | None = None  # only when asked for
    body_pruned_at: float | None = None  # when retention dropped the body (store/retention.py)


@dataclass(frozen=True, kw_only=True)
class MessagePage:
    items: tuple[MessageDetail, ...]
    next_cursor: str | None


class Store(Protocol):
    @property
    def postgresql(self) -> bool: ...  # nodes may share this queue

    async def open(self) -> None: ...

    # failed SMTP logins, counted across nodes (store/throttles.py)
    async def auth_failures(self, scope: str, client: str, since: float) -> int: ...

    async def auth_failed(self, scope: str, client: str, now: float, since: float) -> int: ...

    async def auth_cleared(self, scope: str, client: str) -> None: ...

    async def close(self) -> None: ...

    # the way in
    async def enqueue(self, message: NewMessage) -> SubmitResult: ...

    async def enqueue_all(self, messages: Sequence[NewMessage],
                          claim: tuple[str, str, float] | None = None,
                          answer: Callable[[list[SubmitResult]], Remembered] | None = None,
                          ) -> tuple[list[SubmitResult], Remembered | None]: ...

    # idempotency keys' first answers
    async def recall(self, scope: str, key: str, now: float) -> Remembered | None: ...

    async def remember(self, record: Remembered) -> Remembered | None: ...

    # reading the queue
    async def get_message(self, message_id: str) -> MessageDetail | None: ...

    async def get_body(self, message_id: str) -> bytes | None: ...

    async def get_outgoing(self, message_id: str) -> Outgoing | None: ...

    async def get_outgoing_many(self, message_ids: list[str]) -> dict[str, Outgoing]: ...

    async def list_messages(
        self, *, limit: int = 50, cursor: str | None = None, status: str | None = None,
        tag: str | None = None, to: str | None = None, sender: str | None = None,
        since: float | None = None, within: tuple[str, ...] | None = None,
    ) -> MessagePage: ...

    # API keys: the secret never reaches the store, only its SHA-256
    async def add_api_key(self, key: ApiKey, secret_hash: bytes) -> None: ...

    async def find_api_key(self, key_id: str) -> tuple[ApiKey, bytes] | None: ...

    async def list_api_keys(self) -> list[ApiKey]: ...

    async def revoke_api_key(self, key_id: str, when: float) -> bool: ...

    # sending domains and their DKIM keys (the private halves stay in files)
    async def save_domain(self, domain: Domain, *, replace: bool = False) -> None: ...

    async def get_domain(self, name: str) -> Domain | None: ...

    async def domain_by_id(self, domain_id: str) -> Domain | None: ...

    async def list_domains(self) -> list[Domain]: ...

    async def remove_domain(self, name: str) -> bool: ...

    async def signing_version(self) -> tuple[object, ...]: ...

    async def signing_keys(self) -> list[DkimKeyInfo]: ...
