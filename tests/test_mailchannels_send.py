"""The MailChannels dialect's /tx/v1/send and /send-async, driven by the `mailchannels` SDK
from PyPI with relay's /tx/v1 as its base URL, delivering to a real SMTP sink; its reserved
headers, campaign_id and other refusals over plain HTTP."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import mailchannels
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mailchannels.exceptions import InvalidRequestError, NotFoundError

from relay import keys
from relay.config import ApiConfig, DeliveryConfig, DnsConfig, WebhooksConfig
from relay.delivery import dkim
from relay.service import Service
from relay.types import Suppression

from .conftest import add_signing_domain, free_port, make_config
from .dnsserver import DNSServer
from .sink import Sink
from .test_delivery import FAST, route, wait_final
from .test_dkim import verify_all
from .test_webhooks import Receiver, until

HTML = "<p>Hello {{name}} &amp; friends</p>{{#items}}<li>{{.}}</li>{{/items}}"


async def start(tmp_path: Path, dns: DNSServer, sink: Sink) -> tuple[Service, str]:
    """relay delivering example.org's mail to `sink`, and a key for every scope."""
    route(dns, "example.org", (10, "mx.example.org", "127.0.0.1"))
    port = free_port()
    svc = Service(make_config(
        tmp_path, delivery=DeliveryConfig(mx_port=sink.port, **FAST),
        dns=DnsConfig(nameservers=(dns.nameserver,), timeout=1.0),
        api=ApiConfig(port=port, public_url=f"http://127.0.0.1:{port}"),
        webhooks=WebhooksConfig(allow_private_targets=True, retry_scale=0.02)))
    await svc.start()
    _, secret = await keys.create_key(svc.store, name="mc", scopes=(
        "emails:send", "emails:read", "webhooks:manage"))
    return svc, secret


def client(svc: Service, secret: str) -> mailchannels.Client[Any]:
    assert svc.api_bound is not None
    return mailchannels.Client(api_key=secret,
                               base_url="http://{}:{}/tx/v1".format(*svc.api_bound))


