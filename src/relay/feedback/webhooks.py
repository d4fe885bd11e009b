"""Webhooks: each event POSTed as JSON to the endpoints subscribed to it, signed two ways.

Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>`): the
HMAC-SHA256 key is the base64-decoded part of the secret after `whsec_`, and the timestamp is
this attempt's, so every retry is signed anew (its verifiers refuse anything over 5 minutes).
Drin (`Drin-Signature: t=<unix s>,v1=<hex>`): the key is the whole `whsec_…` string as UTF-8
and `t` is the event's createdAt floored to seconds.

The dispatcher takes due deliveries from the outbox (filled in each event's own transaction),
POSTs them without following redirects, and retries on the Standard Webhooks schedule; 2xx is
success, 410 disables the endpoint, Retry-After is honoured. Targets on private addresses are
refused at connect time, unless [webhooks] allow_private_targets.

An endpoint's `format` picks the body and the signing of each POST: "native" (above) or
"mailchannels" (webhooks_mailchannels.py: its event names, Ed25519 HTTP Message Signatures)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult

from .. import metrics
from ..aio import cancel_and_wait, sleep_until_set
from ..config import WebhooksConfig
from ..store import SQLiteStore
from ..store.webhooks import Delivery
from ..timefmt import iso
from . import webhooks_mailchannels

log = logging.getLogger(__name__)

# Standard Webhooks' retry schedule (seconds after the previous attempt): about 3 days in all
SCHEDULE = (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
LEASE = 120.0
BATCH = 100
# the JSON (event data, metadata, tags) one round may hold: each delivery parses and then
# serializes its own, so a round's memory is a small multiple of this, whatever the sizes
BATCH_OCTETS = 4 * 1024 * 1024
IDLE_POLL = 1.0
WAKE_GAP = 0.05  # seconds: the least between two rounds that found nothing due
METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """`whsec_` and 32 random bytes in base64, as Standard Webhooks libraries expect."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode("ascii")


def payload(event_id: str, event_type: str, created_at: float, data: Mapping[str, Any]) -> bytes:
    """The body of every delivery of one event: the same bytes on each retry."""
    return orjson.dumps({"id": event_id, "type": event_type, "createdAt": iso(created_at),
                         "data": dict(data)})


def standard_signature(secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX) + "==")
    mac = hmac.new(key, f"{event_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def drin_signature(secret: str, created_at: float, body: bytes) -> str:
    t = int(created_at // 1)
    mac = hmac.new(secret.encode("utf-8"), f"{t}.".encode() + body, hashlib.sha256)
    return f"t={t},v1={mac.hexdigest()}"


def signed_headers(secret: str, event_id: str, created_at: float, body: bytes,
                   now: float) -> dict[str, str]:
    """The headers of one delivery attempt made at `now`."""
    timestamp = int(now)
    return {
        "Content-Type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": standard_signature(secret, event_id, timestamp, body),
        "Drin-Signature": drin_signature(secret, created_at, body),
    }


# IPv6 prefixes that carry an IPv4 address in their last 32 bits: a packet to one of them
# reaches that IPv4 address through a translator (NAT64 RFC 6052, SIIT RFC 7915), or is the
# deprecated IPv4-compatible form (RFC 4291)
_LAST_32_BITS = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("::ffff:0:0:0/96"),
                 ipaddress.IPv6Network("::/96"))
# local-use NAT64 (RFC 8215): its translator and where it puts the IPv4 are the site's own
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def private(address: str) -> bool:
    """Loopback, private, link-local, metadata and other non-global addresses, also when an
    IPv6 address only carries one (mapped, NAT64, SIIT, 6to4, Teredo): Python's is_global
    calls 64:ff9b::7f00:1 global, yet a NAT64 gateway turns it into 127.0.0.1."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return ip in METADATA_ADDRESSES or not ip.is_global
    if ip in METADATA_ADDRESSES or not ip.is_global or ip in _LOCAL_NAT64:
        return True
    return any(private(str(v4)) for v4 in _embedded_ipv4(ip))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address stands for, if any."""
    found = [v4 for v4 in (ip.ipv4_mapped, ip.sixtofour) if v4 is not None]
    if ip.teredo is not None:
        found += ip.teredo  # (server, client): traffic goes to both
    if any(ip in net for net in _LAST_32_BITS):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF))
    return found


class RefusedTarget(OSError):
    """A webhook target that resolves only to addresses relay may not connect to."""


class GuardedResolver(AbstractResolver):
    """Resolves as usual, then drops private addresses: the check is on the very addresses
    connected to, so a name that re-resolves (DNS rebinding) cannot get around it."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        allowed = [r for r in found if not private(r["host"])]
        if not allowed:
            raise RefusedTarget(f"{host} resolves only to private addresses")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def literal_refused(url: str, allow_private: bool) -> str | None:
    """Why a URL whose host is an IP literal may not be called (the resolver never sees it)."""
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if not allow_private and private(host):
        return f"{host} is a private address (set [webhooks] allow_private_targets)"
    return None


PROBE_ANSWER = 1024  # octets of a probed endpoint's answer kept


async def probe(config: WebhooksConfig, url: str, body: bytes,
                headers: Mapping[str, str]) -> tuple[int | None, str]:
    """One POST outside the outbox (a validation's test event), with the guards deliveries
    have: the status and the start of the answer, or None and why nothing was answered."""
    refused = literal_refused(url, config.allow_private_targets)
    if refused:
        return None, refused
    resolver = None if config.allow_private_targets else GuardedResolver()
    try:
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=resolver),
                timeout=aiohttp.ClientTimeout(total=config.timeout),
                headers={"User-Agent": "relay-webhooks"}) as session, \
                session.post(url, data=body, headers=dict(headers),
                             allow_redirects=False) as resp:
            answer = await resp.content.read(PROBE_ANSWER)
            return resp.status, answer.decode("utf-8", "replace")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, RefusedTarget) else exc
        return None, f"{type(cause).__name__}: {cause}"[:300]
    finally:
        if resolver is not None:
            await resolver.close()


class WebhookDispatcher:
    def __init__(self, config: WebhooksConfig, store: SQLiteStore, *,
                 clock: Any = time.time,
                 signer: webhooks_mailchannels.Signer | None = None) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._signer = signer  # for endpoints of the mailchannels format
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    def notify(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        resolver = None if self._config.allow_private_targets else GuardedResolver()
        connector = aiohttp.TCPConnector(resolver=resolver, limit=self._config.concurrency)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self._config.timeout),
            headers={"User-Agent": "relay-webhooks"})
        self._task = asyncio.create_task(self._run(), name="webhooks")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                due = await self._store.lease_deliveries(self._clock(), BATCH, LEASE,
                                                        max_octets=BATCH_OCTETS)
                if due:
                    await asyncio.gather(*(self._deliver(d) for d in due))
                    continue
                wait = IDLE_POLL
                next_at = await self._store.next_delivery_at()
                if next_at is not None:
                    wait = max(0.0, min(wait, next_at - self._clock()))
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad round must not end the dispatcher
                log.exception("webhook dispatch failed; trying again")
                wait = IDLE_POLL
            self._wake.clear()
            await sleep_until_set(self._wake, wait)
            # a round (a lease write and a read, even with no endpoint) at most every
            # WAKE_GAP however many commits wake it: under load that is one a commit
            await asyncio.sleep(started + WAKE_GAP - time.monotonic())

    def _body(self, d: Delivery) -> bytes | None:
        if d.endpoint.format == webhooks_mailchannels.FORMAT:
            return webhooks_mailchannels.payload(d)
        return payload(f"evt_{d.event_id}", d.event_type, d.created_at, d.data)

    def _headers(self, d: Delivery, body: bytes) -> dict[str, str]:
        """Signed at each attempt, by the endpoint's format."""
        if d.endpoint.format == webhooks_mailchannels.FORMAT:
            if self._signer is None:
                raise RuntimeError("no signing key for mailchannels webhooks")
            return self._signer.headers(body, self._clock())
        return signed_headers(d.endpoint.secret, f"evt_{d.event_id}", d.created_at, body,
                              self._clock())

    async def _deliver(self, d: Delivery) -> None:
        body = self._body(d)
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        refused = literal_refused(d.endpoint.url, self._config.allow_private_targets)
        if body is None:  # the format has no name for this event: nothing to send, ever
            await self._store.record_delivery(d, now=self._clock(), status=None,
                                              error=f"{d.event_type} has no name in the "
                                                    f"{d.endpoint.format} format", next_at=None)
            return
        if refused:
            error = refused
        else:
            assert self._session is not None
            headers = self._headers(d, body)
            try:
                # a stream, not bytes: aiohttp warns (an error under -W error) on a body
                # over 1 MiB given as bytes, and large metadata makes one
                async with self._session.post(d.endpoint.url, data=io.BytesIO(body),
                                              headers=headers,
                                              allow_redirects=False) as resp:
                    status = resp.status
                    await resp.read()
                    retry_after = _seconds(resp.headers.get("Retry-After"))
                    if not 200 <= status < 300:
                        error = f"HTTP {status}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                cause = exc.__cause__ if isinstance(exc.__cause__, RefusedTarget) else exc
                error = f"{type(cause).__name__}: {cause}"[:300]
        now = self._clock()
        disable = None
        if status == 410:
            disable = "the endpoint answered 410 Gone"
        elif error and d.endpoint.failing_since is not None and (
                now - d.endpoint.failing_since > self._config.disable_after_days * 86400):
            disable = (f"every delivery failed for {self._config.disable_after_days:g} days; "
                       f"last: {error}")
        next_at = None
        if error and d.attempts < len(SCHEDULE):
            delay = SCHEDULE[d.attempts] * self._config.retry_scale
            next_at = now + max(delay, min(retry_after or 0.0, 86400.0))
        metrics.webhook_attempt(ok=error is None)
        await self._store.record_delivery(d, now=now, status=status, error=error,
                                          next_at=next_at, disable=disable)


def _seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
