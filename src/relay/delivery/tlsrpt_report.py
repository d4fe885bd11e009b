"""TLS-RPT (RFC 8460) in words: a domain's `_smtp._tls` record read (section 3), a day's
counts made into the JSON report (4.3, 4.4), and the report as mail (5.3)."""

from __future__ import annotations

import calendar
import email.policy
import gzip
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any
from urllib.parse import unquote

import orjson

from ..store.tlsreports import TlsDay

VERSION = "v=TLSRPTv1"
MAX_RUA = 10  # report URIs used of one record; the rest are ignored
MAX_RECORD = 2048  # octets of a TLSRPT record (its strings joined)
MAX_POLICIES = 200  # policy entries of one report
MAX_FAILURES = 1000  # failure-details rows of one report, the largest counts first
MAX_MX_HOSTS = 50  # MX host names listed in one policy entry
MAX_REPORT = 1024 * 1024  # octets of a gzipped report; past it the details are cut
DAY = 86400


class RecordError(ValueError):
    """The domain has no usable TLSRPT record: the text says why."""


@dataclass(frozen=True, kw_only=True)
class Report:
    report_id: str
    day: str
    policy_domain: str
    submitter: str  # the reporting domain (TLS-Report-Submitter)
    body: dict[str, Any]

    @property
    def start(self) -> int:
        return day_start(self.day)

    @property
    def end(self) -> int:
        return self.start + DAY

    @property
    def filename(self) -> str:
        """sender "!" policy-domain "!" begin "!" end "." extension (section 5.1)."""
        return f"{self.submitter}!{self.policy_domain}!{self.start}!{self.end}.json.gz"

    def gzipped(self) -> bytes:
        """The JSON, gzipped, at most MAX_REPORT octets: failure details are halved until
        it fits (the summary counts stay whole)."""
        body = self.body
        while True:
            data = gzip.compress(orjson.dumps(body), mtime=0)
            details = sum(len(p.get("failure-details", ())) for p in body["policies"])
            if len(data) <= MAX_REPORT or not details:
                return data
            body = _cut_details(body, details // 2)


def day_of(when: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(when))


def day_start(day: str) -> int:
    return calendar.timegm(time.strptime(day, "%Y-%m-%d"))


def rua_of(records: Sequence[bytes]) -> tuple[str, ...]:
    """The report URIs (mailto: and https:) of the one TLSRPT record among a name's TXT
    records, each given as its strings joined; RecordError when there is none to use."""
    ours = [r for r in records if r.startswith(VERSION.encode())
            and (len(r) == len(VERSION) or r[len(VERSION):][:1] in (b";", b" ", b"\t"))]
    if not ours:
        raise RecordError("no TLSRPT record")
    if len(ours) > 1:  # section 3: then the domain is taken to have none
        raise RecordError(f"{len(ours)} TLSRPT records; there must be one")
    if len(ours[0]) > MAX_RECORD:
        raise RecordError(f"the TLSRPT record is over {MAX_RECORD} octets")
    try:
        text = ours[0].decode("ascii")
    except UnicodeDecodeError:
        raise RecordError("the TLSRPT record is not ASCII") from None
    fields = [f.strip(" \t") for f in text.split(";")]
    if fields[0] != VERSION:
        raise RecordError(f"the TLSRPT record does not start with {VERSION}")
    rua = next((f[4:] for f in fields[1:] if f.startswith("rua=")), None)
    if rua is None:
        raise RecordError("the TLSRPT record has no rua")
    uris = [u.strip(" \t") for u in rua.split(",")]
    usable = [u for u in uris if u.lower().startswith(("mailto:", "https://"))]
    if not usable:
        raise RecordError(f"no mailto: or https: URI in rua={rua[:200]}")
    return tuple(usable[:MAX_RUA])


def mailto_address(uri: str) -> str:
    """The address of a mailto: URI (RFC 6068): %-escapes undone, any ?query dropped."""
    return unquote(uri[len("mailto:"):].split("?", 1)[0]).strip()


def build_report(*, organization: str, contact: str, submitter: str, day: str,
                 policy_domain: str, data: TlsDay) -> Report:
    """The aggregate report of one policy domain's sessions in one UTC day (section 4)."""
    report_id = f"{day}T00:00:00Z_{policy_domain}@{submitter}"
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for t in data.totals:
        key = _group(t.policy_type, t.policy_string, t.mx_host)
        g = groups.setdefault(key, {"hosts": [], "ok": 0, "failed": 0, "details": []})
        g["ok"] += t.successes
        g["failed"] += t.failures
        if t.mx_host and t.mx_host not in g["hosts"] and len(g["hosts"]) < MAX_MX_HOSTS:
            g["hosts"].append(t.mx_host)
    for f in data.failures:
        g = groups.get(_group(f.policy_type, f.policy_string, f.mx_host))
        if g is None:
            continue  # its policy was past MAX_POLICIES
        detail = {"result-type": f.result_type, "sending-mta-ip": f.sending_ip,
                  "receiving-mx-hostname": f.mx_host, "receiving-ip": f.receiving_ip,
                  "failed-session-count": f.sessions}
        g["details"].append({k: v for k, v in detail.items() if v != ""})
    policies = []
    for (policy_type, policy_string, _), g in groups.items():
        lines = policy_string.split("\n") if policy_string else []
        patterns = [line.split(":", 1)[1].strip() for line in lines
                    if policy_type == "sts" and line.split(":", 1)[0].strip() == "mx"]
        entry: dict[str, Any] = {
            "policy": {"policy-type": policy_type, "policy-string": lines,
                       "policy-domain": policy_domain, "mx-host": patterns or g["hosts"]},
            "summary": {"total-successful-session-count": g["ok"],
                        "total-failure-session-count": g["failed"]},
        }
        if g["details"]:
            entry["failure-details"] = g["details"]
        policies.append(entry)
    start = day_start(day)
    body = {
        "organization-name": organization,
        "date-range": {"start-datetime": _iso(start), "end-datetime": _iso(start + DAY - 1)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": policies,
    }
    return Report(report_id=report_id, day=day, policy_domain=policy_domain,
                  submitter=submitter, body=body)


def report_mail(report: Report, gz: bytes, *, sender: str, to: str, organization: str
                ) -> bytes:
    """The report as a message to one mailto: rua (section 5.3): multipart/report of type
    tlsrpt, a line of text and the gzipped JSON."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = (f"Report Domain: {report.policy_domain} Submitter: {report.submitter}"
                      f" Report-ID: <{report.report_id}>")
    msg["TLS-Report-Domain"] = report.policy_domain
    msg["TLS-Report-Submitter"] = report.submitter
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(f"This is an aggregate TLS report from {organization} ({report.submitter})"
                    f" for {report.policy_domain}, {report.day} (UTC).\n")
    msg.add_attachment(gz, maintype="application", subtype="tlsrpt+gzip",
                       filename=report.filename)
    msg.set_type("multipart/report")
    msg.set_param("report-type", "tlsrpt")
    return msg.as_bytes(policy=email.policy.SMTP)


def _group(policy_type: str, policy_string: str, mx_host: str) -> tuple[str, str, str]:
    """One policy entry per policy; a TLSA policy is its MX host's alone."""
    return policy_type, policy_string, mx_host if policy_type == "tlsa" else ""


def _cut_details(body: dict[str, Any], keep: int) -> dict[str, Any]:
    """The report with only the `keep` largest failure details (of all its policies)."""
    ranked = sorted(((d["failed-session-count"], i, j)
                     for i, p in enumerate(body["policies"])
                     for j, d in enumerate(p.get("failure-details", ()))), reverse=True)
    kept = {(i, j) for _, i, j in ranked[:keep]}
    policies = []
    for i, p in enumerate(body["policies"]):
        p = {k: v for k, v in p.items() if k != "failure-details"}
        details = [d for j, d in enumerate(body["policies"][i].get("failure-details", ()))
                   if (i, j) in kept]
        if details:
            p["failure-details"] = details
        policies.append(p)
    return {**body, "policies": policies}


def _iso(when: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
