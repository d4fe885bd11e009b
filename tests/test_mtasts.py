"""MTA-STS: policy and TXT parsing, and lookups against real parts — the test DNS server, an
HTTPS policy host on loopback with a trustme certificate, a SQLite store on disk."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trustme
from dns.asyncresolver import Resolver

from relay.config import DnsConfig
from relay.delivery.httpdns import DnsResolver
from relay.delivery.mtasts import (
    FETCH_ERROR,
    MAX_POLICY_SIZE,
    POLICY_INVALID,
    RETRY_FAILED_FETCH,
    WEBPKI_INVALID,
    MtaSts,
    StsPolicy,
    parse_policy,
    parse_txt,
)
from relay.delivery.mx import make_resolver
from relay.store import SQLiteStore
from relay.store.mtasts import CachedStsPolicy

from .dnsserver import DNSServer
from .policyhost import PolicyHost

DOMAIN = "example.test"
POLICY = ("version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\n"
          "mx: *.mail.example.test\r\nmax_age: 86400\r\n")
T0 = 1_800_000_000.0


# parsing


def test_policy_fields_are_parsed() -> None:
    policy = parse_policy(POLICY, policy_id="abc")
    assert policy == StsPolicy(id="abc", mode="enforce",
                               mx=("mx1.example.test", "*.mail.example.test"), max_age=86400,
                               text=POLICY)
    assert policy.policy_string == ("version: STSv1", "mode: enforce", "mx: mx1.example.test",
                                    "mx: *.mail.example.test", "max_age: 86400")


def test_policy_with_lf_unknown_keys_and_repeats() -> None:
    policy = parse_policy("version: STSv1\nmode: testing\nfoo_bar: anything at all\n"
                          "mode: enforce\nmx: MX.Example.Test.\nmax_age:0")
    assert (policy.mode, policy.mx, policy.max_age) == ("testing", ("mx.example.test",), 0)


def test_policy_in_mode_none_needs_no_mx() -> None:
    policy = parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n")
    assert policy.mode == "none" and policy.mx == ()


@pytest.mark.parametrize(("text", "reason"), [
    ("mode: enforce\nmx: a.test\nmax_age: 1\n", "no version field"),
    ("version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n", "not 'STSv1'"),
    ("version: STSv1\nmx: a.test\nmax_age: 1\n", "no mode field"),
    ("version: STSv1\nmode: Enforce\nmx: a.test\nmax_age: 1\n", "not enforce, testing or none"),
    ("version: STSv1\nmode: enforce\nmx: a.test\n", "no max_age field"),
    ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n", "not a whole number"),
    ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1 day\n", "not a whole number"),
    ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n", "over the limit"),
    ("version: STSv1\nmode: testing\nmax_age: 1\n", "needs at least one mx"),
    ("version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1\n", "not a host name"),
    ("version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 1\n", "not a host name"),
    ("version: STSv1\n<html>\n", "line 2 is not a 'key: value' field"),
    ("version: STSv1\nmode: none\nmax_age: 1\n" + "x: y\n" * (MAX_POLICY_SIZE // 5),
     "larger than 65536 bytes"),
])
def test_policy_errors_say_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("*", r"\*")):
        parse_policy(text)


def test_max_age_limit_itself_is_allowed() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 31557600").max_age == 31557600


@pytest.mark.parametrize(("host", "matches"), [
    ("mx1.example.test", True),
    ("MX1.Example.TEST.", True),
    ("mx2.example.test", False),
    ("a.mail.example.test", True),
    ("A.MAIL.example.test.", True),
    ("mail.example.test", False),  # the wildcard stands for exactly one label
    ("a.b.mail.example.test", False),
    ("xmail.example.test", False),
])
def test_mx_patterns(host: str, matches: bool) -> None:
    assert parse_policy(POLICY).matches(host) is matches


@pytest.mark.parametrize(("records", "policy_id"), [
    (["v=STSv1; id=20240101T000000"], "20240101T000000"),
    (["v=STSv1;id=abc;"], "abc"),
    (["v=STSv1; id=abc; ext=whatever"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=abc"], "abc"),  # other TXT records do not count
    (["v=STSv1; id=abc", "v=STSv1; id=def"], None),  # several: no policy (RFC 8461 §3.1)
    (["v=STSv1"], None),
    (["v=STSv1; id="], None),
    (["v=STSv1; id=" + "a" * 33], None),
    (["v=STSv1; id=a-b"], None),
    (["id=abc; v=STSv1"], None),  # the version comes first
    (["v=STSv10; id=abc"], None),
    ([], None),
])
def test_txt_records(records: list[str], policy_id: str | None) -> None:
    assert parse_txt(records) == policy_id


# lookups against real servers


def server_tls(ca: trustme.CA, name: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(ctx)
    return ctx


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(tmp_path: Path, ca: trustme.CA) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def host(ca: trustme.CA) -> AsyncIterator[PolicyHost]:
    policy_host = PolicyHost(body=POLICY)
    await policy_host.start(server_tls(ca, f"mta-sts.{DOMAIN}"))
    yield policy_host
    await policy_host.stop()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "q.sqlite")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def resolver(dns: DNSServer) -> Resolver:
    dns.add(f"mta-sts.{DOMAIN}", "A", "127.0.0.1")
    return make_resolver(DnsConfig(nameservers=(dns.nameserver,), timeout=2.0))


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


Make = Callable[..., MtaSts]


@pytest.fixture
def make(resolver: Resolver, store: SQLiteStore, host: PolicyHost, ca_file: str,
         clock: Clock) -> Make:
    """An MtaSts on the test's DNS, store and policy host; keywords override."""
    def new(*, port: int = host.port, ca_file: str = ca_file, timeout: float = 5.0) -> MtaSts:
        return MtaSts(resolver, store, port=port, ca_file=ca_file, timeout=timeout, clock=clock)
    return new


