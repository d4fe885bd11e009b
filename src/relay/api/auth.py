"""Who is calling: the API key from `Authorization: Bearer`, `X-Api-Key` or `X-API-Key`
(every dialect's clients send one of them), its scopes and its sender domains; and the one
table of the scope each route needs (`ROUTE_SCOPES`), which `require` reads and `check_routes`
holds every route of the application to, so a route without an entry cannot be served."""

from __future__ import annotations

import hashlib
import time

from aiohttp import web

from .. import keys, owners
from ..store import Store
from ..types import ApiKey
from .accesslog import API_KEY_ID
from .errors import ApiError

PUBLIC = None  # a route anyone may call: signed links, the webhook key, the OpenAPI document

# (method, path) -> the scope a key needs for it, or PUBLIC. Every route is listed here.
ROUTE_SCOPES: dict[tuple[str, str], str | None] = {
    # native (/v1, Drin's shape)
    ("POST", "/v1/emails"): "emails:send",
    ("POST", "/v1/emails/batch"): "emails:send",
    ("GET", "/v1/emails"): "emails:read",
    ("GET", "/v1/emails/{id}"): "emails:read",
    ("GET", "/v1/emails/{id}/body"): "emails:read",
    ("POST", "/v1/emails/{id}/cancel"): "emails:send",
    ("POST", "/v1/emails/{id}/reply"): "emails:send",
    ("GET", "/v1/emails/{id}/attachments"): "emails:read",
    ("GET", "/v1/domains"): "domains:manage",
    ("POST", "/v1/api-keys"): "keys:manage",
    ("GET", "/v1/api-keys"): "keys:manage",
    ("DELETE", "/v1/api-keys/{id}"): "keys:manage",
    ("GET", "/v1/suppressions"): "suppressions:manage",
    ("POST", "/v1/suppressions"): "suppressions:manage",
    ("DELETE", "/v1/suppressions/{email}"): "suppressions:manage",
    ("POST", "/v1/webhooks"): "webhooks:manage",
    ("GET", "/v1/webhooks"): "webhooks:manage",
    ("GET", "/v1/webhooks/{id}"): "webhooks:manage",
    ("PATCH", "/v1/webhooks/{id}"): "webhooks:manage",
    ("DELETE", "/v1/webhooks/{id}"): "webhooks:manage",
    ("POST", "/v1/webhooks/{id}/rotate-secret"): "webhooks:manage",
    ("POST", "/v1/webhooks/{id}/redeliver"): "webhooks:manage",
    ("POST", "/v1/templates"): "templates:manage",
    ("GET", "/v1/templates"): "templates:manage",
    ("GET", "/v1/templates/{id}"): "templates:manage",
    ("PATCH", "/v1/templates/{id}"): "templates:manage",
    ("DELETE", "/v1/templates/{id}"): "templates:manage",
    ("POST", "/v1/contacts"): "contacts:manage",
    ("GET", "/v1/contacts"): "contacts:manage",
    ("GET", "/v1/contacts/{id}"): "contacts:manage",
    ("DELETE", "/v1/contacts/{id}"): "contacts:manage",
    ("GET", "/v1/openapi.json"): PUBLIC,
    # the dashboard: static files anyone may fetch (they hold no data) and the admin's numbers
    ("GET", "/v1/stats"): "admin",
    ("GET", "/dashboard"): PUBLIC,
    ("GET", "/dashboard/"): PUBLIC,
    ("GET", "/dashboard/{name}"): PUBLIC,
    # PiiSend
    ("POST", "/api/v1/emails"): "emails:send",
    ("GET", "/api/v1/emails"): "emails:read",
    ("GET", "/api/v1/emails/{id}"): "emails:read",
    ("POST", "/api/v1/emails/{id}/cancel"): "emails:send",
    ("POST", "/api/v1/emails/{id}/resend"): "emails:send",
    # MailerLogic
    ("POST", "/api/v1/send"): "emails:send",
    # Plunk: /v1/track changes contacts (and their subscription), so it needs that scope
    ("POST", "/v1/send"): "emails:send",
    ("POST", "/v1/track"): "contacts:manage",
    # MailChannels
    ("POST", "/tx/v1/send"): "emails:send",
    ("POST", "/tx/v1/send-async"): "emails:send",
    ("POST", "/tx/v1/webhook"): "webhooks:manage",
    ("GET", "/tx/v1/webhook"): "webhooks:manage",
    ("DELETE", "/tx/v1/webhook"): "webhooks:manage",
    ("GET", "/tx/v1/webhook/public-key"): PUBLIC,
    ("POST", "/tx/v1/webhook/validate"): "webhooks:manage",
    ("GET", "/tx/v1/webhook-batch"): "webhooks:manage",
    ("POST", "/tx/v1/webhook-batch/{id}/resend"): "webhooks:manage",
    ("GET", "/tx/v1/suppression-list"): "suppressions:manage",
    ("POST", "/tx/v1/suppression-list"): "suppressions:manage",
    ("DELETE", "/tx/v1/suppression-list/recipients/{email}"): "suppressions:manage",
    ("GET", "/tx/v1/metrics/volume"): "emails:read",
    ("GET", "/tx/v1/metrics/performance"): "emails:read",
    ("GET", "/tx/v1/metrics/engagement"): "emails:read",
    ("GET", "/tx/v1/metrics/recipient-behaviour"): "emails:read",
    ("GET", "/tx/v1/metrics/senders/campaigns"): "emails:read",
    ("GET", "/tx/v1/metrics/senders/sub-accounts"): "emails:read",
    ("GET", "/tx/v1/usage"): "emails:read",
    # signed links in the mail itself (tracking.py): the token is the credential
    ("GET", "/u/{token}"): PUBLIC,
    ("POST", "/u/{token}"): PUBLIC,
    ("GET", "/o/{token}"): PUBLIC,
    ("GET", "/c/{token}"): PUBLIC,
    # Prometheus (api/metrics.py asks for the key only where [metrics] require_key says)
    ("GET", "/metrics"): "metrics:read",
    # liveness and readiness (api/health.py): they say only whether each part works
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
}


