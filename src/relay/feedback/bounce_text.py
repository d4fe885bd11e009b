"""The words of a report meant for people: its readable text, the addresses, status and reply
codes in it, and the remote's sentence about each recipient (cut before the copy of the
original message)."""

from __future__ import annotations

import bisect
import itertools
import re
from email.message import Message

from .bounce_phrases import phrase_reason
from .bounce_reasons import ADDRESS_RE

STATUS_TYPES = ("message/delivery-status", "message/global-delivery-status")
STATUS_IN_TEXT = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?![\d.])")
REPLY_IN_TEXT = re.compile(r"(?<![\d.\-])([245][0-5]\d)(?:[ \-]|:(?!\d)|$)", re.M)

# the line after which a bounce quotes the original message (not "The original message
# was received at ...", which opens Sendmail's report, nor Postfix's "delete your own text
# from the attached returned message", which comes before its recipients)
COPY_MARKER = re.compile(
    r"^.*(original message (follows|below|headers|is (attached|included))|message headers follow"
    r"|copy of the (original )?message|(?<!attached )returned message|unsent message below"
    r"|below this line"
    r"|headers of the original|original message ?-{2,}|-{3,} ?original message"
    r"|^content-type: message/rfc822|^[ \t]*original message:?[ \t]*$).*$", re.I | re.M)


def walk(msg: Message) -> list[Message]:
    """The MIME parts, without the field blocks the email package makes of a
    delivery-status part (they are fields, not text for a person)."""
    parts = [msg]
    if msg.get_content_type() not in STATUS_TYPES and msg.is_multipart():
        for sub in msg.get_payload():
            if isinstance(sub, Message):
                parts += walk(sub)
    return parts


def report_words(parts: list[Message]) -> str:
    """The plain text of a report's own parts (walk's list), not of a message it encloses:
    a returned original's body says nothing of why it failed (a newsletter's "your account
    is suspended" would read as the reason). A message/rfc822 that holds a delivery-status
    part is the report itself, forwarded: its words count."""
    enclosed: set[int] = set()
    for part in parts:
        if part.get_content_maintype() == "message" and part.get_content_type() \
                not in STATUS_TYPES and id(part) not in enclosed:
            inner = walk(part)[1:]
            if not any(p.get_content_type() in STATUS_TYPES for p in inner):
                enclosed.update(id(p) for p in inner)
    return " ".join(part_text(p) for p in parts
                    if p.get_content_type() == "text/plain" and id(p) not in enclosed)


def part_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")


def all_text(msg: Message) -> str:
    """The readable text of a message, including parts whose MIME structure broke."""
    texts = []
    for part in walk(msg):
        if part.get_content_maintype() == "text":
            texts.append(part_text(part))
        elif part.is_multipart() is False and isinstance(part.get_payload(), str) and \
                part.get_content_maintype() == "multipart":
            texts.append(str(part.get_payload()))
    return "\n".join(texts)


def address_of(value: str | None) -> str:
    if not value:
        return ""
    value = re.sub(r"\s+", " ", str(value)).strip()
    if ";" in value:
        value = value.split(";", 1)[1]
    value = re.sub(r"<?@[^:<>@\s]+:", "", value.strip())  # an RFC 821 source route
    value = value.strip().strip("<>").strip()
    m = ADDRESS_RE.search(value)
    return lower_domain(m.group(0) if m else value)


def lower_domain(address: str) -> str:
    local, at, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}" if at else address


def after_type(value: str | None) -> str:
    text = re.sub(r"\s+", " ", str(value or "")).strip()
    return text.split(";", 1)[1].strip() if ";" in text else text


def status_in(text: str) -> str | None:
    m = STATUS_IN_TEXT.search(text or "")
    return m.group(1) if m else None


