"""bounce_reasons, bounce_stage, bounce_standard: the general rules that decide whether a
"user unknown" is the address's fault (hard) or a filter's (soft): who said it, in reply to
which SMTP command, and what the status code names."""

from __future__ import annotations

import time

import pytest

from relay.config import LimitsConfig
from relay.feedback import bounces
from relay.feedback.bounce_stage import smtp_stage

LIMITS = LimitsConfig()


def parse(raw: bytes) -> bounces.Report:
    return bounces.parse(raw, max_parts=LIMITS.max_report_parts,
                         max_recipients=LIMITS.max_report_recipients)


def _dsn(human: str, status: str, diagnostic: str) -> bytes:
    return f"""\
From: Mail Delivery System <MAILER-DAEMON@mx.sender.test>
To: bounces+abc@sender.test
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

{human}

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sender.test

Final-Recipient: rfc822; ann@example.org
Action: failed
Status: {status}
Remote-MTA: dns; mx.example.org
{diagnostic}

--B--
""".encode()


def _plain(body: str) -> bytes:
    return f"""\
From: MAILER-DAEMON@mx.sender.test
To: bounces+abc@sender.test
Subject: failure notice

{body}
--- Below this line is a copy of the message.

From: app@sender.test
To: ann@example.org
Subject: hello

hi
""".encode()


def _one(raw: bytes) -> tuple[str, str, str]:
    (r,) = parse(raw).recipients
    return r.address, r.reason, r.bounce_class


# -- who said "user unknown", and in reply to what ----------------------------------


def test_a_remote_reply_quoted_without_its_command_is_not_believed_to_be_the_address() -> None:
    # a gateway or a carrier answers "user unknown" for a mailbox that refuses this sender:
    # without the command it answered, or a code naming the address, it is not hard
    human = "<ann@example.org>: host mx.example.org[192.0.2.1] said: 550 User unknown"
    raw = _dsn(human, "5.0.0", "Diagnostic-Code: smtp; 550 User unknown")
    assert _one(raw) == ("ann@example.org", "filtered", "soft")
    # the same words in reply to RCPT TO are the address's
    raw = _dsn(human + " (in reply to RCPT TO command)", "5.0.0",
               "Diagnostic-Code: smtp; 550 User unknown")
    assert _one(raw) == ("ann@example.org", "userunknown", "hard")


@pytest.mark.parametrize("words", [
    "Unknown user: ann@example.org",  # IMail
    "ann@example.org on Thu, 29 Apr 2010\nThe recipient name is not recognized",  # Exchange
    "ann@example.org because: User ann (ann@example.org) not listed in Domino Directory",
])
def test_the_host_that_keeps_the_mailbox_saying_so_in_its_own_words_is_believed(
        words: str) -> None:
    # no SMTP reply quoted: the reporter itself looked the mailbox up in its directory
    assert _one(_plain(words + "\n")) == ("ann@example.org", "userunknown", "hard")


@pytest.mark.parametrize("words", [
    "<ann@example.org>: This user doesn't have a example.org account (ann@example.org) [-9]",
    "ann@example.org [User unknown]",
    "ann@example.org (user not found)",
])
def test_a_text_bounces_user_unknown_in_no_reporters_own_words_is_a_filters(words: str) -> None:
    # a plain-text report naming neither a code nor the command, in words that are no known
    # reporter's own look-up: as likely a gateway's or a filter's answer (carriers answer
    # "user unknown" for a mailbox that refuses this sender) as the address's
    assert _one(_plain(words + "\n")) == ("ann@example.org", "filtered", "soft")


def test_a_remote_reply_quoted_in_a_plain_text_report_is_not_the_addresses_own() -> None:
    # a remote's reply quoted in the same kind of report is not
    assert _one(_plain("<ann@example.org>:\n550 ann@example.org... No such user\n")) == (
        "ann@example.org", "filtered", "soft")


@pytest.mark.parametrize("status", ["5.1.0", "5.1.351"])
def test_any_addressing_code_names_the_address_at_any_stage(status: str) -> None:
    # RFC 3463 X.1.x is about the address (Exchange's X.1.351 "unknown recipient" too)
    assert bounces.classify(status, 550, "Unknown recipient") == ("userunknown", "hard")
    assert bounces.classify(status, 550, "Unknown recipient", stage="DATA") == (
        "userunknown", "hard")
    # but not X.1.7 / X.1.8, the sender's address
    assert bounces.classify("5.1.8", 553, "User unknown", stage="DATA")[1] == "soft"


# -- the SMTP stage in other reporters' words ---------------------------------------


@pytest.mark.parametrize(("words", "stage"), [
    # qmail
    ("192.0.2.1 does not like recipient.\nRemote host said: 550 User unknown", "RCPT"),
    ("192.0.2.1 does not like sender.\nRemote host said: 553 sorry", "MAIL"),
    ("Connected to 192.0.2.1 but sender was rejected.\nRemote host said: 550 denied", "MAIL"),
    ("Connected to 192.0.2.1 but greeting failed.\nRemote host said: 554 go away", "CONN"),
    # Exchange and gateways
    ("Technical details: SMTP:RCPT host 192.0.2.1: 553 5.3.0 No such user here", "RCPT"),
    ("Technical details: SMTP:DATA host 192.0.2.1: 554 rejected", "DATA"),
    # Gmail's older reports: the state its session was in
    ("The error that the other server returned was: 550 550 User unknown (state 14).", "RCPT"),
    ("The error that the other server returned was: 550 550 Unknown user (state 18).", "DATA"),
    # the reporter's own summary: the address, not the message, was refused
    (("Address not found. Your message wasn't delivered to ann@example.org because the "
      "address couldn't be found. The response was: 550 User unknown"), "RCPT"),
    # qmail when every MX refused: how far it got
    (("Sorry, no SMTP connection got far enough; most progress was RCPT TO response; "
      "remote host 192.0.2.1 said: 550 User unknown"), "RCPT"),
    ("Remote host 192.0.2.1 said 550 for RCPT TO response: 550 User unknown", "RCPT"),
    # Coremail (163.com)
    ("SMTP error, RCPT TO: Host example.org(192.0.2.1) RCPT TO said 550 User unknown", "RCPT"),
    ("Host example.org(192.0.2.1) MAIL FROM said 550 User unknown", "MAIL"),
    # IMail (SMTP32)
    (("Unknown user: ann@example.org RCPT TO generated following response: 553 5.3.0 "
      "<ann@example.org>... Addressee unknown"), "RCPT"),
    ("DATA generated following response: 554 Message refused", "DATA"),
])
def test_the_stage_in_other_reporters_words(words: str, stage: str) -> None:
    assert smtp_stage(words, "ann@example.org", "550 User unknown") == stage


def test_sendmails_summary_line_defers_to_the_transcripts_copy() -> None:
    # Sendmail repeats the remote's reply below the "<<<" line it quotes; that copy has no
    # command before it, the quoted one answered the RCPT TO
    transcript = ("... while talking to mx.example.org.:\n>>> RCPT To:<ann@example.org>\n"
                  "<<< 550 5.1.1 <ann@example.org>... User unknown\n"
                  "550 5.1.1 <ann@example.org>... User unknown\n>>> DATA\n<<< 503 5.0.0 Need RCPT\n")
    diagnostic = "550 5.1.1 <ann@example.org>... User unknown"
    assert smtp_stage(transcript, "ann@example.org", diagnostic) == "RCPT"


