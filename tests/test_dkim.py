"""DKIM end to end: keys made by `relay domains add`, records served by a DNS server on loopback,
mail relayed to a real SMTP sink and verified there with dkimpy's verifier."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email
import email.policy
import json
import random
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import dkim as dkimpy
import dns.resolver as dnsresolver
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import CanonicalizationPolicy

from relay import keys
from relay.config import Config, DeliveryConfig, DkimConfig, DnsConfig, ListenerConfig
from relay.delivery import dkim, transcode
from relay.delivery.render import Job, KeyRing, Rendered, Renderer
from relay.domains import split_txt
from relay.errors import StoreError, TemporaryFailure, ValidationError
from relay.service import Service
from relay.store import Outgoing
from relay.types import DkimKeyInfo, EnvelopeRecipient, GivenDkimKey, Submission

from .conftest import make_config, run_relay
from .dnsserver import DNSServer
from .sink import Sink
from .smtputil import connect, in_thread
from .test_delivery import FAST, route, wait_final
from .test_domains import printed_records, publish

YEAR = time.gmtime().tm_year


def dkim_config(tmp_path: Path, dns: DNSServer, sink_port: int, **dkim_opts: Any) -> Config:
    return make_config(
        tmp_path, ListenerConfig(port=0),
        delivery=DeliveryConfig(mx_port=sink_port, **FAST),
        dns=DnsConfig(nameservers=(dns.nameserver,), timeout=1.0),
        dkim=DkimConfig(**dkim_opts),
    )


def add_domain(config: Config, domain: str) -> str:
    """`relay domains add` on the config's data dir, as a sysadmin runs it; its output."""
    path = config.server.data_dir.parent / "relay.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    store = f"[store]\nurl = '{config.store.url}'\n" if config.store.url else ""
    path.write_text(f"[server]\nhostname = 'relay.test'\n"
                    f"data_dir = '{config.server.data_dir}'\n{store}")
    result = run_relay("--config", str(path), "domains", "add", domain)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def start(config: Config) -> tuple[Service, str]:
    svc = Service(config)
    await svc.start()
    _, secret = await keys.create_key(svc.store, name="t", scopes=["emails:send"])
    return svc, secret


def send_raw(port: int, key: str, data: bytes, rcpt: str = "bob@dest.test",
             sender: str = "alice@example.test") -> str:
    with connect(port, key=key) as s:
        s.mail(sender)
        code, text = s.rcpt(rcpt)
        assert code == 250, text
        code, text = s.data(data)
        assert code == 250, text
        return text.decode().split()[-1]


def verify_all(data: bytes, nameserver: str) -> list[tuple[bytes, bytes, bool]]:
    """(d=, a=, verified) of every DKIM-Signature, looked up in the loopback DNS server."""
    host, port = nameserver.split(":")
    resolver = dnsresolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = int(port)

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode(), "TXT")
        return b"".join(answer[0].strings)

    out = []
    d = dkimpy.DKIM(data)
    count = len([h for h in d.headers if h[0].lower() == b"dkim-signature"])
    for i in range(count):
        ok = d.verify(idx=i, dnsfunc=dnsfunc)
        out.append((d.signature_fields[b"d"], d.signature_fields[b"a"], ok))
    return out


