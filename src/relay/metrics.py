"""Prometheus metrics: what each process counts, and one exposition of them all.

Each process (the master, the delivery worker, API workers) counts into REGISTRY, a CollectorRegistry of
relay's own rather than prometheus_client's global one, so nothing a library registers there
shows up as relay's, and nothing of relay's collides with it. The counters are module-level,
as Prometheus instrumentation is: the places they count from (the store's writer, render,
the scheduler) are deep, and a handle threaded through every constructor would say nothing
more. Tests read differences, not absolute values.

The worker's counts reach the master as snapshots (`snapshot()`: plain JSON-able samples,
cumulative); `exposition()` adds them to the master's own samples of the same name and
labels, and puts the gauges read from the store at scrape time beside them.

Destination domains come from recipients' addresses, which anyone sending mail chooses: as
label values they would grow without bound. `DomainLabels` gives the first `domains`
distinct ones seen their own value and calls every later one "other"; first come rather
than a moving top N, so a label never changes meaning while its counter is being summed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .types import WAITING_STATUSES

OTHER = "other"
SOURCES = ("smtp", "api", "dsn", "tlsrpt")  # Submission.source
DEFAULT_DOMAINS = 50
MAX_LABEL = 253  # the longest domain name

REGISTRY = CollectorRegistry(auto_describe=True)

# seconds: an SMTP attempt runs from milliseconds (a sink next door) to the command timeout
ATTEMPT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# seconds from queued to delivered: at once, after a retry or two, or days later
QUEUE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0,
                 86400.0, 5 * 86400.0)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

ACCEPTED = Counter("relay_messages_accepted", "Messages committed to the queue, by the way "
                   "they came in (smtp, api, dsn or tlsrpt) and the listener that took them "
                   "(mode:port of an SMTP listener; else the source again)",
                   ["source", "listener"], registry=REGISTRY)
DELIVERIES = Counter("relay_deliveries", "Recipient outcomes committed by the scheduler: "
                     "delivered, deferred, bounced, expired, suppressed, failed; by "
                     "destination domain (bounded: see [metrics] domains)",
                     ["outcome", "domain"], registry=REGISTRY)
ATTEMPT_SECONDS = Histogram("relay_delivery_attempt_seconds", "Duration of an SMTP "
                            "delivery attempt of one recipient, by its outcome",
                            ["outcome"], buckets=ATTEMPT_BUCKETS, registry=REGISTRY)
QUEUE_SECONDS = Histogram("relay_delivery_queue_seconds", "Time from a message's queueing "
                          "to a recipient's delivery", buckets=QUEUE_BUCKETS,
                          registry=REGISTRY)
WEBHOOK_ATTEMPTS = Counter("relay_webhook_attempts", "Webhook POSTs made, by result "
                           "(delivered: a 2xx; failed: anything else, retried on schedule)",
                           ["result"], registry=REGISTRY)
DKIM_FAILURES = Counter("relay_dkim_failures", "DKIM trouble, by reason: key (a stored key "
                        "could not be loaded), signer (the signer process failed; signed in "
                        "the worker instead), render (a message could not be rendered and "
                        "signed; it is parked as failed)", ["reason"], registry=REGISTRY)
COMMIT_SECONDS = Histogram("relay_store_commit_seconds", "Duration of a group commit "
                           "(one transaction and fsync), by process (master, worker, or api: "
                           "the API workers)",
                           ["process"], buckets=COMMIT_BUCKETS, registry=REGISTRY)
LOCK_WAIT_SECONDS = Histogram("relay_store_lock_wait_seconds", "Time a commit waited for the "
                              "SQLite file's writers' lock while other processes' commits "
                              "held it (part of relay_store_commit_seconds), by process",
                              ["process"], buckets=COMMIT_BUCKETS, registry=REGISTRY)
LOCK_HELD_SECONDS = Histogram("relay_store_lock_held_seconds", "Time a commit held the SQLite "
                              "file's writers' lock (its transaction, not the wait for the lock "
                              "nor the sync after it), by process", ["process"],
                              buckets=COMMIT_BUCKETS, registry=REGISTRY)
COMMIT_WRITES = Histogram("relay_store_commit_writes", "Writes (a message, a batch, an "
                          "outcome, ...) taken together into one group commit, by process",
                          ["process"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
                          registry=REGISTRY)
SITE_HOLDS = Counter("relay_site_holds", "Sites held back by a remote's reply matching a "
                     "[[delivery.backoff]] rule, by site (bounded like domains) and action "
                     "(suspend or slow)", ["site", "action"], registry=REGISTRY)
HELD = Counter("relay_delivery_held", "Recipients put back without an attempt, by reason: "
               "site (its site is suspended), warmup (the pool's daily warm-up caps are "
               "spent)", ["reason"], registry=REGISTRY)
TLS_FAILURES = Counter("relay_tls_failures", "Outbound TLS failures, by the policy's source "
                       "(default, config, mta-sts, dane) and RFC 8460 result type",
                       ["policy", "result"], registry=REGISTRY)
API_CONNECTIONS = Counter("relay_api_connections", "API connections the master accepted for "
                          "its API workers ([api] workers > 1), by who served each: master, "
                          "worker (handed over), fallback (the master, as the handoff failed)",
                          ["served_by"], registry=REGISTRY)
SMTP_CONNECTIONS = Counter("relay_smtp_handoffs", "SMTP connections the master accepted for "
                           "its SMTP workers ([smtp] workers > 1), by listener port and who "
                           "served each: master, worker (handed over), fallback (the master, "
                           "as the handoff failed)", ["port", "served_by"], registry=REGISTRY)

# the statuses a recipient waits in; the final ones only grow and are counted above
WAITING = WAITING_STATUSES


class DomainLabels:
    """The label value of a destination domain: its own for the first `limit` distinct
    domains seen, OTHER for the rest."""

    def __init__(self, limit: int = DEFAULT_DOMAINS) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, domain: str) -> str:
        domain = domain.lower().rstrip(".")[:MAX_LABEL] or OTHER
        if domain in self._seen:
            return domain
        if len(self._seen) < self.limit:
            self._seen.add(domain)
            return domain
        return OTHER


@dataclass
class Setup:
    """How this process labels what it counts (set once at start by `configure`)."""

    process: str = "master"
    domains: DomainLabels = field(default_factory=DomainLabels)


SETUP = Setup()


def configure(*, process: str, domains: int = DEFAULT_DOMAINS) -> None:
    """At a process's start (one service per process; tests start several, each afresh)."""
    SETUP.process = process
    SETUP.domains = DomainLabels(domains)


