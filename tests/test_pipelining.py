"""SMTP pipelining (RFC 2920) on delivery: MAIL, every RCPT and DATA in one write to a server
that offers PIPELINING, each reply read in its order; a server without it gets one command
at a time. The replies decide each recipient as they did unpipelined."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from relay.delivery.deliver import Hold, Lane, _no_pace
from relay.delivery.outbound import OutMessage, OutRecipient, Result
from relay.delivery.pools import Source

from .sink import Sink
from .test_deliver import DATA, deliverer, target


def two(i: int = 1) -> OutMessage:
    return OutMessage(id=f"m{i}", mail_from="a@example.com", data=DATA, recipients=(
        OutRecipient(id=10 * i, address=f"ok{i}@example.org"),
        OutRecipient(id=10 * i + 1, address=f"no{i}@example.org")))


async def send(server: Any, messages: list[OutMessage], *, lane: Lane | None = None,
               **config: Any) -> list[Result]:
    """The messages delivered to `server` by a deliverer of their own (`config`: its
    [delivery] settings), closed afterwards."""
    d = deliverer(**config)
    try:
        return await d.deliver([target(server)], messages, lane=lane)
    finally:
        await d.close()


class Scripted:
    """A server that says what it is told and records each chunk it reads."""

    def __init__(self, pipelining: bool, replies: dict[bytes, bytes],
                 finals: list[bytes] | None = None, end_delay: float = 0.0) -> None:
        self.pipelining, self.replies = pipelining, replies
        self.end_delay = end_delay  # seconds before the reply to each end of data
        self.finals = list(finals or ())  # the replies to the next ends of data, in turn
        self.writers: list[asyncio.StreamWriter] = []
        self.chunks: list[bytes] = []
        self.port = 0

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()
        for writer in self.writers:  # a client that closed first may not have been read yet
            writer.close()
        await asyncio.sleep(0)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        writer.write(b"220 scripted\r\n")
        in_data = False
        while chunk := await reader.read(65536):
            self.chunks.append(chunk)
            out = b""
            for line in chunk.split(b"\r\n")[:-1]:
                if in_data:
                    if line == b".":  # replies[b"<end>"] = b"": no reply to the data
                        if self.end_delay:  # a content filter taking its time
                            writer.write(out)
                            out = b""
                            await asyncio.sleep(self.end_delay)
                        final = self.finals.pop(0) if self.finals else \
                            self.replies.get(b"<end>", b"250 2.0.0 queued")
                        in_data, out = False, out + (final + b"\r\n" if final else b"")
                        if final.startswith(b"421"):  # and hangs up
                            writer.write(out)
                            writer.close()
                            return
                    continue
                verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
                if verb == b"EHLO":
                    out += b"250-scripted\r\n" + (
                        b"250-PIPELINING\r\n" if self.pipelining else b"") + b"250 8BITMIME\r\n"
                elif verb == b"DATA":
                    reply = self.replies.get(b"DATA", b"354 go ahead")
                    in_data = reply.startswith(b"354")
                    out += reply + b"\r\n"
                elif verb == b"QUIT":
                    out += b"221 bye\r\n"
                else:
                    key = next((k for k in self.replies if k in line), None)
                    reply = self.replies[key] if key else b"250 2.0.0 ok"
                    out += reply + b"\r\n"
                    if reply.startswith(b"421"):  # closing the channel (RFC 5321 3.8)
                        writer.write(out)
                        writer.close()
                        return
            writer.write(out)  # every reply to a chunk in one write, as Postfix's smtpd does
        writer.close()


@pytest.mark.parametrize("pipelining", [True, False])
async def test_each_recipient_gets_its_own_reply(pipelining: bool) -> None:
    async with Sink(replies={"no1@example.org": ["550 5.1.1 no such user"]},
                    pipelining=pipelining) as sink:
        results = await send(sink, [two(1), two(2)])
    by_address = {r.recipient_id: (r.outcome, r.code, r.stage) for r in results}
    assert by_address == {10: ("delivered", 250, "DATA"), 11: ("bounced", 550, "RCPT"),
                          20: ("delivered", 250, "DATA"), 21: ("delivered", 250, "DATA")}
    assert [m.rcpt_tos for m in sink.messages] == [
        ["ok1@example.org"], ["ok2@example.org", "no2@example.org"]]
    assert all(m.data == DATA for m in sink.messages)


async def test_the_commands_go_in_one_write_when_offered() -> None:
    async with Scripted(True, {}) as server:
        results = await send(server, [two(1)])
    assert [r.outcome for r in results] == ["delivered", "delivered"]
    envelope = next(c for c in server.chunks if c.startswith(b"MAIL"))
    assert envelope.count(b"\r\n") == 4 and envelope.endswith(b"DATA\r\n")  # MAIL, 2 RCPT, DATA
    async with Scripted(False, {}) as server:
        await send(server, [two(1)])
    assert not any(c.count(b"\r\n") > 1 for c in server.chunks if c.startswith(b"MAIL"))


@pytest.mark.parametrize("replies, expected, again_code, bodies", [
    # every RCPT refused: DATA refused too, nothing sent, each recipient its RCPT reply
    ({b"ok1@": b"550 5.1.1 unknown", b"no1@": b"452 4.2.2 full", b"DATA": b"503 5.5.1 no"},
     {10: ("bounced", 550, "RCPT"), 11: ("deferred", 452, "RCPT")}, 503, 0),
    # MAIL refused: the rest is moot; every recipient gets MAIL's reply
    ({b"MAIL": b"451 4.3.0 try later", b"ok1@": b"503 5.5.1 no", b"no1@": b"503 5.5.1 no",
      b"DATA": b"503 5.5.1 no"},
     {10: ("deferred", 451, "MAIL"), 11: ("deferred", 451, "MAIL")}, 451, 0),
    # a server that says 354 with no recipient taken gets an empty message, not this one
    ({b"ok1@": b"550 5.1.1 unknown", b"no1@": b"550 5.1.1 unknown"},
     {10: ("bounced", 550, "RCPT"), 11: ("bounced", 550, "RCPT")}, 250, 1),
    # one taken, one refused
    ({b"no1@": b"550 5.1.1 unknown"}, {10: ("delivered", 250, "DATA"),
                                      11: ("bounced", 550, "RCPT")}, 250, 2),
])
async def test_refusals_at_each_stage(replies: dict[bytes, bytes],
                                      expected: dict[int, tuple[str, int, str]],
                                      again_code: int, bodies: int) -> None:
    async with Scripted(True, replies) as server:
        d = deliverer()
        try:
            results = await d.deliver([target(server)], [two(1)])  # type: ignore[arg-type]
            again = await d.deliver([target(server)], [OutMessage(  # type: ignore[arg-type]
                id="m3", mail_from="a@example.com", data=DATA,
                recipients=(OutRecipient(id=30, address="x@example.org"),))])
        finally:
            await d.close()
    assert {r.recipient_id: (r.outcome, r.code, r.stage) for r in results} == expected
    # the session stays in step: the next message on it gets its own replies
    assert [r.code for r in again] == [again_code]
    assert b"".join(server.chunks).count(b"body\r\n") == bodies  # only with a recipient


async def test_a_server_silent_after_the_data_times_out_the_attempt() -> None:
    """The pipelined reader's own timeout (not asyncio.wait_for): a reply that never comes
    ends the attempt after data_timeout, deferred, and the next one gets a new session."""
    async with Scripted(True, {b"<end>": b""}) as server:
        d = deliverer(command_timeout=0.5, data_timeout=0.5)
        try:
            started = time.monotonic()
            results = await d.deliver([target(server)], [two(1)])  # type: ignore[arg-type]
            took = time.monotonic() - started
            server.replies.clear()
            again = await d.deliver([target(server)], [two(2)])  # type: ignore[arg-type]
        finally:
            await d.close()
    assert [r.outcome for r in results] == ["deferred", "deferred"]
    assert all("Timed out" in r.text for r in results), [r.text for r in results]
    assert 0.4 < took < 4, took
    assert [r.outcome for r in again] == ["delivered", "delivered"]


def one(i: int) -> OutMessage:
    return OutMessage(id=f"m{i}", mail_from="a@example.com", data=DATA,
                      recipients=(OutRecipient(id=i, address=f"r{i}@example.org"),))


async def test_the_next_message_commands_go_with_the_data() -> None:
    """RFC 2920 3.1: a message's data may open a group, so the next message's MAIL, RCPT and
    DATA go in the same write as this one's data: one round trip a message, not two."""
    async with Scripted(True, {}) as server:
        results = await send(server, [one(1), one(2), one(3)])
    assert [(r.recipient_id, r.outcome) for r in results] == [
        (1, "delivered"), (2, "delivered"), (3, "delivered")]
    # the first envelope alone; the second and third each behind the data before them
    assert sum(c.startswith(b"MAIL") for c in server.chunks) == 1
    assert sum(b".\r\nMAIL FROM:<a@example.com>" in c for c in server.chunks) == 2
    assert [c.count(b"DATA\r\n") for c in server.chunks if b"body" in c] == [1, 1, 0]


