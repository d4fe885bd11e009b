"""Connections shared out among relay's front processes (`[api] workers`, `[smtp] workers`).

The master accepts every connection, of the API and of each SMTP listener, and hands each of
the workers its turn of them (round robin) over a Unix socket of its own (SCM_RIGHTS), as
Node's cluster module does. Each handoff carries a tag naming the listener it came from, so
one socket a worker serves every listener it has a turn of. The kernel's
SO_REUSEPORT, which relay used before, picks a process by a hash of the addresses: a client's
32 keep-alive connections were split 58/42 or 33/67 in some benchmark rounds, and the busier
process set the pace for all. Handed out in turn, a client's connections split evenly.

A connection whose handoff fails (the worker's socket is full, or the worker is gone) is
served by the master: none is dropped for it. The master keeps its own descriptor of each
connection it handed over until the worker says it took it (an acknowledgement on the same
socket, sent before the worker writes a byte to the client): if the worker dies first, the
kernel closes the worker's descriptors still queued on its socket, and the master serves
those connections itself, so the client gets a greeting, not a connection closed unanswered.
A worker stops getting connections before it is told to stop (frontworkers.py), and serves
every one already on its socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Mapping
from ssl import SSLContext

log = logging.getLogger(__name__)

ACCEPTS_A_TURN = 64  # connections accepted in one wake of the loop, at most
FDS_A_READ = 32  # connections taken off the handoff socket in one read, at most
PAUSE_WHEN_OUT_OF_FILES = 1.0  # seconds without accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM
OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

Protocols = Callable[[], asyncio.Protocol]
API = b"a"  # the tag of the API's connections; an SMTP listener's is smtp_tag(its index)


def smtp_tag(index: int) -> bytes:
    return b"s%d" % index


def listening_socket(address: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on an IP literal (the config checks it is one), non-blocking,
    bound as asyncio's create_server binds one. Raises OSError."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A handoff socket: (the master's end, non-blocking; the worker's end, to pass on)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    return ours, theirs


class Channel:
    """The master's end of one worker's handoff socket, and the connections handed over it
    that the worker has not yet said it took (the master's own descriptors of them)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._pending: deque[tuple[socket.socket, Serving]] = deque()
        self._closed = False
        asyncio.get_running_loop().add_reader(sock.fileno(), self._taken)

    def hand(self, tag: bytes, conn: socket.socket, serving: Serving) -> None:
        """Hand `conn` over, tagged `tag`; `serving` serves it here should the worker die
        before it takes it. Raises BlockingIOError (the socket is full) or OSError."""
        socket.send_fds(self._sock, [tag], [conn.fileno()])
        self._pending.append((conn, serving))

    def _taken(self) -> None:
        if not self._read_acknowledgements():  # the worker's end is closed
            asyncio.get_running_loop().remove_reader(self._sock.fileno())

    def _read_acknowledgements(self) -> bool:
        """Close our descriptors of the connections the worker says it took (each message
        counts how many more, in order); False at the socket's end: nothing more will come."""
        while True:
            try:
                data = self._sock.recv(16)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if not data:
                return False
            for _ in range(min(int(data) if data.isdigit() else 0, len(self._pending))):
                self._pending.popleft()[0].close()  # the worker has its own descriptor of it

    def close(self, *, serve_rest: bool = True) -> None:
        """The worker is gone: read what it acknowledged last; each connection it had not
        taken is served here (`serve_rest`), or closed (the master is stopping too)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError):  # its reader is gone with the socket's EOF
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._read_acknowledgements()
        self._sock.close()
        if self._pending:
            log.warning("a front worker ended before it took %d connection(s); %s",
                        len(self._pending), "serving them here" if serve_rest else "closing them")
        while self._pending:
            conn, serving = self._pending.popleft()
            if serve_rest:
                serving(conn)
            else:
                conn.close()


class Serving:
    """How a listener's connections are served: its protocols, over TLS from the first byte
    with `ssl` (an implicit-TLS SMTP listener). Keeps each connection the loop is taking on
    referenced until it has."""

    def __init__(self, protocols: Protocols, ssl: SSLContext | None = None) -> None:
        self.protocols = protocols
        self.ssl = ssl
        self._starting: set[asyncio.Task[None]] = set()

    def __call__(self, conn: socket.socket) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self.protocols, conn,
                                                                     ssl=self.ssl)
        except OSError as exc:  # the client left already, or its TLS handshake failed
            log.debug("cannot serve a connection: %s", exc)
            conn.close()


class Acceptor:
    """The master's listening socket: accepts, and serves each connection here or hands it
    to the worker whose turn it is, tagged `tag`; `counted(served_by)` after each. Quacks
    like asyncio's Server where relay uses one (`sockets`, `close`, `wait_closed`)."""

    def __init__(self, sock: socket.socket, serving: Serving, *, tag: bytes,
                 counted: Callable[[str], None], what: str) -> None:
        self._sock = sock
        self._serve_here = serving
        self._tag = tag
        self._counted = counted
        self._what = what  # "API", "SMTP": for the log
        self._channels: list[Channel] = []
        self._turn = 0
        self._closed = False
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else (self._sock,)

    def add(self, channel: Channel) -> None:
        """A worker that takes its turn of the connections from now on."""
        self._channels.append(channel)

    def remove(self, channel: Channel) -> None:
        """A worker that gets no more (it is stopping, or gone)."""
        if channel in self._channels:
            self._channels.remove(channel)

    def close(self) -> None:
        """No new connections; the open ones are their protocols' to finish."""
        if not self._closed:
            self._closed = True
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()

    def is_serving(self) -> bool:
        return not self._closed

    async def wait_closed(self) -> None:
        """asyncio's Server waits for its connections here; the protocols' owners do."""

    def _accept(self) -> None:
        for _ in range(ACCEPTS_A_TURN):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while it waited in the backlog
            except OSError as exc:
                if exc.errno not in OUT_OF_RESOURCES:
                    raise
                self._pause(exc)
                return
            self._place(conn)

    def _pause(self, exc: OSError) -> None:
        """Out of files (or memory): leave the backlog waiting a moment, as asyncio does,
        rather than spin on a socket that stays readable."""
        log.error("cannot accept %s connections for %.0f s: %s", self._what,
                  PAUSE_WHEN_OUT_OF_FILES, exc.strerror)
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._sock.fileno())

        def resume() -> None:
            if not self._closed:
                loop.add_reader(self._sock.fileno(), self._accept)

        loop.call_later(PAUSE_WHEN_OUT_OF_FILES, resume)

    def _place(self, conn: socket.socket) -> None:
        self._turn = (self._turn + 1) % (len(self._channels) + 1)
        served_by = "master"
        if self._turn:  # a worker's turn
            channel = self._channels[self._turn - 1]
            try:
                channel.hand(self._tag, conn, self._serve_here)
            except BlockingIOError:
                served_by = "fallback"  # its socket is full: it is behind
            except OSError as exc:  # it is gone; FrontWorkers will remove it too
                log.warning("a worker is not taking %s connections (%s); serving them here",
                            self._what, exc.strerror)
                self.remove(channel)
                served_by = "fallback"
            else:  # the channel keeps ours of it until the worker says it took it
                self._counted("worker")
                return
        self._counted(served_by)
        self._serve_here(conn)


