"""handoff.py in one process: the Acceptor serves its turns and hands the others over a
real Unix socket to a Receiver, which serves them; a handoff that fails is served here; a
stopping Receiver serves what it was handed. (tests/test_frontworkers.py: across processes.)"""

from __future__ import annotations

import asyncio
import socket
from typing import cast

from relay import metrics
from relay.handoff import API, Acceptor, Receiver, Serving, channel_pair, listening_socket


def served() -> dict[str, float]:
    """relay_api_connections_total by served_by."""
    return {by: metrics.REGISTRY.get_sample_value("relay_api_connections_total",
                                                   {"served_by": by}) or 0.0
            for by in ("master", "worker", "fallback")}


def since(before: dict[str, float]) -> dict[str, float]:
    return {by: n - before[by] for by, n in served().items()}


class Tagging(asyncio.Protocol):
    """Answers each connection with who served it, then closes it."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(self.tag)
        transport.close()


async def who(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_turns_alternate_and_a_failed_handoff_is_served_here() -> None:
    sock = listening_socket("127.0.0.1", 0, 16)
    port = sock.getsockname()[1]
    acceptor = Acceptor(sock, Serving(lambda: Tagging(b"master")), tag=API,
                        counted=metrics.api_connection, what="API")
    ours, theirs = channel_pair()
    ended = asyncio.Event()
    receiver = Receiver(theirs, {API: Serving(lambda: Tagging(b"worker"))}, on_eof=ended.set)
    acceptor.add(ours)
    before = served()
    try:
        order = [await who(port) for _ in range(6)]
        assert order == [b"worker", b"master"] * 3
        assert since(before) == {"master": 3, "worker": 3, "fallback": 0}

        receiver.drain()  # stopping: it reads no more
        theirs.close()  # and is gone: the next send fails
        assert [await who(port) for _ in range(4)] == [b"master"] * 4
        # the first is the worker's turn, which fails (served here), and it is removed
        assert since(before) == {"master": 6, "worker": 3, "fallback": 1}
    finally:
        acceptor.close()
        ours.close()
    assert acceptor.sockets == ()


async def test_a_stopping_receiver_serves_what_it_was_handed_and_eof_is_the_masters_end(
        ) -> None:
    ours, theirs = channel_pair()
    ended = asyncio.Event()
    receiver = Receiver(theirs, {API: Serving(lambda: Tagging(b"worker"))}, on_eof=ended.set)
    listener = listening_socket("127.0.0.1", 0, 16)
    port = listener.getsockname()[1]
    clients, handed = [], []
    for _ in range(40):  # more than one read takes (FDS_A_READ)
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        socket.send_fds(ours, [API], [conn.fileno()])
        conn.close()
        clients.append(client)
        handed.append(conn)
    receiver.drain()  # before the loop ever ran its reader: all 40 taken now
    loop = asyncio.get_running_loop()
    for client in clients:
        client.setblocking(False)
        assert await asyncio.wait_for(loop.sock_recv(client, 16), 5) == b"worker"
        client.close()
    ours.close()
    listener.close()
    assert not ended.is_set()  # it had stopped reading: no EOF seen

    ours2, theirs2 = channel_pair()
    ended2 = asyncio.Event()
    Receiver(theirs2, {API: Serving(lambda: Tagging(b"worker"))}, on_eof=ended2.set)
    ours2.close()
    await asyncio.wait_for(ended2.wait(), 5)
    theirs.close()
    theirs2.close()
