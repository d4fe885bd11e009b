"""The MailChannels suppression list and webhook batches, driven by the `mailchannels` SDK
(its strict response models check the shapes) against relay's /tx/v1: each key sees and
changes only what its owner owns, and bad input is a 400 naming the field."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import mailchannels
import pytest
from mailchannels.exceptions import (
    AuthenticationError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
)
from mailchannels.webhooks.webhooks import verify_webhook_signature

from relay import keys
from relay.feedback import webhooks_mailchannels
from relay.service import Service

from .conftest import free_port
from .dnsserver import DNSServer
from .sink import Sink
from .test_delivery import wait_final
from .test_mailchannels_send import client, start
from .test_webhooks import Receiver, until

MAIL: dict[str, Any] = {
    "from": {"email": "alice@example.com"}, "subject": "s",
    "content": [{"type": "text/plain", "value": "x"}],
    "personalizations": [{"to": [{"email": "bob@example.org"}]}]}
SCOPES = ("emails:send", "emails:read", "webhooks:manage", "suppressions:manage")


async def keyed(svc: Service, *domains: str, scopes: tuple[str, ...] = SCOPES) -> Any:
    _, secret = await keys.create_key(svc.store, name="k", scopes=scopes, domains=domains)
    assert svc.api_bound is not None
    return mailchannels.Client(api_key=secret, strict_responses=True,
                               base_url="http://{}:{}/tx/v1".format(*svc.api_bound))


async def test_suppression_list_through_the_sdk_is_the_owners_own(
        tmp_path: Path, dns: DNSServer) -> None:
    async with Sink() as sink:
        svc, _ = await start(tmp_path, dns, sink)
        mine, theirs = await keyed(svc, "example.com"), await keyed(svc, "other.example")
        try:
            await asyncio.to_thread(mine.suppressions.create, [
                {"recipient": "gone@Example.ORG", "notes": "asked by phone"},
                {"recipient": "news@example.org", "suppression_types": ["non-transactional"]}])
            listed = await asyncio.to_thread(mine.suppressions.list)
            got = {e.recipient: e for e in listed.suppression_list}
            assert set(got) == {"gone@example.org", "news@example.org"}
            assert got["gone@example.org"].suppression_types == ["transactional",
                                                                 "non-transactional"]
            assert got["gone@example.org"].notes == "asked by phone"
            assert got["gone@example.org"].source == "api"
            assert got["news@example.org"].suppression_types == ["non-transactional"]
            assert got["news@example.org"].sender == "example.com"
            assert got["gone@example.org"].created_at.endswith("Z")
            one = await asyncio.to_thread(mine.suppressions.list, recipient="news@example.org",
                                          limit=5, offset=0)
            assert [e.recipient for e in one.suppression_list] == ["news@example.org"]
            assert (await asyncio.to_thread(mine.suppressions.list, source="hard_bounce")
                    ).suppression_list == []
            page = await asyncio.to_thread(mine.suppressions.list, limit=1, offset=1)
            assert [e.recipient for e in page.suppression_list] == ["news@example.org"]

            # the entry stops the owner's mail: the send is failed, its recipient dropped
            sent = await asyncio.to_thread(mine.emails.send, {**MAIL, "personalizations": [
                {"to": [{"email": "gone@example.org"}]}]})
            assert sent.results[0].status == "failed"

            # another owner sees none of it and removes none of it
            assert (await asyncio.to_thread(theirs.suppressions.list)).suppression_list == []
            with pytest.raises(NotFoundError):
                await asyncio.to_thread(theirs.suppressions.delete, "gone@example.org")
            # a delete without source removes the api entries, as MailChannels' does
            await asyncio.to_thread(mine.suppressions.delete, "gone@example.org")
            with pytest.raises(NotFoundError):
                await asyncio.to_thread(mine.suppressions.delete, "gone@example.org",
                                        source="all")
            await asyncio.to_thread(mine.suppressions.delete, "news@example.org", source="all")
            assert (await asyncio.to_thread(mine.suppressions.list)).suppression_list == []
        finally:
            await svc.stop()


async def test_suppression_list_refusals_name_the_field(tmp_path: Path,
                                                        dns: DNSServer) -> None:
    async with Sink() as sink:
        svc, sender_only = await start(tmp_path, dns, sink)  # no suppressions:manage
        mine = await keyed(svc, "example.com")
        admin = await keyed(svc)
        try:
            cases: list[tuple[Any, dict[str, Any], str]] = [
                (mine, {"suppression_entries": [{"recipient": "x@example.org",
                                                 "suppression_types": ["transactional"]}]},
                 "suppression_entries[0].suppression_types"),
                (admin, {"suppression_entries": [{"recipient": "x@example.org",
                                                  "suppression_types": ["non-transactional"]}]},
                 "suppression_entries[0].suppression_types"),
                (mine, {"suppression_entries": [{"recipient": "ok@example.org"},
                                                {"recipient": "not an address"}]},
                 "suppression_entries[1].recipient"),
                (mine, {"suppression_entries": [{"recipient": "x@example.org",
                                                 "suppression_types": ["sometimes"]}]},
                 "suppression_entries[0].suppression_types"),
                (mine, {"suppression_entries": []}, "suppression_entries"),
                (mine, {"suppression_entries": [{"recipient": "x@example.org"}],
                        "add_to_sub_accounts": True}, "add_to_sub_accounts"),
            ]
            for mc, body, param in cases:
                with pytest.raises(InvalidRequestError) as refused:
                    await asyncio.to_thread(mc.request, "POST", "/suppression-list",
                                            json=body)
                assert refused.value.status_code == 400
                assert param in refused.value.response["param"], (body, refused.value.response)
            # nothing of a refused request was added, the good entry before the bad included
            assert (await asyncio.to_thread(mine.suppressions.list)).suppression_list == []
            for params, param in (({"source": "mystery"}, "source"),
                                  ({"created_after": "yesterday"}, "created_after"),
                                  ({"limit": "0"}, "limit")):
                with pytest.raises(InvalidRequestError) as refused:
                    await asyncio.to_thread(mine.request, "GET", "/suppression-list",
                                            params=params)
                assert refused.value.response["param"] == param
            with pytest.raises(InvalidRequestError):
                await asyncio.to_thread(mine.suppressions.delete, "x@example.org",
                                        source="mystery")
            mc = client(svc, sender_only)
            with pytest.raises(ForbiddenError, match="suppressions:manage"):
                await asyncio.to_thread(mc.suppressions.list)
            mc.api_key = "rk_not_a_key"
            with pytest.raises(AuthenticationError, match="X-Api-Key"):
                await asyncio.to_thread(mc.suppressions.list)
        finally:
            await svc.stop()


async def test_webhook_batches_list_and_resend_through_the_sdk(tmp_path: Path,
                                                               dns: DNSServer) -> None:
    rx = Receiver()
    await rx.start()
    async with Sink() as sink:
        svc, _ = await start(tmp_path, dns, sink)
        mine, theirs = await keyed(svc, "example.com"), await keyed(svc, "other.example")
        try:
            rx.answers = [500]  # the first post fails, and is retried
            await asyncio.to_thread(mine.webhooks.create, rx.url)
            sent = await asyncio.to_thread(mine.emails.send, MAIL)
            await wait_final(svc, sent.results[0].message_id)

            def delivered() -> list[dict[str, Any]]:
                return [e for _, body in rx.got for e in json.loads(body)
                        if e["event"] == "delivered"]

            await until(lambda: len(delivered()) == 1)
            await until(lambda: len(rx.got) >= 3)  # processed (failed, then again), delivered

            async def batches(mc: Any, **query: Any) -> list[Any]:
                found = await asyncio.to_thread(mc.webhooks.batches, **query)
                return list(found.webhook_batches)

            await until_async(lambda: batches(mine), lambda b: len(b) == 2)
            listed = await batches(mine)
            assert {b.status for b in listed} == {"2xx"}
            assert all(b.webhook == rx.url and b.event_count == 1 for b in listed)
            assert {b.status_code for b in listed} == {200}
            assert await batches(mine, statuses=["4xx", "5xx"]) == []
            assert len(await batches(mine, statuses=["2xx"], webhook=rx.url, limit=1)) == 1
            assert await batches(mine, webhook="http://elsewhere.example/hook") == []
            assert await batches(theirs) == []

            newest = listed[0]
            with pytest.raises(NotFoundError):
                await asyncio.to_thread(theirs.webhooks.resend_batch, newest.batch_id)
            with pytest.raises(NotFoundError):
                await asyncio.to_thread(mine.webhooks.resend_batch, 10**12)
            before = len(rx.got)
            again = await asyncio.to_thread(mine.webhooks.resend_batch, newest.batch_id)
            assert again.batch_id == newest.batch_id and again.webhook == rx.url
            await until(lambda: len(rx.got) == before + 1)
            (resent,) = json.loads(rx.got[-1][1])
            assert resent["message_id"] == sent.results[0].message_id
            assert resent["event"] in {"processed", "delivered"}
            with pytest.raises(InvalidRequestError) as refused:
                await asyncio.to_thread(mine.request, "GET", "/webhook-batch",
                                        params={"statuses": "2xx,6xx"})
            assert refused.value.response["param"] == "statuses"
            with pytest.raises(InvalidRequestError) as refused:
                await asyncio.to_thread(mine.request, "POST", "/webhook-batch/abc/resend")
            assert refused.value.response["param"] == "batch_id"
        finally:
            await svc.stop()
            await rx.stop()


async def test_webhook_validate_posts_a_signed_test_event_to_each_endpoint(
        tmp_path: Path, dns: DNSServer) -> None:
    good, bad = Receiver(), Receiver()
    await good.start()
    await bad.start()
    bad.answers = [503]
    async with Sink() as sink:
        svc, _ = await start(tmp_path, dns, sink)
        mine, theirs = await keyed(svc, "example.com"), await keyed(svc, "other.example")
        try:
            assert (await asyncio.to_thread(mine.webhooks.validate)).results == []
            await asyncio.to_thread(mine.webhooks.create, good.url)
            checked = await asyncio.to_thread(mine.webhooks.validate, request_id="r-1")
            assert checked.all_passed
            (result,) = checked.results
            assert (result.webhook, result.result) == (good.url, "passed")
            assert result.response is not None and result.response.status == 200
            assert result.response.body == "ok"
            headers, body = good.got[-1]
            signer = webhooks_mailchannels.Signer.load(svc.config.server.data_dir)
            assert verify_webhook_signature(headers, body, signer.public_key_json())
            (event,) = json.loads(body)
            assert event["event"] == "test" and event["request_id"] == "r-1"

            gone = good.url.replace(str(good.port), str(free_port()))
            await asyncio.to_thread(theirs.webhooks.create, bad.url)
            await asyncio.to_thread(theirs.webhooks.create, gone)
            checked = await asyncio.to_thread(theirs.webhooks.validate)
            assert not checked.all_passed
            by_url = {r.webhook: r for r in checked.results}
            assert set(by_url) == {bad.url, gone}  # the other owner's endpoint is not tried
            assert by_url[bad.url].result == "failed"
            assert by_url[bad.url].response is not None
            assert by_url[bad.url].response.status == 503
            assert by_url[gone].result == "failed" and by_url[gone].response is None
            assert len(good.got) == 1
            with pytest.raises(InvalidRequestError) as refused:
                await asyncio.to_thread(mine.request, "POST", "/webhook/validate",
                                        json={"request_id": 7})
            assert refused.value.response["param"] == "request_id"
        finally:
            await svc.stop()
            await good.stop()
            await bad.stop()


async def until_async(get: Any, ok: Any, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not ok(await get()):
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_routes_need_their_scopes(tmp_path: Path, dns: DNSServer) -> None:
    async with Sink() as sink:
        svc, _ = await start(tmp_path, dns, sink)
        reader = await keyed(svc, scopes=("emails:read",))
        assert svc.api_bound is not None
        root = "http://{}:{}/tx/v1".format(*svc.api_bound)
        try:
            async with aiohttp.ClientSession() as s:
                for method, path in (("GET", "/webhook-batch"), ("POST", "/webhook/validate"),
                                     ("POST", "/webhook-batch/1/resend"),
                                     ("GET", "/suppression-list"),
                                     ("DELETE", "/suppression-list/recipients/a@example.org")):
                    async with s.request(method, root + path,
                                         headers={"X-Api-Key": reader.api_key}) as r:
                        assert r.status == 403, path
                        assert (await r.json())["errors"]
        finally:
            await svc.stop()
