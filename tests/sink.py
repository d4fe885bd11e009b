"""A real SMTP server (aiosmtpd) on loopback that records what it receives, for tests."""

from __future__ import annotations

import asyncio
import ssl
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    mail_options: list[str] = field(default_factory=list)
    rcpt_options: list[str] = field(default_factory=list)
    peer: str = ""  # the client's address
    helo: str = ""  # the name it gave in EHLO


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        extra = (["250-DSN"] if self.sink.dsn else []) + (
            ["250-PIPELINING"] if self.sink.pipelining else [])
        return responses[:-1] + extra + responses[-1:]

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        reply = self.sink.rcpt_reply(address)
        delay = self.sink.rcpt_delay.get(address.lower())
        if delay:
            await asyncio.sleep(delay)
        if reply.startswith("250"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        refusal = next((self.sink.data_replies[a.lower()] for a in envelope.rcpt_tos
                        if a.lower() in self.sink.data_replies), None)
        if refusal:
            return refusal
        self.sink.messages.append(Received(
            mail_from=envelope.mail_from or "", rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content or b"", tls=session.ssl is not None,
            mail_options=list(envelope.mail_options), rcpt_options=list(envelope.rcpt_options),
            peer=session.peer[0] if session.peer else "", helo=session.host_name or ""))
        self.sink.arrived.set()
        return "250 2.0.0 Ok: queued"


class _SinkSMTP(SMTP):
    """aiosmtpd with DSN (RFC 3461) parameters kept instead of refused, and a way to break TLS."""

    broken_tls = False
    sink: Sink

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.sink.active += 1
        self.sink.max_active = max(self.sink.max_active, self.sink.active)

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink.active -= 1
        super().connection_lost(exc)

    async def smtp_MAIL(self, arg: str | None) -> None:
        if self.sink.mail_reply is not None:  # e.g. "421 4.7.28 slow down": then hang up
            await self.push(self.sink.mail_reply)
            self.sink.refused += 1
            if self.sink.mail_reply.startswith("421") and self.transport is not None:
                self.transport.close()
            return
        arg, params = _split(arg, ("RET", "ENVID"))
        await super().smtp_MAIL(arg)
        if self.envelope is not None and self.envelope.mail_from is not None:
            self.envelope.mail_options.extend(params)

    async def smtp_RCPT(self, arg: str | None) -> None:
        arg, params = _split(arg, ("NOTIFY", "ORCPT"))
        assert self.envelope is not None
        before = len(self.envelope.rcpt_tos)
        await super().smtp_RCPT(arg)
        if len(self.envelope.rcpt_tos) > before:
            self.envelope.rcpt_options.extend(params)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if not self.broken_tls:
            await super().smtp_STARTTLS(arg)
            return
        await self.push("220 Ready to start TLS")
        assert self.transport is not None
        self.transport.write(b"this is not a TLS server hello\r\n" * 4)
        self.transport.close()


def _split(arg: str | None, names: tuple[str, ...]) -> tuple[str | None, list[str]]:
    if not arg:
        return arg, []
    kept, taken = [], []
    for i, part in enumerate(arg.split()):
        if i and part.partition("=")[0].upper() in names:
            taken.append(part)
        else:
            kept.append(part)
    return " ".join(kept), taken


class Sink:
    """`replies` maps an address to a list of RCPT replies, used one per attempt (last repeats);
    `rcpt_delay` an address to the seconds its RCPT is answered late; `pipelining` whether
    EHLO offers PIPELINING (RFC 2920)."""

    def __init__(self, *, tls: ssl.SSLContext | None = None, broken_tls: bool = False,
                 replies: dict[str, list[str]] | None = None, address: str = "127.0.0.1",
                 port: int = 0, size_limit: int | None = None, smtputf8: bool = True,
                 authenticator: Any = None, auth_require_tls: bool = True,
                 dsn: bool = True, rcpt_delay: dict[str, float] | None = None,
                 pipelining: bool = True) -> None:
        self.dsn = dsn
        self.pipelining = pipelining  # advertised: MAIL, RCPT and DATA come in one write
        self.rcpt_delay = rcpt_delay or {}
        self.options = dict(data_size_limit=size_limit, enable_SMTPUTF8=smtputf8,
                            authenticator=authenticator, auth_require_tls=auth_require_tls)
        self.tls, self.broken_tls = tls, broken_tls
        self.replies = replies or {}
        self.address, self.port = address, port
        self.messages: list[Received] = []
        self.connections = 0
        self.active = 0  # sessions open now, and the most open at once
        self.max_active = 0
        self.mail_reply: str | None = None  # set: every MAIL FROM gets this reply
        self.refused = 0  # MAIL FROMs answered with mail_reply
        # an address to the reply at the end of DATA of a message to it (RCPT was taken)
        self.data_replies: dict[str, str] = {}
        self.arrived = asyncio.Event()
        self._attempts: dict[str, int] = {}
        self._server: asyncio.base_events.Server | None = None
        self._protocols: set[SMTP] = set()

    def rcpt_reply(self, address: str) -> str:
        replies = self.replies.get(address.lower())
        if not replies:
            return "250 2.1.5 Ok"
        n = self._attempts.get(address.lower(), 0)
        self._attempts[address.lower()] = n + 1
        return replies[min(n, len(replies) - 1)]

    def delivered_to(self, address: str) -> list[Received]:
        return [m for m in self.messages if address in m.rcpt_tos]

    async def start(self) -> Sink:
        handler = _Handler(self)

        def factory() -> SMTP:
            self.connections += 1
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # plain-text AUTH, for the test that needs it
                proto = _SinkSMTP(handler, hostname="sink.test", tls_context=self.tls,
                                  require_starttls=False, **self.options)
            proto.broken_tls = self.broken_tls
            proto.sink = self
            self._protocols.add(proto)
            return proto

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(factory, self.address, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for proto in self._protocols:
                if proto.transport is not None:
                    proto.transport.close()
            await self._server.wait_closed()
            for _ in range(3):
                await asyncio.sleep(0)

    async def wait_for(self, predicate: Callable[[Sink], bool], timeout: float = 20.0) -> None:
        async def loop() -> None:
            while not predicate(self):
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(loop(), timeout)

    async def __aenter__(self) -> Sink:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
