"""Reports in a standard format: the recipients of RFC 3464 delivery-status fields, the
complaint of an RFC 5965 (ARF) feedback report, what an RFC 8098 disposition notification
says became of a message, and the original message a report encloses."""

from __future__ import annotations

import email
import itertools
import re
from collections.abc import Iterator
from email.message import Message

from .bounce_phrases import phrase_reason
from .bounce_reasons import ADDRESS_RE
from .bounce_recipient import recipient
from .bounce_report import BouncedRecipient, Original, Report
from .bounce_text import (
    STATUS_TYPES,
    Prose,
    address_of,
    after_type,
    lower_domain,
    part_text,
    reply_code_in,
    report_words,
    status_in,
)

_EXIT_STATUS = re.compile(r"\d{1,3}")
_STATUS_COMMENT = re.compile(r"\(([^()]{3,200})\)")
_X_UNIX = re.compile(r"\s*x-unix\s*;", re.IGNORECASE)
_RECIPIENT_FIELDS = ("final-recipient", "original-recipient")
# words of a local mailer's failure that name no cause of their own
_SAYS_NOTHING_OF_ITS_OWN = frozenset({None, "systemerror"})


def _field_blocks(part: Message, limit: int) -> list[Message]:
    """The first `limit` field blocks of a delivery-status part (the first is per-message)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, Message)][:limit]
    text = payload if isinstance(payload, str) else ""
    blocks = (b for b in re.split(r"\n\s*\n", text.replace("\r\n", "\n")) if b.strip())
    return [email.message_from_string(b.strip() + "\n") for b in itertools.islice(blocks, limit)]


def dsn_recipients(parts: list[Message], limit: int) -> tuple[BouncedRecipient, ...]:
    found: list[BouncedRecipient] = []
    human = report_words(parts)[:20000]
    # each recipient's field block, at most `limit` of them
    blocks = list(itertools.islice(
        (group for part in parts if part.get_content_type() in STATUS_TYPES
         for block in _field_blocks(part, limit + 1) for group in _split_recipients(block)
         if group["Final-Recipient"] or group["Original-Recipient"]), limit))
    # the words about one recipient end where the text names the next
    prose = Prose(human, [address_of(b["Final-Recipient"] or b["Original-Recipient"])
                          for b in blocks])
    reporters = _reporters(parts, limit)
    for block in blocks:
        address = address_of(block["Final-Recipient"])
        if not _mailbox(address):
            # no mailbox named: a source route, a local file or pipe, a host-internal name
            address = _mailbox(address_of(block["Original-Recipient"])) or \
                _only_failed(parts[0]) or _only_recipient(enclosed_original(parts)) \
                or address
        action = _action(block.get("Action"))
        field = _diagnostic_field(block)
        diagnostic = after_type(field)
        if _X_UNIX.match(str(field)) and (
                _EXIT_STATUS.fullmatch(diagnostic)
                or phrase_reason(diagnostic) in _SAYS_NOTHING_OF_ITS_OWN):
            # a local program's exit status ("X-Unix; 71") or words that name no cause
            # ("X-Unix; temporary failure"): the type says who failed, the local mailer
            diagnostic = re.sub(r"\s+", " ", str(field)).strip()
        near = prose.near(address)
        # no words of the remote's or in the prose: the Status field's own comment
        # ("Status: 4.0.0 (example.net: host name lookup failure)")
        diagnostic = diagnostic or near or _comment(str(block.get("Status", "")))
        if near and near not in diagnostic and phrase_reason(diagnostic) is None and \
                phrase_reason(near) is not None:
            # a Diagnostic-Code that names no cause (an X.400 gateway's "-1 (Unknown)"):
            # the report's own words about the recipient do
            diagnostic = f"{diagnostic} {near}"
        status = _preferred(status_in(str(block.get("Status", ""))), status_in(diagnostic))
        reply = reply_code_in(diagnostic)
        remote = after_type(block["Remote-MTA"]) or None
        # no remote named nor its reply quoted (a smtp Diagnostic-Code: a filtering gateway
        # of the domain quoting a server behind it), and the reporter is a host of the
        # recipient's own domain: the words are the mailbox host's own (its local delivery,
        # its own routing)
        remote_reply = _remote_reply(field)
        own = remote is None and remote_reply is not True and \
            _of_site(address.rpartition("@")[2], reporters)
        found.append(recipient(_forwarded_to(human, address), action, status, reply,
                               diagnostic, remote,
                               context=f"{near} {diagnostic}", transcript=human,
                               remote_reply=remote_reply, own_host=own))
    return tuple(found)


# RFC 3464's action values, and the words reporters write in their place: "Action: failure"
# and "Action: error" (a failure, which Sisimai reads so too), "delay" and "warning"
_ACTIONS = {"failure": "failed", "fail": "failed", "error": "failed", "delay": "delayed",
            "warning": "delayed"}


def _action(field: object) -> str:
    """A recipient's Action field, one of RFC 3464's values where the word means one; no
    field at all is a failure (what a report without one is sent for)."""
    words = str(field or "").lower().split()  # "failed (bad destination mailbox address)"
    if not words:
        return "failed"
    word = words[0].strip(";:,.")
    return _ACTIONS.get(word, word)


def _reporters(parts: list[Message], limit: int) -> tuple[str, ...]:
    """The reporting host's names: its Reporting-MTA and the domain of the report's From."""
    names = [lower_domain(address_of(parts[0]["From"])).rpartition("@")[2]]
    for part in parts:
        if part.get_content_type() in STATUS_TYPES:
            first = _field_blocks(part, 1)
            if first:
                names.append(after_type(first[0]["Reporting-MTA"]).lower().rstrip("."))
            break
    return tuple(n for n in names if "." in n)


def _of_site(domain: str, names: tuple[str, ...]) -> bool:
    """Whether one of the reporter's names is the domain, a host in it or its parent."""
    domain = domain.lower()
    return bool(domain) and any(n == domain or n.endswith("." + domain)
                                or domain.endswith("." + n) for n in names)


