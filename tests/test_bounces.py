"""bounces.py: DSNs, ARF complaints, auto-replies and non-standard bounces, read into
recipients with a reason and a hard/soft class; and `relay bounces parse`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from relay.config import LimitsConfig
from relay.feedback import bounces
from relay.feedback.bounce_stage import smtp_stage

from .conftest import run_relay

LIMITS = LimitsConfig()


def parse(raw: bytes) -> bounces.Report:
    return bounces.parse(raw, max_parts=LIMITS.max_report_parts,
                         max_recipients=LIMITS.max_report_recipients)

DSN = b"""\
From: Mail Delivery System <MAILER-DAEMON@mx.sender.test>
To: bounces+abc@sender.test
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

I'm sorry to have to inform you that your message could not be delivered.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sender.test

Final-Recipient: rfc822; Gone@Example.ORG
Original-Recipient: rfc822; gone@example.org
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.example.org
Diagnostic-Code: smtp; 550 5.1.1 <gone@example.org>: Recipient address rejected:
 User unknown in local recipient table

Final-Recipient: rfc822; full@example.org
Action: failed
Status: 5.2.2
Remote-MTA: dns; mx.example.org
Diagnostic-Code: smtp; 552 5.2.2 Mailbox full

Final-Recipient: rfc822; slow@example.net
Action: delayed
Status: 4.4.1
Diagnostic-Code: smtp; 421 4.4.1 Connection timed out

--B
Content-Type: message/rfc822

Return-Path: <bounces+abc@sender.test>
Message-ID: <m1@sender.test>
Feedback-ID: c1:relay
From: app@sender.test
To: gone@example.org
Subject: hello

hi
--B--
"""


def test_rfc3464_dsn_per_recipient() -> None:
    report = parse(DSN)
    assert report.type == "dsn" and report.is_bounce
    gone, full, slow = report.recipients
    assert (gone.address, gone.action, gone.status, gone.reason, gone.bounce_class,
            gone.remote_mta, gone.reply_code) == (
        "Gone@example.org", "failed", "5.1.1", "userunknown", "hard", "mx.example.org", 550)
    assert "User unknown in local recipient table" in gone.diagnostic  # folded line kept
    assert (full.reason, full.bounce_class, full.status) == ("mailboxfull", "soft", "5.2.2")
    # still retrying after no answer (X.4.1): the queue's delay
    assert (slow.action, slow.reason, slow.bounce_class) == ("delayed", "expired", "soft")
    assert report.original.return_path == "bounces+abc@sender.test"
    assert report.original.message_id == "<m1@sender.test>"
    assert report.original.feedback_id == "c1:relay"
    assert ("Subject", "hello") in report.original.headers


def test_a_dsn_only_delayed_is_not_a_bounce() -> None:
    delayed = DSN.replace(b"Action: failed", b"Action: delayed")
    report = parse(delayed)
    assert report.type == "dsn" and not report.is_bounce
    assert {r.bounce_class for r in report.recipients} == {"soft"}


@pytest.mark.parametrize(("field", "action"), [
    (b"Action: failure", "failed"), (b"Action: error", "failed"), (b"Action: Failed;", "failed"),
    (b"Action: failed (bad destination mailbox address)", "failed"),
    (b"Action: delay", "delayed"), (b"Action: warning", "delayed")])
def test_an_action_a_reporter_words_its_own_way_is_read_as_rfc_3464s(field: bytes,
                                                                     action: str) -> None:
    # PMDF and others write "Action: failure" / "Action: error" for a failed recipient
    report = parse(DSN.replace(b"Action: failed", field, 1))
    gone = report.recipients[0]
    assert (gone.action, gone.reason) == (action, "userunknown")
    assert gone.bounce_class == ("hard" if action == "failed" else "soft")


ARF = b"""\
From: feedback@isp.test
To: fbl@sender.test
Subject: complaint
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="F"

--F
Content-Type: text/plain

This is an email abuse report.

--F
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: isp-fbl/1.0
Version: 1
Original-Rcpt-To: <Reader@Mail.ISP.test>
Reporting-MTA: dns; fbl.isp.test

--F
Content-Type: text/rfc822-headers

