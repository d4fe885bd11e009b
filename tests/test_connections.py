"""The API's connection caps and read deadlines, with raw sockets on loopback: a slow head (on
a new or a kept-alive connection) or a stalled body is cut off at its deadline while other
clients are served; connections past the caps get a 503 at once."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from relay import keys
from relay.api.app import CONNECTIONS
from relay.config import ApiConfig, LimitsConfig
from relay.service import Service

from .conftest import make_config
from .test_webhooks import until

DEADLINE = 0.5
GET = b"GET /v1/openapi.json HTTP/1.1\r\nHost: relay\r\n\r\n"


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[Service]:
    service = Service(make_config(tmp_path, api=ApiConfig(port=0), limits=LimitsConfig(
        http_header_timeout=DEADLINE, http_body_timeout=DEADLINE, max_http_connections=3,
        max_http_connections_per_client=2)))
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def url(svc: Service, path: str = "/v1/openapi.json") -> str:
    assert svc.api_bound is not None
    return "http://{}:{}{}".format(*svc.api_bound, path)


async def connect(svc: Service, source: str = "127.0.0.1"
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert svc.api_bound is not None
    return await asyncio.open_connection(*svc.api_bound, local_addr=(source, 0))


def waiting_for_body(svc: Service) -> bool:
    assert svc.api_runner is not None
    return any(c._state.name == "BODY" for c in svc.api_runner.app[CONNECTIONS]._open.values())


def open_connections(svc: Service) -> int:
    assert svc.api_runner is not None
    return svc.api_runner.app[CONNECTIONS].open_connections


async def closed_after(reader: asyncio.StreamReader, started: float, *,
                       answer: bytes = b"") -> float:
    """Seconds from `started` until the server closed the connection, having sent `answer`
    (or the start of it)."""
    data = await asyncio.wait_for(reader.read(), timeout=10 * DEADLINE)
    assert data.startswith(answer) and bool(data) == bool(answer), data
    return time.monotonic() - started


async def close(*writers: asyncio.StreamWriter) -> None:
    for writer in writers:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass  # the server closed it first


async def served(svc: Service) -> None:
    async with aiohttp.ClientSession() as session, session.get(url(svc)) as resp:
        assert resp.status == 200
        assert "paths" in await resp.json()


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return head + await reader.readexactly(length)


async def test_half_a_request_line_is_cut_off_while_others_are_served(svc: Service) -> None:
    started = time.monotonic()
    reader, writer = await connect(svc)
    writer.write(b"GET /v1/openapi.json HT")
    await served(svc)  # the slow client holds nothing up
    elapsed = await closed_after(reader, started)
    assert DEADLINE * 0.8 <= elapsed < DEADLINE * 6
    await close(writer)


async def test_a_kept_alive_connection_has_the_same_deadline_for_its_next_head(
        svc: Service) -> None:
    reader, writer = await connect(svc)
    writer.write(GET)
    assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    writer.write(GET)  # a second full request on the same connection is fine
    assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    writer.write(b"GET /v1/openapi.json HTTP/1.1\r\nHost: re")
    elapsed = await closed_after(reader, started)
    assert DEADLINE * 0.8 <= elapsed < DEADLINE * 6
    await close(writer)


async def test_a_stalled_body_is_cut_off(svc: Service) -> None:
    _, secret = await keys.create_key(svc.store, name="k", scopes=("emails:send",))
    for key, answer in ((secret, b""), ("", b"HTTP/1.1 401 ")):
        # with a key the app waits for the body; without, it answers 401 at once, but the
        # body is still owed before the connection could carry another request
        reader, writer = await connect(svc)
        writer.write(b"POST /v1/emails HTTP/1.1\r\nHost: relay\r\nContent-Type: "
                     b"application/json\r\nAuthorization: Bearer " + key.encode() +
                     b"\r\nContent-Length: 100\r\n\r\n{\"from\": ")
        started = time.monotonic()
        elapsed = await closed_after(reader, started, answer=answer)
        assert DEADLINE * 0.8 <= elapsed < DEADLINE * 6
        await close(writer)
    await served(svc)


async def test_connections_past_the_caps_get_a_503_at_once(svc: Service) -> None:
    held = [await connect(svc), await connect(svc)]
    await until(lambda: open_connections(svc) == 2, timeout=5)
    reader, writer = await connect(svc)  # a third from 127.0.0.1: over the per-client cap
    answer = await asyncio.wait_for(reader.read(), timeout=5)
    assert answer.startswith(b"HTTP/1.1 503 ")
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert "max_http_connections_per_client" in body["error"]["message"]
    await close(writer)
    held.append(await connect(svc, "127.0.0.2"))  # another client still gets in
    await until(lambda: open_connections(svc) == 3, timeout=5)
    reader, writer = await connect(svc, "127.0.0.3")  # but not past the server's cap
    answer = await asyncio.wait_for(reader.read(), timeout=5)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"max_http_connections)" in answer
    await close(writer)
    # a held connection that sends a request is served; one that goes frees its place
    held[0][1].write(GET)
    assert (await read_response(held[0][0])).startswith(b"HTTP/1.1 200")
    await close(held[1][1])
    await until(lambda: open_connections(svc) == 2, timeout=5)
    reader, writer = await connect(svc, "127.0.0.3")
    writer.write(GET)
    assert (await read_response(reader)).startswith(b"HTTP/1.1 200")
    await close(held[0][1], held[2][1], writer)


async def test_a_client_gone_mid_body_is_no_error_in_the_log(
        svc: Service, caplog: pytest.LogCaptureFixture) -> None:
    """wrk and impatient clients close connections mid-request: that is a 499 in the access
    log and a debug line, not an ERROR with a traceback (aiohttp's, when the app raises)."""
    caplog.set_level(logging.DEBUG)
    _, secret = await keys.create_key(svc.store, name="k", scopes=("emails:send",))
    _, writer = await connect(svc)
    writer.write(b"POST /v1/emails HTTP/1.1\r\nHost: relay\r\nContent-Type: "
                 b"application/json\r\nAuthorization: Bearer " + secret.encode() +
                 b"\r\nContent-Length: 100\r\n\r\n{\"from\": ")
    await writer.drain()
    await until(lambda: waiting_for_body(svc), timeout=5)  # the handler reads the body
    await close(writer)

    def gone() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "relay.access" and " 499 " in
                r.getMessage()]

    await until(lambda: bool(gone()), timeout=5)
    await served(svc)
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == [], [r.getMessage() for r in errors]


def test_a_connection_past_the_cap_gets_its_503_on_uvloop(tmp_path: Path) -> None:
    """`relay serve` runs on uvloop, whose transports are not asyncio's classes: the refusal
    must still be written (it was an AssertionError in connection_made, and no answer)."""
    from relay.aio import run_loop

    got: list[bytes] = []

    async def main() -> None:
        svc = Service(make_config(tmp_path, api=ApiConfig(port=0), limits=LimitsConfig(
            max_http_connections=1, max_http_connections_per_client=1)))
        await svc.start()
        try:
            held = await connect(svc)
            await until(lambda: open_connections(svc) == 1, timeout=5)
            reader, writer = await connect(svc)
            got.append(await asyncio.wait_for(reader.read(), timeout=5))
            writer.close()
            held[1].close()
        finally:
            await svc.stop()

    run_loop(main())
    assert got[0].startswith(b"HTTP/1.1 503 "), got