ATTACHMENT = base64.encodebytes(bytes(range(256)) * 20).replace(b"\n", b"\r\n")
MESSAGES = {
    "attachment": (
        b"From: Alice <alice@example.test>\r\nTo: bob@dest.test\r\nSubject: report\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n"
        b"--XX\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--XX\r\nContent-Type: application/pdf; name=r.pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + ATTACHMENT + b"--XX--\r\n"),
    "8bit": (
        b"From: alice@example.test\r\nTo: bob@dest.test\r\nSubject: caf\xc3\xa9?\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n"),
    "folded": (
        b"From: alice@example.test\r\nTo: bob@dest.test,\r\n  carol@dest.test,\r\n\t dave@dest.test\r\n"
        b"Subject: " + b"a long subject " * 12 + b"\r\n  continued\tafter a fold  \r\n"
        b"References: " + b" ".join(b"<%d@x.test>" % i for i in range(40)) + b"\r\n\r\n"
        b"Body  with   spaces \t \r\n\r\n\r\n"),
}


async def test_both_signatures_verify_against_the_printed_records(tmp_path: Path,
                                                                  dns: DNSServer) -> None:
    async with Sink(smtputf8=True) as sink:
        config = dkim_config(tmp_path, dns, sink.port)
        publish(dns, printed_records(await in_thread(add_domain, config, "example.test")))
        route(dns, "dest.test", (10, "mx.dest.test", "127.0.0.1"))
        svc, key = await start(config)
        try:
            for name, data in MESSAGES.items():
                # no Message-ID or Date: relay adds them, and a Received line, before signing
                mid = await in_thread(send_raw, svc.bound[0][1], key, data)
                detail = await wait_final(svc, mid)
                assert [r.status.value for r in detail.recipients] == ["delivered"], name
                (got,) = sink.delivered_to("bob@dest.test")[-1:]
                assert b"\r\nMessage-ID: <" in got.data and b"\r\nReceived: from" in got.data
                results = await in_thread(verify_all, got.data, dns.nameserver)
                assert results == [(b"example.test", b"rsa-sha256", True),
                                   (b"example.test", b"ed25519-sha256", True)], name
                (attempt,) = detail.attempts
                assert attempt.signed == (f"signed: rsa-sha256 d=example.test s=r{YEAR}a, "
                                          f"ed25519-sha256 d=example.test s=e{YEAR}a")
        finally:
            await svc.stop()


async def test_8bit_body_and_1200_octet_line_arrive_7bit_clean_and_verify(
        tmp_path: Path, dns: DNSServer) -> None:
    async with Sink() as sink:
        config = dkim_config(tmp_path, dns, sink.port)
        publish(dns, printed_records(await in_thread(add_domain, config, "example.test")))
        route(dns, "dest.test", (10, "mx.dest.test", "127.0.0.1"))
        svc, key = await start(config)
        long_line = ("z" * 600 + "\u00e9" * 300).encode()  # 1,200 octets
        body = "Hallo W\u00f6rld\r\n".encode() + long_line + b"\r\nlast line\r\n"
        data = (b"From: alice@example.test\r\nTo: bob@dest.test\r\nSubject: wide\r\n\r\n"
                + body)
        try:
            mid = await in_thread(send_raw, svc.bound[0][1], key, data)
            detail = await wait_final(svc, mid)
            assert detail.recipients[0].status.value == "delivered"
            got = sink.delivered_to("bob@dest.test")[0]
            assert got.data.isascii()
            assert max(len(line) for line in got.data.split(b"\r\n")) <= 998
            assert "BODY=8BITMIME" not in got.mail_options
            parsed = email.message_from_bytes(got.data, policy=email.policy.default)
            assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
            assert parsed.get_payload(decode=True) == body
            assert [r[2] for r in await in_thread(verify_all, got.data, dns.nameserver)] == [
                True, True]
        finally:
            await svc.stop()


async def test_domain_without_keys_goes_unsigned_or_with_the_default_domain(
        tmp_path: Path, dns: DNSServer) -> None:
    async with Sink() as sink:
        route(dns, "dest.test", (10, "mx.dest.test", "127.0.0.1"))
        data = b"From: x@nokeys.test\r\nTo: bob@dest.test\r\nSubject: s\r\n\r\nhi\r\n"
        config = dkim_config(tmp_path / "a", dns, sink.port)
        svc, key = await start(config)
        try:
            mid = await in_thread(send_raw, svc.bound[0][1], key, data, "bob@dest.test",
                                  "x@nokeys.test")
            detail = await wait_final(svc, mid)
            assert b"DKIM-Signature" not in sink.messages[-1].data
            assert detail.attempts[0].signed == (
                "unsigned: no DKIM key for nokeys.test and no [dkim] default_domain is set")
        finally:
            await svc.stop()

        config = dkim_config(tmp_path / "b", dns, sink.port, default_domain="relay.test")
        publish(dns, printed_records(await in_thread(add_domain, config, "relay.test")))
        svc, key = await start(config)
        try:
            mid = await in_thread(send_raw, svc.bound[0][1], key, data, "bob@dest.test",
                                  "x@nokeys.test")
            detail = await wait_final(svc, mid)
            got = sink.messages[-1].data
            assert [r[:2] for r in await in_thread(verify_all, got, dns.nameserver)] == [
                (b"relay.test", b"rsa-sha256"), (b"relay.test", b"ed25519-sha256")]
            assert detail.attempts[0].signed.endswith(
                "(the default domain; nokeys.test has no key)")
        finally:
            await svc.stop()


async def test_subdomain_from_is_signed_by_the_parent_domain_and_dkim_can_be_off(
        tmp_path: Path, dns: DNSServer) -> None:
    async with Sink() as sink:
        route(dns, "dest.test", (10, "mx.dest.test", "127.0.0.1"))
        config = dkim_config(tmp_path, dns, sink.port)
        publish(dns, printed_records(await in_thread(add_domain, config, "example.test")))
        svc, key = await start(config)
        data = b"From: x@news.example.test\r\nTo: bob@dest.test\r\nSubject: s\r\n\r\nhi\r\n"
        try:
            mid = await in_thread(send_raw, svc.bound[0][1], key, data)
            await wait_final(svc, mid)
            results = await in_thread(verify_all, sink.messages[-1].data, dns.nameserver)
            assert [r[0] for r in results] == [b"example.test"] * 2 and all(r[2] for r in results)
        finally:
            await svc.stop()
        off = dkim_config(tmp_path, dns, sink.port, enabled=False)
        svc, key = await start(off)
        try:
            mid = await in_thread(send_raw, svc.bound[0][1], key, data)
            detail = await wait_final(svc, mid)
            assert b"DKIM-Signature" not in sink.messages[-1].data
            assert detail.attempts[0].signed == "unsigned: [dkim] enabled = false"
        finally:
            await svc.stop()


def ed25519_seed() -> tuple[str, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    seed = key.private_bytes_raw()
    return base64.b64encode(seed).decode(), dkim.record_text(key)


async def test_key_given_with_the_message_signs_and_is_wiped_when_final(
        tmp_path: Path, dns: DNSServer) -> None:
    async with Sink() as sink:
        route(dns, "dest.test", (10, "mx.dest.test", "127.0.0.1"))
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = dkim.private_pem(rsa_key).decode()
        dns.add("given._domainkey.client.test", "TXT",
                " ".join(f'"{c}"' for c in split_txt(dkim.record_text(rsa_key))))
        config = dkim_config(tmp_path, dns, sink.port)
        svc, _ = await start(config)
        try:
            sub = Submission(
                mail_from="app@client.test", recipients=(EnvelopeRecipient(address="bob@dest.test"),),
                data=b"From: app@client.test\r\nTo: bob@dest.test\r\nSubject: s\r\n\r\nhi\r\n",
                source="api", dkim=GivenDkimKey(domain="Client.TEST", selector="given",
                                                private_key=pem))
            assert "BEGIN" not in repr(sub.dkim)
            other_pem = dkim.private_pem(
                rsa.generate_private_key(public_exponent=65537, key_size=2048)).decode()
            later = dataclasses.replace(sub, scheduled_at=time.time() + 3600, dkim=GivenDkimKey(
                domain="client.test", selector="later", private_key=other_pem))
            await svc.submitter.submit(later)  # pending: its key stays, on the same page
            result = await svc.submitter.submit(sub)
            outgoing = await svc.store.get_outgoing(result.message_id)
            assert outgoing is not None and outgoing.dkim is not None
            detail = await wait_final(svc, result.message_id)
            assert detail.attempts[0].signed == (
                "signed: rsa-sha256 d=client.test s=given (the key given with the message)")
            results = await in_thread(verify_all, sink.messages[-1].data, dns.nameserver)
            assert results == [(b"client.test", b"rsa-sha256", True)]
            outgoing = await svc.store.get_outgoing(result.message_id)
            assert outgoing is not None and outgoing.dkim is None  # wiped at the final status

            # refused: a key limited to another domain, and an unreadable key
            limited = Submission(
                mail_from="", recipients=(EnvelopeRecipient(address="bob@dest.test"),),
                data=b"From: app@other.test\r\n\r\nhi\r\n", allowed_domains=("other.test",),
                dkim=GivenDkimKey(domain="client.test", selector="s", private_key=pem))
            with pytest.raises(ValidationError) as refused:
                svc.submitter.prepare(limited)
            assert refused.value.param == "dkim_domain"
            seed, _ = ed25519_seed()
            bad = Submission(
                mail_from="", recipients=(EnvelopeRecipient(address="bob@dest.test"),),
                data=b"From: app@client.test\r\n\r\nhi\r\n",
                dkim=GivenDkimKey(domain="client.test", selector="s", private_key=seed[:-4]))
            with pytest.raises(ValidationError) as unreadable:
                svc.submitter.prepare(bad)
            assert unreadable.value.param == "dkim_private_key"
        finally:
            await svc.stop()
        if config.store.url:  # on PostgreSQL: no SQLite file to look into
            return
        with sqlite3.connect(config.db_path) as db:  # the wiped key is nowhere in the file
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        stored = config.db_path.read_bytes()
        assert pem.splitlines()[5].encode() not in stored
        assert other_pem.splitlines()[5].encode() in stored


async def test_utf8_header_to_a_peer_without_smtputf8_bounces_with_5_6_7(
        tmp_path: Path, dns: DNSServer) -> None:
    async with Sink(smtputf8=False) as sink:
        route(dns, "dest.test", (10, "mx.dest.test", "127.0.0.1"))
        svc, key = await start(dkim_config(tmp_path, dns, sink.port))
        try:
            data = "From: alice@example.test\r\nSubject: Gr\u00fc\u00dfe\r\n\r\nhi\r\n".encode()
            mid = await in_thread(send_raw, svc.bound[0][1], key, data)
            detail = await wait_final(svc, mid)
            assert detail.recipients[0].status.value == "bounced"
            assert detail.attempts[0].enhanced == "5.6.7"
            assert not sink.messages
        finally:
            await svc.stop()


# -- units ---------------------------------------------------------------------------------

def test_relaxed_body_matches_dkimpy() -> None:
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    rnd = random.Random(7)
    pieces = [b" ", b"\t", b"\r\n", b"a", b"b", b"  "]
    for _ in range(20000):
        body = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 14)))
        assert dkim.relaxed_body(body) == policy.canonicalize_body(body), body


