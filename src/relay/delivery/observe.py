"""The scheduler's committed outcomes, told to the log (logline) and the metrics (relay.metrics)
with what only the scheduler knows of each recipient: its address, destination domain and when
its message was queued."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .. import metrics
from ..store.delivery import DueRecipient, Outcome
from ..types import RecipientStatus
from .logline import log_outcomes


def observe(outcomes: Sequence[Outcome], by_id: Mapping[int, DueRecipient],
            message_ids: Mapping[str, str] | None = None) -> None:
    """Log and count outcomes once they are committed (a failed commit is tried again: neither
    logged nor counted)."""
    log_outcomes(outcomes, by_id, message_ids or {})
    seen: list[metrics.Observed] = []
    for o in outcomes:
        r = by_id.get(o.recipient_id)
        queued = None
        if r is not None and o.status is RecipientStatus.DELIVERED:
            queued = o.at - r.created_at
        seen.append(metrics.Observed(
            outcome=o.status.value, domain=r.domain if r is not None else metrics.OTHER,
            attempt_seconds=o.attempt.duration if o.attempt is not None else None,
            queued_seconds=queued))
    metrics.observe(seen)
