"""The suppression list: managed over HTTP and the CLI, checked when mail is queued (scheduled
mail: only when it goes out) and again when it goes out; an unsubscribe is scoped to its
sending domain's broadcast mail."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from drin import DrinClient, DrinSuppressedError

from relay import keys
from relay.config import DeliveryConfig, DnsConfig
from relay.service import Service
from relay.types import Suppression

from .apiutil import SIMPLE, Api, api_client
from .conftest import add_signing_domain, make_config, run_relay
from .dnsserver import DNSServer
from .sink import Sink
from .smtputil import in_thread, send
from .test_delivery import FAST, route, wait_final


async def _delivering(tmp_path: Path, dns: DNSServer, sink: Sink) -> Service:
    """A started relay that delivers example.org's mail to `sink`; the caller stops it."""
    route(dns, "example.org", (10, "mx.example.org", "127.0.0.1"))
    svc = Service(make_config(tmp_path, delivery=DeliveryConfig(mx_port=sink.port, **FAST),
                              dns=DnsConfig(nameservers=(dns.nameserver,), timeout=1.0)))
    await svc.start()
    return svc


def entry(address: str, scope: str = "", reason: str = "manual") -> Suppression:
    return Suppression(address=address, scope=scope, reason=reason, source="test",
                       created_at=time.time())


async def test_manage_the_list_over_http(api: Api, service: Service) -> None:
    _, admin = await keys.create_key(service.store, name="s", scopes=["suppressions:manage"])
    status, body, _ = await api.call("POST", "/v1/suppressions", {"email": "Gone@EXAMPLE.org",
                                                                  "reason": "hard_bounce"},
                                     key=admin)
    assert status == 201 and body["email"] == "Gone@example.org" and body["scope"] is None
    status, _, _ = await api.call("POST", "/v1/suppressions", {"email": "Gone@example.org"},
                                  key=admin)
    assert status == 200  # already there; the first reason stays
    status, body, _ = await api.call("POST", "/v1/suppressions", {
        "email": "reader@example.org", "reason": "unsubscribed", "scope": "News.Example.com"},
                                     key=admin)
    assert status == 201 and body["scope"] == "news.example.com"
    status, page, _ = await api.call("GET", "/v1/suppressions", key=admin)
    assert [(e["email"], e["reason"]) for e in page["data"]] == [
        ("Gone@example.org", "hard_bounce"), ("reader@example.org", "unsubscribed")]
    status, page, _ = await api.call("GET", "/v1/suppressions?limit=1", key=admin)
    assert len(page["data"]) == 1 and page["nextCursor"] == "Gone@example.org"
    status, body, _ = await api.call("POST", "/v1/suppressions", {"email": "nope"}, key=admin)
    assert status == 422 and body["error"]["param"] == "email"
    status, body, _ = await api.call("POST", "/v1/suppressions", {"email": "a@b.test"})
    assert status == 403  # the fixture's key lacks suppressions:manage
    status, _, _ = await api.call("DELETE", "/v1/suppressions/Gone@example.org", key=admin)
    assert status == 200
    status, body, _ = await api.call("DELETE", "/v1/suppressions/Gone@example.org", key=admin)
    assert status == 404


async def test_suppressed_recipients_are_dropped_at_submit(api: Api, service: Service) -> None:
    await service.store.add_suppression(entry("gone@example.org", reason="hard_bounce"))
    status, body, _ = await api.call("POST", "/v1/emails", {
        **SIMPLE, "to": ["gone@example.org", "bob@example.org"]})
    assert status == 202 and body["status"] == "queued"
    detail = await service.store.get_message(body["id"])
    assert detail is not None
    assert {r.address: r.status.value for r in detail.recipients} == {
        "gone@example.org": "suppressed", "bob@example.org": "queued"}
    dropped = [e for e in detail.events if e.type == "email.dropped"]
    assert [(e.data["email"], e.data["reason"]) for e in dropped] == [
        ("gone@example.org", "hard_bounce")]
    # every recipient suppressed: 409, nothing queued
    before = len((await service.store.list_messages()).items)
    status, body, _ = await api.call("POST", "/v1/emails", {**SIMPLE, "to": ["gone@example.org"]})
    assert status == 409 and body["error"]["type"] == "suppressed"
    assert len((await service.store.list_messages()).items) == before
    # in a batch, that item alone fails
    status, body, _ = await api.call("POST", "/v1/emails/batch", {"emails": [
        {**SIMPLE, "to": ["gone@example.org"]}, SIMPLE]})
    assert status == 207
    assert body["results"][0]["error"]["type"] == "suppressed"
    assert body["results"][1]["status"] == "queued"


