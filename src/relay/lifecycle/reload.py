"""SIGHUP (and `relay reload`): read the config file again and apply it without dropping a
session, the way `postfix reload` does.

The new file is loaded and checked in full first (every key, the TLS certificates and keys
of every listener); if anything is wrong the reload is refused with the error logged, and
relay goes on with the config it has. Then:

- TLS: each listener's certificate and key are loaded again into the context it serves
  from, so new connections (and new STARTTLS) get the new certificate while sessions
  already open keep theirs;
- SMTP policy and message limits (the handlers and the submitter read the new config);
- webhooks: the dispatcher is restarted with the new settings (leased outbox rows are
  retried, never lost);
- delivery: a new worker starts (without voiding leases) and the old one gets SIGTERM and
  finishes the sessions it has within the scheduler's grace; what it leased stays leased,
  so the new worker never takes the same recipient meanwhile;
- front workers (`[api] workers` > 1, `[smtp] workers` > 1): new ones start on the new
  config (and the listeners' certificates as they are now), the old ones finish the
  requests and SMTP transactions they have and stop. The master's own API keeps the config
  it started with.

What cannot change in a running process (where it listens, the data dir, the API server,
delivery in a process or not) is kept as it was, with a warning that it takes effect at
the next restart.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from typing import Protocol

from .. import config as config_mod
from .. import logs, metrics
from ..config import Config
from ..delivery.scheduler import Scheduler
from ..delivery.stack import delivery_stack
from ..delivery.supervise import WorkerProcess
from ..delivery.worker import WorkerArgs
from ..errors import ConfigError
from ..feedback import webhooks_mailchannels
from ..feedback.webhooks import WebhookDispatcher
from ..frontworkers import FrontWorkers
from ..retention import Pruner
from ..smtp.handler import RelayHandler
from ..smtp.listeners import tls_files
from ..store import SQLiteStore
from ..submit import Submitter

log = logging.getLogger(__name__)

LISTENER_SHAPE = ("address", "port", "mode", "tls")  # a listener with another is another socket
# limits held by long-lived counters (connection caps, AUTH throttles, the HTTP guard)
LIMITS_AT_RESTART = ("max_smtp_connections", "max_smtp_connections_per_client",
                     "auth_failures_before_delay", "auth_failures_before_block",
                     "auth_block_seconds", "max_http_connections",
                     "max_http_connections_per_client", "http_header_timeout",
                     "http_body_timeout")
# sections the HTTP API reads besides [api]: its handlers keep the config they were built with
API_READS = ("server", "limits", "tracking", "dkim", "bounces", "webhooks")


class Reloadable(Protocol):
    config: Config
    store: SQLiteStore
    submitter: Submitter
    bound: list[tuple[str, int]]
    handlers: list[RelayHandler]
    contexts: list[ssl.SSLContext | None]
    webhooks: WebhookDispatcher | None
    scheduler: Scheduler | None
    worker: WorkerProcess | None
    worker_metrics: metrics.Remote
    pruner: Pruner | None
    front_workers: FrontWorkers | None

    async def start_workers(self, config: Config) -> None: ...


async def reload(service: Reloadable) -> bool:
    """Apply the config file anew; False (and the old config kept) when it is refused."""
    old = service.config
    try:
        loaded = config_mod.load(None if old.source == config_mod.DEFAULTS_SOURCE
                                 else old.source)
        tls = [tls_files(loaded, i, lst) for i, lst in enumerate(loaded.smtp.listeners)]
    except ConfigError as exc:
        log.error("reload refused: %s", exc)
        return False
    for key in restart_only(old, loaded):
        log.warning("reload: %s changed; it takes effect when relay restarts", key)
    new = effective(old, loaded)
    if api := [s for s in API_READS if getattr(old, s) != getattr(new, s)]:
        log.warning("reload: [%s] changed: SMTP and delivery use it now, the HTTP API when "
                    "relay restarts", "], [".join(api))
    if new.smtp.listeners is loaded.smtp.listeners:  # the same shape: the new files apply
        for ctx, files in zip(service.contexts, tls):
            if ctx is not None and files is not None:
                ctx.load_cert_chain(*files)  # checked above; new handshakes use it
    service.submitter.reconfigure(new)
    for handler, listener in zip(service.handlers, new.smtp.listeners):
        handler.reconfigure(new, listener)
    if new.webhooks != old.webhooks:
        await restart_webhooks(service, new)
    if new.log != old.log:
        logs.configure(new.log)  # format, level, access log: from the next record on
    if service.pruner is not None:
        service.pruner.config = new.retention  # read at its next pass
    service.config = new
    if new != old:
        await restart_delivery(service, old, new)
    if new != old or (new.smtp.workers > 1 and any(c is not None for c in service.contexts)):
        # an SMTP worker loads the certificates when it starts: a reload starts new ones
        await restart_front_workers(service, new)
    log.info("reloaded %s", new.source)
    return True


def restart_only(old: Config, new: Config) -> list[str]:
    """The changed keys that a running relay cannot apply."""
    changed = []
    if new.server.data_dir != old.server.data_dir:
        changed.append("server.data_dir")
    changed += [f"api.{f.name}" for f in dataclasses.fields(old.api)
                if getattr(old.api, f.name) != getattr(new.api, f.name)]
    if new.delivery.process != old.delivery.process:
        changed.append("delivery.process")
    changed += [f"limits.{k}" for k in LIMITS_AT_RESTART
                if getattr(old.limits, k) != getattr(new.limits, k)]
    if new.smtp.workers != old.smtp.workers:
        changed.append("smtp.workers")
    if len(new.smtp.listeners) != len(old.smtp.listeners):
        changed.append("smtp.listeners (how many)")
    for i, (a, b) in enumerate(zip(old.smtp.listeners, new.smtp.listeners)):
        changed += [f"smtp.listeners[{i}].{k}" for k in LISTENER_SHAPE
                    if getattr(a, k) != getattr(b, k)]
    return changed


def effective(old: Config, new: Config) -> Config:
    """The new config, with what cannot change live kept as it is running."""
    same_shape = len(new.smtp.listeners) == len(old.smtp.listeners) and all(
        getattr(a, k) == getattr(b, k) for a, b in zip(old.smtp.listeners, new.smtp.listeners)
        for k in LISTENER_SHAPE)
    # the listeners of the same sockets (their tuple itself: reload() looks), the workers there are
    smtp = dataclasses.replace(new.smtp if same_shape else old.smtp, workers=old.smtp.workers)
    return dataclasses.replace(
        new, api=old.api, smtp=smtp,
        server=dataclasses.replace(new.server, data_dir=old.server.data_dir),
        delivery=dataclasses.replace(new.delivery, process=old.delivery.process))


async def restart_webhooks(service: Reloadable, new: Config) -> None:
    old = service.webhooks
    if old is not None:
        service.submitter.on_queued.remove(old.notify)
        await old.stop()  # what it had leased is posted again by the new one
    fresh = WebhookDispatcher(new.webhooks, service.store, signer=webhooks_mailchannels.Signer
                              .load(new.server.data_dir))
    await fresh.start()
    service.submitter.on_queued.append(fresh.notify)
    service.webhooks = fresh


async def restart_delivery(service: Reloadable, old: Config, new: Config) -> None:
    """A new worker (or in-process scheduler) on the new config first, then the old one
    stopped with its grace: the new one does not void leases, so nothing is sent twice."""
    old_worker, old_scheduler = service.worker, service.scheduler
    service.worker = service.scheduler = None
    if not new.delivery.paused:
        if new.delivery.process:
            worker = WorkerProcess(WorkerArgs(new, tuple(service.bound), recover=False),
                                   service.worker_metrics)
            await worker.start()
            service.submitter.on_queued.append(worker.poke)
            service.worker = worker
        else:
            _, scheduler = delivery_stack(new, service.bound, service.store, service.submitter)
            await scheduler.start(recover=False)
            service.scheduler = scheduler
    if old_worker is not None:
        service.submitter.on_queued.remove(old_worker.poke)
        await old_worker.stop()
    if old_scheduler is not None:
        service.submitter.on_queued.remove(old_scheduler.notify)
        await old_scheduler.stop()


async def restart_front_workers(service: Reloadable, new: Config) -> None:
    """New front workers on the new config first (listening), then the old ones drained:
    each stops accepting, tells its HTTP clients to go (`Connection: close`), finishes the
    requests and SMTP transactions it has (frontworker.py). If the new ones cannot start,
    the old ones serve on."""
    old = service.front_workers
    if old is None:
        return
    try:
        await service.start_workers(new)  # the new set becomes service.front_workers
    except BaseException:
        started = service.front_workers
        if started is not None and started is not old:
            await started.stop()  # what of the new set started
        service.front_workers = old  # the old ones serve on
        raise
    await old.stop()