def test_relaxed_header_matches_dkimpy() -> None:
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    rnd = random.Random(8)
    pieces = [b" ", b"\t", b"\r\n ", b"\r\n\t", b"a", b"B", b"  ", b":"]
    for _ in range(20000):
        value = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 12))) + b"\r\n"
        ((name, canonical),) = policy.canonicalize_headers([(b"Sub ject ", value)])
        assert dkim.relaxed_header(b"Sub ject ", value) + b"\r\n" == name + b":" + canonical


def test_oversigning_lists_each_header_once_more_than_it_occurs_and_never_l() -> None:
    key = dkim.SigningKey("example.test", "s", ed25519.Ed25519PrivateKey.generate())
    data = (b"From: a@example.test\r\nTo: b@x.test\r\nTo: c@x.test\r\nSubject: s\r\n"
            b"X-Other: y\r\n\r\nhi\r\n")
    signed = dkim.sign(data, [key])
    field = signed.split(b"\r\nFrom:")[0].decode()
    tags = {k.strip(): "".join(v.split()) for k, _, v in
            (t.partition("=") for t in field.split(":", 1)[1].split(";"))}
    h = tags["h"].split(":")
    assert h.count("from") == 2 and h.count("to") == 3 and h.count("subject") == 2
    assert h.count("cc") == 1 and h.count("list-unsubscribe") == 1 and "x-other" not in h
    assert "l" not in tags and tags["c"] == "relaxed/relaxed"
    # a header added after signing breaks the signature
    dnsfunc = {b"s._domainkey.example.test.": dkim.record_text(key.key).encode()}.get
    assert dkimpy.DKIM(signed).verify(dnsfunc=lambda n, timeout=5: dnsfunc(n))
    tampered = signed.replace(b"\r\nFrom:", b"\r\nCc: evil@x.test\r\nFrom:")
    assert not dkimpy.DKIM(tampered).verify(dnsfunc=lambda n, timeout=5: dnsfunc(n))