def test_recipient_address_rejected_is_a_reply_to_rcpt_to() -> None:
    # Exchange Online's directory-based edge blocking, relayed without the command's name
    diagnostic = "Diagnostic-Code: smtp; 550 5.4.1 Recipient address rejected: Access denied"
    (r,) = parse(_dsn("", "5.4.1", diagnostic)).recipients
    assert (r.reason, r.bounce_class) == ("userunknown", "hard")
    # an explicit stage still wins: after the data, the mailbox existed
    human = "ann@example.org: 550 5.4.1 Recipient address rejected (in reply to end of DATA)"
    (r,) = parse(_dsn(human, "5.4.1", diagnostic)).recipients
    assert r.bounce_class == "soft"


_QMAIL = """\
Hi. This is the qmail-send program at mx.sender.test.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<ann@example.org>:
"""


def test_qmail_names_the_command_its_remote_refused() -> None:
    reply = "Remote host said: 550 sorry, no mailbox here by that name\nGiving up.\n"
    assert _one(_plain(_QMAIL + "192.0.2.1 does not like recipient.\n" + reply)) == (
        "ann@example.org", "userunknown", "hard")
    # the same reply without saying which command it answered
    assert _one(_plain(_QMAIL + reply)) == ("ann@example.org", "filtered", "soft")


# -- which status code to read ------------------------------------------------------


def test_the_more_precise_of_the_status_field_and_the_remotes_code_is_read() -> None:
    # the field says 5.0.0, the remote's words 5.1.1: the address is named bad
    human = "ann@example.org: 550 5.1.1 <ann@example.org>: User unknown"
    (r,) = parse(_dsn(human, "5.0.0", "")).recipients
    assert (r.status, r.reason, r.bounce_class) == ("5.1.1", "userunknown", "hard")
    # the remote said only 5.0.0 where the field is precise: the field
    (r,) = parse(_dsn("", "5.1.1", "Diagnostic-Code: smtp; 550 5.0.0 User unknown")).recipients
    assert (r.status, r.reason, r.bounce_class) == ("5.1.1", "userunknown", "hard")
    # a code of another class in the words is not the outcome's
    (r,) = parse(_dsn("", "4.4.7", "Diagnostic-Code: smtp; 550 5.1.1 User unknown")).recipients
    assert r.status == "4.4.7"


# -- the remote's words -------------------------------------------------------------


@pytest.mark.parametrize(("status", "code", "text", "expected"), [
    # no MX and no address for the domain: it takes no mail (hard when permanent)
    ("5.4.4", None, "Sorry, I couldn't find a mail exchanger or IP address. (#5.4.4)",
     ("notaccept", "hard")),
    ("4.4.4", None, "Unable to find a mail exchanger for example.org", ("notaccept", "soft")),
    # a refusal of the sending IP in any words, not of the address nor of the sender
    (None, 550, ("550 SC-004 Unfortunately, messages from 192.0.2.9 weren't sent. Too many "
                 "unwanted messages have been sent from this IP address"), ("blocked", "soft")),
    # a mailbox that holds too many messages is full, not a sender sending too many
    ("5.0.0", 550, "550 <ann@example.org> User has too many messages on the server.", (
        "mailboxfull", "soft")),
    # a mailbox there but inactive: suspended, not unknown, even under X.1.1
    ("5.1.1", 550, "550 5.1.1 <ann@example.org>: inactive email address", (
        "suspend", "soft")),
    # words of Sisimai's own phrase lists that relay had no reading for (or another)
    (None, 552, "552 Requested mail action aborted: exceeded storage allocation",
     ("mailboxfull", "soft")),
    (None, 550, "550 The user's space has been used up.", ("mailboxfull", "soft")),
    (None, 550, "550 Boite du destinataire pleine", ("mailboxfull", "soft")),
    (None, 554, "554 This message contain invalid MIME headers.", ("contenterror", "soft")),
    (None, 550, "550 Posting by non-member to a members-only list", ("policyviolation", "soft")),
    (None, 550, "550 Message bounced due to organizational settings", (
        "policyviolation", "soft")),
    (None, 553, "553 sorry, that domain isn't in my list of allowed rcpthost", (
        "norelaying", "soft")),
    (None, 550, "550 Sender is in my black list", ("rejected", "soft")),
    (None, 550, "550 Null sender is not allowed", ("rejected", "soft")),
    (None, 550, "550 Banned sending IP [192.0.2.9]", ("blocked", "soft")),
    (None, 554, "554 Your remotehost looks suspiciously like spammer", ("blocked", "soft")),
    (None, 550, "550 Sender is spammer", ("rejected", "soft")),
    (None, 552, "552 Message header size, or recipient list, exceeds policy limit", (
        "contenterror", "soft")),
    (None, 550, "550 Unable to deliver message after multiple retries", ("expired", "soft")),
    # a loop the reporter broke is its own set-up's trouble, a forwarding loop the network's
    (None, None, "aliasing/forwarding loop broken", ("systemerror", "soft")),
    (None, 554, "554 Maximum forwarding loop count exceeded", ("networkerror", "soft")),
])
def test_the_remotes_words(status: str | None, code: int | None, text: str,
                           expected: tuple[str, str]) -> None:
    assert bounces.classify(status, code, text) == expected


@pytest.mark.parametrize("text", [
    "RESOLVER.ADR.RecipientNotFound; not found",  # Exchange's, under X.5.0 or none
    "Invalid-Recipient",
    "No user by that name is currently available",
])
def test_words_of_a_mailbox_not_there(text: str) -> None:
    """Words that name the mailbox not there; believed as the address's at RCPT TO (a reply
    quoted with no command may be a filter's: test_a_remote_reply_quoted_...)."""
    assert bounces.classify(None, 550, text, stage="RCPT") == ("userunknown", "hard")


@pytest.mark.parametrize(("status", "code", "text"), [
    ("5.0.0", 550, "550-<ann@example.org> is not a known user on this system"),
    ("5.7.1", 550, "550 5.7.1 No mailbox found"),
    ("5.0.0", 550, "550 ** No mail box available for this user **"),
    ("5.0.0", 554, "554 Rcpt <ann@example.org> does not exist"),
])
def test_mailboxes_not_there_in_other_words(status: str, code: int, text: str) -> None:
    # in reply to RCPT TO, the address's fault
    assert bounces.classify(status, code, text, stage="RCPT") == ("userunknown", "hard")


# -- an explicit X.1.1 ----------------------------------------------------------------


