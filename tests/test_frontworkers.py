"""`[api] workers = 2`: a real `relay serve` whose API is served by the master and an API
worker process on one port (frontworker.py, frontworkers.py): both answer, mail sent through the
worker is delivered at once (the master wakes the delivery worker for it), /metrics counts
every process, SIGTERM drains and leaves no process, SIGKILL of the master leaves none, a
dead worker is restarted, SIGHUP replaces the workers, a bad value is a config error."""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay import metrics
from relay.api.app import per_process
from relay.api.health import Check
from relay.config import Config, LimitsConfig
from relay.frontworker import STALE, Feed, feed_line
from relay.frontworkers import FrontWorkers

from .conftest import free_port, relay_cmd, run_relay
from .sink import Sink

CONFIG = """
[server]
hostname = "relay.test"
data_dir = "{data}"
[[smtp.listeners]]
port = {smtp}
mode = "relay"
tls = "none"
allowed_networks = ["127.0.0.0/8"]
[api]
port = {api}
workers = 2
[delivery]
paused = {paused}
smarthost = "127.0.0.1:{sink}"
smarthost_tls = "none"
"""

LISTENING = re.compile(r"front worker api1 \(pid \d+\) serving the API on ")
EMAIL = {"from": "app@example.com", "to": ["bob@example.org"], "subject": "hi",
         "text": "hello"}


class Served:
    """`relay serve` on `config`, its log in a file; its front worker processes."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config, self.log_path = config, log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env["RELAY_LOG_LEVEL"] = "INFO"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(relay_cmd("--config", str(self.config), "serve"),
                                         env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def wait_for(self, ok: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            time.sleep(0.02)
        raise AssertionError(f"waited in vain for {what}:\n{self.log()}")

    def process_of(self, pattern: str, what: str) -> str:
        """The process that logged the first line `pattern` matches: its name in the line's
        brackets (pattern's group 1), or "master" (a line without)."""
        found: list[str] = []

        def logged() -> bool:
            found[:] = [m.group(1) or "master" for m in re.finditer(pattern, self.log())]
            return bool(found)

        self.wait_for(logged, what)
        return found[0]

    def workers(self) -> list[int]:
        """The master's front worker processes (its delivery worker is not one)."""
        return [pid for pid in children(self.proc.pid) if b"relay.frontworker" in cmdline(pid)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Relay(Served):
    """`relay serve` with [api] workers = 2, its log in a file, a key to send with."""

    def __init__(self, tmp_path: Path, *, sink_port: int = 9, paused: bool = True,
                 store_url: str = "", extra: str = "") -> None:
        self.api_port = free_port()
        self.config = tmp_path / "relay.toml"
        self.config.write_text(CONFIG.format(data=tmp_path / "data", smtp=free_port(),
                                             api=self.api_port, sink=sink_port,
                                             paused=str(paused).lower())
                               + (f"[store]\nurl = '{store_url}'\n" if store_url else "")
                               + extra,
                               "utf-8")
        made = run_relay("--config", str(self.config), "keys", "create", "--name", "t",
                         "--json")
        assert made.returncode == 0, made.stderr
        self.key = json.loads(made.stdout)["key"]
        self.opened: list[http.client.HTTPConnection] = []
        super().__init__(self.config, tmp_path / "relay.log")
        self.wait_for(lambda: len(self.workers()) == 1 and LISTENING.search(self.log()),
                      "the API worker to listen")

    def connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=10)
        conn.connect()
        self.opened.append(conn)  # closed at stop
        return conn

    def request(self, conn: http.client.HTTPConnection, method: str, path: str,
                body: Any = None) -> tuple[int, Any, str]:
        """Status, JSON (or text) answer, and the process that served it ("master", "api1")."""
        rid = uuid.uuid4().hex
        headers = {"Authorization": f"Bearer {self.key}", "X-Request-Id": rid}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body), "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read().decode()
        answer = json.loads(raw) if resp.headers.get("Content-Type", "").startswith(
            "application/json") else raw
        return resp.status, answer, self.served_by(rid)

    def served_by(self, request_id: str) -> str:
        return self.process_of(r"relay\.access(?:\[(api\d+)\])?: .* req=" + request_id,
                               f"the access line of {request_id}")

    def one_of_each(self) -> dict[str, http.client.HTTPConnection]:
        """A keep-alive connection served by the master and one by the worker."""
        conns: dict[str, http.client.HTTPConnection] = {}
        for _ in range(200):
            conn = self.connect()
            _, _, by = self.request(conn, "GET", "/healthz")
            if by in conns:
                conn.close()
            else:
                conns[by] = conn
            if len(conns) == 2:
                return conns
        raise AssertionError(f"only {sorted(conns)} answered 200 connections")

    def stop(self) -> None:
        for conn in self.opened:
            conn.close()
        super().stop()


