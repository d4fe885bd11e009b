"""`relay suppressions …`: the addresses relay does not mail (all mail, or one sending
domain's broadcast mail)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..addresses import normalize_address, normalize_domain
from ..config import Config
from ..types import SUPPRESSION_REASONS, Suppression
from .util import Subparsers, iso, table, with_store


def add_parsers(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    s_ = Subparsers(sub.add_parser("suppressions", help="addresses relay does not mail")
                    .add_subparsers(metavar="ACTION"), common)
    s = s_.add_parser("list", help="the suppression list, by address")
    s.add_argument("--email", default=None)
    s.add_argument("--limit", type=int, default=1000)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)
    s = s_.add_parser("add", help="stop mail to an address")
    s.add_argument("email")
    s.add_argument("--reason", choices=SUPPRESSION_REASONS, default="manual")
    s.add_argument("--scope", default="",
                   help="a sending domain: stop only its broadcast mail (default: all mail)")
    s.set_defaults(func=cmd_add)
    s = s_.add_parser("remove", help="mail an address again")
    s.add_argument("email")
    s.add_argument("--scope", default=None, help="remove only this scope's entry")
    s.set_defaults(func=cmd_remove)


def _address(raw: str) -> str:
    return normalize_address(raw.strip(), smtputf8=True, param="email")[0]


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    # here, not at the top: other commands start without aiohttp
    from ..api.manage import suppression_json

    email = _address(args.email) if args.email else None
    found = with_store(config, lambda s: s.list_suppressions(limit=args.limit, address=email))
    if args.json:
        print(json.dumps([suppression_json(e) for e in found], indent=2))
        return 0
    table([("EMAIL", "SCOPE", "REASON", "SOURCE", "SINCE")] + [
        (e.address, e.scope or "(all mail)", e.reason, e.source, iso(e.created_at))
        for e in found])
    return 0


def cmd_add(args: argparse.Namespace, config: Config) -> int:
    scope = normalize_domain(args.scope, param="scope") if args.scope else ""
    entry = Suppression(address=_address(args.email), scope=scope, reason=args.reason,
                        source="cli", created_at=time.time())
    added = with_store(config, lambda s: s.add_suppression(entry))
    what = f"{scope}'s broadcast mail" if scope else "all mail"
    print(f"{entry.address}: {what} suppressed" + ("" if added else " (already)"))
    return 0


def cmd_remove(args: argparse.Namespace, config: Config) -> int:
    address = _address(args.email)
    count = with_store(config, lambda s: s.remove_suppression(address, args.scope))
    if not count:
        print(f"relay: {address} is not suppressed", file=sys.stderr)
        return 1
    print(f"{address}: {count} suppression(s) removed")
    return 0
