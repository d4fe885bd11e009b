"""Messages without a report's structure: whether one is an auto-reply or a bounce, and the
recipients a non-RFC-3464 bounce names (flufl.bounce's detectors first, then the error
text, the quoted delivery-status fields, or the returned message's one recipient)."""

from __future__ import annotations

import dataclasses
import email
import logging
import re
from email.message import Message

from flufl.bounce import all_failures

from .. import rawmail
from .bounce_reasons import ADDRESS_RE
from .bounce_recipient import recipient
from .bounce_report import BouncedRecipient, Original
from .bounce_standard import dsn_recipients, original_of
from .bounce_text import (
    COPY_MARKER,
    Prose,
    address_of,
    all_text,
    error_text,
    failure_reply_in,
    failure_status_in,
    lower_domain,
    remote_near,
    reply_code_in,
    says_why,
    status_in,
)

log = logging.getLogger(__name__)

# -- auto-replies (RFC 3834) --------------------------------------------------------

_AUTOREPLY_SUBJECT = re.compile(
    r"out of (the )?office|auto(matic|matisch)?[ -]?(reply|response|antwort|respon)"
    r"|^auto:|vacation|away (from|until)|abwesen|absence|abwesenheit|r[ée]ponse automatique"
    r"|i am away|on leave|on holiday"
    # "automatic reply" in other languages (Polish, Spanish/Portuguese/Italian, Dutch,
    # Scandinavian, Finnish, Japanese/Chinese)
    r"|automatyczna odpowied|(respuesta|resposta|risposta) autom[aá]tica|automatisch antwoord"
    r"|autosvar|automaattinen vastaus|自動応答|自動返信|自动回复"
    # Latvian, Lithuanian, Estonian ("automātiskā atbilde", often written without diacritics)
    r"|autom[aā]tisk[aā] atbilde|automatinis atsakymas|automaatne vastus"
    # an automatic acknowledgement ("Thank you for your e-mail"), not a reply someone wrote
    r"|^thank you for your (e-?mail|message)$", re.I)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|delivery (status|failure|notification|has failed)|returned mail|failure notice"
    r"|mail delivery|not (be )?delivered|delivery failed|rejected|bounce", re.I)


def is_autoreply(msg: Message) -> bool:
    subject = rawmail.decoded(str(msg.get("Subject", "")))  # "=?iso-8859-2?Q?...?="
    if _BOUNCE_SUBJECT.search(subject):
        return False
    sender = str(msg.get("From", "")).lower()
    # a mail system's, not a person's: an auto-reply comes from the mailbox it answers for
    # (RFC 3834), never from the null address "<>"
    if "mailer-daemon" in sender or "postmaster" in sender or "<>" in sender:
        return False
    if str(msg.get("Auto-Submitted", "")).strip().lower().startswith("auto-replied"):
        return True
    if msg.get("X-Autoreply") or msg.get("X-Autorespond") or msg.get("X-Autoresponder"):
        return True
    if str(msg.get("Precedence", "")).strip().lower() == "auto_reply":
        return True
    return bool(_AUTOREPLY_SUBJECT.search(subject))


def from_address(msg: Message) -> str:
    return address_of(str(msg.get("From", "")))


# a gateway that answers for a mailbox from an address no one reads (Mimecast's "From:
# <noreply@example.com>") names the mailbox in Reply-To
_NO_REPLY = re.compile(r"^(no-?reply|do-?not-?reply)([+.\-][^@]*)?@", re.I)
# an auto-reply saying the mailbox is gone for good, not its owner away for a while
# (in one sentence: a dot only inside a name, "kijitora@example.com")
_MAILBOX_GONE = re.compile(r"\b(inbox|mailbox|e-?mail address|account)\b(?:[^.\n]|\.(?=\w)){0,80}?"
                           r"\b(is|has been)"
                           r" (no longer (in use|active|monitored|being monitored|checked)"
                           r"|(closed|deactivated|disabled|discontinued))\b", re.I)


def autoreply(msg: Message) -> BouncedRecipient:
    """The mailbox an auto-reply answered for, and whether it says that mailbox is gone
    ("suspend", as Sisimai reads it; soft all the same: the mailbox still answered) or only
    its owner away ("vacation")."""
    address = from_address(msg)
    if _NO_REPLY.match(address):
        named = ADDRESS_RE.findall(str(msg.get("Reply-To", "")))
        if len(named) == 1:
            address = named[0]
    reason = "suspend" if _MAILBOX_GONE.search(all_text(msg)[:20000]) else "vacation"
    return BouncedRecipient(address=address, action="", status=None, reason=reason,
                            bounce_class="soft", diagnostic=str(msg.get("Subject", "")),
                            remote_mta=None)


# -- non-standard bounces -----------------------------------------------------------


def _detected(msg: Message) -> tuple[frozenset[bytes], frozenset[bytes]]:
    """flufl.bounce's findings (temporary, permanent); none when a detector fails on what it
    did not expect (its Yale detector raises IndexError on a message without a From address):
    relay's own reading of the text still runs."""
    try:
        return all_failures(msg)
    except Exception:
        log.debug("a flufl.bounce detector failed", exc_info=True)
        return frozenset(), frozenset()


