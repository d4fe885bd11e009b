"""The log line of each delivery attempt and each terminal outcome, written once its outcome is
committed (a line means it is on disk), in the shape a Postfix admin greps for:

    msg_0V7Q...: to=<bob@b.example>, relay=mx.b.example[192.0.2.7]:25, delay=1.2,
    tls=TLSv1.3/TLS_AES_256_GCM_SHA384, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as X)

and the same facts as `extra=` fields (queue_id, to, relay, ip, port, delay, dsn, status,
reply, ...) for the JSON format. Also the line of each bounce and complaint that comes back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from ..logs import cut
from ..store.delivery import DueRecipient, Outcome
from ..store.inbound import Effect, InboundRecord
from ..types import EventType, RecipientStatus

log = logging.getLogger("relay.delivery")
inbound_log = logging.getLogger("relay.inbound")

# Postfix's words where it has one (status=sent), relay's status names elsewhere
STATUS_WORDS = {RecipientStatus.DELIVERED: "sent", RecipientStatus.DEFERRED: "deferred",
                RecipientStatus.BOUNCED: "bounced", RecipientStatus.EXPIRED: "expired",
                RecipientStatus.SUPPRESSED: "suppressed", RecipientStatus.FAILED: "failed"}


def dsn_status(enhanced: str | None, code: int | None) -> str | None:
    """The enhanced status code, or the class a bare reply code implies (2.0.0, 4.0.0, 5.0.0)."""
    if enhanced:
        return enhanced
    if code and 200 <= code < 600:
        return f"{code // 100}.0.0"
    return None


def outcome_fields(o: Outcome, due: DueRecipient | None,
                   message_id: str | None = None) -> dict[str, Any]:
    """What one outcome says, by name (the JSON object's fields)."""
    a = o.attempt
    out: dict[str, Any] = {
        "queue_id": o.message_id,
        "to": cut(due.address if due else o.event_data.get("email", "")),
        "status": STATUS_WORDS.get(o.status, o.status.value),
        "message_id": cut(message_id.strip("<> \t")) if message_id else None,
    }
    if a is not None:
        out.update(relay=cut(a.mx_host) if a.mx_host else None, ip=a.ip, port=a.port,
                   tls_version=a.tls_version, tls_cipher=a.tls_cipher, code=a.code,
                   attempt_duration=round(a.duration, 3))
        out["dsn"] = dsn_status(a.enhanced, a.code)
    elif o.status is RecipientStatus.FAILED:
        out["dsn"] = "4.3.0"  # parked after an internal error: nothing final yet
    if due is not None:
        out["delay"] = round(max(0.0, o.at - due.created_at), 3)
        out["attempt"] = due.attempts + 1
    if o.next_attempt_at is not None:
        out["next_attempt_in"] = round(max(0.0, o.next_attempt_at - o.at), 1)
    reply = o.last_reply or o.event_data.get("error") or ""
    if reply:
        out["reply"] = cut(reply)
    return {k: v for k, v in out.items() if v is not None}


def outcome_line(f: Mapping[str, Any]) -> str:
    """The Postfix-shaped text of an outcome's fields."""
    parts = [f"to=<{f['to']}>"]
    if f.get("message_id"):
        parts.append(f"message-id=<{f['message_id']}>")
    relay = f.get("relay")
    if relay:
        ip = f"[{f['ip']}]" if f.get("ip") else ""
        port = f":{f['port']}" if f.get("port") else ""
        parts.append(f"relay={relay}{ip}{port}")
    elif "code" in f or f["status"] in ("deferred", "bounced", "expired"):
        parts.append("relay=none")
    if "delay" in f:
        parts.append(f"delay={f['delay']:g}")
    if f.get("tls_version"):
        parts.append(f"tls={f['tls_version']}/{f.get('tls_cipher') or '-'}")
    if f.get("dsn"):
        parts.append(f"dsn={f['dsn']}")
    status = f"status={f['status']}"
    if f.get("reply"):
        status += f" ({f['reply']})"
    parts.append(status)
    return f"{f['queue_id']}: " + ", ".join(parts)


def log_outcomes(outcomes: Iterable[Outcome], due: Mapping[int, DueRecipient],
                 message_ids: Mapping[str, str] | None = None) -> None:
    """A line for each committed outcome; internal failures at ERROR, the rest at INFO."""
    if not log.isEnabledFor(logging.INFO):
        return
    for o in outcomes:
        try:
            f = outcome_fields(o, due.get(o.recipient_id),
                               (message_ids or {}).get(o.message_id))
            line = outcome_line(f)
        except Exception:  # a line must never cost the report or the next outcome
            log.exception("could not make the log line of %s", o.message_id)
            continue
        level = logging.ERROR if o.status is RecipientStatus.FAILED else logging.INFO
        log.log(level, "%s", line, extra=f)


_NO_EFFECT = {"unmatched": "matches no message of ours; discarded",
              "recorded": "recorded; it changes nothing"}
_EFFECT_WORDS = {EventType.BOUNCED: "bounced", EventType.COMPLAINED: "complained",
                 EventType.DELAYED: "delayed"}


def log_inbound(record: InboundRecord, effects: Iterable[Effect]) -> None:
    """A line for each recipient a report that came back changed (a late bounce, a
    complaint, a delay), or one for a report that matched nothing of ours."""
    base = {"report": record.type, "report_from": cut(record.mail_from),
            "report_to": cut(record.envelope_to)}
    any_effect = False
    for e in effects:
        any_effect = True
        word = _EFFECT_WORDS.get(e.event, e.event.value)
        f: dict[str, Any] = {**base, "queue_id": e.message_id, "to": cut(e.address),
                             "status": word}
        if e.attempt is not None:
            f["dsn"] = dsn_status(e.attempt.enhanced, e.attempt.code)
            if e.attempt.mx_host:
                f["relay"] = cut(e.attempt.mx_host)
        if e.last_reply:
            f["reply"] = cut(e.last_reply)
        if e.event is EventType.COMPLAINED:
            f["feedback_type"] = cut(e.event_data.get("feedbackType", "abuse"), 64)
        detail = f" ({f['reply']})" if "reply" in f else \
            f" (feedback-type {f['feedback_type']})" if "feedback_type" in f else ""
        dsn = f", dsn={f['dsn']}" if f.get("dsn") else ""
        inbound_log.info("%s: to=<%s>%s, status=%s%s, via=%s from <%s>", e.message_id,
                         f["to"], dsn, word, detail, record.type, f["report_from"], extra=f)
    if not any_effect:
        inbound_log.info("%s report to %s from <%s>: %s", record.type, base["report_to"],
                         base["report_from"], _NO_EFFECT.get(record.outcome, record.outcome),
                         extra={**base, "queue_id": record.message_id,
                                "status": record.outcome})
