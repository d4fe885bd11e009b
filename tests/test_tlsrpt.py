"""TLS-RPT (RFC 8460), the sending side: sessions counted into the store (both backends),
the `_smtp._tls` record read from a real DNS server, reports POSTed over real HTTPS to an
aiohttp server on loopback or queued as mail, each (day, domain) sent once."""

from __future__ import annotations

import asyncio
import calendar
import email
import email.policy
import gzip
import json
import ssl
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from relay import metrics
from relay.config import DnsConfig
from relay.delivery import tlsrpt, tlsrpt_report
from relay.delivery.mx import make_resolver
from relay.delivery.outbound import Target, TlsPolicy
from relay.delivery.tlsrpt import Sent, TlsReporter
from relay.delivery.tlsrpt_report import (
    MAX_RUA,
    RecordError,
    build_report,
    mailto_address,
    rua_of,
)
from relay.store import SQLiteStore
from relay.store.tlsreports import TlsCount, TlsDay, TlsPolicyTotal
from relay.submit import Submitter

from .conftest import free_port, make_config
from .dnsserver import DNSServer

DAY1 = "2026-03-10"
NOON1 = calendar.timegm((2026, 3, 10, 12, 0, 0)) + 0.0
NOON2 = NOON1 + 86400
STS_LINES = ("version: STSv1", "mode: enforce", "mx: *.a.test", "max_age: 86400")
STS = TlsPolicy(level="verify", source="mta-sts", policy_domain="a.test", policy_type="sts",
                policy_string=STS_LINES)
TLSA = TlsPolicy(level="dane", source="dane", policy_domain="a.test", policy_type="tlsa",
                 policy_string=("3 1 1 aabbcc",))
