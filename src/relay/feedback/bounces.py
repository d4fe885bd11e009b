"""Read a bounce, complaint or auto-reply: who it is about, what happened, and why.

Pure parsing, no I/O: RFC 3464 delivery-status reports, RFC 5965 (ARF) complaints,
RFC 3834 auto-replies, and the older non-standard bounce formats, whose recipients
flufl.bounce's detectors find; relay reads the status code and the remote's sentence
near each recipient itself.  `classify` turns a status, a reply code and the text into
a reason and a hard/soft class: hard only when the address itself is bad for good.
"""

from __future__ import annotations

import bisect
import email
import itertools
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import Message

from flufl.bounce import all_failures

from . import bounded_mime
from .bounce_reasons import ADDRESS_RE, REASONS, classify, phrase_reason

__all__ = ["REASONS", "BouncedRecipient", "Original", "Report", "classify", "parse"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BouncedRecipient:
    address: str
    action: str
    status: str | None
    reason: str
    bounce_class: str
    diagnostic: str
    remote_mta: str | None
    reply_code: int | None = None


@dataclass(frozen=True, kw_only=True)
class Original:
    return_path: str | None = None
    message_id: str | None = None
    feedback_id: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, kw_only=True)
class Report:
    type: str
    feedback_type: str | None = None
    recipients: tuple[BouncedRecipient, ...] = ()
    original: Original = field(default_factory=Original)

    @property
    def is_bounce(self) -> bool:
        return self.type == "dsn" and any(r.action == "failed" for r in self.recipients)


# -- parsing ------------------------------------------------------------------------

_STATUS_IN_TEXT = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?![\d.])")
_REPLY_IN_TEXT = re.compile(r"(?<![\d.\-])([245][0-5]\d)(?:[ \-]|$)", re.M)


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


def _walk(msg: Message) -> list[Message]:
    """The MIME parts, without the field blocks the email package makes of a
    delivery-status part (they are fields, not text for a person)."""
    parts = [msg]
    if msg.get_content_type() not in _STATUS_TYPES and msg.is_multipart():
        for sub in msg.get_payload():
            if isinstance(sub, Message):
                parts += _walk(sub)
    return parts


def _parse(msg: Message, max_recipients: int) -> Report:
    parts = _walk(msg)
    types = {p.get_content_type() for p in parts}
    original = _original(parts)
    if "message/feedback-report" in types or (
            msg.get_content_type() == "multipart/report"
            and (msg.get_param("report-type") or "").lower() == "feedback-report"):
        return _arf(parts, original, max_recipients)
    if "message/delivery-status" in types or "message/global-delivery-status" in types:
        recipients = _dsn_recipients(parts, max_recipients)
        if recipients:
            return Report(type="dsn", recipients=recipients, original=original)
    if _is_autoreply(msg):
        return Report(type="autoreply", original=original, recipients=(
            BouncedRecipient(address=_from_address(msg), action="", status=None,
                             reason="vacation", bounce_class="soft",
                             diagnostic=str(msg.get("Subject", "")), remote_mta=None),))
    if not original.headers:
        original = _quoted_original(_all_text(msg))
    recipients = _heuristic_recipients(msg, max_recipients) or \
        _inline_dsn_recipients(msg, max_recipients)
    if not recipients and _looks_like_bounce(msg):
        recipients = _enclosed_recipient(msg, original)
    if recipients:
        return Report(type="dsn", recipients=recipients, original=original)
    return Report(type="unknown", original=original)


def _text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")


def _all_text(msg: Message) -> str:
    """The readable text of a message, including parts whose MIME structure broke."""
    texts = []
    for part in _walk(msg):
        if part.get_content_maintype() == "text":
            texts.append(_text(part))
        elif part.is_multipart() is False and isinstance(part.get_payload(), str) and \
                part.get_content_maintype() == "multipart":
            texts.append(str(part.get_payload()))
    return "\n".join(texts)


