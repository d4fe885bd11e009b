"""The SMTP protocol of relay's listeners: aiosmtpd's SMTP, made to speak like an MTA.

Enhanced status codes on every reply, the DSN parameters of MAIL and RCPT (RFC 3461),
DATA read in one block, the listener's connection caps applied before the greeting, and
AUTH's key check handed to the listener's policy. No policy is decided here: the handler
(handler.py) says who may send what.
"""

from __future__ import annotations

import asyncio
import logging
import re
import warnings
from types import MethodType
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from ..clients import client_key
from . import quietlog  # noqa: F401 - aiosmtpd's command log, masked only when written
from .limits import ConnectionCaps
from .replies import with_enhanced
from .tables import BoundOnLookup, hook_names

log = logging.getLogger(__name__)

# <local@domain> with a dot-atom local part (RFC 5321 4.1.2), then the parameters
_SIMPLE_PATH = re.compile(
    r"^\s*<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>(\s.*)?$")
_DSN_MAIL_PARAMS = ("RET", "ENVID", "AUTH")
_DSN_RCPT_PARAMS = ("NOTIFY", "ORCPT")
_NOTIFY_VALUES = {"SUCCESS", "FAILURE", "DELAY"}
# replies written at once, even when more commands are waiting: the greeting, STARTTLS's
# 220 (the TLS handshake follows), 354 (the client waits for it), an AUTH challenge, and the
# last words before a close
_AT_ONCE = frozenset({b"220", b"221", b"334", b"354", b"421"})


# how often a session the client closed its side of looks again for its commands' end
_EOF_POLL = 0.01


