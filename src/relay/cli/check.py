"""`relay check-config`: what `relay serve` would trip over, found before it runs (like
`postfix check`): the config itself (loading it already names file, key and reason), the TLS
certificates and keys, the data dir, the sending domains' DKIM keys; busy ports are only a
warning (the relay being checked may be the one listening). Exit 0 when all is well, 2 when
something is wrong, each problem on its own line of stderr."""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys

from ..config import Config
from ..errors import ConfigError
from .util import Subparsers, with_store

EXIT_PROBLEMS = 2


def add_parsers(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("check-config", help="check the config and what serve needs; exit 2 "
                       "on a problem")
    s.set_defaults(func=cmd_check_config)


def cmd_check_config(args: argparse.Namespace, config: Config) -> int:
    # here, not at the top: the keys' and certificates' readers are this command's alone,
    # and every command of the CLI pays for what its start-up imports
    from ..delivery.keycheck import unusable_signing_keys

    problems = [str(p) for p in (*tls_problems(config), *data_dir_problems(config))]
    if (config.sqlite_file is None or config.sqlite_file.exists()) and not problems:
        problems += [str(p.error()) for p in with_store(config, unusable_signing_keys)]
    for warning in busy_ports(config):
        print(f"warning: {warning}", file=sys.stderr)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return EXIT_PROBLEMS
    print(f"config OK: {config.source}")
    return 0


def tls_problems(config: Config) -> list[ConfigError]:
    """Each listener's certificate and key load; a submission listener has TLS at all."""
    from ..tlsutil import server_context  # cryptography's x509 (see cmd_check_config)

    found = []
    for i, lst in enumerate(config.smtp.listeners):
        key = f"smtp.listeners[{i}]"
        if lst.tls == "none":
            if lst.mode == "submission":
                found.append(ConfigError(config.source, f"{key}.tls", "a submission listener "
                                         "needs TLS (AUTH is only offered over TLS); use "
                                         "starttls or implicit"))
            continue
        if lst.tls_cert:
            cert, key_file = lst.tls_cert, lst.tls_key
        else:  # the self-signed pair serve makes at first start, if it is there already
            cert_path = config.server.data_dir / "tls-cert.pem"
            key_path = config.server.data_dir / "tls-key.pem"
            if not (cert_path.exists() and key_path.exists()):
                continue
            cert, key_file = str(cert_path), str(key_path)
        try:
            server_context(cert, key_file)
        except (ssl.SSLError, OSError) as exc:
            found.append(ConfigError(config.source, f"{key}.tls_cert",
                                     f"cannot load the certificate and key: {exc}"))
    ca_file = config.delivery.tls_ca_file
    if ca_file:
        try:
            ssl.create_default_context(cafile=ca_file)
        except (ssl.SSLError, OSError) as exc:
            found.append(ConfigError(config.source, "delivery.tls_ca_file",
                                     f"cannot load the CA bundle: {exc}"))
    return found


def data_dir_problems(config: Config) -> list[ConfigError]:
    """The data dir is a writable directory, or the nearest existing parent lets us make it."""
    data_dir = config.server.data_dir
    probe = data_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    why = None
    if not probe.is_dir():
        why = f"{probe} is not a directory"
    elif not os.access(probe, os.W_OK | os.X_OK):
        why = (f"{probe} is not writable by this user" if probe == data_dir else
               f"cannot be made: {probe} is not writable by this user")
    if data_dir.exists():
        for name in ("relay.sqlite", "relay.sqlite-wal"):
            path = data_dir / name
            if path.exists() and not os.access(path, os.R_OK | os.W_OK):
                why = why or f"{path} is not readable and writable by this user"
    return [ConfigError(config.source, "server.data_dir", f"{data_dir}: {why}")] if why else []


def busy_ports(config: Config) -> list[str]:
    """Listener addresses something already listens on (bound and released at once)."""
    wanted = [(f"smtp.listeners[{i}]", lst.address, lst.port)
              for i, lst in enumerate(config.smtp.listeners)]
    if config.api.enabled:
        wanted.append(("api", config.api.address, config.api.port))
    busy = []
    for key, address, port in wanted:
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as serve binds
            try:
                sock.bind((address, port))
            except OSError as exc:
                busy.append(f"{key}: {address}:{port} is not free ({exc.strerror or exc}); "
                            "is relay already running?")
    return busy