Return-Path: <bounces+tok@sender.test>
Message-ID: <m2@sender.test>
From: app@sender.test
To: reader@mail.isp.test
Subject: offer
--F--
"""


def test_arf_complaint() -> None:
    report = parse(ARF)
    assert (report.type, report.feedback_type, report.is_bounce) == ("arf", "abuse", False)
    (who,) = report.recipients
    assert (who.address, who.reason, who.action) == ("Reader@mail.isp.test", "feedback", "")
    assert report.original.return_path == "bounces+tok@sender.test"
    assert report.original.message_id == "<m2@sender.test>"


def test_arf_that_hides_the_recipient_takes_the_enclosed_to_or_none() -> None:
    no_rcpt = ARF.replace(b"Original-Rcpt-To: <Reader@Mail.ISP.test>\n", b"")
    assert [r.address for r in parse(no_rcpt).recipients] == ["reader@mail.isp.test"]
    hidden = no_rcpt.replace(b"To: reader@mail.isp.test", b"To: Undisclosed recipients:;")
    assert [r.address for r in parse(hidden).recipients] == [""]


def test_arf_whose_mime_boundary_was_lost_is_read_from_its_inline_fields() -> None:
    # the boundary parameter on a line of its own, not folded: the parts are one text, in
    # which the report's fields still name the recipient
    broken = ARF.replace(b'report-type=feedback-report; boundary="F"',
                         b'report-type=feedback-report;\nboundary="F"')
    assert broken != ARF
    report = parse(broken)
    assert (report.type, report.feedback_type) == ("arf", "abuse")
    assert [r.address for r in report.recipients] == ["Reader@mail.isp.test"]


def test_an_auto_submitted_message_from_the_null_address_is_a_mail_systems_not_a_reply(
        ) -> None:
    # auto-replies come from the mailbox they answer for (RFC 3834); "<>" is a mail system
    raw = (b"Return-Path: <>\nFrom: <>\nTo: bounces+abc@sender.test\n"
           b"In-Reply-To: <m1@sender.test>\nAuto-Submitted: auto-replied\n\n"
           b"You sent mail to ann@example.org. That's not a valid user here.\n")
    report = parse(raw)
    assert report.type == "dsn" and report.is_bounce
    # words of no known reporter's own look-up, with no code or command: a filter's as much
    # as the address's (test_bounce_rules)
    assert [(r.address, r.reason) for r in report.recipients] == [
        ("ann@example.org", "filtered")]


def test_apple_mails_unsubscribe_is_an_opt_out_of_its_sender_not_an_auto_reply() -> None:
    raw = (b"From: reader@icloud.example\nTo: unsubscribe+tok@sender.test\n"
           b"Subject: unsubscribe\nAuto-Submitted: auto-replied\nX-Apple-Unsubscribe: true\n"
           b"\nApple Mail sent this email to unsubscribe from the message \"Offers\".\n")
    report = parse(raw)
    assert (report.type, report.feedback_type, report.is_bounce) == ("arf", "opt-out", False)
    assert [(r.address, r.reason) for r in report.recipients] == [
        ("reader@icloud.example", "feedback")]
    # without Apple's field the same message is an auto-reply
    assert parse(raw.replace(b"X-Apple-Unsubscribe: true\n", b"")).type == "autoreply"


@pytest.mark.parametrize("header", [b"Auto-Submitted: auto-replied",
                                    b"X-Autoreply: yes", b"Precedence: auto_reply",
                                    b"Subject: Out of Office: hello"])
def test_auto_replies_are_never_bounces(header: bytes) -> None:
    subject = b"" if header.startswith(b"Subject") else b"Subject: Re: hello\n"
    raw = (b"From: Kim <kim@example.org>\nTo: app@sender.test\n" + subject
           + header + b"\n\nI am away until Monday; your mail about user unknown "
           b"mailbox full 550 5.1.1 will be read then.\n")
    report = parse(raw)
    assert report.type == "autoreply" and not report.is_bounce
    assert [(r.address, r.reason) for r in report.recipients] == [
        ("kim@example.org", "vacation")]


QMAIL = b"""\
From: MAILER-DAEMON@mail.sender.test
To: bounces+x@sender.test
Subject: failure notice

Hi. This is the qmail-send program at mail.sender.test.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<nobody@example.com>:
192.0.2.1 does not like recipient.
Remote host said: 550 5.1.1 <nobody@example.com>: No such user here
Giving up on 192.0.2.1.

<quota@example.net>:
192.0.2.2 failed after I sent the message.
Remote host said: 552 5.2.2 Mailbox quota exceeded

--- Below this line is a copy of the message.

Return-Path: <bounces+x@sender.test>
To: nobody@example.com
Subject: hello
"""

EXIM = b"""\
From: Mail Delivery System <Mailer-Daemon@mx.sender.test>
To: bounces+y@sender.test
Subject: Mail delivery failed: returning message to sender
Auto-Submitted: auto-replied

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  blocked@example.org
    host mx.example.org [192.0.2.9]
    SMTP error from remote mail server after RCPT TO:<blocked@example.org>:
    554 5.7.1 Service unavailable; Client host [203.0.113.5] blocked using zen.spamhaus.org

------ This is a copy of the message, including all the headers. ------

