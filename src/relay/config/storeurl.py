"""[store] url: where the queue lives, SQLite (one node) or PostgreSQL (many nodes, one queue;
issue 20). Checked at load so a typo is a config error naming `store.url`, not a connection
failure at start; masked for logs since a PostgreSQL URL carries a password."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

MAX_URL = 2048  # a URL longer than this is a mistake, not a store
SQLITE_SCHEMES = ("sqlite",)
POSTGRESQL_SCHEMES = ("postgresql", "postgres")  # both spellings libpq and asyncpg take
FORMS = '"" (the SQLite file in server.data_dir), sqlite:///path/relay.sqlite or ' \
        "postgresql://user:password@host:port/database"


def check_store_url(value: str) -> str:
    """The URL as given, when it is one relay can open; ValueError (the password never in
    it) otherwise."""
    if not value:
        return value
    if len(value) > MAX_URL:
        raise ValueError(f"must be at most {MAX_URL} characters; got {len(value)}")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("must have no spaces or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port  # ValueError for a port that is no number or out of range
    except ValueError:  # not its text: a password may be what it took for a port
        raise ValueError(f"not a URL relay can use (is the port a number 1..65535?); use "
                         f"{FORMS}") from None
    scheme = parts.scheme.lower()
    if scheme in SQLITE_SCHEMES:
        if parts.netloc or parts.query or parts.fragment:
            raise ValueError("a sqlite URL names a file and nothing else: sqlite:///path"
                             f"/relay.sqlite; got {mask_url(value)}")
        if parts.path in ("", "/") or parts.path.endswith("/"):
            raise ValueError(f"a sqlite URL needs a file path: sqlite:///path/relay.sqlite; "
                             f"got {mask_url(value)}")
        return value
    if scheme in POSTGRESQL_SCHEMES:
        if not parts.hostname and not parse_qs(parts.query).get("host"):
            raise ValueError("a postgresql URL needs a host: postgresql://user:password@host"
                             f":port/database; got {mask_url(value)}")
        if port == 0:
            raise ValueError(f"port must be 1..65535; got {mask_url(value)}")
        if parts.fragment:
            raise ValueError(f"a postgresql URL has no #fragment; got {mask_url(value)}")
        return value
    shown = f"{parts.scheme!r}" if parts.scheme else "none"
    raise ValueError(f"scheme {shown} is not one relay opens; use {FORMS}")


def is_postgresql(url: str) -> bool:
    return urlsplit(url).scheme.lower() in POSTGRESQL_SCHEMES


def sqlite_url(path: Path) -> str:
    """sqlite:///abs/path for a file (a relative one made absolute: the URL's path is)."""
    return f"sqlite://{path.absolute()}"


def sqlite_path(url: str) -> Path:
    """The file of a sqlite:///path URL (check_store_url has accepted it)."""
    return Path(urlsplit(url).path)


def mask_url(url: str) -> str:
    """The URL for a log line or an error: its password, if any, as ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<a URL that does not parse>"
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{hostport}").geturl()


def check_node_name(value: str) -> str:
    """[store] node: letters, digits and . _ : - only, at most 64 (it names leases)."""
    if len(value) > 64:
        raise ValueError(f"must be at most 64 characters; got {len(value)}")
    if value and not all(c.isascii() and (c.isalnum() or c in "._:-") for c in value):
        raise ValueError("must be letters, digits and . _ : - only")
    return value
