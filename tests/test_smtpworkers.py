"""`[smtp] workers = 2`: a real `relay serve` whose SMTP listeners (a relay one, and a
submission one with implicit TLS) are served by the master and a front worker process, the
master handing the worker every other connection (handoff.py, smtp/listeners.py). Mail sent
through either is delivered at once; the connection caps and the AUTH throttle hold across
both; a reload replaces the worker, whose sessions end between transactions and never in
one; a killed worker's turns are served by the master."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import http.client
import os
import re
import signal
import smtplib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relay.config import LimitsConfig, load
from relay.smtp.limits import ConnectionCaps

from .conftest import free_port, run_relay
from .sink import Sink
from .smtputil import client_tls
from .test_frontworkers import Served, alive

CONFIG = """
[server]
hostname = "relay.test"
data_dir = "{data}"
[smtp]
workers = 2
[[smtp.listeners]]
port = {relay}
mode = "relay"
tls = "none"
allowed_networks = ["127.0.0.0/8"]
[[smtp.listeners]]
port = {submission}
mode = "submission"
tls = "implicit"
[api]
port = {api}
[limits]
max_smtp_connections_per_client = 4
auth_failures_before_delay = 10
auth_failures_before_block = 3
[delivery]
smarthost = "127.0.0.1:{sink}"
smarthost_tls = "none"
"""

SERVING = re.compile(r"front worker smtp1 \(pid \d+\) serving 2 SMTP listener")


class Relay(Served):
    """`relay serve` with [smtp] workers = 2, its log in a file."""

    def __init__(self, tmp_path: Path, sink_port: int) -> None:
        self.port, self.submission, self.api = free_port(), free_port(), free_port()
        config = tmp_path / "relay.toml"
        config.write_text(CONFIG.format(data=tmp_path / "data", relay=self.port,
                                        submission=self.submission, api=self.api,
                                        sink=sink_port), "utf-8")
        super().__init__(config, tmp_path / "relay.log")
        # by the log, not by connecting: a probe would take a turn of the connections
        self.wait_for(lambda: len(SERVING.findall(self.log())) == 1, "the SMTP worker")

    def handoffs(self) -> dict[str, float]:
        """relay_smtp_handoffs_total of the relay listener, by served_by, from /metrics."""
        conn = http.client.HTTPConnection("127.0.0.1", self.api, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        return {m.group(1): float(m.group(2)) for m in re.finditer(
            rf'^relay_smtp_handoffs_total\{{port="{self.port}",served_by="(\w+)"\}} (\S+)$',
            text, re.MULTILINE)}


def served_by(served: Served, message_id: str) -> str:
    """Which process took the message: "master", "smtp1", "front1", by its accept line."""
    return served.process_of(r"relay\.accept(?:\[(\w+)\])?: \S+ message-id="
                             + re.escape(message_id), f"the accept line of {message_id}")


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Callable[[int], Relay]]:
    started: list[Relay] = []

    def start(sink_port: int = 9) -> Relay:
        started.append(Relay(tmp_path, sink_port))
        return started[-1]

    yield start
    for r in started:
        r.stop()


def message(to: str) -> tuple[bytes, str]:
    mid = email.utils.make_msgid(domain="client.test")
    return (f"From: app@example.com\r\nTo: {to}\r\nSubject: hi\r\nMessage-ID: {mid}\r\n\r\n"
            "hello\r\n").encode(), mid


def send(port: int, to: str) -> str:
    """One message on a connection of its own; its Message-ID."""
    data, mid = message(to)
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
        s.sendmail("app@example.com", [to], data)
    return mid


async def test_mail_through_either_process_is_delivered_at_once_and_a_dead_worker_is_covered(
        relay: Callable[[int], Relay]) -> None:
    async with Sink() as sink:
        r = await asyncio.to_thread(relay, sink.port)
        by, waits = [], []
        for i in range(6):
            sent = time.monotonic()
            mid = await asyncio.to_thread(send, r.port, f"to{i}@example.org")
            async with asyncio.timeout(10):
                while not sink.delivered_to(f"to{i}@example.org"):
                    await asyncio.sleep(0.01)
            waits.append(time.monotonic() - sent)
            by.append(await asyncio.to_thread(served_by, r, mid))
        assert by == ["smtp1", "master"] * 3  # in turn, the worker's first
        # the delivery worker polls every 2 s; woken by the master for the worker's commits
        # as for its own, it sends each at once
        assert sorted(waits)[-2] < 0.6, waits
        assert await asyncio.to_thread(r.handoffs) == {"worker": 3, "master": 3,
                                                           "fallback": 0}

        (worker,) = r.workers()
        os.kill(worker, signal.SIGKILL)
        # once the master has seen it die (a connection handed to it as it dies is lost with
        # it, unanswered, as with any server process)
        await asyncio.to_thread(r.wait_for, lambda: "was killed by SIGKILL" in r.log(),
                                "the master to see the worker die")
        for i in range(6, 9):  # its turns are the master's until it is back
            await asyncio.to_thread(send, r.port, f"to{i}@example.org")
            async with asyncio.timeout(10):
                while not sink.delivered_to(f"to{i}@example.org"):
                    await asyncio.sleep(0.01)
        await asyncio.to_thread(r.wait_for, lambda: len(SERVING.findall(r.log())) == 2,
                                "the worker started again")


def greeting(port: int) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    reply = b""
    while not reply.endswith(b"\r\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        reply += chunk
    return sock, reply


def test_the_connection_caps_and_the_auth_throttle_hold_across_the_processes(
        relay: Callable[[int], Relay]) -> None:
    r = relay()
    # max_smtp_connections_per_client = 4: two in each process, wherever they land
    opened = [greeting(r.port) for _ in range(6)]
    try:
        replies = [reply[:9] for _, reply in opened]
        assert replies.count(b"220 relay") == 4, replies
        assert replies.count(b"421 4.7.0") == 2, replies
        assert all(b"Too many connections from your address" in reply
                   for _, reply in opened if reply.startswith(b"421"))
    finally:
        for sock, _ in opened:
            sock.close()

    # auth_failures_before_block = 3, failed on connections that alternate between the
    # processes: each then refuses the client, by the count in the store
    def login(secret: str) -> tuple[int, bytes]:
        """One AUTH PLAIN (smtplib's login would try each mechanism, each a failure)."""
        with smtplib.SMTP_SSL("127.0.0.1", r.submission, context=client_tls(),
                              timeout=20) as s:
            greeted = s.ehlo("client.test")
            if greeted[0] != 250:  # a process that counted the third failure itself
                return greeted
            plain = base64.b64encode(f"\0anyone\0{secret}".encode()).decode()
            return s.docmd("AUTH", f"PLAIN {plain}")

    assert [login("wrong")[0] for _ in range(3)] == [535] * 3
    refused = [login("wrong") for _ in range(2)]
    assert [code for code, _ in refused] == [421, 421], refused


def test_a_reload_ends_the_old_workers_sessions_between_transactions_only(
        relay: Callable[[int], Relay]) -> None:
    r = relay()
    (old,) = r.workers()
    busy = smtplib.SMTP("127.0.0.1", r.port, timeout=40)  # the worker's turn
    mine = smtplib.SMTP("127.0.0.1", r.port, timeout=20)  # the master's
    idle = smtplib.SMTP("127.0.0.1", r.port, timeout=20)  # the worker's
    # the submission listener's first turn is the worker's too: TLS from the first byte,
    # its handshake made there
    secure = smtplib.SMTP_SSL("127.0.0.1", r.submission, context=client_tls(), timeout=20)
    try:
        for s in (busy, mine, idle, secure):
            assert s.ehlo("client.test")[0] == 250
        assert busy.mail("app@example.com")[0] == 250
        assert busy.rcpt("bob@example.org")[0] == 250  # in a transaction

        text = r.config.read_text("utf-8")
        r.config.write_text(text.replace("workers = 2", "workers = 3"), "utf-8")
        r.proc.send_signal(signal.SIGHUP)  # a TLS listener: its worker loads the files anew
        r.wait_for(lambda: len(SERVING.findall(r.log())) == 2, "the reload's worker")
        assert "reload: smtp.workers changed; it takes effect when relay restarts" in r.log()
        # the idle session is told, and closed
        for session in (idle, secure):
            code, text = session.getreply()
            assert (code, text[:5]) == (421, b"4.3.2"), text
        # the one in a transaction ends it, in the old worker, with its 250 after the commit
        data, mid = message("bob@example.org")
        code, _ = busy.data(data)
        assert code == 250
        assert served_by(r, mid) == "smtp1"
        r.wait_for(lambda: not alive(old), "the old worker to stop")
        try:  # told so (421) after its 250, or closed without a word after its grace
            assert busy.noop()[0] == 421
        except smtplib.SMTPServerDisconnected:
            pass
        assert mine.noop()[0] == 250  # the master's session goes on
        assert old not in r.workers() and len(r.workers()) == 1
    finally:
        for s in (busy, mine, idle, secure):
            try:
                s.close()
            except OSError:
                pass


def test_the_caps_are_shared_out_among_the_processes() -> None:
    limits = LimitsConfig(max_smtp_connections=1000, max_smtp_connections_per_client=50)
    one, three = ConnectionCaps.from_limits(limits), ConnectionCaps.from_limits(limits, 3)
    assert (one._total, one._per_client) == (1000, 50)
    assert (three._total, three._per_client) == (334, 17)  # rounded up: 3 × 334 ≥ 1000


@pytest.mark.parametrize(("text", "env", "error"), [
    ("workers = 0", {}, "smtp.workers: must be 1..64; got 0"),
    ("workers = 'two'", {}, "smtp.workers: must be an integer"),
    ("", {"RELAY_SMTP_WORKERS": "65"}, "smtp.workers: must be 1..64; got 65"),
])
def test_a_bad_workers_value_is_a_config_error(tmp_path: Path, text: str,
                                               env: dict[str, str], error: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"[server]\ndata_dir = '{tmp_path / 'data'}'\n[smtp]\n{text}\n", "utf-8")
    done = run_relay("--config", str(path), "serve", timeout=30, env=env)
    assert done.returncode != 0
    assert error in done.stderr, done.stderr


def test_the_environment_sets_the_workers_but_not_the_listeners(tmp_path: Path) -> None:
    assert load(None, {"RELAY_SMTP_WORKERS": "3"}).smtp.workers == 3
    done = run_relay("serve", env={"RELAY_SMTP_LISTENERS": "[]"}, cwd=tmp_path, timeout=30)
    assert done.returncode != 0 and "listeners are set in the file" in done.stderr


def test_with_more_api_workers_the_first_serve_both_and_the_rest_the_api(
        tmp_path: Path) -> None:
    """[api] workers = 3 and [smtp] workers = 2: two workers, the first (front1) with turns
    of both, the second (api2) of the API only."""
    port = free_port()
    config = tmp_path / "relay.toml"
    config.write_text(
        f"[server]\nhostname = 'relay.test'\ndata_dir = '{tmp_path / 'data'}'\n"
        f"[smtp]\nworkers = 2\n[[smtp.listeners]]\nport = {port}\nmode = 'relay'\n"
        "tls = 'none'\nallowed_networks = ['127.0.0.0/8']\n"
        f"[api]\nport = {free_port()}\nworkers = 3\n[delivery]\npaused = true\n", "utf-8")
    served = Served(config, tmp_path / "relay.log")
    try:
        served.wait_for(lambda: len(re.findall(r"front worker \w+ \(pid", served.log())) == 2,
                        "both workers")
        log = served.log()
        assert re.search(r"front worker front1 \(pid \d+\) serving the API on 127\.0\.0\.1:\d+"
                         r" and 1 SMTP listener\(s\)", log), log
        assert re.search(r"front worker api2 \(pid \d+\) serving the API on [\d.:]+\n", log)
        ids = [send(port, "bob@example.org") for _ in range(4)]
        assert [served_by(served, mid) for mid in ids] == ["front1", "master"] * 2
    finally:
        served.stop()