class Receiver:
    """A worker's end of its handoff socket: serves each connection the master hands it
    with the protocols of its tag. `on_eof`: the master closed its end."""

    def __init__(self, channel: socket.socket, serving: Mapping[bytes, Serving],
                 on_eof: Callable[[], None]) -> None:
        self._channel = channel
        self._serve = dict(serving)
        self._on_eof = on_eof
        self._reading = True
        channel.setblocking(False)
        asyncio.get_running_loop().add_reader(channel.fileno(), self._read)

    def _read(self) -> bool:
        """Take up to FDS_A_READ connections; True if there may be more."""
        for _ in range(FDS_A_READ):
            try:
                data, fds, _, _ = socket.recv_fds(self._channel, 16, 8)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                log.error("cannot read the master's handoff socket: %s", exc.strerror)
                data, fds = b"", []
            if fds:  # taken: said before a byte is written to any of them (Channel)
                try:
                    self._channel.send(b"%d" % len(fds))
                except OSError as exc:  # the master is gone, or behind: it closes its own later
                    log.debug("cannot acknowledge a handoff: %s", exc)
            serve = self._serve.get(data)
            for fd in fds:
                if serve is not None:
                    serve(socket.socket(fileno=fd))
                else:  # a listener this process has no turn of: never sent, but not kept
                    log.error("handed a connection tagged %r, which is not served here", data)
                    os.close(fd)
            if not data and not fds:
                self._stop_reading()
                self._on_eof()
                return False
        return True

    def drain(self) -> None:
        """Stopping: serve what the master handed over already (it hands no more once it
        stops a worker), then read no more."""
        while self._reading and self._read():
            pass
        self._stop_reading()

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            asyncio.get_running_loop().remove_reader(self._channel.fileno())
