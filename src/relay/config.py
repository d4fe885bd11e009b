"""TOML file plus RELAY_* environment → frozen, keyword-only config values.

Every bad key or value is a `ConfigError(file, key, reason)`, printed by the
CLI as one line `<file>: <key>: <reason>` before anything listens.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LISTENER_MODES = ("submission", "relay", "inbound")
LISTENER_TLS = ("none", "starttls", "implicit")
DELIVERY_TLS = ("opportunistic", "require", "none")
SMARTHOST_TLS = ("starttls", "implicit", "none")


def _check_address(value: str) -> str:
    ipaddress.ip_address(value)  # raises ValueError with a readable message
    return value


def _check_port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number 0..65535")
    return value


def _check_positive(value: float) -> int | float:
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def _one_of(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    return check


def _check_hostport(value: str) -> str:
    if value:
        parse_hostport(value, default_port=25)
    return value


def parse_hostport(value: str, *, default_port: int) -> tuple[str, int]:
    """"host", "host:port", "[v6]:port" or a bare IPv6 address → (host, port)."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    if not host:
        raise ValueError(f"{value!r} has no host")
    if port and not port.isdigit():
        raise ValueError(f"{value!r}: port must be a number")
    number = int(port) if port else default_port
    _check_port(number)
    return host, number


def _check_nameserver(value: str) -> str:
    host, _ = parse_hostport(value, default_port=53)
    ipaddress.ip_address(host)
    return value


def _check_domain(value: str) -> str:
    value = value.strip().lower().rstrip(".")
    if not value or "@" in value or " " in value:
        raise ValueError(f"{value!r} is not a domain name")
    return value


def _meta(check: Callable[[Any], Any] | None = None, *, item: Callable[[Any], Any] | None = None,
          doc: str = "") -> dict[str, Any]:
    return {"check": check, "item": item, "doc": doc}


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    hostname: str = field(default_factory=socket.getfqdn)
    data_dir: Path = Path("./relay-data")


@dataclass(frozen=True, kw_only=True)
class ListenerConfig:
    address: str = field(default="127.0.0.1", metadata=_meta(_check_address))
    port: int = field(default=2525, metadata=_meta(_check_port))
    mode: str = field(default="submission", metadata=_meta(_one_of(*LISTENER_MODES)))
    tls: str = field(default="starttls", metadata=_meta(_one_of(*LISTENER_TLS)))
    tls_cert: str = ""
    tls_key: str = ""
    allowed_networks: tuple[IPNetwork, ...] = field(
        default=(), metadata=_meta(item=lambda v: ipaddress.ip_network(v, strict=False))
    )
    allowed_from_domains: tuple[str, ...] = field(default=(), metadata=_meta(item=_check_domain))


@dataclass(frozen=True, kw_only=True)
class SmtpConfig:
    listeners: tuple[ListenerConfig, ...] = (ListenerConfig(),)


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    enabled: bool = True
    address: str = field(default="127.0.0.1", metadata=_meta(_check_address))
    port: int = field(default=8025, metadata=_meta(_check_port))
    public_url: str = "http://127.0.0.1:8025"


@dataclass(frozen=True, kw_only=True)
class DeliveryConfig:
    paused: bool = False  # accept and queue, but deliver nothing (maintenance, staging)
    process: bool = True  # deliver from a process of its own: accepting and delivering get a core each
    smarthost: str = field(default="", metadata=_meta(_check_hostport))
    smarthost_tls: str = field(default="starttls", metadata=_meta(_one_of(*SMARTHOST_TLS)))
    smarthost_tls_verify: bool = True
    smarthost_user: str = ""
    smarthost_password: str = ""
    mx_port: int = field(default=25, metadata=_meta(_check_port))
    tls: str = field(default="opportunistic", metadata=_meta(_one_of(*DELIVERY_TLS)))
    tls_verify: bool = False
    tls_ca_file: str = ""  # extra CA bundle for verified TLS (tests, private PKI)
    concurrency: int = field(default=100, metadata=_meta(_check_positive))
    concurrency_per_destination: int = field(default=20, metadata=_meta(_check_positive))
    connect_timeout: float = field(default=30.0, metadata=_meta(_check_positive))
    command_timeout: float = field(default=300.0, metadata=_meta(_check_positive))
    session_idle: float = field(default=5.0, metadata=_meta(_check_positive))
    messages_per_session: int = field(default=100, metadata=_meta(_check_positive))
    retry_min: float = field(default=300.0, metadata=_meta(_check_positive))
    retry_max: float = field(default=14400.0, metadata=_meta(_check_positive))
    queue_lifetime: float = field(default=432000.0, metadata=_meta(_check_positive))
    lease: float = field(default=600.0, metadata=_meta(_check_positive))


@dataclass(frozen=True, kw_only=True)
class DnsConfig:
    nameservers: tuple[str, ...] = field(default=(), metadata=_meta(item=_check_nameserver))
    timeout: float = field(default=5.0, metadata=_meta(_check_positive))


def _check_optional_domain(value: str) -> str:
    return _check_domain(value) if value.strip() else ""


def _check_label(value: str) -> str:
    value = value.strip().lower()
    if not value or not all(c.isalnum() or c == "-" for c in value) or len(value) > 63:
        raise ValueError(f"{value!r} is not a DNS label (letters, digits, '-')")
    return value


@dataclass(frozen=True, kw_only=True)
class DkimConfig:
    enabled: bool = True  # sign outgoing mail with the sending domain's keys
    # signs mail whose From domain has no keys of its own (it needs keys: relay domains add)
    default_domain: str = field(default="", metadata=_meta(_check_optional_domain))
    # the return-path (MAIL FROM) host of a domain's mail is <label>.<domain>
    return_path_label: str = field(default="bounces", metadata=_meta(_check_label))
    # rua= of the DMARC record `relay domains add` suggests; empty = dmarc-reports@<domain>
    dmarc_report_address: str = ""
    # after `relay domains rotate --activate`, the old selectors stay published this long
    rotation_overlap_days: float = field(default=7.0, metadata=_meta(_check_positive))


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    # RFC 8058 needs https for one-click unsubscribe; true lets broadcast mail use an http
    # [api] public_url (tests, a lab)
    allow_insecure_public_url: bool = False


def _check_mailbox(value: str) -> str:
    local, at, domain = value.strip().rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{value!r} is not an e-mail address (local@domain)")
    return f"{local}@{_check_domain(domain)}"


@dataclass(frozen=True, kw_only=True)
class BouncesConfig:
    # the return-path host of mail whose sending domain relay has no record of (relay domains
    # add gives each domain its own, bounces.<domain>); empty = [server] hostname
    domain: str = field(default="", metadata=_meta(_check_optional_domain))
    # addresses registered with mailbox providers' feedback loops: an inbound listener
    # accepts complaint reports (ARF) sent to them
    complaint_addresses: tuple[str, ...] = field(default=(), metadata=_meta(item=_check_mailbox))


