"""The only entry to outbound SMTP: one destination's targets in turn, many messages over
their sessions, a result for every recipient (those never sent get the last target's
failure). It never touches the store and never changes the bytes it is given.

Sessions (connect, TLS, reuse) are sessions.py's; one message's MAIL/RCPT/DATA is
transaction.py's; the values and what a reply means are outbound.py's."""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence

import aiosmtplib

from ..config import DeliveryConfig
from .outbound import OutMessage, Result, Target, enhanced_code
from .sessions import SessionPool, TargetFailure, quit_session
from .transaction import transaction

log = logging.getLogger(__name__)


class Deliverer:
    def __init__(self, *, hostname: str, delivery: DeliveryConfig,
                 own_listeners: Iterable[tuple[str, int]] = (), smarthost: bool = False) -> None:
        self._cfg = delivery
        self._own = list(own_listeners)  # read at each delivery: bound ports appear at start
        self._sessions = SessionPool(hostname=hostname, delivery=delivery, smarthost=smarthost)

    async def close(self) -> None:
        await self._sessions.close()

    async def deliver(self, targets: Sequence[Target], messages: Sequence[OutMessage],
                      on_message: Callable[[list[Result]], None] | None = None) -> list[Result]:
        """Results for every recipient. `on_message` hears each message's as soon as its
        transaction ends, so a caller can record them before the session is over."""
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
                await self._deliver_to(target, remaining, results)
            except TargetFailure as failure:
                log.info("delivery to %s [%s]:%s failed: %s", target.hostname, target.address,
                         target.port, failure.text)
                failures.append(failure)
        if remaining:
            results.extend(self._unsent(remaining, failures, targets, started))
        return list(results)

    async def _deliver_to(self, target: Target, remaining: list[OutMessage],
                          results: list[Result]) -> None:
        """Send what it can over sessions to this target; raises TargetFailure to move on."""
        while remaining:
            session, reused = await self._sessions.session(target)
            try:
                while remaining and session.sent < self._cfg.messages_per_session:
                    results.extend(await transaction(session, remaining[0],
                                                     timeout=self._cfg.command_timeout))
                    remaining.pop(0)
                    session.sent += 1
                    reused = False
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                session.smtp.close()
                if reused:  # the server closed it while it was parked: nothing was sent
                    continue
                raise TargetFailure(f"connection to {target.hostname} lost: {exc}") from None
            if session.sent >= self._cfg.messages_per_session:
                await quit_session(session)
            else:
                self._sessions.park(session)

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
            code=last.code, enhanced="5.4.6" if loop else enhanced_code(last.text),
            text=last.text, hard=False, mx_host=target.hostname if target else None,
            ip=target.address if target else None, port=target.port if target else None,
            tls_version=None, tls_cipher=None, started_at=started, duration=now - started)
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