def test_the_field_folded_once_per_layout_is_the_field_folded_each_time() -> None:
    """prepare folds a key's DKIM-Signature once per header layout, with stand-ins for t= and
    bh=; the result must be what folding the real text gives, however long the names."""
    ed = ed25519.Ed25519PrivateKey.generate()
    rng = random.Random(7)
    for domain, selector in (("example.test", "s"), ("a" * 63 + "." + "b" * 63 + ".test",
                                                      "e2026a"), ("x.test", "s" * 60)):
        key = dkim.SigningKey(domain, selector, ed)
        for now in (1, 10**9 + 7, 1_800_000_000, 10**11):
            counts = tuple(rng.choice((0, 0, 1, 2)) for _ in dkim.SIGNED_HEADERS)
            body_hash = base64.b64encode(rng.randbytes(32))
            signed = dkim.hashlib.sha256(b"the signed fields")
            stamp = str(now).encode()
            for _ in range(2):  # folded, then from the cache
                _, value, digest = dkim._field_value(signed, counts, key, body_hash, stamp)
                want, relaxed = dkim._folded(key, counts, stamp, body_hash)
                hasher = signed.copy()
                hasher.update(relaxed)
                assert (value, digest) == (want, hasher.digest())
    data = b"From: a@example.test\r\nTo: b@x.test\r\nSubject: s\r\n\r\nhi\r\n"
    key = dkim.SigningKey("example.test", "s", ed)
    dnsfunc = {b"s._domainkey.example.test.": dkim.record_text(ed).encode()}.get
    for now in (int(time.time()) - 1, int(time.time())):  # the same layout, the cached fold
        signed_data = dkim.sign(data, [key], now=now)
        assert b"t=%d;" % now in signed_data
        assert dkimpy.DKIM(signed_data).verify(dnsfunc=lambda n, timeout=5: dnsfunc(n))


