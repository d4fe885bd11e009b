"""`relay templates …`: stored templates that API requests send by id."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..config import Config
from ..types import TEMPLATE_TYPES
from .util import Subparsers, iso, table, with_store


def add_parsers(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    t = Subparsers(sub.add_parser("templates", help="stored templates sent by id")
                   .add_subparsers(metavar="ACTION"), common)
    s = t.add_parser("add", help="store a template; prints its id")
    s.add_argument("name")
    s.add_argument("--subject", required=True, help="may use {{var}} and {{var ?? 'x'}}")
    html = s.add_mutually_exclusive_group(required=True)
    html.add_argument("--html", help="the html body")
    html.add_argument("--html-file", type=Path, help="read the html body from this file")
    s.add_argument("--text", default=None, help="a plain-text body")
    s.add_argument("--text-file", type=Path, default=None)
    s.add_argument("--type", choices=TEMPLATE_TYPES, default="transactional",
                   help="marketing: not sent to unsubscribed contacts")
    s.add_argument("--from", dest="sender", default=None, help="the default sender")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_add)
    s = t.add_parser("list", help="stored templates, oldest first")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)
    s = t.add_parser("show", help="one template with its bodies")
    s.add_argument("id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)
    s = t.add_parser("remove", help="delete a template")
    s.add_argument("id")
    s.set_defaults(func=cmd_remove)


def cmd_add(args: argparse.Namespace, config: Config) -> int:
    # here, not at the top: other commands start without aiohttp
    from ..api.errors import ApiError
    from ..api.requests import parse
    from ..api.templates import CreateTemplate, new_template, template_json

    body: dict[str, Any] = {
        "name": args.name, "type": args.type, "subject": args.subject,
        "html": args.html if args.html is not None else args.html_file.read_text(),
        "text": args.text_file.read_text() if args.text_file else args.text}
    if args.sender:
        body["from"] = args.sender
    try:
        t = new_template(parse(CreateTemplate, body))
    except ApiError as exc:
        print(f"relay: {exc.message}", file=sys.stderr)
        return 1
    with_store(config, lambda s: s.add_template(t))
    print(json.dumps(template_json(t)) if args.json else f"added {t.id} ({t.type}): {t.name}")
    return 0


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    # here, not at the top: other commands start without aiohttp
    from ..api.templates import template_json

    found = with_store(config, lambda s: s.list_templates(limit=100_000))
    if args.json:
        print(json.dumps([template_json(t) for t in found], indent=2))
        return 0
    table([("ID", "TYPE", "NAME", "SUBJECT", "UPDATED")] + [
        (t.id, t.type, t.name, t.subject, iso(t.updated_at)) for t in found])
    return 0


def cmd_show(args: argparse.Namespace, config: Config) -> int:
    # here, not at the top: other commands start without aiohttp
    from ..api.templates import template_json

    t = with_store(config, lambda s: s.get_template(args.id))
    if t is None:
        print(f"relay: no template {args.id}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(template_json(t), indent=2))
        return 0
    sender = f"{t.from_name} <{t.from_email}>" if t.from_name else t.from_email
    print(f"id:      {t.id}\nname:    {t.name}\ntype:    {t.type}\nfrom:    {sender or ''}\n"
          f"subject: {t.subject}\nupdated: {iso(t.updated_at)}\n\n{t.html}")
    if t.text:
        print(f"\n--- text ---\n{t.text}")
    return 0


def cmd_remove(args: argparse.Namespace, config: Config) -> int:
    if not with_store(config, lambda s: s.delete_template(args.id)):
        print(f"relay: no template {args.id}", file=sys.stderr)
        return 1
    print(f"removed {args.id}")
    return 0