async def test_an_unsubscribe_stops_that_domains_broadcast_mail_only(api: Api,
                                                                     service: Service) -> None:
    await add_signing_domain(service, "example.com")
    await add_signing_domain(service, "other.example")
    await service.store.add_suppression(entry("reader@example.org", "example.com",
                                              "unsubscribed"))
    to_reader = {**SIMPLE, "to": ["reader@example.org"]}
    status, body, _ = await api.call("POST", "/v1/emails", {**to_reader, "stream": "broadcast"})
    assert status == 409 and body["error"]["type"] == "suppressed"
    status, body, _ = await api.call("POST", "/v1/emails", to_reader)  # transactional
    assert status == 202
    status, body, _ = await api.call("POST", "/v1/emails", {
        **to_reader, "stream": "broadcast", "from": "news@other.example"})
    assert status == 202  # another sender's list


async def test_suppressed_after_queueing_is_dropped_when_the_mail_goes_out(
        tmp_path: Path, dns: DNSServer) -> None:
    async with Sink() as sink:
        svc = await _delivering(tmp_path, dns, sink)
        api = await api_client(svc)
        try:
            when = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
            status, body, _ = await api.call("POST", "/v1/emails", {
                **SIMPLE, "to": ["late@example.org", "bob@example.org"], "scheduledAt": when})
            assert status == 202 and body["status"] == "scheduled"
            await svc.store.add_suppression(entry("late@example.org", reason="complaint"))
            detail = await wait_final(svc, body["id"])
            assert {r.address: r.status.value for r in detail.recipients} == {
                "late@example.org": "suppressed", "bob@example.org": "delivered"}
            assert [a.recipient_id for a in detail.attempts] == [
                r.id for r in detail.recipients if r.address == "bob@example.org"]
            assert [m.rcpt_tos for m in sink.messages] == [["bob@example.org"]]
            dropped = [e.data for e in detail.events if e.type == "email.dropped"]
            assert dropped == [{"email": "late@example.org", "reason": "complaint",
                                "stage": "send"}]
        finally:
            await api.close()
            await svc.stop()


async def test_an_address_that_bounces_hard_during_delivery_is_suppressed(
        tmp_path: Path, dns: DNSServer) -> None:
    """Seed 003: "an address that bounces in the meantime is still protected". A hard bounce
    during relay's own delivery suppresses the address, as one that comes back later does
    (inbound); a soft one (a filter's refusal) does not."""
    replies = {"gone@example.org": ["550 5.1.1 <gone@example.org>: Recipient address rejected:"
                                    " User unknown in virtual mailbox table"],
               "picky@example.org": ["550 5.7.1 Message rejected as spam"]}
    async with Sink(replies=replies) as sink:
        svc = await _delivering(tmp_path, dns, sink)
        api = await api_client(svc)
        try:
            status, body, _ = await api.call("POST", "/v1/emails", {
                **SIMPLE, "to": ["gone@example.org", "picky@example.org", "bob@example.org"]})
            assert status == 202
            detail = await wait_final(svc, body["id"])
            address = {r.id: r.address for r in detail.recipients}
            assert {address[e.recipient_id]: e.data["class"] for e in detail.events
                    if e.type == "email.bounced"} == {"gone@example.org": "hard",
                                                       "picky@example.org": "soft"}
            listed = await svc.store.list_suppressions()
            assert [(e.address, e.scope, e.reason, e.source) for e in listed] == [
                ("gone@example.org", "", "hard_bounce", f"bounce:{body['id']}")]
            # the next message to it is not sent; the soft-bounced address still gets mail
            status, body, _ = await api.call("POST", "/v1/emails", {
                **SIMPLE, "to": ["gone@example.org"]})
            assert status == 409 and body["error"]["type"] == "suppressed"
            status, body, _ = await api.call("POST", "/v1/emails", {
                **SIMPLE, "to": ["picky@example.org"]})
            assert status == 202
            assert len(sink.delivered_to("gone@example.org")) == 0
        finally:
            await api.close()
            await svc.stop()


