"""MTA-STS (RFC 8461): finds a recipient domain's policy — its `_mta-sts` TXT record, the
policy fetched over verified HTTPS — and keeps it for its max_age in memory and in the store,
so the policy still holds when a later fetch fails (which is what the cache is for)."""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

import aiohttp
import dns.asyncresolver
import dns.exception
import dns.resolver

from ..store.mtasts import CachedStsPolicy
from .httpdns import DnsResolver

log = logging.getLogger(__name__)

MAX_POLICY_SIZE = 64 * 1024  # RFC 8461 §3.3: senders may refuse larger policies
MAX_AGE_LIMIT = 31557600  # RFC 8461 §3.2: about a year
MEMORY_ENTRIES = 10_000  # domains whose policy (or its absence) this node keeps in memory
MODES = ("enforce", "testing", "none")
RETRY_FAILED_FETCH = 300.0  # a failed fetch is not tried again for a domain's id before this

# RFC 8460 §4.3.2 result types of a policy that could not be had
FETCH_ERROR = "sts-policy-fetch-error"
POLICY_INVALID = "sts-policy-invalid"
WEBPKI_INVALID = "sts-webpki-invalid"

_FIELD = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,31}):[ \t]*(.*?)[ \t]*")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_TXT_ID = re.compile(r"[A-Za-z0-9]{1,32}")


@dataclass(frozen=True)
class StsPolicy:
    """A domain's policy: `id` is its TXT record's, the rest the policy file's (RFC 8461
    §3.2); `text` the file as fetched."""

    id: str
    mode: str  # enforce | testing | none
    mx: tuple[str, ...]  # patterns: "mx.example.com" or "*.example.com"
    max_age: int
    text: str

    def matches(self, host: str) -> bool:
        """Whether an MX host is one the policy names (RFC 8461 §4.1): the same name, or one
        label more than a "*." pattern; case and a trailing dot do not count."""
        name = host.strip().rstrip(".").lower()
        for pattern in self.mx:
            pattern = pattern.rstrip(".").lower()
            if pattern.startswith("*."):
                first, _, rest = name.partition(".")
                if first and rest == pattern[2:]:
                    return True
            elif name == pattern:
                return True
        return False

    @property
    def policy_string(self) -> tuple[str, ...]:
        """The policy as TLS-RPT reports it (RFC 8460 §4.4): its lines, each a string."""
        return tuple(line.strip() for line in self.text.splitlines() if line.strip())


@dataclass(frozen=True)
class StsLookup:
    """What policy() found. `failure` (an RFC 8460 result type) only when no policy is had:
    none discovered, or one whose fetch failed with no cached one to fall back on. `detail`
    says why in words, also when the cached policy stood in for a failed fetch."""

    policy: StsPolicy | None
    failure: str | None
    detail: str = ""


class PolicyStore(Protocol):
    """Where policies outlive the process (store/mtasts.py)."""

    async def mta_sts_policy(self, domain: str) -> CachedStsPolicy | None: ...

    async def save_mta_sts_policy(self, cached: CachedStsPolicy) -> None: ...


class FetchError(Exception):
    """The policy could not be had; `failure` is the RFC 8460 result type."""

    def __init__(self, failure: str, detail: str) -> None:
        super().__init__(detail)
        self.failure = failure
        self.detail = detail


def parse_policy(text: str, *, policy_id: str = "") -> StsPolicy:
    """The policy file's fields (RFC 8461 §3.2); ValueError says what is wrong with it.
    Unknown fields are ignored; of a field other than mx, the first occurrence counts."""
    if len(text.encode("utf-8")) > MAX_POLICY_SIZE:
        raise ValueError(f"the policy is larger than {MAX_POLICY_SIZE} bytes")
    fields: dict[str, str] = {}
    mx: list[str] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        found = _FIELD.fullmatch(line)
        if found is None:
            raise ValueError(f"line {number} is not a 'key: value' field: {line[:80]!r}")
        key, value = found.groups()
        if key == "mx":
            mx.append(_mx_pattern(value))
        else:
            fields.setdefault(key, value)
    if "version" not in fields:
        raise ValueError("the policy has no version field")
    if fields["version"] != "STSv1":
        raise ValueError(f"the version is {fields['version']!r}, not 'STSv1'")
    mode = fields.get("mode")
    if mode is None:
        raise ValueError("the policy has no mode field")
    if mode not in MODES:
        raise ValueError(f"the mode is {mode!r}, not enforce, testing or none")
    return StsPolicy(id=policy_id, mode=mode, mx=_mx_required(mode, mx),
                     max_age=_max_age(fields.get("max_age")), text=text)


def _mx_pattern(value: str) -> str:
    pattern = value.rstrip(".").lower()
    labels = pattern.removeprefix("*.").split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"mx {value!r} is not a host name or a '*.' pattern")
    return pattern


