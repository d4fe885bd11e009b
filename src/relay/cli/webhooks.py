"""`relay webhooks …`: endpoints that get relay's events as signed POSTs."""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time

from ..config import Config
from ..store import SQLiteStore
from ..types import EventType, WebhookEndpoint
from .util import Subparsers, iso, table, with_store

EVENTS = tuple(e.value for e in EventType)  # the API's EVENT_TYPES, without its models


def add_parsers(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    w = Subparsers(sub.add_parser("webhooks", help="endpoints that get relay's events")
                   .add_subparsers(metavar="ACTION"), common)
    s = w.add_parser("add", help="add an endpoint; its signing secret is printed once")
    s.add_argument("url")
    s.add_argument("--events", default="",
                   help=f"comma-separated event types (default: all): {', '.join(EVENTS)}")
    s.add_argument("--format", choices=("native", "mailchannels"), default="native",
                   help="the body and signing of its POSTs (default: native)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_add)
    s = w.add_parser("list", help="list endpoints")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)
    for name, help_text in (("enable", "enable an endpoint (its failures forgotten)"),
                            ("disable", "stop sending to an endpoint"),
                            ("delete", "delete an endpoint and its pending deliveries"),
                            ("rotate", "a new signing secret, printed once")):
        s = w.add_parser(name, help=help_text)
        s.add_argument("id")
        s.set_defaults(func=cmd_change, action=name)


def cmd_add(args: argparse.Namespace, config: Config) -> int:
    # here, not at the top: other commands start without aiohttp
    from ..api.errors import ApiError
    from ..api.hooks import check_target, endpoint_json
    from ..feedback import webhooks

    events = tuple(dict.fromkeys(e.strip() for e in args.events.split(",") if e.strip()))
    unknown = [e for e in events if e not in EVENTS]
    if unknown:
        print(f"relay: unknown event type(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        asyncio.run(check_target(args.url, config.webhooks.allow_private_targets))
    except ApiError as exc:
        print(f"relay: {exc.message}", file=sys.stderr)
        return 1
    ep = WebhookEndpoint(id="wh_" + secrets.token_hex(8), url=args.url,
                         secret=webhooks.new_secret(), events=events, created_at=time.time(),
                         format=args.format)
    with_store(config, lambda s: s.add_endpoint(ep))
    if args.json:
        print(json.dumps({**endpoint_json(ep), "signingSecret": ep.secret}))
    else:
        print(f"added {ep.id} -> {ep.url} ({', '.join(events) or 'all events'})")
        print(f"signing secret (shown once): {ep.secret}")
    return 0


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    # here, not at the top: other commands start without aiohttp
    from ..api.hooks import endpoint_json

    found = with_store(config, lambda s: s.list_endpoints())
    if args.json:
        print(json.dumps([endpoint_json(e) for e in found], indent=2))
        return 0
    table([("ID", "URL", "EVENTS", "ENABLED", "FAILING SINCE", "DISABLED BECAUSE")] + [
        (e.id, e.url, ",".join(e.events) or "all", "yes" if e.enabled else "no",
         iso(e.failing_since), e.disabled_reason or "") for e in found])
    return 0


def cmd_change(args: argparse.Namespace, config: Config) -> int:
    # here, not at the top: other commands start without aiohttp
    from ..feedback import webhooks

    secret = webhooks.new_secret() if args.action == "rotate" else None

    async def go(store: SQLiteStore) -> bool:
        if args.action == "delete":
            return await store.delete_endpoint(args.id)
        enabled = {"enable": True, "disable": False}.get(args.action)
        return await store.update_endpoint(args.id, enabled=enabled, secret=secret,
                                           now=time.time())

    if not with_store(config, go):
        print(f"relay: no webhook {args.id}", file=sys.stderr)
        return 1
    print(f"{args.action}: {args.id}")
    if secret:
        print(f"signing secret (shown once): {secret}")
    return 0
