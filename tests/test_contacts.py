"""Contacts: /v1/contacts, `relay contacts`, and the store's upsert (data merged, null
deletes, subscription kept unless given)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from relay import keys
from relay.service import Service
from relay.store.contacts import ContactChange

from .apiutil import Api
from .conftest import run_relay


@pytest.fixture
async def admin(service: Service) -> str:
    _, secret = await keys.create_key(service.store, name="c", scopes=["contacts:manage"])
    return secret


async def test_upsert_merges_data_and_keeps_the_subscription_unless_given(
        api: Api, admin: str) -> None:
    status, c, _ = await api.call("POST", "/v1/contacts", {
        "email": "Ann@Example.ORG", "data": {"plan": "pro", "age": 40}}, key=admin)
    assert status == 201 and c["email"] == "Ann@example.org"
    assert (c["subscribed"], c["data"]) == (False, {"plan": "pro", "age": 40})  # new: no
    status, again, _ = await api.call("POST", "/v1/contacts", {
        "email": "ann@example.org", "subscribed": True, "data": {"age": None, "city": "Oslo"}},
        key=admin)
    assert status == 200 and again["id"] == c["id"]  # one contact per address, any case
    assert (again["subscribed"], again["data"]) == (True, {"plan": "pro", "city": "Oslo"})
    status, kept, _ = await api.call("POST", "/v1/contacts", {"email": "ann@example.org"},
                                     key=admin)
    assert status == 200 and kept["subscribed"] is True and kept["data"] == again["data"]

    for ident in (c["id"], "Ann@example.org"):
        status, got, _ = await api.call("GET", f"/v1/contacts/{ident}", key=admin)
        assert status == 200 and got["id"] == c["id"]
    await api.call("POST", "/v1/contacts", {"email": "bob@example.org"}, key=admin)
    status, page, _ = await api.call("GET", "/v1/contacts?limit=1", key=admin)
    assert [x["email"] for x in page["data"]] == ["Ann@example.org"]
    assert page["nextCursor"] == "Ann@example.org"
    status, page, _ = await api.call("GET", "/v1/contacts?subscribed=false", key=admin)
    assert [x["email"] for x in page["data"]] == ["bob@example.org"]

    status, _, _ = await api.call("DELETE", f"/v1/contacts/{c['id']}", key=admin)
    assert status == 200
    status, body, _ = await api.call("GET", f"/v1/contacts/{c['id']}", key=admin)
    assert status == 404 and body["error"]["type"] == "not_found"


@pytest.mark.parametrize(("body", "param"), [
    ({"email": "nope"}, "email"),
    ({"email": "a@example.org", "subscribed": "yes"}, "subscribed"),
    ({"email": "a@example.org", "tags": []}, "tags"),
    ({"email": "a@example.org", "data": []}, "data"),
])
async def test_bad_contacts_are_refused_naming_the_field(api: Api, admin: str, body: dict,
                                                         param: str) -> None:
    status, answer, _ = await api.call("POST", "/v1/contacts", body, key=admin)
    assert status == 422 and answer["error"]["param"] == param, answer


async def test_contacts_need_their_scope(api: Api) -> None:
    status, body, _ = await api.call("GET", "/v1/contacts")
    assert status == 403 and "contacts:manage" in body["error"]["message"]


async def test_concurrent_upserts_lose_no_field(service: Service) -> None:
    await asyncio.gather(*(service.store.upsert_contacts(
        [ContactChange(email="c@example.org", data={f"f{i}": i})], time.time())
        for i in range(20)))
    found = await service.store.get_contact("c@example.org")
    assert found is not None and found.data == {f"f{i}": i for i in range(20)}


def test_cli_adds_lists_shows_and_removes(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"[server]\nhostname = 'relay.test'\ndata_dir = '{tmp_path / 'data'}'\n")

    def relay(*args: str, code: int = 0) -> str:
        result = run_relay("--config", str(path), "contacts", *args)
        assert result.returncode == code, result.stderr
        return result.stdout + result.stderr

    made = json.loads(relay("add", "ann@example.org", "--subscribed", "--data", "plan=pro",
                            "--data", "seats=3", "--json"))
    assert made["subscribed"] is True and made["data"] == {"plan": "pro", "seats": 3}
    assert "updated" in relay("add", "ann@example.org", "--data", "seats=")
    listed = json.loads(relay("list", "--json"))
    assert [(c["email"], c["subscribed"], c["data"]) for c in listed] == [
        ("ann@example.org", True, {"plan": "pro"})]
    assert json.loads(relay("show", made["id"], "--json"))["email"] == "ann@example.org"
    assert "KEY=VALUE" in relay("add", "ann@example.org", "--data", "oops", code=2)
    assert "removed" in relay("remove", "ann@example.org")
    assert "no contact" in relay("show", "ann@example.org", code=1)


async def test_a_contacts_data_is_held_to_the_metadata_limit_once_merged(
        api: Api, admin: str, service: Service) -> None:
    """Each request may be small, yet field after field would grow what fills every later
    send: the merged data is what is held to [limits] max_metadata_size (16 KiB)."""
    chunk = "x" * 6000
    for name in ("a", "b"):
        status, _, _ = await api.call("POST", "/v1/contacts", {
            "email": "big@example.org", "data": {name: chunk}}, key=admin)
        assert status in (200, 201)
    status, body, _ = await api.call("POST", "/v1/contacts", {
        "email": "big@example.org", "data": {"c": chunk}}, key=admin)
    assert status == 422 and body["error"]["param"] == "data", body
    found = await service.store.get_contact("big@example.org")
    assert found is not None and set(found.data) == {"a", "b"}  # the refused change left none
    _, plunk = await keys.create_key(service.store, name="p", scopes=["contacts:manage"])
    status, body, _ = await api.call("POST", "/v1/track", {
        "email": "big@example.org", "event": "e", "data": {"c": chunk}}, key=plunk)
    assert status == 422, body
