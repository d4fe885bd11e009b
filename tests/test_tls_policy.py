"""TLS policy end to end: MTA-STS (a policy served by a local HTTPS server), DANE (TLSA
records on the project's DNS server, with and without the AD bit), per-domain levels from
[[delivery.tls_policy]], each failure on the attempt, in metrics and in TLS-RPT's counts."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from relay import metrics
from relay.config import DeliveryConfig, DnsConfig
from relay.config.outbound import TlsPolicyConfig
from relay.delivery.outbound import Target, TlsPolicy
from relay.delivery.pools import Source
from relay.delivery.sessions import SessionPool, TargetFailure
from relay.service import Service
from relay.store import MessageDetail

from .apiutil import Api, api_client
from .conftest import free_port, make_config, store_rows
from .dnsserver import DNSServer
from .policyhost import PolicyHost
from .sink import Sink

FAST = dict(retry_min=30.0, retry_max=60.0, connect_timeout=2.0, command_timeout=5.0,
            session_idle=0.5, process=False)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(tmp_path: Path, ca: trustme.CA) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_tls(ca: trustme.CA, *names: str) -> tuple[ssl.SSLContext, bytes]:
    """A server context with a certificate for `names`, and that certificate (DER)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf = ca.issue_cert(*names)
    leaf.configure_cert(ctx)
    return ctx, ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


@pytest.fixture
async def policy_host(ca: trustme.CA) -> AsyncIterator[PolicyHost]:
    host = PolicyHost()
    await host.start(server_tls(ca, "mta-sts.sts.test")[0])
    yield host
    await host.stop()


async def start(tmp_path: Path, dns: DNSServer, sink: Sink, **delivery: Any
                ) -> tuple[Service, Api]:
    config = make_config(tmp_path, delivery=DeliveryConfig(mx_port=sink.port,
                                                           **{**FAST, **delivery}),
                         dns=DnsConfig(nameservers=(dns.nameserver,), timeout=1.0))
    svc = Service(config)
    await svc.start()
    return svc, await api_client(svc)


async def send_and_wait(svc: Service, api: Api, to: str, *wanted: str) -> MessageDetail:
    status, body, _ = await api.call("POST", "/v1/emails", {
        "from": "alice@sender.test", "to": [to], "subject": "hi", "text": "hello"})
    assert status == 202, body

    async def poll() -> MessageDetail:
        while True:
            detail = await svc.store.get_message(body["id"])
            if detail and detail.recipients[0].status.value in wanted and detail.attempts:
                return detail
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(poll(), 20)


def mx(dns: DNSServer, domain: str, host: str, *, secure: bool = False) -> None:
    dns.add(domain, "MX", f"10 {host}.", secure=secure)
    dns.add(host, "A", "127.0.0.1", secure=secure)


def sts(dns: DNSServer, host: PolicyHost, mode: str, *mx_names: str) -> None:
    dns.add("_mta-sts.sts.test", "TXT", '"v=STSv1; id=20261205"')
    dns.add("mta-sts.sts.test", "A", "127.0.0.1")
    host.body = (f"version: STSv1\r\nmode: {mode}\r\n"
                 + "".join(f"mx: {m}\r\n" for m in mx_names) + "max_age: 86400\r\n")


def tls_failures() -> dict[tuple[str, str], float]:
    return {(s[1]["policy"], s[1]["result"]): s[2] for f in metrics.snapshot() for s in f[3]
            if s[0] == "relay_tls_failures_total"}


# -- MTA-STS ---------------------------------------------------------------------------------


async def test_mta_sts_enforce_sends_over_verified_tls(tmp_path: Path, dns: DNSServer,
                                                      ca: trustme.CA, ca_file: str,
                                                      policy_host: PolicyHost) -> None:
    mx(dns, "sts.test", "mx.sts.test")
    sts(dns, policy_host, "enforce", "mx.sts.test")
    async with Sink(tls=server_tls(ca, "mx.sts.test")[0]) as sink:
        svc, api = await start(tmp_path, dns, sink, tls_ca_file=ca_file,
                               mta_sts_port=policy_host.port)
        try:
            detail = await send_and_wait(svc, api, "bob@sts.test", "delivered")
            (attempt,) = detail.attempts
            assert attempt.tls_policy == "verify (mta-sts)" and attempt.tls_version
            assert attempt.tls_failure is None
            assert sink.messages[0].tls
        finally:
            await api.close()
            await svc.stop()
        rows = await _results(svc)
        assert ("sts.test", "sts", "mx.sts.test", "", 1) in rows


