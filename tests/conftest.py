"""Shared fixtures: configs on free loopback ports, relay in-process or as a real process."""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay import domains
from relay.config import (
    ApiConfig,
    Config,
    DeliveryConfig,
    ListenerConfig,
    ServerConfig,
    SmtpConfig,
    StoreConfig,
    TrackingConfig,
)
from relay.service import Service

from .apiutil import Api, open_api
from .dnsserver import DNSServer


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, and never one handed out before in this run: the
    kernel may give the same free port twice in a row, and a test that asks for two (SMTP
    and API) before binding either then saw its relay refuse to start, "address in use"."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def make_config(tmp_path: Path, *listeners: ListenerConfig, **sections: Any) -> Config:
    """A config on free ports; delivery is paused unless a [delivery] section is given."""
    if not listeners:
        listeners = (ListenerConfig(port=free_port()),)
    sections.setdefault("delivery", DeliveryConfig(paused=True))
    sections.setdefault("api", ApiConfig(port=0))
    sections.setdefault("tracking", TrackingConfig(allow_insecure_public_url=True))
    if os.environ.get("RELAY_TEST_STORE") == "postgresql":  # the suite on PostgreSQL
        sections.setdefault("store", StoreConfig(url=_shared_pg_database()))
    return Config(
        server=ServerConfig(hostname="relay.test", data_dir=tmp_path / "data"),
        smtp=SmtpConfig(listeners=listeners),
        **sections,
    )


@pytest.fixture
async def dns() -> AsyncIterator[DNSServer]:
    """An authoritative DNS server on loopback; point [dns] nameservers at dns.nameserver."""
    async with DNSServer() as server:
        yield server


async def add_signing_domain(svc: Service, name: str) -> None:
    """DKIM keys for a sending domain, as `relay domains add` makes them (broadcast mail
    needs them: its unsubscribe headers must be signed)."""
    await svc.store.save_domain(domains.make_domain(svc.config, name, time.time()))


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path)


@pytest.fixture
async def service(config: Config) -> AsyncIterator[Service]:
    svc = Service(config)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


async def store_execute(svc: Service, sql: str, params: tuple[Any, ...] = ()) -> int:
    """One statement on a running service's own store (SQLite or PostgreSQL), through its
    writer: for a test that must set a row as no API would. The rows it changed."""
    count: int = await svc.store._write(lambda db: db.execute(sql, params).rowcount)
    return count


async def store_rows(svc: Service, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """A query's rows on a running service's own store (SQLite or PostgreSQL)."""
    rows: list[Any] = await svc.store._write(lambda db: db.execute(sql, params).fetchall())
    return rows


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, "utf-8")
    return path


def relay_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "relay.cli", *args]