def _fields(part: Message, limit: int) -> list[Message]:
    """The first `limit` field blocks of a delivery-status part (the first is per-message)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, Message)][:limit]
    text = payload if isinstance(payload, str) else ""
    blocks = (b for b in re.split(r"\n\s*\n", text.replace("\r\n", "\n")) if b.strip())
    return [email.message_from_string(b.strip() + "\n") for b in itertools.islice(blocks, limit)]


def _address_of(value: str | None) -> str:
    if not value:
        return ""
    value = re.sub(r"\s+", " ", str(value)).strip()
    if ";" in value:
        value = value.split(";", 1)[1]
    value = re.sub(r"<?@[^:<>@\s]+:", "", value.strip())  # an RFC 821 source route
    value = value.strip().strip("<>").strip()
    m = ADDRESS_RE.search(value)
    return _lower_domain(m.group(0) if m else value)


def _lower_domain(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}" if at else address


def _after_type(value: str | None) -> str:
    text = re.sub(r"\s+", " ", str(value or "")).strip()
    return text.split(";", 1)[1].strip() if ";" in text else text


def _dsn_recipients(parts: list[Message], limit: int) -> tuple[BouncedRecipient, ...]:
    found: list[BouncedRecipient] = []
    human = " ".join(_text(p) for p in parts if p.get_content_type() == "text/plain")[:20000]
    prose = _Prose(human)
    for part in parts:
        if part.get_content_type() not in _STATUS_TYPES:
            continue
        blocks = (group for block in _fields(part, limit + 1)
                  for group in _split_recipients(block))
        for block in blocks:
            if len(found) >= limit:
                return tuple(found)
            if not (block["Final-Recipient"] or block["Original-Recipient"]):
                continue
            address = _address_of(block["Final-Recipient"])
            if not address.partition("@")[0]:
                address = _address_of(block["Original-Recipient"]) or address
            action = str(block.get("Action", "failed")).strip().lower().split()[0] \
                if block.get("Action") else "failed"
            diagnostic = _after_type(block["Diagnostic-Code"])
            status = _status(str(block.get("Status", "")))
            text_status = _status(diagnostic)
            if text_status and text_status[0] == (status or text_status)[0]:
                status = text_status
            near = prose.near(address)
            diagnostic = diagnostic or near
            reply = _reply_code(diagnostic)
            remote = _after_type(block["Remote-MTA"]) or None
            found.append(_recipient(address, action, status, reply, diagnostic, remote,
                                    context=f"{near} {diagnostic}", transcript=human))
    return tuple(found)


_STATUS_TYPES = ("message/delivery-status", "message/global-delivery-status")
_RECIPIENT_FIELDS = ("final-recipient", "original-recipient")


def _split_recipients(block: Message) -> Iterator[Message]:
    """One block per recipient, for reports that leave out the blank lines between them
    (one at a time: the caller stops at its limit)."""
    current = Message()
    for name, value in block.items():
        if name.lower() in _RECIPIENT_FIELDS and name.lower() in (
                k.lower() for k in current.keys()):
            yield current
            current = Message()
        current[name] = value
    yield current


def _recipient(address: str, action: str, status: str | None, reply: int | None,
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


# what a retrying queue saw last, not why the message failed in the end
_TIMED_OUT = re.compile(r"timed? ?out", re.I)


def _status(text: str) -> str | None:
    m = _STATUS_IN_TEXT.search(text or "")
    return m.group(1) if m else None


def _reply_code(text: str) -> int | None:
    m = _REPLY_IN_TEXT.search(text or "")
    return int(m.group(1)) if m else None


# -- ARF (RFC 5965) ----------------------------------------------------------------


def _arf(parts: list[Message], original: Original, limit: int) -> Report:
    report = next((p for p in parts if p.get_content_type() == "message/feedback-report"), None)
    fields = _fields(report, 1)[0] if report is not None and _fields(report, 1) else Message()
    if report is not None and not fields.keys():
        text = _text(report) or str(report.get_payload())
        fields = email.message_from_string(text.strip() + "\n")
    feedback_type = str(fields.get("Feedback-Type", "")).strip().lower() or "abuse"
    rcpts = [_address_of(v) for v in (fields.get_all("Original-Rcpt-To") or
                                      fields.get_all("Removal-Recipient") or [])[:limit]]
    if not any(rcpts):
        to = dict((k.lower(), v) for k, v in original.headers).get("to", "")
        rcpts = [_address_of(to)]
    # "Undisclosed Recipients" and the like: the report hides who it is about
    rcpts = [r if "@" in r else "" for r in rcpts] or [""]
    mta = _after_type(fields["Reporting-MTA"]) or None
    return Report(type="arf", feedback_type=feedback_type, original=original, recipients=tuple(
        BouncedRecipient(address=rcpt, action="", status=None, reason="feedback",
                         bounce_class="soft", diagnostic=feedback_type, remote_mta=mta)
        for rcpt in dict.fromkeys(rcpts)))


# -- auto-replies (RFC 3834) --------------------------------------------------------

_AUTOREPLY_SUBJECT = re.compile(
    r"out of (the )?office|auto(matic|matisch)?[ -]?(reply|response|antwort|respon)"
    r"|^auto:|vacation|away (from|until)|abwesen|absence|abwesenheit|r[ée]ponse automatique"
    r"|i am away|on leave|on holiday", re.I)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|delivery (status|failure|notification|has failed)|returned mail|failure notice"
    r"|mail delivery|not (be )?delivered|delivery failed|rejected|bounce", re.I)


def _is_autoreply(msg: Message) -> bool:
    subject = str(msg.get("Subject", ""))
    if _BOUNCE_SUBJECT.search(subject):
        return False
    sender = str(msg.get("From", "")).lower()
    if "mailer-daemon" in sender or "postmaster" in sender:
        return False
    if str(msg.get("Auto-Submitted", "")).strip().lower().startswith("auto-replied"):
        return True
    if msg.get("X-Autoreply") or msg.get("X-Autorespond") or msg.get("X-Autoresponder"):
        return True
    if str(msg.get("Precedence", "")).strip().lower() == "auto_reply":
        return True
    return bool(_AUTOREPLY_SUBJECT.search(subject))


def _from_address(msg: Message) -> str:
    return _address_of(str(msg.get("From", "")))


# -- non-standard bounces -----------------------------------------------------------


def _heuristic_recipients(msg: Message, limit: int) -> tuple[BouncedRecipient, ...]:
    temporary, permanent = all_failures(msg)
    text = _all_text(msg)[:50000]
    named = [(m.group(0), action) for addresses, action in
             ((permanent, "failed"), (temporary, "delayed")) for raw in sorted(addresses)
             if (m := ADDRESS_RE.search(raw.decode("ascii", "replace")))]
    if not named and _looks_like_bounce(msg):
        named = [(a, "failed") for a in _addresses_in_error(msg, text)] or [
            (a, "failed") for a in _original_to(text)]
    named = named[:limit]
    prose = _Prose(text, others=[a for a, _ in named])
    error_text: str | None = None
    found: list[BouncedRecipient] = []
    for raw_address, action in named:
        address = _lower_domain(raw_address)
        diagnostic = prose.near(address)
        if not _says_why(diagnostic):
            # the reason is often stated once, above the list of recipients
            if error_text is None:
                error_text = _error_text(text)
            diagnostic = error_text or diagnostic
        found.append(_recipient(address, action, _status(diagnostic), _reply_code(diagnostic),
                                diagnostic, _remote_near(diagnostic), transcript=text))
    return tuple(found)


def _enclosed_recipient(msg: Message, original: Original) -> tuple[BouncedRecipient, ...]:
    """A bounce that names nobody: the one recipient of the message it returns, if one."""
    to = [v for k, v in original.headers if k.lower() == "to"]
    addresses = [m.group(0) for m in ADDRESS_RE.finditer(to[0])] if to else []
    if len(addresses) != 1:
        return ()
    diagnostic = _error_text(_all_text(msg))
    return (_recipient(_lower_domain(addresses[0]), "failed", _status(diagnostic),
                       _reply_code(diagnostic), diagnostic, None),)


def _says_why(text: str) -> bool:
    return bool(_STATUS_IN_TEXT.search(text) or _REPLY_IN_TEXT.search(text)
                or phrase_reason(ADDRESS_RE.sub(" ", text)))


def _error_text(text: str) -> str:
    cut = _COPY_MARKER.search(text)
    return re.sub(r"\s+", " ", text[:cut.start()] if cut else text).strip()[:1000]


def _original_to(text: str) -> list[str]:
    """The recipients of the quoted original, for a bounce that names no address itself."""
    cut = _COPY_MARKER.search(text)
    if not cut:
        return []
    m = re.search(r"^To:\s*(.+)$", text[cut.end():], re.M | re.I)
    return [a.group(0) for a in ADDRESS_RE.finditer(m.group(1))][:1] if m else []


_INLINE_FIELDS = re.compile(r"^(Final|Original)-Recipient:.*(?:\n(?!\s*\n).*)*", re.I | re.M)


def _inline_dsn_recipients(msg: Message, limit: int) -> tuple[BouncedRecipient, ...]:
    """Delivery-status fields quoted in the text of a report whose MIME structure broke."""
    text = _all_text(msg)
    fake = Message()
    fake.set_type("message/delivery-status")
    fake.set_payload("\n\n".join(m.group(0) for m in _INLINE_FIELDS.finditer(text)))
    return _dsn_recipients([msg, fake], limit) if fake.get_payload() else ()


def _looks_like_bounce(msg: Message) -> bool:
    sender = str(msg.get("From", "")).lower()
    return bool("mailer-daemon" in sender or "postmaster" in sender
                or _BOUNCE_SUBJECT.search(str(msg.get("Subject", "")))
                or str(msg.get("Return-Path", "x")).strip() == "<>")


_NOT_RECIPIENT = re.compile(r"^(mailer-daemon|postmaster|root|abuse|noreply|no-reply)@", re.I)


def _addresses_in_error(msg: Message, text: str) -> list[str]:
    """Where no detector knows the format: the addresses the error text names, other than
    the bounce's own sender and receiver."""
    cut = _COPY_MARKER.search(text)
    body = text[:cut.start()] if cut else text
    own = {_address_of(str(msg.get(h, ""))).lower() for h in ("From", "To", "Reply-To")}
    found: list[str] = []
    for m in ADDRESS_RE.finditer(body):
        address = _lower_domain(m.group(0).strip("."))
        if address.lower() in own or _NOT_RECIPIENT.match(address) or address in found:
            continue
        found.append(address)
    return found[:1] if len(found) > 1 and not _many_listed(body, found) else found