Subject: hello
"""


def test_qmail_bounce_per_recipient() -> None:
    report = parse(QMAIL)
    assert report.type == "dsn" and report.is_bounce
    got = {r.address: (r.status, r.reason, r.bounce_class) for r in report.recipients}
    assert got == {"nobody@example.com": ("5.1.1", "userunknown", "hard"),
                   "quota@example.net": ("5.2.2", "mailboxfull", "soft")}
    # the quoted original, for matching where the return path was not relay's own
    assert report.original.return_path == "bounces+x@sender.test"
    assert ("Subject", "hello") in report.original.headers


def test_exim_bounce_with_auto_submitted_is_a_bounce_and_a_block_is_soft() -> None:
    report = parse(EXIM)
    assert report.type == "dsn" and report.is_bounce
    (r,) = report.recipients
    assert (r.address, r.status, r.reason, r.bounce_class) == (
        "blocked@example.org", "5.7.1", "blocked", "soft")
    assert "spamhaus" in r.diagnostic and r.remote_mta == "mx.example.org"


@pytest.mark.parametrize(("status", "code", "text", "expected"), [
    ("5.1.1", 550, "User unknown", ("userunknown", "hard")),
    ("5.1.2", 550, "Host unknown", ("hostunknown", "hard")),
    ("5.1.6", 551, "User has moved", ("hasmoved", "hard")),
    ("5.1.10", 550, "Recipient address has null MX", ("notaccept", "hard")),
    ("5.2.2", 552, "Mailbox full", ("mailboxfull", "soft")),
    ("5.7.1", 550, "Message rejected as spam", ("spamdetected", "soft")),
    ("5.7.1", 554, "Client host blocked using zen.spamhaus.org", ("blocked", "soft")),
    ("5.7.26", 550, "Unauthenticated email is not accepted, DMARC policy", ("authfailure",
                                                                         "soft")),
    ("5.7.25", 550, "The sending IP has no PTR record", ("requireptr", "soft")),
    ("5.3.4", 552, "Message too big", ("mesgtoobig", "soft")),
    ("4.4.7", None, "Delivery time expired", ("expired", "soft")),
    # a remote's reply quoted without its command: "no such user" alone is not believed
    ("5.0.0", 550, "No such user here", ("filtered", "soft")),
    # the reporting host's own words (no reply quoted): it keeps the mailbox, it knows
    ("5.0.0", None, "No such user here", ("userunknown", "hard")),
    (None, 550, "Relaying denied", ("norelaying", "soft")),
    (None, None, "", ("undefined", "soft")),
    ("2.0.0", 250, "OK", ("delivered", "soft")),
    # RFC 3463 X.5.3's own words: one message's recipients, not a sending rate
    ("5.0.0", 552, "552 Too many recipients", ("toomanyconn", "soft")),
    # a submission-only server refusing a client that did not authenticate
    (None, 550, "550 Unauthenticated senders not allowed", ("securityerror", "soft")),
    # the reporter gave up, but the remote named a lasting condition: that is the reason
    ("5.0.0", None, "mailbox is full: retry timeout exceeded", ("mailboxfull", "soft")),
    ("4.7.0", 421, "421 4.7.0 Messages from 192.0.2.9 deferred due to user complaints; "
     "I'm not going to try again; this message has been in the queue too long.",
     ("badreputation", "soft")),
    ("4.4.1", None, "Connection timed out: retry timeout exceeded", ("expired", "soft")),
    (None, None, "DNS lookup failure: host mx.example.org not found", ("hostunknown", "hard")),
])
def test_classify(status: str | None, code: int | None, text: str,
                  expected: tuple[str, str]) -> None:
    assert bounces.classify(status, code, text) == expected
    assert expected[0] in bounces.REASONS


@pytest.mark.parametrize(("status", "code", "text", "stage", "expected"), [
    # after RCPT TO was taken, "unknown" is a filter's word unless the code names the address
    ("5.0.0", 550, "Unknown user", "DATA", ("filtered", "soft")),
    ("5.7.1", 550, "User unknown", "DATA", ("filtered", "soft")),
    ("5.7.1", 554, "Message rejected as spam", "DATA", ("spamdetected", "soft")),
    ("5.1.1", 550, "User unknown", "DATA", ("userunknown", "hard")),
    ("5.0.0", 550, "Unknown user", "RCPT", ("userunknown", "hard")),
    ("5.1.1", 550, "No such user", "RCPT", ("userunknown", "hard")),
    ("5.0.0", 550, "Unknown user", None, ("filtered", "soft")),
    ("5.0.0", None, "Unknown user", None, ("userunknown", "hard")),
    # a temporary reply is never hard, at any stage
    ("4.1.1", 450, "User unknown", "RCPT", ("userunknown", "soft")),
    ("4.2.2", 452, "Mailbox full", "DATA", ("mailboxfull", "soft")),
    # before RCPT TO, a refusal is of the sender or of the client, not of the mailbox
    ("5.1.1", 550, "User unknown", "MAIL", ("rejected", "soft")),
    ("5.0.0", 554, "No such user here", "CONN", ("blocked", "soft")),
    ("5.0.0", 554, "Service unavailable", "CONN", ("blocked", "soft")),
    # for now, too: a 421 at the greeting refuses this client, soft
    ("4.3.0", 421, "Service unavailable", "CONN", ("blocked", "soft")),
    ("4.3.0", 421, "Too many connections from your host", "CONN", ("toomanyconn", "soft")),
    # ... unless the whole domain takes no mail
    ("5.0.0", 554, "No SMTP service here", "CONN", ("notaccept", "hard")),
    # X.2.x says the mailbox exists: its "unknown" is believed only in reply to RCPT TO
    ("5.2.1", 550, "User unknown", None, ("filtered", "soft")),
    ("5.2.1", 550, "User unknown", "RCPT", ("userunknown", "hard")),
    # X.7.x says policy refused it: the same
    ("5.7.1", 550, "550 User Unknown", None, ("filtered", "soft")),
    ("5.7.1", 550, "550 User Unknown", "RCPT", ("userunknown", "hard")),
    # Exchange Online's directory-based edge blocking: no such recipient, not a block
    ("5.4.1", 550, "550 5.4.1 Recipient address rejected: Access denied. AS(201806281)",
     "RCPT", ("userunknown", "hard")),
    ("5.7.1", 550, "550 5.7.1 Client host 192.0.2.9: Access denied", "RCPT",
     ("blocked", "soft")),
])
def test_classify_by_stage(status: str, code: int | None, text: str, stage: str | None,
                           expected: tuple[str, str]) -> None:
    assert bounces.classify(status, code, text, stage=stage) == expected


def _postfix(diagnostic: str, said: str, status: str) -> bytes:
    """A Postfix DSN: its boilerplate, then the remote's words and what they answered."""
    return f"""\
From: MAILER-DAEMON@mx.sender.test (Mail Delivery System)
To: bounces+p@sender.test
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="P"

--P
Content-Type: text/plain

This is the mail system at host mx.sender.test.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

For further assistance, please send mail to postmaster.

If you do so, please include this problem report. You can
delete your own text from the attached returned message.

                   The mail system

<anna@example.org>: host mx.example.org[192.0.2.7] said: {diagnostic}
    ({said})

--P
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sender.test

Final-Recipient: rfc822; anna@example.org
Action: failed
Status: {status}
Remote-MTA: dns; mx.example.org
Diagnostic-Code: smtp; {diagnostic}

--P--
""".encode()


