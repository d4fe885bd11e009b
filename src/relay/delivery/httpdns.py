"""Host names of an aiohttp client resolved through a dnspython resolver — relay's configured
nameservers — rather than the system's getaddrinfo."""

from __future__ import annotations

import asyncio
import socket

import dns.asyncresolver
import dns.exception
import dns.resolver
from aiohttp.abc import AbstractResolver, ResolveResult

_TYPES = ((socket.AF_INET, "A"), (socket.AF_INET6, "AAAA"))


class DnsResolver(AbstractResolver):
    """An aiohttp resolver asking `resolver` for A and AAAA (only one when `family` says
    so); raises socket.gaierror, as aiohttp expects, when a name has no address."""

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self._resolver = resolver

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        wanted = [(f, rdtype) for f, rdtype in _TYPES if family in (socket.AF_UNSPEC, f)]
        answers = await asyncio.gather(*(self._addresses(host, rdtype) for _, rdtype in wanted),
                                       return_exceptions=True)
        found: list[ResolveResult] = [
            ResolveResult(hostname=host, host=address, port=port, family=f, proto=0,
                          flags=socket.AI_NUMERICHOST)
            for (f, _), addresses in zip(wanted, answers, strict=True)
            if not isinstance(addresses, BaseException) for address in addresses
        ]
        if not found:
            errors = [str(a) for a in answers if isinstance(a, BaseException)]
            if errors:
                raise socket.gaierror(socket.EAI_AGAIN, f"{host}: {'; '.join(errors)}")
            raise socket.gaierror(socket.EAI_NONAME, f"{host} has no address")
        return found

    async def _addresses(self, host: str, rdtype: str) -> list[str]:
        try:
            answer = await self._resolver.resolve(host, rdtype, search=False,
                                                  raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []
        except dns.exception.DNSException as exc:
            raise OSError(f"the {rdtype} lookup failed: {exc}") from None
        return [rd.address for rd in answer.rrset or ()]

    async def close(self) -> None:
        pass
