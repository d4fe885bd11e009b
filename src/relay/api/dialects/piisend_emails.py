"""PiiSend's email object: relay's statuses in PiiSend's names (and back, for ?status=), and
the object every answer carries, with the fields the detail adds, read from relay's messages."""

from __future__ import annotations

from typing import Any

from ... import rawmail
from ...store import MessageDetail, NewMessage
from ..stored import readable_mime
from ..views import iso

# relay's message status (types.message_status) → PiiSend's lifecycle name. "queued+started"
# is a queued message some of whose recipients have had their attempt: handed on, "sent".
STATUSES = {
    "scheduled": "scheduled",
    "held": "queued",  # an operator holds it; to the app it still waits for the worker
    "queued": "queued",
    "queued+started": "sent",
    "deferred": "delivering",  # tried; the receiving server said "later"
    "failed": "failed",  # parked after an internal error
    "delivered": "delivered",
    "partially_delivered": "delivered",  # per recipient, the detail says which bounced
    "bounced": "bounced",  # expired is a kind of bounce
    "suppressed": "failed",
    "cancelled": "cancelled",
}
# and back, for ?status=: the recipient statuses a listed message has one of
LISTED = {
    "scheduled": ("scheduled",), "queued": ("queued", "held"), "sent": ("queued",),
    "delivering": ("deferred",), "failed": ("failed", "suppressed"),
    "delivered": ("delivered",), "bounced": ("bounced", "expired"),
    "cancelled": ("cancelled",),
}


def status_of(d: MessageDetail) -> str:
    relay = d.message.status
    if relay == "queued" and any(r.attempts or r.status.final for r in d.recipients):
        relay = "queued+started"
    return STATUSES.get(relay, "queued")


def email_json(d: MessageDetail) -> dict[str, Any]:
    m = d.message
    scheduled = [r.next_attempt_at for r in d.recipients
                 if r.status.value == "scheduled" and r.next_attempt_at]
    return {
        "id": m.id, "status": status_of(d), "from_": m.header_from, "subject": m.subject,
        "recipients": [{"email": r.address, "status": STATUSES.get(r.status.value, "bounced")}
                       for r in d.recipients],
        "created_at": iso(m.created_at),
        "updated_at": iso(max([m.created_at, *(r.updated_at for r in d.recipients)])),
        "scheduled_at": iso(min(scheduled)) if scheduled else None,
        "resend_of": m.metadata.get("resend_of"),
    }


def new_email_json(message: NewMessage) -> dict[str, Any]:
    """The email object of a message just prepared, before it is in the store to be read."""
    status = "scheduled" if message.scheduled_at else "queued"
    return {
        "id": message.id, "status": status, "from_": message.header_from,
        "subject": message.subject,
        "recipients": [{"email": r.address, "status": status} for r in message.recipients],
        "created_at": iso(message.created_at), "updated_at": iso(message.created_at),
        "scheduled_at": iso(message.scheduled_at),
        "resend_of": message.metadata.get("resend_of"),
    }


def content_json(raw: bytes) -> dict[str, Any]:
    """The bodies and the attachments' metadata, read back from the message's bytes."""
    parsed = readable_mime(raw)
    text = html = None
    files = []
    for part in parsed.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        size = len(payload) if isinstance(payload, bytes) else 0
        if part.get_filename():
            files.append({"filename": part.get_filename(),
                          "content_type": part.get_content_type(), "size": size})
        elif part.get_content_type() == "text/plain" and text is None:
            text = part.get_content()
        elif part.get_content_type() == "text/html" and html is None:
            html = part.get_content()

    def addresses(name: str) -> list[str]:  # (readable_mime refused deeper comments)
        return [a for _, a in rawmail.getaddresses([str(v) for v in
                                                   parsed.get_all(name) or []]) if a]

    return {"to": addresses("To"), "cc": addresses("Cc"), "reply_to": addresses("Reply-To"),
            "message_id": parsed.get("Message-ID"), "text": text, "html": html,
            "attachments": files}


def history_json(d: MessageDetail) -> dict[str, Any]:
    by_id = {r.id: r.address for r in d.recipients}
    delivered = [e.created_at for e in d.events if e.type == "email.delivered"]
    return {
        "attempts": [{"email": by_id.get(a.recipient_id), "at": iso(a.started_at),
                      "provider": a.mx_host, "ip": a.ip, "tls": a.tls_version, "code": a.code,
                      "enhanced_code": a.enhanced, "response": a.text, "outcome": a.outcome,
                      "duration_ms": round(a.duration * 1000)} for a in d.attempts],
        "events": [{"type": e.type, "at": iso(e.created_at),
                    "email": by_id.get(e.recipient_id) if e.recipient_id else None}
                   for e in d.events],
        "sent_at": iso(min(a.started_at for a in d.attempts)) if d.attempts else None,
        "delivered_at": iso(max(delivered)) if delivered else None,
    }
