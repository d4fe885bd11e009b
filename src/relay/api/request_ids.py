"""Request ids: the key a request's id is kept under, and the id itself (the client's when it
sent a sane one, else this process's random prefix and a counter)."""

from __future__ import annotations

import itertools
import re
import secrets

from aiohttp import web

REQUEST_ID = web.RequestKey("request_id", str)
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_BOOT = secrets.token_hex(4)
_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"req_{_BOOT}{next(_COUNTER):x}"


def request_id(given: str) -> str:
    """The client's X-Request-Id if it is sane, else a new one."""
    return given if _CLIENT_ID.match(given) else new_request_id()
