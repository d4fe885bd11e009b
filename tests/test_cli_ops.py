"""The operator's commands (issue 19) as a sysadmin runs them, against real relay processes:
--version, check-config, queue selection / summary / bounce, exit codes, and serve refusing
a corrupt DKIM key. Backup and restore are in test_cli_backup.py."""

from __future__ import annotations

import json
import sqlite3
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from relay import keys
from relay.feedback.reports import ReportMaker
from relay.service import Service
from relay.store.operator import Selector
from relay.submit import Submitter

from .conftest import free_port, run_relay
from .smtputil import connect, in_thread, send
from .test_cli import relay, setup

YEAR = time.gmtime().tm_year


def test_version_names_the_installed_package() -> None:
    result = run_relay("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"relay {version('relay')}"


# -- check-config --------------------------------------------------------------------------


def test_check_config_says_ok(tmp_path: Path) -> None:
    path, _, _ = setup(tmp_path)
    result = run_relay("--config", str(path), "check-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"config OK: {path}"


def test_check_config_names_each_problem(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad_cert = tmp_path / "cert.pem"
    bad_cert.write_text("-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n")
    bad_key = tmp_path / "key.pem"
    bad_key.write_text("not a key")
    path = tmp_path / "relay.toml"
    path.write_text(
        f"[server]\nhostname = 'relay.test'\ndata_dir = '{blocker / 'data'}'\n"
        f"[[smtp.listeners]]\nport = {free_port()}\ntls = 'starttls'\n"
        f"tls_cert = '{bad_cert}'\ntls_key = '{bad_key}'\n"
        f"[[smtp.listeners]]\nport = {free_port()}\nmode = 'submission'\ntls = 'none'\n")
    result = run_relay("--config", str(path), "check-config")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert any(f"{path}: smtp.listeners[0].tls_cert: cannot load" in ln for ln in lines), lines
    assert any(f"{path}: smtp.listeners[1].tls: a submission listener needs TLS" in ln
               for ln in lines), lines
    assert any(f"{path}: server.data_dir:" in ln and "not a directory" in ln
               for ln in lines), lines
    assert "config OK" not in result.stdout


def test_check_config_reports_a_config_error_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("[server]\nhostname = 'relay.test'\nnonsense_key = 1\n")
    result = run_relay("--config", str(path), "check-config")
    assert result.returncode == 2
    assert str(path) in result.stderr and "nonsense_key" in result.stderr


def test_check_config_warns_of_a_busy_port_but_passes(tmp_path: Path,
                                                      relay_process: Any) -> None:
    path, port, toml = setup(tmp_path)
    relay_process(toml, port)
    result = run_relay("--config", str(path), "check-config")
    assert result.returncode == 0, result.stderr
    assert f"warning: smtp.listeners[0]: 127.0.0.1:{port} is not free" in result.stderr


def corrupt_dkim_key(path: Path, domain: str) -> Path:
    relay(path, "domains", "add", domain)
    key = tmp_key(path, domain)
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    return key


def tmp_key(path: Path, domain: str) -> Path:
    return path.parent / "data" / "dkim" / domain / f"r{YEAR}a.pem"


def test_check_config_and_serve_refuse_a_corrupt_dkim_key(tmp_path: Path) -> None:
    path, _, _ = setup(tmp_path)
    relay(path, "domains", "add", "good.test")
    assert run_relay("--config", str(path), "check-config").returncode == 0
    key = corrupt_dkim_key(path, "example.test")
    checked = run_relay("--config", str(path), "check-config")
    assert checked.returncode == 2
    assert f"{key}: DKIM key r{YEAR}a of example.test: not a readable" in checked.stderr
    assert "good.test" not in checked.stderr
    served = run_relay("--config", str(path), "serve", timeout=30)
    assert served.returncode == 2
    assert f"{key}: DKIM key r{YEAR}a of example.test" in served.stderr
    assert "Traceback" not in served.stderr
    key.unlink()  # a missing file is named too
    served = run_relay("--config", str(path), "serve", timeout=30)
    assert served.returncode == 2 and "cannot read the key file" in served.stderr


# -- queue: selectors, summary, bounce ---------------------------------------------------


def queue(path: Path, *args: str) -> Any:
    return relay(path, "queue", *args)


def listed(path: Path, *args: str) -> set[str]:
    return {m["id"] for m in json.loads(queue(path, "list", "--json", *args).stdout)}


def age_messages(path: Path, ages: dict[str, float]) -> None:
    """Make messages as old as given (seconds), as if they had waited in the queue."""
    db = sqlite3.connect(path.parent / "data" / "relay.sqlite", timeout=30)
    with db:
        db.executemany("UPDATE messages SET created_at = ? WHERE id = ?",
                       [(time.time() - age, mid) for mid, age in ages.items()])
    db.close()


@pytest.fixture
def queued(tmp_path: Path, relay_process: Any) -> tuple[Path, dict[str, str]]:
    """A running relay (delivery paused) with three messages of known ages:
    m1 3 minutes (alice -> bob@a.test, carol@b.test), m2 30 minutes (dave@other.test ->
    erin@a.test), m3 25 hours (alice -> frank@a.test)."""
    path, port, toml = setup(tmp_path)
    key = json.loads(relay(path, "keys", "create", "--name", "t", "--json").stdout)["key"]
    relay_process(toml, port)
    ids = {}
    for name, sender, rcpts in (("m1", "alice@example.com", ("bob@a.test", "carol@b.test")),
                                ("m2", "dave@other.test", ("erin@a.test",)),
                                ("m3", "alice@example.com", ("frank@a.test",))):
        code, text = send(port, key, sender=sender, rcpts=rcpts)
        assert code == 250, text
        ids[name] = text.decode().split()[-1]
    age_messages(path, {ids["m1"]: 180, ids["m2"]: 1800, ids["m3"]: 25 * 3600})
    return path, ids


def test_queue_list_selectors_combine(queued: tuple[Path, dict[str, str]]) -> None:
    path, ids = queued
    m1, m2, m3 = ids["m1"], ids["m2"], ids["m3"]
    assert listed(path) == {m1, m2, m3}
    assert listed(path, "--domain", "a.test") == {m1, m2, m3}
    assert listed(path, "--domain", "B.test") == {m1}
    assert listed(path, "--sender", "alice@example.com") == {m1, m3}
    assert listed(path, "--sender", "other.test") == {m2}
    assert listed(path, "--older-than", "1h") == {m3}
    assert listed(path, "--newer-than", "10m") == {m1}
    assert listed(path, "--domain", "a.test", "--older-than", "10m") == {m2, m3}
    assert listed(path, "--domain", "a.test", "--older-than", "10m",
                  "--sender", "example.com") == {m3}
    assert listed(path, "--status", "delivered") == set()
    assert listed(path, "--domain", "nowhere.test") == set()
    newest = json.loads(queue(path, "list", "--json", "--limit", "1").stdout)
    assert [m["id"] for m in newest] == [m1]
    table = queue(path, "list", "--domain", "b.test").stdout
    assert m1 in table and "carol@b.test" in table and m2 not in table


def test_queue_summary_is_qshape(queued: tuple[Path, dict[str, str]]) -> None:
    path, _ = queued
    shape = json.loads(queue(path, "summary", "--json").stdout)
    assert shape["columns"] == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280",
                                "1280+"]
    rows = {r["name"]: r["counts"] for r in shape["rows"]}
    assert rows == {"a.test": [3, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1],
                    "b.test": [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]}
    assert shape["total"] == [4, 2, 0, 0, 1, 0, 0, 0, 0, 0, 1]
    assert [r["name"] for r in shape["rows"]] == ["a.test", "b.test"]  # largest first
    senders = json.loads(queue(path, "summary", "--by", "sender", "--json").stdout)
    assert {r["name"]: r["counts"][0] for r in senders["rows"]} == {"example.com": 3,
                                                                    "other.test": 1}
    text = queue(path, "summary").stdout.splitlines()
    assert text[0].split() == shape["columns"]
    assert text[1].split() == ["TOTAL", "4", "2", "0", "0", "1", "0", "0", "0", "0", "0", "1"]
    assert text[2].split()[0] == "a.test"
    queue(path, "hold", "--domain", "b.test")
    held = json.loads(queue(path, "summary", "--status", "held", "--json").stdout)
    assert {r["name"]: r["counts"][0] for r in held["rows"]} == {"b.test": 1}


def rcpt_statuses(path: Path, mid: str) -> dict[str, str]:
    shown = json.loads(queue(path, "show", mid, "--json").stdout)
    return {r["email"]: r["status"] for r in shown["recipients"]}


def test_queue_actions_take_selectors(queued: tuple[Path, dict[str, str]]) -> None:
    path, ids = queued
    m1, m2, m3 = ids["m1"], ids["m2"], ids["m3"]
    out = queue(path, "hold", "--domain", "a.test", "--older-than", "10m").stdout
    assert out.strip() == "hold: 2 recipient(s)"
    assert rcpt_statuses(path, m1) == {"bob@a.test": "queued", "carol@b.test": "queued"}
    assert rcpt_statuses(path, m2) == {"erin@a.test": "held"}
    assert rcpt_statuses(path, m3) == {"frank@a.test": "held"}
    assert "release: 1 recipient(s)" in queue(path, "release", "--sender", "other.test").stdout
    assert rcpt_statuses(path, m2) == {"erin@a.test": "queued"}
    assert "delete: 1 recipient(s)" in queue(path, "delete", "--older-than", "1d").stdout
    assert rcpt_statuses(path, m3) == {"frank@a.test": "cancelled"}
    assert "3 recipient(s) due now" in queue(path, "retry", "--all").stdout
    assert "1 recipient(s) due now" in queue(path, "retry", "--domain", "b.test").stdout
    nothing = queue(path, "hold", "--domain", "nowhere.test")  # matched nothing: still ok
    assert nothing.stdout.strip() == "hold: 0 recipient(s)"


def test_queue_bounce_gives_up_with_a_dsn(queued: tuple[Path, dict[str, str]]) -> None:
    path, ids = queued
    m1 = ids["m1"]
    out = queue(path, "bounce", m1).stdout
    assert out.strip() == f"bounce: 2 recipient(s) of {m1}; 1 bounce report(s) queued"
    shown = json.loads(queue(path, "show", m1, "--json").stdout)
    assert shown["status"] == "bounced"
    bounced = [e for e in shown["events"] if e["type"] == "email.bounced"]
    assert len(bounced) == 2
    assert all(e["data"]["by"].startswith("cli:") and e["data"]["class"] == "soft"
               for e in bounced)
    # the report: from <>, to the sender, a multipart/report naming both recipients
    reports = json.loads(queue(path, "list", "--json", "--domain", "example.com").stdout)
    assert len(reports) == 1
    report = reports[0]
    assert report["from"] in ("", "<>", None)
    body = (path.parent / "data" / "relay.sqlite")
    db = sqlite3.connect(body, timeout=30)
    data = db.execute("SELECT data FROM bodies WHERE message_id = ?", (report["id"],)).fetchone()
    db.close()
    assert b"multipart/report" in data[0] and b"report-type=delivery-status" in data[0]
    assert b"Final-Recipient: rfc822; bob@a.test" in data[0]
    assert b"Final-Recipient: rfc822; carol@b.test" in data[0]
    assert b"Action: failed" in data[0]
    again = queue(path, "bounce", m1)  # nothing left to bounce, no second report
    assert again.stdout.strip() == f"bounce: 0 recipient(s) of {m1}"
    by_domain = queue(path, "bounce", "--domain", "a.test", "--older-than", "1d").stdout
    assert by_domain.strip() == "bounce: 1 recipient(s); 1 bounce report(s) queued"
    assert rcpt_statuses(path, ids["m3"]) == {"frank@a.test": "bounced"}


# -- exit codes ----------------------------------------------------------------------------


UNKNOWN = [
    ("queue", "show", "msg_nope"), ("queue", "hold", "msg_nope"),
    ("queue", "release", "msg_nope"), ("queue", "delete", "msg_nope"),
    ("queue", "retry", "msg_nope"), ("queue", "bounce", "msg_nope"),
    ("keys", "revoke", "key_nope"), ("domains", "show", "nope.test"),
    ("domains", "remove", "nope.test"), ("domains", "rotate", "nope.test"),
    ("webhooks", "enable", "wh_nope"), ("webhooks", "delete", "wh_nope"),
    ("templates", "show", "tpl_nope"), ("templates", "remove", "tpl_nope"),
    ("contacts", "show", "nobody@nope.test"), ("contacts", "remove", "nobody@nope.test"),
    ("suppressions", "remove", "nobody@nope.test"),
]


def test_unknown_ids_exit_1_with_a_message_and_usage_errors_exit_2(tmp_path: Path) -> None:
    path, _, _ = setup(tmp_path)
    relay(path, "queue", "list")  # the data dir and database exist
    for args in UNKNOWN:
        result = run_relay("--config", str(path), *args)
        assert result.returncode == 1, (args, result.returncode, result.stderr)
        assert result.stderr.startswith("relay: ") and "Traceback" not in result.stderr, args
    for args in (("queue", "hold"), ("queue", "list", "--older-than", "soon"),
                 ("queue", "hold", "--all", "--domain", "a.test"),
                 ("queue", "list", "--limit", "0"), ("queue", "summary", "--by", "size"),
                 ("queue", "frobnicate")):
        result = run_relay("--config", str(path), *args)
        assert result.returncode == 2, (args, result.returncode, result.stderr)
        assert result.stderr and "Traceback" not in result.stderr, args


# -- the store's side: NOTIFY honoured, only the selected recipients --------------------------


async def test_bounce_reports_only_where_notify_asks(service: Service) -> None:
    _, key = await keys.create_key(service.store, name="t", scopes=["emails:send"])

    def go() -> str:
        with connect(service.bound[0][1], key=key) as s:
            s.mail("alice@example.com")
            s.rcpt("quiet@a.test", ["NOTIFY=NEVER"])
            s.rcpt("loud@a.test", ["NOTIFY=FAILURE"])
            s.rcpt("default@a.test")
            s.rcpt("other@b.test")
            code, text = s.data(b"From: alice@example.com\r\nSubject: x\r\n\r\nx\r\n")
            assert code == 250, text
            return text.decode().split()[-1]

    mid = await in_thread(go)
    acted = await service.store.act(Selector(message_id=mid, domain="a.test"), "bounce",
                                    "cli:test", time.time())
    assert (acted.count, acted.message_ids) == (3, (mid,))
    maker = ReportMaker(Submitter(service.config, service.store), "relay.test")
    report_id = await service.store.emit_report(mid, maker.make)
    assert report_id is not None
    report = await service.store.get_body(report_id)
    assert report is not None
    assert b"loud@a.test" in report and b"default@a.test" in report
    assert b"quiet@a.test" not in report and b"other@b.test" not in report
    detail = await service.store.get_message(mid)
    assert detail is not None
    assert {r.address: r.status.value for r in detail.recipients} == {
        "quiet@a.test": "bounced", "loud@a.test": "bounced", "default@a.test": "bounced",
        "other@b.test": "queued"}