def test_keys_load_from_pem_and_seed_and_bad_ones_are_refused() -> None:
    seed, _ = ed25519_seed()
    assert isinstance(dkim.load_private_key(seed), ed25519.Ed25519PrivateKey)
    pem = dkim.private_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    assert isinstance(dkim.load_private_key(pem), rsa.RSAPrivateKey)
    der = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
    assert isinstance(dkim.load_private_key(der), rsa.RSAPrivateKey)  # MailChannels' form
    for bad, why in ((b"-----BEGIN PRIVATE KEY-----\nxx\n", "PEM"),
                     (b"not a key", "base64")):
        with pytest.raises(dkim.KeyError_, match=why):
            dkim.load_private_key(bad)


def test_transcode_keeps_7bit_mail_as_it_is_and_reencodes_8bit_parts() -> None:
    plain = b"From: a@b.test\r\nSubject: s\r\n\r\n" + b"line\r\n" * 300
    assert transcode.seven_bit(plain) is plain
    mixed = (b"From: a@b.test\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: multipart/mixed; boundary=b1\r\nContent-Transfer-Encoding: 8bit\r\n"
             b"\r\npreamble\r\n--b1\r\nContent-Type: text/html; charset=utf-8\r\n"
             b"Content-Transfer-Encoding: 8bit\r\n\r\n<p>\xc3\xa9</p>\r\n"
             b"--b1\r\nContent-Type: application/octet-stream\r\n"
             b"Content-Transfer-Encoding: binary\r\n\r\n\x01\xff\xfe\x80\r\n"
             b"--b1\r\nContent-Type: message/rfc822\r\n\r\n"
             b"From: x@y.test\r\nContent-Type: text/plain; charset=latin-1\r\n\r\n\xe9t\xe9\r\n"
             b"--b1--\r\n")
    out = transcode.seven_bit(mixed)
    assert out.isascii() and b"\r\npreamble\r\n--b1\r\n" in out
    before = email.message_from_bytes(mixed)
    after = email.message_from_bytes(out)
    assert after["Content-Transfer-Encoding"] == "7bit"
    leaves_before = [p for p in before.walk() if not p.is_multipart()]
    leaves_after = [p for p in after.walk() if not p.is_multipart()]
    assert [p.get("Content-Transfer-Encoding") for p in leaves_after] == [
        "quoted-printable", "base64", "quoted-printable"]
    for b, a in zip(leaves_before, leaves_after, strict=True):
        assert a.get_payload(decode=True) == b.get_payload(decode=True)


