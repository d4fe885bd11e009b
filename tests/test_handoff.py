"""handoff.py in one process: the Acceptor serves its turns and hands the others over a
real Unix socket to a Receiver, which serves them; a handoff that fails is served here; a
stopping Receiver serves what it was handed. (tests/test_frontworkers.py: across processes.)"""

from __future__ import annotations

import asyncio
import socket
from typing import cast

from relay import metrics
from relay.handoff import (
    API,
    Acceptor,
    Channel,
    Receiver,
    Serving,
    channel_pair,
    listening_socket,
)


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
    channel = Channel(ours)
    acceptor.add(channel)
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
        channel.close()
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


async def test_connections_a_dead_worker_had_not_taken_are_served_here() -> None:
    """The master keeps its descriptor of each connection it handed over until the worker
    acknowledges it: a worker that dies with connections still queued on its socket (the
    kernel closes its descriptors of them) leaves them to the master, which serves them,
    instead of their clients seeing the connection closed unanswered."""
    sock = listening_socket("127.0.0.1", 0, 16)
    port = sock.getsockname()[1]
    acceptor = Acceptor(sock, Serving(lambda: Tagging(b"master")), tag=API,
                        counted=metrics.api_connection, what="API")
    ours, theirs = channel_pair()  # a worker that never reads its socket, then dies
    channel = Channel(ours)
    acceptor.add(channel)
    loop = asyncio.get_running_loop()
    clients = []
    try:
        for _ in range(4):
            client = socket.create_connection(("127.0.0.1", port))
            client.setblocking(False)
            clients.append(client)
        # turns alternate: the 2nd and 4th are the master's, served at once
        assert await asyncio.wait_for(loop.sock_recv(clients[1], 16), 5) == b"master"
        assert await asyncio.wait_for(loop.sock_recv(clients[3], 16), 5) == b"master"
        theirs.close()  # the worker dies: its queued descriptors are closed by the kernel
        acceptor.remove(channel)
        channel.close()
        for client in (clients[0], clients[2]):
            assert await asyncio.wait_for(loop.sock_recv(client, 16), 5) == b"master"
    finally:
        for client in clients:
            client.close()
        acceptor.close()


async def test_a_worker_that_took_its_connections_leaves_none_to_the_master() -> None:
    """Acknowledged handoffs: the master closes its own descriptors, so the worker's close
    ends the connection, and a later end of the worker serves nothing twice."""
    sock = listening_socket("127.0.0.1", 0, 16)
    port = sock.getsockname()[1]
    acceptor = Acceptor(sock, Serving(lambda: Tagging(b"master")), tag=API,
                        counted=metrics.api_connection, what="API")
    ours, theirs = channel_pair()
    channel = Channel(ours)
    acceptor.add(channel)
    Receiver(theirs, {API: Serving(lambda: Tagging(b"worker"))}, on_eof=lambda: None)
    try:
        assert [await who(port) for _ in range(4)] == [b"worker", b"master"] * 2
        assert not channel._pending
        theirs.close()
        channel.close()  # nothing left to serve: no client gets a second answer
    finally:
        acceptor.close()