def heuristic_recipients(msg: Message, limit: int) -> tuple[BouncedRecipient, ...]:
    temporary, permanent = _detected(msg)
    text = all_text(msg)[:50000]
    named = [(m.group(0), action) for addresses, action in
             ((permanent, "failed"), (temporary, "delayed")) for raw in sorted(addresses)
             if (m := ADDRESS_RE.search(raw.decode("ascii", "replace")))]
    named = _not_message_ids(msg, named[:limit], text)
    if not named and looks_like_bounce(msg, text):
        named = [(a, "failed") for a in _addresses_in_error(msg, text)] or [
            (a, "failed") for a in _original_to(text)]
    named = named[:limit]
    prose = Prose(text, others=[a for a, _ in named])
    said: str | None = None
    found: list[BouncedRecipient] = []
    for raw_address, action in named:
        address = lower_domain(raw_address)
        diagnostic = prose.near(address)
        if not says_why(diagnostic):
            # the reason is often stated once, above the list of recipients
            if said is None:
                said = error_text(text)
            diagnostic = said or diagnostic
        found.append(recipient(address, action, failure_status_in(diagnostic),
                               failure_reply_in(diagnostic),
                               diagnostic, remote_near(diagnostic), transcript=text))
    return tuple(found)


def _not_message_ids(msg: Message, named: list[tuple[str, str]],
                     text: str) -> list[tuple[str, str]]:
    """Without the addresses a detector took from a quoted Message-ID, and without the
    bounce's own sender and receiver when others are named."""
    kept = [(a, action) for a, action in named if not _only_as_message_id(a, text)]
    # "x@example.org (generated from alias@example.net)": the alias is not a recipient (the
    # returned copy after the report may name it again, as its To)
    cut = COPY_MARKER.search(text)
    report = text[:cut.start()] if cut else text
    kept = [(a, action) for a, action in kept
            if not _only_after(_ALIAS_OF, a, report)] or kept
    # "For further assistance, please contact <support@isp.example>": the reporter's help desk
    kept = [(a, action) for a, action in kept if not _only_after(_HELP_DESK, a, report)] or kept
    own = {address_of(str(msg.get(h, ""))).lower() for h in ("From", "To")}
    others = [(a, action) for a, action in kept if a.lower() not in own]
    return others or kept


def _only_as_message_id(address: str, text: str) -> bool:
    return _only_after(_MESSAGE_ID, address, text)


def _only_after(words: re.Pattern[str], address: str, text: str) -> bool:
    """Whether every mention of the address in the text comes right after the words."""
    at = text.find(address)
    if at < 0:
        return False
    while at >= 0:
        if not words.search(text, max(at - 20, 0), at):
            return False
        at = text.find(address, at + 1)
    return True


# a notice that a message is only delayed, was delivered or relayed (Exchange's "Delivery to
# these recipients or groups is complete"), or was read: no failure
_NOT_A_FAILURE = re.compile(
    r"\bdelay|\bwarning\b|still (being )?retr|will (be )?retried|will (keep|continue) (on )?"
    r"trying|no action is required|do not need to resend|\bsuccess|(has been|was) "
    r"(successfully )?(delivered|relayed)\b|\(relay\)|\bis complete\b|\bwas read\b"
    r"|was received by\b", re.I)
# words that the failure is for good, which outweigh a delay's ("delayed for 5 days; I gave up")
_FOR_GOOD = re.compile(r"permanent(ly)? (error|fail)|\bfailed permanently\b|\bg(a|i)ve(n)? up\b"
                       r"|giving up|will not be (re)?tried|no further (attempts|retries)", re.I)
# a read or return receipt's subject ("Read: Your invoice", German, French, Spanish, Italian)
_RECEIPT_SUBJECT = re.compile(r"^\s*(read|gelesen|lu|le[ií]do|letto|(return|delivery|read) "
                              r"receipt)\b", re.I)


def unnamed_recipient(msg: Message, original: Original) -> tuple[BouncedRecipient, ...]:
    """A failure report that names nobody: the one recipient of the message it returns, else
    one without an address (a report cut short, or one that keeps the address to itself),
    whom the token of the return path it came to names (VERP); its words still say why, but
    never a hard bounce. A notice that the message is only delayed, was delivered or was
    read names no failure."""
    text = all_text(msg)
    subject = rawmail.decoded(str(msg.get("Subject", "")))
    said = f"{subject} {text[:3000]}"
    if _RECEIPT_SUBJECT.search(subject) or (
            _NOT_A_FAILURE.search(said) and not _FOR_GOOD.search(said)):
        return ()
    to = [v for k, v in original.headers if k.lower() == "to"]
    addresses = [m.group(0) for m in ADDRESS_RE.finditer(to[0])] if to else []
    address = lower_domain(addresses[0]) if len(addresses) == 1 else ""
    diagnostic = error_text(text)
    found = recipient(address, "failed", status_in(diagnostic), reply_code_in(diagnostic),
                      diagnostic, None)
    if not address and found.bounce_class == "hard":
        # the address that failed may be one ours forwarded to: bad for good, it is not named
        found = dataclasses.replace(found, bounce_class="soft")
    return (found,)


def _original_to(text: str) -> list[str]:
    """The recipients of the quoted original, for a bounce that names no address itself."""
    cut = COPY_MARKER.search(text)
    if not cut:
        return []
    m = re.search(r"^To:\s*(.+)$", text[cut.end():], re.M | re.I)
    return [a.group(0) for a in ADDRESS_RE.finditer(m.group(1))][:1] if m else []


_INLINE_FIELDS = re.compile(r"^(Final|Original)-Recipient:.*(?:\n(?!\s*\n).*)*", re.I | re.M)


def inline_dsn_recipients(msg: Message, limit: int) -> tuple[BouncedRecipient, ...]:
    """Delivery-status fields quoted in the text of a report whose MIME structure broke."""
    text = all_text(msg)
    fake = Message()
    fake.set_type("message/delivery-status")
    fake.set_payload("\n\n".join(m.group(0) for m in _INLINE_FIELDS.finditer(text)))
    if not fake.get_payload():
        return ()
    # the words for people around the fields (a transcript, "mail.local: unknown user"):
    # what a report without Diagnostic-Code fields says of each recipient
    human = Message()
    human.set_payload(_INLINE_FIELDS.sub("", text), "utf-8")
    return dsn_recipients([msg, fake, human], limit)


def looks_like_bounce(msg: Message, text: str = "") -> bool:
    """From a mail system, or (a subject in a language of its own, a no-reply sender) a text
    that says in so many words that a message could not be delivered to an address."""
    sender = str(msg.get("From", "")).lower()
    return bool("mailer-daemon" in sender or "postmaster" in sender
                or _BOUNCE_SUBJECT.search(str(msg.get("Subject", "")))
                or str(msg.get("Return-Path", "x")).strip() == "<>"
                or _NOT_DELIVERED_TO.search(error_text(text))
                or bool(_RCPT_TO.search(text) and _REPLY_LINE.search(error_text(text))))


# the envelope recipient a report names as such ("RCPT TO: ann@example.org") and a refusal
_RCPT_TO = re.compile(r"\brcpt to:\s*<?([\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+)", re.IGNORECASE)
_REPLY_LINE = re.compile(r"(?:^|\s)[45]\d\d(?:[ \-]|$)")
# "Could not be delivered to: <ann@example.org>", "undeliverable to ann@example.org"
_NOT_DELIVERED_TO = re.compile(r"(not (be )?delivered|undeliverable|delivery failed) to:?\s*<?"
                               r"[\w.+\-]+@", re.IGNORECASE)


_NOT_RECIPIENT = re.compile(r"^(mailer-daemon|postmaster|root|abuse|noreply|no-reply)@", re.I)
# a quoted "Message-ID: <...@host>" names a message, not a recipient
_MESSAGE_ID = re.compile(r"message-id:\s*<?$", re.I)
# the reporter's own help desk or postmaster, named for people to write to
_HELP_DESK = re.compile(r"(contact|send (e-?)?mail to|write to|e-?mail us at|reach us at"
                        r"|questions? to|assistance):?\s*<?$", re.IGNORECASE)
# the address an alias or a list expanded to the failed one (Exim, Postfix)
_ALIAS_OF = re.compile(r"(generated|expanded) from:?\s*<?$", re.IGNORECASE)


def _addresses_in_error(msg: Message, text: str) -> list[str]:
    """Where no detector knows the format: the addresses the error text names, other than
    the bounce's own sender and receiver."""
    cut = COPY_MARKER.search(text)
    body = text[:cut.start()] if cut else text
    own = {address_of(str(msg.get(h, ""))).lower() for h in ("From", "To", "Reply-To")}
    found: list[str] = []
    for m in ADDRESS_RE.finditer(body):
        address = lower_domain(m.group(0).strip("."))
        if address.lower() in own or _NOT_RECIPIENT.match(address) or address in found \
                or _MESSAGE_ID.search(body, max(m.start() - 20, 0), m.start()) \
                or _HELP_DESK.search(body, max(m.start() - 20, 0), m.start()):
            continue
        found.append(address)
    return found[:1] if len(found) > 1 and not _many_listed(body, found) else found


def _many_listed(body: str, found: list[str]) -> bool:
    """Several failed recipients are listed one a line; a single one is mentioned in prose."""
    lines = [line for line in body.splitlines() if any(a in line for a in found)]
    return len(lines) >= len(found) and all(len(line.strip()) < 120 for line in lines)


def quoted_original(text: str) -> Original:
    """The headers a non-MIME bounce quotes after its "copy of the message" line."""
    cut = COPY_MARKER.search(text)
    if not cut:
        return Original()
    quoted = text[cut.end():].lstrip("\r\n").replace("\r\n", "\n")
    return original_of(email.message_from_string(quoted.split("\n\n", 1)[0] + "\n"))
