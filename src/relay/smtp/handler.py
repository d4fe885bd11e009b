"""The policy of one SMTP listener: who may send what, and where accepted mail goes.

aiosmtpd speaks the protocol (protocol.py); this handler decides. Three modes:
`submission` (AUTH with an API key, only over TLS), `relay` (no AUTH, only from
`allowed_networks`) and `inbound` (from anyone, without AUTH, but only for relay's own
bounce, unsubscribe and complaint addresses: the reports go to inbound.py, never into the
queue). No mode is ever an open relay. Accepted mail goes to `submit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import ipaddress
import logging
import re
import time
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from .. import keys
from ..addresses import normalize_address
from ..clients import client_key
from ..config import Config, IPNetwork, ListenerConfig
from ..errors import StoreError, ValidationError
from ..store import Store
from ..submit import Submitter
from ..types import ApiKey, EnvelopeRecipient, Stream, Submission
from .controls import read_controls
from .inbound import Inbound
from .limits import AuthThrottle, ConnectionCaps
from .protocol import RelaySMTP, peer_ip
from .tables import hook_names

log = logging.getLogger(__name__)

NULL_SENDER = "<>"  # how aiosmtpd hands over MAIL FROM:<>


class RelayHandler:
    """The policy of one listener."""

    def __init__(self, config: Config, listener: ListenerConfig, store: Store,
                 submitter: Submitter, inbound: Inbound | None = None) -> None:
        self.config = config
        self.listener = listener
        self.store = store
        self.submitter = submitter
        # this listener's own counts: failing AUTH on one port does not close the others
        self.throttle = AuthThrottle.from_limits(config.limits)
        # this process's share of them, with [smtp] workers > 1 (limits.py)
        self.caps = ConnectionCaps.from_limits(config.limits, processes=config.smtp.workers)
        # failed logins counted in the store too: every process's (and every node's) count
        self._shared = store.postgresql or config.smtp.workers > 1
        self.inbound = inbound  # what an inbound listener hands its reports to
        self.connections: set[RelaySMTP] = set()

    def __dir__(self) -> list[str]:
        return hook_names(self)  # what aiosmtpd reads on every connection, and no more

    def reconfigure(self, config: Config, listener: ListenerConfig) -> None:
        """A reload: sessions read the new policy and limits from their next command on (the
        AUTH throttle and connection caps keep their counts, and their limits, until restart)."""
        self.config, self.listener = config, listener

    # -- connection and login ------------------------------------------------

    async def handle_EHLO(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        if self.throttle.blocked(client_key(_ip(session))):
            _close_soon(server)
            return ["421 4.7.0 Too many failed logins from your address; try again later"]
        session.host_name = hostname
        extra = ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN"]
        if self.listener.mode != "submission":
            responses = [r for r in responses if not r.startswith("250-AUTH")]
        return responses[:-1] + extra + responses[-1:]

    async def handle_HELO(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        if self.throttle.blocked(client_key(_ip(session))):
            _close_soon(server)
            return "421 4.7.0 Too many failed logins from your address; try again later"
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def check_login(self, server: RelaySMTP, creds: LoginPassword) -> AuthResult:
        assert server.session is not None
        ip = client_key(_ip(server.session))  # failed logins count per client (clients.py)
        shared = await self._shared_failures(ip)  # every process's and node's
        if self.throttle.blocked(ip):
            await server.push("421 4.7.0 Too many failed logins from your address; try again later")
            _close_soon(server)
            return AuthResult(success=False, handled=True)
        secret = creds.password.decode("utf-8", "replace")
        try:
            key = await keys.authenticate(self.store, secret)
        except StoreError:
            log.exception("key lookup failed")
            return AuthResult(success=False, handled=False,
                              message="454 4.7.0 Temporary authentication failure")
        if key is None or "emails:send" not in key.scopes:
            delay = self.throttle.failed(ip, await self._shared_failed(ip))
            log.warning("failed login from %s", ip)
            if delay:
                await asyncio.sleep(delay)
            return AuthResult(success=False, handled=False)
        self.throttle.succeeded(ip)
        if shared:
            with contextlib.suppress(StoreError):
                await self.store.auth_cleared(self._scope, ip)
        return AuthResult(success=True, auth_data=key)

    @property
    def _scope(self) -> str:
        # by mode, not port: each node of a cluster has its own submission port number
        return self.listener.mode

    async def _shared_failures(self, ip: str) -> int:
        """Every process's and node's count of this client's failed logins here (0 when
        this process is the only one)."""
        if not self._shared:
            return 0
        try:
            count = await self.store.auth_failures(
                self._scope, ip, time.time() - self.throttle.block_seconds)
        except StoreError:
            return 0  # the local count still holds
        self.throttle.note(ip, count)
        return count

    async def _shared_failed(self, ip: str) -> int:
        if not self._shared:
            return 0
        now = time.time()
        try:
            return await self.store.auth_failed(self._scope, ip, now,
                                                now - self.throttle.block_seconds)
        except StoreError:
            return 0

    # -- the envelope ---------------------------------------------------------

    async def handle_MAIL(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        mode = self.listener.mode
        if mode == "relay" and not self._allowed_network(session):
            return "554 5.7.1 Relay access denied"
        if address and address != NULL_SENDER:
            try:
                _, domain = normalize_address(address, smtputf8=envelope.smtp_utf8,
                                              param="MAIL FROM")
            except ValidationError as exc:
                return f"{exc.smtp} {exc.message}"
            # the stored form (A-label, canonical literal) is what allowed domains name
            if mode != "inbound" and not keys.may_send_as(self._allowed_domains(session),
                                                          domain):
                return f"553 5.7.1 <{address}>: sender not allowed for this login"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.config.limits.max_recipients:
            return "452 4.5.3 Too many recipients"
        try:
            normalize_address(address, smtputf8=envelope.smtp_utf8, param="RCPT TO")
        except ValidationError as exc:
            return f"{exc.smtp} {exc.message}"
        if self.listener.mode == "inbound":
            try:
                ours = self.inbound is not None and await self.inbound.accepts(address)
            except StoreError:
                return "451 4.3.0 Temporary failure; try again"
            if not ours:
                return f"550 5.7.1 <{address}>: recipient not accepted here"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        if self.listener.mode == "inbound" and self.inbound is not None:
            try:
                return await self.inbound.receive(_sender(envelope), envelope.rcpt_tos, data)
            except Exception:
                log.exception("unexpected error while reading an inbound report")
                return "451 4.3.0 Temporary internal error; try again"
        try:
            controls = read_controls(data)
            sub = self._submission(server, session, envelope, data, controls)
            result = await self.submitter.submit(sub)
        except ValidationError as exc:
            return f"{exc.smtp} {exc.message}"
        except StoreError as exc:
            log.error("could not queue a message: %s", exc)
            return "451 4.3.0 Temporary failure: the queue could not store the message; try again"
        except Exception:
            log.exception("unexpected error while queueing a message")
            return "451 4.3.0 Temporary internal error; try again"
        return f"250 2.0.0 Ok: queued as {result.message_id}"

    def _submission(self, server: RelaySMTP, session: Session, envelope: Envelope, data: bytes,
                    controls: dict[str, Any]) -> Submission:
        dsn_rcpt = getattr(envelope, "dsn_rcpt", [])
        recipients = tuple(
            EnvelopeRecipient(address=addr, notify=dsn_rcpt[i][0] if i < len(dsn_rcpt) else (),
                              orcpt=dsn_rcpt[i][1] if i < len(dsn_rcpt) else None)
            for i, addr in enumerate(envelope.rcpt_tos)
        )
        key: ApiKey | None = session.auth_data if isinstance(session.auth_data, ApiKey) else None
        helo = session.host_name or "unknown"
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if server.secure:
            protocol += "S"
        if key is not None:
            protocol += "A"
        return Submission(
            mail_from=_sender(envelope),
            recipients=recipients,
            data=data,
            source="smtp",
            listener=f"{self.listener.mode}:{self.listener.port}",
            api_key_id=key.id if key else None,
            allowed_domains=self._allowed_domains(session),
            tags=controls.get("tags", ()),
            metadata=controls.get("metadata", {}),
            stream=controls.get("stream", Stream.TRANSACTIONAL),
            idempotency_key=controls.get("idempotency_key"),
            pool=controls.get("pool", ""),
            dsn_ret=getattr(envelope, "dsn_ret", None),
            dsn_envid=getattr(envelope, "dsn_envid", None),
            smtputf8=bool(envelope.smtp_utf8),
            received_from=f"{_clean(helo)} ([{_ip(session)}])",
            received_with=protocol,
        )

    def _allowed_network(self, session: Session) -> bool:
        return in_networks(_ip(session), self.listener.allowed_networks)

    def _allowed_domains(self, session: Session) -> tuple[str, ...]:
        """A key's own domain limit, else the listener's `allowed_from_domains`; empty = any."""
        key = session.auth_data if isinstance(session.auth_data, ApiKey) else None
        if key is not None and key.domains:
            return key.domains
        return self.listener.allowed_from_domains


# aiosmtpd reads handle_EHLO's signature on every connection (to tell its deprecated
# 4-argument form): made once here, inspect.signature takes it as given (17 -> 5 µs).
RelayHandler.handle_EHLO.__signature__ = (  # type: ignore[attr-defined]
    inspect.signature(RelayHandler.handle_EHLO))


def _sender(envelope: Envelope) -> str:
    """MAIL FROM's address; "" for the null sender (aiosmtpd keeps it as "<>", which its RCPT
    check needs to be truthy)."""
    address = envelope.mail_from or ""
    return "" if address == NULL_SENDER else address


@functools.lru_cache(maxsize=1024)
def in_networks(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether a client's address is in one of the networks (remembered: a relay's clients
    are few and come back; parsing the address cost ~13 µs a message)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def _ip(session: Session) -> str:
    return peer_ip(session.peer)


def _clean(text: str) -> str:
    return re.sub(r"[^\x21-\x7e]", "?", text)[:255]


def _close_soon(server: SMTP) -> None:
    loop = asyncio.get_running_loop()
    loop.call_soon(lambda: server.transport.close() if server.transport else None)
