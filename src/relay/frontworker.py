"""A front worker: one more process serving relay's listeners, for `[api] workers` > 1 or
`[smtp] workers` > 1. The master accepts every connection, of the API and of each SMTP
listener, serves its turn of them and hands this process its own over a Unix socket, each
tagged with its listener (handoff.py). Worker i serves the API if i < `[api] workers` and
every SMTP listener if i < `[smtp] workers`.

It has what the master's listeners have: its own store connection and group-commit writer
(on SQLite the writers of every process take turns by the store's WriteLock), its own
Submitter, the same app behind the same connection guard, the same SMTP handlers with their
share of the connection caps; a 202 or a 250 still comes after the commit. What only the
master has comes over three pipes (frontworkers.py holds the other ends):

- wake, to the master: READY once it listens, then a byte after commits of new mail (at
  most one a turn of the loop), so that the master wakes what `Submitter.on_queued` wakes
  there (the delivery worker, the webhook dispatcher) as promptly as for its own mail;
- metrics, to the master: this process's counts every second (delivery/metricspipe.py);
- feed, from the master: every second a line with everyone else's counts (the master's,
  the delivery worker's, the other workers') and the master's readiness checks
  (delivery, SMTP listeners), so `/metrics` and `/readyz` answer here as there. Its EOF
  means the master is gone: the worker stops (and on Linux the kernel kills it at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import pickle
import signal
import socket
import sys
import time
from dataclasses import dataclass

from aiohttp import web

from . import handoff, logs, metrics
from .aio import cancel_and_wait, run_loop
from .api.app import CONNECTIONS, DRAINING, make_app, per_process, serve_handed
from .api.health import Check, SharedChecks
from .api.metrics import SCRAPE
from .config import Config
from .delivery import metricspipe
from .delivery.child import die_with_parent, ignore_hangup
from .smtp.listeners import Listeners, contexts
from .store import store_for
from .submit import Submitter

log = logging.getLogger("relay.frontworker")  # not __main__: it runs as `python -m`

STALE = 5.0  # seconds without a feed line before /readyz says the master is not answering
READY = b"R"  # on the wake pipe, once: listening (a wake is any other byte)
GRACE = 2.0  # seconds a stopping worker gives its clients to take their connections elsewhere
SMTP_GRACE = 30.0  # seconds a stopping worker gives an SMTP transaction to end (smtp/listeners)


@dataclass(frozen=True)
class FrontArgs:
    config: Config
    port: int | None  # the API's port as the master bound it (the config's may be 0)
    index: int  # 1 .. workers - 1, for the log
    api: bool  # it serves the API
    smtp: bool  # it serves the SMTP listeners

    @property
    def name(self) -> str:
        """Its name in the log: api1, smtp2 or front1 (both)."""
        return f"{'front' if self.api and self.smtp else 'api' if self.api else 'smtp'}" \
               f"{self.index}"


def roles(config: Config, index: int) -> tuple[bool, bool]:
    """(serves the API, serves SMTP) for worker `index`."""
    return config.api.enabled and index < config.api.workers, index < config.smtp.workers


def how_many(config: Config) -> int:
    """The front workers a master with `config` starts (besides itself)."""
    return max(config.api.workers if config.api.enabled else 1, config.smtp.workers) - 1


class Waker:
    """`Submitter.on_queued` here: one byte to the master a turn of the loop at most, however
    many requests committed in it; never blocks (a full pipe already says "wake up")."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._pending = False

    def __call__(self) -> None:
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self._write)

    def _write(self) -> None:
        self._pending = False
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._fd, b"\0")


class Feed:
    """What the master last said: everyone else's counts and its own checks."""

    def __init__(self) -> None:
        self.others = metrics.Remote()
        self._checks: list[Check] = []
        self._at: float | None = None

    def update(self, line: bytes) -> None:
        try:
            data = json.loads(line)
            others = metrics.checked_snapshot(data["others"])
            checks = [Check(str(n), bool(ok), str(d)) for n, ok, d in data["checks"]]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("the master sent a feed line that is not one: %s", exc)
            return
        self.others.update(others)
        self._checks, self._at = checks, time.monotonic()

    def checks(self) -> list[Check]:
        if self._at is None:
            return [Check("master", False, "no word from the master yet")]
        quiet = time.monotonic() - self._at
        if quiet > STALE:
            return [Check("master", False, f"no word from the master for {quiet:.0f} s")]
        return self._checks


