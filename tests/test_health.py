"""`/healthz` and `/readyz` (api/health.py, lifecycle/readiness.py) on a real service: the
store taking writes, the delivery worker alive, every listener bound; and what the master
logs when a signal kills its worker."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.config import DeliveryConfig
from relay.service import Service

from .conftest import make_config


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(http: aiohttp.ClientSession, svc: Service, path: str) -> tuple[int, Any]:
    assert svc.api_bound is not None
    host, port = svc.api_bound
    async with http.get(f"http://{host}:{port}{path}") as resp:  # no key: they are public
        return resp.status, await resp.json()


async def until(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_healthz_answers_while_the_loop_runs(service: Service,
                                                  http: aiohttp.ClientSession) -> None:
    assert await get(http, service, "/healthz") == (200, {"status": "ok"})


async def test_readyz_is_ready_and_says_delivery_is_paused(service: Service,
                                                           http: aiohttp.ClientSession) -> None:
    status, body = await get(http, service, "/readyz")
    assert status == 200, body
    assert body["status"] == "ready" and body["failed"] == []
    assert set(body["checks"]) == {"store", "delivery", "listeners"}
    assert "paused" in body["checks"]["delivery"]["detail"]
    assert body["checks"]["listeners"]["detail"] == "1 SMTP listeners bound"


@pytest.mark.skipif(os.environ.get("RELAY_TEST_STORE") == "postgresql",
                    reason="holds the SQLite file's write lock; the service is on PostgreSQL")
async def test_readyz_fails_on_the_store_while_another_process_holds_its_write_lock(
        service: Service, http: aiohttp.ClientSession) -> None:
    other = sqlite3.connect(service.config.db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # as a stuck second writer would
        status, body = await get(http, service, "/readyz")
        assert status == 503, body
        assert body["failed"] == ["store"]
        assert "no write within" in body["checks"]["store"]["detail"]
        other.execute("ROLLBACK")
    finally:
        other.close()

    async def ready() -> bool:
        return (await get(http, service, "/readyz"))[0] == 200
    await until(ready)


async def test_readyz_fails_when_a_listener_is_closed(service: Service,
                                                      http: aiohttp.ClientSession) -> None:
    service.servers[0].close()
    status, body = await get(http, service, "/readyz")
    assert status == 503
    assert body["failed"] == ["listeners"]
    assert body["checks"]["listeners"]["detail"] == "0 of 1 SMTP listeners bound"


async def test_a_killed_worker_makes_readyz_fail_until_it_is_restarted_and_is_logged(
        tmp_path: Path, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture) -> None:
    svc = Service(make_config(tmp_path, delivery=DeliveryConfig(process=True)))
    await svc.start()
    try:
        assert svc.worker is not None and svc.worker.pid is not None
        status, body = await get(http, svc, "/readyz")
        assert status == 200, body
        old = svc.worker.pid
        assert body["checks"]["delivery"]["detail"] == f"worker pid {old} running"
        with caplog.at_level(logging.ERROR, logger="relay.delivery.supervise"):
            os.kill(old, signal.SIGKILL)

            async def down() -> bool:
                return (await get(http, svc, "/readyz"))[0] == 503
            await until(down)
            status, body = await get(http, svc, "/readyz")
            assert body["failed"] == ["delivery"]
            assert "not running" in body["checks"]["delivery"]["detail"]

            async def back() -> bool:
                return (await get(http, svc, "/readyz"))[0] == 200
            await until(back)
        assert svc.worker.pid != old
        assert "the delivery worker was killed by SIGKILL; restarting" in caplog.messages
    finally:
        await svc.stop()


async def test_readyz_fails_when_the_in_process_scheduler_is_not_running(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    svc = Service(make_config(tmp_path, delivery=DeliveryConfig(process=False)))
    await svc.start()
    try:
        status, body = await get(http, svc, "/readyz")
        assert status == 200 and body["checks"]["delivery"]["detail"] == \
            "scheduler running in the master"
        assert svc.scheduler is not None
        await svc.scheduler.stop()
        status, body = await get(http, svc, "/readyz")
        assert status == 503 and body["failed"] == ["delivery"]
    finally:
        await svc.stop()


async def test_a_flood_of_readyz_costs_the_store_one_probe(service: Service,
                                                          http: aiohttp.ClientSession) -> None:
    writer = service.store.writer
    assert writer is not None
    before = writer.batches
    answers = await asyncio.gather(*[get(http, service, "/readyz") for _ in range(50)])
    assert {status for status, _ in answers} == {200}
    assert writer.batches - before <= 2  # one shared probe (two if a second went stale)
