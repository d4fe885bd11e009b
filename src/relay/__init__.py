"""relay: a self-hosted SMTP relay and mail transfer agent with a JSON API."""

__version__ = "0.1.0"