def children(pid: int) -> list[int]:
    try:
        return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):  # gone, or gone between open and read
        return []


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):  # gone, or gone between open and read
        return b""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone, or gone between open and read
        return False
    return state != "Z"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Callable[..., Relay]]:
    started: list[Relay] = []

    def start(**kw: Any) -> Relay:
        started.append(Relay(tmp_path, **kw))
        return started[-1]

    yield start
    for r in started:
        r.stop()


def accepted(text: str) -> float:
    found = re.search(r'^relay_messages_accepted_total\{listener="api",source="api"\} (\S+)$',
                      text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_both_processes_answer_and_mail_sent_through_the_worker_goes_out_at_once(
        relay: Callable[..., Relay], store_url: str) -> None:
    """On SQLite (the worker's writer takes turns with the master's by the lock) and on
    PostgreSQL (each process its own connections)."""
    async with Sink() as sink:
        r = await asyncio.to_thread(relay, sink_port=sink.port, paused=False,
                                    store_url=store_url)
        conns = await asyncio.to_thread(r.one_of_each)
        waits = []
        for i in range(7):
            sent = time.monotonic()
            status, answer, by = await asyncio.to_thread(
                r.request, conns["api1"], "POST", "/v1/emails",
                {**EMAIL, "to": [f"to{i}@example.org"]})
            assert (status, by) == (202, "api1"), answer
            async with asyncio.timeout(10):
                while not sink.delivered_to(f"to{i}@example.org"):
                    await asyncio.sleep(0.01)
            waits.append(time.monotonic() - sent)
        # the delivery worker polls every 2 s; woken by the master for the worker's commits,
        # it sends each at once
        assert sorted(waits)[-2] < 0.6, waits
        status, answer, by = await asyncio.to_thread(
            r.request, conns["master"], "POST", "/v1/emails", {**EMAIL, "to": ["m@example.org"]})
        assert (status, by) == (202, "master"), answer


def test_the_connections_are_handed_out_in_turn_and_a_dead_workers_turns_served_here(
        relay: Callable[..., Relay]) -> None:
    """The master accepts and hands the worker every other connection (handoff.py): a
    client's connections split evenly, where SO_REUSEPORT's hash of the addresses split 32 of
    them as unevenly as 33/67. With the worker killed, its turns are the master's."""
    r = relay()
    conns = [r.connect() for _ in range(20)]
    order = [r.request(conn, "GET", "/healthz")[2] for conn in conns]
    assert sorted(set(order)) == ["api1", "master"], order
    assert all(a != b for a, b in itertools.pairwise(order)), order  # strictly in turn
    _, text, _ = r.request(conns[order.index("master")], "GET", "/metrics")
    assert 'relay_api_connections_total{served_by="worker"} 10.0' in text, text
    assert 'relay_api_connections_total{served_by="master"} 10.0' in text, text
    (worker,) = r.workers()
    os.kill(worker, signal.SIGKILL)
    # (its threads close its files a moment after its main thread shows it dead: what is
    # handed to it then is lost with it, as what a dying process had accepted always was)
    r.wait_for(lambda: "was killed by SIGKILL" in r.log(), "the master to see it die")
    for _ in range(6):  # each served here (tests/test_handoff.py: a handoff that fails)
        assert r.request(r.connect(), "GET", "/healthz")[0] == 200


def test_metrics_and_readiness_are_the_same_through_either_process(
        relay: Callable[..., Relay]) -> None:
    r = relay()
    conns = r.one_of_each()
    for _ in range(3):
        assert r.request(conns["api1"], "POST", "/v1/emails", EMAIL)[0] == 202
    assert r.request(conns["master"], "POST", "/v1/emails", EMAIL)[0] == 202

    def scraped(by: str) -> float:
        status, text, served = r.request(conns[by], "GET", "/metrics")
        assert (status, served) == (200, by)
        return accepted(text)

    # counts travel once a second each way: the worker's to the master, the total back
    r.wait_for(lambda: scraped("master") == 4 and scraped("api1") == 4, "4 accepted in both")
    for by, conn in conns.items():
        status, ready, served = r.request(conn, "GET", "/readyz")
        assert (status, served) == (200, by), ready
        assert set(ready["checks"]) == {"store", "delivery", "listeners"}
        assert "paused" in ready["checks"]["delivery"]["detail"]


def test_sigterm_stops_the_workers_and_sigkill_of_the_master_leaves_none(
        relay: Callable[..., Relay], tmp_path: Path) -> None:
    r = relay()
    (worker,) = r.workers()
    r.proc.send_signal(signal.SIGTERM)
    assert r.proc.wait(30) == 0
    assert not alive(worker)
    assert "Traceback" not in r.log()
    r.stop()

    second = tmp_path / "second"
    second.mkdir()
    r2 = Relay(second)
    (worker,) = r2.workers()
    r2.proc.send_signal(signal.SIGKILL)
    r2.proc.wait(10)
    deadline = time.monotonic() + 5
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker)
    r2.stop()


