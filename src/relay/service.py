"""The master: opens the store and starts every listener in one event loop, then drains on stop."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import ssl
import time
from dataclasses import dataclass, field

from aiohttp import web

from . import metrics
from .api import metrics as api_metrics
from .api.app import DRAINING, SHUTDOWN_TIMEOUT, make_app, per_process, serve_shared
from .api.app import serve as serve_app
from .api.health import Check, SharedChecks
from .config import Config
from .datadir import DataDirLock
from .delivery.keycheck import check_signing_keys
from .delivery.scheduler import STOP_GRACE, Scheduler
from .delivery.stack import delivery_stack
from .delivery.supervise import STOP_TIMEOUT as WORKER_STOP_TIMEOUT
from .delivery.supervise import WorkerProcess
from .delivery.worker import WorkerArgs
from .errors import ConfigError
from .feedback import webhooks_mailchannels
from .feedback.tracking import load_key
from .feedback.webhooks import WebhookDispatcher
from .frontworkers import STOP_TIMEOUT as FRONT_STOP_TIMEOUT
from .frontworkers import FrontWorkers
from .handoff import Acceptor, listening_socket, smtp_tag
from .lifecycle import readiness
from .lifecycle.notify import Notifier, sd_notify
from .lifecycle.reload import reload
from .retention import Pruner
from .smtp.handler import RelayHandler
from .smtp.listeners import Listeners
from .smtp.listeners import contexts as listener_contexts
from .store import SQLiteStore, store_for
from .submit import Submitter

log = logging.getLogger(__name__)

# The longest a stop takes, SIGTERM to exit, one stage after another (Service.stop): the
# front workers', the master's API requests, its delivery sessions in flight, its delivery
# worker's, and a margin for the store. systemd/relay.service's TimeoutStopSec is at least
# this, so that systemd does not SIGKILL a relay that is still draining.
STOP_BUDGET = FRONT_STOP_TIMEOUT + SHUTDOWN_TIMEOUT + STOP_GRACE + WORKER_STOP_TIMEOUT + 10.0

SMTP_BACKLOG = 100  # asyncio's, as an SMTP listener served here has


@dataclass
class Service:
    config: Config
    store: SQLiteStore = field(init=False)
    submitter: Submitter = field(init=False)
    # per SMTP listener: asyncio's server, or with SMTP workers the Acceptor that hands
    # them their turns of the connections
    servers: list[asyncio.base_events.Server | Acceptor] = field(default_factory=list)
    bound: list[tuple[str, int]] = field(default_factory=list)  # (address, port) per listener
    handlers: list[RelayHandler] = field(default_factory=list)
    listeners: Listeners = field(init=False)
    contexts: list[ssl.SSLContext | None] = field(default_factory=list)  # per listener

    api_bound: tuple[str, int] | None = None  # (address, port) of the HTTP API
    api_runner: web.AppRunner | None = field(init=False, default=None)
    # the API's listening socket: asyncio's server, or with API workers the Acceptor that
    # hands them their turns of the connections
    api_server: asyncio.base_events.Server | Acceptor | None = field(init=False, default=None)
    webhooks: WebhookDispatcher | None = field(init=False, default=None)
    scheduler: Scheduler | None = field(init=False, default=None)  # delivery in this process
    worker: WorkerProcess | None = field(init=False, default=None)  # or in its own
    lock: DataDirLock = field(init=False)
    pruner: Pruner | None = field(init=False, default=None)  # [retention], every interval
    worker_metrics: metrics.Remote = field(init=False, default_factory=metrics.Remote)
    # [api] workers > 1 or [smtp] workers > 1
    front_workers: FrontWorkers | None = field(init=False, default=None)
    worker_counts: metrics.Remotes = field(init=False, default_factory=metrics.Remotes)
    metrics_runner: web.AppRunner | None = field(init=False, default=None)
    metrics_bound: tuple[str, int] | None = None  # (address, port) of [metrics] address
    _checks: SharedChecks | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.lock = DataDirLock(self.config.server.data_dir)
        self.store = store_for(self.config)
        self.submitter = Submitter(self.config, self.store)

    async def start(self) -> None:
        """Open the store, then listen. Raises ConfigError when a listener cannot start."""
        self.config.server.data_dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()  # before the store: a second relay must not touch the queue
        try:
            contexts = listener_contexts(self.config)  # checked, as a reload checks them
            await self.store.open()
        except BaseException:
            self.lock.release()
            raise
        self.contexts = contexts  # a reload loads new certificates into these
        load_key(self.config.server.data_dir)  # made once, before any process needs it
        metrics.configure(process="master", domains=self.config.metrics.domains)
        self.listeners = Listeners(self.config, self.store, self.submitter, contexts)
        self.handlers = self.listeners.handlers
        try:
            await check_signing_keys(self.store)  # a corrupt DKIM key stops us here, named
            for i, listener in enumerate(self.config.smtp.listeners):
                try:
                    server = await self._listen(i)
                except OSError as exc:
                    raise ConfigError(self.config.source, f"smtp.listeners[{i}]",
                                      f"cannot listen on {listener.address}:{listener.port}: "
                                      f"{exc.strerror or exc}") from None
                self.servers.append(server)
                self.bound.append(server.sockets[0].getsockname()[:2])
                log.info("SMTP %s listener on %s:%s (tls %s)", listener.mode,
                         *self.bound[-1], listener.tls)
            await self._start_api()
            await self._start_metrics()
            self.webhooks = WebhookDispatcher(
                self.config.webhooks, self.store,
                signer=webhooks_mailchannels.Signer.load(self.config.server.data_dir))
            await self.webhooks.start()
            self.submitter.on_queued.append(self.webhooks.notify)
            if not self.config.delivery.paused:
                await self._start_delivery()
            self.pruner = Pruner(self.config.retention, self.store)
            self.pruner.start()
            await self.start_workers(self.config)
        except BaseException:
            await self.stop()
            raise

    async def _listen(self, index: int) -> asyncio.base_events.Server | Acceptor:
        """SMTP listener `index`: served here, or with [smtp] workers > 1 accepted here and
        handed out in turns (handoff.py). Raises OSError."""
        listener = self.config.smtp.listeners[index]
        if self.config.smtp.workers == 1:
            serving = self.listeners.serving(index)
            return await asyncio.get_running_loop().create_server(
                serving.protocols, listener.address, listener.port, ssl=serving.ssl,
                reuse_address=True)
        sock = listening_socket(listener.address, listener.port, SMTP_BACKLOG)
        return Acceptor(sock, self.listeners.serving(index), tag=smtp_tag(index),
                        counted=metrics.smtp_connection(sock.getsockname()[1]), what="SMTP")

    async def _start_api(self) -> None:
        api = self.config.api
        if not api.enabled:
            return
        workers = api.workers
        config = per_process(self.config, workers)
        app = make_app(config, self.store, self.submitter, readiness=self.readiness)
        backlog = min(self.config.limits.max_http_connections, 4096)  # one queue for all
        try:
            if workers > 1:
                self.api_runner, self.api_server = await serve_shared(
                    app, api.address, api.port, backlog=backlog)
            else:
                self.api_runner, self.api_server = await serve_app(
                    app, api.address, api.port, backlog=backlog)
        except OSError as exc:
            raise ConfigError(self.config.source, "api.port",
                              f"cannot listen on {api.address}:{api.port}: "
                              f"{exc.strerror or exc}") from None
        assert self.api_server.sockets
        self.api_bound = self.api_server.sockets[0].getsockname()[:2]
        log.info("HTTP API on %s:%s", *self.api_bound)

    async def start_workers(self, config: Config) -> None:
        """The front workers: the API's and the SMTP listeners' other processes, as many as
        the larger of `[api] workers` and `[smtp] workers` says, less the master. A reload
        starts a new set with its config, then stops the old one (lifecycle/reload)."""
        api = self.api_server if isinstance(self.api_server, Acceptor) else None
        smtp = [s for s in self.servers if isinstance(s, Acceptor)]
        if api is None and not smtp:
            return
        self.front_workers = FrontWorkers(
            config, api=api, smtp=smtp, remotes=self.worker_counts, others=self.counts,
            on_wake=self.submitter.notify_queued,
            checks=lambda: readiness.master_checks(self))
        await self.front_workers.start()

    def counts(self) -> metrics.Snapshot:
        """Every process's counts: the master's, the delivery worker's, the front workers'."""
        return metrics.add(metrics.add(metrics.snapshot(), self.worker_metrics.total()),
                           self.worker_counts.total())

    async def _start_metrics(self) -> None:
        app = self.api_runner.app if self.api_runner is not None else None
        scrape = app[api_metrics.SCRAPE] if app is not None else api_metrics.Scrape(self.store)
        scrape.remotes.append(self.worker_metrics)
        scrape.remotes.append(self.worker_counts)
        own = await api_metrics.serve_own(self.config, self.store, scrape)
        if own is not None:
            self.metrics_runner, self.metrics_bound = own

    async def _start_delivery(self) -> None:
        if self.config.delivery.process:
            self.worker = WorkerProcess(WorkerArgs(self.config, tuple(self.bound)),
                                        self.worker_metrics)
            await self.worker.start()
            self.submitter.on_queued.append(self.worker.poke)
        else:
            _, self.scheduler = delivery_stack(self.config, self.bound, self.store, self.submitter)
            await self.scheduler.start()

    async def readiness(self) -> list[Check]:
        """For `/readyz`: the store takes a write, delivery runs, every listener is bound."""
        if self._checks is None:
            self._checks = SharedChecks(
                self.store, lambda: readiness.master_checks(self))
        return await self._checks()

    async def stop(self) -> None:
        if self.pruner is not None:
            await self.pruner.stop()
            self.pruner = None
        for server in self.servers:
            server.close()
        if self.front_workers is not None:  # first: they drain while the master still serves
            await self.front_workers.stop()
            self.front_workers = None
        if self.api_runner is not None:
            self.api_runner.app[DRAINING].on = True
        if self.api_server is not None:
            self.api_server.close()  # no new connections; the runner closes the open ones
            self.api_server = None
        if self.api_runner is not None:
            await self.api_runner.cleanup()
            self.api_runner = None
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
            self.metrics_runner = None
        if self.webhooks is not None:
            await self.webhooks.stop()
            self.webhooks = None
        if self.scheduler is not None:
            await self.scheduler.stop()
            self.scheduler = None
        if self.worker is not None:
            await self.worker.stop()
            self.worker = None
        for server in self.servers:
            # Connections accepted in the meantime register late: close until none is left.
            for _ in range(50):
                for handler in self.handlers:
                    for conn in list(handler.connections):
                        conn.close()
                try:
                    await asyncio.wait_for(asyncio.shield(server.wait_closed()), 0.2)
                    break
                except TimeoutError:
                    continue
        for _ in range(3):  # let connection_lost callbacks run
            await asyncio.sleep(0)
        self.servers.clear()
        self.handlers.clear()
        await self.store.close()
        self.lock.release()


async def run(config: Config, *, on_ready: asyncio.Future[None] | None = None,
              freeze_startup: bool = False) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads the config file. `freeze_startup`
    (`relay serve`, one service for the process's life): what starting made (modules, the
    app, the routes, some 80,000 objects) is moved out of the garbage collector's sight, so
    that its full collections scan only what requests make (gc.freeze; in `bench/api.py`
    the collector took 15 → 4 µs of CPU per message in batches)."""
    service = Service(config)
    stopped_by: list[signal.Signals] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop(sig: signal.Signals) -> None:
        stopped_by.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):  # before start: a stop while starting waits
        loop.add_signal_handler(sig, on_stop, sig)
    hangups = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, hangups.set)  # before start: a HUP must not kill
    await service.start()
    if freeze_startup:
        gc.freeze()
    notifier = Notifier(service)
    sd_notify("READY=1")
    notifier.start()
    reloading = asyncio.Lock()
    reloader = asyncio.create_task(_reload_on_hangup(service, hangups, reloading),
                                   name="reload")
    if on_ready is not None:
        on_ready.set_result(None)
    try:
        await stop.wait()
    finally:
        sd_notify("STOPPING=1")
        log.info("stopping on %s", stopped_by[0].name if stopped_by else "request")
        async with reloading:  # a reload under way finishes first: it has children to hand over
            reloader.cancel()
        await asyncio.gather(reloader, return_exceptions=True)
        await notifier.stop()
        await service.stop()


async def _reload_on_hangup(service: Service, hangups: asyncio.Event,
                            reloading: asyncio.Lock) -> None:
    """One reload at a time; HUPs that come during one make one more after it."""
    while True:
        await hangups.wait()
        async with reloading:
            hangups.clear()
            log.info("reloading on SIGHUP")
            sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                await reload(service)
            except Exception:  # the running config stays; relay must outlive a failed reload
                log.exception("reload failed")
            sd_notify("READY=1")