MX1 = Target(hostname="mx1.a.test", address="192.0.2.10", port=25, tls=STS)
MX2 = Target(hostname="mx2.a.test", address="192.0.2.20", port=25, tls=TLSA)
ME = "198.51.100.7"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Collector:
    """An HTTPS server on 127.0.0.1 that takes reports; answers from `answers`, then 200."""

    def __init__(self, tls: ssl.SSLContext) -> None:
        self.port = free_port()
        self.tls = tls
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        self.answers: list[int] = []
        self._runner: web.AppRunner | None = None
        self.arrived = asyncio.Event()

    def url(self, path: str = "/tlsrpt") -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    async def _take(self, request: web.Request) -> web.Response:
        self.got.append((request.path, dict(request.headers), await request.read()))
        self.arrived.set()
        return web.Response(status=self.answers.pop(0) if self.answers else 200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._take)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.tls).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def collector(ca: trustme.CA) -> AsyncIterator[Collector]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    c = Collector(ctx)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(store_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def reporter(store: SQLiteStore, dns: DNSServer, clock: Clock, ca: trustme.CA | None = None,
             **kw: Any) -> TlsReporter:
    trust = ssl.create_default_context()
    if ca is not None:
        ca.configure_trust(trust)
    kw.setdefault("allow_private_targets", True)
    return TlsReporter(store, make_resolver(DnsConfig(nameservers=(dns.nameserver,),
                                                      timeout=2.0)),
                       organization="Relay Test", contact="mailto:postmaster@relay.test",
                       submitter="relay.test", clock=clock, ssl_context=trust, **kw)


def txt(dns: DNSServer, domain: str, record: str) -> None:
    dns.add(f"_smtp._tls.{domain}", "TXT", json.dumps(record))


def count_day1(r: TlsReporter) -> None:
    for _ in range(3):
        r.session(MX1, None, sending_ip=ME)
    for _ in range(2):
        r.session(MX1, "certificate-expired", sending_ip=ME, detail="expired 2026-01-01")
    r.session(MX1, "starttls-not-supported", sending_ip=ME)
    r.session(MX2, None, sending_ip=ME)
    r.session(MX2, "tlsa-invalid", sending_ip=ME)


def by_type(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["policy"]["policy-type"]: p for p in report["policies"]}


# -- counting ---------------------------------------------------------------------------------


async def test_counts_of_two_flushes_add_up(store: SQLiteStore, dns: DNSServer) -> None:
    clock = Clock(NOON1)
    r = reporter(store, dns, clock)
    count_day1(r)
    await r.flush()
    count_day1(r)
    r.session(Target(hostname="smarthost", address="192.0.2.1", port=25), None, sending_ip=ME)
    await r.flush()
    await r.flush()  # nothing new: nothing added
    day = await store.tls_day(DAY1, "a.test", max_policies=100, max_failures=100)
    totals = {(t.policy_type, t.mx_host): (t.successes, t.failures) for t in day.totals}
    assert totals == {("sts", "mx1.a.test"): (6, 6), ("tlsa", "mx2.a.test"): (2, 2)}
    failures = {(f.result_type, f.sending_ip, f.receiving_ip): f.sessions for f in day.failures}
    assert failures == {("certificate-expired", ME, "192.0.2.10"): 4,
                        ("starttls-not-supported", ME, "192.0.2.10"): 2,
                        ("tlsa-invalid", ME, "192.0.2.20"): 2}
    assert day.failures[0].policy_string == "\n".join(STS_LINES)
    # no policy domain (a smarthost): nothing to report to, nothing counted
    assert await store.tls_reports_due("2026-03-11", 10) == [(DAY1, "a.test")]


async def test_memory_is_bounded(store: SQLiteStore, dns: DNSServer,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_PENDING kinds of outcome a flush starts; past MAX_HELD new kinds are dropped."""
    monkeypatch.setattr(tlsrpt, "MAX_PENDING", 2)
    monkeypatch.setattr(tlsrpt, "MAX_HELD", 3)
    r = reporter(store, dns, Clock(NOON1))
    for i in range(5):
        r.session(MX1, None, sending_ip=f"198.51.100.{i}")
    r.session(MX1, None, sending_ip="198.51.100.0")  # a kind held already: still counted
    assert r.dropped == 2
    await r.flush()
    day = await store.tls_day(DAY1, "a.test", max_policies=10, max_failures=10)
    assert [(t.successes, t.failures) for t in day.totals] == [(4, 0)]


async def test_sessions_of_today_are_not_reported(store: SQLiteStore, dns: DNSServer,
                                                  collector: Collector, ca: trustme.CA) -> None:
    txt(dns, "a.test", f"v=TLSRPTv1; rua={collector.url()}")
    r = reporter(store, dns, Clock(NOON1), ca)
    count_day1(r)
    await r.flush()
    assert await r.send_due() == []
    assert collector.got == []
    assert await store.tls_report(DAY1, "a.test") is None


# -- sending ----------------------------------------------------------------------------------


async def test_report_is_posted_once(store: SQLiteStore, dns: DNSServer, collector: Collector,
                                     ca: trustme.CA) -> None:
    txt(dns, "a.test", f"v=TLSRPTv1;rua={collector.url()}")
    clock = Clock(NOON1)
    r = reporter(store, dns, clock, ca)
    count_day1(r)
    await r.flush()
    clock.now = NOON2
    sent = await r.send_due()
    report_id = f"{DAY1}T00:00:00Z_a.test@relay.test"
    assert sent == [Sent(day=DAY1, policy_domain="a.test", report_id=report_id,
                         delivered=(collector.url(),), error=None)]
    [(path, headers, body)] = collector.got
    assert path == "/tlsrpt"
    assert headers["Content-Type"] == "application/tlsrpt+gzip"
    report = json.loads(gzip.decompress(body))
    assert report["organization-name"] == "Relay Test"
    assert report["contact-info"] == "mailto:postmaster@relay.test"
    assert report["report-id"] == report_id
    assert report["date-range"] == {"start-datetime": "2026-03-10T00:00:00Z",
                                    "end-datetime": "2026-03-10T23:59:59Z"}
    policies = by_type(report)
    assert policies["sts"]["policy"] == {"policy-type": "sts", "policy-string": list(STS_LINES),
                                         "policy-domain": "a.test", "mx-host": ["*.a.test"]}
    assert policies["sts"]["summary"] == {"total-successful-session-count": 3,
                                          "total-failure-session-count": 3}
    assert policies["sts"]["failure-details"] == [
        {"result-type": "certificate-expired", "sending-mta-ip": ME,
         "receiving-mx-hostname": "mx1.a.test", "receiving-ip": "192.0.2.10",
         "failed-session-count": 2},
        {"result-type": "starttls-not-supported", "sending-mta-ip": ME,
         "receiving-mx-hostname": "mx1.a.test", "receiving-ip": "192.0.2.10",
         "failed-session-count": 1}]
    assert policies["tlsa"]["policy"]["mx-host"] == ["mx2.a.test"]
    assert policies["tlsa"]["policy"]["policy-string"] == ["3 1 1 aabbcc"]
    assert policies["tlsa"]["summary"] == {"total-successful-session-count": 1,
                                           "total-failure-session-count": 1}
    sent_at, error = await store.tls_report(DAY1, "a.test") or (None, "no row")
    assert sent_at == NOON2 and error is None
    # the next round, and the next day's: nothing sent again
    assert await r.send_due() == []
    clock.now += 86400
    assert await r.send_due() == []
    assert len(collector.got) == 1


async def test_report_is_mailed_to_a_mailto_rua(store: SQLiteStore, dns: DNSServer,
                                                collector: Collector, ca: trustme.CA,
                                                tmp_path: Path) -> None:
    collector.answers = [500]
    txt(dns, "a.test", f"v=TLSRPTv1; rua=mailto:tls%2Dreports@b.test , {collector.url('/x')}")
    clock = Clock(NOON1)
    queue = Submitter(make_config(tmp_path), store, clock=clock)
    r = reporter(store, dns, clock, ca, report_from="tlsrpt@relay.test", queue=queue)
    count_day1(r)
    await r.flush()
    clock.now = NOON2
    before = _accepted_tlsrpt()
    [sent] = await r.send_due()
    assert _accepted_tlsrpt() == before + 1  # counted as its own source, not "other"
    assert sent.delivered == ("mailto:tls%2Dreports@b.test",)
    assert sent.error == f"{collector.url('/x')}: HTTP 500"
    sent_at, error = await store.tls_report(DAY1, "a.test") or (None, None)
    assert sent_at == NOON2 and error == sent.error  # sent, to one rua of two
    [detail] = (await store.list_messages()).items
    assert [x.address for x in detail.recipients] == ["tls-reports@b.test"]
    assert detail.message.mail_from == "tlsrpt@relay.test"
    body = await store.get_body(detail.message.id)
    assert body is not None
    msg = email.message_from_bytes(body, _class=EmailMessage, policy=email.policy.default)
    assert msg["From"] == "tlsrpt@relay.test" and msg["To"] == "tls-reports@b.test"
    assert msg["TLS-Report-Domain"] == "a.test"
    assert msg["TLS-Report-Submitter"] == "relay.test"
    assert msg["Subject"] == (f"Report Domain: a.test Submitter: relay.test "
                              f"Report-ID: <{sent.report_id}>")
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    [text, attached] = msg.iter_parts()
    assert text.get_content_type() == "text/plain"
    start = calendar.timegm((2026, 3, 10, 0, 0, 0))
    assert attached.get_content_type() == "application/tlsrpt+gzip"
    assert attached.get_filename() == f"relay.test!a.test!{start}!{start + 86400}.json.gz"
    report = json.loads(gzip.decompress(attached.get_payload(decode=True)))
    assert report["report-id"] == sent.report_id
    assert by_type(report)["sts"]["summary"]["total-failure-session-count"] == 3
    assert await r.send_due() == []
    assert len((await store.list_messages()).items) == 1


async def test_without_a_record_nothing_is_sent_and_the_reason_kept(
        store: SQLiteStore, dns: DNSServer) -> None:
    dns.add("_smtp._tls.c.test", "TXT", '"v=spf1 -all"')  # a TXT, but no TLSRPT one
    clock = Clock(NOON1)
    r = reporter(store, dns, clock)
    r.session(MX1, None, sending_ip=ME)
    r.session(Target(hostname="mx.c.test", address="192.0.2.30", port=25,
                     tls=TlsPolicy(policy_domain="c.test")), None, sending_ip=None)
    await r.flush()
    clock.now = NOON2
    sent = {s.policy_domain: s for s in await r.send_due()}
    assert sent["a.test"].error == "no TXT record at _smtp._tls.a.test."
    assert sent["c.test"].error == "no TLSRPT record"
    assert sent["c.test"].report_id is None and sent["c.test"].delivered == ()
    assert await store.tls_report(DAY1, "a.test") == (None, "no TXT record at _smtp._tls.a.test.")
    assert await store.tls_report(DAY1, "c.test") == (None, "no TLSRPT record")
    txt(dns, "a.test", "v=TLSRPTv1; rua=mailto:x@a.test")  # published too late for that day
    assert await r.send_due() == []


async def test_a_dns_failure_is_tried_again(store: SQLiteStore, dns: DNSServer,
                                            collector: Collector, ca: trustme.CA) -> None:
    dns.servfail("_smtp._tls.a.test")
    clock = Clock(NOON1)
    r = reporter(store, dns, clock, ca)
    r.session(MX1, None, sending_ip=ME)
    await r.flush()
    clock.now = NOON2
    assert await r.send_due() == []
    assert await store.tls_report(DAY1, "a.test") is None
    dns.clear()
    txt(dns, "a.test", f"v=TLSRPTv1; rua={collector.url()}")
    [sent] = await r.send_due()
    assert sent.delivered == (collector.url(),)


async def test_a_private_target_is_refused(store: SQLiteStore, dns: DNSServer,
                                           collector: Collector, ca: trustme.CA) -> None:
    txt(dns, "a.test", f"v=TLSRPTv1; rua={collector.url()}")
    clock = Clock(NOON1)
    r = reporter(store, dns, clock, ca, allow_private_targets=False)
    r.session(MX1, None, sending_ip=ME)
    await r.flush()
    clock.now = NOON2
    [sent] = await r.send_due()
    assert sent.delivered == () and sent.error == f"{collector.url()}: a private address"
    assert collector.got == []
    assert await store.tls_report(DAY1, "a.test") == (None, sent.error)


async def test_run_flushes_and_sends(store: SQLiteStore, dns: DNSServer, collector: Collector,
                                     ca: trustme.CA) -> None:
    txt(dns, "a.test", f"v=TLSRPTv1; rua={collector.url()}")
    clock = Clock(NOON1)
    r = reporter(store, dns, clock, ca)
    count_day1(r)
    clock.now = NOON2  # the sessions were counted yesterday: due at the first round
    task = asyncio.create_task(r.run(0.01))
    try:
        await asyncio.wait_for(collector.arrived.wait(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    report = json.loads(gzip.decompress(collector.got[0][2]))
    assert by_type(report)["sts"]["summary"]["total-successful-session-count"] == 3


# -- the record -------------------------------------------------------------------------------


def test_the_record_is_read_as_rfc_8460_says() -> None:
    uris = rua_of([b"v=spf1 -all",
                   b"v=TLSRPTv1 ;rua=mailto:a@b.test, https://r.test/x,ftp://no.test ;ext=1;"])
    assert uris == ("mailto:a@b.test", "https://r.test/x")
    many = ",".join(f"mailto:r{i}@b.test" for i in range(30)).encode()
    assert len(rua_of([b"v=TLSRPTv1; rua=" + many])) == MAX_RUA
    for records, why in (
            ([b"v=TLSRPTv1; rua=mailto:a@b.test", b"v=TLSRPTv1; rua=mailto:c@b.test"],
             "2 TLSRPT records"),
            ([b"v=TLSRPTv10; rua=mailto:a@b.test"], "no TLSRPT record"),
            ([b"v=TLSRPTv1; ruf=mailto:a@b.test"], "no rua"),
            ([b"v=TLSRPTv1; rua=http://r.test/"], "no mailto: or https:"),
            ([b"v=TLSRPTv1; rua=mailto:a@b.test;" + b"x" * 3000], "over 2048 octets")):
        with pytest.raises(RecordError, match=why):
            rua_of(records)
    assert mailto_address("mailto:tls%2Creports@b.test?subject=x") == "tls,reports@b.test"


def test_a_large_report_keeps_its_largest_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_REPORT gzipped octets the smallest failure details go; the totals stay."""
    failures = tuple(TlsCount(day=DAY1, policy_domain="a.test", policy_type="sts",
                              policy_string="\n".join(STS_LINES), mx_host="mx1.a.test",
                              result_type="certificate-expired", sending_ip=f"198.51.100.{i}",
                              receiving_ip=f"192.0.2.{i}", sessions=i + 1) for i in range(200))
    data = TlsDay(totals=(TlsPolicyTotal(policy_type="sts", policy_string="\n".join(STS_LINES),
                                         mx_host="mx1.a.test", successes=7,
                                         failures=sum(f.sessions for f in failures)),),
                  failures=failures)
    report = build_report(organization="Org", contact="c", submitter="relay.test", day=DAY1,
                          policy_domain="a.test", data=data)
    whole = json.loads(gzip.decompress(report.gzipped()))
    assert len(whole["policies"][0]["failure-details"]) == 200
    monkeypatch.setattr(tlsrpt_report, "MAX_REPORT", 1500)
    gz = report.gzipped()
    assert len(gz) <= 1500
    [policy] = json.loads(gzip.decompress(gz))["policies"]
    counts = [d["failed-session-count"] for d in policy["failure-details"]]
    assert 0 < len(counts) < 200 and min(counts) == 200 - len(counts) + 1
    assert policy["summary"] == {"total-successful-session-count": 7,
                                 "total-failure-session-count": 200 * 201 // 2}


def _accepted_tlsrpt() -> float:
    return sum(sample[2] for family in metrics.snapshot() for sample in family[3]
               if sample[0] == "relay_messages_accepted_total"
               and sample[1].get("source") == "tlsrpt")
