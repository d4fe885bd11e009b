"""API keys: made random, stored as SHA-256 behind a public id, checked in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable

from . import owners
from .addresses import normalize_domain
from .errors import ValidationError
from .store import Store
from .types import SCOPES, ApiKey

PREFIX = "rk_"


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def split_key(secret: str) -> str | None:
    """The public id of a key string ("rk_<id>_<random>"), or None if it has not that shape."""
    if not secret.startswith(PREFIX):
        return None
    ident, sep, rest = secret[len(PREFIX):].partition("_")
    if not sep or len(ident) != 12 or not rest:
        return None
    return PREFIX + ident


async def create_key(
    store: Store, *, name: str, scopes: Iterable[str], domains: Iterable[str] = ()
) -> tuple[ApiKey, str]:
    """Make and store a key; the secret is returned once and never stored."""
    scopes = tuple(dict.fromkeys(scopes))
    for scope in scopes:
        if scope not in SCOPES:
            raise ValidationError(f"unknown scope {scope!r} (known: {', '.join(SCOPES)})",
                                  param="scopes")
    if not scopes:
        raise ValidationError("a key needs at least one scope", param="scopes")
    doms = tuple(dict.fromkeys(_domain(d) for d in domains))
    ident = PREFIX + secrets.token_hex(6)
    secret = f"{ident}_{secrets.token_urlsafe(32)}"  # 256 random bits
    key = ApiKey(id=ident, name=name, scopes=scopes, domains=doms, created_at=time.time())
    await store.add_api_key(key, _hash(secret))
    return key, secret


async def authenticate(store: Store, secret: str) -> ApiKey | None:
    """The live key this secret belongs to, or None. One SHA-256, one constant-time compare."""
    ident = split_key(secret)
    found = await store.find_api_key(ident) if ident else None
    # Hash even when there is no such key, so timing says nothing about which ids exist.
    given = _hash(secret)
    if found is None:
        hmac.compare_digest(given, bytes(32))
        return None
    key, stored = found
    if not hmac.compare_digest(given, stored) or key.revoked_at is not None:
        return None
    return key


def _domain(value: str) -> str:
    return normalize_domain(value.strip(), param="domains")


def may_send_as(allowed: tuple[str, ...], domain: str) -> bool:
    """Whether a sender domain is among `allowed` (subdomains included); empty allows any."""
    return not allowed or owners.covers(allowed, domain)
