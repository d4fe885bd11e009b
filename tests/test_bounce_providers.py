"""The replies of the largest mailbox providers and filtering services (Gmail, Microsoft 365,
Yahoo, iCloud, MessageLabs, Mimecast), read for what they say: the same reading for a reply
relay gets while delivering and for one quoted in a bounce that comes back later.

The wordings are the providers' own, as their documentation gives them; the reasons are
those Sisimai's per-provider tables give them (the labeller of the shared corpus).  Each
case is one of the general rules it stands for: a status that a provider gives a meaning of
its own, qmail's status at the end of the text, the cause said after "because"."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.delivery import outbound
from relay.feedback.bounce_reasons import classify

from .dnsserver import DNSServer
from .sink import Sink
from .smtputil import in_thread
from .test_bounce_rules import _EXIM, _dsn, _one
from .test_delivery import route, start_relay, submit, wait_final

GMAIL_DKIM = ("550 5.7.30 This mail has been blocked because DKIM does not pass. Gmail requires"
              " all large senders to authenticate with DKIM. Authentication results: DKIM ="
              " did not pass.")
GMAIL_TLS = ("421 4.7.29 Your email has been rate limited because this message wasn't sent over"
             " a TLS connection. Gmail requires all bulk email senders to use TLS/SSL for SMTP"
             " connections.")
GMAIL_SPF = ("421 4.7.27 Your email has been rate limited because SPF authentication didn't"
             " pass for this message. Gmail requires all bulk email senders to authenticate"
             " their email with SPF.")
NULL_MX = "550 5.7.27 Sender address has null MX"  # RFC 7505 4.2: of the sender's domain


def _read(reply: str, stage: str | None = None) -> tuple[str, str]:
    """(reason, class) of a reply "CODE [STATUS] text" as relay's delivery reads it."""
    code, rest = int(reply[:3]), reply[4:]
    return classify(outbound.enhanced_code(rest), code, rest, stage=stage)


@pytest.mark.parametrize(("reply", "reason"), [
    # the newest status codes, which the providers give meanings of their own: the words win
    (GMAIL_DKIM, "authfailure"),  # X.7.30 is REQUIRETLS's (RFC 8689) by the registry
    (GMAIL_TLS, "securityerror"),  # X.7.29 is ARC's (RFC 8617)
    (GMAIL_SPF, "authfailure"),  # X.7.27 is the sender's null MX (RFC 7505)
])
def test_a_providers_own_meaning_of_the_newest_codes_is_read_from_its_words(
        reply: str, reason: str) -> None:
    assert _read(reply) == (reason, "soft")


@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA", None])
def test_a_senders_null_mx_never_says_the_recipients_address_is_bad(stage: str | None) -> None:
    assert _read(NULL_MX, stage) == ("rejected", "soft")
    assert outbound.classify(550, "5.7.27", NULL_MX[4:], stage) == ("bounced", False)


def test_a_recipient_address_of_bad_syntax_is_the_addresss_fault_whatever_rfc_it_cites() -> None:
    reply = ("553 5.1.3 The recipient address <ann@@example.org> is not a valid RFC 5321"
             " address. For more information, go to About SMTP error messages.")
    assert _read(reply) == ("userunknown", "hard")


@pytest.mark.parametrize(("reply", "reason", "cls"), [
    # MessageLabs and qmail give the status at the end, in parentheses after a '#'
    ("550-Invalid recipient <ann@example.org> 550 (#5.1.1)", "userunknown", "hard"),
    ("553 Stray linefeeds in message (#5.6.2)", "contenterror", "soft"),
    ("550 sender envelope domain not allowed for sender IP address (#5.1.8)", "rejected",
     "soft"),
])
def test_a_status_given_at_the_end_the_qmail_way_is_read(reply: str, reason: str,
                                                        cls: str) -> None:
    assert classify(None, int(reply[:3]), reply[4:]) == (reason, cls)


