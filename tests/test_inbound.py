"""What comes back: relay delivers with its VERP return path, then bounces, complaints and
mailto: unsubscribes sent to an inbound listener find the exact recipient (issue 7)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import smtplib
import time
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from relay import keys
from relay.config import BouncesConfig, DeliveryConfig, DnsConfig, LimitsConfig, ListenerConfig
from relay.service import Service
from relay.store.base import MessageDetail

from .apiutil import SIMPLE, api_client
from .conftest import free_port, make_config, store_rows
from .dnsserver import DNSServer
from .sink import Received, Sink
from .smtputil import in_thread
from .test_bounces import many_part_dsn
from .test_delivery import FAST, route, submit, wait_final

COMPLAINTS = "fbl@relay.test"


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    async with Sink() as s:
        yield s


@pytest.fixture
async def relay(tmp_path: Path, dns: DNSServer, sink: Sink) -> AsyncIterator[Service]:
    """relay with a submission and an inbound listener, delivering example.org and
    sender.test (where the DSNs relay writes to SMTP senders go) to the sink."""
    route(dns, "example.org", (10, "mx.example.org", "127.0.0.1"))
    route(dns, "sender.test", (10, "mx.sender.test", "127.0.0.1"))
    config = make_config(
        tmp_path, ListenerConfig(port=free_port()),
        ListenerConfig(port=free_port(), mode="inbound", tls="none"),
        delivery=DeliveryConfig(mx_port=sink.port, **FAST),
        dns=DnsConfig(nameservers=(dns.nameserver,), timeout=1.0),
        bounces=BouncesConfig(complaint_addresses=(COMPLAINTS,)))
    svc = Service(config)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


def inbound_port(svc: Service) -> int:
    return svc.bound[1][1]


async def send_report(svc: Service, rcpt: str, data: bytes, *,
                      sender: str = "") -> tuple[int, bytes]:
    """A report as a remote MTA sends it: null sender, no AUTH, no TLS. (code, text)."""
    def go() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", inbound_port(svc), timeout=10) as s:
            s.ehlo("mx.example.org")
            code, text = s.mail(sender)
            assert code == 250, text
            code, text = s.rcpt(rcpt)
            if code != 250:
                return code, text
            return s.data(data)
    return await in_thread(go)


async def delivered_via_api(svc: Service, sink: Sink, **fields: Any) -> tuple[str, Received]:
    api = await api_client(svc)
    try:
        status, sent, _ = await api.call("POST", "/v1/emails", {**SIMPLE, **fields})
        assert status == 202, sent
    finally:
        await api.close()
    await wait_final(svc, sent["id"])
    await sink.wait_for(lambda s: bool(s.messages))
    return sent["id"], sink.messages[-1]


def dsn(original: bytes, rcpt: str, *, action: str = "failed", status: str = "5.1.1",
        diagnostic: str = "smtp; 550 5.1.1 <bob@example.org>: Recipient address rejected: "
                          "User unknown in virtual mailbox table") -> bytes:
    """An RFC 3464 report as Postfix writes it, the returned message's headers enclosed."""
    msg = EmailMessage()
    msg["From"] = "MAILER-DAEMON@mx.example.org (Mail Delivery System)"
    msg["To"] = "whoever@relay.test"
    msg["Subject"] = "Undelivered Mail Returned to Sender"
    msg.set_content("I'm sorry to have to inform you that your message could not\n"
                    "be delivered to one or more recipients.\n")
    msg.make_mixed()
    report = EmailMessage()
    report.set_content("x")
    fields = (f"Reporting-MTA: dns; mx.example.org\n\n"
              f"Final-Recipient: rfc822; {rcpt}\nOriginal-Recipient: rfc822;{rcpt}\n"
              f"Action: {action}\nStatus: {status}\nRemote-MTA: dns; store.example.org\n"
              f"Diagnostic-Code: {diagnostic}\n")
    raw = msg.as_bytes(policy=email.policy.SMTP)
    boundary = "=_report_boundary"
    head, _, _ = raw.partition(b"\r\n\r\n")
    head = b"\r\n".join(h for h in head.split(b"\r\n")
                        if not h.lower().startswith((b"content-type", b"mime-version"))
                        and not h.startswith((b" ", b"\t")))
    headers_part = original.split(b"\r\n\r\n", 1)[0]
    body = (
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\n"
        f"Your message could not be delivered.\r\n"
        f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"{fields.replace(chr(10), chr(13) + chr(10))}\r\n"
        f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n").encode() + \
        headers_part + f"\r\n\r\n--{boundary}--\r\n".encode()
    return head + (f"\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; "
                   f"report-type=delivery-status; boundary=\"{boundary}\"\r\n\r\n"
                   ).encode() + body


def arf(original: bytes, *, return_path: str | None) -> bytes:
    """An RFC 5965 complaint that hides its recipient (as most feedback loops do), the
    original enclosed with the Return-Path the receiving MTA wrote."""
    enclosed = (f"Return-Path: <{return_path}>\r\n".encode() if return_path else b"") + \
        original
    enclosed = enclosed.replace(b"bob@example.org", b"redacted@example.org")
    b = "=_arf"
    return (f"From: fbl@isp.example\r\nTo: {COMPLAINTS}\r\nSubject: complaint\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: multipart/report; "
            f"report-type=feedback-report; boundary=\"{b}\"\r\n\r\n"
            f"--{b}\r\nContent-Type: text/plain\r\n\r\nThis is an abuse report.\r\n"
            f"--{b}\r\nContent-Type: message/feedback-report\r\n\r\n"
            f"Feedback-Type: abuse\r\nUser-Agent: isp-fbl/1.0\r\nVersion: 1\r\n\r\n"
            f"--{b}\r\nContent-Type: message/rfc822\r\n\r\n").encode() + enclosed + \
        f"\r\n--{b}--\r\n".encode()


def mdn(original: bytes, rcpt: str, disposition: str, words: str) -> bytes:
    """An RFC 8098 disposition notification as Dovecot's Sieve writes one, the returned
    message's headers enclosed."""
    b = "=_mdn"
    headers = original.split(b"\r\n\r\n", 1)[0]
    return (f"From: Postmaster <postmaster@example.org>\r\nTo: whoever@relay.test\r\n"
            f"Subject: about your message\r\nMIME-Version: 1.0\r\nContent-Type: "
            f"multipart/report; report-type=disposition-notification; boundary=\"{b}\"\r\n\r\n"
            f"--{b}\r\nContent-Type: text/plain\r\n\r\n{words}\r\n"
            f"--{b}\r\nContent-Type: message/disposition-notification\r\n\r\n"
            f"Reporting-UA: mx.example.org; Dovecot Mail Delivery Agent\r\n"
            f"Final-Recipient: rfc822; {rcpt}\r\nDisposition: {disposition}\r\n\r\n"
            f"--{b}\r\nContent-Type: text/rfc822-headers\r\n\r\n").encode() + headers + \
        f"\r\n\r\n--{b}--\r\n".encode()


def events(detail: MessageDetail, kind: str) -> list[dict[str, Any]]:
    return [e.data for e in detail.events if e.type == kind]


async def suppressions(svc: Service) -> dict[str, str]:
    return {s.address: s.reason for s in await svc.store.list_suppressions()}


async def reported(relay: Service, sink: Sink, **report: Any) -> MessageDetail:
    """A message delivered to bob, then a report about bob (dsn's fields: `report`) sent
    to its return path and taken; the message as the store has it after."""
    message_id, got = await delivered_via_api(relay, sink)
    code, text = await send_report(relay, got.mail_from,
                                   dsn(got.data, "bob@example.org", **report))
    assert code == 250, text
    detail = await relay.store.get_message(message_id)
    assert detail is not None
    return detail


async def test_delivered_mail_carries_a_verp_return_path_and_a_feedback_id(
        relay: Service, sink: Sink) -> None:
    message_id, got = await delivered_via_api(relay, sink)
    local, _, host = got.mail_from.partition("@")
    assert local.startswith("bounces+") and len(local) <= 64, got.mail_from
    assert host == "relay.test"  # no record of example.com: [bounces] domain, then hostname
    detail = await relay.store.get_message(message_id)
    assert detail is not None
    assert local[len("bounces+"):] == local[len("bounces+"):].lower()
    parsed = email.message_from_bytes(got.data)
    assert parsed["Feedback-ID"].startswith(f"{message_id}.")


async def test_a_late_dsn_bounces_the_right_recipient_with_class_event_and_suppression(
        relay: Service, sink: Sink) -> None:
    message_id, got = await delivered_via_api(relay, sink,
                                              to=["bob@example.org", "carol@example.org"])
    await sink.wait_for(lambda s: len(s.messages) == 2)
    to_bob = next(m for m in sink.messages if m.rcpt_tos == ["bob@example.org"])
    to_carol = next(m for m in sink.messages if m.rcpt_tos == ["carol@example.org"])
    assert to_bob.mail_from != to_carol.mail_from  # one return path per recipient
    # some MTAs fold the case of the local part: the token still reads
    code, text = await send_report(relay, to_bob.mail_from.upper(),
                                   dsn(to_bob.data, "bob@example.org"))
    assert code == 250, text
    detail = await relay.store.get_message(message_id)
    assert detail is not None
    status = {r.address: r.status.value for r in detail.recipients}
    assert status == {"bob@example.org": "bounced", "carol@example.org": "delivered"}
    (bounced,) = events(detail, "email.bounced")
    assert bounced["email"] == "bob@example.org"
    assert (bounced["class"], bounced["reason"], bounced["status"]) == \
        ("hard", "userunknown", "5.1.1")
    assert "User unknown" in bounced["diagnostic"]
    assert bounced["remoteMta"] == "store.example.org"
    assert (await suppressions(relay)).get("bob@example.org") == "hard_bounce"
    last = [a for a in detail.attempts if a.outcome == "bounced"]
    assert last and last[-1].enhanced == "5.1.1" and last[-1].mx_host == "store.example.org"
    # the same report again: nothing new
    code, _ = await send_report(relay, to_bob.mail_from, dsn(to_bob.data, "bob@example.org"))
    assert code == 250
    again = await relay.store.get_message(message_id)
    assert again is not None and len(events(again, "email.bounced")) == 1


async def test_a_soft_bounce_is_an_event_without_a_suppression(
        relay: Service, sink: Sink) -> None:
    detail = await reported(relay, sink, status="5.2.2",
                            diagnostic="smtp; 552 5.2.2 <bob@example.org>: mailbox full")
    assert detail.recipients[0].status.value == "bounced"
    (bounced,) = events(detail, "email.bounced")
    assert (bounced["class"], bounced["reason"]) == ("soft", "mailboxfull")
    assert "bob@example.org" not in await suppressions(relay)


async def test_a_late_bounce_is_stored_as_the_report_said_it(relay: Service, sink: Sink) -> None:
    """No reply code made up where the report quoted none, and a remote's expiry keeps its
    4.4.7 (it was stored as "550 5.0.0")."""
    detail = await reported(relay, sink, status="4.4.7", diagnostic=(
        "X-Postfix; connect to mx.example.org[192.0.2.7]:25: Connection timed out"))
    (r,) = detail.recipients
    assert r.status.value == "bounced"
    (attempt,) = [a for a in detail.attempts if a.outcome == "bounced"]
    assert (attempt.code, attempt.enhanced) == (None, "4.4.7")
    assert r.last_reply == ("4.4.7 connect to mx.example.org[192.0.2.7]:25: Connection timed "
                            "out")
    (bounced,) = events(detail, "email.bounced")
    assert (bounced["class"], bounced["reason"], bounced["status"]) == ("soft", "expired", "4.4.7")


async def test_a_failure_report_that_names_nobody_bounces_the_recipient_its_token_names(
        relay: Service, sink: Sink) -> None:
    """A report cut short names no address and returns no message: the return path's token
    says whose it is, a soft bounce (never a suppression: the address is not named)."""
    message_id, got = await delivered_via_api(relay, sink)
    report = (b"From: Mail Delivery Subsystem <MAILER-DAEMON@mx.example.org>\n"
              b"Subject: Returned mail: see transcript for details\n"
              b"Auto-Submitted: auto-generated (failure)\n\n<<< No Message Collected >>>\n")
    code, text = await send_report(relay, got.mail_from, report)
    assert code == 250, text
    detail = await relay.store.get_message(message_id)
    assert detail is not None and detail.recipients[0].status.value == "bounced"
    (bounced,) = events(detail, "email.bounced")
    assert (bounced["email"], bounced["class"]) == ("bob@example.org", "soft")
    assert "bob@example.org" not in await suppressions(relay)


async def test_delayed_is_an_event_and_changes_no_status(relay: Service, sink: Sink) -> None:
    detail = await reported(relay, sink, action="delayed", status="4.4.7",
                            diagnostic="smtp; 451 4.4.7 still trying")
    assert detail.recipients[0].status.value == "delivered"
    assert [e["status"] for e in events(detail, "email.delayed")] == ["4.4.7"]
    assert not events(detail, "email.bounced")


async def test_a_read_receipt_is_no_bounce_and_a_sieve_reject_is(
        relay: Service, sink: Sink) -> None:
    """A disposition notification sent to the return path: "displayed" (a read receipt)
    says the message reached the mailbox, and is recorded, no bounce; a Sieve `reject`
    (automatic-action, "deleted", RFC 5429) is the recipient's own filter refusing it: a soft
    bounce, reason filtered, no suppression. Both read as failed bounces before."""
    message_id, got = await delivered_via_api(relay, sink)

    async def notified(disposition: str, words: str) -> MessageDetail:
        code, text = await send_report(relay, got.mail_from,
                                       mdn(got.data, "bob@example.org", disposition, words))
        assert code == 250, text
        detail = await relay.store.get_message(message_id)
        assert detail is not None
        return detail

    detail = await notified("manual-action/MDN-sent-manually; displayed",
                            "Your message to bob@example.org was displayed on the recipient's "
                            "computer.")
    assert detail.recipients[0].status.value == "delivered"
    assert not events(detail, "email.bounced")
    rows = await store_rows(relay, "SELECT type, outcome FROM inbound_reports")
    assert rows == [("mdn", "recorded")]

    detail = await notified("automatic-action/MDN-sent-automatically; deleted",
                            "Your message to <bob@example.org> was automatically rejected:"
                            "\r\nNot wanted here.")
    assert detail.recipients[0].status.value == "bounced"
    (bounced,) = events(detail, "email.bounced")
    assert (bounced["class"], bounced["reason"]) == ("soft", "filtered")
    assert "Not wanted here." in bounced["diagnostic"]
    assert "bob@example.org" not in await suppressions(relay)


async def test_a_forged_token_is_accepted_and_discarded(relay: Service, sink: Sink) -> None:
    message_id, got = await delivered_via_api(relay, sink)
    local, _, host = got.mail_from.partition("@")
    token = local[len("bounces+"):]
    forged = f"bounces+{token[:-2]}{'aa' if token[-2:] != 'aa' else 'bb'}@{host}"
    code, text = await send_report(relay, forged, dsn(got.data, "bob@example.org"))
    assert code == 250, text
    detail = await relay.store.get_message(message_id)
    assert detail is not None and detail.recipients[0].status.value == "delivered"
    assert not events(detail, "email.bounced")
    assert not await suppressions(relay)
    rows = await store_rows(relay, "SELECT envelope_to, outcome FROM inbound_reports")
    assert rows == [(forged, "unmatched")]


async def test_other_recipients_are_refused_with_5_7_1(relay: Service) -> None:
    for rcpt in ("postmaster@relay.test", "bob@example.org", "bounces+abc@elsewhere.example"):
        code, text = await send_report(relay, rcpt, b"Subject: x\r\n\r\nx\r\n")
        assert code == 550 and text.startswith(b"5.7.1"), (rcpt, code, text)


async def test_an_arf_complaint_is_matched_through_the_enclosed_return_path(
        relay: Service, sink: Sink) -> None:
    message_id, got = await delivered_via_api(relay, sink)
    code, text = await send_report(relay, COMPLAINTS, arf(got.data, return_path=got.mail_from),
                                   sender="fbl@isp.example")
    assert code == 250, text
    detail = await relay.store.get_message(message_id)
    assert detail is not None
    assert [e["feedbackType"] for e in events(detail, "email.complained")] == ["abuse"]
    assert (await suppressions(relay)).get("bob@example.org") == "complaint"


async def test_an_arf_complaint_without_return_path_is_matched_by_feedback_id(
        relay: Service, sink: Sink) -> None:
    message_id, got = await delivered_via_api(relay, sink)
    code, _ = await send_report(relay, COMPLAINTS, arf(got.data, return_path=None))
    assert code == 250
    detail = await relay.store.get_message(message_id)
    assert detail is not None and len(events(detail, "email.complained")) == 1
    assert (await suppressions(relay)).get("bob@example.org") == "complaint"


async def test_an_outlook_jmrp_complaint_which_is_not_arf_is_a_complaint(
        relay: Service, sink: Sink) -> None:
    """Outlook.com's Junk Mail Reporting Program: the reported message enclosed whole in a
    multipart/mixed, its recipient in X-HmXmrOriginalRecipient, no feedback-report part."""
    message_id, got = await delivered_via_api(relay, sink)
    enclosed = (b"X-HmXmrOriginalRecipient: bob@example.org\r\n"
                + f"Return-Path: <{got.mail_from}>\r\n".encode() + got.data)
    report = (f"From: <staff@hotmail.com>\r\nTo: {COMPLAINTS}\r\n"
              "Subject: complaint about message from 192.0.2.1\r\nMIME-Version: 1.0\r\n"
              'Content-Type: multipart/mixed; boundary="=_jmrp"\r\n\r\n--=_jmrp\r\n'
              "Content-Type: message/rfc822\r\nContent-Disposition: inline\r\n\r\n"
              ).encode() + enclosed + b"\r\n--=_jmrp--\r\n"
    code, text = await send_report(relay, COMPLAINTS, report, sender="staff@hotmail.com")
    assert code == 250, text
    detail = await relay.store.get_message(message_id)
    assert detail is not None
    assert [e["feedbackType"] for e in events(detail, "email.complained")] == ["abuse"]
    assert (await suppressions(relay)).get("bob@example.org") == "complaint"


async def test_mail_to_the_unsubscribe_mailto_address_unsubscribes(
        relay: Service, sink: Sink, dns: DNSServer) -> None:
    from .conftest import add_signing_domain
    await add_signing_domain(relay, "example.com")
    message_id, got = await delivered_via_api(relay, sink, stream="broadcast")
    header = email.message_from_bytes(got.data)["List-Unsubscribe"]
    mailto = header.split("<mailto:")[1].split(">")[0]
    assert mailto.endswith("@bounces.example.com")  # example.com's own return-path host
    assert got.mail_from.endswith("@bounces.example.com")
    code, _ = await send_report(relay, mailto, b"Subject: unsubscribe\r\n\r\n\r\n",
                                sender="bob@example.org")
    assert code == 250
    detail = await relay.store.get_message(message_id)
    assert detail is not None and len(events(detail, "email.unsubscribed")) == 1


async def test_a_late_bounce_of_smtp_mail_sends_its_sender_a_dsn(
        relay: Service, sink: Sink) -> None:
    _, secret = await keys.create_key(relay.store, name="t", scopes=["emails:send"])
    message_id = await in_thread(submit, relay.bound[0][1], secret, ["bob@example.org"])
    await wait_final(relay, message_id)
    await sink.wait_for(lambda s: bool(s.delivered_to("bob@example.org")))
    got = sink.delivered_to("bob@example.org")[0]
    assert got.mail_from.startswith("bounces+")  # not alice@sender.test: relay's own
    code, _ = await send_report(relay, got.mail_from, dsn(got.data, "bob@example.org"))
    assert code == 250
    await sink.wait_for(lambda s: bool(s.delivered_to("alice@sender.test")))
    report = sink.delivered_to("alice@sender.test")[0]
    assert report.mail_from in ("", "<>")  # the null sender (the sink is aiosmtpd too)
    text = report.data.decode("utf-8", "replace")
    assert "Action: failed" in text and "Status: 5.1.1" in text, text


async def test_the_message_detail_says_when_bounces_cannot_be_tracked(
        relay: Service) -> None:
    from relay.types import EnvelopeRecipient, Submission
    result = await relay.submitter.submit(Submission(
        mail_from="own@example.com", keep_mail_from=True,
        recipients=(EnvelopeRecipient(address="bob@example.org"),),
        data=b"From: own@example.com\r\nTo: bob@example.org\r\nSubject: x\r\n\r\nx\r\n",
        source="api"))
    detail = await relay.store.get_message(result.message_id)
    assert detail is not None and detail.message.return_path == "kept"
    from relay.api.views import message_json
    assert "cannot track" in message_json(detail)["returnPath"]["note"]
    await asyncio.sleep(0)


# -- a report too big to read whole (issue 17) -------------------------------------------


@pytest.fixture
async def small_limits_relay(tmp_path: Path, dns: DNSServer, sink: Sink
                             ) -> AsyncIterator[Service]:
    """relay as `relay` makes it, reading at most 4 parts and 5 recipients of a report."""
    route(dns, "example.org", (10, "mx.example.org", "127.0.0.1"))
    config = make_config(
        tmp_path, ListenerConfig(port=free_port()),
        ListenerConfig(port=free_port(), mode="inbound", tls="none"),
        delivery=DeliveryConfig(mx_port=sink.port, **FAST),
        dns=DnsConfig(nameservers=(dns.nameserver,), timeout=1.0),
        limits=LimitsConfig(max_report_parts=4, max_report_recipients=5))
    svc = Service(config)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


async def test_a_dsn_of_8000_parts_over_smtp_is_read_up_to_the_configured_limits(
        small_limits_relay: Service, sink: Sink) -> None:
    relay = small_limits_relay
    message_id, got = await delivered_via_api(relay, sink)
    raw = many_part_dsn(8000).replace(b"user0@example.org", b"bob@example.org")
    started = time.process_time()  # relay's threads included: it runs in this process
    code, text = await send_report(relay, got.mail_from, raw)
    spent = time.process_time() - started
    assert code == 250, text
    assert spent < 3.0, f"{spent:.1f} s of CPU for a 1.1 MB report"  # it took ~20 s
    ((summary,),) = await store_rows(relay, "SELECT summary FROM inbound_reports")
    # 3 delivery-status parts after the text part: 3 recipients, not 8000 (nor the 20 kept)
    assert len(json.loads(summary)["parsed"]["recipients"]) == 3
    detail = await relay.store.get_message(message_id)
    assert detail is not None and detail.recipients[0].status.value == "bounced"