def test_transcode_folds_a_header_line_over_998_octets() -> None:
    value = " ".join(f"<{i}@refs.test>" for i in range(120))
    data = f"From: a@b.test\r\nReferences: {value}\r\n\r\nhi\r\n".encode()
    out = transcode.seven_bit(data)
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
    unfolded = re.sub(rb"\r\n(?=[ \t])", b"", out)
    assert unfolded == data
    assert transcode.needs_smtputf8("Subject: \u00e9\r\n\r\n".encode())
    assert not transcode.needs_smtputf8("Subject: e\r\n\r\n\u00e9".encode())


def test_attempt_log_shows_signing_in_queue_show_json(tmp_path: Path) -> None:
    # the CLI shows the attempt's DKIM line; nothing of a key is printed
    from relay.api.views import message_json
    from relay.store import MessageDetail
    from relay.types import Attempt, Message, Stream
    detail = MessageDetail(
        message=Message(id="m", created_at=0, mail_from="", size=1, source="smtp",
                        api_key_id=None, tags=(), metadata={}, stream=Stream.TRANSACTIONAL,
                        status="delivered"),
        recipients=(), attempts=(Attempt(id=1, recipient_id=1, message_id="m", started_at=0,
                                         duration=0, mx_host=None, ip=None, port=None,
                                         tls_version=None, tls_cipher=None, code=250,
                                         enhanced=None, text="ok", outcome="delivered",
                                         signed="signed: rsa-sha256 d=a.test s=r"),))
    assert json.loads(json.dumps(message_json(detail, full=True)))["attempts"][0]["dkim"] == (
        "signed: rsa-sha256 d=a.test s=r")


