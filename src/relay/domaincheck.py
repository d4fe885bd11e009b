"""What DNS says of a sending domain's records, checked against what they should be
(dnsrecords.py works those out): `relay domains verify`, and `rotate --activate` before it
switches keys. Apart from domains.py, so that the CLI starts without the DNS library."""

from __future__ import annotations

from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename

from .config import Config
from .delivery.mx import make_resolver
from .dnsrecords import DnsRecord, records
from .types import Domain


@dataclass(frozen=True)
class Check:
    record: DnsRecord | None  # None: a check that is no record (reverse DNS)
    what: str
    ok: bool
    detail: str


async def verify(config: Config, domain: Domain) -> list[Check]:
    resolver = make_resolver(config.dns)
    checks = [await _check(resolver, r) for r in records(config, domain)]
    checks.append(await check_reverse_dns(resolver, config.server.hostname.rstrip(".")))
    return checks


async def _lookup(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str
                  ) -> list[str] | str:
    """The record texts, or a sentence saying why there are none."""
    try:
        answer = await resolver.resolve(name, rdtype)
    except dns.resolver.NXDOMAIN:
        return f"{name} does not exist in DNS"
    except dns.resolver.NoAnswer:
        return f"{name} has no {rdtype} record"
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        return f"the lookup of {name} {rdtype} failed ({exc.__class__.__name__})"
    if rdtype == "TXT":
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
    return [r.to_text() for r in answer]


async def _check(resolver: dns.asyncresolver.Resolver, record: DnsRecord) -> Check:
    what = f"{record.type} {record.name} ({record.purpose})"
    found = await _lookup(resolver, record.name, record.type)
    if isinstance(found, str):
        return Check(record, what, False, f"missing: {found}")
    if record.type == "MX":
        want = record.value.split()[-1].lower().rstrip(".")
        hosts = [f.split()[-1].lower().rstrip(".") for f in found]
        if want in hosts:
            return Check(record, what, True, "ok")
        return Check(record, what, False, f"wrong: MX points to {', '.join(hosts)}, not {want}")
    if record.name.split(".", 1)[0].startswith("_dmarc"):
        return _check_prefix(record, what, found, "v=DMARC1")
    if "._domainkey." in record.name:
        return _check_dkim(record, what, found)
    return _check_prefix(record, what, found, "v=spf1", want=record.value.split()[1])


def _tags(text: str) -> dict[str, str]:
    tags = {}
    for part in text.split(";"):
        key, _, value = part.partition("=")
        tags[key.strip()] = "".join(value.split())
    return tags


def _check_dkim(record: DnsRecord, what: str, found: list[str]) -> Check:
    want = _tags(record.value)
    for text in found:
        got = _tags(text)
        if got.get("p") == want["p"] and got.get("k", "rsa") == want["k"]:
            return Check(record, what, True, "ok")
    if any(_tags(t).get("p") for t in found):
        return Check(record, what, False, "wrong: the record holds another public key")
    return Check(record, what, False, f"wrong: found {found[0][:80]!r}, which has no key")


def _check_prefix(record: DnsRecord, what: str, found: list[str], prefix: str,
                  want: str | None = None) -> Check:
    texts = [t for t in found if t.strip().startswith(prefix)]
    if not texts:
        return Check(record, what, False, f"missing: no {prefix} record among {len(found)}")
    if len(texts) > 1:
        return Check(record, what, False, f"wrong: {len(texts)} {prefix} records; there must "
                     "be exactly one")
    if want and want not in texts[0].split():
        return Check(record, what, False, f"wrong: {texts[0]!r} lacks {want}")
    return Check(record, what, True, "ok")


async def check_reverse_dns(resolver: dns.asyncresolver.Resolver, hostname: str) -> Check:
    """Forward-confirmed reverse DNS: each address of the hostname points back to it."""
    what = f"forward-confirmed reverse DNS of {hostname}"
    addresses: list[str] = []
    for rdtype in ("A", "AAAA"):
        found = await _lookup(resolver, hostname, rdtype)
        if isinstance(found, list):
            addresses += found
    if not addresses:
        return Check(None, what, False, f"missing: {hostname} has no A or AAAA record")
    problems = []
    for address in addresses:
        names = await _lookup(resolver, dns.reversename.from_address(address).to_text(), "PTR")
        if isinstance(names, str):
            problems.append(f"{address} has no PTR record")
        elif hostname.lower() not in [n.lower().rstrip(".") for n in names]:
            problems.append(f"{address} points back to {', '.join(names)}, not {hostname}")
    if problems:
        return Check(None, what, False, "wrong: " + "; ".join(problems))
    return Check(None, what, True, f"ok ({', '.join(addresses)})")
