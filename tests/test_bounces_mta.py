"""The parser on real MTAs' bounces whose cause we know because we made it happen
(tests/mta_dsns: Postfix, Exim, OpenSMTPD, Courier, sendmail, nullmailer, dma, chasquid,
Haraka, Dovecot's and Cyrus's LMTP, and filters in front of Postfix, each refusing or failing
on purpose; see its README): the recipient, its hard/soft class and its reason, against the
cause, not against another parser's reading. `python tests/test_bounces_mta.py` prints the shares and misses."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from relay.config import LimitsConfig
from relay.feedback import bounces

SET = Path(__file__).resolve().parent / "mta_dsns"
LIMITS = LimitsConfig()


def parse(raw: bytes) -> bounces.Report:
    return bounces.parse(raw, max_parts=LIMITS.max_report_parts,
                         max_recipients=LIMITS.max_report_recipients)


def _read(name: str, *edits: tuple[bytes, bytes]) -> bounces.BouncedRecipient:
    """The one recipient of a sample of the set, after replacing bytes (`edits`)."""
    raw = (SET / name).read_bytes()
    for old, new in edits:
        raw = raw.replace(old, new)
    (got,) = parse(raw).recipients
    return got


def _rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (SET / "labels.jsonl").read_text("utf-8").splitlines()]


def score() -> tuple[Counter[str], list[tuple[Any, ...]]]:
    counts: Counter[str] = Counter()
    misses = []
    for row in _rows():
        if row["condition"].startswith("N"):
            continue  # not a bounce (test_reports_that_are_no_bounce_are_not_read_as_one)
        report = parse((SET / row["file"]).read_bytes())
        got = [r for r in report.recipients if r.address.lower() == row["recipient"]]
        hard = bool(got) and got[0].bounce_class == "hard"
        counts["rows"] += 1
        counts["recipient"] += bool(got)
        counts["class"] += bool(got) and hard == row["hard"]
        counts["false hard"] += hard and not row["hard"]
        counts["reason"] += bool(got) and got[0].reason == row["reason"]
        if not got or hard != row["hard"] or got[0].reason != row["reason"]:
            misses.append((row["file"], row["condition"], row["reason"], row["hard"],
                           [(r.address, r.reason, r.bounce_class) for r in report.recipients]))
    return counts, misses


def test_real_mtas_bounces_read_for_their_cause() -> None:
    counts, misses = score()
    assert counts["rows"] == 164
    assert counts["recipient"] == counts["rows"], misses
    assert counts["false hard"] == 0, misses  # never a working address taken for a bad one
    # what the bounces allow: OpenSMTPD's one "550 Invalid recipient" for every refusal and
    # its "Envelope expired" for a full mailbox or a null MX say nothing of their cause
    assert counts["class"] / counts["rows"] >= 0.97, misses
    assert counts["reason"] / counts["rows"] >= 0.83, misses


@pytest.mark.parametrize("row", [r for r in _rows() if r["condition"].startswith("N")],
                         ids=lambda r: r["file"])
def test_reports_that_are_no_bounce_are_not_read_as_one(row: dict[str, Any]) -> None:
    """Real MTAs' delay warnings (N1) and success reports (N2: delivered, or relayed to a host
    without DSN), and real vacation auto-replies (N3: Pigeonhole's Sieve, Debian's vacation,
    maildrop's mailbot, Exim's), sent to the return path as they are: never a failure of the
    recipient, and each read as what it is."""
    report = parse((SET / row["file"]).read_bytes())
    assert not [r for r in report.recipients if r.action == "failed"], report
    assert not report.is_bounce
    if row["condition"] == "N1":
        assert [r.action for r in report.recipients] == ["delayed"], report
    elif row["condition"] == "N2":
        assert report.recipients and all(r.action in ("delivered", "relayed")
                                         for r in report.recipients), report
    else:  # maildrop's mailbot -M too, whose reply is a report saying "delivered"
        assert report.type == "autoreply", report


@pytest.mark.parametrize(("status", "code", "text", "stage", "expected"), [
    # Exim's sender callout: the sender's domain does not route, the recipient's address is
    # as good as before (it was hostunknown, hard)
    ("5.0.0", 550, "550-Verification failed for <ann@example.com>\n550-Unrouteable address\n"
     "550 Sender verification failed", "RCPT", ("rejected", "soft")),
    ("5.0.0", 550, "550-sender envelope address ann@example.com is locally blacklisted here.",
     "RCPT", ("rejected", "soft")),
    # the same reply as relay's own delivery reads it: Exim's lines joined, a line break
    # between any two words
    (None, 550, "sender envelope address bounces+x@relay.test is\nlocally blacklisted here. If"
     " you think this is wrong, get in touch with\npostmaster", "RCPT", ("rejected", "soft")),
    # a domain's MX (Exim) that has no such local part; a reporter's own look-up is the domain's
    ("5.0.0", 550, "550 Unrouteable address", "RCPT", ("userunknown", "hard")),
    ("5.0.0", None, "Unrouteable address", None, ("hostunknown", "hard")),
    ("5.0.0", 550, "550 header syntax", "DATA", ("contenterror", "soft")),
    # a limit on the header's size (sendmail, Courier): the header's, not the message's size
    ("5.6.0", 552, "552 5.6.0 Headers too large (4000 max) (reason: 552 5.6.0 Headers too "
     "large (4000 max)) ... while talking to mx.example.org.: <<< 554 5.0.0 Service "
     "unavailable", "DATA", ("contenterror", "soft")),
    ("5.0.0", 534, "534 Message header size exceeds policy limit.", "DATA",
     ("contenterror", "soft")),
    # sendmail's access map at MAIL FROM: the sender's address named is the sender refused;
    # no address named, the client; other words after the sender's address may be the
    # client's fault still
    ("5.7.1", 550, "550 5.7.1 <ann@example.com>... Access denied", "MAIL",
     ("rejected", "soft")),
    ("5.7.1", 550, "550 5.7.1 Access denied", "MAIL", ("blocked", "soft")),
    ("5.7.0", 550, "550 5.7.0 <ann@example.com>... Please use the smtp server of your ISP.",
     "MAIL", ("blocked", "soft")),
    # sendmail's DNSBL refusal names the client's address as listed
    ("5.7.1", 550, "550 5.7.1 Rejected: 192.0.2.7 listed at bl.example.net", "RCPT",
     ("blocked", "soft")),
    ("5.0.0", None, "lowest numbered MX record points to local host", None,
     ("systemerror", "soft")),
    # an explicit code the words say more than: X.1.6 of a user never there (OpenSMTPD),
    # X.5.1 "invalid command" for want of TLS or authentication (OpenSMTPD, Gmail)
    ("5.1.6", None, "Permanent failure in user lookup", None, ("userunknown", "hard")),
    ("5.5.1", 530, "530 5.5.1 Invalid command: Must issue a STARTTLS command first", "MAIL",
     ("securityerror", "soft")),
    ("5.5.1", 530, "530 5.5.1 Authentication Required.", "MAIL", ("securityerror", "soft")),
    # rspamd's refusal of the GTUBE test string in front of Postfix: spam, not the X.7.1
    # policy refusal its code alone would be
    ("5.7.1", 554, "554 5.7.1 Gtube pattern", "DATA", ("spamdetected", "soft")),
])
def test_readings_of_real_mtas_words(status: str, code: int | None, text: str,
                                     stage: str | None, expected: tuple[str, str]) -> None:
    assert bounces.classify(status, code, text, stage=stage) == expected


if __name__ == "__main__":
    found, missed = score()
    for miss in missed:
        print(*miss)
    n = found["rows"]
    print(f"rows {n}: recipient {found['recipient'] / n:.1%}, recipient+class "
          f"{found['class'] / n:.1%}, reason {found['reason'] / n:.1%}, "
          f"false hard {found['false hard']}")


def test_the_returned_messages_words_are_not_the_reports() -> None:
    """Exim's own bounce for a mail loop names the recipient and no cause; the message it
    returns (message/rfc822) says "unknown user" in its body. That is the sender's text, not
    why it failed: no reason from it, and never a hard bounce."""
    got = _read("exim/018.eml", (b"Some text to make the message a little longer than one "
                                 b"kilobyte.", b"Unknown user: this mailbox does not exist."))
    assert got.address == "c25-exim@c25.dest.test"
    assert "Unknown user" not in got.diagnostic
    assert (got.reason, got.bounce_class) == ("onhold", "soft")


@pytest.mark.parametrize("name", ["012.eml", "013.eml", "014.eml"])
def test_opensmtpds_expiry_in_a_delay_notices_words_is_a_failure(name: str) -> None:
    """OpenSMTPD 6.8 reports its own expiry as "delayed" (Action: delayed, 4.4.7, "Envelope
    expired", "only a temporary failure report"): the message was dropped, so the recipient
    failed (soft, expired), not a delay that changes nothing."""
    got = _read(f"opensmtpd/{name}")
    assert (got.action, got.reason, got.bounce_class) == ("failed", "expired", "soft")


@pytest.mark.parametrize(("name", "words"), [("nullmailer/010.eml", b"Connect failed"),
                                            ("courier/013.eml", b"Network is down"),
                                            ("chasquid/008.eml", b"connection refused)")])
def test_a_connection_never_made_then_given_up_is_an_expiry(name: str, words: bytes) -> None:
    """nullmailer ("Status: 5.0.0", "SMTP; Connect failed"), Courier ("Status: 5.0.0",
    "Network is down") and chasquid ("Status: 4.0.0", Go's "dial tcp 127.0.11.99:25: connect:
    connection refused", which read as a client refused: blocked) fail a message whose
    destination refused connections until their queue lifetime ran out: no code of the
    remote's, an undefined status, trouble that passes with waiting. The queue gave up:
    expired, soft. A network with no way there stays what it is,
    and so does a remote's reply."""
    got = _read(name)
    assert (got.action, got.reason, got.bounce_class) == ("failed", "expired", "soft")
    if name != "chasquid/008.eml":  # its words say it timed out: an expiry whatever the code
        no_way = _read(name, (b"Status: 5.0.0", b"Status: 5.4.6"))
        assert no_way.reason == "networkerror"
    replied = _read(name, (words, b"550 " + words))
    assert replied.reason != "expired"


def test_a_sieve_reject_is_the_recipients_filter_and_a_read_receipt_no_bounce() -> None:
    """Dovecot's Sieve `reject` answers with a disposition notification (RFC 8098, "deleted"
    by an automatic action, RFC 5429): the recipient's own filter refused the message,
    filtered, soft. The same notice saying "displayed" is a read receipt: no bounce."""
    got = _read("lmtp/006.eml")
    assert (got.action, got.reason, got.bounce_class) == ("failed", "filtered", "soft")
    assert got.remote_mta == "mx.dest.test"
    read = parse((SET / "lmtp/006.eml").read_bytes().replace(
        b"automatic-action/MDN-sent-automatically; deleted",
        b"manual-action/MDN-sent-manually; displayed"))
    assert read.type == "mdn" and not read.is_bounce
    assert [(r.address, r.action) for r in read.recipients] == [("c26-dovecot@dest.test",
                                                                 "displayed")]
    # deleted by its reader, dispatched or processed: it reached the mailbox; RFC 2298's
    # "denied" is a refusal, as an automatic "deleted" is
    for disposition, failed in (("manual-action/MDN-sent-manually; deleted", False),
                                ("automatic-action/MDN-sent-automatically; dispatched", False),
                                ("automatic-action/MDN-sent-automatically; processed", False),
                                ("manual-action/MDN-sent-manually; denied", True)):
        other = parse((SET / "lmtp/006.eml").read_bytes().replace(
            b"automatic-action/MDN-sent-automatically; deleted", disposition.encode()))
        assert other.is_bounce is failed, disposition
    # Dovecot's delivery agent refuses a message over the mailbox's quota with the same
    # notice: the words say why
    full = parse((SET / "lmtp/006.eml").read_bytes().replace(
        b"Not wanted here.", b"Quota exceeded (mailbox for user is full)"))
    assert [(r.reason, r.bounce_class) for r in full.recipients] == [("mailboxfull", "soft")]


@pytest.mark.parametrize(("name", "expected"), [
    # Haraka's own words for an address nothing accepted at RCPT TO
    ("haraka/001.eml", ("userunknown", "hard")),  # "550 I cannot deliver mail for <x>"
    ("haraka/002.eml", ("norelaying", "soft")),  # "550 You are not allowed to relay"
    ("haraka/005.eml", ("rejected", "soft")),  # "550 <x> That sender cannot send mail here"
    # "550 No MX for your FROM address": the sender's domain, not the recipient's (notaccept,
    # hard, before)
    ("haraka/006.eml", ("rejected", "soft")),
    # "554 NXDOMAIN [192.0.2.1] You are not allowed to connect": the client, whose address
    # has no name (hostunknown, hard, before)
    ("haraka/007.eml", ("blocked", "soft")),
    ("haraka/012.eml", ("notaccept", "hard")),  # "Status: 5.1.10": was the prose's below
    ("haraka/015.eml", ("blocked", "soft")),  # "550 HELO host name invalid"
    # "Status: 5.1.2 (550 Tried all MXs c15.test)", "Too many failures": its MX hosts exist
    # and refused connections until Haraka gave up (hostunknown, hard, before)
    ("haraka/017.eml", ("expired", "soft")),
])
def test_harakas_bounces(name: str, expected: tuple[str, str]) -> None:
    """Haraka 3.3.4 (A and B): its report's greeting, "This is the Haraka Mailer program",
    is no local mailer's failure (mailererror, soft, for seven of them before), and its
    refusals carry no enhanced status code, so their words decide."""
    got = _read(name)
    assert (got.reason, got.bounce_class) == expected


def test_a_delay_notice_that_is_one_stays_a_delay() -> None:
    raw = (b"From: MAILER-DAEMON@mx.example.net\r\nTo: ann@example.com\r\n"
           b"Subject: Delayed Mail (still being retried)\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
           b"--b\r\nContent-Type: text/plain\r\n\r\nDelivery to bob@example.org has been "
           b"delayed; it will be retried.\r\n\r\n--b\r\n"
           b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.net\r\n"
           b"\r\nFinal-Recipient: rfc822; bob@example.org\r\nAction: delayed\r\n"
           b"Status: 4.4.7\r\nWill-Retry-Until: Fri, 30 Jan 2026 21:28:58 -0800\r\n\r\n--b--\r\n")
    (got,) = parse(raw).recipients
    assert (got.action, got.bounce_class) == ("delayed", "soft")


@pytest.mark.parametrize(("code", "status", "text", "stage", "expected"), [
    # Postfix 3.7 as the MX, refusing relay's own delivery (its default words)
    (550, "5.1.1", "<ann@dest.test>: Recipient address rejected: User unknown in local "
     "recipient table", "RCPT", ("userunknown", "hard")),
    (554, "5.7.1", "<ann@elsewhere.test>: Relay access denied", "RCPT", ("norelaying", "soft")),
    (550, "5.1.6", "<ann@dest.test>: Recipient address rejected: User has moved to "
     "bob@elsewhere.test", "RCPT", ("hasmoved", "hard")),
    (554, "5.7.1", "<bounces+x@relay.test>: Sender address rejected: Access denied", "RCPT",
     ("rejected", "soft")),
    (554, "5.7.1", "<unknown[127.0.0.1]>: Client host rejected: Access denied", "RCPT",
     ("blocked", "soft")),
    (554, "5.7.1", "Service unavailable; Client host [127.0.0.1] blocked using bl.test", "RCPT",
     ("blocked", "soft")),
    (550, "5.7.1", "Client host rejected: cannot find your reverse hostname, [127.0.0.1]",
     "RCPT", ("requireptr", "soft")),
    # Exim 4.96 with Debian's ACLs as the MX: no enhanced status, lines as relay reads them
    (550, None, "relay not permitted", "RCPT", ("norelaying", "soft")),
    (550, None, "sender IP address 127.0.0.1 is locally blacklisted here. If you think this\n"
     "is wrong, get in touch with postmaster", "RCPT", ("blocked", "soft")),
    (550, None, "Verification failed for <bounces+x@relay.test>\nUnrouteable address\n"
     "Sender verification failed", "RCPT", ("rejected", "soft")),
    # OpenSMTPD 6.8: the same words for an unknown user and for every refusing rule
    (550, None, "Invalid recipient: <ann@dest.test>", "RCPT", ("userunknown", "hard")),
    # Haraka 3.3.4's refusals (its own words, no enhanced status), as relay's delivery meets
    # them at each command
    (550, None, "I cannot deliver mail for <ann@dest.test>", "RCPT", ("userunknown", "hard")),
    (550, None, "You are not allowed to relay", "RCPT", ("norelaying", "soft")),
    (550, None, "bounces+x@relay.test That sender cannot send mail here", "MAIL",
     ("rejected", "soft")),
    (550, None, "No MX for your FROM address", "MAIL", ("rejected", "soft")),
    (554, None, "NXDOMAIN [127.0.0.1] You are not allowed to connect", "CONN",
     ("blocked", "soft")),
    (550, None, "HELO host name invalid", "RCPT", ("blocked", "soft")),
])
def test_real_mtas_replies_to_relays_own_delivery(code: int, status: str | None, text: str,
                                                  stage: str, expected: tuple[str, str]) -> None:
    """What relay's own delivery met when it sent to real Postfix, Exim and OpenSMTPD MXs
    refusing on purpose (relay's outcomes read a refusal with this same call)."""
    assert bounces.classify(status, code, text, stage=stage) == expected


def test_the_mailbox_hosts_own_words_are_believed() -> None:
    """A report from a host of the recipient's own domain that names no remote speaks of its
    own mailboxes: Courier's local delivery ("unknown; 550 User <c2-courier> unknown") is an
    unknown user, hard, as a local delivery agent's words are, and Exim's own "Unrouteable
    address" for its own domain is the local part's, not the domain's."""
    courier = _read("courier/001.eml")
    assert (courier.reason, courier.bounce_class) == ("userunknown", "hard")
    exim = _read("exim/003.eml")
    assert (exim.reason, exim.bounce_class) == ("userunknown", "hard")
    # the same words from a host of another domain are a quoted reply: a filter's, as likely
    elsewhere = _read("courier/001.eml", (b"mx.dest.test", b"mx.relay.example"),
                      (b"@dest.test>", b"@relay.example>"))
    assert (elsewhere.reason, elsewhere.bounce_class) == ("filtered", "soft")
