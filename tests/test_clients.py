"""Who a client is for per-client limits (clients.py): an IPv4 address, or an IPv6 /64."""

from __future__ import annotations

import pytest

from relay.clients import client_key
from relay.smtp.limits import AuthThrottle, ConnectionCaps


@pytest.mark.parametrize(("address", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:a:b:c:d", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("fe80::1%eth0", "fe80::/64"),
    ("", ""),
    ("/run/relay.sock", "/run/relay.sock"),
])
def test_client_key(address: str, key: str) -> None:
    assert client_key(address) == key


def test_one_ipv6_subscriber_cannot_take_a_new_address_per_connection() -> None:
    caps = ConnectionCaps(total=100, per_client=2)
    keys = [client_key(f"2001:db8:1:2::{i:x}") for i in range(1, 4)]
    assert caps.admit(keys[0]) is None and caps.admit(keys[1]) is None
    assert caps.admit(keys[2]) is not None  # the third address of the same /64
    assert caps.admit(client_key("2001:db8:1:3::1")) is None  # the next /64 is another
    throttle = AuthThrottle(delay_after=1, block_after=2, block_seconds=60)
    throttle.failed(client_key("2001:db8:9:9::1"))
    throttle.failed(client_key("2001:db8:9:9::2"))
    assert throttle.blocked(client_key("2001:db8:9:9::3"))
