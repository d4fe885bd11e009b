"""The config's shape and defaults: one frozen, keyword-only dataclass per TOML section.

Each field's metadata names the check its value must pass (checks.py); loader.py builds
these from the file and the environment.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

from .checks import (
    at_most,
    check_address,
    check_domain,
    check_hostport,
    check_label,
    check_listen,
    check_mailbox,
    check_nameserver,
    check_non_negative,
    check_optional_domain,
    check_port,
    check_positive,
    check_require_key,
    meta,
    one_of,
)
from .outbound import (
    DEFAULT_BACKOFF,
    DEFAULT_SITES,
    BackoffRule,
    PoolConfig,
    SiteConfig,
    TlsPolicyConfig,
    check_rate,
)
from .storeurl import check_node_name, check_store_url, is_postgresql, sqlite_path, sqlite_url

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LISTENER_MODES = ("submission", "relay", "inbound")
LISTENER_TLS = ("none", "starttls", "implicit")
DELIVERY_TLS = ("opportunistic", "require", "none")
SMARTHOST_TLS = ("starttls", "implicit", "none")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_WORKERS = 64


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    hostname: str = field(default_factory=socket.getfqdn)
    data_dir: Path = Path("./relay-data")


@dataclass(frozen=True, kw_only=True)
class ListenerConfig:
    address: str = field(default="127.0.0.1", metadata=meta(check_address))
    port: int = field(default=2525, metadata=meta(check_port))
    mode: str = field(default="submission", metadata=meta(one_of(*LISTENER_MODES)))
    tls: str = field(default="starttls", metadata=meta(one_of(*LISTENER_TLS)))
    tls_cert: str = ""
    tls_key: str = ""
    allowed_networks: tuple[IPNetwork, ...] = field(
        default=(), metadata=meta(item=lambda v: ipaddress.ip_network(v, strict=False))
    )
    allowed_from_domains: tuple[str, ...] = field(default=(), metadata=meta(item=check_domain))


@dataclass(frozen=True, kw_only=True)
class SmtpConfig:
    listeners: tuple[ListenerConfig, ...] = (ListenerConfig(),)
    # processes serving the listeners: the master (which accepts every connection and hands
    # the others their turns) and workers - 1 more
    workers: int = field(default=1, metadata=meta(at_most(MAX_WORKERS)))


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    enabled: bool = True
    address: str = field(default="127.0.0.1", metadata=meta(check_address))
    port: int = field(default=8025, metadata=meta(check_port))
    public_url: str = "http://127.0.0.1:8025"
    # processes serving the API on one port: the master (which accepts) and workers - 1 more
    workers: int = field(default=1, metadata=meta(at_most(MAX_WORKERS)))


@dataclass(frozen=True, kw_only=True)
class DeliveryConfig:
    paused: bool = False  # accept and queue, but deliver nothing (maintenance, staging)
    process: bool = True  # deliver from a process of its own: accepting and delivering get a core each
    smarthost: str = field(default="", metadata=meta(check_hostport))
    smarthost_tls: str = field(default="starttls", metadata=meta(one_of(*SMARTHOST_TLS)))
    smarthost_tls_verify: bool = True
    smarthost_user: str = ""
    smarthost_password: str = ""
    mx_port: int = field(default=25, metadata=meta(check_port))
    tls: str = field(default="opportunistic", metadata=meta(one_of(*DELIVERY_TLS)))
    tls_verify: bool = False
    tls_ca_file: str = ""  # extra CA bundle for verified TLS (tests, private PKI)
    concurrency: int = field(default=100, metadata=meta(check_positive))
    concurrency_per_destination: int = field(default=20, metadata=meta(check_positive))
    connect_timeout: float = field(default=30.0, metadata=meta(check_positive))
    command_timeout: float = field(default=300.0, metadata=meta(check_positive))
    # the reply to a message's data, from when the data stops moving (RFC 5321 4.5.3.2.6)
    data_timeout: float = field(default=600.0, metadata=meta(check_positive))
    session_idle: float = field(default=5.0, metadata=meta(check_positive))
    messages_per_session: int = field(default=100, metadata=meta(check_positive))
    retry_min: float = field(default=300.0, metadata=meta(check_positive))
    retry_max: float = field(default=14400.0, metadata=meta(check_positive))
    queue_lifetime: float = field(default=432000.0, metadata=meta(check_positive))
    lease: float = field(default=600.0, metadata=meta(check_positive))
    # messages per second to one site (its MX host, or a [[delivery.sites]] group): "10/s",
    # "500/min", "20000/h"; "" = no limit. concurrency_per_destination and
    # messages_per_session are a site's connections and messages per connection
    max_rate: str = field(default="", metadata=meta(check_rate))
    sites: tuple[SiteConfig, ...] = DEFAULT_SITES
    backoff: tuple[BackoffRule, ...] = DEFAULT_BACKOFF
    pools: tuple[PoolConfig, ...] = ()
    tls_policy: tuple[TlsPolicyConfig, ...] = ()
    # MTA-STS (RFC 8461): fetch recipient domains' policies and hold to "enforce" ones
    mta_sts: bool = True
    # the HTTPS port of mta-sts.<domain> (443; like mx_port, tests point it at their own)
    mta_sts_port: int = field(default=443, metadata=meta(check_port))
    # DANE (RFC 7672): TLSA records of MX hosts, believed only with the AD bit of a
    # validating resolver ([dns] nameservers, e.g. unbound on loopback)
    dane: bool = False
    # TLS-RPT (RFC 8460): daily reports of TLS results to the domains that ask for them
    tls_reports: bool = True


@dataclass(frozen=True, kw_only=True)
class DnsConfig:
    nameservers: tuple[str, ...] = field(default=(), metadata=meta(item=check_nameserver))
    timeout: float = field(default=5.0, metadata=meta(check_positive))


@dataclass(frozen=True, kw_only=True)
class DkimConfig:
    enabled: bool = True  # sign outgoing mail with the sending domain's keys
    # signs mail whose From domain has no keys of its own (it needs keys: relay domains add)
    default_domain: str = field(default="", metadata=meta(check_optional_domain))
    # the return-path (MAIL FROM) host of a domain's mail is <label>.<domain>
    return_path_label: str = field(default="bounces", metadata=meta(check_label))
    # rua= of the DMARC record `relay domains add` suggests; empty = dmarc-reports@<domain>
    dmarc_report_address: str = ""
    # after `relay domains rotate --activate`, the old selectors stay published this long
    rotation_overlap_days: float = field(default=7.0, metadata=meta(check_positive))


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    # RFC 8058 needs https for one-click unsubscribe; true lets broadcast mail use an http
    # [api] public_url (tests, a lab)
    allow_insecure_public_url: bool = False


@dataclass(frozen=True, kw_only=True)
class BouncesConfig:
    # the return-path host of mail whose sending domain relay has no record of (relay domains
    # add gives each domain its own, bounces.<domain>); empty = [server] hostname
    domain: str = field(default="", metadata=meta(check_optional_domain))
    # addresses registered with mailbox providers' feedback loops: an inbound listener
    # accepts complaint reports (ARF) sent to them
    complaint_addresses: tuple[str, ...] = field(default=(), metadata=meta(item=check_mailbox))


@dataclass(frozen=True, kw_only=True)
class WebhooksConfig:
    # loopback, private, link-local and metadata targets are refused unless this is true
    allow_private_targets: bool = False
    timeout: float = field(default=15.0, metadata=meta(check_positive))
    # an endpoint whose deliveries have all failed this long is disabled
    disable_after_days: float = field(default=5.0, metadata=meta(check_positive))
    # multiplies the Standard Webhooks retry schedule (5 s, 5 min, 30 min, 2 h, ... 24 h)
    retry_scale: float = field(default=1.0, metadata=meta(check_positive))
    concurrency: int = field(default=20, metadata=meta(check_positive))


@dataclass(frozen=True, kw_only=True)
class LimitsConfig:
    # the built message, encoded: 25 MiB of attachments take about 34.2 MiB in base64
    max_message_size: int = field(default=37748736, metadata=meta(check_positive))
    max_recipients: int = field(default=1000, metadata=meta(check_positive))
    # API attachments, decoded octets: one file, and all of a message's together
    max_attachment_size: int = field(default=10485760, metadata=meta(check_positive))
    max_attachments_size: int = field(default=26214400, metadata=meta(check_positive))
    max_received_headers: int = field(default=50, metadata=meta(check_positive))
    max_commands: int = field(default=10000, metadata=meta(check_positive))
    idle_timeout: float = field(default=300.0, metadata=meta(check_positive))
    auth_failures_before_delay: int = field(default=3, metadata=meta(check_positive))
    auth_failures_before_block: int = field(default=10, metadata=meta(check_positive))
    auth_block_seconds: float = field(default=600.0, metadata=meta(check_positive))
    # a message's metadata (and tags, and the headers MailerLogic's webhooks carry) as JSON,
    # in octets: every event and webhook carries it
    # (also Plunk's contact data); past it, submit refuses the message naming the field
    max_metadata_size: int = field(default=16384, metadata=meta(check_positive))
    # octets one API request may expand into: the sum over the messages it builds of their
    # content, headers and decoded attachments (MailChannels: every personalization is one,
    # sharing the attachments), checked before building and again as templates fill in; 413
    max_request_expansion: int = field(default=52428800, metadata=meta(check_positive))
    # an inbound report (DSN, ARF): MIME parts and recipients read from it; the rest ignored
    max_report_parts: int = field(default=64, metadata=meta(check_positive))
    max_report_recipients: int = field(default=1000, metadata=meta(check_positive))
    # concurrent connections: to one SMTP listener, and from one client address to it
    max_smtp_connections: int = field(default=1000, metadata=meta(check_positive))
    max_smtp_connections_per_client: int = field(default=50,
                                                 metadata=meta(check_positive))
    # concurrent HTTP connections to the API, in all and from one client address (past
    # either: 503 and closed, api/connections.py)
    max_http_connections: int = field(default=2000, metadata=meta(check_positive))
    max_http_connections_per_client: int = field(default=200,
                                                 metadata=meta(check_positive))
    # seconds an HTTP client may take to send its request line and headers (from connecting,
    # or from the first byte of a kept-alive connection's next request), and that its body
    # may stall between two reads
    http_header_timeout: float = field(default=10.0, metadata=meta(check_positive))
    http_body_timeout: float = field(default=60.0, metadata=meta(check_positive))


@dataclass(frozen=True, kw_only=True)
class RetentionConfig:
    # days after a message's final state (every recipient delivered, bounced, expired,
    # suppressed or cancelled) that its body goes, and then the whole message with its
    # recipients, attempts and events; 0 keeps them forever (retention.py)
    bodies_days: float = field(default=7.0, metadata=meta(check_non_negative))
    messages_days: float = field(default=30.0, metadata=meta(check_non_negative))
    # days a webhook delivery is kept once delivered or given up
    webhook_outbox_days: float = field(default=7.0, metadata=meta(check_non_negative))
    # days a contact's events are kept (Plunk's track); 0 = forever
    contact_events_days: float = field(default=0.0, metadata=meta(check_non_negative))
    # rows looked at per transaction, and seconds between two passes
    batch_size: int = field(default=500, metadata=meta(at_most(10000)))
    interval: float = field(default=300.0, metadata=meta(check_positive))


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    enabled: bool = True  # GET /metrics (Prometheus) on the API port
    # "ip:port": also serve /metrics there, on a listener of its own; empty: only the API port
    address: str = field(default="", metadata=meta(check_listen))
    # true, false or "auto": a key with the metrics:read scope is needed unless the listener
    # serving /metrics is bound to a loopback address
    require_key: bool | str = field(default="auto", metadata=meta(check_require_key))
    # destination domains with a label of their own (the first seen); the rest are "other"
    domains: int = field(default=50, metadata=meta(check_positive))


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    # text: a line a record, like Postfix's (no timestamp of its own under systemd: journald
    # adds one); json: an object a line with a "ts" field and the record's fields
    format: str = field(default="text", metadata=meta(one_of(*LOG_FORMATS)))
    # debug | info | warning | error, in any case; RELAY_LOG_LEVEL, when set, wins
    level: str = field(default="info",
                       metadata=meta(lambda v: one_of(*LOG_LEVELS)(v.strip().lower())))
    access_log: bool = True  # a line per HTTP request (logger relay.access)


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    # "": the SQLite file in server.data_dir; "sqlite:///path/relay.sqlite"; or
    # "postgresql://user:password@host:port/database" (RELAY_STORE_URL, kept out of the file)
    url: str = field(default="", metadata=meta(check_store_url))
    # this node's name in the leases it takes on a shared (PostgreSQL) queue; "": the host's
    # name and a digest of server.data_dir, the same at every start of this node
    node: str = field(default="", metadata=meta(check_node_name))


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
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    source: str = field(default="<defaults>", metadata={"internal": True})

    @property
    def db_path(self) -> Path:
        return self.server.data_dir / "relay.sqlite"

    @property
    def store_url(self) -> str:
        """[store] url with its default made explicit: the SQLite file in the data dir."""
        return self.store.url or sqlite_url(self.db_path)

    @property
    def sqlite_file(self) -> Path | None:
        """The SQLite file the queue is in, or None when it is in PostgreSQL."""
        return None if is_postgresql(self.store_url) else sqlite_path(self.store_url)

    @property
    def node_name(self) -> str:
        """[store] node, or the host's name and a digest of the data dir (two nodes on one
        host have two data dirs)."""
        if self.store.node:
            return self.store.node
        digest = hashlib.sha256(str(self.server.data_dir.absolute()).encode()).hexdigest()
        return f"{socket.gethostname()[:48]}-{digest[:8]}"