@dataclass(frozen=True, kw_only=True)
class WebhooksConfig:
    # loopback, private, link-local and metadata targets are refused unless this is true
    allow_private_targets: bool = False
    timeout: float = field(default=15.0, metadata=_meta(_check_positive))
    # an endpoint whose deliveries have all failed this long is disabled
    disable_after_days: float = field(default=5.0, metadata=_meta(_check_positive))
    # multiplies the Standard Webhooks retry schedule (5 s, 5 min, 30 min, 2 h, ... 24 h)
    retry_scale: float = field(default=1.0, metadata=_meta(_check_positive))
    concurrency: int = field(default=20, metadata=_meta(_check_positive))


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    # the built message, encoded: 25 MiB of attachments take about 34.2 MiB in base64
    max_message_size: int = field(default=37748736, metadata=_meta(_check_positive))
    max_recipients: int = field(default=1000, metadata=_meta(_check_positive))
    # API attachments, decoded octets: one file, and all of a message's together
    max_attachment_size: int = field(default=10485760, metadata=_meta(_check_positive))
    max_attachments_size: int = field(default=26214400, metadata=_meta(_check_positive))
    max_received_headers: int = field(default=50, metadata=_meta(_check_positive))
    max_commands: int = field(default=10000, metadata=_meta(_check_positive))
    idle_timeout: float = field(default=300.0, metadata=_meta(_check_positive))
    auth_failures_before_delay: int = field(default=3, metadata=_meta(_check_positive))
    auth_failures_before_block: int = field(default=10, metadata=_meta(_check_positive))
    auth_block_seconds: float = field(default=600.0, metadata=_meta(_check_positive))
    # a message's metadata (and tags) as JSON, in octets: every event and webhook carries it
    # (also Plunk's contact data); past it, submit refuses the message naming the field
    max_metadata_size: int = field(default=16384, metadata=_meta(_check_positive))
    # octets one API request may expand into: the sum over the messages it builds of their
    # content, headers and decoded attachments (MailChannels: every personalization is one,
    # sharing the attachments), checked before building and again as templates fill in; 413
    max_request_expansion: int = field(default=52428800, metadata=_meta(_check_positive))
    # an inbound report (DSN, ARF): MIME parts and recipients read from it; the rest ignored
    max_report_parts: int = field(default=64, metadata=_meta(_check_positive))
    max_report_recipients: int = field(default=1000, metadata=_meta(_check_positive))
    # concurrent connections: to one SMTP listener, and from one client address to it
    max_smtp_connections: int = field(default=1000, metadata=_meta(_check_positive))
    max_smtp_connections_per_client: int = field(default=50,
                                                 metadata=_meta(_check_positive))
    # concurrent HTTP connections to the API, in all and from one client address (past
    # either: 503 and closed, api/connections.py)
    max_http_connections: int = field(default=2000, metadata=_meta(_check_positive))
    max_http_connections_per_client: int = field(default=200,
                                                 metadata=_meta(_check_positive))
    # seconds an HTTP client may take to send its request line and headers (from connecting,
    # or from the first byte of a kept-alive connection's next request), and that its body
    # may stall between two reads
    http_header_timeout: float = field(default=10.0, metadata=_meta(_check_positive))
    http_body_timeout: float = field(default=60.0, metadata=_meta(_check_positive))


@dataclass(frozen=True, kw_only=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    bounces: BouncesConfig = field(default_factory=BouncesConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})

    @property
    def db_path(self) -> Path:
        return self.server.data_dir / "relay.sqlite"


DEFAULTS_SOURCE = "<defaults>"
ENV_SOURCE = "environment"


