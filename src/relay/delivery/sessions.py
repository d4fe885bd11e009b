"""Outbound SMTP sessions: connect, greet, STARTTLS or implicit TLS as the policy says,
log in to a smarthost, and keep sessions idle for reuse by the next messages to the same
address and port."""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass

import aiosmtplib

from ..config import DeliveryConfig
from .outbound import Target


class TargetFailure(Exception):
    """This target could not take the message now; `permanent` when it said 5xx."""

    def __init__(self, text: str, *, code: int | None = None, permanent: bool = False,
                 retry_plain: bool = False) -> None:
        super().__init__(text)
        self.text, self.code, self.permanent, self.retry_plain = text, code, permanent, retry_plain


@dataclass
class Session:
    smtp: aiosmtplib.SMTP
    target: Target
    tls_version: str | None = None
    tls_cipher: str | None = None
    sent: int = 0
    idle_since: float = 0.0

    def supports(self, extension: str) -> bool:
        return self.smtp.supports_extension(extension)


class SessionPool:
    """Sessions by (address, port): a parked one while it is fresh, else a new one."""

    def __init__(self, *, hostname: str, delivery: DeliveryConfig, smarthost: bool) -> None:
        self._hostname = hostname
        self._cfg = delivery
        self._smarthost = smarthost
        self._idle: dict[tuple[str, int], list[Session]] = {}
        self._plain_only: dict[tuple[str, int], float] = {}  # TLS failed here: plain for a while

    async def close(self) -> None:
        sessions = [s for group in self._idle.values() for s in group]
        self._idle.clear()
        await asyncio.gather(*(quit_session(s) for s in sessions), return_exceptions=True)

    async def session(self, target: Target) -> tuple[Session, bool]:
        """A parked session to this target (True) or a new one (False)."""
        key = (target.address, target.port)
        idle = self._idle.get(key, [])
        while idle:
            session = idle.pop()
            if (time.monotonic() - session.idle_since <= self._cfg.session_idle
                    and session.smtp.is_connected):
                return session, True
            await quit_session(session)
        plain = self._plain_only.get(key, 0) > time.monotonic()
        try:
            return await self._connect(target, use_starttls=not plain), False
        except TargetFailure as failure:
            if failure.retry_plain:  # opportunistic TLS failed: this host in plain text
                self._plain_only[key] = time.monotonic() + 3600
                return await self._connect(target, use_starttls=False), False
            raise

    def park(self, session: Session) -> None:
        session.idle_since = time.monotonic()
        self._idle.setdefault((session.target.address, session.target.port), []).append(session)
        asyncio.get_running_loop().call_later(self._cfg.session_idle + 0.1, self._reap)

    def _reap(self) -> None:
        now = time.monotonic()
        for key, group in list(self._idle.items()):
            for session in [s for s in group if now - s.idle_since > self._cfg.session_idle]:
                group.remove(session)
                asyncio.ensure_future(quit_session(session))
            if not group:
                del self._idle[key]

    async def _connect(self, target: Target, *, use_starttls: bool) -> Session:
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
            raise TargetFailure(f"{target.hostname} greeted with {exc.code} {exc.message}",
                                code=exc.code, permanent=exc.code >= 500) from None
        except (TimeoutError, aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            smtp.close()
            raise TargetFailure(f"cannot connect to {target.hostname} [{target.address}]:"
                                f"{target.port}: {_why(exc)}") from None
        session = Session(smtp=smtp, target=target)
        try:
            await self._ehlo(session)
            if implicit:
                _note_tls(session)
            elif self._wants_starttls(session, use_starttls):
                await self._starttls(session, verify)
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
                                    permanent=exc.code >= 500) from None

    def _policy(self) -> str:
        """none | may | must: whether STARTTLS is skipped, tried, or required."""
        if self._smarthost:
            return {"starttls": "must", "implicit": "none", "none": "none"}[
                self._cfg.smarthost_tls]
        return {"opportunistic": "may", "require": "must", "none": "none"}[self._cfg.tls]

    def _wants_starttls(self, session: Session, use_starttls: bool) -> bool:
        policy = self._policy()
        if policy == "none" or (policy == "may" and not use_starttls):
            return False
        if not session.supports("starttls"):
            if policy == "must":
                raise TargetFailure(f"{session.target.hostname} does not offer STARTTLS and "
                                    f"TLS is required")
            return False
        return True

    async def _starttls(self, session: Session, verify: bool) -> None:
        policy = self._policy()
        try:
            reply = await session.smtp.starttls(server_hostname=session.target.hostname,
                                                tls_context=self._tls_context(verify),
                                                validate_certs=verify)
        except (TimeoutError, aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            raise TargetFailure(f"STARTTLS with {session.target.hostname} failed: {_why(exc)}",
                                retry_plain=policy == "may") from None
        if reply.code != 220:
            raise TargetFailure(f"STARTTLS refused: {reply.code} {reply.message}",
                                retry_plain=policy == "may")
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
