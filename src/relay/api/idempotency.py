"""Idempotency-Key (at most 255 characters), kept 24 h per API key. The same key with the
same request (method, path and canonical JSON body) gets the first answer again, status and
body; with a different request, 409. Concurrent duplicates wait for the first. 5xx and 429
answers are not kept, so that a client may retry them with the same key."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from ..store import Remembered, SQLiteStore
from .errors import ApiError

MAX_KEY = 255
HEADER = "Idempotency-Key"


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes  # JSON

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, content_type="application/json")

    @staticmethod
    def of(status: int, value: object) -> Answer:
        return Answer(status, orjson.dumps(value))


@dataclass(frozen=True)
class Claim:
    """What a handler needs to store its answer with the mail it queues."""

    scope: str
    key: str
    fingerprint: str

    def record(self, answer: Answer, message_id: str = "") -> Remembered:
        return Remembered(scope=self.scope, key=self.key, fingerprint=self.fingerprint,
                          status=answer.status, response=answer.body, message_id=message_id,
                          created_at=time.time())


Produce = Callable[[Claim | None], Awaitable[Answer]]


class Idempotency:
    def __init__(self, store: SQLiteStore) -> None:
        self._store = store
        self._inflight: dict[tuple[str, str], asyncio.Future[None]] = {}

    async def answer(self, request: web.Request, scope: str, raw: bytes,
                     produce: Produce) -> web.Response:
        key = request.headers.get(HEADER)
        if key is None:
            return (await produce(None)).response()
        if not key or len(key) > MAX_KEY or not key.isprintable():
            raise ApiError(422, f"{HEADER} must be 1 to {MAX_KEY} printable characters",
                           param=HEADER)
        claim = Claim(scope, key, fingerprint(request, raw))
        slot = (scope, key)
        while (pending := self._inflight.get(slot)) is not None:
            await asyncio.shield(pending)  # a concurrent duplicate: wait for the first
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[slot] = done  # taken with no await since the check above
        try:
            found = await self._store.recall(scope, key, time.time())
            if found is not None:
                return replay(found, claim).response()
            try:
                answer = await produce(claim)
            except ApiError as exc:
                if exc.status >= 500 or exc.status == 429:
                    raise
                answer = Answer(exc.status, json.dumps(exc.body()).encode())
                if (existing := await self._store.remember(claim.record(answer))) is not None:
                    return replay(existing, claim).response()
                return exc.response()
            return answer.response()
        finally:
            del self._inflight[slot]
            done.set_result(None)


def fingerprint(request: web.Request, raw: bytes) -> str:
    """The same request: method, path and the JSON body in canonical form."""
    try:
        body = orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        body = raw
    except orjson.JSONEncodeError:  # numbers past 64 bits: the slower canonical form
        body = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    h = hashlib.sha256(f"{request.method} {request.path}\n".encode())
    h.update(body)
    return h.hexdigest()


def replay(found: Remembered, claim: Claim) -> Answer:
    if found.fingerprint is not None and found.fingerprint != claim.fingerprint:
        raise ApiError(409, f"this {HEADER} was used with a different request in the last "
                       "24 hours", param=HEADER)
    if found.status is None or found.response is None:  # the key came with SMTP mail
        return Answer.of(202, {"id": found.message_id, "status": "queued"})
    return Answer(found.status, found.response)