@pytest.mark.parametrize(("diagnostic", "said", "status", "expected"), [
    ("550 5.7.1 Unknown user; message refused", "in reply to end of DATA command", "5.7.1",
     ("filtered", "soft")),
    ("550 Unknown user anna@example.org", "in reply to end of DATA command", "5.0.0",
     ("filtered", "soft")),
    ("550 5.1.1 Unknown user anna@example.org", "in reply to end of DATA command", "5.1.1",
     ("userunknown", "hard")),
    ("550 Unknown user anna@example.org", "in reply to RCPT TO command", "5.0.0",
     ("userunknown", "hard")),
    ("553 5.1.8 Sender address rejected: Domain not found", "in reply to MAIL FROM command",
     "5.1.8", ("rejected", "soft")),
])
def test_a_postfix_report_is_read_by_the_stage_its_remote_refused_at(
        diagnostic: str, said: str, status: str, expected: tuple[str, str]) -> None:
    # the stage is only in the text for people, after Postfix's boilerplate
    (r,) = parse(_postfix(diagnostic, said, status)).recipients
    assert (r.address, r.reason, r.bounce_class) == ("anna@example.org", *expected)


def _plain_bounce(body: str, headers: str = "") -> bytes:
    return (b"From: Mail Delivery Subsystem <MAILER-DAEMON@mx.sender.test>\n"
            b"To: bounces+q@sender.test\nSubject: Returned mail: see transcript for details\n"
            + headers.encode() + b"\n" + body.encode())


def test_a_failure_report_that_names_nobody_is_a_failure_of_the_unnamed_recipient() -> None:
    """No address, no returned message (a report cut short, or one that keeps its recipient
    to itself): one failed recipient without an address, whom the return path's token names;
    its words still say why, never for good (the failed address may be a forward's). A delay
    or success notice in the same shape is none."""
    report = parse(_plain_bounce("Your message could not be delivered.\n"
                                 "Reason: 552 Mailbox full\n"))
    assert report.is_bounce
    assert [(r.address, r.action, r.reason, r.bounce_class) for r in report.recipients] == [
        ("", "failed", "mailboxfull", "soft")]
    unknown = parse(_plain_bounce("Reason: 550 5.1.1 User unknown\n"))
    assert [(r.reason, r.bounce_class) for r in unknown.recipients] == [("userunknown", "soft")]
    cut = parse(_plain_bounce("<<< No Message Collected >>>\n"))
    assert [(r.address, r.action, r.bounce_class) for r in cut.recipients] == [
        ("", "failed", "soft")]
    for notice in ("Your message has been delayed. No action is required.\n",
                   "THIS IS A WARNING MESSAGE ONLY.\nYour message could not be delivered "
                   "for 4 hours.\n", "Your message was successfully delivered.\n",
                   "Delivery to these recipients or groups is complete, but no delivery "
                   "notification was sent by the destination server.\n",
                   "Your message was read on Monday, 7 December 2026.\n"):
        assert not parse(_plain_bounce(notice)).is_bounce, notice
    # a delay's words do not unsay a failure for good
    given_up = parse(_plain_bounce("Your message was delayed for 5 days. This is a permanent "
                                   "error; I've given up.\n"))
    assert [(r.address, r.action) for r in given_up.recipients] == [("", "failed")]
    # a read receipt some mail programs send to the return path, from the null sender
    receipt = (b"From: Ann <ann@example.org>\nTo: bounces+q@sender.test\nReturn-Path: <>\n"
               b"Subject: Read: Your invoice\n\nThis receipt verifies that the message has "
               b"been displayed on the recipient's computer.\n")
    assert not parse(receipt).is_bounce


