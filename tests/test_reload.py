"""A real `relay serve` process under a fake systemd: READY=1, WATCHDOG=1 and STATUS= on a
notify socket the test binds; SIGHUP and `relay reload` re-reading the config and TLS
certificates without dropping a session; a bad config refused and the old one kept; the
worker outliving a hangup of the whole process group (lifecycle/, service.run)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme

from .conftest import free_port, relay_cmd, run_relay


class Served:
    """`relay serve` with its log in a file the test reads while it runs."""

    def __init__(self, tmp_path: Path, toml: str, env: dict[str, str] | None = None) -> None:
        self.smtp_port, self.api_port = free_port(), free_port()
        self.config = tmp_path / "relay.toml"
        self.data = tmp_path / "data"
        self.log_path = tmp_path / "relay.log"
        self.write(toml)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        full_env.update({"RELAY_LOG_LEVEL": "INFO", **(env or {})})
        with open(self.log_path, "wb") as log:
            # a session of its own: a hangup can be sent to its whole process group
            self.proc = subprocess.Popen(relay_cmd("--config", str(self.config), "serve"),
                                         cwd=tmp_path, env=full_env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_for(lambda: self.get("/healthz")[0] == 200, "relay to answer")

    def write(self, toml: str) -> None:
        self.config.write_text(toml.format(smtp=self.smtp_port, api=self.api_port,
                                           data=self.data), "utf-8")

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def wait_for(self, ok: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if ok():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"waited in vain for {what}:\n{self.log()}")

    def wait_log(self, text: str, count: int = 1) -> None:
        self.wait_for(lambda: self.log().count(text) >= count, repr(text))

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}{path}",
                                        timeout=5) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def worker_pid(self) -> int:
        detail = self.get("/readyz")[1]["checks"]["delivery"]["detail"]
        assert detail.startswith("worker pid "), detail
        return int(detail.split()[2])

    def hup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(toml: str, env: dict[str, str] | None = None) -> Served:
        started.append(Served(tmp_path, toml, env))
        return started[-1]

    yield start
    for served in started:
        served.stop()


BASE = """
[server]
hostname = "relay.test"
data_dir = "{data}"
[[smtp.listeners]]
address = "127.0.0.1"
port = {smtp}
mode = "relay"
tls = "starttls"
tls_cert = "CERT"
tls_key = "KEY"
allowed_networks = ["127.0.0.0/8"]
[api]
port = {api}
[delivery]
paused = PAUSED
concurrency = CONCURRENCY
"""


def config_text(tmp_path: Path, *, paused: bool = True, concurrency: int = 100,
                cert: str = "cert.pem") -> str:
    return (BASE.replace("CERT", str(tmp_path / cert)).replace("KEY", str(tmp_path / "key.pem"))
            .replace("PAUSED", str(paused).lower()).replace("CONCURRENCY", str(concurrency)))


def issue(ca: trustme.CA, tmp_path: Path) -> bytes:
    """A new certificate for relay.test in cert.pem/key.pem; its DER."""
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    (tmp_path / "cert.pem").write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    (tmp_path / "key.pem").write_bytes(cert.private_key_pem.bytes())
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def starttls(port: int, ca: trustme.CA) -> tuple[smtplib.SMTP, bytes]:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10)
    client.starttls(context=ctx)
    client.ehlo("client.test")
    sock = client.sock
    assert isinstance(sock, ssl.SSLSocket)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return client, der


def message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@sender.test", "someone@rcpt.test", "hi"
    msg.set_content("sent across a reload\n")
    return msg


def test_systemd_hears_ready_watchdog_status_and_stopping(
        tmp_path: Path, serve: Callable[..., Served]) -> None:
    issue(trustme.CA(), tmp_path)
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sd:
        sd.bind(str(path))
        sd.settimeout(20)
        served = serve(config_text(tmp_path), {"NOTIFY_SOCKET": str(path),
                                               "WATCHDOG_USEC": "400000"})
        heard: list[str] = []
        while not (any(h.startswith("STATUS=") for h in heard)
                   and heard.count("WATCHDOG=1") >= 3):
            heard.append(sd.recv(4096).decode())
        assert heard[0] == "READY=1"
        status = next(h for h in heard if h.startswith("STATUS="))
        assert status == ("STATUS=scheduled 0, queued 0, deferred 0, held 0, failed 0; ready")
        served.hup()
        while not heard[-1].startswith("RELOADING=1\nMONOTONIC_USEC="):
            heard.append(sd.recv(4096).decode())
        while heard[-1] != "READY=1":
            heard.append(sd.recv(4096).decode())
        served.proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in heard:
            heard.append(sd.recv(4096).decode())
        assert served.proc.wait(20) == 0
    assert "stopping on SIGTERM" in served.log()


def test_sighup_serves_a_new_certificate_to_new_sessions_and_keeps_the_open_one(
        tmp_path: Path, serve: Callable[..., Served]) -> None:
    ca = trustme.CA()
    first = issue(ca, tmp_path)
    served = serve(config_text(tmp_path))
    old, der = starttls(served.smtp_port, ca)
    assert der == first
    old.mail("app@sender.test")
    old.rcpt("someone@rcpt.test")

    second = issue(ca, tmp_path)  # as certbot renews it: the same paths, new files
    served.hup()
    served.wait_log("reloaded ")
    new, der = starttls(served.smtp_port, ca)
    assert der == second != first
    new.quit()
    code, _ = old.data(message().as_bytes())  # the session begun before goes on, and ends
    assert code == 250
    old.quit()
    assert served.get("/readyz")[0] == 200


def test_a_bad_config_or_certificate_is_refused_and_the_old_one_kept(
        tmp_path: Path, serve: Callable[..., Served]) -> None:
    ca = trustme.CA()
    first = issue(ca, tmp_path)
    served = serve(config_text(tmp_path))

    served.config.write_text("[server\nnot toml", "utf-8")
    served.hup()
    served.wait_log(f"reload refused: {served.config}: -: not valid TOML")

    served.write(config_text(tmp_path, cert="missing.pem"))
    served.hup()
    served.wait_log(f"reload refused: {served.config}: smtp.listeners[0].tls_cert: "
                    f"{tmp_path / 'missing.pem'}: no such file")

    served.write(config_text(tmp_path))
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    served.hup()
    served.wait_log(f"reload refused: {served.config}: smtp.listeners[0].tls_cert: "
                    "cannot load the certificate and key")
    assert "reloaded " not in served.log()
    client, der = starttls(served.smtp_port, ca)  # still serving, with the old certificate
    assert der == first
    client.quit()
    assert served.get("/readyz")[0] == 200


def test_relay_reload_signals_the_running_relay_and_says_when_none_runs(
        tmp_path: Path, serve: Callable[..., Served]) -> None:
    issue(trustme.CA(), tmp_path)
    served = serve(config_text(tmp_path))
    done = run_relay("--config", str(served.config), "reload", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"pid {served.proc.pid}" in done.stdout
    served.wait_log("reloading on SIGHUP")
    served.wait_log("reloaded ")
    served.stop()
    done = run_relay("--config", str(served.config), "reload", cwd=tmp_path)
    assert done.returncode == 1
    assert f"relay: no relay is running on {served.data}" in done.stderr


def test_a_hangup_to_the_process_group_kills_no_child_and_a_delivery_change_renews_the_worker(
        tmp_path: Path, serve: Callable[..., Served]) -> None:
    issue(trustme.CA(), tmp_path)
    served = serve(config_text(tmp_path, paused=False))
    pid = served.worker_pid()
    os.killpg(served.proc.pid, signal.SIGHUP)  # what a closing terminal sends
    served.wait_log("reloaded ")
    assert served.worker_pid() == pid  # the same config: the same worker, alive
    assert "killed by" not in served.log() and "exited with" not in served.log()

    served.write(config_text(tmp_path, paused=False, concurrency=7))
    served.hup()
    served.wait_log("reloaded ", 2)
    served.wait_for(lambda: served.worker_pid() != pid, "a new worker")
    served.wait_for(lambda: not _alive(pid), "the old worker to end")
    assert served.get("/readyz")[0] == 200
    assert "killed by" not in served.log() and "exited with" not in served.log()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie not yet reaped still answers: count it as gone (as one reaped meanwhile)
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can be refused")
def test_root_is_refused_in_the_relay_users_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 65534, 65534)  # as StateDirectory= makes it: the service user's
    config = tmp_path / "relay.toml"
    config.write_text(f'[server]\ndata_dir = "{data}"\n[api]\nport = {free_port()}\n')
    done = run_relay("--config", str(config), "queue", "list", cwd=tmp_path)
    assert done.returncode == 1
    assert f"relay: {data} belongs to user " in done.stderr
    assert "relay as that user (sudo -u " in done.stderr
    assert list(data.iterdir()) == []  # nothing made as root


# -- in the master's own loop: what a reload changes, and what it keeps ------------------

INPROC = """
[server]
hostname = "relay.test"
data_dir = "{data}"
[[smtp.listeners]]
address = "127.0.0.1"
port = {port}
mode = "relay"
tls = "none"
allowed_networks = ["127.0.0.0/8"]
[api]
port = {api}
[delivery]
process = false
concurrency = {concurrency}
[webhooks]
timeout = {timeout}
[limits]
max_recipients = {max_rcpt}
"""


async def test_a_reload_renews_delivery_and_webhooks_and_keeps_what_needs_a_restart(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from relay.config import load
    # load() reads RELAY_* from the environment; the suite's own switch is no setting
    monkeypatch.delenv("RELAY_TEST_STORE", raising=False)
    from relay.lifecycle.reload import reload
    from relay.service import Service

    path, port, api = tmp_path / "relay.toml", free_port(), free_port()

    def write(**values: Any) -> None:
        path.write_text(INPROC.format(**{"data": tmp_path / "data", "port": port, "api": api,
                                         "concurrency": 5, "timeout": 15, "max_rcpt": 100,
                                         **values}))

    write()
    svc = Service(load(path))
    await svc.start()
    try:
        scheduler, webhooks = svc.scheduler, svc.webhooks
        assert scheduler is not None and webhooks is not None
        write(concurrency=6, timeout=9, max_rcpt=2, port=free_port())
        with caplog.at_level(logging.WARNING, logger="relay.lifecycle.reload"):
            assert await reload(svc)
        assert svc.config.delivery.concurrency == 6
        assert svc.config.webhooks.timeout == 9
        assert svc.handlers[0].config.limits.max_recipients == 2  # SMTP policy: live
        assert svc.config.smtp.listeners[0].port == port  # where it listens: at restart
        assert ("reload: smtp.listeners[0].port changed; it takes effect when relay restarts"
                in caplog.messages)
        assert ("reload: [limits], [webhooks] changed: SMTP and delivery use it now, the HTTP "
                "API when relay restarts" in caplog.messages)
        assert svc.scheduler is not scheduler and svc.scheduler is not None
        assert svc.scheduler.running and not scheduler.running
        assert svc.webhooks is not webhooks
        assert scheduler.notify not in svc.submitter.on_queued
        assert webhooks.notify not in svc.submitter.on_queued
        assert all(check.ok for check in await svc.readiness())

        codes = await asyncio.to_thread(rcpt_codes, port, 3)
        assert codes == [250, 250, 452]  # the new max_recipients, on a new session

        path.write_text("[delivery]\nconcurrency = 0\n")
        with caplog.at_level(logging.ERROR, logger="relay.lifecycle.reload"):
            assert not await reload(svc)
        assert caplog.messages[-1].startswith(f"reload refused: {path}: delivery.concurrency:")
        assert svc.config.delivery.concurrency == 6
    finally:
        await svc.stop()


def rcpt_codes(port: int, count: int) -> list[int]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        client.ehlo("client.test")
        code, text = client.mail("app@sender.test")
        assert code == 250, text
        return [client.rcpt(f"r{i}@rcpt.test")[0] for i in range(count)]