def der_key(dns: DNSServer, domain: str, selector: str) -> str:
    """An RSA key as MailChannels' docs make it (base64 DER), published in the DNS."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    dns.add(f"{selector}._domainkey.{domain}", "TXT", " ".join(
        f'"{c}"' for c in _chunks(dkim.record_text(key))))
    return base64.b64encode(key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())).decode()


def _chunks(text: str) -> list[str]:
    return [text[i:i + 255] for i in range(0, len(text), 255)]


def parsed(data: bytes) -> email.message.EmailMessage:
    m = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(m, email.message.EmailMessage)
    return m


def body_of(m: email.message.EmailMessage, kind: str) -> str:
    part = m.get_body(preferencelist=(kind,))
    assert part is not None
    return str(part.get_content())


def by_rcpt(sink: Sink, address: str) -> list[Any]:
    return [r for r in sink.messages if address in r.rcpt_tos]


async def test_sdk_send_and_queue_deliver_and_a_personalizations_key_signs(
        tmp_path: Path, dns: DNSServer) -> None:
    async with Sink() as sink:
        svc, secret = await start(tmp_path, dns, sink)
        mc = client(svc, secret)
        try:
            key = der_key(dns, "client.test", "mc1")
            sent = await asyncio.to_thread(mc.emails.send, {
                "from": {"email": "alice@example.com", "name": "Alice"},
                "subject": "Your order",
                "reply_to": {"email": "help@example.com"},
                "headers": {"X-Order": "root", "X-Shop": "main"},
                "content": [
                    {"type": "text/plain", "value": "Hi {{name}} & co", "template_type":
                     "mustache"},
                    {"type": "text/html", "value": HTML, "template_type": "mustache"}],
                "attachments": [{"filename": "r.bin", "type": "application/octet-stream",
                                 "content": base64.b64encode(bytes(range(256))).decode()}],
                "campaign_id": "spring-2026",
                "personalizations": [
                    {"to": [{"email": "bob@example.org", "name": "Bob"}],
                     "cc": [{"email": "carol@example.org"}],
                     "bcc": [{"email": "archive@example.org"}],
                     "headers": {"x-order": "personal"},
                     "dynamic_template_data": {"name": "Bob <3", "items": ["a", "b"]},
                     "dkim_domain": "client.test", "dkim_selector": "mc1",
                     "dkim_private_key": key},
                    {"to": [{"email": "dave@example.org"}], "subject": "For Dave",
                     "from": {"email": "shop@example.com"},
                     "envelope_from": {"email": "returns@example.com"},
                     "dynamic_template_data": {"name": "Dave"}}]})
            assert set(sent) >= {"request_id", "results"}
            assert [(r["index"], r["status"]) for r in sent["results"]] == [(0, "sent"),
                                                                            (1, "sent")]
            first, second = (r["message_id"] for r in sent["results"])
            for message_id in (first, second):
                detail = await wait_final(svc, message_id)
                assert {r.status.value for r in detail.recipients} == {"delivered"}
                assert detail.message.metadata == {"requestId": sent["request_id"],
                                                   "campaignId": "spring-2026"}

            bob = by_rcpt(sink, "bob@example.org")[0]
            assert {"carol@example.org", "archive@example.org"} <= set(
                sum((r.rcpt_tos for r in sink.messages), []))
            m = parsed(bob.data)
            assert m["Subject"] == "Your order" and m["Reply-To"] == "help@example.com"
            assert "archive" not in bob.data.decode()  # Bcc is the envelope's only
            assert m["X-Order"] == "personal" and m["X-Shop"] == "main"
            assert len(m.get_all("X-Order") or []) == 1
            assert body_of(m, "plain").strip() == "Hi Bob <3 & co"
            assert "Hello Bob &lt;3 &amp; friends" in body_of(m, "html")
            assert "<li>a</li><li>b</li>" in body_of(m, "html")
            assert [a.get_filename() for a in m.iter_attachments()] == ["r.bin"]
            assert await asyncio.to_thread(verify_all, bob.data, dns.nameserver) == [
                (b"client.test", b"rsa-sha256", True)]
            assert bob.mail_from.startswith("bounces+")  # relay's VERP return path

            dave = by_rcpt(sink, "dave@example.org")[0]
            m = parsed(dave.data)
            assert m["Subject"] == "For Dave" and m["From"] == "shop@example.com"
            assert m["X-Order"] == "root"
            assert dave.mail_from == "returns@example.com"  # envelope_from is kept
            assert "DKIM-Signature" not in m  # no key given and example.com has none

            queued = await asyncio.to_thread(mc.emails.queue, {
                "from": {"email": "alice@example.com"}, "subject": "Later",
                "content": [{"type": "text/plain", "value": "queued"}],
                "personalizations": [{"to": [{"email": "erin@example.org"}]}]})
            assert set(queued) - {"http_headers"} == {"queued_at", "request_id"}
            assert queued["queued_at"].endswith("Z")
            await until(lambda: by_rcpt(sink, "erin@example.org"))
            assert parsed(by_rcpt(sink, "erin@example.org")[0].data)["Subject"] == "Later"
        finally:
            await svc.stop()


async def test_non_transactional_mail_and_the_dry_run(tmp_path: Path, dns: DNSServer) -> None:
    async with Sink() as sink:
        svc, secret = await start(tmp_path, dns, sink)
        mc = client(svc, secret)
        try:
            key = der_key(dns, "example.com", "mc2")
            mail = {
                "from": {"email": "news@example.com"}, "subject": "News",
                "transactional": False,
                "content": [{"type": "text/html", "value": "<p>news</p>"}],
                "personalizations": [{"to": [{"email": "bob@example.org"},
                                             {"email": "carol@example.org"}]}],
                "dkim_domain": "example.com", "dkim_selector": "mc2", "dkim_private_key": key}
            with pytest.raises(InvalidRequestError) as refused:
                await asyncio.to_thread(mc.emails.send, mail)
            assert refused.value.status_code == 400
            assert "one recipient per personalization" in str(refused.value)

            mail["personalizations"] = [{"to": [{"email": "bob@example.org"}]}]
            dry = await asyncio.to_thread(mc.emails.send, mail, dry_run=True)
            (text,) = dry["data"]
            assert "Subject: News" in text and "DKIM-Signature:" in text
            assert not (await svc.store.list_messages(limit=10)).items  # nothing queued

            sent = await asyncio.to_thread(mc.emails.send, mail)
            (result,) = sent["results"]
            await wait_final(svc, result["message_id"])
            (got,) = sink.messages  # the dry run sent nothing
            m = parsed(got.data)
            assert m["List-Unsubscribe"].startswith("<http")
            assert m["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
            signed = re.search(rb"\bh=([^;]+);", got.data.split(b"\r\n\r\n")[0].replace(
                b"\r\n", b"").replace(b"\t", b"").replace(b" ", b""))
            assert signed is not None
            assert b"list-unsubscribe:list-unsubscribe-post" in signed.group(1).lower()
            assert await asyncio.to_thread(verify_all, got.data, dns.nameserver) == [
                (b"example.com", b"rsa-sha256", True)]

            # without a key anywhere, non-transactional mail cannot be signed: 400
            del mail["dkim_domain"], mail["dkim_selector"], mail["dkim_private_key"]
            mail["from"] = {"email": "news@unsigned.example"}
            with pytest.raises(InvalidRequestError, match="DKIM"):
                await asyncio.to_thread(mc.emails.send, mail)
            # a selector relay holds for the From domain signs with relay's keys
            await add_signing_domain(svc, "signed.example")
            found = await svc.store.get_domain("signed.example")
            assert found is not None
            mail["from"] = {"email": "news@signed.example"}
            mail["dkim_selector"] = found.keys[0].selector
            sent = await asyncio.to_thread(mc.emails.send, mail)
            assert sent["results"][0]["status"] == "sent"
        finally:
            await svc.stop()


async def test_webhook_enrolment_through_the_sdk_gets_events_in_its_shape(
        tmp_path: Path, dns: DNSServer) -> None:
    rx = Receiver()
    await rx.start()
    async with Sink() as sink:
        svc, secret = await start(tmp_path, dns, sink)
        mc = client(svc, secret)
        try:
            await asyncio.to_thread(mc.webhooks.create, rx.url)
            listed = await asyncio.to_thread(mc.webhooks.list)
            assert listed["data"] == [{"webhook": rx.url}]
            sent = await asyncio.to_thread(mc.emails.send, {
                "from": {"email": "alice@example.com"}, "subject": "s", "campaign_id": "c1",
                "content": [{"type": "text/plain", "value": "x"}],
                "personalizations": [{"to": [{"email": "bob@example.org"}]}]})
            await until(lambda: any(b"delivered" in body for _, body in rx.got))
            events = [item for _, body in rx.got for item in json.loads(body)]
            delivered = next(e for e in events if e["event"] == "delivered")
            assert delivered["request_id"] == sent["request_id"]
            assert delivered["campaign_id"] == "c1"
            assert delivered["message_id"] == sent["results"][0]["message_id"]
            await asyncio.to_thread(mc.webhooks.delete_all)
            assert (await asyncio.to_thread(mc.webhooks.list))["data"] == []
        finally:
            await svc.stop()
            await rx.stop()


async def test_refusals_name_the_field(tmp_path: Path, dns: DNSServer) -> None:
    async with Sink() as sink:
        svc, secret = await start(tmp_path, dns, sink)
        assert svc.api_bound is not None
        base = "http://{}:{}/tx/v1".format(*svc.api_bound)
        good: dict[str, Any] = {
            "from": {"email": "alice@example.com"}, "subject": "s",
            "content": [{"type": "text/plain", "value": "x"}],
            "personalizations": [{"to": [{"email": "bob@example.org"}]}]}

        async def post(body: Any, *, path: str = "/send", key: str | None = secret
                       ) -> tuple[int, Any]:
            headers = {"X-Api-Key": key} if key else {}
            async with aiohttp.ClientSession() as s, s.post(base + path, json=body,
                                                            headers=headers) as r:
                return r.status, await r.json()

        try:
            for headers, where in (({"From": "x@example.com"}, "headers.From"),
                                   ({"dkim-signature": "v=1"}, "headers.dkim-signature")):
                status, answer = await post({**good, "headers": headers})
                assert status == 400 and answer["param"] == where, answer
                assert "reserved" in answer["errors"][0]
            status, answer = await post({**good, "personalizations": [
                {"to": [{"email": "bob@example.org"}], "headers": {"cc": "c@example.org"}}]})
            assert status == 400 and answer["param"] == "personalizations[0].headers.cc"
            for campaign in ("x" * 49, "two words", ""):
                status, answer = await post({**good, "campaign_id": campaign},
                                            path="/send-async")
                assert status == 400 and answer["param"] == "campaign_id", answer
            assert (await post({**good, "campaign_id": "é" * 48}))[0] == 200
            cases: list[tuple[dict[str, Any], str]] = [
                ({"dkim_domain": "example.com"}, "dkim_selector"),
                ({"dkim_domain": "example.com", "dkim_selector": "s",
                  "dkim_private_key": "bm90IGEga2V5"}, "dkim_private_key"),
                # the seed: a private key needs its dkim_domain as well as its selector
                ({"dkim_selector": "s", "dkim_private_key": "bm90IGEga2V5"}, "dkim_domain"),
                ({"personalizations": [{"to": [{"email": "bob@example.org"}],
                                        "dkim_selector": "s",
                                        "dkim_private_key": "bm90IGEga2V5"}]},
                 "personalizations[0].dkim_domain"),
                ({"tracking_settings": {"open_tracking": {
                    "enable": True, "custom_domain_name": "t.example.com"}}},
                 "tracking_settings.open_tracking.custom_domain_name"),
                ({"personalizations": [{"to": [{"email": "bob@example.org"}],
                                        "substitutions": {"a": "b"}}]},
                 "personalizations[0].substitutions"),
                ({"content": [{"type": "text/plain", "value": "{{/x}}",
                               "template_type": "mustache"}]}, "content[0].value"),
                ({"content": [{"type": "image/png", "value": "x"}]}, "content[0].type"),
                ({"subject": None}, "personalizations[0].subject"),
                ({"personalizations": []}, "personalizations"),
                ({"surprise": 1}, "surprise"),
            ]
            for change, param in cases:
                body = {k: v for k, v in {**good, **change}.items() if v is not None}
                status, answer = await post(body)
                assert status == 400 and param in (answer.get("param") or "") + \
                    answer["errors"][0], (change, answer)
                if param.endswith("dkim_domain"):
                    assert answer["param"] == param, answer
            status, answer = await post(good, key=None)
            assert status == 401 and answer["param"] == "X-Api-Key"
            assert "X-Api-Key" in answer["errors"][0] and "Bearer" not in answer["message"]
            status, answer = await post(good, key="rk_not_a_key")
            assert status == 401 and "X-Api-Key" in answer["message"]
        finally:
            await svc.stop()


async def test_unknown_routes_and_methods_under_tx_v1_answer_in_its_shape(
        tmp_path: Path, dns: DNSServer) -> None:
    async with Sink() as sink:
        svc, secret = await start(tmp_path, dns, sink)
        assert svc.api_bound is not None
        root = "http://{}:{}".format(*svc.api_bound)
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(root + "/tx/v1/no-such-thing",
                                 headers={"X-Api-Key": secret}) as r:
                    answer = await r.json()
                    assert r.status == 404 and "error" not in answer
                    assert answer["errors"] == [answer["message"]]
                    assert "/tx/v1/no-such-thing" in answer["message"]
                async with s.put(root + "/tx/v1/send", json={},
                                 headers={"X-Api-Key": secret}) as r:
                    answer = await r.json()
                    assert r.status == 405 and "POST" in r.headers["Allow"]
                    assert answer["errors"] and "error" not in answer
                    assert r.headers["X-Request-Id"]
                async with s.get(root + "/v1/no-such-thing") as r:  # relay's own shape
                    assert r.status == 404 and "error" in await r.json()
            # the SDK reads the message of such an answer
            mc = client(svc, secret)
            with pytest.raises(NotFoundError, match="no route"):
                await asyncio.to_thread(mc.request, "GET", "/no-such-thing")
        finally:
            await svc.stop()


async def test_a_suppressed_recipient_is_dropped_with_its_event_and_kept(
        tmp_path: Path, dns: DNSServer) -> None:
    rx = Receiver()
    await rx.start()
    async with Sink() as sink:
        svc, secret = await start(tmp_path, dns, sink)
        mc = client(svc, secret)
        assert svc.api_bound is not None
        root = "http://{}:{}".format(*svc.api_bound)
        try:
            await asyncio.to_thread(mc.webhooks.create, rx.url)
            for address in ("gone@example.org", "left@example.org"):
                await svc.store.add_suppression(Suppression(
                    address=address, scope="", reason="hard_bounce", source="test",
                    created_at=time.time()))
            mail: dict[str, Any] = {
                "from": {"email": "alice@example.com"}, "subject": "s",
                "content": [{"type": "text/plain", "value": "x"}],
                "personalizations": [{"to": [{"email": "gone@example.org"}]},
                                     {"to": [{"email": "bob@example.org"}]}]}
            sent = await asyncio.to_thread(mc.emails.send, mail)
            refused, kept = sent["results"]
            assert refused["status"] == "failed" and "gone@example.org" in refused["reason"]
            assert kept["status"] == "sent"
            async with aiohttp.ClientSession() as s, s.get(
                    root + f"/v1/emails/{refused['message_id']}",
                    headers={"Authorization": f"Bearer {secret}"}) as r:
                assert r.status == 200, await r.text()
                detail = await r.json()
            assert [(x["email"], x["status"]) for x in detail["recipients"]] == [
                ("gone@example.org", "suppressed")]
            assert "email.dropped" in {e["type"] for e in detail["events"]}

            queued = await asyncio.to_thread(mc.emails.queue, {
                **mail, "personalizations": [{"to": [{"email": "left@example.org"}]}]})
            assert queued["request_id"]

            def dropped() -> list[dict[str, Any]]:
                return [e for _, body in rx.got for e in json.loads(body)
                        if e["event"] == "dropped"]

            await until(lambda: len(dropped()) == 2)
            by_request = {e["request_id"]: e for e in dropped()}
            assert by_request[sent["request_id"]]["recipients"] == ["gone@example.org"]
            assert by_request[sent["request_id"]]["message_id"] == refused["message_id"]
            assert by_request[queued["request_id"]]["recipients"] == ["left@example.org"]
            assert by_request[queued["request_id"]]["reason"] == "hard_bounce"
            await wait_final(svc, kept["message_id"])
            assert {r for m in sink.messages for r in m.rcpt_tos} == {"bob@example.org"}
        finally:
            await svc.stop()
            await rx.stop()
