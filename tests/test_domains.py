"""`relay domains …` against a real data dir and a DNS server on loopback."""

from __future__ import annotations

import json
import re
import sqlite3
import stat
import time
from pathlib import Path

from relay.store import SQLiteStore
from relay.store.schema import MIGRATIONS

from .conftest import run_relay
from .dnsserver import DNSServer
from .smtputil import in_thread

RECORD = re.compile(r"^(\S+)\. \d+ IN (TXT|MX) (.*)$")


def toml(tmp_path: Path, nameserver: str = "127.0.0.1:9") -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(f"[server]\nhostname = 'relay.test'\ndata_dir = '{tmp_path / 'data'}'\n"
                    f"[dns]\nnameservers = ['{nameserver}']\ntimeout = 2.0\n")
    return path


def relay(path: Path, *args: str, code: int = 0) -> str:
    result = run_relay("--config", str(path), *args)
    assert result.returncode == code, (result.stdout, result.stderr)
    return result.stdout + result.stderr


def failing(path: Path, *args: str) -> str:
    return relay(path, *args, code=1)


def printed_records(output: str) -> list[tuple[str, str, str]]:
    """(name, type, rdata) of each zone line `relay domains add` printed; a TXT in
    parentheses spans lines."""
    flat = re.sub(r"\(\s*(.*?)\s*\)", lambda m: " ".join(m.group(1).split()), output,
                  flags=re.DOTALL)
    return [(m[1], m[2], m[3].strip()) for line in flat.splitlines()
            if (m := RECORD.match(line))]


def publish(dns: DNSServer, records: list[tuple[str, str, str]]) -> None:
    for name, rdtype, rdata in records:
        dns.add(name, rdtype, rdata)


def test_add_prints_every_record_and_writes_private_keys(tmp_path: Path) -> None:
    path = toml(tmp_path)
    out = relay(path, "domains", "add", "Example.TEST")
    year = time.gmtime().tm_year
    records = printed_records(out)
    by_name = {(n, t): v for n, t, v in records}
    rsa = by_name[(f"r{year}a._domainkey.example.test", "TXT")]
    ed = by_name[(f"e{year}a._domainkey.example.test", "TXT")]
    strings = re.findall(r'"([^"]*)"', rsa)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)  # a long p= is split
    assert "".join(strings).startswith("v=DKIM1; k=rsa; p=MII")
    assert re.fullmatch(r'"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}="', ed)
    assert by_name[("bounces.example.test", "TXT")] == '"v=spf1 a:relay.test ~all"'
    assert by_name[("bounces.example.test", "MX")] == "10 relay.test."
    assert by_name[("_dmarc.example.test", "TXT")] == (
        '"v=DMARC1; p=none; rua=mailto:dmarc-reports@example.test"')
    keys = sorted((tmp_path / "data" / "dkim" / "example.test").iterdir())
    assert [k.name for k in keys] == [f"e{year}a.pem", f"r{year}a.pem"]
    for k in keys:
        assert stat.S_IMODE(k.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys[0].parent.stat().st_mode) == 0o700
    assert "PRIVATE KEY" not in out


def test_add_existing_domain_refuses_without_force(tmp_path: Path) -> None:
    path = toml(tmp_path)
    first = printed_records(relay(path, "domains", "add", "example.test"))
    again = relay(path, "domains", "add", "example.test", code=1)
    assert "example.test exists" in again and "--force" in again
    assert printed_records(relay(path, "domains", "show", "example.test")) == first
    forced = printed_records(relay(path, "domains", "add", "example.test", "--force"))
    dkim_first = {v for _, t, v in first if "DKIM1" in v}
    dkim_forced = {v for _, t, v in forced if "DKIM1" in v}
    assert not dkim_first & dkim_forced  # new keys
    files = sorted(p.name for p in (tmp_path / "data" / "dkim" / "example.test").iterdir())
    year = time.gmtime().tm_year
    assert files == [f"e{year}b.pem", f"r{year}b.pem"]  # the replaced keys are gone


def test_list_show_remove(tmp_path: Path) -> None:
    path = toml(tmp_path)
    relay(path, "domains", "add", "a.test")
    relay(path, "domains", "add", "b.test")
    listed = json.loads(relay(path, "domains", "list", "--json"))
    assert [d["name"] for d in listed] == ["a.test", "b.test"]
    assert {k["state"] for k in listed[0]["keys"]} == {"active"}
    shown = json.loads(relay(path, "domains", "show", "a.test", "--json"))
    assert {r["type"] for r in shown["records"]} == {"TXT", "MX"}
    assert "PRIVATE" not in json.dumps(shown)
    relay(path, "domains", "remove", "a.test")
    assert not (tmp_path / "data" / "dkim" / "a.test").exists()
    assert [d["name"] for d in json.loads(relay(path, "domains", "list", "--json"))] == [
        "b.test"]
    assert "no domain a.test" in relay(path, "domains", "show", "a.test", code=1)
    assert "not a valid domain" in relay(path, "domains", "add", "not_a domain", code=1)