def txt(dns: DNSServer, policy_id: str) -> None:
    dns.add(f"_mta-sts.{DOMAIN}", "TXT", f'"v=STSv1; id={policy_id}"')


def retxt(dns: DNSServer, policy_id: str) -> None:
    """Replaces the TXT record, keeping the policy host's address."""
    dns.clear()
    dns.add(f"mta-sts.{DOMAIN}", "A", "127.0.0.1")
    txt(dns, policy_id)


async def test_policy_is_fetched_then_cached(dns: DNSServer, host: PolicyHost, make: Make,
                                             store: SQLiteStore) -> None:
    txt(dns, "one")
    sts = make()
    first = await sts.policy(DOMAIN)
    assert first.failure is None, first.detail
    assert first.policy is not None and first.policy.id == "one"
    assert first.policy.mode == "enforce" and first.policy.matches("mx1.example.test")
    assert host.hits == 1
    assert ("mta-sts.example.test", "A") in dns.queries  # the host name went to our DNS
    assert (await sts.policy(DOMAIN + ".")).policy == first.policy
    assert host.hits == 1
    stored = await store.mta_sts_policy(DOMAIN)
    assert stored == CachedStsPolicy(domain=DOMAIN, id="one", mode="enforce",
                                     mx=("mx1.example.test", "*.mail.example.test"),
                                     max_age=86400, fetched_at=T0, policy=POLICY)


async def test_concurrent_lookups_fetch_once(dns: DNSServer, host: PolicyHost, make: Make) -> None:
    txt(dns, "one")
    sts = make()
    found = await asyncio.gather(*(sts.policy(DOMAIN) for _ in range(10)))
    assert all(f.policy is not None and f.policy.id == "one" for f in found)
    assert host.hits == 1


async def test_new_id_is_fetched_again(dns: DNSServer, host: PolicyHost, make: Make) -> None:
    txt(dns, "one")
    sts = make()
    await sts.policy(DOMAIN)
    host.body = POLICY.replace("mode: enforce", "mode: testing")
    retxt(dns, "two")
    found = await sts.policy(DOMAIN)
    assert found.policy is not None and (found.policy.id, found.policy.mode) == ("two", "testing")
    assert host.hits == 2


async def test_expired_policy_is_fetched_again(dns: DNSServer, host: PolicyHost, make: Make,
                                               clock: Clock) -> None:
    txt(dns, "one")
    sts = make()
    await sts.policy(DOMAIN)
    clock.now += 86399
    await sts.policy(DOMAIN)
    assert host.hits == 1
    clock.now += 1
    await sts.policy(DOMAIN)
    assert host.hits == 2


