"""The drin SDK from PyPI, pointed at relay with base_url, works as it does against Drin."""

from __future__ import annotations

import base64
import email
import email.policy
import time
from email.message import EmailMessage

import pytest
from drin import (
    DrinAuthenticationError,
    DrinClient,
    DrinConflictError,
    DrinError,
    DrinNotFoundError,
    DrinPermissionError,
    DrinValidationError,
)

from relay import keys
from relay.service import Service
from relay.types import Domain

from .conftest import add_signing_domain
from .smtputil import in_thread

EMAIL = {"from": {"email": "you@example.com", "name": "Acme"},
         "to": [{"email": "user@example.org"}], "subject": "Welcome",
         "html": "<h1>Welcome</h1>", "text": "Welcome"}


async def client(service: Service, scopes: tuple[str, ...] = ("emails:send", "emails:read")
                 ) -> DrinClient:
    _, secret = await keys.create_key(service.store, name="sdk", scopes=scopes)
    assert service.api_bound is not None
    return DrinClient(api_key=secret, base_url="http://{}:{}".format(*service.api_bound),
                      max_retries=0)


async def test_send_get_batch_list_and_paginate(service: Service) -> None:
    drin = await client(service)
    sent = await in_thread(drin.emails.send, EMAIL)
    assert sent["status"] == "queued" and sent["id"].startswith("msg_")
    got = await in_thread(drin.emails.get, sent["id"])
    assert got["id"] == sent["id"] and got["recipients"][0]["email"] == "user@example.org"
    body = await in_thread(drin.emails.get_body, sent["id"])
    assert body["html"].strip() == "<h1>Welcome</h1>" and body["text"].strip() == "Welcome"
    batch = await in_thread(drin.emails.send_many, [EMAIL, {**EMAIL, "to": ["bad"]}, EMAIL])
    assert [("id" in r, "error" in r) for r in batch["results"]] == [
        (True, False), (False, True), (True, False)]
    page = await in_thread(drin.emails.list, {"limit": 2})
    assert len(page["data"]) == 2 and page["nextCursor"]
    everything = await in_thread(lambda: list(drin.emails.paginate({"limit": 2})))
    assert len(everything) == 3
    assert everything[-1]["id"] == sent["id"]


async def test_sdk_errors_map_to_relay_errors(service: Service) -> None:
    drin = await client(service)
    with pytest.raises(DrinValidationError) as invalid:
        await in_thread(drin.emails.send, {**EMAIL, "to": ["not an address"]})
    assert invalid.value.param == "to[0]" and invalid.value.status == 422
    with pytest.raises(DrinNotFoundError):
        await in_thread(drin.emails.get, "msg_nothing")
    await in_thread(lambda: drin.emails.send(EMAIL, idempotency_key="k1"))
    with pytest.raises(DrinConflictError):
        await in_thread(lambda: drin.emails.send({**EMAIL, "subject": "x"},
                                                 idempotency_key="k1"))
    stranger = DrinClient(api_key="rk_000000000000_wrong", max_retries=0,
                          base_url="http://{}:{}".format(*service.api_bound or ("", 0)))
    with pytest.raises(DrinAuthenticationError):
        await in_thread(stranger.emails.send, EMAIL)
    reader = await client(service, ("emails:read",))
    with pytest.raises(DrinPermissionError):
        await in_thread(reader.emails.send, EMAIL)


async def test_a_batch_with_an_item_that_is_not_an_object_queues_the_others(
        service: Service) -> None:
    drin = await client(service)
    batch = await in_thread(drin.emails.send_many, [5, EMAIL])
    first, second = batch["results"]
    assert first["index"] == 0 and first["error"]["param"] == "emails[0]"
    assert first["error"]["type"] == "validation_error"
    assert second["index"] == 1 and second["status"] == "queued"
    assert (await in_thread(drin.emails.get, second["id"]))["status"] == "queued"


async def test_domains_lists_the_keys_own_and_list_verified_the_signing_ones(
        service: Service) -> None:
    await add_signing_domain(service, "example.com")
    await add_signing_domain(service, "other.test")
    # a domain whose keys are not active yet (none): pending
    await service.store.save_domain(Domain(name="mail.example.com", created_at=time.time(),
                                           return_path="bounces.mail.example.com"))
    _, secret = await keys.create_key(service.store, name="d", scopes=["domains:manage"],
                                      domains=("example.com",))
    assert service.api_bound is not None
    drin = DrinClient(api_key=secret, base_url="http://{}:{}".format(*service.api_bound),
                      max_retries=0)
    page = await in_thread(drin.domains.list)
    assert [(d["domain"], d["status"]) for d in page["data"]] == [
        ("example.com", "verified"), ("mail.example.com", "pending")]
    assert page["nextCursor"] is None
    records = {(r["type"], r["name"]) for r in page["data"][0]["records"]}
    assert {("TXT", "_dmarc.example.com"), ("TXT", "bounces.example.com"),
            ("MX", "bounces.example.com")} <= records
    assert sum(r["purpose"].startswith("DKIM") for r in page["data"][0]["records"]) == 2
    verified = await in_thread(drin.domains.list_verified)
    assert [d["domain"] for d in verified] == ["example.com"]  # not other.test: not its own
    paged = await in_thread(lambda: list(drin.domains.paginate({"limit": 1})))
    assert [d["domain"] for d in paged] == ["example.com", "mail.example.com"]
    with pytest.raises(DrinValidationError) as bad:
        await in_thread(drin.domains.list, {"status": "sideways"})
    assert bad.value.param == "status"
    with pytest.raises(DrinPermissionError):  # reading domains takes domains:manage
        await in_thread((await client(service)).domains.list)