@pytest.mark.parametrize("text", [
    # a scanner's disclaimer in the report ("scanned for all viruses") is not why it failed
    "Delivery to the following recipients failed.\n\n  ann@example.org\n\n"
    "**** This email has been scanned for all viruses by a gateway ****",
    "550 5.1.1 <ann@example.org>: message classified as spam by the content filter",
])
def test_an_explicit_x11_is_not_unnamed_by_a_scanners_or_a_policys_words(text: str) -> None:
    # "bad destination mailbox address" (RFC 3463): words of content, a scanner or a policy
    # beside it do not make the address good (Sisimai reads X.1.1 so); this holds after
    # DATA too, where the code, not the words, names the address
    assert bounces.classify("5.1.1", 550, text) == ("userunknown", "hard")
    assert bounces.classify("5.1.1", 550, text, stage="DATA") == ("userunknown", "hard")


@pytest.mark.parametrize(("text", "reason"), [
    ("550 5.1.1 <ann@example.org>... Mailbox is full", "mailboxfull"),
    ("550 5.1.1 192.0.2.9 has sent to too many recipients this hour", "speeding"),
    ("550 5.1.1 RCP-P2 Refused due to recipient preferences", "filtered"),
    ("550 5.1.1 Relaying denied", "norelaying"),
])
def test_words_that_the_mailbox_is_there_or_of_the_client_do_outweigh_x11(
        text: str, reason: str) -> None:
    # full, filtered by its owner, or a refusal of the relaying or of the client: the
    # mailbox is not said to be missing, whatever the code
    assert bounces.classify("5.1.1", 550, text) == (reason, "soft")


def test_user_unknown_in_words_alone_after_the_data_stays_a_filters() -> None:
    # no X.1.1: a server that took RCPT TO and refused at the end of the data (carriers and
    # filters say "user unknown" or "does not exist" for a mailbox that refuses this sender)
    human = ("<ann@example.org>: host mx.example.org[192.0.2.1] said: 554 Rcpt\n"
             "    <ann@example.org> does not exist (in reply to end of DATA command)")
    raw = _dsn(human, "5.0.0", "Diagnostic-Code: smtp; 554 Rcpt <ann@example.org> does not exist")
    assert _one(raw) == ("ann@example.org", "filtered", "soft")


def test_a_refusal_at_the_greeting_is_of_the_client_when_the_remote_says_for_good() -> None:
    # the remote's 550 at the greeting, though Postfix's field says 4.5.0: it refused the
    # client for good
    human = ("<ann@example.org>: host mx.example.org[192.0.2.1] refused to\n"
             "    talk to me: 550 5.5.0 Service refused, please try later.")
    raw = _dsn(human, "4.5.0", "Diagnostic-Code: smtp; 550 5.5.0 Service refused, please try"
               " later.")
    assert _one(raw) == ("ann@example.org", "blocked", "soft")
    # Postfix's "delivery temporarily suspended" is its own word on the destination, not an
    # account suspended; a 421 at the greeting refuses the client too, for now
    human = ("<ann@example.org>: delivery temporarily suspended: connect to\n"
             "    mx.example.org[192.0.2.1]: server refused to talk to me: 421 Service not\n"
             "    available, closing transmission channel")
    raw = _dsn(human, "4.0.0", "Diagnostic-Code: X-Postfix; delivery temporarily suspended:"
               " connect to mx.example.org[192.0.2.1]: server refused to talk to me: 421"
               " Service not available, closing transmission channel")
    assert _one(raw) == ("ann@example.org", "blocked", "soft")


def test_an_automatic_acknowledgement_is_an_auto_reply() -> None:
    raw = b"""\
Return-Path: <>
From: Ann <ann@example.org>
To: <bounces+abc@sender.test>
Subject: Thank you for your e-mail
Precedence: bulk

Thank you for your e-mail. I will reply as soon as possible.
"""
    report = parse(raw)
    assert not report.is_bounce
    assert [(r.address, r.reason) for r in report.recipients] == [
        ("ann@example.org", "vacation")]


def test_the_address_an_alias_expanded_from_is_not_a_failed_recipient() -> None:
    raw = b"""\
From: Mail Delivery System <Mailer-Daemon@mx.sender.test>
To: bounces+abc@sender.test
Subject: Mail delivery failed: returning message to sender

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  ann@example.org
    (generated from list@example.net)
    SMTP error from remote mail server after end of data:
    host mx.example.org [192.0.2.1]: 550 5.7.1 Mail rejected as spam

------ This is a copy of the message, including all the headers. ------

From: app@sender.test
To: list@example.net
Subject: hello

hi
"""
    assert [r.address for r in parse(raw).recipients] == ["ann@example.org"]


def test_the_reporters_help_desk_in_its_wrapper_text_is_not_a_failed_recipient() -> None:
    raw = b"""\
From: MAILER-DAEMON@smtp.isp.example (Mail Delivery System)
To: bounces+abc@sender.test
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="X"

--X
Content-Type: text/plain

This is the Postfix program at host smtp.isp.example.

I'm sorry to have to inform you that the message returned
below could not be delivered to one or more destinations.

For further assistance, please contact <support@isp.example>

<ann@example.org>: host mx.example.org[192.0.2.22] said: 550
    <ann@example.org>: User unknown (in reply to RCPT TO command)

--X
Content-Type: message/rfc822

From: app@sender.test
To: ann@example.org
Subject: hello

hi
--X--
"""
    assert [(r.address, r.reason, r.bounce_class) for r in parse(raw).recipients] == [
        ("ann@example.org", "userunknown", "hard")]


def test_a_gateway_products_name_is_not_a_security_error() -> None:
    text = "Message from InterScan Messaging Security Suite: the message could not be delivered"
    assert bounces.classify(None, None, text)[0] != "securityerror"
    assert bounces.classify("5.7.0", 554, "554 5.7.0 Email Security Gateway: message refused"
                            " as spam")[0] == "spamdetected"
    # a security requirement is one still
    assert bounces.classify("5.7.0", 530, "530 5.7.0 Must issue a STARTTLS command first"
                            )[0] == "securityerror"
    assert bounces.classify(None, 550, "550 Security check failed")[0] == "securityerror"


# -- what a refusal can be about, and when the queue's giving up is the reason ---------


def test_the_words_after_recipient_address_rejected_say_why() -> None:
    # Postfix-style "Recipient address rejected:" says only that RCPT TO was refused
    diagnostic = ("Diagnostic-Code: smtp; 550 5.0.0 <ann@example.org>: Recipient address "
                  "rejected: Mailbox on hold by its owner")
    assert _one(_dsn("", "5.0.0", diagnostic)) == ("ann@example.org", "onhold", "soft")


_EXIM = """\
From: Mail Delivery System <Mailer-Daemon@mx.sender.test>
To: bounces+abc@sender.test
Subject: Mail delivery failed: returning message to sender
X-Failed-Recipients: ann@example.org

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  ann@example.org
    {why}

------ This is a copy of the message, including all the headers. ------

From: app@sender.test
To: ann@example.org
Subject: hello

hi
"""


def test_a_refusal_at_the_greeting_is_of_the_client_not_of_a_mailbox() -> None:
    # "quota" names no mailbox here: the server refused the connection before any address
    why = ("SMTP error from remote mail server after initial connection:\n"
           "    host mx.example.org [192.0.2.1]: 554 sending quota reached for 192.0.2.9")
    assert _one(_EXIM.format(why=why).encode()) == ("ann@example.org", "blocked", "soft")
    # the same words in reply to RCPT TO are the mailbox's
    why = ("SMTP error from remote mail server after RCPT TO:<ann@example.org>:\n"
           "    host mx.example.org [192.0.2.1]: 552 mailbox quota exceeded")
    assert _one(_EXIM.format(why=why).encode())[1] == "mailboxfull"


