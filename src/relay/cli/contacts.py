"""`relay contacts …`: the people relay mails, their data and subscription state."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..addresses import normalize_address
from ..config import Config
from ..store import SQLiteStore
from .util import Subparsers, iso, table, with_store


def add_parsers(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    c = Subparsers(sub.add_parser("contacts", help="contacts, their data and subscription")
                   .add_subparsers(metavar="ACTION"), common)
    s = c.add_parser("list", help="contacts, by address")
    s.add_argument("--subscribed", choices=("yes", "no"), default=None)
    s.add_argument("--limit", type=int, default=1000)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)
    s = c.add_parser("show", help="one contact (by id or address) with its events")
    s.add_argument("contact")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)
    s = c.add_parser("add", help="add a contact or change one")
    s.add_argument("email")
    state = s.add_mutually_exclusive_group()
    state.add_argument("--subscribed", dest="subscribed", action="store_const", const=True,
                       default=None, help="subscribe to marketing mail")
    state.add_argument("--unsubscribed", dest="subscribed", action="store_const",
                       const=False, help="unsubscribe from marketing mail")
    s.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="set a field (KEY= deletes it); a JSON value is kept as JSON")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_add)
    s = c.add_parser("remove", help="delete a contact (by id or address)")
    s.add_argument("contact")
    s.set_defaults(func=cmd_remove)


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    # here, not at the top: other commands start without aiohttp
    from ..api.contacts import contact_json

    subscribed = None if args.subscribed is None else args.subscribed == "yes"
    found = with_store(config, lambda s: s.list_contacts(limit=args.limit,
                                                         subscribed=subscribed))
    if args.json:
        print(json.dumps([contact_json(c) for c in found], indent=2))
        return 0
    table([("ID", "EMAIL", "SUBSCRIBED", "DATA", "UPDATED")] + [
        (c.id, c.email, "yes" if c.subscribed else "no", json.dumps(c.data),
         iso(c.updated_at)) for c in found])
    return 0


def cmd_show(args: argparse.Namespace, config: Config) -> int:
    # here, not at the top: other commands start without aiohttp
    from ..api.contacts import contact_json

    async def go(store: SQLiteStore) -> Any:
        found = await store.get_contact(_ident(args.contact))
        return (found, await store.contact_events(found.id)) if found else (None, [])

    found, events = with_store(config, go)
    if found is None:
        print(f"relay: no contact {args.contact}", file=sys.stderr)
        return 1
    shown = {**contact_json(found), "events": [
        {"event": name, "data": data, "at": iso(at)} for name, data, at in events]}
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        print("\n".join(f"{k}: {json.dumps(v) if isinstance(v, dict | list) else v}"
                        for k, v in shown.items()))
    return 0


def cmd_add(args: argparse.Namespace, config: Config) -> int:
    # here, not at the top: other commands start without aiohttp
    from ..api.contacts import contact_change, contact_json

    data: dict[str, Any] = {}
    for item in args.data:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"relay: --data {item!r}: write KEY=VALUE", file=sys.stderr)
            return 2
        data[key] = _value(value) if value else None
    email = normalize_address(args.email.strip(), smtputf8=True, param="email")[0]
    change = contact_change(email, data, subscribed=args.subscribed)
    (done,) = with_store(config, lambda s: s.upsert_contacts([change], time.time()))
    if args.json:
        print(json.dumps(contact_json(done.contact)))
    else:
        print(f"{'added' if done.created else 'updated'} {done.contact.id}: {email} "
              f"({'subscribed' if done.contact.subscribed else 'unsubscribed'})")
    return 0


def cmd_remove(args: argparse.Namespace, config: Config) -> int:
    if not with_store(config, lambda s: s.delete_contact(_ident(args.contact))):
        print(f"relay: no contact {args.contact}", file=sys.stderr)
        return 1
    print(f"removed {args.contact}")
    return 0


def _ident(raw: str) -> str:
    raw = raw.strip()
    return normalize_address(raw, smtputf8=True, param="contact")[0] if "@" in raw else raw


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw
