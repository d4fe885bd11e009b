"""Who is calling: the API key from `Authorization: Bearer`, `X-Api-Key` or `X-API-Key`
(every dialect's clients send one of them), its scopes and its sender domains."""

from __future__ import annotations

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


async def require(request: web.Request, store: Store, scope: str) -> ApiKey:
    """The caller's key if it is live and has `scope`; 401 or 403 otherwise."""
    secret = presented_key(request)
    if not secret:
        raise ApiError(401, "an API key is required: Authorization: Bearer <key>",
                       headers={"WWW-Authenticate": 'Bearer realm="relay"'})
    key = await keys.authenticate(store, secret)
    if key is None:
        raise ApiError(401, "the API key is not valid or was revoked",
                       headers={"WWW-Authenticate": 'Bearer realm="relay"'})
    if scope not in key.scopes:
        raise ApiError(403, f"this API key lacks the {scope} scope")
    return key
