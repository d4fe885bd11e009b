"""`relay queue`: what Postfix's postqueue -p, postsuper -d/-h/-H/-r and qshape do.

Recipients are picked by message id or by selectors that combine (--domain, --sender,
--older-than, --newer-than, --status); list, hold, release, delete, retry and bounce all take
them. Exit codes: 0 done (also when a selector matched nothing), 1 no such message id,
2 a usage or config error."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import re
import sys
import time
from typing import Any

from ..api.views import message_json
from ..config import Config
from ..delivery.pools import warmup_cap
from ..feedback.reports import ReportMaker
from ..store import SQLiteStore
from ..store.operator import AGE_BUCKETS, NOT_FINAL, Selector
from ..store.shaping import SiteHold
from ..submit import Submitter
from ..types import RecipientStatus
from .util import Subparsers, iso, table, with_store

MAX_LIST = 10_000  # messages `queue list` prints at most
STATUSES = [s.value for s in RecipientStatus]
_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def age(text: str) -> float:
    """Seconds from "90s", "30m", "2h", "3d", "1w" (a bare number is seconds)."""
    m = _AGE.fullmatch(text.strip().lower())
    if not m or len(text) > 20:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age such as 30m, 2h or 3d")
    return float(m.group(1)) * _UNIT[m.group(2)]


def limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_LIST:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number from 1 to {MAX_LIST}")
    return value


def add_parsers(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    q = Subparsers(sub.add_parser("queue", help="the mail queue").add_subparsers(
        metavar="ACTION"), common)
    s = q.add_parser("list", help="messages, newest first (postqueue -p)")
    _selectors(s, status_help="a recipient status: " + ", ".join(STATUSES))
    s.add_argument("--limit", type=limit, default=100)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)
    s = q.add_parser("show", help="one message: recipients, attempts, events")
    s.add_argument("id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)
    s = q.add_parser("summary", help="pending recipients by domain and age (qshape)")
    s.add_argument("--by", choices=("domain", "sender"), default="domain",
                   help="rows: the recipients' domains (default) or the senders' domains")
    s.add_argument("--status", action="append", choices=NOT_FINAL,
                   help="only these statuses (repeatable; default all not yet final)")
    s.add_argument("--limit", type=limit, default=100, help="rows, largest first")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_summary)
    s = q.add_parser("release-site", help="end a site's hold (suspended or slowed by a "
                                          "[[delivery.backoff]] rule) now")
    s.add_argument("site", help="as `relay queue summary` names it")
    s.set_defaults(func=cmd_release_site)
    for name, help_text in (
            ("retry", "make queued and deferred recipients due now (postsuper -r)"),
            ("hold", "hold pending recipients (postsuper -h)"),
            ("release", "release held (or failed) recipients (postsuper -H)"),
            ("delete", "cancel pending recipients, recorded as cancelled (postsuper -d)"),
            ("bounce", "give up on pending recipients: bounced, with a DSN to SMTP senders")):
        s = q.add_parser(name, help=help_text)
        s.add_argument("id", nargs="?", help="a message id")
        s.add_argument("--all", action="store_true", help="every message in the queue")
        _selectors(s, status_help="only recipients in this status")
        s.set_defaults(func=cmd_act, action=name)


def _selectors(s: argparse.ArgumentParser, *, status_help: str) -> None:
    s.add_argument("--status", choices=STATUSES, default=None, help=status_help)
    s.add_argument("--domain", help="recipients at this domain")
    s.add_argument("--sender", help="messages from this envelope sender (address or domain)")
    s.add_argument("--older-than", type=age, metavar="AGE", help="queued more than AGE ago "
                   "(30m, 2h, 3d)")
    s.add_argument("--newer-than", type=age, metavar="AGE", help="queued less than AGE ago")


def selector(args: argparse.Namespace, now: float) -> Selector:
    return Selector(
        message_id=getattr(args, "id", None),
        statuses=(args.status,) if args.status else (),
        domain=args.domain, sender=args.sender,
        created_before=now - args.older_than if args.older_than is not None else None,
        created_after=now - args.newer_than if args.newer_than is not None else None)


def _narrowed(args: argparse.Namespace) -> bool:
    return any(getattr(args, k) is not None for k in ("id", "status", "domain", "sender",
                                                      "older_than", "newer_than"))


# -- reading -----------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    sel = selector(args, time.time())

    async def go(store: SQLiteStore) -> list[Any]:
        ids = await store.select_messages(sel, args.limit)
        found = await asyncio.gather(*(store.get_message(i) for i in ids))
        return [d for d in found if d is not None]

    details = with_store(config, go)
    if args.json:
        print(json.dumps([message_json(d) for d in details], indent=2))
        return 0
    rows: list[tuple[str, ...]] = [
        ("ID", "CREATED", "STATUS", "FROM", "RECIPIENT", "RCPT STATUS", "NEXT", "LAST REPLY")]
    for d in details:
        for i, r in enumerate(d.recipients):
            rows.append((d.message.id if i == 0 else "", iso(d.message.created_at) if i == 0
                         else "", d.message.status if i == 0 else "",
                         (d.message.mail_from or "<>") if i == 0 else "", r.address,
                         r.status.value, iso(r.next_attempt_at) if r.next_attempt_at and
                         not r.status.final else "", (r.last_reply or "")[:60]))
    table(rows)
    return 0


def cmd_show(args: argparse.Namespace, config: Config) -> int:
    detail = with_store(config, lambda s: s.get_message(args.id))
    if detail is None:
        print(f"relay: no message {args.id}", file=sys.stderr)
        return 1
    data = message_json(detail, full=True)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for label in ("id", "status", "createdAt", "from", "headerFrom", "subject", "size", "tags"):
        print(f"{label:>11}: {data[label]}")
    print(f"{'returnPath':>11}: {data['returnPath']['mode']} ({data['returnPath']['note']})")
    if data["bodyPrunedAt"]:
        print(f"{'body':>11}: pruned at {data['bodyPrunedAt']} ([retention] bodies_days)")
    print()
    table([("RECIPIENT", "STATUS", "ATTEMPTS", "NEXT", "LAST REPLY")] + [
        (r["email"], r["status"], str(r["attempts"]), r["nextAttemptAt"] or "",
         r["lastReply"] or "") for r in data["recipients"]])
    if data["attempts"]:
        print()
        table([("AT", "MX", "IP", "TLS", "POLICY", "REPLY", "OUTCOME", "DKIM")] + [
            (a["at"], a["mxHost"] or "", a["ip"] or "", a["tls"] or "-",
             (a["tlsPolicy"] or "") + (f" FAILED {a['tlsFailure']}" if a["tlsFailure"] else ""),
             f"{a['code'] or ''} {a['enhanced'] or ''} {a['reply']}".strip()[:70], a["outcome"],
             a["dkim"] or "") for a in data["attempts"]])
    print()
    table([("AT", "EVENT", "RECIPIENT")] + [(e["at"], e["type"], str(e["recipient"] or ""))
                                            for e in data["events"]])
    return 0


COLUMNS = ("T", *(str(m) for m in AGE_BUCKETS), f"{AGE_BUCKETS[-1]}+")


def cmd_summary(args: argparse.Namespace, config: Config) -> int:
    now = time.time()

    day = time.strftime("%Y-%m-%d", time.gmtime(now))
    # the sources in warm-up today: what they sent and may send
    sources = [(pool, s) for pool in config.delivery.pools for s in pool.sources
               if warmup_cap(pool, s, now) is not None]

    async def go(store: SQLiteStore) -> tuple[dict[str, list[int]], list[SiteHold],
                                             dict[str, int]]:
        return (await store.queue_shape(now, by=args.by,
                                        statuses=tuple(args.status or NOT_FINAL)),
                await store.site_holds(now),
                await store.source_usage([s.address for _, s in sources], day))

    shape, holds, used = with_store(config, go)
    warmup = [{"pool": pool.name, "address": s.address, "sentToday": used.get(s.address, 0),
               "capToday": warmup_cap(pool, s, now)} for pool, s in sources]
    ranked = sorted(shape.items(), key=lambda kv: (-kv[1][0], kv[0]))
    total = [sum(col) for col in zip(*shape.values())] if shape else [0] * len(COLUMNS)
    if args.json:
        print(json.dumps({"by": args.by, "columns": list(COLUMNS), "ageUnit": "minutes",
                          "total": total, "rows": [{"name": name, "counts": counts}
                                                   for name, counts in ranked[:args.limit]],
                          "heldSites": [{"site": h.site, "until": iso(h.until),
                                         "action": "suspend" if h.rate is None else "slow",
                                         "rate": h.rate, "reason": h.reason,
                                         "since": iso(h.since)} for h in holds],
                          "sources": warmup}, indent=2))
        return 0
    rows = [("", *COLUMNS), ("TOTAL", *map(str, total))]
    rows += [(name, *map(str, counts)) for name, counts in ranked[:args.limit]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:  # qshape's layout: names left, counts right-aligned
        print(r[0].ljust(widths[0]) + "".join(" " + c.rjust(w)
                                              for c, w in zip(r[1:], widths[1:])))
    if len(ranked) > args.limit:
        print(f"({len(ranked) - args.limit} more rows; --limit to see them)")
    if holds:
        print()
        table([("HELD SITE", "UNTIL", "ACTION", "AFTER")] + [
            (h.site, iso(h.until), "suspended" if h.rate is None else f"slowed to {h.rate:g}/s",
             h.reason[:80]) for h in holds])
    if warmup:
        print()
        table([("POOL", "SOURCE", "SENT TODAY", "WARM-UP CAP")] + [
            (w["pool"], w["address"], str(w["sentToday"]),
             "-" if w["capToday"] is None else str(w["capToday"])) for w in warmup])
    return 0


def cmd_release_site(args: argparse.Namespace, config: Config) -> int:
    if not with_store(config, lambda s: s.release_site(args.site)):
        print(f"relay: site {args.site} is not held", file=sys.stderr)
        return 1
    print(f"site {args.site} released; its mail waits for its next attempt (`relay queue "
          "retry` sends it now)")
    return 0


# -- acting --------------------------------------------------------------------------------


def cmd_act(args: argparse.Namespace, config: Config) -> int:
    if args.all and _narrowed(args):
        print("relay: --all and a message id or selector exclude each other", file=sys.stderr)
        return 2
    if not args.all and not _narrowed(args):
        print(f"relay: queue {args.action}: give a message id, a selector (--domain, "
              "--sender, --older-than, --newer-than, --status) or --all", file=sys.stderr)
        return 2
    now = time.time()
    sel = selector(args, now)
    by = f"cli:{getpass.getuser()}"

    async def go(store: SQLiteStore) -> tuple[int, int] | None:
        if args.id is not None and await store.get_message(args.id) is None:
            return None
        if args.action == "retry":
            return await store.retry_selected(sel, now), 0
        acted = await store.act(sel, args.action, by, now)
        reports = 0
        if args.action == "bounce" and acted.message_ids:
            maker = ReportMaker(Submitter(config, store), config.server.hostname)
            for message_id in acted.message_ids:
                if await store.emit_report(message_id, maker.make):
                    reports += 1
        return acted.count, reports

    done = with_store(config, go)
    if done is None:
        print(f"relay: no message {args.id}", file=sys.stderr)
        return 1
    count, reports = done
    what = f" of {args.id}" if args.id else ""
    if args.action == "retry":
        print(f"{count} recipient(s){what} due now")
        return 0
    print(f"{args.action}: {count} recipient(s){what}"
          + (f"; {reports} bounce report(s) queued" if reports else ""))
    return 0