# -- what the hooks call ---------------------------------------------------------------------


def accepted(source: str, count: int = 1, *, listener: str = "") -> None:
    """Count committed messages; the listener values are the configured listeners' (bounded)."""
    if count:
        source = source if source in SOURCES else OTHER
        ACCEPTED.labels(source, listener or source).inc(count)


@dataclass(frozen=True)
class Observed:
    """One committed recipient outcome, as the scheduler knows it."""

    outcome: str
    domain: str
    attempt_seconds: float | None = None  # None: no SMTP attempt (suppressed, failed, ...)
    queued_seconds: float | None = None  # only for delivered


def observe(outcomes: Iterable[Observed]) -> None:
    for o in outcomes:
        DELIVERIES.labels(o.outcome, SETUP.domains(o.domain)).inc()
        if o.attempt_seconds is not None:
            ATTEMPT_SECONDS.labels(o.outcome).observe(max(0.0, o.attempt_seconds))
        if o.queued_seconds is not None:
            QUEUE_SECONDS.observe(max(0.0, o.queued_seconds))


def webhook_attempt(ok: bool) -> None:
    WEBHOOK_ATTEMPTS.labels("delivered" if ok else "failed").inc()


def dkim_failure(reason: str) -> None:
    DKIM_FAILURES.labels(reason).inc()


def site_held(site: str, action: str) -> None:
    SITE_HOLDS.labels(SETUP.domains(site), action).inc()


def held(reason: str, count: int = 1) -> None:
    HELD.labels(reason).inc(count)


def tls_failure(policy: str, result: str) -> None:
    TLS_FAILURES.labels(policy, result).inc()


def api_connection(served_by: str) -> None:
    API_CONNECTIONS.labels(served_by).inc()


def smtp_connection(port: int) -> Callable[[str], None]:
    """What counts the connections of the SMTP listener on `port`, by who served each."""
    counters = {by: SMTP_CONNECTIONS.labels(str(port), by)
                for by in ("master", "worker", "fallback")}
    return lambda served_by: counters[served_by].inc()


def commit_took(seconds: float, writes: int) -> None:
    COMMIT_SECONDS.labels(SETUP.process).observe(seconds)
    COMMIT_WRITES.labels(SETUP.process).observe(writes)


def lock_waited(seconds: float) -> None:
    LOCK_WAIT_SECONDS.labels(SETUP.process).observe(seconds)


def lock_held(seconds: float) -> None:
    LOCK_HELD_SECONDS.labels(SETUP.process).observe(seconds)


# -- snapshots and the exposition -------------------------------------------------------------

# [name, type, help, [[sample name, labels, value], ...]] per family: JSON as it is
Snapshot = list[list[Any]]


def snapshot(registry: CollectorRegistry = REGISTRY) -> Snapshot:
    """This process's cumulative samples, without the `_created` ones (a timestamp: summing
    two processes' would mean nothing)."""
    return [[m.name, m.type, m.documentation,
             [[s.name, dict(s.labels), s.value] for s in m.samples
              if not s.name.endswith("_created")]]
            for m in registry.collect()]


