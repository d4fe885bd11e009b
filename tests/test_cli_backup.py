"""`relay backup` of a running relay that accepts mail meanwhile, and `relay restore` into a
fresh data dir: the restored relay delivers the queued mail to a real SMTP sink, signed with
the same DKIM key. Restore refuses a running relay, a non-empty data dir and a changed file."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import stat
import threading
from pathlib import Path

import dkim as dkimpy

from .conftest import RelayProcess, free_port, run_relay
from .sink import Sink
from .smtputil import send
from .test_cli import relay

MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: bob@dest.test\r\nSubject: kept\r\n\r\n"
           b"Queued before the backup.\r\n")


def write_config(root: Path, port: int, delivery: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "relay.toml"
    path.write_text(f"[server]\nhostname = 'relay.test'\ndata_dir = '{root / 'data'}'\n"
                    f"[[smtp.listeners]]\nport = {port}\n[api]\nport = {free_port()}\n"
                    f"[delivery]\n{delivery}\n")
    return path


def dkim_dns(path: Path, domain: str) -> dict[str, str]:
    shown = json.loads(relay(path, "domains", "show", domain, "--json").stdout)
    return {r["name"]: r["value"] for r in shown["records"] if "._domainkey." in r["name"]}


class Sender(threading.Thread):
    """Sends mail to a relay until stopped: the backup runs while relay writes."""

    def __init__(self, port: int, key: str) -> None:
        super().__init__(daemon=True)
        self.port, self.key = port, key
        self.ids: list[str] = []
        self.stop = threading.Event()
        self.started_some = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and len(self.ids) < 500:
            code, text = send(self.port, self.key, data=MESSAGE, sender="alice@example.test",
                              rcpts=("bob@dest.test",))
            assert code == 250, text
            self.ids.append(text.decode().split()[-1])
            if len(self.ids) >= 5:
                self.started_some.set()


async def test_backup_of_a_running_relay_restores_and_delivers_signed(tmp_path: Path) -> None:
    port_a = free_port()
    path_a = write_config(tmp_path / "a", port_a, "paused = true")
    key = json.loads(relay(path_a, "keys", "create", "--name", "t", "--json").stdout)["key"]
    relay(path_a, "domains", "add", "example.test")
    records = dkim_dns(path_a, "example.test")
    relay_a = RelayProcess(path_a, port_a, tmp_path / "a")
    await asyncio.to_thread(relay_a.start)
    backup_dir = tmp_path / "backup"
    try:
        sender = Sender(port_a, key)
        sender.start()
        assert await asyncio.to_thread(sender.started_some.wait, 60)
        before = list(sender.ids)  # committed before the backup began: it must hold them
        made = await asyncio.to_thread(run_relay, "--config", str(path_a), "backup",
                                       str(backup_dir))
        sender.stop.set()
        await asyncio.to_thread(sender.join, 60)
        assert made.returncode == 0, made.stderr
        assert "backed up" in made.stdout
        refused = run_relay("--config", str(path_a), "restore", str(backup_dir), "--force")
        assert refused.returncode == 1 and "in use by relay" in refused.stderr
    finally:
        await asyncio.to_thread(relay_a.stop)

    manifest = json.loads((backup_dir / "manifest.json").read_text())
    assert manifest["schema"] >= 1 and manifest["relay"] and manifest["created"]
    files = {f["path"]: f for f in manifest["files"]}
    for name in ("data/relay.sqlite", "data/token.key", "data/tls-cert.pem", "data/tls-key.pem",
                 "config/relay.toml"):
        assert name in files, sorted(files)
    dkim_files = [n for n in files if n.startswith("data/dkim/example.test/")]
    assert len(dkim_files) == 2
    for name in [*dkim_files, "data/token.key", "data/tls-key.pem"]:
        assert files[name]["mode"] == "0600"
        assert stat.S_IMODE((backup_dir / name).stat().st_mode) == 0o600
    assert not any(n.endswith(("relay.lock", "-wal", "-shm")) for n in files)
    db = sqlite3.connect(backup_dir / "data" / "relay.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    in_backup = {r[0] for r in db.execute("SELECT id FROM messages")}
    db.close()
    assert set(before) <= in_backup
    assert in_backup <= set(sender.ids)

    # a changed file is refused; so is a data dir that is not empty
    tampered = tmp_path / "tampered"
    shutil.copytree(backup_dir, tampered)
    token = tampered / "data" / "token.key"
    token.write_bytes(bytes(b ^ 1 for b in token.read_bytes()))
    port_b = free_port()
    path_b = write_config(tmp_path / "b", port_b, "")
    bad = run_relay("--config", str(path_b), "restore", str(tampered))
    assert bad.returncode == 1 and "data/token.key does not match its sha256" in bad.stderr
    assert not (tmp_path / "b" / "data" / "relay.sqlite").exists()

    # the original is gone: the restored relay must need nothing of it
    shutil.rmtree(tmp_path / "a" / "data")
    async with Sink() as sink:
        path_b.write_text(path_b.read_text().replace(
            "[delivery]\n", f"[delivery]\nsmarthost = '127.0.0.1:{sink.port}'\n"
                            "smarthost_tls = 'none'\nretry_min = 0.2\nretry_max = 0.5\n"))
        restored = run_relay("--config", str(path_b), "restore", str(backup_dir))
        assert restored.returncode == 0, restored.stderr
        assert "2 DKIM key path(s) now under it" in restored.stdout
        again = run_relay("--config", str(path_b), "restore", str(backup_dir))
        assert again.returncode == 1 and "is not empty" in again.stderr
        checked = run_relay("--config", str(path_b), "check-config")
        assert checked.returncode == 0, checked.stderr
        key_file = next((tmp_path / "b" / "data" / "dkim" / "example.test").iterdir())
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

        relay_b = RelayProcess(path_b, port_b, tmp_path / "b")
        await asyncio.to_thread(relay_b.start)
        try:
            await sink.wait_for(lambda s: len(s.messages) >= len(in_backup), timeout=120)
        finally:
            await asyncio.to_thread(relay_b.stop)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records[name.decode().rstrip(".")].encode()

    assert len(sink.messages) == len(in_backup)
    for received in sink.messages[:5]:
        assert b"Queued before the backup." in received.data
        verifier = dkimpy.DKIM(received.data)
        count = sum(1 for h in verifier.headers if h[0].lower() == b"dkim-signature")
        assert count >= 1
        assert all(verifier.verify(idx=i, dnsfunc=dnsfunc) for i in range(count))


def test_restore_refuses_what_is_not_a_backup(tmp_path: Path) -> None:
    port = free_port()
    path = write_config(tmp_path / "r", port, "paused = true")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_relay("--config", str(path), "restore", str(empty))
    assert result.returncode == 1 and "no readable manifest.json" in result.stderr
    (empty / "manifest.json").write_text("{\"format\": 1, \"schema\": 1, \"files\": "
                                         "[{\"path\": \"../../etc/passwd\"}]}")
    result = run_relay("--config", str(path), "restore", str(empty))
    assert result.returncode == 1 and "outside the backup" in result.stderr
    relay(path, "queue", "list")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    result = run_relay("--config", str(path), "backup", str(full))
    assert result.returncode == 1 and "not an empty directory" in result.stderr
