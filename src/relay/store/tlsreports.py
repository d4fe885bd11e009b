"""TLS sessions counted for TLS-RPT (RFC 8460) per day and policy domain, and the daily
reports made of them: each (day, policy domain) is claimed once, so one node sends it."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .thread import DbThread

CLAIMED = "sending"  # the error of a claimed report until its outcome is marked


@dataclass(frozen=True, kw_only=True)
class TlsCount:
    """Sessions of one outcome: a row of tls_results (result_type "" is success)."""

    day: str  # YYYY-MM-DD, UTC
    policy_domain: str
    policy_type: str  # sts | tlsa | no-policy-found
    policy_string: str  # the policy's lines joined by "\n"
    mx_host: str
    result_type: str
    sending_ip: str
    receiving_ip: str
    sessions: int


@dataclass(frozen=True, kw_only=True)
class TlsPolicyTotal:
    """Successful and failed sessions of one policy (type, text, MX host) in a day."""

    policy_type: str
    policy_string: str
    mx_host: str
    successes: int
    failures: int


@dataclass(frozen=True, kw_only=True)
class TlsDay:
    """What one report is made of: totals per policy, and the failures, most sessions first."""

    totals: tuple[TlsPolicyTotal, ...]
    failures: tuple[TlsCount, ...]


class TlsReportQueries:
    """Mixed into SQLiteStore."""

    _write: Callable[[Any], Any]
    _reader: DbThread

    async def add_tls_results(self, counts: Sequence[TlsCount]) -> None:
        """Add the sessions to the day's rows, all in one transaction."""
        if not counts:
            return
        rows = [(c.day, c.policy_domain, c.policy_type, c.policy_string, c.mx_host,
                 c.result_type, c.sending_ip, c.receiving_ip, c.sessions) for c in counts]
        await self._write(lambda db: db.executemany(
            "INSERT INTO tls_results (day, policy_domain, policy_type, policy_string, mx_host,"
            " result_type, sending_ip, receiving_ip, sessions)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (day, policy_domain, policy_type, mx_host, result_type, sending_ip,"
            " receiving_ip) DO UPDATE SET sessions = tls_results.sessions + excluded.sessions,"
            " policy_string = excluded.policy_string", rows))

    async def tls_reports_due(self, before_day: str, limit: int) -> list[tuple[str, str]]:
        """(day, policy domain) with sessions before `before_day` and no report row yet."""
        found: list[tuple[str, str]] = await self._reader.run(_due, before_day, limit)
        return found

    async def tls_day(self, day: str, policy_domain: str, *, max_policies: int,
                      max_failures: int) -> TlsDay:
        found: TlsDay = await self._reader.run(_day, day, policy_domain, max_policies,
                                               max_failures)
        return found

    async def claim_tls_report(self, day: str, policy_domain: str) -> bool:
        """Take the report of (day, domain) for this node; False when it is taken already."""
        def op(db: sqlite3.Connection) -> bool:
            return db.execute(
                "INSERT INTO tls_reports (day, policy_domain, sent_at, error)"
                " VALUES (?, ?, NULL, ?) ON CONFLICT (day, policy_domain) DO NOTHING",
                (day, policy_domain, CLAIMED)).rowcount == 1

        claimed: bool = await self._write(op)
        return claimed

    async def mark_tls_report(self, day: str, policy_domain: str, *, sent_at: float | None,
                              error: str | None) -> None:
        """The outcome of a report: when it went out (None: never), and what went wrong."""
        await self._write(lambda db: db.execute(
            "INSERT INTO tls_reports (day, policy_domain, sent_at, error) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (day, policy_domain) DO UPDATE SET sent_at = excluded.sent_at,"
            " error = excluded.error", (day, policy_domain, sent_at, error)))

    async def tls_report(self, day: str, policy_domain: str
                         ) -> tuple[float | None, str | None] | None:
        """(sent_at, error) of a report, or None when there is no row for it."""
        row: tuple[float | None, str | None] | None = await self._reader.run(
            _report, day, policy_domain)
        return row

    async def forget_tls_before(self, day: str) -> None:
        """Counts and report rows of the days before `day` go."""
        def op(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM tls_results WHERE day < ?", (day,))
            db.execute("DELETE FROM tls_reports WHERE day < ?", (day,))

        await self._write(op)


def _due(db: sqlite3.Connection, before_day: str, limit: int) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in db.execute(
        "SELECT DISTINCT r.day, r.policy_domain FROM tls_results r WHERE r.day < ?"
        " AND NOT EXISTS (SELECT 1 FROM tls_reports t WHERE t.day = r.day"
        " AND t.policy_domain = r.policy_domain)"
        " ORDER BY r.day, r.policy_domain LIMIT ?", (before_day, limit))]


def _day(db: sqlite3.Connection, day: str, policy_domain: str, max_policies: int,
         max_failures: int) -> TlsDay:
    totals = tuple(TlsPolicyTotal(policy_type=r[0], policy_string=r[1], mx_host=r[2],
                                  successes=int(r[3]), failures=int(r[4])) for r in db.execute(
        "SELECT policy_type, policy_string, mx_host,"
        " SUM(CASE WHEN result_type = '' THEN sessions ELSE 0 END),"
        " SUM(CASE WHEN result_type <> '' THEN sessions ELSE 0 END)"
        " FROM tls_results WHERE day = ? AND policy_domain = ?"
        " GROUP BY policy_type, policy_string, mx_host"
        " ORDER BY policy_type, policy_string, mx_host LIMIT ?",
        (day, policy_domain, max_policies)))
    failures = tuple(TlsCount(day=day, policy_domain=policy_domain, policy_type=r[0],
                              policy_string=r[1], mx_host=r[2], result_type=r[3],
                              sending_ip=r[4], receiving_ip=r[5], sessions=int(r[6]))
                     for r in db.execute(
        "SELECT policy_type, policy_string, mx_host, result_type, sending_ip, receiving_ip,"
        " sessions FROM tls_results WHERE day = ? AND policy_domain = ? AND result_type <> ''"
        " ORDER BY sessions DESC, mx_host, result_type, sending_ip, receiving_ip LIMIT ?",
        (day, policy_domain, max_failures)))
    return TlsDay(totals=totals, failures=failures)


def _report(db: sqlite3.Connection, day: str, policy_domain: str
            ) -> tuple[float | None, str | None] | None:
    row = db.execute("SELECT sent_at, error FROM tls_reports WHERE day = ? AND policy_domain = ?",
                     (day, policy_domain)).fetchone()
    return (row[0], row[1]) if row else None