def check_routes(app: web.Application) -> None:
    """Refuse to build an application with a route the table does not name (fail closed)."""
    for route in app.router.routes():
        method = "GET" if route.method == "HEAD" else route.method
        if (method, route.resource.canonical) not in ROUTE_SCOPES:  # type: ignore[union-attr]
            raise RuntimeError(f"{route.method} {route.resource.canonical} has no entry in "  # type: ignore[union-attr]
                               "api.auth.ROUTE_SCOPES")


def route_scope(request: web.Request) -> str | None:
    route = request.match_info.route
    method = "GET" if route.method == "HEAD" else route.method
    return ROUTE_SCOPES[(method, route.resource.canonical)]  # type: ignore[union-attr]


def presented_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("X-Api-Key") or None  # headers are case-insensitive


CACHE_SECONDS = 5.0  # a revoked key stops working within this long
CACHE_SIZE = 1024
_cache: dict[bytes, tuple[ApiKey, float]] = {}


async def require(request: web.Request, store: Store, *,
                  header: str = "Authorization") -> ApiKey:
    """The caller's key if it is live and has the scope ROUTE_SCOPES names for this route;
    401 or 403 otherwise. `header`: where the route's dialect takes the key, as its 401
    says (either is read: `presented_key`)."""
    scope = route_scope(request)
    if scope is PUBLIC:
        raise RuntimeError(f"{request.method} {request.path} is public; it takes no key")
    secret = presented_key(request)
    if not secret:
        wanted = "Authorization: Bearer <key>" if header == "Authorization" else header
        raise ApiError(401, f"an API key is required: {wanted}", param=header,
                       headers={"WWW-Authenticate": 'Bearer realm="relay"'})
    key = await _authenticate(store, secret)
    if key is None:
        raise ApiError(401, f"the API key in {header} is not valid or was revoked",
                       param=header, headers={"WWW-Authenticate": 'Bearer realm="relay"'})
    request[API_KEY_ID] = key.id  # for the access log: the key's id, never its secret
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


def reach(key: ApiKey) -> owners.Within:
    """What a key may see and change: its domains, or the whole relay (owners.py)."""
    return owners.within(key.domains)
