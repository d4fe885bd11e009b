"""The delivery stack, wired once for whichever process delivers (the master when delivery
runs in-process, else the worker): a scheduler over the store with its MX resolver,
deliverer, report maker and renderer (with the DKIM signer process)."""

from __future__ import annotations

import ssl

from dns.asyncresolver import Resolver

from ..config import Config
from ..feedback.reports import ReportMaker
from ..feedback.tracking import Tokens, load_key
from ..feedback.verp import bounce_host
from ..store import SQLiteStore, store_for
from ..submit import Submitter
from .deliver import Deliverer
from .mtasts import MtaSts
from .mx import MXResolver, make_resolver
from .render import KeyRing, Marks, Renderer
from .routes import Router
from .scheduler import Scheduler
from .signer import SignerProcess
from .tlspolicy import TlsPolicies
from .tlsrpt import TlsReporter


def delivery_stack(config: Config, own_listeners: list[tuple[str, int]],
                   store: SQLiteStore | None = None, submitter: Submitter | None = None
                   ) -> tuple[SQLiteStore, Scheduler]:
    """The parts that deliver: a scheduler over the store, an MX resolver and a deliverer."""
    store = store or store_for(config)
    submitter = submitter or Submitter(config, store)
    dns = make_resolver(config.dns)
    reporter = tls_reporter(config, store, dns, submitter)
    deliverer = Deliverer(
        hostname=config.server.hostname, delivery=config.delivery, own_listeners=own_listeners,
        smarthost=bool(config.delivery.smarthost),
        tls_observer=(lambda target, source, failure, detail: reporter.session(
            target, failure, sending_ip=source.address, detail=detail)) if reporter else None)
    sts = MtaSts(dns, store, ca_file=config.delivery.tls_ca_file,
                 port=config.delivery.mta_sts_port) if config.delivery.mta_sts else None
    router = Router(config, store, MXResolver(config.dns), TlsPolicies(
        config.delivery, dns, sts, on_failure=(lambda target, failure: reporter.session(
            target, failure, sending_ip=None)) if reporter else None))
    scheduler = Scheduler(config, store, router, deliverer,
                          ReportMaker(submitter, config.server.hostname),
                          Renderer(config.dkim, KeyRing(store), marks=Marks(
                              Tokens(load_key(config.server.data_dir)), config.api.public_url,
                              bounce_host(config)), signer=SignerProcess(log=config.log)),
                          tls_reporter=reporter)
    submitter.on_queued.append(scheduler.notify)
    return store, scheduler


def tls_reporter(config: Config, store: SQLiteStore, dns: Resolver,
                 submitter: Submitter) -> TlsReporter | None:
    """TLS-RPT's reporter ([delivery] tls_reports), reporting as this host: reports come from
    tls-reports@ it and name postmaster@ it to write to."""
    if not config.delivery.tls_reports or config.delivery.smarthost:
        return None
    host = config.server.hostname
    ssl_context = ssl.create_default_context(cafile=config.delivery.tls_ca_file or None)
    return TlsReporter(store, dns, organization=host, contact=f"postmaster@{host}",
                       submitter=host, report_from=f"tls-reports@{host}", queue=submitter,
                       allow_private_targets=config.webhooks.allow_private_targets,
                       ssl_context=ssl_context)
