"""Delivery status notifications to the senders of SMTP mail: which recipients, what to say."""

from __future__ import annotations

from ..store import MessageDetail, NewMessage
from ..submit import Submitter
from ..types import EnvelopeRecipient, Submission
from .dsn import EXPIRED_STATUS, ReportedRecipient, build_dsn


class ReportMaker:
    """Turns a message's marked recipients into one DSN, queued like any other mail."""

    def __init__(self, submitter: Submitter, hostname: str) -> None:
        self._submitter = submitter
        self._hostname = hostname

    def make(self, detail: MessageDetail, marks: dict[int, str]) -> NewMessage | None:
        message = detail.message
        # Never a report on a report or to the null sender; API senders learn by webhook.
        if not message.mail_from or message.source != "smtp":
            return None
        last = {a.recipient_id: a for a in detail.attempts}
        reported = []
        for r in detail.recipients:
            action = marks.get(r.id)
            if action is None:
                continue
            attempt = last.get(r.id)
            expired = r.status.value == "expired"
            default = {"failed": EXPIRED_STATUS if expired else "5.0.0",
                       "delayed": "4.0.0"}.get(action, "2.0.0")
            status = attempt.enhanced if attempt and attempt.enhanced else default
            if action == "failed" and status[0] != "5":
                # a bounce is permanent (5.x.x); an expiry keeps its last temporary status
                status = "5" + status[1:] if r.status.value == "bounced" else status
            reported.append(ReportedRecipient(
                address=r.address, action=action, status=status, orcpt=r.orcpt,
                diagnostic=r.last_reply if attempt and attempt.text else None,
                remote_mta=attempt.mx_host if attempt else None,
                last_attempt=attempt.started_at if attempt else None,
                will_retry_until=None,
            ))
        if not reported:
            return None
        return self._submitter.prepare(Submission(
            mail_from="",
            recipients=(EnvelopeRecipient(address=message.mail_from),),
            data=build_dsn(reporting_mta=self._hostname, original_sender=message.mail_from,
                           original=detail.body or b"",
                           recipients=reported, arrival=message.created_at,
                           envid=message.dsn_envid, ret=message.dsn_ret),
            source="dsn",
        ))