def test_a_transcript_says_the_refusal_came_after_data() -> None:
    raw = _plain_bounce("""\
   ----- The following addresses had permanent fatal errors -----
<bert@example.org>
    (reason: 550 5.0.0 <bert@example.org>... User unknown)

   ----- Transcript of session follows -----
... while talking to mx.example.org.:
>>> MAIL From:<bounces+q@sender.test>
<<< 250 2.1.0 Sender ok
>>> RCPT To:<bert@example.org>
<<< 250 2.1.5 Recipient ok
>>> DATA
<<< 550 5.0.0 <bert@example.org>... User unknown
""")
    (r,) = parse(raw).recipients
    assert (r.address, r.reason, r.bounce_class) == ("bert@example.org", "filtered", "soft")


def test_a_pipelined_rcpt_refusal_read_after_data_is_of_the_rcpt() -> None:
    # with PIPELINING the RCPT reply comes after DATA was sent; DATA's own reply follows it
    raw = _plain_bounce("""\
   ----- Transcript of session follows -----
... while talking to mx.example.org.:
>>> DATA
<<< 550 5.5.0 Invalid recipient
550 5.1.1 <bert@example.org>... User unknown
<<< 554 5.5.1 Error: no valid recipients
>>> RSET
<<< 250 2.0.0 Ok
""")
    report = parse(raw)
    (r,) = report.recipients
    assert (r.address, r.reason, r.bounce_class) == ("bert@example.org", "userunknown", "hard")


def test_an_appliance_naming_the_smtp_command_data() -> None:
    raw = _plain_bounce("""\
The message could not be sent to the following address.
carl@example.org

-------server message
550 carl@example.org... No such user

-------SMTP command
DATA

-------original mail info
Message-ID: <1234.5678@mx.sender.test>
Subject: hello
""")
    (r,) = parse(raw).recipients
    assert (r.address, r.reason, r.bounce_class) == ("carl@example.org", "filtered", "soft")


def test_exim_after_rcpt_to_is_hard_and_its_own_words_are_not_the_remotes() -> None:
    raw = _plain_bounce("""\
This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  dora@example.org
    host mx.example.org [192.0.2.9]
    SMTP error from remote mail server after RCPT TO:<dora@example.org>:
    550 5.1.1 <dora@example.org>: Recipient address rejected: User unknown

  emil@example.org
    host mx.example.org [192.0.2.9]
    SMTP error from remote mail server after MAIL FROM:<bounces+q@sender.test> SIZE=1234:
    550 5.7.1 Please use the mail server of your ISP
""", "X-Failed-Recipients: dora@example.org, emil@example.org\n")
    got = {r.address: (r.reason, r.bounce_class) for r in parse(raw).recipients}
    assert got == {"dora@example.org": ("userunknown", "hard"),
                   "emil@example.org": ("blocked", "soft")}


@pytest.mark.parametrize("raw", [b"", b"\x00\xff\xfe garbage", b"not: a\n\nbounce at all",
                                 b"Content-Type: multipart/report; boundary=\n\n--\n--",
                                 b"Content-Type: message/delivery-status\n\nFinal-Recipient:",
                                 bytes(range(256)) * 40])
def test_garbage_is_unknown_and_never_raises(raw: bytes) -> None:
    report = parse(raw)
    assert report.type in ("unknown", "dsn") and not report.is_bounce


def test_cli_parse_json_and_an_unreadable_file(tmp_path: Path) -> None:
    dsn = tmp_path / "dsn.eml"
    dsn.write_bytes(DSN)
    arf = tmp_path / "arf.eml"
    arf.write_bytes(ARF)
    missing = tmp_path / "missing.eml"
    result = run_relay("bounces", "parse", "--json", str(dsn), str(missing), str(arf))
    assert result.returncode == 1
    assert f"cannot read {missing}" in result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(o["file"], o["type"], o["feedbackType"]) for o in lines] == [
        (str(dsn), "dsn", None), (str(arf), "arf", "abuse")]
    first = lines[0]["recipients"][0]
    assert first == {"address": "Gone@example.org", "action": "failed", "status": "5.1.1",
                     "reason": "userunknown", "class": "hard",
                     "diagnostic": first["diagnostic"], "remoteMta": "mx.example.org"}
    assert first["diagnostic"].startswith("550 5.1.1")


def test_cli_parse_text(tmp_path: Path) -> None:
    dsn = tmp_path / "dsn.eml"
    dsn.write_bytes(DSN)
    result = run_relay("bounces", "parse", str(dsn))
    assert result.returncode == 0, result.stderr
    assert f"{dsn}: dsn" in result.stdout
    assert "status 5.2.2  reason mailboxfull  class soft" in result.stdout
    assert "remote MTA mx.example.org" in result.stdout


# -- reports too big to read whole (issue 17) ---------------------------------------------


