"""DANE for SMTP (RFC 7672): finds a host's TLSA records through a validating resolver and
checks the certificate a server presented against them.

What the caller does with it (RFC 7672 2.2):

1. `secure_mx(domain)`: DANE applies to an MX host only when the MX RRset validated (for a
   domain without MX: when that denial validated, and the host is the domain itself).
2. `secure_host(host)`: and only when the host's A/AAAA validated (2.2.2).
3. `tlsa_lookup(host, 25)`:
   - `error` set (SERVFAIL, bogus, timeout): the host must not be used; try the next one,
     and when none is left defer the mail (2.2: no fallback to plain text or to "may").
   - `secure` false (an unsigned zone), or no records (a validated denial): no DANE for this
     host; the usual TLS policy applies.
   - `secure` and records, but `usable(records)` empty: STARTTLS is still mandatory (level
     "encrypt"), the certificate not authenticated (3.1: the records say TLS is supported).
   - `secure` and usable records: level "dane"; connect with `dane_context()` and
     server_hostname= the TLSA base domain (SNI is mandatory, 8.1), then accept the
     session only when `matches(records, *peer_certificates(ssl_object), host_names=...)`.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.resolver
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .outbound import Tlsa

DANE_TA = 2  # the record names a trust anchor in the server's chain (RFC 7218 names)
DANE_EE = 3  # the record names the server's own certificate or key
CERT, SPKI = 0, 1  # selectors
FULL, SHA2_256, SHA2_512 = 0, 1, 2  # matching types
_DIGEST_SIZES = {SHA2_256: 32, SHA2_512: 64}
EDNS_PAYLOAD = 1232  # the DNS flag day 2020 size: RRSIG-laden answers beyond it go over TCP
_ENCODING_DER = 2  # _ssl.ENCODING_DER, for the C certificate objects of Python < 3.13
MAX_CHAIN = 10  # certificates walked from the leaf towards a DANE-TA trust anchor


@dataclass(frozen=True, kw_only=True)
class TlsaLookup:
    """A host's TLSA RRset as DNS gave it. `records` are returned even when not `secure`, for
    logs; only a secure RRset may be used (RFC 7672 2.2). `error` is set when the lookup
    failed (SERVFAIL, which a validating resolver also answers for bogus data, or timeout)."""

    records: tuple[Tlsa, ...] = ()
    secure: bool = False
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class _Answer:
    values: tuple[Any, ...] = ()
    secure: bool = False
    error: str | None = None


async def tlsa_lookup(resolver: dns.asyncresolver.Resolver, host: str, port: int) -> TlsaLookup:
    """The TLSA RRset at _<port>._tcp.<host>, and whether it (or its denial) validated."""
    try:
        qname = dns.name.from_text(f"_{port}._tcp.{host.rstrip('.')}.")
    except dns.exception.DNSException as exc:
        return TlsaLookup(error=f"no TLSA name for {host!r}: {exc}")
    answer = await _query(resolver, qname, "TLSA")
    records = tuple(
        Tlsa(usage=rd.usage, selector=rd.selector, mtype=rd.mtype, data=rd.cert)
        for rd in answer.values
    )
    return TlsaLookup(records=records, secure=answer.secure, error=answer.error)


async def secure_mx(resolver: dns.asyncresolver.Resolver, domain: str) -> bool:
    """Whether the domain's MX RRset (or the proof that it has none) validated (RFC 7672
    2.2.1). A failed lookup is not secure."""
    answer = await _query(resolver, _absolute(domain), "MX")
    return answer.secure and answer.error is None


async def secure_host(resolver: dns.asyncresolver.Resolver, host: str) -> bool:
    """Whether the host's A and AAAA RRsets (or their denials) both validated (RFC 7672
    2.2.2: TLSA records of a host whose addresses are insecure are not looked up)."""
    name = _absolute(host)
    for rdtype in ("A", "AAAA"):
        answer = await _query(resolver, name, rdtype)
        if not answer.secure or answer.error is not None:
            return False
    return True


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name.rstrip(".") + ".")


def _validating(resolver: dns.asyncresolver.Resolver) -> dns.asyncresolver.Resolver:
    """A copy of the resolver that sets DO and AD on its queries (RFC 6840 5.7: a validating
    resolver then reports AD), with no cache: the shared resolver's cached answers came from
    queries that did not ask, so they cannot say whether they validated."""
    dnssec = copy.copy(resolver)
    dnssec.cache = None
    dnssec.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
    dnssec.flags = dns.flags.RD | dns.flags.AD
    return dnssec


def _authentic(response: dns.message.Message | None) -> bool:
    return response is not None and bool(response.flags & dns.flags.AD)


async def _query(resolver: dns.asyncresolver.Resolver, qname: dns.name.Name,
                 rdtype: str) -> _Answer:
    """One DNSSEC-aware query. The resolver is a validating one we trust (on loopback, RFC 7672
    1.3): its AD flag is the validation outcome; a bogus answer comes back as SERVFAIL."""
    what = f"{rdtype} lookup of {qname.to_text(omit_final_dot=True)}"
    try:
        answer = await _validating(resolver).resolve(
            qname, rdtype, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN as exc:
        responses = list(exc.responses().values())
        return _Answer(secure=bool(responses) and all(map(_authentic, responses)))
    except dns.resolver.LifetimeTimeout:
        return _Answer(error=f"{what} timed out")
    except dns.resolver.NoNameservers:  # SERVFAIL (bogus or broken) from every nameserver
        return _Answer(error=f"no nameserver answered the {what}")
    except dns.exception.DNSException as exc:
        return _Answer(error=f"{what} failed: {exc}")
    return _Answer(values=tuple(answer.rrset or ()), secure=_authentic(answer.response))


def usable(records: Iterable[Tlsa]) -> tuple[Tlsa, ...]:
    """The records SMTP can use (RFC 7672 3.1): DANE-TA(2) or DANE-EE(3), selector Cert(0) or
    SPKI(1), matching type Full(0), SHA2-256(1) or SHA2-512(2), and a digest of the right
    length. PKIX-TA(0) and PKIX-EE(1) are not for SMTP (3.1.3); unknown values are skipped.

    Records present but none usable still mean the server does TLS: the caller requires
    STARTTLS without authenticating the certificate (level "encrypt"), never "may" or plain.
    """
    return tuple(r for r in records
                 if r.usage in (DANE_TA, DANE_EE) and r.selector in (CERT, SPKI)
                 and _well_formed(r))


def _well_formed(record: Tlsa) -> bool:
    if record.mtype == FULL:
        return bool(record.data)
    return len(record.data) == _DIGEST_SIZES.get(record.mtype)


def _strongest(records: Sequence[Tlsa]) -> list[Tlsa]:
    """Digest algorithm agility (RFC 7671 9): of the digests published for one usage and
    selector, only the strongest counts, so a broken weaker digest cannot be used against a
    site that also publishes a stronger one. Full(0) records are not digests and all stay."""
    best: dict[tuple[int, int], int] = {}
    for r in records:
        if r.mtype != FULL:
            key = (r.usage, r.selector)
            best[key] = max(best.get(key, r.mtype), r.mtype)
    return [r for r in records if r.mtype == FULL or r.mtype == best[(r.usage, r.selector)]]


def matches(records: Iterable[Tlsa], leaf_der: bytes, chain_der: Sequence[bytes] = (), *,
            host_names: Sequence[str] = (), now: datetime.datetime | None = None) -> bool:
    """Whether the server's certificate is authenticated by one of the usable records.

    DANE-EE(3): the leaf certificate (selector 0) or its public key (1) matches; nothing else
    is checked, not names nor validity dates (RFC 7672 3.1.1), so an expired or self-signed
    certificate is fine.

    DANE-TA(2): a certificate of `chain_der` (the chain the server presented, leaf first or
    not) matches, the leaf chains up to it by signatures (the certificates between them CAs),
    the leaf and those between are valid at `now`, and the leaf names one of `host_names`
    (3.2.2: the MX host name and the TLSA base domain; DNS-IDs, or the CN when there are
    none; "*" only as a whole left-most label). With no `chain_der` only a TA that is the leaf
    itself can be found; with no `host_names` DANE-TA authenticates nothing. The server must
    send the TA certificate in its chain (3.1.2): a TA that is only the leaf's issuer and not
    presented cannot be checked from here.
    """
    candidates = _strongest(usable(records))
    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
    except ValueError:
        return False
    if any(r.usage == DANE_EE and _matches_one(r, leaf_der, leaf) for r in candidates):
        return True
    anchors = [r for r in candidates if r.usage == DANE_TA]
    if not anchors or not _names_match(leaf, host_names):
        return False
    moment = now or datetime.datetime.now(datetime.UTC)
    path = _issuer_path(leaf_der, leaf, chain_der)
    for depth, (der, cert) in enumerate(path):
        if any(_matches_one(r, der, cert) for r in anchors):
            below = path[:max(depth, 1)]  # the leaf and any certificates under the anchor
            return all(_valid_at(c, moment) for _, c in below) and all(
                _is_ca(c) for _, c in below[1:])
    return False


def _matches_one(record: Tlsa, der: bytes, cert: x509.Certificate) -> bool:
    if record.selector == CERT:
        selected = der
    else:
        try:  # re-encoded by cryptography: the same DER for RSA, named-curve EC, Ed25519/448
            selected = cert.public_key().public_bytes(Encoding.DER,
                                                      PublicFormat.SubjectPublicKeyInfo)
        except (ValueError, TypeError):  # a key type cryptography cannot load
            return False
    if record.mtype == SHA2_256:
        selected = hashlib.sha256(selected).digest()
    elif record.mtype == SHA2_512:
        selected = hashlib.sha512(selected).digest()
    return selected == record.data


def _issuer_path(leaf_der: bytes, leaf: x509.Certificate,
                 chain_der: Sequence[bytes]) -> list[tuple[bytes, x509.Certificate]]:
    """The leaf, its issuer, that one's issuer, ... as far as the presented chain goes; each
    step proven by the signature, so a certificate merely sent along is never on the path."""
    pool: list[tuple[bytes, x509.Certificate]] = []
    for der in chain_der:
        if der != leaf_der:
            try:
                pool.append((der, x509.load_der_x509_certificate(der)))
            except ValueError:
                continue
    path = [(leaf_der, leaf)]
    while len(path) < MAX_CHAIN:
        current = path[-1][1]
        issuer = next((item for item in pool if _issued(current, item[1])), None)
        if issuer is None:
            break
        pool.remove(issuer)
        path.append(issuer)
    return path


def _issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _valid_at(cert: x509.Certificate, moment: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc


def _names_match(leaf: x509.Certificate, host_names: Sequence[str]) -> bool:
    wanted = [n.rstrip(".").lower() for n in host_names if n.strip(".")]
    return any(_name_matches(pattern, name)
               for pattern in _certificate_names(leaf) for name in wanted)


def _certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS-IDs of the subjectAltName; the subject CN only when there are none (RFC 6125)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_ids = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns_ids = []
    if dns_ids:
        return [n.rstrip(".").lower() for n in dns_ids]
    common = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return [str(a.value).rstrip(".").lower() for a in common]


def _name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("*."):
        label, dot, parent = name.partition(".")
        return bool(label and dot) and parent == pattern[2:]
    return pattern == name


def dane_context() -> ssl.SSLContext:
    """The client TLS context for a DANE session: no CA verification and no host name check
    by OpenSSL, since DANE-EE certificates need neither (they may be self-signed, expired or
    for another name); `matches` then decides, and the session must be dropped (before MAIL)
    when it says no. Pass server_hostname (the TLSA base domain) for SNI (RFC 7672 8.1).
    No CA store is loaded: it would never be consulted."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def peer_certificates(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[bytes, list[bytes]]:
    """The leaf certificate (DER) and the chain (DER, leaf first) the server presented; the
    leaf is b"" before the handshake. Python 3.11 has no public way to the chain (3.13's
    get_unverified_chain): its C object's method is used when there, otherwise the chain is
    the leaf alone, and DANE-TA records (other than a self-issued leaf) cannot match."""
    leaf = ssl_object.getpeercert(binary_form=True) or b""
    chain: list[bytes] = []
    public = getattr(ssl_object, "get_unverified_chain", None)  # Python >= 3.13: DER bytes
    private = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    reader = public or private
    if reader is not None:
        for cert in reader() or ():
            chain.append(cert if isinstance(cert, bytes) else cert.public_bytes(_ENCODING_DER))
    return leaf, chain or ([leaf] if leaf else [])
