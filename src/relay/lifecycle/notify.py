"""systemd's notify protocol (sd_notify(3)): READY=1 and STOPPING=1, a WATCHDOG=1 ping at
half of WatchdogSec while the master's loop runs and its store takes writes, and a STATUS=
line with the queue's depth (what `systemctl status relay` shows). Without NOTIFY_SOCKET in
the environment (not under systemd) every call is a no-op."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

from ..aio import cancel_and_wait
from .readiness import Parts, check_all

log = logging.getLogger(__name__)

STATUS_EVERY = 5.0  # seconds between STATUS= lines


def sd_notify(state: str, environ: Mapping[str, str] | None = None) -> None:
    """Send one state to systemd; a no-op outside it."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError:
            log.warning("could not notify systemd at %s", address)


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of WatchdogSec when systemd asks this process for pings (sd_watchdog_enabled)."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Notifier:
    """The task that pings the watchdog and reports the queue while relay runs."""

    def __init__(self, parts: Parts, environ: Mapping[str, str] | None = None) -> None:
        self._parts = parts
        self._environ = dict(os.environ if environ is None else environ)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._environ.get("NOTIFY_SOCKET"):
            self._task = asyncio.create_task(self._run(), name="systemd-notify")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        ping = watchdog_interval(self._environ)
        tick = min(ping, STATUS_EVERY) if ping else STATUS_EVERY
        status_at = 0.0
        while True:
            try:
                checks = await check_all(self._parts)
                if ping and checks[0].ok:  # the loop runs and the store takes writes
                    sd_notify("WATCHDOG=1", self._environ)
                if time.monotonic() >= status_at:
                    status_at = time.monotonic() + STATUS_EVERY
                    counts = await self._parts.store.count_waiting()
                    failed = [c.name for c in checks if not c.ok]
                    state = f"not ready: {', '.join(failed)}" if failed else "ready"
                    sd_notify("STATUS=" + ", ".join(f"{k} {v}" for k, v in counts.items())
                              + f"; {state}", self._environ)
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed count must not end the pings for good
                log.exception("systemd notification failed")
            await asyncio.sleep(tick)
