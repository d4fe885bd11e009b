"""relay's configuration: its shape and defaults (sections.py), what a valid value is
(checks.py), and how a TOML file and RELAY_* variables become one (loader.py).

Import the names from here: `from relay.config import Config, load`.
"""

from .checks import parse_hostport
from .loader import DEFAULTS_SOURCE, ENV_SOURCE, NOT_SETTINGS, load
from .sections import (
    DELIVERY_TLS,
    LISTENER_MODES,
    LISTENER_TLS,
    SMARTHOST_TLS,
    ApiConfig,
    BouncesConfig,
    Config,
    DeliveryConfig,
    DkimConfig,
    DnsConfig,
    IPNetwork,
    LimitsConfig,
    ListenerConfig,
    LogConfig,
    MetricsConfig,
    RetentionConfig,
    ServerConfig,
    SmtpConfig,
    StoreConfig,
    TrackingConfig,
    WebhooksConfig,
)
from .storeurl import is_postgresql, mask_url, sqlite_path

__all__ = ["DEFAULTS_SOURCE", "DELIVERY_TLS", "ENV_SOURCE", "LISTENER_MODES", "LISTENER_TLS",
           "NOT_SETTINGS", "SMARTHOST_TLS", "ApiConfig", "BouncesConfig", "Config",
           "DeliveryConfig", "DkimConfig", "DnsConfig", "IPNetwork", "LimitsConfig",
           "ListenerConfig", "LogConfig", "MetricsConfig", "RetentionConfig", "ServerConfig",
           "SmtpConfig", "StoreConfig", "TrackingConfig", "WebhooksConfig", "is_postgresql",
           "load", "mask_url", "parse_hostport", "sqlite_path"]
