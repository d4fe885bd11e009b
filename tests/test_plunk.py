"""The Plunk dialect (/v1/send, /v1/track) driven by Plunk's own SDK, @plunk/node from npm,
against a relay delivering to an aiosmtpd sink; and its errors over plain HTTP."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay import keys
from relay.service import Service

from .apiutil import Api
from .conftest import add_signing_domain
from .dnsserver import DNSServer
from .rss import PeakRss
from .sink import Sink
from .test_delivery import wait_final
from .test_mailchannels_request import stored
from .test_unsubscribe import delivering

SDK_VERSION = "3.0.3"
CACHE = Path(os.environ.get("RELAY_TEST_CACHE", Path.home() / ".cache" / "relay-tests"))

# Runs the calls given on stdin with the SDK and prints each one's result or error.
DRIVER = """
const Plunk = require(process.argv[2]).default;
let input = "";
process.stdin.on("data", (d) => (input += d));
process.stdin.on("end", async () => {
  const { baseUrl, key, calls } = JSON.parse(input);
  const plunk = new Plunk(key, { baseUrl });
  const out = [];
  for (const c of calls) {
    try {
      let value;
      if (c.call === "send") value = await plunk.emails.send(c.body);
      else if (c.call === "track") value = await plunk.events.track(c.body);
      else value = await plunk.fetch({ method: "POST", url: c.url, json: c.body,
                                       headers: c.headers });
      out.push({ ok: true, value });
    } catch (e) {
      out.push({ ok: false, name: e.constructor.name, message: e.message });
    }
  }
  process.stdout.write(JSON.stringify(out));
});
"""


@pytest.fixture(scope="session")
def plunk_sdk() -> Path:
    """@plunk/node installed once into a cache directory (npm from the registry); the path
    of the driver script that uses it."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("npm and node are needed to install and run @plunk/node")
    home = CACHE / f"plunk-node-{SDK_VERSION}"
    package = home / "node_modules" / "@plunk" / "node" / "package.json"
    if not package.exists() or json.loads(package.read_text())["version"] != SDK_VERSION:
        home.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(home),
             f"@plunk/node@{SDK_VERSION}"], capture_output=True, text=True, timeout=300,
            check=False)
        assert done.returncode == 0, f"npm install @plunk/node failed:\n{done.stderr}"
    driver = home / "driver.js"
    driver.write_text(DRIVER)
    return driver