_TYPE = re.compile(r"\s*([\w-]{1,40})\s*;")


def _remote_reply(field: str) -> bool | None:
    """Whether a Diagnostic-Code is a remote's reply: of type smtp, or of none (Sisimai reads
    an untyped one so too); X-Unix, X-Postfix and the like are the reporter's own words.
    None without one: the words are then the report's prose (bounce_recipient.recipient)."""
    if not field.strip():
        return None
    m = _TYPE.match(field)
    return m is None or m.group(1).lower() == "smtp"


def _forwarded_to(human: str, address: str) -> str:
    """The address that failed when the one relay sent to forwards to it: Exim names it in
    its words, "kim@example.net (ultimately generated from ann@example.org)", and gives its
    DSN the address it was sent to."""
    if not address or "generated from" not in human:
        return address
    m = re.search(r"\((?:ultimately )?generated from <?" + re.escape(address) + r">?\)",
                  human, re.IGNORECASE)
    before = human[max(0, m.start() - 300):m.start()].split() if m else []
    named = ADDRESS_RE.fullmatch(before[-1].strip("<>")) if before else None
    return lower_domain(named.group(0)) if named else address


def _diagnostic_field(block: Message) -> str:
    """The remote's reply for one recipient: its Diagnostic-Code field or, where a report has
    none, Microsoft's X-Supplementary-Info ("< #5.5.0 smtp;550 Requested action not taken:
    mailbox unavailable>"), the same reply under another name."""
    if block["Diagnostic-Code"]:
        return str(block["Diagnostic-Code"])
    return str(block.get("X-Supplementary-Info") or "").strip().strip("<>").strip()


def _comment(status: str) -> str:
    """The words of a Status field's parenthesised comment, if it has one."""
    m = _STATUS_COMMENT.search(status)
    return m.group(1).strip() if m else ""


def _preferred(field: str | None, said: str | None) -> str | None:
    """Of the Status field and the code in the remote's words, the one to read: the remote's
    own, unless it is of another class or says less (X.0.0) than the field."""
    if not said or (field and (said[0] != field[0]
                               or said.endswith(".0.0") and not field.endswith(".0.0"))):
        return field
    return said


def _mailbox(address: str) -> str:
    """The address if it names a mailbox on the Internet: a local part at a dotted domain
    (not a file, a pipe, a source route's remnant or a host-internal "user@server")."""
    local, at, domain = address.partition("@")
    return address if local and at and "." in domain else ""


def _only_failed(top: Message) -> str:
    """The one address of the report's X-Failed-Recipients header (Exim), if it names one."""
    found = [m.group(0) for v in top.get_all("X-Failed-Recipients", [])
             for m in ADDRESS_RE.finditer(str(v))]
    return lower_domain(found[0]) if len(found) == 1 else ""


def _only_recipient(original: Original) -> str:
    """The returned message's one To address, for a report whose Final-Recipient names no
    mailbox (an RFC 821 source route such as "@mx.example.org")."""
    to = [v for k, v in original.headers if k.lower() == "to"]
    found = [m.group(0) for m in ADDRESS_RE.finditer(to[0])] if len(to) == 1 else []
    return lower_domain(found[0]) if len(found) == 1 else ""


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


