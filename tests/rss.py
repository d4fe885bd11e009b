"""The peak resident memory of this process over a block, sampled by a thread: tracemalloc
misses what orjson and the C libraries allocate, and ru_maxrss never goes down between tests."""

from __future__ import annotations

import os
import threading
from types import TracebackType
from typing import Self

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """Resident octets now (Linux)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRss:
    """`with PeakRss() as peak: ...` then `peak.growth`: the highest RSS seen in the block
    less the RSS at its start, sampled every millisecond."""

    def __init__(self) -> None:
        self.start = self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, rss())

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.start)

    def __enter__(self) -> Self:
        self.start = self.peak = rss()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
