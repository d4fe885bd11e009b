"""The MailChannels dialect's webhooks: one event reaches a native endpoint and a
format = "mailchannels" endpoint, each in its own shape; the MailChannels one passes the
mailchannels SDK's own RFC 9421 verifier with the public key relay serves."""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from pathlib import Path

from mailchannels.webhooks.webhooks import signature_key_id, verify_webhook_signature

from relay.feedback import webhooks, webhooks_mailchannels
from relay.service import Service
from relay.types import WebhookEndpoint

from .test_webhooks import Receiver, endpoint, hook_config, send_one, until, verified


async def test_one_event_reaches_both_formats_each_in_its_shape(tmp_path: Path) -> None:
    native_rx, mc_rx = Receiver(), Receiver()
    await native_rx.start()
    await mc_rx.start()
    svc = Service(hook_config(tmp_path))
    await svc.start()
    try:
        native = await endpoint(svc, native_rx.url, ("email.queued",))
        mc = WebhookEndpoint(id="wh_" + secrets.token_hex(8), url=mc_rx.url,
                             secret=webhooks.new_secret(), events=webhooks_mailchannels.EVENTS,
                             created_at=time.time(), format="mailchannels")
        await svc.store.add_endpoint(mc)
        (listed,) = [e for e in await svc.store.list_endpoints() if e.id == mc.id]
        assert listed.format == "mailchannels"
        message_id = await send_one(svc)
        await until(lambda: native_rx.got and mc_rx.got)

        event = verified(native, *native_rx.got[0])
        assert event["type"] == "email.queued" and event["data"]["messageId"] == message_id

        headers, body = mc_rx.got[0]
        signer = webhooks_mailchannels.Signer.load(svc.config.server.data_dir)
        assert signature_key_id(headers) == signer.key_id
        assert verify_webhook_signature(headers, body, signer.public_key_json())
        tampered = body.replace(b"processed", b"delivered")
        assert not verify_webhook_signature(headers, tampered, signer.public_key_json())
        (item,) = json.loads(body)
        assert item["event"] == "processed" and item["email"] == "alice@example.com"
        assert item["recipients"] == ["bob@example.org"] and item["message_id"] == message_id
        assert isinstance(item["timestamp"], int)
    finally:
        await svc.stop()
        await native_rx.stop()
        await mc_rx.stop()


def test_bounce_classes_and_unnamed_events() -> None:
    name = webhooks_mailchannels.event_name
    assert name("email.bounced", {"class": "hard"}) == "hard-bounced"
    assert name("email.bounced", {"class": "soft"}) == "soft-bounced"
    assert name("email.dropped", {}) == "dropped"
    assert name("email.opened", {}) == "open" and name("email.clicked", {}) == "click"
    assert name("email.deferred", {}) is None


def test_the_signing_key_is_made_once_and_0600(tmp_path: Path) -> None:
    a = webhooks_mailchannels.Signer.load(tmp_path)
    b = webhooks_mailchannels.Signer.load(tmp_path)
    assert a.key_id == b.key_id
    path = tmp_path / webhooks_mailchannels.KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert dataclasses.is_dataclass(WebhookEndpoint)


async def test_native_webhooks_api_takes_a_format(tmp_path: Path) -> None:
    from .apiutil import api_client
    svc = Service(hook_config(tmp_path))
    await svc.start()
    api = await api_client(svc, ("webhooks:manage",))
    try:
        status, body, _ = await api.call("POST", "/v1/webhooks", {
            "url": "http://127.0.0.1:9/hook", "format": "mailchannels"})
        assert status == 201 and body["format"] == "mailchannels"
        status, body, _ = await api.call("POST", "/v1/webhooks", {
            "url": "http://127.0.0.1:9/hook", "format": "sendgrid"})
        assert status == 422 and body["error"]["param"] == "format"
    finally:
        await api.close()
        await svc.stop()


async def test_the_sdk_fetches_the_public_key_relay_signs_with(tmp_path: Path) -> None:
    import asyncio

    import mailchannels
    svc = Service(hook_config(tmp_path))
    await svc.start()
    try:
        assert svc.api_bound is not None
        client = mailchannels.Client(base_url="http://{}:{}/tx/v1".format(*svc.api_bound))
        signer = webhooks_mailchannels.Signer.load(svc.config.server.data_dir)
        got = await asyncio.to_thread(client.webhooks.public_key, signer.key_id)
        assert got["id"] == signer.key_id and got["key"] == signer.public_key_json()["key"]
        body = b'[{"event": "delivered"}]'
        headers = signer.headers(body, time.time())
        assert verify_webhook_signature(headers, body, got)
        with __import__("pytest").raises(mailchannels.NotFoundError):
            await asyncio.to_thread(client.webhooks.public_key, "nope")
        client.close()
    finally:
        await svc.stop()
