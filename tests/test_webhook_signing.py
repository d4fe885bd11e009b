"""Webhook signatures checked by the two strict verifiers from PyPI: the `standardwebhooks`
library and the drin SDK's, including a retry made long after its event."""

from __future__ import annotations

import time

import pytest
from drin.webhooks import DrinWebhookVerificationError, verify_webhook
from standardwebhooks import Webhook, WebhookVerificationError

from relay.feedback import webhooks


def test_both_verifiers_accept_a_delivery_and_a_late_retry_and_refuse_tampering() -> None:
    secret = webhooks.new_secret()
    assert secret.startswith("whsec_")
    created = time.time() - 3 * 3600 + 0.731  # the event; this retry comes 3 h later
    body = webhooks.payload("evt_1", "email.delivered", created,
                            {"messageId": "msg_1", "email": "bob@example.org",
                             "metadata": {"userId": 42}, "tags": []})
    headers = webhooks.signed_headers(secret, "evt_1", created, body, time.time())
    parsed = Webhook(secret).verify(body, headers)
    assert parsed["type"] == "email.delivered" and parsed["data"]["metadata"] == {"userId": 42}
    verified = verify_webhook(body, headers["Drin-Signature"], secret)
    assert verified.timestamp == int(created) and verified.payload["id"] == "evt_1"

    tampered = body.replace(b"bob@", b"eve@")
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(tampered, headers)
    with pytest.raises(DrinWebhookVerificationError):
        verify_webhook(tampered, headers["Drin-Signature"], secret)
    # a retry must be signed anew: the first attempt's headers are too old 3 h later
    stale = webhooks.signed_headers(secret, "evt_1", created, body, created)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, stale)
    with pytest.raises(WebhookVerificationError):
        Webhook(webhooks.new_secret()).verify(body, headers)
