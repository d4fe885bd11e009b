"""The answer for content [retention] has dropped: 410 body_pruned, never a 404 that reads as
"no such email" nor a 500. The message's history (GET /v1/emails/{id}) is still there."""

from __future__ import annotations

from ..store import SQLiteStore
from ..timefmt import iso_seconds
from .errors import ApiError


async def raise_if_pruned(store: SQLiteStore, message_id: str) -> None:
    """Raise 410 if retention dropped this message's body; return if it did not."""
    when = await store.body_pruned_at(message_id)
    if when is not None:
        raise ApiError(410, f"the body of email {message_id} was pruned at {iso_seconds(when)}"
                       " ([retention] bodies_days); its history is still kept",
                       type="body_pruned", param="id")
