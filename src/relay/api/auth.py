"""Who is calling: the API key from `Authorization: Bearer`, `X-Api-Key` or `X-API-Key`
(every dialect's clients send one of them), its scopes and its sender domains."""

from __future__ import annotations

import hashlib
import time

from aiohttp import web

from .. import keys
from ..store import Store
from ..types import ApiKey
from .errors import ApiError


def presented_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("X-Api-Key") or None  # headers are case-insensitive


CACHE_SECONDS = 5.0  # a revoked key stops working within this long
CACHE_SIZE = 1024
_cache: dict[bytes, tuple[ApiKey, float]] = {}


async def require(request: web.Request, store: Store, scope: str) -> ApiKey:
    """The caller's key if it is live and has `scope`; 401 or 403 otherwise."""
    secret = presented_key(request)
    if not secret:
        raise ApiError(401, "an API key is required: Authorization: Bearer <key>",
                       headers={"WWW-Authenticate": 'Bearer realm="relay"'})
    key = await _authenticate(store, secret)
    if key is None:
        raise ApiError(401, "the API key is not valid or was revoked",
                       headers={"WWW-Authenticate": 'Bearer realm="relay"'})
    if scope not in key.scopes:
        raise ApiError(403, f"this API key lacks the {scope} scope")
    return key


async def _authenticate(store: Store, secret: str) -> ApiKey | None:
    """keys.authenticate, remembered a few seconds by the secret's SHA-256 (only good keys:
    a wrong one costs a store lookup every time, as it should)."""
    digest = hashlib.sha256(secret.encode()).digest()
    now = time.monotonic()
    hit = _cache.get(digest)
    if hit is not None and hit[1] > now:
        return hit[0]
    key = await keys.authenticate(store, secret)
    if key is not None:
        if len(_cache) >= CACHE_SIZE:
            _cache.clear()
        _cache[digest] = (key, now + CACHE_SECONDS)
    return key


def forget() -> None:
    """Drop remembered keys (a key was revoked through this process)."""
    _cache.clear()