async def test_mta_sts_enforce_refuses_a_certificate_for_another_name(
        tmp_path: Path, dns: DNSServer, ca: trustme.CA, ca_file: str,
        policy_host: PolicyHost) -> None:
    mx(dns, "sts.test", "mx.sts.test")
    sts(dns, policy_host, "enforce", "mx.sts.test")
    before = tls_failures().get(("mta-sts", "certificate-host-mismatch"), 0)
    async with Sink(tls=server_tls(ca, "elsewhere.test")[0]) as sink:
        svc, api = await start(tmp_path, dns, sink, tls_ca_file=ca_file,
                               mta_sts_port=policy_host.port)
        try:
            detail = await send_and_wait(svc, api, "bob@sts.test", "deferred")
            attempt = detail.attempts[0]
            assert attempt.tls_failure == "certificate-host-mismatch"
            assert attempt.tls_policy == "verify (mta-sts)" and attempt.enhanced == "4.7.5"
            assert sink.messages == []
            assert tls_failures()[("mta-sts", "certificate-host-mismatch")] == before + 1
        finally:
            await api.close()
            await svc.stop()
        rows = await _results(svc)
        assert ("sts.test", "sts", "mx.sts.test", "certificate-host-mismatch", 1) in rows


async def test_mta_sts_enforce_skips_an_mx_its_policy_does_not_name(
        tmp_path: Path, dns: DNSServer, ca: trustme.CA, ca_file: str,
        policy_host: PolicyHost) -> None:
    mx(dns, "sts.test", "mx.attacker.test")
    sts(dns, policy_host, "enforce", "*.sts.test")
    async with Sink(tls=server_tls(ca, "mx.attacker.test")[0]) as sink:
        svc, api = await start(tmp_path, dns, sink, tls_ca_file=ca_file,
                               mta_sts_port=policy_host.port)
        try:
            detail = await send_and_wait(svc, api, "bob@sts.test", "deferred")
            assert "MTA-STS policy" in (detail.recipients[0].last_reply or "")
            assert sink.connections == 0
        finally:
            await api.close()
            await svc.stop()


async def test_mta_sts_testing_reports_and_still_sends(tmp_path: Path, dns: DNSServer,
                                                       ca: trustme.CA, ca_file: str,
                                                       policy_host: PolicyHost) -> None:
    mx(dns, "sts.test", "mx.sts.test")
    sts(dns, policy_host, "testing", "mx.sts.test")
    async with Sink(tls=server_tls(ca, "elsewhere.test")[0]) as sink:
        svc, api = await start(tmp_path, dns, sink, tls_ca_file=ca_file,
                               mta_sts_port=policy_host.port)
        try:
            detail = await send_and_wait(svc, api, "bob@sts.test", "delivered")
            (attempt,) = detail.attempts
            assert attempt.tls_policy == "verify (mta-sts testing)"
            assert attempt.tls_failure == "certificate-host-mismatch"
            assert sink.messages[0].tls  # sent encrypted, unverified
        finally:
            await api.close()
            await svc.stop()


async def test_a_policy_that_cannot_be_had_is_reported_and_mail_goes_as_may(
        tmp_path: Path, dns: DNSServer, ca: trustme.CA, ca_file: str,
        policy_host: PolicyHost) -> None:
    mx(dns, "sts.test", "mx.sts.test")
    sts(dns, policy_host, "enforce", "mx.sts.test")
    policy_host.body = "this is no policy\r\n"
    async with Sink(tls=server_tls(ca, "elsewhere.test")[0]) as sink:
        svc, api = await start(tmp_path, dns, sink, tls_ca_file=ca_file,
                               mta_sts_port=policy_host.port)
        try:
            detail = await send_and_wait(svc, api, "bob@sts.test", "delivered")
            assert detail.attempts[0].tls_policy == "may"
        finally:
            await api.close()
            await svc.stop()
        rows = await _results(svc)
        assert ("sts.test", "sts", "", "sts-policy-invalid", 1) in rows


# -- DANE ------------------------------------------------------------------------------------


