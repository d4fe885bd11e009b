"""DANE for SMTP: TLSA lookups against the local DNS server (with and without AD), and
certificates presented in real TLS handshakes on loopback checked against TLSA records."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import dns.asyncquery
import dns.asyncresolver
import dns.flags
import dns.message
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from relay.config import DnsConfig
from relay.delivery.dane import (
    dane_context,
    matches,
    peer_certificates,
    secure_host,
    secure_mx,
    tlsa_lookup,
    usable,
)
from relay.delivery.mx import make_resolver
from relay.delivery.outbound import Tlsa

from .dnsserver import DNSServer, silent_udp_socket
from .sink import Sink

MX = "mx.example.test"
TLSA_NAME = f"_25._tcp.{MX}"


@pytest.fixture
async def server() -> AsyncIterator[DNSServer]:
    async with DNSServer() as dns_server:
        yield dns_server


def resolver_for(server: DNSServer) -> dns.asyncresolver.Resolver:
    return make_resolver(DnsConfig(nameservers=(server.nameserver,), timeout=2.0))


# certificates


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def spki(cert_der: bytes) -> bytes:
    key = x509.load_der_x509_certificate(cert_der).public_key()
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def record(usage: int, selector: int, mtype: int, cert_der: bytes) -> Tlsa:
    selected = cert_der if selector == 0 else spki(cert_der)
    data = {0: selected, 1: hashlib.sha256(selected).digest(),
            2: hashlib.sha512(selected).digest()}[mtype]
    return Tlsa(usage=usage, selector=selector, mtype=mtype, data=data)


def as_text(r: Tlsa) -> str:
    return f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}"


def server_context(*pems: bytes, key: bytes, tmp_path: Path) -> ssl.SSLContext:
    """A server context presenting exactly the given certificates, leaf first."""
    chain, key_file = tmp_path / "chain.pem", tmp_path / "key.pem"
    chain.write_bytes(b"".join(pems))
    key_file.write_bytes(key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(chain), str(key_file))
    return ctx


async def handshake(ctx: ssl.SSLContext, server_hostname: str = MX) -> tuple[bytes, list[bytes]]:
    """A TLS handshake with a server on loopback using ctx; what the server presented."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    tls_server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    port = tls_server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(10):
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=dane_context(), server_hostname=server_hostname)
            try:
                return peer_certificates(writer.get_extra_info("ssl_object"))
            finally:
                writer.close()
                await writer.wait_closed()
    finally:
        tls_server.close()
        await tls_server.wait_closed()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def leaf_context(leaf: trustme.LeafCert) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    return ctx


# the DNS server's TLSA and AD


async def test_secure_tlsa_records(server: DNSServer) -> None:
    a = Tlsa(usage=3, selector=1, mtype=1, data=bytes(range(32)))
    b = Tlsa(usage=2, selector=0, mtype=2, data=bytes(range(64)))
    server.add(TLSA_NAME, "TLSA", as_text(a), as_text(b), secure=True)

    lookup = await tlsa_lookup(resolver_for(server), MX, 25)

    assert lookup.error is None and lookup.secure
    assert sorted(lookup.records, key=lambda r: r.usage) == [b, a]
    assert (TLSA_NAME, "TLSA") in server.queries


async def test_server_sets_ad_only_when_asked(server: DNSServer) -> None:
    server.add(TLSA_NAME, "TLSA", "3 1 1 " + "ab" * 32, secure=True)

    async def ask(**kw: int) -> dns.message.Message:
        query = dns.message.make_query(TLSA_NAME + ".", "TLSA", **kw)
        return await dns.asyncquery.udp(query, server.address, timeout=2, port=server.port)

    plain = await ask()
    dnssec_ok = await ask(want_dnssec=True)
    ad_only = await ask(flags=dns.flags.RD | dns.flags.AD)

    assert not plain.flags & dns.flags.AD and len(plain.answer) == 1
    assert dnssec_ok.flags & dns.flags.AD and dnssec_ok.ednsflags & dns.flags.DO
    assert ad_only.flags & dns.flags.AD


async def test_insecure_tlsa_records_are_returned_not_secure(server: DNSServer) -> None:
    server.add(TLSA_NAME, "TLSA", "3 1 1 " + "ab" * 32)
    server.add(MX, "A", "192.0.2.1", secure=True)  # another name being secure changes nothing

    lookup = await tlsa_lookup(resolver_for(server), MX, 25)

    assert lookup.error is None and not lookup.secure
    assert lookup.records == (Tlsa(usage=3, selector=1, mtype=1, data=b"\xab" * 32),)


