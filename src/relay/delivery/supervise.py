"""The master's handle on the delivery worker: start it, wake it, restart it if it dies, stop it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import sys

from .. import metrics
from ..aio import cancel_and_wait
from . import metricspipe
from .child import signal_name
from .worker import WorkerArgs

log = logging.getLogger(__name__)

RESTART_DELAY = 1.0
STOP_TIMEOUT = 30.0  # seconds a stopping worker process has before SIGKILL


class WorkerProcess:
    def __init__(self, args: WorkerArgs, remote: metrics.Remote | None = None) -> None:
        self._args = args
        self._remote = remote  # where the worker's metrics snapshots go (metricspipe.py)
        self._metrics: asyncio.Task[None] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._wake_w: int | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def alive(self) -> bool:
        """The worker process runs now (False between a death and its restart)."""
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        await self._spawn()
        self._watch = asyncio.create_task(self._supervise(), name="worker-supervisor")

    async def _spawn(self) -> None:
        read_end, write_end = os.pipe()
        metrics_r, metrics_w = os.pipe()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relay.delivery.worker", str(read_end), str(metrics_w),
                stdin=asyncio.subprocess.PIPE, pass_fds=(read_end, metrics_w),
                # a session (and group) of its own: a terminal's hangup or ^C to relay's group is the
                # master's to act on (reload, drain), not a kill of the worker mid-session
                start_new_session=True)
        except BaseException:
            os.close(metrics_r)
            raise
        finally:
            os.close(read_end)
            os.close(metrics_w)
        await self._receive_metrics(metrics_r)
        assert self._proc.stdin is not None
        self._proc.stdin.write(pickle.dumps(self._args))
        await self._proc.stdin.drain()
        self._proc.stdin.close()
        os.set_blocking(write_end, False)
        if self._wake_w is not None:
            os.close(self._wake_w)
        self._wake_w = write_end
        self.poke()  # whatever is due now

    def poke(self) -> None:
        """New mail was committed: wake the worker's scheduler."""
        if self._wake_w is None:
            return
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self._wake_w, b"\0")  # a full pipe already means "wake up"

    async def _receive_metrics(self, fd: int) -> None:
        """Read the new worker's snapshots; what the last one counted is kept."""
        await cancel_and_wait(self._metrics)
        if self._remote is None:
            os.close(fd)
            return
        self._remote.restarted()
        self._metrics = asyncio.create_task(metricspipe.receive(fd, self._remote),
                                            name="worker-metrics")

    async def _supervise(self) -> None:
        while not self._stopping:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            killed = signal_name(code)
            if killed:
                log.error("the delivery worker was killed by %s; restarting", killed)
            else:
                log.error("the delivery worker exited with %s; restarting it", code)
            await asyncio.sleep(RESTART_DELAY)
            await self._spawn()

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        self._stopping = True
        await cancel_and_wait(self._watch)
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._wake_w is not None:
            os.close(self._wake_w)
            self._wake_w = None
        await cancel_and_wait(self._metrics)
        self._metrics = None
