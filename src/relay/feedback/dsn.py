"""Composes RFC 3464 delivery status notifications (multipart/report) as CRLF bytes."""

from __future__ import annotations

import email.utils
import os
import quopri
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .. import rawmail

MAX_FULL_RETURN = 100 * 1024
_REPLY = re.compile(r"[245]\d\d\b")  # a diagnostic that is an SMTP reply
# RFC 3463 4.4.7, delivery time expired: the status of an expiry whose last reply had none
EXPIRED_STATUS = "4.4.7"


@dataclass(frozen=True, kw_only=True)
class ReportedRecipient:
    address: str
    action: str  # failed | delayed | delivered | relayed | expanded (RFC 3464 2.3.3)
    status: str  # enhanced status code, e.g. "5.1.1"
    orcpt: str | None = None  # "rfc822;bob@example.org" as given in ORCPT
    diagnostic: str | None = None  # the remote reply, e.g. "550 5.1.1 no such user"
    remote_mta: str | None = None
    last_attempt: float | None = None
    will_retry_until: float | None = None


def build_dsn(*, reporting_mta: str, original_sender: str, original: bytes,
              recipients: Sequence[ReportedRecipient], arrival: float,
              now: float | None = None, envid: str | None = None, ret: str | None = None,
              message_id_domain: str | None = None) -> bytes:
    now = time.time() if now is None else now
    actions = {r.action for r in recipients}
    subject = ("Undelivered Mail Returned to Sender" if "failed" in actions
               else "Delayed Mail (still being retried)" if "delayed" in actions
               else "Successful Mail Delivery Report")
    headers, _ = rawmail.split(original)
    original_id = rawmail.first_value(headers, "Message-ID")
    full = ret == "FULL" and len(original) <= MAX_FULL_RETURN
    utf8 = any(not r.address.isascii() for r in recipients)
    boundary = f"=_relay_report_{os.urandom(12).hex()}"
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{_clean(original_sender)}>",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate(now, localtime=True)}",
        f"Message-ID: <{os.urandom(10).hex()}.dsn@{message_id_domain or reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
    ]
    if original_id:
        head += [f"In-Reply-To: {_clean(original_id)}", f"References: {_clean(original_id)}"]
    parts = [
        ("Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable",
         _qp(_explanation(reporting_mta, recipients, subject, full or ret != "FULL"))),
        (f"Content-Type: message/{'global-' if utf8 else ''}delivery-status",
         _status_fields(reporting_mta, recipients, arrival, envid, utf8)),
        ("Content-Type: message/rfc822" if full else "Content-Type: text/rfc822-headers",
         original if full else b"".join(h.raw for h in headers)),
    ]
    out = "\r\n".join(head).encode() + b"\r\n\r\nThis is a MIME-encapsulated delivery report.\r\n"
    for part_head, body in parts:
        out += f"\r\n--{boundary}\r\n{part_head}\r\n\r\n".encode() + body
        if not body.endswith(b"\r\n"):
            out += b"\r\n"
    return out + f"\r\n--{boundary}--\r\n".encode()


def _explanation(mta: str, recipients: Sequence[ReportedRecipient], subject: str,
                 attached: bool) -> str:
    failed = [r for r in recipients if r.action == "failed"]
    delayed = [r for r in recipients if r.action == "delayed"]
    lines = [f"This is the mail system at host {mta}.", ""]
    if failed:
        lines += ["I'm sorry to have to inform you that your message could not",
                  "be delivered to one or more recipients. The reasons are below.", ""]
    elif delayed:
        lines += ["Your message could not be delivered yet to one or more recipients.",
                  "It will be tried again; you do not need to send it again.", ""]
    else:
        lines += [f"{subject}.", ""]
    for r in recipients:
        reason = _clean(r.diagnostic) if r.diagnostic else f"status {r.status}"
        host = f" (host {r.remote_mta})" if r.remote_mta else ""
        lines.append(f"<{r.address}>: {r.action}{host}: {reason}")
    if not attached:
        lines += ["", "The original message was too large to return; its headers are attached."]
    return "\n".join(lines) + "\n"


def _status_fields(mta: str, recipients: Sequence[ReportedRecipient], arrival: float,
                   envid: str | None, utf8: bool) -> bytes:
    blocks = [[f"Reporting-MTA: dns; {mta}"]
              + ([f"Original-Envelope-Id: {_clean(envid)}"] if envid else [])
              + [f"Arrival-Date: {email.utils.formatdate(arrival, localtime=True)}"]]
    kind = "utf-8" if utf8 else "rfc822"
    for r in recipients:
        block = []
        if r.orcpt:
            orcpt = r.orcpt if ";" in r.orcpt else f"rfc822;{r.orcpt}"
            block.append(f"Original-Recipient: {_clean(orcpt)}")
        block += [f"Final-Recipient: {kind}; {_clean(r.address)}", f"Action: {r.action}",
                  f"Status: {r.status}"]
        if r.remote_mta:
            block.append(f"Remote-MTA: dns; {_clean(r.remote_mta)}")
        if r.diagnostic:
            # an SMTP reply is typed smtp (RFC 3464 2.3.6); relay's own words (a host that
            # refused connections, a report's words without a code) are relay's
            kind_of = "smtp" if _REPLY.match(r.diagnostic) else "X-Relay"
            block.append(f"Diagnostic-Code: {kind_of}; {_clean(r.diagnostic)}"[:990])
        if r.last_attempt:
            block.append(f"Last-Attempt-Date: {email.utils.formatdate(r.last_attempt, True)}")
        if r.will_retry_until and r.action == "delayed":
            block.append(f"Will-Retry-Until: {email.utils.formatdate(r.will_retry_until, True)}")
        blocks.append(block)
    text = "\r\n\r\n".join("\r\n".join(b) for b in blocks) + "\r\n"
    return text.encode("utf-8")


def _clean(value: str) -> str:
    """One line: no CR, LF or other control characters can start a new field."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", value).strip()


def _qp(text: str) -> bytes:
    return quopri.encodestring(text.encode("utf-8")).replace(b"\r\n", b"\n").replace(
        b"\n", b"\r\n")
