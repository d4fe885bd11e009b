"""What the dialect adapters share: answering errors in a dialect's own shape, and the
checks of custom headers and base64 that every JSON shape needs."""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from aiohttp import web

from ...errors import StoreError, ValidationError
from ...store import NewMessage
from ...submit import Submitter
from ...types import Submission, SubmitResult
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


T = TypeVar("T")


def prepare(submitter: Submitter, sub: Submission) -> NewMessage:
    """`submit`'s checks, its refusals as the API's typed errors."""
    try:
        return submitter.prepare(sub)
    except ValidationError as exc:
        if exc.smtp.startswith("552"):  # too large: what makes a JSON email large
            raise ApiError(413, f"the built message is too large: {exc}",
                           param="attachments") from None
        if " 5.7.1" in exc.smtp:  # a sender domain this key may not use
            raise ApiError(403, str(exc), param=exc.param) from None
        raise ApiError(422, str(exc), param=exc.param) from None


async def commit(submitter: Submitter, message: NewMessage) -> SubmitResult:
    """Queued and on disk when this returns; a broadcast refusal is a 422, a store failure
    a 503 the client may retry."""
    try:
        await submitter.check_broadcast(message)
    except ValidationError as exc:
        raise ApiError(422, str(exc), param=exc.param) from None
    return await store_call(submitter.commit(message))


async def store_call(call: Awaitable[T]) -> T:
    try:
        return await call
    except StoreError as exc:
        raise ApiError(503, f"the queue cannot take mail now: {exc}", type="internal_error",
                       headers={"Retry-After": "5"}) from None
