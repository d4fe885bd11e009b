"""Outbound shaping end to end: sites by MX host and by [[delivery.sites]] group, their
connections, messages per connection and rate; replies that hold a site back (an MX that
turns to 421 mid-run); source pools with their EHLO names; warm-up caps."""

from __future__ import annotations

import asyncio
import datetime
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from relay import metrics
from relay.config import DeliveryConfig, DnsConfig, load
from relay.config.outbound import BackoffRule, PoolConfig, SiteConfig, SourceConfig
from relay.delivery.outbound import Target
from relay.delivery.pools import warmup_cap
from relay.delivery.shaping import Shaper, Site
from relay.errors import ConfigError
from relay.service import Service
from relay.store import SQLiteStore
from relay.store.shaping import SiteHold
from relay.types import RecipientStatus, Suppression

from .apiutil import Api, api_client
from .conftest import make_config, run_relay, write_toml
from .dnsserver import DNSServer
from .sink import Sink
from .smtputil import in_thread
from .smtputil import send as send_smtp

FAST = dict(retry_min=30.0, retry_max=60.0, connect_timeout=2.0, command_timeout=5.0,
            session_idle=0.5, process=False)


async def start(tmp_path: Path, dns: DNSServer, sink: Sink, **delivery: Any) -> tuple[Service, Api]:
    config = make_config(tmp_path, delivery=DeliveryConfig(mx_port=sink.port,
                                                           **{**FAST, **delivery}),
                         dns=DnsConfig(nameservers=(dns.nameserver,), timeout=1.0))
    svc = Service(config)
    await svc.start()
    return svc, await api_client(svc)


async def send(svc: Service, api: Api, to: str, **fields: Any) -> str:
    status, body, _ = await api.call("POST", "/v1/emails", {
        "from": "alice@sender.test", "to": [to], "subject": "hi", "text": "hello", **fields})
    assert status == 202, body
    return str(body["id"])


async def statuses(svc: Service, ids: list[str]) -> list[str]:
    out = []
    for i in ids:
        detail = await svc.store.get_message(i)
        assert detail is not None
        out += [r.status.value for r in detail.recipients]
    return out


def cli_config(tmp_path: Path, svc: Service, more: str = "") -> Path:
    """A config file for `relay` commands on the service's store (SQLite or PostgreSQL)."""
    store = f"[store]\nurl = '{svc.config.store.url}'\n" if svc.config.store.url else ""
    return write_toml(tmp_path / "relay.toml",
                      f"[server]\ndata_dir = '{svc.config.server.data_dir}'\n{store}{more}")


async def until(predicate: Any, timeout: float = 20.0) -> None:
    async def loop() -> None:
        while not await predicate():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(loop(), timeout)


def all_in(svc: Service, ids: list[str], *wanted: str) -> Any:
    async def check() -> bool:
        return all(s in wanted for s in await statuses(svc, ids))

    return check


# -- sites and their limits ------------------------------------------------------------------


async def test_domains_on_one_mx_host_share_its_connection_limit(tmp_path: Path,
                                                                 dns: DNSServer) -> None:
    """Ten domains whose MX is one host are one site: two sessions at once, not twenty."""
    for i in range(10):
        dns.add(f"d{i}.test", "MX", "10 mx.shared.test.")
    dns.add("mx.shared.test", "A", "127.0.0.1")
    delays = {f"u@d{i}.test": 0.3 for i in range(10)}
    async with Sink(rcpt_delay=delays) as sink:
        svc, api = await start(tmp_path, dns, sink, concurrency_per_destination=2)
        try:
            ids = [await send(svc, api, f"u@d{i}.test") for i in range(10)]
            await until(all_in(svc, ids, "delivered"))
            assert sink.max_active <= 2
            assert len(sink.messages) == 10
        finally:
            await api.close()
            await svc.stop()


