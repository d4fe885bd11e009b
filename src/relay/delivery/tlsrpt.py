"""TLS-RPT (RFC 8460), the sending side: counts each outbound TLS session's outcome per
policy, and once a day sends each policy domain that asks for it (`_smtp._tls.<domain>`) the
aggregate report of its sessions: POSTed to https: URIs, queued as mail to mailto: ones."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from ..errors import TemporaryFailure, ValidationError
from ..feedback.webhooks import GuardedResolver, literal_refused
from ..store import SQLiteStore
from ..store.tlsreports import TlsCount
from ..submit import Submitter
from ..types import EnvelopeRecipient, Submission
from .outbound import Target
from .tlsrpt_report import (
    DAY,
    MAX_FAILURES,
    MAX_POLICIES,
    RecordError,
    Report,
    build_report,
    day_of,
    mailto_address,
    report_mail,
    rua_of,
)

log = logging.getLogger(__name__)

SEND_EVERY = 3600.0  # how often run() looks for reports due
FLUSH_EVERY = 60.0
MAX_PENDING = 10_000  # kinds of outcome held in memory before a flush is started
MAX_HELD = 50_000  # past this (the store failing), new kinds are dropped until a flush
DUE_BATCH = 200  # reports sent in one round; the rest wait for the next
KEEP_DAYS = 14  # counts and report rows are kept this long
DNS_RETRY_DAYS = 2  # a TXT lookup that fails for now is tried again while the day is younger
HTTP_TIMEOUT = 30.0
MAX_ERROR = 1000
CONTENT_TYPE = "application/tlsrpt+gzip"

_Key = tuple[str, str, str, str, str, str, str, str]


@dataclass(frozen=True, kw_only=True)
class Sent:
    """What became of one day's report to one policy domain."""

    day: str
    policy_domain: str
    report_id: str | None  # None: no report was made (no usable TLSRPT record)
    delivered: tuple[str, ...]  # the rua URIs it went to (a mailto: one: queued)
    error: str | None


class TlsReporter:
    """Session outcomes in, daily reports out. `submitter` is the reporting domain (the
    TLS-Report-Submitter header and the file name); `report_from` the From of mailed
    reports, which `queue` queues like any other mail."""

    def __init__(self, store: SQLiteStore, resolver: dns.asyncresolver.Resolver, *,
                 organization: str, contact: str, submitter: str = "",
                 report_from: str = "", queue: Submitter | None = None,
                 allow_private_targets: bool = False, ssl_context: ssl.SSLContext | None = None,
                 http_timeout: float = HTTP_TIMEOUT,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._resolver = resolver
        self._organization = organization
        self._contact = contact
        self._submitter = submitter or report_from.rpartition("@")[2] or organization
        self._report_from = report_from
        self._queue = queue
        self._allow_private = allow_private_targets
        self._ssl = ssl_context
        self._http_timeout = http_timeout
        self._clock = clock
        self._counts: dict[_Key, int] = {}
        self._lock = asyncio.Lock()
        self._flushing: asyncio.Task[None] | None = None
        self.dropped = 0  # sessions not counted: too many kinds held while the store failed

    # -- counting ------------------------------------------------------------------------

    def session(self, target: Target, failure: str | None, *, sending_ip: str | None,
                detail: str = "") -> None:
        """Count one session to `target`: `failure` is its RFC 8460 result type, None when
        its TLS policy held. `detail` is logged; the report carries only the counts."""
        policy = target.tls
        if not policy.policy_domain:
            return  # a smarthost or the like: no domain to report to
        key = (day_of(self._clock()), policy.policy_domain, policy.policy_type,
               "\n".join(policy.policy_string), target.hostname, failure or "",
               sending_ip or "", target.address)
        if key not in self._counts:
            if len(self._counts) >= MAX_HELD:
                self.dropped += 1
                return
            if len(self._counts) >= MAX_PENDING:
                self._start_flush()
        self._counts[key] = self._counts.get(key, 0) + 1
        if failure and detail:
            log.debug("TLS-RPT %s: %s to %s [%s]: %s", policy.policy_domain, failure,
                     target.hostname, target.address, detail)

    async def flush(self) -> None:
        """Add the sessions counted so far to the store's, in one transaction; on failure
        they are kept for the next flush."""
        async with self._lock:
            counts, self._counts = self._counts, {}
            rows = [TlsCount(day=k[0], policy_domain=k[1], policy_type=k[2], policy_string=k[3],
                             mx_host=k[4], result_type=k[5], sending_ip=k[6], receiving_ip=k[7],
                             sessions=n) for k, n in counts.items()]
            try:
                await self._store.add_tls_results(rows)
            except BaseException:
                for key, n in counts.items():
                    self._counts[key] = self._counts.get(key, 0) + n
                raise

    def _start_flush(self) -> None:
        if self._flushing is not None and not self._flushing.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flushing = loop.create_task(self.flush(), name="tlsrpt-flush")
        self._flushing.add_done_callback(_log_failure)

    # -- reporting -----------------------------------------------------------------------

    async def send_due(self) -> list[Sent]:
        """Send the report of each (day before today, policy domain) with sessions and no
        report yet: each is claimed in the store first, so it is sent once (by one node)."""
        now = self._clock()
        due = await self._store.tls_reports_due(day_of(now), DUE_BATCH)
        out: list[Sent] = []
        if due:
            async with self._http() as http:
                for day, domain in due:
                    sent = await self._send_one(http, day, domain, now)
                    if sent is not None:
                        out.append(sent)
        await self._store.forget_tls_before(day_of(now - KEEP_DAYS * DAY))
        return out

    async def run(self, interval: float = FLUSH_EVERY) -> None:
        """Flush every `interval` seconds and send the reports due once an hour, until
        cancelled (then a last flush). The first round sends what is due at once."""
        next_send = self._clock()
        try:
            while True:
                await asyncio.sleep(interval)
                try:
                    await self.flush()
                    if self._clock() >= next_send:
                        next_send = self._clock() + SEND_EVERY
                        await self.send_due()
                except Exception:
                    log.exception("TLS-RPT: a round failed; trying again")
        finally:
            with contextlib.suppress(Exception):
                await self.flush()

    async def _send_one(self, http: aiohttp.ClientSession, day: str, domain: str,
                        now: float) -> Sent | None:
        try:
            ruas = await self._rua(domain)
        except RecordError as exc:
            return await self._unsent(day, domain, str(exc))
        except TemporaryFailure as exc:
            if day >= day_of(now - DNS_RETRY_DAYS * DAY):
                log.info("TLS-RPT %s %s: %s; trying again later", domain, day, exc.text)
                return None
            return await self._unsent(day, domain, exc.text)
        if not await self._store.claim_tls_report(day, domain):
            return None
        delivered: list[str] = []
        errors: list[str] = []
        report_id = None
        try:
            report = build_report(organization=self._organization, contact=self._contact,
                                  submitter=self._submitter, day=day, policy_domain=domain,
                                  data=await self._store.tls_day(
                                      day, domain, max_policies=MAX_POLICIES,
                                      max_failures=MAX_FAILURES))
            report_id = report.report_id
            gz = report.gzipped()
            for uri in ruas:
                error = (await self._post(http, uri, gz) if uri.lower().startswith("https:")
                         else await self._mail(uri, report, gz))
                if error is None:
                    delivered.append(uri)
                else:
                    errors.append(error)
        except Exception as exc:  # the claim stays; the row says what went wrong
            log.exception("TLS-RPT %s %s: the report failed", domain, day)
            errors.append(f"{type(exc).__name__}: {exc}")
        error = "; ".join(errors)[:MAX_ERROR] or None
        await self._store.mark_tls_report(day, domain, sent_at=self._clock() if delivered
                                          else None, error=error)
        log.info("TLS-RPT %s %s: sent to %s%s", domain, day, ", ".join(delivered) or "nobody",
                 f" ({error})" if error else "")
        return Sent(day=day, policy_domain=domain, report_id=report_id,
                    delivered=tuple(delivered), error=error)

    async def _unsent(self, day: str, domain: str, reason: str) -> Sent | None:
        """No report for (day, domain), and the reason why recorded: never tried again."""
        if not await self._store.claim_tls_report(day, domain):
            return None
        await self._store.mark_tls_report(day, domain, sent_at=None, error=reason[:MAX_ERROR])
        return Sent(day=day, policy_domain=domain, report_id=None, delivered=(), error=reason)

    async def _rua(self, domain: str) -> tuple[str, ...]:
        """The rua URIs of the domain's TLSRPT record (RecordError: none to use;
        TemporaryFailure: DNS failed for now)."""
        try:
            name = dns.name.from_text(f"_smtp._tls.{domain}")
        except dns.exception.DNSException as exc:
            raise RecordError(f"_smtp._tls.{domain} is no DNS name: {exc}") from None
        try:
            answer = await self._resolver.resolve(name, "TXT", search=False,
                                                  raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise RecordError(f"no TXT record at {name}") from None
        except dns.exception.DNSException as exc:
            raise TemporaryFailure(f"the TXT lookup of {name} failed: {exc}") from None
        return rua_of([b"".join(rd.strings) for rd in answer.rrset or ()])

    def _http(self) -> aiohttp.ClientSession:
        """POSTs connect only to public addresses (as webhooks do), unless allowed."""
        resolver = None if self._allow_private else GuardedResolver()
        connector = aiohttp.TCPConnector(resolver=resolver, limit=4,
                                         ssl=self._ssl if self._ssl is not None else True)
        return aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self._http_timeout),
            headers={"User-Agent": "relay-tlsrpt"})

    async def _post(self, http: aiohttp.ClientSession, url: str, gz: bytes) -> str | None:
        """None when the rua took the report (2xx), else what went wrong."""
        if literal_refused(url, self._allow_private):
            return f"{url}: a private address"
        try:
            async with http.post(url, data=gz, headers={"Content-Type": CONTENT_TYPE},
                                 allow_redirects=False) as response:
                if 200 <= response.status < 300:
                    return None
                return f"{url}: HTTP {response.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return f"{url}: {str(exc) or type(exc).__name__}"

    async def _mail(self, uri: str, report: Report, gz: bytes) -> str | None:
        """Queue the report as mail to a mailto: rua; None once it is queued."""
        if self._queue is None or not self._report_from:
            return f"{uri}: no sender for mailed reports"
        to = mailto_address(uri)
        if "@" not in to or any(c <= " " or c == "\x7f" for c in to):
            return f"{uri}: not a mail address"
        data = report_mail(report, gz, sender=self._report_from, to=to,
                           organization=self._organization)
        try:
            await self._queue.submit(Submission(
                mail_from=self._report_from, recipients=(EnvelopeRecipient(address=to),),
                data=data, source="tlsrpt"))
        except ValidationError as exc:
            return f"{uri}: {exc}"
        return None


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("TLS-RPT: a flush failed; the counts are kept", exc_info=task.exception())