def _many_listed(body: str, found: list[str]) -> bool:
    """Several failed recipients are listed one a line; a single one is mentioned in prose."""
    lines = [line for line in body.splitlines() if any(a in line for a in found)]
    return len(lines) >= len(found) and all(len(line.strip()) < 120 for line in lines)


# the line after which a bounce quotes the original message (not "The original message
# was received at ...", which opens Sendmail's report)
_COPY_MARKER = re.compile(
    r"^.*(original message (follows|below|headers|is (attached|included))|message headers follow"
    r"|copy of the (original )?message|returned message|unsent message below|below this line"
    r"|headers of the original|original message ?-{2,}|-{3,} ?original message"
    r"|^content-type: message/rfc822|^\s*original message:?\s*$).*$", re.I | re.M)


class _Prose:
    """A report's text for people, cut before its copy of the original and read once, so
    that finding the words about each of many recipients does not read it again for each
    (nor, for each, look for every other recipient)."""

    def __init__(self, text: str, others: list[str] | None = None) -> None:
        cut = _COPY_MARKER.search(text)
        self.body = text[:cut.start()] if cut else text
        self._lower = self.body.lower()
        wanted = {o.lower() for o in others or ()}
        # where the failed recipients are named, in order
        self._named = [(m.start(), m.group(0)) for m in ADDRESS_RE.finditer(self._lower)
                       if m.group(0) in wanted] if wanted else []
        self._starts = [pos for pos, _ in self._named]
        self._summary: str | None = None

    def near(self, address: str) -> str:
        """The remote's words about an address: from the line naming it to the next one that
        names another failed recipient, the copy of the original, or a status code's
        paragraph."""
        body = self.body
        at = self._lower.find(address.lower()) if address else -1
        if at < 0:
            if self._summary is None:
                lines = [line.strip() for line in body.splitlines() if line.strip()]
                self._summary = " ".join(lines)[:1000]
            return self._summary
        start = body.rfind("\n", 0, at) + 1
        prefix = body[start:at]
        if prefix.strip() and not (_STATUS_IN_TEXT.search(body, at, at + 300)
                                   or re.match(r"\s*([245]\d\d\b|>>>|<<<)", prefix)):
            start = max(body.rfind("\n\n", 0, at), 0)  # the address is mid-sentence
        end = at + len(address)
        stop = self._next_other(address.lower(), end)
        if stop is not None:
            body = body[:body.rfind("\n", 0, stop) + 1 or stop]
        chunk = body[start:]
        for _ in range(3):  # the paragraph naming it, and the next ones until a code shows up
            nxt = body.find("\n\n", end + 2)
            end = nxt if nxt > 0 else len(body)
            chunk = body[start:end]
            if _STATUS_IN_TEXT.search(chunk) or _REPLY_IN_TEXT.search(chunk) or \
                    end == len(body):
                break
        return re.sub(r"\s+", " ", chunk).strip()[:1000]

    def _next_other(self, address: str, end: int) -> int | None:
        """Where the first other failed recipient is named at or after `end`."""
        i = bisect.bisect_left(self._starts, end)
        for pos, named in itertools.islice(self._named, i, None):
            if named != address and pos > 0:
                return pos
        return None