def test_a_local_mailers_failure_is_a_mailer_error() -> None:
    # Diagnostic-Code type X-Unix: a local delivery program failed, whatever vague words
    raw = _dsn("", "4.3.0", "Diagnostic-Code: X-Unix; temporary failure")
    assert _one(raw) == ("ann@example.org", "mailererror", "soft")
    # words that name a cause of their own still win
    raw = _dsn("", "5.2.2", "Diagnostic-Code: X-Unix; mailbox is full")
    assert _one(raw)[1] == "mailboxfull"


def test_an_unauthenticated_message_is_an_authentication_failure() -> None:
    # the e-mail failed SPF/DKIM (a receiver's DMARC wording), not the SMTP client's AUTH
    assert bounces.classify("5.7.1", 550, "550-5.7.1 Unauthenticated email from sender.test "
                            "is not accepted due to domain's") == ("authfailure", "soft")
    assert bounces.classify("5.0.0", 550, "550 Unauthenticated senders not allowed")[0] == \
        "securityerror"


def test_a_recipients_account_blocked_is_the_account_not_the_sending_host() -> None:
    assert bounces.classify("5.5.0", 550, "550 5.5.0 The recipient account is blocked") == (
        "suspend", "soft")
    assert bounces.classify("5.7.1", 554, "554 Client host 192.0.2.9 blocked")[0] == "blocked"
    # whole words only: Exim's "The following address(es) failed: an undisclosed address"
    # names no closed account
    said = "The following address(es) failed: an undisclosed address (generated from x)"
    assert bounces.classify("5.0.0", None, said)[0] != "suspend"
    assert bounces.classify("5.0.0", None, "550 mailbox closed")[0] == "suspend"


def test_a_count_of_failed_attempts_is_the_queue_giving_up() -> None:
    assert _one(_plain("Delivery failed 20 attempts: ann@example.org\n")) == (
        "ann@example.org", "expired", "soft")


def test_a_final_failure_on_a_passing_network_condition_is_the_queue_running_out() -> None:
    # failed for good, no status code, only an unanswered connection: the peer gave up
    raw = _EXIM.format(why="all hosts for example.org have been failing: connection timed out")
    assert _one(raw.encode()) == ("ann@example.org", "expired", "soft")
    # a name service failure stays the reporter's own network error, however long it lasted
    assert bounces.classify("4.4.7", None, "Name server: example.org.: host name lookup "
                            "failure. Message could not be delivered for 5 days")[0] == \
        "networkerror"


def test_no_mx_for_a_domain_is_a_domain_that_takes_no_mail() -> None:
    assert bounces.classify("4.0.0", None, "ann@example.org: No MX found for domain") == (
        "notaccept", "soft")


def test_please_try_again_later_is_not_a_network_error() -> None:
    # a temporary refusal of the mail system (X.3.0), not trouble reaching it
    assert bounces.classify("4.3.0", 451, "451 4.3.0 This message could not be delivered due "
                            "to a recipient error. Please try again later.")[0] == "systemerror"
    # the resolver's own "try again" is
    assert bounces.classify(None, None, "Name service error for domain example.org: Host "
                            "not found, try again")[0] == "networkerror"


def test_a_report_in_its_own_language_that_names_an_undelivered_address_is_a_bounce() -> None:
    # no mailer-daemon sender, no null return path, a subject in another language: the text
    # saying the message could not be delivered to an address is what makes it a bounce
    raw = b"""\
From: no-reply@mail.example.org
To: app@sender.test
Subject: =?UTF-8?B?44Oh44O844Or44Ko44Op44O86YCa55+l?=
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8

Your mail sent on: Thu, 29 Apr 2021 23:45:22 +0900
     Could not be delivered to: <ann@example.org>
     As their mailbox is full.
"""
    assert _one(raw) == ("ann@example.org", "mailboxfull", "soft")


def test_a_report_naming_the_refused_envelope_recipient_is_a_bounce() -> None:
    # a carrier's own report format: no mail-system sender, a reply subject, but the SMTP
    # reply and the RCPT TO it refused
    raw = b"""\
From: post_master@carrier.example
To: app@sender.test
Subject: Re: hello

Error message below:
550 - Requested action not taken: mailbox unavailable

Message details:
  MAIL FROM: app@sender.test
  RCPT TO: ann@example.org
"""
    (r,) = parse(raw).recipients
    assert r.address == "ann@example.org"
    # its "MAIL FROM:" field names the sender; it does not say the sender was refused
    assert r.reason != "rejected"


def test_a_two_hundred_number_in_a_failure_report_is_not_a_delivery() -> None:
    # "Size (in bytes): 222" is not a 2xx reply: a failed recipient is never "delivered"
    raw = _plain("ann@example.org: delivery failed, message rejected\nSize (in bytes): 222\n")
    (r,) = parse(raw).recipients
    assert r.reason != "delivered" and r.reply_code is None


def test_delivery_status_fields_in_a_broken_reports_text_name_its_recipients() -> None:
    # the boundary in the header differs from the one in the body: no MIME parts, but the
    # delivery-status fields are there in the text; the sender it names is no recipient
    raw = b"""\
From: MAILER-DAEMON@mx.sender.test (Mail Delivery System)
To: app@sender.test
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="AB.1/mx.sender"

--AB.1/mx.sender.test
Content-Type: text/plain

<ann@example.org>: host mx.example.org[192.0.2.1] said: 550 5.1.1 unknown user
    (in reply to RCPT TO command)

--AB.1/mx.sender.test
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sender.test
X-Postfix-Sender: rfc822; owner@sender.test

Final-Recipient: rfc822; ann@example.org
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 unknown user

--AB.1/mx.sender.test--
"""
    assert [(r.address, r.reason) for r in parse(raw).recipients] == [
        ("ann@example.org", "userunknown")]


def test_a_transcripts_accepted_commands_do_not_make_a_failure_a_delivery() -> None:
    # a session transcript quotes the 2xx the remote gave before it refused: the failure's
    # status and reply are the first 4xx/5xx ones
    raw = _plain("""\
Transcript of session follows.
 In:  RCPT TO:<ann@example.org>
 Out: 250 2.1.5 Ok
 In:  DATA
 Out: 451 4.3.0 Error: queue file write error
""")
    (r,) = [r for r in parse(raw).recipients if r.address == "ann@example.org"]
    assert (r.status, r.reply_code, r.reason) == ("4.3.0", 451, "systemerror")


# -- words the rules above did not read (bounce-seven) ----------------------------------


def test_words_in_a_token_joined_by_underscores_are_read() -> None:
    # "550 BAD_RECIPIENT", "MAILBOX_FULL": a server's code word is still its words
    assert bounces.classify("5.0.0", 550, "550 BAD_RECIPIENT - see http://mail.example.org/"
                            "undelivered.php?r=BAD_RECIPIENT", stage="RCPT") == (
        "userunknown", "hard")
    assert bounces.classify("5.0.0", 552, "552 MAILBOX_FULL") == ("mailboxfull", "soft")


