"""Where a destination's mail goes and how: its targets (MX hosts or the smarthost, each with
its TLS policy), the site they belong to with its limits and holds, and the source address
it leaves from. The scheduler asks for a route per job; a Hold says "not now"."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ..config import Config, parse_hostport
from ..store import SQLiteStore
from .deliver import Hold, Lane
from .mx import MXResolver
from .outbound import Target
from .pools import Grant, Pools
from .shaping import Shaper, Site
from .tlspolicy import TlsPolicies

SMARTHOST = "[smarthost]"  # the destination of everything when a smarthost is set


@dataclass(frozen=True, kw_only=True)
class Route:
    targets: list[Target]
    site: Site
    grant: Grant


class Router:
    def __init__(self, config: Config, store: SQLiteStore, resolver: MXResolver,
                 tls: TlsPolicies, *, clock: Callable[[], float] = time.time) -> None:
        self._delivery = config.delivery
        self._resolver = resolver
        self._tls = tls
        self._clock = clock
        self.shaper = Shaper(config.delivery, store, clock=clock)
        self.pools = Pools(config.delivery, config.server.hostname, store, clock=clock)

    def destination(self, domain: str) -> str:
        return SMARTHOST if self._delivery.smarthost else domain

    def pool_name(self, asked: str, stream: str) -> str:
        """The pool a recipient's message leaves from ("": the default source)."""
        pool = self.pools.pool(asked, stream)
        return pool.name if pool else ""

    async def route(self, destination: str, pool: str, count: int) -> Route | Hold:
        """How `count` recipients to `destination` from `pool` go now, or the Hold that keeps
        them back. Raises DeliveryFailure when the destination cannot be resolved."""
        targets, primary = await self._targets(destination)
        site = self.shaper.site(primary, targets)
        hold = await self.shaper.held(site)
        if hold is not None:
            return _hold(site, hold.until, hold.reason)
        config = self.pools.pool(pool, "") if pool else None
        grant = await self.pools.grant(config, count)
        if grant.count == 0:
            return Hold(kind="warmup", reason=f"the warm-up caps of pool {pool} are spent for today",
                        until=grant.until)
        return Route(targets=targets, site=site, grant=grant)

    def lane(self, route: Route) -> Lane:
        site = route.site

        async def pace() -> Hold | None:
            hold = await self.shaper.pace(site)
            return _hold(site, hold.until, hold.reason) if hold else None

        def reply(text: str) -> Hold | None:
            hold = self.shaper.reply(site, text)
            return _hold(site, hold.until, hold.reason) if hold else None

        return Lane(source=route.grant.source, per_session=site.messages_per_connection,
                    site=site.key, pace=pace, reply=reply,
                    unpaced=lambda: self.shaper.unpaced(site))

    async def _targets(self, destination: str) -> tuple[list[Target], str]:
        if destination == SMARTHOST:
            host, port = parse_hostport(self._delivery.smarthost, default_port=25)
            return [Target(hostname=host, address=a, port=port)
                    for a in await self._resolver.addresses(host)], host
        hosts = await self._resolver.resolve(destination)
        best = min((h.preference for h in hosts), default=0)
        primary = min((h.name for h in hosts if h.preference == best), default=destination)
        return await self._tls.targets(destination, hosts, self._delivery.mx_port), primary


def _hold(site: Site, until: float, reason: str) -> Hold:
    return Hold(reason=f"site {site.key} is held back until "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(until))} UTC after: "
                       f"{reason}", until=until)
