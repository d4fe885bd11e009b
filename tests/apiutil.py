"""An HTTP client for relay's API in tests: real aiohttp over loopback."""

from __future__ import annotations

import io
import json
from typing import Any

import aiohttp

from relay import keys
from relay.service import Service


class Api:
    """An aiohttp client bound to the service's API with a key."""

    def __init__(self, session: aiohttp.ClientSession, base: str, key: str) -> None:
        self.session, self.base, self.key = session, base, key

    async def close(self) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, body: Any = None, *, key: str | None = "",
                   headers: dict[str, str] | None = None, raw: bytes | None = None
                   ) -> tuple[int, Any, aiohttp.ClientResponse]:
        hdrs = dict(headers or {})
        use = self.key if key == "" else key
        if use is not None:
            hdrs.setdefault("Authorization", f"Bearer {use}")
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        payload = io.BytesIO(data) if data is not None else None
        async with self.session.request(method, self.base + path, data=payload,
                                        headers=hdrs) as resp:
            text = await resp.text()
            try:
                parsed = json.loads(text) if text else None
            except ValueError:
                parsed = text
            return resp.status, parsed, resp


async def open_api(svc: Service, scopes: tuple[str, ...] = ("emails:send", "emails:read"),
                   domains: tuple[str, ...] = ()) -> tuple[aiohttp.ClientSession, str]:
    _, secret = await keys.create_key(svc.store, name="api", scopes=scopes, domains=domains)
    return aiohttp.ClientSession(), secret


SIMPLE = {"from": "Alice <alice@example.com>", "to": ["bob@example.org"], "subject": "Hi",
          "text": "Hello Bob.", "html": "<p>Hello Bob.</p>"}


async def api_client(svc: Service, scopes: tuple[str, ...] = ("emails:send", "emails:read")
                     ) -> Api:
    """A client of the service's API with a new key; close it with `await api.close()`."""
    session, secret = await open_api(svc, scopes)
    assert svc.api_bound is not None
    return Api(session, "http://{}:{}".format(*svc.api_bound), secret)
