"""A Composition (what the JSON APIs describe) → RFC 5322 bytes, with the stdlib `email` package.

Built with the compat32 MIME classes, about four times faster than EmailMessage's API. Text
is UTF-8 in quoted-printable (7-bit US-ASCII when it is plain ASCII), non-ASCII names and
subjects are RFC 2047 encoded, and Bcc never appears."""

from __future__ import annotations

import base64
import email.charset
import email.utils
import functools
import hashlib
import re
from collections.abc import Mapping
from email.generator import BytesGenerator
from email.header import Header
from email.mime.application import MIMEApplication
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.nonmultipart import MIMENonMultipart
from email.mime.text import MIMEText
from io import BytesIO
from typing import Any

import orjson

from .errors import ValidationError
from .types import Attachment, Composition, Mailbox

_UTF8_QP = email.charset.Charset("utf-8")
_UTF8_QP.body_encoding = email.charset.QP
_UTF8_QP.header_encoding = email.charset.QP

# What may not be in a header value: NUL, CR, LF, and every other character str.splitlines()
# breaks at, because the compat32 folding below splits a value there and writes each piece
# on a line of its own (a "\x0b" or "\x1c" ends the header as a CRLF would; "\u2028" and
# "\x85" silently lose the text's break inside an encoded word).
_LINE_BREAKS = re.compile(r"[\x00\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def check_header_text(value: str, param: str) -> None:
    """Refuse text that would end the header it is written into and start another (header
    injection): the one rule for every subject, display name and header value relay
    writes, whichever API or template it came from."""
    found = _LINE_BREAKS.search(value)
    if found is not None:
        raise ValidationError(
            f"{param}: a header may not contain CR, LF, NUL or another line break "
            f"({found.group()!r} at {found.start()})", param=param)


def check_headers(c: Composition) -> None:
    """Every text of the composition that becomes a header (or a MIME part's header), as
    it will be written: after templates are filled, before anything is queued. The params
    are the native API's names; an adapter whose names differ checks its fields first."""
    check_header_text(c.subject, "subject")
    _check_mailbox(c.sender, "from")
    for field, boxes in (("to", c.to), ("cc", c.cc), ("replyTo", c.reply_to)):
        for i, m in enumerate(boxes):
            if _LINE_BREAKS.search(m.email) or m.name and _LINE_BREAKS.search(m.name):
                _check_mailbox(m, f"{field}[{i}]")  # refused, naming it (made only then)
    for name, value in c.headers:
        check_header_text(name, f"headers.{name}")
        check_header_text(value, f"headers.{name}")
    for i, a in enumerate(c.attachments):
        check_header_text(a.filename, f"attachments[{i}].filename")
        check_header_text(a.content_type, f"attachments[{i}].contentType")
        if a.content_id is not None:
            check_header_text(a.content_id, f"attachments[{i}].contentId")


def _check_mailbox(m: Mailbox, param: str) -> None:
    check_header_text(m.email, param)
    if m.name:
        check_header_text(m.name, f"{param}.name")


def build(c: Composition, *, message_id: str | None = None, date: str | None = None) -> bytes:
    """The message's bytes with CRLF line endings (`submit` adds Message-ID and Date when
    they are not given here)."""
    check_headers(c)  # submit checked it; mail queued before that check must not go out
    body = _alternatives(c)
    inline = [a for a in c.attachments if a.content_id]
    files = [a for a in c.attachments if not a.content_id]
    if inline:
        related = MIMEMultipart("related")
        related.attach(body)
        for a in inline:
            related.attach(_part(a, inline=True))
        body = related
    if files or c.ical:
        mixed = MIMEMultipart("mixed")
        mixed.attach(body)
        for a in files:
            mixed.attach(_part(a, inline=False))
        if c.ical:
            invite = MIMEText(c.ical, "calendar", _charset(c.ical))
            invite.add_header("Content-Disposition", "attachment", filename="invite.ics")
            mixed.attach(invite)
        body = mixed
    message = body
    for part in message.walk():  # MIMEBase gives each part one; only the top needs it
        if part is not message:
            del part["MIME-Version"]
    head = [("From", _address(c.sender))]
    if c.to:
        head.append(("To", ", ".join(_address(m) for m in c.to)))
    if c.cc:
        head.append(("Cc", ", ".join(_address(m) for m in c.cc)))
    if c.reply_to:
        head.append(("Reply-To", ", ".join(_address(m) for m in c.reply_to)))
    head.append(("Subject", _unstructured(c.subject)))
    head += [(n, v) for n, v in (("Date", date), ("Message-ID", message_id)) if v]
    head += [(name, _unstructured(value)) for name, value in c.headers]
    # the top-level MIME headers go after ours, as mail clients write them
    mime = list(message.items())
    for name in list(message.keys()):
        del message[name]
    for name, value in head + mime:
        message[name] = value
    if "MIME-Version" not in message:
        message["MIME-Version"] = "1.0"
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, maxheaderlen=78).flatten(message, linesep="\r\n")
    return out.getvalue()


