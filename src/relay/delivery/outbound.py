"""What outbound delivery works on and yields: the targets to connect to, the messages to
send, and per recipient the result, with what a server's reply means for it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..feedback import bounce_reasons
from ..frozen import quick_init

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


TLS_LEVELS = ("none", "may", "encrypt", "verify", "dane")


@dataclass(frozen=True, kw_only=True)
class Tlsa:
    """One TLSA record (RFC 6698): usage, selector, matching type and association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes


@dataclass(frozen=True, kw_only=True)
class TlsPolicy:
    """How a session to one target must use TLS (Postfix's levels):
    none: plain text; may: STARTTLS when offered, any certificate, plain when it fails;
    encrypt: STARTTLS required, any certificate; verify: STARTTLS required and a certificate
    a CA signed for the MX host name; dane: STARTTLS required and a certificate one of
    `tlsa` matches (RFC 7672)."""

    level: str = "may"
    source: str = "default"  # default | config | mta-sts | dane
    enforce: bool = True  # False: MTA-STS "testing": failures reported, mail sent as "may"
    tlsa: tuple[Tlsa, ...] = ()
    # TLS-RPT (RFC 8460): the policy domain, its type (sts | tlsa | no-policy-found) and text
    policy_domain: str = ""
    policy_type: str = "no-policy-found"
    policy_string: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """What the attempt records: "verify (mta-sts)", "may", "verify (mta-sts testing)"."""
        if self.source in ("default", "config"):
            return self.level
        return f"{self.level} ({self.source}{'' if self.enforce else ' testing'})"


DEFAULT_TLS = TlsPolicy()


@dataclass(frozen=True, kw_only=True)
class Target:
    hostname: str  # MX or smarthost name: logs, the attempt record, TLS name checks
    address: str  # the IP to connect to
    port: int
    tls: TlsPolicy = DEFAULT_TLS


@quick_init
@dataclass(frozen=True, kw_only=True)
class OutRecipient:
    id: int
    address: str
    notify: tuple[str, ...] = ()
    orcpt: str | None = None


@quick_init
@dataclass(frozen=True, kw_only=True)
class OutMessage:
    id: str
    mail_from: str
    recipients: tuple[OutRecipient, ...]
    data: bytes
    smtputf8: bool = False
    dsn_ret: str | None = None
    dsn_envid: str | None = None


@quick_init
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
    source_ip: str | None = None  # the local address the session came from ([[delivery.pools]])
    tls_policy: str | None = None  # TlsPolicy.label of the target
    tls_failure: str | None = None  # RFC 8460 result type, when the TLS policy failed
    held_until: float | None = None  # not tried: its site is held back (or its pool capped)
    stage: str | None = None  # the command the reply answered: "MAIL", "RCPT" or "DATA"


def enhanced_code(text: str) -> str | None:
    m = _ENHANCED.match(text.strip())
    return m.group(0) if m else None


def classify(code: int | None, enhanced: str | None, text: str = "",
             stage: str | None = None) -> tuple[str, bool]:
    """What a reply means: (outcome, hard). Hard or soft as bounce_reasons says it of a
    bounce that comes back later: only an address bad for good is hard, so a refusal of
    MAIL or of the data (`stage`) is hard only when its code names the address."""
    if code is not None and 200 <= code < 300:
        return "delivered", False
    if code is None or code < 500:
        return "deferred", False
    return "bounced", bounce_reasons.classify(enhanced, code, text, stage=stage)[1] == "hard"


def reply_text(code: int | None, enhanced: str | None, text: str) -> str:
    """"550 5.1.1 text", the way a remote server said it (its text often repeats the code)."""
    parts = [str(code)] if code else []
    if enhanced and not text.startswith(enhanced):
        parts.append(enhanced)
    return " ".join([*parts, text])

