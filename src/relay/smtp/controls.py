"""The X-Relay-* control headers: what an SMTP-only app asks of relay inside its message."""

from __future__ import annotations

import json
import re
from typing import Any

from .. import rawmail
from ..errors import ValidationError
from ..types import Stream

_MAX_METADATA = 8192
_EMPTY_LINE = re.compile(rb"\r?\n\r?\n")


def read_controls(data: bytes) -> dict[str, Any]:
    """The X-Relay-* control headers of a message; a bad value names its header.

    Only the header is read: up to its first empty line in any line-break convention (each
    break normalises by itself, so that part normalised is the start of the whole message
    normalised), not the body, which submit reads once more."""
    end = _EMPTY_LINE.search(data)
    head = data[:end.end()] if end else data
    if b"x-relay-" not in head.lower():  # most mail: nothing to read (a quick look, ~1 µs)
        return {}
    headers, _ = rawmail.split(rawmail.normalize_newlines(head))
    out: dict[str, Any] = {}
    for h in headers:
        if not h.key.startswith("x-relay-"):
            continue
        value = h.value
        if h.key == "x-relay-tags":
            tags = tuple(t.strip() for t in value.split(",") if t.strip())
            if any(len(t) > 256 for t in tags) or len(tags) > 20:
                raise ValidationError("X-Relay-Tags: at most 20 tags of 256 characters",
                                      param=h.name)
            out["tags"] = tags
        elif h.key == "x-relay-metadata":
            try:
                meta = json.loads(value)
            except ValueError:
                meta = None
            if not isinstance(meta, dict) or len(value) > _MAX_METADATA:
                raise ValidationError("X-Relay-Metadata must be a JSON object (at most 8 KB)",
                                      param=h.name)
            out["metadata"] = meta
        elif h.key == "x-relay-stream":
            try:
                out["stream"] = Stream(value.strip().lower())
            except ValueError:
                raise ValidationError("X-Relay-Stream must be transactional or broadcast",
                                      param=h.name) from None
        elif h.key == "x-relay-pool":  # which [[delivery.pools]]: submit checks the name
            if not value.strip() or len(value.strip()) > 63:
                raise ValidationError("X-Relay-Pool must be a pool name of 1 to 63 characters",
                                      param=h.name)
            out["pool"] = value.strip()
        elif h.key == "x-relay-idempotency-key":
            if not value.strip() or len(value) > 255:
                raise ValidationError("X-Relay-Idempotency-Key must be 1 to 255 characters",
                                      param=h.name)
            out["idempotency_key"] = value.strip()
        else:
            raise ValidationError(f"{h.name}: unknown relay control header", param=h.name)
    return out