async def test_a_site_groups_a_providers_mx_names(tmp_path: Path, dns: DNSServer) -> None:
    """[[delivery.sites]]: every MX name under *.bigmail.test is one site with its limits."""
    for i in range(6):
        dns.add(f"p{i}.test", "MX", f"10 mx{i}.bigmail.test.")
        dns.add(f"mx{i}.bigmail.test", "A", "127.0.0.1")
    delays = {f"u@p{i}.test": 0.3 for i in range(6)}
    async with Sink(rcpt_delay=delays) as sink:
        svc, api = await start(tmp_path, dns, sink, sites=(SiteConfig(
            name="bigmail", mx=("*.bigmail.test",), max_connections=1),))
        try:
            ids = [await send(svc, api, f"u@p{i}.test") for i in range(6)]
            await until(all_in(svc, ids, "delivered"))
            assert sink.max_active == 1
        finally:
            await api.close()
            await svc.stop()


async def test_messages_per_connection_and_rate_of_a_site(tmp_path: Path,
                                                          dns: DNSServer) -> None:
    dns.add("r.test", "MX", "10 mx.r.test.")
    dns.add("mx.r.test", "A", "127.0.0.1")
    async with Sink() as sink:
        svc, api = await start(tmp_path, dns, sink, sites=(SiteConfig(
            name="r", mx=("mx.r.test",), messages_per_connection=2, max_rate="5/s"),))
        try:
            ids = [await send(svc, api, f"u{i}@r.test") for i in range(8)]
            started = time.monotonic()
            await until(all_in(svc, ids, "delivered"))
            took = time.monotonic() - started
            assert sink.connections >= 4  # two messages a session
            assert took >= 1.2, took  # eight messages 0.2 s apart: 1.4 s at least from the first
        finally:
            await api.close()
            await svc.stop()


# -- replies that hold a site back -----------------------------------------------------------


async def test_an_mx_turning_to_421_suspends_its_site(tmp_path: Path, dns: DNSServer) -> None:
    dns.add("g.test", "MX", "10 mx.g.test.")
    dns.add("mx.g.test", "A", "127.0.0.1")
    async with Sink() as sink:
        svc, api = await start(tmp_path, dns, sink)
        try:
            first = [await send(svc, api, f"a{i}@g.test") for i in range(3)]
            await until(all_in(svc, first, "delivered"))
            sink.mail_reply = "421 4.7.28 Our system has detected an unusual rate of mail"
            before = time.time()
            # one message to five: one job, each recipient its own transaction (VERP)
            status, body, _ = await api.call("POST", "/v1/emails", {
                "from": "alice@sender.test", "to": [f"b{i}@g.test" for i in range(5)],
                "subject": "hi", "text": "hello"})
            assert status == 202, body
            later = [body["id"]]
            await until(all_in(svc, later, "deferred"))
            assert sink.refused == 1  # one refusal, and the rest were never tried
            holds = await svc.store.site_holds(time.time())
            assert [(h.site, h.rate) for h in holds] == [("mx.g.test", None)]
            assert before + 1700 < holds[0].until < time.time() + 1900
            detail = await svc.store.get_message(later[0])
            assert detail is not None and len(detail.recipients) == 5
            for r in detail.recipients:
                assert r.next_attempt_at is not None and r.next_attempt_at > before + 1700
            assert [a.code for a in detail.attempts] == [421]
            snap = {(s[0], tuple(sorted(s[1].items()))): s[2]
                    for f in metrics.snapshot() for s in f[3]}
            assert snap[("relay_site_holds_total", (("action", "suspend"),
                                                    ("site", "mx.g.test")))] >= 1
            assert snap[("relay_delivery_held_total", (("reason", "site"),))] >= 4
        finally:
            await api.close()
            await svc.stop()


