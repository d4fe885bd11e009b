"""The SMTP listener against real smtplib clients over real TLS."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import smtplib
import socket
import ssl
import time
from typing import Any

import pytest

from relay import keys
from relay.config import LimitsConfig, ListenerConfig
from relay.service import Service
from relay.store import SQLiteStore

from .conftest import add_signing_domain, free_port, make_config
from .smtputil import MESSAGE, client_tls, connect, in_thread, send


async def make_key(svc: Service, **kw: object) -> str:
    _, secret = await keys.create_key(svc.store, name="test", scopes=["emails:send"], **kw)
    return secret


def login(port: int, secret: str) -> None:
    with connect(port) as s:
        s.login("anyone", secret)


async def stored_bodies(svc: Service) -> list[bytes]:
    page = await svc.store.list_messages(limit=1000)
    return [await svc.store.get_body(d.message.id) or b"" for d in page.items]


# -- submission: TLS, AUTH, keys ---------------------------------------------------


async def test_starttls_and_valid_key_queue_the_message(service: Service) -> None:
    key = await make_key(service)
    port = service.bound[0][1]
    code, text = await in_thread(send, port, key)
    assert code == 250, text
    assert b"queued as msg_" in text
    message_id = text.split(b"queued as ")[1].decode()
    detail = await service.store.get_message(message_id)
    assert detail is not None
    assert [r.address for r in detail.recipients] == ["bob@example.org"]
    assert detail.message.status == "queued"


async def test_wrong_key_gets_535(service: Service) -> None:
    await make_key(service)
    port = service.bound[0][1]

    def attempt() -> None:
        with connect(port) as s:
            s.login("anyone", "rk_000000000000_not-a-real-key")

    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        await in_thread(attempt)
    assert err.value.smtp_code == 535
    assert err.value.smtp_error.startswith(b"5.7.8")


async def test_aiosmtpds_command_log_is_masked_and_made_only_when_written(
        service: Service, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """aiosmtpd masks AUTH's secret in each command line it logs; relay keeps its logger at
    WARNING, and then no line is masked at all (smtp/quietlog.py). Written, it is masked."""
    import aiosmtpd.smtp

    secret = await make_key(service)
    port = service.bound[0][1]
    masked: list[bytes] = []
    real = aiosmtpd.smtp.sanitize
    monkeypatch.setattr(aiosmtpd.smtp, "sanitize", lambda t: masked.append(t) or real(t))
    mail_log = logging.getLogger("mail.log")
    monkeypatch.setattr(mail_log, "level", logging.WARNING)
    await in_thread(login, port, secret)
    assert masked == []
    blob = base64.b64encode(f"\0anyone\0{secret}".encode()).decode()
    with caplog.at_level(logging.DEBUG, logger="mail.log"):
        await in_thread(login, port, secret)
    assert masked and "AUTH PLAIN ********" in caplog.text
    assert blob not in caplog.text and secret not in caplog.text


async def test_key_without_send_scope_is_refused(service: Service) -> None:
    _, secret = await keys.create_key(service.store, name="reader", scopes=["emails:read"])
    port = service.bound[0][1]
    with pytest.raises(smtplib.SMTPAuthenticationError):
        await in_thread(login, port, secret)


async def test_revoked_key_is_refused(service: Service) -> None:
    key, secret = await keys.create_key(service.store, name="t", scopes=["emails:send"])
    await service.store.revoke_api_key(key.id, 0.0)
    with pytest.raises(smtplib.SMTPAuthenticationError):
        await in_thread(login, service.bound[0][1], secret)


async def test_auth_is_not_offered_before_starttls(service: Service) -> None:
    port = service.bound[0][1]

    def attempt() -> tuple[bool, int]:
        with connect(port, starttls=False) as s:
            offered = s.has_extn("auth")
            code, _ = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0u\0p").decode())
            return offered, code

    offered, code = await in_thread(attempt)
    assert not offered
    assert code == 538


async def test_mail_without_auth_gets_530(service: Service) -> None:
    def attempt() -> tuple[int, bytes]:
        with connect(service.bound[0][1]) as s:
            return s.mail("alice@example.com")

    code, text = await in_thread(attempt)
    assert code == 530
    assert text.startswith(b"5.7.0")


async def test_implicit_tls_listener(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = make_config(tmp_path, ListenerConfig(port=free_port(), tls="implicit"))
    svc = Service(config)
    await svc.start()
    try:
        key = await make_key(svc)

        def go() -> tuple[int, bytes]:
            with connect(svc.bound[0][1], starttls=False, implicit=True, key=key) as s:
                return s.sendmail("alice@example.com", ["bob@example.org"], MESSAGE) or (250, b"")

        code, _ = await in_thread(go)
        assert code == 250
        assert len(await stored_bodies(svc)) == 1
    finally:
        await svc.stop()


async def test_repeated_failures_are_slowed_then_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = make_config(tmp_path, limits=LimitsConfig(auth_failures_before_delay=1,
                                                       auth_failures_before_block=3))
    svc = Service(config)
    await svc.start()
    try:
        good = await make_key(svc)
        port = svc.bound[0][1]

        def failures() -> tuple[list[int], float]:
            codes = []
            wrong = base64.b64encode(b"\0x\0rk_000000000000_wrong").decode()
            started = time.monotonic()
            with connect(port) as s:
                for _ in range(3):
                    codes.append(s.docmd("AUTH", "PLAIN " + wrong)[0])
            return codes, time.monotonic() - started

        codes, took = await in_thread(failures)
        assert codes == [535, 535, 535]
        assert took >= 1.0  # the later failures were answered slowly

        def now_blocked() -> tuple[int, bytes]:
            s = smtplib.SMTP("127.0.0.1", port, timeout=10)
            try:
                return s.ehlo("client.test")
            finally:
                s.close()

        code, text = await in_thread(now_blocked)
        assert code == 421 and text.startswith(b"4.7.0")  # the client is refused for a while
        del good
    finally:
        await svc.stop()


# -- relay mode ----------------------------------------------------------------------


@pytest.mark.parametrize("networks, expected", [(("10.0.0.0/8",), 554), (("127.0.0.0/8",), 250)])
async def test_relay_listener_checks_allowed_networks(tmp_path, networks, expected) -> None:  # type: ignore[no-untyped-def]
    import ipaddress

    listener = ListenerConfig(port=free_port(), mode="relay", tls="none",
                              allowed_networks=tuple(ipaddress.ip_network(n) for n in networks))
    svc = Service(make_config(tmp_path, listener))
    await svc.start()
    try:
        code, text = await in_thread(send, svc.bound[0][1], None, MESSAGE, "alice@example.com",
                                     ("bob@example.org",), False)
        assert code == expected, text
        if expected == 554:
            assert text.startswith(b"5.7.1")
            assert await stored_bodies(svc) == []
        else:
            assert len(await stored_bodies(svc)) == 1
    finally:
        await svc.stop()


def _half_closed(port: int, last: bytes) -> bytes:
    """A session written as Exim writes one: MAIL, RCPT and DATA, then `last` (the message's
    end and QUIT together) and its sending side shut down; all the server answers after."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        replies = sock.makefile("rb")
        replies.readline()  # the greeting
        sock.sendall(b"EHLO client.test\r\n")
        while replies.readline()[3:4] == b"-":
            pass
        sock.sendall(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
        said = [replies.readline() for _ in range(3)]
        sock.sendall(last)
        sock.shutdown(socket.SHUT_WR)
        return b"".join(said) + replies.read()


@pytest.mark.parametrize(("last", "stored", "answers"), [
    (MESSAGE + b".\r\nQUIT\r\n", 1, [b"250", b"221"]),  # every command answered
    (MESSAGE, 0, []),  # the data never ended: nothing taken, the session ends
])
async def test_a_client_closing_its_side_after_its_last_command_is_answered(
        tmp_path, last: bytes, stored: int, answers: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    import ipaddress
    listener = ListenerConfig(port=free_port(), mode="relay", tls="none",
                              allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),))
    svc = Service(make_config(tmp_path, listener))
    await svc.start()
    try:
        said = await in_thread(_half_closed, svc.bound[0][1], last)
        lines = said.splitlines()
        assert [line[:3] for line in lines[:3]] == [b"250", b"250", b"354"]
        assert [line[:3] for line in lines[3:]] == answers
        assert len(await stored_bodies(svc)) == stored
    finally:
        await svc.stop()


