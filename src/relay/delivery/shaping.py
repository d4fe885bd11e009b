"""Traffic shaping by site: the MX host a destination resolves to (or a [[delivery.sites]]
group of a provider's MX names), its connections, messages per connection and rate, and the
replies that hold it back ([[delivery.backoff]]): suspended, or slowed, for a while.

Holds are kept in the store, so every node and `relay queue` see them; connections and rate
are this node's (each node paces itself; with N nodes a site sees up to N times the rate)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import DeliveryConfig
from ..config.outbound import BackoffRule, SiteConfig, parse_rate
from ..errors import StoreError
from ..metrics import site_held
from ..store import SQLiteStore
from ..store.shaping import SiteHold
from .outbound import Target

log = logging.getLogger(__name__)

REFRESH = 5.0  # seconds between two reads of the holds other nodes may have added


@dataclass(frozen=True, kw_only=True)
class Site:
    key: str  # the [[delivery.sites]] name, or the destination's first MX host name
    max_connections: int
    messages_per_connection: int
    rate: float | None  # messages per second; None: no limit


class _Rule:
    def __init__(self, rule: BackoffRule) -> None:
        self.pattern = re.compile(rule.match, re.IGNORECASE)
        self.suspend = rule.suspend
        self.rate = parse_rate(rule.max_rate)
        self.duration = rule.duration


class _Pacer:
    """Spaces a site's messages `1/rate` seconds apart (no bursts)."""

    def __init__(self) -> None:
        self.next_at = 0.0

    async def wait(self, rate: float) -> None:
        now = time.monotonic()
        at = max(now, self.next_at)
        self.next_at = at + 1.0 / rate
        if at > now:
            await asyncio.sleep(at - now)


class Shaper:
    def __init__(self, delivery: DeliveryConfig, store: SQLiteStore, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._cfg = delivery
        self._store = store
        self._clock = clock
        self._sites = [(s, _patterns(s)) for s in delivery.sites]
        self._rules = [_Rule(r) for r in delivery.backoff]
        self._default_rate = parse_rate(delivery.max_rate)
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        self._pacers: dict[str, _Pacer] = {}
        self._holds: dict[str, SiteHold] = {}
        self._read_at = float("-inf")

    def site(self, primary: str, targets: Sequence[Target]) -> Site:
        """The site of a destination: the first [[delivery.sites]] one of its targets
        matches, else `primary`, its most preferred MX host (the smarthost's name)."""
        for config, (names, networks) in self._sites:
            if any(_matches(t, names, networks) for t in targets):
                return self._site(config.name, config)
        return self._site(primary.lower(), None)

    def _site(self, key: str, config: SiteConfig | None) -> Site:
        cfg = self._cfg
        rate = parse_rate(config.max_rate) if config and config.max_rate else self._default_rate
        return Site(key=key,
                    max_connections=(config and config.max_connections)
                    or cfg.concurrency_per_destination,
                    messages_per_connection=(config and config.messages_per_connection)
                    or cfg.messages_per_session, rate=rate)

    def connections(self, site: Site) -> asyncio.Semaphore:
        sem = self._semaphores.get(site.key)
        if sem is None:
            sem = self._semaphores[site.key] = asyncio.Semaphore(site.max_connections)
        return sem

    async def held(self, site: Site) -> SiteHold | None:
        """The site's suspension in force, if any (a slowed site is not held)."""
        now = self._clock()
        if now - self._read_at >= REFRESH:
            self._read_at = now
            try:
                self._holds = {h.site: h for h in await self._store.site_holds(now)}
            except StoreError:
                log.warning("could not read the site holds; using the ones known")
        hold = self._holds.get(site.key)
        if hold is None or hold.until <= now:
            return None
        return hold if hold.rate is None else None

    async def pace(self, site: Site) -> SiteHold | None:
        """Wait for the site's next message slot; a suspension that began meanwhile (this
        node's own, from a reply in another session) is returned instead."""
        now = self._clock()
        hold = self._holds.get(site.key)
        rate = site.rate
        if hold is not None and hold.until > now:
            if hold.rate is None:
                return hold
            rate = min(rate, hold.rate) if rate else hold.rate
        if rate:
            await self._pacers.setdefault(site.key, _Pacer()).wait(rate)
        return None

    def unpaced(self, site: Site) -> bool:
        """True when pace() would return at once: no rate for the site and no hold on it."""
        hold = self._holds.get(site.key)
        return not site.rate and (hold is None or hold.until <= self._clock())

    def reply(self, site: Site, reply: str) -> SiteHold | None:
        """A remote's reply ("421 4.7.28 text"): the hold it starts under the first rule it
        matches (recorded in the store in the background), else None."""
        for rule in self._rules:
            if not rule.pattern.search(reply):
                continue
            now = self._clock()
            if rule.suspend:
                hold = SiteHold(site=site.key, until=now + rule.suspend, rate=None,
                                reason=reply[:300], since=now)
            else:
                hold = SiteHold(site=site.key, until=now + rule.duration, rate=rule.rate,
                                reason=reply[:300], since=now)
            known = self._holds.get(site.key)
            if known is not None and known.until > now and (
                    known.rate is None or known.rate == hold.rate):
                return known if known.rate is None else None  # held already (other sessions)
            self._holds[site.key] = hold
            site_held(site.key, "suspend" if hold.rate is None else "slow")
            log.warning("site %s %s until %s after %r", site.key,
                        "suspended" if hold.rate is None else f"slowed to {hold.rate:g}/s",
                        time.strftime("%H:%M:%S", time.gmtime(hold.until)), reply)
            asyncio.ensure_future(self._save(hold))
            return hold if hold.rate is None else None
        return None

    async def _save(self, hold: SiteHold) -> None:
        try:
            await self._store.hold_site(hold)
        except StoreError:
            log.warning("could not record the hold on %s", hold.site)


def _patterns(site: SiteConfig) -> tuple[tuple[str, ...], tuple[ipaddress._BaseNetwork, ...]]:
    names: list[str] = []
    networks: list[ipaddress._BaseNetwork] = []
    for p in site.mx:
        try:
            networks.append(ipaddress.ip_network(p, strict=False))
        except ValueError:
            names.append(p)
    return tuple(names), tuple(networks)


def _matches(t: Target, names: Sequence[str], networks: Sequence[ipaddress._BaseNetwork]) -> bool:
    host = t.hostname.lower().rstrip(".")
    for pattern in names:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern:
            return True
    if networks:
        try:
            ip = ipaddress.ip_address(t.address)
        except ValueError:
            return False
        return any(ip in n for n in networks if n.version == ip.version)
    return False