def add(total: Snapshot, more: Snapshot) -> Snapshot:
    """Two snapshots' samples summed by family, sample name and labels."""
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]]
    families = {}
    for name, typ, doc, samples in [*total, *more]:
        _, _, values = families.setdefault(name, (typ, doc, {}))
        for sample, labels, value in samples:
            key = (sample, tuple(sorted(labels.items())))
            values[key] = values.get(key, 0.0) + float(value)
    return [[name, typ, doc, [[s, dict(labels), v] for (s, labels), v in values.items()]]
            for name, (typ, doc, values) in families.items()]


@dataclass
class Remote:
    """The last snapshot of a process that sends them (the delivery worker, an API worker).
    When it is
    restarted its counts start again from zero: what the dead one had counted is kept in
    `base`, so the counters the master shows never go down."""

    base: Snapshot = field(default_factory=list)
    last: Snapshot = field(default_factory=list)

    def update(self, snap: Snapshot) -> None:
        self.last = snap

    def restarted(self) -> None:
        self.base, self.last = add(self.base, self.last), []

    def total(self) -> Snapshot:
        return add(self.base, self.last)


@dataclass
class Remotes:
    """The snapshots of a changing set of processes (the API workers): a Remote for each
    running one, and what the ended ones counted, so the totals never go down."""

    ended: Snapshot = field(default_factory=list)
    live: list[Remote] = field(default_factory=list)

    def join(self) -> Remote:
        remote = Remote()
        self.live.append(remote)
        return remote

    def leave(self, remote: Remote) -> None:
        self.live = [r for r in self.live if r is not remote]  # Remotes compare by value
        self.ended = add(self.ended, remote.total())

    def total(self) -> Snapshot:
        total = self.ended
        for remote in self.live:
            total = add(total, remote.total())
        return total


def without(total: Snapshot, part: Snapshot) -> Snapshot:
    """`total` less `part` (a process's own counts taken out of everyone's)."""
    return add(total, [[name, typ, doc, [[s, labels, -float(v)] for s, labels, v in samples]]
                       for name, typ, doc, samples in part])


@dataclass(frozen=True)
class Gauges:
    """What is read from the store at scrape time."""

    queue: Mapping[str, int]  # recipients by waiting status
    webhook_backlog: int  # webhook deliveries not yet made (due or waiting to retry)


class _Families(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def exposition(gauges: Gauges, remotes: Iterable[Snapshot] = ()) -> bytes:
    """The text exposition: this process's counts plus the remotes', and the gauges."""
    total = snapshot()
    for snap in remotes:
        total = add(total, snap)
    families: list[Metric] = []
    for name, typ, doc, samples in total:
        family = Metric(name, doc, typ)
        for sample, labels, value in samples:
            family.add_sample(sample, labels, value)
        families.append(family)
    queue = Metric("relay_queue_recipients", "Recipients waiting in the queue, by status",
                   "gauge")
    for status in WAITING:
        queue.add_sample("relay_queue_recipients", {"status": status},
                         float(gauges.queue.get(status, 0)))
    backlog = Metric("relay_webhook_backlog", "Webhook deliveries not yet made (due now or "
                     "waiting for a retry)", "gauge")
    backlog.add_sample("relay_webhook_backlog", {}, float(gauges.webhook_backlog))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families, queue, backlog]))
    return generate_latest(registry)


def parse_snapshot(data: bytes | str) -> Snapshot:
    """A snapshot as `snapshot()` made it, checked: a bad one raises ValueError, so it can
    never break the exposition."""
    return checked_snapshot(json.loads(data))


def checked_snapshot(snap: Any) -> Snapshot:
    """A snapshot read from JSON (`parse_snapshot`, or within a larger JSON line), checked."""
    if not isinstance(snap, list):
        raise ValueError("a snapshot is a list")  # noqa: TRY004 - callers catch ValueError
    for family in snap:
        if not (isinstance(family, list) and len(family) == 4
                and all(isinstance(x, str) for x in family[:3])
                and isinstance(family[3], list)):
            raise ValueError("a family is [name, type, help, samples]")
        for sample in family[3]:
            if not (isinstance(sample, list) and len(sample) == 3
                    and isinstance(sample[0], str) and isinstance(sample[1], dict)
                    and all(isinstance(k, str) and isinstance(v, str)
                            for k, v in sample[1].items())
                    and isinstance(sample[2], (int, float))):
                raise ValueError("a sample is [name, labels, value]")
    checked: Snapshot = snap
    return checked


def json_line(snap: Snapshot) -> bytes:
    return json.dumps(snap, separators=(",", ":")).encode() + b"\n"