def test_a_dead_worker_is_restarted_and_sighup_replaces_the_workers(
        relay: Callable[..., Relay]) -> None:
    r = relay()
    (first,) = r.workers()
    os.kill(first, signal.SIGKILL)
    # one look at the processes: two could see the killed worker still alive, then gone
    r.wait_for(lambda: len(now := r.workers()) == 1 and first not in now, "a new worker")
    assert re.search(r"front worker api1 \(pid \d+\) was killed by SIGKILL after \d+ s; "
                     r"restarting it", r.log())
    (second,) = r.workers()
    r.wait_for(lambda: len(LISTENING.findall(r.log())) == 2, "the new worker to listen")
    with open(r.config, "a", encoding="utf-8") as f:
        f.write("concurrency = 50\n")  # in [delivery]: a changed config restarts them
    r.proc.send_signal(signal.SIGHUP)
    r.wait_for(lambda: len(LISTENING.findall(r.log())) == 3 and not alive(second),
               "the reload's worker, and the old one gone")
    (third,) = r.workers()
    assert third != second
    conns = r.one_of_each()
    assert r.request(conns["api1"], "POST", "/v1/emails", EMAIL)[0] == 202


def test_connections_handed_to_a_worker_that_dies_before_taking_them_are_served(
        relay: Callable[..., Relay]) -> None:
    """A worker stopped (SIGSTOP) and then killed with connections still queued on its
    handoff socket: the master kept its own descriptors of them and serves them, so each
    client gets its answer instead of a connection closed unanswered."""
    r = relay()
    (worker,) = r.workers()
    os.kill(worker, signal.SIGSTOP)
    clients = []
    try:
        for _ in range(4):  # turns alternate: two of them go to the stopped worker
            client = socket.create_connection(("127.0.0.1", r.api_port), timeout=20)
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close"
                           b"\r\n\r\n")
            clients.append(client)
        time.sleep(0.5)  # the master's own are answered; the worker's wait in its socket
        os.kill(worker, signal.SIGKILL)
        for client in clients:
            answer = b""
            while chunk := client.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        for client in clients:
            client.close()
    r.wait_for(lambda: re.search(r"a front worker ended before it took [12] connection",
                                 r.log()) is not None, "the master's word on them")


def test_a_reload_that_changes_nothing_keeps_the_api_workers_beside_a_tls_listener(
        relay: Callable[..., Relay]) -> None:
    """Only SMTP workers load certificates: API workers stay when the config is the same."""
    r = relay(extra=f"[[smtp.listeners]]\nport = {free_port()}\nmode = 'submission'\n"
                    "tls = 'implicit'\n")
    (worker,) = r.workers()
    r.proc.send_signal(signal.SIGHUP)
    r.wait_for(lambda: "reloaded " in r.log(), "the reload")
    assert r.workers() == [worker] and len(LISTENING.findall(r.log())) == 1


