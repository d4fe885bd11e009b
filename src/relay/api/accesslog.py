"""The HTTP access log: a line per request, after its answer, on the logger `relay.access`
(`[log] access_log = false` leaves it out):

    POST /v1/emails 202 12.4ms key=key_01H... client=127.0.0.1 req=req_5f3a91c2

No query string (a tracking or API client may put secrets there), a token in a signed-link
path cut to its first characters, the API key's id and never its secret.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from ..logs import ACCESS_LOGGER, cut
from .request_ids import REQUEST_ID
from .requests import Handler

log = logging.getLogger(ACCESS_LOGGER)

API_KEY_ID = web.RequestKey("api_key_id", str)  # set by auth.require once a key is known
TOKEN_SHOWN = 8  # characters of a path token kept in the line
PATH_LIMIT = 200


def logged_path(request: web.Request) -> str:
    """The path without its query, a `{token}` segment cut short (the token is the credential
    of a signed link), and long paths cut."""
    path = request.path
    info = request.match_info
    token = info.get("token") if info is not None else None
    if token and len(token) > TOKEN_SHOWN:
        path = path.replace(token, token[:TOKEN_SHOWN] + "...", 1)
    return cut(path, PATH_LIMIT)


def _client(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return request.remote or "-"


def access_fields(request: web.Request, status: int, started: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "method": cut(request.method, 16), "path": logged_path(request), "http_status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        "client": _client(request), "request_id": request.get(REQUEST_ID, "-"),
    }
    key_id = request.get(API_KEY_ID)
    if key_id:
        out["key_id"] = key_id
    return out


def write(request: web.Request, status: int, started: float) -> None:
    f = access_fields(request, status, started)
    key = f" key={f['key_id']}" if "key_id" in f else ""
    log.info("%s %s %d %.1fms%s client=%s req=%s", f["method"], f["path"], status,
             f["duration_ms"], key, f["client"], f["request_id"], extra=f)


def middleware(enabled: bool) -> Any:
    """The middleware; when the access log is off, one that only passes requests on."""

    @web.middleware
    async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not enabled or not log.isEnabledFor(logging.INFO):
            return await handler(request)
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:  # a redirect (a click), or an error raised past us
            status = exc.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            status = 499  # the client went away before its answer (nginx's number)
            raise
        finally:
            write(request, status, started)

    return access
