"""Takes due recipients with a lease and delivers them by destination within concurrency
limits; what each result means for its recipient is outcomes.py's to say."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..aio import cancel_and_wait, sleep_until_set
from ..config import Config
from ..errors import DeliveryFailure, StoreError, TemporaryFailure
from ..feedback.reports import ReportMaker
from ..store import SQLiteStore
from ..store.delivery import DueRecipient, Outcome
from ..store.pgconn import Listener
from ..types import EventType, RecipientStatus, Stream
from .deliver import Deliverer, Hold
from .leases import Leases
from .observe import observe
from .outbound import OutMessage, OutRecipient
from .outcomes import Outcomes
from .render import Job, Renderer
from .routes import Route, Router
from .tlsrpt import TlsReporter

log = logging.getLogger(__name__)

IDLE_POLL = 2.0
STOP_GRACE = 10.0  # seconds a stopping scheduler lets its sessions in flight finish


@dataclass
class _Job:
    destination: str
    recipients: list[DueRecipient]
    pool: str = ""  # the [[delivery.pools]] its mail leaves from ("": the default source)
    # queue id -> its Message-ID header, read when rendered, for the delivery log line
    message_ids: dict[str, str] = field(default_factory=dict)


class Scheduler:
    def __init__(self, config: Config, store: SQLiteStore, router: Router,
                 deliverer: Deliverer, reports: ReportMaker, renderer: Renderer, *,
                 tls_reporter: TlsReporter | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._delivery = config.delivery
        self._store = store
        self._router = router
        self._deliverer = deliverer
        self._reports = reports
        self._renderer = renderer
        self._clock = clock
        self._outcomes = Outcomes(config.delivery, clock)
        self._wake = asyncio.Event()
        self._jobs: set[asyncio.Task[None]] = set()
        self._leases = Leases(store, config.delivery.lease, clock)
        self._loop_task: asyncio.Task[None] | None = None
        self._listener: Listener | None = None
        self._tls_reporter = tls_reporter
        self._reporting: asyncio.Task[None] | None = None

    def notify(self) -> None:
        """New work was committed (or capacity freed): look at the queue now."""
        self._wake.set()

    @property
    def running(self) -> bool:
        """The loop that takes due work is alive (for `/readyz`)."""
        return self._loop_task is not None and not self._loop_task.done()

    async def start(self, *, recover: bool = True) -> None:
        """recover=False when another scheduler may still hold leases on this store (a
        reload's new worker while the old one finishes its sessions): those leases stand."""
        self._listener = await self._store.listen(self.notify)  # other nodes' submissions
        if recover:
            await self._store.recover()
            for message_id in await self._store.pending_reports():
                await self._emit_report(message_id)  # reports a crash left unsent
        await self._renderer.warm()
        self._loop_task = asyncio.create_task(self._run(), name="scheduler")
        self._leases.start()
        if self._tls_reporter is not None:
            self._reporting = asyncio.create_task(self._tls_reporter.run(), name="tls-rpt")

    async def stop(self, grace: float = STOP_GRACE) -> None:
        await cancel_and_wait(self._loop_task)
        self._loop_task = None
        if self._jobs:
            # Let sessions in flight finish; what is cut off stays leased and is retried.
            _, pending = await asyncio.wait(self._jobs, timeout=grace)
            await cancel_and_wait(*pending)
        await self._leases.stop()
        await cancel_and_wait(self._reporting)  # its last counts are flushed as it is cancelled
        self._reporting = None
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        await self._deliverer.close()
        await self._renderer.close()

    # -- the loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                timeout = await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive any one failure
                log.exception("scheduler step failed; retrying in a second")
                timeout = 1.0
            if timeout is not None and timeout <= 0:
                continue
            await sleep_until_set(self._wake, timeout)

    async def _step(self) -> float | None:
        """Lease and dispatch what is due; returns how long to sleep (None: until woken)."""
        self._wake.clear()
        free = self._delivery.concurrency - len(self._jobs)
        if free <= 0:
            return None  # a finishing job wakes us
        now = self._clock()
        due = await self._store.lease_due(
            now, free * self._delivery.messages_per_session, self._delivery.lease)
        if due:
            self._leases.taken((r.id for r in due), now)
            self._dispatch(due)
            return 0.0
        return await self._until_next_due()

    async def _until_next_due(self) -> float:
        try:
            nxt = await self._store.next_due_at()
        except StoreError:
            return 5.0
        # Polled at least every IDLE_POLL seconds: `relay queue retry` and friends run in
        # another process and change the queue without telling us.
        if nxt is None:
            return IDLE_POLL
        return min(IDLE_POLL, max(0.0, nxt - self._clock()))

    def _dispatch(self, due: list[DueRecipient]) -> None:
        by_destination: dict[tuple[str, str], list[DueRecipient]] = defaultdict(list)
        for r in due:
            by_destination[(self._router.destination(r.domain),
                            self._router.pool_name(r.pool, r.stream))].append(r)
        per_job = self._delivery.messages_per_session
        for (destination, pool), recipients in by_destination.items():
            by_message: dict[str, list[DueRecipient]] = defaultdict(list)
            for r in recipients:
                by_message[r.message_id].append(r)
            groups = list(by_message.values())
            for i in range(0, len(groups), per_job):
                job = _Job(destination, [r for g in groups[i:i + per_job] for r in g], pool)
                task = asyncio.create_task(self._run_job(job), name=f"deliver {destination}")
                self._jobs.add(task)
                task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._jobs.discard(task)
        self._wake.set()

    async def _run_job(self, job: _Job) -> None:
        records: list[asyncio.Task[set[str]]] = []
        recorded: set[int] = set()
        due = {r.id: r for r in job.recipients}  # for the log and metrics: address, queued at

        def record(outcomes: list[Outcome]) -> None:
            # Each message's outcomes are committed as soon as its transaction ends, so a
            # crash repeats at most the messages in flight, never a whole session's worth.
            recorded.update(o.recipient_id for o in outcomes)
            records.append(asyncio.create_task(self._record(outcomes, due, job.message_ids)))

        try:
            try:
                await self._deliver(job, record)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a stage crashed on this work: park it, never drop it
                log.exception("delivery to %s crashed", job.destination)
                record([self._outcomes.failed(r, exc) for r in job.recipients
                        if r.id not in recorded])
            # One report per message and run: with relay's own return path each recipient
            # has a transaction of its own, so a message's outcomes arrive in several
            # records, and a report made after the first would miss the ones still tried.
            for message_id in set().union(*await asyncio.gather(*records)):
                await self._emit_report(message_id)
        finally:  # recorded, or cut off and left to lapse: no more renewing
            self._leases.done(r.id for r in job.recipients)

    async def _record(self, outcomes: list[Outcome], due: dict[int, DueRecipient] | None = None,
                      message_ids: dict[str, str] | None = None) -> set[str]:
        """Commit outcomes, then log and count them; returns the messages that now owe their
        sender a report."""
        if not outcomes:
            return set()
        try:
            await self._store.record(outcomes)
        except StoreError:
            log.exception("could not record %d outcomes; their leases will expire and they "
                          "will be tried again", len(outcomes))
            return set()
        observe(outcomes, due or {}, message_ids or {})
        return {o.message_id for o in outcomes if o.dsn}

    async def _emit_report(self, message_id: str) -> None:
        try:
            if await self._store.emit_report(message_id, self._reports.make):
                self.notify()
        except StoreError:
            log.exception("could not queue the report on %s", message_id)

    # -- one destination ------------------------------------------------------------------

    async def _screen(self, job: _Job, record: Callable[[list[Outcome]], None]) -> _Job:
        """The suppression list again at send time (it may have grown since the mail was
        queued): a suppressed recipient is dropped, with an event and no SMTP attempt."""
        groups: dict[tuple[str, str], list[DueRecipient]] = defaultdict(list)
        for r in job.recipients:
            groups[(r.stream, r.sender_domain)].append(r)
        dropped: dict[int, str] = {}
        for (stream, sender_domain), members in groups.items():
            found = await self._store.suppressed([r.address for r in members],
                                                 stream=Stream(stream),
                                                 sender_domain=sender_domain)
            dropped.update({r.id: found[r.address] for r in members if r.address in found})
        if not dropped:
            return job
        now = self._clock()
        record([Outcome(recipient_id=r.id, message_id=r.message_id, at=now,
                        status=RecipientStatus.SUPPRESSED, event=EventType.DROPPED,
                        event_data={"email": r.address, "reason": dropped[r.id],
                                    "stage": "send"},
                        last_reply=f"suppressed: {dropped[r.id]}")
                for r in job.recipients if r.id in dropped])
        # by keyword: the job keeps its pool (given by place, message_ids took its place)
        return replace(job, recipients=[r for r in job.recipients if r.id not in dropped])

    async def _deliver(self, job: _Job, record: Callable[[list[Outcome]], None]) -> None:
        started = self._clock()
        try:
            job = await self._screen(job, record)
        except StoreError as exc:  # cannot tell who is suppressed: send nothing, try later
            failure = TemporaryFailure(f"the suppression list cannot be read: {exc}",
                                       code=451, enhanced="4.3.0")
            record([self._outcomes.of_failure(r, failure, started) for r in job.recipients])
            return
        if not job.recipients:
            return
        try:
            route = await self._router.route(job.destination, job.pool, len(job.recipients))
        except DeliveryFailure as failure:
            record([self._outcomes.of_failure(r, failure, started) for r in job.recipients])
            return
        if isinstance(route, Hold):
            record([self._outcomes.held(r, route.reason, route.until, route.kind)
                    for r in job.recipients])
            return
        if route.grant.count < len(job.recipients):  # the pool's caps: the rest tomorrow
            kept = _whole_messages(job.recipients, route.grant.count)
            record([self._outcomes.held(r, f"the warm-up caps of pool {job.pool} are spent "
                                           f"for today", route.grant.until, "warmup")
                    for r in job.recipients[len(kept):]])
            job = _Job(job.destination, kept, job.pool, job.message_ids)
        # this node's sessions to the site, then a slot of the cluster's (PostgreSQL: every
        # node's sessions to the site count; SQLite: the semaphore is the whole limit)
        site = route.site
        async with (self._router.shaper.connections(site),
                    self._store.slots.hold(site.key, site.max_connections)):
            # it may have waited long for the connection: send only what is still ours
            keep, lapse = self._leases.sendable(r.id for r in job.recipients)
            if lapse:
                log.warning("%d recipients to %s waited past their lease (it could not be "
                            "renewed); they are left to be picked again", len(lapse),
                            job.destination)
                kept = set(keep)
                job = replace(job, recipients=[r for r in job.recipients if r.id in kept])
            if job.recipients:
                await self._send(job, route, record, started)

    async def _send(self, job: _Job, route: Route, record: Callable[[list[Outcome]], None],
                    started: float) -> None:
        by_id = {r.id: r for r in job.recipients}
        messages = []
        signed: dict[str, str] = {}
        by_message: dict[str, list[DueRecipient]] = defaultdict(list)
        for r in job.recipients:
            by_message[r.message_id].append(r)
        found = await self._store.get_outgoing_many(list(by_message))
        # a message missing here was deleted under us; its lease lapses and nothing is lost
        todo: list[tuple[Job, list[DueRecipient]]] = []
        for message_id, recipients in by_message.items():
            if message_id not in found:
                continue
            first = recipients[0]
            mark = message_id if _verp(first) else ""
            if first.stream == Stream.BROADCAST.value or first.track:  # links per recipient
                todo += [(Job(found[message_id], r.smtputf8, r.id, r.stream, r.sender_domain,
                              r.track, mark), [r]) for r in recipients]
            else:
                todo.append((Job(found[message_id], first.smtputf8, stream=first.stream,
                                 sender_domain=first.sender_domain, message_id=mark),
                             recipients))
        try:
            rendered_all = await self._renderer.render_all([j for j, _ in todo])
        except DeliveryFailure as failure:  # e.g. the keys cannot be read yet: try later
            record([self._outcomes.of_failure(r, failure, started) for r in job.recipients])
            return
        for (_, recipients), rendered in zip(todo, rendered_all, strict=True):
            first = recipients[0]
            if isinstance(rendered, Exception):  # park this message, deliver the others
                log.error("rendering %s failed", first.message_id, exc_info=rendered)
                record([self._outcomes.failed(r, rendered) for r in recipients])
                continue
            signed[first.message_id] = rendered.signed
            job.message_ids[first.message_id] = rendered.message_id
            # relay's return path names one recipient, so each gets its own transaction (the
            # bytes are the same); the sender's own envelope sender keeps them together
            verp = _verp(first)
            for group in ([[r] for r in recipients] if verp else [recipients]):
                mail_from = first.mail_from
                if verp:
                    mail_from = self._renderer.envelope_sender(
                        group[0].id, first.sender_domain) or mail_from
                messages.append(OutMessage(
                    id=first.message_id, mail_from=mail_from, data=rendered.data,
                    smtputf8=rendered.smtputf8, dsn_ret=first.dsn_ret,
                    dsn_envid=first.dsn_envid,
                    recipients=tuple(OutRecipient(id=r.id, address=r.address, notify=r.notify,
                                                  orcpt=r.orcpt) for r in group)))
        await self._deliverer.deliver(route.targets, messages, lambda results: record(
            [self._outcomes.of_result(by_id[res.recipient_id], res, signed.get(res.message_id))
             for res in results if res.recipient_id in by_id]), lane=self._router.lane(route))


def _whole_messages(recipients: list[DueRecipient], count: int) -> list[DueRecipient]:
    """The first recipients, at least one and as near `count` as whole messages allow."""
    kept: list[DueRecipient] = []
    for r in recipients:
        if len(kept) >= count and r.message_id != kept[-1].message_id:
            break
        kept.append(r)
    return kept

def _verp(r: DueRecipient) -> bool:
    """Mail goes out with relay's return path unless it is a report (null sender) or its
    submitter chose the envelope sender."""
    return bool(r.mail_from) and not r.keep_mail_from
