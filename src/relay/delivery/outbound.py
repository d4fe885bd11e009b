"""What outbound delivery works on and yields: the targets to connect to, the messages to
send, and per recipient the result, with what a server's reply means for it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..feedback import bounce_reasons

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True, kw_only=True)
class Target:
    hostname: str  # MX or smarthost name: logs, the attempt record, TLS name checks
    address: str  # the IP to connect to
    port: int


@dataclass(frozen=True, kw_only=True)
class OutRecipient:
    id: int
    address: str
    notify: tuple[str, ...] = ()
    orcpt: str | None = None


@dataclass(frozen=True, kw_only=True)
class OutMessage:
    id: str
    mail_from: str
    recipients: tuple[OutRecipient, ...]
    data: bytes
    smtputf8: bool = False
    dsn_ret: str | None = None
    dsn_envid: str | None = None


@dataclass(frozen=True, kw_only=True)
class Result:
    recipient_id: int
    message_id: str
    outcome: str  # delivered | deferred | bounced
    code: int | None
    enhanced: str | None
    text: str
    hard: bool
    mx_host: str | None
    ip: str | None
    port: int | None
    tls_version: str | None
    tls_cipher: str | None
    started_at: float
    duration: float
    peer_dsn: bool = False  # the peer took our DSN request (RFC 3461): reporting is its job now


def enhanced_code(text: str) -> str | None:
    m = _ENHANCED.match(text.strip())
    return m.group(0) if m else None


def classify(code: int | None, enhanced: str | None, text: str = "") -> tuple[str, bool]:
    """What a reply means: (outcome, hard). Hard or soft as bounce_reasons says it of a
    bounce that comes back later: only an address bad for good is hard."""
    if code is not None and 200 <= code < 300:
        return "delivered", False
    if code is None or code < 500:
        return "deferred", False
    return "bounced", bounce_reasons.classify(enhanced, code, text)[1] == "hard"
