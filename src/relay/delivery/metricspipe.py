"""The delivery worker's counts (and an API worker's), carried to the master over a pipe.

The worker counts deliveries, DKIM trouble and its store's commits in its own registry; every
SEND_INTERVAL it writes the whole registry's cumulative samples as one JSON line
(relay.metrics.snapshot). The master keeps the last line it read (relay.metrics.Remote) and
adds it to its own counts at scrape time. Cumulative snapshots make a lost or skipped line
harmless: the next one carries everything. When the master does not read, the worker skips
lines rather than buffering them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from .. import metrics

log = logging.getLogger(__name__)

SEND_INTERVAL = 1.0
MAX_LINE = 8 * 1024 * 1024  # a snapshot is tens of kB; past this the worker is not itself
MAX_UNSENT = 256 * 1024  # octets waiting in the worker's buffer: skip lines past it


async def send(fd: int, interval: float = SEND_INTERVAL, *,
               line: Callable[[], bytes] | None = None) -> None:
    """Write snapshots (or what `line` makes, a line ending in a newline) to `fd` until
    cancelled or the reader closes its end."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_write_pipe(
        asyncio.Protocol, os.fdopen(fd, "wb", buffering=0))
    try:
        while not transport.is_closing():
            if transport.get_write_buffer_size() < MAX_UNSENT:
                transport.write(line() if line is not None
                                else metrics.json_line(metrics.snapshot()))
            await asyncio.sleep(interval)
    finally:
        transport.close()


async def receive(fd: int, remote: metrics.Remote, who: str = "the delivery worker") -> None:
    """Read snapshots from `fd` into `remote` until the worker closes its end."""

    def update(line: bytes) -> None:
        try:
            remote.update(metrics.parse_snapshot(line))
        except ValueError as exc:
            log.warning("%s sent metrics that are not a snapshot: %s", who, exc)

    await read_lines(fd, update, who)


async def read_lines(fd: int, each: Callable[[bytes], None], who: str) -> None:
    """Hand each line read from `fd` to `each` until the writer closes its end."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    try:
        while line := await reader.readline():
            each(line)
    except ValueError:  # a line past MAX_LINE: nothing more from this process
        log.error("%s's metrics line is over %d octets; ignoring it", who, MAX_LINE)
    finally:
        with contextlib.suppress(Exception):
            transport.close()