def test_an_address_that_could_not_be_found_is_a_missing_mailbox() -> None:
    # Gmail's notice with no Diagnostic-Code: "the address couldn't be found" (in reply to
    # RCPT TO: bounce_stage reads the same words so)
    human = ("** Address not found **\n\nYour message wasn't delivered to ann@example.org "
             "because the address couldn't be found. Check for typos or unnecessary spaces "
             "and try again.")
    assert _one(_dsn(human, "5.0.0", "")) == ("ann@example.org", "userunknown", "hard")


@pytest.mark.parametrize("reply", [
    "554 delivery error: dd This user doesn't have a example.org account (ann@example.org)",
    "550 ann@example.org unknown user account",
])
def test_a_quoted_reply_that_the_account_is_not_there_is_believed(reply: str) -> None:
    # the terse "user unknown" quoted without its command may be a filter's cover (above);
    # words that the account itself does not exist are the address's
    assert _one(_plain(f"<ann@example.org>:\n{reply}\n")) == (
        "ann@example.org", "userunknown", "hard")
    assert _one(_plain("<ann@example.org>:\n550 ann@example.org... No such user\n")) == (
        "ann@example.org", "filtered", "soft")


def test_a_rate_limit_says_why_a_system_does_not_accept_messages() -> None:
    # X.3.2 "system not accepting network messages"; the words say it is this client's rate
    assert bounces.classify("4.3.2", 452, "452 4.3.2 Connection rate limit exceeded.") == (
        "toomanyconn", "soft")
    # without such words the code's own reason stands
    assert bounces.classify("5.3.2", 554, "554 5.3.2 Service not available")[0] == "notaccept"


def test_a_status_fields_comment_speaks_when_nothing_else_does() -> None:
    # no Diagnostic-Code and no prose about the address: the comment says what failed
    raw = _dsn("", "4.0.0 (example.org: host name lookup failure)", "")
    assert _one(raw)[1] == "networkerror"
    # the remote's own words still win over it
    raw = _dsn("", "5.0.0 (permanent failure)", "Diagnostic-Code: smtp; 552 Mailbox full")
    assert _one(raw)[1] == "mailboxfull"


def test_too_many_recipients_in_a_span_of_time_is_a_sending_rate() -> None:
    text = "550 5.1.1 <ann@example.org> - 192.0.2.9 has sent to too many recipients this hour"
    assert bounces.classify("5.1.1", 550, text)[0] == "speeding"
    # too many recipients for one message or session is not
    assert bounces.classify("4.5.3", 452, "452 4.5.3 Too many recipients")[0] != "speeding"


def test_an_automatic_reply_in_another_language_and_an_encoded_subject() -> None:
    raw = b"""\
From: Ann <ann@example.org>
To: sender@sender.test
Subject: [Automatyczna =?iso-8859-2?Q?odpowied=BC?=] Hello
Precedence: junk

I am out until Monday.
"""
    report = parse(raw)
    assert report.type == "autoreply"
    assert _one(raw) == ("ann@example.org", "vacation", "soft")


def test_rfc_5321s_mailbox_unavailable_is_the_addresss_own_reply() -> None:
    # quoted without its command, but in the words RFC 5321 gives 550 for a mailbox
    diagnostic = ("Diagnostic-Code: smtp;550 Requested action not taken: mailbox unavailable"
                  " (-0000000022:2222:-0000000022)")
    assert _one(_dsn("", "5.5.0", diagnostic)) == ("ann@example.org", "userunknown", "hard")


def test_qmails_no_such_host_is_an_unknown_host() -> None:
    raw = _plain("<ann@example.org>:\nSorry, I couldn't find any host by that name.\n")
    assert _one(raw) == ("ann@example.org", "hostunknown", "hard")


def test_an_undefined_mailbox_status_with_nothing_said_is_a_filter() -> None:
    # X.2.0 "other or undefined mailbox status": the mailbox is there and refused this mail
    assert _one(_dsn("Your message could not be delivered.", "5.2.0", "")) == (
        "ann@example.org", "filtered", "soft")
    # words that say more still win over it
    raw = _dsn("", "5.2.0", "Diagnostic-Code: smtp; 552 Mailbox full")
    assert _one(raw)[1] == "mailboxfull"
    # for now (4.2.0) it is not yet a refusal of this mail
    assert _one(_dsn("", "4.2.0", ""))[1] != "filtered"


def test_a_recipient_on_qmails_badrcptto_list_is_filtered() -> None:
    text = "553 sorry, your envelope recipient is in my badrcptto list (#5.7.1)"
    assert bounces.classify("5.7.1", 553, text) == ("filtered", "soft")


@pytest.mark.parametrize("text", ["Messages without Subject: fields are not accepted here",
                                  "554 message refused: missing required Date header"])
def test_a_message_refused_for_a_missing_header_field_is_a_content_error(text: str) -> None:
    assert bounces.classify("5.0.0", None, text) == ("contenterror", "soft")


def test_x23_with_a_message_too_large_is_its_size() -> None:
    text = "550 5.2.3 RESOLVER.RST.RecipSizeLimit; message too large for this recipient"
    assert bounces.classify("5.2.3", 550, text) == ("mesgtoobig", "soft")
    # "exceeds a limit" alone keeps X.2.3's own reason
    text = "552 5.2.3 Message length exceeds administrative limit"
    assert bounces.classify("5.2.3", 552, text)[0] == "exceedlimit"


def test_an_accounts_absence_said_in_full_after_data_is_the_address() -> None:
    # Yahoo took RCPT TO and refused the data saying the account is not there: no filter
    # says that of a mailbox that exists
    yahoo = ("554 delivery error: dd This user doesn't have a yahoo.com account "
             "(ann@yahoo.com) [0] - mta107.mail.re1.yahoo.com")
    assert bounces.classify("5.0.0", 554, yahoo, stage="DATA") == ("userunknown", "hard")
    # the terse "user unknown" after the data stays a filter's: Japanese carriers answer so
    # for a mailbox whose owner refuses the sender's domain
    assert bounces.classify("5.2.0", 550, "550 Unknown user ann@example.jp", stage="DATA") == (
        "filtered", "soft")
    assert bounces.classify("5.0.0", 550, "550 : User unknown", stage="DATA") == (
        "filtered", "soft")


def _autoreply(sender: str, body: str, reply_to: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: app@sender.test\r\n"
            + (f"Reply-To: {reply_to}\r\n" if reply_to else "")
            + "Subject: Automatic reply: your order\r\nAuto-Submitted: auto-replied\r\n\r\n"
            + body).encode()


def test_an_auto_reply_from_a_no_reply_address_is_for_the_mailbox_in_reply_to() -> None:
    # a gateway (Mimecast) answers for the mailbox from an address no one reads
    raw = _autoreply("<noreply@example.com>", "I am away until Monday.\r\n",
                     reply_to="<ann@example.com>")
    assert _one(raw) == ("ann@example.com", "vacation", "soft")
    # a person's own address is the mailbox, whatever Reply-To says
    raw = _autoreply("Ann <ann@example.com>", "I am away until Monday.\r\n",
                     reply_to="<desk@example.com>")
    assert _one(raw)[0] == "ann@example.com"