async def test_denial_is_secure_only_in_a_secure_zone(server: DNSServer) -> None:
    server.add(MX, "A", "192.0.2.1")
    server.add("mx.other.test", "A", "192.0.2.2")
    server.add("_25._tcp.mx.other.test", "TXT", '"not a TLSA"')  # NODATA
    server.secure("example.test", zone=True)
    server.secure("_25._tcp.mx.other.test")
    resolver = resolver_for(server)

    nxdomain = await tlsa_lookup(resolver, MX, 25)
    nodata = await tlsa_lookup(resolver, "mx.other.test", 25)
    insecure = await tlsa_lookup(resolver, "mx.unsigned.test", 25)

    assert nxdomain.records == () and nxdomain.secure and nxdomain.error is None
    assert nodata.records == () and nodata.secure and nodata.error is None
    assert insecure.records == () and not insecure.secure and insecure.error is None


async def test_port_is_part_of_the_name(server: DNSServer) -> None:
    server.add(f"_465._tcp.{MX}", "TLSA", "3 1 1 " + "cd" * 32, secure=True)

    lookup = await tlsa_lookup(resolver_for(server), MX + ".", 465)

    assert lookup.secure and lookup.records[0].data == b"\xcd" * 32
    assert server.queries == [(f"_465._tcp.{MX}", "TLSA")]


async def test_cname_is_followed_and_secure_only_when_all_of_it_is(server: DNSServer) -> None:
    server.add(TLSA_NAME, "CNAME", "tlsa.provider.test.", secure=True)
    server.add("tlsa.provider.test", "TLSA", "3 1 1 " + "ef" * 32)
    resolver = resolver_for(server)

    insecure_target = await tlsa_lookup(resolver, MX, 25)
    server.secure("tlsa.provider.test")
    secure_target = await tlsa_lookup(resolver, MX, 25)

    assert insecure_target.records == secure_target.records != ()
    assert not insecure_target.secure and secure_target.secure


async def test_servfail_is_an_error(server: DNSServer) -> None:
    server.add(TLSA_NAME, "TLSA", "3 1 1 " + "ab" * 32, secure=True)
    server.servfail(TLSA_NAME)

    lookup = await tlsa_lookup(resolver_for(server), MX, 25)

    assert lookup.error is not None and TLSA_NAME in lookup.error
    assert lookup.records == () and not lookup.secure


async def test_timeout_is_an_error() -> None:
    with silent_udp_socket() as sock:
        host, port = sock.getsockname()
        resolver = make_resolver(DnsConfig(nameservers=(f"{host}:{port}",), timeout=0.3))
        lookup = await tlsa_lookup(resolver, MX, 25)

    assert lookup.error is not None and "timed out" in lookup.error


async def test_lookup_leaves_the_shared_resolver_alone(server: DNSServer) -> None:
    server.add(TLSA_NAME, "TLSA", "3 1 1 " + "ab" * 32, secure=True)
    resolver = resolver_for(server)
    flags, edns, ednsflags = resolver.flags, resolver.edns, resolver.ednsflags

    await tlsa_lookup(resolver, MX, 25)

    assert (resolver.flags, resolver.edns, resolver.ednsflags) == (flags, edns, ednsflags)
    assert not (resolver.ednsflags or 0) & dns.flags.DO


async def test_secure_mx(server: DNSServer) -> None:
    server.add("signed.test", "MX", f"10 {MX}.", secure=True)
    server.add("unsigned.test", "MX", f"10 {MX}.")
    server.add("broken.test", "MX", f"10 {MX}.", secure=True)
    server.servfail("broken.test")
    server.secure("nomx.test", zone=True)
    server.add("nomx.test", "A", "192.0.2.9")
    resolver = resolver_for(server)

    assert await secure_mx(resolver, "signed.test")
    assert await secure_mx(resolver, "nomx.test.")  # a validated "no MX"
    assert not await secure_mx(resolver, "unsigned.test")
    assert not await secure_mx(resolver, "broken.test")


async def test_secure_host(server: DNSServer) -> None:
    server.add(MX, "A", "192.0.2.1", secure=True)
    server.add("v6only.signed.test", "AAAA", "2001:db8::3")
    server.secure("signed.test", zone=True)
    server.add("unsigned.example.test", "A", "192.0.2.2")
    server.add("broken.signed.test", "A", "192.0.2.4")
    server.servfail("broken.signed.test")
    resolver = resolver_for(server)

    assert await secure_host(resolver, MX)  # no AAAA: a denial about a secure name
    assert await secure_host(resolver, "v6only.signed.test.")
    assert not await secure_host(resolver, "unsigned.example.test")
    assert not await secure_host(resolver, "broken.signed.test")


# which records count


