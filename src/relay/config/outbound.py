"""The shape of outbound traffic in [delivery]: sites and their limits, the replies that hold
a site back, source address pools, and TLS policy per destination (delivery/shaping.py,
delivery/pools.py and delivery/tlspolicy.py read these)."""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from .checks import check_domain, check_non_negative, meta, one_of

TLS_LEVELS = ("none", "may", "encrypt", "verify", "dane")
STREAMS = ("transactional", "broadcast")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hr|hour|d|day)\s*$",
                   re.IGNORECASE)
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_rate(value: str) -> float | None:
    """"10/s", "500/min", "20000/h", "100000/day" → messages per second; "" → None."""
    if not value.strip():
        return None
    m = _RATE.match(value)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a rate like \"10/s\", \"500/min\" or \"20000/h\"")
    return float(m.group(1)) / _PER[m.group(2)[0].lower()]


def check_rate(value: str) -> str:
    parse_rate(value)
    return value.strip()


def check_host_pattern(value: str) -> str:
    """An MX host name, "*.suffix" (any name under it) or an IP network."""
    value = value.strip().lower().rstrip(".")
    try:
        ipaddress.ip_network(value, strict=False)
        return value
    except ValueError:
        pass
    name = value.removeprefix("*.")
    check_domain(name)
    if "*" in name:
        raise ValueError(f"{value!r}: a wildcard only as the first label (\"*.example.com\")")
    return value


