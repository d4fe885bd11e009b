"""deliver.py against real aiosmtpd sinks: sessions, TLS and AUTH policy, limits, loops."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from relay.config import DeliveryConfig
from relay.delivery.deliver import Deliverer, _is_local
from relay.delivery.outbound import OutMessage, OutRecipient, Target, classify

from .sink import Sink

DATA = b"From: a@example.com\r\nSubject: t\r\n\r\nbody\r\n.dot line\r\n"


def message(i: int = 1, data: bytes = DATA, **kw: Any) -> OutMessage:
    return OutMessage(id=f"m{i}", mail_from="a@example.com", data=data,
                      recipients=(OutRecipient(id=i, address=f"r{i}@example.org"),), **kw)


def deliverer(**kw: Any) -> Deliverer:
    smarthost = kw.pop("smarthost", False)
    own = kw.pop("own", ())
    cfg = DeliveryConfig(**{"connect_timeout": 2.0, "command_timeout": 5.0, **kw})
    return Deliverer(hostname="relay.test", delivery=cfg, own_listeners=own,
                     smarthost=smarthost)


def target(sink: Sink, name: str = "mx.example.org") -> Target:
    return Target(hostname=name, address="127.0.0.1", port=sink.port)


@pytest.mark.parametrize("code, enhanced, expected", [
    (250, None, ("delivered", False)), (451, "4.3.2", ("deferred", False)),
    (None, None, ("deferred", False)), (550, "5.1.1", ("bounced", True)),
    (550, "5.1.10", ("bounced", True)), (550, "5.7.1", ("bounced", False)),
    (552, "5.2.2", ("bounced", False)), (554, None, ("bounced", False)),
])
def test_classify(code: int | None, enhanced: str | None, expected: tuple[str, bool]) -> None:
    assert classify(code, enhanced, "") == expected


async def test_many_messages_share_one_session_and_bytes_are_unchanged() -> None:
    async with Sink() as sink:
        d = deliverer(session_idle=5.0)
        try:
            first = await d.deliver([target(sink)], [message(1), message(2)])
            second = await d.deliver([target(sink)], [message(3)])
        finally:
            await d.close()
        assert [r.outcome for r in first + second] == ["delivered"] * 3
        assert sink.connections == 1  # the second call reused the parked session
        assert [m.data for m in sink.messages] == [DATA] * 3


async def test_messages_per_session_limit_reconnects() -> None:
    async with Sink() as sink:
        d = deliverer(messages_per_session=2)
        try:
            results = await d.deliver([target(sink)], [message(i) for i in range(1, 6)])
        finally:
            await d.close()
        assert [r.outcome for r in results] == ["delivered"] * 5
        assert sink.connections == 3


async def test_refused_target_moves_on_and_all_refused_defers() -> None:
    async with Sink() as sink:
        d = deliverer()
        dead = Target(hostname="dead.example.org", address="127.0.0.2", port=sink.port)
        try:
            (ok,) = await d.deliver([dead, target(sink)], [message()])
            (later,) = await d.deliver([dead], [message(2)])
        finally:
            await d.close()
        assert ok.outcome == "delivered" and ok.mx_host == "mx.example.org"
        assert later.outcome == "deferred" and "refused" in later.text


async def test_own_listener_is_a_loop_and_never_connected() -> None:
    async with Sink() as sink:
        d = deliverer(own=[("0.0.0.0", sink.port)])
        try:
            (result,) = await d.deliver([target(sink)], [message()])
        finally:
            await d.close()
        assert result.outcome == "bounced" and result.enhanced == "5.4.6"
        assert sink.connections == 0


def test_own_addresses_are_known_without_a_name_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """A listener on 0.0.0.0 is reached through any address of this host; which ones those
    are is asked of the kernel, not of the resolver (a lookup on the event loop at each
    delivery)."""
    def no_lookups(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a name lookup")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookups)
    d = deliverer(own=[("0.0.0.0", 2525)])
    assert _is_local(ipaddress.ip_address("127.0.0.2"))  # this host's, if not its name's
    assert not _is_local(ipaddress.ip_address("192.0.2.1"))  # TEST-NET: nobody's here
    assert not d._is_own(Target(hostname="mx.example.org", address="192.0.2.1", port=2525))


async def test_size_over_the_advertised_limit_bounces_without_sending() -> None:
    async with Sink(size_limit=100) as sink:
        d = deliverer()
        try:
            (result,) = await d.deliver([target(sink)], [message(data=DATA + b"x" * 200)])
        finally:
            await d.close()
        assert result.outcome == "bounced" and result.enhanced == "5.3.4"
        assert sink.messages == []


async def test_smtputf8_message_to_a_peer_without_it_bounces_567() -> None:
    async with Sink(smtputf8=False) as sink:
        d = deliverer()
        try:
            (result,) = await d.deliver([target(sink)], [message(smtputf8=True)])
        finally:
            await d.close()
        assert result.outcome == "bounced" and result.enhanced == "5.6.7"
        assert sink.messages == []


async def test_dsn_parameters_are_passed_on() -> None:
    async with Sink() as sink:
        d = deliverer()
        msg = OutMessage(id="m", mail_from="a@example.com", data=DATA, dsn_ret="HDRS",
                         dsn_envid="env 1", recipients=(OutRecipient(
                             id=1, address="r@example.org", notify=("FAILURE", "DELAY"),
                             orcpt="rfc822;r@example.org"),))
        try:
            await d.deliver([target(sink)], [msg])
        finally:
            await d.close()
        (got,) = sink.messages
        assert "RET=HDRS" in got.mail_options and "ENVID=env+201" in got.mail_options
        assert got.rcpt_options == ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;r@example.org"]


# -- smarthost TLS and AUTH ---------------------------------------------------------------------


class Auth:
    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes, bytes]] = []

    def __call__(self, server: SMTP, session: Any, envelope: Any, mechanism: str,
                 data: LoginPassword) -> AuthResult:
        self.seen.append((mechanism, data.login, data.password))
        return AuthResult(success=data.password == b"secret")


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


async def test_smarthost_auth_over_verified_starttls(tmp_path: Path, ca: trustme.CA) -> None:
    auth = Auth()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with Sink(tls=server_ctx(ca), authenticator=auth) as sink:
        d = deliverer(smarthost=True, smarthost_user="relay", smarthost_password="secret",
                      tls_ca_file=str(ca_file))
        try:
            (result,) = await d.deliver(
                [Target(hostname="127.0.0.1", address="127.0.0.1", port=sink.port)], [message()])
        finally:
            await d.close()
        assert result.outcome == "delivered", result.text
        assert result.tls_version and sink.messages[0].tls
        assert auth.seen and auth.seen[0][1:] == (b"relay", b"secret")


async def test_smarthost_certificate_is_verified(ca: trustme.CA) -> None:
    async with Sink(tls=server_ctx(ca)) as sink:
        d = deliverer(smarthost=True)  # the system CAs do not know this test CA
        try:
            (result,) = await d.deliver(
                [Target(hostname="127.0.0.1", address="127.0.0.1", port=sink.port)], [message()])
        finally:
            await d.close()
        assert result.outcome == "deferred" and "certificate" in result.text.lower()
        assert sink.messages == []


async def test_auth_is_never_sent_in_plain_text() -> None:
    auth = Auth()
    async with Sink(authenticator=auth, auth_require_tls=False) as sink:
        d = deliverer(smarthost=True, smarthost_tls="none", smarthost_user="relay",
                      smarthost_password="secret")
        try:
            (result,) = await d.deliver(
                [Target(hostname="127.0.0.1", address="127.0.0.1", port=sink.port)], [message()])
        finally:
            await d.close()
        assert result.outcome == "deferred" and "plain text" in result.text
        assert auth.seen == [] and sink.messages == []
