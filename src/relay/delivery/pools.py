"""Source addresses: the [[delivery.pools]] a message leaves from (the one it asked for, else
the one serving its stream, else the host's default route), the address in it that sends
next, and each address's warm-up cap for the day (counted in the store across nodes)."""

from __future__ import annotations

import datetime
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..config import DeliveryConfig
from ..config.outbound import PoolConfig, SourceConfig
from ..store import SQLiteStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Source:
    """Where a session comes from: a local address and the name it gives in EHLO."""

    address: str | None  # None: the kernel's choice
    helo: str
    pool: str = ""


@dataclass(frozen=True, kw_only=True)
class Grant:
    source: Source
    count: int  # messages it may send now (the rest wait for tomorrow's caps)
    until: float  # when a capped-out pool has room again (next UTC midnight)


class Pools:
    def __init__(self, delivery: DeliveryConfig, hostname: str, store: SQLiteStore, *,
                 clock: Callable[[], float]) -> None:
        self._hostname = hostname
        self._store = store
        self._clock = clock
        self._pools = {p.name: p for p in delivery.pools}
        self._by_stream = {s: p for p in delivery.pools for s in p.streams}
        self._turns: dict[str, Iterator[SourceConfig]] = {
            p.name: itertools.cycle(p.sources) for p in delivery.pools}
        self.default = Source(address=None, helo=hostname)

    def pool(self, asked: str, stream: str) -> PoolConfig | None:
        """The pool a message leaves from; None: no pools, the default source."""
        return self._pools.get(asked) or self._by_stream.get(stream)

    async def grant(self, pool: PoolConfig | None, count: int) -> Grant:
        """The next source of `pool` with room for some of `count` messages today (round
        robin; an address past its warm-up cap is passed over). count 0: every cap is spent."""
        now = self._clock()
        tomorrow = _next_midnight(now)
        if pool is None:
            return Grant(source=self.default, count=count, until=tomorrow)
        day = _day(now)
        for _ in range(len(pool.sources)):
            config = next(self._turns[pool.name])
            source = Source(address=config.address, helo=config.helo or self._hostname,
                            pool=pool.name)
            cap = warmup_cap(pool, config, now)
            if cap is None:
                return Grant(source=source, count=count, until=tomorrow)
            granted = await self._store.take_source_quota(config.address, day, count, cap)
            if granted:
                return Grant(source=source, count=granted, until=tomorrow)
        return Grant(source=Source(address=None, helo=self._hostname, pool=pool.name),
                     count=0, until=tomorrow)


def warmup_cap(pool: PoolConfig, source: SourceConfig, now: float) -> int | None:
    """Messages `source` may send on the day of `now`: the pool's warm-up schedule from the
    source's first day; None once past it (or with no schedule)."""
    if not pool.warmup or not source.warmup_start:
        return None
    start = datetime.date.fromisoformat(source.warmup_start)
    index = (datetime.datetime.fromtimestamp(now, datetime.UTC).date() - start).days
    if index < 0:
        return pool.warmup[0]
    return pool.warmup[index] if index < len(pool.warmup) else None


def _day(now: float) -> str:
    return datetime.datetime.fromtimestamp(now, datetime.UTC).date().isoformat()


def _next_midnight(now: float) -> float:
    day = datetime.datetime.fromtimestamp(now, datetime.UTC).date() + datetime.timedelta(days=1)
    return datetime.datetime.combine(day, datetime.time(), datetime.UTC).timestamp()
