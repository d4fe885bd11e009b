"""What the dialect adapters share: answering errors in a dialect's own shape, and strict
base64 (line breaks allowed) for the contents a request carries."""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from ...errors import ValidationError
from ..errors import ApiError
from ..requests import Handler

Shape = Callable[[ApiError], dict[str, Any]]


class DialectError(ApiError):
    """An ApiError answered (and remembered under an Idempotency-Key) in a dialect's shape."""

    def __init__(self, error: ApiError, shape: Shape,
                 statuses: Mapping[int, int] | None = None) -> None:
        super().__init__((statuses or {}).get(error.status, error.status), error.message,
                         type=error.type, param=error.param, headers=error.headers)
        self._shape = shape

    def body(self) -> dict[str, Any]:
        return self._shape(self)


def named(exc: ApiError) -> str:
    """The message, naming the field when it does not already (shapes without a `param`)."""
    if exc.param and exc.param not in exc.message:
        return f"{exc.param}: {exc.message}"
    return exc.message


def reshaped(exc: ApiError | ValidationError, shape: Shape,
             statuses: Mapping[int, int] | None = None) -> DialectError:
    if isinstance(exc, DialectError):
        return exc
    if isinstance(exc, ValidationError):  # bad input found below the adapter
        exc = ApiError(422, str(exc), param=exc.param)
    return DialectError(exc, shape, statuses)


def in_shape(shape: Shape, statuses: Mapping[int, int] | None = None
             ) -> Callable[[Handler], Handler]:
    """Every error a handler raises, the app's own included (a body over the size limit),
    answered in `shape`; the app's middleware still adds the request id."""
    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(request: web.Request) -> web.StreamResponse:
            try:
                return await handler(request)
            except (ApiError, ValidationError) as exc:
                raise reshaped(exc, shape, statuses) from None
            except web.HTTPRequestEntityTooLarge:
                raise DialectError(ApiError(413, "the request body is larger than this "
                                            "server takes"), shape, statuses) from None
        return run
    return wrap


def decode_base64(content: str, param: str) -> bytes:
    """Strict base64, though line breaks (as MIME writes it) are allowed."""
    try:
        return base64.b64decode("".join(content.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{param}: not valid base64", param=param) from None
