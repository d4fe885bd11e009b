"""The master's handle on its front workers (frontworker.py): start as many as the larger of
`[api] workers` and `[smtp] workers` says, less the master, hand each its turns of the
connections of the listeners it serves (handoff.py), hear their wakes and counts, tell them
everyone else's, restart one that dies, and stop them, each finishing what it has.

A worker that dies is started again after RESTART_DELAY, doubling up to RESTART_MAX while
they keep dying young (a worker that ran STEADY seconds starts from RESTART_DELAY again).
Until then the master serves its turns; connections it had been handed but not answered are
lost with it, as with any server process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import sys
import time
from collections.abc import Callable

from . import metrics
from .aio import cancel_and_wait
from .api.app import SHUTDOWN_TIMEOUT
from .api.health import Check
from .config import Config
from .delivery import metricspipe
from .delivery.child import signal_name
from .frontworker import SMTP_GRACE, READY, FrontArgs, feed_line, how_many, roles
from .handoff import Acceptor, Channel, channel_pair

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0
RESTART_MAX = 30.0
STEADY = 60.0
FEED_FRESH = 0.5  # seconds a sum of everyone's counts serves the workers' feed lines
READY_TIMEOUT = 30.0  # seconds for a new worker to listen before start() goes on without
# a stopping worker's SMTP transactions and then its open API requests get their time
STOP_TIMEOUT = SMTP_GRACE + SHUTDOWN_TIMEOUT + 5.0


class _Child:
    """One worker process and the master's ends of its pipes."""

    def __init__(self, args: FrontArgs, proc: asyncio.subprocess.Process, wake_r: int,
                 channel: Channel, remote: metrics.Remote) -> None:
        self.args = args
        self.proc = proc
        self.wake_r = wake_r
        self.channel = channel  # the master's end of its handoff socket
        self.remote = remote
        self.started = time.monotonic()
        self.tasks: list[asyncio.Task[None]] = []
        self.ended = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class FrontWorkers:
    """The front workers of `config`, each served its turn of the connections of `api` (the
    API's Acceptor, if the master hands out the API's) and of `smtp` (the SMTP listeners',
    if it hands out theirs), as its roles say; `on_wake` is called when one committed new
    mail; `checks` are the master's own readiness checks, which the workers repeat."""

    def __init__(self, config: Config, *, api: Acceptor | None, smtp: list[Acceptor],
                 remotes: metrics.Remotes, others: Callable[[], metrics.Snapshot],
                 on_wake: Callable[[], None], checks: Callable[[], list[Check]]) -> None:
        self._config = config
        self._api = api
        self._smtp = smtp
        # the API's port as bound, for the workers' log
        self._port = api.sockets[0].getsockname()[1] if api is not None else None
        self._remotes = remotes  # where each worker's counts go, kept when it ends
        self._others = others  # every count the master knows, the workers' included
        self._on_wake = on_wake
        self._checks = checks
        self._children: dict[int, _Child] = {}  # by index, 1 .. workers - 1
        self._supervisors: list[asyncio.Task[None]] = []
        self._stopping = False
        self._everyone: tuple[float, metrics.Snapshot,
                              dict[int, metrics.Snapshot]] | None = None

    @property
    def pids(self) -> list[int]:
        return [c.proc.pid for c in self._children.values() if c.proc.returncode is None]

    async def start(self) -> None:
        """Start the workers; return once each listens (or has failed to, or READY_TIMEOUT
        passed): a reload stops the old ones only then, so capacity never dips."""
        indexes = range(1, how_many(self._config) + 1)
        await asyncio.gather(*(self._spawn(i) for i in indexes))
        self._supervisors = [asyncio.create_task(self._supervise(i), name=f"front-worker-{i}")
                             for i in indexes]
        await asyncio.gather(*(self._listening(c) for c in list(self._children.values())))

    async def _listening(self, child: _Child) -> None:
        exited = asyncio.ensure_future(child.proc.wait())
        try:
            await asyncio.wait([child.ready, exited], timeout=READY_TIMEOUT,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if not child.ready.done():
            log.warning("front worker pid %d is not listening after %.0f s", child.proc.pid,
                        READY_TIMEOUT)

    async def _spawn(self, index: int) -> None:
        wake_r, wake_w = os.pipe()
        metrics_r, metrics_w = os.pipe()
        feed_r, feed_w = os.pipe()
        channel, their_channel = channel_pair()
        theirs = (wake_w, metrics_w, feed_r, their_channel.detach())
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay.frontworker", *map(str, theirs),
                stdin=asyncio.subprocess.PIPE, pass_fds=theirs,
                # a session of its own, as the delivery worker's: a terminal's hangup or ^C is
                # the master's to act on, and the master stops its workers with a drain
                start_new_session=True)
        except BaseException:
            for fd in (wake_r, metrics_r, feed_w):
                os.close(fd)
            channel.close()
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        args = FrontArgs(self._config, self._port, index, *roles(self._config, index))
        child = _Child(args, proc, wake_r, Channel(channel), self._remotes.join())
        self._children[index] = child
        loop = asyncio.get_running_loop()
        os.set_blocking(wake_r, False)
        loop.add_reader(wake_r, self._woken, child)
        child.tasks = [
            asyncio.create_task(metricspipe.receive(metrics_r, child.remote,
                                                    f"front worker {args.name}"),
                                name=f"{args.name}-metrics"),
            asyncio.create_task(metricspipe.send(feed_w, line=lambda: self._feed(child)),
                                name=f"{args.name}-feed")]
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(args))
        with contextlib.suppress(ConnectionError):  # it died at once: _supervise says so
            await proc.stdin.drain()
        proc.stdin.close()

    def _woken(self, child: _Child) -> None:
        try:
            data = os.read(child.wake_r, 4096)
        except BlockingIOError:
            return
        if READY in data and not child.ready.done():
            child.ready.set_result(None)
            if not child.ended and not self._stopping:
                for acceptor in self._acceptors(child):
                    acceptor.add(child.channel)  # it serves its turns from now on
        if data:
            self._on_wake()
        else:  # the worker is gone; its end is closed
            asyncio.get_running_loop().remove_reader(child.wake_r)

    def _acceptors(self, child: _Child) -> list[Acceptor]:
        """The listeners whose connections `child` has turns of."""
        api = [self._api] if child.args.api and self._api is not None else []
        return api + (self._smtp if child.args.smtp else [])

    def _withdraw(self, child: _Child) -> None:
        """No more connections for `child`."""
        for acceptor in self._acceptors(child):
            acceptor.remove(child.channel)

    def _feed(self, child: _Child) -> bytes:
        """Everyone's counts but the worker's own, as one sum (so a counter it shows never
        goes down), made once for all the workers' lines of a moment."""
        now = time.monotonic()
        if self._everyone is None or now - self._everyone[0] > FEED_FRESH \
                or id(child.remote) not in self._everyone[2]:
            own = {id(c.remote): c.remote.total() for c in self._children.values()}
            self._everyone = (now, self._others(), own)  # in one step: nothing counts between
        _, everyone, own = self._everyone
        # a worker being stopped is no longer listed, and its feed may be asked a line still
        mine = own.get(id(child.remote)) or child.remote.total()
        return feed_line(metrics.without(everyone, mine), self._checks())

    async def _ended(self, child: _Child) -> None:
        """Close the master's ends of a worker that has exited; keep what it counted."""
        if child.ended:
            return
        child.ended = True
        self._withdraw(child)
        # what it had not taken yet is served here (closed when relay is stopping)
        child.channel.close(serve_rest=not self._stopping)
        asyncio.get_running_loop().remove_reader(child.wake_r)
        os.close(child.wake_r)
        receiving, feeding = child.tasks
        feeding.cancel()  # closes the feed pipe
        with contextlib.suppress(TimeoutError):  # its last snapshot, up to its EOF
            await asyncio.wait_for(asyncio.shield(receiving), 1.0)
        await cancel_and_wait(receiving, feeding)
        self._remotes.leave(child.remote)

    async def _supervise(self, index: int) -> None:
        delay = RESTART_DELAY
        while not self._stopping:
            child = self._children.get(index)
            if child is not None:
                code = await child.proc.wait()
                if self._stopping:
                    return
                del self._children[index]
                await self._ended(child)
                lived = time.monotonic() - child.started
                delay = RESTART_DELAY if lived >= STEADY else delay
                why = (f"was killed by {signal_name(code)}" if signal_name(code)
                       else f"exited with {code}")
                log.error("front worker %s (pid %d) %s after %.0f s; restarting it in %.0f s",
                          child.args.name, child.proc.pid, why, lived, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)
            if self._stopping:
                return
            try:
                await self._spawn(index)
            except Exception:
                log.exception("cannot start front worker %d; trying again in %.0f s", index,
                              delay)

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM to each: it stops accepting, finishes the requests it has, closes its
        store; SIGKILL to one still running after `timeout`."""
        self._stopping = True
        await cancel_and_wait(*self._supervisors)
        children = list(self._children.values())
        self._children.clear()
        for child in children:
            # no more connections first: it serves those it has been handed, then stops
            self._withdraw(child)
            if child.proc.returncode is None:
                child.proc.terminate()
        await asyncio.gather(*(self._reap(c, timeout) for c in children))

    async def _reap(self, child: _Child, timeout: float) -> None:
        try:
            await asyncio.wait_for(child.proc.wait(), timeout)
        except TimeoutError:
            log.error("front worker pid %d did not stop in %.0f s; killing it", child.proc.pid,
                      timeout)
            child.proc.kill()
            await child.proc.wait()
        await self._ended(child)
