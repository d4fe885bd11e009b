"""What comes back to relay: bounces, complaints and mailto: unsubscribes, read by an
`inbound` listener and matched to the exact message and recipient.

A bounce is matched by the token in the address it came to (relay's VERP return path),
never by searching its text; a complaint, which usually comes to an address registered with
the mailbox provider and often hides its recipient, by the original it encloses (its
Return-Path, which is relay's VERP address, or relay's Feedback-ID). Every report is kept in
inbound_reports, matched or not; one that matches nothing (a forged token, someone else's
mail) changes nothing and makes no event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import Config
from ..delivery.logline import log_inbound
from ..delivery.outbound import reply_text
from ..delivery.outcomes import wants_report
from ..errors import StoreError
from ..feedback import bounces, verp
from ..feedback.bounce_report import DELIVERED_ACTIONS, BouncedRecipient, Report
from ..feedback.reports import ReportMaker
from ..feedback.tracking import Tokens
from ..store import SQLiteStore
from ..store.delivery import AttemptRecord
from ..store.inbound import Effect, InboundRecord, SentTo
from ..submit import Submitter
from ..types import EventType

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Found:
    targets: list[SentTo]
    by: str  # how: "envelope" | "return-path" | "feedback-id" | ""


class Inbound:
    def __init__(self, config: Config, store: SQLiteStore, submitter: Submitter,
                 tokens: Tokens) -> None:
        self._config = config
        self._store = store
        self._submitter = submitter
        self._tokens = tokens
        self._reports = ReportMaker(submitter, config.server.hostname)
        self._complaints = {a.lower() for a in config.bounces.complaint_addresses}
        self._label = config.dkim.return_path_label.lower() + "."

    # -- RCPT -------------------------------------------------------------------------

    async def accepts(self, address: str) -> bool:
        """Only relay's bounce and unsubscribe addresses at its return-path hosts, and the
        configured complaint addresses. The token is not checked here: a forged one is
        taken and discarded, so that probing tells nothing."""
        if address.strip().lower() in self._complaints:
            return True
        prefix, token, host = verp.split_local(address)
        if not prefix or not token:
            return False
        if host.startswith(self._label) or host in (verp.bounce_host(self._config),
                                                    self._config.server.hostname.lower()):
            return True
        return host in {h.lower() for h in (await self._store.return_paths()).values()}

    # -- DATA -------------------------------------------------------------------------

    async def receive(self, mail_from: str, rcpt_tos: Sequence[str], data: bytes) -> str:
        """Read the report, apply it for each envelope recipient; the SMTP reply."""
        limits = self._config.limits
        report = await asyncio.to_thread(bounces.parse, data,
                                         max_parts=limits.max_report_parts,
                                         max_recipients=limits.max_report_recipients)
        try:
            for rcpt in rcpt_tos:
                await self._one(mail_from, rcpt, report)
        except StoreError as exc:
            log.error("could not record an inbound report: %s", exc)
            return "451 4.3.0 Temporary failure: the report could not be stored; try again"
        return "250 2.0.0 Ok: report received"

    async def _one(self, mail_from: str, rcpt: str, report: Report) -> None:
        now = time.time()
        prefix, token, _ = verp.split_local(rcpt)
        base = dict(received_at=now, envelope_to=rcpt, mail_from=mail_from)
        if prefix == verp.UNSUBSCRIBE_PREFIX:
            await self._unsubscribe(base, token, now)
            return
        found = await self._find(prefix, token, report)
        effects: list[Effect] = []
        outcome = "unmatched"
        if found.targets:
            effects, outcome = self._effects(report, found.targets, now)
        summary = {"by": found.by, "parsed": _summary(report)}
        first = found.targets[0] if found.targets else None
        record = InboundRecord(**base, type=report.type,
                               message_id=first.message_id if first else None,
                               recipient_id=first.recipient_id if len(found.targets) == 1
                               else None, outcome=outcome, summary=summary)
        owed = await self._store.record_inbound(record, effects)
        log_inbound(record, effects)  # after the commit: a line means it is on disk
        for message_id in owed:  # a late bounce of SMTP mail: its sender gets a DSN too
            if await self._store.emit_report(message_id, self._reports.make):
                self._submitter.notify_queued()

    async def _unsubscribe(self, base: dict[str, object], token: str, now: float) -> None:
        recipient_id = self._tokens.read("unsubscribe", token)
        done = await self._store.unsubscribe(recipient_id, now) \
            if recipient_id is not None else None
        targets = await self._store.sent_to(recipient_id=recipient_id) \
            if done is not None and recipient_id is not None else []
        await self._store.record_inbound(InboundRecord(
            **base, type="unsubscribe",  # type: ignore[arg-type]
            message_id=targets[0].message_id if targets else None,
            recipient_id=recipient_id if targets else None,
            outcome="unsubscribed" if done else "unmatched",
            summary={"by": "envelope" if done else ""}), [])

    async def _find(self, prefix: str, token: str, report: Report) -> _Found:
        """The recipients a report is about: the envelope's token decides for a bounce
        address; a complaint address looks at the enclosed original."""
        if prefix == verp.BOUNCE_PREFIX:
            recipient_id = self._tokens.read("bounce", token)
            if recipient_id is None:
                return _Found([], "")
            return _Found(await self._store.sent_to(recipient_id=recipient_id), "envelope")
        original = report.original
        recipient_id = verp.find_bounce_token(self._tokens, original.return_path)
        if recipient_id is None:
            for name, value in original.headers:
                if name.lower() in ("return-path", "x-original-return-path"):
                    recipient_id = verp.find_bounce_token(self._tokens, value)
                    if recipient_id is not None:
                        break
        if recipient_id is not None:
            return _Found(await self._store.sent_to(recipient_id=recipient_id), "return-path")
        feedback = original.feedback_id or next(
            (v for n, v in original.headers if n.lower() == "feedback-id"), None)
        message_id = verp.read_feedback_id(self._tokens, feedback)
        if message_id is None:
            return _Found([], "")
        everyone = await self._store.sent_to(message_id=message_id)
        named = {r.address.lower() for r in report.recipients if r.address}
        chosen = [t for t in everyone if t.address.lower() in named]
        if not chosen and len(everyone) == 1:
            chosen = everyone  # the report hides its recipient; the message had only one
        return _Found(chosen, "feedback-id")

    def _effects(self, report: Report, targets: list[SentTo], now: float
                 ) -> tuple[list[Effect], str]:
        if report.type == "arf":
            return [Effect(recipient_id=t.recipient_id, message_id=t.message_id,
                           address=t.address, event=EventType.COMPLAINED,
                           event_data={"email": t.address,
                                       "feedbackType": report.feedback_type or "abuse"},
                           suppress="complaint") for t in targets], "complained"
        if report.type != "dsn" or not report.recipients:
            return [], "recorded"  # an auto-reply, or a message that reports nothing
        effects: list[Effect] = []
        outcomes = set()
        for t in targets:
            said = _about(report.recipients, t, single=len(targets) == 1)
            if said is None:
                continue
            if said.action == "failed":
                effects.append(self._bounce(t, said, now))
                outcomes.add("bounced")
            elif said.action == "delayed":
                effects.append(Effect(
                    recipient_id=t.recipient_id, message_id=t.message_id, address=t.address,
                    event=EventType.DELAYED, event_data=_event_data(t, said)))
                outcomes.add("delayed")
        outcome = "bounced" if "bounced" in outcomes else "delayed" if outcomes else "recorded"
        return effects, outcome

    def _bounce(self, t: SentTo, said: BouncedRecipient, now: float) -> Effect:
        # what the report said, none made up: no reply code when it quoted none, and the
        # status it gave (a remote's expiry keeps its 4.4.7)
        status = said.status or "5.0.0"
        code = said.reply_code if said.reply_code and said.reply_code >= 400 else None
        text = said.diagnostic or f"{said.reason} (reported after delivery)"
        reply = text if code and text.startswith(str(code)) else reply_text(code, status, text)
        return Effect(
            recipient_id=t.recipient_id, message_id=t.message_id, address=t.address,
            event=EventType.BOUNCED, event_data=_event_data(t, said),
            attempt=AttemptRecord(started_at=now, duration=0.0, mx_host=said.remote_mta,
                                  ip=None, port=None, tls_version=None, tls_cipher=None,
                                  code=code, enhanced=status, text=text, outcome="bounced"),
            last_reply=reply, bounce_class=said.bounce_class,
            suppress="hard_bounce" if said.bounce_class == "hard" else None,
            dsn=t.source == "smtp" and wants_report(t.notify, "FAILURE"))


def _about(said: Sequence[BouncedRecipient], t: SentTo, *, single: bool
           ) -> BouncedRecipient | None:
    """What a DSN says of one of our recipients: by address, or, when the envelope token
    named that recipient, its most telling line (failed before delayed before the rest;
    the report may name the address after forwarding, which VERP does not need)."""
    for r in said:
        if r.address and r.address.lower() == t.address.lower():
            return r
    if not single:
        return None
    rank = {"failed": 0, "delayed": 1}
    return min(said, key=lambda r: rank.get(r.action, 2 if r.action in DELIVERED_ACTIONS else 3))


def _event_data(t: SentTo, said: BouncedRecipient) -> dict[str, object]:
    return {"email": t.address, "class": said.bounce_class, "reason": said.reason,
            "status": said.status, "diagnostic": said.diagnostic, "remoteMta": said.remote_mta,
            "async": True}


def _summary(report: Report) -> dict[str, object]:
    return {"type": report.type, "feedbackType": report.feedback_type,
            "recipients": [{"address": r.address, "action": r.action, "status": r.status,
                            "reason": r.reason, "class": r.bounce_class} for r in
                           report.recipients[:20]]}
