"""Read a bounce, complaint or auto-reply: who it is about, what happened, and why.

Pure parsing, no I/O: RFC 3464 delivery-status reports, RFC 5965 (ARF) complaints,
RFC 8098 disposition notifications, RFC 3834 auto-replies, and the older non-standard
bounce formats, whose recipients flufl.bounce's detectors find; relay reads the status
code and the remote's sentence near each recipient itself.  `classify` turns a status, a
reply code and the text into a reason and a hard/soft class: hard only when the address
itself is bad for good.

This module decides which kind of message it is and hands it on: bounce_standard reads
the standard reports, bounce_complaints the complaints that are not ARF (Outlook.com's JMRP,
Apple Mail's unsubscribe), bounce_ses Amazon SES notifications sent by email,
bounce_heuristics the rest, bounce_text the words in any.
"""

from __future__ import annotations

import logging
from email.message import Message

from . import bounded_mime
from .bounce_complaints import apple_unsubscribe, microsoft_jmrp
from .bounce_heuristics import (
    autoreply,
    heuristic_recipients,
    inline_dsn_recipients,
    is_autoreply,
    looks_like_bounce,
    quoted_original,
    unnamed_recipient,
)
from .bounce_reasons import REASONS, classify
from .bounce_report import DELIVERED_ACTIONS, BouncedRecipient, Original, Report
from .bounce_ses import ses_notification
from .bounce_standard import arf, dsn_recipients, enclosed_original, mdn
from .bounce_text import all_text, walk

__all__ = ["REASONS", "BouncedRecipient", "Original", "Report", "classify", "parse"]

log = logging.getLogger(__name__)


def parse(raw: bytes, *, max_parts: int, max_recipients: int) -> Report:
    """What a message reports; never raises: a message not understood is type "unknown".

    At most `max_parts` MIME parts and `max_recipients` recipients are read; the rest of a
    report is ignored, so that its size cannot make reading it slow."""
    try:
        # each delivery-status part has one per-message field block before its recipients'
        msg, _ = bounded_mime.parse(raw, max_parts=max_parts,
                                    max_blocks=max_recipients + max_parts)
        return _parse(msg, max_recipients)
    except Exception:  # garbage in must never become a traceback in the inbound path
        log.debug("bounce not understood", exc_info=True)
        return Report(type="unknown")


def _parse(msg: Message, max_recipients: int) -> Report:
    parts = walk(msg)
    types = {p.get_content_type() for p in parts}
    original = enclosed_original(parts)
    if "message/feedback-report" in types or (
            msg.get_content_type() == "multipart/report"
            and (msg.get_param("report-type") or "").lower() == "feedback-report"):
        return arf(parts, original, max_recipients)
    if "message/delivery-status" in types or "message/global-delivery-status" in types:
        recipients = dsn_recipients(parts, max_recipients)
        # maildrop's mailbot -M answers in a report's shape that says "delivered": an
        # auto-reply (RFC 3834) all the same
        if recipients and not (is_autoreply(msg)
                               and all(r.action in DELIVERED_ACTIONS for r in recipients)):
            return Report(type="dsn", recipients=recipients, original=original)
    if "message/disposition-notification" in types:
        return mdn(parts, original)
    if jmrp := microsoft_jmrp(original):
        return jmrp
    if ses := ses_notification(msg, all_text(msg), original, max_recipients):
        return ses
    if opt_out := apple_unsubscribe(msg, original):  # auto-submitted, but not an auto-reply
        return opt_out
    if is_autoreply(msg):
        return Report(type="autoreply", original=original, recipients=(autoreply(msg),))
    if not original.headers:
        original = quoted_original(all_text(msg))
    # delivery-status fields in the text (a report whose MIME structure broke) say more than
    # the addresses a detector or the error text names
    recipients = inline_dsn_recipients(msg, max_recipients) or \
        heuristic_recipients(msg, max_recipients)
    if not recipients and looks_like_bounce(msg):
        recipients = unnamed_recipient(msg, original)
    if recipients:
        return Report(type="dsn", recipients=recipients, original=original)
    return Report(type="unknown", original=original)