def _mx_required(mode: str, mx: list[str]) -> tuple[str, ...]:
    if not mx and mode != "none":
        raise ValueError(f"a policy in mode {mode} needs at least one mx field")
    return tuple(mx)


def _max_age(value: str | None) -> int:
    if value is None:
        raise ValueError("the policy has no max_age field")
    if not value.isascii() or not value.isdigit() or len(value) > 10:
        raise ValueError(f"max_age {value!r} is not a whole number of seconds")
    if int(value) > MAX_AGE_LIMIT:
        raise ValueError(f"max_age {value} is over the limit of {MAX_AGE_LIMIT}")
    return int(value)


def parse_txt(strings: Iterable[str]) -> str | None:
    """The policy id of a domain's `_mta-sts` TXT records (RFC 8461 §3.1), each record
    one string; None when no record is an STSv1 one, when that one is invalid, or when
    there are several (the RFC says: then the domain has no policy)."""
    candidates = [fields for fields in (_txt_fields(s) for s in strings)
                  if fields and fields[0] == ("v", "STSv1")]
    if len(candidates) != 1:
        return None
    policy_id = next((value for key, value in candidates[0][1:] if key == "id"), None)
    if policy_id is None or not _TXT_ID.fullmatch(policy_id):
        return None
    return policy_id


def _txt_fields(record: str) -> list[tuple[str, str]] | None:
    fields = []
    for part in record.split(";"):
        part = part.strip(" \t")
        if not part:
            continue  # a trailing ";" is allowed
        key, sep, value = part.partition("=")
        if not sep:
            return None
        fields.append((key, value))
    return fields


@dataclass(frozen=True)
class _Cached:
    policy: StsPolicy
    fetched_at: float

    def fresh(self, now: float) -> bool:
        return self.fetched_at + self.policy.max_age > now