@pytest.mark.parametrize("body", [
    "This email inbox ann@example.com is no longer in use. Please contact someone else.",
    "Please note that this mailbox has been deactivated.",
    "The e-mail address you wrote to is no longer monitored.",
])
def test_an_auto_reply_saying_the_mailbox_is_gone_is_suspend(body: str) -> None:
    raw = _autoreply("<ann@example.com>", body + "\r\n")
    assert _one(raw) == ("ann@example.com", "suspend", "soft")  # it still answered: soft


def test_an_auto_reply_of_an_owner_away_is_vacation() -> None:
    raw = _autoreply("<ann@example.com>", "I no longer check this account on weekends; "
                     "I am away until Monday.\r\n")
    assert _one(raw) == ("ann@example.com", "vacation", "soft")


def test_microsofts_x_supplementary_info_is_the_remotes_reply() -> None:
    # Hotmail's older reports carry the reply in X-Supplementary-Info, with no
    # Diagnostic-Code: the reply, not the bare 5.5.0 (a protocol error), says why
    raw = _dsn("Delivery to the following recipients failed.", "5.5.0",
               "X-Supplementary-Info: < #5.5.0 smtp;550 Requested action not taken: mailbox\n"
               " unavailable (495782920:4198:-2147467259)>")
    assert _one(raw) == ("ann@example.org", "userunknown", "hard")


@pytest.mark.parametrize("subject", ["Arpus biroja atrasanas automatiska atbilde: hello",
                                     "=?utf-8?q?Autom=C4=81tisk=C4=81_atbilde=3A_hello?=",
                                     "Automatinis atsakymas: hello",
                                     "Automaatne vastus: hello"])
def test_an_automatic_reply_in_a_baltic_language_is_an_auto_reply(subject: str) -> None:
    raw = f"""\
From: <ann@example.org>
To: <bounces+abc@sender.test>
Subject: {subject}
Content-Type: text/plain; charset="utf-8"

Thank you for your email. I am out of office and will be back on Tuesday.
""".encode()
    report = parse(raw)
    assert report.type == "autoreply"
    assert [(r.address, r.reason) for r in report.recipients] == [("ann@example.org", "vacation")]


def test_a_spam_verdict_named_in_a_camelcase_token_is_spam() -> None:
    # the verdict's name says spam; the generic "security policies" around it does not
    # make it a security (TLS, authentication) error
    text = "554 email rejected due to security policies - MCSpamSignature.sa.2.2"
    assert bounces.classify("5.0.0", 554, text) == ("spamdetected", "soft")
    # a lower-case host name with "spam" in it is not a verdict
    text = "host antispam.example.org said: 550 5.0.0 mailbox unavailable"
    assert bounces.classify("5.0.0", 550, text)[0] != "spamdetected"


def test_a_refusal_for_the_messages_size_is_not_a_bad_address_whatever_its_code() -> None:
    # X.1.1 beside words that the message was too big: the size was refused, not the address
    diagnostic = ("Diagnostic-Code: smtp; 550 RCPT TO:<ann@example.org> max message size "
                  "exceeded")
    assert _one(_dsn("", "5.1.1 (bad destination mailbox address)", diagnostic)) == (
        "ann@example.org", "mesgtoobig", "soft")
    # the same code with words about the address stays hard
    diagnostic = "Diagnostic-Code: smtp; 550 5.1.1 <ann@example.org>: user unknown"
    assert _one(_dsn("", "5.1.1", diagnostic)) == ("ann@example.org", "userunknown", "hard")


def test_a_server_that_will_not_be_used_as_a_relay_refuses_relaying() -> None:
    text = ("host mx.example.org[192.0.2.7] said: 553-you are trying to use me "
            "[mx.example.org] as a relay, but I have not been configured to let 553-you "
            "[198.51.100.4, out.sender.test] do this. (#5.7.1) (in reply to RCPT TO command)")
    assert bounces.classify("5.0.0", 553, text) == ("norelaying", "soft")


def test_mail_that_loops_back_to_the_reporter_is_its_own_set_up_error() -> None:
    # Postfix's words when the destination's MX is itself: a configuration error, not a
    # network's trouble, and never the address's
    text = "mail for example.org loops back to myself"
    assert bounces.classify("5.0.0", None, text) == ("systemerror", "soft")


def test_rfc_5321s_generic_mailbox_unavailable_alone_does_not_suppress_the_address() -> None:
    # RFC 5321 glosses it "mailbox not found, no access, or command rejected for policy
    # reasons": with no stage and a code that names nothing, a filter's as likely
    diagnostic = "Diagnostic-Code: smtp;550 Requested action not taken: mailbox unavailable"
    assert _one(_dsn("", "5.0.0", diagnostic)) == ("ann@example.org", "filtered", "soft")
    # nor in a report of no standard form, its code in words of the report's own
    body = ("------ Failed Recipients ------\n<ann@example.org>: Requested action not taken: "
            "mailbox unavailable. [SMTP Error Code 550]\n-------- Returned Mail --------")
    assert _one(_plain(body)) == ("ann@example.org", "filtered", "soft")
    # in reply to RCPT TO it is the address's
    transcript = ("<ann@example.org>: host mx.example.org[192.0.2.7] said: 550 Requested "
                  "action not taken: mailbox unavailable (in reply to RCPT TO command)")
    assert _one(_dsn(transcript, "5.0.0", diagnostic)) == ("ann@example.org", "userunknown",
                                                           "hard")


@pytest.mark.parametrize(("text", "reason"), [
    # Postfix's pipe(8) quoting the local command that failed: a mailer's error, not a
    # block, unless the command's output says what is wrong with the mailbox
    ("temporary failure. Command output: scanner: unable to connect to daemon: "
     "Connection refused", "mailererror"),
    ("permission denied. Command output: Mail quota exceeded.", "mailboxfull"),
    # a directory with two entries for one name, a failure in the remote's processing
    ("Recipient user name info (info@example.org) not unique. Several matches found in "
     "Domino Directory.", "systemerror"),
    ("The following mail has been returned because it encountered an error while being "
     "processed.", "systemerror"),
    ("Connection was dropped by remote host (SENT_HELO)", "networkerror"),
    # a queue that gave up, in words of its own
    ("Delivery to the following recipients was aborted after 5.0 hour(s)", "expired"),
    ("failed because it has not been collected after 30 days", "expired"),
])
def test_what_a_reporter_says_in_words_of_its_own(text: str, reason: str) -> None:
    assert bounces.classify("5.0.0", None, text) == (reason, "soft")


def test_a_diagnostic_that_names_no_cause_yields_to_the_reports_words() -> None:
    # an X.400 gateway's Diagnostic-Code says nothing; the text above names the refusal
    human = ("Your message was not delivered to:\n        ann@example.org\nfor the following "
             "reason:\nInformation MTA '192.0.2.7' gives error message 5.7.1 Unable to relay "
             "for ann@example.org")
    assert _one(_dsn(human, "5.0.0", "Diagnostic-Code: X-400; -1 (Unknown)")) == (
        "ann@example.org", "norelaying", "soft")


