"""The JSON shapes of messages, shared by the API and `relay queue … --json`."""

from __future__ import annotations

from typing import Any

from ..store import MessageDetail
from ..timefmt import iso

__all__ = ["iso", "message_json", "tag_objects"]


def tag_objects(tags: tuple[str, ...]) -> list[dict[str, str]]:
    """Tags are stored as "name" or "name:value" (the API's {name, value})."""
    return [{"name": name, "value": value} for name, _, value in (t.partition(":") for t in tags)]


RETURN_PATHS = {
    "verp": "relay's return path, one per recipient: asynchronous bounces are matched",
    "kept": "the envelope sender given with the message: relay cannot track this message's "
            "asynchronous bounces",
    "none": "the null sender (a delivery report): nothing comes back",
}


def message_json(d: MessageDetail, *, full: bool = False) -> dict[str, Any]:
    m = d.message
    out: dict[str, Any] = {
        "id": m.id, "createdAt": iso(m.created_at), "status": m.status, "from": m.mail_from,
        "headerFrom": m.header_from, "subject": m.subject, "size": m.size, "source": m.source,
        "stream": m.stream.value, "tags": tag_objects(m.tags), "metadata": m.metadata,
        "returnPath": {"mode": m.return_path, "note": RETURN_PATHS[m.return_path]},
        "recipients": [{"email": r.address, "status": r.status.value, "attempts": r.attempts,
                        "nextAttemptAt": iso(r.next_attempt_at) if r.next_attempt_at else None,
                        "lastReply": r.last_reply} for r in d.recipients],
    }
    if full:
        emails = {r.id: r.address for r in d.recipients}
        out["attempts"] = [{"recipient": a.recipient_id, "email": emails.get(a.recipient_id),
                            "at": iso(a.started_at),
                            "mxHost": a.mx_host, "ip": a.ip, "port": a.port, "tls": a.tls_version,
                            "code": a.code, "enhanced": a.enhanced, "reply": a.text,
                            "outcome": a.outcome, "duration": round(a.duration, 3),
                            "dkim": a.signed, "sourceIp": a.source_ip,
                            "tlsPolicy": a.tls_policy, "tlsFailure": a.tls_failure}
                           for a in d.attempts]
        out["events"] = [{"type": e.type, "at": iso(e.created_at), "recipient": e.recipient_id,
                          "data": e.data} for e in d.events]
        # [retention] dropped the body: the history stays, the content is gone
        out["bodyPrunedAt"] = iso(d.body_pruned_at) if d.body_pruned_at is not None else None
    return out