class MtaSts:
    """Looks up a domain's MTA-STS policy (RFC 8461 §3.3 and §5.1): the TXT record through
    `resolver`, the policy from https://mta-sts.<domain>:<port>/.well-known/mta-sts.txt
    (a certificate the default CAs or `ca_file` sign, no redirects, text/plain, 64 KiB at
    most, `timeout` seconds in all), the policy cached until its max_age passes."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, store: PolicyStore, *,
                 port: int = 443, ca_file: str = "", timeout: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._resolver = resolver
        self._store = store
        self._port = port
        self._timeout = timeout
        self._clock = clock  # wall time: fetched_at is shared with other nodes
        self._tls = ssl.create_default_context(cafile=ca_file or None)
        if ca_file:  # cafile= alone would leave out the default CAs
            self._tls.load_default_certs()
        self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
        # a domain's cached policy, or None: the store had none when last asked
        self._memory: OrderedDict[str, _Cached | None] = OrderedDict()
        self._fetches: dict[tuple[str, str], asyncio.Task[StsLookup]] = {}
        # (domain, id) -> until when, and why, its policy could not be had
        self._failed: dict[tuple[str, str], tuple[float, FetchError]] = {}

    async def policy(self, domain: str) -> StsLookup:
        """The policy mail to `domain` must follow, or why there is none."""
        name = domain.strip().rstrip(".").lower()
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return StsLookup(None, None, f"{domain!r} is not a valid domain name")
        policy_id, why = await self._txt(name)
        now = self._clock()
        cached = await self._cached(name, now, policy_id)
        if policy_id is None:
            if cached is not None:
                return StsLookup(cached.policy, None, f"{why}; the cached policy is used")
            return StsLookup(None, None, why)
        if cached is not None and cached.policy.id == policy_id:
            return StsLookup(cached.policy, None)
        return await self._fetch_once(name, policy_id, cached, now)

    async def _txt(self, domain: str) -> tuple[str | None, str]:
        """The TXT record's policy id, or None and why there is none."""
        qname = f"_mta-sts.{domain}"
        try:
            answer = await self._resolver.resolve(qname, "TXT", search=False,
                                                  raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return None, f"{qname} does not exist"
        except dns.exception.DNSException as exc:
            return None, f"the TXT lookup of {qname} failed: {exc}"
        records = [b"".join(rd.strings).decode("utf-8", "replace") for rd in answer.rrset or ()]
        policy_id = parse_txt(records)
        if policy_id is None:
            return None, f"{qname} has no single valid STSv1 TXT record"
        return policy_id, ""

    async def _cached(self, domain: str, now: float, wanted: str | None) -> _Cached | None:
        """The domain's unexpired cached policy, from memory or else the store. With a
        policy id in DNS that memory has no fresh policy of, the store is asked again:
        another node may have fetched it."""
        entry = self._memory.get(domain)
        if domain not in self._memory or (wanted is not None and not _holds(entry, now, wanted)):
            stored = await self._store.mta_sts_policy(domain)
            if stored is not None and (entry is None or stored.fetched_at >= entry.fetched_at):
                entry = _from_store(stored)
        self._remember(domain, entry)
        return entry if entry is not None and entry.fresh(now) else None

    def _remember(self, domain: str, entry: _Cached | None) -> None:
        self._memory[domain] = entry
        self._memory.move_to_end(domain)
        while len(self._memory) > MEMORY_ENTRIES:
            self._memory.popitem(last=False)

    async def _fetch_once(self, domain: str, policy_id: str, cached: _Cached | None,
                          now: float) -> StsLookup:
        """One fetch of a domain's policy however many deliveries wait for it, and none for
        a while after one failed (a policy host that times out would hold up every one)."""
        key = (domain, policy_id)
        failed = self._failed.get(key)
        if failed is not None and failed[0] > now:
            return _fallback(failed[1], cached)
        task = self._fetches.get(key)
        if task is None:
            task = asyncio.create_task(self._refresh(domain, policy_id, cached))
            self._fetches[key] = task
            task.add_done_callback(lambda _: self._fetches.pop(key, None))
        return await asyncio.shield(task)

    async def _refresh(self, domain: str, policy_id: str, cached: _Cached | None) -> StsLookup:
        try:
            policy = replace(await self._fetch(domain), id=policy_id)
        except FetchError as exc:
            self._failed.pop((domain, policy_id), None)
            while len(self._failed) >= MEMORY_ENTRIES:  # the oldest first
                del self._failed[next(iter(self._failed))]
            self._failed[(domain, policy_id)] = (self._clock() + RETRY_FAILED_FETCH, exc)
            return _fallback(exc, cached)
        self._failed.pop((domain, policy_id), None)
        entry = _Cached(policy, self._clock())
        self._remember(domain, entry)
        try:
            await self._store.save_mta_sts_policy(CachedStsPolicy(
                domain=domain, id=policy.id, mode=policy.mode, mx=policy.mx,
                max_age=policy.max_age, fetched_at=entry.fetched_at, policy=policy.text))
        except Exception:  # the policy holds all the same; only a restart fetches it again
            log.warning("cannot save the MTA-STS policy of %s", domain, exc_info=True)
        return StsLookup(policy, None)

    async def _fetch(self, domain: str) -> StsPolicy:
        host = f"mta-sts.{domain}"
        url = f"https://{host}{'' if self._port == 443 else f':{self._port}'}" \
              "/.well-known/mta-sts.txt"
        connector = aiohttp.TCPConnector(resolver=DnsResolver(self._resolver), ssl=self._tls,
                                         use_dns_cache=False)
        try:
            async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self._timeout),
                cookie_jar=aiohttp.DummyCookieJar(), headers={"User-Agent": "relay-mta-sts"},
            ) as session, session.get(url, allow_redirects=False) as response:
                body = await _body(url, response)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise FetchError(WEBPKI_INVALID,
                             f"{host}'s certificate: {exc.certificate_error}") from None
        except aiohttp.ClientError as exc:
            raise FetchError(FETCH_ERROR, f"fetching {url} failed: {exc}") from None
        except TimeoutError:
            raise FetchError(FETCH_ERROR, f"fetching {url} took over {self._timeout} s") from None
        try:
            return parse_policy(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise FetchError(POLICY_INVALID, f"the policy at {url} is invalid: {exc}") from None


async def _body(url: str, response: aiohttp.ClientResponse) -> bytes:
    """The policy's bytes, if the response is one (RFC 8461 §3.3)."""
    if 300 <= response.status < 400:
        where = response.headers.get("Location", "?")
        raise FetchError(FETCH_ERROR, f"{url} redirects to {where} (not followed)")
    if response.status != 200:
        raise FetchError(FETCH_ERROR, f"{url} answered HTTP {response.status}")
    if response.content_type != "text/plain":
        raise FetchError(POLICY_INVALID,
                         f"{url} is of type {response.content_type}, not text/plain")
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > MAX_POLICY_SIZE:
            raise FetchError(POLICY_INVALID,
                             f"the policy at {url} is over {MAX_POLICY_SIZE} bytes")
    return bytes(body)


def _fallback(exc: FetchError, cached: _Cached | None) -> StsLookup:
    """The cached policy when there is one (RFC 8461 §5.1), else the failure."""
    if cached is not None:
        return StsLookup(cached.policy, None,
                         f"{exc.detail}; the cached policy (id {cached.policy.id}) is used")
    return StsLookup(None, exc.failure, exc.detail)


def _holds(entry: _Cached | None, now: float, wanted: str) -> bool:
    return entry is not None and entry.fresh(now) and entry.policy.id == wanted


def _from_store(stored: CachedStsPolicy) -> _Cached:
    policy = StsPolicy(id=stored.id, mode=stored.mode, mx=stored.mx, max_age=stored.max_age,
                       text=stored.policy)
    return _Cached(policy, stored.fetched_at)
