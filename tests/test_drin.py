"""The drin SDK from PyPI, pointed at relay with base_url, works as it does against Drin."""

from __future__ import annotations

import pytest
from drin import (
    DrinAuthenticationError,
    DrinClient,
    DrinConflictError,
    DrinNotFoundError,
    DrinPermissionError,
    DrinValidationError,
)

from relay import keys
from relay.service import Service

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