async def test_a_refusal_of_the_data_before_a_message_written_ahead() -> None:
    """Each message gets its own replies when the one before it was refused at the end of
    its data (no RSET between: it would land behind the commands written ahead)."""
    async with Scripted(True, {}, finals=[b"554 5.7.1 spam", b"250 2.0.0 ok"]) as server:
        results = await send(server, [one(1), one(2)])
    assert [(r.recipient_id, r.outcome, r.code, r.stage) for r in results] == [
        (1, "bounced", 554, "DATA"), (2, "delivered", 250, "DATA")]
    assert not any(b"RSET" in c for c in server.chunks)


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_hang_up_after_the_data_sends_the_next_message_again(pipelining: bool) -> None:
    """A 421 to the end of the data, then the close: the next message (whose commands went
    ahead and got no reply, when pipelining) was not taken; it goes at once over a new
    connection, one command at a time as well (it was "connection lost" there)."""
    async with Scripted(pipelining, {}, finals=[b"421 4.3.2 going down"]) as server:
        results = await send(server, [one(1), one(2)])
    assert [(r.recipient_id, r.outcome, r.code) for r in results] == [
        (1, "deferred", 421), (2, "delivered", 250)]
    assert sum(c.startswith(b"EHLO") for c in server.chunks) == 2  # a second connection


