"""Byte-exact reading and editing of an RFC 5322 header block, leaving the body untouched."""

from __future__ import annotations

import email.errors
import email.header
import email.utils
import re
from dataclasses import dataclass

_FIELD_NAME = re.compile(rb"^[\x21-\x39\x3b-\x7e]+$")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Header:
    name: str  # as written
    raw: bytes  # the whole field, folded lines included, ending in CRLF

    @property
    def key(self) -> str:
        return self.name.lower()

    @property
    def value(self) -> str:
        """The unfolded value, decoded as UTF-8 (RFC 6532) with bad bytes replaced."""
        _, _, value = self.raw.partition(b":")
        unfolded = re.sub(rb"\r\n(?=[ \t])", b"", value).strip()
        return unfolded.decode("utf-8", "replace")


def has_bare_newlines(data: bytes) -> bool:
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


def normalize_newlines(data: bytes) -> bytes:
    """Every bare CR or LF becomes CRLF (Postfix's smtpd_forbid_bare_newline = normalize)."""
    if not has_bare_newlines(data):
        return data
    return _LINE_BREAK.sub(b"\r\n", data)


def split(data: bytes) -> tuple[list[Header], bytes]:
    """Headers and the body (what follows the empty line, the line itself excluded).

    `data` must have CRLF line endings. A message without an empty line is all
    header; a line that is neither a field nor a continuation ends the header
    (RFC 5322 allows nothing else there) and starts the body.
    """
    headers: list[Header] = []
    pos = 0
    end = len(data)
    while pos < end:
        nl = data.find(b"\r\n", pos)
        line_end = end if nl < 0 else nl + 2
        line = data[pos:line_end]
        if line in (b"\r\n", b""):
            return headers, data[line_end:]
        if line[:1] in (b" ", b"\t") and headers:
            last = headers[-1]
            headers[-1] = Header(last.name, last.raw + line)
        else:
            name, colon, _ = line.partition(b":")
            name = name.rstrip(b" \t")
            if not colon or not _FIELD_NAME.match(name):
                return headers, data[pos:]  # not a header: the body starts here
            headers.append(Header(name.decode("ascii"), line if nl >= 0 else line + b"\r\n"))
        pos = line_end
    return headers, b""


def join(headers: list[Header], body: bytes) -> bytes:
    return b"".join(h.raw for h in headers) + b"\r\n" + body


def find(headers: list[Header], name: str) -> list[Header]:
    key = name.lower()
    return [h for h in headers if h.key == key]


def index(headers: list[Header]) -> dict[str, list[Header]]:
    """The fields by lower-cased name, each name's in order: one pass for many look-ups."""
    out: dict[str, list[Header]] = {}
    for h in headers:
        out.setdefault(h.name.lower(), []).append(h)
    return out


def first_value(headers: list[Header], name: str) -> str | None:
    found = find(headers, name)
    return found[0].value if found else None


def make(name: str, value: str) -> Header:
    """A new header field; the value must not carry CR or LF (checked by callers)."""
    if "\r" in value or "\n" in value:
        raise ValueError(f"{name}: header values may not contain CR or LF")
    return Header(name, f"{name}: {value}\r\n".encode())


# One mailbox with no quoting, comment, group or route: "addr@dom" or "Name <addr@dom>"
# (a display name of atoms and spaces). email.utils.getaddresses, which reads every form,
# costs ~25 µs a call; From is read at accept and again at delivery.
_ATOMS = r"[^\s<>@\",;:()\\\[\]]+"
_ONE_MAILBOX = re.compile(  # linear: no two adjacent parts share a character
    rf"\s*{_ATOMS}@({_ATOMS})\s*|[^<>@\",;:()\\\[\]]*<{_ATOMS}@({_ATOMS})>\s*")


# email.utils.getaddresses reads a comment inside a comment by calling itself: some 300
# nested "(" exhaust Python's stack (RecursionError), and no address needs more than a few
MAX_COMMENTS = 64


def getaddresses(values: list[str]) -> list[tuple[str, str]]:
    """email.utils.getaddresses; ValueError for values with more than MAX_COMMENTS "(" (a
    header no one writes but to break its reader)."""
    if any(v.count("(") > MAX_COMMENTS for v in values):
        raise ValueError(f"more than {MAX_COMMENTS} comments in an address field")
    return email.utils.getaddresses(values)


def address_domains(value: str) -> list[str]:
    """The domains of the addresses in a header value such as From's, as written (ValueError
    for one getaddresses will not read)."""
    m = _ONE_MAILBOX.fullmatch(value)
    if m is not None:
        return [m.group(1) or m.group(2)]
    return [addr.rpartition("@")[2] for _, addr in getaddresses([value]) if "@" in addr]


def decoded(value: str | None) -> str:
    """A header value with its RFC 2047 encoded words decoded."""
    if not value or "=?" not in value:
        return value or ""
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (email.errors.HeaderParseError, LookupError, UnicodeError, ValueError):
        return value
