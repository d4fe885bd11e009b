"""GET /metrics: the Prometheus exposition, on the API port and on a listener of its own.

The store's gauges (queue depth by status, webhook backlog) are read on the store's reader
thread, awaited first, and remembered for CACHE_SECONDS, so a storm of scrapes makes one
query a second; the exposition itself is then made synchronously (prometheus_client's
collectors are not async). Counters of the delivery worker come in as snapshots
(delivery/metricspipe.py) that the master adds to its own (relay.metrics).

A key (scope metrics:read) is needed when `[metrics] require_key` is true, or when it is
"auto" and the listener serving the scrape is not bound to loopback: queue sizes and
destination domains are nobody else's business, but a Prometheus on the same host should not
need a secret in its config.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time

from aiohttp import web

from .. import metrics
from ..config import Config, parse_hostport
from ..config.checks import METRICS_PORT
from ..errors import ConfigError, StoreError
from ..store import SQLiteStore
from . import auth
from .errors import ApiError

log = logging.getLogger(__name__)

CACHE_SECONDS = 1.0
PATH = "/metrics"
# the classic text format, which generate_latest writes for relay's (all classic) names and
# every Prometheus and scraper reads; newer prometheus_client labels the same text 1.0.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Scrape:
    """The exposition of this process and its remotes, with the store's gauges cached."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store
        self._lock = asyncio.Lock()
        self._gauges: metrics.Gauges | None = None
        self._at = 0.0
        # the delivery worker's, the API workers': anything with the total of its counts
        self.remotes: list[metrics.Remote | metrics.Remotes] = []

    async def gauges(self) -> metrics.Gauges:
        async with self._lock:  # concurrent scrapes share one query
            now = time.monotonic()
            if self._gauges is None or now - self._at >= CACHE_SECONDS:
                counts = await self._store.counts()
                self._gauges = metrics.Gauges(queue=counts.queue,
                                              webhook_backlog=counts.webhook_backlog)
                self._at = now
            return self._gauges

    async def text(self) -> bytes:
        gauges = await self.gauges()
        return metrics.exposition(gauges, [r.total() for r in self.remotes])


SCRAPE = web.AppKey("metrics_scrape", Scrape)


def loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def key_required(config: Config, address: str) -> bool:
    setting = config.metrics.require_key
    if setting == "auto":
        return not loopback(address)
    return bool(setting)


class MetricsRoute:
    """The handler, bound to the address of the listener it serves on."""

    def __init__(self, config: Config, store: SQLiteStore, scrape: Scrape, *,
                 address: str) -> None:
        self._store = store
        self._scrape = scrape
        self._needs_key = key_required(config, address)

    def routes(self) -> list[web.RouteDef]:
        return [web.get(PATH, self.handle)]

    async def handle(self, request: web.Request) -> web.Response:
        try:
            if self._needs_key:
                await auth.require(request, self._store)
            text = await self._scrape.text()
        except ApiError as exc:  # the metrics listener has no error middleware of its own
            return exc.response()
        except StoreError as exc:
            log.warning("metrics: the store cannot be read: %s", exc)
            return ApiError(503, "the queue cannot be read just now",
                            type="unavailable").response()
        return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE})


def add_route(app: web.Application, config: Config, store: SQLiteStore) -> None:
    """GET /metrics on the API application (when enabled); its Scrape as app[SCRAPE]."""
    scrape = Scrape(store)
    app[SCRAPE] = scrape
    if config.metrics.enabled:
        app.add_routes(MetricsRoute(config, store, scrape, address=config.api.address).routes())


async def serve_own(config: Config, store: SQLiteStore, scrape: Scrape
                    ) -> tuple[web.AppRunner, tuple[str, int]] | None:
    """The listener of `[metrics] address`, when set: a tiny app with /metrics alone."""
    if not (config.metrics.enabled and config.metrics.address):
        return None
    host, port = parse_hostport(config.metrics.address, default_port=METRICS_PORT)
    app = web.Application()
    app.add_routes(MetricsRoute(config, store, scrape, address=host).routes())
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(config.source, "metrics.address",
                          f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound = (str(runner.addresses[0][0]), int(runner.addresses[0][1]))
    log.info("metrics on %s:%s", *bound)
    return runner, bound
