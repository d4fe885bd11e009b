"""`relay prune [--dry-run]`: one [retention] pass now, with what it pruned (or would)."""

from __future__ import annotations

import argparse
import json

from ..config import Config
from ..retention import KINDS, Pruner
from .util import Subparsers, table, with_store


def add_parsers(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("prune", help="apply [retention] now: one pass, counts printed")
    s.add_argument("--dry-run", action="store_true",
                   help="count what a pass would prune; change nothing")
    s.add_argument("--json", action="store_true", help="the counts as one JSON object")
    s.set_defaults(func=cmd_prune)


def cmd_prune(args: argparse.Namespace, config: Config) -> int:
    result = with_store(config, lambda store: Pruner(config.retention, store).run_pass(
        dry_run=args.dry_run))
    if args.json:
        print(json.dumps({"dryRun": args.dry_run, "pruned": result.counts,
                          "batches": result.batches, "seconds": round(result.seconds, 3)}))
        return 0
    table([("KIND", "WOULD PRUNE" if args.dry_run else "PRUNED", "BATCHES")]
          + [(kind, str(result.counts[kind]), str(result.batches[kind])) for kind in KINDS])
    return 0