def _alternatives(c: Composition) -> MIMEBase:
    parts: list[MIMEBase] = []
    if c.text is not None:
        parts.append(MIMEText(c.text, "plain", _charset(c.text)))
    if c.html is not None:
        parts.append(MIMEText(c.html, "html", _charset(c.html)))
    if c.ical:
        calendar = MIMEText(c.ical, "calendar", _charset(c.ical))
        calendar.set_param("method", _ical_method(c.ical))
        parts.append(calendar)
    if not parts:
        parts.append(MIMEText("", "plain", "us-ascii"))
    if len(parts) == 1:
        return parts[0]
    alternative = MIMEMultipart("alternative")
    for p in parts:
        alternative.attach(p)
    return alternative


def _charset(text: str) -> str | email.charset.Charset:
    return "us-ascii" if text.isascii() else _UTF8_QP


def _ical_method(ical: str) -> str:
    for line in ical.splitlines():
        if line.upper().startswith("METHOD:"):
            return line.split(":", 1)[1].strip().upper() or "REQUEST"
    return "REQUEST"


def _part(a: Attachment, *, inline: bool) -> MIMENonMultipart:
    maintype, _, subtype = a.content_type.partition("/")
    part = MIMEApplication(a.content, subtype or "octet-stream")
    part.replace_header("Content-Type", f"{maintype}/{subtype or 'octet-stream'}")
    filename = a.filename if a.filename.isascii() else ("utf-8", "", a.filename)
    part.add_header("Content-Disposition", "inline" if inline else "attachment",
                    filename=filename)
    if inline and a.content_id:
        part.add_header("Content-ID", f"<{a.content_id}>")
    return part


def _address(m: Mailbox) -> str:
    return email.utils.formataddr((m.name or "", m.email), charset="utf-8")


def _unstructured(value: str) -> str:
    if value.isascii():
        return value
    return Header(value, _UTF8_QP).encode()


# -- stored form: a composition is queued as JSON and built at delivery ---------------------

# an attachment at least this large is stored once as a part, by its SHA-256, and named by
# it in each composition that carries it (one file sent to many recipients, e.g. MailChannels'
# personalizations, is one row and one bytes object, not a copy per message)
PART_MIN = 16 * 1024


@functools.lru_cache(maxsize=64)
def part_id(content: bytes) -> str:
    """An attachment's part id. Cached: the personalizations of one request share one bytes
    object, whose hash Python keeps, so it is digested once, not once per message."""
    return hashlib.sha256(content).hexdigest()


