"""MailChannels' metrics (/tx/v1/metrics/...) and usage (/tx/v1/usage), counted from relay's
events of the mail within the caller's reach, in the shapes the `mailchannels` SDK reads.

What each number counts (relay's events): processed = email.queued, delivered, dropped
(suppressed at submission or dropped later), bounced (hard and soft), complained, open,
click, unsubscribed; open_tracking_delivered and click_tracking_delivered are the deliveries
of messages sent with that tracking on, unsubscribe_delivered the deliveries of broadcast
(non-transactional) mail, which carries the unsubscribe links. Unique opens and clicks are
not counted (the SDK's models leave them optional). The window is [start_time, end_time),
30 days up to now by default and at most 366 days; buckets are UTC hours, days, ISO weeks
(from Monday) or calendar months, each period of the window listed, zero ones included.
Senders are campaigns (the campaign_id mail was sent with); relay has no sub-accounts, so
that list is empty. Usage is what was processed in the current calendar month (UTC); relay sets no monthly
limit.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from ...store import SQLiteStore
from ...store.stats import HourCount
from ...types import EventType, Stream
from .. import auth
from ..errors import ApiError
from ..requests import int_param
from .common import in_shape
from .mailchannels import STATUSES, caller, error_body

DEFAULT_WINDOW = 30 * 86400
MAX_WINDOW = 366 * 86400
INTERVALS = ("hour", "day", "week", "month")
UTC = datetime.UTC

# which hourly counts a number adds up: an event type, and which messages' events count
Counts = tuple[EventType, Callable[[HourCount], bool]]


def _every(h: HourCount) -> bool:
    return True


def _opens(h: HourCount) -> bool:
    return "opens" in h.track


def _clicks(h: HourCount) -> bool:
    return "clicks" in h.track


def _broadcast(h: HourCount) -> bool:
    return h.stream == Stream.BROADCAST.value


_SERIES: dict[str, dict[str, Counts]] = {
    "volume": {"processed": (EventType.QUEUED, _every),
               "delivered": (EventType.DELIVERED, _every),
               "dropped": (EventType.DROPPED, _every)},
    "performance": {"processed": (EventType.QUEUED, _every),
                    "delivered": (EventType.DELIVERED, _every),
                    "bounced": (EventType.BOUNCED, _every),
                    "complained": (EventType.COMPLAINED, _every)},
    "engagement": {"open": (EventType.OPENED, _every), "click": (EventType.CLICKED, _every),
                   "open_tracking_delivered": (EventType.DELIVERED, _opens),
                   "click_tracking_delivered": (EventType.DELIVERED, _clicks)},
    "recipient-behaviour": {"unsubscribed": (EventType.UNSUBSCRIBED, _every),
                            "unsubscribe_delivered": (EventType.DELIVERED, _broadcast)},
}


# a sender row's numbers
_SENDER_FIELDS = {"processed": EventType.QUEUED, "delivered": EventType.DELIVERED,
                  "dropped": EventType.DROPPED, "bounced": EventType.BOUNCED}


def time_param(raw: str | None, name: str) -> float | None:
    """An ISO 8601 date or time (UTC unless it says otherwise) as epoch seconds."""
    if not raw:
        return None
    try:
        value = datetime.datetime.fromisoformat(raw.strip())
    except ValueError:
        raise ApiError(400, f"{name} {raw!r} is not an ISO 8601 date or time",
                       param=name) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


class MailChannelsMetricsApi:
    def __init__(self, store: SQLiteStore, clock: Callable[[], float] = time.time) -> None:
        self._store, self._clock = store, clock

    def routes(self) -> list[web.RouteDef]:
        shaped = in_shape(error_body, STATUSES)
        return [web.get(f"/tx/v1/metrics/{name}", shaped(self._metrics(name)))
                for name in _SERIES] + [
            web.get("/tx/v1/metrics/senders/campaigns", shaped(self.campaigns)),
            web.get("/tx/v1/metrics/senders/sub-accounts", shaped(self.sub_accounts)),
            web.get("/tx/v1/usage", shaped(self.usage))]

    def _metrics(self, name: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            return await self.metrics(request, name)
        handler.__name__ = f"metrics_{name.replace('-', '_')}"
        return handler

    async def metrics(self, request: web.Request, name: str) -> web.Response:
        key = await caller(request, self._store)
        q = request.query
        since, until = _window(q, self._clock())
        interval = q.get("interval", "day")
        if interval not in INTERVALS:
            raise ApiError(400, f"interval {interval!r}: one of {', '.join(INTERVALS)}",
                           param="interval")
        campaign = q.get("campaign_id") or None
        series = _SERIES[name]
        hours = await self._store.event_hours(
            types=tuple(sorted({event.value for event, _ in series.values()})), since=since, until=until, within=auth.reach(key), campaign=campaign)
        periods = _periods(since, until, interval)
        out: dict[str, Any] = {}
        buckets: dict[str, list[dict[str, Any]]] = {}
        for field, (event, which) in series.items():
            by_period = dict.fromkeys(periods, 0)
            for h in hours:
                if h.type == event.value and which(h):
                    start = _period_start(max(h.hour, since), interval)
                    if start in by_period:
                        by_period[start] += h.count
            out[field] = sum(by_period.values())
            buckets[field] = [{"count": n, "period_start": _iso(p)}
                              for p, n in by_period.items()]
        return web.json_response({**out, "buckets": buckets})

    async def campaigns(self, request: web.Request) -> web.Response:
        """Each campaign's numbers (the campaign_id mail was sent with), most processed
        first (sort_order=asc: fewest)."""
        key = await caller(request, self._store)
        q = request.query
        since, until = _window(q, self._clock())
        limit = int_param(q.get("limit"), "limit", default=10, low=1, high=1000)
        offset = int_param(q.get("offset"), "offset", default=0, low=0, high=10**9)
        order = q.get("sort_order", "desc")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"sort_order {order!r}: asc or desc", param="sort_order")
        counted = await self._store.campaign_counts(
            types=tuple(e.value for e in _SENDER_FIELDS.values()), since=since, until=until,
            within=auth.reach(key))
        field_of = {event.value: field for field, event in _SENDER_FIELDS.items()}
        rows: dict[str, dict[str, Any]] = {}
        for campaign, type_, n in counted:
            row = rows.setdefault(campaign, {"name": campaign,
                                             **dict.fromkeys(_SENDER_FIELDS, 0)})
            row[field_of[type_]] += n
        ranked = sorted(rows.values(), key=lambda r: (r["processed"], r["name"]),
                        reverse=order == "desc")
        return web.json_response({"limit": limit, "offset": offset, "total": len(ranked),
                                  "senders": ranked[offset:offset + limit]})

    async def sub_accounts(self, request: web.Request) -> web.Response:
        """relay has no sub-accounts: an empty page."""
        await caller(request, self._store)
        q = request.query
        _window(q, self._clock())
        return web.json_response({
            "limit": int_param(q.get("limit"), "limit", default=10, low=1, high=1000),
            "offset": int_param(q.get("offset"), "offset", default=0, low=0, high=10**9),
            "total": 0, "senders": []})

    async def usage(self, request: web.Request) -> web.Response:
        key = await caller(request, self._store)
        now = datetime.datetime.fromtimestamp(self._clock(), UTC)
        first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        following = _next_month(first)
        hours = await self._store.event_hours(
            types=(EventType.QUEUED.value,), since=first.timestamp(),
            until=following.timestamp(), within=auth.reach(key))
        return web.json_response({
            "total_usage": sum(h.count for h in hours),
            "period_start_date": first.date().isoformat(),
            "period_end_date": (following - datetime.timedelta(days=1)).date().isoformat(),
            "monthly_limit": None})


def _window(q: Mapping[str, str], now: float) -> tuple[float, float]:
    """[start_time, end_time): 30 days up to now unless given, at most 366 days."""
    until = time_param(q.get("end_time"), "end_time") or now
    since = time_param(q.get("start_time"), "start_time")
    since = until - DEFAULT_WINDOW if since is None else since
    if since >= until:
        raise ApiError(400, "start_time must be before end_time", param="start_time")
    if until - since > MAX_WINDOW:
        raise ApiError(400, "the window is at most 366 days", param="start_time")
    return since, until


def _next_month(first: datetime.datetime) -> datetime.datetime:
    return first.replace(year=first.year + first.month // 12, month=first.month % 12 + 1)


def _period_start(ts: float, interval: str) -> float:
    t = datetime.datetime.fromtimestamp(ts, UTC)
    if interval == "hour":
        t = t.replace(minute=0, second=0, microsecond=0)
    else:
        t = t.replace(hour=0, minute=0, second=0, microsecond=0)
        if interval == "week":
            t -= datetime.timedelta(days=t.weekday())
        elif interval == "month":
            t = t.replace(day=1)
    return t.timestamp()


def _periods(since: float, until: float, interval: str) -> list[float]:
    """The start of every period the window touches, oldest first."""
    out = [_period_start(since, interval)]
    while True:
        t = datetime.datetime.fromtimestamp(out[-1], UTC)
        if interval == "month":
            nxt = _next_month(t)
        else:
            nxt = t + datetime.timedelta(hours=1 if interval == "hour" else
                                         7 * 24 if interval == "week" else 24)
        if nxt.timestamp() >= until:
            return out
        out.append(nxt.timestamp())


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
