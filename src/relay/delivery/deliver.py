"""The only module that speaks outbound SMTP: one destination, many messages, per-recipient
results. It never touches the store and never changes the bytes it is given."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import SMTPResponse

from ..config import DeliveryConfig
from ..feedback import bounce_reasons

log = logging.getLogger(__name__)

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
# Enhanced codes that say the address itself is bad (RFC 3463, RFC 7505).


@dataclass(frozen=True, kw_only=True)
class Target:
    hostname: str  # MX or smarthost name: logs, the attempt record, TLS name checks
    address: str  # the IP to connect to
    port: int


@dataclass(frozen=True, kw_only=True)
class OutRecipient:
    id: int
    address: str
    notify: tuple[str, ...] = ()
    orcpt: str | None = None


@dataclass(frozen=True, kw_only=True)
class OutMessage:
    id: str
    mail_from: str
    recipients: tuple[OutRecipient, ...]
    data: bytes
    smtputf8: bool = False
    dsn_ret: str | None = None
    dsn_envid: str | None = None


@dataclass(frozen=True, kw_only=True)
class Result:
    recipient_id: int
    message_id: str
    outcome: str  # delivered | deferred | bounced
    code: int | None
    enhanced: str | None
    text: str
    hard: bool
    mx_host: str | None
    ip: str | None
    port: int | None
    tls_version: str | None
    tls_cipher: str | None
    started_at: float
    duration: float
    peer_dsn: bool = False  # the peer took our DSN request (RFC 3461): reporting is its job now


def enhanced_code(text: str) -> str | None:
    m = _ENHANCED.match(text.strip())
    return m.group(0) if m else None


def classify(code: int | None, enhanced: str | None, text: str = "") -> tuple[str, bool]:
    """What a reply means: (outcome, hard). Hard or soft as bounce_reasons says it of a
    bounce that comes back later: only an address bad for good is hard."""
    if code is not None and 200 <= code < 300:
        return "delivered", False
    if code is None or code < 500:
        return "deferred", False
    return "bounced", bounce_reasons.classify(enhanced, code, text)[1] == "hard"


class _Failure(Exception):
    """This target could not take the message now; `permanent` when it said 5xx."""

    def __init__(self, text: str, *, code: int | None = None, permanent: bool = False,
                 retry_plain: bool = False) -> None:
        super().__init__(text)
        self.text, self.code, self.permanent, self.retry_plain = text, code, permanent, retry_plain


@dataclass
class _Session:
    smtp: aiosmtplib.SMTP
    target: Target
    tls_version: str | None = None
    tls_cipher: str | None = None
    sent: int = 0
    idle_since: float = 0.0

    def supports(self, extension: str) -> bool:
        return self.smtp.supports_extension(extension)


class Deliverer:
    def __init__(self, *, hostname: str, delivery: DeliveryConfig,
                 own_listeners: Iterable[tuple[str, int]] = (), smarthost: bool = False) -> None:
        self._hostname = hostname
        self._cfg = delivery
        self._own = list(own_listeners)  # read at each delivery: bound ports appear at start
        self._smarthost = smarthost
        self._idle: dict[tuple[str, int], list[_Session]] = {}
        self._plain_only: dict[tuple[str, int], float] = {}  # TLS failed here: plain for a while

    async def close(self) -> None:
        sessions = [s for group in self._idle.values() for s in group]
        self._idle.clear()
        await asyncio.gather(*(_quit(s) for s in sessions), return_exceptions=True)

    async def deliver(self, targets: Sequence[Target], messages: Sequence[OutMessage],
                      on_message: Callable[[list[Result]], None] | None = None) -> list[Result]:
        """Results for every recipient. `on_message` hears each message's as soon as its
        transaction ends, so a caller can record them before the session is over."""
        results: list[Result] = _Results(on_message)
        remaining = list(messages)
        failures: list[_Failure] = []
        started = time.time()
        for target in targets:
            if not remaining:
                break
            if self._is_own(target):
                failures.append(_Failure(f"mail loop: {target.hostname} [{target.address}]:"
                                         f"{target.port} is relay's own listener",
                                         code=554, permanent=True))
                continue
            try:
                await self._deliver_to(target, remaining, results)
            except _Failure as failure:
                log.info("delivery to %s [%s]:%s failed: %s", target.hostname, target.address,
                         target.port, failure.text)
                failures.append(failure)
        if remaining:
            results.extend(self._unsent(remaining, failures, targets, started))
        return list(results)

    async def _deliver_to(self, target: Target, remaining: list[OutMessage],
                          results: list[Result]) -> None:
        """Send what it can over sessions to this target; raises _Failure to move on."""
        while remaining:
            session, reused = await self._session(target)
            try:
                while remaining and session.sent < self._cfg.messages_per_session:
                    results.extend(await self._transaction(session, remaining[0]))
                    remaining.pop(0)
                    session.sent += 1
                    reused = False
            except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
                session.smtp.close()
                if reused:  # the server closed it while it was parked: nothing was sent
                    continue
                raise _Failure(f"connection to {target.hostname} lost: {exc}") from None
            if session.sent >= self._cfg.messages_per_session:
                await _quit(session)
            else:
                self._park(session)

    # -- sessions -------------------------------------------------------------------------

    async def _session(self, target: Target) -> tuple[_Session, bool]:
        """A parked session to this target (True) or a new one (False)."""
        key = (target.address, target.port)
        idle = self._idle.get(key, [])
        while idle:
            session = idle.pop()
            if (time.monotonic() - session.idle_since <= self._cfg.session_idle
                    and session.smtp.is_connected):
                return session, True
            await _quit(session)
        plain = self._plain_only.get(key, 0) > time.monotonic()
        try:
            return await self._connect(target, use_starttls=not plain), False
        except _Failure as failure:
            if failure.retry_plain:  # opportunistic TLS failed: this host in plain text
                self._plain_only[key] = time.monotonic() + 3600
                return await self._connect(target, use_starttls=False), False
            raise

    def _park(self, session: _Session) -> None:
        session.idle_since = time.monotonic()
        self._idle.setdefault((session.target.address, session.target.port), []).append(session)
        asyncio.get_running_loop().call_later(self._cfg.session_idle + 0.1, self._reap)

    def _reap(self) -> None:
        now = time.monotonic()
        for key, group in list(self._idle.items()):
            for session in [s for s in group if now - s.idle_since > self._cfg.session_idle]:
                group.remove(session)
                asyncio.ensure_future(_quit(session))
            if not group:
                del self._idle[key]

    async def _connect(self, target: Target, *, use_starttls: bool) -> _Session:
        cfg = self._cfg
        implicit = self._smarthost and cfg.smarthost_tls == "implicit"
        verify = self._verify()
        smtp = aiosmtplib.SMTP(
            hostname=target.hostname if implicit and verify else target.address,
            port=target.port, local_hostname=self._hostname, timeout=cfg.command_timeout,
            use_tls=implicit, start_tls=False, validate_certs=verify,
            tls_context=self._tls_context(verify) if implicit else None)
        try:
            async with asyncio.timeout(cfg.connect_timeout + 1):  # not wait_for: see aio.py
                await smtp.connect(timeout=cfg.connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as exc:
            smtp.close()
            raise _Failure(f"{target.hostname} greeted with {exc.code} {exc.message}",
                           code=exc.code, permanent=exc.code >= 500) from None
        except (TimeoutError, aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            smtp.close()
            raise _Failure(f"cannot connect to {target.hostname} [{target.address}]:"
                           f"{target.port}: {_why(exc)}") from None
        session = _Session(smtp=smtp, target=target)
        try:
            await self._ehlo(session)
            if implicit:
                _note_tls(session)
            elif self._wants_starttls(session, use_starttls):
                await self._starttls(session, verify)
            await self._login(session)
        except _Failure:
            smtp.close()
            raise
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise _Failure(f"{target.hostname}: {_why(exc)}") from None
        return session

    async def _ehlo(self, session: _Session) -> None:
        try:
            await session.smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            try:
                await session.smtp.helo()
            except aiosmtplib.SMTPHeloError as exc:
                raise _Failure(f"{session.target.hostname} refused HELO: {exc.code} "
                               f"{exc.message}", code=exc.code, permanent=exc.code >= 500) from None

    def _policy(self) -> str:
        """none | may | must: whether STARTTLS is skipped, tried, or required."""
        if self._smarthost:
            return {"starttls": "must", "implicit": "none", "none": "none"}[
                self._cfg.smarthost_tls]
        return {"opportunistic": "may", "require": "must", "none": "none"}[self._cfg.tls]

    def _wants_starttls(self, session: _Session, use_starttls: bool) -> bool:
        policy = self._policy()
        if policy == "none" or (policy == "may" and not use_starttls):
            return False
        if not session.supports("starttls"):
            if policy == "must":
                raise _Failure(f"{session.target.hostname} does not offer STARTTLS and TLS is "
                               f"required")
            return False
        return True

    async def _starttls(self, session: _Session, verify: bool) -> None:
        policy = self._policy()
        try:
            reply = await session.smtp.starttls(server_hostname=session.target.hostname,
                                                tls_context=self._tls_context(verify),
                                                validate_certs=verify)
        except (TimeoutError, aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            raise _Failure(f"STARTTLS with {session.target.hostname} failed: {_why(exc)}",
                           retry_plain=policy == "may") from None
        if reply.code != 220:
            raise _Failure(f"STARTTLS refused: {reply.code} {reply.message}",
                           retry_plain=policy == "may")
        _note_tls(session)
        await self._ehlo(session)

    async def _login(self, session: _Session) -> None:
        cfg = self._cfg
        if not (self._smarthost and cfg.smarthost_user):
            return
        if session.tls_version is None:
            raise _Failure("refusing to send smarthost credentials over plain text")
        try:
            await session.smtp.login(cfg.smarthost_user, cfg.smarthost_password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise _Failure(f"smarthost refused our login: {exc.code} {exc.message}",
                           code=exc.code) from None

    def _verify(self) -> bool:
        if self._smarthost:
            return self._cfg.smarthost_tls_verify
        return self._cfg.tls == "require" and self._cfg.tls_verify

    def _tls_context(self, verify: bool) -> ssl.SSLContext:
        if verify:
            return ssl.create_default_context(cafile=self._cfg.tls_ca_file or None)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

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

    # -- one message ---------------------------------------------------------------------------

    async def _transaction(self, session: _Session, msg: OutMessage) -> list[Result]:
        started = time.time()
        smtp, timeout = session.smtp, self._cfg.command_timeout

        def done(r: OutRecipient, code: int | None, text: str, outcome: str | None = None,
                 enhanced: str | None = None, hard: bool | None = None) -> Result:
            enhanced = enhanced or enhanced_code(text)
            kind, is_hard = classify(code, enhanced, text)
            return Result(
                recipient_id=r.id, message_id=msg.id, outcome=outcome or kind, code=code,
                enhanced=enhanced, text=text, hard=is_hard if hard is None else hard,
                mx_host=session.target.hostname, ip=session.target.address,
                port=session.target.port, tls_version=session.tls_version,
                tls_cipher=session.tls_cipher, started_at=started,
                duration=time.time() - started, peer_dsn=session.supports("dsn"))

        if msg.smtputf8 and not session.supports("smtputf8"):
            return [done(r, None, f"{session.target.hostname} does not support SMTPUTF8, "
                         "which this message needs", "bounced", "5.6.7", False)
                    for r in msg.recipients]
        size = session.smtp.esmtp_extensions.get("size", "")
        if size.isdigit() and int(size) and len(msg.data) > int(size):
            return [done(r, None, f"message of {len(msg.data)} octets is larger than "
                         f"{session.target.hostname} accepts ({size})", "bounced", "5.3.4", False)
                    for r in msg.recipients]
        reply = await smtp.execute_command(b"MAIL", *self._mail_args(session, msg),
                                           timeout=timeout)
        if reply.code != 250:
            await _rset(smtp)
            return [done(r, reply.code, reply.message) for r in msg.recipients]
        accepted, results = [], []
        for r in msg.recipients:
            rcpt = await smtp.execute_command(b"RCPT", *self._rcpt_args(session, r),
                                              timeout=timeout)
            if rcpt.code in (250, 251):
                accepted.append(r)
            else:
                results.append(done(r, rcpt.code, rcpt.message))
        if not accepted:
            await _rset(smtp)
            return results
        try:
            final: SMTPResponse = await smtp.data(msg.data, timeout=timeout)
        except aiosmtplib.SMTPDataError as exc:
            final = SMTPResponse(exc.code, exc.message)
            await _rset(smtp)
        return results + [done(r, final.code, final.message) for r in accepted]

    def _mail_args(self, session: _Session, msg: OutMessage) -> list[bytes]:
        args = [b"FROM:<" + msg.mail_from.encode("utf-8") + b">"]
        if session.supports("size"):
            args.append(f"SIZE={len(msg.data)}".encode())
        if session.supports("8bitmime") and not msg.data.isascii():
            args.append(b"BODY=8BITMIME")
        if msg.smtputf8:
            args.append(b"SMTPUTF8")
        if session.supports("dsn"):
            if msg.dsn_ret:
                args.append(f"RET={msg.dsn_ret}".encode())
            if msg.dsn_envid:
                args.append(b"ENVID=" + _xtext(msg.dsn_envid))
        return args

    def _rcpt_args(self, session: _Session, r: OutRecipient) -> list[bytes]:
        args = [b"TO:<" + r.address.encode("utf-8") + b">"]
        if session.supports("dsn"):
            if r.notify:
                args.append(("NOTIFY=" + ",".join(r.notify)).encode())
            if r.orcpt:
                kind, _, addr = r.orcpt.partition(";")
                args.append(b"ORCPT=" + (kind.strip() or "rfc822").encode() + b";"
                            + _xtext(addr.strip() if addr else r.orcpt))
        return args

    def _unsent(self, messages: list[OutMessage], failures: list[_Failure],
                targets: Sequence[Target], started: float) -> list[Result]:
        if not failures:
            failures = [_Failure("no host to deliver to")]
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


def _note_tls(session: _Session) -> None:
    obj = session.smtp.get_transport_info("ssl_object")
    if obj is not None:
        session.tls_version = obj.version()
        cipher = obj.cipher()
        session.tls_cipher = cipher[0] if cipher else None


async def _rset(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.execute_command(b"RSET")
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        smtp.close()


async def _quit(session: _Session) -> None:
    try:
        async with asyncio.timeout(5):
            await session.smtp.quit()
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        pass
    finally:
        session.smtp.close()


def _xtext(value: str) -> bytes:
    """RFC 3461 xtext: "+", "=" and anything outside printable ASCII as +HH."""
    out = bytearray()
    for b in value.encode("utf-8"):
        out += f"+{b:02X}".encode() if b < 33 or b > 126 or b in (43, 61) else bytes([b])
    return bytes(out)


def _why(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:  # aiosmtplib wraps the OS error
        if isinstance(cause, asyncio.TimeoutError):
            return "timed out"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        cause = cause.__cause__
    return str(exc) or type(exc).__name__


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