def arf(parts: list[Message], original: Original, limit: int) -> Report:
    report = next((p for p in parts if p.get_content_type() == "message/feedback-report"), None)
    fields = _field_blocks(report, 1)[0] if report is not None and _field_blocks(report, 1) \
        else Message()
    if report is not None and not fields.keys():
        text = part_text(report) or str(report.get_payload())
        fields = email.message_from_string(text.strip() + "\n")
    if report is None:  # its MIME structure broke: the report's fields inline in the text
        fields = _inline_fields(parts) or fields
    feedback_type = str(fields.get("Feedback-Type", "")).strip().lower() or "abuse"
    rcpts = [address_of(v) for v in (fields.get_all("Original-Rcpt-To") or
                                     fields.get_all("Removal-Recipient") or [])[:limit]]
    if not any(rcpts):
        to = dict((k.lower(), v) for k, v in original.headers).get("to", "")
        rcpts = [address_of(to)]
    # "Undisclosed Recipients" and the like: the report hides who it is about
    rcpts = [r if "@" in r else "" for r in rcpts] or [""]
    mta = after_type(fields["Reporting-MTA"]) or None
    return Report(type="arf", feedback_type=feedback_type, original=original, recipients=tuple(
        BouncedRecipient(address=rcpt, action="", status=None, reason="feedback",
                         bounce_class="soft", diagnostic=feedback_type, remote_mta=mta)
        for rcpt in dict.fromkeys(rcpts)))


# RFC 8098's Disposition field: "action-mode/sending-mode; disposition-type"
_DISPOSITION = re.compile(r"\s*([\w-]+)\s*/\s*[\w-]+\s*;\s*([\w-]+)")
_AUTO_REJECTED = re.compile(r"automatically rejected:", re.IGNORECASE)
_MAILBOX_COULD_NOT = frozenset({"mailboxfull", "mesgtoobig", "exceedlimit"})


def mdn(parts: list[Message], original: Original) -> Report:
    """A message disposition notification (RFC 8098): what became of a message in the
    recipient's mailbox. A Sieve `reject` answers with one whose disposition is "deleted" by
    an automatic action (RFC 5429 2.2): the recipient's own filter refused the message, a
    failure (filtered, soft; mailboxfull when the words say the quota, as Dovecot's delivery
    agent does). RFC 2298's "denied" says the same. Every other one (displayed,
    dispatched, processed, deleted by its reader) says the message reached the mailbox: a
    report of type "mdn", no bounce."""
    part = next(p for p in parts if p.get_content_type() == "message/disposition-notification")
    blocks = _field_blocks(part, 1)
    fields = blocks[0] if blocks and blocks[0].keys() else email.message_from_string(
        (part_text(part) or str(part.get_payload())).strip() + "\n")
    address = _mailbox(address_of(fields["Final-Recipient"])) or _mailbox(
        address_of(fields["Original-Recipient"])) or _only_recipient(original)
    m = _DISPOSITION.match(str(fields.get("Disposition", "")))
    mode, kind = (m.group(1).lower(), m.group(2).lower()) if m else ("", "")
    reporter = str(fields.get("Reporting-UA", "")).split(";")[0].strip() or None  # its host
    words = " ".join(report_words(parts)[:20000].split())[:1000]
    if (mode == "automatic-action" and kind == "deleted") or kind == "denied":
        # why, when the words say the mailbox could not take it (Dovecot's "... was
        # automatically rejected: Quota exceeded"); whatever else a script says, its filter
        said = phrase_reason(_AUTO_REJECTED.split(words, 1)[-1])
        return Report(type="dsn", original=original, recipients=(BouncedRecipient(
            address=address, action="failed", status=None,
            reason=said if said in _MAILBOX_COULD_NOT else "filtered",
            bounce_class="soft", diagnostic=words, remote_mta=reporter),))
    return Report(type="mdn", original=original, recipients=(BouncedRecipient(
        address=address, action=kind, status=None, reason="delivered", bounce_class="soft",
        diagnostic=words, remote_mta=reporter),))


_FEEDBACK_TYPE = re.compile(r"^Feedback-Type:", re.IGNORECASE | re.MULTILINE)


def _inline_fields(parts: list[Message]) -> Message | None:
    """The feedback-report fields of a complaint whose MIME boundaries were lost, found in its
    text from the Feedback-Type field on, to the first line that is not a field."""
    for part in parts:
        text = "" if part.is_multipart() else part_text(part)
        if m := _FEEDBACK_TYPE.search(text[:20000]):
            block = re.split(r"\n\s*\n", text[m.start():m.start() + 8192].replace("\r\n", "\n"))[0]
            return email.message_from_string(block.strip() + "\n")
    return None


def original_of(enclosed: Message) -> Original:
    headers = tuple((k, re.sub(r"\s+", " ", str(v)).strip()) for k, v in enclosed.items())
    get = {k.lower(): v for k, v in reversed(headers)}
    return Original(return_path=address_of(get.get("return-path")) or None,
                    message_id=get.get("message-id"), feedback_id=get.get("feedback-id"),
                    headers=headers)


def enclosed_original(parts: list[Message]) -> Original:
    for part in parts:
        ctype = part.get_content_type()
        enclosed: Message | None = None
        if ctype in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                enclosed = payload[0]
        elif ctype in ("text/rfc822-headers", "message/global-headers"):
            enclosed = email.message_from_string(part_text(part) or str(part.get_payload()))
        if enclosed is not None and enclosed.keys():
            return original_of(enclosed)
    return Original()

