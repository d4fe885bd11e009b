"""An email's custom headers and attachments as a JSON request gives them: the headers held
to relay's rules, the attachments base64-decoded and held to the size limits."""

from __future__ import annotations

import base64
import binascii
import mimetypes
from collections.abc import Iterable, Sequence
from typing import Any

from .. import compose
from ..errors import ValidationError
from ..types import Attachment, Stream
from .errors import ApiError
from .schemas import BROADCAST_HEADERS, RESERVED_HEADERS, AttachmentIn


def checked_headers(given: Iterable[tuple[str, Any]], stream: Stream, *, param: str = "headers",
                    reserved: frozenset[str] = RESERVED_HEADERS) -> tuple[tuple[str, str], ...]:
    """Custom headers: names relay writes itself are refused, as are line breaks in values
    (compose's one rule) and values past RFC 5322's 998 characters."""
    out = []
    for name, value in given:
        lower = name.lower()
        where = f"{param}.{name}"
        if lower in reserved or lower.startswith("x-relay-") or (
                stream is Stream.BROADCAST and lower in BROADCAST_HEADERS):
            raise ApiError(422, f"the {name} header is set by relay; it cannot be given",
                           param=where)
        if not isinstance(value, str):
            raise ApiError(422, f"{where}: a header value is a string", param=where)
        try:
            compose.check_header_text(value, where)
        except ValidationError as exc:
            raise ApiError(422, str(exc), param=where) from None
        if len(value) > 998:
            raise ApiError(422, f"{where}: a header value may not be longer than 998 "
                           "characters", param=where)
        if not name or len(name) > 76 or not all(33 <= ord(c) <= 126 and c != ":" for c in name):
            raise ApiError(422, f"{name!r} is not a header name", param=where)
        out.append((name, value))
    return tuple(out)


def decode_attachments(items: Sequence[AttachmentIn], *, max_file: int, max_total: int
                       ) -> tuple[Attachment, ...]:
    """Base64 contents decoded and held to the limits (octets, decoded): 413 past them."""
    out, total = [], 0
    for i, a in enumerate(items):
        try:
            content = base64.b64decode(a.content, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "content is not valid base64",
                           param=f"attachments[{i}].content") from None
        if len(content) > max_file:
            raise ApiError(413, f"{a.filename} is {len(content)} bytes; at most "
                           f"{max_file} a file", param=f"attachments[{i}]")
        total += len(content)
        if total > max_total:
            raise ApiError(413, f"the attachments are over {max_total} bytes in all",
                           param="attachments")
        out.append(Attachment(filename=a.filename, content=content,
                              content_type=a.contentType or _guess_type(a.filename),
                              content_id=a.contentId))
    return tuple(out)


def _guess_type(filename: str) -> str:
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"
