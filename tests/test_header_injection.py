"""CR/LF (header) injection through every API (issue 17): a subject, a display name, a
custom header or a template variable that would break a header line is refused at accept
time, in the dialect's own error shape and naming the field, over real HTTP on loopback;
and mail that does reach the sink has exactly the header lines relay meant to write."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay import compose, keys
from relay.config import DeliveryConfig, DnsConfig
from relay.service import Service
from relay.store import MessageDetail
from relay.types import Composition, EnvelopeRecipient, Mailbox, Submission

from .apiutil import SIMPLE, Api
from .conftest import add_signing_domain, make_config
from .dnsserver import DNSServer
from .sink import Sink
from .test_delivery import FAST, route, wait_final

# The examples, and the other line breaks Python's email folding splits at
INJECTIONS = ["hi\r\n\r\nX", "hi\nBcc : x@evil.test", "hi\r\nReply-To : x@evil.test",
              "\r\nBcc: x@evil.test", "hi\x0bBcc : x@evil.test", "hi\x00x",
              "hi\u2028Bcc: x@evil.test"]


@pytest.fixture
async def client(service: Service) -> AsyncIterator[Api]:
    """One key for every dialect (each takes it in its own header), templates and contacts
    included; example.com is a verified sending domain (MailerLogic needs one)."""
    await add_signing_domain(service, "example.com")
    _, secret = await keys.create_key(service.store, name="all", scopes=[
        "emails:send", "emails:read", "templates:manage", "contacts:manage"])
    assert service.api_bound is not None
    async with aiohttp.ClientSession() as session:
        yield Api(session, "http://{}:{}".format(*service.api_bound), secret)


async def nothing_queued(service: Service) -> None:
    assert not (await service.store.list_messages(limit=10)).items


# -- native /v1/emails ------------------------------------------------------------------

@pytest.mark.parametrize("subject", INJECTIONS)
async def test_native_subject(client: Api, service: Service, subject: str) -> None:
    status, body, _ = await client.call("POST", "/v1/emails", {**SIMPLE, "subject": subject})
    assert status == 422, body
    assert body["error"]["type"] == "validation_error" and body["error"]["param"] == "subject"
    await nothing_queued(service)


@pytest.mark.parametrize(("change", "param"), [
    ({"subject": "Hi {{name}}", "data": {"name": "Bob\r\nBcc : x@evil.test"}}, "data.name"),
    ({"subject": "Hi {{who.first}}", "data": {"who": {"first": "B\nBcc: x@evil.test"}}},
     "data.who.first"),
    ({"subject": "Hi {{name ?? 'you\x0bBcc : x@evil.test'}}"}, "subject"),
    ({"from": {"email": "alice@example.com", "name": "Alice\x0bBcc : x@evil.test"}},
     "from.name"),
    ({"from": "Alice\x1cBcc <alice@example.com>"}, "from"),
    ({"to": ["bob@example.org", {"email": "carol@example.org", "name": "C\x85Bcc: x"}]},
     "to[1].name"),
    ({"cc": [{"email": "carol@example.org", "name": "C\u2029D"}]}, "cc[0].name"),
    ({"replyTo": {"email": "help@example.com", "name": "Help\x0cBcc : x@evil.test"}},
     "replyTo[0].name"),
    ({"headers": {"X-Foo": "a\x0bBcc : x@evil.test"}}, "headers.X-Foo"),
    ({"headers": {"X-Foo": "a\x00b"}}, "headers.X-Foo"),
    ({"attachments": [{"filename": "a\x0bBcc: x.txt", "content": "eA=="}]},
     "attachments[0].filename"),
    ({"attachments": [{"filename": "a.png", "content": "eA==", "contentId": "a\x1cb"}]},
     "attachments[0].contentId"),
])
async def test_native_fields_and_template_values(client: Api, service: Service,
                                                 change: dict[str, Any], param: str) -> None:
    status, body, _ = await client.call("POST", "/v1/emails", {**SIMPLE, **change})
    assert status == 422, body
    assert body["error"]["param"] == param, body
    await nothing_queued(service)


async def test_native_batch_refuses_the_item_naming_it(client: Api) -> None:
    status, body, _ = await client.call("POST", "/v1/emails/batch", {"emails": [
        SIMPLE, {**SIMPLE, "subject": "Hi {{n}}", "data": {"n": "x\r\nBcc : y@evil.test"}},
        {**SIMPLE, "subject": "hi\x0bBcc : x@evil.test"}]})
    assert status == 207, body
    ok, bad_var, bad_subject = body["results"]
    assert ok["status"] == "queued"
    assert bad_var["error"]["param"] == "emails[1].data.n", bad_var
    assert bad_subject["error"]["param"] == "emails[2].subject", bad_subject


# -- stored templates -------------------------------------------------------------------

async def test_stored_template_subject_and_sender_name(client: Api) -> None:
    base = {"name": "t", "subject": "Hi", "html": "<p>x</p>"}
    for change, param in (({"subject": "Hi\x0bBcc : x@evil.test"}, "subject"),
                          ({"subject": "Hi {{n ?? 'a\x00b'}}"}, "subject"),
                          ({"from": {"email": "a@example.com", "name": "A\x1dB"}},
                           "from.name")):
        status, body, _ = await client.call("POST", "/v1/templates", {**base, **change})
        assert status == 422 and body["error"]["param"] == param, (change, body)
    status, t, _ = await client.call("POST", "/v1/templates", base)
    assert status == 201
    status, body, _ = await client.call("PATCH", f"/v1/templates/{t['id']}",
                                        {"subject": "Hi\u2028there"})
    assert status == 422 and body["error"]["param"] == "subject", body


# -- MailChannels -----------------------------------------------------------------------

MC = {"from": {"email": "alice@example.com"}, "subject": "s",
      "content": [{"type": "text/plain", "value": "x"}],
      "personalizations": [{"to": [{"email": "bob@example.org"}]}]}


@pytest.mark.parametrize(("change", "param"), [
    ({"subject": "hi\nBcc : x@evil.test"}, "subject"),
    ({"personalizations": [{"to": [{"email": "bob@example.org"}],
                            "subject": "hi\r\nReply-To : x@evil.test"}]},
     "personalizations[0].subject"),
    ({"personalizations": [{"to": [{"email": "bob@example.org", "name": "B\x0bBcc : x"}]}]},
     "personalizations[0].to[0].name"),
    ({"personalizations": [{"to": [{"email": "bob@example.org"}],
                            "reply_to": {"email": "r@example.com", "name": "R\x1eS"}}]},
     "personalizations[0].reply_to.name"),
    ({"personalizations": [{"to": [{"email": "bob@example.org"}],
                            "headers": {"X-Foo": "a\x0bBcc : x@evil.test"}}]},
     "personalizations[0].headers.X-Foo"),
    ({"headers": {"X-Foo": "a\x00b"}}, "headers.X-Foo"),
    ({"from": {"email": "alice@example.com", "name": "Alice\u2028Bcc: x"}}, "from.name"),
])
async def test_mailchannels(client: Api, service: Service, change: dict[str, Any],
                            param: str) -> None:
    for path in ("/tx/v1/send", "/tx/v1/send-async"):
        status, body, _ = await client.call("POST", path, {**MC, **change}, key=None,
                                            headers={"X-Api-Key": client.key})
        assert status == 400, body
        assert body["param"] == param and param in body["errors"][0], body
    await nothing_queued(service)


# -- PiiSend ----------------------------------------------------------------------------

PS = {"to": ["bob@example.org"], "from_": "alice@example.com", "subject": "s", "text": "x"}


async def hi_name_template(client: Api) -> str:
    status, t, _ = await client.call("POST", "/v1/templates", {
        "name": "t", "subject": "Hi {{name}}", "html": "<p>x</p>"})
    assert status == 201, t
    return str(t["id"])


@pytest.mark.parametrize(("body", "field"), [
    ({**PS, "subject": "hi\x0bBcc : x@evil.test"}, "subject"),
    ({**PS, "from_": "Alice\x0bBcc <alice@example.com>"}, "from_"),
    ({**PS, "reply_to": ["Help\x85Bcc <help@example.com>"]}, "reply_to[0]"),
    ({"to": ["bob@example.org"], "from_": "alice@example.com", "template_id": "",
      "template_vars": {"name": "Bob\r\nBcc : x@evil.test"}}, "template_vars.name"),
])
async def test_piisend(client: Api, service: Service, body: dict[str, Any],
                       field: str) -> None:
    if "template_id" in body:
        body = {**body, "template_id": await hi_name_template(client)}
    status, answer, _ = await client.call("POST", "/api/v1/emails", body)
    assert status == 422, answer
    assert answer["field"] == field and answer["detail"].startswith(field), answer
    await nothing_queued(service)


# -- MailerLogic ------------------------------------------------------------------------

ML = {"from": "alice@example.com", "to": "bob@example.org", "subject": "s", "text": "x"}


@pytest.mark.parametrize(("change", "field"), [
    ({"subject": "hi\x0bBcc : x@evil.test"}, "subject"),
    ({"subject": "hi\x00"}, "subject"),
    ({"headers": {"X-Foo": "a\x0bBcc : x@evil.test"}}, "headers.X-Foo"),
    ({"headers": {"Reply-To": "Help\x1cBcc <help@example.com>"}}, "headers.Reply-To"),
    ({"from": "Alice\u2028Bcc <alice@example.com>"}, "from"),
])
async def test_mailerlogic(client: Api, service: Service, change: dict[str, Any],
                           field: str) -> None:
    status, body, _ = await client.call("POST", "/api/v1/send", {**ML, **change}, key=None,
                                        headers={"X-API-Key": client.key})
    assert status == 400, body
    assert body["error"] == "Bad Request" and body["message"].startswith(f"{field}:"), body
    await nothing_queued(service)


# -- Plunk ------------------------------------------------------------------------------

PL = {"to": "bob@example.org", "subject": "s", "body": "<p>b</p>", "from": "alice@example.com"}


@pytest.mark.parametrize(("body", "field"), [
    ({**PL, "subject": "Hi {{name}}", "data": {"name": "B\r\nBcc : x@evil.test"}},
     "data.name"),
    ({**PL, "subject": "hi\x0bBcc : x@evil.test"}, "subject"),
    ({**PL, "name": "Alice\x0bBcc : x@evil.test"}, "name"),
    ({**PL, "headers": {"X-A": "a\x0bBcc : x@evil.test"}}, "headers.X-A"),
    # a value saved on the contact earlier, filled into a stored template's subject
    ({"to": "bob@example.org", "from": "alice@example.com", "template": ""}, "data.name"),
])
async def test_plunk(client: Api, service: Service, body: dict[str, Any], field: str) -> None:
    if "template" in body:
        body = {**body, "template": await hi_name_template(client)}
        status, _, _ = await client.call("POST", "/v1/contacts", {
            "email": "bob@example.org", "data": {"name": "Bob\nBcc : x@evil.test"}})
        assert status in (200, 201)
    status, answer, _ = await client.call("POST", "/v1/send", body)
    assert status == 422, (body, answer)
    assert answer["success"] is False and answer["error"]["code"] == "VALIDATION_ERROR"
    assert answer["error"]["errors"][0]["field"] == field, (body, answer)
    await nothing_queued(service)


# -- end to end: what reaches the sink --------------------------------------------------

@pytest.fixture
async def delivering(tmp_path: Path, dns: DNSServer) -> AsyncIterator[tuple[Service, Sink]]:
    """relay delivering example.org's mail to a sink."""
    route(dns, "example.org", (10, "mx.example.org", "127.0.0.1"))
    async with Sink() as sink:
        svc = Service(make_config(tmp_path, delivery=DeliveryConfig(mx_port=sink.port, **FAST),
                                  dns=DnsConfig(nameservers=(dns.nameserver,), timeout=1.0)))
        await svc.start()
        try:
            yield svc, sink
        finally:
            await svc.stop()


