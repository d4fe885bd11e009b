"""The API's connections: how many may be open (in all, and from one client address), and
how long a client may take to send a request's head and body, so that slow or many clients
(slowloris) cannot hold the server.

The guard wraps aiohttp's protocol factory (`web.Server`, public) for `loop.create_server`,
and its middleware tells it where each request is:

- Past `max_http_connections` or `max_http_connections_per_client`, a new connection is
  answered at once with a 503 (JSON, `Retry-After`, `Connection: close`) and closed, before
  anything of it is read: nginx's `limit_conn` answers so, and a client learns why.
- A connection must bring a complete request head (request line and headers) within
  `http_header_timeout` of being opened, and each later request within that time of its
  first byte (idle keep-alive time is aiohttp's keepalive_timeout). Otherwise it is closed.
- While a request's body is arriving, `http_body_timeout` may pass between two reads of it
  (nginx's client_body_timeout); a longer stall closes the connection.

A pipelined request whose first bytes came in the same read as the end of the previous body
is timed only by aiohttp's keepalive_timeout: the guard does not parse HTTP, so it cannot see
where that body ended.
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections import Counter
from collections.abc import Callable
from typing import cast

from aiohttp import web

from ..clients import client_key
from ..config import LimitsConfig
from .requests import Handler


class _State(enum.Enum):
    IDLE = "idle"  # between requests, nothing of the next one read
    HEAD = "head"  # reading a request's head
    BODY = "body"  # the app has the request; its body is still arriving
    HANDLING = "handling"  # the body is in; the app answers


def _refusal(message: str) -> bytes:
    body = json.dumps({"error": {"type": "rate_limited", "message": message}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


class ConnectionGuard:
    """Counts connections and times their requests; one per API listener."""

    def __init__(self, limits: LimitsConfig) -> None:
        self._limits = limits
        self._open: dict[asyncio.BaseTransport, _Guarded] = {}
        self._per_client: Counter[str] = Counter()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def protocol_factory(self, inner: Callable[[], asyncio.Protocol]
                         ) -> Callable[[], asyncio.Protocol]:
        """For loop.create_server: each connection aiohttp's protocol, guarded."""
        return lambda: _Guarded(self, inner())

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        conn = self._open.get(request.transport) if request.transport else None
        if conn is None:  # served some other way (a test server): nothing to time
            return await handler(request)
        conn.request_started(request)
        try:
            return await handler(request)
        finally:
            conn.request_done()

    def _admit(self, conn: _Guarded, transport: asyncio.BaseTransport) -> str | None:
        """Why the connection is refused, or None once it is counted."""
        limits = self._limits
        if len(self._open) >= limits.max_http_connections:
            return (f"this server has {limits.max_http_connections} connections open "
                    "([limits] max_http_connections); try again")
        if self._per_client[conn.client] >= limits.max_http_connections_per_client:
            return (f"{conn.client} has {limits.max_http_connections_per_client} connections "
                    "open ([limits] max_http_connections_per_client); reuse them")
        self._open[transport] = conn
        self._per_client[conn.client] += 1
        return None

    def _release(self, conn: _Guarded, transport: asyncio.BaseTransport) -> None:
        if self._open.pop(transport, None) is not None:
            self._per_client[conn.client] -= 1
            if self._per_client[conn.client] <= 0:
                del self._per_client[conn.client]


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the deadlines the guard sets on it."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.BaseTransport | None = None
        self._admitted = False
        self._timer: asyncio.TimerHandle | None = None
        self._state = _State.HEAD
        self._request: web.Request | None = None
        self._answered = False  # the app has answered self._request
        self._next_started = False  # bytes came while the app answered: the next request
        self.client = ""

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self.client = client_key(str(peer[0])) if peer else ""
        refused = self._guard._admit(self, transport)
        if refused is not None:
            # a write transport, though not asyncio's class on uvloop (`relay serve`'s loop)
            cast(asyncio.WriteTransport, transport).write(_refusal(refused))
            transport.close()
            return
        self._admitted = True
        self._arm(self._guard._limits.http_header_timeout)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if self._state is _State.IDLE:
            self._state = _State.HEAD
            self._arm(self._guard._limits.http_header_timeout)
        elif self._state is _State.HANDLING:
            self._next_started = True
        self._inner.data_received(data)
        if self._state is _State.BODY:
            self._body_progress()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._admitted else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self._request = None
        if self._transport is not None:
            self._guard._release(self, self._transport)
        if self._admitted:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -- told by the middleware ------------------------------------------------------------

    def request_started(self, request: web.Request) -> None:
        """aiohttp parsed a complete head: the header deadline is met."""
        self._cancel()
        self._request = request
        self._answered = False
        self._state = _State.BODY
        self._next_started = False
        self._body_progress()

    def request_done(self) -> None:
        """The app answered. A body it did not read is still owed (aiohttp reads it before
        the next request), so its stall timer runs on until it is in."""
        self._answered = True
        if self._state is not _State.BODY:
            self._between_requests()

    def _between_requests(self) -> None:
        self._request = None
        self._cancel()
        if self._next_started:
            self._state = _State.HEAD
            self._arm(self._guard._limits.http_header_timeout)
        else:
            self._state = _State.IDLE

    # -- deadlines -------------------------------------------------------------------------

    def _body_progress(self) -> None:
        """Each read of the body restarts its stall timer; the whole body in stops it."""
        request = self._request
        if request is None or request.content.is_eof() or not request.body_exists:
            self._cancel()
            self._state = _State.HANDLING
            if self._answered:
                self._between_requests()
        else:
            self._arm(self._guard._limits.http_body_timeout)

    def _arm(self, seconds: float) -> None:
        self._cancel()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