async def test_keyring_callers_wait_for_the_first_load_and_keys_are_limited_to_the_sender(
        tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "k.pem"
    path.write_bytes(dkim.private_pem(key))

    class SlowStore:
        async def return_paths(self) -> dict[str, str]:
            return {}

        async def signing_version(self) -> tuple[object, ...]:
            return ()

        async def signing_keys(self) -> list[DkimKeyInfo]:
            await asyncio.sleep(0.05)
            return [DkimKeyInfo(domain="example.test", selector="e1", algorithm="ed25519-sha256",
                                public_key="", path=str(path), state="active", created_at=1.0)]

    ring = KeyRing(SlowStore())  # type: ignore[arg-type]
    renderer = Renderer(DkimConfig(), ring)
    data = b"From: a@example.test\r\nTo: b@x.test\r\n\r\nhi\r\n"
    try:
        # concurrent jobs at start-up: none may sign with an empty ring
        results = await asyncio.gather(*(renderer.render_all(
            [Job(Outgoing(body=data, sign_domains=(), dkim=None))]) for _ in range(5)))
        assert all(r[0].signed.startswith("signed: ed25519-sha256 d=example.test s=e1")
                   for r in results), results
        (limited,) = await renderer.render_all(
            [Job(Outgoing(body=data, sign_domains=("other.test",), dkim=None))])
        assert isinstance(limited, Rendered) and limited.signed.startswith("unsigned: ")
    finally:
        await renderer.close()


async def test_unreadable_keys_defer_at_first_and_keep_the_loaded_ones_later(
        tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "k.pem"
    path.write_bytes(dkim.private_pem(key))
    now = [0.0]

    class FlakyStore:
        fail = True

        async def return_paths(self) -> dict[str, str]:
            return {}

        async def signing_version(self) -> tuple[object, ...]:
            if self.fail:
                raise StoreError("database is locked")
            return ()

        async def signing_keys(self) -> list[DkimKeyInfo]:
            if self.fail:
                raise StoreError("database is locked")
            return [DkimKeyInfo(domain="example.test", selector="e1", algorithm="ed25519-sha256",
                                public_key="", path=str(path), state="active", created_at=1.0)]

    store = FlakyStore()
    ring = KeyRing(store, refresh=30.0, clock=lambda: now[0])  # type: ignore[arg-type]
    with pytest.raises(TemporaryFailure):
        await ring.fresh()  # never loaded: the delivery is deferred, not sent unsigned
    store.fail = False
    await ring.fresh()
    assert [k.selector for k in ring.keys_for("example.test")] == ["e1"]
    store.fail, now[0] = True, 60.0
    await ring.fresh()  # stale and unreadable: the loaded keys stay
    assert [k.selector for k in ring.keys_for("example.test")] == ["e1"]


async def test_small_and_large_messages_render_in_order_and_sign(tmp_path: Path) -> None:
    """Small messages render in the loop's thread, large ones in the pool; the results come
    back in the jobs' order, each signed, and a failure stays with its own job."""
    key = ed25519.Ed25519PrivateKey.generate()
    from relay.delivery.render import INLINE_RENDER_MAX
    renderer = Renderer(DkimConfig(), KeyRing(key_store(  # type: ignore[arg-type]
        tmp_path, [("e1", key, "ed25519-sha256")])))
    head = b"From: a@example.test\r\nTo: b@x.test\r\nSubject: s\r\n\r\n"
    small = head + b"hi\r\n"
    large = head + b"0123456789abcdef" * (INLINE_RENDER_MAX // 16 + 1) + b"\r\n"
    given = GivenDkimKey(domain="example.test", selector="x", private_key="not a key")
    try:
        out = await renderer.render_all([
            Job(Outgoing(body=large, sign_domains=(), dkim=None)),
            Job(Outgoing(body=small, sign_domains=(), dkim=given)),
            Job(Outgoing(body=small, sign_domains=(), dkim=None))])
    finally:
        await renderer.close()
    assert isinstance(out[0], Rendered) and isinstance(out[2], Rendered)
    assert isinstance(out[1], Exception)  # the unreadable key given with that message
    assert len(out[0].data) > INLINE_RENDER_MAX  # the large one (its long line re-wrapped)
    assert out[0].signed.startswith("signed: ed25519-sha256") and \
        out[2].signed.startswith("signed: ed25519-sha256")
    assert len(out[0].data) > len(out[2].data)


async def test_a_domain_added_or_rotated_while_running_signs_within_a_second(
        tmp_path: Path) -> None:
    """The worker re-reads the keys every KEYRING_REFRESH (30 s), and also as soon as it sees
    (looking once a second) that a domain was added or a key activated: `relay domains add`
    then `send` signs from the first message a second later, not up to 30 s later."""
    from relay import domains as domain_ops
    from relay.store import SQLiteStore

    config = make_config(tmp_path)
    store = SQLiteStore(tmp_path / "relay.sqlite")
    await store.open()
    now = [100.0]
    ring = KeyRing(store, clock=lambda: now[0])
    try:
        await ring.fresh()  # the first message: no domain yet
        assert ring.keys_for("late.test") == []
        domain = domain_ops.make_domain(config, "late.test", time.time())
        await store.save_domain(domain)
        now[0] += 0.5
        await ring.fresh()  # looked less than a second ago
        assert ring.keys_for("late.test") == []
        now[0] += 1.0
        await ring.fresh()
        assert sorted(k.selector for k in ring.keys_for("late.test")) == sorted(
            k.selector for k in domain.keys)
        assert "late.test" in ring.return_paths

        rotated = domain_ops.start_rotation(config, domain, time.time())
        await store.save_domain(rotated, replace=True)  # published, not signing yet
        now[0] += 1.5
        await ring.fresh()
        assert sorted(k.selector for k in ring.keys_for("late.test")) == sorted(
            k.selector for k in domain.keys)
        active = domain_ops.activate_rotation(config, rotated, time.time())
        await store.save_domain(active, replace=True)
        now[0] += 1.5
        await ring.fresh()
        assert sorted(k.selector for k in ring.keys_for("late.test")) == sorted(
            k.selector for k in active.keys if k.state == "active")
        assert set(k.selector for k in active.keys if k.state == "active").isdisjoint(
            k.selector for k in domain.keys)
    finally:
        await store.close()


def key_store(tmp_path: Path, keys: list[tuple[str, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
                                                 str]]) -> object:
    """A store with only the keys of example.test (written to files, as `relay domains add`
    writes them), for a KeyRing."""
    infos = []
    for selector, key, algorithm in keys:
        path = tmp_path / f"{selector}.pem"
        path.write_bytes(dkim.private_pem(key))
        infos.append(DkimKeyInfo(domain="example.test", selector=selector, algorithm=algorithm,
                                 public_key="", path=str(path), state="active", created_at=1.0))

    class Store:
        async def return_paths(self) -> dict[str, str]:
            return {}

        async def signing_version(self) -> tuple[object, ...]:
            return ()

        async def signing_keys(self) -> list[DkimKeyInfo]:
            return infos

    return Store()
