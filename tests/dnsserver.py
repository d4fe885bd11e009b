"""A small authoritative DNS server for tests: UDP and TCP on 127.0.0.1, records set by the test."""

from __future__ import annotations

import asyncio
import socket
import struct
from types import TracebackType
from typing import Self, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

SOA_MINIMUM = 60


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = self.server.answer(data, tcp=False)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


class DNSServer:
    """Answers from records added with `add`; everything it was asked lands in `queries`.

    A name with records but none of the asked type answers NOERROR with no answer (and an
    SOA); a name with no records that is no parent of one answers NXDOMAIN (and an SOA).
    UDP answers larger than the client's payload size come back truncated (TC), so a
    client retries over TCP; `tcp_queries` counts those.

    Standing in for a validating resolver (RFC 6698 4.1), it sets the AD flag on an answer,
    positive or negative, when the query asked for it (AD or the EDNS DO bit, RFC 6840 5.7)
    and every name the answer covers (the asked name and any CNAME target) was marked with
    `secure` (or added with secure=True); any other answer goes without AD.
    """

    address = "127.0.0.1"

    def __init__(self) -> None:
        self.port = 0
        self.queries: list[tuple[str, str]] = []
        self.tcp_queries = 0
        self._records: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
        self._servfail: set[dns.name.Name] = set()
        self._secure: set[dns.name.Name] = set()
        self._secure_zones: set[dns.name.Name] = set()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def nameserver(self) -> str:
        return f"{self.address}:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # the free UDP port may be taken for TCP: try another
            transport, _protocol = await loop.create_datagram_endpoint(
                lambda: _UDP(self), local_addr=(self.address, 0)
            )
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.address, port)
            except OSError:
                transport.close()
                continue
            self._udp, self.port = transport, port
            return
        raise OSError("no port free for both UDP and TCP")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._writers):
                writer.close()
            await self._tcp.wait_closed()
            self._tcp = None
        await asyncio.sleep(0)  # let the transports finish closing

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def add(self, name: str, rdtype: str, *values: str, ttl: int = 300,
            secure: bool = False) -> None:
        """Add records, e.g. add("example.test", "MX", "10 mx1.example.test.") or
        add("_25._tcp.mx.example.test", "TLSA", "3 1 1 <hex>", secure=True); secure marks
        the name, so every answer about it, of any type, validates."""
        owner = _name(name)
        if secure:
            self._secure.add(owner)
        new = dns.rrset.from_text_list(
            owner, ttl, dns.rdataclass.IN, rdtype, list(values), origin=dns.name.root,
            relativize=False,
        )
        existing = self._records.setdefault(owner, {}).get(new.rdtype)
        if existing is None:
            self._records[owner][new.rdtype] = new
        else:
            for rdata in new:
                existing.add(rdata, ttl)

    def servfail(self, name: str) -> None:
        """Queries for this name, of any type, answer SERVFAIL."""
        self._servfail.add(_name(name))

    def secure(self, name: str, *, zone: bool = False) -> None:
        """Answers about this name (zone=True: and every name under it, existing or not)
        validate: they carry AD."""
        (self._secure_zones if zone else self._secure).add(_name(name))

    def clear(self) -> None:
        self._records.clear()
        self._servfail.clear()
        self._secure.clear()
        self._secure_zones.clear()
        self.queries.clear()
        self.tcp_queries = 0

    # answering

    def answer(self, wire: bytes, *, tcp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        dnssec_ok = query.ednsflags & dns.flags.DO
        response.ednsflags |= dnssec_ok  # echoed (RFC 3225 3)
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        self.queries.append(
            (question.name.to_text(omit_final_dot=True).lower(),
             dns.rdatatype.to_text(question.rdtype))
        )
        if tcp:
            self.tcp_queries += 1
        names = self._fill(response, question.name, question.rdtype)
        wants_ad = dnssec_ok or query.flags & dns.flags.AD
        if wants_ad and response.rcode() != dns.rcode.SERVFAIL and all(map(self._is_secure, names)):
            response.flags |= dns.flags.AD
        max_size = 65535 if tcp else (query.payload if query.edns >= 0 else 512)
        try:
            return response.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            response.answer.clear()
            response.authority.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=max_size)

    def _is_secure(self, name: dns.name.Name) -> bool:
        return name in self._secure or any(name.is_subdomain(z) for z in self._secure_zones)

    def _fill(self, response: dns.message.Message, qname: dns.name.Name,
              rdtype: int) -> list[dns.name.Name]:
        """Puts the answer in; returns the names it covers (qname and CNAME targets)."""
        names = [qname]
        for _ in range(8):  # follows CNAMEs within the server's records
            if qname in self._servfail:
                response.answer.clear()
                response.set_rcode(dns.rcode.SERVFAIL)
                return names
            records = self._records.get(qname, {})
            if rdtype in records:
                response.answer.append(records[rdtype])
                return names
            cname = records.get(dns.rdatatype.CNAME)
            if cname is None:
                break
            response.answer.append(cname)
            qname = cname[0].target
            names.append(qname)
        exists = qname in self._records or any(n.is_subdomain(qname) for n in self._records)
        if not exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(_soa(qname))
        return names

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                (length,) = struct.unpack("!H", await reader.readexactly(2))
                reply = self.answer(await reader.readexactly(length), tcp=True)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text.rstrip(".").lower() + ".")


def _soa(qname: dns.name.Name) -> dns.rrset.RRset:
    """A synthetic SOA for the zone of qname: its last two labels."""
    labels = qname.labels[-3:] if len(qname.labels) >= 3 else qname.labels
    zone = dns.name.Name(labels)
    ns, mbox = (dns.name.Name((label,) + zone.labels) for label in (b"ns", b"hostmaster"))
    return dns.rrset.from_text(
        zone, SOA_MINIMUM, dns.rdataclass.IN, dns.rdatatype.SOA,
        f"{ns} {mbox} 1 3600 600 86400 {SOA_MINIMUM}",
    )


def silent_udp_socket() -> socket.socket:
    """A bound UDP socket on 127.0.0.1 that never answers, to make a resolver time out."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock
