"""Outbound SMTP sessions: connect from a source address, greet with its name, STARTTLS or
implicit TLS as the target's TLS policy says (none, may, encrypt, verify, dane), log in to a
smarthost, and keep sessions idle for reuse by the next messages to the same MX host and
address from the same source under the same policy."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiosmtplib

from .. import metrics
from ..config import DeliveryConfig
from . import dane, pipelining
from .outbound import DEFAULT_TLS, OutMessage, Target, TlsPolicy
from .pools import Source

# aiosmtplib's connections keep pipelined replies (MAIL, RCPT and DATA in one write)
pipelining.install()

# what a session's TLS came to, for TLS-RPT (RFC 8460): the target, the source, and the
# result type of a failure (None: the policy held)
TlsObserver = Callable[[Target, Source, "str | None", str], None]


class TargetFailure(Exception):
    """This target could not take the message now; `permanent` when it said 5xx."""

    def __init__(self, text: str, *, code: int | None = None, permanent: bool = False,
                 retry_plain: bool = False, tls_failure: str | None = None,
                 enhanced: str | None = None, reply: str | None = None) -> None:
        super().__init__(text)
        self.reply = reply  # the remote's own reply ("421 4.7.0 text"), when it gave one
        self.text, self.code, self.permanent, self.retry_plain = text, code, permanent, retry_plain
        self.tls_failure = tls_failure  # RFC 8460 result type: the TLS policy failed
        self.enhanced = enhanced


@dataclass
class Session:
    smtp: aiosmtplib.SMTP
    target: Target
    source: Source
    site: str = ""  # delivery/shaping.py's site: its connection limit counts parked sessions
    policy: TlsPolicy = DEFAULT_TLS  # the target's, as it applies (default: [delivery] tls)
    tls_version: str | None = None
    tls_cipher: str | None = None
    tls_failure: str | None = None  # a "testing" policy failed; the mail went as "may"
    sent: int = 0
    idle_since: float = 0.0
    # the message whose MAIL, RCPT and DATA went with the last one's data (transaction.py):
    # its replies are owed, so the session is neither parked nor QUIT until it is sent
    ahead: OutMessage | None = None

    def supports(self, extension: str) -> bool:
        return self.smtp.supports_extension(extension)


_Key = tuple[Target, Source]


class SessionPool:
    """Sessions by target (MX host, address, port, TLS policy) and source: a parked one
    while it is fresh, else a new one."""

    def __init__(self, *, hostname: str, delivery: DeliveryConfig, smarthost: bool,
                 tls_observer: TlsObserver | None = None) -> None:
        self._hostname = hostname
        self._cfg = delivery
        self._smarthost = smarthost
        self._observer = tls_observer
        self._idle: dict[_Key, list[Session]] = {}
        self._plain_only: dict[_Key, float] = {}  # TLS failed here: plain for a while

    async def close(self) -> None:
        sessions = [s for group in self._idle.values() for s in group]
        self._idle.clear()
        await asyncio.gather(*(quit_session(s) for s in sessions), return_exceptions=True)

    async def session(self, target: Target, source: Source,
                      site: str = "") -> tuple[Session, bool]:
        """A parked session to this target from this source (True) or a new one (False).
        A new one first closes the site's sessions parked for other targets: a site's
        connections are the sessions in use (its limit) and none idle besides."""
        key = (target, source)
        idle = self._idle.get(key, [])
        while idle:
            session = idle.pop()
            if (time.monotonic() - session.idle_since <= self._cfg.session_idle
                    and session.smtp.is_connected):
                return session, True
            await quit_session(session)
        if site:
            await self._close_parked(site)
        session, reused = await self._open(target, source, key)
        session.site = site
        return session, reused

    async def _close_parked(self, site: str) -> None:
        parked = [s for group in self._idle.values() for s in group if s.site == site]
        for session in parked:
            self._idle[(session.target, session.source)].remove(session)
        await asyncio.gather(*(quit_session(s) for s in parked))

    async def _open(self, target: Target, source: Source, key: _Key) -> tuple[Session, bool]:
        policy = self.policy(target)
        if policy.level == "may" and self._plain_only.get(key, 0) > time.monotonic():
            policy = TlsPolicy(level="none", source=policy.source)
        try:
            session = await self._connect(target, source, policy)
        except TargetFailure as failure:
            if failure.tls_failure:  # a session that never got to TLS is no TLS result
                self._observe(target, source, policy, failure.tls_failure, failure.text)
            if failure.retry_plain:  # opportunistic TLS failed: this host in plain text
                self._plain_only[key] = time.monotonic() + 3600
                return await self._connect(target, source, TlsPolicy(
                    level="none", source=policy.source)), False
            if failure.tls_failure and not policy.enforce:  # "testing": reported, sent anyway
                session = await self._connect(target, source, TlsPolicy(
                    level="may", source=policy.source, enforce=False))
                session.policy, session.tls_failure = policy, failure.tls_failure
                return session, False
            raise
        self._observe(target, source, policy, None, "")
        return session, False

    def policy(self, target: Target) -> TlsPolicy:
        """The target's TLS policy; the default one is [delivery] tls (or smarthost_tls)."""
        if target.tls.source != "default":
            return target.tls
        cfg = self._cfg
        if self._smarthost:
            if cfg.smarthost_tls == "none":
                return TlsPolicy(level="none")
            return TlsPolicy(level="verify" if cfg.smarthost_tls_verify else "encrypt")
        if cfg.tls == "require":
            return TlsPolicy(level="verify" if cfg.tls_verify else "encrypt")
        return TlsPolicy(level="none" if cfg.tls == "none" else "may")

    def _observe(self, target: Target, source: Source, policy: TlsPolicy, failure: str | None,
                 detail: str) -> None:
        if failure:
            metrics.tls_failure(policy.source, failure)
        if self._observer is not None and policy.level != "none":
            self._observer(target, source, failure, detail)

    def park(self, session: Session) -> None:
        session.idle_since = time.monotonic()
        self._idle.setdefault((session.target, session.source), []).append(session)
        asyncio.get_running_loop().call_later(self._cfg.session_idle + 0.1, self._reap)

    def _reap(self) -> None:
        now = time.monotonic()
        for key, group in list(self._idle.items()):
            for session in [s for s in group if now - s.idle_since > self._cfg.session_idle]:
                group.remove(session)
                asyncio.ensure_future(quit_session(session))
            if not group:
                del self._idle[key]

    async def _connect(self, target: Target, source: Source, policy: TlsPolicy) -> Session:
        cfg = self._cfg
        implicit = self._smarthost and cfg.smarthost_tls == "implicit"
        verify = policy.level == "verify"
        smtp = aiosmtplib.SMTP(
            hostname=target.hostname if implicit and verify else target.address,
            port=target.port, local_hostname=source.helo, timeout=cfg.command_timeout,
            use_tls=implicit, start_tls=False, validate_certs=verify,
            source_address=(source.address, 0) if source.address else None,
            tls_context=self._tls_context(policy) if implicit else None)
        try:
            async with asyncio.timeout(cfg.connect_timeout + 1):  # not wait_for: see aio.py
                await smtp.connect(timeout=cfg.connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as exc:
            smtp.close()
            raise TargetFailure(f"{target.hostname} greeted with {exc.code} {exc.message}",
                                code=exc.code, permanent=exc.code >= 500,
                                reply=f"{exc.code} {exc.message}") from None
        except (TimeoutError, aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            smtp.close()
            failure = _tls_result(exc) if implicit else None
            raise TargetFailure(f"cannot connect to {target.hostname} [{target.address}]:"
                                f"{target.port}: {_why(exc)}", tls_failure=failure) from None
        session = Session(smtp=smtp, target=target, source=source, policy=policy)
        try:
            await self._ehlo(session)
            if implicit:
                _note_tls(session)
            elif policy.level != "none":
                if session.supports("starttls"):
                    await self._starttls(session)
                elif policy.level != "may":
                    raise TargetFailure(
                        f"{target.hostname} does not offer STARTTLS and TLS is required "
                        f"({policy.label})", tls_failure="starttls-not-supported",
                        enhanced="4.7.10")
            if session.tls_version is not None and policy.level == "dane":
                _check_dane(session)
            await self._login(session)
        except TargetFailure:
            smtp.close()
            raise
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise TargetFailure(f"{target.hostname}: {_why(exc)}") from None
        return session

    async def _ehlo(self, session: Session) -> None:
        try:
            await session.smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            try:
                await session.smtp.helo()
            except aiosmtplib.SMTPHeloError as exc:
                raise TargetFailure(f"{session.target.hostname} refused HELO: {exc.code} "
                                    f"{exc.message}", code=exc.code,
                                    permanent=exc.code >= 500,
                                    reply=f"{exc.code} {exc.message}") from None

    async def _starttls(self, session: Session) -> None:
        policy = session.policy
        verify = policy.level == "verify"
        try:
            reply = await session.smtp.starttls(server_hostname=session.target.hostname,
                                                tls_context=self._tls_context(policy),
                                                validate_certs=verify)
        except (TimeoutError, aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            raise TargetFailure(f"STARTTLS with {session.target.hostname} failed: {_why(exc)}",
                                retry_plain=policy.level == "may",
                                tls_failure=None if policy.level == "may" else _tls_result(exc),
                                enhanced="4.7.5") from None
        if reply.code != 220:
            raise TargetFailure(f"STARTTLS refused: {reply.code} {reply.message}",
                                retry_plain=policy.level == "may",
                                tls_failure=None if policy.level == "may"
                                else "starttls-not-supported", enhanced="4.7.10")
        _note_tls(session)
        await self._ehlo(session)

    async def _login(self, session: Session) -> None:
        cfg = self._cfg
        if not (self._smarthost and cfg.smarthost_user):
            return
        if session.tls_version is None:
            raise TargetFailure("refusing to send smarthost credentials over plain text")
        try:
            await session.smtp.login(cfg.smarthost_user, cfg.smarthost_password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise TargetFailure(f"smarthost refused our login: {exc.code} {exc.message}",
                                code=exc.code) from None

    def _tls_context(self, policy: TlsPolicy) -> ssl.SSLContext:
        if policy.level == "verify":
            return ssl.create_default_context(cafile=self._cfg.tls_ca_file or None)
        if policy.level == "dane":  # the TLSA records judge the certificate (_check_dane)
            return dane.dane_context()
        ctx = ssl.create_default_context()  # the certificate is not checked
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx


def _check_dane(session: Session) -> None:
    """RFC 7672: the certificate the MX host showed must match one of its TLSA records (a
    DANE-TA record: a certificate of the chain it sent, which must name the MX host)."""
    obj = session.smtp.get_transport_info("ssl_object")
    leaf, chain = dane.peer_certificates(obj) if obj is not None else (b"", [])
    target = session.target
    if not leaf or not dane.matches(session.policy.tlsa, leaf, chain,
                                    host_names=(target.hostname,)):
        raise TargetFailure(f"the certificate of {target.hostname} [{target.address}] matches "
                            f"none of its TLSA records (DANE)", tls_failure="tlsa-invalid",
                            enhanced="4.7.5")


def _tls_result(exc: BaseException) -> str:
    """The RFC 8460 result type of a failed handshake."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            code = cause.verify_code
            if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
                return "certificate-expired"
            if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH
                return "certificate-host-mismatch"
            if code in (2, 18, 19, 20, 21, 27):  # no issuer, self-signed, untrusted
                return "certificate-not-trusted"
            return "validation-failure"
        cause = cause.__cause__ or cause.__context__
    return "validation-failure"


def _note_tls(session: Session) -> None:
    obj = session.smtp.get_transport_info("ssl_object")
    if obj is not None:
        session.tls_version = obj.version()
        cipher = obj.cipher()
        session.tls_cipher = cipher[0] if cipher else None


async def quit_session(session: Session) -> None:
    try:
        async with asyncio.timeout(5):
            await session.smtp.quit()
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        pass
    finally:
        session.smtp.close()


def _why(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:  # aiosmtplib wraps the OS error
        if isinstance(cause, asyncio.TimeoutError):
            return "timed out"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        cause = cause.__cause__
    return str(exc) or type(exc).__name__
