"""The numbers an operator looks at (the dashboard, `GET /v1/stats`): the live queue, the last
day's outcomes, failures and bounce reasons, the webhook backlog; every query bounded by a
time window or a LIMIT and served by an index."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import owners
from ..owners import Within
from ..types import WAITING_STATUSES, EventType
from .counts import waiting
from .thread import DbThread

WINDOW = 24 * 3600  # the chart, the failures and the bounce reasons cover the last day
TOP_DESTINATIONS = 20
RECENT_FAILURES = 25
TOP_REASONS = 20
FAILING_ENDPOINTS = 20

# the queue: recipients not yet final (final ones are history, shown by the chart)
LIVE = WAITING_STATUSES
OUTCOMES = (EventType.DELIVERED.value, EventType.DEFERRED.value, EventType.BOUNCED.value,
            EventType.EXPIRED.value)
FAILURES = (EventType.DEFERRED.value, EventType.BOUNCED.value, EventType.EXPIRED.value)


@dataclass(frozen=True, kw_only=True)
class Destination:
    domain: str
    counts: dict[str, int]  # live status -> recipients
    total: int


@dataclass(frozen=True, kw_only=True)
class HourOutcomes:
    start: float  # the hour's first second (epoch)
    counts: dict[str, int]  # "delivered" | "deferred" | "bounced" | "expired" -> events


@dataclass(frozen=True, kw_only=True)
class Failure:
    at: float
    message_id: str
    recipient: str
    outcome: str  # "deferred" | "bounced" | "expired"
    code: int | None
    enhanced: str | None
    reply: str  # the remote server's words (attacker-controlled text)
    mx_host: str | None


@dataclass(frozen=True, kw_only=True)
class FailingEndpoint:
    id: str
    url: str
    enabled: bool
    failing_since: float | None
    disabled_reason: str | None
    pending: int


@dataclass(frozen=True, kw_only=True)
class Stats:
    at: float
    window: int
    queue: dict[str, int]  # every live status, zero included
    destinations: list[Destination]
    hours: list[HourOutcomes]  # oldest first, 24 of them, the last one the current hour
    failures: list[Failure]  # newest first
    bounce_reasons: list[tuple[str, int]]  # most first
    webhook_pending: int
    webhook_oldest: float | None  # when the oldest undelivered webhook was made
    failing_endpoints: list[FailingEndpoint]


@dataclass(frozen=True, kw_only=True)
class HourCount:
    """Events of one type in one hour, of messages with one tracking setting and stream."""

    hour: float  # the hour's first second (epoch)
    type: str
    track: str  # the message's tracking: "", "opens", "clicks" or "opens,clicks"
    stream: str
    count: int


class StatsQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: DbThread

    async def stats(self, now: float) -> Stats:
        found: Stats = await self._reader.run(lambda db: _stats(db, now))
        return found


    async def event_hours(self, *, types: tuple[str, ...], since: float, until: float,
                          within: Within, campaign: str | None = None) -> list[HourCount]:
        """Message events of `types` in [since, until), counted by hour, of the messages
        within a caller's reach (and of one campaign: metadata's campaignId)."""
        def op(db: sqlite3.Connection) -> list[HourCount]:
            reach, args = owners.message_sql(within, "m.sender_domain")
            sql = ("SELECT CAST(floor(e.created_at / 3600) AS INTEGER), e.type, m.track,"
                   " m.stream, count(*) FROM events e JOIN messages m ON m.id = e.message_id"
                   f" WHERE e.type IN ({_marks(types)}) AND e.created_at >= ?"
                   f" AND e.created_at < ? AND {reach}")
            values: list[Any] = [*types, since, until, *args]
            if campaign is not None:
                sql += " AND json_extract(m.metadata, '$.campaignId') = ?"
                values.append(campaign)
            rows = db.execute(sql + " GROUP BY 1, 2, 3, 4", values).fetchall()
            return [HourCount(hour=float(r[0] * 3600), type=r[1], track=r[2] or "",
                              stream=r[3], count=r[4]) for r in rows]

        found: list[HourCount] = await self._reader.run(op)
        return found


    async def campaign_counts(self, *, types: tuple[str, ...], since: float, until: float,
                              within: Within) -> list[tuple[str, str, int]]:
        """(campaign, event type, count) of the message events of `types` in [since,
        until) within a caller's reach, for mail with a campaign (metadata's campaignId)."""
        def op(db: sqlite3.Connection) -> list[tuple[str, str, int]]:
            reach, args = owners.message_sql(within, "m.sender_domain")
            rows = db.execute(
                "SELECT json_extract(m.metadata, '$.campaignId'), e.type, count(*)"
                " FROM events e JOIN messages m ON m.id = e.message_id"
                f" WHERE e.type IN ({_marks(types)}) AND e.created_at >= ?"
                f" AND e.created_at < ? AND {reach}"
                " AND json_extract(m.metadata, '$.campaignId') IS NOT NULL GROUP BY 1, 2",
                (*types, since, until, *args)).fetchall()
            return [(str(r[0]), r[1], r[2]) for r in rows]

        found: list[tuple[str, str, int]] = await self._reader.run(op)
        return found


def _marks(values: tuple[str, ...]) -> str:
    return ", ".join("?" * len(values))


def _stats(db: sqlite3.Connection, now: float) -> Stats:
    pending, oldest = db.execute(
        "SELECT count(*), min(created_at) FROM webhook_outbox"
        " WHERE delivered_at IS NULL AND next_attempt_at IS NOT NULL").fetchone()
    return Stats(at=now, window=WINDOW, queue=waiting(db), destinations=_destinations(db),
                 hours=_hours(db, now), failures=_failures(db, now),
                 bounce_reasons=_reasons(db, now), webhook_pending=pending,
                 webhook_oldest=oldest, failing_endpoints=_endpoints(db))


def _destinations(db: sqlite3.Connection) -> list[Destination]:
    rows = db.execute(
        f"SELECT domain, status, count(*) FROM recipients WHERE status IN ({_marks(LIVE)})"
        " GROUP BY domain, status", LIVE).fetchall()
    by: dict[str, dict[str, int]] = {}
    for domain, status, n in rows:
        by.setdefault(domain, {})[status] = n
    ranked = sorted(by.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    return [Destination(domain=d, counts=c, total=sum(c.values()))
            for d, c in ranked[:TOP_DESTINATIONS]]


def _hour(t: float) -> float:
    return float(int(t // 3600) * 3600)


def _hours(db: sqlite3.Connection, now: float) -> list[HourOutcomes]:
    first = _hour(now) - 23 * 3600
    hours = [HourOutcomes(start=first + i * 3600, counts={t.removeprefix("email."): 0
                                                         for t in OUTCOMES})
             for i in range(24)]
    rows = db.execute(  # the events_type_created index
        # floor, not CAST: PostgreSQL's CAST rounds to the nearest integer, SQLite's truncates
        f"SELECT CAST(floor((created_at - ?) / 3600) AS INTEGER), type, count(*) FROM events"
        f" WHERE type IN ({_marks(OUTCOMES)}) AND created_at >= ? AND created_at <= ?"
        " GROUP BY 1, 2", (first, *OUTCOMES, first, now + 3600)).fetchall()
    for index, kind, n in rows:
        if 0 <= index < 24:
            hours[index].counts[kind.removeprefix("email.")] = n
    return hours


def _failures(db: sqlite3.Connection, now: float) -> list[Failure]:
    rows = db.execute(
        "SELECT created_at, message_id, type, json_extract(data, '$.email'),"
        " json_extract(data, '$.code'),"
        " coalesce(json_extract(data, '$.enhanced'), json_extract(data, '$.status')),"
        " coalesce(json_extract(data, '$.reply'), json_extract(data, '$.diagnostic'),"
        "          json_extract(data, '$.reason'), ''),"
        " coalesce(json_extract(data, '$.mxHost'), json_extract(data, '$.remoteMta'))"
        f" FROM events WHERE type IN ({_marks(FAILURES)}) AND created_at >= ?"
        " ORDER BY created_at DESC, id DESC LIMIT ?",
        (*FAILURES, now - WINDOW, RECENT_FAILURES)).fetchall()
    return [Failure(at=r[0], message_id=r[1] or "", outcome=r[2].removeprefix("email."),
                    recipient=r[3] or "", code=_code(r[4]),
                    enhanced=r[5] if isinstance(r[5], str) else None, reply=str(r[6]),
                    mx_host=r[7] if isinstance(r[7], str) else None) for r in rows]


def _reasons(db: sqlite3.Connection, now: float) -> list[tuple[str, int]]:
    rows = db.execute(
        "SELECT CASE WHEN type = ? THEN 'expired'"
        "  ELSE coalesce(json_extract(data, '$.reason'), 'unclassified') END, count(*)"
        " FROM events WHERE type IN (?, ?) AND created_at >= ?"
        " GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?",
        (EventType.EXPIRED.value, EventType.BOUNCED.value, EventType.EXPIRED.value,
         now - WINDOW, TOP_REASONS)).fetchall()
    return [(str(reason), n) for reason, n in rows]


def _endpoints(db: sqlite3.Connection) -> list[FailingEndpoint]:
    rows = db.execute(
        "SELECT w.id, w.url, w.enabled, w.failing_since, w.disabled_reason,"
        " (SELECT count(*) FROM webhook_outbox o WHERE o.endpoint_id = w.id"
        "  AND o.delivered_at IS NULL AND o.next_attempt_at IS NOT NULL)"
        " FROM webhook_endpoints w WHERE w.failing_since IS NOT NULL OR w.enabled = 0"
        " ORDER BY w.failing_since IS NULL, w.failing_since, w.id LIMIT ?",
        (FAILING_ENDPOINTS,)).fetchall()
    return [FailingEndpoint(id=r[0], url=r[1], enabled=bool(r[2]), failing_since=r[3],
                            disabled_reason=r[4], pending=r[5]) for r in rows]


def _code(value: Any) -> int | None:
    """The SMTP code of an event: SQLite's json_extract gives a number, PostgreSQL's (the
    schema's function) the text of it."""
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, str) and value.isdigit() else None