def header_names(data: bytes) -> list[str]:
    return [name for name, _ in email.message_from_bytes(data, policy=email.policy.compat32)
            .items()]


async def test_refused_at_accept_and_what_is_sent_has_only_its_own_headers(
        delivering: tuple[Service, Sink]) -> None:
    """Before, "\\r\\nBcc: x" was accepted (202) and then failed at delivery; now it is a
    422 at once, and a long folded subject and header with tabs and unicode arrive as one
    header each."""
    svc, sink = delivering
    _, secret = await keys.create_key(svc.store, name="k", scopes=["emails:send"])
    assert svc.api_bound is not None
    async with aiohttp.ClientSession() as session:
        api = Api(session, "http://{}:{}".format(*svc.api_bound), secret)
        status, body, _ = await api.call("POST", "/v1/emails", {
            **SIMPLE, "subject": "\r\nBcc: x@evil.test"})
        assert status == 422 and body["error"]["param"] == "subject", body
        long = "Grüße\tBcc: x@evil.test " * 20
        status, body, _ = await api.call("POST", "/v1/emails", {
            **SIMPLE, "subject": "{{greeting}}", "data": {"greeting": long},
            "from": {"email": "alice@example.com", "name": "Zoë: Bcc: x@evil.test"},
            "headers": {"X-Note": long}})
        assert status == 202, body
    await wait_final(svc, body["id"])
    (got,) = sink.messages
    assert header_names(got.data) == ["From", "To", "Subject", "Date", "Message-ID",
                                      "X-Note", "Content-Type", "MIME-Version",
                                      "Feedback-ID"]
    parsed = email.message_from_bytes(got.data, policy=email.policy.default)
    # (compose folds a long encoded value onto the next line: the parser reads a space)
    assert str(parsed["Subject"]).strip() == str(parsed["X-Note"]).strip() == long.strip()


