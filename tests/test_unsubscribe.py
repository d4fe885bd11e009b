"""One-click unsubscribe (RFC 8058): broadcast mail carries both headers under its DKIM
signature, one token per recipient; the POST suppresses that sender's broadcast mail only."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import time
from pathlib import Path

import aiohttp

from relay import domains
from relay.config import ApiConfig, DeliveryConfig, DnsConfig, TrackingConfig
from relay.service import Service

from .apiutil import SIMPLE, api_client
from .conftest import free_port, make_config
from .dnsserver import DNSServer
from .sink import Sink
from .test_delivery import FAST, route, wait_final
from .test_dkim import verify_all


def publish(dns: DNSServer, config: object, domain: domains.Domain) -> None:
    for r in domains.records(config, domain):  # type: ignore[arg-type]
        if r.type == "TXT":
            dns.add(r.name, "TXT", " ".join(f'"{c}"' for c in domains.split_txt(r.value)))


async def delivering(tmp_path: Path, dns: DNSServer, sink: Sink) -> Service:
    """relay delivering to `sink` as example.org's MX, its public URL its real API port (the
    links in the mail must reach it)."""
    route(dns, "example.org", (10, "mx.example.org", "127.0.0.1"))
    port = free_port()
    svc = Service(make_config(
        tmp_path, delivery=DeliveryConfig(mx_port=sink.port, **FAST),
        dns=DnsConfig(nameservers=(dns.nameserver,), timeout=1.0),
        api=ApiConfig(port=port, public_url=f"http://127.0.0.1:{port}")))
    await svc.start()
    return svc


async def test_broadcast_mail_unsubscribes_in_one_click(tmp_path: Path, dns: DNSServer) -> None:
    async with Sink() as sink:
        svc = await delivering(tmp_path, dns, sink)
        config = svc.config
        domain = domains.make_domain(config, "example.com", time.time())
        await svc.store.save_domain(domain)
        publish(dns, config, domain)
        api = await api_client(svc)
        try:
            status, sent, _ = await api.call("POST", "/v1/emails", {
                **SIMPLE, "to": ["bob@example.org", "carol@example.org"],
                "stream": "broadcast"})
            assert status == 202, sent
            await wait_final(svc, sent["id"])
            got = {m.rcpt_tos[0]: m.data for m in sink.messages}
            assert set(got) == {"bob@example.org", "carol@example.org"}  # one copy each
            links = {}
            for rcpt, data in got.items():
                m = email.message_from_bytes(data, policy=email.policy.default)
                assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
                found = re.match(r"<(http://[^>]+/u/([a-z0-9]+))>, <mailto:unsub\+(\2)@"
                                 r"bounces\.example\.com>", str(m["List-Unsubscribe"]))
                assert found, m["List-Unsubscribe"]
                links[rcpt] = found.group(1)
                results = await asyncio.to_thread(verify_all, data, dns.nameserver)
                assert [r[2] for r in results] == [True, True]
                h = re.search(rb"h=([^;]+);", data.split(b"\r\n\r\n")[0].replace(b"\r\n ", b""))
                assert h is not None
                signed = [x.strip() for x in h.group(1).decode().split(":")]
                assert signed.count("list-unsubscribe") == 2  # present once, oversigned
                assert signed.count("list-unsubscribe-post") == 2
            assert links["bob@example.org"] != links["carol@example.org"]

            async with aiohttp.ClientSession() as web:
                async with web.get(links["bob@example.org"]) as resp:
                    assert resp.status == 200 and "<form" in await resp.text()
                assert await svc.store.list_suppressions() == []  # a GET changes nothing
                tampered = links["bob@example.org"][:-2] + "aa"
                async with web.post(tampered, data={"List-Unsubscribe": "One-Click"}) as resp:
                    assert resp.status == 404
                async with web.post(links["bob@example.org"], allow_redirects=False,
                                    data={"List-Unsubscribe": "One-Click"}) as resp:
                    assert resp.status == 200
            (entry,) = await svc.store.list_suppressions()
            assert (entry.address, entry.scope, entry.reason) == (
                "bob@example.org", "example.com", "unsubscribed")
            detail = await svc.store.get_message(sent["id"])
            assert detail is not None
            assert [e.data["email"] for e in detail.events if e.type == "email.unsubscribed"] \
                == ["bob@example.org"]

            # a later broadcast drops bob with an event; a transactional one reaches him
            status, later, _ = await api.call("POST", "/v1/emails", {
                **SIMPLE, "to": ["bob@example.org", "carol@example.org"],
                "stream": "broadcast"})
            assert status == 202
            detail = await wait_final(svc, later["id"])
            assert {r.address: r.status.value for r in detail.recipients} == {
                "bob@example.org": "suppressed", "carol@example.org": "delivered"}
            assert any(e.type == "email.dropped" for e in detail.events)
            status, plain, _ = await api.call("POST", "/v1/emails", {
                **SIMPLE, "to": ["bob@example.org"]})
            assert status == 202
            detail = await wait_final(svc, plain["id"])
            assert detail.recipients[0].status.value == "delivered"
        finally:
            await api.close()
            await svc.stop()


async def test_broadcast_needs_https_and_a_signing_key(tmp_path: Path) -> None:
    config = make_config(tmp_path, tracking=TrackingConfig(allow_insecure_public_url=False))
    svc = Service(config)
    await svc.start()
    api = await api_client(svc)
    try:
        status, body, _ = await api.call("POST", "/v1/emails", {**SIMPLE,
                                                                "stream": "broadcast"})
        assert status == 422 and body["error"]["param"] == "stream"
        assert "https" in body["error"]["message"]
    finally:
        await api.close()
        await svc.stop()
    svc = Service(make_config(tmp_path / "b"))  # http allowed, but example.com has no key
    await svc.start()
    api = await api_client(svc)
    try:
        status, body, _ = await api.call("POST", "/v1/emails", {**SIMPLE,
                                                                "stream": "broadcast"})
        assert status == 422 and "no key" in body["error"]["message"]
        status, body, _ = await api.call("POST", "/v1/emails/batch", {"emails": [
            {**SIMPLE, "stream": "broadcast"}, SIMPLE]})
        assert body["results"][0]["error"]["param"] == "emails[0].stream"
        assert body["results"][1]["status"] == "queued"
    finally:
        await api.close()
        await svc.stop()