def test_usable_keeps_dane_ta_and_dane_ee_only() -> None:
    digest = bytes(32)
    keep = [Tlsa(usage=3, selector=1, mtype=1, data=digest),
            Tlsa(usage=2, selector=0, mtype=2, data=bytes(64)),
            Tlsa(usage=3, selector=0, mtype=0, data=b"\x30\x03")]
    drop = [Tlsa(usage=1, selector=1, mtype=1, data=digest),  # PKIX-EE
            Tlsa(usage=0, selector=0, mtype=1, data=digest),  # PKIX-TA
            Tlsa(usage=4, selector=1, mtype=1, data=digest),
            Tlsa(usage=3, selector=2, mtype=1, data=digest),
            Tlsa(usage=3, selector=1, mtype=3, data=digest),
            Tlsa(usage=3, selector=1, mtype=1, data=bytes(31)),  # not a SHA-256 digest
            Tlsa(usage=3, selector=1, mtype=0, data=b"")]

    assert usable(keep + drop) == tuple(keep)
    assert usable(drop) == ()


# certificates presented in a handshake


@pytest.mark.parametrize("selector, mtype", [(1, 1), (0, 1), (1, 2), (0, 0), (1, 0), (0, 2)])
async def test_dane_ee_matches_the_presented_leaf(ca: trustme.CA, selector: int,
                                                  mtype: int) -> None:
    leaf = ca.issue_cert(MX)
    presented, chain = await handshake(leaf_context(leaf))

    assert presented == der(leaf.cert_chain_pems[0].bytes())
    assert chain[0] == presented
    assert matches([record(3, selector, mtype, presented)], presented, chain)


async def test_dane_ee_does_not_match_another_certificate(ca: trustme.CA) -> None:
    presented, chain = await handshake(leaf_context(ca.issue_cert(MX)))
    other = der(ca.issue_cert(MX).cert_chain_pems[0].bytes())  # same name, another key

    records = [record(3, 1, 1, other), record(3, 0, 1, other), record(3, 0, 0, other)]
    assert not matches(records, presented, chain, host_names=(MX,))
    assert matches(records + [record(3, 1, 1, presented)], presented, chain)


async def test_unusable_records_match_nothing(ca: trustme.CA) -> None:
    presented, chain = await handshake(leaf_context(ca.issue_cert(MX)))

    pkix = [record(1, 1, 1, presented), record(0, 0, 1, der(ca.cert_pem.bytes()))]
    assert usable(pkix) == ()
    assert not matches(pkix, presented, chain, host_names=(MX,))


async def test_dane_ee_ignores_expiry_and_names(ca: trustme.CA) -> None:
    long_ago = datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC)
    leaf = ca.issue_cert("elsewhere.test", not_before=long_ago,
                         not_after=long_ago + datetime.timedelta(days=1))
    presented, chain = await handshake(leaf_context(leaf))

    assert matches([record(3, 1, 1, presented)], presented, chain, host_names=(MX,))


async def test_strongest_digest_decides(ca: trustme.CA) -> None:
    presented, chain = await handshake(leaf_context(ca.issue_cert(MX)))
    good_256, good_512 = record(3, 1, 1, presented), record(3, 1, 2, presented)
    bad_256 = Tlsa(usage=3, selector=1, mtype=1, data=bytes(32))
    bad_512 = Tlsa(usage=3, selector=1, mtype=2, data=bytes(64))

    assert matches([good_512, bad_256], presented, chain)
    assert not matches([good_256, bad_512], presented, chain)  # RFC 7671 9
    assert matches([good_256, bad_512, record(3, 0, 1, presented)], presented, chain)


async def test_dane_ta_intermediate_in_the_chain(ca: trustme.CA) -> None:
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert(MX)
    presented, chain = await handshake(leaf_context(leaf))
    ta_der = der(intermediate.cert_pem.bytes())
    records = [record(2, 0, 1, ta_der)]

    assert chain == [presented, ta_der]  # the chain as sent, through Python 3.11's C object
    assert matches(records, presented, chain, host_names=(MX,))
    assert matches([record(2, 1, 2, ta_der)], presented, chain, host_names=("example.test", MX))
    assert not matches(records, presented, chain, host_names=("mx.other.test",))
    assert not matches(records, presented, chain)  # no names: DANE-TA authenticates nothing
    assert not matches(records, presented, [presented], host_names=(MX,))  # TA not seen


