"""Owners (DESIGN.md section 10, owners.py): a key with --domain a.test sees and changes only
what a.test owns, through every API; another owner's ids answer 404 as if they did not exist;
a key never grants more than it has; every route's scope comes from one table."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relay import keys
from relay.api import auth
from relay.config import Config, WebhooksConfig
from relay.service import Service
from relay.store import SQLiteStore
from relay.store.schema import MIGRATIONS
from relay.types import SCOPES

from .apiutil import Api
from .conftest import add_signing_domain, make_config

EVERY = list(SCOPES)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """Delivery paused; webhook targets on loopback allowed (none is called)."""
    return make_config(tmp_path, webhooks=WebhooksConfig(allow_private_targets=True))


class Tenant:
    def __init__(self, api: Api, domain: str) -> None:
        self.api, self.domain = api, domain

    async def call(self, method: str, path: str, body: Any = None, **kw: Any
                   ) -> tuple[int, Any]:
        status, answer, _ = await self.api.call(method, path, body, **kw)
        return status, answer

    def email(self, **more: Any) -> dict[str, Any]:
        return {"from": f"app@{self.domain}", "to": ["someone@example.org"],
                "subject": "hello", "text": "hi", **more}


@pytest.fixture
async def tenants(service: Service) -> AsyncIterator[tuple[Tenant, Tenant, Tenant]]:
    """A (a.test), B (b.test) and an admin key, each with every scope."""
    await add_signing_domain(service, "a.test")
    await add_signing_domain(service, "b.test")
    assert service.api_bound is not None
    base = "http://{}:{}".format(*service.api_bound)
    session = aiohttp.ClientSession()
    made = []
    for domains in (("a.test",), ("b.test",), ()):
        _, secret = await keys.create_key(service.store, name="t", scopes=EVERY,
                                          domains=domains)
        made.append(Tenant(Api(session, base, secret), domains[0] if domains else "admin.test"))
    try:
        yield made[0], made[1], made[2]
    finally:
        await session.close()


async def test_a_key_lists_and_reads_only_its_own_messages(
        tenants: tuple[Tenant, Tenant, Tenant]) -> None:
    a, b, admin = tenants
    status, mine = await a.call("POST", "/v1/emails", a.email())
    assert status == 202
    status, theirs = await b.call("POST", "/v1/emails", b.email(
        scheduledAt="2099-01-01T00:00:00Z"))
    assert status == 202
    _, listed = await a.call("GET", "/v1/emails")
    assert [m["id"] for m in listed["data"]] == [mine["id"]]
    _, listed = await admin.call("GET", "/v1/emails")
    assert {m["id"] for m in listed["data"]} == {mine["id"], theirs["id"]}
    for path in (f"/v1/emails/{theirs['id']}", f"/v1/emails/{theirs['id']}/body"):
        status, body = await a.call("GET", path)
        assert status == 404 and body["error"]["param"] == "id", path
        assert (await b.call("GET", path))[0] == 200
    status, _ = await a.call("POST", f"/v1/emails/{theirs['id']}/cancel")
    assert status == 404
    _, detail = await b.call("GET", f"/v1/emails/{theirs['id']}")
    assert detail["status"] == "scheduled"  # not cancelled by A
    # the same through PiiSend's routes
    _, page = await a.call("GET", "/api/v1/emails")
    assert [m["id"] for m in page["data"]] == [mine["id"]]
    for method, path in (("GET", f"/api/v1/emails/{theirs['id']}"),
                         ("POST", f"/api/v1/emails/{theirs['id']}/cancel"),
                         ("POST", f"/api/v1/emails/{theirs['id']}/resend")):
        status, body = await a.call(method, path)
        assert status == 404 and body["field"] == "id", (method, path, body)
    _, listed = await b.call("GET", "/v1/emails")
    assert len(listed["data"]) == 1  # A's resend of B's mail made nothing


async def test_webhooks_are_their_owners_and_get_only_their_events(
        service: Service, tenants: tuple[Tenant, Tenant, Tenant]) -> None:
    a, b, admin = tenants
    ids = {}
    for t in (a, b, admin):
        ep = await _endpoint(service, t)
        ids[t.domain] = ep
    _, listed = await a.call("GET", "/v1/webhooks")
    assert [e["id"] for e in listed["data"]] == [ids["a.test"]]
    assert {e["id"] for e in (await admin.call("GET", "/v1/webhooks"))[1]["data"]} == set(
        ids.values())
    theirs = ids["b.test"]
    for method, path, body in (
            ("GET", f"/v1/webhooks/{theirs}", None),
            ("PATCH", f"/v1/webhooks/{theirs}", {"enabled": False}),
            ("POST", f"/v1/webhooks/{theirs}/rotate-secret", None),
            ("POST", f"/v1/webhooks/{theirs}/redeliver", {"eventId": "evt_1"}),
            ("DELETE", f"/v1/webhooks/{theirs}", None)):
        status, answer = await a.call(method, path, body)
        assert status == 404 and answer["error"]["param"] == "id", (method, path)
    _, still = await b.call("GET", f"/v1/webhooks/{theirs}")
    assert still["enabled"] is True
    # events: B's mail goes to B's endpoint and the admin's, never to A's
    status, sent = await b.call("POST", "/v1/emails", b.email())
    assert status == 202
    assert await service.store.outbox(ids["a.test"]) == []
    assert len(await service.store.outbox(ids["b.test"])) == 1
    assert len(await service.store.outbox(ids["admin.test"])) == 1
    # and A cannot have B's event sent to its own endpoint
    detail = await service.store.get_message(sent["id"])
    assert detail is not None
    event_id = detail.events[0].id
    status, _ = await a.call("POST", f"/v1/webhooks/{ids['a.test']}/redeliver",
                             {"eventId": f"evt_{event_id}"})
    assert status == 404
    assert await service.store.outbox(ids["a.test"]) == []
    # MailChannels' enrolment routes: the list, the delete and a duplicate are the caller's
    hook = "http://127.0.0.1:9/mc"
    status, _ = await b.call("POST", f"/tx/v1/webhook?endpoint={hook}")
    assert status == 201
    status, listed = await a.call("GET", "/tx/v1/webhook")
    assert status == 200 and listed["data"] == []
    status, _ = await a.call("DELETE", "/tx/v1/webhook")
    assert status == 204
    _, listed = await b.call("GET", "/tx/v1/webhook")
    assert listed["data"] == [{"webhook": hook}]
    status, _ = await a.call("POST", f"/tx/v1/webhook?endpoint={hook}")
    assert status == 201  # not 409: B's enrolment is not A's to know of


async def _endpoint(service: Service, t: Tenant) -> str:
    """An endpoint made over the API by the tenant (nothing listens at its target: the
    outbox rows are what is checked)."""
    status, made = await t.call("POST", "/v1/webhooks", {"url": "http://127.0.0.1:9/hook"})
    assert status == 201, made
    return str(made["id"])


async def test_suppressions_belong_to_their_owner_and_stop_only_its_mail(
        service: Service, tenants: tuple[Tenant, Tenant, Tenant]) -> None:
    a, b, admin = tenants
    status, _ = await b.call("POST", "/v1/suppressions", {"email": "x@example.org"})
    assert status == 201
    _, listed = await a.call("GET", "/v1/suppressions")
    assert listed["data"] == []
    status, _ = await a.call("DELETE", "/v1/suppressions/x@example.org")
    assert status == 404
    _, listed = await b.call("GET", "/v1/suppressions")
    assert [(e["email"], e["domains"]) for e in listed["data"]] == [
        ("x@example.org", ["b.test"])]
    # B's entry stops B's mail only; A's own entry for the same address is A's, not a 200
    status, answer = await b.call("POST", "/v1/emails", b.email(to=["x@example.org"]))
    assert status == 409
    status, answer = await a.call("POST", "/v1/emails", a.email(to=["x@example.org"]))
    assert status == 202, answer
    status, _ = await a.call("POST", "/v1/suppressions", {"email": "x@example.org"})
    assert status == 201
    status, body = await a.call("POST", "/v1/suppressions", {"email": "y@example.org",
                                                             "scope": "b.test"})
    assert status == 422 and body["error"]["param"] == "scope"
    # an admin's entry is the whole relay's: it stops everyone's mail
    await admin.call("POST", "/v1/suppressions", {"email": "z@example.org"})
    status, _ = await a.call("POST", "/v1/emails", a.email(to=["z@example.org"]))
    assert status == 409
    _, listed = await a.call("GET", "/v1/suppressions")
    assert [e["email"] for e in listed["data"]] == ["x@example.org"]


async def test_templates_and_contacts_are_their_owners(
        service: Service, tenants: tuple[Tenant, Tenant, Tenant]) -> None:
    a, b, _ = tenants
    status, t = await b.call("POST", "/v1/templates", {"name": "w", "subject": "Hi {{name}}",
                                                       "html": "<p>{{name}}</p>"})
    assert status == 201
    assert (await a.call("GET", "/v1/templates"))[1]["data"] == []
    for method, body in (("GET", None), ("PATCH", {"name": "mine"}), ("DELETE", None)):
        status, _ = await a.call(method, f"/v1/templates/{t['id']}", body)
        assert status == 404, method
    assert (await b.call("GET", f"/v1/templates/{t['id']}"))[1]["name"] == "w"
    # nor can A send with it, in any dialect that takes a template
    status, body = await a.call("POST", "/api/v1/emails", {
        "from_": "app@a.test", "to": ["x@example.org"], "template_id": t["id"],
        "template_vars": {"name": "x"}})
    assert status == 404 and body["field"] == "template_id"
    status, body = await a.call("POST", "/v1/send", {"to": "x@example.org", "from": "app@a.test",
                                                    "template": t["id"]})
    assert status == 404, body
    # contacts: the same address is one contact per owner
    status, theirs = await b.call("POST", "/v1/contacts", {"email": "c@example.org",
                                                           "subscribed": True,
                                                           "data": {"plan": "pro"}})
    assert status == 201
    assert (await a.call("GET", "/v1/contacts"))[1]["data"] == []
    for method in ("GET", "DELETE"):
        for ident in (theirs["id"], "c@example.org"):
            status, _ = await a.call(method, f"/v1/contacts/{ident}")
            assert status == 404, (method, ident)
    status, mine = await a.call("POST", "/v1/contacts", {"email": "c@example.org"})
    assert status == 201 and mine["id"] != theirs["id"] and mine["data"] == {}
    # Plunk's /v1/track changes the caller's own contact, not B's
    status, _ = await a.call("POST", "/v1/track", {"email": "c@example.org", "event": "x",
                                                  "subscribed": False, "data": {"plan": "free"}})
    assert status == 200
    _, still = await b.call("GET", f"/v1/contacts/{theirs['id']}")
    assert still["subscribed"] is True and still["data"] == {"plan": "pro"}


async def test_a_key_grants_and_revokes_no_more_than_it_has(
        service: Service, tenants: tuple[Tenant, Tenant, Tenant]) -> None:
    a, b, admin = tenants
    _, limited = await admin.call("POST", "/v1/api-keys", {
        "name": "mgr", "scopes": ["keys:manage", "emails:send"], "domains": ["a.test"]})
    mgr = Tenant(Api(a.api.session, a.api.base, limited["key"]), "a.test")
    status, body = await mgr.call("POST", "/v1/api-keys", {"name": "x", "scopes": EVERY,
                                                          "domains": ["a.test"]})
    assert status == 403 and body["error"]["param"] == "scopes"
    status, body = await mgr.call("POST", "/v1/api-keys", {"name": "x",
                                                          "scopes": ["emails:send"],
                                                          "domains": ["b.test"]})
    assert status == 403 and body["error"]["param"] == "domains"
    status, body = await mgr.call("POST", "/v1/api-keys", {"name": "x",
                                                          "scopes": ["emails:send"]})
    assert status == 403  # no domains would be every domain
    status, made = await mgr.call("POST", "/v1/api-keys", {
        "name": "x", "scopes": ["emails:send"], "domains": ["mail.a.test"]})
    assert status == 201
    _, listed = await mgr.call("GET", "/v1/api-keys")
    assert {k["id"] for k in listed["data"]} == {made["id"], limited["id"]}
    # A's own full key has scopes mgr lacks: mgr neither sees nor revokes it; nor B's or admin's
    all_keys = await service.store.list_api_keys()
    for key in all_keys:
        if key.id in (made["id"], limited["id"]):
            continue
        status, _ = await mgr.call("DELETE", f"/v1/api-keys/{key.id}")
        assert status == 404, key
    assert all(k.revoked_at is None for k in await service.store.list_api_keys())
    status, _ = await mgr.call("DELETE", f"/v1/api-keys/{made['id']}")
    assert status == 200


async def test_tracking_a_contact_needs_the_contacts_scope(
        service: Service, tenants: tuple[Tenant, Tenant, Tenant]) -> None:
    a, _, _ = tenants
    _, sender = await keys.create_key(service.store, name="s", scopes=["emails:send"],
                                      domains=["a.test"])
    status, body, _ = await a.api.call("POST", "/v1/track", {
        "email": "c@example.org", "event": "signup", "subscribed": True}, key=sender)
    assert status == 403 and "contacts:manage" in json.dumps(body)


async def test_plunk_sends_only_from_a_verified_domain(
        service: Service, tenants: tuple[Tenant, Tenant, Tenant]) -> None:
    _, _, admin = tenants
    status, body = await admin.call("POST", "/v1/send", {
        "to": "x@example.org", "subject": "s", "body": "<p>b</p>",
        "from": "app@unverified.test"})
    assert status == 422 and "verified" in json.dumps(body), body
    status, body = await admin.call("POST", "/v1/send", {
        "to": "x@example.org", "subject": "s", "body": "<p>b</p>", "from": "app@a.test"})
    assert status == 200, body


async def test_every_route_has_its_scope_in_the_one_table(service: Service) -> None:
    """Called without a key, every route but the public ones is 401; a route missing from
    the table stops the application from being built."""
    assert service.api_bound is not None
    base = "http://{}:{}".format(*service.api_bound)
    async with aiohttp.ClientSession() as session:
        for (method, path), scope in auth.ROUTE_SCOPES.items():
            if scope is auth.PUBLIC or path == "/metrics":  # a key only off loopback, unless
                continue  # [metrics] require_key says otherwise (test_metrics.py)
            url = base + path.replace("{id}", "x").replace("{email}", "x@example.org")
            async with session.request(method, url) as resp:
                assert resp.status == 401, (method, path, resp.status)
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.add_routes([web.get("/v1/secret-thing", handler)])
    with pytest.raises(RuntimeError, match="ROUTE_SCOPES"):
        auth.check_routes(app)


async def test_owners_survive_the_migration_of_older_stores(tmp_path: Path) -> None:
    """A store made before owners (schema 12) keeps its suppressions, contacts and their
    events; they become the whole relay's."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for i, step in enumerate(MIGRATIONS[:12]):
        db.executescript("BEGIN;" + step + ("DELETE FROM schema_version;" if i else "")
                         + f"INSERT INTO schema_version VALUES ({i + 1}); COMMIT;")
    now = time.time()
    db.execute("INSERT INTO suppressions (address, scope, reason, source, created_at)"
               " VALUES ('x@example.org', '', 'hard_bounce', 'test', ?)", (now,))
    db.execute("INSERT INTO contacts (id, email, subscribed, data, created_at, updated_at)"
               " VALUES ('c1', 'c@example.org', 1, '{}', ?, ?)", (now, now))
    db.execute("INSERT INTO contact_events (contact_id, name, created_at) VALUES ('c1', 'e', ?)",
               (now,))
    db.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        (entry,) = await store.list_suppressions()
        assert entry.address == "x@example.org" and entry.owner == ()
        contact = await store.get_contact("c1")
        assert contact is not None and contact.subscribed and contact.owner == ()
        assert [e[0] for e in await store.contact_events("c1")] == ["e"]
        # a relay-wide entry is out of a domain key's reach
        assert await store.list_suppressions(within=("a.test",)) == []
    finally:
        await store.close()


