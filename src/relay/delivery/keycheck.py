"""The sending domains' active DKIM keys, each read and parsed before relay serves.

A key file that is missing, unreadable or corrupt would otherwise show only later, as an
error in the log each time render re-reads the keys, while that domain's mail goes out
unsigned or waits; `relay serve` refuses to start instead, and `relay check-config` says
the same beforehand. Each problem names the domain, the selector, the file and the reason."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..dkimkeys import KeyError_, load_private_key
from ..errors import ConfigError
from ..store import SQLiteStore

MAX_KEY_FILE = 64 * 1024  # an RSA-8192 PEM is ~6.5 KB: anything far larger is not a key


@dataclass(frozen=True, kw_only=True)
class KeyProblem:
    domain: str
    selector: str
    path: str
    reason: str

    def error(self) -> ConfigError:
        return ConfigError(self.path, f"DKIM key {self.selector} of {self.domain}",
                           f"{self.reason} (fix the file, or give the domain a new key: "
                           f"relay domains rotate {self.domain})")


async def unusable_signing_keys(store: SQLiteStore) -> list[KeyProblem]:
    """Every active key that cannot be loaded, with why."""
    problems = []
    for info in await store.signing_keys():
        reason = _problem(Path(info.path))
        if reason is not None:
            problems.append(KeyProblem(domain=info.domain, selector=info.selector,
                                       path=info.path, reason=reason))
    return problems


async def check_signing_keys(store: SQLiteStore) -> None:
    """Raise the first unusable key's ConfigError (the one `relay serve` stops on)."""
    problems = await unusable_signing_keys(store)
    if problems:
        raise problems[0].error()


def _problem(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        return f"cannot read the key file: {exc.strerror or exc}"
    if len(data) > MAX_KEY_FILE:
        return f"the key file is larger than {MAX_KEY_FILE} octets: not a key"
    try:
        load_private_key(data)
    except KeyError_ as exc:
        return str(exc)
    return None
