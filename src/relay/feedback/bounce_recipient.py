"""One recipient's outcome in a report: the reason and hard/soft class of its action, status,
reply code and the remote's words, corrected by which SMTP command the remote refused."""

from __future__ import annotations

import re

from .bounce_reasons import classify
from .bounce_report import BouncedRecipient

# what a retrying queue saw last, not why the message failed in the end
_TIMED_OUT = re.compile(r"timed? ?out", re.I)


def recipient(address: str, action: str, status: str | None, reply: int | None,
              diagnostic: str, remote: str | None, context: str = "",
              transcript: str = "") -> BouncedRecipient:
    if action in ("delivered", "relayed", "expanded"):
        reason, cls = "delivered", "soft"
    else:
        if action == "delayed" and status and status[0] == "5":
            status = "4" + status[1:]
        reason, cls = classify(status, reply, diagnostic)
        command = _smtp_command(context or diagnostic, address, diagnostic, transcript)
        if command == "DATA" and reason == "userunknown":
            # the server took RCPT TO and refused only the content: the mailbox exists
            reason, cls = "filtered", "soft"
        elif command == "MAIL" and reason in ("userunknown", "undefined", "filtered"):
            reason, cls = "rejected", "soft"  # it refused the sender, not the recipient
        if action == "delayed":
            cls = "soft"
        elif reason == "userunknown":
            cls = "hard"  # the remote said so, however transient its code, until giving up
        elif action == "failed" and (status or "").startswith("4") and (
                reason == "undefined" or status == "4.4.7" or _TIMED_OUT.search(diagnostic)):
            # failed with a temporary status: relay's peer retried until its queue ran out
            reason = "expired"
    return BouncedRecipient(address=address, action=action, status=status, reason=reason,
                            bounce_class=cls, diagnostic=diagnostic, remote_mta=remote,
                            reply_code=reply)


_COMMAND_SAID = re.compile(r"(?:in reply to|after|while sending|during) (end of data|DATA|RCPT"
                           r"|MAIL|initial connection|connect)\b", re.I)
_TRANSCRIPT_SENT = re.compile(r"^\s*>>> (\w+)", re.M)
_COMMAND_NAMES = {"end of data": "DATA", "data": "DATA", "rcpt": "RCPT", "mail": "MAIL",
                  "initial connection": "CONN", "connect": "CONN"}


def _smtp_command(context: str, address: str, diagnostic: str,
                 transcript: str = "") -> str | None:
    """The SMTP command the remote refused: what the report says it replied to, or in a
    session transcript, the last command sent before the reply about this recipient."""
    if m := _COMMAND_SAID.search(context):
        return _COMMAND_NAMES[m.group(1).lower()]
    if "ail" in context and "sent the message" in context:  # qmail: "failed after I sent..."
        return "DATA"
    transcript = transcript or context
    probe = (_reply_line(diagnostic) or address).lower()
    at = transcript.lower().find(probe) if probe else -1
    sent = [m.group(1).upper() for m in
            _TRANSCRIPT_SENT.finditer(transcript[:at if at > 0 else 0])]
    return sent[-1] if sent else None


def _reply_line(diagnostic: str) -> str:
    m = re.search(r"[245]\d\d[ -].{0,20}", diagnostic)
    return m.group(0) if m else ""
