"""Handing a request's Submission to `submit`: its refusals, a store that cannot take mail
(503, retry) and a message no recipient may get, as the API's typed errors."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from ..errors import StoreError, ValidationError
from ..store import NewMessage
from ..submit import Submitter
from ..types import Submission, SubmitResult
from .errors import ApiError

T = TypeVar("T")


def prepare(submitter: Submitter, sub: Submission) -> NewMessage:
    """submit's checks and the built message, its refusals as the API's errors."""
    try:
        return submitter.prepare(sub)
    except ValidationError as exc:
        if exc.smtp.startswith("552"):  # too large: what makes a JSON email large
            raise ApiError(413, f"the built message is too large: {exc}",
                           param="attachments") from None
        if " 5.7.1" in exc.smtp:  # a sender domain this key may not use
            raise ApiError(403, str(exc), param=exc.param) from None
        raise ApiError(422, str(exc), param=exc.param) from None


async def check_broadcast(submitter: Submitter, message: NewMessage) -> None:
    try:
        await submitter.check_broadcast(message)
    except ValidationError as exc:
        raise ApiError(422, str(exc), param=exc.param) from None


def suppressed_error(result: SubmitResult) -> ApiError:
    why = ", ".join(f"{address} ({reason})" for address, reason in result.suppressed)
    return ApiError(409, f"every recipient is on the suppression list: {why}",
                    type="suppressed", param="to")


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


class Expansion:
    """What one request's built messages come to, held to [limits] max_request_expansion:
    {{var}}s and one message per recipient can make a small request build far more than
    it carries. Past the limit, 413 naming `param`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def check(self, param: str) -> None:
        """413 once the limit is spent: nothing more is built."""
        if self.left < 0:
            raise ApiError(413, f"the request's messages come to more than {self.limit} "
                           "octets ([limits] max_request_expansion)", param=param)

    def spend(self, message: NewMessage, param: str) -> None:
        self.left -= message.size or len(message.body)
        self.check(param)
