"""The last changes to a message's bytes before delivery: relay's marks (List-Unsubscribe,
Feedback-ID, tracked links), then 7-bit clean for any peer, then DKIM-signed (always last)
with the right domain's keys. Also the envelope sender: relay's VERP return path."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .. import compose, metrics, rawmail
from ..addresses import a_label, self_and_parents
from ..config import DkimConfig
from ..errors import StoreError, TemporaryFailure
from ..feedback import tracking, verp
from ..keys import may_send_as
from ..store import Outgoing, SQLiteStore
from ..types import GivenDkimKey
from . import dkim, transcode
from .signer import SignerProcess

log = logging.getLogger(__name__)

KEYRING_REFRESH = 30.0  # seconds between re-reads of the domains' keys from the store
KEYRING_CHECK = 1.0  # seconds between looks at whether they changed (a domain added, a key
# activated): a change is read at once, not up to KEYRING_REFRESH later
RENDER_THREADS = 2
INLINE_RENDER_MAX = 256 * 1024  # octets of body: larger messages render in the thread pool
GIVEN_CACHE = 256  # parsed keys given with messages, kept by the hash of their text
FROM_CACHE = 4096  # From fields remembered with their domain


@dataclass(frozen=True)
class Job:
    """One rendering: a message for all its recipients in a delivery, or, for broadcast
    mail, for one recipient (its own unsubscribe link)."""

    message: Outgoing
    smtputf8: bool = False
    recipient_id: int | None = None
    stream: str = "transactional"
    sender_domain: str = ""
    track: str = ""  # "opens", "clicks" or both: the html rewritten for this recipient
    message_id: str = ""  # set when the mail goes out with relay's return path: Feedback-ID


@dataclass(frozen=True)
class Marks:
    """What render signs relay's marks with: the token key, the public base URL of links,
    and the return-path host of mail whose sending domain relay has no record of."""

    tokens: tracking.Tokens
    public_url: str
    bounce_host: str


@dataclass(frozen=True)
class Rendered:
    data: bytes
    smtputf8: bool  # its header needs an SMTPUTF8 transport (RFC 6532)
    signed: str  # for the attempt log: which keys signed it, or why none did
    message_id: str = ""  # its Message-ID field's value, as written ("" when it has none)


class KeyRing:
    """Every domain's active keys, parsed once and kept in memory; re-read now and then, so
    that `relay domains add` and `rotate --activate` reach a running relay."""

    def __init__(self, store: SQLiteStore, *, refresh: float = KEYRING_REFRESH,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._refresh = refresh
        self._clock = clock
        self._loaded_at: float | None = None
        self._checked_at = 0.0
        self._version: tuple[object, ...] | None = None  # store.signing_version() when read
        self._loads = 0
        self._by_domain: dict[str, list[dkim.SigningKey]] = {}
        self.return_paths: dict[str, str] = {}  # {domain: its return-path host}
        self._parsed: dict[tuple[str, float], dkim.SigningKey] = {}
        self._lock = asyncio.Lock()

    def _stale(self) -> bool:
        return self._loaded_at is None or self._clock() - self._loaded_at >= self._refresh

    async def fresh(self) -> None:
        """Loaded, and re-read when stale or changed; callers meanwhile wait (none signs
        with nothing)."""
        if not self._stale() and not await self._changed():
            return
        loads = self._loads
        async with self._lock:
            if self._loads != loads:
                return  # another caller read them while this one waited
            try:
                await self._load()
            except StoreError as exc:
                if self._loaded_at is None:  # never loaded: sign nothing wrongly, wait
                    raise TemporaryFailure(f"the DKIM keys cannot be read: {exc}",
                                           code=451, enhanced="4.3.0") from exc
                log.error("DKIM keys not re-read (%s); signing with the ones loaded", exc)
            self._loaded_at = self._checked_at = self._clock()
            self._loads += 1

    async def _changed(self) -> bool:
        """Whether the domains or their active keys changed since they were read (looked at
        once a KEYRING_CHECK: one small query)."""
        now = self._clock()
        if now - self._checked_at < KEYRING_CHECK:
            return False
        self._checked_at = now
        try:
            return await self._store.signing_version() != self._version
        except StoreError:
            return False  # the keys loaded stand; the next refresh says what is wrong

    async def _load(self) -> None:
        version = await self._store.signing_version()  # before: a change after is seen next
        by_domain: dict[str, list[dkim.SigningKey]] = {}
        parsed = {}
        for info in await self._store.signing_keys():
            cache_key = (info.path, info.created_at)
            key = self._parsed.get(cache_key)
            if key is None:
                try:
                    key = dkim.SigningKey(info.domain, info.selector,
                                          dkim.load_private_key(Path(info.path).read_bytes()))
                except (OSError, dkim.KeyError_) as exc:
                    log.error("DKIM key %s of %s is unusable: %s", info.selector, info.domain,
                              exc)
                    metrics.dkim_failure("key")
                    continue
            parsed[cache_key] = key
            by_domain.setdefault(info.domain, []).append(key)
        self.return_paths = await self._store.return_paths()
        self._by_domain, self._parsed, self._version = by_domain, parsed, version

    def keys_for(self, domain: str) -> list[dkim.SigningKey]:
        return self._by_domain.get(domain, [])

    async def has_rsa(self) -> bool:
        """Whether the store holds an RSA key, read now and not kept: what is loaded, and
        when, stays the first render's (a domain added before it signs from the start)."""
        return any(info.algorithm == "rsa-sha256" for info in await self._store.signing_keys())


