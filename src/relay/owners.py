"""Owners (DESIGN.md section 10): every message, webhook, suppression, template, contact and
API key belongs to the sending domains of the key that made it; a key sees only what its
own domains cover. This module holds that rule once, in Python and as SQL for the store.

- An owner is a tuple of domains; the empty tuple is the whole relay (what an admin key, a
  key without domains, or the CLI makes).
- A caller's reach (`Within`) is its key's domains, or None for the whole relay.
- A message's owner is its sender domain (the From domain), so a key sees the mail sent as
  its domains, whoever sent it.
- A row is within reach when reach is None, or when the row has an owner and every one of
  its domains is one of reach's domains or a subdomain of one. A relay-wide row is seen
  only by an admin key.

Imports nothing from the package: the store and the API both build on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

Within = tuple[str, ...] | None  # None: the whole relay


def within(domains: tuple[str, ...]) -> Within:
    """A key's reach: its domains, or None (the whole relay) for a key without any."""
    return domains or None


def covers(domains: Iterable[str], domain: str) -> bool:
    """Whether `domain` is one of `domains` or a subdomain of one (case-insensitive)."""
    domain = domain.lower().rstrip(".")
    return any(domain == d or domain.endswith("." + d) for d in domains)


def sees(reach: Within, owner: Iterable[str]) -> bool:
    """Whether a caller with this reach may see and change a row with this owner."""
    if reach is None:
        return True
    owned = tuple(owner)
    return bool(owned) and all(covers(reach, d) for d in owned)


def sees_domain(reach: Within, domain: str) -> bool:
    """Whether a caller with this reach may see a message sent as `domain`."""
    return reach is None or (bool(domain) and covers(reach, domain))


def encode(owner: Iterable[str]) -> str:
    """An owner as stored: a JSON array of lower-case domains, sorted ("[]": the relay)."""
    return json.dumps(sorted({d.lower() for d in owner}))


def decode(stored: str | None) -> tuple[str, ...]:
    return tuple(json.loads(stored)) if stored else ()


def domain_sql(column: str, reach: tuple[str, ...]) -> tuple[str, list[Any]]:
    """SQL true when the domain in `column` is covered by `reach` (no LIKE: a domain's
    characters are never wildcards), and its arguments. The suffix is counted from the
    length: a negative substr start counts from the end in SQLite only."""
    parts, args = [], []
    for d in reach:
        parts.append(f"({column} = ? OR substr({column}, length({column}) - ? + 1) = ?)")
        args += [d, len(d) + 1, "." + d]
    return "(" + " OR ".join(parts) + ")", args


def message_sql(reach: Within, column: str = "sender_domain") -> tuple[str, list[Any]]:
    """A WHERE condition keeping messages within reach ("1 = 1" when reach is the relay)."""
    if reach is None:
        return "1 = 1", []  # a boolean in PostgreSQL too, where a bare 1 is an integer
    return domain_sql(column, reach)


def covered_sql(owner: str, domain: str) -> str:
    """SQL true when the row's owner (a JSON column, `owner`) is the relay or covers the
    domain expression `domain`: where a row's outcome or event may go. Schema v13's webhook
    fan-out trigger spells the same rule out, as a migration must not import code. `domain`
    appears three times (a `?` there takes its argument thrice)."""
    return (f"({owner} = '[]' OR EXISTS (SELECT 1 FROM json_each({owner}) o"
            f" WHERE {domain} = o.value OR substr({domain}, length({domain}) - length(o.value))"
            " = '.' || o.value))")


def owner_sql(reach: Within, column: str = "owner") -> tuple[str, list[Any]]:
    """A WHERE condition keeping rows whose JSON `owner` column is within reach."""
    if reach is None:
        return "1 = 1", []  # a boolean in PostgreSQL too, where a bare 1 is an integer
    inner, args = domain_sql("o.value", reach)
    return (f"({column} <> '[]' AND NOT EXISTS (SELECT 1 FROM json_each({column}) o"
            f" WHERE NOT {inner}))", args)