async def test_relay_listener_without_networks_is_closed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    svc = Service(make_config(tmp_path, ListenerConfig(port=free_port(), mode="relay", tls="none")))
    await svc.start()
    try:
        code, _ = await in_thread(send, svc.bound[0][1], None, MESSAGE, "alice@example.com",
                                  ("bob@example.org",), False)
        assert code == 554
    finally:
        await svc.stop()


# -- who may send as whom ----------------------------------------------------------------


async def test_domain_limited_key_cannot_send_as_other_domain(service: Service) -> None:
    key = await make_key(service, domains=["example.com"])
    port = service.bound[0][1]
    code, text = await in_thread(send, port, key, MESSAGE, "alice@other.test")
    assert code == 553
    assert text.startswith(b"5.7.1")
    code, _ = await in_thread(send, port, key, MESSAGE, "alice@example.com")
    assert code == 250


async def test_domain_limited_key_checks_header_from(service: Service) -> None:
    key = await make_key(service, domains=["example.com"])
    data = MESSAGE.replace(b"alice@example.com", b"mallory@other.test")
    code, text = await in_thread(send, service.bound[0][1], key, data, "alice@example.com")
    assert code == 550
    assert text.startswith(b"5.7.1")


# -- message checks -------------------------------------------------------------------------


async def test_two_from_headers_are_refused(service: Service) -> None:
    key = await make_key(service)
    data = b"From: a@example.com\r\n" + MESSAGE
    code, text = await in_thread(send, service.bound[0][1], key, data)
    assert code == 550
    assert text.startswith(b"5.6.0")
    assert await stored_bodies(service) == []


async def test_no_from_header_is_refused(service: Service) -> None:
    key = await make_key(service)
    code, _ = await in_thread(send, service.bound[0][1], key, b"Subject: x\r\n\r\nbody\r\n")
    assert code == 550


