"""Times as relay writes them: ISO 8601 in UTC with a Z, to the millisecond for the APIs and
events, to the second for the CLI's tables."""

from __future__ import annotations

import datetime


def iso(ts: float | None) -> str | None:
    """An API's or event's time (None stays None)."""
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def iso_seconds(ts: float | None) -> str:
    """A table's time ("" for none)."""
    if ts is None:
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(
        timespec="seconds").replace("+00:00", "Z")
