"""MailerLogic's /api/v1/send over real HTTP: every field reaches the delivered message at a
real SMTP sink (or the store, for metadata), every limit gives its documented error, and the
answers have that service's keys exactly."""

from __future__ import annotations

import base64
import email
import email.policy
import re
import time
from pathlib import Path
from typing import Any

import pytest

from relay import keys
from relay.config import ApiConfig, DeliveryConfig, DnsConfig, WebhooksConfig
from relay.service import Service
from relay.types import Domain

from .apiutil import SIMPLE, Api, api_client
from .conftest import add_signing_domain, make_config
from .dnsserver import DNSServer
from .sink import Sink
from .test_delivery import FAST, route, wait_final
from .test_unsubscribe import delivering
from .test_webhooks import Receiver, endpoint, until, verified

OK_KEYS = {"to", "submitted_at", "message_id", "email_id", "status", "message"}
ERROR_KEYS = {"error", "message"}
FORBIDDEN_KEYS = {"error", "message", "reason"}
ICAL = ("BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//App//Cal//EN\nMETHOD:CANCEL\n"
        "BEGIN:VEVENT\nUID:meeting-123@example.com\nDTSTAMP:20250127T120000Z\n"
        "DTSTART:20250128T140000Z\nSUMMARY:Team Meeting\nSTATUS:CANCELLED\nEND:VEVENT\n"
        "END:VCALENDAR\n")
MINIMAL = {"to": "bob@example.org", "subject": "Hi", "text": "Hello."}


