"""PiiSend's send request (seed 001): its shape, and its own limits on the attachments and
on scheduled_at."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import Field, StringConstraints

from ...types import Attachment
from ..errors import ApiError
from ..schemas import Strict
from .common import decode_base64

MAX_FILES = 5
MAX_FILES_SIZE = 5 * 1024 * 1024  # decoded, all files together

AddressText = Annotated[str, StringConstraints(min_length=3, max_length=600,
                                               pattern=r"^[^\r\n]*$")]


class PsAttachment(Strict):
    filename: Annotated[str, StringConstraints(min_length=1, max_length=255,
                                               pattern=r"^[^\r\n/\\]*$")]
    content_type: Annotated[str, StringConstraints(
        pattern=r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+$")]
    content_b64: str


class PsSend(Strict):
    to: list[AddressText] = Field(min_length=1, max_length=1000)
    subject: Annotated[str, StringConstraints(max_length=998, pattern=r"^[^\r\n]*$")] | None = None
    html: str | None = None
    text: str | None = None
    from_: AddressText | None = None
    cc: list[AddressText] = Field(default_factory=list)
    reply_to: list[AddressText] = Field(default_factory=list)
    template_id: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    template_vars: dict[str, Any] = Field(default_factory=dict)
    domain_id: Annotated[str, StringConstraints(min_length=1, max_length=253)] | None = None
    track_opens: bool = False
    track_clicks: bool = False
    enable_unsubscribe: bool = False
    scheduled_at: datetime | None = None  # UTC; without an offset it is read as UTC
    attachments: list[PsAttachment] = Field(default_factory=list)


def attachments(m: PsSend) -> tuple[Attachment, ...]:
    """PiiSend's own limits: at most 5 files (400) and 5 MiB decoded in all (413)."""
    if len(m.attachments) > MAX_FILES:
        raise ApiError(400, f"at most {MAX_FILES} attachments, not {len(m.attachments)}",
                       param="attachments")
    out, total = [], 0
    for i, a in enumerate(m.attachments):
        content = decode_base64(a.content_b64, f"attachments[{i}].content_b64")
        total += len(content)
        if total > MAX_FILES_SIZE:
            raise ApiError(413, f"the attachments are over {MAX_FILES_SIZE} bytes (5 MiB) "
                           "decoded in all", param="attachments")
        out.append(Attachment(filename=a.filename, content=content, content_type=a.content_type))
    return tuple(out)


def scheduled(when: datetime | None) -> float | None:
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if when.timestamp() <= time.time():
        raise ApiError(422, "scheduled_at must be in the future (omit it to send now)",
                       param="scheduled_at")
    return when.timestamp()
