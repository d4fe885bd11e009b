"""The `relay` command: init, serve, send, keys, domains, suppressions, webhooks, templates,
contacts, bounces, queue, check-config, backup, restore."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import ssl
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from .. import config as config_mod
from .. import keys, logs
from ..aio import run_loop
from ..config import Config, LogConfig, is_postgresql, mask_url
from ..config.storeurl import check_store_url
from ..datadir import check_owner
from ..errors import ConfigError, StoreError, ValidationError
from ..store import SQLiteStore
from ..types import SCOPES
from . import backup as cli_backup
from . import bounces as cli_bounces
from . import check as cli_check
from . import contacts as cli_contacts
from . import domains as cli_domains
from . import lifecycle as cli_lifecycle
from . import prune as cli_prune
from . import queue as cli_queue
from . import suppressions as cli_suppressions
from . import templates as cli_templates
from . import webhooks as cli_webhooks
from .util import Subparsers, iso, relay_version, table, with_store

EXIT_CONFIG = 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_CONFIG
    logs.configure(LogConfig())  # until the config is read: its errors are printed plainly
    try:
        config = config_mod.load(args.config) if args.func is not cmd_init else None
        if config is not None:
            logs.configure(config.log)  # [log]: format, level, access log
        if config is not None and args.func is not cli_lifecycle.cmd_reload:
            check_owner(config.server.data_dir)
        result: int = args.func(args, config)
        return result
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_CONFIG
    except (ValidationError, StoreError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `relay queue list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay", description="SMTP relay and mail API")
    p.add_argument("--version", action="version", version=f"relay {relay_version()}")
    p.add_argument("--config", metavar="PATH", default=None,
                   help="config file (default: $RELAY_CONFIG, else embedded defaults)")
    # `relay serve --config X` works as well as `relay --config X serve`
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    sub = Subparsers(p.add_subparsers(metavar="COMMAND"), common)

    s = sub.add_parser("init", help="write a config, make the data dir, a TLS cert and a key")
    s.add_argument("--write-config", metavar="PATH",
                   help="where to write a commented config file (not overwritten)")
    s.add_argument("--store", metavar="URL", default=None,
                   help="the queue's store: postgresql://user:password@host/db (the schema "
                   "is made there) or sqlite:///path; default the SQLite file in the data dir")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("serve", help="run relay")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("send", help="send a test message through the running relay")
    s.add_argument("--to", required=True, action="append")
    s.add_argument("--from", dest="sender", default=None)
    s.add_argument("--subject", default="Test message from relay")
    s.add_argument("--key", default=os.environ.get("RELAY_API_KEY"),
                   help="API key for AUTH (default $RELAY_API_KEY, else a one-off key)")
    s.set_defaults(func=cmd_send)

    k = Subparsers(sub.add_parser("keys", help="API keys").add_subparsers(metavar="ACTION"),
                    common)
    s = k.add_parser("create", help="create a key; the secret is printed once")
    s.add_argument("--name", required=True)
    s.add_argument("--scope", action="append", choices=SCOPES,
                   help="repeat for more (default: emails:send)")
    s.add_argument("--domain", action="append", default=[],
                   help="limit to this sender domain (repeatable)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_keys_create)
    s = k.add_parser("list", help="list keys")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_keys_list)
    s = k.add_parser("revoke", help="revoke a key")
    s.add_argument("id")
    s.set_defaults(func=cmd_keys_revoke)

    cli_domains.add_parsers(sub, common)
    cli_suppressions.add_parsers(sub, common)
    cli_webhooks.add_parsers(sub, common)
    cli_templates.add_parsers(sub, common)
    cli_contacts.add_parsers(sub, common)
    cli_bounces.add_parsers(sub, common)
    cli_prune.add_parsers(sub, common)
    cli_lifecycle.add_parsers(sub, common)

    cli_queue.add_parsers(sub, common)
    cli_backup.add_parsers(sub, common)
    cli_check.add_parsers(sub, common)
    return p


# -- init and serve -------------------------------------------------------------


def example_config() -> str:
    return resources.files("relay").joinpath("relay.toml").read_text("utf-8")


def cmd_init(args: argparse.Namespace, _: Config | None) -> int:
    from ..tlsutil import ensure_self_signed  # cryptography's x509: only init needs it

    if args.write_config:
        target = Path(args.write_config)
        if target.exists():
            print(f"relay: {target} exists; not overwritten", file=sys.stderr)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            text = example_config()
            if args.store and is_postgresql(args.store):  # the password stays out of files
                print(f"the config leaves [store] url empty: give the service "
                      f"RELAY_STORE_URL={mask_url(args.store)} (with its password)")
            elif args.store:
                text = text.replace('\nurl = ""\n', f"\nurl = {json.dumps(args.store)}\n", 1)
            target.write_text(text, "utf-8")
            print(f"wrote {target} (edit it, then: relay --config {target} serve)")
    config = config_mod.load(args.config or (args.write_config if args.write_config else None))
    if args.store is not None:
        try:
            config = dataclasses.replace(config, store=dataclasses.replace(
                config.store, url=check_store_url(args.store)))
        except ValueError as exc:
            raise ConfigError("--store", "store.url", str(exc)) from None
        print(f"store {mask_url(config.store_url)} (schema made or brought up to date)")
    cert, _ = ensure_self_signed(config.server.data_dir, config.server.hostname)
    print(f"data dir {config.server.data_dir} (TLS certificate {cert})")
    _first_key(config, always=True)
    return 0


def _first_key(config: Config, *, always: bool = False) -> None:
    async def go(store: SQLiteStore) -> tuple[Any, str] | None:
        if not always and await store.list_api_keys():
            return None
        return await keys.create_key(store, name="first key", scopes=SCOPES)

    made = with_store(config, go)
    if made:
        key, secret = made
        print(f"API key {key.id} (all scopes), shown once; keep it:\n\n    {secret}\n", flush=True)


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    config.server.data_dir.mkdir(parents=True, exist_ok=True)
    _first_key(config)
    for lst in config.smtp.listeners:
        print(f"SMTP {lst.mode} on {lst.address}:{lst.port} (tls: {lst.tls})", flush=True)
    sub = next((lst for lst in config.smtp.listeners if lst.mode == "submission"), None)
    if sub is not None:
        print(f"Send a first message: swaks --server {sub.address}:{sub.port} -tls "
              f"--auth-user relay --auth-password <API key> --from you@example.com "
              f"--to someone@example.com   (or: relay send --to someone@example.com)", flush=True)
    from ..service import run  # here: the other commands (`queue list`) start without it

    run_loop(run(config, freeze_startup=True))
    return 0


# -- send ---------------------------------------------------------------------------


def cmd_send(args: argparse.Namespace, config: Config) -> int:
    import smtplib  # here, not at the top: the CLI starts without it (tests/test_cli.py)
    from email.message import EmailMessage
    from email.utils import make_msgid

    listener = next((lst for lst in config.smtp.listeners if lst.mode != "inbound"), None)
    if listener is None:
        print("relay: no submission or relay listener is configured", file=sys.stderr)
        return 1
    sender = args.sender or f"relay@{config.server.hostname}"
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, ", ".join(args.to), args.subject
    msg["Message-ID"] = make_msgid(domain=config.server.hostname)
    msg.set_content(f"A test message sent by `relay send` at "
                    f"{datetime.datetime.now(datetime.UTC).isoformat()}.\n")
    secret, temp_id = args.key, None
    if listener.mode == "submission" and not secret:
        key, secret = with_store(config, lambda s: keys.create_key(
            s, name="relay send (one-off)", scopes=["emails:send"]))
        temp_id = key.id
    host = "127.0.0.1" if listener.address in ("0.0.0.0", "::") else listener.address
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # our own, possibly self-signed
    try:
        if listener.tls == "implicit":
            client: smtplib.SMTP = smtplib.SMTP_SSL(host, listener.port, context=ctx, timeout=30)
        else:
            client = smtplib.SMTP(host, listener.port, timeout=30)
        with client:
            client.ehlo()
            if listener.tls == "starttls":
                client.starttls(context=ctx)
                client.ehlo()
            if listener.mode == "submission":
                client.login("relay", secret)
            client.send_message(msg)
    except (OSError, smtplib.SMTPException) as exc:
        print(f"relay: sending failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if temp_id:
            with_store(config, lambda s: s.revoke_api_key(temp_id, datetime.datetime.now()
                                                            .timestamp()))
    print(f"sent to {', '.join(args.to)} through {host}:{listener.port}")
    return 0


# -- keys ------------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace, config: Config) -> int:
    scopes = args.scope or ["emails:send"]
    key, secret = with_store(config, lambda s: keys.create_key(
        s, name=args.name, scopes=scopes, domains=args.domain))
    if args.json:
        print(json.dumps({"id": key.id, "key": secret, "scopes": list(key.scopes),
                          "domains": list(key.domains)}))
    else:
        print(f"created {key.id} ({', '.join(key.scopes)})"
              + (f" for {', '.join(key.domains)}" if key.domains else ""))
        print(f"key (shown once): {secret}")
    return 0


def cmd_keys_list(args: argparse.Namespace, config: Config) -> int:
    found = with_store(config, lambda s: s.list_api_keys())
    if args.json:
        print(json.dumps([{"id": k.id, "name": k.name, "scopes": list(k.scopes),
                           "domains": list(k.domains), "createdAt": iso(k.created_at),
                           "revoked": k.revoked_at is not None} for k in found], indent=2))
        return 0
    rows = [("ID", "NAME", "SCOPES", "DOMAINS", "CREATED", "STATE")]
    rows += [(k.id, k.name, ",".join(k.scopes), ",".join(k.domains) or "*",
              iso(k.created_at), "revoked" if k.revoked_at else "active") for k in found]
    table(rows)
    return 0


def cmd_keys_revoke(args: argparse.Namespace, config: Config) -> int:
    when = datetime.datetime.now().timestamp()
    if not with_store(config, lambda s: s.revoke_api_key(args.id, when)):
        print(f"relay: no active key {args.id}", file=sys.stderr)
        return 1
    print(f"revoked {args.id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
