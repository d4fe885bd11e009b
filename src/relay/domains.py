"""Sending domains: their DKIM keys (made, stored 0600, rotated) and a check of what DNS
actually says about the records they need (dnsrecords.py works those out)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from .config import Config
from .delivery import dkim
from .delivery.mx import make_resolver
from .dnsrecords import (  # noqa: F401  (dkim_records, records, split_txt: the CLI's)
    DnsRecord,
    dkim_records,
    records,
    return_path_host,
    split_txt,
)
from .types import DkimKeyInfo, Domain


class DomainError(Exception):
    """An operation on a domain that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Check:
    record: DnsRecord | None  # None: a check that is no record (reverse DNS)
    what: str
    ok: bool
    detail: str


def key_dir(config: Config, domain: str) -> Path:
    return config.server.data_dir / "dkim" / domain


# -- keys ---------------------------------------------------------------------------------

def new_keys(config: Config, domain: str, taken: Sequence[str], now: float,
             state: str) -> list[DkimKeyInfo]:
    """An RSA-2048 and an Ed25519 key under fresh dated selectors (r2026a, e2026a, then
    r2026b ...), written to files only relay's user can read."""
    year = time.gmtime(now).tm_year
    suffix = next(s for s in _suffixes()
                  if f"r{year}{s}" not in taken and f"e{year}{s}" not in taken)
    folder = key_dir(config, domain)
    folder.mkdir(parents=True, exist_ok=True)
    for d in (config.server.data_dir / "dkim", folder):
        os.chmod(d, 0o700)
    made = []
    pairs: list[tuple[str, str, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey]] = [
        (f"r{year}{suffix}", "rsa-sha256",
         rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        (f"e{year}{suffix}", "ed25519-sha256", ed25519.Ed25519PrivateKey.generate()),
    ]
    for selector, algorithm, key in pairs:
        path = folder / f"{selector}.pem"
        _write_private(path, dkim.private_pem(key))
        made.append(DkimKeyInfo(
            domain=domain, selector=selector, algorithm=algorithm,
            public_key=dkim.public_value(key), path=str(path), state=state, created_at=now,
            activated_at=now if state == "active" else None))
    return made


def _suffixes() -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return list(letters) + [a + b for a in letters for b in letters]


def _write_private(path: Path, data: bytes) -> None:
    """Created 0600 from the start (never readable by others, not even for a moment)."""
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def remove_key_files(config: Config, domain: str) -> None:
    shutil.rmtree(key_dir(config, domain), ignore_errors=True)


def make_domain(config: Config, name: str, now: float, *, taken: Sequence[str] = ()) -> Domain:
    return Domain(name=name, created_at=now, return_path=return_path_host(config, name),
                  keys=tuple(new_keys(config, name, taken, now, "active")))


def start_rotation(config: Config, domain: Domain, now: float) -> Domain:
    if any(k.state == "pending" for k in domain.keys):
        raise DomainError(f"{domain.name} already has new selectors waiting; publish them and "
                          f"run `relay domains rotate {domain.name} --activate`")
    fresh = new_keys(config, domain.name, [k.selector for k in domain.keys], now, "pending")
    return dataclasses.replace(domain, keys=domain.keys + tuple(fresh))


def activate_rotation(config: Config, domain: Domain, now: float) -> Domain:
    """The pending keys sign from now on; the active ones retire but stay published."""
    if not any(k.state == "pending" for k in domain.keys):
        raise DomainError(f"{domain.name} has no new selectors; run "
                          f"`relay domains rotate {domain.name}` first")
    keep_until = now + config.dkim.rotation_overlap_days * 86400
    keys = []
    for k in domain.keys:
        if k.state == "pending":
            k = dataclasses.replace(k, state="active", activated_at=now)
        elif k.state == "active":
            k = dataclasses.replace(k, state="retiring", retire_after=keep_until)
        keys.append(k)
    return dataclasses.replace(domain, keys=tuple(keys))


# -- verification --------------------------------------------------------------------------

async def verify(config: Config, domain: Domain) -> list[Check]:
    resolver = make_resolver(config.dns)
    checks = [await _check(resolver, r) for r in records(config, domain)]
    checks.append(await check_reverse_dns(resolver, config.server.hostname.rstrip(".")))
    return checks


async def _lookup(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str
                  ) -> list[str] | str:
    """The record texts, or a sentence saying why there are none."""
    try:
        answer = await resolver.resolve(name, rdtype)
    except dns.resolver.NXDOMAIN:
        return f"{name} does not exist in DNS"
    except dns.resolver.NoAnswer:
        return f"{name} has no {rdtype} record"
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        return f"the lookup of {name} {rdtype} failed ({exc.__class__.__name__})"
    if rdtype == "TXT":
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
    return [r.to_text() for r in answer]


async def _check(resolver: dns.asyncresolver.Resolver, record: DnsRecord) -> Check:
    what = f"{record.type} {record.name} ({record.purpose})"
    found = await _lookup(resolver, record.name, record.type)
    if isinstance(found, str):
        return Check(record, what, False, f"missing: {found}")
    if record.type == "MX":
        want = record.value.split()[-1].lower().rstrip(".")
        hosts = [f.split()[-1].lower().rstrip(".") for f in found]
        if want in hosts:
            return Check(record, what, True, "ok")
        return Check(record, what, False, f"wrong: MX points to {', '.join(hosts)}, not {want}")
    if record.name.split(".", 1)[0].startswith("_dmarc"):
        return _check_prefix(record, what, found, "v=DMARC1")
    if "._domainkey." in record.name:
        return _check_dkim(record, what, found)
    return _check_prefix(record, what, found, "v=spf1", want=record.value.split()[1])


def _tags(text: str) -> dict[str, str]:
    tags = {}
    for part in text.split(";"):
        key, _, value = part.partition("=")
        tags[key.strip()] = "".join(value.split())
    return tags


def _check_dkim(record: DnsRecord, what: str, found: list[str]) -> Check:
    want = _tags(record.value)
    for text in found:
        got = _tags(text)
        if got.get("p") == want["p"] and got.get("k", "rsa") == want["k"]:
            return Check(record, what, True, "ok")
    if any(_tags(t).get("p") for t in found):
        return Check(record, what, False, "wrong: the record holds another public key")
    return Check(record, what, False, f"wrong: found {found[0][:80]!r}, which has no key")


def _check_prefix(record: DnsRecord, what: str, found: list[str], prefix: str,
                  want: str | None = None) -> Check:
    texts = [t for t in found if t.strip().startswith(prefix)]
    if not texts:
        return Check(record, what, False, f"missing: no {prefix} record among {len(found)}")
    if len(texts) > 1:
        return Check(record, what, False, f"wrong: {len(texts)} {prefix} records; there must "
                     "be exactly one")
    if want and want not in texts[0].split():
        return Check(record, what, False, f"wrong: {texts[0]!r} lacks {want}")
    return Check(record, what, True, "ok")


async def check_reverse_dns(resolver: dns.asyncresolver.Resolver, hostname: str) -> Check:
    """Forward-confirmed reverse DNS: each address of the hostname points back to it."""
    what = f"forward-confirmed reverse DNS of {hostname}"
    addresses: list[str] = []
    for rdtype in ("A", "AAAA"):
        found = await _lookup(resolver, hostname, rdtype)
        if isinstance(found, list):
            addresses += found
    if not addresses:
        return Check(None, what, False, f"missing: {hostname} has no A or AAAA record")
    problems = []
    for address in addresses:
        names = await _lookup(resolver, dns.reversename.from_address(address).to_text(), "PTR")
        if isinstance(names, str):
            problems.append(f"{address} has no PTR record")
        elif hostname.lower() not in [n.lower().rstrip(".") for n in names]:
            problems.append(f"{address} points back to {', '.join(names)}, not {hostname}")
    if problems:
        return Check(None, what, False, "wrong: " + "; ".join(problems))
    return Check(None, what, True, f"ok ({', '.join(addresses)})")
