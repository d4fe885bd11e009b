"""`relay domains …`: add a sending domain, print and verify its DNS records, rotate its keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

from .. import domains
from ..addresses import normalize_domain
from ..config import Config
from ..errors import ValidationError
from ..types import Domain
from .util import Subparsers, iso, table, with_store


def add_parsers(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    d = Subparsers(sub.add_parser("domains", help="sending domains and their DKIM keys")
                   .add_subparsers(metavar="ACTION"), common)
    s = d.add_parser("add", help="make DKIM keys for a domain and print its DNS records")
    s.add_argument("domain")
    s.add_argument("--force", action="store_true",
                   help="replace the keys of a domain that exists (its records change)")
    s.set_defaults(func=cmd_add)
    s = d.add_parser("verify", help="look its records up in DNS and say what is wrong")
    s.add_argument("domain")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify)
    s = d.add_parser("list", help="list domains")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)
    s = d.add_parser("show", help="a domain's keys and the DNS records to publish")
    s.add_argument("domain")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)
    s = d.add_parser("rotate", help="new selectors; then --activate once they are published")
    s.add_argument("domain")
    s.add_argument("--activate", action="store_true",
                   help="sign with the new selectors (checked in DNS first)")
    s.add_argument("--force", action="store_true",
                   help="with --activate: switch even if DNS does not show the new records")
    s.set_defaults(func=cmd_rotate)
    s = d.add_parser("remove", help="forget a domain and delete its keys")
    s.add_argument("domain")
    s.set_defaults(func=cmd_remove)


def _name(raw: str) -> str:
    try:
        return normalize_domain(raw, param="domain")
    except ValidationError as exc:
        raise SystemExit(f"relay: {exc}") from None


def _get(config: Config, name: str) -> Domain:
    found: Domain | None = with_store(config, lambda s: s.get_domain(name))
    if found is None:
        raise SystemExit(f"relay: no domain {name}; add it with `relay domains add {name}`")
    return found


def cmd_add(args: argparse.Namespace, config: Config) -> int:
    name = _name(args.domain)
    now = time.time()

    old: Domain | None = with_store(config, lambda s: s.get_domain(name))
    if old is not None and not args.force:
        print(f"relay: {name} exists; `relay domains show {name}` prints its records, "
              f"--force replaces its keys", file=sys.stderr)
        return 1
    taken = [k.selector for k in old.keys] if old else []
    domain = domains.make_domain(config, name, now, taken=taken)
    with_store(config, lambda s: s.save_domain(domain, replace=args.force))
    for k in old.keys if old else ():  # the replaced keys' files go once the new ones are stored
        with contextlib.suppress(OSError):
            os.unlink(k.path)
    saved = _get(config, name)  # with the id the store gave it (or kept, with --force)
    print(f"added {name} (id {saved.id}). Publish these records, then run "
          f"`relay domains verify {name}`:\n")
    _print_records(config, domain)
    return 0


def cmd_verify(args: argparse.Namespace, config: Config) -> int:
    from .. import domaincheck  # the DNS library: only verify and rotate need it

    domain = _get(config, _name(args.domain))
    checks = asyncio.run(domaincheck.verify(config, domain))
    if args.json:
        print(json.dumps([{"record": c.what, "ok": c.ok, "detail": c.detail} for c in checks],
                         indent=2))
    else:
        for c in checks:
            print(f"{'ok     ' if c.ok else 'PROBLEM'}  {c.what}: {c.detail}")
            if not c.ok and c.record is not None:
                print(f"         publish: {c.record.zone_line()}".replace("\n", "\n         "))
    bad = sum(not c.ok for c in checks)
    print(f"\n{name_status(domain.name, bad)}")
    return 1 if bad else 0


def name_status(name: str, bad: int) -> str:
    return f"{name}: all records are in place" if not bad else f"{name}: {bad} problem(s)"


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    found: list[Domain] = with_store(config, lambda s: s.list_domains())
    if args.json:
        print(json.dumps([domain_json(d) for d in found], indent=2))
        return 0
    rows = [("DOMAIN", "ID", "CREATED", "SIGNING SELECTORS", "PENDING", "RETURN PATH")]
    for d in found:
        rows.append((d.name, d.id, iso(d.created_at),
                     " ".join(k.selector for k in d.keys if k.state == "active"),
                     " ".join(k.selector for k in d.keys if k.state == "pending"), d.return_path))
    table(rows)
    return 0


def cmd_show(args: argparse.Namespace, config: Config) -> int:
    domain = _get(config, _name(args.domain))
    if args.json:
        print(json.dumps(domain_json(domain, config), indent=2))
        return 0
    print(f"{domain.name} (id {domain.id}), added {iso(domain.created_at)}, return path "
          f"{domain.return_path}\n")
    table([("SELECTOR", "ALGORITHM", "STATE", "SINCE", "KEEP PUBLISHED UNTIL")] + [
        (k.selector, k.algorithm, k.state, iso(k.activated_at or k.created_at),
         iso(k.retire_after)) for k in domain.keys])
    print()
    _print_records(config, domain)
    return 0


def cmd_rotate(args: argparse.Namespace, config: Config) -> int:
    from .. import domaincheck  # the DNS library: only verify and rotate need it

    domain = _get(config, _name(args.domain))
    now = time.time()
    try:
        if not args.activate:
            rotated = domains.start_rotation(config, domain, now)
            with_store(config, lambda s: s.save_domain(rotated, replace=True))
            print(f"new selectors for {domain.name}; publish these records, keep the old ones, "
                  f"then run `relay domains rotate {domain.name} --activate`:\n")
            for r in domains.dkim_records(rotated, ("pending",)):
                print(f"; {r.purpose}\n{r.zone_line()}\n")
            return 0
        pending = [k for k in domain.keys if k.state == "pending"]
        rotated = domains.activate_rotation(config, domain, now)
    except domains.DomainError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    if not args.force:
        checks = asyncio.run(domaincheck.verify(config, domain))
        missing = [c for c in checks if c.record is not None and c.record.name.split(".")[0]
                   in {k.selector for k in pending} and not c.ok]
        if missing:
            for c in missing:
                print(f"PROBLEM  {c.what}: {c.detail}", file=sys.stderr)
            print("relay: not switched: publish the new records first (or --force)",
                  file=sys.stderr)
            return 1
    with_store(config, lambda s: s.save_domain(rotated, replace=True))
    retiring = [k for k in rotated.keys if k.state == "retiring" and k.retire_after]
    print(f"{domain.name} now signs with " + ", ".join(k.selector for k in pending) + ".")
    if retiring:
        print("Keep the old records published until "
              f"{iso(max(k.retire_after or 0 for k in retiring))}: mail signed with them may "
              "still be in transit or verified late.")
    return 0


def cmd_remove(args: argparse.Namespace, config: Config) -> int:
    name = _name(args.domain)
    removed = with_store(config, lambda s: s.remove_domain(name))
    if not removed:
        print(f"relay: no domain {name}", file=sys.stderr)
        return 1
    domains.remove_key_files(config, name)
    print(f"removed {name} and its keys; its mail is no longer signed with them")
    return 0


def domain_json(d: Domain, config: Config | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": d.id, "name": d.name, "createdAt": iso(d.created_at),
        "returnPath": d.return_path,
        "keys": [{"selector": k.selector, "algorithm": k.algorithm, "state": k.state,
                  "createdAt": iso(k.created_at), "activatedAt": iso(k.activated_at) or None,
                  "retireAfter": iso(k.retire_after) or None} for k in d.keys],
    }
    if config is not None:
        out["records"] = [{"name": r.name, "type": r.type, "value": r.value,
                           "purpose": r.purpose} for r in domains.records(config, d)]
    return out


def _print_records(config: Config, domain: Domain) -> None:
    for r in domains.records(config, domain):
        print(f"; {r.purpose}\n{r.zone_line()}\n")
    print(f"; and for forward-confirmed reverse DNS: the address(es) of "
          f"{config.server.hostname} must have PTR records naming it")
