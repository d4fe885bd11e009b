"""Webhooks in MailChannels' format: the body (a JSON array of events with its names) and its
signature, Ed25519 as HTTP Message Signatures (RFC 9421) over the Content-Digest (RFC 9530).

    Content-Digest: sha-256=:<base64 SHA-256 of the body>:
    Signature-Input: sig_<created>=("content-digest");created=<unix s>;alg="ed25519";keyid="<id>"
    Signature: sig_<created>=:<base64 Ed25519 signature of the signature base>:

The signature base is RFC 9421's: one line per covered component, then "@signature-params".
The key is an Ed25519 seed made once (0600) in data_dir; its public half is served at
GET /tx/v1/webhook/public-key?id=<keyid>. Each attempt is signed anew: verifiers refuse a
`created` older than a few minutes."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ..store.webhooks import Delivery
from ..types import EventType
from .tracking import load_key

FORMAT = "mailchannels"
KEY_FILE = "webhook-ed25519.key"

# relay's event -> MailChannels' name; an event not here is not sent to such endpoints
_NAMES = {
    EventType.QUEUED.value: "processed",
    EventType.DELIVERED.value: "delivered",
    EventType.DROPPED.value: "dropped",
    EventType.OPENED.value: "open",
    EventType.CLICKED.value: "click",
    EventType.COMPLAINED.value: "complained",
    EventType.UNSUBSCRIBED.value: "unsubscribed",
    EventType.EXPIRED.value: "soft-bounced",  # retried until the queue lifetime ran out
}
# the relay events an endpoint of this format subscribes to
EVENTS = (*_NAMES, EventType.BOUNCED.value)


def event_name(event_type: str, data: dict[str, Any]) -> str | None:
    if event_type == EventType.BOUNCED.value:
        return "soft-bounced" if data.get("class") == "soft" else "hard-bounced"
    return _NAMES.get(event_type)


class Signer:
    """relay's webhook signing key for this format."""

    def __init__(self, seed: bytes) -> None:
        self._key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        public = self._key.public_key()
        self.public_raw = public.public_bytes(serialization.Encoding.Raw,
                                              serialization.PublicFormat.Raw)
        self.public_pem = public.public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo
                                              ).decode("ascii")
        self.key_id = "relay-" + hashlib.sha256(self.public_raw).hexdigest()[:16]

    @classmethod
    def load(cls, data_dir: Path) -> Signer:
        return cls(load_key(data_dir, KEY_FILE))

    def public_key_json(self) -> dict[str, str]:
        """`key` is the raw 32 octets in base64, the form the mailchannels SDK's verifier reads;
        `pem` is the same key as SubjectPublicKeyInfo PEM, for other verifiers."""
        return {"id": self.key_id, "key": base64.b64encode(self.public_raw).decode("ascii"),
                "pem": self.public_pem}

    def headers(self, body: bytes, now: float) -> dict[str, str]:
        created = int(now)
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")
        content_digest = f"sha-256=:{digest}:"
        params = f'("content-digest");created={created};alg="ed25519";keyid="{self.key_id}"'
        base = f'"content-digest": {content_digest}\n"@signature-params": {params}'
        signature = base64.b64encode(self._key.sign(base.encode())).decode("ascii")
        name = f"sig_{created}"
        return {"Content-Type": "application/json", "Content-Digest": content_digest,
                "Signature-Input": f"{name}={params}", "Signature": f"{name}=:{signature}:"}


def payload(d: Delivery) -> bytes | None:
    """The body for one event, or None when MailChannels has no name for it."""
    name = event_name(d.event_type, d.data)
    if name is None:
        return None
    data = d.data
    metadata = data.get("metadata") or {}
    event: dict[str, Any] = {
        "email": _address(d.sender),
        "customer_handle": d.api_key_id or "",
        "timestamp": int(d.created_at),
        "event": name,
        "request_id": metadata.get("requestId"),
        "campaign_id": data.get("campaignId"),
        "message_id": data.get("messageId"),
        "recipients": [data["email"]] if data.get("email") else [],
    }
    if data.get("code") is not None:
        event["status"] = str(data["code"])
    if data.get("diagnostic") or data.get("reply") or data.get("reason"):
        # the remote's own words, as MailChannels gives them
        event["reason"] = data.get("diagnostic") or data.get("reply") or data.get("reason")
    if name == "click" and data.get("url"):
        event["url"] = data["url"]
    if data.get("userAgent"):
        event["user_agent"] = data["userAgent"]
    return orjson.dumps([event])


def test_payload(customer_handle: str, request_id: str | None, now: float) -> bytes:
    """The body of a validation's test event (POST /tx/v1/webhook/validate)."""
    return orjson.dumps([{"email": None, "customer_handle": customer_handle,
                          "timestamp": int(now), "event": "test", "request_id": request_id,
                          "recipients": []}])


def _address(header_from: str) -> str:
    """The address in a From header value ("Alice <a@x>" -> "a@x")."""
    if "<" in header_from and header_from.endswith(">"):
        return header_from.rpartition("<")[2][:-1]
    return header_from
