"""The SMTP listeners of one process, as the master and each front worker build them: a
handler and a protocol factory per listener, and how a worker's sessions end when it stops.

A stopping worker (a reload's old set, or relay stopping) has been handed its last
connection already. It closes at once each session that is between transactions, with a
421 as Postfix's smtpd says on its way out, and lets a session in a transaction reach its
end (the 250 after the commit) for up to `grace` seconds before closing it too. A closed
session still open CLOSING seconds later (a TLS client that does not answer the close) is
dropped. Either way no mail is lost: a 250 comes only after the commit, and a client
without one sends again.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence

from .. import handoff
from ..config import Config, ListenerConfig
from ..errors import ConfigError
from ..feedback.tracking import Tokens, load_key
from ..store import SQLiteStore
from ..submit import Submitter
from ..tlsutil import ensure_self_signed, server_context
from .handler import RelayHandler
from .inbound import Inbound
from .protocol import RelaySMTP
from .server import make_server_factory

POLL = 0.02  # seconds between looks at the sessions still open while stopping
CLOSING = 1.0  # seconds a closed session may take to go (TLS waits for the peer's close_notify)


def tls_files(config: Config, index: int, listener: ListenerConfig) -> tuple[str, str] | None:
    """The certificate and key a listener serves, checked by loading them (ConfigError)."""
    files = _files(config, index, listener)
    if files is not None:
        _context(config, index, files)
    return files


def contexts(config: Config) -> list[ssl.SSLContext | None]:
    """Each listener's TLS context (None for one without TLS), each file read once.
    Raises ConfigError."""
    found = [_files(config, i, listener) for i, listener in enumerate(config.smtp.listeners)]
    return [None if files is None else _context(config, i, files)
            for i, files in enumerate(found)]


def _files(config: Config, index: int, listener: ListenerConfig) -> tuple[str, str] | None:
    if listener.tls == "none":
        if listener.mode == "submission":
            raise ConfigError(config.source, f"smtp.listeners[{index}].tls",
                              "a submission listener needs TLS (AUTH is only offered over "
                              "TLS); use starttls or implicit")
        return None
    if listener.tls_cert:
        return listener.tls_cert, listener.tls_key
    cert, key = ensure_self_signed(config.server.data_dir, config.server.hostname)
    return str(cert), str(key)


def _context(config: Config, index: int, files: tuple[str, str]) -> ssl.SSLContext:
    try:
        return server_context(*files)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(config.source, f"smtp.listeners[{index}].tls_cert",
                          f"cannot load the certificate and key: {exc}") from None


class Listeners:
    """Every SMTP listener of `config`, served with `contexts` (one per listener: its TLS
    context, or None)."""

    def __init__(self, config: Config, store: SQLiteStore, submitter: Submitter,
                 contexts: Sequence[ssl.SSLContext | None]) -> None:
        inbound = Inbound(config, store, submitter, Tokens(load_key(config.server.data_dir)))
        self.handlers = [RelayHandler(config, listener, store, submitter, inbound)
                         for listener in config.smtp.listeners]
        self.contexts = list(contexts)

    def servings(self) -> dict[bytes, handoff.Serving]:
        """How each listener's handed connections are served, by its handoff tag."""
        return {handoff.smtp_tag(i): self.serving(i) for i in range(len(self.handlers))}

    def serving(self, index: int) -> handoff.Serving:
        handler, ctx = self.handlers[index], self.contexts[index]
        implicit = handler.listener.tls == "implicit"
        return handoff.Serving(make_server_factory(handler, ctx), ctx if implicit else None)

    def sessions(self) -> list[RelaySMTP]:
        return [conn for handler in self.handlers for conn in handler.connections]

    async def drain(self, grace: float) -> None:
        """End every session: those between transactions now, the others when their
        transaction ends or `grace` seconds have passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        closed: dict[RelaySMTP, float] = {}  # when each was told and closed
        while open_ := self.sessions():
            now = loop.time()
            for conn in open_:
                if conn not in closed:
                    if now >= deadline or not conn.in_transaction:
                        conn.close_for_shutdown()
                        closed[conn] = now
                elif now - closed[conn] >= CLOSING:  # a TLS peer that does not close
                    conn.abort()
                    closed[conn] = float("inf")  # dropped; its connection_lost is due
            await asyncio.sleep(POLL)