def check_regex(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if len(value) > 500:
        raise ValueError("is longer than 500 characters")
    try:
        re.compile(value, re.IGNORECASE)
    except re.error as exc:
        raise ValueError(f"is not a regular expression: {exc}") from None
    return value


def check_ip(value: str) -> str:
    return str(ipaddress.ip_address(value.strip()))


def check_day(value: str) -> str:
    if value:
        datetime.date.fromisoformat(value)
    return value


def check_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", value):
        raise ValueError(f"{value!r} is not a name (letters, digits, '-', '_', '.'; 1..63)")
    return value


@dataclass(frozen=True, kw_only=True)
class SiteConfig:
    """[[delivery.sites]]: MX hosts counted as one site (a provider's many MX names), with
    limits of their own; 0 or "" takes [delivery]'s."""

    name: str = field(default="", metadata=meta(check_name))
    mx: tuple[str, ...] = field(default=(), metadata=meta(item=check_host_pattern))
    max_connections: int = field(default=0, metadata=meta(check_non_negative))
    messages_per_connection: int = field(default=0, metadata=meta(check_non_negative))
    max_rate: str = field(default="", metadata=meta(check_rate))


# the large providers' MX names: every domain they host is one site, with one set of limits
DEFAULT_SITES = (
    SiteConfig(name="google", mx=("*.google.com", "*.googlemail.com")),
    SiteConfig(name="microsoft", mx=("*.protection.outlook.com",)),
    SiteConfig(name="yahoo", mx=("*.yahoodns.net",)),
    SiteConfig(name="icloud", mx=("*.mail.icloud.com",)),
)


@dataclass(frozen=True, kw_only=True)
class BackoffRule:
    """[[delivery.backoff]]: a remote reply ("421 4.7.28 text", matched case-insensitively)
    that holds its site back: no new sessions for `suspend` seconds, or, with `max_rate`,
    that rate for `duration` seconds."""

    match: str = field(default="", metadata=meta(check_regex))
    suspend: float = field(default=0.0, metadata=meta(check_non_negative))
    max_rate: str = field(default="", metadata=meta(check_rate))
    duration: float = field(default=3600.0, metadata=meta(check_non_negative))


# what the large receivers say when they want a sender to slow down (their postmaster pages)
DEFAULT_BACKOFF = (
    BackoffRule(match=r"^421 4\.7\.28\b", suspend=1800.0),  # Gmail: unusual rate
    BackoffRule(match=r"^4\d\d 4\.7\.650\b", suspend=3600.0),  # Microsoft: IP rate limited
    BackoffRule(match=r"^421 4\.7\.0 \[TS0[1-4]\]", suspend=3600.0),  # Yahoo: deferred
    BackoffRule(match=r"^421 .*(too many (connections|concurrent)|rate limit)",
                max_rate="1/s", duration=1800.0),
    BackoffRule(match=r"^421 4\.7\.0 .*try again later", suspend=600.0),
)


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """[[delivery.pools.sources]]: one local address mail leaves from, the name it gives in
    EHLO (its PTR's), and the first day of its warm-up ("" = warmed up)."""

    address: str = field(default="", metadata=meta(check_ip))
    helo: str = field(default="", metadata=meta(lambda v: check_domain(v) if v else ""))
    warmup_start: str = field(default="", metadata=meta(check_day))


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """[[delivery.pools]]: source addresses used in turn; the pool of a message is the one it
    asked for (API field "pool") or the one serving its stream."""

    name: str = field(default="", metadata=meta(check_name))
    sources: tuple[SourceConfig, ...] = ()
    streams: tuple[str, ...] = field(default=(), metadata=meta(item=one_of(*STREAMS)))
    # messages a source may send on its warm-up day 1, 2, ...; after the last day no cap
    warmup: tuple[int, ...] = field(default=(), metadata=meta(item=lambda v: max(1, int(v))))


@dataclass(frozen=True, kw_only=True)
class TlsPolicyConfig:
    """[[delivery.tls_policy]]: the TLS a recipient domain gets, over MTA-STS, DANE and
    [delivery] tls ("example.com"; ".example.com" also covers its subdomains)."""

    domain: str = field(default="", metadata=meta(
        lambda v: "." + check_domain(v[1:]) if v.startswith(".") else check_domain(v)))
    level: str = field(default="", metadata=meta(one_of(*TLS_LEVELS)))


def outbound_problems(delivery: Any) -> list[tuple[str, str]]:
    """(key, reason) of every entry of [delivery]'s outbound tables (a DeliveryConfig's) that
    lacks what it needs or clashes with another: the loader raises the first."""
    sites: tuple[SiteConfig, ...] = delivery.sites
    rules: tuple[BackoffRule, ...] = delivery.backoff
    pools: tuple[PoolConfig, ...] = delivery.pools
    policies: tuple[TlsPolicyConfig, ...] = delivery.tls_policy
    out = _names("sites", "site", [s.name for s in sites]) + _names(
        "pools", "pool", [p.name for p in pools])
    for i, site in enumerate(sites):
        if not site.mx:
            out.append((f"delivery.sites[{i}].mx", "needs at least one MX host pattern"))
    for i, rule in enumerate(rules):
        if not rule.match:
            out.append((f"delivery.backoff[{i}].match", "is required"))
        if not rule.suspend and not rule.max_rate:
            out.append((f"delivery.backoff[{i}]", "needs suspend (seconds) or max_rate"))
    streams: dict[str, str] = {}
    addresses: dict[str, str] = {}
    for i, pool in enumerate(pools):
        key = f"delivery.pools[{i}]"
        if not pool.sources:
            out.append((f"{key}.sources", "needs at least one source address"))
        for j, source in enumerate(pool.sources):
            if not source.address:
                out.append((f"{key}.sources[{j}].address", "is required"))
            elif source.address in addresses:
                out.append((f"{key}.sources[{j}].address",
                            f"{source.address} is in pool {addresses[source.address]!r} too"))
            addresses[source.address] = pool.name
        for stream in pool.streams:
            if stream in streams:
                served = f"{stream} is served by pool {streams[stream]!r} already"
                out.append((f"{key}.streams", served))
            streams[stream] = pool.name
    for i, policy in enumerate(policies):
        for name in ("domain", "level"):
            if not getattr(policy, name):
                out.append((f"delivery.tls_policy[{i}].{name}", "is required"))
    return out


def _names(table: str, what: str, names: list[str]) -> list[tuple[str, str]]:
    """Each entry of [[delivery.<table>]] needs a name of its own."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not name:
            out.append((f"delivery.{table}[{i}].name", "is required"))
        elif name in seen:
            out.append((f"delivery.{table}[{i}].name", f"{name!r} names another {what} too"))
        seen.add(name)
    return out
