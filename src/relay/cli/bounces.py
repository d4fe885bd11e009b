"""`relay bounces parse FILE...`: what relay reads from a bounce, complaint or auto-reply,
so an operator can see why a message was (or was not) understood."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..config import Config, LimitsConfig
from ..feedback.bounce_report import Report
from .util import Subparsers


def add_parsers(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    b_ = Subparsers(sub.add_parser("bounces", help="bounces and complaints")
                    .add_subparsers(metavar="ACTION"), common)
    s = b_.add_parser("parse", help="show what relay reads from bounce messages (files)")
    s.add_argument("files", nargs="+", metavar="FILE")
    s.add_argument("--json", action="store_true", help="one JSON object per file per line")
    s.set_defaults(func=cmd_parse)


def report_json(name: str, report: Report) -> dict[str, Any]:
    return {"file": name, "type": report.type, "feedbackType": report.feedback_type,
            "recipients": [{"address": r.address, "action": r.action, "status": r.status,
                            "reason": r.reason, "class": r.bounce_class,
                            "diagnostic": r.diagnostic, "remoteMta": r.remote_mta}
                           for r in report.recipients]}


def _print_text(name: str, report: Report) -> None:
    print(f"{name}: {report.type}"
          + (f" (feedback type {report.feedback_type})" if report.feedback_type else ""))
    if not report.recipients:
        print("  no recipient found")
    for r in report.recipients:
        print(f"  {r.address or '(not disclosed)'}")
        print(f"    action {r.action or '-'}  status {r.status or '-'}  reason {r.reason}"
              f"  class {r.bounce_class}")
        if r.remote_mta:
            print(f"    remote MTA {r.remote_mta}")
        if r.diagnostic:
            print(f"    diagnostic {r.diagnostic}")


def cmd_parse(args: argparse.Namespace, config: Config | None) -> int:
    from ..feedback import bounces  # the parser's tables: only this command needs them

    failed = False
    limits = config.limits if config is not None else LimitsConfig()
    for name in args.files:
        try:
            with open(name, "rb") as f:
                raw = f.read()
        except OSError as exc:
            print(f"relay: cannot read {name}: {exc.strerror or exc}", file=sys.stderr)
            failed = True
            continue
        report = bounces.parse(raw, max_parts=limits.max_report_parts,
                               max_recipients=limits.max_report_recipients)
        if args.json:
            print(json.dumps(report_json(name, report), ensure_ascii=False), flush=True)
        else:
            _print_text(name, report)
    return 1 if failed else 0
