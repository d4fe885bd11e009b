"""The TLS each MX host of a destination gets: [[delivery.tls_policy]] when the operator set
one, else DANE (a DNSSEC-validated TLSA record, RFC 7672), else the domain's MTA-STS policy
(RFC 8461), else [delivery] tls. RFC 8461 §2: where DANE applies, MTA-STS is not asked."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import dns.asyncresolver

from ..config import DeliveryConfig
from ..errors import TemporaryFailure
from . import dane
from .mtasts import MtaSts, StsLookup
from .mx import MXHost
from .outbound import Target, Tlsa, TlsPolicy

CACHE_SECONDS = 300.0  # TLSA answers, MX validation and MTA-STS lookups, per name
_CACHE_MAX = 4096


class TlsPolicies:
    def __init__(self, delivery: DeliveryConfig, resolver: dns.asyncresolver.Resolver,
                 sts: MtaSts | None, *, clock: Callable[[], float] = time.monotonic,
                 on_failure: Callable[[Target, str], None] | None = None) -> None:
        """`on_failure` hears a policy that could not be had (an MTA-STS policy that could
        not be fetched or parsed): TLS-RPT reports it to the domain."""
        self._overrides = [(p.domain, p.level) for p in delivery.tls_policy]
        self._resolver = resolver
        self._sts = sts
        self._dane = delivery.dane
        self._clock = clock
        self._on_failure = on_failure
        self._cache: dict[tuple[str, str], tuple[float, Any]] = {}

    def override(self, domain: str) -> str | None:
        """The operator's level for a recipient domain: an exact entry, else the longest
        ".suffix" entry covering it."""
        domain = domain.lower().rstrip(".")
        best: tuple[int, str] | None = None
        for name, level in self._overrides:
            if name == domain:
                return level
            if name.startswith(".") and domain.endswith(name) and (
                    best is None or len(name) > best[0]):
                best = (len(name), level)
        return best[1] if best else None

    async def targets(self, domain: str, hosts: Sequence[MXHost], port: int) -> list[Target]:
        """The targets of a domain's MX hosts in order, each with its TLS policy; raises
        TemporaryFailure when a policy leaves no host to deliver to."""
        level = self.override(domain)
        if level is not None and level != "dane":
            policy = TlsPolicy(level=level, source="config")
            return [Target(hostname=h.name, address=a, port=port, tls=policy)
                    for h in hosts for a in h.addresses]
        if (level == "dane" or self._dane) and not _literal(domain):
            by_host = await self._dane_policies(domain, hosts, port, required=level == "dane")
            if by_host is not None:
                return [Target(hostname=h.name, address=a, port=port, tls=by_host[h.name])
                        for h in hosts if h.name in by_host for a in h.addresses]
        if self._sts is not None and not _literal(domain):
            return await self._sts_targets(domain, hosts, port)
        return [Target(hostname=h.name, address=a, port=port) for h in hosts for a in h.addresses]

    async def _dane_policies(self, domain: str, hosts: Sequence[MXHost], port: int, *,
                             required: bool) -> dict[str, TlsPolicy] | None:
        """DANE policies of the hosts that have them (a host whose TLSA lookup failed is
        left out: RFC 7672 §2.2); None when DANE does not apply to this domain."""
        secure = await self._cached("mx", domain, lambda: dane.secure_mx(self._resolver, domain))
        if not secure:
            if required:
                raise TemporaryFailure(f"DANE is required for {domain} but its MX records are "
                                       f"not DNSSEC-validated", enhanced="4.7.5")
            return None
        policies: dict[str, TlsPolicy] = {}
        failed: list[str] = []
        for host in hosts:
            found = await self._cached("tlsa", f"{port}:{host.name}",
                                       lambda h=host: dane.tlsa_lookup(self._resolver, h.name,
                                                                       port))
            if found.error:
                failed.append(f"{host.name}: {found.error}")
                continue
            usable = dane.usable(found.records) if found.secure else ()
            if found.secure and found.records and not usable:
                # RFC 7672 §3.1: records but none usable: TLS without authentication
                policies[host.name] = TlsPolicy(level="encrypt", source="dane",
                                                policy_domain=domain, policy_type="tlsa",
                                                policy_string=_tlsa_text(found.records))
            elif usable:
                policies[host.name] = TlsPolicy(level="dane", source="dane", tlsa=usable,
                                                policy_domain=domain, policy_type="tlsa",
                                                policy_string=_tlsa_text(usable))
            elif required:
                failed.append(f"{host.name}: no DNSSEC-validated TLSA record")
            else:
                policies[host.name] = TlsPolicy(level="may", source="default")
        if not policies:
            raise TemporaryFailure(f"no MX host of {domain} can be reached under DANE ("
                                   + "; ".join(failed) + ")", enhanced="4.7.5")
        return policies

    async def _sts_targets(self, domain: str, hosts: Sequence[MXHost],
                           port: int) -> list[Target]:
        assert self._sts is not None
        sts = self._sts
        found = await self._cached("sts", domain, lambda: self._sts_lookup(sts, domain))
        policy = found.policy
        if policy is None or policy.mode == "none":
            return [Target(hostname=h.name, address=a, port=port)
                    for h in hosts for a in h.addresses]
        enforce = policy.mode == "enforce"
        tls = TlsPolicy(level="verify", source="mta-sts", enforce=enforce,
                        policy_domain=domain, policy_type="sts",
                        policy_string=tuple(policy.policy_string))
        kept = [h for h in hosts if policy.matches(h.name)] if enforce else list(hosts)
        if not kept:
            raise TemporaryFailure(
                f"no MX host of {domain} ({', '.join(h.name for h in hosts)}) is named in its "
                f"MTA-STS policy (mx: {', '.join(policy.mx)})", enhanced="4.7.5")
        return [Target(hostname=h.name, address=a, port=port, tls=tls)
                for h in kept for a in h.addresses]

    async def _sts_lookup(self, sts: MtaSts, domain: str) -> StsLookup:
        found = await sts.policy(domain)
        if found.failure and self._on_failure is not None:  # once per lookup, not per session
            self._on_failure(Target(hostname="", address="", port=0, tls=TlsPolicy(
                level="may", source="mta-sts", policy_domain=domain, policy_type="sts")),
                found.failure)
        return found

    async def _cached(self, kind: str, key: str, fetch: Callable[[], Any]) -> Any:
        now = self._clock()
        entry = self._cache.get((kind, key))
        if entry is not None and entry[0] > now:
            return entry[1]
        value = await fetch()
        if len(self._cache) >= _CACHE_MAX:
            for stale in [k for k, (at, _) in self._cache.items() if at <= now]:
                del self._cache[stale]
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
        self._cache[(kind, key)] = (now + CACHE_SECONDS, value)
        return value


def _literal(domain: str) -> bool:
    return domain.startswith("[")


def _tlsa_text(records: Sequence[Tlsa]) -> tuple[str, ...]:
    return tuple(f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}" for r in records)
