"""Envelope addresses and domains in the one form relay stores: domain as a lower-case
A-label (IDNA 2008) or an address literal ([192.0.2.1], [IPv6:2001:db8::1]), local part as
given."""

from __future__ import annotations

import functools
import ipaddress
import re

import idna

from .errors import ValidationError

_BAD_LOCAL = re.compile(r"[\r\n\x00 ]")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_IPV4_LITERAL = re.compile(r"^[0-9]{1,3}(?:\.[0-9]{1,3}){3}$")
_IPV6_TAG = "IPv6:"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def normalize_address(address: str, *, smtputf8: bool, param: str) -> tuple[str, str]:
    """An envelope address with its domain as a lower-case A-label → (address, domain)."""
    if address.isascii():  # then smtputf8 changes nothing
        try:
            return _ascii_address(address)
        except ValidationError:
            pass  # again, for the error naming `param`
    return _normalized(address, smtputf8=smtputf8, param=param)


@functools.lru_cache(maxsize=4096)
def _ascii_address(address: str) -> tuple[str, str]:
    """Remembered, as bulk mail repeats its senders and recipients (a refusal is not)."""
    return _normalized(address, smtputf8=False, param="")


def _normalized(address: str, *, smtputf8: bool, param: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise ValidationError(f"{address!r} is not an address (local@domain)", param=param,
                              smtp="501 5.1.3")
    if len(local.encode("utf-8")) > 64:
        raise ValidationError(f"{address!r}: local part longer than 64 octets", param=param,
                              smtp="553 5.1.3")
    if not local.isascii() and not smtputf8:
        raise ValidationError(f"{address!r}: a non-ASCII local part needs SMTPUTF8", param=param,
                              smtp="553 5.6.7")
    if _BAD_LOCAL.search(local):
        raise ValidationError(f"{address!r}: bad characters in the local part", param=param,
                              smtp="501 5.1.3")
    if domain.startswith("["):
        return f"{local}@{(d := _normalize_literal(domain, param=param))}", d
    return f"{local}@{(d := normalize_domain(domain, param=param))}", d


def normalize_domain(domain: str, *, param: str) -> str:
    """A domain name (never an address literal) as its lower-case A-label."""
    ace = a_label(domain)
    if ace is None:
        raise ValidationError(f"{domain.rstrip('.')!r} is not a valid domain{_why(domain)}",
                              param=param, smtp="501 5.1.2")
    return ace


@functools.lru_cache(maxsize=8192)
def a_label(domain: str) -> str | None:
    """The lower-case A-label of a domain name, or None; remembered, as bulk mail repeats
    its domains."""
    try:
        ace = to_ascii(domain.rstrip("."))
    except ValueError:
        return None
    labels = ace.split(".")
    if len(ace) > 253 or len(labels) < 2 or not all(_LABEL.match(lbl) for lbl in labels):
        return None
    return ace


def to_ascii(name: str) -> str:
    """A host or domain name with its U-labels as A-labels, lower case: IDNA 2008 with UTS 46
    mapping (faß.de is xn--fa-hia.de; Python's "idna" codec, IDNA 2003, would say fass.de and
    so send the mail to another domain). Raises ValueError (idna.IDNAError) for a name IDNA
    2008 disallows."""
    if name.isascii():
        return name.lower()
    return idna.encode(name, uts46=True).decode("ascii").lower()


def _why(domain: str) -> str:
    """The IDNA reason a name was refused, for the error message (" (...)" or "")."""
    try:
        to_ascii(domain.rstrip("."))
    except ValueError as exc:
        return f" (IDNA 2008: {exc})"
    return ""


def literal_ip(text: str) -> IPAddress:
    """The IP of an RFC 5321 address literal: "[192.0.2.1]" or "[IPv6:2001:db8::1]" (the
    tag in any case). Raises ValueError for anything else, general literals included: relay
    can deliver only to an IP."""
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError("an address literal is written in brackets")
    inner = text[1:-1]
    if inner[:len(_IPV6_TAG)].lower() == _IPV6_TAG.lower():
        v6 = inner[len(_IPV6_TAG):]
        if "%" in v6:  # ipaddress takes a zone id; RFC 5321 has none
            raise ValueError("an IPv6 literal has no zone id")
        return ipaddress.IPv6Address(v6)
    if not _IPV4_LITERAL.match(inner):
        raise ValueError('not an IPv4 literal ([192.0.2.1]) or IPv6 literal ([IPv6:2001:db8::1])')
    return ipaddress.IPv4Address(inner)  # refuses octets over 255 and leading zeros


def address_literal(ip: IPAddress) -> str:
    """The one form relay stores: [192.0.2.1], [IPv6:2001:db8::1] (compressed, lower case)."""
    return f"[{ip}]" if ip.version == 4 else f"[{_IPV6_TAG}{ip.compressed}]"


def _normalize_literal(domain: str, *, param: str) -> str:
    try:
        ip = literal_ip(domain)
    except ValueError as exc:
        raise ValidationError(f"{domain!r} is not a valid address literal ({exc})",
                              param=param, smtp="501 5.1.3") from None
    if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise ValidationError(f"{domain!r} is no host's address (unspecified, multicast or "
                              "broadcast)", param=param, smtp="553 5.1.2")
    return address_literal(ip)


def self_and_parents(domain: str) -> list[str]:
    """news.example.com, example.com: a parent's DKIM key is aligned too (relaxed DMARC)."""
    labels = domain.split(".")
    return [".".join(labels[i:]) for i in range(len(labels) - 1)] if domain else []