async def test_a_from_of_comments_nested_past_any_reader_is_refused(service: Service) -> None:
    """The stdlib's address parser recursed once a "(" (RecursionError, and aiosmtpd's
    "500 Error" with its text): a typed refusal, and nothing stored."""
    key = await make_key(service)
    data = b"From: " + b"(" * 600 + b"a@example.com\r\nSubject: x\r\n\r\nbody\r\n"
    code, text = await in_thread(send, service.bound[0][1], key, data)
    assert (code, text[:5]) == (550, b"5.1.7"), text
    assert await stored_bodies(service) == []


async def test_51_received_headers_are_a_loop(service: Service) -> None:
    key = await make_key(service)
    port = service.bound[0][1]
    hop = b"Received: from a by b; Sun, 22 Nov 2026 10:00:00 +0000\r\n"
    code, text = await in_thread(send, port, key, hop * 51 + MESSAGE)
    assert code == 554
    assert text.startswith(b"5.4.6")
    code, _ = await in_thread(send, port, key, hop * 50 + MESSAGE)
    assert code == 250


async def test_bcc_header_never_reaches_the_store(service: Service) -> None:
    key = await make_key(service)
    data = MESSAGE.replace(b"Subject:", b"Bcc: secret@example.net\r\nSubject:")
    code, _ = await in_thread(send, service.bound[0][1], key, data, "alice@example.com",
                              ("bob@example.org", "secret@example.net"))
    assert code == 250
    (body,) = await stored_bodies(service)
    assert b"secret@example.net" not in body.lower()
    assert b"bcc:" not in body.lower()


async def test_duplicate_recipients_are_collapsed(service: Service) -> None:
    key = await make_key(service)
    def go() -> tuple[int, bytes]:
        with connect(service.bound[0][1], key=key) as s:
            s.mail("alice@example.com", ["SMTPUTF8"])
            for rcpt in ("bob@example.org", "bob@EXAMPLE.ORG", "Bob@example.org",
                         "x@bücher.example", "x@xn--bcher-kva.example"):
                assert s.rcpt(rcpt)[0] == 250
            return s.data(MESSAGE)

    code, text = await in_thread(go)
    assert code == 250, text
    detail = await service.store.get_message(text.split(b"queued as ")[1].decode())
    assert detail is not None
    assert [r.address for r in detail.recipients] == [
        "bob@example.org", "Bob@example.org", "x@xn--bcher-kva.example"]


async def test_relay_adds_received_message_id_and_date(service: Service) -> None:
    key = await make_key(service)
    code, _ = await in_thread(send, service.bound[0][1], key)
    assert code == 250
    (body,) = await stored_bodies(service)
    head = body.split(b"\r\n\r\n")[0]
    assert head.startswith(b"Received: from client.test ([127.0.0.1])")
    assert b"by relay.test (relay) with ESMTPSA id msg_" in head
    assert b"\r\nMessage-ID: <" in head and b"@relay.test>" in head
    assert b"\r\nDate: " in head


async def test_existing_message_id_is_kept(service: Service) -> None:
    key = await make_key(service)
    data = b"Message-ID: <mine@example.com>\r\n" + MESSAGE
    assert (await in_thread(send, service.bound[0][1], key, data))[0] == 250
    (body,) = await stored_bodies(service)
    assert body.count(b"Message-ID:") == 1 and b"<mine@example.com>" in body


async def test_size_is_advertised_and_enforced(tmp_path) -> None:  # type: ignore[no-untyped-def]
    svc = Service(make_config(tmp_path, limits=LimitsConfig(max_message_size=2000)))
    await svc.start()
    try:
        key = await make_key(svc)

        def go() -> tuple[str, tuple[int, bytes], tuple[int, bytes]]:
            with connect(svc.bound[0][1], key=key) as s:
                size = s.esmtp_features["size"]
                declared = s.mail("alice@example.com", ["SIZE=5000"])
                s.rset()
                s.mail("alice@example.com")
                s.rcpt("bob@example.org")
                sent = s.data(MESSAGE + b"x" * 3000 + b"\r\n")
                return size, declared, sent

        size, declared, sent = await in_thread(go)
        assert size == "2000"
        assert declared[0] == 552 and declared[1].startswith(b"5.3.4")
        assert sent[0] == 552 and sent[1].startswith(b"5.3.4")
        assert await stored_bodies(svc) == []
    finally:
        await svc.stop()


async def test_too_many_recipients_get_452(tmp_path) -> None:  # type: ignore[no-untyped-def]
    svc = Service(make_config(tmp_path, limits=LimitsConfig(max_recipients=2)))
    await svc.start()
    try:
        key = await make_key(svc)

        def go() -> list[tuple[int, bytes]]:
            with connect(svc.bound[0][1], key=key) as s:
                s.mail("alice@example.com")
                return [s.rcpt(f"r{i}@example.org") for i in range(3)]

        replies = await in_thread(go)
        assert [c for c, _ in replies] == [250, 250, 452]
        assert replies[2][1].startswith(b"4.5.3")
    finally:
        await svc.stop()


@pytest.mark.parametrize("address", ["<no-at-sign>", "<a@b@c>", "<a@-bad-.example>", "<@x.org>"])
async def test_malformed_addresses_get_an_enhanced_code(service: Service, address: str) -> None:
    key = await make_key(service)

    def go() -> tuple[int, bytes]:
        with connect(service.bound[0][1], key=key) as s:
            s.mail("alice@example.com")
            return s.docmd("RCPT TO:" + address)

    code, text = await in_thread(go)
    assert code in (501, 553), text
    assert text[:1] == b"5" and text[1:2] == b"."


