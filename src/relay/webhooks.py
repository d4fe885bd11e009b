"""Webhooks: each event POSTed as JSON to the endpoints subscribed to it, signed two ways.

Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>`): the
HMAC-SHA256 key is the base64-decoded part of the secret after `whsec_`, and the timestamp is
this attempt's, so every retry is signed anew (its verifiers refuse anything over 5 minutes).
Drin (`Drin-Signature: t=<unix s>,v1=<hex>`): the key is the whole `whsec_…` string as UTF-8
and `t` is the event's createdAt floored to seconds.

(This module signs; the outbox and its dispatcher come with the rest of webhooks.)"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Mapping
from typing import Any

import orjson

from .api.views import iso

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """`whsec_` and 32 random bytes in base64, as Standard Webhooks libraries expect."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode("ascii")


def payload(event_id: str, event_type: str, created_at: float, data: Mapping[str, Any]) -> bytes:
    """The body of every delivery of one event: the same bytes on each retry."""
    return orjson.dumps({"id": event_id, "type": event_type, "createdAt": iso(created_at),
                         "data": dict(data)})


def standard_signature(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX) + "==")
    mac = hmac.new(key, f"{event_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def drin_signature(secret: str, created_at: float, body: bytes) -> str:
    t = int(created_at // 1)
    mac = hmac.new(secret.encode("utf-8"), f"{t}.".encode() + body, hashlib.sha256)
    return f"t={t},v1={mac.hexdigest()}"


def signed_headers(secret: str, event_id: str, created_at: float, body: bytes,
                   now: float) -> dict[str, str]:
    """The headers of one delivery attempt made at `now`."""
    timestamp = int(now)
    return {
        "Content-Type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": standard_signature(secret, event_id, timestamp, body),
        "Drin-Signature": drin_signature(secret, created_at, body),
    }