async def test_restart_reads_the_store(dns: DNSServer, host: PolicyHost, make: Make) -> None:
    txt(dns, "one")
    await make().policy(DOMAIN)
    found = await make().policy(DOMAIN)  # a new MtaSts: nothing in memory
    assert found.policy is not None and found.policy.text == POLICY
    assert found.policy.policy_string[0] == "version: STSv1"
    assert host.hits == 1


async def test_another_nodes_fetch_is_used(dns: DNSServer, host: PolicyHost, make: Make) -> None:
    txt(dns, "one")
    this, other = make(), make()
    await this.policy(DOMAIN)
    retxt(dns, "two")
    await other.policy(DOMAIN)
    found = await this.policy(DOMAIN)  # its memory has "one": it reads "two" from the store
    assert found.policy is not None and found.policy.id == "two"
    assert host.hits == 2


async def test_no_txt_record_is_no_policy(make: Make) -> None:
    found = await make().policy(DOMAIN)
    assert found.policy is None and found.failure is None
    assert "_mta-sts.example.test does not exist" in found.detail


async def test_cached_policy_holds_when_the_txt_record_goes(dns: DNSServer, host: PolicyHost,
                                                            make: Make) -> None:
    txt(dns, "one")
    await make().policy(DOMAIN)
    dns.clear()
    dns.add(f"mta-sts.{DOMAIN}", "A", "127.0.0.1")
    found = await make().policy(DOMAIN)
    assert found.policy is not None and found.policy.id == "one"
    assert found.failure is None and "cached policy" in found.detail


async def test_cached_policy_holds_when_dns_fails(dns: DNSServer, host: PolicyHost,
                                                  make: Make) -> None:
    txt(dns, "one")
    sts = make()
    await sts.policy(DOMAIN)
    dns.servfail(f"_mta-sts.{DOMAIN}")
    found = await sts.policy(DOMAIN)
    assert found.policy is not None and found.policy.id == "one"
    assert "TXT lookup of _mta-sts.example.test failed" in found.detail
    assert host.hits == 1


async def test_failed_fetch_falls_back_to_the_cached_policy(dns: DNSServer, host: PolicyHost,
                                                            make: Make) -> None:
    txt(dns, "one")
    sts = make()
    await sts.policy(DOMAIN)
    retxt(dns, "two")
    host.status = 500
    found = await sts.policy(DOMAIN)
    assert found.policy is not None and found.policy.id == "one"
    assert found.failure is None and "HTTP 500" in found.detail
    assert host.hits == 2


async def test_failed_fetch_waits_before_trying_again(dns: DNSServer, host: PolicyHost, make: Make,
                                                      clock: Clock) -> None:
    txt(dns, "one")
    host.status = 404
    sts = make()
    assert (await sts.policy(DOMAIN)).failure == FETCH_ERROR
    assert (await sts.policy(DOMAIN)).failure == FETCH_ERROR
    assert host.hits == 1
    host.status = 200
    clock.now += RETRY_FAILED_FETCH
    found = await sts.policy(DOMAIN)
    assert found.failure is None and found.policy is not None
    assert host.hits == 2


async def test_redirect_is_not_followed(dns: DNSServer, host: PolicyHost, make: Make) -> None:
    txt(dns, "one")
    host.location = f"https://mta-sts.{DOMAIN}:{host.port}/elsewhere.txt"
    found = await make().policy(DOMAIN)
    assert found == type(found)(None, FETCH_ERROR, found.detail)
    assert "redirects to" in found.detail and "not followed" in found.detail
    assert host.hits == 1


async def test_content_type_must_be_text_plain(dns: DNSServer, host: PolicyHost,
                                                make: Make) -> None:
    txt(dns, "one")
    host.content_type = "text/html"
    found = await make().policy(DOMAIN)
    assert found.policy is None and found.failure == POLICY_INVALID
    assert "text/html, not text/plain" in found.detail


async def test_invalid_policy(dns: DNSServer, host: PolicyHost, make: Make) -> None:
    txt(dns, "one")
    host.body = POLICY.replace("STSv1", "STSv2")
    found = await make().policy(DOMAIN)
    assert found.policy is None and found.failure == POLICY_INVALID
    assert "not 'STSv1'" in found.detail