async def test_mail_queued_before_the_check_is_parked_not_sent(
        delivering: tuple[Service, Sink]) -> None:
    """A composition already in the queue (stored before submit checked headers) fails its
    delivery as a stage error, parked with an event, instead of going out injected."""
    svc, sink = delivering
    clean = Composition(sender=Mailbox(email="alice@example.com"),
                        to=(Mailbox(email="bob@example.org"),), subject="ok", text="x")
    message = svc.submitter.prepare(Submission(
        mail_from="alice@example.com",
        recipients=(EnvelopeRecipient(address="bob@example.org"),),
        composition=clean, source="api"))
    injected = dataclasses.replace(clean, subject="hi\nBcc : x@evil.test")
    _, message_id, date = compose.loads(message.body)
    await svc.submitter.commit(dataclasses.replace(message, body=compose.dumps(
        injected, message_id=message_id, date=date)))
    detail = await parked_or_final(svc, message.id)
    assert [r.status.value for r in detail.recipients] == ["failed"]
    assert "email.failed" in [e.type for e in detail.events]
    assert sink.messages == []


async def parked_or_final(svc: Service, message_id: str) -> MessageDetail:
    """Every recipient final, or parked as failed (not final: it waits for an operator)."""
    async def poll() -> MessageDetail:
        while True:
            detail = await svc.store.get_message(message_id)
            if detail and all(r.status.final or r.status.value == "failed"
                              for r in detail.recipients):
                return detail
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(poll(), 20)
