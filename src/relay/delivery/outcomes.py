"""What one delivery result means for a recipient: delivered, deferred with backoff, bounced
(hard or soft, with its reason) or expired, and whether its sender asked for a report."""

from __future__ import annotations

import random
from collections.abc import Callable

from .. import metrics
from ..config import DeliveryConfig
from ..errors import DeliveryFailure
from ..feedback import bounce_reasons
from ..feedback.dsn import EXPIRED_STATUS
from ..store.delivery import AttemptRecord, DueRecipient, Outcome
from ..types import EventType, RecipientStatus
from .outbound import Result, reply_text


def backoff(attempts: int, *, minimum: float, maximum: float,
            rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after the `attempts`-th failure: doubling from minimum, capped, ±10 %."""
    base = min(maximum, minimum * 2 ** max(0, attempts - 1))
    return min(maximum, base * (0.9 + 0.2 * rand()))


def wants_report(notify: tuple[str, ...], kind: str) -> bool:
    """RFC 3461: no NOTIFY means failures only; NEVER means nothing."""
    if not notify:
        return kind == "FAILURE"
    return kind in notify


def _expired(r: DueRecipient, now: float, attempt: AttemptRecord | None, last: str,
             data: dict[str, object]) -> Outcome:
    """The queue lifetime ran out: a soft failure, reported with the fields a bounce has
    (class, reason, status, diagnostic), so that every failure reads the same."""
    return Outcome(recipient_id=r.id, message_id=r.message_id, at=now, attempt=attempt,
                   status=RecipientStatus.EXPIRED, event=EventType.EXPIRED,
                   event_data={**data, "class": "soft", "reason": "expired",
                               "status": data.get("enhanced") or EXPIRED_STATUS,
                               "diagnostic": f"expired after the queue lifetime; last: {last}"},
                   last_reply=last, bounce_class="soft",
                   dsn="failed" if wants_report(r.notify, "FAILURE") else None)


class Outcomes:
    """Turns results into outcomes with the [delivery] retry schedule and queue lifetime."""

    def __init__(self, delivery: DeliveryConfig, clock: Callable[[], float]) -> None:
        self._delivery = delivery
        self._clock = clock

    def of_result(self, r: DueRecipient, res: Result, signed: str | None = None) -> Outcome:
        if res.held_until is not None and res.code is None:  # never tried: no attempt
            return self.held(r, res.text, res.held_until, "site")
        attempt = AttemptRecord(
            started_at=res.started_at, duration=res.duration, mx_host=res.mx_host, ip=res.ip,
            port=res.port, tls_version=res.tls_version, tls_cipher=res.tls_cipher,
            code=res.code, enhanced=res.enhanced, text=res.text, outcome=res.outcome,
            signed=signed, source_ip=res.source_ip, tls_policy=res.tls_policy,
            tls_failure=res.tls_failure)
        reply = reply_text(res.code, res.enhanced, res.text)
        data = {"email": r.address, "mxHost": res.mx_host, "code": res.code,
                "enhanced": res.enhanced, "reply": res.text}
        now = self._clock()
        if res.outcome == "delivered":
            # NOTIFY=SUCCESS: a peer without DSN cannot report delivery, so we say "relayed"
            relayed = wants_report(r.notify, "SUCCESS") and not res.peer_dsn
            return Outcome(recipient_id=r.id, message_id=r.message_id, at=now, attempt=attempt,
                           status=RecipientStatus.DELIVERED, event=EventType.DELIVERED,
                           event_data=data, last_reply=reply, dsn="relayed" if relayed else None)
        if res.outcome == "bounced":
            return self._bounced(r, now, attempt, reply, data, hard=res.hard, stage=res.stage)
        return self._deferred(r, now, attempt, reply, data, until=res.held_until)

    def of_failure(self, r: DueRecipient, failure: DeliveryFailure,
                   started: float) -> Outcome:
        now = self._clock()
        attempt = AttemptRecord(
            started_at=started, duration=now - started, mx_host=None, ip=None, port=None,
            tls_version=None, tls_cipher=None, code=failure.code, enhanced=failure.enhanced,
            text=failure.text, outcome="bounced" if failure.permanent else "deferred")
        reply = reply_text(failure.code, failure.enhanced, failure.text)
        data = {"email": r.address, "code": failure.code, "enhanced": failure.enhanced,
                "reply": failure.text}
        if failure.permanent:
            return self._bounced(r, now, attempt, reply, data, hard=failure.hard)
        return self._deferred(r, now, attempt, reply, data)

    def held(self, r: DueRecipient, reason: str, until: float, kind: str) -> Outcome:
        """Put back without an attempt until `until` (kind "site": its site is held back;
        "warmup": its pool's warm-up caps are spent): deferred, with no attempt counted."""
        metrics.held(kind)
        now = self._clock()
        expires = r.created_at + self._delivery.queue_lifetime
        data: dict[str, object] = {"email": r.address, "code": None, "enhanced": "4.7.0",
                                   "reply": reason}
        if now >= expires:
            return _expired(r, now, None, reason, data)
        next_at = min(max(until, now + 1.0), expires)
        return Outcome(recipient_id=r.id, message_id=r.message_id, at=now,
                       status=RecipientStatus.DEFERRED, event=EventType.DEFERRED,
                       event_data={**data, "nextAttemptAt": next_at, "held": True},
                       next_attempt_at=next_at, last_reply=reason)

    def _bounced(self, r: DueRecipient, now: float, attempt: AttemptRecord, reply: str,
                 data: dict[str, object], *, hard: bool,
                 stage: str | None = None) -> Outcome:
        klass = "hard" if hard else "soft"
        # the same fields as a bounce that comes back later (inbound.py)
        reason, _ = bounce_reasons.classify(attempt.enhanced, attempt.code, attempt.text,
                                            stage=stage)
        return Outcome(recipient_id=r.id, message_id=r.message_id, at=now, attempt=attempt,
                       status=RecipientStatus.BOUNCED, event=EventType.BOUNCED,
                       event_data={**data, "class": klass, "reason": reason,
                                   "status": attempt.enhanced, "diagnostic": reply,
                                   "remoteMta": attempt.mx_host}, last_reply=reply,
                       bounce_class=klass,
                       dsn="failed" if wants_report(r.notify, "FAILURE") else None)

    def _deferred(self, r: DueRecipient, now: float, attempt: AttemptRecord, reply: str,
                  data: dict[str, object], until: float | None = None) -> Outcome:
        """`until`: the reply held its site back; the recipient waits for the hold."""
        expires = r.created_at + self._delivery.queue_lifetime
        if now >= expires:
            return _expired(r, now, attempt, reply, data)
        wait = backoff(r.attempts + 1, minimum=self._delivery.retry_min,
                       maximum=self._delivery.retry_max)
        next_at = min(max(until, now + wait) if until else now + wait, expires)
        first = r.attempts == 0
        return Outcome(recipient_id=r.id, message_id=r.message_id, at=now, attempt=attempt,
                       status=RecipientStatus.DEFERRED, event=EventType.DEFERRED,
                       event_data={**data, "nextAttemptAt": next_at}, next_attempt_at=next_at,
                       last_reply=reply,
                       dsn="delayed" if first and wants_report(r.notify, "DELAY") else None)

    def failed(self, r: DueRecipient, exc: BaseException) -> Outcome:
        return Outcome(recipient_id=r.id, message_id=r.message_id, at=self._clock(),
                       status=RecipientStatus.FAILED, event=EventType.FAILED,
                       event_data={"email": r.address, "error": f"{type(exc).__name__}: {exc}"},
                       last_reply=f"internal error: {type(exc).__name__}")