def many_part_dsn(parts: int) -> bytes:
    """A report with one delivery-status part per recipient: 8,000 of them make 1.1 MB."""
    b = "=_many"
    head = (f"From: MAILER-DAEMON@mx.example.org\r\nTo: bounces+x@relay.test\r\n"
            f"Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: multipart/report; report-type=delivery-status; boundary=\"{b}\""
            f"\r\n\r\n--{b}\r\nContent-Type: text/plain\r\n\r\nNot delivered.\r\n")
    out = [head]
    out += [(f"--{b}\r\nContent-Type: message/delivery-status\r\n\r\n"
             f"Reporting-MTA: dns; mx.example.org\r\n\r\n"
             f"Final-Recipient: rfc822; user{i}@example.org\r\nAction: failed\r\n"
             f"Status: 5.1.1\r\n") for i in range(parts)]
    return "".join(out + [f"--{b}--\r\n"]).encode()


def many_recipient_dsn(recipients: int) -> bytes:
    """One delivery-status part naming many recipients."""
    fields = "".join(f"Final-Recipient: rfc822; user{i}@example.org\r\nAction: failed\r\n"
                     f"Status: 5.1.1\r\n\r\n" for i in range(recipients))
    return (b"From: MAILER-DAEMON@mx.example.org\r\nSubject: Undelivered Mail\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/report; "
            b"report-type=delivery-status; boundary=\"b\"\r\n\r\n"
            b"--b\r\nContent-Type: text/plain\r\n\r\nuser0@example.org: no such user\r\n"
            b"--b\r\nContent-Type: message/delivery-status\r\n\r\n"
            b"Reporting-MTA: dns; mx.example.org\r\n\r\n" + fields.encode() + b"--b--\r\n")


def test_a_dsn_of_8000_parts_is_read_up_to_max_report_parts_in_linear_time() -> None:
    raw = many_part_dsn(8000)
    assert len(raw) > 1_100_000
    started = time.process_time()
    report = bounces.parse(raw, max_parts=10, max_recipients=1000)
    spent = time.process_time() - started
    # the text part and 9 delivery-status parts, one recipient each; the rest is not read
    assert [r.address for r in report.recipients] == [f"user{i}@example.org" for i in range(9)]
    assert all(r.bounce_class == "hard" for r in report.recipients)
    assert spent < 3.0, f"{spent:.1f} s of CPU for a 1.1 MB report"  # it took ~20 s


def test_recipients_beyond_max_report_recipients_are_ignored() -> None:
    report = bounces.parse(many_recipient_dsn(5000), max_parts=64, max_recipients=7)
    assert [r.address for r in report.recipients] == [f"user{i}@example.org" for i in range(7)]
    assert report.recipients[0].reason == "userunknown"


def test_parse_time_grows_linearly_with_the_report() -> None:
    """Twice the report, about twice the time (a quadratic step would make it four times)."""
    def cpu(raw: bytes) -> float:
        """The least of three runs: process_time counts every thread of the test process,
        and a thread an earlier test left winding down once made one run 8.5 times the
        other, where the parse itself is linear."""
        times = []
        for _ in range(3):
            started = time.process_time()
            bounces.parse(raw, max_parts=100_000, max_recipients=100_000)
            times.append(time.process_time() - started)
        return min(times)

    small, large = many_recipient_dsn(2000), many_recipient_dsn(8000)
    cpu(small)  # warm the regex caches
    assert cpu(large) < 8 * max(cpu(small), 0.01)


def test_a_huge_header_parameter_does_not_stall_the_parser() -> None:
    """The stdlib parses Content-Type parameters in quadratic time; a header is cut first."""
    semicolons = b";\r\n " * 100_000  # a 400 KB folded header: minutes before the cut
    raw = (b"From: MAILER-DAEMON@mx.example.org\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/report; x=\"" + semicolons + b"\"; boundary=\"b\"\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b--\r\n")
    started = time.process_time()
    bounces.parse(raw, max_parts=64, max_recipients=1000)
    assert time.process_time() - started < 3.0


@pytest.mark.parametrize("run", ["x" * 20_000, "адрес" * 4_000, "Spamx" * 4_000])
def test_a_long_word_in_the_prose_is_read_in_linear_time(run: str) -> None:
    """Addresses were looked for from every letter of a long word, and the word read again
    from each (1.2-1.9 s of CPU for 20,000 letters of prose; the phrases' CamelCase spam
    token likewise)."""
    raw = (b"From: MAILER-DAEMON@mx.example.org\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n\r\n"
           b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n<user@example.org>: "
           + run.encode() + b"\r\n--b\r\nContent-Type: message/delivery-status\r\n\r\n"
           b"Reporting-MTA: dns; mx.example.org\r\n\r\nFinal-Recipient: rfc822; user@example.org"
           b"\r\nAction: failed\r\nStatus: 5.0.0\r\n--b--\r\n")
    started = time.process_time()
    report = bounces.parse(raw, max_parts=64, max_recipients=1000)
    assert time.process_time() - started < 0.3
    assert [r.address for r in report.recipients] == ["user@example.org"]


def test_a_report_as_big_as_max_message_size_is_read_in_bounded_time() -> None:
    """36 MB of text after the error (a returned message, say) is not read line by line."""
    raw = (b"From: MAILER-DAEMON@mx.example.org\r\nSubject: Undelivered Mail\r\n"
           b"To: a@relay.test\r\n\r\nuser@example.org: no such user\r\n" +
           (b"y" * 70 + b"\r\n") * 500_000)
    started = time.process_time()
    report = bounces.parse(raw, max_parts=64, max_recipients=1000)
    assert time.process_time() - started < 3.0  # it took 18 s
    assert [r.address for r in report.recipients] == ["user@example.org"]


