"""Sending domains: their DKIM keys (made, stored 0600, rotated). The records they need are
dnsrecords.py's to work out, and domaincheck.py's to check against what DNS says."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from . import dkimkeys
from .config import Config
from .dnsrecords import (  # noqa: F401  (dkim_records, records, split_txt: the CLI's)
    dkim_records,
    records,
    return_path_host,
    split_txt,
)
from .types import DkimKeyInfo, Domain


class DomainError(Exception):
    """An operation on a domain that cannot be done; the message says why and what to do."""


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
        _write_private(path, dkimkeys.private_pem(key))
        made.append(DkimKeyInfo(
            domain=domain, selector=selector, algorithm=algorithm,
            public_key=dkimkeys.public_value(key), path=str(path), state=state, created_at=now,
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