async def test_a_421_greeting_suspends_the_site_after_one_attempt(tmp_path: Path,
                                                                   dns: DNSServer) -> None:
    """Yahoo's way: "421 4.7.0 [TS01]" at connect, then the connection closes."""
    dns.add("y.test", "MX", "10 mx.y.test.")
    dns.add("mx.y.test", "A", "127.0.0.1")
    connections = 0

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.write(b"421 4.7.0 [TS01] Messages from 127.0.0.1 temporarily deferred\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    svc, api = await start(tmp_path, dns, cast(Sink, SimpleNamespace(port=port)))
    try:
        ids = [await send(svc, api, f"u{i}@y.test") for i in range(3)]
        await until(all_in(svc, ids, "deferred"))
        (hold,) = await svc.store.site_holds(time.time())
        assert hold.site == "mx.y.test" and hold.until > time.time() + 3000  # an hour
        assert hold.reason.startswith("421 4.7.0 [TS01]")
        attempts = [a for i in ids for a in (await svc.store.get_message(i)).attempts]
        assert {a.code for a in attempts} == {421}  # the refusal is on record
        for i in ids:
            (r,) = (await svc.store.get_message(i)).recipients
            assert r.next_attempt_at is not None and r.next_attempt_at >= hold.until - 1
        tried = connections  # the jobs that had connected at once, before the hold
        later = [await send(svc, api, f"v{i}@y.test") for i in range(3)]
        await until(all_in(svc, later, "deferred"))
        assert connections == tried  # held: never connected
        for i in later:
            detail = await svc.store.get_message(i)
            assert detail.attempts == () and "held back" in (detail.recipients[0].last_reply or "")
    finally:
        await api.close()
        await svc.stop()
        server.close()


async def test_a_slow_rule_paces_the_site_and_summary_shows_it(tmp_path: Path,
                                                               dns: DNSServer) -> None:
    dns.add("s.test", "MX", "10 mx.s.test.")
    dns.add("mx.s.test", "A", "127.0.0.1")
    rule = BackoffRule(match=r"^452 4\.5\.3 slow down", max_rate="2/s", duration=600.0)
    async with Sink(replies={"first@s.test": ["452 4.5.3 slow down please"]}) as sink:
        svc, api = await start(tmp_path, dns, sink, backoff=(rule,))
        try:
            slow = await send(svc, api, "first@s.test")
            await until(all_in(svc, [slow], "deferred"))
            ids = [await send(svc, api, f"u{i}@s.test") for i in range(5)]
            started = time.monotonic()
            await until(all_in(svc, ids, "delivered"))
            assert time.monotonic() - started >= 1.5  # 2/s: 0.5 s apart
            (hold,) = await svc.store.site_holds(time.time())
            assert hold.site == "mx.s.test" and hold.rate == 2.0
        finally:
            await api.close()
            await svc.stop()
        toml = cli_config(tmp_path, svc)
        result = run_relay("--config", str(toml), "queue", "summary", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "mx.s.test" in result.stdout and "slowed to 2/s" in result.stdout
        released = run_relay("--config", str(toml), "queue", "release-site", "mx.s.test",
                             cwd=tmp_path)
        assert released.returncode == 0, released.stderr
        again = run_relay("--config", str(toml), "queue", "release-site", "mx.s.test",
                          cwd=tmp_path)
        assert again.returncode == 1 and "not held" in again.stderr


# -- source pools ----------------------------------------------------------------------------


POOLS = (
    PoolConfig(name="tx", streams=("transactional",), sources=(
        SourceConfig(address="127.0.0.2", helo="mta2.sender.test"),)),
    PoolConfig(name="bulk", sources=(
        SourceConfig(address="127.0.0.3", helo="mta3.sender.test"),
        SourceConfig(address="127.0.0.4", helo="mta4.sender.test"))),
)


async def test_mail_leaves_from_its_pools_addresses_with_their_names(tmp_path: Path,
                                                                     dns: DNSServer) -> None:
    dns.add("p.test", "MX", "10 mx.p.test.")
    dns.add("mx.p.test", "A", "127.0.0.1")
    async with Sink() as sink:
        svc, api = await start(tmp_path, dns, sink, pools=POOLS)
        try:
            tx = await send(svc, api, "tx@p.test")
            bulk = [await send(svc, api, f"b{i}@p.test", pool="bulk") for i in range(4)]
            await until(all_in(svc, [tx, *bulk], "delivered"))
            (got,) = sink.delivered_to("tx@p.test")
            assert (got.peer, got.helo) == ("127.0.0.2", "mta2.sender.test")
            used = {(m.peer, m.helo) for i in range(4) for m in sink.delivered_to(f"b{i}@p.test")}
            assert used == {("127.0.0.3", "mta3.sender.test"), ("127.0.0.4", "mta4.sender.test")}
            detail = await svc.store.get_message(tx)
            assert detail is not None and detail.attempts[0].source_ip == "127.0.0.2"
            status, body, _ = await api.call("POST", "/v1/emails", {
                "from": "alice@sender.test", "to": ["x@p.test"], "subject": "s", "text": "t",
                "pool": "nope"})
            assert status == 422 and body["error"]["param"] == "pool", body
            # SMTP-only apps name the pool in a control header
            port = svc.bound[0][1]
            mail = (b"From: alice@sender.test\r\nTo: smtp@p.test\r\nSubject: s\r\n"
                    b"X-Relay-Pool: bulk\r\n\r\nhello\r\n")
            code, _ = await in_thread(send_smtp, port, api.key, mail, "alice@sender.test",
                                      ("smtp@p.test",))
            assert code == 250
            await sink.wait_for(lambda k: bool(k.delivered_to("smtp@p.test")))
            (via_smtp,) = sink.delivered_to("smtp@p.test")
            assert via_smtp.peer in ("127.0.0.3", "127.0.0.4")
            assert b"X-Relay-Pool" not in via_smtp.data
            code, text = await in_thread(send_smtp, port, api.key,
                                         mail.replace(b": bulk", b": nope"),
                                         "alice@sender.test", ("smtp@p.test",))
            assert code == 550 and b"no source pool named 'nope'" in text, text
        finally:
            await api.close()
            await svc.stop()


async def test_a_job_keeps_its_pool_when_the_send_time_screen_drops_a_recipient(
        tmp_path: Path, dns: DNSServer) -> None:
    """The scheduler's suppression screen made the rest of the job anew and lost its pool:
    the others left from the default address."""
    dns.add("q.test", "MX", "10 mx.q.test.")
    dns.add("mx.q.test", "A", "127.0.0.1")
    async with Sink() as sink:
        svc, api = await start(tmp_path, dns, sink, pools=POOLS)
        try:
            await svc.store.add_suppression(Suppression(
                address="gone@q.test", scope="", reason="manual", source="test",
                created_at=time.time()))
            when = (datetime.datetime.now(datetime.UTC)
                    + datetime.timedelta(seconds=1)).isoformat()
            status, body, _ = await api.call("POST", "/v1/emails", {
                "from": "alice@sender.test", "to": ["gone@q.test", "kept@q.test"],
                "subject": "hi", "text": "hello", "pool": "bulk", "scheduledAt": when})
            assert status == 202 and body["status"] == "scheduled", body
            await until(all_in(svc, [body["id"]], "delivered", "suppressed"))
            (got,) = sink.delivered_to("kept@q.test")
            assert (got.peer, got.helo) in {("127.0.0.3", "mta3.sender.test"),
                                            ("127.0.0.4", "mta4.sender.test")}
            assert not sink.delivered_to("gone@q.test")
        finally:
            await api.close()
            await svc.stop()


async def test_warmup_caps_a_sources_day_and_holds_the_rest(tmp_path: Path,
                                                            dns: DNSServer) -> None:
    dns.add("w.test", "MX", "10 mx.w.test.")
    dns.add("mx.w.test", "A", "127.0.0.1")
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    pools = (PoolConfig(name="new", streams=("transactional",), warmup=(3, 10), sources=(
        SourceConfig(address="127.0.0.5", helo="mta5.sender.test", warmup_start=today),)),)
    async with Sink() as sink:
        svc, api = await start(tmp_path, dns, sink, pools=pools)
        try:
            ids = [await send(svc, api, f"u{i}@w.test") for i in range(5)]
            await until(all_in(svc, ids, "delivered", "deferred"))
            await until(lambda: _count(svc, ids), 10)
            got = await statuses(svc, ids)
            assert got.count("delivered") == 3 and got.count("deferred") == 2, got
            tomorrow = datetime.datetime.combine(
                datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=1),
                datetime.time(), datetime.UTC).timestamp()
            for i in ids:
                detail = await svc.store.get_message(i)
                assert detail is not None
                r = detail.recipients[0]
                if r.status == RecipientStatus.DEFERRED:
                    assert r.next_attempt_at == tomorrow and "warm-up" in (r.last_reply or "")
                    assert detail.attempts == ()
            assert {m.peer for m in sink.messages} == {"127.0.0.5"}
        finally:
            await api.close()
            await svc.stop()
        toml = cli_config(tmp_path, svc, f"""
[[delivery.pools]]
name = "new"
warmup = [3, 10]
[[delivery.pools.sources]]
address = "127.0.0.5"
warmup_start = "{today}"
""")
        result = run_relay("--config", str(toml), "queue", "summary", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert re.search(r"^new\s+127\.0\.0\.5\s+3\s+3\s*$", result.stdout, re.M), result.stdout


async def _count(svc: Service, ids: list[str]) -> bool:
    got = await statuses(svc, ids)
    return got.count("delivered") + got.count("deferred") == len(ids)


# -- the shared state, on both backends ------------------------------------------------------


async def test_holds_and_warmup_quotas_in_the_store(store_url: str) -> None:
    store = SQLiteStore(store_url)
    await store.open()
    try:
        await store.hold_site(SiteHold(site="mx.a.test", until=2000.0, rate=None,
                                       reason="421 4.7.28 slow", since=1000.0))
        # a shorter hold does not cut a longer one short; a longer one extends it
        await store.hold_site(SiteHold(site="mx.a.test", until=1500.0, rate=1.0,
                                       reason="421 x", since=1100.0))
        (hold,) = await store.site_holds(1200.0)
        assert (hold.until, hold.rate, hold.reason) == (2000.0, None, "421 4.7.28 slow")
        await store.hold_site(SiteHold(site="mx.a.test", until=3000.0, rate=2.0,
                                       reason="421 y", since=1300.0))
        assert [(h.until, h.rate) for h in await store.site_holds(1400.0)] == [(3000.0, 2.0)]
        assert await store.site_holds(3000.0) == []
        assert await store.release_site("mx.a.test") and not await store.release_site("x")
        # quotas: granted up to the cap, across callers, and never past it
        assert await store.take_source_quota("192.0.2.1", "2026-12-05", 4, 10) == 4
        assert await store.take_source_quota("192.0.2.1", "2026-12-05", 4, 10) == 4
        assert await store.take_source_quota("192.0.2.1", "2026-12-05", 4, 10) == 2
        assert await store.take_source_quota("192.0.2.1", "2026-12-05", 4, 10) == 0
        assert await store.take_source_quota("192.0.2.1", "2026-12-06", 4, 10) == 4
        assert await store.source_usage(["192.0.2.1"], "2026-12-05") == {"192.0.2.1": 10}
    finally:
        await store.close()


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(("toml", "key", "reason"), [
    ('[delivery]\nmax_rate = "fast"\n', "delivery.max_rate", "is not a rate"),
    ('[[delivery.backoff]]\nmatch = "(unclosed"\nsuspend = 60\n', "delivery.backoff[0].match",
     "is not a regular expression"),
    ('[[delivery.backoff]]\nmatch = "^421"\n', "delivery.backoff[0]",
     "needs suspend (seconds) or max_rate"),
    ('[[delivery.sites]]\nname = "g"\n', "delivery.sites[0].mx", "needs at least one"),
    ('[[delivery.sites]]\nname = "g"\nmx = ["a*.x.test"]\n', "delivery.sites[0].mx",
     "a wildcard only as the first label"),
    ('[[delivery.pools]]\nname = "p"\n', "delivery.pools[0].sources", "needs at least one"),
    ('[[delivery.pools]]\nname = "p"\nwarmup = ["10"]\n[[delivery.pools.sources]]\n'
     'address = "192.0.2.1"\n', "delivery.pools[0].warmup", "must be an integer"),
    ('[[delivery.pools]]\nname = "p"\n[[delivery.pools.sources]]\naddress = "mta1"\n',
     "delivery.pools[0].sources[0].address", "does not appear to be an IPv4 or IPv6"),
    ('[[delivery.pools]]\nname = "a"\nstreams = ["broadcast"]\n[[delivery.pools.sources]]\n'
     'address = "192.0.2.1"\n[[delivery.pools]]\nname = "b"\nstreams = ["broadcast"]\n'
     '[[delivery.pools.sources]]\naddress = "192.0.2.2"\n', "delivery.pools[1].streams",
     "broadcast is served by pool 'a' already"),
    ('[[delivery.tls_policy]]\ndomain = "x.test"\nlevel = "strict"\n',
     "delivery.tls_policy[0].level", "must be one of none, may, encrypt, verify, dane"),
])
def test_outbound_config_errors_name_the_key(tmp_path: Path, toml: str, key: str,
                                             reason: str) -> None:
    path = write_toml(tmp_path / "relay.toml", toml)
    with pytest.raises(ConfigError) as err:
        load(path, environ={})
    assert err.value.key == key and reason in err.value.reason, str(err.value)


def test_warmup_caps_by_day() -> None:
    pool = PoolConfig(name="p", warmup=(10, 20, 40), sources=(
        SourceConfig(address="192.0.2.1", warmup_start="2026-12-01"),
        SourceConfig(address="192.0.2.2")))
    day = datetime.datetime(2026, 12, 1, 12, tzinfo=datetime.UTC).timestamp()
    first, warm = pool.sources
    assert warmup_cap(pool, first, day - 86400) == 10  # before its first day: day 1's
    assert [warmup_cap(pool, first, day + n * 86400) for n in range(4)] == [10, 20, 40, None]
    assert warmup_cap(pool, warm, day) is None


def test_sites_of_destinations() -> None:
    """The large providers are a site each by default; else the most preferred MX host."""
    cfg = DeliveryConfig(concurrency_per_destination=7, messages_per_session=9, max_rate="2/s")
    shaper = Shaper(cfg, cast(SQLiteStore, None))

    def site(primary: str, *hosts: tuple[str, str]) -> Site:
        return shaper.site(primary, [Target(hostname=h, address=a, port=25) for h, a in hosts])

    google = site("aspmx.l.google.com", ("aspmx.l.google.com", "192.0.2.1"),
                  ("alt1.aspmx.l.google.com", "192.0.2.2"))
    assert google == Site(key="google", max_connections=7, messages_per_connection=9, rate=2.0)
    assert site("x.mail.protection.outlook.com",
                ("x.mail.protection.outlook.com", "192.0.2.3")).key == "microsoft"
    assert site("MX.Example.TEST", ("mx.example.test", "192.0.2.4")).key == "mx.example.test"
    custom = Shaper(DeliveryConfig(sites=(SiteConfig(name="lab", mx=("192.0.2.0/28",),
                                                     max_connections=1, max_rate="10/min"),)),
                    cast(SQLiteStore, None))
    lab = custom.site("mx.lab.test", [Target(hostname="mx.lab.test", address="192.0.2.5",
                                             port=25)])
    assert (lab.key, lab.max_connections, lab.rate) == ("lab", 1, 10 / 60)
    assert custom.site("aspmx.l.google.com", [Target(
        hostname="aspmx.l.google.com", address="198.51.100.1", port=25)]).key == \
        "aspmx.l.google.com"  # sites set in the file replace the defaults


async def test_work_waiting_for_a_sites_connection_keeps_its_lease(tmp_path: Path,
                                                                   dns: DNSServer) -> None:
    """A pick leases more than a site's one connection can send before the lease runs out:
    the jobs waiting for the connection renew their leases, so a later pick cannot take the
    same recipients and send them a second time. Each recipient arrives exactly once."""
    dns.add("slow.test", "MX", "10 mx.slow.test.")
    dns.add("mx.slow.test", "A", "127.0.0.1")
    rcpts = [f"u{i}@slow.test" for i in range(8)]
    async with Sink(rcpt_delay={r: 0.4 for r in rcpts}) as sink:
        svc, api = await start(tmp_path, dns, sink, concurrency=4,
                               concurrency_per_destination=1, messages_per_session=1,
                               lease=1.0, session_idle=0.0)
        try:
            ids = [await send(svc, api, r) for r in rcpts]
            await until(all_in(svc, ids, "delivered"))
            await asyncio.sleep(1.5)  # a second copy would be on its way by now
            got = sorted(r for m in sink.messages for r in m.rcpt_tos)
            assert got == sorted(rcpts)
        finally:
            await api.close()
            await svc.stop()