def test_many_recipients_in_one_field_block_stop_at_the_limit() -> None:
    fields = "".join(f"Final-Recipient: rfc822; user{i}@example.org\r\nAction: failed\r\n"
                     for i in range(50_000))  # no blank lines between recipients
    raw = (b"From: MAILER-DAEMON@mx.example.org\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\r\n"
           b"\r\n--b\r\nContent-Type: message/delivery-status\r\n\r\n"
           b"Reporting-MTA: dns; mx\r\n\r\n" + fields.encode() + b"--b--\r\n")
    report = bounces.parse(raw, max_parts=64, max_recipients=3)
    assert [r.address for r in report.recipients] == [f"user{i}@example.org" for i in range(3)]


def test_recipients_given_the_same_words_cost_one_reading_of_them() -> None:
    """1,000 recipients all explained by the report's one paragraph (the usual shape): the
    paragraph is classified once, not once a recipient (2.6 s of CPU)."""
    prose = b"    some words of no interest here, and more words of filler\r\n" * 400
    raw = many_recipient_dsn(1000).replace(b"user0@example.org: no such user", prose)
    started = time.process_time()
    report = bounces.parse(raw, max_parts=64, max_recipients=1000)
    assert len(report.recipients) == 1000
    assert time.process_time() - started < 1.2  # 0.15 s: the stage and class read once too


def _ses(notification: dict[str, object]) -> bytes:
    body = json.dumps(notification)
    folded = "!\n ".join(body[i:i + 70] for i in range(0, len(body), 70))  # as SNS folds it
    return (b"From: AWS Notifications <no-reply@sns.amazonaws.com>\nTo: ops@sender.test\n"
            b"Subject: AWS Notification Message\nContent-Type: text/plain; charset=UTF-8\n\n"
            + folded.encode() + b"\n\n--\nIf you wish to stop receiving notifications ...\n")


def test_amazon_ses_notifications_by_email() -> None:
    mail = {"source": "app@sender.test", "destination": ["fran@example.org"]}
    bounce = parse(_ses({"notificationType": "Bounce", "mail": mail, "bounce": {
        "bounceType": "Permanent", "reportingMTA": "dsn; a1.smtp-out.amazonses.com",
        "bouncedRecipients": [{"emailAddress": "fran@example.org", "action": "failed",
                               "status": "5.1.1",
                               "diagnosticCode": "smtp; 550 5.1.1 user unknown"}]}}))
    (r,) = bounce.recipients
    assert (bounce.type, r.address, r.reason, r.bounce_class, r.reply_code) == (
        "dsn", "fran@example.org", "userunknown", "hard", 550)
    complaint = parse(_ses({"notificationType": "Complaint", "mail": mail, "complaint": {
        "complainedRecipients": [{"emailAddress": "fran@example.org"}],
        "complaintFeedbackType": "abuse"}}))
    assert (complaint.type, complaint.feedback_type,
            [r.address for r in complaint.recipients]) == ("arf", "abuse", ["fran@example.org"])
    delivery = parse(_ses({"notificationType": "Delivery", "mail": mail, "delivery": {
        "recipients": ["fran@example.org"], "smtpResponse": "250 2.6.0 Message received"}}))
    assert [(r.address, r.reason) for r in delivery.recipients] == [
        ("fran@example.org", "delivered")]
    assert not delivery.is_bounce


@pytest.mark.parametrize(("words", "stage"), [
    ("550 5.7.1 Unknown user (in reply to end of DATA command)", "DATA"),
    ("554 5.7.1 Rejected (in reply to BDAT command)", "DATA"),
    ("SMTP error from remote mail server after pipelined RCPT TO:<a@example.org>: 550",
     "RCPT"),
    ("550 5.1.8 Sender rejected (in reply to MAIL FROM command)", "MAIL"),
    ("SMTP error from remote mail server after initial connection: 554 Go away", "CONN"),
    ("host mx.example.org[192.0.2.1] refused to talk to me: 554 5.7.1 Blocked", "CONN"),
    ("550 5.2.1 <a@example.org>... User Unknown [RCPT_TO]", "RCPT"),
    ("550 5.1.1 No such user", None),
    ("Mail data after the message was rejected", None),  # words, not a stage
])
def test_the_smtp_stage_a_report_names(words: str, stage: str | None) -> None:
    assert smtp_stage(words, "a@example.org", words) == stage


def test_a_final_recipient_without_a_mailbox_is_the_returned_messages_one_recipient() -> None:
    raw = b"""\
From: Mail Delivery Subsystem <MAILER-DAEMON@mx.sender.test>
To: bounces+r@sender.test
Subject: Returned mail: see transcript for details
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="S"

--S
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sender.test

Final-Recipient: RFC822; @mx.example.org
Action: failed
Status: 5.1.2

--S
Content-Type: message/rfc822

From: app@sender.test
To: Gina <gina@Example.ORG>
Subject: hello

hi
--S--
"""
    (r,) = parse(raw).recipients
    assert (r.address, r.reason, r.bounce_class) == ("gina@example.org", "hostunknown", "hard")