class Renderer:
    def __init__(self, config: DkimConfig, keyring: KeyRing, *, threads: int = RENDER_THREADS,
                 marks: Marks | None = None, signer: SignerProcess | None = None) -> None:
        self._config = config
        self._signer = signer
        self._keyring = keyring
        self._marks = marks
        self._given: dict[bytes, dkim.SigningKey] = {}
        self._from_domains: dict[bytes, str] = {}  # From field's bytes -> its domain
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="render")

    async def warm(self) -> None:
        """Start the signer process now when there is an RSA key to sign with, rather than
        at the first message, whose RSA signatures (and those of the ~0.1 s of messages after
        it) the worker would make itself while the child starts. A store that cannot be read
        now is the first render's to report."""
        if self._signer is None or not self._config.enabled:
            return
        try:
            rsa_key = await self._keyring.has_rsa()
        except StoreError:
            return
        if rsa_key:
            self._signer.start()

    async def render_all(self, jobs: Sequence[Job]) -> list[Rendered | Exception]:
        """Each job rendered; a failure is returned, not raised.

        Small messages are prepared in the loop's own thread, one at a time with the loop
        served in between, and their RSA signatures made in one batch by the signer process
        (signer.py): `cryptography` holds the GIL while it signs, so a thread pool only added
        GIL hand-offs (measured: 2.48 ms of worker CPU a message against 1.70 inline,
        bench/deliver.py --dkim on), and in the worker's own process the signatures took CPU
        the delivery loop needs. Large ones go to the pool, where hashing and re-encoding
        them (which free the GIL) run beside the loop instead of stalling it."""
        await self._keyring.fresh()
        out: list[Rendered | Exception | None] = [None] * len(jobs)
        pending: list[tuple[int, dkim.Unsigned, bool, str]] = []
        for i, job in enumerate(jobs):
            if len(job.message.body) > INLINE_RENDER_MAX:
                (out[i],) = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._render_each, (job,))
                continue
            if i:
                await asyncio.sleep(0)
            try:
                pending.append((i, *self._unsigned(job.message, smtputf8=job.smtputf8,
                                                   job=job)))
            except Exception as exc:  # noqa: BLE001 - the caller parks that one message
                metrics.dkim_failure("render")
                out[i] = exc
        rsa_items = [(key.key, digest) for _, u, _, _, _ in pending
                     for key, _, digest in u.fields if key.algorithm == "rsa-sha256"]
        if self._signer is not None and rsa_items:
            made = iter(await self._signer.sign(rsa_items))  # type: ignore[arg-type]
        else:
            made = iter([dkim.raw_signature(key, digest) for key, digest in rsa_items])
        for i, u, needs_utf8, note, message_id in pending:
            signatures = [next(made) if key.algorithm == "rsa-sha256" else
                          dkim.raw_signature(key.key, digest) for key, _, digest in u.fields]
            out[i] = Rendered(data=dkim.finish(u, signatures), smtputf8=needs_utf8,
                              signed=note, message_id=message_id)
        return [r for r in out if r is not None]

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._signer is not None:
            await self._signer.close()

    def return_path_host(self, sender_domain: str) -> str:
        """Where bounces of a sending domain's mail come back (its SPF and MX name that host)."""
        fallback = self._marks.bounce_host if self._marks is not None else ""
        return verp.return_path_host(sender_domain, self._keyring.return_paths, fallback)

    def envelope_sender(self, recipient_id: int, sender_domain: str) -> str | None:
        """relay's VERP return path for one recipient, or None when render has no token key."""
        if self._marks is None:
            return None
        return verp.bounce_address(self._marks.tokens, recipient_id,
                                   self.return_path_host(sender_domain))

    def _render_each(self, jobs: Sequence[Job]) -> list[Rendered | Exception]:
        out: list[Rendered | Exception] = []
        for job in jobs:
            try:
                out.append(self.render(job.message, smtputf8=job.smtputf8, job=job))
            except Exception as exc:  # noqa: BLE001 - the caller parks that one message
                metrics.dkim_failure("render")
                out.append(exc)
        return out

    def render(self, message: Outgoing, *, smtputf8: bool = False,
               job: Job | None = None) -> Rendered:
        """One message rendered and signed in this thread."""
        u, needs_utf8, note, message_id = self._unsigned(message, smtputf8=smtputf8, job=job)
        return Rendered(data=dkim.finish_here(u), smtputf8=needs_utf8, signed=note,
                        message_id=message_id)

    def _unsigned(self, message: Outgoing, *, smtputf8: bool, job: Job | None
                  ) -> tuple[dkim.Unsigned, bool, str, str]:
        """Everything of rendering but the signatures: the final bytes, whether they need
        SMTPUTF8, the note on signing for the attempt log, and the Message-ID."""
        data = transcode.seven_bit(self._materialize(message, job))
        headers, body = rawmail.split(data)
        marked = False  # relay's marks are short ASCII lines: added after the 7-bit pass
        if job is not None and job.stream == "broadcast" and job.recipient_id is not None \
                and self._marks is not None:
            headers = self._add_unsubscribe(headers, job.recipient_id, job.sender_domain)
            marked = True
        if job is not None and job.message_id and self._marks is not None:
            marked = self._add_feedback_id(headers, job) or marked
        if marked:
            data = rawmail.join(headers, body)
        needs_utf8 = smtputf8 or transcode.needs_smtputf8(data)
        keys, note = self._choose(message, headers)
        return (dkim.prepare(data, keys, parts=(headers, body)), needs_utf8, note,
                rawmail.first_value(headers, "Message-ID") or "")

    def _materialize(self, message: Outgoing, job: Job | None) -> bytes:
        """The message's bytes; a tracked composition gets this recipient's links and pixel
        (mail that came in by SMTP is never rewritten)."""
        u = self._marks
        if job is None or not job.track or job.recipient_id is None or u is None or \
                message.kind != "composition":
            return compose.materialize(message.body, message.kind)
        c, message_id, date = compose.loads(message.body)
        if c.html:
            c = dataclasses.replace(c, html=tracking.rewrite_html(
                c.html, u.tokens, job.recipient_id, u.public_url,
                opens="opens" in job.track, clicks="clicks" in job.track))
        return compose.build(c, message_id=message_id, date=date)

    def _add_unsubscribe(self, headers: list[rawmail.Header], recipient_id: int,
                         sender_domain: str) -> list[rawmail.Header]:
        """RFC 8058's two headers, before signing so that h= covers them."""
        u = self._marks
        assert u is not None
        host = self.return_path_host(sender_domain)
        headers = [h for h in headers if h.key not in ("list-unsubscribe",
                                                        "list-unsubscribe-post")]
        return headers + [rawmail.make(n, v) for n, v in
                          tracking.unsubscribe_headers(u.tokens, recipient_id, u.public_url,
                                                       host)]

    def _add_feedback_id(self, headers: list[rawmail.Header], job: Job) -> bool:
        """Feedback-ID naming the message (appended to `headers`), for complaint reports that
        hide their recipient; one the sender set stays (it is theirs to give a feedback
        loop)."""
        assert self._marks is not None
        if rawmail.first_value(headers, verp.FEEDBACK_ID_HEADER) is not None:
            return False
        headers.append(rawmail.make(verp.FEEDBACK_ID_HEADER, verp.feedback_id(
            self._marks.tokens, job.message_id, job.stream, job.sender_domain)))
        return True

    def _choose(self, message: Outgoing, headers: list[rawmail.Header]
                ) -> tuple[list[dkim.SigningKey], str]:
        """The keys that sign and a line saying so. A key signs only for domains the sender
        may use; the default domain is the operator's own and signs for anyone."""
        if not self._config.enabled:
            return [], "unsigned: [dkim] enabled = false"
        allowed = message.sign_domains
        refused = ""
        given = message.dkim
        if given is not None:
            if may_send_as(allowed, given.domain):
                key = self._given_key(given)
                return [key], f"signed: {key.describe()} (the key given with the message)"
            refused = f"; the key given for {given.domain} was refused (not a sender domain)"
        from_domain = self._from_domain(headers)
        for candidate in self_and_parents(from_domain):
            keys = self._keyring.keys_for(candidate)
            if keys and may_send_as(allowed, candidate):
                return keys, "signed: " + ", ".join(k.describe() for k in keys) + refused
        default = self._config.default_domain
        keys = self._keyring.keys_for(default) if default else []
        if keys:
            return keys, ("signed: " + ", ".join(k.describe() for k in keys)
                          + f" (the default domain; {from_domain or 'the From domain'} has no "
                          f"key){refused}")
        why = (f"the default domain {default} has no key either" if default
               else "no [dkim] default_domain is set")
        return [], f"unsigned: no DKIM key for {from_domain or 'the From domain'} and {why}" \
                   + refused

    def _from_domain(self, headers: list[rawmail.Header]) -> str:
        """The A-label of the first From address's domain, remembered by the field's text
        (bulk mail repeats its From; parsing an address costs more than a signature's hash)."""
        found = rawmail.find(headers, "From")
        raw = found[0].raw if found else b""
        domain = self._from_domains.get(raw)
        if domain is None:
            try:
                domains = rawmail.address_domains(found[0].value if found else "")
            except ValueError:  # no domain to read: signed with no From domain's key
                domains = []
            domain = (a_label(domains[0]) or domains[0].lower()) if domains else ""
            if len(self._from_domains) >= FROM_CACHE:
                self._from_domains.clear()
            self._from_domains[raw] = domain
        return domain

    def _given_key(self, given: GivenDkimKey) -> dkim.SigningKey:
        digest = hashlib.sha256(
            f"{given.domain}\0{given.selector}\0{given.private_key}".encode()).digest()
        key = self._given.get(digest)
        if key is None:
            if len(self._given) >= GIVEN_CACHE:
                self._given.clear()
            key = dkim.SigningKey(given.domain, given.selector,
                                  dkim.load_private_key(given.private_key))
            self._given[digest] = key
        return key
