"""`relay reload`: make the running relay read its config file again (what `systemctl reload
relay` does through ExecReload), by sending SIGHUP to the pid its data dir lock records."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ..config import Config
from ..datadir import holder
from .util import Subparsers


def add_parsers(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("reload", help="make the running relay re-read its config and TLS "
                       "certificates (SIGHUP); a bad config is refused and logged")
    s.set_defaults(func=cmd_reload)


def cmd_reload(args: argparse.Namespace, config: Config) -> int:
    data_dir = config.server.data_dir
    try:
        pid = holder(data_dir)
    except OSError as exc:
        print(f"relay: cannot read {data_dir}/relay.lock ({exc.strerror or exc}); run this "
              "as the user relay runs as (sudo -u relay relay reload)", file=sys.stderr)
        return 1
    if pid is None:
        print(f"relay: no relay is running on {data_dir}", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"relay: no relay is running on {data_dir} (pid {pid} is gone)", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"relay: not allowed to signal pid {pid}; run this as the user relay runs as "
              "(sudo -u relay relay reload)", file=sys.stderr)
        return 1
    print(f"asked relay (pid {pid}) to reload; its log says whether the new config was "
          "taken or refused")
    return 0
