"""RFC 3464 reports as the stdlib email parser (and so any MUA) reads them."""

from __future__ import annotations

import email
import email.policy

from relay.feedback.dsn import ReportedRecipient, build_dsn

ORIGINAL = (b"From: alice@example.com\r\nTo: bob@example.org\r\nSubject: hi\r\n"
            b"Message-ID: <orig@example.com>\r\n\r\nsecret body text\r\n")


def report(ret: str | None = None, **kw: object) -> bytes:
    recipients = kw.pop("recipients", [
        ReportedRecipient(address="bob@example.org", action="failed", status="5.1.1",
                          orcpt="rfc822;Bob@Example.org",
                          diagnostic="550 5.1.1 <bob@example.org>: no such user",
                          remote_mta="mx.example.org", last_attempt=1_800_000_000.0),
        ReportedRecipient(address="carol@example.org", action="failed", status="5.2.2",
                          diagnostic="552 5.2.2 mailbox full"),
    ])
    return build_dsn(reporting_mta="relay.test", original_sender="alice@example.com",
                     original=ORIGINAL, recipients=recipients,  # type: ignore[arg-type]
                     arrival=1_800_000_000.0, envid="env-1", ret=ret, **kw)  # type: ignore[arg-type]


def test_structure_and_fields() -> None:
    out = report()
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<orig@example.com>"
    text, status, headers = msg.get_payload()
    assert text.get_content_type() == "text/plain"
    assert "no such user" in text.get_content()
    per_message, bob, carol = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert per_message["Original-Envelope-Id"] == "env-1"
    assert bob["Final-Recipient"] == "rfc822; bob@example.org"
    assert bob["Original-Recipient"] == "rfc822;Bob@Example.org"
    assert (bob["Action"], bob["Status"]) == ("failed", "5.1.1")
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@example.org>: no such user"
    assert bob["Remote-MTA"] == "dns; mx.example.org"
    assert (carol["Status"], carol["Diagnostic-Code"]) == ("5.2.2", "smtp; 552 5.2.2 mailbox full")
    assert headers.get_content_type() == "text/rfc822-headers"


def test_headers_only_by_default_and_whole_message_with_ret_full() -> None:
    assert b"secret body text" not in report()
    assert b"Subject: hi" in report("HDRS")
    full = report("FULL")
    assert b"message/rfc822" in full and b"secret body text" in full


def test_crlf_everywhere_and_no_injection() -> None:
    evil = ReportedRecipient(address="x@example.org", action="failed", status="5.0.0",
                             diagnostic="550 no\r\nX-Injected: yes\nDiagnostic-Code: forged")
    out = report(recipients=[evil])
    assert out.count(b"\n") == out.count(b"\r\n")
    assert b"\r\nX-Injected" not in out and b"\nDiagnostic-Code: forged" not in out
    assert max(len(line) for line in out.split(b"\r\n")) <= 998


def test_delay_report_subject() -> None:
    out = report(recipients=[ReportedRecipient(address="x@example.org", action="delayed",
                                               status="4.4.1", will_retry_until=1.9e9)])
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert b"Will-Retry-Until:" in out
