"""RSA signatures in a process of their own, beside the delivery worker.

An RSA-2048 signature costs ~0.45 ms of CPU (OpenSSL's own figure on these machines), and
the `cryptography` library holds the GIL while it makes one, so in the worker it is CPU the
delivery loop cannot use: with DKIM on, the worker, not the machine, was the limit
(bench/deliver.py --dkim compare). The worker hashes and canonicalizes (dkim.prepare) and
sends only the 32-octet digests to this process, which holds the keys it was sent and
answers the signatures in order. Ed25519 (~0.04 ms) stays in the worker.

Requests are pipelined: each is written as soon as it is made, without waiting for the
answers before it, and the child answers everything it has read in one write. A round trip
that waited for the last one cost the worker ~0.25 ms of CPU (two sleeps and wake-ups of
each side, asyncio's streams and wait_for); pipelined, the child stays busy under load and
the worker reads several answers per wake-up (bench/deliver.py --dkim compare).

It is an optimisation and never a way to lose or stall mail: while it starts, and if it
dies, answers wrongly or not within TIMEOUT, the worker signs in its own process (the same
bytes) and starts a new one later.

The child is rawsign.py's (which says its protocol), lean so that it starts quickly; the
worker starts it as soon as it has an RSA key to sign with (Renderer.warm), not at the first
message.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import pickle
import signal
import sys
import time
from typing import cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .. import metrics
from ..aio import cancel_and_wait
from ..config import LogConfig
from .child import signal_name
from .rawsign import UP, frame, raw_signature, take_frames

log = logging.getLogger(__name__)

RESTART_AFTER = 30.0  # seconds before a new signer process after one failed
MAX_KEYS = 256  # keys remembered in the child; past it, it starts afresh
TIMEOUT = 5.0  # an answer slower than this: the child is stuck, sign here instead
CHILD = "relay.delivery.rawsign"  # the child's module, run with -m


class SignerGone(Exception):
    """The child died, answered wrongly or too late: sign in the worker."""


class SignerProcess:
    def __init__(self, *, python: str = sys.executable, log: LogConfig | None = None) -> None:
        self._python = python
        self._log = log or LogConfig()  # the child logs as the worker does
        self._pipe: _Pipe | None = None
        self._children: set[_Pipe] = set()  # every child not yet reaped, the lost ones too
        self._starting: asyncio.Task[None] | None = None
        self._sent: dict[int, tuple[rsa.RSAPrivateKey, int]] = {}  # id(key) -> (key, kid)
        self._failed_at: float | None = None
        self.remote = 0  # signatures made in the child (for tests and the bench)

    @property
    def ready(self) -> bool:
        return self._pipe is not None and self._pipe.alive

    @property
    def pid(self) -> int | None:
        return self._pipe.pid if self._pipe is not None else None

    async def sign(self, items: list[tuple[rsa.RSAPrivateKey, bytes]]) -> list[bytes]:
        """A signature for each (key, digest), in order: the child's when it is up, else
        made here."""
        pipe = self._pipe
        if items and pipe is not None and pipe.alive:
            try:
                out = await pipe.ask(self._frames(items), len(items))
                self.remote += len(out)
                return out
            except SignerGone as exc:
                metrics.dkim_failure("signer")
                log.warning("the DKIM signer process failed (%s); signing in the worker",
                            exc)
                self._lost(pipe)
        self.start()
        return [raw_signature(key, digest) for key, digest in items]

    def _frames(self, items: list[tuple[rsa.RSAPrivateKey, bytes]]) -> bytes:
        frames = []
        if len(self._sent) + len(items) > MAX_KEYS and any(
                id(k) not in self._sent for k, _ in items):
            self._sent.clear()  # the requests already written still name the old ids:
            frames.append(frame(("reset",)))  # the child answers them before this
        request = []
        for key, digest in items:
            known = self._sent.get(id(key))
            if known is None:
                kid = len(self._sent)
                self._sent[id(key)] = (key, kid)  # holds the key: its id stays its own
                frames.append(frame(("key", kid, key.private_bytes(
                    serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption()))))
            else:
                kid = known[1]
            request.append((kid, digest))
        frames.append(frame(("sign", request)))
        return b"".join(frames)

    def _lost(self, pipe: _Pipe) -> None:
        if self._pipe is pipe:
            self._pipe = None
            self._sent.clear()
            self._failed_at = time.monotonic()
        pipe.kill()

    def start(self) -> None:
        """Start the child unless it is up, starting, or failed less than RESTART_AFTER ago
        (it starts in the background; meanwhile signatures are made here)."""
        if self._pipe is not None or (self._starting and not self._starting.done()):
            return
        if self._failed_at is not None and time.monotonic() - self._failed_at < RESTART_AFTER:
            return
        self._starting = asyncio.get_running_loop().create_task(self._start(),
                                                                name="dkim-signer-start")

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        pipe: _Pipe | None = None
        try:
            _, pipe = await loop.subprocess_exec(
                _Pipe, self._python, "-m", CHILD, self._log.format,
                self._log.level,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None,
                start_new_session=True)  # out of the terminal's signals, as the worker is
            self._children.add(pipe)
            pipe.exited.add_done_callback(lambda _: self._children.discard(pipe))
            await asyncio.wait_for(asyncio.shield(pipe.listening), TIMEOUT)
        except Exception as exc:  # anything: a start that fails must not be tried per message
            expected = isinstance(exc, (OSError, asyncio.TimeoutError, SignerGone))
            log.warning("the DKIM signer process did not start (%s); signing in the worker",
                        exc or type(exc).__name__, exc_info=not expected)
            if pipe is not None:
                pipe.kill()
            self._failed_at = time.monotonic()
            return
        self._sent.clear()
        self._pipe = pipe

    async def close(self) -> None:
        if self._starting is not None and not self._starting.done():
            await cancel_and_wait(self._starting)
        self._pipe = None
        self._sent.clear()
        for pipe in list(self._children):
            pipe.closing = True
            pipe.kill()
        if self._children:
            await asyncio.wait([pipe.exited for pipe in self._children], timeout=TIMEOUT)


class _Pipe(asyncio.SubprocessProtocol):
    """The worker's end of one child: requests written at once, answers matched in order."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._buffer = bytearray()
        self._waiting: collections.deque[tuple[asyncio.Future[list[bytes]], int, float]] = \
            collections.deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self.listening: asyncio.Future[None] = loop.create_future()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.alive = False
        self.pid: int | None = None
        self.closing = False  # the worker is closing the signer: its end is no news
        self._why: str | None = None  # the first reason it failed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a subprocess transport, though not asyncio's class on uvloop (the worker's loop)
        transport = cast(asyncio.SubprocessTransport, transport)
        self._transport = transport
        self._stdin = transport.get_pipe_transport(0)  # type: ignore[assignment]
        self.pid = transport.get_pid()

    async def ask(self, frames: bytes, count: int) -> list[bytes]:
        if not self.alive or self._stdin is None or self._stdin.is_closing():
            raise SignerGone("it is not running")
        future: asyncio.Future[list[bytes]] = self._loop.create_future()
        self._waiting.append((future, count, self._loop.time()))
        self._stdin.write(frames)
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(TIMEOUT, self._check)
        return await future

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        buf = self._buffer
        buf += data
        if not self.alive and not self.listening.done():
            if buf[:1] != UP:
                self._fail("it did not start as a signer")
                return
            del buf[:1]
            self.alive = True
            self.listening.set_result(None)
        for body in take_frames(buf):
            if not self._waiting:
                self._fail("it answered what was not asked")
                return
            future, count, _ = self._waiting.popleft()
            try:
                out = pickle.loads(body)
            except (pickle.PickleError, EOFError, ValueError) as exc:
                self._fail(f"it answered what cannot be read ({exc})")
                return
            if not isinstance(out, list) or len(out) != count:
                self._fail("it answered the wrong number of signatures")
                return
            if not future.done():  # its caller may have been cancelled meanwhile
                future.set_result(out)

    def _check(self) -> None:
        self._watchdog = None
        if not self._waiting:
            return
        oldest = self._waiting[0][2]
        if self._loop.time() - oldest >= TIMEOUT:
            self._fail(f"no answer within {TIMEOUT:g} s")
        else:
            self._watchdog = self._loop.call_at(oldest + TIMEOUT, self._check)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._fail(f"its pipe closed ({exc})" if exc else "its pipe closed")

    def process_exited(self) -> None:
        killed = signal_name(self._transport.get_returncode() if self._transport else None)
        # a signal from outside, not our own kill (at close, or of a child that misbehaved)
        if killed and not self.closing and (self._why is None or self._why.startswith("its pipe")):
            log.warning("the DKIM signer was killed by %s; signing in the worker until a "
                        "new one starts", killed)
        if not self.exited.done():
            self.exited.set_result(None)
        self._fail("it exited")  # and now kill() may close the transport

    def _fail(self, why: str) -> None:
        self._why = self._why or why
        self.alive = False
        if not self.listening.done():
            self.listening.set_exception(SignerGone(why))
            self.listening.exception()  # retrieved: a start that gave up waiting is no error
        while self._waiting:
            future, _, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(SignerGone(why))
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.kill()

    def kill(self) -> None:
        self.alive = False
        transport = self._transport
        if transport is None:
            if not self.exited.done():
                self.exited.set_result(None)
        elif not self.exited.done() and self.pid is not None:
            # a signal, not transport.close(): that polls the child (Popen.poll), reaping it
            # before asyncio's watcher can, which then logs "Unknown child process" and
            # loses how it ended; process_exited closes the transport once it is known
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        elif not transport.is_closing():
            transport.close()
