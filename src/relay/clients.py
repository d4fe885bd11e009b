"""Who a client is, for the limits that count per client (connections, failed logins): its
IPv4 address, or the /64 its IPv6 address is in. One subscriber usually holds a whole /64,
so counting full IPv6 addresses would let one client take a new address per connection."""

from __future__ import annotations

import functools
import ipaddress


@functools.lru_cache(maxsize=4096)
def client_key(address: str) -> str:
    """"192.0.2.7" stays; "2001:db8:1:2:a:b:c:d" is "2001:db8:1:2::/64"; an IPv4-mapped IPv6
    address is its IPv4 address; anything else (a Unix socket, "") is kept as it is."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