async def test_scheduling_to_a_suppressed_address_is_accepted_and_screened_when_it_goes_out(
        tmp_path: Path, dns: DNSServer) -> None:
    """Seed 003: the list is checked when a scheduled message goes out, not when it is
    scheduled. The SDK's send gets 202 scheduled; at its time the scheduler drops it."""
    async with Sink() as sink:
        svc = await _delivering(tmp_path, dns, sink)
        try:
            await svc.store.add_suppression(entry("gone@example.org", reason="hard_bounce"))
            _, secret = await keys.create_key(svc.store, name="sdk", scopes=["emails:send"])
            assert svc.api_bound is not None
            drin = DrinClient(api_key=secret, max_retries=0,
                              base_url="http://{}:{}".format(*svc.api_bound))
            when = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
            alone = await in_thread(drin.emails.send, {
                **SIMPLE, "to": ["gone@example.org"], "scheduledAt": when})
            assert alone["status"] == "scheduled"
            both = await in_thread(drin.emails.send, {
                **SIMPLE, "to": ["gone@example.org", "bob@example.org"], "scheduledAt": when})
            assert both["status"] == "scheduled"
            waiting = await svc.store.get_message(alone["id"])
            assert waiting is not None and [r.status.value for r in waiting.recipients] == [
                "scheduled"]
            # sent now, it is refused as before: only scheduling waits for the send time
            with pytest.raises(DrinSuppressedError):
                await in_thread(drin.emails.send, {**SIMPLE, "to": ["gone@example.org"]})
            first = await wait_final(svc, alone["id"])
            assert [r.status.value for r in first.recipients] == ["suppressed"]
            assert [e.data for e in first.events if e.type == "email.dropped"] == [
                {"email": "gone@example.org", "reason": "hard_bounce", "stage": "send"}]
            second = await wait_final(svc, both["id"])
            assert {r.address: r.status.value for r in second.recipients} == {
                "gone@example.org": "suppressed", "bob@example.org": "delivered"}
            assert [m.rcpt_tos for m in sink.messages] == [["bob@example.org"]]
        finally:
            await svc.stop()


async def test_smtp_mail_to_a_suppressed_address_is_dropped_with_an_event(
        service: Service) -> None:
    await service.store.add_suppression(entry("bob@example.org"))
    _, secret = await keys.create_key(service.store, name="smtp", scopes=["emails:send"])
    code, text = await in_thread(send, service.bound[0][1], secret)
    assert code == 250
    message_id = text.decode().split()[-1]
    detail = await service.store.get_message(message_id)
    assert detail is not None and detail.message.status == "suppressed"
    assert [e.type for e in detail.events] == ["email.dropped"]


def test_cli_adds_lists_and_removes(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"[server]\nhostname = 'relay.test'\ndata_dir = '{tmp_path / 'data'}'\n")

    def relay(*args: str, code: int = 0) -> str:
        result = run_relay("--config", str(path), "suppressions", *args)
        assert result.returncode == code, result.stderr
        return result.stdout + result.stderr

    assert "all mail suppressed" in relay("add", "x@Example.ORG", "--reason", "complaint")
    assert "broadcast mail suppressed" in relay("add", "y@example.org", "--scope", "a.test")
    listed = json.loads(relay("list", "--json"))
    assert [(e["email"], e["scope"], e["reason"]) for e in listed] == [
        ("x@example.org", None, "complaint"), ("y@example.org", "a.test", "manual")]
    assert "removed" in relay("remove", "x@example.org")
    assert "not suppressed" in relay("remove", "x@example.org", code=1)
    assert "not an address" in relay("add", "nope", code=1)


async def test_concurrent_submits_screen_consistently(api: Api, service: Service) -> None:
    await service.store.add_suppression(entry("gone@example.org"))
    answers = await asyncio.gather(*(api.call("POST", "/v1/emails", {
        **SIMPLE, "to": ["gone@example.org"]}) for _ in range(10)))
    assert {a[0] for a in answers} == {409}
