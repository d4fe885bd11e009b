"""The single way into the queue: validate a Submission, finish its headers, commit it."""

from __future__ import annotations

import email.utils
import functools
import json
import os
import time
from collections.abc import Callable

import orjson

from . import compose, dkimkeys, metrics, rawmail
from .acceptlog import log_accepted
from .addresses import a_label, normalize_address, normalize_domain, self_and_parents
from .config import Config
from .errors import ValidationError
from .keys import may_send_as
from .store import NewMessage, NewRecipient, Remembered, Store
from .types import EnvelopeRecipient, GivenDkimKey, Stream, Submission, SubmitResult

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
# NewMessage.track by (track_opens, track_clicks)
_TRACK = {(False, False): "", (True, False): "opens", (False, True): "clicks",
          (True, True): "opens,clicks"}
_CONTROL_PREFIX = "x-relay-"


def _dropped(key: str) -> bool:
    """A field accepting takes out of a raw message: Bcc and relay's X-Relay-* controls."""
    return key == "bcc" or key.startswith(_CONTROL_PREFIX)


class _RandomPool:
    """os.urandom read 4 KiB at a time: one system call per 409 message ids, not one each."""

    def __init__(self) -> None:
        self._buf, self._pos = b"", 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._buf):
            self._buf, self._pos = os.urandom(4096), 0
        self._pos += n
        return self._buf[self._pos - n:self._pos]


_RANDOM = _RandomPool()


# a random octet's low five bits as a character (bytes.translate: one C call for 15 of them)
_LOW5 = bytes(ord(_CROCKFORD[b & 31]) for b in range(256))


@functools.lru_cache(maxsize=4)
def _time_chars(eighths: int) -> str:
    """The first nine characters of an id: the top 45 of its 48 bits of milliseconds (they
    change every 8 ms, so a busy moment makes them once)."""
    return "".join([_CROCKFORD[(eighths >> shift) & 31] for shift in range(40, -1, -5)])


def new_message_id(now: float | None = None) -> str:
    """"msg_" + 26 Crockford base32 characters: 48 bits of milliseconds, 80 random bits
    (time first, so that ids sort by time), as one 130-bit number's characters five bits
    each: the time's (cached), the one the time shares with two random bits, fifteen random
    characters, and a last of three random bits and two zero bits."""
    ms = int((time.time() if now is None else now) * 1000) & 0xFFFF_FFFF_FFFF
    r = _RANDOM.take(17)
    return (f"msg_{_time_chars(ms >> 3)}{_CROCKFORD[(ms & 7) << 2 | r[0] & 3]}"
            f"{r[1:16].translate(_LOW5).decode('ascii')}{_CROCKFORD[(r[16] & 7) << 2]}")


@functools.lru_cache(maxsize=4)
def _date_header(second: int) -> str:
    return email.utils.formatdate(second, localtime=True)


def collapse_recipients(
    recipients: tuple[EnvelopeRecipient, ...], *, smtputf8: bool
) -> tuple[NewRecipient, ...]:
    """Normalised and without duplicates (the first occurrence wins)."""
    seen: dict[str, NewRecipient] = {}
    for i, r in enumerate(recipients):
        address, domain = normalize_address(r.address, smtputf8=smtputf8, param=f"to[{i}]")
        if address not in seen:
            seen[address] = NewRecipient(address=address, domain=domain, notify=r.notify,
                                         orcpt=r.orcpt)
    return tuple(seen.values())


def json_size(value: object) -> int:
    """Octets of `value` as JSON, as the store writes it (orjson; json past 64-bit ints)."""
    try:
        return len(orjson.dumps(value))
    except (orjson.JSONEncodeError, TypeError):
        return len(json.dumps(value, separators=(",", ":"), default=str))