@pytest.mark.parametrize(("text", "reason"), [
    # a spam filter's verdict, though its advice names PTR records
    ("554 5.7.1 Your message failed several antispam checks (SCORING) and it was rejected. "
     "Please be sure your mailserver is configured correctly (spf, HELO, PTR)", "spamdetected"),
    ("550 5.7.1 Rejected - bulk email", "spamdetected"),
    # Postfix's "host ... said:" frames the remote's reply: its "host" was not blocked
    ("host mx.ex.net[192.0.2.1] said: 550 5.7.1 Blocked by SpamAssassin (in reply to "
     "end of DATA command)", "spamdetected"),
    ("host mx.example.org[192.0.2.7] said: 554 5.7.1 Client host blocked", "blocked"),
    ('Mailer mx.example.org said: "554 Message looping (received 6 times)"', "networkerror"),
    ("553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)", "norelaying"),
    ("Name service error for name=example.org type=MX: Malformed name server reply",
     "networkerror"),
    ("550 5.7.1 You're using a mass mailer, therefore you're bounced.", "spamdetected"),
    # a scanner's footer on the report is no finding of a virus
    ("550 Mailbox unavailable -- This message has been scanned for viruses and dangerous "
     "content by MailScanner, and is believed to be clean.", "userunknown"),
])
def test_a_remotes_verdict_in_its_own_words(text: str, reason: str) -> None:
    assert bounces.classify("5.0.0", None, text)[0] == reason


# -- what a report says when its words name no cause ------------------------------------
# (Sisimai's fallbacks, the labels of the corpus: a remote's words that name no reason are
# "onhold", kept apart from a report that says nothing at all, "undefined")


def test_words_that_name_no_cause_are_onhold_and_no_words_undefined() -> None:
    raw = _dsn("", "5.0.0", "Diagnostic-Code: smtp; 550 zen.example.test Listed by CSS")
    assert _one(raw) == ("ann@example.org", "onhold", "soft")
    assert bounces.classify("5.0.0", None, "") == ("undefined", "soft")
    # the same words refusing relay's own delivery (outcomes.py reads them with classify)
    assert bounces.classify("5.0.0", 550, "550 zen.example.test Listed by CSS") == (
        "onhold", "soft")


@pytest.mark.parametrize("diagnostic", [
    "Diagnostic-Code: The email account that you tried to reach does not exist.",
    "Diagnostic-Code: smtp; The email account that you tried to reach does not exist.",
])
def test_a_diagnostic_code_without_its_command_is_a_filters_user_unknown(
        diagnostic: str) -> None:
    # a report's Diagnostic-Code (typed smtp, or untyped) is a remote's reply: "does not
    # exist" said to an unknown command is as likely a filter's as the address's
    assert _one(_dsn("", "5.0.0", diagnostic)) == ("ann@example.org", "filtered", "soft")
    # the reporter's own local delivery agent (X-Unix) is the mailbox's host speaking
    raw = _dsn("", "5.0.0", "Diagnostic-Code: X-Unix; mail.local: unknown user: ann")
    assert _one(raw) == ("ann@example.org", "userunknown", "hard")


def _delayed(status: str, diagnostic: str, action: str = "delayed") -> tuple[str, str, str]:
    return _one(_dsn("", status, f"Diagnostic-Code: {diagnostic}").replace(
        b"Action: failed", f"Action: {action}".encode()))


def test_a_delay_after_trouble_that_passes_is_the_queues_expiry() -> None:
    # no answer, a timeout, a connection refused: the queue waits (RFC 3463 X.4.1, "no
    # answer from host"); SendGrid's non-standard "expired" action says it stopped waiting
    assert _delayed("4.4.1", "smtp; 421 4.4.1 Connection timed out")[1] == "expired"
    assert _delayed("4.4.0", "smtp; 421 4.4.0 no MXs for this domain could be reached")[1] \
        == "expired"
    assert _delayed("", "Connection timed out", action="expired")[1] == "expired"
    # no route to the host, or its name not found: the network's, which waiting does not mend
    assert _delayed("4.4.1", "X-Postfix; connect to mx.example.org[192.0.2.2]:25: No route "
                    "to host")[1] == "networkerror"
    assert _delayed("4.4.0", "X-Postfix; Host or domain name not found. Name service error "
                    "for name=example.org type=MX: Host not found, try again")[1] == \
        "networkerror"


@pytest.mark.parametrize(("status", "reason"), [
    ("4.4.5", "systemfull"), ("5.2.4", "filtered"), ("5.3.0", "systemerror"),
    ("5.3.3", "systemerror"), ("5.5.3", "toomanyconn"), ("5.5.4", "systemerror"),
    ("5.5.5", "systemerror"), ("5.7.0", "securityerror"), ("5.7.1", "securityerror"),
])
def test_a_status_code_alone_reads_as_the_status_table_says(status: str, reason: str) -> None:
    # RFC 3463's meanings, as Sisimai's table names them (X.4.5 "mail system congestion",
    # X.3.3 "system not capable of selected features", X.5.3 "too many recipients")
    assert bounces.classify(status, None, "")[0] == reason


def test_a_reply_code_followed_by_a_colon_is_a_remotes_reply() -> None:
    # Yahoo's old relay quoted its remote as "550: : User unknown": a reply, with a code, so
    # a filter's "user unknown" as much as the address's
    raw = _plain("<ann@example.org>: 550: : User unknown\n")
    assert _one(raw) == ("ann@example.org", "filtered", "soft")


@pytest.mark.parametrize("words", [
    "Domain example.ie has exceeded the max emails per hour (1250/1000 (125%)) allowed.",
    "You have reached the limit of messages per day",
    "550 exceeded the maximum number of recipients per hour",
])
def test_a_senders_quota_of_mail_per_hour_or_day_is_toomanyconn(words: str) -> None:
    # a quota the sender has used up, not its pace (Sisimai's table: "has exceeded the max
    # emails per hour", "daily message quota exceeded" are toomanyconn)
    assert bounces.classify("5.0.0", None, words)[0] == "toomanyconn"


def test_cpanels_exim_on_a_destination_it_could_not_route_to() -> None:
    words = ("The mail server could not deliver mail to ann@example.org. The account or domain "
             "may not exist, they may be blacklisted, or missing the proper dns entries.")
    assert bounces.classify(None, None, words) == ("hostunknown", "hard")
    # a remote's reply (with its code) saying the account is not there, in full, is the
    # address's own, its command said or not (Yahoo's)
    assert bounces.classify("5.0.0", 554, "554 delivery error: dd This user doesn't have a "
                            "example.org account (ann@example.org) [0]") == ("userunknown", "hard")


def test_a_full_mailbox_outranks_a_status_code_that_says_otherwise() -> None:
    # "overdrawn his diskspace quota" under X.2.3 (message length over a limit) is a full
    # mailbox; "message too large" under it is the message's size
    assert bounces.classify("5.2.3", None, "maildir delivery failed: Sorry, the user's maildir "
                            "has overdrawn his diskspace quota")[0] == "mailboxfull"
    assert bounces.classify("5.2.3", 552, "552 5.2.3 message too large")[0] == "mesgtoobig"


