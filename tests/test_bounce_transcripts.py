"""Reading a report's words for each recipient: a report whose MIME structure broke still has
its transcript read, a local delivery agent's "unknown user" is the mailbox host's own, a
host's line above the next recipient is that recipient's, not the one before; and a
complaint in Outlook.com's own (not ARF) format is one."""

from __future__ import annotations

from relay.config import LimitsConfig
from relay.feedback import bounces

LIMITS = LimitsConfig()


def parse(raw: bytes) -> bounces.Report:
    return bounces.parse(raw, max_parts=LIMITS.max_report_parts,
                         max_recipients=LIMITS.max_report_recipients)


def _by_address(report: bounces.Report) -> dict[str, bounces.BouncedRecipient]:
    return {r.address: r for r in report.recipients}


TRANSCRIPT = """\
The original message was received at Mon, 30 Nov 2026 10:00:00 +0000
from app.sender.test [192.0.2.10]

   ----- The following addresses had permanent fatal errors -----
<ann@example.org>

   ----- Transcript of session follows -----
mail.local: unknown user: ann
554 <ann@example.org>... Service unavailable
"""

FIELDS = """\
Reporting-MTA: dns; mx.example.org
Arrival-Date: Mon, 30 Nov 2026 10:00:00 +0000

Final-Recipient: RFC822; <ann@example.org>
Action: failed
Status: 5.5.0
Last-Attempt-Date: Mon, 30 Nov 2026 10:00:01 +0000
"""


def _report(transcript: str = TRANSCRIPT, *, broken: bool = False) -> bytes:
    """A Sendmail report about ann, the transcript its only words of why (no Diagnostic-Code).
    `broken`: the header names boundary "A" while the parts are divided by "B", and the
    text part has no Content-Type."""
    return f"""\
From: Mail Delivery Subsystem <MAILER-DAEMON@mx.example.org>
To: <bounces@sender.test>
Subject: Returned mail: Service unavailable
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="{"A" if broken else "B"}"

--B
{"" if broken else "Content-Type: text/plain"}

{transcript}
--B
Content-Type: message/delivery-status

{FIELDS}
--B--
""".encode()


def test_a_broken_reports_transcript_says_why_when_its_fields_do_not() -> None:
    # the delivery-status fields are read from the text, and so must the transcript be
    ann = _by_address(parse(_report(broken=True)))["ann@example.org"]
    assert "unknown user" in ann.diagnostic
    assert (ann.reason, ann.bounce_class) == ("userunknown", "hard")


def test_a_local_delivery_agents_unknown_user_is_the_mailboxs_own_word() -> None:
    # Sendmail's own "554 <ann@...>... Service unavailable" line carries a reply code, but
    # the words before it are mail.local's, on the host that keeps the mailbox: no filter
    ann = _by_address(parse(_report()))["ann@example.org"]
    assert (ann.reason, ann.bounce_class) == ("userunknown", "hard")


def test_a_quoted_unknown_user_without_a_local_agent_stays_a_filters() -> None:
    # the same report, the words a gateway's: a reply quoted with no stage is as likely a
    # filter's, so the rule above is the local agent's, not any "unknown user"
    gateway = TRANSCRIPT.replace("mail.local: unknown user: ann", "gateway said: unknown user")
    ann = _by_address(parse(_report(gateway)))["ann@example.org"]
    assert ann.bounce_class == "soft"


def test_a_hosts_line_above_the_next_recipient_is_that_recipients() -> None:
    # Sendmail V5: "550 example.net (smtp)... 550 Host unknown" is the refusal of the host
    # of bob's domain, printed above bob's own line; ann's connection was reset
    raw = b"""\
From: Mail Delivery Subsystem <MAILER-DAEMON@mx.sender.test>
To: <app@sender.test>
Subject: Returned mail: Host unknown

   ----- Transcript of session follows -----
While talking to example.org:
>>> DATA
421 example.org (smtp)... Deferred: Connection reset by peer during result wait
554 <ann@example.org>... Remote protocol error: Connection reset by peer during result wait
550 example.net (smtp)... 550 Host unknown
554 <bob@example.net>... 550 Host unknown (Authoritative answer from name server)
While talking to mx.example.com:
>>> RCPT To:<cat@example.com>
<<< 550 Requested User Mailbox not found. No such user here.
550 <cat@example.com>... User unknown

   ----- Unsent message follows -----
From: app@sender.test
To: ann@example.org
Subject: hello

hello
"""
    got = _by_address(parse(raw))
    assert "Host unknown" not in got["ann@example.org"].diagnostic
    assert got["ann@example.org"].bounce_class == "soft"
    assert (got["bob@example.net"].reason, got["bob@example.net"].bounce_class) == \
        ("hostunknown", "hard")
    # the "While talking to mx.example.com:" line above cat's goes with cat, not bob
    assert "mx.example.com" not in got["bob@example.net"].diagnostic
    assert (got["cat@example.com"].reason, got["cat@example.com"].bounce_class) == \
        ("userunknown", "hard")


def test_an_outlook_jmrp_report_is_a_complaint_about_its_recipient() -> None:
    raw = b"""\
From: <staff@hotmail.com>
To: abuse-report@sender.test
Subject: complaint about message from 192.0.2.1
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="J"

--J
Content-Type: message/rfc822
Content-Disposition: inline

X-HmXmrOriginalRecipient: ann@example.org
X-Reporter-IP: 192.0.2.22
Return-Path: <bounces+tok@sender.test>
From: App <app@sender.test>
To: ann@example.org
Subject: hello
Message-ID: <m1@sender.test>

hello

--J--
"""
    report = parse(raw)
    assert (report.type, report.feedback_type) == ("arf", "abuse")
    assert [r.address for r in report.recipients] == ["ann@example.org"]
    assert report.original.return_path == "bounces+tok@sender.test"
