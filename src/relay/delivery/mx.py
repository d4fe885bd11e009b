"""Finds where mail for a domain goes: its MX hosts and their addresses, cached by TTL."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from ..addresses import literal_ip, to_ascii
from ..config import DnsConfig, parse_hostport
from ..errors import PermanentFailure, TemporaryFailure

T = TypeVar("T")

NEGATIVE_TTL = 300  # for a negative answer that carries no SOA
_CACHE_PRUNE_AT = 4096


@dataclass(frozen=True, kw_only=True)
class MXHost:
    name: str  # the MX host name, no trailing dot
    preference: int
    addresses: tuple[str, ...]  # A and AAAA of the host (IPv4 first)
    implicit: bool = False  # the domain had no MX and its own A/AAAA is used


@dataclass(frozen=True, kw_only=True)
class _Lookup:
    """One name's outcome: records (or addresses), none at all, or a temporary error."""

    values: tuple[Any, ...] = ()
    ttl: float = NEGATIVE_TTL
    nxdomain: bool = False
    error: str | None = None  # set when some query failed temporarily


def make_resolver(config: DnsConfig) -> dns.asyncresolver.Resolver:
    if config.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        servers: list[str | dns.nameserver.Nameserver] = []
        for entry in config.nameservers:
            host, port = parse_hostport(entry, default_port=53)
            servers.append(dns.nameserver.Do53Nameserver(host, port))
        resolver.nameservers = servers
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            # no /etc/resolv.conf: every lookup fails temporarily rather than the service
            resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.lifetime = config.timeout
    return resolver


def _a_label(domain: str) -> str:
    text = domain.strip().rstrip(".").lower()
    try:
        if not text:
            raise ValueError("empty name")
        ascii_name = to_ascii(text)  # IDNA 2008 (UTS 46), as relay stores domains
        dns.name.from_text(ascii_name)  # checks label and name lengths
    except (UnicodeError, ValueError, dns.exception.DNSException) as exc:
        raise PermanentFailure(
            f"{domain!r} is not a valid domain name ({exc})", enhanced="5.1.2", hard=True
        ) from None
    return ascii_name


def _literal_host(domain: str) -> MXHost:
    """The one implicit host of an address literal, named by its IP: TLS then checks the
    certificate for that IP, as there is no host name to check."""
    try:
        ip = literal_ip(domain.strip())
    except ValueError as exc:
        raise PermanentFailure(f"{domain!r} is not a valid address literal ({exc})",
                               enhanced="5.1.2", hard=True) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped  # connect over IPv4, where the mail-loop check can see it
    return MXHost(name=str(ip), preference=0, addresses=(str(ip),), implicit=True)


def _negative_ttl(response: dns.message.Message | None) -> float:
    for rrset in response.authority if response is not None else ():
        if rrset.rdtype == dns.rdatatype.SOA:
            return float(min(rrset.ttl, rrset[0].minimum))
    return NEGATIVE_TTL


def _shuffled(hosts: list[MXHost]) -> list[MXHost]:
    """Sorted by preference, in random order among equal preferences (RFC 5321 5.1)."""
    result: list[MXHost] = []
    for _, group in itertools.groupby(sorted(hosts, key=lambda h: h.preference),
                                      key=lambda h: h.preference):
        same = list(group)
        random.shuffle(same)
        result.extend(same)
    return result


class MXResolver:
    """Resolves MX hosts and host addresses; results and permanent failures are cached."""

    def __init__(self, config: DnsConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._resolver = make_resolver(config)
        self._clock = clock
        self._mx_cache: dict[str, tuple[float, list[MXHost] | PermanentFailure]] = {}
        self._host_cache: dict[str, tuple[float, list[str] | PermanentFailure]] = {}

    async def resolve(self, domain: str) -> list[MXHost]:
        """The domain's MX hosts with addresses, in preference order (ties shuffled); an
        address literal ("[192.0.2.1]", "[IPv6:2001:db8::1]") is its own one host, without
        a lookup (RFC 5321 5.1)."""
        if domain.startswith("["):
            return [_literal_host(domain)]
        name = _a_label(domain)
        return _shuffled(await self._cached(self._mx_cache, name, self._resolve_mx))

    async def addresses(self, host: str) -> list[str]:
        """A then AAAA of a host name; an IP literal (or "[literal]") returns itself.

        Raises PermanentFailure 5.4.4 when the name does not exist, TemporaryFailure
        4.4.4 when it has no address and 4.4.3 when DNS fails.
        """
        text = host.strip()
        with contextlib.suppress(ValueError):
            return [str(literal_ip(text))]  # [IPv6:2001:db8::1]
        with contextlib.suppress(ValueError):
            return [str(ipaddress.ip_address(text.strip("[]")))]  # 192.0.2.1, [2001:db8::1]
        addresses: list[str] = await self._cached(self._host_cache, _a_label(host),
                                                  self._resolve_host)
        return list(addresses)

    async def _cached(
        self,
        cache: dict[str, tuple[float, T | PermanentFailure]],
        key: str,
        fetch: Callable[[str], Awaitable[tuple[T | PermanentFailure, float | None]]],
    ) -> T:
        now = self._clock()
        entry = cache.get(key)
        if entry is None or entry[0] <= now:
            value, ttl = await fetch(key)  # a TemporaryFailure propagates, uncached
            if ttl is not None and ttl > 0:
                if len(cache) >= _CACHE_PRUNE_AT:
                    for stale in [k for k, (expires, _) in cache.items() if expires <= now]:
                        del cache[stale]
                cache[key] = (now + ttl, value)
        else:
            value = entry[1]
        if isinstance(value, PermanentFailure):
            raise PermanentFailure(value.text, enhanced=value.enhanced, hard=value.hard)
        return value

    async def _query(self, name: str, rdtype: str) -> _Lookup:
        qname = dns.name.from_text(name)
        try:
            answer = await self._resolver.resolve(
                qname, rdtype, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as exc:
            responses: dict[dns.name.Name, dns.message.Message] = exc.kwargs.get("responses", {})
            response = next(iter(responses.values()), None)
            return _Lookup(nxdomain=True, ttl=_negative_ttl(response))
        except dns.resolver.LifetimeTimeout:
            return _Lookup(error=f"{rdtype} lookup of {name} timed out")
        except dns.resolver.NoNameservers:
            return _Lookup(error=f"no nameserver answered the {rdtype} lookup of {name}")
        except dns.exception.DNSException as exc:
            return _Lookup(error=f"{rdtype} lookup of {name} failed: {exc}")
        ttl = float(answer.chaining_result.minimum_ttl)
        if answer.rrset is None:
            return _Lookup(ttl=min(ttl, _negative_ttl(answer.response)))
        return _Lookup(values=tuple(answer.rrset), ttl=ttl)

    async def _host(self, name: str) -> _Lookup:
        """A and AAAA of one name, asked together."""
        a, aaaa = await asyncio.gather(self._query(name, "A"), self._query(name, "AAAA"))
        return _Lookup(
            values=tuple(rd.address for rd in a.values + aaaa.values),
            ttl=min(a.ttl, aaaa.ttl),
            nxdomain=a.nxdomain and aaaa.nxdomain,
            error=a.error or aaaa.error,
        )

    async def _resolve_host(self, name: str) -> tuple[list[str] | PermanentFailure, float | None]:
        host = await self._host(name)
        if host.values:
            return list(host.values), None if host.error else host.ttl
        if host.error:
            raise TemporaryFailure(host.error, enhanced="4.4.3")
        if host.nxdomain:
            return PermanentFailure(f"host {name} does not exist (NXDOMAIN)",
                                    enhanced="5.4.4"), host.ttl
        raise TemporaryFailure(f"host {name} has no address", enhanced="4.4.4")

    async def _resolve_mx(self, name: str) -> tuple[list[MXHost] | PermanentFailure, float | None]:
        mx = await self._query(name, "MX")
        if mx.error:
            raise TemporaryFailure(mx.error, enhanced="4.4.3")
        if mx.nxdomain:
            return PermanentFailure(f"domain {name} does not exist (NXDOMAIN)",
                                    enhanced="5.1.2", hard=True), mx.ttl
        if not mx.values:
            return await self._implicit_mx(name, mx.ttl)
        preferences: dict[str, int] = {}  # exchange -> its lowest preference
        for rd in mx.values:
            if rd.exchange != dns.name.root:
                exchange = rd.exchange.to_text(omit_final_dot=True).lower()
                preferences[exchange] = min(rd.preference, preferences.get(exchange, rd.preference))
        if not preferences:
            return PermanentFailure(f"{name} does not accept mail (null MX, RFC 7505)",
                                    enhanced="5.1.10", hard=True), mx.ttl
        lookups = await asyncio.gather(*(self._host(exchange) for exchange in preferences))
        hosts = [
            MXHost(name=exchange, preference=preference, addresses=lookup.values)
            for (exchange, preference), lookup in zip(preferences.items(), lookups, strict=True)
            if lookup.values
        ]
        ttl = min(mx.ttl, *(lookup.ttl for lookup in lookups))
        if hosts:
            return hosts, None if any(lookup.error for lookup in lookups) else ttl
        names = ", ".join(preferences)
        if all(lookup.nxdomain for lookup in lookups):
            return PermanentFailure(f"no MX host of {name} exists ({names})",
                                    enhanced="5.4.4"), ttl
        raise TemporaryFailure(f"no MX host of {name} has an address ({names})", enhanced="4.4.4")

    async def _implicit_mx(
        self, name: str, mx_ttl: float
    ) -> tuple[list[MXHost] | PermanentFailure, float | None]:
        host = await self._host(name)
        ttl = min(mx_ttl, host.ttl)
        if host.values:
            implicit = MXHost(name=name, preference=0, addresses=host.values, implicit=True)
            return [implicit], None if host.error else ttl
        if host.error:
            raise TemporaryFailure(host.error, enhanced="4.4.3")
        return PermanentFailure(f"domain {name} has no MX and no address",
                                enhanced="5.1.2", hard=True), ttl