async def test_no_quit_behind_commands_written_ahead_when_a_hold_stops_the_session() -> None:
    """A reply that holds the site back ends the session with the next message's DATA
    perhaps taken: it is closed without QUIT, which the server would read as that
    message's data."""
    hold = Hold(reason="slow down", until=9e9)
    lane = Lane(source=Source(address=None, helo="relay.test"), per_session=100,
                pace=_no_pace, reply=lambda text: hold if "4.7.28" in text else None)
    async with Scripted(True, {}, finals=[b"451 4.7.28 slow down"]) as server:
        results = await send(server, [one(1), one(2)], lane=lane)
    assert [(r.recipient_id, r.outcome, r.held_until) for r in results] == [
        (1, "deferred", 9e9), (2, "deferred", 9e9)]
    sent = b"".join(server.chunks)
    assert sent.count(b"MAIL FROM") == 2 and b"QUIT" not in sent


async def test_a_paced_site_gets_no_commands_written_ahead() -> None:
    lane = Lane(source=Source(address=None, helo="relay.test"), per_session=100,
                pace=_no_pace, reply=lambda text: None, unpaced=lambda: False)
    async with Scripted(True, {}) as server:
        results = await send(server, [one(1), one(2)], lane=lane)
    assert [r.outcome for r in results] == ["delivered", "delivered"]
    assert sum(c.startswith(b"MAIL") for c in server.chunks) == 2


