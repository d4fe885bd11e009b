"""Makes a message safe for any SMTP peer before it is signed: every body part 7-bit clean and
no line over 998 octets (RFC 5322 2.1.1, RFC 6152), so nobody downstream changes its bytes."""

from __future__ import annotations

import base64
import binascii
import io
from email.generator import BytesGenerator
from email.header import Header
from email.message import Message
from email.parser import BytesParser
from email.policy import Compat32

MAX_LINE = 998
CTE = "Content-Transfer-Encoding"
_EIGHT_BIT = ("8bit", "binary")


class _VerbatimHeaders(Compat32):
    """compat32, except that a parsed header goes back out exactly as it came in, folded only
    where a line is over 998 octets. Plain compat32 rewrites "Name:value" and "Name:  value"
    as "Name: value", adds a space after "Name:" when the value starts on the next line, and
    splits a value at a form feed or vertical tab into a line that does not start with WSP."""

    def header_source_parse(self, sourcelines: list[str]) -> tuple[str, str]:
        raw = "".join(sourcelines).rstrip("\r\n")
        if len(raw) > MAX_LINE:
            raw = _fold_lines(raw.encode("ascii", "surrogateescape")).decode(
                "ascii", "surrogateescape")
        name, value = raw.split(":", 1)
        return name, value  # the value keeps its leading whitespace

    def header_store_parse(self, name: str, value: str) -> tuple[str, str]:
        return name, " " + value

    def header_fetch_parse(self, name: str, value: str) -> str | Header:  # type: ignore[override]
        return super().header_fetch_parse(name, value.lstrip(" \t"))

    def fold(self, name: str, value: str) -> str:
        return f"{name}:{value}{self.linesep}"

    def fold_binary(self, name: str, value: str) -> bytes:
        return self.fold(name, value).encode("ascii", "surrogateescape")


_PARSER = BytesParser(policy=_VerbatimHeaders())


def needs_smtputf8(data: bytes) -> bool:
    """Whether the header section holds non-ASCII octets (RFC 6532 needs SMTPUTF8 for it)."""
    return not _split(data)[0].isascii()


def seven_bit(data: bytes) -> bytes:
    """The message with every body part 7-bit clean and no line over 998 octets (RFC 5322
    2.1.1, RFC 6152): 8-bit text as quoted-printable, anything else 8-bit as base64, long header
    lines folded. `data` itself (the same object) when there is nothing to change."""
    head, body = _split(data)
    if body.isascii() and not _has_long_line(data):
        return data
    if body.isascii() and not _has_long_line(body):
        return _fold_lines(head) + body
    try:
        message = _PARSER.parsebytes(data)
        _fix_message(message)
        out = io.BytesIO()
        BytesGenerator(out, mangle_from_=False, maxheaderlen=0).flatten(message, linesep="\r\n")
        return out.getvalue()
    except Exception:  # noqa: BLE001
        # A message the email package cannot take is delivered as it is: refusing it here would
        # lose mail that most peers (8BITMIME, long lines tolerated) accept anyway.
        return data


def _split(data: bytes) -> tuple[bytes, bytes]:
    """The header section with the empty line that ends it, and the body."""
    if data.startswith(b"\r\n"):
        return b"\r\n", data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data, b""
    return data[:end + 4], data[end + 4:]


def _has_long_line(data: bytes) -> bool:
    """Whether a line is over 998 octets, CRLF not counted. From the start of a line the next
    LF must come within 1,000 octets, so the scan steps about a line-length limit at a time."""
    start, size = 0, len(data)
    while size - start > MAX_LINE:
        newline = data.rfind(b"\n", start, start + MAX_LINE + 2)
        if newline < 0:
            return True
        start = newline + 1
    return False


def _fold_lines(block: bytes) -> bytes:
    """Each line over 998 octets folded before whitespace (RFC 5322 2.2.3); a line with no
    whitespace to fold at stays as it is."""
    out: list[bytes] = []
    for line in block.split(b"\r\n"):
        while len(line) > MAX_LINE:
            cut = _fold_point(line)
            if cut <= 0:
                break
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return b"\r\n".join(out)


def _fold_point(line: bytes) -> int:
    """The start of the last whitespace run that leaves at most 998 octets before it and
    something other than whitespace after it; 0 or -1 when there is none."""
    end = min(MAX_LINE + 1, len(line.rstrip(b" \t")))
    cut = max(line.rfind(b" ", 0, end), line.rfind(b"\t", 0, end))
    while cut > 0 and line[cut - 1] in b" \t":
        cut -= 1
    return cut


def _fix_message(message: Message) -> bool:
    """A whole message, at the top or inside message/rfc822. One without MIME headers whose
    body must change becomes text/plain (utf-8 when it decodes as such) first. Whether
    anything changed."""
    plain = "MIME-Version" not in message and "Content-Type" not in message
    if plain and not message.is_multipart() and _leaf_needs_encoding(message):
        try:
            _content(message).decode("utf-8")
            charset = "utf-8"
        except UnicodeDecodeError:
            charset = "unknown-8bit"
        message["MIME-Version"] = "1.0"
        message["Content-Type"] = f'text/plain; charset="{charset}"'
    changed = _fix_part(message)
    if changed and "MIME-Version" not in message:
        message["MIME-Version"] = "1.0"
    return changed


def _fix_part(part: Message) -> bool:
    """Re-encode the leaves under `part` that need it; whether anything changed."""
    if not part.is_multipart():
        return _fix_leaf(part)
    fix = _fix_message if part.get_content_maintype() == "message" else _fix_part
    changed = False
    for child in part.get_payload():
        assert isinstance(child, Message)
        changed = fix(child) or changed
    if _cte(part) in _EIGHT_BIT:
        _set_header(part, CTE, "7bit")
        changed = True
    return changed


def _fix_leaf(part: Message) -> bool:
    if not _leaf_needs_encoding(part):
        if _cte(part) not in _EIGHT_BIT:
            return False
        _set_header(part, CTE, "7bit")  # ASCII with short lines: 7bit says what it is
        return True
    content = _content(part)
    if part.get_content_maintype() == "text":
        part.set_payload(_quoted_printable(content).decode("ascii"))
        _set_header(part, CTE, "quoted-printable")
    else:
        part.set_payload(base64.encodebytes(content).replace(b"\n", b"\r\n").decode("ascii"))
        _set_header(part, CTE, "base64")
    return True


def _leaf_needs_encoding(part: Message) -> bool:
    payload = part.get_payload()
    if not isinstance(payload, str):
        return False
    return not payload.isascii() or _has_long_line(payload.encode("ascii"))


def _quoted_printable(content: bytes) -> bytes:
    """Quoted-printable with CRLF line breaks; a bare CR or LF is encoded (=0D, =0A)."""
    lines = (binascii.b2a_qp(line, istext=False) for line in content.split(b"\r\n"))
    return b"\r\n".join(line.replace(b"=\n", b"=\r\n") for line in lines)


def _content(part: Message) -> bytes:
    """The decoded body of a leaf part."""
    content = part.get_payload(decode=True)
    return content if isinstance(content, bytes) else b""


def _cte(part: Message) -> str:
    return str(part.get(CTE, "7bit")).strip().lower()


def _set_header(part: Message, name: str, value: str) -> None:
    """Replace the header in place; several copies of it become one at the end."""
    if len(part.get_all(name, [])) == 1:
        part.replace_header(name, value)
    else:
        del part[name]
        part[name] = value
