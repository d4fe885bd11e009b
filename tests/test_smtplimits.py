"""Each SMTP listener's own limits over real sockets: concurrent connections in all and per
client address (421 at greeting time), and the failed-login throttle (issue 17)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from relay.config import LimitsConfig, ListenerConfig, StoreConfig
from relay.service import Service
from relay.smtp.handler import RelayHandler
from relay.smtp.limits import ConnectionCaps

from .conftest import free_port, make_config
from .smtputil import MESSAGE, client_tls, connect, in_thread, send

SECOND_CLIENT = "127.0.0.2"  # loopback too: Linux answers for all of 127.0.0.0/8


class Client:
    """A raw SMTP connection that has read the server's first reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 greeting: bytes) -> None:
        self.reader, self.writer, self.greeting = reader, writer, greeting

    async def quit(self) -> None:
        self.writer.write(b"QUIT\r\n")
        assert (await asyncio.wait_for(self.reader.readline(), 10)).startswith(b"221")
        self.writer.close()
        await self.writer.wait_closed()

    async def closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 10) == b""


class Clients:
    """Opens clients, and closes every one at the end of the test."""

    def __init__(self) -> None:
        self.opened: list[Client] = []

    async def open(self, port: int, source: str = "127.0.0.1", *, tls: bool = False
                   ) -> Client:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(source, 0), ssl=client_tls() if tls else None)
        client = Client(reader, writer, b"")
        self.opened.append(client)
        client.greeting = await asyncio.wait_for(reader.readline(), 10)
        return client

    async def close(self) -> None:
        for client in self.opened:
            client.writer.close()
            with contextlib.suppress(OSError):
                await client.writer.wait_closed()


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    opened = Clients()
    try:
        yield opened
    finally:
        await opened.close()


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """The server's side of a close runs a loop iteration after the client's."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def can_bind(address: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((address, 0))
    except OSError:
        return False
    return True


@pytest.fixture
async def capped(tmp_path: Path) -> AsyncIterator[Service]:
    """A relay listener taking 3 connections at a time, 2 of them from one address."""
    listener = ListenerConfig(port=free_port(), mode="relay", tls="none",
                              allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    svc = Service(make_config(tmp_path, listener, limits=LimitsConfig(
        max_smtp_connections=3, max_smtp_connections_per_client=2)))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


def handler(svc: Service) -> RelayHandler:
    return svc.handlers[0]


async def test_a_connection_over_the_per_client_cap_gets_421_and_is_closed(
        capped: Service, clients: Clients) -> None:
    port = capped.bound[0][1]
    first, second = await clients.open(port), await clients.open(port)
    assert first.greeting.startswith(b"220") and second.greeting.startswith(b"220")
    third = await clients.open(port)
    assert third.greeting.startswith(b"421 4.7.0 relay.test Too many connections from your")
    assert await third.closed_by_server()
    # the two admitted sessions still work
    second.writer.write(b"NOOP\r\n")
    assert (await asyncio.wait_for(second.reader.readline(), 10)).startswith(b"250")
    await first.quit()
    await until(lambda: handler(capped).caps.from_client("127.0.0.1") == 1)
    again = await clients.open(port)
    assert again.greeting.startswith(b"220")
    await again.quit()
    await second.quit()
    await until(lambda: handler(capped).caps.count == 0)


async def test_a_connection_over_the_listener_cap_gets_421(capped: Service,
                                                          clients: Clients) -> None:
    if not can_bind(SECOND_CLIENT):
        pytest.skip(f"cannot connect from {SECOND_CLIENT} on this machine")
    port = capped.bound[0][1]
    ones = [await clients.open(port), await clients.open(port)]
    other = await clients.open(port, SECOND_CLIENT)
    # another address is not held to the first one's cap ...
    assert [c.greeting[:3] for c in (*ones, other)] == [b"220"] * 3
    # ... but the listener's cap holds for everyone
    refused = await clients.open(port, SECOND_CLIENT)
    assert refused.greeting.startswith(b"421 4.7.0 relay.test Too many connections;")
    assert await refused.closed_by_server()
    await other.quit()
    await until(lambda: handler(capped).caps.count == 2)
    accepted = await clients.open(port, SECOND_CLIENT)
    assert accepted.greeting.startswith(b"220")
    for c in (*ones, accepted):
        await c.quit()


async def test_the_listener_cap_with_one_client_address(tmp_path: Path,
                                                        clients: Clients) -> None:
    """Where no second address can be had: a listener cap below the per-client one."""
    svc = Service(make_config(tmp_path, limits=LimitsConfig(
        max_smtp_connections=2, max_smtp_connections_per_client=5)))
    await svc.start()
    try:
        port = svc.bound[0][1]
        held = [await clients.open(port), await clients.open(port)]
        assert [c.greeting[:3] for c in held] == [b"220"] * 2
        refused = await clients.open(port)
        assert refused.greeting.startswith(b"421 4.7.0 relay.test Too many connections;")
        assert await refused.closed_by_server()
        for c in held:
            await c.quit()
    finally:
        await svc.stop()


async def test_a_refused_implicit_tls_connection_leaves_no_error_behind(
        tmp_path: Path, clients: Clients) -> None:
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    listener = ListenerConfig(port=free_port(), tls="implicit")
    svc = Service(make_config(tmp_path, listener,
                              limits=LimitsConfig(max_smtp_connections_per_client=1)))
    await svc.start()
    try:
        port = svc.bound[0][1]
        admitted = await clients.open(port, tls=True)
        assert admitted.greeting.startswith(b"220")
        refused = await clients.open(port, tls=True)
        assert refused.greeting.startswith(b"421 4.7.0 relay.test Too many connections from")
        refused.writer.write(b"EHLO client.test\r\n")
        assert await refused.closed_by_server()
        await admitted.quit()
        await until(lambda: svc.handlers[0].caps.count == 0)
        assert errors == []  # the refused protocol was told of the TLS close and ignored it
    finally:
        await svc.stop()


async def test_a_failed_starttls_handshake_gives_its_place_back(tmp_path: Path,
                                                                clients: Clients) -> None:
    svc = Service(make_config(tmp_path, limits=LimitsConfig(max_smtp_connections_per_client=1)))
    await svc.start()
    try:
        port = svc.bound[0][1]
        client = await clients.open(port)
        client.writer.write(b"EHLO client.test\r\nSTARTTLS\r\n")
        while not (await asyncio.wait_for(client.reader.readline(), 10)).startswith(b"220"):
            pass
        client.writer.write(b"this is not a TLS ClientHello\r\n" * 4)
        await client.closed_by_server()
        await until(lambda: svc.handlers[0].caps.count == 0)
        assert (await clients.open(port)).greeting.startswith(b"220")
    finally:
        await svc.stop()


# -- failed logins -------------------------------------------------------------------------


async def test_a_client_blocked_for_failed_logins_on_submission_may_still_relay(
        tmp_path: Path, clients: Clients) -> None:
    submission = ListenerConfig(port=free_port())
    relay = ListenerConfig(port=free_port(), mode="relay", tls="none",
                           allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    svc = Service(make_config(tmp_path, submission, relay, limits=LimitsConfig(
        auth_failures_before_delay=5, auth_failures_before_block=2)))
    await svc.start()
    try:
        submission_port, relay_port = svc.bound[0][1], svc.bound[1][1]

        def fail_twice() -> list[int]:
            wrong = base64.b64encode(b"\0x\0rk_000000000000_wrong").decode()
            with connect(submission_port) as s:
                return [s.docmd("AUTH", "PLAIN " + wrong)[0] for _ in range(2)]

        assert await in_thread(fail_twice) == [535, 535]
        blocked = await clients.open(submission_port)
        blocked.writer.write(b"EHLO client.test\r\n")
        reply = await asyncio.wait_for(blocked.reader.readline(), 10)
        assert reply.startswith(b"421 4.7.0 Too many failed logins")
        # the relay listener does not hold the submission port's failures against it
        code, text = await in_thread(send, relay_port, None, MESSAGE, "alice@example.com",
                                     ("bob@example.org",), False)
        assert code == 250, text
        # and the submission listener still does
        blocked = await clients.open(submission_port)
        blocked.writer.write(b"EHLO client.test\r\n")
        assert (await asyncio.wait_for(blocked.reader.readline(), 10)).startswith(b"421 4.7.0")
    finally:
        await svc.stop()


def test_a_flood_of_refusals_is_one_log_line_a_minute() -> None:
    now = [1000.0]
    caps = ConnectionCaps(total=10, per_client=1, clock=lambda: now[0])
    assert caps.to_log("192.0.2.1") == 1  # the first refusal is logged
    assert [caps.to_log("192.0.2.1") for _ in range(500)] == [0] * 500
    assert caps.to_log("192.0.2.9") == 1  # another client has its own line
    now[0] += ConnectionCaps.LOG_EVERY
    assert caps.to_log("192.0.2.1") == 501  # then one line with how many there were


async def test_failed_logins_on_one_node_block_the_client_on_another(
        tmp_path: Path, pg_url: str) -> None:
    """Two nodes on one PostgreSQL queue: the failures a client piles up on node A count on
    node B, whose AUTH then answers 421; a good login clears the count everywhere."""
    limits = LimitsConfig(auth_failures_before_delay=5, auth_failures_before_block=2)
    a, b = (Service(make_config(tmp_path / name, ListenerConfig(port=free_port()),
                                limits=limits, store=StoreConfig(url=pg_url, node=name)))
            for name in ("a", "b"))
    await a.start()
    await b.start()
    wrong = base64.b64encode(b"\0x\0rk_000000000000_wrong").decode()
    try:
        def fail_on(port: int, times: int) -> list[int]:
            with connect(port) as s:
                return [s.docmd("AUTH", "PLAIN " + wrong)[0] for _ in range(times)]

        assert await in_thread(fail_on, a.bound[0][1], 2) == [535, 535]
        assert await in_thread(fail_on, b.bound[0][1], 1) == [421]
        assert a.store.postgresql and await b.store.auth_failures("submission", "127.0.0.1",
                                                                  0.0) >= 2
    finally:
        await a.stop()
        await b.stop()


@contextlib.asynccontextmanager
async def idle_limited(tmp_path: Path) -> AsyncIterator[Service]:
    """A relay listener whose clients may be idle 0.6 s."""
    listener = ListenerConfig(port=free_port(), mode="relay", tls="none",
                              allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    svc = Service(make_config(tmp_path, listener, limits=LimitsConfig(idle_timeout=0.6)))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


async def test_the_idle_timeout_runs_from_the_last_command_and_says_421(
        tmp_path: Path, clients: Clients) -> None:
    """Each command pushes the idle timeout back (relay moves a deadline instead of
    re-arming a timer per command); a client silent for longer is told 421 4.4.2 and
    closed, not cut off unanswered."""
    async with idle_limited(tmp_path) as svc:
        client = await clients.open(svc.bound[0][1])
        started = time.monotonic()
        for _ in range(6):  # 1.5 s of commands 0.25 s apart: never 0.6 s idle
            await asyncio.sleep(0.25)
            client.writer.write(b"NOOP\r\n")
            assert (await asyncio.wait_for(client.reader.readline(), 10)).startswith(b"250")
        last = time.monotonic()
        assert last - started > 1.2
        reply = await asyncio.wait_for(client.reader.readline(), 10)
        idle = time.monotonic() - last
        assert reply.startswith(b"421 4.4.2 relay.test"), reply
        assert await client.closed_by_server()
        assert 0.5 < idle < 2.0, idle
        await until(lambda: handler(svc).caps.count == 0)


async def test_a_slow_message_is_not_cut_off_by_the_idle_timeout(
        tmp_path: Path, clients: Clients) -> None:
    """The idle timeout counts from the client's last octets, in the data too: a message
    that takes longer than it to arrive, a line at a time, is taken (Postfix's
    smtpd_timeout is per read likewise)."""
    async with idle_limited(tmp_path) as svc:
        client = await clients.open(svc.bound[0][1])
        for line in (b"EHLO c.test", b"MAIL FROM:<a@example.com>", b"RCPT TO:<b@example.org>",
                     b"DATA"):
            client.writer.write(line + b"\r\n")
            while (reply := await asyncio.wait_for(client.reader.readline(), 10))[3:4] == b"-":
                pass
        assert reply.startswith(b"354"), reply
        client.writer.write(b"From: a@example.com\r\nTo: b@example.org\r\nSubject: slow\r\n\r\n")
        for i in range(6):  # 1.5 s of data, 0.25 s apart
            await asyncio.sleep(0.25)
            client.writer.write(b"line %d\r\n" % i)
        client.writer.write(b".\r\n")
        reply = await asyncio.wait_for(client.reader.readline(), 10)
        assert reply.startswith(b"250 2.0.0"), reply
        await client.quit()
