"""Reading a request's parts: its JSON body parsed into a pydantic model (a 422 naming the
field at fault) and its query parameters, each a typed value or an error naming it."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import pydantic
from aiohttp import web

from ..addresses import normalize_address
from ..errors import ValidationError
from .errors import ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=pydantic.BaseModel)
_TYPE_TAG = re.compile(r"[\[\]]|^constrained-|^function-")  # union members pydantic names
_MODEL_NAMES = frozenset({"AddressObject", "AttachmentIn", "TagIn", "SendEmail", "str"})
_NATIVE_NAMES = {"from_": "from"}  # a field's Python name → its JSON name, in error params


async def json_body(request: web.Request) -> bytes:
    if request.content_type != "application/json":
        raise ApiError(415, "send the body as JSON (Content-Type: application/json)")
    return await request.read()


def parse(model: type[M], raw: bytes | dict[str, Any], *, prefix: str = "",
          renames: Mapping[str, str] = _NATIVE_NAMES) -> M:
    try:
        if isinstance(raw, bytes):
            return model.model_validate_json(raw)
        return model.model_validate(raw)
    except pydantic.ValidationError as exc:
        found = exc.errors(include_url=False)
        if found[0]["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {found[0]['msg']}") from None
        # of a union's alternatives, the error that went deepest says what is wrong
        best = max(found, key=lambda e: len(_param(e["loc"], "")))
        param = _param(best["loc"], prefix, renames)
        raise ApiError(422, f"{param or 'body'}: {best['msg']}", param=param or None) from None


def _param(loc: tuple[int | str, ...], prefix: str,
           renames: Mapping[str, str] = _NATIVE_NAMES) -> str:
    """pydantic's error location as a field path, e.g. to[0].name or headers.X-Campaign."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.search(part) and part not in _MODEL_NAMES:
            name = renames.get(part, part)
            out += f".{name}" if out else name
    return out


def int_param(raw: str | None, name: str, *, default: int, low: int, high: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, f"{name} must be an integer", param=name) from None
    if not low <= value <= high:
        raise ApiError(422, f"{name} must be between {low} and {high}", param=name)
    return value


def address_param(raw: str | None, name: str) -> str | None:
    if not raw:
        return None
    try:
        return normalize_address(raw.strip(), smtputf8=True, param=name)[0]
    except ValidationError as exc:
        raise ApiError(422, str(exc), param=name) from None
