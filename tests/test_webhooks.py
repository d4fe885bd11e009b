"""Webhooks end to end: events fan out through the outbox to a real HTTP receiver on loopback,
which checks every POST with the standardwebhooks library and the drin SDK's verifier."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from drin.webhooks import verify_webhook
from standardwebhooks import Webhook

from relay.config import ApiConfig, Config, LimitsConfig, WebhooksConfig
from relay.feedback import webhooks
from relay.service import Service
from relay.types import WebhookEndpoint

from .apiutil import SIMPLE, api_client
from .conftest import free_port, make_config, store_execute, store_rows
from .rss import PeakRss


class Receiver:
    """An HTTP server that answers from a script and records what it got."""

    def __init__(self) -> None:
        self.port = free_port()
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.answers: list[int] = []  # consumed in order; then 200
        self.times: list[float] = []
        self.retry_after = ""
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        self.got.append((dict(request.headers), await request.read()))
        self.times.append(time.monotonic())
        status = self.answers.pop(0) if self.answers else 200
        headers = {"Retry-After": self.retry_after} if self.retry_after and status >= 400 else {}
        return web.Response(status=status, text="ok", headers=headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


def hook_config(tmp_path: Path, **options: Any) -> Config:
    opts = {"allow_private_targets": True, "retry_scale": 0.02, **options}
    return make_config(tmp_path, api=ApiConfig(port=0), webhooks=WebhooksConfig(**opts))


async def endpoint(svc: Service, url: str, events: tuple[str, ...] = ()) -> WebhookEndpoint:
    ep = WebhookEndpoint(id="wh_" + secrets.token_hex(8), url=url,
                         secret=webhooks.new_secret(), events=events, created_at=time.time())
    await svc.store.add_endpoint(ep)
    return ep


async def until(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def send_one(svc: Service) -> str:
    api = await api_client(svc)
    try:
        status, body, _ = await api.call("POST", "/v1/emails", {
            **SIMPLE, "metadata": {"userId": 7}, "tags": [{"name": "kind", "value": "r"}]})
        assert status == 202
        return str(body["id"])
    finally:
        await api.close()


def verified(ep: WebhookEndpoint, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    event = Webhook(ep.secret).verify(body, headers)
    drin = verify_webhook(body, headers["Drin-Signature"], ep.secret)
    assert drin.payload == event
    return dict(event)


async def test_events_arrive_signed_both_ways(tmp_path: Path, receiver: Receiver) -> None:
    svc = Service(hook_config(tmp_path))
    await svc.start()
    try:
        ep = await endpoint(svc, receiver.url, ("email.queued",))
        message_id = await send_one(svc)
        await until(lambda: receiver.got)
        headers, body = receiver.got[0]
        event = verified(ep, headers, body)
        assert event["type"] == "email.queued" and event["id"].startswith("evt_")
        assert event["data"]["messageId"] == message_id
        assert event["data"]["email"] == "bob@example.org"
        assert event["data"]["metadata"] == {"userId": 7}
        assert event["data"]["tags"] == [{"name": "kind", "value": "r"}]
        await svc.store.cancel(message_id, "test", time.time())  # email.cancelled: not asked for
        await asyncio.sleep(0.5)
        assert len(receiver.got) == 1
    finally:
        await svc.stop()


async def test_failures_are_retried_and_a_410_disables(tmp_path: Path,
                                                        receiver: Receiver) -> None:
    svc = Service(hook_config(tmp_path))
    await svc.start()
    try:
        ep = await endpoint(svc, receiver.url, ("email.queued",))
        receiver.answers = [500, 503]
        await send_one(svc)
        await until(lambda: len(receiver.got) == 3)
        ids = {h["webhook-id"] for h, _ in receiver.got}
        assert len(ids) == 1  # the same event, signed anew each time
        for headers, body in receiver.got:
            verified(ep, headers, body)
        await asyncio.sleep(0.2)
        rows = await svc.store.outbox(ep.id)
        assert rows[0]["attempts"] == 3 and rows[0]["delivered_at"] is not None

        receiver.answers = [410]
        await send_one(svc)
        await until(lambda: len(receiver.got) == 4)
        await asyncio.sleep(0.3)
        (listed,) = await svc.store.list_endpoints()
        assert not listed.enabled and "410" in (listed.disabled_reason or "")
        await send_one(svc)
        await asyncio.sleep(0.5)
        assert len(receiver.got) == 4  # nothing more to a disabled endpoint
    finally:
        await svc.stop()


async def test_deliveries_survive_a_restart_while_the_receiver_is_down(tmp_path: Path) -> None:
    down = Receiver()  # not started: connections are refused
    config = hook_config(tmp_path)
    svc = Service(config)
    await svc.start()
    try:
        ep = await endpoint(svc, down.url, ("email.queued",))
        await send_one(svc)
        await asyncio.sleep(0.5)
        rows = await svc.store.outbox(ep.id)
        assert rows and rows[0]["attempts"] >= 1 and rows[0]["delivered_at"] is None
    finally:
        await svc.stop()
    await down.start()
    svc = Service(config)
    await svc.start()
    try:
        await until(lambda: len(down.got) >= 1)
        verified(ep, *down.got[0])
    finally:
        await svc.stop()
        await down.stop()


async def test_private_targets_are_refused_by_default(tmp_path: Path,
                                                      receiver: Receiver) -> None:
    svc = Service(hook_config(tmp_path, allow_private_targets=False))
    await svc.start()
    try:
        by_ip = await endpoint(svc, receiver.url, ("email.queued",))
        by_name = await endpoint(svc, f"http://localhost:{receiver.port}/hook",
                                 ("email.queued",))
        await send_one(svc)
        await asyncio.sleep(1.0)
        assert receiver.got == []
        (ip_row,) = await svc.store.outbox(by_ip.id)
        (name_row,) = await svc.store.outbox(by_name.id)
        assert "private address" in ip_row["last_error"]
        assert "private addresses" in name_row["last_error"]
    finally:
        await svc.stop()


def test_private_address_rules() -> None:
    for address in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "169.254.169.254", "::1",
                    "fe80::1", "::ffff:127.0.0.1", "100.64.0.1", "0.0.0.0"):
        assert webhooks.private(address), address
    for address in ("93.184.216.34", "2606:4700::1111"):
        assert not webhooks.private(address), address


async def test_manage_endpoints_over_http_and_redeliver(tmp_path: Path,
                                                        receiver: Receiver) -> None:
    svc = Service(hook_config(tmp_path))
    await svc.start()
    api = await api_client(svc, ("webhooks:manage", "emails:send"))
    try:
        status, made, _ = await api.call("POST", "/v1/webhooks", {
            "url": receiver.url, "events": ["email.queued"]})
        assert status == 201 and made["signingSecret"].startswith("whsec_")
        status, listed, _ = await api.call("GET", "/v1/webhooks")
        assert [e["id"] for e in listed["data"]] == [made["id"]]
        assert "signingSecret" not in listed["data"][0] and "secret" not in str(listed)
        await send_one(svc)
        await until(lambda: len(receiver.got) == 1)
        headers, body = receiver.got[0]
        Webhook(made["signingSecret"]).verify(body, headers)
        event_id = headers["webhook-id"]
        status, rotated, _ = await api.call("POST", f"/v1/webhooks/{made['id']}/rotate-secret")
        assert status == 200 and rotated["signingSecret"] != made["signingSecret"]
        status, _, _ = await api.call("POST", f"/v1/webhooks/{made['id']}/redeliver",
                                      {"eventId": event_id})
        assert status == 202
        await until(lambda: len(receiver.got) == 2)
        headers, body = receiver.got[1]
        assert headers["webhook-id"] == event_id
        Webhook(rotated["signingSecret"]).verify(body, headers)  # signed with the new secret
        status, body, _ = await api.call("POST", f"/v1/webhooks/{made['id']}/redeliver",
                                         {"eventId": "evt_999999"})
        assert status == 404
        status, shown, _ = await api.call("PATCH", f"/v1/webhooks/{made['id']}",
                                          {"enabled": False})
        assert status == 200 and shown["enabled"] is False
        status, _, _ = await api.call("DELETE", f"/v1/webhooks/{made['id']}")
        assert status == 200
        status, _, _ = await api.call("GET", f"/v1/webhooks/{made['id']}")
        assert status == 404
        status, body, _ = await api.call("POST", "/v1/webhooks", {"url": "ftp://x.test/"})
        assert status == 422 and body["error"]["param"] == "url"
        status, body, _ = await api.call("POST", "/v1/webhooks", {
            "url": receiver.url, "events": ["email.nonsense"]})
        assert status == 422 and body["error"]["param"].startswith("events")
    finally:
        await api.close()
        await svc.stop()


async def test_private_targets_are_refused_at_registration(tmp_path: Path) -> None:
    svc = Service(hook_config(tmp_path, allow_private_targets=False))
    await svc.start()
    api = await api_client(svc, ("webhooks:manage",))
    try:
        for url in ("http://127.0.0.1:9/hook", "http://[::1]:9/", "http://169.254.169.254/",
                    "http://10.0.0.8/hook", "http://localhost:9/hook"):
            status, body, _ = await api.call("POST", "/v1/webhooks", {"url": url})
            assert status == 422 and body["error"]["param"] == "url", (url, body)
        assert await svc.store.list_endpoints() == []
    finally:
        await api.close()
        await svc.stop()


# IPv6 forms that carry a private IPv4 address (the last two are Teredo: its client part is
# stored inverted, so 7f00:1 there is not 127.0.0.1) and a public one that must still pass
TRANSLATED = ("64:ff9b::7f00:1", "::ffff:0:7f00:1", "2002:7f00:1::1", "::ffff:127.0.0.1",
              "64:ff9b:1::7f00:1", "64:ff9b::a9fe:a9fe", "2001:0:7f00:1::80ff:fffe",
              "2001:0:5db8:d822::ffff:ffff")


async def test_ipv6_translations_of_private_ipv4_are_refused(tmp_path: Path) -> None:
    assert not webhooks.private("64:ff9b::808:808")  # NAT64 of a public address
    assert not webhooks.private("2002:808:808::1")  # 6to4 of a public address
    svc = Service(hook_config(tmp_path, allow_private_targets=False))
    await svc.start()
    api = await api_client(svc, ("webhooks:manage",))
    try:
        for address in TRANSLATED:
            url = f"http://[{address}]:9/hook"
            status, body, _ = await api.call("POST", "/v1/webhooks", {"url": url})
            assert status == 422 and body["error"]["param"] == "url", (address, body)
            assert "private address" in body["error"]["message"]
            # and at delivery, for an endpoint stored before the rule (or by the CLI)
            assert webhooks.literal_refused(url, False), address
        assert await svc.store.list_endpoints() == []
    finally:
        await api.close()
        await svc.stop()


async def test_the_dispatcher_holds_a_bounded_batch_of_large_payloads(tmp_path: Path) -> None:
    """60 recipients' events each carry the message's 1 MiB of metadata: the dispatcher must
    not parse and serialize all 60 copies at once (it did: 100 x 10 MB was 6.8 GB RSS)."""
    got: list[int] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(len(await request.read()))
        return web.Response(text="ok")

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    config = make_config(tmp_path, api=ApiConfig(port=0), webhooks=WebhooksConfig(
        allow_private_targets=True), limits=LimitsConfig(max_metadata_size=2 * 1024 * 1024))
    svc = Service(config)
    await svc.start()
    api = await api_client(svc)
    try:
        await endpoint(svc, f"http://127.0.0.1:{port}/hook", ("email.queued",))
        to = [f"r{i}@example.org" for i in range(60)]
        status, body, _ = await api.call("POST", "/v1/emails", {
            **SIMPLE, "to": to, "metadata": {"blob": "x" * (1024 * 1024)}})
        assert status == 202, body
        with PeakRss() as peak:
            await until(lambda: len(got) == 60, timeout=60.0)
        assert all(n > 1024 * 1024 for n in got)
        assert peak.growth < 64 * 1024 * 1024, f"{peak.growth / 2**20:.0f} MiB more at peak"
    finally:
        await api.close()
        await svc.stop()
        await runner.cleanup()


def test_cli_adds_lists_rotates_and_deletes(tmp_path: Path) -> None:
    from .conftest import run_relay
    path = tmp_path / "relay.toml"
    path.write_text(f"[server]\nhostname = 'relay.test'\ndata_dir = '{tmp_path / 'data'}'\n"
                    "[webhooks]\nallow_private_targets = true\n")

    def relay(*args: str, code: int = 0) -> str:
        result = run_relay("--config", str(path), "webhooks", *args)
        assert result.returncode == code, result.stderr
        return result.stdout + result.stderr

    made = json.loads(relay("add", "http://127.0.0.1:9/hook", "--events",
                            "email.delivered,email.bounced", "--json"))
    assert made["signingSecret"].startswith("whsec_")
    assert made["events"] == ["email.delivered", "email.bounced"]
    listed = json.loads(relay("list", "--json"))
    assert [e["id"] for e in listed] == [made["id"]] and "whsec_" not in json.dumps(listed)
    assert "signing secret (shown once): whsec_" in relay("rotate", made["id"])
    assert "disable" in relay("disable", made["id"])
    assert json.loads(relay("list", "--json"))[0]["enabled"] is False
    relay("delete", made["id"])
    assert "no webhook" in relay("delete", made["id"], code=1)
    assert "unknown event" in relay("add", "http://127.0.0.1:9/", "--events", "nope", code=2)
    path.write_text(f"[server]\nhostname = 'relay.test'\ndata_dir = '{tmp_path / 'data'}'\n")
    assert "private address" in relay("add", "http://127.0.0.1:9/hook", code=1)


async def test_a_delivery_long_after_its_event_verifies_both_ways(tmp_path: Path,
                                                                  receiver: Receiver) -> None:
    """Standard Webhooks refuses a timestamp over 5 minutes old, Drin wants t = createdAt:
    a retry made 10 minutes after the event must satisfy both."""
    config = hook_config(tmp_path)
    svc = Service(config)
    await svc.start()
    try:
        ep = await endpoint(svc, receiver.url)
        old = time.time() - 600
        await store_execute(  # an event from 10 minutes ago
            svc, "INSERT INTO events (message_id, recipient_id, type, created_at, data)"
            " VALUES (NULL, NULL, 'email.delivered', ?, '{\"email\": \"b@x.test\"}')",
            (old,))
        await until(lambda: receiver.got)
        headers, body = receiver.got[0]
        event = verified(ep, headers, body)
        assert int(headers["webhook-timestamp"]) >= int(time.time()) - 5
        assert headers["Drin-Signature"].startswith(f"t={int(old)},")
        assert event["data"]["email"] == "b@x.test"
    finally:
        await svc.stop()


async def test_redirects_are_not_followed_and_long_failure_disables(tmp_path: Path) -> None:
    hits: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        hits.append(request.path)
        if request.path == "/hook":
            raise web.HTTPFound("/elsewhere")
        return web.Response(text="should not be reached")

    app = web.Application()
    app.router.add_post("/hook", redirect)
    app.router.add_post("/elsewhere", redirect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    config = hook_config(tmp_path, disable_after_days=1.0)
    svc = Service(config)
    await svc.start()
    try:
        ep = await endpoint(svc, f"http://127.0.0.1:{port}/hook", ("email.queued",))
        await send_one(svc)
        await until(lambda: len(hits) >= 1)
        await asyncio.sleep(0.3)
        assert "/elsewhere" not in hits
        rows = await svc.store.outbox(ep.id)
        assert rows[0]["last_status"] == 302 and rows[0]["delivered_at"] is None
        await store_execute(svc, "UPDATE webhook_endpoints SET failing_since = ?",
                            (time.time() - 2 * 86400,))  # failing for two days already
        seen = len(hits)
        await until(lambda: len(hits) > seen, 20)
        await asyncio.sleep(0.3)
        (listed,) = await svc.store.list_endpoints()
        assert not listed.enabled and "failed for 1 days" in (listed.disabled_reason or "")
        kinds = [r[0] for r in await store_rows(svc, "SELECT type FROM events")]
        assert "webhook.disabled" in kinds
    finally:
        await svc.stop()
        await runner.cleanup()


async def test_retry_after_is_honoured(tmp_path: Path, receiver: Receiver) -> None:
    svc = Service(hook_config(tmp_path))  # the schedule alone would retry after 0.1 s
    await svc.start()
    try:
        await endpoint(svc, receiver.url, ("email.queued",))
        receiver.answers, receiver.retry_after = [429], "2"
        await send_one(svc)
        await until(lambda: len(receiver.got) == 2, 20)
        assert receiver.times[1] - receiver.times[0] >= 1.9
    finally:
        await svc.stop()


async def test_commits_wake_the_dispatcher_at_most_every_wake_gap(tmp_path: Path) -> None:
    """Each round is a lease write and a read, even with no endpoint: under load a commit
    woke one each (3 % of a single send's CPU); now a round at most every WAKE_GAP."""
    svc = Service(make_config(tmp_path))
    await svc.start()
    rounds: list[float] = []
    lease = svc.store.lease_deliveries

    async def counted(*args: Any, **kwargs: Any) -> Any:
        rounds.append(time.monotonic())
        return await lease(*args, **kwargs)

    try:
        await asyncio.sleep(0.1)
        svc.store.lease_deliveries = counted  # type: ignore[method-assign]
        start = time.monotonic()
        while time.monotonic() - start < 0.5:  # 100 commits' wakes in half a second
            svc.submitter.notify_queued()
            await asyncio.sleep(0.005)
        assert 3 <= len(rounds) <= 0.5 / webhooks.WAKE_GAP + 2, rounds
        assert min(b - a for a, b in zip(rounds, rounds[1:])) >= webhooks.WAKE_GAP * 0.9
    finally:
        await svc.stop()