async def test_dsn_parameters_are_accepted_and_stored(service: Service) -> None:
    key = await make_key(service)

    def go() -> tuple[int, bytes]:
        with connect(service.bound[0][1], key=key) as s:
            assert s.has_extn("dsn")
            s.mail("alice@example.com", ["RET=HDRS", "ENVID=abc123"])
            s.rcpt("bob@example.org", ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;bob@example.org"])
            s.rcpt("carol@example.org", ["NOTIFY=NEVER"])
            return s.data(MESSAGE)

    code, text = await in_thread(go)
    assert code == 250
    detail = await service.store.get_message(text.split(b"queued as ")[1].decode())
    assert detail is not None
    assert detail.message.dsn_ret == "HDRS" and detail.message.dsn_envid == "abc123"
    assert [r.notify for r in detail.recipients] == [("FAILURE", "DELAY"), ("NEVER",)]
    assert detail.recipients[0].orcpt == "rfc822;bob@example.org"


async def test_smtputf8_is_honoured(service: Service) -> None:
    key = await make_key(service)
    data = "From: José <josé@example.com>\r\nTo: zoë@example.org\r\nSubject: olá\r\n\r\nçà\r\n"

    def go() -> tuple[int, bytes]:
        with connect(service.bound[0][1], key=key) as s:
            assert s.has_extn("smtputf8") and s.has_extn("8bitmime")
            return s.sendmail("josé@example.com", ["zoë@example.org"], data.encode(),
                              mail_options=["SMTPUTF8", "BODY=8BITMIME"]) or (250, b"")

    assert (await in_thread(go))[0] == 250
    page = await service.store.list_messages()
    assert page.items[0].message.smtputf8
    assert page.items[0].recipients[0].address == "zoë@example.org"


# -- control headers ---------------------------------------------------------------------


async def test_control_headers_are_stored_and_stripped(service: Service) -> None:
    key = await make_key(service)
    await add_signing_domain(service, "example.com")  # broadcast mail must be signable
    data = (b"X-Relay-Tags: welcome, onboarding\r\nX-Relay-Metadata: {\"user\": 42}\r\n"
            b"X-Relay-Stream: broadcast\r\n" + MESSAGE)
    code, text = await in_thread(send, service.bound[0][1], key, data)
    assert code == 250
    detail = await service.store.get_message(text.split(b"queued as ")[1].decode())
    assert detail is not None
    assert detail.message.tags == ("welcome", "onboarding")
    assert detail.message.metadata == {"user": 42}
    assert detail.message.stream == "broadcast"
    body = await service.store.get_body(detail.message.id)
    assert body is not None and b"x-relay" not in body.lower()


@pytest.mark.parametrize("header", [b"X-Relay-Metadata: [1, 2]", b"X-Relay-Stream: spam",
                                    b"X-Relay-Bogus: 1"])
async def test_bad_control_header_names_itself(service: Service, header: bytes) -> None:
    key = await make_key(service)
    code, text = await in_thread(send, service.bound[0][1], key, header + b"\r\n" + MESSAGE)
    assert code == 550
    assert text.startswith(b"5.6.0") and header.split(b":")[0] in text


async def test_idempotency_key_repeat_queues_nothing(service: Service) -> None:
    key = await make_key(service)
    data = b"X-Relay-Idempotency-Key: order-77\r\n" + MESSAGE
    first = await in_thread(send, service.bound[0][1], key, data)
    second = await in_thread(send, service.bound[0][1], key, data)
    assert first[0] == second[0] == 250
    assert first[1].split(b"queued as ")[1] == second[1].split(b"queued as ")[1]
    assert len(await stored_bodies(service)) == 1


# -- SMTP smuggling and STARTTLS injection -------------------------------------------------


def read_reply(f: Any) -> bytes:
    """One reply, all its lines (a multi-line one ends at the line whose 4th octet is not -)."""
    lines = [f.readline()]
    while lines[-1][3:4] == b"-":
        lines.append(f.readline())
    return b"".join(lines)


def logged_in(port: int, key: str) -> tuple[ssl.SSLSocket, Any, bytes]:
    """A raw session over STARTTLS, AUTH PLAIN with `key` done: the socket, its reader, and
    what the server said since STARTTLS."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = sock.makefile("rb")
    read_reply(f)
    sock.sendall(b"EHLO client.test\r\n")
    assert b"PIPELINING" in read_reply(f)
    sock.sendall(b"STARTTLS\r\n")
    read_reply(f)
    tls = client_tls().wrap_socket(sock, server_hostname="relay.test")
    f = tls.makefile("rb")
    out = b""
    auth = base64.b64encode(b"\0u\0" + key.encode()).decode()
    for cmd in (b"EHLO client.test", f"AUTH PLAIN {auth}".encode()):
        tls.sendall(cmd + b"\r\n")
        out += read_reply(f)
    return tls, f, out


def raw_session(port: int, key: str, payload: bytes) -> bytes:
    """Send DATA bytes exactly as given over STARTTLS; returns everything the server said."""
    tls, f, out = logged_in(port, key)
    for cmd in (b"MAIL FROM:<alice@example.com>", b"RCPT TO:<bob@example.org>", b"DATA"):
        tls.sendall(cmd + b"\r\n")
        out += read_reply(f)
    tls.sendall(payload)
    out += read_reply(f)
    tls.sendall(b"QUIT\r\n")
    try:
        out += read_reply(f)
    except (OSError, ssl.SSLError):
        pass
    tls.close()
    return out


SMUGGLED = (b"MAIL FROM:<admin@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
            b"From: admin@example.com\r\nSubject: smuggled\r\n\r\nevil\r\n")


@pytest.mark.parametrize("ending", [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n\x00.\r\n"])
async def test_smuggling_never_splits_a_message(service: Service, ending: bytes) -> None:
    key = await make_key(service)
    payload = MESSAGE.rstrip(b"\r\n") + ending + SMUGGLED + b".\r\n"
    out = await in_thread(raw_session, service.bound[0][1], key, payload)
    bodies = await stored_bodies(service)
    assert len(bodies) <= 1, out
    assert out.count(b"queued as") <= 1
    page = await service.store.list_messages()
    assert all(r.address == "bob@example.org" for d in page.items for r in d.recipients)
    for body in bodies:
        assert body.count(b"\r") == body.count(b"\r\n") == body.count(b"\n")


async def test_bare_newlines_are_normalised(service: Service) -> None:
    key = await make_key(service)
    payload = b"From: alice@example.com\nSubject: lf\n\nline one\nline two\rthree\r\n.\r\n"
    out = await in_thread(raw_session, service.bound[0][1], key, payload)
    assert b"queued as" in out
    (body,) = await stored_bodies(service)
    assert body.endswith(b"line one\r\nline two\r\nthree\r\n")
    assert body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n")


async def test_commands_pipelined_after_starttls_are_discarded(service: Service) -> None:
    port = service.bound[0][1]

    def go() -> bytes:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"EHLO client.test\r\n")
        while f.readline()[3:4] == b"-":
            pass
        # STARTTLS with a command injected behind it in the same packet
        sock.sendall(b"STARTTLS\r\nNOOP injected\r\n")
        assert f.readline().startswith(b"220")
        tls = client_tls().wrap_socket(sock, server_hostname="relay.test")
        tls.sendall(b"QUIT\r\n")
        data = b""
        while True:
            chunk = tls.recv(4096)
            if not chunk:
                break
            data += chunk
            if b"221" in data:
                break
        tls.close()
        return data

    data = await in_thread(go)
    # Had the injected NOOP survived, its 250 would come before the 221.
    assert data.startswith(b"221"), data


# -- store failure ------------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("RELAY_TEST_STORE") == "postgresql",
                    reason="fills the SQLite file with PRAGMA max_page_count; the service is on"
                    " PostgreSQL")
async def test_store_failure_gives_451_and_the_server_keeps_serving(service: Service) -> None:
    key = await make_key(service)
    port = service.bound[0][1]
    writer = service.store.writer
    assert writer is not None
    # A real SQLITE_FULL: the database may not grow past its current size.
    async with writer.conn.execute("PRAGMA page_count") as cur:
        row = await cur.fetchone()
    assert row is not None
    await writer.conn.execute(f"PRAGMA max_page_count = {row[0]}")
    big = MESSAGE + b"x" * 200 + (b"y" * 990 + b"\r\n") * 40
    code, text = await in_thread(send, port, key, big)
    assert code == 451, text
    assert text.startswith(b"4.3.0")
    assert await stored_bodies(service) == []
    await writer.conn.execute("PRAGMA max_page_count = 1073741823")
    code, _ = await in_thread(send, port, key, big)
    assert code == 250
    assert len(await stored_bodies(service)) == 1


@pytest.mark.skipif(os.environ.get("RELAY_TEST_STORE") == "postgresql",
                    reason="SQLite's PRAGMA query_only; the service is on PostgreSQL")
async def test_read_only_database_gives_451(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = make_config(tmp_path)
    svc = Service(config)
    await svc.start()
    try:
        key = await make_key(svc)
        assert svc.store.writer is not None
        await svc.store.writer.conn.execute("PRAGMA query_only = ON")
        code, text = await in_thread(send, svc.bound[0][1], key)
        assert code == 451 and text.startswith(b"4.3.0")
        await svc.store.writer.conn.execute("PRAGMA query_only = OFF")
        assert (await in_thread(send, svc.bound[0][1], key))[0] == 250
    finally:
        await svc.stop()


async def test_many_concurrent_sessions_share_commits(service: Service) -> None:
    key = await make_key(service)
    port = service.bound[0][1]
    results = await asyncio.gather(*(in_thread(send, port, key) for _ in range(20)))
    assert all(code == 250 for code, _ in results)
    store = service.store
    assert isinstance(store, SQLiteStore) and store.writer is not None
    page = await store.list_messages(limit=100)
    assert len(page.items) == 20



# -- DATA reading ----------------------------------------------------------------------------


@pytest.mark.parametrize("wire, expected", [
    (b".\r\n", b""),
    (b"a\r\n.\r\n", b"a\r\n"),
    (b"Hello Bob.\r\nBye.\r\n.\r\n", b"Hello Bob.\r\nBye.\r\n"),
    (b"..leading\r\n..\r\nx\r\n.\r\n", b".leading\r\n.\r\nx\r\n"),
    (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n"),
    (b"x" * 70000 + b"\r\n.\r\n", b"x" * 70000 + b"\r\n"),
    (b"y" * 40000 + b".\r\nz\r\n.\r\n", b"y" * 40000 + b".\r\nz\r\n"),
])
async def test_data_is_read_as_aiosmtpd_would(wire: bytes, expected: bytes) -> None:
    from relay.smtp.protocol import RelaySMTP

    proto = RelaySMTP.__new__(RelaySMTP)
    proto._reader = asyncio.StreamReader(limit=RelaySMTP.line_length_limit)
    proto.data_size_limit = 100000
    for i in range(0, len(wire), 7):  # arrives in small pieces
        proto._reader.feed_data(wire[i:i + 7])
    proto._reader.feed_data(b"QUIT\r\n")
    assert await proto._read_data() == expected
    assert await proto._reader.readline() == b"QUIT\r\n"  # nothing after the end was eaten


async def test_data_over_the_limit_is_read_to_its_end_and_refused() -> None:
    from relay.smtp.protocol import RelaySMTP

    proto = RelaySMTP.__new__(RelaySMTP)
    proto._reader = asyncio.StreamReader(limit=RelaySMTP.line_length_limit)
    proto.data_size_limit = 1000
    proto._reader.feed_data(b"z" * 50000 + b"\r\n.\r\nQUIT\r\n")
    assert await proto._read_data() is None
    assert await proto._reader.readline() == b"QUIT\r\n"


# -- address literals and IDNA 2008 --------------------------------------------------------


async def test_address_literal_recipients_are_stored_in_one_form(service: Service) -> None:
    key = await make_key(service)

    def go() -> tuple[int, bytes]:
        with connect(service.bound[0][1], key=key) as s:
            s.mail("alice@example.com")
            for rcpt in ("bob@[192.0.2.1]", "carol@[IPv6:2001:DB8:0::1]",
                         "carol@[ipv6:2001:db8::1]"):
                code, text = s.rcpt(rcpt)
                assert code == 250, (rcpt, text)
            return s.data(MESSAGE)

    code, text = await in_thread(go)
    assert code == 250, text
    detail = await service.store.get_message(text.split(b"queued as ")[1].decode())
    assert detail is not None
    assert [(r.address, r.domain) for r in detail.recipients] == [
        ("bob@[192.0.2.1]", "[192.0.2.1]"),
        ("carol@[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]")]


@pytest.mark.parametrize("rcpt, reply", [
    ("bob@[192.0.2.256]", "501 5.1.3"),  # an octet over 255
    ("bob@[192.0.2.01]", "501 5.1.3"),  # a leading zero: octal to some, decimal to others
    ("bob@[2001:db8::1]", "501 5.1.3"),  # IPv6 without its tag
    ("bob@[IPv6:fe80::1%eth0]", "501 5.1.3"),  # a zone id
    ("bob@[IPv6:192.0.2.1]", "501 5.1.3"),
    ("bob@[x-tag:anything]", "501 5.1.3"),  # a general literal: relay delivers only to IPs
    ("bob@[0.0.0.0]", "553 5.1.2"),  # syntactically fine, but no host's address
    ("bob@[IPv6:ff02::1]", "553 5.1.2"),  # multicast
    ("bob@a\u200db.example", "501 5.1.2"),  # ZWJ outside its context: IDNA 2008 refuses
    ("bob@☃.example", "501 5.1.2"),  # IDNA 2003 allowed symbols; 2008 does not
])
async def test_bad_literals_and_idna_2008_refusals_get_their_reply(
        service: Service, rcpt: str, reply: str) -> None:
    key = await make_key(service)

    def go() -> tuple[int, bytes]:
        with connect(service.bound[0][1], key=key) as s:
            s.mail("alice@example.com", ["SMTPUTF8"])
            return s.rcpt(rcpt)

    code, text = await in_thread(go)
    assert f"{code} {text.decode()[:5]}" == reply, text


async def test_u_label_domain_is_stored_as_its_idna_2008_a_label(service: Service) -> None:
    key = await make_key(service)

    def go() -> tuple[int, bytes]:
        with connect(service.bound[0][1], key=key) as s:
            s.mail("alice@example.com", ["SMTPUTF8"])
            for rcpt in ("jörg@faß.example", "x@βόλος.example"):
                assert s.rcpt(rcpt)[0] == 250
            return s.data(MESSAGE)

    code, text = await in_thread(go)
    assert code == 250, text
    detail = await service.store.get_message(text.split(b"queued as ")[1].decode())
    assert detail is not None
    # IDNA 2003 would have said fass.example and xn--nxasmq6b.example: other domains
    assert [r.address for r in detail.recipients] == [
        "jörg@xn--fa-hia.example", "x@xn--nxasmm1c.example"]


async def test_relay_listener_allowed_domains_hold_for_a_literal_sender(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import ipaddress

    listener = ListenerConfig(port=free_port(), mode="relay", tls="none",
                              allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),),
                              allowed_from_domains=("example.com",))
    svc = Service(make_config(tmp_path, listener))
    await svc.start()
    try:
        port = svc.bound[0][1]
        code, text = await in_thread(send, port, None, MESSAGE, "alice@[127.0.0.1]",
                                     ("bob@example.org",), False)
        assert (code, text[:5]) == (553, b"5.7.1"), text
        code, text = await in_thread(send, port, None, MESSAGE, "alice@example.com",
                                     ("bob@[192.0.2.1]",), False)
        assert code == 250, text  # from an allowed network, as any recipient is
        assert len(await stored_bodies(svc)) == 1
    finally:
        await svc.stop()


async def test_relay_listener_refuses_a_literal_from_outside_its_networks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import ipaddress

    listener = ListenerConfig(port=free_port(), mode="relay", tls="none",
                              allowed_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    svc = Service(make_config(tmp_path, listener))
    await svc.start()
    try:
        code, text = await in_thread(send, svc.bound[0][1], None, MESSAGE, "alice@[127.0.0.1]",
                                     ("bob@[127.0.0.1]",), False)
        assert (code, text[:5]) == (554, b"5.7.1"), text
        assert await stored_bodies(svc) == []
    finally:
        await svc.stop()


async def test_inbound_listener_refuses_a_literal_recipient(tmp_path) -> None:  # type: ignore[no-untyped-def]
    listener = ListenerConfig(port=free_port(), mode="inbound", tls="none")
    svc = Service(make_config(tmp_path, listener))
    await svc.start()
    try:
        def go() -> tuple[int, bytes]:
            with connect(svc.bound[0][1], starttls=False) as s:
                s.mail("mailer-daemon@example.net")
                return s.rcpt("bounces+abc@[127.0.0.1]")

        code, text = await in_thread(go)
        assert (code, text[:5]) == (550, b"5.7.1"), text
    finally:
        await svc.stop()


async def test_a_connection_gets_aiosmtpd_whole_tables_without_reading_every_attribute(
        service: Service) -> None:
    """RelaySMTP and RelayHandler name only aiosmtpd's hooks in dir() (tables.hook_names),
    so a connection's set-up does not read every attribute; aiosmtpd's tables of commands,
    AUTH mechanisms and handler hooks must still be whole."""
    import inspect

    from relay.smtp.protocol import RelaySMTP

    handler = service.handlers[0]
    proto = RelaySMTP(handler, implicit_tls=False, hostname="relay.test")
    everything = object.__dir__(proto)
    assert set(proto._smtp_methods) == {
        n[len("smtp_"):] for n in everything if n.startswith("smtp_")}
    assert {"HELO", "EHLO", "MAIL", "RCPT", "DATA", "STARTTLS", "AUTH"} <= set(
        proto._smtp_methods)
    assert set(proto._handle_hooks) == {
        n[len("handle_"):] for n in object.__dir__(handler) if n.startswith("handle_")}
    assert proto._handle_hooks  # the handler's hooks are found
    assert {"LOGIN", "PLAIN"} <= set(proto._auth_methods)
    # and dir() is what aiosmtpd reads: no properties, no data attributes
    assert len(dir(proto)) < len(everything) // 4
    assert all(n.startswith(("smtp_", "auth_", "handle_")) for n in dir(proto))
    assert dict(inspect.getmembers(handler)).keys() == set(dir(handler))


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """What the in-process listeners write, one item a write (a send() and a segment each)."""
    writes: list[bytes] = []
    write = asyncio.StreamWriter.write

    def counting(self: asyncio.StreamWriter, data: bytes) -> None:
        writes.append(bytes(data))
        write(self, data)

    monkeypatch.setattr(asyncio.StreamWriter, "write", counting)
    return writes


async def test_a_multi_line_reply_is_written_once(service: Service,
                                                  written: list[bytes]) -> None:
    """EHLO's reply goes out in one write (one send(), one segment), not a write per line;
    its lines, enhanced codes and order are those a client reads line by line."""
    port = service.bound[0][1]

    def ehlo() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            return s.ehlo("client.test")

    code, text = await in_thread(ehlo)
    assert code == 250 and b"PIPELINING" in text and b"ENHANCEDSTATUSCODES" in text
    replies = [w for w in written if w.startswith(b"250")]
    assert len(replies) == 1, replies  # the greeting's, then EHLO's whole reply
    lines = replies[0].split(b"\r\n")
    assert lines[-1] == b"" and all(x.startswith(b"250-") for x in lines[:-2])
    assert lines[-2].startswith(b"250 ")


async def test_each_connection_gets_its_own_protocol_state(service: Service) -> None:
    """A connection's protocol is copied from a template (RelaySMTP.fresh): it shares no
    mutable state with the template or another connection but the handler, the loop, the
    TLS context and aiosmtpd's read-only tables of the handler's hooks and command limits,
    and its commands and built-in AUTH mechanisms are bound to itself.  An attribute that a
    newer aiosmtpd adds and this list does not know fails here."""
    from relay.smtp.server import make_server_factory

    factory = make_server_factory(service.handlers[0], None)
    one, two = factory(), factory()
    assert type(one) is type(two) and one is not two
    shared = {"event_handler", "loop", "_loop", "tls_context", "_handle_hooks",
              "_call_limit_base", "_auth_callback", "_authenticator", "_smtp_functions"}
    immutable = (type(None), bool, int, float, str, bytes, tuple, frozenset)
    assert vars(one).keys() == vars(two).keys()
    for name, value in vars(one).items():
        if name in shared or isinstance(value, immutable):
            continue
        assert value is not vars(two)[name], f"{name} is shared by two connections"
    for proto in (one, two):
        assert all(m.__self__ is proto for m in proto._smtp_methods.values())
        assert proto._smtp_methods.get("NOOP").__self__ is proto
        assert proto._smtp_methods.keys() == one._smtp_functions.keys() >= {"EHLO", "DATA"}
        assert all(a.method.__self__ is (proto if a.is_builtin else proto.event_handler)
                   for a in proto._auth_methods.values())
        assert proto._stream_reader is not None and proto._client_connected_cb.__self__ is proto
    # a reload's configuration makes a new template: its limits apply to new connections
    handler = service.handlers[0]
    before = handler.config
    limits = dataclasses.replace(before.limits, max_message_size=12345)
    handler.reconfigure(dataclasses.replace(before, limits=limits), handler.listener)
    try:
        assert factory().data_size_limit == 12345
    finally:
        handler.reconfigure(before, handler.listener)
    assert factory().data_size_limit == before.limits.max_message_size


# -- pipelining (RFC 2920) ----------------------------------------------------------------


async def test_pipelined_commands_are_answered_in_one_write(
        service: Service, written: list[bytes]) -> None:
    """As Postfix's smtpd: the replies to MAIL, two RCPTs and DATA sent together go out in
    one write (a send() and a segment, not four), in order; a client that waits for each
    reply still gets each at once."""
    key = await make_key(service)

    def go() -> bytes:
        tls, f, said = logged_in(service.bound[0][1], key)
        assert b"\r\n235 " in said  # EHLO's reply, then AUTH's

        def reply() -> bytes:
            return read_reply(f)

        written.clear()
        tls.sendall(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\n"
                    b"RCPT TO:<carol@example.org>\r\nDATA\r\n")
        group = reply() + reply() + reply() + reply()
        grouped = list(written)
        tls.sendall(MESSAGE + b".\r\n")
        done = reply()
        tls.sendall(b"NOOP\r\n")
        noop = reply()
        assert len(written) == len(grouped) + 2, (grouped, written)  # 250 and NOOP's 250
        tls.sendall(b"QUIT\r\n")
        reply()
        tls.close()
        assert done.startswith(b"250") and noop.startswith(b"250")
        return group + b"|" + b"|".join(grouped)

    out = await in_thread(go)
    group, *grouped = out.split(b"|")
    codes = [line[:3] for line in group.splitlines()]
    assert codes == [b"250", b"250", b"250", b"354"], group
    assert grouped == [group], grouped  # all four in one write


async def test_every_pipelined_command_is_answered_however_the_stream_is_cut(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Replies held for a pipelined group must all come out: random commands (refusals,
    unknown words and empty lines among them) sent in pieces cut anywhere, a line split
    across writes included; every command gets its reply, in order, and no session hangs."""
    import ipaddress
    import random

    listener = ListenerConfig(port=free_port(), mode="relay", tls="none",
                              allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    svc = Service(make_config(tmp_path, listener))
    await svc.start()
    words = [b"NOOP", b"RSET", b"MAIL FROM:<alice@example.com>", b"RCPT TO:<bob@example.org>",
             b"RCPT TO:<not an address>", b"VRFY bob", b"HELP", b"EHLO again.test", b""]

    def session(seed: int) -> None:
        rng = random.Random(seed)
        commands = [rng.choice(words) for _ in range(rng.randint(1, 12))]
        commands += [b"RSET", b"MAIL FROM:<alice@example.com>", b"RCPT TO:<bob@example.org>",
                     b"DATA"]
        stream = b"EHLO client.test\r\n" + b"".join(c + b"\r\n" for c in commands)
        sock = socket.create_connection(("127.0.0.1", svc.bound[0][1]), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = sock.makefile("rb")

        def reply() -> bytes:
            return read_reply(f)

        assert reply().startswith(b"220")
        codes: list[bytes] = []
        sent = 0  # whole lines sent
        while stream:
            cut = rng.randint(1, 40)
            if rng.random() < 0.3 and b"\n" in stream:  # to a line's end
                cut = stream.index(b"\n") + 1
            sock.sendall(stream[:cut])
            sent += stream[:cut].count(b"\n")
            stream = stream[cut:]
            if rng.random() < 0.4:
                # a client that waits now (part of its next line sent or not) must get every
                # reply it is owed: none held back for a command that has not come whole
                codes += [reply()[:3] for _ in range(sent - len(codes))]
        codes += [reply()[:3] for _ in range(len(commands) + 1 - len(codes))]
        assert codes[-1] == b"354", (seed, commands, codes)
        sock.sendall(MESSAGE + b".\r\nQUIT\r\n")
        assert reply().startswith(b"250") and reply().startswith(b"221"), seed
        sock.close()

    try:
        for seed in range(40):
            await in_thread(session, seed)
    finally:
        await svc.stop()