def check_metadata_size(metadata: object, tags: tuple[str, ...], limit: int, *,
                        param: str = "metadata", headers: object = None) -> None:
    """Metadata and tags (and the headers a webhook carries) are copied into every event and
    every webhook of a message (one per recipient and endpoint): past `limit` octets of JSON
    together they would multiply memory there."""
    size = json_size(metadata)
    if size > limit:
        raise ValidationError(f"{param} is {size} octets as JSON; at most {limit} "
                              "([limits] max_metadata_size)", param=param, smtp="554 5.6.0")
    if tags:
        size += json_size(list(tags))
        if size > limit:
            raise ValidationError(f"metadata and tags are over {limit} octets as JSON "
                                  "([limits] max_metadata_size)", param="tags",
                                  smtp="554 5.6.0")
    if headers is not None and size + json_size(headers) > limit:
        raise ValidationError(f"headers: with the metadata and tags, over {limit} octets as "
                              "JSON, which every webhook carries ([limits] max_metadata_size)",
                              param="headers", smtp="554 5.6.0")


class Submitter:
    def __init__(self, config: Config, store: Store, *, clock: Callable[[], float] = time.time):
        self._config = config
        self._store = store
        self._clock = clock
        self.on_queued: list[Callable[[], None]] = []  # told after each commit of new mail
        self._domains: set[str] = set()  # domains with DKIM keys, re-read every 30 s
        self._domains_at: float | None = None

    def reconfigure(self, config: Config) -> None:
        """A reload: submissions from now on are checked against the new config."""
        self._config = config

    async def submit(self, sub: Submission) -> SubmitResult:
        """Validate and commit; returns only after the commit (or raises StoreError)."""
        return await self.commit(self.prepare(sub))

    async def commit(self, message: NewMessage) -> SubmitResult:
        """Commit a prepared message; returns only after the commit (or raises StoreError)."""
        await self.check_broadcast(message)
        result = await self._store.enqueue(message)
        log_accepted([message], [result], self.message_id_header)
        if not result.duplicate:
            metrics.accepted(message.source, listener=message.listener)
            self.notify_queued()
        return result

    async def commit_all(self, messages: list[NewMessage],
                         claim: tuple[str, str, float] | None = None,
                         answer: Callable[[list[SubmitResult]], Remembered] | None = None,
                         ) -> tuple[list[SubmitResult], Remembered | None]:
        """Prepared messages and an idempotency key's answer in one transaction; when the key
        has an answer already, nothing is queued and that answer comes back."""
        results, existing = await self._store.enqueue_all(messages, claim, answer)
        metrics.accepted(messages[0].source if messages else "api",
                         sum(not r.duplicate for r in results),
                         listener=messages[0].listener if messages else "")
        log_accepted(messages, results, self.message_id_header)
        if results:
            self.notify_queued()
        return results, existing

    async def check_broadcast(self, message: NewMessage) -> None:
        """Broadcast mail gets one-click unsubscribe links (RFC 8058): they need an https
        public URL and a DKIM signature covering them, so a signing key for the sender."""
        if message.stream is not Stream.BROADCAST:
            return
        if not self._config.api.public_url.startswith("https://") and \
                not self._config.tracking.allow_insecure_public_url:
            raise ValidationError(
                "broadcast mail needs an https [api] public_url for its one-click unsubscribe "
                "links (RFC 8058)", param="stream", smtp="550 5.7.0")
        if not await self.will_sign(message):
            raise ValidationError(
                f"broadcast mail must be DKIM-signed (RFC 8058) and "
                f"{message.sender_domain or 'its sender'} has no key: relay domains add",
                param="stream", smtp="550 5.7.0")

    async def will_sign(self, message: NewMessage) -> bool:
        """Whether the message will be DKIM-signed as its sender domain (or a parent, or
        the default domain): a verified sending domain, with an active key in relay."""
        if not self._config.dkim.enabled:
            return False
        if message.dkim is not None:
            return True  # signed with the key given with it (checked in prepare)
        mine = set(self_and_parents(message.sender_domain))
        default = self._config.dkim.default_domain

        def signed(domains: set[str]) -> bool:
            return bool(mine & domains) or default in domains

        # the domains are remembered 30 s; a miss looks again (a domain just added)
        return signed(await self._signing_domains()) or \
            signed(await self._signing_domains(fresh=True))

    async def _signing_domains(self, *, fresh: bool = False) -> set[str]:
        now = time.monotonic()
        if fresh or self._domains_at is None or now - self._domains_at > 30.0:
            self._domains = {k.domain for k in await self._store.signing_keys()}
            self._domains_at = now
        return self._domains

    def notify_queued(self) -> None:
        """Tell the scheduler (and webhooks) that new mail was committed, e.g. a report."""
        for callback in self.on_queued:
            callback()

    def prepare(self, sub: Submission) -> NewMessage:
        limits = self._config.limits
        now = self._clock()
        if not sub.recipients:
            raise ValidationError("at least one recipient is required", param="to",
                                  smtp="554 5.5.1")
        check_metadata_size(sub.metadata, sub.tags, limits.max_metadata_size,
                            headers=sub.webhook_headers)
        if sub.pool and sub.pool not in {p.name for p in self._config.delivery.pools}:
            known = ", ".join(p.name for p in self._config.delivery.pools) or "none configured"
            raise ValidationError(f"no source pool named {sub.pool!r} ({known})", param="pool")
        recipients = collapse_recipients(sub.recipients, smtputf8=sub.smtputf8)
        if len(recipients) > limits.max_recipients:
            raise ValidationError(f"more than {limits.max_recipients} recipients", param="to",
                                  smtp="452 4.5.3")
        mail_from = ""
        if sub.mail_from:
            mail_from, from_domain = normalize_address(sub.mail_from, smtputf8=sub.smtputf8,
                                                       param="envelope_from")
            if not may_send_as(sub.allowed_domains, from_domain):
                raise ValidationError(f"this key may not send as {from_domain}",
                                      param="envelope_from", smtp="553 5.7.1")
        given = self._given_key(sub)
        message_id = new_message_id(now)
        date = _date_header(int(now))
        parts: tuple[tuple[str, bytes], ...] = ()
        if sub.composition is not None:
            body, kind, size, subject, header_from, parts = self._composed(sub, message_id,
                                                                           date)
            sender_domain = sub.composition.sender.email.rpartition("@")[2]
        else:
            body, subject, header_from, sender_domain = self._raw(sub, message_id, date,
                                                                  recipients)
            kind, size = "raw", None
        return NewMessage(
            id=message_id,
            created_at=now,
            mail_from=mail_from,
            recipients=recipients,
            body=body,
            body_kind=kind,
            size=size,
            parts=parts,
            source=sub.source,
            listener=sub.listener,
            api_key_id=sub.api_key_id,
            tags=sub.tags,
            metadata=sub.metadata,
            webhook_headers=sub.webhook_headers,
            stream=sub.stream,
            subject=subject,
            header_from=header_from,
            dsn_ret=sub.dsn_ret,
            dsn_envid=sub.dsn_envid,
            smtputf8=sub.smtputf8,
            scheduled_at=sub.scheduled_at if sub.scheduled_at and sub.scheduled_at > now else None,
            idempotency_scope=sub.api_key_id or "",
            idempotency_key=sub.idempotency_key,
            idempotency_fingerprint=sub.idempotency_fingerprint,
            sign_domains=sub.allowed_domains,
            dkim=given,
            sender_domain=a_label(sender_domain) or "",
            refuse_if_suppressed=sub.refuse_if_suppressed,
            keep_mail_from=sub.keep_mail_from,
            pool=sub.pool,
            track=_TRACK[bool(sub.track_opens), bool(sub.track_clicks)],
        )

    def _raw(self, sub: Submission, message_id: str, date: str,
             recipients: tuple[NewRecipient, ...]) -> tuple[bytes, str, str, str]:
        """Checked bytes with trace, Message-ID and Date added; Bcc and control headers gone
        (and the subject, the From and its first address's domain, as written)."""
        limits = self._config.limits
        data = sub.data
        if b"\x00" in data:
            raise ValidationError("the message contains a NUL character", param="data")
        data = rawmail.normalize_newlines(data)
        if len(data) > limits.max_message_size:
            raise ValidationError(f"the message is larger than {limits.max_message_size} octets",
                                  param="data", smtp="552 5.3.4")
        headers, body = rawmail.split(data)
        by_name = rawmail.index(headers)  # one pass of lower-casing for every look-up below
        froms = by_name.get("from", [])
        if len(froms) != 1:
            raise ValidationError(f"a message needs exactly one From header, not {len(froms)}",
                                  param="From")
        sender = froms[0].value
        try:
            domains = rawmail.address_domains(sender)
        except ValueError as exc:  # comments nested past any reader's patience
            raise ValidationError(f"From: {exc}", param="From", smtp="550 5.1.7") from None
        for domain in domains if sub.allowed_domains else ():
            if not may_send_as(sub.allowed_domains, domain.lower()):
                raise ValidationError(f"this key may not send as {domain}", param="From",
                                      smtp="550 5.7.1")
        if len(by_name.get("received", ())) > limits.max_received_headers:
            raise ValidationError(
                f"more than {limits.max_received_headers} Received headers: a mail loop",
                param="Received", smtp="554 5.4.6")
        if any(_dropped(k) for k in by_name):
            headers = [h for h in headers if not _dropped(h.key)]
        headers = self._trace(sub, message_id, date, recipients) + headers
        # the trace is Received fields only, and what was dropped is Bcc and X-Relay-*
        if "message-id" not in by_name:
            headers.append(rawmail.make("Message-ID", self.message_id_header(message_id)))
        if "date" not in by_name:
            headers.append(rawmail.make("Date", date))
        subjects = by_name.get("subject")
        return (rawmail.join(headers, body),
                rawmail.decoded(subjects[0].value if subjects else None),
                rawmail.decoded(sender), domains[0] if domains else "")

    def _composed(self, sub: Submission, message_id: str, date: str
                  ) -> tuple[bytes, str, int, str, str, tuple[tuple[str, bytes], ...]]:
        """A composition is checked and stored as it is; compose builds it at delivery, so
        accepting costs no MIME work (body, kind, estimated size, subject, From, and the
        large attachments as parts)."""
        c = sub.composition
        assert c is not None
        compose.check_headers(c)  # as filled in: a template's values included
        domain = c.sender.email.rpartition("@")[2]
        if not may_send_as(sub.allowed_domains, domain):
            raise ValidationError(f"this key may not send as {domain}", param="from",
                                  smtp="550 5.7.1")
        size = compose.estimated_size(c)
        if size > self._config.limits.max_message_size:
            raise ValidationError(
                f"the message would be about {size} octets, over "
                f"{self._config.limits.max_message_size}", param="attachments",
                smtp="552 5.3.4")
        parts: dict[str, bytes] = {}
        stored = compose.dumps(c, message_id=self.message_id_header(message_id), date=date,
                               parts=parts)
        sender = f"{c.sender.name} <{c.sender.email}>" if c.sender.name else c.sender.email
        return stored, "composition", size, c.subject, sender, tuple(parts.items())

    def message_id_header(self, message_id: str) -> str:
        """The Message-ID header value of a message relay composes (the id without "msg_")."""
        return f"<{message_id.removeprefix('msg_')}@{self._config.server.hostname}>"

    @staticmethod
    def _given_key(sub: Submission) -> GivenDkimKey | None:
        """A key given with the message must be readable and for a domain the sender may use."""
        if sub.dkim is None:
            return None
        domain = normalize_domain(sub.dkim.domain, param="dkim_domain")
        if not may_send_as(sub.allowed_domains, domain):
            raise ValidationError(f"this key may not sign for {domain}", param="dkim_domain",
                                  smtp="550 5.7.1")
        selector = sub.dkim.selector.strip()
        if not selector or not all(c.isalnum() or c in "-_." for c in selector):
            raise ValidationError(f"{selector!r} is not a DKIM selector", param="dkim_selector")
        try:
            dkimkeys.load_private_key(sub.dkim.private_key)
        except dkimkeys.KeyError_ as exc:
            raise ValidationError(str(exc), param="dkim_private_key") from None
        return GivenDkimKey(domain=domain, selector=selector, private_key=sub.dkim.private_key)

    def _trace(self, sub: Submission, message_id: str, date: str,
               recipients: tuple[NewRecipient, ...]) -> list[rawmail.Header]:
        if sub.received_from is None:
            return []
        value = (f"from {sub.received_from}\r\n\tby {self._config.server.hostname} (relay) "
                 f"with {sub.received_with or 'ESMTP'} id {message_id}")
        if len(recipients) == 1:
            value += f"\r\n\tfor <{recipients[0].address}>"
        value += f"; {date}"
        return [rawmail.Header("Received", f"Received: {value}\r\n".encode())]
