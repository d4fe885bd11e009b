"""Prometheus metrics (relay.metrics, api/metrics.py): real mail through the service to a real
SMTP sink, scraped over real HTTP and parsed with prometheus_client's own parser.

The counters are per process and tests share one, so each test reads differences from a
scrape taken before it acts; the queue gauges come from the test's own store."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from email.message import EmailMessage
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay import keys, metrics
from relay.api.metrics import key_required
from relay.config import ApiConfig, DeliveryConfig, DnsConfig, MetricsConfig, load
from relay.errors import ConfigError
from relay.service import Service
from relay.types import WebhookEndpoint

from .apiutil import SIMPLE
from .conftest import free_port, make_config, run_relay, wait_port
from .dnsserver import DNSServer
from .sink import Sink
from .smtputil import connect, in_thread

FAST: dict[str, Any] = {"retry_min": 0.2, "retry_max": 0.5, "connect_timeout": 2.0,
                        "command_timeout": 5.0, "session_idle": 0.5, "process": False}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(base: str, key: str | None = None) -> tuple[int, str, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session, \
            session.get(base + "/metrics", headers=headers) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def samples(base: str, key: str | None = None) -> Samples:
    status, _, text = await scrape(base, key)
    assert status == 200, text
    return parse(text)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


def base_of(svc: Service) -> str:
    assert svc.api_bound is not None
    return "http://{}:{}".format(*svc.api_bound)


async def send(base: str, key: str, body: dict[str, Any]) -> str:
    async with aiohttp.ClientSession() as session, session.post(
            base + "/v1/emails", json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        answer = await resp.json()
        assert resp.status == 202, answer
        return str(answer["id"])


async def start(tmp_path: Path, **sections: Any) -> tuple[Service, str]:
    svc = Service(make_config(tmp_path, **sections))
    await svc.start()
    _, key = await keys.create_key(svc.store, name="t", scopes=["emails:send"])
    return svc, key


async def test_smtp_mail_is_counted_by_the_listener_that_took_it(tmp_path: Path) -> None:
    svc, key = await start(tmp_path)  # one submission listener (STARTTLS + AUTH)
    try:
        base = base_of(svc)
        port = svc.bound[0][1]
        before = await samples(base)
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "a@example.com", "b@example.org", "hi"
        msg.set_content("hello")

        def submit() -> None:
            with connect(port, key=key) as client:
                client.send_message(msg)
        await in_thread(submit)
        after = await samples(base)
    finally:
        await svc.stop()
    label = {"source": "smtp", "listener": f"submission:{port}"}
    assert value(after, "relay_messages_accepted_total", **label) - value(
        before, "relay_messages_accepted_total", **label) == 1


# -- a delivery, end to end --------------------------------------------------------------------


async def test_a_delivery_shows_in_the_counters_and_histograms(tmp_path: Path,
                                                               dns: DNSServer) -> None:
    async with Sink() as sink:
        dns.add("example.org", "MX", "10 mx.example.org.")
        dns.add("mx.example.org", "A", "127.0.0.1")
        svc, key = await start(tmp_path, delivery=DeliveryConfig(mx_port=sink.port, **FAST),
                               dns=DnsConfig(nameservers=(dns.nameserver,), timeout=1.0))
        try:
            base = base_of(svc)
            before = await samples(base)  # loopback API: no key needed ("auto")
            await send(base, key, SIMPLE)
            await sink.wait_for(lambda s: len(s.delivered_to("bob@example.org")) == 1)

            async def counted() -> bool:
                now = await samples(base)
                return value(now, "relay_deliveries_total", outcome="delivered",
                             domain="example.org") > value(
                    before, "relay_deliveries_total", outcome="delivered", domain="example.org")
            await until(counted)
            after = await samples(base)
        finally:
            await svc.stop()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("relay_messages_accepted_total", source="api", listener="api") == 1
    assert delta("relay_deliveries_total", outcome="delivered", domain="example.org") == 1
    assert delta("relay_delivery_attempt_seconds_count", outcome="delivered") == 1
    assert delta("relay_delivery_attempt_seconds_bucket", outcome="delivered", le="+Inf") == 1
    assert delta("relay_delivery_queue_seconds_count") == 1
    assert delta("relay_delivery_queue_seconds_sum") > 0
    assert delta("relay_store_commit_seconds_count", process="master") >= 2  # queued, recorded
    # each commit says how many writes it took together, and how long it waited for the lock
    commits = delta("relay_store_commit_seconds_count", process="master")
    assert delta("relay_store_commit_writes_count", process="master") == commits
    assert delta("relay_store_commit_writes_sum", process="master") >= commits
    assert delta("relay_store_lock_wait_seconds_count", process="master") >= commits
    assert value(after, "relay_queue_recipients", status="queued") == 0


async def test_scrape_answers_in_prometheus_text_format(tmp_path: Path) -> None:
    svc, _ = await start(tmp_path)
    try:
        status, ctype, text = await scrape(base_of(svc))
    finally:
        await svc.stop()
    assert status == 200
    assert ctype.startswith("text/plain; version=0.0.4")
    names = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert names["relay_queue_recipients"] == "gauge"
    assert names["relay_webhook_backlog"] == "gauge"
    assert names["relay_store_commit_seconds"] == "histogram"
    assert names["relay_store_commit_writes"] == "histogram"
    assert names["relay_store_lock_wait_seconds"] == "histogram"
    assert names["relay_messages_accepted"] == "counter"


# -- what waits: the queue and the webhook outbox --------------------------------------------


async def test_queue_depth_and_webhook_backlog_while_delivery_is_paused(tmp_path: Path) -> None:
    svc, key = await start(tmp_path)  # make_config pauses delivery
    try:
        base = base_of(svc)
        # an endpoint the dispatcher refuses to call (loopback): every POST fails, retried
        await svc.store.add_endpoint(WebhookEndpoint(
            id="wh_0123456789abcdef", url="http://127.0.0.1:9/hook", secret="whsec_x" * 4,
            events=(), created_at=time.time()))
        before = await samples(base)
        await send(base, key, {**SIMPLE, "to": ["a@one.test", "b@two.test", "c@two.test"]})
        single = await send(base, key, {**SIMPLE, "to": ["d@one.test"]})

        async def failed() -> bool:
            now = await samples(base)
            return value(now, "relay_webhook_attempts_total", result="failed") > value(
                before, "relay_webhook_attempts_total", result="failed")
        await until(failed)
        await asyncio.sleep(1.1)  # past the gauges' one-second cache
        now = await samples(base)
        held = await svc.store.hold(single, "test", time.time())
        await asyncio.sleep(1.1)
        later = await samples(base)
    finally:
        await svc.stop()
    assert value(now, "relay_queue_recipients", status="queued") == 4
    assert value(now, "relay_queue_recipients", status="deferred") == 0
    assert value(now, "relay_webhook_backlog") >= 2  # one email.queued event per message
    assert held == 1
    assert value(later, "relay_queue_recipients", status="held") == 1
    assert value(later, "relay_queue_recipients", status="queued") == 3


async def test_gauges_are_read_at_most_once_a_second(tmp_path: Path) -> None:
    svc, key = await start(tmp_path)
    try:
        base = base_of(svc)
        first = await samples(base)
        await send(base, key, SIMPLE)
        cached = await samples(base)  # within the second: the same numbers
        await asyncio.sleep(1.1)
        fresh = await samples(base)
    finally:
        await svc.stop()
    assert value(first, "relay_queue_recipients", status="queued") == 0
    assert value(cached, "relay_queue_recipients", status="queued") == 0
    assert value(fresh, "relay_queue_recipients", status="queued") == 1


# -- bounded destination labels ------------------------------------------------------------------


async def test_two_hundred_domains_make_at_most_n_plus_one_label_values(
        tmp_path: Path, dns: DNSServer) -> None:
    limit = 10
    domains = [f"d{i}.cardinality.test" for i in range(200)]  # none exists: bounced at once
    svc, key = await start(tmp_path, delivery=DeliveryConfig(**FAST),
                           dns=DnsConfig(nameservers=(dns.nameserver,), timeout=1.0),
                           metrics=MetricsConfig(domains=limit))
    try:
        base = base_of(svc)
        before = await samples(base)
        await send(base, key, {**SIMPLE, "to": [f"x@{d}" for d in domains]})

        def bounced(s: Samples) -> float:
            return sum(v for (name, labels), v in s.items()
                       if name == "relay_deliveries_total" and ("outcome", "bounced") in labels)

        async def all_bounced() -> bool:
            return bounced(await samples(base)) - bounced(before) >= 200
        await until(all_bounced, timeout=60)
        after = await samples(base)
    finally:
        await svc.stop()
    labels = {dict(labels)["domain"] for (name, labels), v in after.items()
              if name == "relay_deliveries_total" and v > value(before, name, **dict(labels))}
    assert len(labels) <= limit + 1
    assert "other" in labels
    assert len(labels - {"other"}) == limit and labels - {"other"} <= set(domains)
    assert value(after, "relay_deliveries_total", outcome="bounced", domain="other") - value(
        before, "relay_deliveries_total", outcome="bounced", domain="other") == 200 - limit


def test_domain_labels_are_first_come_and_bounded() -> None:
    label = metrics.DomainLabels(2)
    assert [label(d) for d in ("A.test", "b.test", "c.test", "a.test.", "x" * 300)] == [
        "a.test", "b.test", "other", "a.test", "other"]


# -- who may scrape ------------------------------------------------------------------------------


async def test_a_key_with_metrics_read_is_needed_when_configured(tmp_path: Path) -> None:
    svc, send_key = await start(tmp_path, metrics=MetricsConfig(require_key=True))
    try:
        base = base_of(svc)
        _, reader = await keys.create_key(svc.store, name="prom", scopes=["metrics:read"])
        no_key = await scrape(base)
        wrong_scope = await scrape(base, send_key)
        good = await scrape(base, reader)
    finally:
        await svc.stop()
    assert no_key[0] == 401 and "API key is required" in json.loads(no_key[2])["error"][
        "message"]
    assert wrong_scope[0] == 403 and "metrics:read" in wrong_scope[2]
    assert good[0] == 200 and "relay_queue_recipients" in good[2]


async def test_no_metrics_route_when_disabled(tmp_path: Path) -> None:
    svc, _ = await start(tmp_path, metrics=MetricsConfig(enabled=False))
    try:
        status, _, _ = await scrape(base_of(svc))
    finally:
        await svc.stop()
    assert status == 404


def test_auto_asks_for_a_key_only_off_loopback(tmp_path: Path) -> None:
    auto = make_config(tmp_path)
    assert not key_required(auto, "127.0.0.1")
    assert not key_required(auto, "::1")
    assert key_required(auto, "0.0.0.0")
    assert key_required(auto, "192.0.2.10")
    never = dataclasses.replace(auto, metrics=MetricsConfig(require_key=False))
    assert not key_required(never, "0.0.0.0")
    always = dataclasses.replace(auto, metrics=MetricsConfig(require_key=True))
    assert key_required(always, "127.0.0.1")


# -- a listener of its own -------------------------------------------------------------------


async def test_metrics_on_an_address_of_its_own(tmp_path: Path) -> None:
    svc, _ = await start(tmp_path, metrics=MetricsConfig(address="127.0.0.1:0"),
                         api=ApiConfig(enabled=False))
    try:
        assert svc.metrics_bound is not None
        base = "http://{}:{}".format(*svc.metrics_bound)
        status, _, text = await scrape(base)
        async with aiohttp.ClientSession() as session, \
                session.get(base + "/v1/emails") as resp:
            other = resp.status
    finally:
        await svc.stop()
    assert status == 200 and "relay_webhook_backlog" in text
    assert other == 404  # /metrics alone


async def test_a_taken_metrics_address_is_a_config_error(tmp_path: Path) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        svc = Service(make_config(tmp_path, metrics=MetricsConfig(address=f"127.0.0.1:{port}")))
        with pytest.raises(ConfigError) as err:
            await svc.start()
    finally:
        blocker.close()
        await blocker.wait_closed()
    assert err.value.key == "metrics.address"


def test_bad_metrics_settings_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    for text, key in (('[metrics]\nrequire_key = "maybe"\n', "metrics.require_key"),
                      ('[metrics]\naddress = "localhost:9025"\n', "metrics.address"),
                      ('[metrics]\ndomains = 0\n', "metrics.domains")):
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            load(path, environ={})
        assert err.value.key == key and str(path) in str(err.value)
    path.write_text('[metrics]\nrequire_key = false\naddress = "127.0.0.1"\n')
    loaded = load(path, environ={"RELAY_METRICS_DOMAINS": "7"}).metrics
    assert (loaded.require_key, loaded.address, loaded.domains) == (False, "127.0.0.1", 7)


# -- the worker's counts reach the master --------------------------------------------------------


def test_a_restarted_workers_counts_are_kept() -> None:
    remote = metrics.Remote()
    snap = [["relay_x", "counter", "x", [["relay_x_total", {"a": "1"}, 5.0]]]]
    remote.update(snap)
    remote.restarted()
    remote.update([["relay_x", "counter", "x", [["relay_x_total", {"a": "1"}, 2.0]]]])
    assert remote.total() == [["relay_x", "counter", "x", [["relay_x_total", {"a": "1"}, 7.0]]]]
    for bad in (b"{}", b"[1]", b'[["n","counter","h",[["s",{"a":1},1]]]]', b"not json"):
        with pytest.raises(ValueError):
            metrics.parse_snapshot(bad)


async def test_a_real_relay_process_shows_its_workers_deliveries(
        tmp_path: Path, relay_process: Any, dns: DNSServer) -> None:
    async with Sink() as sink:
        dns.add("example.org", "MX", "10 mx.example.org.")
        dns.add("mx.example.org", "A", "127.0.0.1")
        smtp, api = free_port(), free_port()
        toml = (f"[server]\nhostname = 'relay.test'\ndata_dir = '{tmp_path / 'data'}'\n"
                f"[[smtp.listeners]]\nport = {smtp}\n[api]\nport = {api}\n"
                f"[delivery]\nprocess = true\nmx_port = {sink.port}\nretry_min = 0.2\n"
                f"session_idle = 0.5\n[dns]\nnameservers = ['{dns.nameserver}']\n")
        (tmp_path / "relay.toml").write_text(toml)
        made = run_relay("--config", str(tmp_path / "relay.toml"), "keys", "create", "--name",
                         "t", "--json")
        key = json.loads(made.stdout)["key"]
        await asyncio.to_thread(relay_process, toml, smtp)
        await asyncio.to_thread(wait_port, api)  # the API starts just after SMTP
        base = f"http://127.0.0.1:{api}"
        await send(base, key, SIMPLE)
        await sink.wait_for(lambda s: len(s.delivered_to("bob@example.org")) == 1)

        async def arrived() -> bool:
            now = await samples(base)
            return value(now, "relay_deliveries_total", outcome="delivered",
                         domain="example.org") == 1
        await until(arrived)  # the worker's snapshot, a second later at most
        now = await samples(base)
    assert value(now, "relay_messages_accepted_total", source="api",
                 listener="api") == 1  # the master's
    assert value(now, "relay_delivery_attempt_seconds_count", outcome="delivered") == 1
    assert value(now, "relay_store_commit_seconds_count", process="worker") >= 1
    assert value(now, "relay_store_commit_seconds_count", process="master") >= 1


async def test_counters_survive_a_restart_of_the_worker(tmp_path: Path, dns: DNSServer) -> None:
    async with Sink() as sink:
        dns.add("example.org", "MX", "10 mx.example.org.")
        dns.add("mx.example.org", "A", "127.0.0.1")
        svc, key = await start(
            tmp_path, delivery=DeliveryConfig(mx_port=sink.port, **{**FAST, "process": True}),
            dns=DnsConfig(nameservers=(dns.nameserver,), timeout=1.0))
        try:
            base = base_of(svc)
            before = await samples(base)

            def delivered(s: Samples) -> float:
                return value(s, "relay_deliveries_total", outcome="delivered",
                             domain="example.org") - value(
                    before, "relay_deliveries_total", outcome="delivered", domain="example.org")

            async def counted(n: int) -> bool:
                return delivered(await samples(base)) == n

            await send(base, key, SIMPLE)
            await until(lambda: counted(1))
            assert svc.worker is not None
            old = svc.worker._proc  # the test kills the process the master supervises
            assert old is not None
            old.kill()
            await old.wait()
            assert await counted(1)  # the dead worker's count stays
            await send(base, key, SIMPLE)  # delivered by the new worker
            await until(lambda: counted(2))
        finally:
            await svc.stop()
    assert len(sink.delivered_to("bob@example.org")) == 2


def _counter(value: float, labels: dict[str, str] | None = None) -> metrics.Snapshot:
    return [["relay_x", "counter", "x", [["relay_x_total", labels or {}, value]]]]


def _value(snap: metrics.Snapshot) -> float:
    (family,) = snap
    return sum(v for _, _, v in family[3])


def test_remotes_keep_what_an_ended_process_counted_and_tell_equal_ones_apart() -> None:
    """The API workers' counts: a worker that ends leaves its counts in the total, and the
    one that leaves is the one given, though another has counted the same (Remote compares
    by value)."""
    remotes = metrics.Remotes()
    first, second = remotes.join(), remotes.join()
    first.update(_counter(3))
    second.update(_counter(3))
    remotes.leave(second)
    assert remotes.live == [first] and remotes.live[0] is first
    first.update(_counter(5))
    assert _value(remotes.total()) == 8
    remotes.leave(first)
    assert _value(remotes.total()) == 8 and remotes.live == []


def test_without_takes_one_process_out_of_everyones_counts() -> None:
    everyone = metrics.add(_counter(7, {"a": "1"}), _counter(2, {"a": "2"}))
    others = metrics.without(everyone, _counter(4, {"a": "1"}))
    (family,) = others
    assert sorted((labels["a"], v) for _, labels, v in family[3]) == [("1", 3.0), ("2", 2.0)]