async def send(api: Api, body: Any, *, key: str | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, answer, _ = await api.call("POST", "/api/v1/send", body, key=None,
                                       headers={"X-API-Key": key or api.key, **(headers or {})})
    return status, answer


def parsed(data: bytes) -> email.message.EmailMessage:
    m = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(m, email.message.EmailMessage)
    return m


async def test_every_field_reaches_the_delivered_message(tmp_path: Path, dns: DNSServer) -> None:
    pdf = bytes(range(256)) * 8
    async with Sink() as sink:
        svc = await delivering(tmp_path, dns, sink)
        await add_signing_domain(svc, "example.com")
        api = await api_client(svc)
        try:
            status, answer = await send(api, {
                # no domain and no from: the key's first verified domain, noreply@ it
                "to": "Bob <bob@example.org>",
                "cc": ["carol@example.org"], "bcc": ["archive@example.org"],
                "subject": "Welcome, Zoë",
                "html": '<p>Thanks</p><a href="https://shop.example/x">shop</a>',
                "text": "Thanks for signing up.",
                "track_opens": True, "track_clicks": True,
                "headers": {"X-Order-ID": "ord-789", "Reply-To": "support@example.com"},
                "tag": "welcome-series", "stream_type": "shared",
                "metadata": {"user_id": "12345", "secret": "metadata-never-sent"},
                "attachments": [
                    {"filename": "invoice.pdf", "content": base64.b64encode(pdf).decode(),
                     "contentType": "application/pdf"},
                    {"filename": "notes.txt", "content": "plain words", "contentType":
                     "text/plain", "encoding": "utf-8"}],
                "icalEvent": ICAL})
            assert status == 200, answer
            assert set(answer) == OK_KEYS
            assert answer["status"] == "queued" and answer["to"] == "bob@example.org"
            assert answer["message"] and answer["submitted_at"].endswith("Z")
            detail = await wait_final(svc, answer["email_id"])
            assert {r.status.value for r in detail.recipients} == {"delivered"}
            assert detail.message.metadata == {"user_id": "12345",
                                               "secret": "metadata-never-sent"}
            assert detail.message.tags == ("welcome-series",)
            assert detail.message.stream.value == "transactional"  # shared is sent so
            assert sorted(r for m in sink.messages for r in m.rcpt_tos) == [
                "archive@example.org", "bob@example.org", "carol@example.org"]
            for got in sink.messages:
                assert got.mail_from.endswith("@example.com") or "example.com" in got.mail_from
                assert b"archive@example.org" not in got.data.split(b"\r\n\r\n")[0]
                assert b"metadata-never-sent" not in got.data
            m = parsed(sink.delivered_to("bob@example.org")[0].data)
            assert m["From"] == "noreply@example.com"
            assert m["To"] == "Bob <bob@example.org>" and m["Cc"] == "carol@example.org"
            assert m["Subject"] == "Welcome, Zoë"
            assert m["Reply-To"] == "support@example.com"  # given among the headers
            assert m["X-Order-ID"] == "ord-789"
            assert m["Message-ID"] == answer["message_id"]
            text = m.get_body(preferencelist=("plain",))
            html = m.get_body(preferencelist=("html",))
            assert text is not None and text.get_content().strip() == "Thanks for signing up."
            assert html is not None
            assert re.search(r'src="http://127\.0\.0\.1:\d+/o/', html.get_content())  # opens
            assert "shop.example" not in html.get_content()  # clicks: links rewritten
            calendars = [p for p in m.walk() if p.get_content_type() == "text/calendar"]
            inline = [p for p in calendars if not p.get_filename()]
            assert len(calendars) == 2 and len(inline) == 1
            assert inline[0].get_param("method") == "CANCEL"  # the event's own METHOD
            files = {p.get_filename(): p for p in m.walk() if p.get_filename()}
            assert files["invite.ics"].get_content().replace("\r\n", "\n") == ICAL
            assert files["invoice.pdf"].get_payload(decode=True) == pdf
            assert files["invoice.pdf"].get_content_type() == "application/pdf"
            assert files["notes.txt"].get_payload(decode=True) == b"plain words"
        finally:
            await api.close()
            await svc.stop()


@pytest.mark.parametrize(("stream_type", "stream", "unsubscribe"), [
    ("transactional", "transactional", False), ("shared", "transactional", False),
    ("broadcast", "broadcast", True)])
async def test_stream_type(tmp_path: Path, dns: DNSServer, stream_type: str, stream: str,
                           unsubscribe: bool) -> None:
    async with Sink() as sink:
        svc = await delivering(tmp_path, dns, sink)
        await add_signing_domain(svc, "example.com")
        api = await api_client(svc)
        try:
            status, answer = await send(api, {**MINIMAL, "from": "news@example.com",
                                              "stream_type": stream_type})
            assert status == 200, answer
            detail = await wait_final(svc, answer["email_id"])
            assert detail.message.stream.value == stream
            (got,) = sink.messages
            assert ("List-Unsubscribe" in parsed(got.data)) is unsubscribe
        finally:
            await api.close()
            await svc.stop()


async def test_domain_is_chosen_and_refused_with_a_reason(api: Api, service: Service) -> None:
    status, answer = await send(api, MINIMAL)
    assert status == 403 and set(answer) == FORBIDDEN_KEYS
    assert answer["reason"] == "no_verified_domain"
    await add_signing_domain(service, "first.test")
    await add_signing_domain(service, "second.test")
    await service.store.save_domain(Domain(name="unverified.test", created_at=time.time(),
                                           return_path="bounces.unverified.test"))

    async def sender(body: dict[str, Any], key: str | None = None) -> str:
        status, answer = await send(api, body, key=key)
        assert status == 200, answer
        detail = await service.store.get_message(answer["email_id"])
        assert detail is not None
        return detail.message.header_from

    assert await sender(MINIMAL) == "noreply@first.test"  # the first verified
    assert await sender({**MINIMAL, "domain": "second.test"}) == "noreply@second.test"
    assert await sender({**MINIMAL, "domain": "second.test", "from": "hi@mail.second.test"}
                        ) == "hi@mail.second.test"
    assert await sender({**MINIMAL, "from": "Hello <hi@second.test>"}) == "Hello <hi@second.test>"
    _, limited = await keys.create_key(service.store, name="l", scopes=["emails:send"],
                                       domains=["second.test"])
    assert await sender(MINIMAL, limited) == "noreply@second.test"  # the key's first

    status, answer = await send(api, {**MINIMAL, "domain": "nowhere.test"})
    assert status == 404 and set(answer) == ERROR_KEYS and "domain" in answer["message"]
    for body, reason in [
        ({**MINIMAL, "domain": "unverified.test"}, "domain_not_verified"),
        ({**MINIMAL, "from": "x@unverified.test"}, "domain_not_verified"),
        ({**MINIMAL, "domain": "first.test", "from": "x@second.test"}, "from_domain_mismatch"),
    ]:
        status, answer = await send(api, body)
        assert status == 403 and set(answer) == FORBIDDEN_KEYS, answer
        assert answer["reason"] == reason and answer["error"] == "Forbidden"
    status, answer = await send(api, {**MINIMAL, "domain": "first.test"}, key=limited)
    assert status == 403 and answer["reason"] == "domain_not_allowed"
    _, reader = await keys.create_key(service.store, name="r", scopes=["emails:read"])
    status, answer = await send(api, MINIMAL, key=reader)
    assert status == 403 and answer["reason"] == "missing_scope"
    status, answer = await send(api, MINIMAL, key="rk_000000000000_nope")
    assert status == 401 and set(answer) == ERROR_KEYS


@pytest.mark.parametrize(("change", "field"), [
    ({"to": None}, "to"),
    ({"to": ["a@example.org", "b@example.org"]}, "to"),  # one address
    ({"subject": None}, "subject"),
    ({"text": None}, "text"),
    ({"bogus": 1}, "bogus"),
    ({"stream_type": "bulk"}, "stream_type"),
    ({"cc": ["not an address"]}, "cc[0]"),
    ({"headers": {"From": "evil@example.net"}}, "headers.From"),
    ({"headers": {"X-Ok": "a\r\nBcc: evil@example.net"}}, "headers.X-Ok"),
    ({"reply_to": "a@example.com", "headers": {"Reply-To": "b@example.com"}},
     "headers.Reply-To"),
    ({"attachments": [{"filename": "a.txt", "content": "%%%", "contentType": "text/plain"}]},
     "attachments[0].content"),
    ({"attachments": [{"filename": "a.txt", "content": "eA==", "contentType": "text/plain",
                       "encoding": "uuencode"}]}, "attachments[0].encoding"),
    ({"attachments": [{"filename": "a.txt", "content": "eA=="}]}, "attachments[0].contentType"),
])
async def test_bad_input_is_a_400_naming_the_field(api: Api, service: Service,
                                                   change: dict[str, Any], field: str) -> None:
    await add_signing_domain(service, "example.com")
    body = {k: v for k, v in {**MINIMAL, **change}.items() if v is not None}
    status, answer = await send(api, body)
    assert status == 400 and set(answer) == ERROR_KEYS, answer
    assert answer["error"] == "Bad Request" and field in answer["message"], answer


async def test_attachment_limits(api: Api, service: Service) -> None:
    await add_signing_domain(service, "example.com")
    ten = base64.b64encode(b"\x01" * (10 * 1024 * 1024)).decode()
    files = [{"filename": f"f{i}.bin", "content": ten, "contentType": "application/zip"}
             for i in range(2)]
    status, answer = await send(api, {**MINIMAL, "attachments": files})
    assert status == 200, answer  # 10 MB a file, 20 in all
    over = base64.b64encode(b"\x01" * (10 * 1024 * 1024 + 1)).decode()
    status, answer = await send(api, {**MINIMAL, "attachments": [
        {"filename": "big.bin", "content": over, "contentType": "application/zip"}]})
    assert status == 400 and set(answer) == ERROR_KEYS and "attachments[0]" in answer["message"]
    five = "x" * (5 * 1024 * 1024 + 1)  # 25 MB in all, the html counted in
    status, answer = await send(api, {**MINIMAL, "html": five, "attachments": files})
    assert status == 400 and answer["message"].startswith("attachments:"), answer


async def test_metadata_over_its_limit_is_a_400_naming_it(api: Api, service: Service) -> None:
    await add_signing_domain(service, "example.com")
    big = {"blob": "x" * service.config.limits.max_metadata_size}
    status, answer = await send(api, {**MINIMAL, "metadata": big})
    assert status == 400 and set(answer) == ERROR_KEYS, answer
    assert answer["message"].startswith("metadata") and "max_metadata_size" in answer["message"]
    assert (await service.store.list_messages()).items == ()


async def test_webhooks_carry_the_headers_beside_the_metadata(tmp_path: Path,
                                                              dns: DNSServer) -> None:
    """The seed: "Headers are included in webhook payloads alongside metadata", in every
    event; a message from another dialect keeps the payload it had (no headers)."""
    receiver = Receiver()
    await receiver.start()
    async with Sink() as sink:
        route(dns, "example.org", (10, "mx.example.org", "127.0.0.1"))
        svc = Service(make_config(
            tmp_path, delivery=DeliveryConfig(mx_port=sink.port, **FAST),
            dns=DnsConfig(nameservers=(dns.nameserver,), timeout=1.0), api=ApiConfig(port=0),
            webhooks=WebhooksConfig(allow_private_targets=True, retry_scale=0.02)))
        await svc.start()
        await add_signing_domain(svc, "example.com")
        ep = await endpoint(svc, receiver.url, ("email.queued", "email.delivered"))
        api = await api_client(svc)
        try:
            given = {"X-Campaign-ID": "campaign-123", "X-User-ID": "user-456",
                     "Reply-To": "support@example.com"}
            status, answer = await send(api, {**MINIMAL, "headers": given,
                                              "metadata": {"order_id": "ord_789"}})
            assert status == 200, answer
            await until(lambda: len(receiver.got) == 2)
            events = {e["type"]: e for e in (verified(ep, h, b) for h, b in receiver.got)}
            assert set(events) == {"email.queued", "email.delivered"}
            for event in events.values():
                assert event["data"]["messageId"] == answer["email_id"]
                assert event["data"]["metadata"] == {"order_id": "ord_789"}
                assert event["data"]["headers"] == given
            got = parsed(sink.delivered_to("bob@example.org")[0].data)
            assert got["X-Campaign-ID"] == "campaign-123"  # and sent with the email

            # no headers given: an empty object, as the metadata is
            status, answer = await send(api, MINIMAL)
            assert status == 200, answer
            await until(lambda: len(receiver.got) == 4)
            for h, b in receiver.got[2:]:
                assert verified(ep, h, b)["data"]["headers"] == {}

            # the native API's custom headers are not in its webhooks
            status, native, _ = await api.call("POST", "/v1/emails", {
                **SIMPLE, "headers": {"X-Native": "1"}, "metadata": {"k": "v"}})
            assert status == 202, native
            await until(lambda: len(receiver.got) == 6)
            for h, b in receiver.got[4:]:
                data = verified(ep, h, b)["data"]
                assert data["messageId"] == native["id"] and data["metadata"] == {"k": "v"}
                assert "headers" not in data
        finally:
            await api.close()
            await svc.stop()
            await receiver.stop()


async def test_headers_count_toward_the_metadata_limit(api: Api, service: Service) -> None:
    """Every webhook carries them: with the metadata and tags they are held to [limits]
    max_metadata_size, and past it the 400 names them and nothing is queued."""
    await add_signing_domain(service, "example.com")
    limit = service.config.limits.max_metadata_size
    half = {"blob": "x" * (limit // 2)}
    many = {f"X-H{i}": "y" * 900 for i in range(limit // 1800 + 1)}
    status, answer = await send(api, {**MINIMAL, "metadata": half, "headers": many})
    assert status == 400 and set(answer) == ERROR_KEYS, answer
    assert answer["message"].startswith("headers") and "max_metadata_size" in answer["message"]
    assert (await service.store.list_messages()).items == ()
    status, answer = await send(api, {**MINIMAL, "metadata": half,
                                      "headers": {"X-Small": "fits"}})
    assert status == 200, answer