def test_a_transcript_of_blank_lines_is_read_in_linear_time() -> None:
    """Where a line starts, blanks are skipped once, not again from every line of a blank
    run (the copy marker and the transcript took 7 s for 40 KB, growing with the square)."""
    raw = _plain_bounce(" \n" * 20_000 + "<hana@example.org>\n>>> DATA\n"
                        "<<< 550 5.0.0 <hana@example.org>... User unknown\n")
    started = time.process_time()
    (r,) = parse(raw).recipients
    # ~0.4 s, most of it flufl.bounce's detectors reading 20,000 lines (linear): the bound
    # leaves room for a busy machine and still fails the quadratic 7 s
    assert time.process_time() - started < 1.5
    assert (r.address, r.reason) == ("hana@example.org", "filtered")


LOCAL_DELIVERY_DSN = b"""\
From: Mail Delivery System <mailer-daemon@mx.sender.test>
To: bounces+q@sender.test
X-Failed-Recipients: cleo@example.org
Subject: Mail delivery failed: returning message to sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="L"

--L
Content-Type: text/plain

A message that you sent could not be delivered to one or more of its recipients.

--L
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sender.test

Final-Recipient: rfc822;/var/mail/spool/c/cleo
Action: failed
Status: 5.0.0

Final-Recipient: rfc822; dan@example.org
Action: failed
Status: 5.5.0
Diagnostic-Code: X-Unix; 75

--L--
"""


def test_a_local_delivery_report_names_its_failed_address_and_its_mailer() -> None:
    report = parse(LOCAL_DELIVERY_DSN)
    # a file is not a recipient: Exim's X-Failed-Recipients names the address it was for
    assert [r.address for r in report.recipients] == ["cleo@example.org", "dan@example.org"]
    # a bare exit status of a local program: the mailer failed, not the SMTP protocol
    dan = report.recipients[1]
    assert (dan.reason, dan.bounce_class) == ("mailererror", "soft")
    assert dan.diagnostic == "X-Unix; 75"


@pytest.mark.parametrize(("said", "stage"), [
    ("mx.example.org [192.0.2.1] did not like our RCPT TO:\n550 5.2.1 User unknown", "RCPT"),
    ("mx.example.org [192.0.2.1] did not like our final DATA:\n554 5.7.1 Spam", "DATA"),
    ("mx.example.org [192.0.2.1] did not like our MAIL FROM:\n550 5.7.1 No", "MAIL"),
])
def test_the_dragonfly_mail_agent_names_the_command_refused(said: str, stage: str) -> None:
    assert smtp_stage(said, "ann@example.org", said) == stage


TWO_IN_THE_TEXT_DSN = b"""\
From: Mailer Daemon <MAILER-DAEMON@mx.sender.test>
To: bounces+q@sender.test
Subject: Delivery status notification: failed
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="T"

--T
Content-Type: text/plain

An error has occurred while delivering a message for these recipients:

ann@example.org: 550 5.1.1 <ann@example.org>: Recipient address rejected: User unknown
bob@example.org: 452 4.2.2 <bob@example.org>: Recipient address rejected: Over quota

--T
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sender.test

Final-Recipient: rfc822; ann@example.org
Action: failed
Status: 5.0.0

Final-Recipient: rfc822; bob@example.org
Action: failed
Status: 5.0.0

Final-Recipient: rfc822; @relay.example.net:carl@store7
Original-Recipient: rfc822; carl@example.net
Action: failed
Status: 5.2.2
Diagnostic-Code: smtp; 552 5.2.2 Over quota

--T--
"""


def test_each_recipient_is_read_from_its_own_line_and_a_host_internal_name_yields() -> None:
    got = [(r.address, r.reason, r.bounce_class) for r in parse(TWO_IN_THE_TEXT_DSN).recipients]
    # the words about ann end where the text names bob, whose own line says something else
    assert got[:2] == [("ann@example.org", "userunknown", "hard"),
                       ("bob@example.org", "mailboxfull", "soft")]
    # "carl@store7" is the last hop's own name for the mailbox: the original one is kept
    assert got[2] == ("carl@example.net", "mailboxfull", "soft")


def test_a_bounce_without_a_from_address_is_still_read() -> None:
    """flufl.bounce's Yale detector raises IndexError on a message without a From address,
    and the whole report was lost ("unknown"); relay reads the text without it."""
    raw = (b"Return-Path: <>\r\nTo: bounces@relay.test\r\n"
           b"Subject: Mail delivery failed: returning message to sender\r\n\r\n"
           b"A message that you sent could not be delivered to one or more of its\r\n"
           b"recipients. The following address(es) failed:\r\n\r\n  ann@example.org\r\n"
           b"    SMTP error from remote mail server after RCPT TO:<ann@example.org>:\r\n"
           b"    550 5.1.1 No such user here\r\n")
    report = bounces.parse(raw, max_parts=64, max_recipients=1000)
    assert report.type == "dsn"
    assert [(r.address, r.reason, r.bounce_class) for r in report.recipients] == [
        ("ann@example.org", "userunknown", "hard")]
