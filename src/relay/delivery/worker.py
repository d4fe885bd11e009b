"""The delivery process: its own store connection and scheduler, woken through the master's pipe.

Accepting and delivering each take a core this way (Python runs one thread of
Python at a time per process), the way Postfix splits smtpd from qmgr and smtp.
The master writes a byte to the pipe after each commit of new mail; EOF on the
pipe means the master is gone, and the worker stops (on Linux the kernel also
kills it at once if the master dies, so no orphan delivers behind a restart).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import sys
from dataclasses import dataclass

from .. import logs, metrics
from ..aio import cancel_and_wait, run_loop
from ..config import Config
from . import metricspipe
from .child import die_with_parent, ignore_hangup
from .stack import delivery_stack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerArgs:
    config: Config
    own_listeners: tuple[tuple[str, int], ...]
    recover: bool = True  # False for a reload's worker: the old one's leases stand


async def serve(args: WorkerArgs, wake_fd: int, metrics_fd: int | None = None) -> None:
    metrics.configure(process="worker", domains=args.config.metrics.domains)
    store, scheduler = delivery_stack(args.config, list(args.own_listeners))
    await store.open()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = os.read(wake_fd, 4096)
        except BlockingIOError:
            return
        if data:
            scheduler.notify()
        else:  # the master closed its end: it is gone
            stop.set()

    os.set_blocking(wake_fd, False)
    loop.add_reader(wake_fd, readable)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)  # `kill -USR1`: what is it waiting on?
    sending: asyncio.Task[None] | None = None
    if metrics_fd is not None:
        sending = asyncio.create_task(metricspipe.send(metrics_fd), name="metrics")
    try:
        await scheduler.start(recover=args.recover)
        await stop.wait()
    finally:
        await cancel_and_wait(sending)
        loop.remove_reader(wake_fd)
        await scheduler.stop()
        await store.close()


def _dump_tasks() -> None:
    for task in asyncio.all_tasks():
        print(f"--- {task.get_name()}", file=sys.stderr)
        task.print_stack(limit=12, file=sys.stderr)
    sys.stderr.flush()


def main() -> None:
    die_with_parent()
    ignore_hangup()
    wake_fd = int(sys.argv[1])
    metrics_fd = int(sys.argv[2]) if len(sys.argv) > 2 else None
    args: WorkerArgs = pickle.load(sys.stdin.buffer)  # from our own master, over a pipe
    logs.configure(args.config.log, process="worker")
    if os.getppid() == 1:  # the master died before we could ask to die with it
        return
    run_loop(serve(args, wake_fd, metrics_fd))


if __name__ == "__main__":
    main()