async def test_a_disabled_endpoint_is_reported_to_its_own_owner_only(
        service: Service, tenants: tuple[Tenant, Tenant, Tenant]) -> None:
    a, b, admin = tenants
    assert service.webhooks is not None
    await service.webhooks.stop()  # this test leases and records the deliveries itself
    dying, other_a = await _endpoint(service, a), await _endpoint(service, a)
    theirs, relay_wide = await _endpoint(service, b), await _endpoint(service, admin)
    status, _ = await a.call("POST", "/v1/emails", a.email())
    assert status == 202
    (delivery,) = [d for d in await service.store.lease_deliveries(time.time() + 1, 100, 60)
                   if d.endpoint.id == dying]
    await service.store.record_delivery(delivery, now=time.time(), status=500, error="x",
                                        next_at=None, disable="failing for 5 days")

    async def disabled_events(endpoint_id: str) -> int:
        rows = await service.store.outbox(endpoint_id)
        return sum(1 for r in rows if r["event_id"] > delivery.event_id)

    assert await disabled_events(other_a) == 1
    assert await disabled_events(relay_wide) == 1
    assert await disabled_events(theirs) == 0


async def test_reply_attachments_and_domains_reach_only_the_keys_own(
        service: Service, tenants: tuple[Tenant, Tenant, Tenant]) -> None:
    a, b, admin = tenants
    _, theirs = await b.call("POST", "/v1/emails", b.email())
    for method, path, body in (("POST", f"/v1/emails/{theirs['id']}/reply", {"text": "x"}),
                               ("GET", f"/v1/emails/{theirs['id']}/attachments", None)):
        status, answer = await a.call(method, path, body)
        assert status == 404 and answer["error"]["param"] == "id", (path, answer)
        status, answer = await b.call(method, path, body)
        assert status in (200, 202), (path, answer)
    _, listed = await a.call("GET", "/v1/emails")
    assert listed["data"] == []  # A's reply to B's mail made nothing
    # a reply from another owner's domain is refused like a send
    _, mine = await a.call("POST", "/v1/emails", a.email())
    status, answer = await a.call("POST", f"/v1/emails/{mine['id']}/reply", {
        "text": "x", "from": "app@b.test"})
    assert status == 403, answer
    _, page = await a.call("GET", "/v1/domains")
    assert [d["domain"] for d in page["data"]] == ["a.test"]
    _, page = await admin.call("GET", "/v1/domains")
    assert [d["domain"] for d in page["data"]] == ["a.test", "b.test"]