def run_relay(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    full_env.update(env or {})
    return subprocess.run(relay_cmd(*args), capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=timeout)


def wait_port(port: int, *, timeout: float = 20.0, proc: subprocess.Popen[Any] | None = None
              ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"relay exited with {proc.returncode}: {out}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port}")


class RelayProcess:
    """`relay serve` as a real process, for SIGKILL and CLI tests."""

    def __init__(self, config_path: Path, port: int, cwd: Path) -> None:
        self.config_path, self.port, self.cwd = config_path, port, cwd
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        env = {**os.environ, "RELAY_LOG_LEVEL": "WARNING"}
        env.pop("RELAY_CONFIG", None)
        env.pop("RELAY_TEST_STORE", None)  # the suite's switch, not a relay setting
        self.proc = subprocess.Popen(
            relay_cmd("--config", str(self.config_path), "serve"), cwd=self.cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_port(self.port, proc=self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture
def relay_process(tmp_path: Path) -> Iterator[Any]:
    started: list[RelayProcess] = []

    def start(toml: str, port: int) -> RelayProcess:
        if "[api]" not in toml:  # never the default 8025: another test's or the machine's
            toml += f"\n[api]\nport = {free_port()}\n"
        path = write_toml(tmp_path / "relay.toml", toml)
        rp = RelayProcess(path, port, tmp_path)
        rp.start()
        started.append(rp)
        return rp

    yield start
    for rp in started:
        rp.stop()


def with_listener(config: Config, **changes: Any) -> Config:
    listener = dataclasses.replace(config.smtp.listeners[0], **changes)
    return dataclasses.replace(config, smtp=SmtpConfig(listeners=(listener,)))


@pytest.fixture
async def api(service: Service) -> AsyncIterator[Api]:
    session, secret = await open_api(service)
    assert service.api_bound is not None
    host, port = service.api_bound
    try:
        yield Api(session, f"http://{host}:{port}", secret)
    finally:
        await session.close()


# -- hangs ------------------------------------------------------------------------------------
# pytest-timeout ends a hung run with every thread's stack, but a hung coroutine shows there
# only as an event loop waiting in select(). Shortly before, the awaiting tasks are printed.

TASK_DUMP_BEFORE = 10.0  # seconds before pytest-timeout's limit


def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> None:
    timer = threading.Timer(max(1.0, settings.timeout - TASK_DUMP_BEFORE), _dump_tasks,
                            (item.nodeid,))
    timer.daemon = True
    timer.start()
    item.stash[_TASK_TIMER] = timer  # returns None: pytest-timeout sets its own timer too


def pytest_timeout_cancel_timer(item: pytest.Item) -> None:
    timer = item.stash.get(_TASK_TIMER, None)
    if timer is not None:
        timer.cancel()


_TASK_TIMER = pytest.StashKey[threading.Timer]()


def _dump_tasks(nodeid: str) -> None:
    """Every pending task of every running event loop, with the line each awaits at."""
    out = sys.__stderr__
    assert out is not None
    print(f"\n++++ {nodeid} is about to time out; its asyncio tasks:", file=out)
    loops = [o for o in gc.get_objects()
             if isinstance(o, asyncio.AbstractEventLoop) and o.is_running()]
    for loop in loops:
        try:  # read from another thread: the loop may change its set of tasks meanwhile
            tasks = list(asyncio.all_tasks(loop))
        except RuntimeError:
            tasks = list(asyncio.all_tasks(loop))
        for task in tasks:
            print(f"-- {task!r}", file=out)
            task.print_stack(file=out)
    out.flush()


# -- PostgreSQL (issue 20): one throwaway server per test run, a fresh database per test ----

_pg: Any = None
_pg_databases = 0


def _server() -> Any:
    global _pg
    if _pg is None:
        from .pgserver import PgServer

        _pg = PgServer()
        _pg.start()
        atexit.register(_pg.stop)
    return _pg


def _shared_pg_database() -> str:
    """A fresh database for a config of make_config's, under RELAY_TEST_STORE=postgresql."""
    global _pg_databases
    _pg_databases += 1
    return _server().create_database(f"c{os.getpid()}_{_pg_databases}")


@pytest.fixture(scope="session")
def pg_server() -> Any:
    """The run's PostgreSQL server (tests/pgserver.py), started at first use, stopped at exit."""
    return _server()


@pytest.fixture
def pg_url(pg_server: Any) -> Iterator[str]:
    """postgresql:// URL of an empty database of this test's own, dropped after it."""
    global _pg_databases
    _pg_databases += 1
    name = f"t{os.getpid()}_{_pg_databases}"
    url = pg_server.create_database(name)
    try:
        yield url
    finally:
        pg_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL on each backend in turn: the SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'q.sqlite'}"
    url: str = request.getfixturevalue("pg_url")
    return url


# `relay serve` runs on uvloop (relay.aio.run_loop); tests run on asyncio's loop. The modules
# named here (the ones with sockets, TLS and timers) run each async test on both, since uvloop's
# transports are not asyncio's classes (two isinstance asserts broke under uvloop only and no
# test saw it) and its callbacks interleave differently. BOTH_LOOPS=<modules> overrides the set;
# BOTH_LOOPS=all runs every module on both (with -k uvloop: the whole suite on uvloop).
NETWORK_MODULES = ("test_connections,test_smtpd,test_smtplimits,test_pipelining,test_deliver,"
                   "test_delivery,test_health,test_frontworkers,test_inbound,test_webhooks,"
                   "test_mtasts,test_dane,test_tls_policy,test_stop,test_handoff")
BOTH_LOOPS = frozenset(os.environ.get("BOTH_LOOPS", NETWORK_MODULES).split(","))


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Any:
    # a mapping for every test (None is a usage error); one factory adds no id
    if item.module is None or ("all" not in BOTH_LOOPS and
                               item.module.__name__.rpartition(".")[2] not in BOTH_LOOPS):
        return {"asyncio": asyncio.new_event_loop}
    import uvloop
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
