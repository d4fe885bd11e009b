"""Makes a message safe for any SMTP peer before it is signed: every body part 7-bit clean and
no line over 998 octets (RFC 5322 2.1.1, RFC 6152), so nobody downstream changes signed bytes."""

from __future__ import annotations

import base64
import email.policy
import io
import quopri
from email.generator import BytesGenerator
from email.message import Message
from email.parser import BytesParser

MAX_LINE = 998
_PARSER = BytesParser(policy=email.policy.compat32)


def needs_smtputf8(data: bytes) -> bool:
    """Whether the header section holds non-ASCII octets (RFC 6532 needs SMTPUTF8 for it)."""
    end = data.find(b"\r\n\r\n")
    return not (data if end < 0 else data[:end]).isascii()


def seven_bit(data: bytes) -> bytes:
    """The message with 8-bit parts re-encoded (text as quoted-printable, the rest base64) and
    over-long header lines folded; `data` itself when there is nothing to change."""
    end = data.find(b"\r\n\r\n")
    head, body = (data, b"") if end < 0 else (data[:end + 2], data[end + 4:])
    long_head, long_body = _has_long_line(head), _has_long_line(body)
    if body.isascii() and not long_head and not long_body:
        return data
    if long_head:
        head = _fold_long_header_lines(head)
        data = head + b"\r\n" + body
    if body.isascii() and not long_body:
        return data
    try:
        message = _PARSER.parsebytes(data)
        if not message.is_multipart() and message.get("MIME-Version") is None \
                and message.get("Content-Type") is None:
            _declare_plain_text(message, body)
        _fix(message)
        out = io.BytesIO()
        BytesGenerator(out, mangle_from_=False, maxheaderlen=0).flatten(message, linesep="\r\n")
        return out.getvalue()
    except Exception:  # noqa: BLE001 - a message the email package cannot take goes as it is
        return data


def _has_long_line(data: bytes) -> bool:
    return len(data) > MAX_LINE and max(map(len, data.split(b"\n"))) > MAX_LINE + 1


def _fix(part: Message) -> None:
    """Re-encode the leaves that need it; a container that said 8bit/binary then says 7bit."""
    cte = (part.get("Content-Transfer-Encoding") or "7bit").strip().lower()
    if part.is_multipart():
        for child in part.get_payload():
            _fix(child)
        if cte in ("8bit", "binary"):
            part.replace_header("Content-Transfer-Encoding", "7bit")
        return
    raw = part.get_payload()  # str; 8-bit octets come back decoded or surrogate-escaped
    if isinstance(raw, str) and raw.isascii() and not _has_long_line(raw.encode()) \
            and cte not in ("8bit", "binary"):
        return
    content = part.get_payload(decode=True) or b""
    if part.get_content_maintype() == "text":
        encoded = quopri.encodestring(content.replace(b"\r\n", b"\n"), quotetabs=False)
        payload, new_cte = encoded.replace(b"\n", b"\r\n").decode("ascii"), "quoted-printable"
        if not payload.endswith("\r\n") and content.endswith(b"\n"):
            payload += "\r\n"
    else:
        b64 = base64.encodebytes(content).replace(b"\n", b"\r\n")
        payload, new_cte = b64.decode("ascii"), "base64"
    part.set_payload(payload)
    if "Content-Transfer-Encoding" in part:
        part.replace_header("Content-Transfer-Encoding", new_cte)
    else:
        part["Content-Transfer-Encoding"] = new_cte


def _declare_plain_text(message: Message, body: bytes) -> None:
    try:
        body.decode("utf-8")
        charset = "utf-8"
    except UnicodeDecodeError:
        charset = "unknown-8bit"
    message["MIME-Version"] = "1.0"
    message["Content-Type"] = f'text/plain; charset="{charset}"'


def _fold_long_header_lines(head: bytes) -> bytes:
    lines = head.split(b"\r\n")
    out = []
    for line in lines:
        while len(line) > MAX_LINE:
            cut = max(line.rfind(b" ", 1, MAX_LINE), line.rfind(b"\t", 1, MAX_LINE))
            if cut <= 0:
                break  # nowhere to fold: rare, and left as it is
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return b"\r\n".join(out)