def load(path: str | os.PathLike[str] | None = None,
         environ: Mapping[str, str] | None = None) -> Config:
    """Build the config from `path` (or $RELAY_CONFIG) and RELAY_* overrides."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get("RELAY_CONFIG"):
        path = environ["RELAY_CONFIG"]
    raw: dict[str, Any] = {}
    source = DEFAULTS_SOURCE
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(source, "-", f"cannot read: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, "-", f"not valid TOML: {exc}") from None
    _apply_env(raw, environ)
    config = _build(Config, raw, source, prefix="", env_keys=_env_keys(environ))
    config = dataclasses.replace(config, source=source)
    _check_tls_files(config)
    return config


# RELAY_* variables that are not settings: the config path, log level, and `relay send`'s key.
NOT_SETTINGS = frozenset({"RELAY_CONFIG", "RELAY_LOG_LEVEL", "RELAY_API_KEY"})


def _env_keys(environ: Mapping[str, str]) -> set[str]:
    return {k for k in environ if k.startswith("RELAY_") and k not in NOT_SETTINGS}


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    """RELAY_<SECTION>_<KEY>=value overrides [section] key (value read as TOML if it parses)."""
    sections = {f.name: f for f in dataclasses.fields(Config) if not f.metadata.get("internal")}
    for name in sorted(_env_keys(environ)):
        rest = name[len("RELAY_"):].lower()
        section, _, key = rest.partition("_")
        if section not in sections or section == "smtp":
            raise ConfigError(ENV_SOURCE, name, "no such setting (use RELAY_<SECTION>_<KEY>; "
                              "listeners are set in the file)")
        try:
            value = tomllib.loads(f"v = {environ[name]}")["v"]
        except tomllib.TOMLDecodeError:
            value = environ[name]
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(ENV_SOURCE, name, f"[{section}] is not a table in the file")
        raw[section][key] = value


def _build(cls: type[Any], raw: Any, source: str, *, prefix: str, env_keys: set[str]) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(source, prefix.rstrip(".") or "-", "must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in raw:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(_src(source, prefix, key, env_keys), prefix + key,
                              f"unknown key (known: {known})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = prefix + name
        src = _src(source, prefix, name, env_keys)
        values[name] = _convert(hints[name], raw[name], f, src, key, env_keys)
    return cls(**values)


def _src(source: str, prefix: str, name: str, env_keys: set[str]) -> str:
    env_name = "RELAY_" + (prefix + name).replace(".", "_").upper()
    return ENV_SOURCE if env_name in env_keys else source


def _convert(hint: Any, value: Any, f: dataclasses.Field[Any], source: str, key: str,
             env_keys: set[str]) -> Any:
    check = f.metadata.get("check")
    item = f.metadata.get("item")
    try:
        if dataclasses.is_dataclass(hint):
            return _build(hint, value, source, prefix=key + ".", env_keys=env_keys)
        origin = typing.get_origin(hint)
        if origin is tuple:
            inner = typing.get_args(hint)[0]
            if not isinstance(value, list):
                raise ValueError(f"must be a list, not {_tname(value)}")
            if dataclasses.is_dataclass(inner):
                return tuple(
                    _build(inner, v, source, prefix=f"{key}[{i}].", env_keys=env_keys)
                    for i, v in enumerate(value)
                )
            out = []
            for i, v in enumerate(value):
                if not isinstance(v, str):
                    raise ValueError(f"item {i} must be a string, not {_tname(v)}")
                try:
                    out.append(item(v) if item else v)
                except ValueError as exc:
                    raise ValueError(f"item {i} ({v!r}): {exc}") from None
            return tuple(out)
        if hint is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, not {_tname(value)}")
        elif hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"must be an integer, not {_tname(value)}")
        elif hint is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"must be a number, not {_tname(value)}")
            value = float(value)
        elif hint is str:
            if not isinstance(value, str):
                raise ValueError(f"must be a string, not {_tname(value)}")
        elif hint is Path:
            if not isinstance(value, str) or not value:
                raise ValueError("must be a non-empty path string")
            value = Path(value)
        return check(value) if check else value
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(source, key, str(exc)) from None


def _tname(value: Any) -> str:
    return {list: "a list", dict: "a table", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _check_tls_files(config: Config) -> None:
    for i, listener in enumerate(config.smtp.listeners):
        if (listener.tls_cert == "") != (listener.tls_key == ""):
            raise ConfigError(config.source, f"smtp.listeners[{i}].tls_key",
                              "tls_cert and tls_key must be set together")
        for name in ("tls_cert", "tls_key"):
            path = getattr(listener, name)
            reason = _unreadable(path) if path else None
            if reason:
                raise ConfigError(config.source, f"smtp.listeners[{i}].{name}", f"{path}: {reason}")
    ports = [(lst.address, lst.port) for lst in config.smtp.listeners if lst.port]
    for i, where in enumerate(ports):
        if where in ports[:i]:
            raise ConfigError(config.source, f"smtp.listeners[{i}].port",
                              f"{where[0]}:{where[1]} is used by another listener")
    ca_file = config.delivery.tls_ca_file
    if ca_file and (reason := _unreadable(ca_file)):
        raise ConfigError(config.source, "delivery.tls_ca_file", f"{ca_file}: {reason}")


def _unreadable(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except FileNotFoundError:
        return "no such file"
    except IsADirectoryError:
        return "is a directory, not a file"
    except OSError as exc:
        return f"not readable ({exc.strerror or exc})"
    return None
