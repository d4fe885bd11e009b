"""One API key for every dialect: made once, it works with each dialect's own header, and
its scopes and sender domains apply the same way everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from relay import keys
from relay.service import Service

from .conftest import add_signing_domain

# (path, the header its clients send the key in, a request that queues one message)
DIALECTS: list[tuple[str, str, dict[str, Any]]] = [
    ("/v1/emails", "Bearer", {"from": "a@example.com", "to": ["b@example.org"],
                              "subject": "s", "text": "x"}),
    ("/api/v1/emails", "Bearer", {"from_": "a@example.com", "to": ["b@example.org"],
                                  "subject": "s", "text": "x"}),
    ("/api/v1/send", "X-API-Key", {"from": "a@example.com", "to": "b@example.org",
                                   "subject": "s", "text": "x"}),
    ("/v1/send", "Bearer", {"from": "a@example.com", "to": "b@example.org", "subject": "s",
                            "body": "<p>x</p>"}),
    ("/tx/v1/send", "X-Api-Key", {"from": {"email": "a@example.com"}, "subject": "s",
                                  "content": [{"type": "text/plain", "value": "x"}],
                                  "personalizations": [{"to": [{"email": "b@example.org"}]}]}),
]


async def test_one_key_works_in_every_dialect_and_scopes_apply_alike(service: Service) -> None:
    await add_signing_domain(service, "example.com")  # MailerLogic sends from verified ones
    _, sender = await keys.create_key(service.store, name="all", scopes=("emails:send",))
    _, reader = await keys.create_key(service.store, name="ro", scopes=("emails:read",))
    _, limited = await keys.create_key(service.store, name="other", scopes=("emails:send",),
                                       domains=("other.example",))
    assert service.api_bound is not None
    base = "http://{}:{}".format(*service.api_bound)

    async def post(path: str, scheme: str, secret: str, body: dict[str, Any]) -> int:
        header = {"Authorization": f"Bearer {secret}"} if scheme == "Bearer" else \
            {scheme: secret}
        async with aiohttp.ClientSession() as s, s.post(base + path, json=body,
                                                        headers=header) as r:
            await r.read()
            return r.status

    for path, scheme, body in DIALECTS:
        assert await post(path, scheme, sender, body) in (200, 202), path
        assert await post(path, scheme, reader, body) == 403, path  # lacks emails:send
        assert await post(path, scheme, "rk_not_a_key", body) == 401, path
        assert await post(path, scheme, limited, body) == 403, path  # not its domain
    page = await service.store.list_messages(limit=20)
    assert len(page.items) == len(DIALECTS)