def dumps(c: Composition, *, message_id: str, date: str,
          parts: dict[str, bytes] | None = None) -> bytes:
    """The composition with its fixed Message-ID and Date, as the queue stores it. With
    `parts`, attachments of PART_MIN octets or more go there ({part id: content}) and the
    stored form names them ("ref") instead of holding them."""
    def content(a: Attachment) -> dict[str, str]:
        if parts is None or len(a.content) < PART_MIN:
            return {"content": base64.b64encode(a.content).decode("ascii")}
        ref = part_id(a.content)
        parts[ref] = a.content
        return {"ref": ref}

    return orjson.dumps({
        "v": 1, "messageId": message_id, "date": date, "from": [c.sender.email, c.sender.name],
        "to": _boxes(c.to), "cc": _boxes(c.cc), "replyTo": _boxes(c.reply_to),
        "subject": c.subject, "text": c.text, "html": c.html,
        "headers": [list(h) for h in c.headers] if c.headers else [], "ical": c.ical,
        "attachments": [{"filename": a.filename, "contentType": a.content_type,
                         "contentId": a.content_id, **content(a)}
                        for a in c.attachments] if c.attachments else [],
    })


def _boxes(boxes: tuple[Mailbox, ...]) -> list[list[str | None]]:
    return [[m.email, m.name] for m in boxes] if boxes else []


def part_refs(stored: bytes) -> list[str]:
    """The part ids a stored composition names (none in one stored before parts existed)."""
    if b'"ref"' not in stored:
        return []
    return [a["ref"] for a in orjson.loads(stored)["attachments"] if "ref" in a]


def inline_parts(stored: bytes, parts: Mapping[str, bytes]) -> bytes:
    """The stored form with its parts put back in (base64), as if it had none."""
    d = orjson.loads(stored)
    for a in d["attachments"]:
        if "ref" in a:
            a["content"] = base64.b64encode(parts[a.pop("ref")]).decode("ascii")
    return orjson.dumps(d)


def loads(stored: bytes, parts: Mapping[str, bytes] | None = None
          ) -> tuple[Composition, str, str]:
    d = orjson.loads(stored)

    def content(a: dict[str, Any]) -> bytes:
        if "ref" in a:
            if parts is None or a["ref"] not in parts:
                raise KeyError(f"part {a['ref']} is not given")
            return parts[a["ref"]]
        return base64.b64decode(a["content"])

    def box(v: list[str | None]) -> Mailbox:
        return Mailbox(email=str(v[0]), name=v[1])

    c = Composition(
        sender=box(d["from"]), to=tuple(box(v) for v in d["to"]),
        cc=tuple(box(v) for v in d["cc"]), reply_to=tuple(box(v) for v in d["replyTo"]),
        subject=d["subject"], text=d["text"], html=d["html"],
        headers=tuple((n, v) for n, v in d["headers"]), ical=d["ical"],
        attachments=tuple(Attachment(filename=a["filename"], content_type=a["contentType"],
                                     content_id=a["contentId"], content=content(a))
                          for a in d["attachments"]))
    return c, d["messageId"], d["date"]


def materialize(stored: bytes, kind: str, parts: Mapping[str, bytes] | None = None) -> bytes:
    """The message's bytes from what the queue holds (raw bytes, or a composition and the
    parts it names)."""
    if kind == "raw":
        return stored
    c, message_id, date = loads(stored, parts)
    return build(c, message_id=message_id, date=date)


def estimated_size(c: Composition) -> int:
    """About what `build` will make, without building it: base64 is 4/3 plus line ends."""
    # quoted-printable makes a non-ASCII octet three (=XX); ASCII text stays as it is
    text = files = 0.0  # loops, not sum() of generators: this runs for every message
    for x in (c.text, c.html, c.ical, c.subject):
        if x:
            text += len(x) * 1.05 if x.isascii() else len(x.encode()) * 3
    for a in c.attachments:
        files += len(a.content) * 4 / 3 * 78 / 76 + 300
    headers = 0
    for n, v in c.headers:
        headers += len(n) + len(v) + 4
    return int(text + files + 1000 + headers)
