"""What a valid setting value is: the checks a config field names in its metadata, each
returning the value (perhaps normalized) or raising ValueError with a readable reason."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from ..addresses import to_ascii


def check_address(value: str) -> str:
    ipaddress.ip_address(value)  # raises ValueError with a readable message
    return value


def check_port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number 0..65535")
    return value


def check_positive(value: float) -> int | float:
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def check_non_negative(value: float) -> int | float:
    if value < 0:
        raise ValueError("must be zero or more")
    return value


def at_most(limit: int) -> Callable[[int], int]:
    """A positive integer no greater than `limit` (a bound on one step's work)."""
    def check(value: int) -> int:
        if not 0 < value <= limit:
            raise ValueError(f"must be 1..{limit}; got {value}")
        return value

    return check


def one_of(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    return check


def check_hostport(value: str) -> str:
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
    check_port(number)
    return host, number


def check_nameserver(value: str) -> str:
    host, _ = parse_hostport(value, default_port=53)
    ipaddress.ip_address(host)
    return value


def check_domain(value: str) -> str:
    """A domain as relay stores it: U-labels as A-labels (IDNA 2008), so that a setting
    matches the sender and recipient domains it is compared with."""
    value = value.strip().rstrip(".")
    if not value or "@" in value or " " in value:
        raise ValueError(f"{value!r} is not a domain name")
    try:
        return to_ascii(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid domain name (IDNA 2008: {exc})") from None


def check_optional_domain(value: str) -> str:
    return check_domain(value) if value.strip() else ""


def check_label(value: str) -> str:
    value = value.strip().lower()
    if not value or not all(c.isalnum() or c == "-" for c in value) or len(value) > 63:
        raise ValueError(f"{value!r} is not a DNS label (letters, digits, '-')")
    return value


def check_mailbox(value: str) -> str:
    local, at, domain = value.strip().rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"{value!r} is not an e-mail address (local@domain)")
    return f"{local}@{check_domain(domain)}"


def meta(check: Callable[[Any], Any] | None = None, *, item: Callable[[Any], Any] | None = None,
         doc: str = "") -> dict[str, Any]:
    """A field's metadata: `check` for its value, `item` for each item of a list."""
    return {"check": check, "item": item, "doc": doc}


METRICS_PORT = 9025  # [metrics] address without a port


def check_listen(value: str) -> str:
    """"" (nothing) or "ip[:port]" to listen on."""
    if value:
        host, _ = parse_hostport(value, default_port=METRICS_PORT)
        ipaddress.ip_address(host)
    return value


def check_require_key(value: Any) -> bool | str:
    if isinstance(value, bool):
        return value
    if value == "auto":
        return "auto"
    raise ValueError(f'must be true, false or "auto"; got {value!r}')
