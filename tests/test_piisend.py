"""PiiSend's /api/v1/emails over real HTTP: every field reaches the delivered message at a
real SMTP sink, its limits give their documented errors, list/detail/cancel/resend work, and
the answers have the keys relay documents for that dialect exactly."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from relay import keys
from relay.api.dialects import piisend_emails as piisend
from relay.service import Service
from relay.types import RecipientStatus, Template

from .apiutil import Api, api_client
from .conftest import add_signing_domain
from .dnsserver import DNSServer
from .sink import Sink
from .test_delivery import wait_final
from .test_unsubscribe import delivering

EMAIL_KEYS = {"id", "status", "from_", "subject", "recipients", "created_at", "updated_at",
              "scheduled_at", "resend_of"}
DETAIL_KEYS = EMAIL_KEYS | {"to", "cc", "reply_to", "message_id", "text", "html",
                            "attachments", "attempts", "events", "sent_at", "delivered_at",
                            "resends"}
ATTEMPT_KEYS = {"email", "at", "provider", "ip", "tls", "code", "enhanced_code", "response",
                "outcome", "duration_ms"}
ERROR_KEYS = {"detail", "type", "field"}
LIST_KEYS = {"data", "limit", "offset", "has_more"}
SIMPLE = {"from_": "Billing <billing@example.com>", "to": ["bob@example.org"],
          "subject": "Your receipt", "html": "<p>Thanks for your order.</p>",
          "text": "Thanks for your order."}


def parsed(data: bytes) -> email.message.EmailMessage:
    m = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(m, email.message.EmailMessage)
    return m


async def test_every_field_reaches_the_delivered_message(tmp_path: Path, dns: DNSServer) -> None:
    pdf = bytes(range(256)) * 8
    async with Sink() as sink:
        svc = await delivering(tmp_path, dns, sink)
        api = await api_client(svc)
        try:
            status, sent, _ = await api.call("POST", "/api/v1/emails", {
                **SIMPLE, "to": ["bob@example.org", "Carol <carol@example.org>"],
                "cc": ["finance@example.org"], "reply_to": ["support@example.com"],
                "html": '<p>Thanks</p><a href="https://shop.example/x">order</a>',
                "template_id": None, "template_vars": {},
                "track_opens": True, "track_clicks": True, "enable_unsubscribe": False,
                "attachments": [
                    {"filename": "invoice.pdf", "content_type": "application/pdf",
                     "content_b64": base64.b64encode(pdf).decode()},
                    {"filename": "notes.txt", "content_type": "text/plain",
                     "content_b64": base64.b64encode(b"notes").decode()}]})
            assert status == 202, sent
            assert set(sent) == EMAIL_KEYS and sent["status"] == "queued"
            assert [r["email"] for r in sent["recipients"]] == [
                "bob@example.org", "carol@example.org", "finance@example.org"]
            await wait_final(svc, sent["id"])
            assert sorted(r for m in sink.messages for r in m.rcpt_tos) == [
                "bob@example.org", "carol@example.org", "finance@example.org"]
            m = parsed(sink.delivered_to("carol@example.org")[0].data)
            assert m["From"] == "Billing <billing@example.com>"
            assert m["To"] == "bob@example.org, Carol <carol@example.org>"
            assert m["Cc"] == "finance@example.org" and m["Reply-To"] == "support@example.com"
            assert m["Subject"] == "Your receipt" and "List-Unsubscribe" not in m
            text = m.get_body(preferencelist=("plain",))
            html = m.get_body(preferencelist=("html",))
            assert text is not None and text.get_content().strip() == "Thanks for your order."
            assert html is not None and "shop.example" not in html.get_content()
            assert re.search(r'src="http://127\.0\.0\.1:\d+/o/', html.get_content())
            files = {p.get_filename(): p for p in m.walk() if p.get_filename()}
            assert files["invoice.pdf"].get_payload(decode=True) == pdf
            assert files["invoice.pdf"].get_content_type() == "application/pdf"
            assert files["notes.txt"].get_payload(decode=True) == b"notes"

            status, detail, _ = await api.call("GET", f"/api/v1/emails/{sent['id']}")
            assert status == 200 and set(detail) == DETAIL_KEYS
            assert detail["status"] == "delivered" and detail["delivered_at"]
            assert detail["sent_at"] and detail["created_at"] == sent["created_at"]
            assert detail["to"] == ["bob@example.org", "carol@example.org"]
            assert detail["cc"] == ["finance@example.org"]
            assert detail["reply_to"] == ["support@example.com"]
            assert detail["message_id"] == m["Message-ID"]
            assert detail["text"].strip() == "Thanks for your order."
            assert "shop.example/x" in detail["html"]  # as sent, before tracking rewrote it
            assert detail["attachments"] == [
                {"filename": "invoice.pdf", "content_type": "application/pdf",
                 "size": len(pdf)},
                {"filename": "notes.txt", "content_type": "text/plain", "size": 5}]
            assert len(detail["attempts"]) == 3
            assert all(set(a) == ATTEMPT_KEYS and a["code"] == 250 and a["outcome"] ==
                       "delivered" for a in detail["attempts"])
            assert [e["type"] for e in detail["events"]].count("email.delivered") == 3
            assert {r["status"] for r in detail["recipients"]} == {"delivered"}
        finally:
            await api.close()
            await svc.stop()


async def test_enable_unsubscribe_and_domain_id(tmp_path: Path, dns: DNSServer) -> None:
    async with Sink() as sink:
        svc = await delivering(tmp_path, dns, sink)
        await add_signing_domain(svc, "example.com")
        api = await api_client(svc)
        try:
            body = {k: v for k, v in SIMPLE.items() if k != "from_"}
            status, sent, _ = await api.call("POST", "/api/v1/emails", {
                **body, "domain_id": "example.com", "enable_unsubscribe": True})
            assert status == 202, sent
            detail = await wait_final(svc, sent["id"])
            assert detail.message.stream.value == "broadcast"
            (got,) = sink.messages
            m = parsed(got.data)
            assert m["From"] == "noreply@example.com"  # the domain's, with no from_
            assert m["List-Unsubscribe"] and m["List-Unsubscribe-Post"]
            for change, field in [({"domain_id": "nowhere.test"}, "domain_id"),
                                  ({"domain_id": "example.com",
                                    "from_": "x@example.net"}, "from_"),
                                  ({}, "from_")]:
                status, error, _ = await api.call("POST", "/api/v1/emails", {**body, **change})
                assert status == 422 and set(error) == ERROR_KEYS and error["field"] == field
        finally:
            await api.close()
            await svc.stop()


async def test_scheduled_list_and_cancel(api: Api, service: Service) -> None:
    later = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    status, first, _ = await api.call("POST", "/api/v1/emails", {
        **SIMPLE, "scheduled_at": later.strftime("%Y-%m-%dT%H:%M:%SZ")})
    assert status == 202 and first["status"] == "scheduled", first
    assert first["scheduled_at"] == later.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    naive = later.replace(tzinfo=None).isoformat()  # what a Python SDK sends: UTC
    status, second, _ = await api.call("POST", "/api/v1/emails", {**SIMPLE,
                                                                  "scheduled_at": naive})
    assert status == 202 and second["scheduled_at"] == first["scheduled_at"]
    status, third, _ = await api.call("POST", "/api/v1/emails", SIMPLE)
    assert third["status"] == "queued"

    status, page, _ = await api.call("GET", "/api/v1/emails?limit=2")
    assert status == 200 and set(page) == LIST_KEYS
    assert [e["id"] for e in page["data"]] == [third["id"], second["id"]]
    assert page["has_more"] is True and all(set(e) == EMAIL_KEYS for e in page["data"])
    _, page, _ = await api.call("GET", "/api/v1/emails?limit=2&offset=2")
    assert [e["id"] for e in page["data"]] == [first["id"]] and page["has_more"] is False
    _, page, _ = await api.call("GET", "/api/v1/emails?status=scheduled")
    assert [e["id"] for e in page["data"]] == [second["id"], first["id"]]

    status, cancelled, _ = await api.call("POST", f"/api/v1/emails/{first['id']}/cancel")
    assert status == 200 and set(cancelled) == EMAIL_KEYS
    assert cancelled["status"] == "cancelled"
    _, page, _ = await api.call("GET", "/api/v1/emails?status=cancelled")
    assert [e["id"] for e in page["data"]] == [first["id"]]
    for target in (first["id"], third["id"]):  # only while scheduled
        status, error, _ = await api.call("POST", f"/api/v1/emails/{target}/cancel")
        assert status == 409 and set(error) == ERROR_KEYS and error["type"] == "conflict"
    status, error, _ = await api.call("POST", "/api/v1/emails/msg_nothing/cancel")
    assert status == 404 and set(error) == ERROR_KEYS
    status, error, _ = await api.call("GET", "/api/v1/emails?status=lost")
    assert status == 422 and error["field"] == "status"
    status, error, _ = await api.call("POST", "/api/v1/emails", {
        **SIMPLE, "scheduled_at": "2020-01-01T00:00:00Z"})
    assert status == 422 and error["field"] == "scheduled_at"


async def test_resend_is_a_new_message_linked_to_the_first(tmp_path: Path,
                                                           dns: DNSServer) -> None:
    async with Sink() as sink:
        svc = await delivering(tmp_path, dns, sink)
        api = await api_client(svc)
        try:
            _, first, _ = await api.call("POST", "/api/v1/emails", {
                **SIMPLE, "cc": ["carol@example.org"], "track_opens": True})
            await wait_final(svc, first["id"])
            status, again, _ = await api.call("POST", f"/api/v1/emails/{first['id']}/resend")
            assert status == 202 and set(again) == EMAIL_KEYS, again
            assert again["id"] != first["id"] and again["resend_of"] == first["id"]
            await wait_final(svc, again["id"])
            one, two = (parsed(m.data) for m in sink.delivered_to("bob@example.org"))
            assert one["Message-ID"] != two["Message-ID"]
            assert [(m["Subject"], m["Cc"]) for m in (one, two)] == [
                ("Your receipt", "carol@example.org")] * 2
            html = two.get_body(preferencelist=("html",))
            assert html is not None and "/o/" in html.get_content()  # still tracked
            assert len(sink.delivered_to("carol@example.org")) == 2
            _, detail, _ = await api.call("GET", f"/api/v1/emails/{first['id']}")
            assert detail["resends"] == [again["id"]] and detail["resend_of"] is None
            _, copy, _ = await api.call("GET", f"/api/v1/emails/{again['id']}")
            assert copy["resend_of"] == first["id"] and copy["status"] == "delivered"
            status, error, _ = await api.call("POST", "/api/v1/emails/msg_nothing/resend")
            assert status == 404 and set(error) == ERROR_KEYS
        finally:
            await api.close()
            await svc.stop()


async def test_statuses_are_mapped_to_piisend_names(tmp_path: Path, dns: DNSServer) -> None:
    replies = {"later@example.org": ["451 4.7.1 try later"],
               "gone@example.org": ["550 5.1.1 no such user"]}
    async with Sink(replies=replies) as sink:
        svc = await delivering(tmp_path, dns, sink)
        api = await api_client(svc)
        try:
            ids = {}
            for who in ("later", "gone"):
                _, sent, _ = await api.call("POST", "/api/v1/emails", {
                    **SIMPLE, "to": [f"{who}@example.org"]})
                ids[who] = sent["id"]
            await wait_final(svc, ids["gone"])

            async def status_of(message_id: str) -> str:
                _, detail, _ = await api.call("GET", f"/api/v1/emails/{message_id}")
                return str(detail["status"])

            async def deferred() -> None:
                while (d := await svc.store.get_message(ids["later"])) is None or \
                        d.recipients[0].status is not RecipientStatus.DEFERRED:
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(deferred(), 20)
            assert await status_of(ids["gone"]) == "bounced"
            assert await status_of(ids["later"]) == "delivering"
            _, page, _ = await api.call("GET", "/api/v1/emails?status=bounced")
            assert [e["id"] for e in page["data"]] == [ids["gone"]]
        finally:
            await api.close()
            await svc.stop()
    # every relay status has a PiiSend name, and each name is among the documented ones
    documented = {"queued", "scheduled", "sent", "delivering", "delivered", "failed",
                  "bounced", "cancelled"}
    assert set(piisend.STATUSES.values()) == documented == set(piisend.LISTED)
    assert {s.value for s in RecipientStatus} - {"expired"} <= set(piisend.STATUSES)


@pytest.mark.parametrize(("change", "status", "field"), [
    ({"template_id": "tpl_1"}, 400, "template_id"),  # a template and raw content
    ({"template_vars": {"name": "Bob"}}, 400, "template_vars"),
    ({"attachments": [{"filename": f"f{i}.txt", "content_type": "text/plain",
                       "content_b64": "eA=="} for i in range(6)]}, 400, "attachments"),
    ({"attachments": [{"filename": "a.bin", "content_type": "application/zip",
                       "content_b64": base64.b64encode(b"\0" * (5 * 1024 * 1024 + 1)).decode()
                       }]}, 413, "attachments"),
    ({"attachments": [{"filename": "a.txt", "content_type": "text/plain",
                       "content_b64": "%%%"}]}, 422, "attachments[0].content_b64"),
    ({"attachments": [{"filename": "a.txt", "content_b64": "eA=="}]}, 422,
     "attachments[0].content_type"),
    ({"from_": "x@example.com\r\nBcc: evil@example.net"}, 422, "from_"),
    ({"from": "x@example.com"}, 422, "from"),  # PiiSend's field is from_
    ({"to": []}, 422, "to"),
    ({"cc": ["not an address"]}, 422, "cc[0]"),
    ({"subject": None}, 422, "subject"),
    ({"html": None, "text": None}, 422, "html"),
    ({"track_opens": "yes please"}, 422, "track_opens"),
])
async def test_bad_input_is_an_error_naming_the_field(api: Api, change: dict[str, Any],
                                                     status: int, field: str) -> None:
    body = {k: v for k, v in {**SIMPLE, **change}.items() if v is not None}
    got, error, _ = await api.call("POST", "/api/v1/emails", body)
    assert got == status and set(error) == ERROR_KEYS, error
    assert error["field"] == field and field in error["detail"], error


async def test_five_files_of_five_mib_in_all_are_taken(api: Api) -> None:
    part = base64.b64encode(b"\1" * (1024 * 1024)).decode()
    files = [{"filename": f"f{i}.bin", "content_type": "application/zip", "content_b64": part}
             for i in range(5)]
    status, sent, _ = await api.call("POST", "/api/v1/emails", {**SIMPLE, "attachments": files})
    assert status == 202, sent


async def test_a_stored_template_filled_with_template_vars(tmp_path: Path,
                                                          dns: DNSServer) -> None:
    async with Sink() as sink:
        svc = await delivering(tmp_path, dns, sink)
        await svc.store.add_template(Template(
            id="tpl_receipt", name="receipt", type="transactional",
            subject="Receipt {{order}}", html="<p>Thanks, {{name}} &amp; co</p>",
            text="Thanks, {{name}}. {{note ?? 'No note.'}}", from_email="shop@example.com",
            from_name="Shop", created_at=time.time(), updated_at=time.time()))
        api = await api_client(svc)
        try:
            body = {"to": ["bob@example.org"], "template_id": "tpl_receipt",
                    "template_vars": {"order": "A-1", "name": "<Bob>"}}
            status, sent, _ = await api.call("POST", "/api/v1/emails", body)
            assert status == 202 and set(sent) == EMAIL_KEYS, sent
            assert sent["subject"] == "Receipt A-1"
            await wait_final(svc, sent["id"])
            m = parsed(sink.messages[0].data)
            assert m["From"] == "Shop <shop@example.com>" and m["Subject"] == "Receipt A-1"
            html = m.get_body(preferencelist=("html",))
            text = m.get_body(preferencelist=("plain",))
            assert html is not None and "Thanks, &lt;Bob&gt;" in html.get_content()
            assert text is not None and text.get_content().strip() == "Thanks, <Bob>. No note."
            status, sent, _ = await api.call("POST", "/api/v1/emails", {
                **body, "from_": "billing@example.com"})  # from_ beats the template's
            detail = await wait_final(svc, sent["id"])
            assert detail.message.header_from == "billing@example.com"
            for change, code, field in [
                    ({"template_id": "tpl_none"}, 404, "template_id"),
                    ({"template_vars": {"order": "A-1"}}, 422, "template_vars.name")]:
                status, error, _ = await api.call("POST", "/api/v1/emails", {**body, **change})
                assert status == code and set(error) == ERROR_KEYS and error["field"] == field
        finally:
            await api.close()
            await svc.stop()


async def test_idempotency_scopes_and_auth(api: Api, service: Service) -> None:
    key = {"Idempotency-Key": "order-77"}
    first = await api.call("POST", "/api/v1/emails", SIMPLE, headers=key)
    again = await api.call("POST", "/api/v1/emails", SIMPLE, headers=key)
    assert first[0] == again[0] == 202 and first[1] == again[1]
    page = await service.store.list_messages(limit=10)
    assert len(page.items) == 1
    status, error, _ = await api.call("POST", "/api/v1/emails", {**SIMPLE, "subject": "other"},
                                      headers=key)
    assert status == 409 and set(error) == ERROR_KEYS and error["field"] == "Idempotency-Key"
    # a refusal is remembered in this dialect's shape too
    bad = {**SIMPLE, "template_id": "tpl"}
    for _ in range(2):
        status, error, _ = await api.call("POST", "/api/v1/emails", bad,
                                          headers={"Idempotency-Key": "bad-1"})
        assert status == 400 and set(error) == ERROR_KEYS

    _, reader = await keys.create_key(service.store, name="r", scopes=["emails:read"])
    _, sender = await keys.create_key(service.store, name="s", scopes=["emails:send"])
    status, error, _ = await api.call("POST", "/api/v1/emails", SIMPLE, key=reader)
    assert status == 403 and set(error) == ERROR_KEYS and "emails:send" in error["detail"]
    status, error, _ = await api.call("GET", "/api/v1/emails", key=sender)
    assert status == 403 and "emails:read" in error["detail"]
    status, error, _ = await api.call("GET", f"/api/v1/emails/{first[1]['id']}", key=sender)
    assert status == 403
    status, error, _ = await api.call("GET", "/api/v1/emails", key=None)
    assert status == 401 and set(error) == ERROR_KEYS
    status, error, _ = await api.call("POST", "/api/v1/emails", raw=b"{nope")
    assert status == 400 and set(error) == ERROR_KEYS


async def test_domain_id_is_a_domain_id_or_its_name(api: Api, service: Service) -> None:
    """The seed's domain_id is a domain *object id*: relay's domain ids (`relay domains
    list`) are taken, as are names; another owner's id is refused as an unknown one is."""
    await add_signing_domain(service, "example.com")
    await add_signing_domain(service, "other.test")
    mine = await service.store.get_domain("example.com")
    theirs = await service.store.get_domain("other.test")
    assert mine is not None and theirs is not None
    assert re.fullmatch(r"dom_[0-9a-f]{16}", mine.id) and mine.id != theirs.id
    body = {k: v for k, v in SIMPLE.items() if k != "from_"}
    _, limited = await keys.create_key(service.store, name="ex", scopes=["emails:send"],
                                       domains=["example.com"])

    async def sender(domain_id: str, key: str | None = None) -> str:
        status, sent, _ = await api.call("POST", "/api/v1/emails",
                                         {**body, "domain_id": domain_id}, key=key or api.key)
        assert status == 202, sent
        detail = await service.store.get_message(sent["id"])
        assert detail is not None
        return detail.message.header_from

    assert await sender(mine.id) == "noreply@example.com"
    assert await sender(f" {mine.id} ", limited) == "noreply@example.com"
    assert await sender("example.com", limited) == "noreply@example.com"  # a name, as before
    assert await sender(theirs.id) == "noreply@other.test"  # an admin key's reach is all

    async def refused(domain_id: Any, key: str | None = None) -> dict[str, Any]:
        status, error, _ = await api.call("POST", "/api/v1/emails",
                                          {**body, "domain_id": domain_id}, key=key or api.key)
        assert status == 422 and set(error) == ERROR_KEYS and error["field"] == "domain_id", \
            error
        return dict(error)

    unknown = "dom_0123456789abcdef"
    foreign = await refused(theirs.id, limited)
    missing = await refused(unknown, limited)
    assert foreign["detail"].replace(theirs.id, unknown) == missing["detail"]
    assert foreign["type"] == missing["type"] and theirs.name not in foreign["detail"]
    await refused(unknown)
    for bad in ("dom_", "DOM_" + mine.id[4:], "not_a domain", 7, ["example.com"]):
        await refused(bad)
    # an id changes nothing about from_: it must be at that domain
    status, error, _ = await api.call("POST", "/api/v1/emails", {
        **body, "domain_id": mine.id, "from_": "x@other.test"})
    assert status == 422 and error["field"] == "from_"
    assert len((await service.store.list_messages(limit=10)).items) == 4