@pytest.mark.parametrize("value", ["0", "65", "'two'"])
def test_a_bad_workers_value_is_a_config_error(tmp_path: Path, value: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"[server]\ndata_dir = '{tmp_path / 'data'}'\n[api]\nport = "
                    f"{free_port()}\nworkers = {value}\n", "utf-8")
    done = run_relay("--config", str(path), "serve", timeout=30)
    assert done.returncode != 0
    assert f"{path}: api.workers: " in done.stderr, done.stderr
    env = run_relay("--config", str(path), "serve", timeout=30,
                    env={"RELAY_API_WORKERS": "100"})
    assert env.returncode != 0 and "api.workers: must be 1..64" in env.stderr, env.stderr


def test_the_connection_cap_is_shared_out_and_the_per_client_cap_holds_in_each() -> None:
    config = Config(limits=LimitsConfig(max_http_connections=2000,
                                        max_http_connections_per_client=200))
    assert per_process(config, 1) is config
    shared = per_process(config, 3)
    assert shared.limits.max_http_connections == 667  # 3 × 667 ≥ 2000, rounded up
    assert shared.limits.max_http_connections_per_client == 200
    assert dataclasses.replace(shared, limits=config.limits) == config


def test_a_reload_under_load_fails_no_request(relay: Callable[..., Relay]) -> None:
    """The old worker's answers say `Connection: close` once it stops serving, and it gives
    its clients a moment to go: none sends a request down a connection being closed."""
    r = relay()
    stop = threading.Event()
    done, failed = [0], []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", r.api_port, timeout=10)
        while not stop.is_set():
            try:
                conn.request("GET", "/healthz")
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200
                done[0] += 1
            except (OSError, http.client.HTTPException) as exc:
                failed.append(repr(exc))
                conn.close()
        conn.close()

    clients = [threading.Thread(target=client) for _ in range(12)]
    for t in clients:
        t.start()
    first = r.config.read_text("utf-8")
    try:
        for i in range(2):
            (old,) = r.workers()
            r.config.write_text(first + f"concurrency = {50 + i}\n", "utf-8")  # in [delivery]
            r.proc.send_signal(signal.SIGHUP)
            r.wait_for(lambda old=old: not alive(old) and len(r.workers()) == 1,
                       "the old worker gone, a new one running")
            r.wait_for(lambda i=i: len(LISTENING.findall(r.log())) == 2 + i,
                       "the new worker listening")
    finally:
        stop.set()
        for t in clients:
            t.join(15)
    assert done[0] > 100
    assert failed == []


def test_a_worker_repeats_the_masters_checks_and_fails_master_when_it_is_silent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    feed = Feed()
    assert [(c.name, c.ok) for c in feed.checks()] == [("master", False)]
    checks = [Check("delivery", True, "worker pid 7 running"), Check("listeners", True, "1")]
    feed.update(feed_line([["relay_x", "counter", "x", [["relay_x_total", {}, 2.0]]]], checks))
    feed.update(b'{"others": "not a snapshot", "checks": []}\n')  # ignored, logged
    assert feed.checks() == checks
    assert feed.others.total()[0][3] == [["relay_x_total", {}, 2.0]]
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic", lambda: now + STALE + 1)
    assert [(c.name, c.ok) for c in feed.checks()] == [("master", False)]


def test_the_feed_of_a_worker_being_stopped_still_has_a_line() -> None:
    """stop() unlists the workers before their feeds end: a feed asked a line then was a
    KeyError, logged as an error at every stop of relay with API workers."""
    remotes = metrics.Remotes()
    workers = FrontWorkers(Config(), api=None, smtp=[], remotes=remotes, others=remotes.total,
                           on_wake=lambda: None, checks=lambda: [])
    gone = type("Child", (), {"remote": remotes.join()})()
    line = workers._feed(gone)  # type: ignore[arg-type]  # listed nowhere, as after stop()
    assert isinstance(line, bytes) and line.endswith(b"\n")