def tlsa_311(cert_der: bytes) -> str:
    spki = x509.load_der_x509_certificate(cert_der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "3 1 1 " + hashlib.sha256(spki).hexdigest()


async def test_dane_delivers_when_the_certificate_matches_a_tlsa_record(
        tmp_path: Path, dns: DNSServer) -> None:
    ctx, der = server_tls(trustme.CA(), "mx.dane.test")  # a CA nobody trusts: DANE-EE
    mx(dns, "dane.test", "mx.dane.test", secure=True)
    async with Sink(tls=ctx) as sink:
        dns.add(f"_{sink.port}._tcp.mx.dane.test", "TLSA", tlsa_311(der), secure=True)
        svc, api = await start(tmp_path, dns, sink, dane=True)
        try:
            detail = await send_and_wait(svc, api, "bob@dane.test", "delivered")
            (attempt,) = detail.attempts
            assert attempt.tls_policy == "dane (dane)" and attempt.tls_failure is None
        finally:
            await api.close()
            await svc.stop()
        rows = await _results(svc)
        assert ("dane.test", "tlsa", "mx.dane.test", "", 1) in rows


async def test_dane_refuses_a_certificate_no_tlsa_record_matches(tmp_path: Path,
                                                                 dns: DNSServer) -> None:
    ctx, _ = server_tls(trustme.CA(), "mx.dane.test")
    _, other = server_tls(trustme.CA(), "mx.dane.test")
    mx(dns, "dane.test", "mx.dane.test", secure=True)
    async with Sink(tls=ctx) as sink:
        dns.add(f"_{sink.port}._tcp.mx.dane.test", "TLSA", tlsa_311(other), secure=True)
        svc, api = await start(tmp_path, dns, sink, dane=True)
        try:
            detail = await send_and_wait(svc, api, "bob@dane.test", "deferred")
            attempt = detail.attempts[0]
            assert attempt.tls_failure == "tlsa-invalid" and attempt.tls_policy == "dane (dane)"
            assert sink.messages == []
        finally:
            await api.close()
            await svc.stop()


async def test_tlsa_records_without_the_ad_bit_are_not_believed(tmp_path: Path,
                                                                dns: DNSServer) -> None:
    ctx, _ = server_tls(trustme.CA(), "mx.dane.test")
    _, other = server_tls(trustme.CA(), "mx.dane.test")
    mx(dns, "dane.test", "mx.dane.test")  # not validated: DANE does not apply
    async with Sink(tls=ctx) as sink:
        dns.add(f"_{sink.port}._tcp.mx.dane.test", "TLSA", tlsa_311(other))
        svc, api = await start(tmp_path, dns, sink, dane=True)
        try:
            detail = await send_and_wait(svc, api, "bob@dane.test", "delivered")
            assert detail.attempts[0].tls_policy == "may"
        finally:
            await api.close()
            await svc.stop()


# -- per-domain levels ------------------------------------------------------------------------


async def test_a_domain_set_to_verify_waits_for_a_server_without_starttls(
        tmp_path: Path, dns: DNSServer) -> None:
    mx(dns, "strict.test", "mx.strict.test")
    async with Sink() as sink:  # no TLS offered
        svc, api = await start(tmp_path, dns, sink, tls_policy=(
            TlsPolicyConfig(domain=".strict.test", level="verify"),
            TlsPolicyConfig(domain="strict.test", level="encrypt")))
        try:
            detail = await send_and_wait(svc, api, "bob@strict.test", "deferred")
            attempt = detail.attempts[0]
            assert attempt.tls_failure == "starttls-not-supported"
            assert attempt.tls_policy == "encrypt" and attempt.enhanced == "4.7.10"
            assert sink.messages == []
        finally:
            await api.close()
            await svc.stop()


async def test_a_domain_set_to_none_goes_in_plain_text(tmp_path: Path, dns: DNSServer,
                                                       ca: trustme.CA) -> None:
    mx(dns, "plain.test", "mx.plain.test")
    async with Sink(tls=server_tls(ca, "mx.plain.test")[0]) as sink:
        svc, api = await start(tmp_path, dns, sink, tls_policy=(
            TlsPolicyConfig(domain="plain.test", level="none"),))
        try:
            detail = await send_and_wait(svc, api, "bob@plain.test", "delivered")
            assert detail.attempts[0].tls_version is None and not sink.messages[0].tls
        finally:
            await api.close()
            await svc.stop()


async def _results(svc: Service) -> list[tuple[Any, ...]]:
    """TLS-RPT's counts, as the stopped service flushed them."""
    await svc.store.open()
    try:
        rows = await store_rows(svc, "SELECT policy_domain, policy_type, mx_host, result_type,"
                                     " sessions FROM tls_results")
    finally:
        await svc.store.close()
    return [tuple(r) for r in rows]


async def test_a_host_that_cannot_be_reached_is_no_tls_result() -> None:
    """TLS-RPT counts sessions that got to TLS: a refused connection is neither a success
    nor a TLS failure of the policy."""
    heard: list[Any] = []
    pool = SessionPool(hostname="relay.test", delivery=DeliveryConfig(connect_timeout=2.0),
                       smarthost=False, tls_observer=lambda *a: heard.append(a))
    target = Target(hostname="mx.sts.test", address="127.0.0.1", port=free_port(),
                    tls=TlsPolicy(level="verify", source="mta-sts", policy_domain="sts.test",
                                  policy_type="sts"))
    with pytest.raises(TargetFailure):
        await pool.session(target, Source(address=None, helo="relay.test"))
    assert heard == []
