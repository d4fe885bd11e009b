"""Complaints that are not ARF: Outlook.com's Junk Mail Reporting Program, and Apple Mail's
unsubscribe message. Each names one recipient, read as an ARF report of that feedback type."""

from __future__ import annotations

from email.message import Message

from .bounce_report import BouncedRecipient, Original, Report
from .bounce_text import address_of


def microsoft_jmrp(original: Original) -> Report | None:
    """A complaint from Outlook.com's Junk Mail Reporting Program: the reported message
    enclosed whole, its recipient in its X-HmXmrOriginalRecipient field."""
    named = [v for k, v in original.headers if k.lower() == "x-hmxmroriginalrecipient"]
    return _complaint(address_of(named[0]) if len(named) == 1 else "", "abuse", original)


def apple_unsubscribe(msg: Message, original: Original) -> Report | None:
    """Apple Mail's unsubscribe ("X-Apple-Unsubscribe: true"), which it sends from the
    reader's own address to a List-Unsubscribe mailto: an opt-out of its sender, not an
    auto-reply, though marked auto-submitted."""
    if str(msg.get("X-Apple-Unsubscribe", "")).strip().lower() != "true":
        return None
    return _complaint(address_of(str(msg.get("From", ""))), "opt-out", original)


def _complaint(address: str, feedback_type: str, original: Original) -> Report | None:
    if "@" not in address:
        return None
    return Report(type="arf", feedback_type=feedback_type, original=original, recipients=(
        BouncedRecipient(address=address, action="", status=None, reason="feedback",
                         bounce_class="soft", diagnostic=feedback_type, remote_mta=None),))