def test_a_delay_under_a_code_naming_no_route_stays_a_network_error() -> None:
    assert _delayed("4.4.4", "smtp; 454 4.4.4 [internal] no MX or A for domain")[1] == \
        "networkerror"


@pytest.mark.parametrize(("words", "reason"), [
    ("550 Address not present in directory", "userunknown"),
    ("550 kim@example.org is not an active address at this host", "userunknown"),
    ("550 sorry, no mailbox by that name is currently available", "userunknown"),
    ("553 Utilisateur inconnu !", "userunknown"),
    ("vdeliver: Invalid or unknown virtual user 'kim'", "userunknown"),
    ("550 Invalid/inactive user", "suspend"),
    ("550 kim@example.org is unavailable: user is terminated", "suspend"),
    ("451 Temporary local problem - please try later", "systemerror"),
    ("554 5.3.5 Local configuration error", "systemerror"),
    ("421 Too many SMTP sessions for this host", "toomanyconn"),
    ("550 Sender verify failed", "rejected"),
    ("553 BATV validation failure", "rejected"),
    ("Unrouteable mail domain \"example.org\"", "networkerror"),
    ("Unrouteable address", "hostunknown"),
])
def test_common_wordings_of_each_reason(words: str, reason: str) -> None:
    assert bounces.classify("5.0.0", None, words)[0] == reason


def test_a_dsn_without_a_diagnostic_code_reads_its_prose_as_a_plain_report_does() -> None:
    # Exim: the failed address and its words above, a delivery-status part with no
    # Diagnostic-Code: a bare "No Such User Here" is a filter's as likely as the address's
    human = ("This message was created automatically by mail delivery software.\n\n"
             "  ann@example.org\n    No Such User Here\n")
    assert _one(_dsn(human, "5.0.0", "")) == ("ann@example.org", "filtered", "soft")


def test_the_address_a_forward_failed_at_is_the_recipient_that_bounced() -> None:
    # Exim names the address a forward (or alias) led to and gives its DSN the address the
    # mail was sent to
    human = ("  kim@example.net\n    (ultimately generated from ann@example.org)\n"
             "    host mx.example.net [192.0.2.9]\n    SMTP error from remote mail server after "
             "end of data:\n    550 High probability of spam\n")
    (r,) = parse(_dsn(human, "5.0.0", "")).recipients
    assert (r.address, r.reason) == ("kim@example.net", "spamdetected")


def test_a_client_not_allowed_to_send_for_a_domain_is_blocked_unless_spf_says_why() -> None:
    words = "550 192.0.2.1 is not allowed to send mail from example.org. Help at www.example.net"
    assert bounces.classify("5.0.0", 550, words)[0] == "blocked"
    words = ("550 5.1.0 192.0.2.1 is not allowed to send from <example.org> per it's SPF "
             "Record. Please inspect your SPF settings")
    assert bounces.classify("5.1.0", 550, words)[0] == "authfailure"


def test_reading_a_forward_takes_linear_time_on_hostile_words() -> None:
    # "generated from" after 18,000 characters of at-signs: looked up, not backtracked over
    human = "a@" * 9000 + " (generated from ann@example.org)\n"
    started = time.process_time()
    (r,) = parse(_dsn(human, "5.0.0", "")).recipients
    assert time.process_time() - started < 3.0
    assert r.address == "ann@example.org"


def test_a_failure_on_a_domain_there_is_no_way_to_stays_the_networks() -> None:
    # failed, no status, no code: not the queue's expiry when the words say the domain
    # cannot be routed to (Exim's "Unrouteable mail domain")
    raw = _plain('ann@example.org\n    Unrouteable mail domain "example.org"\n')
    assert _one(raw) == ("ann@example.org", "networkerror", "soft")


def test_the_word_network_alone_names_no_network_failure() -> None:
    # Boxbe's challenge ("... our network of trusted senders ...") under X.7.0 is the
    # security status its code says, not a network error
    words = "Sender not pre-approved. Join the Boxbe network of trusted senders."
    assert bounces.classify("4.7.0", None, words)[0] == "securityerror"


@pytest.mark.parametrize(("words", "reason", "cls"), [
    # no route to the host, no DNS records for it: the network's for now, never a reason to
    # suppress the address (both were read as an unknown host or user: hard)
    ("connect to mx.example.org[192.0.2.1]:25: No route to host", "networkerror", "soft"),
    ("The DNS records for the destination computer could not be found", "networkerror",
     "soft"),
    # the domain is not known, not the user
    ("Mail domain mentioned in email address is unknown", "hostunknown", "hard"),
    # a mailbox that is off for now, a sender refused, a client without a name: none is
    # the address gone for good (they read as userunknown, notaccept and hostunknown: hard)
    ("550 Recipient rejected: Temporarily inactive", "suspend", "soft"),
    ("550 This server does not accept mail from sender.example", "rejected", "soft"),
    ("450 Client host rejected: Unresolvable relay host name", "requireptr", "soft"),
    # while a domain that takes no mail at all is closed to every sender
    ("556 This domain does not accept mail (null MX)", "notaccept", "hard"),
])
def test_a_host_that_cannot_be_reached_is_not_one_that_does_not_exist(
        words: str, reason: str, cls: str) -> None:
    assert bounces.classify("5.0.0", None, words) == (reason, cls)


@pytest.mark.parametrize("words", [
    "connect to mx.example.org[192.0.2.7]:25: Connection refused",
    "'[Errno 111] Connection refused' (delivery attempts: 3)",
])
def test_a_connection_refused_by_tcp_is_the_networks_not_a_block(words: str) -> None:
    """Nothing listening there: no server answered to refuse this client."""
    from relay.feedback.bounce_reasons import classify
    assert classify("4.4.1", None, words) == ("networkerror", "soft")
    # a server that answered and refused the client is still a block
    assert classify("5.7.1", 554, "Connection refused: your IP is on our block list")[0] \
        == "blocked"


def test_failed_with_a_temporary_status_after_a_connection_refused_is_expired() -> None:
    """Postfix's "delivery temporarily suspended: connect to ...: Connection refused" under
    Action: failed and 4.4.1: its queue retried the trouble until it gave up."""
    raw = _dsn("ann@example.org: delivery temporarily suspended", "4.4.1",
               "Diagnostic-Code: X-Postfix; delivery temporarily suspended: connect to\n"
               "    mx.example.org[192.0.2.7]: Connection refused")
    assert _one(raw) == ("ann@example.org", "expired", "soft")


def test_a_delivery_expired_in_the_diagnostic_is_expired() -> None:
    raw = _dsn("ann@example.org: failed", "5.0.0 (permanent failure)",
               "Diagnostic-Code: smtp; 5.4.7 - Delivery expired (message too old) '[Errno 61]\n"
               "    Connection refused' (delivery attempts: 0)")
    assert _one(raw) == ("ann@example.org", "expired", "soft")
