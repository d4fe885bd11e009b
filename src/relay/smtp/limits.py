"""What one SMTP listener allows a client: concurrent connections, and failed logins.

Each listener keeps its own counts, as Postfix's smtpd processes of one master.cf service
share an anvil count that the next service does not see: a client throttled for bad
logins on the submission port still hands its bounces to the inbound one.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from ..config import LimitsConfig

__all__ = ["AuthThrottle", "ConnectionCaps"]


class ConnectionCaps:
    """Concurrent connections to one listener, in all and from one client address
    (Postfix's smtpd_client_connection_count_limit)."""

    LOG_EVERY = 60.0  # seconds: one log line per refused client in this long, with a count

    def __init__(self, *, total: int, per_client: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._total, self._per_client = total, per_client
        self._by_client: Counter[str] = Counter()
        self.count = 0
        self._clock = clock
        self._refused: dict[str, tuple[float, int]] = {}  # ip -> (logged at, refused since)

    def to_log(self, ip: str) -> int:
        """How many refusals of `ip` to log now (0: it was logged less than LOG_EVERY ago),
        so that a flood of refused connections is one line a minute, not one each."""
        now = self._clock()
        logged, since = self._refused.get(ip, (now - self.LOG_EVERY, 0))
        if now - logged < self.LOG_EVERY:
            self._refused[ip] = (logged, since + 1)
            return 0
        if len(self._refused) >= 10_000:  # many addresses: forget, at worst log again
            self._refused.clear()
        self._refused[ip] = (now, 0)
        return since + 1

    @classmethod
    def from_limits(cls, limits: LimitsConfig, processes: int = 1) -> ConnectionCaps:
        """The caps of one of `processes` serving the listener ([smtp] workers): each holds
        its share of both, rounded up. The master hands connections out in turn, so a
        client's spread evenly, and together the processes hold at most processes - 1 more
        than the config says."""
        return cls(total=-(-limits.max_smtp_connections // processes),
                   per_client=-(-limits.max_smtp_connections_per_client // processes))

    def admit(self, ip: str) -> str | None:
        """Count a new connection from `ip`; or, when it is one too many, why not (it is
        then not counted)."""
        if self.count >= self._total:
            return "Too many connections; try again later"
        if self._by_client[ip] >= self._per_client:
            return "Too many connections from your address; try again later"
        self.count += 1
        self._by_client[ip] += 1
        return None

    def release(self, ip: str) -> None:
        """An admitted connection from `ip` has ended."""
        self.count -= 1
        left = self._by_client[ip] - 1
        if left > 0:
            self._by_client[ip] = left
        else:
            del self._by_client[ip]  # an address stays in memory only while connected

    def from_client(self, ip: str) -> int:
        return self._by_client[ip]


class AuthThrottle:
    """Failed logins per client IP: slowed after a few, refused (421) for a while after many."""

    def __init__(self, *, delay_after: int, block_after: int, block_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._delay_after, self._block_after = delay_after, block_after
        self._block_seconds = block_seconds
        self._clock = clock
        self._failures: dict[str, tuple[int, float]] = {}

    @classmethod
    def from_limits(cls, limits: LimitsConfig) -> AuthThrottle:
        return cls(delay_after=limits.auth_failures_before_delay,
                   block_after=limits.auth_failures_before_block,
                   block_seconds=limits.auth_block_seconds)

    def blocked(self, ip: str) -> bool:
        count, last = self._failures.get(ip, (0, 0.0))
        if count and self._clock() - last > self._block_seconds:
            del self._failures[ip]
            return False
        return count >= self._block_after

    @property
    def block_seconds(self) -> float:
        return self._block_seconds

    def note(self, ip: str, count: int) -> None:
        """The cluster's count for this client (the store's, on PostgreSQL): ours is at
        least that, as of now."""
        if count > self._failures.get(ip, (0, 0.0))[0]:
            self._failures[ip] = (count, self._clock())

    def failed(self, ip: str, at_least: int = 0) -> float:
        """Record a failure (`at_least`: the cluster's count with it); returns how long to
        wait before answering it."""
        count, _ = self._failures.get(ip, (0, 0.0))
        count = max(count + 1, at_least)
        self._failures[ip] = (count, self._clock())
        if len(self._failures) > 100_000:  # bound memory under a spray of addresses
            oldest = min(self._failures, key=lambda k: self._failures[k][1])
            del self._failures[oldest]
        return float(min(count - self._delay_after, 5)) if count > self._delay_after else 0.0

    def succeeded(self, ip: str) -> None:
        self._failures.pop(ip, None)
