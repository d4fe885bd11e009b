"""The SMTP listeners: aiosmtpd handlers that apply relay's policy and hand mail to `submit`.

aiosmtpd speaks the protocol; this module decides who may send what. Three
modes: `submission` (AUTH with an API key, only over TLS), `relay` (no AUTH,
only from `allowed_networks`) and `inbound` (from anyone, without AUTH, but only for
relay's own bounce, unsubscribe and complaint addresses: the reports go to inbound.py,
never into the queue). No mode is ever an open relay.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import ssl
import warnings
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from .. import keys, rawmail
from ..addresses import normalize_address
from ..clients import client_key
from ..config import Config, ListenerConfig
from ..errors import StoreError, ValidationError
from ..store import Store
from ..submit import Submitter
from ..types import ApiKey, EnvelopeRecipient, Stream, Submission
from .inbound import Inbound
from .limits import AuthThrottle, ConnectionCaps

log = logging.getLogger(__name__)

# Enhanced status codes (RFC 3463) for the replies aiosmtpd writes without one.
_ENHANCED_BY_CODE = {
    "421": "4.7.0", "451": "4.3.0", "452": "4.5.3",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "550": "5.0.0", "552": "5.3.4", "553": "5.1.3", "554": "5.7.0",
    "555": "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}\b")
_REPLY = re.compile(r"^([245]\d\d)([ -])(.*)$", re.DOTALL)
# <local@domain> with a dot-atom local part (RFC 5321 4.1.2), then the parameters
_SIMPLE_PATH = re.compile(
    r"^\s*<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)>(\s.*)?$")
_DSN_MAIL_PARAMS = ("RET", "ENVID", "AUTH")
_DSN_RCPT_PARAMS = ("NOTIFY", "ORCPT")
_NOTIFY_VALUES = {"SUCCESS", "FAILURE", "DELAY"}
_MAX_METADATA = 8192
NULL_SENDER = "<>"  # how aiosmtpd hands over MAIL FROM:<>


def with_enhanced(status: str) -> str:
    """Add an enhanced status code to a reply that has none (not to greetings or 354/334)."""
    if status in ("250 OK", "221 Bye"):
        return status[:4] + "2.0.0 " + status[4:]
    if _HAS_ENHANCED.match(status):
        return status
    m = _REPLY.match(status)
    if not m or m.group(1) not in _ENHANCED_BY_CODE or m.group(2) == "-":
        return status
    code, _, text = m.groups()
    if status.startswith("552 Error: Too much mail data") or "exceeds fixed maximum" in status:
        text = "Message too big for system"
    return f"{code} {_ENHANCED_BY_CODE[code]} {text}"


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with enhanced status codes, DSN parameters, async key checks and
    the listener's connection caps."""

    line_length_limit = 32768  # accept long lines; render makes them safe before delivery

    def __init__(self, handler: RelayHandler, *, implicit_tls: bool, **kwargs: Any) -> None:
        self.implicit_tls = implicit_tls
        self._client: str | None = None  # the address counted against the caps, once admitted
        self._refused = False
        with warnings.catch_warnings():
            # With implicit TLS every byte is encrypted, so AUTH need not wait for STARTTLS.
            warnings.simplefilter("ignore")
            super().__init__(handler, auth_require_tls=not implicit_tls, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # called again with the TLS transport after STARTTLS: the same connection
        if self._original_transport is None:
            handler: RelayHandler = self.event_handler
            client = client_key(_peer_ip(transport.get_extra_info("peername")))
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
            super().data_received(data)

    def eof_received(self) -> bool | None:
        if self._refused:  # a TLS transport still reports the client's close
            return False
        return super().eof_received()  # type: ignore[no-any-return]

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
        data = await self._read_data()
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
        if isinstance(status, str):
            status = with_enhanced(status)
        await super().push(status)

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
        handler: RelayHandler = self.event_handler
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
        self.caps = ConnectionCaps.from_limits(config.limits)
        self.inbound = inbound  # what an inbound listener hands its reports to
        self.connections: set[RelaySMTP] = set()

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
            delay = self.throttle.failed(ip)
            log.warning("failed login from %s", ip)
            if delay:
                await asyncio.sleep(delay)
            return AuthResult(success=False, handled=False)
        self.throttle.succeeded(ip)
        return AuthResult(success=True, auth_data=key)

    # -- the envelope ---------------------------------------------------------

    async def handle_MAIL(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        mode = self.listener.mode
        if mode == "relay" and not self._allowed_network(session):
            return "554 5.7.1 Relay access denied"
        if address and address != NULL_SENDER:
            try:
                normalize_address(address, smtputf8=envelope.smtp_utf8, param="MAIL FROM")
            except ValidationError as exc:
                return f"{exc.smtp} {exc.message}"
            domain = address.rpartition("@")[2].lower()
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
            api_key_id=key.id if key else None,
            allowed_domains=self._allowed_domains(session),
            tags=controls.get("tags", ()),
            metadata=controls.get("metadata", {}),
            stream=controls.get("stream", Stream.TRANSACTIONAL),
            idempotency_key=controls.get("idempotency_key"),
            dsn_ret=getattr(envelope, "dsn_ret", None),
            dsn_envid=getattr(envelope, "dsn_envid", None),
            smtputf8=bool(envelope.smtp_utf8),
            received_from=f"{_clean(helo)} ([{_ip(session)}])",
            received_with=protocol,
        )

    def _allowed_network(self, session: Session) -> bool:
        try:
            ip = ipaddress.ip_address(_ip(session))
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.listener.allowed_networks)

    def _allowed_domains(self, session: Session) -> tuple[str, ...]:
        """A key's own domain limit, else the listener's `allowed_from_domains`; empty = any."""
        key = session.auth_data if isinstance(session.auth_data, ApiKey) else None
        if key is not None and key.domains:
            return key.domains
        return self.listener.allowed_from_domains