class SlowReader:
    """A server whose end of the connection takes the data slowly (a small receive buffer
    read every 10 ms): a large message takes seconds to send."""

    def __init__(self, pipelining: bool) -> None:
        self.pipelining = pipelining
        self.received = 0

    async def __aenter__(self) -> SlowReader:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # before listen: inherited
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.setblocking(False)
        self.server = await asyncio.start_server(self._client, sock=sock)
        self.port = sock.getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 slow\r\n")
        data = False
        while line := await reader.readline():
            if data:
                self.received += len(line)
                await asyncio.sleep(0.01) if self.received % 16384 < len(line) else None
                if line == b".\r\n":
                    data = False
                    writer.write(b"250 2.0.0 taken\r\n")
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-slow\r\n" + (b"250-PIPELINING\r\n" if self.pipelining
                                                 else b"") + b"250 8BITMIME\r\n")
            elif verb == b"DATA":
                data = True
                writer.write(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 2.0.0 ok\r\n")
        writer.close()


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_message_slower_to_send_than_the_reply_timeout_is_delivered(
        pipelining: bool) -> None:
    """The reply's timeout starts once the data is sent: a transfer that keeps moving is
    not cut off by command_timeout (it used to be: the reply's clock ran from the write)."""
    big = b"From: a@example.com\r\nSubject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 3000
    async with SlowReader(pipelining) as server:
        started = time.monotonic()
        results = await send(server, [OutMessage(
            id="big", mail_from="a@example.com", data=big,
            recipients=(OutRecipient(id=1, address="r@example.org"),))], command_timeout=0.5)
        took = time.monotonic() - started
    assert [(r.outcome, r.code) for r in results] == [("delivered", 250)], results[0].text
    assert took > 1.0  # slower than command_timeout, twice over


async def test_the_scheduler_writes_queued_messages_ahead_over_one_session(
        tmp_path: Path) -> None:
    """End to end: messages queued for one destination go over one session, each one's
    commands behind the data before it (the scheduler's lane has no pace here)."""
    from relay.config import DeliveryConfig, ListenerConfig
    from relay.service import Service

    from .conftest import free_port, make_config
    from .smtputil import connect

    listener = ListenerConfig(port=free_port(), mode="relay", tls="none",
                              allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    async with Scripted(True, {}) as server:
        paused = Service(make_config(tmp_path, listener))  # queue them while paused
        await paused.start()
        try:
            def send() -> None:
                with connect(paused.bound[0][1], starttls=False) as s:
                    for i in range(3):
                        s.sendmail("a@example.com", [f"r{i}@example.org"], DATA)
            await asyncio.to_thread(send)
        finally:
            await paused.stop()
        svc = Service(make_config(tmp_path, listener, delivery=DeliveryConfig(
            smarthost=f"127.0.0.1:{server.port}", smarthost_tls="none", process=False,
            retry_min=0.2, connect_timeout=2.0, command_timeout=5.0, session_idle=0.5)))
        await svc.start()
        try:
            for _ in range(200):
                if sum(b"body" in c for c in server.chunks) >= 3:
                    break
                await asyncio.sleep(0.05)
        finally:
            await svc.stop()
    assert sum(b"body" in c for c in server.chunks) == 3
    assert sum(c.startswith(b"EHLO") for c in server.chunks) == 1
    assert sum(b".\r\nMAIL FROM:" in c for c in server.chunks) == 2


@pytest.mark.parametrize("pipelining", [True, False])
async def test_the_reply_to_the_data_may_take_data_timeout(pipelining: bool) -> None:
    """RFC 5321 4.5.3.2.6: a client waits 10 minutes for the reply to the data's end, which
    a content filter may take; the other replies keep command_timeout."""
    async with Scripted(pipelining, {}, end_delay=1.0) as server:
        results = await send(server, [one(1)], command_timeout=0.5, data_timeout=5.0)
    assert [(r.outcome, r.code) for r in results] == [("delivered", 250)], results[0].text


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_421_to_a_recipient_is_each_recipients_reason(pipelining: bool) -> None:
    """A server that answers RCPT with 421 closes the channel (RFC 5321 3.8): the message's
    recipients are deferred with its words, at RCPT, not for a "connection lost" that hides
    them; the next message goes over a new connection."""
    async with Scripted(pipelining, {b"ok1@": b"421 4.7.0 Too many recipients this hour"}
                        ) as server:
        results = await send(server, [two(1), two(2)])
    assert [(r.recipient_id, r.outcome, r.code, r.stage, r.text) for r in results] == [
        (10, "deferred", 421, "RCPT", "4.7.0 Too many recipients this hour"),
        (11, "deferred", 421, "RCPT", "4.7.0 Too many recipients this hour"),
        (20, "delivered", 250, "DATA", "2.0.0 queued"),
        (21, "delivered", 250, "DATA", "2.0.0 queued")]
    assert sum(c.startswith(b"EHLO") for c in server.chunks) == 2


@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_421_to_mail_defers_the_message_and_the_next_reconnects(pipelining: bool) -> None:
    async with Scripted(pipelining, {b"MAIL FROM": b"421 4.3.2 shutting down"}) as server:
        results = await send(server, [one(1), one(2)])
    assert [(r.recipient_id, r.outcome, r.code, r.stage, r.text) for r in results] == [
        (1, "deferred", 421, "MAIL", "4.3.2 shutting down"),
        (2, "deferred", 421, "MAIL", "4.3.2 shutting down")]
    assert sum(c.startswith(b"EHLO") for c in server.chunks) == 2


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("first, expected_first", [
    (b"250 2.1.5 ok", ("deferred", 421)),  # taken, but the message was never sent
    (b"550 5.1.1 no such user", ("bounced", 550)),  # its own refusal stands
])
async def test_a_421_after_a_recipient_replied(pipelining: bool, first: bytes,
                                               expected_first: tuple[str, int]) -> None:
    async with Scripted(pipelining, {b"ok1@": first, b"no1@": b"421 4.4.5 busy"}) as server:
        results = await send(server, [two(1)])
    assert [(r.recipient_id, r.outcome, r.code) for r in results] == [
        (10, *expected_first), (11, "deferred", 421)]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_two_connections_closed_by_a_421_in_a_row_end_the_tries(pipelining: bool) -> None:
    """A new connection a message after a 421 is bounded: when the second one in a row also
    closes with a 421 and nothing taken, the rest are deferred with its words at once."""
    async with Scripted(pipelining, {b"MAIL FROM": b"421 4.7.0 Try again later"}) as server:
        results = await send(server, [one(1), one(2), one(3), one(4)])
    assert [(r.recipient_id, r.outcome, r.code) for r in results] == [
        (1, "deferred", 421), (2, "deferred", 421), (3, "deferred", 421), (4, "deferred", 421)]
    assert results[3].text.endswith("421 4.7.0 Try again later")
    assert sum(c.startswith(b"EHLO") for c in server.chunks) == 2