_HOST_RE = re.compile(r"\b(?:host|server|mx)\s+\[?([a-z0-9][a-z0-9.\-]+\.[a-z]{2,})", re.I)


def _remote_near(text: str) -> str | None:
    m = _HOST_RE.search(text)
    return m.group(1).lower() if m else None


# -- the original message -----------------------------------------------------------


def _quoted_original(text: str) -> Original:
    """The headers a non-MIME bounce quotes after its "copy of the message" line."""
    cut = _COPY_MARKER.search(text)
    if not cut:
        return Original()
    quoted = text[cut.end():].lstrip("\r\n").replace("\r\n", "\n")
    return _original_of(email.message_from_string(quoted.split("\n\n", 1)[0] + "\n"))


def _original_of(enclosed: Message) -> Original:
    headers = tuple((k, re.sub(r"\s+", " ", str(v)).strip()) for k, v in enclosed.items())
    get = {k.lower(): v for k, v in reversed(headers)}
    return Original(return_path=_address_of(get.get("return-path")) or None,
                    message_id=get.get("message-id"), feedback_id=get.get("feedback-id"),
                    headers=headers)


def _original(parts: list[Message]) -> Original:
    for part in parts:
        ctype = part.get_content_type()
        enclosed: Message | None = None
        if ctype in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                enclosed = payload[0]
        elif ctype in ("text/rfc822-headers", "message/global-headers"):
            enclosed = email.message_from_string(_text(part) or str(part.get_payload()))
        if enclosed is not None and enclosed.keys():
            return _original_of(enclosed)
    return Original()
