"""The log line of each message the queue took, written after its commit (SMTP and every API
come through submit, so this is the one place), like Postfix's cleanup and qmgr lines:

    msg_0V7Q...: message-id=<abc@app.example>, from=<app@app.example>, size=1834, nrcpt=2,
    via=api, key=key_01H..., status=queued

plus a line for each recipient dropped at submit because it is suppressed (a terminal
outcome of its own). The same facts go out as `extra=` fields for the JSON format.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from .logs import cut
from .store.base import NewMessage
from .types import SubmitResult

log = logging.getLogger("relay.accept")
delivery_log = logging.getLogger("relay.delivery")  # a drop is a recipient's outcome

HEAD_SCAN = 65536  # octets of a raw message searched for its Message-ID header
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)",
                         re.IGNORECASE | re.MULTILINE)


def header_message_id(message: NewMessage, composed: str) -> str:
    """The Message-ID header of the stored message: the client's in raw mail, relay's own
    (`composed`) in a composition."""
    if message.body_kind != "raw":
        return composed
    head = message.body[:HEAD_SCAN]
    end = head.find(b"\r\n\r\n")
    found = _MESSAGE_ID.search(head if end < 0 else head[:end + 2])
    if found is None:
        return ""
    return re.sub(r"\s+", " ", found.group(1).decode("utf-8", "replace")).strip()


def accept_fields(message: NewMessage, result: SubmitResult, message_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "queue_id": result.message_id,
        "message_id": cut(message_id),
        "from": cut(message.mail_from),
        "size": message.size if message.size is not None else len(message.body),
        "nrcpt": len(message.recipients) - len(result.suppressed),
        "via": message.source,
        "status": result.status,
    }
    if message.api_key_id:
        out["key_id"] = message.api_key_id
    if message.stream.value != "transactional":
        out["stream"] = message.stream.value
    return out


def log_accepted(messages: Sequence[NewMessage], results: Sequence[SubmitResult],
                 composed_id: Callable[[str], str]) -> None:
    """A line per message newly queued (an idempotent replay queued nothing: no line), and
    one per recipient dropped as suppressed. `composed_id(id)` is relay's own Message-ID."""
    if not log.isEnabledFor(logging.INFO):
        return
    for message, result in zip(messages, results, strict=False):
        if result.duplicate:
            continue
        try:
            f = accept_fields(message, result, header_message_id(message, composed_id(message.id)))
        except Exception:  # a line must never fail an accepted message
            log.exception("could not make the log line of %s", result.message_id)
            continue
        key = f", key={f['key_id']}" if "key_id" in f else ""
        log.info("%s: message-id=%s, from=<%s>, size=%d, nrcpt=%d, via=%s%s, status=%s",
                 f["queue_id"], f["message_id"] or "-", f["from"], f["size"], f["nrcpt"],
                 f["via"], key, f["status"], extra=f)
        for address, reason in result.suppressed:
            drop = {"queue_id": result.message_id, "to": cut(address), "status": "suppressed",
                    "reply": cut(f"suppressed: {reason}"), "stage": "submit"}
            delivery_log.info("%s: to=<%s>, relay=none, status=suppressed (%s)",
                              result.message_id, drop["to"], drop["reply"], extra=drop)