@pytest.mark.parametrize(("reply", "reason"), [
    ("553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)", "rejected"),
    ("553-Sorry, your email address has been blacklisted", "rejected"),
    ("553-Sorry, your domain has been blacklisted", "rejected"),
    ("550 Rejected by header-based Blocked Senders - block policy for Header From",
     "rejected"),
    ("550 5.7.136 RESOLVER.RST.SenderNotAuthenticated; sender was not authenticated",
     "rejected"),
    ("450 User is receiving mail too quickly", "speeding"),
    ("421 4.7.1 Messages to ann@example.org deferred due to excessive volume. Try again later",
     "speeding"),
    ("421 Max message per connection reached, closing transmission channel", "toomanyconn"),
    ("451 4.7.652 The mail server [192.0.2.251] has exceeded the maximum number of"
     " connections. (S3115) [Name=Protocol Filter Agent][AGT=PFA]", "toomanyconn"),
    ("454 4.7.0 Cannot authenticate due to temporary system problem.", "systemerror"),
    ("550 5.7.1 Invalid credentials for relay [192.0.2.1]. The IP address you've registered"
     " in your Workspace SMTP Relay service doesn't match the domain of the account",
     "norelaying"),
    ("450 4.7.324 dnssec-invalid: Destination domain returned invalid DNSSEC records",
     "securityerror"),
    ("550 5.4.8 MX hosts of example.org failed MTA-STS validation", "securityerror"),
    ("550 envelope blocked - user entry", "rejected"),
    ("552 5.7.0 Our system detected an illegal attachment on your message.", "policyviolation"),
    # RFC 3463's X.6.XXX is the content's, with a detail of the server's own too
    ("550 5.6.11 SMTPSEND.BareLinefeedsAreIllegal; invalid characters", "contenterror"),
])
def test_what_a_refusal_is_about_in_the_providers_words(reply: str, reason: str) -> None:
    assert _read(reply) == (reason, "soft")


@pytest.mark.parametrize("reply", ["550 5.4.4 SMTPSEND.DNS.NonExistentDomain; nonexistent domain",
                                   "553 5.1.2 Domain not found"])
def test_a_domain_unknown_in_reply_to_mail_from_is_the_senders(reply: str) -> None:
    # MAIL FROM names no domain but the sender's: the recipient's address is not in question
    assert _read(reply, "MAIL") == ("rejected", "soft")
    assert outbound.classify(int(reply[:3]), reply[4:9], reply[10:], "MAIL") == (
        "bounced", False)
    why = ("SMTP error from remote mail server after MAIL FROM:<app@sender.test> SIZE=1234:\n"
           f"    host mx.example.org [192.0.2.1]: {reply}")
    assert _one(_EXIM.format(why=why).encode()) == ("ann@example.org", "rejected", "soft")


def test_a_misconfigured_forward_is_not_a_mailbox_that_moved() -> None:
    reason, cls = _read("550 5.2.14 RESOLVER.RST.MisconfiguredForwardingAddress;"
                        " misconfigured forwarding address")
    assert reason != "hasmoved" and cls == "soft"


def test_the_cause_after_because_is_the_reason_in_a_bounce_too() -> None:
    raw = _dsn("The mail system could not deliver your message.", "5.7.30",
               f"Diagnostic-Code: smtp; {GMAIL_DKIM}")
    assert _one(raw) == ("ann@example.org", "authfailure", "soft")


async def test_a_senders_null_mx_at_rcpt_bounces_soft(tmp_path: Path, dns: DNSServer) -> None:
    async with Sink(replies={"ann@a.test": [NULL_MX]}) as sink:
        route(dns, "a.test", (10, "mx.a.test", "127.0.0.1"))
        svc, key = await start_relay(tmp_path, dns, sink.port)
        try:
            mid = await in_thread(submit, svc.bound[0][1], key, ["ann@a.test"])
            detail = await wait_final(svc, mid)
            (bounce,) = [e for e in detail.events if e.type == "email.bounced"]
            assert (bounce.data["class"], bounce.data["reason"]) == ("soft", "rejected")
        finally:
            await svc.stop()
