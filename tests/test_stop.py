"""A service loop stops when told to, even when it is woken in the same moment.

On Python 3.11, asyncio.wait_for gives a task cancelled in the same turn of the loop as its
event is set the event's result instead of CancelledError, so a loop sleeping in it ran on
forever and Service.stop() with it (a CI run hung there for its whole 90 minutes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relay.config import DeliveryConfig
from relay.service import Service

from .conftest import make_config

IDLE = 0.3  # long enough for each loop to be asleep in its timed wait


async def test_the_scheduler_stops_when_woken_as_it_is_stopped(tmp_path: Path) -> None:
    svc = Service(make_config(tmp_path, delivery=DeliveryConfig(process=False)))
    await svc.start()
    try:
        scheduler = svc.scheduler
        assert scheduler is not None
        await asyncio.sleep(IDLE)  # nothing queued: asleep until woken or the idle poll
        scheduler.notify()  # as a delivery job ending does
        await asyncio.wait_for(scheduler.stop(), 5)
    finally:
        svc.scheduler = None
        await svc.stop()


async def test_the_webhook_dispatcher_stops_when_woken_as_it_is_stopped(
        tmp_path: Path) -> None:
    svc = Service(make_config(tmp_path))
    await svc.start()
    try:
        dispatcher = svc.webhooks
        assert dispatcher is not None
        await asyncio.sleep(IDLE)
        dispatcher.notify()  # as a message queued does
        await asyncio.wait_for(dispatcher.stop(), 5)
    finally:
        svc.webhooks = None
        await svc.stop()