@dataclass
class Plunk:
    """Runs SDK calls in node against relay's /v1/."""

    driver: Path
    base: str
    key: str

    async def run(self, *calls: dict[str, Any]) -> list[dict[str, Any]]:
        proc = await asyncio.create_subprocess_exec(
            "node", str(self.driver), str(self.driver.parent / "node_modules" / "@plunk" /
                                          "node"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(json.dumps({
            "baseUrl": self.base + "/v1/", "key": self.key, "calls": list(calls)}).encode()),
            60)
        assert proc.returncode == 0, err.decode()
        results: list[dict[str, Any]] = json.loads(out)
        return results

    async def send(self, body: dict[str, Any]) -> dict[str, Any]:
        (result,) = await self.run({"call": "send", "body": body})
        assert result["ok"], result
        value: dict[str, Any] = result["value"]
        return value


@dataclass
class Relay:
    svc: Service
    sink: Sink
    sdk: Plunk
    admin: Api  # native API, with templates:manage and contacts:manage


@pytest.fixture
async def relay(tmp_path: Path, dns: DNSServer, plunk_sdk: Path) -> AsyncIterator[Relay]:
    async with Sink() as sink:
        svc = await delivering(tmp_path, dns, sink)
        await add_signing_domain(svc, "example.com")
        _, secret = await keys.create_key(svc.store, name="plunk",
                                          scopes=["emails:send", "contacts:manage"])
        _, admin_key = await keys.create_key(svc.store, name="admin", scopes=[
            "templates:manage", "contacts:manage"])
        assert svc.api_bound is not None
        base = "http://{}:{}".format(*svc.api_bound)
        session = aiohttp.ClientSession()
        try:
            yield Relay(svc, sink, Plunk(plunk_sdk, base, secret), Api(session, base, admin_key))
        finally:
            await session.close()
            await svc.stop()


async def delivered(r: Relay, answer: dict[str, Any]) -> list[email.message.EmailMessage]:
    """The mail the answer's emails became, as the sink received it, in answer order."""
    ids = [e["email"] for e in answer["data"]["emails"]]
    for message_id in ids:
        detail = await wait_final(r.svc, message_id)
        assert [x.status.value for x in detail.recipients] == ["delivered"]
    parsed = [email.message_from_bytes(m.data, policy=email.policy.default)
              for m in r.sink.messages]
    out = []
    for message_id in ids:
        found = [p for p in parsed
                 if f"<{message_id.removeprefix('msg_')}@" in str(p["Message-ID"])]
        assert len(found) == 1, message_id
        out.append(found[0])
    return out


def html_of(m: email.message.EmailMessage) -> str:
    part = m.get_body(("html",))
    assert part is not None
    return str(part.get_content())


async def test_sdk_send_delivers_each_recipient_its_own_email(relay: Relay) -> None:
    pdf = base64.b64encode(b"%PDF-1.4 tiny").decode()
    answer = await relay.sdk.send({
        "to": ["ann@example.org", {"name": "Bob B", "email": "bob@example.org"}],
        "subject": "Hi {{firstName ?? 'there'}}", "body": "<p>Hello {{firstName}} & co</p>",
        "from": "app@example.com", "name": "The App", "reply": "help@example.com",
        "headers": {"X-Campaign-ID": "welcome-flow"}, "data": {"firstName": "<Ann>"},
        "attachments": [{"filename": "a.pdf", "content": pdf,
                         "contentType": "application/pdf"}]})
    assert answer["success"] is True and answer["data"]["timestamp"].endswith("Z")
    emails = answer["data"]["emails"]
    assert [e["contact"]["email"] for e in emails] == ["ann@example.org", "bob@example.org"]
    assert all(e["email"].startswith("msg_") for e in emails)
    assert len({e["email"] for e in emails}) == 2

    ann, bob = await delivered(relay, answer)
    assert [m.rcpt_tos for m in relay.sink.messages].count(["ann@example.org"]) == 1
    assert str(ann["To"]) == "ann@example.org" and str(bob["To"]) == "Bob B <bob@example.org>"
    assert str(ann["Subject"]) == "Hi <Ann>"
    assert "<p>Hello &lt;Ann&gt; & co</p>" in html_of(ann)  # values escaped, not the body
    assert str(ann["From"]) == "The App <app@example.com>"
    assert str(ann["Reply-To"]) == "help@example.com"
    assert ann["X-Campaign-ID"] == "welcome-flow"
    assert [a.get_filename() for a in ann.iter_attachments()] == ["a.pdf"]
    assert ann["List-Unsubscribe"] is None  # transactional

    status, contact, _ = await relay.admin.call("GET", "/v1/contacts/bob@example.org")
    assert status == 200 and contact["id"] == emails[1]["contact"]["id"]
    assert contact["subscribed"] is False  # a contact a send creates is not subscribed
    assert contact["data"] == {"firstName": "<Ann>"}


async def test_marketing_template_skips_an_unsubscribed_contact(relay: Relay) -> None:
    status, news, _ = await relay.admin.call("POST", "/v1/templates", {
        "name": "news", "type": "marketing", "subject": "News for {{name ?? 'you'}}",
        "html": "<p>Our news</p>", "from": "News <news@example.com>"})
    assert status == 201
    status, receipt, _ = await relay.admin.call("POST", "/v1/templates", {
        "name": "receipt", "subject": "Your receipt", "html": "<p>Paid {{amount}}</p>",
        "from": "billing@example.com"})
    assert status == 201
    await relay.admin.call("POST", "/v1/contacts", {"email": "carol@example.org",
                                                    "subscribed": False})

    skipped = await relay.sdk.send({"to": "carol@example.org", "template": news["id"]})
    (item,) = skipped["data"]["emails"]
    assert item["email"] is None and item["skipped"]["reason"] == "unsubscribed"
    assert (await relay.svc.store.list_messages()).items == ()  # nothing queued

    paid = await relay.sdk.send({"to": "carol@example.org", "template": receipt["id"],
                                 "data": {"amount": "$5"}})
    (receipt_mail,) = await delivered(relay, paid)
    assert str(receipt_mail["Subject"]) == "Your receipt"  # the template's parts
    assert "<p>Paid $5</p>" in html_of(receipt_mail)
    assert str(receipt_mail["From"]) == "billing@example.com"

    # a subscribed contact gets the marketing template, as broadcast mail; request fields win
    sent = await relay.sdk.send({"to": "dave@example.org", "template": news["id"],
                                 "subscribed": True, "subject": "Mine {{name ?? 'D'}}"})
    (news_mail,) = await delivered(relay, sent)
    assert str(news_mail["Subject"]) == "Mine D" and "<p>Our news</p>" in html_of(news_mail)
    assert str(news_mail["From"]) == "News <news@example.com>"
    assert news_mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert sorted(m.rcpt_tos[0] for m in relay.sink.messages) == [
        "carol@example.org", "dave@example.org"]  # carol: the receipt only

    # omitted `subscribed` leaves dave as he is: subscribed
    again = await relay.sdk.send({"to": "dave@example.org", "template": news["id"]})
    assert again["data"]["emails"][0]["email"] is not None

    # the one-click unsubscribe in the marketing mail unsubscribes the contact
    link = re.match(r"<(http://[^>]+)>", str(news_mail["List-Unsubscribe"]))
    assert link is not None
    async with relay.admin.session.post(link.group(1), allow_redirects=False,
                                        data={"List-Unsubscribe": "One-Click"}) as resp:
        assert resp.status == 200
    status, dave, _ = await relay.admin.call("GET", "/v1/contacts/dave@example.org")
    assert status == 200 and dave["subscribed"] is False
    after = await relay.sdk.send({"to": "dave@example.org", "template": news["id"]})
    assert after["data"]["emails"][0]["skipped"]["reason"] == "unsubscribed"


async def test_persistent_data_is_saved_and_non_persistent_is_not(relay: Relay) -> None:
    answer = await relay.sdk.send({
        "to": "erin@example.org", "subject": "Code", "from": "app@example.com",
        "body": "<p>{{plan}} {{resetCode}}</p>",
        "data": {"plan": "pro", "resetCode": {"value": "ABC123", "persistent": False},
                 "seats": {"value": 3, "persistent": True}}})
    (mail,) = await delivered(relay, answer)
    assert "<p>pro ABC123</p>" in html_of(mail)
    status, contact, _ = await relay.admin.call("GET", "/v1/contacts/erin@example.org")
    assert status == 200 and contact["data"] == {"plan": "pro", "seats": 3}

    # the saved data fills the next email; a null deletes a field
    answer = await relay.sdk.send({
        "to": "erin@example.org", "subject": "Again", "from": "app@example.com",
        "body": "<p>{{plan}} {{seats ?? 'none'}} {{resetCode ?? 'gone'}}</p>",
        "data": {"seats": None}})
    (mail,) = await delivered(relay, answer)
    assert "<p>pro none gone</p>" in html_of(mail)
    status, contact, _ = await relay.admin.call("GET", "/v1/contacts/erin@example.org")
    assert contact["data"] == {"plan": "pro"}

    # /v1/track upserts the contact too (subscribed, as the SDK documents) and keeps the event
    (tracked,) = await relay.sdk.run({"call": "track", "body": {
        "event": "signed-up", "email": "frank@example.org",
        "data": {"company": "Acme", "ref": {"value": "x", "persistent": False}}}})
    assert tracked["ok"] and tracked["value"]["success"] is True
    status, contact, _ = await relay.admin.call("GET", "/v1/contacts/frank@example.org")
    assert status == 200 and contact["subscribed"] is True and contact["data"] == {"company": "Acme"}
    assert tracked["value"]["data"]["contact"] == contact["id"]
    events = await relay.svc.store.contact_events(contact["id"])
    assert [(name, data) for name, data, _ in events] == [
        ("signed-up", {"company": "Acme", "ref": "x"})]


async def test_a_reused_idempotency_key_is_409(relay: Relay) -> None:
    body = {"to": "gina@example.org", "subject": "Once", "body": "<p>once</p>",
            "from": "app@example.com"}
    hdrs = {"Idempotency-Key": "order-42"}
    first, replayed, reused = await relay.sdk.run(
        {"call": "fetch", "url": "send", "body": body, "headers": hdrs},
        {"call": "fetch", "url": "send", "body": body, "headers": hdrs},
        {"call": "fetch", "url": "send", "body": {**body, "subject": "Twice"},
         "headers": hdrs})
    assert first["ok"] and replayed["ok"]
    assert replayed["value"] == first["value"]  # a retry of the same request: same answer
    assert not reused["ok"] and "Idempotency-Key" in reused["message"]
    assert len((await relay.svc.store.list_messages()).items) == 1

    status, answer, _ = await relay.admin.call(
        "POST", "/v1/send", {**body, "subject": "Thrice"}, key=relay.sdk.key, headers=hdrs)
    assert status == 409
    assert answer["success"] is False
    assert (answer["error"]["code"], answer["error"]["statusCode"]) == ("CONFLICT", 409)


@pytest.fixture
async def plunk(service: Service) -> AsyncIterator[Api]:
    _, secret = await keys.create_key(service.store, name="p",
                                      scopes=["emails:send", "contacts:manage"])
    assert service.api_bound is not None
    async with aiohttp.ClientSession() as session:
        yield Api(session, "http://{}:{}".format(*service.api_bound), secret)


OK = {"to": "x@example.org", "subject": "s", "body": "<p>b</p>", "from": "a@example.com"}


@pytest.mark.parametrize(("body", "status", "field"), [
    ({**OK, "colour": "red"}, 422, "colour"),
    ({**OK, "subscribed": "yes"}, 422, "subscribed"),
    ({**OK, "type": "markdown"}, 422, "type"),
    ({k: v for k, v in OK.items() if k != "body"}, 422, "body"),
    ({k: v for k, v in OK.items() if k != "to"}, 422, "to"),
    ({**OK, "to": []}, 422, "to"),
    ({**OK, "to": ["x@example.org", "not an address"]}, 422, "to[1]"),
    ({**OK, "headers": {"X-A": "a\r\nBcc: y@example.org"}}, 422, "headers.X-A"),
    ({**OK, "headers": {"From": "evil@example.net"}}, 422, "headers.From"),
    ({**OK, "body": "<p>{{missing}}</p>"}, 422, "data.missing"),
    ({**OK, "data": {"c": {"value": 1, "persistent": "no"}}}, 422, "data.c.persistent"),
    ({**OK, "template": "tpl_nope"}, 404, "template"),
    ({**OK, "attachments": [{"filename": f"{i}.txt", "content": "eA==",
                             "contentType": "text/plain"} for i in range(11)]},
     422, "attachments"),
    ({**OK, "attachments": [{"filename": "a.bin", "content": "eA=="}]}, 422,
     "attachments[0].contentType"),
])
async def test_bad_requests_get_plunks_error_shape(plunk: Api, body: dict[str, Any],
                                                   status: int, field: str) -> None:
    got, answer, resp = await plunk.call("POST", "/v1/send", body)
    assert got == status, answer
    assert answer["success"] is False and answer["error"]["statusCode"] == status
    assert answer["error"]["code"] == {422: "VALIDATION_ERROR", 404: "NOT_FOUND"}[status]
    assert answer["error"]["errors"][0]["field"] == field
    assert answer["message"] == answer["error"]["message"]
    assert answer["error"]["requestId"] == resp.headers["X-Request-Id"]


async def test_limits_and_auth_in_plunks_shape(plunk: Api, service: Service) -> None:
    big = base64.b64encode(b"x" * (6 * 1024 * 1024)).decode()
    two = [{"filename": f"{i}.bin", "content": big, "contentType": "application/octet-stream"}
           for i in range(2)]
    got, answer, _ = await plunk.call("POST", "/v1/send", {**OK, "attachments": two})
    assert got == 413 and answer["error"]["code"] == "PAYLOAD_TOO_LARGE"
    got, answer, _ = await plunk.call("POST", "/v1/send", OK, key=None)
    assert got == 401 and answer["error"]["code"] == "UNAUTHORIZED"
    _, reader = await keys.create_key(service.store, name="r", scopes=["emails:read"])
    got, answer, _ = await plunk.call("POST", "/v1/send", OK, key=reader)
    assert got == 403 and answer["error"]["code"] == "FORBIDDEN"
    got, answer, _ = await plunk.call("POST", "/v1/track", {"email": "x@example.org"})
    assert got == 422 and answer["error"]["errors"][0]["field"] == "event"
    assert (await service.store.list_messages()).items == ()


async def test_data_over_the_metadata_limit_is_refused_naming_it(plunk: Api,
                                                                 service: Service) -> None:
    big = {"note": "x" * service.config.limits.max_metadata_size}
    got, answer, _ = await plunk.call("POST", "/v1/send", {**OK, "data": big})
    assert got == 422 and answer["error"]["code"] == "VALIDATION_ERROR", answer
    assert answer["error"]["errors"][0]["field"] == "data"
    assert (await service.store.list_messages()).items == ()
    assert await service.store.get_contact("x@example.org") is None


async def test_recipients_share_one_decoded_attachment_within_the_expansion_limit(
        plunk: Api, service: Service) -> None:
    """Each recipient is its own message: 100 of them with a 1 MiB file would build 100 MiB
    (413, before anything is built); a few share one decoded, once-stored file."""
    blob = base64.b64encode(os.urandom(1024 * 1024)).decode()
    files = [{"filename": "a.bin", "content": blob, "contentType": "application/octet-stream"}]
    many = [f"r{i}@example.org" for i in range(100)]
    with PeakRss() as peak:
        got, answer, _ = await plunk.call("POST", "/v1/send", {**OK, "to": many,
                                                              "attachments": files})
    assert got == 413 and answer["error"]["code"] == "PAYLOAD_TOO_LARGE", answer
    assert "max_request_expansion" in answer["error"]["message"]
    assert peak.growth < 40 * 1024 * 1024, peak.growth
    await add_signing_domain(service, "example.com")  # Plunk sends from verified domains
    got, answer, _ = await plunk.call("POST", "/v1/send", {
        **OK, "to": ["a@example.org", "b@example.org", "c@example.org"], "attachments": files})
    assert got == 200, answer
    assert await stored(service, "SELECT count(*) FROM parts") == (1,)
    assert await stored(service, "SELECT count(DISTINCT message_id) FROM message_parts") == (3,)
