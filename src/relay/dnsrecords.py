"""The DNS records a sending domain needs (its DKIM keys, SPF and MX of its return-path host,
DMARC), worked out from the domain and the config alone: what `relay domains` prints and the
API lists. Looking them up in DNS is domains.py's."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from .config import Config
from .types import Domain

TTL = 3600
TXT_CHUNK = 255  # octets in one character-string of a TXT record (RFC 1035 3.3)


@dataclass(frozen=True)
class DnsRecord:
    name: str  # fully qualified, no trailing dot
    type: str  # TXT | MX
    value: str  # TXT: the text, unsplit; MX: "10 host."
    purpose: str

    def zone_line(self) -> str:
        """The record as a zone-file line; a long TXT text in quoted strings of <= 255 octets."""
        if self.type != "TXT":
            return f"{self.name}. {TTL} IN {self.type} {self.value}"
        chunks = split_txt(self.value)
        if len(chunks) == 1:
            return f'{self.name}. {TTL} IN TXT "{chunks[0]}"'
        inner = "\n    ".join(f'"{c}"' for c in chunks)
        return f"{self.name}. {TTL} IN TXT (\n    {inner} )"


def split_txt(text: str) -> list[str]:
    return [text[i:i + TXT_CHUNK] for i in range(0, len(text), TXT_CHUNK)] or [""]


def return_path_host(config: Config, domain: str) -> str:
    return f"{config.dkim.return_path_label}.{domain}"



def dkim_records(domain: Domain, states: Sequence[str] = ("active", "pending", "retiring")
                 ) -> list[DnsRecord]:
    out = []
    for k in domain.keys:
        if k.state not in states:
            continue
        kind = "ed25519" if k.algorithm.startswith("ed25519") else "rsa"
        purpose = f"DKIM {kind} key ({k.state})"
        if k.state == "retiring" and k.retire_after:
            purpose += f", keep until {time.strftime('%Y-%m-%d', time.gmtime(k.retire_after))}"
        out.append(DnsRecord(f"{k.selector}._domainkey.{domain.name}", "TXT",
                             f"v=DKIM1; k={kind}; p={k.public_key}", purpose))
    return out


def records(config: Config, domain: Domain) -> list[DnsRecord]:
    """Every record the domain needs: DKIM keys, SPF and MX of the return-path host, DMARC."""
    host = config.server.hostname.rstrip(".")
    rua = config.dkim.dmarc_report_address or f"dmarc-reports@{domain.name}"
    return [
        *dkim_records(domain),
        DnsRecord(domain.return_path, "TXT", f"v=spf1 a:{host} ~all",
                  "SPF of the return path (MAIL FROM) host"),
        DnsRecord(domain.return_path, "MX", f"10 {host}.",
                  "bounces come back to relay"),
        DnsRecord(f"_dmarc.{domain.name}", "TXT", f"v=DMARC1; p=none; rua=mailto:{rua}",
                  "DMARC, a starter policy that only reports"),
    ]