async def test_oversized_policy(dns: DNSServer, host: PolicyHost, make: Make) -> None:
    txt(dns, "one")
    host.body = POLICY + "# padding\n" * (MAX_POLICY_SIZE // 10 + 1)
    found = await make().policy(DOMAIN)
    assert found.policy is None and found.failure == POLICY_INVALID
    assert f"over {MAX_POLICY_SIZE} bytes" in found.detail


async def test_certificate_for_another_name(dns: DNSServer, ca: trustme.CA, make: Make) -> None:
    txt(dns, "one")
    other = PolicyHost()
    await other.start(server_tls(ca, "mta-sts.other.test"))
    try:
        found = await make(port=other.port).policy(DOMAIN)
    finally:
        assert other.runner is not None
        await other.runner.cleanup()
    assert found.policy is None and found.failure == WEBPKI_INVALID
    assert "mta-sts.example.test" in found.detail and other.hits == 0


async def test_certificate_of_an_unknown_ca(dns: DNSServer, host: PolicyHost, make: Make) -> None:
    txt(dns, "one")
    found = await make(ca_file="").policy(DOMAIN)  # the system CAs do not know trustme's
    assert found.policy is None and found.failure == WEBPKI_INVALID
    assert host.hits == 0


async def test_unresolvable_policy_host(dns: DNSServer, make: Make) -> None:
    dns.clear()
    txt(dns, "one")
    found = await make().policy(DOMAIN)
    assert found.policy is None and found.failure == FETCH_ERROR
    assert "mta-sts.example.test has no address" in found.detail


async def test_slow_policy_host_times_out(dns: DNSServer, make: Make) -> None:
    txt(dns, "one")
    stalled: list[asyncio.StreamWriter] = []

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stalled.append(writer)  # accepts, never answers the TLS handshake

    server = await asyncio.start_server(stall, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        found = await asyncio.wait_for(make(port=port, timeout=0.5).policy(DOMAIN), 5)
    finally:
        for writer in stalled:
            writer.close()
        server.close()
        await server.wait_closed()
    assert found.policy is None and found.failure == FETCH_ERROR
    assert "took over 0.5 s" in found.detail


async def test_dns_resolver_for_aiohttp(dns: DNSServer,
                                        resolver: Resolver) -> None:
    dns.add("h.example.test", "A", "192.0.2.1")
    dns.add("h.example.test", "AAAA", "2001:db8::1")
    found = await DnsResolver(resolver).resolve("h.example.test", 443, socket.AF_UNSPEC)
    assert sorted(r["host"] for r in found) == ["192.0.2.1", "2001:db8::1"]
    assert all(r["port"] == 443 for r in found)
    with pytest.raises(OSError, match="has no address"):
        await DnsResolver(resolver).resolve("nowhere.example.test", 443)
    dns.servfail("broken.example.test")
    with pytest.raises(OSError, match="the A lookup failed"):
        await DnsResolver(resolver).resolve("broken.example.test", 443)


async def test_store_keeps_the_latest_fetch(store_url: str) -> None:
    store = SQLiteStore(store_url)
    await store.open()
    try:
        newer = CachedStsPolicy(domain=DOMAIN, id="two", mode="testing", mx=("a.test",),
                                max_age=60, fetched_at=T0 + 10, policy="p2")
        await store.save_mta_sts_policy(newer)
        await store.save_mta_sts_policy(CachedStsPolicy(
            domain=DOMAIN, id="one", mode="enforce", mx=("b.test",), max_age=60,
            fetched_at=T0, policy="p1"))
        assert await store.mta_sts_policy(DOMAIN) == newer
        assert await store.mta_sts_policy("other.test") is None
        # a policy past its max_age goes when another is saved (its domain dropped MTA-STS)
        await store.save_mta_sts_policy(CachedStsPolicy(
            domain="other.test", id="x", mode="enforce", mx=("mx.other.test",), max_age=5,
            fetched_at=T0 + 100, policy="p3"))
        assert await store.mta_sts_policy(DOMAIN) is None
        assert await store.mta_sts_policy("other.test") is not None
    finally:
        await store.close()