def feed_line(others: metrics.Snapshot, checks: list[Check]) -> bytes:
    """The master's line to one worker (Feed.update reads it)."""
    return json.dumps({"others": others, "checks": [[c.name, c.ok, c.detail] for c in checks]},
                      separators=(",", ":")).encode() + b"\n"


async def serve(args: FrontArgs, wake_fd: int, metrics_fd: int, feed_fd: int,
                channel: socket.socket) -> None:
    config = args.config
    metrics.configure(process="api" if args.api else "smtp", domains=config.metrics.domains)
    store = store_for(config)
    await store.open()
    submitter = Submitter(config, store)
    submitter.on_queued.append(Waker(wake_fd))
    feed = Feed()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = runner = receiver = listeners = None
    tasks = [asyncio.create_task(metricspipe.send(metrics_fd), name="metrics")]
    try:
        serving: dict[bytes, handoff.Serving] = {}
        if args.smtp:
            listeners = Listeners(config, store, submitter, contexts(config))
            serving.update(listeners.servings())
        if args.api:
            app = make_app(per_process(config, config.api.workers), store, submitter,
                           readiness=SharedChecks(store, feed.checks))
            app[SCRAPE].remotes.append(feed.others)
            runner, serving[handoff.API] = await serve_handed(app)
        receiver = handoff.Receiver(channel, serving, on_eof=stop.set)
        listening = asyncio.create_task(
            metricspipe.read_lines(feed_fd, feed.update, "the master"), name="feed")
        listening.add_done_callback(lambda _: stop.set())  # EOF: the master is gone
        tasks.append(listening)
        served = ([f"the API on {config.api.address}:{args.port}"] if args.api else []) \
            + ([f"{len(config.smtp.listeners)} SMTP listener(s)"] if args.smtp else [])
        log.info("front worker %s (pid %d) serving %s", args.name, os.getpid(),
                 " and ".join(served))
        os.write(wake_fd, READY)  # the first byte on a fresh pipe: never blocks
        gc.freeze()  # as `relay serve` does: start-up's objects out of the collector's sight
        await stop.wait()
    finally:
        if app is not None:
            app[DRAINING].on = True  # every answer from now on closes its connection
        if receiver is not None:
            receiver.drain()  # what the master handed over before it stopped handing any
            ending = [_quiet(app, GRACE)] if app is not None else []
            if listeners is not None:
                ending.append(listeners.drain(SMTP_GRACE))
            await asyncio.gather(*ending)
        if runner is not None:
            await runner.cleanup()  # the open connections' requests finish
        await cancel_and_wait(*tasks)
        await store.close()


async def _quiet(app: web.Application, grace: float) -> None:
    """Wait up to `grace` seconds for the clients to go: a busy connection's next answer
    says `Connection: close`, and its client takes its next request to another process.
    What is left then (an idle connection) is closed by the runner; a client that sends on
    it at that very moment sees the connection close, as with any HTTP server."""
    guard = app[CONNECTIONS]
    deadline = asyncio.get_running_loop().time() + grace
    while guard.open_connections and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)


def main() -> None:
    die_with_parent()
    ignore_hangup()
    wake_fd, metrics_fd, feed_fd, channel_fd = (int(a) for a in sys.argv[1:5])
    args: FrontArgs = pickle.load(sys.stdin.buffer)  # from our own master, over a pipe
    logs.configure(args.config.log, process=args.name)
    if os.getppid() == 1:  # the master died before we could ask to die with it
        return
    run_loop(serve(args, wake_fd, metrics_fd, feed_fd, socket.socket(fileno=channel_fd)))


if __name__ == "__main__":
    main()