async def test_dane_ta_root_only_when_the_server_sends_it(ca: trustme.CA, tmp_path: Path) -> None:
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert(MX)
    root_pem = ca.cert_pem.bytes()
    records = [record(2, 1, 1, der(root_pem))]
    pems = [blob.bytes() for blob in leaf.cert_chain_pems]

    without, without_chain = await handshake(leaf_context(leaf))
    with_root, with_root_chain = await handshake(
        server_context(*pems, root_pem, key=leaf.private_key_pem.bytes(), tmp_path=tmp_path))

    assert not matches(records, without, without_chain, host_names=(MX,))
    assert len(with_root_chain) == 3
    assert matches(records, with_root, with_root_chain, host_names=(MX,))


async def test_dane_ta_over_smtp_starttls(ca: trustme.CA) -> None:
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert(MX)
    async with Sink(tls=leaf_context(leaf)) as sink:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False,
                               timeout=10)
        await smtp.connect()
        try:
            await smtp.starttls(server_hostname=MX, tls_context=dane_context(),
                                validate_certs=False)
            presented, chain = peer_certificates(smtp.get_transport_info("ssl_object"))
        finally:
            smtp.close()

    assert matches([record(2, 0, 1, der(intermediate.cert_pem.bytes()))], presented, chain,
                   host_names=(MX,))


def test_dane_ta_chain_must_be_signed_not_merely_sent(ca: trustme.CA) -> None:
    intermediate = ca.create_child_ca()
    forged = der(trustme.CA().create_child_ca().issue_cert(MX).cert_chain_pems[0].bytes())
    ta_der = der(intermediate.cert_pem.bytes())

    assert not matches([record(2, 0, 1, ta_der)], forged, [forged, ta_der], host_names=(MX,))


def test_dane_ta_wildcard_and_common_name(ca: trustme.CA) -> None:
    wildcard = der(ca.issue_cert("*.example.test").cert_chain_pems[0].bytes())
    cn_only = _issue(ca, subject_cn=MX, dns_names=(), is_ca=False)
    root = der(ca.cert_pem.bytes())
    records = [record(2, 0, 1, root)]

    assert matches(records, wildcard, [wildcard, root], host_names=(MX,))
    assert not matches(records, wildcard, [wildcard, root], host_names=("a.mx.example.test",))
    assert not matches(records, wildcard, [wildcard, root], host_names=("example.test",))
    assert matches(records, cn_only[0], [cn_only[0], root], host_names=(MX,))


def test_dane_ta_checks_validity_of_the_leaf(ca: trustme.CA) -> None:
    long_ago = datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC)
    expired = der(ca.issue_cert(MX, not_before=long_ago,
                                not_after=long_ago + datetime.timedelta(days=1)
                                ).cert_chain_pems[0].bytes())
    chain = [expired, der(ca.cert_pem.bytes())]
    records = [record(2, 0, 1, chain[1])]

    assert not matches(records, expired, chain, host_names=(MX,))
    assert matches(records, expired, chain, host_names=(MX,),
                   now=long_ago + datetime.timedelta(hours=1))


def test_dane_ta_refuses_a_non_ca_between_leaf_and_anchor(ca: trustme.CA) -> None:
    """A certificate the anchor issued to some server cannot vouch for another one."""
    server_der, server_key = _issue(ca, subject_cn="other.example.test",
                                    dns_names=("other.example.test",), is_ca=False)
    server_cert = x509.load_der_x509_certificate(server_der)
    forged, _ = _issue_by(server_cert, server_key, subject_cn=MX, dns_names=(MX,))
    chain = [forged, server_der, der(ca.cert_pem.bytes())]

    assert not matches([record(2, 0, 1, chain[2])], forged, chain, host_names=(MX,))
    # the same shape with a CA in the middle is accepted: the refusal is about CA-ness
    middle_der, middle_key = _issue(ca, subject_cn="Middle CA", dns_names=(), is_ca=True)
    honest, _ = _issue_by(x509.load_der_x509_certificate(middle_der), middle_key,
                          subject_cn=MX, dns_names=(MX,))
    assert matches([record(2, 0, 1, chain[2])], honest, [honest, middle_der, chain[2]],
                   host_names=(MX,))


def test_garbage_leaf_matches_nothing() -> None:
    assert not matches([Tlsa(usage=3, selector=0, mtype=0, data=b"junk")], b"junk")


def test_dane_context_verifies_nothing_itself() -> None:
    ctx = dane_context()
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname


# certificates trustme cannot make: issued by a given certificate and key


def _issue(ca: trustme.CA, *, subject_cn: str, dns_names: tuple[str, ...],
           is_ca: bool) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    return _issue_by(ca_cert, ca._private_key, subject_cn=subject_cn, dns_names=dns_names,
                     is_ca=is_ca)


def _issue_by(issuer: x509.Certificate, issuer_key: object, *, subject_cn: str,
              dns_names: tuple[str, ...],
              is_ca: bool = False) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    return cert.public_bytes(Encoding.DER), key
