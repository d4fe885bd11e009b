"""MailChannels' metrics and usage, read through the `mailchannels` SDK with its strict
response models: counted from the events of the caller's owner's mail only."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path
from typing import Any

import pytest
from mailchannels.exceptions import ForbiddenError, InvalidRequestError, NotFoundError

from relay.types import Suppression

from .dnsserver import DNSServer
from .sink import Sink
from .test_delivery import wait_final
from .test_mailchannels_manage import MAIL, keyed
from .test_mailchannels_send import start


async def test_volume_performance_engagement_and_usage_are_the_owners(
        tmp_path: Path, dns: DNSServer) -> None:
    async with Sink() as sink:
        svc, _ = await start(tmp_path, dns, sink)
        mine, theirs = await keyed(svc, "example.com"), await keyed(svc, "other.example")
        try:
            await svc.store.add_suppression(Suppression(
                address="gone@example.org", scope="", reason="hard_bounce", source="test",
                created_at=0.0))
            sent = await asyncio.to_thread(mine.emails.send, {
                **MAIL, "campaign_id": "c1",
                "tracking_settings": {"open_tracking": {"enable": True}},
                "personalizations": [{"to": [{"email": "bob@example.org"}]},
                                     {"to": [{"email": "carol@example.org"}]},
                                     {"to": [{"email": "gone@example.org"}]}]})
            for r in sent.results[:2]:
                await wait_final(svc, r.message_id)
            await asyncio.to_thread(mine.emails.send, MAIL)  # outside the campaign

            volume = await asyncio.to_thread(mine.metrics.volume, campaign_id="c1")
            assert (volume.processed, volume.delivered, volume.dropped) == (2, 2, 1)
            assert set(volume.buckets) == {"processed", "delivered", "dropped"}
            today = datetime.datetime.now(datetime.UTC).date().isoformat()
            last = volume.buckets["delivered"][-1]
            assert last.period_start.startswith(today) and last.count == 2
            assert len(volume.buckets["processed"]) in (30, 31)  # a day each, zeros too
            everything = await asyncio.to_thread(mine.metrics.volume, interval="hour")
            assert everything.processed == 3
            assert len(everything.buckets["processed"]) in (720, 721)

            perf = await asyncio.to_thread(mine.metrics.performance, campaign_id="c1",
                                           interval="month")
            assert (perf.processed, perf.delivered, perf.bounced) == (2, 2, 0)
            engagement = await asyncio.to_thread(mine.metrics.engagement, campaign_id="c1",
                                                 interval="week")
            assert engagement.open_tracking_delivered == 2
            assert engagement.click_tracking_delivered == 0 and engagement.open == 0
            behaviour = await asyncio.to_thread(mine.metrics.recipient_behaviour)
            assert behaviour.unsubscribed == 0 and behaviour.unsubscribe_delivered == 0

            usage = await asyncio.to_thread(mine.usage.retrieve)
            assert usage.total_usage == 3
            assert usage.period_start_date == today[:8] + "01"
            campaigns = await asyncio.to_thread(mine.metrics.senders, "campaigns")
            assert campaigns.total == 1 and (campaigns.limit, campaigns.offset) == (10, 0)
            (c1,) = campaigns.senders
            assert (c1.name, c1.processed, c1.delivered, c1.dropped, c1.bounced) == (
                "c1", 2, 2, 1, 0)
            assert (await asyncio.to_thread(mine.metrics.senders, "sub-accounts")).senders == []
            assert (await asyncio.to_thread(theirs.metrics.senders, "campaigns")).total == 0
            # another owner's numbers hold none of it
            assert (await asyncio.to_thread(theirs.metrics.volume)).processed == 0
            assert (await asyncio.to_thread(theirs.usage.retrieve)).total_usage == 0
            # a window in the past has nothing
            old = await asyncio.to_thread(mine.metrics.volume, start_time="2020-01-01",
                                          end_time="2020-01-02T00:00:00Z")
            assert old.processed == 0 and len(old.buckets["processed"]) == 1
        finally:
            await svc.stop()


async def test_metrics_refusals_name_the_field(tmp_path: Path, dns: DNSServer) -> None:
    async with Sink() as sink:
        svc, _ = await start(tmp_path, dns, sink)
        mine = await keyed(svc, "example.com")
        no_read = await keyed(svc, "example.com", scopes=("emails:send",))
        try:
            cases: list[tuple[dict[str, Any], str]] = [
                ({"interval": "fortnight"}, "interval"),
                ({"start_time": "soon"}, "start_time"),
                ({"end_time": "2020-13-01"}, "end_time"),
                ({"start_time": "2020-01-02", "end_time": "2020-01-01"}, "start_time"),
                ({"start_time": "2020-01-01", "end_time": "2022-01-01"}, "start_time"),
            ]
            for params, param in cases:
                with pytest.raises(InvalidRequestError) as refused:
                    await asyncio.to_thread(mine.request, "GET", "/metrics/volume",
                                            params=params)
                assert refused.value.status_code == 400
                assert refused.value.response["param"] == param, params
            with pytest.raises(InvalidRequestError) as refused:
                await asyncio.to_thread(mine.request, "GET", "/metrics/senders/campaigns",
                                        params={"sort_order": "sideways"})
            assert refused.value.response["param"] == "sort_order"
            with pytest.raises(NotFoundError):
                await asyncio.to_thread(mine.request, "GET", "/metrics/senders/teams")
            with pytest.raises(ForbiddenError):
                await asyncio.to_thread(no_read.metrics.engagement)
            with pytest.raises(ForbiddenError):
                await asyncio.to_thread(no_read.usage.retrieve)
        finally:
            await svc.stop()
