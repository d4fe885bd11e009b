"""Amazon SES notifications delivered by email (an SNS topic with an email subscription): one
JSON object whose notificationType is Bounce, Complaint or Delivery, read into a report."""

from __future__ import annotations

import json
import re
from email.message import Message
from typing import Any

from .bounce_recipient import recipient
from .bounce_report import BouncedRecipient, Original, Report
from .bounce_text import address_of, after_type, reply_code_in, status_in

# the longest notification read: SES truncates the headers it quotes well below this
_MAX_JSON = 256 * 1024
# SNS folds long lines of its email body with "!" and a newline
_FOLD = re.compile(r"!\r?\n ")


def ses_notification(msg: Message, text: str, original: Original, limit: int) -> Report | None:
    """The report an SES notification makes, or None if the text is not one."""
    start = text.find('{"notificationType"')
    if start < 0 or not address_of(str(msg.get("From", ""))).lower().endswith(".amazonaws.com"):
        return None
    try:
        found, _ = json.JSONDecoder(strict=False).raw_decode(
            _FOLD.sub("", text[start:start + _MAX_JSON]))
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python reads
        return None
    if not isinstance(found, dict):
        return None
    kind = str(found.get("notificationType", "")).lower()
    if kind == "complaint":
        complaint = _dict(found.get("complaint"))
        rcpts = [address_of(str(_dict(r).get("emailAddress", "")))
                 for r in _list(complaint.get("complainedRecipients"))][:limit] or [""]
        feedback = str(complaint.get("complaintFeedbackType") or "abuse").lower()
        return Report(type="arf", feedback_type=feedback, original=original, recipients=tuple(
            BouncedRecipient(address=r, action="", status=None, reason="feedback",
                             bounce_class="soft", diagnostic=feedback, remote_mta=None)
            for r in dict.fromkeys(rcpts)))
    if kind == "bounce":
        bounce = _dict(found.get("bounce"))
        remote = after_type(str(bounce.get("reportingMTA", ""))) or None
        return Report(type="dsn", original=original, recipients=tuple(
            _bounced(_dict(r), remote) for r in _list(bounce.get("bouncedRecipients"))[:limit]))
    if kind == "delivery":
        delivery = _dict(found.get("delivery"))
        said = str(delivery.get("smtpResponse", ""))
        return Report(type="dsn", original=original, recipients=tuple(
            recipient(address_of(str(r)), "delivered", status_in(said) or "2.0.0",
                      reply_code_in(said), said, str(delivery.get("remoteMtaIp") or "") or None)
            for r in _list(delivery.get("recipients"))[:limit]))
    return None


def _bounced(entry: dict[str, Any], remote: str | None) -> BouncedRecipient:
    diagnostic = after_type(str(entry.get("diagnosticCode", "")))
    status = status_in(str(entry.get("status", ""))) or status_in(diagnostic)
    action = str(entry.get("action") or "failed").lower()
    return recipient(address_of(str(entry.get("emailAddress", ""))), action, status,
                     reply_code_in(diagnostic), diagnostic, remote)


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []
