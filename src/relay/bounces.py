"""Read a bounce, complaint or auto-reply: who it is about, what happened, and why.

Pure parsing, no I/O: RFC 3464 delivery-status reports, RFC 5965 (ARF) complaints,
RFC 3834 auto-replies, and the older non-standard bounce formats, whose recipients
flufl.bounce's detectors find; relay reads the status code and the remote's sentence
near each recipient itself.  `classify` turns a status, a reply code and the text into
a reason and a hard/soft class: hard only when the address itself is bad for good.
"""

from __future__ import annotations

import email
import email.policy
import logging
import re
from dataclasses import dataclass, field
from email.message import Message

from flufl.bounce import all_failures

log = logging.getLogger(__name__)

REASONS: tuple[str, ...] = (
    "userunknown", "hostunknown", "hasmoved", "mailboxfull", "mesgtoobig", "exceedlimit",
    "filtered", "rejected", "blocked", "spamdetected", "virusdetected", "policyviolation",
    "authfailure", "requireptr", "badreputation", "notcompliantrfc", "expired", "suspend",
    "onhold", "networkerror", "systemerror", "systemfull", "toomanyconn", "speeding",
    "norelaying", "notaccept", "securityerror", "syntaxerror", "contenterror", "mailererror",
    "vacation", "feedback", "delivered", "undefined",
)
# the address is bad and stays bad: the only reasons that may suppress a recipient
HARD_REASONS = frozenset({"userunknown", "hostunknown", "hasmoved", "notaccept"})


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


# -- classification -----------------------------------------------------------------

# Phrases that say what went wrong, most specific first.  Read whatever the code says:
# many servers send 5.0.0 or 5.7.1 for everything, and the sentence is then the fact.
_PHRASES: tuple[tuple[str, str], ...] = (
    ("notcompliantrfc", r"\brfc ?(2822|5322|5321|1123)\b|not (rfc|standards).{0,10}compliant"
                        r"|duplicate (header|message-id)|multiple \w+ headers|multiple .{0,20}addresses in from"),
    ("norelaying", r"relay(ing)? (access )?(denied|not (permitted|allowed))|unable to relay"
                   r"|not permitted to relay|no relaying|relay not permitted|not a gateway"
                   r"|relaying (mail )?to .{1,80} (is )?not allowed|not configured to relay"
                   r"|insecure mail relay|we do not relay"),
    ("mailererror", r"procmail|pipe to \||x-unix|local delivery failed|mail(er)? program"),
    ("userunknown", r"(account|mailbox|address|recipient|user)( or domain)? (may|does) not exist"),
    ("rejected", r"sender.{0,30}(was |is )?(rejected|denied|refused)"),
    ("toomanyconn", r"too many (connections|sessions|simultaneous|concurrent)"
                    r"|connection (rate|limit)|frequency limit"),
    ("virusdetected", r"virus|malware|infected|trojan"),
    ("requireptr", r"reverse (dns|lookup|hostname)|\bptr\b|rdns|no (dns|host ?name) for"
                   r"|(ip|client).{0,40}(not|cannot be|could not be) resolved|unverif[iy]able"
                   r"|cannot find your (reverse )?hostname|hostname.{0,20}(lookup|resolve)"
                   r"|(ip|host) ?name lookup failed"),
    ("spamdetected", r"(spam|junk) (classification|score|content)|classified as (spam|junk)"
                     r"|blacklisted (url|link|domain in)|\buribl\b|surbl"),
    ("authfailure", r"\bspf\b|\bdkim\b|\bdmarc\b|sender policy framework"
                    r"|authenticat(ion|ed).{0,30}fail|not authenticated"),
    ("badreputation", r"reputation|(ip|sender).{0,20}(has been )?temporarily (deferred|rate)"),
    ("blocked", r"black ?list|block ?list|\bdnsbl|\brbl\b|spamhaus|spamcop|sorbs|barracuda"
                r"|(ip|address|host|connection|client).{0,40}(blocked|banned|denied|refused)"
                r"|blocked.{0,20}(ip|address|host)|access denied|poor reputation"
                r"|client host rejected|invalid ip|not accepting connections"),
    ("spamdetected", r"\bspam(?!haus|cop)|junk mail|unsolicited|bulk mail|content.{0,20}rejected"
                     r"|message (has been |was )?(classified|identified|considered|marked) as"),
    ("speeding", r"rate limit|too many (messages|recipients|mails)|sending too (fast|much)"
                 r"|try again later.{0,20}(too|rate)|exceeded .{0,20}rate|at a rate"),
    ("mailboxfull", r"(mailbox|mail box|inbox|mail ?folder|account|user|storage)"
                    r".{0,40}(full|quota|exceed|over)|quota|insufficient storage"
                    r"|not enough (storage|space)|full mailbox|mailbox size limit"),
    ("mesgtoobig", r"(message|mail|size).{0,30}(too (big|large|long)|exceed(s|ed)?.{0,20}"
                   r"(size|limit))|exceeds? .{0,30}(size limit|maximum (message )?size)"
                   r"|message size|size limit"),
    ("systemfull", r"(system|disk|server).{0,20}(full|out of space)|insufficient (system|disk)"),
    ("exceedlimit", r"exceed(s|ed)? .{0,30}limit"),
    ("hasmoved", r"has moved|moved to|no longer (valid|available) at|forwarding address"),
    ("suspend", r"(account|mailbox|user|address).{0,40}(disabled|suspended|inactive|deactivated"
                r"|expired|locked|frozen|not active|blocked|closed)|suspended"),
    ("notaccept", r"no smtp service|(does not|doesn.?t) (accept|receive) (e-?)?mail|null mx"
                  r"|accepts no mail"),
    ("networkerror", r"try again.{0,10}$|temporary (dns|lookup)|host not reachable"
                     r"|unexpected name server reply"),
    ("hostunknown", r"host (or domain name )?(not found|unknown)|unknown host|domain"
                    r" (not found|does not exist|unknown|is not valid)|unknown domain"
                    r"|no such (domain|host)|name or service not known|host not found"
                    r"|nxdomain|domain name not found|unrouteable (mail )?domain"
                    r"|unrouteable address|no mx|bad destination host|no route to host"
                    r"|unresolvable|domain (is )?not reachable"),
    ("userunknown", r"(user|recipient|mailbox|address|account|addressee|destination)"
                    r".{0,50}(unknown|not (found|exist|known|valid|listed)|does( not|n.?t)"
                    r" exist|doesn.?t have|invalid|no such|unavailable)"
                    r"|no such (user|recipient|mailbox|address|account|person)"
                    r"|unknown (user|recipient|local|mailbox|address|alias|addressee)"
                    r"|invalid (recipient|mailbox|address|user)|mailbox not found"
                    r"|(user|recipient) doesn.?t|not our customer|no mailbox here"
                    r"|unrouteable|not a valid (user|mailbox|recipient)|not recogni[sz]ed"
                    r"|invalid .{0,20}userid|illegal user"
                    r"|no valid recipients|recipient rejected|bad recipient"
                    r"|undeliverable address|user not found|no account by that name"),
    ("securityerror", r"tls|starttls|encryption|certificate|security|authentication required"
                      r"|must (issue|use) .{0,20}(auth|starttls)|smtp auth"),
    ("policyviolation", r"policy|prohibited|not allowed|violat|administrat(ive|or)"
                        r"|forbidden"),
    ("contenterror", r"content|header.{0,20}(invalid|error)|(mime|encoding|charset) error"
                     r"|8-?bit|attachment"),
    ("filtered", r"filter|recipient preferences|refused by|rejected by (the )?recipient|recipient.{0,20}refus"),
    ("expired", r"(retry|delivery|queue|time|lifetime).{0,40}(expired|exceeded|timeout|time out)"
                r"|could not be delivered (for|within|in) .{0,20}(days|hours)|too long"
                r"|gave up|giving up|has been delayed|not (yet )?been delivered"
                r"|delivery (attempts|time).{0,20}(failed|exhausted)|expired"),
    ("networkerror", r"connection (refused|timed? ?out|reset|closed|lost|dropped)"
                     r"|timed? ?out|network|unreachable|cannot connect|could not connect"
                     r"|unable to connect|dns (error|failure|lookup)|routing loop|mail loop"
                     r"|too many hops|loop detected"),
    ("mailererror", r"mailer (error|program)|(pipe|command|program).{0,30}(fail|error|exit)|x-unix|unix;"
                    r"|procmail|local delivery failed|exit (code|status)"),
    ("systemerror", r"system error|internal (server )?error|temporary (failure|error)"
                    r"|server error|local error|try (again )?later|service.{0,20}(not available"
                    r"|unavailable|refused?)|resources|transaction failed"),
    ("syntaxerror", r"syntax error|command unrecognized|unrecognized command"
                    r"|command not (recognized|implemented)"),
    ("userunknown", r"(recipient )?address rejected"),
    ("rejected", r"sender.{0,40}(reject|denied|refused|invalid|unknown|not allowed|blocked)"
                 r"|(reject|denied|refused).{0,30}sender|envelope.from|mail from"
                 r"|domain of sender|from address|return.path|rejected|denied|refused"),
    ("onhold", r"on hold|held"),
)
_PHRASE_RES = tuple((reason, re.compile(pattern, re.I)) for reason, pattern in _PHRASES)

# RFC 3463 subject.detail codes whose meaning is precise enough to stand alone
_BY_STATUS: dict[str, str] = {
    "1.1": "userunknown", "1.2": "hostunknown", "1.3": "userunknown", "1.4": "userunknown",
    "1.5": "userunknown", "1.6": "hasmoved", "1.7": "rejected", "1.8": "rejected",
    "1.10": "notaccept", "2.1": "suspend", "2.2": "mailboxfull", "2.3": "exceedlimit",
    "2.4": "mailererror", "3.1": "systemfull", "3.2": "notaccept", "3.3": "mailererror",
    "3.4": "mesgtoobig", "3.5": "systemerror", "4.0": "networkerror", "4.1": "networkerror",
    "4.2": "networkerror", "4.3": "systemerror", "4.4": "hostunknown", "4.5": "networkerror",
    "4.6": "networkerror", "4.7": "expired", "5.0": "syntaxerror", "5.1": "syntaxerror",
    "5.2": "syntaxerror", "5.3": "exceedlimit", "5.4": "syntaxerror", "6.0": "contenterror",
    "6.1": "contenterror", "6.2": "contenterror", "6.3": "contenterror", "6.5": "contenterror",
    "6.6": "contenterror", "6.7": "contenterror", "6.8": "contenterror", "6.9": "contenterror",
    "7.2": "rejected", "7.3": "securityerror", "7.4": "securityerror", "7.5": "securityerror",
    "7.6": "securityerror", "7.7": "securityerror", "7.8": "authfailure", "7.9": "policyviolation",
    "7.10": "securityerror", "7.11": "securityerror", "7.13": "suspend", "7.14": "securityerror",
    "7.15": "securityerror", "7.16": "mesgtoobig", "7.17": "suspend", "7.18": "suspend",
    "7.19": "policyviolation", "7.20": "authfailure", "7.21": "authfailure",
    "7.22": "authfailure", "7.23": "authfailure", "7.24": "authfailure", "7.25": "requireptr",
    "7.26": "authfailure", "7.27": "notaccept", "7.28": "spamdetected", "7.29": "authfailure",
    "7.30": "securityerror",
}
# codes that say little: a phrase in the text wins over them (servers send 5.1.1, 5.7.1 or
# 5.0.0 for rejections of every kind; the sentence then says which)
_VAGUE = frozenset({"5.5", "0.0", "7.0", "7.1", "5.0", "1.0", "2.0", "3.0", "4.0", "7.2", "1.1",
                    "4.7", "4.4", "5.2", "4.1", "4.2", "2.1", "3.0", "6.0", "1.3", "1.10"})
# RFC 5321 reply codes, where one means one thing (550 and 553 carry anything, so they
# say nothing about the address by themselves)
_BY_REPLY = {421: "systemerror", 451: "systemerror", 452: "systemfull", 551: "hasmoved",
             552: "mailboxfull", 554: "rejected", 556: "notaccept", 500: "syntaxerror",
             501: "syntaxerror", 530: "securityerror", 535: "securityerror"}


_GAVE_UP = re.compile(r"in the queue too long|not going to try again|retry (time|timeout|period)"
                      r" (exceeded|expired)|delivery time expired|could not be delivered"
                      r" (for|within) \d|failing for a long time|will be retried|envelope"
                      r" expired|message expired|still undeliver", re.I)


def _phrase_reason(text: str) -> str | None:
    for reason, regex in _PHRASE_RES:
        if regex.search(text):
            return reason
    return None


def classify(status: str | None, reply_code: int | None, text: str) -> tuple[str, str]:
    """(reason, "hard"|"soft") from an RFC 3463 status, an SMTP reply code and the text."""
    cls, detail = "", ""
    if status and (m := _STATUS_RE.fullmatch(status.strip())):
        cls, detail = m.group(1), f"{int(m.group(2))}.{int(m.group(3))}"
    if not cls and reply_code:
        cls = str(reply_code)[0]
    if cls == "2":
        return "delivered", "soft"
    text = _ADDR_RE.sub(" ", text or "")  # a local part such as "mailbox-full" says nothing
    phrase = _phrase_reason(text) if text else None
    if text and _GAVE_UP.search(text):
        phrase = "expired"
    reason = None
    if detail and detail not in _VAGUE:
        reason = _BY_STATUS.get(detail)
    if reason is None or (phrase and detail in _VAGUE):
        reason = phrase or _BY_STATUS.get(detail) or (
            _BY_REPLY.get(reply_code) if reply_code else None)
    if reason is None:
        reason = "expired" if cls == "4" else "undefined"
    if reason == "hostunknown" and cls == "4":
        reason = "networkerror"  # a DNS answer that may still change
    hard = reason in HARD_REASONS and cls != "4"
    return reason, "hard" if hard else "soft"


# -- parsing ------------------------------------------------------------------------

_STATUS_RE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")
_STATUS_IN_TEXT = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?![\d.])")
_REPLY_IN_TEXT = re.compile(r"(?<![\d.\-])([245][0-5]\d)(?:[ \-]|$)", re.M)
_ADDR_RE = re.compile(r"[\w.!#$%&'*+/=?^`{|}~\-]+@[\w\-]+(?:\.[\w\-]+)+", re.U)


def parse(raw: bytes) -> Report:
    """What a message reports; never raises: a message not understood is type "unknown"."""
    try:
        msg = email.message_from_bytes(raw)
        return _parse(msg)
    except Exception:  # garbage in must never become a traceback in the inbound path
        log.debug("bounce not understood", exc_info=True)
        return Report(type="unknown")


def _parse(msg: Message) -> Report:
    parts = list(msg.walk())
    types = {p.get_content_type() for p in parts}
    original = _original(parts)
    if "message/feedback-report" in types or (
            msg.get_content_type() == "multipart/report"
            and (msg.get_param("report-type") or "").lower() == "feedback-report"):
        return _arf(parts, original)
    if "message/delivery-status" in types or "message/global-delivery-status" in types:
        recipients = _dsn_recipients(parts)
        if recipients:
            return Report(type="dsn", recipients=recipients, original=original)
    if _is_autoreply(msg):
        return Report(type="autoreply", original=original, recipients=(
            BouncedRecipient(address=_from_address(msg), action="", status=None,
                             reason="vacation", bounce_class="soft",
                             diagnostic=str(msg.get("Subject", "")), remote_mta=None),))
    recipients = _heuristic_recipients(msg) or _inline_dsn_recipients(msg)
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
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            texts.append(_text(part))
        elif part.is_multipart() is False and isinstance(part.get_payload(), str) and \
                part.get_content_maintype() == "multipart":
            texts.append(str(part.get_payload()))
    return "\n".join(texts)


def _fields(part: Message) -> list[Message]:
    """The field blocks of a delivery-status part (the first is per-message)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, Message)]
    text = payload if isinstance(payload, str) else ""
    return [email.message_from_string(block.strip() + "\n")
            for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")) if block.strip()]


def _address_of(value: str | None) -> str:
    if not value:
        return ""
    value = re.sub(r"\s+", " ", str(value)).strip()
    if ";" in value:
        value = value.split(";", 1)[1]
    value = re.sub(r"<?@[^:<>@\s]+:", "", value.strip())  # an RFC 821 source route
    value = value.strip().strip("<>").strip()
    m = _ADDR_RE.search(value)
    return _lower_domain(m.group(0) if m else value)


def _lower_domain(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}" if at else address


def _after_type(value: str | None) -> str:
    text = re.sub(r"\s+", " ", str(value or "")).strip()
    return text.split(";", 1)[1].strip() if ";" in text else text


def _dsn_recipients(parts: list[Message]) -> tuple[BouncedRecipient, ...]:
    found: list[BouncedRecipient] = []
    human = " ".join(_text(p) for p in parts if p.get_content_type() == "text/plain")[:20000]
    for part in parts:
        if part.get_content_type() not in ("message/delivery-status",
                                           "message/global-delivery-status"):
            continue
        blocks = [group for block in _fields(part) for group in _split_recipients(block)]
        for block in blocks:
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
            near = _sentence_near(human, address)
            diagnostic = diagnostic or near
            reply = _reply_code(diagnostic)
            remote = _after_type(block["Remote-MTA"]) or None
            found.append(_recipient(address, action, status, reply, diagnostic, remote,
                                    context=f"{near} {diagnostic}", transcript=human))
    return tuple(found)


_RECIPIENT_FIELDS = ("final-recipient", "original-recipient")


def _split_recipients(block: Message) -> list[Message]:
    """One block per recipient, for reports that leave out the blank lines between them."""
    groups: list[Message] = []
    current = Message()
    for name, value in block.items():
        if name.lower() in _RECIPIENT_FIELDS and name.lower() in (
                k.lower() for k in current.keys()):
            groups.append(current)
            current = Message()
        current[name] = value
    return groups + [current]


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


def _arf(parts: list[Message], original: Original) -> Report:
    report = next((p for p in parts if p.get_content_type() == "message/feedback-report"), None)
    fields = _fields(report)[0] if report is not None and _fields(report) else Message()
    if report is not None and not fields.keys():
        text = _text(report) or str(report.get_payload())
        fields = email.message_from_string(text.strip() + "\n")
    feedback_type = str(fields.get("Feedback-Type", "")).strip().lower() or "abuse"
    rcpts = [_address_of(v) for v in (fields.get_all("Original-Rcpt-To") or
                                      fields.get_all("Removal-Recipient") or [])]
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


def _heuristic_recipients(msg: Message) -> tuple[BouncedRecipient, ...]:
    temporary, permanent = all_failures(msg)
    text = _all_text(msg)[:50000]
    named = [(m.group(0), action) for addresses, action in
             ((permanent, "failed"), (temporary, "delayed")) for raw in sorted(addresses)
             if (m := _ADDR_RE.search(raw.decode("ascii", "replace")))]
    if not named and _looks_like_bounce(msg):
        named = [(a, "failed") for a in _addresses_in_error(msg, text)] or [
            (a, "failed") for a in _original_to(text)]
    others = tuple(a for a, _ in named)
    found: list[BouncedRecipient] = []
    for raw_address, action in named:
        address = _lower_domain(raw_address)
        diagnostic = _sentence_near(text, address, others)
        if not _says_why(diagnostic):
            # the reason is often stated once, above the list of recipients
            diagnostic = _error_text(text) or diagnostic
        found.append(_recipient(address, action, _status(diagnostic), _reply_code(diagnostic),
                                diagnostic, _remote_near(diagnostic), transcript=text))
    return tuple(found)


def _enclosed_recipient(msg: Message, original: Original) -> tuple[BouncedRecipient, ...]:
    """A bounce that names nobody: the one recipient of the message it returns, if one."""
    to = [v for k, v in original.headers if k.lower() == "to"]
    addresses = [m.group(0) for m in _ADDR_RE.finditer(to[0])] if to else []
    if len(addresses) != 1:
        return ()
    diagnostic = _error_text(_all_text(msg))
    return (_recipient(_lower_domain(addresses[0]), "failed", _status(diagnostic),
                       _reply_code(diagnostic), diagnostic, None),)


def _says_why(text: str) -> bool:
    return bool(_STATUS_IN_TEXT.search(text) or _REPLY_IN_TEXT.search(text)
                or _phrase_reason(_ADDR_RE.sub(" ", text)))


def _error_text(text: str) -> str:
    cut = _COPY_MARKER.search(text)
    return re.sub(r"\s+", " ", text[:cut.start()] if cut else text).strip()[:1000]


def _original_to(text: str) -> list[str]:
    """The recipients of the quoted original, for a bounce that names no address itself."""
    cut = _COPY_MARKER.search(text)
    if not cut:
        return []
    m = re.search(r"^To:\s*(.+)$", text[cut.end():], re.M | re.I)
    return [a.group(0) for a in _ADDR_RE.finditer(m.group(1))][:1] if m else []


_INLINE_FIELDS = re.compile(r"^(Final|Original)-Recipient:.*(?:\n(?!\s*\n).*)*", re.I | re.M)


def _inline_dsn_recipients(msg: Message) -> tuple[BouncedRecipient, ...]:
    """Delivery-status fields quoted in the text of a report whose MIME structure broke."""
    text = _all_text(msg)
    fake = Message()
    fake.set_type("message/delivery-status")
    fake.set_payload("\n\n".join(m.group(0) for m in _INLINE_FIELDS.finditer(text)))
    return _dsn_recipients([msg, fake]) if fake.get_payload() else ()


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
    for m in _ADDR_RE.finditer(body):
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


def _sentence_near(text: str, address: str, others: tuple[str, ...] = ()) -> str:
    """The remote's words about an address: from the line naming it to the next one that
    names another failed recipient, the copy of the original, or a status code's paragraph."""
    cut = _COPY_MARKER.search(text)
    body = text[:cut.start()] if cut else text
    at = body.lower().find(address.lower()) if address else -1
    if at < 0:
        lines = [line.strip() for line in body.splitlines() if line.strip()]
        return " ".join(lines)[:1000]
    start = body.rfind("\n", 0, at) + 1
    prefix = body[start:at]
    if prefix.strip() and not (_STATUS_IN_TEXT.search(body[at:at + 300])
                               or re.match(r"\s*([245]\d\d\b|>>>|<<<)", prefix)):
        start = max(body.rfind("\n\n", 0, at), 0)  # the address is mid-sentence
    end = at + len(address)
    for other in others:
        if other.lower() != address.lower():
            pos = body.lower().find(other.lower(), end)
            if pos > 0:
                body = body[:body.rfind("\n", 0, pos) + 1 or pos]
    chunk = body[start:]
    for _ in range(3):  # the paragraph naming it, and the next ones until a code shows up
        nxt = body.find("\n\n", end + 2)
        end = nxt if nxt > 0 else len(body)
        chunk = body[start:end]
        if _STATUS_IN_TEXT.search(chunk) or _REPLY_IN_TEXT.search(chunk) or end == len(body):
            break
    return re.sub(r"\s+", " ", chunk).strip()[:1000]


_HOST_RE = re.compile(r"\b(?:host|server|mx)\s+\[?([a-z0-9][a-z0-9.\-]+\.[a-z]{2,})", re.I)


def _remote_near(text: str) -> str | None:
    m = _HOST_RE.search(text)
    return m.group(1).lower() if m else None


# -- the original message -----------------------------------------------------------


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
            headers = tuple((k, re.sub(r"\s+", " ", str(v)).strip())
                            for k, v in enclosed.items())
            get = {k.lower(): v for k, v in reversed(headers)}
            return Original(return_path=_address_of(get.get("return-path")) or None,
                            message_id=get.get("message-id"),
                            feedback_id=get.get("feedback-id"), headers=headers)
    return Original()