async def test_verify_names_each_missing_or_wrong_record(tmp_path: Path, dns: DNSServer) -> None:
    path = toml(tmp_path, dns.nameserver)
    records = printed_records(await in_thread(relay, path, "domains", "add", "example.test"))
    year = time.gmtime().tm_year
    # everything but the RSA key; the DMARC record doubled; no reverse DNS
    publish(dns, [r for r in records if not r[0].startswith(f"r{year}a.")])
    dns.add("_dmarc.example.test", "TXT", '"v=DMARC1; p=reject"')
    out = await in_thread(failing, path, "domains", "verify", "example.test")
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == 3, out
    assert f"TXT r{year}a._domainkey.example.test" in problems[0]
    assert "missing" in problems[0] and "does not exist" in problems[0]
    assert "_dmarc.example.test" in problems[1] and "2 v=DMARC1 records" in problems[1]
    assert "reverse DNS of relay.test" in problems[2] and "no A or AAAA" in problems[2]
    assert f"publish: r{year}a._domainkey.example.test. 3600 IN TXT (" in out
    assert f"ok       TXT e{year}a._domainkey.example.test" in out


async def test_verify_all_good_with_forward_confirmed_reverse_dns(tmp_path: Path,
                                                                  dns: DNSServer) -> None:
    path = toml(tmp_path, dns.nameserver)
    publish(dns, printed_records(await in_thread(relay, path, "domains", "add", "example.test")))
    dns.add("relay.test", "A", "192.0.2.7")
    dns.add("7.2.0.192.in-addr.arpa", "PTR", "elsewhere.test.")
    out = await in_thread(failing, path, "domains", "verify", "example.test")
    assert "192.0.2.7 points back to elsewhere.test., not relay.test" in out
    dns.clear()
    publish(dns, printed_records(await in_thread(relay, path, "domains", "show",
                                                 "example.test")))
    dns.add("relay.test", "A", "192.0.2.7")
    dns.add("7.2.0.192.in-addr.arpa", "PTR", "relay.test.")
    out = await in_thread(relay, path, "domains", "verify", "example.test")
    assert "example.test: all records are in place" in out
    assert "PROBLEM" not in out


async def test_rotate_publishes_first_then_switches_and_keeps_the_old_record(
        tmp_path: Path, dns: DNSServer) -> None:
    path = toml(tmp_path, dns.nameserver)
    publish(dns, printed_records(await in_thread(relay, path, "domains", "add", "example.test")))
    year = time.gmtime().tm_year
    out = await in_thread(relay, path, "domains", "rotate", "example.test")
    new = printed_records(out)
    assert [n for n, _, _ in new] == [f"r{year}b._domainkey.example.test",
                                      f"e{year}b._domainkey.example.test"]
    shown = json.loads(await in_thread(relay, path, "domains", "show", "example.test", "--json"))
    assert {k["selector"]: k["state"] for k in shown["keys"]} == {
        f"r{year}a": "active", f"e{year}a": "active",
        f"r{year}b": "pending", f"e{year}b": "pending"}
    refused = await in_thread(failing, path, "domains", "rotate", "example.test", "--activate")
    assert "not switched" in refused and f"r{year}b._domainkey" in refused
    publish(dns, new)
    done = await in_thread(relay, path, "domains", "rotate", "example.test", "--activate")
    assert "Keep the old records published until" in done
    shown = json.loads(await in_thread(relay, path, "domains", "show", "example.test", "--json"))
    states = {k["selector"]: k for k in shown["keys"]}
    assert states[f"r{year}b"]["state"] == "active"
    assert states[f"r{year}a"]["state"] == "retiring"
    kept = time.mktime(time.strptime(states[f"r{year}a"]["retireAfter"], "%Y-%m-%dT%H:%M:%SZ"))
    assert kept - time.mktime(time.gmtime()) >= 7 * 86400 - 120
    # the retiring records are still printed, to stay published
    assert f"r{year}a._domainkey.example.test" in [r["name"] for r in shown["records"]]


def test_each_domain_has_an_id_that_add_force_and_rotate_keep(tmp_path: Path) -> None:
    """The id PiiSend's domain_id may name: printed by add, list and show, and the same
    after its keys are replaced or rotated."""
    path = toml(tmp_path)
    added = relay(path, "domains", "add", "a.test")
    relay(path, "domains", "add", "b.test")
    listed = {d["name"]: d["id"] for d in json.loads(relay(path, "domains", "list", "--json"))}
    assert all(re.fullmatch(r"dom_[0-9a-f]{16}", i) for i in listed.values())
    assert listed["a.test"] != listed["b.test"]
    assert f"(id {listed['a.test']})" in added
    assert listed["a.test"] in relay(path, "domains", "list")
    assert listed["a.test"] in relay(path, "domains", "show", "a.test")
    relay(path, "domains", "add", "a.test", "--force")
    relay(path, "domains", "rotate", "a.test")
    shown = json.loads(relay(path, "domains", "show", "a.test", "--json"))
    assert shown["id"] == listed["a.test"]


async def test_domains_of_an_older_store_get_ids(tmp_path: Path) -> None:
    """Migration 20 gives the domains that existed each its own id."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for i, step in enumerate(MIGRATIONS[:19]):
        db.executescript("BEGIN;" + step + ("DELETE FROM schema_version;" if i else "")
                         + f"INSERT INTO schema_version VALUES ({i + 1}); COMMIT;")
    for name in ("a.test", "b.test"):
        db.execute("INSERT INTO domains (name, created_at, return_path) VALUES (?, ?, ?)",
                   (name, time.time(), f"bounces.{name}"))
    db.close()
    store = SQLiteStore(path)
    await store.open()
    try:
        found = await store.list_domains()
        assert [d.name for d in found] == ["a.test", "b.test"]
        assert all(re.fullmatch(r"dom_[0-9a-f]{16}", d.id) for d in found)
        assert found[0].id != found[1].id
        again = await store.domain_by_id(found[1].id)
        assert again is not None and again.name == "b.test"
        assert await store.domain_by_id("dom_0000000000000000") is None
    finally:
        await store.close()
