"""MX resolution against a local authoritative DNS server (never the machine's resolver)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import dns.asyncquery
import dns.message
import dns.name
import dns.rcode
import pytest

from relay.config import DnsConfig
from relay.delivery.mx import MXHost, MXResolver
from relay.errors import PermanentFailure, TemporaryFailure

from .dnsserver import DNSServer, silent_udp_socket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def server() -> AsyncIterator[DNSServer]:
    async with DNSServer() as dns_server:
        yield dns_server


def resolver_for(server: DNSServer, clock: Clock | None = None) -> MXResolver:
    config = DnsConfig(nameservers=(server.nameserver,), timeout=2.0)
    return MXResolver(config, clock=clock) if clock else MXResolver(config)


async def test_preference_order_and_addresses(server: DNSServer) -> None:
    server.add("example.test", "MX", "20 mx2.example.test.", "10 mx1.example.test.",
               "30 mx3.example.test.")
    server.add("mx1.example.test", "A", "192.0.2.1", "192.0.2.11")
    server.add("mx1.example.test", "AAAA", "2001:db8::1")
    server.add("mx2.example.test", "AAAA", "2001:db8::2")
    server.add("mx3.example.test", "A", "192.0.2.3")

    hosts = await resolver_for(server).resolve("Example.TEST.")

    assert [h.name for h in hosts] == ["mx1.example.test", "mx2.example.test", "mx3.example.test"]
    assert [h.preference for h in hosts] == [10, 20, 30]
    assert sorted(hosts[0].addresses[:2]) == ["192.0.2.1", "192.0.2.11"]
    assert hosts[0].addresses[2] == "2001:db8::1"  # IPv4 first, then IPv6
    assert hosts[1].addresses == ("2001:db8::2",)
    assert hosts[2] == MXHost(name="mx3.example.test", preference=30, addresses=("192.0.2.3",))
    assert not any(h.implicit for h in hosts)


async def test_equal_preferences_are_shuffled(server: DNSServer) -> None:
    server.add("shuffle.test", "MX", "10 a.shuffle.test.", "10 b.shuffle.test.",
               "5 first.shuffle.test.")
    for host in ("a", "b", "first"):
        server.add(f"{host}.shuffle.test", "A", "192.0.2.1")
    resolver = resolver_for(server)

    orders = set()
    for _ in range(60):
        hosts = await resolver.resolve("shuffle.test")
        assert hosts[0].name == "first.shuffle.test"
        orders.add(tuple(h.name for h in hosts[1:]))

    assert orders == {("a.shuffle.test", "b.shuffle.test"), ("b.shuffle.test", "a.shuffle.test")}


async def test_implicit_mx_from_the_domains_own_addresses(server: DNSServer) -> None:
    server.add("nomx.test", "A", "192.0.2.7")
    server.add("nomx.test", "AAAA", "2001:db8::7")

    hosts = await resolver_for(server).resolve("nomx.test")

    assert hosts == [MXHost(name="nomx.test", preference=0,
                            addresses=("192.0.2.7", "2001:db8::7"), implicit=True)]


async def test_no_mx_and_no_address_is_permanent(server: DNSServer) -> None:
    server.add("txtonly.test", "TXT", '"v=spf1 -all"')

    with pytest.raises(PermanentFailure) as caught:
        await resolver_for(server).resolve("txtonly.test")

    assert caught.value.enhanced == "5.1.2"
    assert caught.value.hard
    assert "no MX and no address" in caught.value.text


async def test_null_mx_is_a_hard_permanent_failure(server: DNSServer) -> None:
    server.add("nullmx.test", "MX", "0 .")
    server.add("nullmx.test", "A", "192.0.2.9")  # must not be used as an implicit MX

    with pytest.raises(PermanentFailure) as caught:
        await resolver_for(server).resolve("nullmx.test")

    assert caught.value.enhanced == "5.1.10"
    assert caught.value.hard
    assert "null MX" in caught.value.text


async def test_nxdomain_is_a_hard_permanent_failure(server: DNSServer) -> None:
    server.add("exists.test", "A", "192.0.2.1")

    with pytest.raises(PermanentFailure) as caught:
        await resolver_for(server).resolve("missing.test")

    assert caught.value.enhanced == "5.1.2"
    assert caught.value.hard
    assert "NXDOMAIN" in caught.value.text


async def test_the_test_dns_server_answers_for_the_root_name(server: DNSServer) -> None:
    """An MTA looks up "." after a null MX ("MX 0 ."); the loopback server must answer it."""
    server.add("exists.test", "A", "192.0.2.1")

    reply = await dns.asyncquery.udp(dns.message.make_query(".", "A"), "127.0.0.1",
                                     port=server.port, timeout=2)

    assert reply.rcode() == dns.rcode.NOERROR and not reply.answer
    assert reply.authority[0].name == dns.name.root


async def test_servfail_is_temporary(server: DNSServer) -> None:
    server.servfail("broken.test")

    with pytest.raises(TemporaryFailure) as caught:
        await resolver_for(server).resolve("broken.test")

    assert caught.value.enhanced == "4.4.3"
    assert not caught.value.permanent


async def test_timeout_is_temporary() -> None:
    with silent_udp_socket() as sock:
        port = sock.getsockname()[1]
        resolver = MXResolver(DnsConfig(nameservers=(f"127.0.0.1:{port}",), timeout=0.5))

        with pytest.raises(TemporaryFailure) as caught:
            await resolver.resolve("example.test")

    assert caught.value.enhanced == "4.4.3"
    assert "timed out" in caught.value.text


async def test_temporary_failures_are_not_cached(server: DNSServer) -> None:
    server.servfail("flaky.test")
    resolver = resolver_for(server, Clock())
    with pytest.raises(TemporaryFailure):
        await resolver.resolve("flaky.test")

    server.clear()
    server.add("flaky.test", "MX", "10 mx.flaky.test.")
    server.add("mx.flaky.test", "A", "192.0.2.5")

    assert [h.addresses for h in await resolver.resolve("flaky.test")] == [("192.0.2.5",)]


async def test_answers_are_cached_for_their_ttl(server: DNSServer) -> None:
    server.add("cached.test", "MX", "10 mx.cached.test.", ttl=600)
    server.add("mx.cached.test", "A", "192.0.2.1", ttl=40)
    server.add("mx.cached.test", "AAAA", "2001:db8::1", ttl=600)
    clock = Clock()
    resolver = resolver_for(server, clock)

    first = await resolver.resolve("cached.test")
    asked = len(server.queries)
    assert asked == 3  # MX, A, AAAA

    clock.now += 39
    assert await resolver.resolve("CACHED.test") == first
    assert len(server.queries) == asked  # a cache hit, nothing asked

    clock.now += 2  # past the smallest TTL involved (the A record's 40 s)
    assert await resolver.resolve("cached.test") == first
    assert len(server.queries) == 2 * asked


async def test_permanent_negatives_are_cached_by_soa_minimum(server: DNSServer) -> None:
    clock = Clock()
    resolver = resolver_for(server, clock)
    server.add("other.test", "A", "192.0.2.1")

    for _ in range(2):
        with pytest.raises(PermanentFailure):
            await resolver.resolve("gone.test")
    assert server.queries == [("gone.test", "MX")]

    clock.now += 61  # the synthetic SOA's minimum is 60 s
    with pytest.raises(PermanentFailure):
        await resolver.resolve("gone.test")
    assert server.queries == [("gone.test", "MX")] * 2


async def test_mx_host_without_address_is_skipped(server: DNSServer) -> None:
    server.add("partial.test", "MX", "10 dead.partial.test.", "20 live.partial.test.")
    server.add("dead.partial.test", "TXT", '"no address here"')
    server.add("live.partial.test", "A", "192.0.2.20")

    hosts = await resolver_for(server).resolve("partial.test")

    assert [h.name for h in hosts] == ["live.partial.test"]


async def test_no_mx_host_exists_is_permanent_but_not_hard(server: DNSServer) -> None:
    server.add("ghosts.test", "MX", "10 a.nowhere.test.", "20 b.nowhere.test.")

    with pytest.raises(PermanentFailure) as caught:
        await resolver_for(server).resolve("ghosts.test")

    assert caught.value.enhanced == "5.4.4"
    assert not caught.value.hard


async def test_no_mx_host_has_an_address_is_temporary(server: DNSServer) -> None:
    server.add("empty.test", "MX", "10 a.empty.test.", "20 b.nowhere.test.")
    server.add("a.empty.test", "TXT", '"exists, no address"')

    with pytest.raises(TemporaryFailure) as caught:
        await resolver_for(server).resolve("empty.test")

    assert caught.value.enhanced == "4.4.4"


async def test_idn_domain_is_queried_as_a_labels(server: DNSServer) -> None:
    server.add("xn--bcher-kva.test", "MX", "10 mx.xn--bcher-kva.test.")
    server.add("mx.xn--bcher-kva.test", "A", "192.0.2.30")

    hosts = await resolver_for(server).resolve("Bücher.test")

    assert [(h.name, h.addresses) for h in hosts] == [("mx.xn--bcher-kva.test", ("192.0.2.30",))]
    assert server.queries[0] == ("xn--bcher-kva.test", "MX")


async def test_addresses_of_ip_literals_and_names(server: DNSServer) -> None:
    server.add("smart.test", "A", "192.0.2.40")
    server.add("smart.test", "AAAA", "2001:db8::40")
    resolver = resolver_for(server)

    assert await resolver.addresses("198.51.100.7") == ["198.51.100.7"]
    assert await resolver.addresses("[2001:db8::99]") == ["2001:db8::99"]
    assert server.queries == []  # literals never reach DNS
    assert await resolver.addresses("smart.test") == ["192.0.2.40", "2001:db8::40"]
    with pytest.raises(PermanentFailure) as caught:
        await resolver.addresses("nosuch.test")
    assert caught.value.enhanced == "5.4.4"


async def test_truncated_answer_is_retried_over_tcp(server: DNSServer) -> None:
    many = [f"10.0.{i // 256}.{i % 256}" for i in range(200)]
    server.add("big.test", "A", *many)

    addresses = await resolver_for(server).addresses("big.test")

    assert sorted(addresses) == sorted(many)
    assert server.tcp_queries >= 1


# -- address literals (RFC 5321 4.1.3, 5.1) ------------------------------------------------


@pytest.mark.parametrize("literal, address", [
    ("[192.0.2.1]", "192.0.2.1"),
    ("[IPv6:2001:db8::1]", "2001:db8::1"),
    ("[IPv6:::ffff:192.0.2.7]", "192.0.2.7"),  # mapped: over IPv4, as the loop check sees it
])
async def test_an_address_literal_is_its_own_host_without_a_lookup(
        server: DNSServer, literal: str, address: str) -> None:
    hosts = await resolver_for(server).resolve(literal)

    assert hosts == [MXHost(name=address, preference=0, addresses=(address,), implicit=True)]
    assert server.queries == []


@pytest.mark.parametrize("literal", ["[192.0.2.256]", "[2001:db8::1]", "[IPv6:192.0.2.1]",
                                     "[x-tag:anything]", "[]"])
async def test_a_bad_address_literal_fails_permanently_without_a_lookup(
        server: DNSServer, literal: str) -> None:
    with pytest.raises(PermanentFailure) as caught:
        await resolver_for(server).resolve(literal)

    assert caught.value.enhanced == "5.1.2" and caught.value.hard
    assert server.queries == []


async def test_addresses_of_a_tagged_ipv6_literal(server: DNSServer) -> None:
    assert await resolver_for(server).addresses("[IPv6:2001:DB8::9]") == ["2001:db8::9"]
    assert server.queries == []


# -- IDNA 2008 (UTS 46), not Python's IDNA 2003 codec ----------------------------------------


@pytest.mark.parametrize("u_label, idna2008", [
    ("faß.test", "xn--fa-hia.test"),  # ß is a letter of its own in 2008; 2003 made it "ss"
    ("βόλος.test", "xn--nxasmm1c.test"),  # final sigma ς kept; 2003 mapped it to σ
    ("क्\u200dष.test", "xn--11b2ezcw70k.test"),  # ZWJ after a virama kept; 2003 dropped it
    ("FAß.Test", "xn--fa-hia.test"),  # UTS 46 maps case
])
async def test_idn_is_queried_as_its_idna_2008_a_label(
        server: DNSServer, u_label: str, idna2008: str) -> None:
    server.add(idna2008, "MX", f"10 mx.{idna2008}.")
    server.add(f"mx.{idna2008}", "A", "192.0.2.31")
    idna2003 = u_label.encode("idna").decode("ascii").lower()
    assert idna2003 != idna2008  # what the test tells apart

    hosts = await resolver_for(server).resolve(u_label)

    assert [h.name for h in hosts] == [f"mx.{idna2008}"]
    assert server.queries[0] == (idna2008, "MX")
    assert all(name != idna2003 for name, _ in server.queries)


@pytest.mark.parametrize("name", ["a\u200db.test",  # ZWJ outside its context (2003: "ab")
                                  "☃.test",  # a symbol, disallowed since 2008
                                  "١٢a.test"])  # a right-to-left digit then a Latin letter
async def test_a_name_idna_2008_disallows_fails_permanently_without_a_lookup(
        server: DNSServer, name: str) -> None:
    with pytest.raises(PermanentFailure) as caught:
        await resolver_for(server).resolve(name)

    assert caught.value.enhanced == "5.1.2" and caught.value.hard
    assert "not a valid domain name" in caught.value.text
    assert server.queries == []