class Policy(Protocol):
    """What RelaySMTP asks of its handler (handler.RelayHandler)."""

    caps: ConnectionCaps
    connections: set[RelaySMTP]

    async def check_login(self, server: RelaySMTP, creds: LoginPassword) -> AuthResult: ...


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with enhanced status codes, DSN parameters, async key checks and
    the listener's connection caps."""

    line_length_limit = 32768  # accept long lines; render makes them safe before delivery

    def __init__(self, handler: Policy, *, implicit_tls: bool, **kwargs: Any) -> None:
        self.implicit_tls = implicit_tls
        self._client: str | None = None  # the address counted against the caps, once admitted
        self._refused = False
        self._continued = b""  # the lines of a multi-line reply before its last
        self._held = b""  # replies to pipelined commands, written with the group's last (push)
        self._deadline = 0.0  # when the idle timeout ends (_reset_timeout)
        self._in_data = False  # reading a message after 354
        if not implicit_tls:
            super().__init__(handler, auth_require_tls=True, **kwargs)
        else:
            with warnings.catch_warnings():  # costly (a filter list each time): this case only
                # With implicit TLS every byte is encrypted, so AUTH need not wait for STARTTLS.
                warnings.simplefilter("ignore")
                super().__init__(handler, auth_require_tls=False, **kwargs)
        # the commands' functions, which fresh() binds to each connection as they are used
        self._smtp_functions = {name: m.__func__ for name, m in self._smtp_methods.items()}

    def __dir__(self) -> list[str]:
        return hook_names(self)

    def fresh(self) -> RelaySMTP:
        """A new connection's protocol, made from this one (a template the listener builds
        once per configuration and never connects): its settings and aiosmtpd's tables
        copied, its stream and the methods bound to it made anew.  SMTP.__init__ reads the
        protocol's and the handler's methods with inspect.getmembers and inspect.signature
        on every connection, ~43 µs against ~6 µs for this (`bench/smtp_session.py`).
        tests/test_smtpd.py holds the copy to aiosmtpd's attributes: a mutable one it does
        not know fails there, rather than being shared by two connections."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        loop = self.loop
        asyncio.StreamReaderProtocol.__init__(
            new, asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=new._cb_client_connected, loop=loop)
        new._smtp_methods = BoundOnLookup(self._smtp_functions, new)
        new._auth_methods = {
            name: a._replace(method=MethodType(a.method.__func__, new)) if a.is_builtin else a
            for name, a in self._auth_methods.items()}
        return new

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # called again with the TLS transport after STARTTLS: the same connection
        if self._original_transport is None:
            handler: Policy = self.event_handler
            client = client_key(peer_ip(transport.get_extra_info("peername")))
            why = handler.caps.admit(client)
            if why is not None:
                # the greeting's place; aiosmtpd's session never starts (nor needs ending)
                self._refused = True
                refused = handler.caps.to_log(client)
                if refused:
                    log.warning("refused %d connection%s from %s: %s", refused,
                                "s" if refused > 1 else "", client, why)
                transport.write(f"421 4.7.0 {self.hostname} {why}\r\n".encode())
                transport.close()
                return
            self._client = client
        self.event_handler.connections.add(self)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._refused:  # a refused client's words are not read
            if self._in_data:  # the idle timeout runs from the last octets, not from DATA
                self._deadline = self.loop.time() + self._timeout_duration
            super().data_received(data)

    def eof_received(self) -> bool | None:
        if self._refused:  # a TLS transport still reports the client's close
            return False
        if self.secure or self._idle():
            # aiosmtpd's end of the session (a TLS transport cannot stay half open)
            return super().eof_received()  # type: ignore[no-any-return]
        # The client closed its side with commands still unanswered: Exim writes the end of
        # the data and QUIT together, then shuts down its sending side. They are answered
        # first; aiosmtpd ended the session at once, so the message was never answered and
        # came again at the client's next queue run (minutes to an hour later).
        self.loop.call_later(_EOF_POLL, self._end_when_idle)
        return True  # the transport stays open for the replies

    def _idle(self) -> bool:
        """Whether the session waits for the client with no whole command left to read."""
        waiting = self._reader._waiter is not None  # type: ignore[attr-defined]
        return waiting and (self._in_data or not self._command_waiting())

    def _end_when_idle(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # answered and closed (QUIT)
        if not self._idle():
            self.loop.call_later(_EOF_POLL, self._end_when_idle)
            return
        super().eof_received()  # the last command answered: the end aiosmtpd makes

    def _reset_timeout(self, duration: float | None = None) -> None:
        """The idle timeout, pushed back at every command by moving a deadline; the timer
        is re-armed only when it fires early or must fire sooner. aiosmtpd cancels and
        schedules a timer per command, 2-3 % of the accept path's CPU."""
        loop = self.loop
        self._deadline = deadline = loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = loop.call_at(deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        if self.loop.time() < self._deadline:  # a command since the timer was set
            self._timeout_handle = self.loop.call_at(self._deadline, self._timeout_cb)
            return
        self._write_held()
        if self.transport is not None and not self.transport.is_closing():
            # said before closing, as Postfix does: the client learns why (RFC 5321 4.5.3.2)
            self.transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n"
                                 .encode())
        super()._timeout_cb()

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        self._release()
        self.event_handler.connections.discard(self)
        super().connection_lost(error)

    def _release(self) -> None:
        if self._client is not None:
            self.event_handler.caps.release(self._client)
            self._client = None

    def close(self) -> None:
        """Drop the connection (service shutdown)."""
        if self._original_transport is not None:
            self._original_transport.close()
        if self.transport is not None:
            self.transport.close()

    @property
    def in_transaction(self) -> bool:
        """A MAIL FROM taken and its transaction not yet answered: aiosmtpd starts a new
        envelope after DATA in the step that writes the reply, with no wait between."""
        envelope = getattr(self, "envelope", None)
        return envelope is not None and envelope.mail_from is not None

    def close_for_shutdown(self) -> None:
        """Say 421 and close (smtp/listeners.py calls it once a session)."""
        self._write_held()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(f"421 4.3.2 {self.hostname} Service shutting down\r\n"
                                 .encode())
        self.close()

    def abort(self) -> None:
        """Drop the connection, written or not (a TLS peer that does not finish the close)."""
        for transport in (self.transport, self._original_transport):
            if transport is not None:
                transport.abort()

    @property
    def secure(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    async def smtp_DATA(self, arg: str | None) -> None:
        """DATA read as one block up to CRLF.CRLF, not line by line (aiosmtpd's way).

        The end is recognised exactly as aiosmtpd does (only <CRLF>.<CRLF>, so a
        bare-LF dot line cannot end a message), and a leading dot is removed from
        every line; the message is then handed to handle_DATA like aiosmtpd would.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._in_data = True
        try:
            data = await self._read_data()
        finally:
            self._in_data = False
        if data is None:
            self._set_post_data_state()
            await self.push("552 5.3.4 Message too big for system")
            return
        self.envelope.content = self.envelope.original_content = data
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    async def _read_data(self) -> bytes | None:
        """The message without its terminator and dot-stuffing, or None when over the limit."""
        reader, limit = self._reader, self.data_size_limit
        max_size = limit + 3 if limit else 0
        buf = bytearray()
        size = 0
        tail = b""  # the last two octets read, kept even when the data itself is dropped
        while True:
            try:
                chunk = await reader.readuntil(b".\r\n")
            except asyncio.LimitOverrunError as exc:
                # Take what cannot hold the separator; its start stays buffered for the next try.
                chunk = await reader.read(exc.consumed)
                ended = False
            else:
                ended = size + len(chunk) == 3 or (tail + chunk)[-5:-3] == b"\r\n"
            size += len(chunk)
            tail = (tail + chunk)[-2:]
            if not max_size or size <= max_size:
                buf += chunk
            if ended:
                break
        if max_size and size > max_size:
            return None
        # the data ends with CRLF "." CRLF (or is "." CRLF): drop ".CRLF", un-stuff leading dots
        data = bytes(buf[:-3])
        if data.startswith(b"."):
            data = data[1:]
        return data.replace(b"\r\n.", b"\r\n")

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses with the email package's header parser (slow: a class per call);
        # the common "<simple@address> params" takes a regex, anything else the full parser.
        m = _SIMPLE_PATH.match(arg)
        if m:
            return m.group(1), m.group(2) or ""
        return super()._getaddr(arg)  # type: ignore[no-any-return]

    async def push(self, status: Any) -> None:
        """One write per reply: aiosmtpd pushes each line of a multi-line reply (EHLO's ten)
        by itself, a send() and a TCP segment each; the lines before the last ("250-") wait
        for it. And one write for the replies of commands that came together, as Postfix's
        smtpd answers a client that pipelines (RFC 2920): a reply waits while the client's
        next command is already here, and goes out with the first reply that finds none
        waiting. Every command is answered, so nothing waits past the commands at hand;
        a greeting, 354, a challenge and a closing 221 or 421 go out at once."""
        if isinstance(status, str):
            status = with_enhanced(status)
            status = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
        if status[3:4] == b"-":
            self._continued += status + b"\r\n"
            return
        if self._continued:
            status, self._continued = self._continued + status, b""
        if status[:3] not in _AT_ONCE and not self._in_data and self._command_waiting():
            self._held += status + b"\r\n"
            return
        if self._held:
            status, self._held = self._held + status, b""
        await super().push(status)

    def _command_waiting(self) -> bool:
        """Whether a whole command line is read and not yet taken (a pipelining client's)."""
        buffer: bytearray = self._reader._buffer  # type: ignore[attr-defined]
        return b"\n" in buffer

    def _write_held(self) -> None:
        """Replies held for a pipelined group, written before the connection is closed."""
        if self._held and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self._held)
        self._held = b""

    # DSN (RFC 3461) parameters are taken off before aiosmtpd sees them; it knows none.
    async def smtp_MAIL(self, arg: str | None) -> None:
        arg, params = _take_params(arg, _DSN_MAIL_PARAMS)
        error = _check_mail_params(params)
        if error:
            await self.push(error)
            return
        await super().smtp_MAIL(arg)
        if self.envelope is not None and self.envelope.mail_from is not None:
            self.envelope.dsn_ret = params.get("RET", "").upper() or None  # type: ignore[attr-defined]
            self.envelope.dsn_envid = params.get("ENVID")  # type: ignore[attr-defined]

    async def smtp_RCPT(self, arg: str | None) -> None:
        arg, params = _take_params(arg, _DSN_RCPT_PARAMS)
        notify = tuple(v.strip().upper() for v in params.get("NOTIFY", "").split(",") if v.strip())
        if notify and not (notify == ("NEVER",) or set(notify) <= _NOTIFY_VALUES):
            await self.push("501 5.5.4 NOTIFY is NEVER or a list of SUCCESS, FAILURE, DELAY")
            return
        assert self.envelope is not None
        before = len(self.envelope.rcpt_tos)
        await super().smtp_RCPT(arg)
        if len(self.envelope.rcpt_tos) > before:
            dsn = getattr(self.envelope, "dsn_rcpt", [])
            dsn.append((notify, params.get("ORCPT")))
            self.envelope.dsn_rcpt = dsn  # type: ignore[attr-defined]

    # AUTH: aiosmtpd parses PLAIN and LOGIN; the key is checked here, asynchronously.
    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        return AuthResult(success=False, handled=False, auth_data=auth_data)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._check(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._check(await super().auth_LOGIN(_, args))

    async def _check(self, result: AuthResult) -> AuthResult:
        if result.success or result.handled or not isinstance(result.auth_data, LoginPassword):
            return result
        handler: Policy = self.event_handler
        return await handler.check_login(self, result.auth_data)


def _take_params(arg: str | None, names: tuple[str, ...]) -> tuple[str | None, dict[str, str]]:
    if not arg:
        return arg, {}
    kept, taken = [], {}
    parts = arg.split(" ")
    for i, part in enumerate(parts):
        name, eq, value = part.partition("=")
        if i > 0 and eq and name.upper() in names:
            taken[name.upper()] = value
        else:
            kept.append(part)
    return " ".join(kept), taken


def _check_mail_params(params: dict[str, str]) -> str | None:
    if "RET" in params and params["RET"].upper() not in ("FULL", "HDRS"):
        return "501 5.5.4 RET is FULL or HDRS"
    if "ENVID" in params and len(params["ENVID"]) > 100:
        return "501 5.5.4 ENVID is longer than 100 characters"
    return None


def peer_ip(peer: Any) -> str:
    """The address of a peer as asyncio gives it (a tuple, or a string for a Unix socket)."""
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)
