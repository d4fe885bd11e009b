"""relay's own return paths: the VERP envelope sender that names one recipient, the
Feedback-ID that names one message, and reading both back when a report arrives.

A bounce address is `bounces+TOKEN@<return-path host>`, TOKEN being the recipient's id and
80 bits of HMAC in lower-case base32 (tracking.Tokens, its own "bounce" kind, so an
unsubscribe token is not a bounce token). It is read case-insensitively, since some MTAs fold
the case of local parts, and `bounces+` plus 29 characters stays far under the 64 octets of
RFC 5321 4.5.3.1.1. A forged or altered token reads as None, never as another recipient."""

from __future__ import annotations

import hmac
import re

from ..addresses import self_and_parents
from ..config import Config
from .tracking import Tokens, b32

BOUNCE_PREFIX = "bounces+"
UNSUBSCRIBE_PREFIX = "unsub+"  # tracking.unsubscribe_headers writes the mailto: form
FEEDBACK_ID_HEADER = "Feedback-ID"
_FEEDBACK_MAC = 8
_FEEDBACK_ID = re.compile(r"^\s*(msg_[0-9a-z]{26})\.([a-z2-7]{13}):", re.IGNORECASE)


def bounce_host(config: Config) -> str:
    """The return-path host of mail from a domain relay has no record of."""
    return (config.bounces.domain or config.server.hostname).lower().rstrip(".")


def return_path_host(sender_domain: str, return_paths: dict[str, str], fallback: str) -> str:
    """The host of a message's return path: its sending domain's (or a parent's, still
    aligned under relaxed DMARC), else the fallback ([bounces] domain or the hostname)."""
    for candidate in self_and_parents(sender_domain):
        host = return_paths.get(candidate)
        if host:
            return host
    return fallback


def bounce_address(tokens: Tokens, recipient_id: int, host: str) -> str:
    return f"{BOUNCE_PREFIX}{tokens.make('bounce', recipient_id)}@{host}"


def split_local(address: str) -> tuple[str, str, str]:
    """(prefix, token, host) of a bounces+/unsub+ address, lower-cased; ("", "", "") else."""
    local, at, host = address.strip().strip("<>").rpartition("@")
    if not at:
        return "", "", ""
    lowered = local.lower()
    for prefix in (BOUNCE_PREFIX, UNSUBSCRIBE_PREFIX):
        if lowered.startswith(prefix) and len(lowered) > len(prefix):
            return prefix, lowered[len(prefix):], host.lower().rstrip(".")
    return "", "", ""


def read_bounce_address(tokens: Tokens, address: str) -> int | None:
    """The recipient a bounces+TOKEN address was made for, or None."""
    prefix, token, _ = split_local(address)
    return tokens.read("bounce", token) if prefix == BOUNCE_PREFIX else None


def read_unsubscribe_address(tokens: Tokens, address: str) -> int | None:
    prefix, token, _ = split_local(address)
    return tokens.read("unsubscribe", token) if prefix == UNSUBSCRIBE_PREFIX else None


def find_bounce_token(tokens: Tokens, text: str | None) -> int | None:
    """A bounces+TOKEN address anywhere in a header value (e.g. an enclosed Return-Path)."""
    for found in re.finditer(r"bounces\+([a-z2-7]+)@", text or "", re.IGNORECASE):
        recipient_id = tokens.read("bounce", found.group(1).lower())
        if recipient_id is not None:
            return recipient_id
    return None


def feedback_id(tokens: Tokens, message_id: str, stream: str, sender_domain: str) -> str:
    """Feedback-ID (the form Gmail's feedback loop reads: a:b:c:SenderId), whose first field
    names the message, signed, so a complaint that hides its recipient still finds it."""
    return f"{message_id}.{_feedback_mac(tokens, message_id)}:{stream}:" \
           f"{sender_domain or 'relay'}:relay"


def read_feedback_id(tokens: Tokens, value: str | None) -> str | None:
    """The message a Feedback-ID relay wrote names, or None (someone else's, or altered)."""
    found = _FEEDBACK_ID.match(value or "")
    if found is None:
        return None
    message_id, mac = found.group(1), found.group(2).lower()
    if not hmac.compare_digest(mac, _feedback_mac(tokens, message_id)):
        return None
    return message_id


def _feedback_mac(tokens: Tokens, message_id: str) -> str:
    digest = tokens.mac("feedback", message_id.encode())
    return b32(digest[:_FEEDBACK_MAC])
