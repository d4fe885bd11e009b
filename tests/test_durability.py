"""No 250 before the commit: SIGKILL relay while 20 clients send, then count."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import smtplib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from relay.store import SQLiteStore

from .conftest import free_port, run_relay
from .smtputil import connect
from .test_frontworkers import children, cmdline

SENDERS = 20


def sender(port: int, key: str, n: int, outcomes: dict[str, str], stop: threading.Event) -> None:
    """Many messages per session, so that DATA is often in flight when the kill comes."""
    i = 0
    while not stop.is_set():
        try:
            with connect(port, key=key) as s:
                while not stop.is_set():  # a session that outlived the kill ends here
                    token = f"t{n}-{i}"
                    i += 1
                    s.mail("alice@example.com")
                    s.rcpt("bob@example.org")
                    outcomes[token] = "sent"  # DATA under way: no reply seen yet
                    code, text = s.data(f"From: alice@example.com\r\nSubject: {token}\r\n\r\n"
                                        f"body {token}\r\n".encode())
                    outcomes[token] = (f"250 {text.decode().split()[-1]}" if code == 250
                                       else "refused")
        except (OSError, smtplib.SMTPException):
            if stop.is_set():
                return
            time.sleep(0.05)


def stored_subjects(db_path: Path) -> dict[str, str]:
    """{subject: message id} of every message in the store (the tests' tokens are subjects)."""
    async def read() -> dict[str, str]:
        store = SQLiteStore(db_path)
        await store.open()
        try:
            out, cursor = {}, None
            while True:
                page = await store.list_messages(limit=500, cursor=cursor)
                out.update({d.message.subject: d.message.id for d in page.items})
                cursor = page.next_cursor
                if not cursor:
                    return out
        finally:
            await store.close()

    return asyncio.run(read())


def relay_with_key(tmp_path: Path, relay_process: Any, smtp: int, api: int,
                   smtp_workers: int = 1) -> tuple[Any, str]:
    """relay serving (delivery paused) on these ports, and a key made by the CLI."""
    toml = (f"[server]\nhostname = 'relay.test'\ndata_dir = '{tmp_path / 'data'}'\n"
            f"[smtp]\nworkers = {smtp_workers}\n"
            f"[[smtp.listeners]]\nport = {smtp}\n[api]\nport = {api}\n"
            "[delivery]\npaused = true\n")
    (tmp_path / "relay.toml").write_text(toml)
    made = run_relay("--config", str(tmp_path / "relay.toml"), "keys", "create", "--name", "t",
                     "--json")
    return relay_process(toml, smtp), json.loads(made.stdout)["key"]


def kill_while_sending(relay: Any, target: Any, port: int, key: str, ok: str,
                       enough: int) -> dict[str, str]:
    """SENDERS threads send until `enough` answers start with `ok`; then SIGKILL, restart
    on the same data (recovering the WAL), stop. Returns each token's outcome."""
    outcomes: dict[str, str] = {}
    stop = threading.Event()
    threads = [threading.Thread(target=target, args=(port, key, n, outcomes, stop))
               for n in range(SENDERS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while sum(v.startswith(ok) for v in outcomes.values()) < enough:
        assert time.monotonic() < deadline, "relay accepted too little mail"
        time.sleep(0.01)
    relay.kill()  # SIGKILL mid-stream
    stop.set()
    for t in threads:
        t.join(30)
    relay.start()
    relay.stop()
    return outcomes


class OnlyTheWorker:
    """kill_while_sending's relay, for SIGKILL of the SMTP worker alone: the master serves
    on, then stops."""

    def __init__(self, relay: Any) -> None:
        self.relay = relay

    def kill(self) -> None:
        (worker,) = [c for c in children(self.relay.proc.pid)
                     if b"relay.frontworker" in cmdline(c)]
        os.kill(worker, signal.SIGKILL)

    def start(self) -> None:
        pass  # it never stopped

    def stop(self) -> None:
        self.relay.stop()


@pytest.mark.parametrize("killed", ["relay", "relay and its SMTP worker", "the SMTP worker"])
def test_sigkill_loses_no_acknowledged_message(tmp_path: Path, relay_process: Any,
                                               killed: str) -> None:
    """With `[smtp] workers = 2` half the sessions are the worker's: SIGKILL of the master
    takes the worker with it; SIGKILL of the worker alone ends only its sessions."""
    port = free_port()
    relay, key = relay_with_key(tmp_path, relay_process, port, free_port(),
                                smtp_workers=1 if killed == "relay" else 2)
    if killed != "relay":
        deadline = time.monotonic() + 20
        while not [c for c in children(relay.proc.pid) if b"relay.frontworker" in cmdline(c)]:
            assert time.monotonic() < deadline, "no SMTP worker"
            time.sleep(0.05)
        time.sleep(1.0)  # it opens its store and takes its turns
    target = OnlyTheWorker(relay) if killed == "the SMTP worker" else relay
    outcomes = kill_while_sending(target, sender, port, key, "250", 150)

    stored = stored_subjects(tmp_path / "data" / "relay.sqlite")
    acked = {t: v.split()[1] for t, v in outcomes.items() if v.startswith("250")}
    refused = [t for t, v in outcomes.items() if v == "refused"]
    unanswered = [t for t, v in outcomes.items() if v in ("sent", "noreply")]
    print(f"\nacknowledged with 250: {len(acked)}; refused: {len(refused)}; "
          f"no reply: {len(unanswered)} (of which stored: "
          f"{sum(t in stored for t in unanswered)})")
    missing = [t for t in acked if stored.get(t) != acked[t]]
    assert not missing, f"acknowledged but lost: {missing}"
    assert not [t for t in refused if t in stored]
    assert set(stored) <= set(outcomes)


def api_sender(port: int, key: str, n: int, outcomes: dict[str, str],
               stop: threading.Event) -> None:
    """Keep-alive HTTP: a 202 must mean the message is on disk."""
    i = 0
    while not stop.is_set():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            while True:
                token = f"a{n}-{i}"
                i += 1
                body = json.dumps({"from": "alice@example.com", "to": ["bob@example.org"],
                                   "subject": token, "text": f"body {token}"})
                outcomes[token] = "sent"
                conn.request("POST", "/v1/emails", body, {
                    "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
                resp = conn.getresponse()
                answer = json.loads(resp.read() or b"{}")
                outcomes[token] = (f"202 {answer['id']}" if resp.status == 202
                                   else f"refused {resp.status}")
        except (OSError, http.client.HTTPException, ValueError):
            if stop.is_set():
                return
            time.sleep(0.05)
        finally:
            conn.close()


def test_sigkill_loses_no_message_the_api_answered_202(tmp_path: Path,
                                                        relay_process: Any) -> None:
    api = free_port()
    relay, key = relay_with_key(tmp_path, relay_process, free_port(), api)
    outcomes = kill_while_sending(relay, api_sender, api, key, "202", 300)

    found = stored_subjects(tmp_path / "data" / "relay.sqlite")
    acked = {t: v.split()[1] for t, v in outcomes.items() if v.startswith("202")}
    missing = [t for t in acked if found.get(t) != acked[t]]
    assert not missing, f"answered 202 but lost: {missing}"
    assert set(found) <= set(outcomes)