def parsed(raw: str) -> EmailMessage:
    found = email.message_from_string(raw, policy=email.policy.default)
    assert isinstance(found, EmailMessage)
    return found


async def test_reply_threads_under_the_email_it_answers(service: Service) -> None:
    drin = await client(service)
    sent = await in_thread(drin.emails.send, EMAIL)
    parent = parsed((await in_thread(drin.emails.get_body, sent["id"]))["raw"])
    replied = await in_thread(drin.emails.reply, sent["id"], {"text": "Any news?"})
    assert replied["status"] == "queued" and replied["id"] != sent["id"]
    reply = parsed((await in_thread(drin.emails.get_body, replied["id"]))["raw"])
    assert reply["In-Reply-To"] == parent["Message-ID"]
    assert reply["References"] == parent["Message-ID"]
    assert reply["Subject"] == "Re: Welcome"
    assert reply["From"] == "Acme <you@example.com>" and reply["To"] == "user@example.org"
    assert reply.get_body(("plain",)).get_content().strip() == "Any news?"
    # a reply to the reply: the chain grows, the subject is not doubled; fields override
    again = await in_thread(lambda: drin.emails.reply(replied["id"], {
        "html": "<p>Ping</p>", "to": ["boss@example.org"]}, idempotency_key="r1"))
    third = parsed((await in_thread(drin.emails.get_body, again["id"]))["raw"])
    assert third["References"] == f"{parent['Message-ID']} {reply['Message-ID']}"
    assert third["In-Reply-To"] == reply["Message-ID"]
    assert third["Subject"] == "Re: Welcome" and third["To"] == "boss@example.org"
    same = await in_thread(lambda: drin.emails.reply(replied["id"], {
        "html": "<p>Ping</p>", "to": ["boss@example.org"]}, idempotency_key="r1"))
    assert same == again  # the idempotency key covers a reply as a send
    for body, param in (({}, "text"), ({"text": "x", "to": ["nope"]}, "to[0]"),
                        ({"text": "x", "headers": {"References": "<a@b>"}},
                         "headers.References"),
                        ({"text": "x", "colour": "red"}, "colour")):
        with pytest.raises(DrinValidationError) as bad:
            await in_thread(drin.emails.reply, sent["id"], body)
        assert bad.value.param == param, (body, bad.value.param)
    with pytest.raises(DrinNotFoundError):
        await in_thread(drin.emails.reply, "msg_nothing", {"text": "x"})


async def test_attachments_lists_the_files_sent_and_410_once_pruned(service: Service) -> None:
    drin = await client(service)
    pdf = b"%PDF-1.4 " + bytes(range(256)) * 4
    sent = await in_thread(drin.emails.send, {**EMAIL, "attachments": [
        {"filename": "invoice.pdf", "content": base64.b64encode(pdf).decode()},
        {"filename": "logo.png", "content": base64.b64encode(b"\x89PNG....").decode(),
         "contentType": "image/png", "contentId": "logo"}]})
    files = await in_thread(drin.emails.list_attachments, sent["id"])
    assert files == [  # in MIME order: the inline image sits with the HTML it is in
        {"id": "att_1", "filename": "logo.png", "contentType": "image/png", "size": 8,
         "inline": True, "contentId": "logo"},
        {"id": "att_2", "filename": "invoice.pdf", "contentType": "application/pdf",
         "size": len(pdf), "inline": False}]
    plain = await in_thread(drin.emails.send, EMAIL)
    assert await in_thread(drin.emails.list_attachments, plain["id"]) == []
    with pytest.raises(DrinNotFoundError):
        await in_thread(drin.emails.list_attachments, "msg_nothing")
    now = time.time()
    await service.store.cancel(sent["id"], "test", now)
    await service.store.prune_bodies(before=now + 1, now=now, limit=10)
    with pytest.raises(DrinError) as pruned:
        await in_thread(drin.emails.list_attachments, sent["id"])
    # the SDK knows no body_pruned type (it calls it internal): the status and body say it
    assert pruned.value.status == 410 and pruned.value.body["error"]["type"] == "body_pruned"
