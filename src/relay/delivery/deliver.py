"""The only entry to outbound SMTP: one destination's targets in turn, many messages over
their sessions, a result for every recipient (those never sent get the last target's
failure). It never touches the store and never changes the bytes it is given.

Sessions (connect, TLS, reuse) are sessions.py's; one message's MAIL/RCPT/DATA is
transaction.py's; the values and what a reply means are outbound.py's."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import aiosmtplib

from ..config import DeliveryConfig
from .outbound import OutMessage, Result, Target, enhanced_code, reply_text
from .pools import Source
from .sessions import SessionPool, TargetFailure, TlsObserver, quit_session
from .transaction import NotStarted, transaction

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Hold:
    reason: str
    until: float
    kind: str = "site"  # site: its site is held back; warmup: its pool's caps are spent


@dataclass(frozen=True, kw_only=True)
class Lane:
    """How one destination's mail goes out: from which source, how many messages a session,
    and its site's pace and holds (delivery/shaping.py)."""

    source: Source
    per_session: int
    site: str = ""  # the site's key: its parked sessions count against its connections
    # before each message: waits for the site's pace; a Hold stops the delivery
    pace: Callable[[], Awaitable[Hold | None]]
    # each refusal, as "421 4.7.28 text": a Hold when it suspends the site
    reply: Callable[[str], Hold | None]
    # True when pace() would not wait now (no rate and no hold on the site)
    unpaced: Callable[[], bool] = lambda: True


class Deliverer:
    def __init__(self, *, hostname: str, delivery: DeliveryConfig,
                 own_listeners: Iterable[tuple[str, int]] = (), smarthost: bool = False,
                 tls_observer: TlsObserver | None = None) -> None:
        self._cfg = delivery
        self._own = list(own_listeners)  # read at each delivery: bound ports appear at start
        self._sessions = SessionPool(hostname=hostname, delivery=delivery, smarthost=smarthost,
                                     tls_observer=tls_observer)
        self._lane = Lane(source=Source(address=None, helo=hostname),
                          per_session=delivery.messages_per_session, pace=_no_pace,
                          reply=lambda reply: None)

    async def close(self) -> None:
        await self._sessions.close()

    async def deliver(self, targets: Sequence[Target], messages: Sequence[OutMessage],
                      on_message: Callable[[list[Result]], None] | None = None, *,
                      lane: Lane | None = None) -> list[Result]:
        """Results for every recipient. `on_message` hears each message's as soon as its
        transaction ends, so a caller can record them before the session is over."""
        lane = lane or self._lane
        results: list[Result] = _Results(on_message)
        remaining = list(messages)
        failures: list[TargetFailure] = []
        started = time.time()
        for target in targets:
            if not remaining:
                break
            if self._is_own(target):
                failures.append(TargetFailure(f"mail loop: {target.hostname} [{target.address}]:"
                                              f"{target.port} is relay's own listener",
                                              code=554, permanent=True))
                continue
            try:
                hold = await self._deliver_to(target, remaining, results, lane)
            except TargetFailure as failure:
                log.info("delivery to %s [%s]:%s failed: %s", target.hostname, target.address,
                         target.port, failure.text)
                failures.append(failure)
                hold = lane.reply(failure.reply) if failure.reply else None
                if hold is not None:  # e.g. a 421 greeting: the attempt, then the hold
                    results.extend(dataclasses.replace(r, held_until=hold.until) for r in
                                   self._unsent(remaining, [failure], [target], started))
                    return list(results)
            if hold is not None:
                results.extend(_held(remaining, hold, started))
                return list(results)
        if remaining:
            results.extend(self._unsent(remaining, failures, targets, started))
        return list(results)

    async def _deliver_to(self, target: Target, remaining: list[OutMessage],
                          results: list[Result], lane: Lane) -> Hold | None:
        """Send what it can over sessions to this target; raises TargetFailure to move on,
        returns a Hold when the site's pace or a reply stops it."""
        hold: Hold | None = None
        fruitless = 0  # sessions in a row closed by a 421 before any message was delivered
        while remaining and hold is None:
            session, reused = await self._sessions.session(target, lane.source, lane.site)
            hung_up, delivered = False, False
            try:
                while remaining and session.sent < lane.per_session:
                    if (hold := await lane.pace()) is not None:  # every message keeps pace
                        break
                    # the next message's commands may go with this one's data when it is
                    # sure to follow over this session: no pace to wait for, room left
                    then = (remaining[1] if len(remaining) > 1 and lane.unpaced()
                            and session.sent + 1 < lane.per_session else None)
                    done = await transaction(session, remaining[0], then=then,
                                             timeout=self._cfg.command_timeout,
                                             data_timeout=self._cfg.data_timeout)
                    hold = _first(lane.reply(reply) for reply in _refusals(done))
                    if hold is not None:  # the refused wait for the hold too
                        done = [r if r.outcome != "deferred" else
                                dataclasses.replace(r, held_until=hold.until) for r in done]
                    results.extend(done)
                    remaining.pop(0)
                    session.sent += 1
                    reused = False
                    # a 421 closes the channel (RFC 5321 3.8): the next message, and any
                    # commands of it written ahead, go over a new connection
                    hung_up = any(r.code == 421 for r in done)
                    delivered = delivered or any(r.outcome == "delivered" for r in done)
                    if hold is not None or hung_up:
                        break
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                session.smtp.close()
                # the server closed it while it was parked, or before it answered what was
                # written ahead: nothing of the message was taken; it goes over a new one
                if reused or isinstance(exc, NotStarted):
                    continue
                raise TargetFailure(f"connection to {target.hostname} lost: {exc}") from None
            if session.ahead is not None or hung_up:  # replies owed, or none will come:
                session.smtp.close()  # no QUIT (a DATA written ahead may have been taken)
            elif hold is not None or session.sent >= lane.per_session:
                await quit_session(session)
            else:
                self._sessions.park(session)
            if delivered:
                fruitless = 0
            elif hung_up:
                fruitless += 1
            if fruitless >= 2 and remaining and hold is None:
                # a second connection in a row closed with a 421 and nothing taken: the
                # rest wait (or try the next host) with its words, not a connection apiece
                said = next(reply_text(r.code, r.enhanced, r.text) for r in done
                            if r.code == 421)
                raise TargetFailure(f"{target.hostname} said: {said}", code=421, reply=said)
        return hold

    def _is_own(self, target: Target) -> bool:
        try:
            ip = ipaddress.ip_address(target.address)
        except ValueError:
            return False
        for address, port in self._own:
            if port != target.port:
                continue
            own = ipaddress.ip_address(address)
            if own == ip or (own.is_unspecified and (ip.is_loopback or _is_local(ip))):
                return True
        return False

    def _unsent(self, messages: list[OutMessage], failures: list[TargetFailure],
                targets: Sequence[Target], started: float) -> list[Result]:
        if not failures:
            failures = [TargetFailure("no host to deliver to")]
        permanent = all(f.permanent for f in failures)
        last = failures[-1]
        loop = any(f.text.startswith("mail loop") for f in failures) and permanent
        now = time.time()
        target = targets[-1] if targets else None
        return [Result(
            recipient_id=r.id, message_id=m.id, outcome="bounced" if permanent else "deferred",
            code=last.code,
            enhanced="5.4.6" if loop else last.enhanced or enhanced_code(last.text),
            text=last.text, hard=False, mx_host=target.hostname if target else None,
            ip=target.address if target else None, port=target.port if target else None,
            tls_version=None, tls_cipher=None, started_at=started, duration=now - started,
            tls_policy=self._sessions.policy(target).label if target else None,
            tls_failure=next((f.tls_failure for f in reversed(failures) if f.tls_failure),
                             None))
            for m in messages for r in m.recipients]


class _Results(list[Result]):
    """A list that tells a listener about each batch added to it."""

    def __init__(self, listener: Callable[[list[Result]], None] | None) -> None:
        super().__init__()
        self._listener = listener

    def extend(self, batch: Iterable[Result]) -> None:
        batch = list(batch)
        super().extend(batch)
        if self._listener is not None and batch:
            self._listener(batch)


async def _no_pace() -> Hold | None:
    return None


def _refusals(results: list[Result]) -> Iterable[str]:
    """A message's refusals as "421 4.7.28 text", once each."""
    seen: set[str] = set()
    for r in results:
        if r.outcome != "delivered" and r.code:
            reply = reply_text(r.code, r.enhanced, r.text)
            if reply not in seen:
                seen.add(reply)
                yield reply


def _first(holds: Iterable[Hold | None]) -> Hold | None:
    return next((h for h in holds if h is not None), None)


def _held(messages: list[OutMessage], hold: Hold, started: float) -> list[Result]:
    """Results for what a hold kept from being tried: back in the queue until it ends."""
    return [Result(recipient_id=r.id, message_id=m.id, outcome="deferred", code=None,
                   enhanced="4.7.0", text=hold.reason, hard=False, mx_host=None, ip=None,
                   port=None, tls_version=None, tls_cipher=None, started_at=started,
                   duration=0.0, held_until=hold.until)
            for m in messages for r in m.recipients]


def _is_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `ip` is an address of this host: the kernel lets a socket bind only to its
    own. (A name lookup of the host name, as before, ran on the event loop at each delivery
    and missed the addresses the name does not list.)"""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))
    except OSError:
        return False
    return True