def failure_status_in(text: str) -> str | None:
    """The first status code in a failure's words that is one (4.x.x or 5.x.x): a session
    transcript quotes the 2.x.x of the commands the remote took before it refused one."""
    return next((m.group(1) for m in STATUS_IN_TEXT.finditer(text or "")
                 if m.group(1)[0] != "2"), None)


def failure_reply_in(text: str) -> int | None:
    """The first reply code in a failure's words that is one (4xx or 5xx)."""
    return next((int(m.group(1)) for m in REPLY_IN_TEXT.finditer(text or "")
                 if m.group(1)[0] != "2"), None)


def reply_code_in(text: str) -> int | None:
    m = REPLY_IN_TEXT.search(text or "")
    return int(m.group(1)) if m else None


def says_why(text: str) -> bool:
    return bool(STATUS_IN_TEXT.search(text) or REPLY_IN_TEXT.search(text)
                or phrase_reason(ADDRESS_RE.sub(" ", text)))


def error_text(text: str) -> str:
    cut = COPY_MARKER.search(text)
    return re.sub(r"\s+", " ", text[:cut.start()] if cut else text).strip()[:1000]


_HOST_RE = re.compile(r"\b(?:host|server|mx)\s+\[?([a-z0-9][a-z0-9.\-]+\.[a-z]{2,})", re.I)


def remote_near(text: str) -> str | None:
    m = _HOST_RE.search(text)
    return m.group(1).lower() if m else None


class Prose:
    """A report's text for people, cut before its copy of the original and read once, so
    that finding the words about each of many recipients does not read it again for each
    (nor, for each, look for every other recipient)."""

    def __init__(self, text: str, others: list[str] | None = None) -> None:
        cut = COPY_MARKER.search(text)
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
        if prefix.strip() and not (STATUS_IN_TEXT.search(body, at, at + 300)
                                   or re.match(r"\s*([245]\d\d\b|>>>|<<<)", prefix)):
            start = max(body.rfind("\n\n", 0, at), 0)  # the address is mid-sentence
        end = at + len(address)
        following = self._next_other(address.lower(), end)
        if following is not None:
            body = body[:self._words_of_next(*following, address.lower(), end)]
        chunk = body[start:]
        for _ in range(3):  # the paragraph naming it, and the next ones until a code shows up
            nxt = body.find("\n\n", end + 2)
            end = nxt if nxt > 0 else len(body)
            chunk = body[start:end]
            if STATUS_IN_TEXT.search(chunk) or REPLY_IN_TEXT.search(chunk) or \
                    end == len(body):
                break
        return re.sub(r"\s+", " ", chunk).strip()[:1000]

    def _next_other(self, address: str, end: int) -> tuple[int, str] | None:
        """Where the first other failed recipient is named at or after `end`, and which."""
        i = bisect.bisect_left(self._starts, end)
        for pos, named in itertools.islice(self._named, i, None):
            if named != address and pos > 0:
                return pos, named
        return None

    def _words_of_next(self, pos: int, named: str, address: str, end: int) -> int:
        """Where the words about the next recipient begin: the line naming it, or up to two
        lines above it that name its domain and not this address (Sendmail's "550
        example.org (smtp)... 550 Host unknown" above "554 <ann@example.org>... 550 Host
        unknown": the host's refusal, of that recipient, not of the one before)."""
        lower = self._lower
        cut = lower.rfind("\n", 0, pos) + 1 or pos
        domain = named.rpartition("@")[2]
        for _ in range(2):
            above = lower.rfind("\n", 0, max(cut - 1, 0)) + 1
            line = lower[above:cut]
            if above < end or address in line or not _names_host(line, domain):
                break
            cut = above
        return cut


def _names_host(line: str, domain: str) -> bool:
    """Whether a line names the domain, or a host in it, not as the domain of an address."""
    i = line.find(domain)
    while i >= 0:
        before = line[i - 1] if i else " "
        after = i + len(domain)
        if before != "@" and (after == len(line) or not line[after].isalnum()):
            return True
        i = line.find(domain, i + 1)
    return False
