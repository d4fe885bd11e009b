"""The delivery stack, wired once for whichever process delivers (the master when delivery
runs in-process, else the worker): a scheduler over the store with its MX resolver,
deliverer, report maker and renderer (with the DKIM signer process)."""

from __future__ import annotations

from ..config import Config
from ..feedback.reports import ReportMaker
from ..feedback.tracking import Tokens, load_key
from ..feedback.verp import bounce_host
from ..store import SQLiteStore, store_for
from ..submit import Submitter
from .deliver import Deliverer
from .mx import MXResolver
from .mtasts import MtaSts
from .mx import make_resolver
from .render import KeyRing, Marks, Renderer
from .routes import Router
from .scheduler import Scheduler
from .signer import SignerProcess
from .tlspolicy import TlsPolicies


def delivery_stack(config: Config, own_listeners: list[tuple[str, int]],
                   store: SQLiteStore | None = None, submitter: Submitter | None = None
                   ) -> tuple[SQLiteStore, Scheduler]:
    """The parts that deliver: a scheduler over the store, an MX resolver and a deliverer."""
    store = store or store_for(config)
    submitter = submitter or Submitter(config, store)
    deliverer = Deliverer(hostname=config.server.hostname, delivery=config.delivery,
                          own_listeners=own_listeners, smarthost=bool(config.delivery.smarthost))
    dns = make_resolver(config.dns)
    sts = MtaSts(dns, store, ca_file=config.delivery.tls_ca_file,
                 port=config.delivery.mta_sts_port) if config.delivery.mta_sts else None
    router = Router(config, store, MXResolver(config.dns),
                    TlsPolicies(config.delivery, dns, sts))
    scheduler = Scheduler(config, store, router, deliverer,
                          ReportMaker(submitter, config.server.hostname),
                          Renderer(config.dkim, KeyRing(store), marks=Marks(
                              Tokens(load_key(config.server.data_dir)), config.api.public_url,
                              bounce_host(config)), signer=SignerProcess(log=config.log)))
    submitter.on_queued.append(scheduler.notify)
    return store, scheduler
