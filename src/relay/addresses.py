"""Envelope addresses and domains in the one form relay stores: domain as a lower-case
A-label, local part as given."""

from __future__ import annotations

import functools
import re

from .errors import ValidationError

_BAD_LOCAL = re.compile(r"[\r\n\x00 ]")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def normalize_address(address: str, *, smtputf8: bool, param: str) -> tuple[str, str]:
    """An envelope address with its domain as a lower-case A-label → (address, domain)."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValidationError(f"{address!r} is not an address (local@domain)", param=param,
                              smtp="501 5.1.3")
    if len(local.encode("utf-8")) > 64:
        raise ValidationError(f"{address!r}: local part longer than 64 octets", param=param,
                              smtp="553 5.1.3")
    if not local.isascii() and not smtputf8:
        raise ValidationError(f"{address!r}: a non-ASCII local part needs SMTPUTF8", param=param,
                              smtp="553 5.6.7")
    if _BAD_LOCAL.search(local):
        raise ValidationError(f"{address!r}: bad characters in the local part", param=param,
                              smtp="501 5.1.3")
    return f"{local}@{(d := normalize_domain(domain, param=param))}", d


def normalize_domain(domain: str, *, param: str) -> str:
    ace = a_label(domain)
    if ace is None:
        raise ValidationError(f"{domain.rstrip('.').lower()!r} is not a valid domain",
                              param=param, smtp="501 5.1.2")
    return ace


@functools.lru_cache(maxsize=8192)
def a_label(domain: str) -> str | None:
    """The lower-case A-label, or None; remembered, as bulk mail repeats its domains."""
    domain = domain.rstrip(".").lower()
    if domain.startswith("[") and domain.endswith("]"):
        return domain  # address literal
    try:
        ace = domain if domain.isascii() else domain.encode("idna").decode("ascii")
    except (UnicodeError, ValueError):
        return None
    labels = ace.split(".")
    if len(ace) > 253 or len(labels) < 2 or not all(_LABEL.match(lbl) for lbl in labels):
        return None
    return ace


def self_and_parents(domain: str) -> list[str]:
    """news.example.com, example.com: a parent's DKIM key is aligned too (relaxed DMARC)."""
    labels = domain.split(".")
    return [".".join(labels[i:]) for i in range(len(labels) - 1)] if domain else []