def read_controls(data: bytes) -> dict[str, Any]:
    """The X-Relay-* control headers of a message; a bad value names its header."""
    headers, _ = rawmail.split(rawmail.normalize_newlines(data))
    out: dict[str, Any] = {}
    for h in headers:
        if not h.key.startswith("x-relay-"):
            continue
        value = h.value
        if h.key == "x-relay-tags":
            tags = tuple(t.strip() for t in value.split(",") if t.strip())
            if any(len(t) > 256 for t in tags) or len(tags) > 20:
                raise ValidationError("X-Relay-Tags: at most 20 tags of 256 characters",
                                      param=h.name)
            out["tags"] = tags
        elif h.key == "x-relay-metadata":
            try:
                meta = json.loads(value)
            except ValueError:
                meta = None
            if not isinstance(meta, dict) or len(value) > _MAX_METADATA:
                raise ValidationError("X-Relay-Metadata must be a JSON object (at most 8 KB)",
                                      param=h.name)
            out["metadata"] = meta
        elif h.key == "x-relay-stream":
            try:
                out["stream"] = Stream(value.strip().lower())
            except ValueError:
                raise ValidationError("X-Relay-Stream must be transactional or broadcast",
                                      param=h.name) from None
        elif h.key == "x-relay-idempotency-key":
            if not value.strip() or len(value) > 255:
                raise ValidationError("X-Relay-Idempotency-Key must be 1 to 255 characters",
                                      param=h.name)
            out["idempotency_key"] = value.strip()
        else:
            raise ValidationError(f"{h.name}: unknown relay control header", param=h.name)
    return out


def _sender(envelope: Envelope) -> str:
    """MAIL FROM's address; "" for the null sender (aiosmtpd keeps it as "<>", which its RCPT
    check needs to be truthy)."""
    address = envelope.mail_from or ""
    return "" if address == NULL_SENDER else address


def _ip(session: Session) -> str:
    return _peer_ip(session.peer)


def _peer_ip(peer: Any) -> str:
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def _clean(text: str) -> str:
    return re.sub(r"[^\x21-\x7e]", "?", text)[:255]


def _close_soon(server: SMTP) -> None:
    loop = asyncio.get_running_loop()
    loop.call_soon(lambda: server.transport.close() if server.transport else None)


def make_server_factory(handler: RelayHandler,
                        tls_context: ssl.SSLContext | None) -> Callable[[], RelaySMTP]:
    config, listener = handler.config, handler.listener
    limits = config.limits
    submission = listener.mode == "submission"
    implicit = listener.tls == "implicit"

    def factory() -> RelaySMTP:
        return RelaySMTP(
            handler,
            implicit_tls=implicit,
            data_size_limit=limits.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=config.server.hostname,
            ident="relay",
            tls_context=tls_context if listener.tls == "starttls" else None,
            timeout=limits.idle_timeout,
            auth_required=submission,
            auth_exclude_mechanism=() if submission else ("PLAIN", "LOGIN"),
            command_call_limit=limits.max_commands,
        )

    return factory
