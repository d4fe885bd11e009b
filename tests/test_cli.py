"""The `relay` command against a real data dir and a running relay process."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from .conftest import free_port, run_relay
from .smtputil import send


def setup(tmp_path: Path) -> tuple[Path, int, str]:
    port = free_port()
    path = tmp_path / "relay.toml"
    path.write_text(f"[server]\nhostname = 'relay.test'\ndata_dir = '{tmp_path / 'data'}'\n"
                    f"[[smtp.listeners]]\nport = {port}\n[delivery]\npaused = true\n")
    return path, port, path.read_text()


def relay(path: Path, *args: str) -> Any:
    result = run_relay("--config", str(path), *args)
    assert result.returncode == 0, result.stderr
    return result


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    path, _, _ = setup(tmp_path)
    made = json.loads(relay(path, "keys", "create", "--name", "app", "--scope", "emails:send",
                            "--scope", "emails:read", "--domain", "example.com", "--json").stdout)
    assert set(made) >= {"id", "key", "scopes"}
    assert made["key"].startswith(made["id"] + "_") and len(made["key"]) > 40
    assert made["scopes"] == ["emails:send", "emails:read"]
    listed = json.loads(relay(path, "keys", "list", "--json").stdout)
    assert [(k["id"], k["revoked"], k["domains"]) for k in listed] == [
        (made["id"], False, ["example.com"])]
    assert made["key"] not in relay(path, "keys", "list").stdout  # the secret is shown once
    relay(path, "keys", "revoke", made["id"])
    assert json.loads(relay(path, "keys", "list", "--json").stdout)[0]["revoked"] is True
    again = run_relay("--config", str(path), "keys", "revoke", made["id"])
    assert again.returncode == 1 and "no active key" in again.stderr


def test_key_with_unknown_scope_is_refused(tmp_path: Path) -> None:
    path, _, _ = setup(tmp_path)
    result = run_relay("--config", str(path), "keys", "create", "--name", "x", "--scope", "root")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_sent_message_is_listed_by_queue_list(tmp_path: Path, relay_process: Any) -> None:
    path, port, toml = setup(tmp_path)
    key = json.loads(relay(path, "keys", "create", "--name", "t", "--json").stdout)["key"]
    relay_process(toml, port)
    code, text = send(port, key, rcpts=("bob@example.org", "carol@example.net"))
    assert code == 250, text
    message_id = text.decode().split()[-1]
    listed = json.loads(relay(path, "queue", "list", "--json").stdout)
    assert [m["id"] for m in listed] == [message_id]
    assert [(r["email"], r["status"]) for r in listed[0]["recipients"]] == [
        ("bob@example.org", "queued"), ("carol@example.net", "queued")]
    table = relay(path, "queue", "list").stdout
    assert message_id in table and "carol@example.net" in table
    shown = json.loads(relay(path, "queue", "show", message_id, "--json").stdout)
    assert shown["subject"] == "hello"
    assert [e["type"] for e in shown["events"]] == ["email.queued", "email.queued"]
    assert "email.queued" in relay(path, "queue", "show", message_id).stdout
    missing = run_relay("--config", str(path), "queue", "show", "msg_nope")
    assert missing.returncode == 1 and "no message" in missing.stderr


def test_send_goes_through_the_running_relay(tmp_path: Path, relay_process: Any) -> None:
    path, port, toml = setup(tmp_path)
    relay_process(toml, port)
    out = relay(path, "send", "--to", "someone@example.org").stdout
    assert "sent to someone@example.org" in out
    listed = json.loads(relay(path, "queue", "list", "--json").stdout)
    assert listed[0]["recipients"][0]["email"] == "someone@example.org"
    assert listed[0]["subject"] == "Test message from relay"
    # the one-off key it used is revoked again
    one_off = [k for k in json.loads(relay(path, "keys", "list", "--json").stdout)
               if k["name"] == "relay send (one-off)"]
    assert len(one_off) == 1 and one_off[0]["revoked"]


def test_init_writes_config_data_dir_cert_and_a_key(tmp_path: Path) -> None:
    target = tmp_path / "etc" / "relay.toml"
    result = run_relay("init", "--write-config", str(target), cwd=tmp_path,
                       env={"RELAY_SERVER_DATA_DIR": str(tmp_path / "d")})
    assert result.returncode == 0, result.stderr
    assert target.read_text().startswith("# relay configuration")
    assert "API key rk_" in result.stdout
    key_file = tmp_path / "d" / "tls-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert (tmp_path / "d" / "relay.sqlite").exists()
    again = run_relay("init", "--write-config", str(target), cwd=tmp_path,
                      env={"RELAY_SERVER_DATA_DIR": str(tmp_path / "d")})
    assert "not overwritten" in again.stderr


def test_commands_work_on_the_embedded_defaults(tmp_path: Path) -> None:
    result = run_relay("queue", "list", "--json", cwd=tmp_path)
    assert result.returncode == 0 and json.loads(result.stdout) == []
    assert (tmp_path / "relay-data" / "relay.sqlite").exists()


def test_queue_hold_release_delete_and_retry(tmp_path: Path, relay_process: Any) -> None:
    path, port, toml = setup(tmp_path)
    key = json.loads(relay(path, "keys", "create", "--name", "t", "--json").stdout)["key"]
    relay_process(toml, port)
    code, text = send(port, key, rcpts=("bob@example.org",))
    assert code == 250
    mid = text.decode().split()[-1]

    def status() -> str:
        return str(json.loads(relay(path, "queue", "show", mid, "--json").stdout)
                   ["recipients"][0]["status"])

    assert "hold: 1 recipient" in relay(path, "queue", "hold", mid).stdout
    assert status() == "held"
    assert "release: 1 recipient" in relay(path, "queue", "release", mid).stdout
    assert status() == "queued"
    assert "1 recipient(s) due now" in relay(path, "queue", "retry", "--all").stdout
    assert "delete: 1 recipient" in relay(path, "queue", "delete", mid).stdout
    shown = json.loads(relay(path, "queue", "show", mid, "--json").stdout)
    assert shown["status"] == "cancelled"
    events = [(e["type"], e["data"].get("by", "")) for e in shown["events"]]
    assert [t for t, _ in events] == ["email.queued", "email.held", "email.released",
                                      "email.cancelled"]
    assert events[-1][1].startswith("cli:")  # who deleted it
    missing = run_relay("--config", str(path), "queue", "hold", "msg_nope")
    assert missing.returncode == 1 and "no message" in missing.stderr


def test_the_cli_starts_without_what_only_some_commands_need() -> None:
    """`relay queue list` on a million queued took 1.2-1.6 s, nearly all of it the CLI's
    start-up importing every command's libraries (the API's pydantic models for `webhooks`'
    event names, the bounce parser, the DNS library, cryptography's x509, smtplib); each is
    now imported by the command that uses it (queue_scale.py: under 1 s)."""
    import subprocess
    import sys

    heavy = ("relay.api.schemas", "pydantic", "relay.feedback.bounces", "dns.resolver",
             "relay.domaincheck", "cryptography.x509", "smtplib", "aiohttp", "aiosmtpd")
    code = ("import sys, relay.cli.main; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "", loaded


def test_webhook_event_names_of_the_cli_are_the_apis() -> None:
    from relay.api.schemas import EVENT_TYPES
    from relay.cli.webhooks import EVENTS

    assert EVENTS == EVENT_TYPES.__args__  # type: ignore[attr-defined]
