"""Why a message bounced: a reason from a fixed vocabulary, and a hard/soft class.

Read from the RFC 3463 enhanced status code, the SMTP reply code, the remote's text and,
when known, the SMTP stage it refused at: a precise code stands alone; a vague one (5.0.0,
5.7.1, ...) yields to what the sentence says (bounce_phrases); and the stage says what the
refusal can be about.  Hard only when the address itself is bad and will stay bad: never for a refusal of
the sender (MAIL) or of the client (greeting, HELO), nor after the server took RCPT TO,
unless the code itself names the address as bad.
"""

from __future__ import annotations

import functools
import re

from .bounce_phrases import phrase_reason
from .bounce_stage import STAGE_SAID

REASONS: tuple[str, ...] = (
    "userunknown", "hostunknown", "hasmoved", "mailboxfull", "mesgtoobig", "exceedlimit",
    "filtered", "rejected", "blocked", "spamdetected", "virusdetected", "policyviolation",
    "authfailure", "requireptr", "badreputation", "notcompliantrfc", "expired", "suspend",
    "onhold", "networkerror", "systemerror", "systemfull", "toomanyconn", "speeding",
    "norelaying", "notaccept", "securityerror", "syntaxerror", "contenterror", "mailererror",
    "vacation", "feedback", "delivered", "undefined",
)
# no cause named: words that say none ("onhold", Sisimai's word) or none at all ("undefined")
NO_CAUSE = frozenset({"onhold", "undefined"})
# the address is bad and stays bad: the only reasons that may suppress a recipient
HARD_REASONS = frozenset({"userunknown", "hostunknown", "hasmoved", "notaccept"})
# RFC 3463 X.1.x (addressing) codes that do not name the recipient's address as bad: X.1.5
# says it is valid, X.1.7 and X.1.8 are about the sender's
_ADDRESS_NOT_BAD = frozenset({"1.5", "1.7", "1.8"})

STATUS_RE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")
# qmail's way of giving the status, at the end of the text: "550 Invalid recipient (#5.1.1)"
_HASH_STATUS = re.compile(r"\(#([245]\.\d{1,3}\.\d{1,3})\)")
# a match may start only where a run of local-part characters starts: tried from each of a
# long run's characters, the run was read again each time (1.2 s for 20,000 letters)
ADDRESS_RE = re.compile(r"(?<![\w.!#$%&'*+/=?^`{|}~\-])[\w.!#$%&'*+/=?^`{|}~\-]+"
                        r"@[\w\-]+(?:\.[\w\-]+)+", re.U)


# RFC 3463 subject.detail codes whose meaning is precise enough to stand alone
_BY_STATUS: dict[str, str] = {
    "1.1": "userunknown", "1.2": "hostunknown", "1.3": "userunknown", "1.4": "userunknown",
    "1.5": "userunknown", "1.6": "hasmoved", "1.7": "rejected", "1.8": "rejected",
    "1.10": "notaccept", "2.1": "suspend", "2.2": "mailboxfull", "2.3": "exceedlimit",
    "2.4": "filtered", "3.0": "systemerror", "3.1": "systemfull", "3.2": "notaccept",
    "3.3": "systemerror", "3.4": "mesgtoobig", "3.5": "systemerror", "4.0": "networkerror",
    "4.1": "networkerror", "4.2": "networkerror", "4.3": "systemerror", "4.4": "hostunknown",
    "4.5": "systemfull", "4.6": "networkerror", "4.7": "expired", "5.0": "syntaxerror",
    "5.1": "syntaxerror", "5.2": "syntaxerror", "5.3": "toomanyconn", "5.4": "systemerror",
    "5.5": "systemerror", "5.6": "securityerror", "6.0": "contenterror",
    "6.1": "contenterror", "6.2": "contenterror", "6.3": "contenterror", "6.5": "contenterror",
    "6.6": "contenterror", "6.7": "contenterror", "6.8": "contenterror", "6.9": "contenterror",
    "7.0": "securityerror", "7.1": "securityerror", "7.2": "rejected", "7.3": "securityerror",
    "7.4": "securityerror", "7.5": "securityerror",
    "7.6": "securityerror", "7.7": "securityerror", "7.8": "authfailure", "7.9": "policyviolation",
    "7.10": "securityerror", "7.11": "securityerror", "7.13": "suspend", "7.14": "securityerror",
    "7.15": "securityerror", "7.16": "mesgtoobig", "7.17": "suspend", "7.18": "suspend",
    "7.19": "policyviolation", "7.20": "authfailure", "7.21": "authfailure",
    "7.22": "authfailure", "7.23": "authfailure", "7.24": "authfailure", "7.25": "requireptr",
    "7.26": "authfailure", "7.27": "rejected", "7.28": "spamdetected", "7.29": "authfailure",
    "7.30": "securityerror",
}
# (X.7.27 is the sender's null MX, RFC 7505 4.2: the sender refused, the recipient's address
# as good as before)
# codes that say little: a phrase in the text wins over them (servers send 5.1.1, 5.7.1 or
# 5.0.0 for rejections of every kind; the sentence then says which)
_VAGUE = frozenset({"5.5", "0.0", "7.0", "7.1", "5.0", "1.0", "2.0", "3.0", "4.0", "7.2", "1.1",
                    "4.7", "4.4", "5.2", "4.1", "4.2", "2.1", "6.0", "1.3", "1.10",
                    # the newest codes, which the largest providers give meanings of their own
                    # (Gmail: 5.7.27 an SPF failure, 4.7.29 no TLS, 5.7.30 a DKIM failure)
                    "7.27", "7.28", "7.29", "7.30"})
# what the words may say over an explicit X.1.1 ("bad destination mailbox address"): that
# the mailbox is there but full, disabled, moved or filtered by its owner, or that the refusal
# was of the relaying, the client (its address, rate, name, authentication), the sender or
# of any mail at all (Sisimai's rule, widened to the client's other faults); a
# scanner's or a policy's words beside X.1.1 (a disclaimer or a banner, as often) do not
# unname it
_BEATS_BAD_MAILBOX = frozenset({"userunknown", "norelaying", "blocked", "mailboxfull",
                                "mesgtoobig", "hasmoved", "rejected", "notaccept", "suspend",
                                "expired",
                                "mailererror", "filtered", "toomanyconn", "speeding",
                                "badreputation", "requireptr", "authfailure"})
# Exim's "Unrouteable address": no router of the one saying it takes the address. Its own
# report says so of a domain it found no way to (hostunknown); a remote's answer to RCPT TO,
# the domain's MX by then, or a report from a host of the recipient's own domain, of a local
# part it does not have
_UNROUTEABLE_ADDRESS = re.compile(r"\bunrouteable address\b", re.I)
# sendmail's access map refusing an address ("<ann@example.com>... Access denied"); its
# refusal of the client names none ("550 5.7.1 Access denied"). Other words after a named
# address may still be about the client ("<ann@...>... Please use the smtp server of your ISP")
_NAMES_AN_ADDRESS = re.compile(r"<[^<>\s]+@[^<>\s]+>\.\.\. access denied\b", re.I)
# explicit codes that say what happened but not why, and the reason whose words say why:
# X.3.2 "system not accepting network messages" (a rate limit), X.5.1 "invalid command"
# ("530 5.5.1 Must issue a STARTTLS command first", "Authentication Required"), X.1.6
# "mailbox has moved" where the words say it never was there (OpenSMTPD's 5.1.6 "Permanent
# failure in user lookup")
_WORDS_SAY_WHY: dict[str, frozenset[str]] = {"3.2": frozenset({"toomanyconn", "speeding"}),
                                             "5.1": frozenset({"securityerror"}),
                                             "1.6": frozenset({"userunknown"}),
                                             # "550 Tried all MXs": its MX hosts exist
                                             "1.2": frozenset({"expired"})}
# RFC 5321 reply codes, where one means one thing (550 and 553 carry anything, so they
# say nothing about the address by themselves)
_BY_REPLY = {421: "systemerror", 451: "systemerror", 452: "systemfull", 551: "hasmoved",
             552: "mailboxfull", 554: "rejected", 556: "notaccept", 500: "syntaxerror",
             501: "syntaxerror", 530: "securityerror", 535: "securityerror"}


# X.2.3 is "message length exceeds administrative limit", which Sisimai reads as a limit
# exceeded; a server that says the message itself is too large (Exchange's
# RESOLVER.RST.RecipSizeLimit / SendSizeLimit "message too large for this recipient") means
# its size
_TOO_BIG = re.compile(r"\btoo (large|big)\b", re.I)
# Postfix's own words on a destination it marked unreachable, not the remote's on an account
# and its frame around a remote's reply ("host mx.example.org[192.0.2.7] said:"), whose
# "host" is no host that was blocked or refused
_REPORTER_SAID = re.compile(r"delivery temporarily suspended:|\bhost \S{1,300} said:", re.I)
_GAVE_UP = re.compile(r"in the queue too long|not going to try again|retry (time|timeout|period)"
                      r" (exceeded|expired)|delivery time expired|could not be delivered"
                      r" (for|within) \d|failing for a long time|will be retried|envelope"
                      r" expired|message expired|still undeliver|delivery expired"
                      r"|message too old|too many failures|tried all mx"
                      r"|after multiple retries|within the allowed queue period"
                      r"|failed (after )?\d+ (delivery )?attempts", re.I)


# words that the account itself is not there ("This user doesn't have a example.com account",
# "unknown user account"), not the terse "user unknown" a filter or a carrier answers for a
# mailbox that refuses this sender: believed from a remote's reply with its code, whose
# command is not said.
# _ACCOUNT_ABSENT, the ones among them no filter says of a mailbox that exists, even after
# the data (Yahoo took RCPT TO and answered the data "554 delivery error: dd This user
# doesn't have a yahoo.com account"): an account's own absence, said in full
_ACCOUNT_ABSENT = (r"(does not|doesn.?t) have an? .{0,40}\baccount\b"
                   r"|\b(no such|non-?existent) (user )?account\b")
_NO_SUCH_ACCOUNT = re.compile(_ACCOUNT_ABSENT + r"|\b(unknown|invalid) (user )?account\b"
                              # Haraka's answer to RCPT TO for an address nothing accepted
                              r"|\bI cannot deliver mail for\b", re.IGNORECASE)
# RFC 5321's own text for 550, which it glosses "mailbox not found, no access, or command
# rejected for policy reasons": by itself no more the address's than a filter's, but with
# X.5.0 it is Outlook.com's documented answer for a recipient it does not have
_RFC_MAILBOX_UNAVAILABLE = re.compile(r"requested action not taken: mailbox unavailable",
                                      re.IGNORECASE)
_NO_ACCOUNT_AT_ALL = re.compile(_ACCOUNT_ABSENT, re.IGNORECASE)
# the mailbox host's local delivery agent speaking for itself ("mail.local: unknown user:
# ann", "procmail: ...", "maildrop: ..."): no filter in front of a mailbox, the mailbox's own
_LOCAL_AGENT = re.compile(r"\b(?:mail\.local|procmail|maildrop|dovecot-lda|deliver|lmtp)"
                          r"(?:\[\d+\])?: ", re.IGNORECASE)


# Postfix's pipe(8) quoting the local command that failed ("permission denied. Command
# output: Mail quota exceeded."): what the output says of the mailbox, else the mailer's error
_COMMAND_OUTPUT = re.compile(r"\bcommand output:(.*)", re.IGNORECASE | re.DOTALL)
_OF_A_MAILBOX = frozenset({"userunknown", "mailboxfull", "suspend", "hasmoved", "mesgtoobig",
                           "exceedlimit", "filtered", "spamdetected", "virusdetected"})


# a scanner's footer on the report ("This message has been scanned for viruses and dangerous
# content by MailScanner, and is believed to be clean."): no finding of a virus
_SCANNED = re.compile(r"\b(this (e-?mail|message) (has been |was |is )?)?(scanned|checked) for"
                      r" viruses[^.<>]{0,200}", re.I)


# conditions that last, so that they, not the queue's giving up, are why the mail failed:
# a full mailbox, or a sender the remote distrusts
_OUTLASTS_GIVING_UP = frozenset({"mailboxfull", "badreputation"})
# a failure to look the destination up: the reporter's own trouble, that the queue's giving
# up after it does not change
NAME_SERVICE = re.compile(r"name serv|\bdns\b|host not found|lookup fail", re.IGNORECASE)


@functools.lru_cache(maxsize=256)
def classify(status: str | None, reply_code: int | None, text: str, *,
             stage: str | None = None, remote_reply: bool = False,
             own_host: bool = False) -> tuple[str, str]:
    """(reason, "hard"|"soft") from an RFC 3463 status, an SMTP reply code and the text, and
    the stage the remote refused at (bounce_stage.STAGES) when known.  `remote_reply`: the
    text is a remote server's reply though it quotes no code (a report's Diagnostic-Code of
    type smtp or of none; a plain report's words that are no reporter's own look-up).
    `own_host`: the words are those of the host that keeps the recipient's domain (a report
    from it that names no remote), believed as a local delivery agent's are."""
    cls, detail = "", ""
    if not status and text and (hashed := _HASH_STATUS.search(text)):
        status = hashed.group(1)
    if status and (m := STATUS_RE.fullmatch(status.strip())):
        cls, detail = m.group(1), f"{int(m.group(2))}.{int(m.group(3))}"
    if not cls and reply_code:
        cls = str(reply_code)[0]
    if cls == "2":
        return "delivered", "soft"
    # one line: a multi-line reply's words run on ("... is\nlocally blacklisted here")
    said = " ".join(text.split()) if text else ""
    text = ADDRESS_RE.sub(" ", said)  # a local part such as "mailbox-full" says nothing
    text = STAGE_SAID.sub(" ", text)  # "after MAIL FROM:": the reporter's words, not the remote's
    text = _REPORTER_SAID.sub(" ", text)
    text = _SCANNED.sub(" ", text)
    text = text.replace("_", " ")  # "550 BAD_RECIPIENT", "MAILBOX_FULL": words in a token
    phrase = phrase_reason(text) if text else None
    if text and (output := _COMMAND_OUTPUT.search(text)):
        said = phrase_reason(output.group(1))
        phrase = said if said in _OF_A_MAILBOX else "mailererror"
    if text and _GAVE_UP.search(text) and phrase not in _OUTLASTS_GIVING_UP and not (
            phrase == "networkerror" and NAME_SERVICE.search(text)):
        phrase = "expired"
    if detail in ("1.1", "1.3") and phrase not in _BEATS_BAD_MAILBOX:
        # X.1.1 names the mailbox bad, X.1.3 its address's syntax ("not a valid RFC 5321
        # address"); words of a filter or of content do not unname it
        phrase = None
    reason = None
    if detail and detail not in _VAGUE:
        reason = _BY_STATUS.get(detail)
    if reason is None or (phrase and detail in _VAGUE) or (
            phrase in _WORDS_SAY_WHY.get(detail, ())):
        reason = phrase or _BY_STATUS.get(detail) or (
            _BY_REPLY.get(reply_code) if reply_code else None)
    if reason is None and cls == "5" and detail == "2.0":
        reason = "filtered"  # "other mailbox status", nothing more said: the mailbox refused it
    if reason is None and detail.startswith("6."):
        # RFC 3463's X.6.XXX, "message content or media status", with a detail of a server's
        # own (Exchange's 5.6.11 "invalid characters"): the content, whatever words follow
        reason = "contenterror"
    if reason is None:
        # a remote's words that name no cause are onhold; no words at all, undefined
        reason = "expired" if cls == "4" else "onhold" if said.strip() else "undefined"
    if detail == "2.3" and _TOO_BIG.search(text):
        reason = "mesgtoobig"  # X.2.3 with "message too large": the message's size, not a count
    elif phrase == "mailboxfull" and cls in ("4", "5"):
        # a full mailbox ("overdrawn his diskspace quota" under X.2.3), whatever else the code
        # says: Sisimai weighs that first of all
        reason = "mailboxfull"
    if reason == "hostunknown" and cls == "4":
        reason = "networkerror"  # a DNS answer that may still change
    # the mailbox host's own words: typed as its own (not a reply it quotes, nor prose that
    # may quote a filter's "unknown user"), or its router's, which no filter says
    unrouteable = _UNROUTEABLE_ADDRESS.search(text) is not None
    own_host = own_host and (not remote_reply or unrouteable)
    if reason == "hostunknown" and unrouteable and (own_host or (
            stage == "RCPT" and (reply_code is not None or remote_reply))):
        reason = "userunknown"
    if reason == "blocked" and stage == "MAIL" and _NAMES_AN_ADDRESS.search(said):
        reason = "rejected"  # the access map refused MAIL FROM's one address: the sender
    absent = stage == "DATA" and reason == "userunknown" and _NO_ACCOUNT_AT_ALL.search(text)
    if absent:
        stage = None  # the words say more than when they were said
    generic = _RFC_MAILBOX_UNAVAILABLE.search(text)  # a remote's reply, with a code or not
    reason = by_stage(reason, detail, stage,
                      quoted=(reply_code is not None or generic is not None or remote_reply)
                      and not absent and not own_host and not _LOCAL_AGENT.search(text)
                      and not (reply_code is not None and _NO_SUCH_ACCOUNT.search(text))
                      and not (detail == "5.0" and generic))
    hard = reason in HARD_REASONS and cls != "4" and may_be_hard(reason, detail, stage)
    return reason, "hard" if hard else "soft"


# reasons that cannot be why a server refuses a client for good at its greeting or HELO,
# among them any about a mailbox (full, disabled, moved, over a limit): none was named yet
_NOT_OF_A_CLIENT = frozenset({"userunknown", *NO_CAUSE, "filtered", "rejected", "systemerror",
                              "syntaxerror", "mailboxfull", "suspend", "hasmoved", "exceedlimit",
                              "mesgtoobig"})


def names_address(detail: str) -> bool:
    """Whether an RFC 3463 subject.detail says the recipient's address is bad (X.1.x, but
    for the few that say it is valid or are about the sender's; Exchange's X.1.351 and
    X.1.10 count)."""
    return detail.startswith("1.") and detail not in _ADDRESS_NOT_BAD


def by_stage(reason: str, detail: str, stage: str | None,
             quoted: bool = False) -> str:
    """The reason corrected by what the refused command was about.  `quoted`: the text
    quotes a remote server's SMTP reply (a reply code), not the reporting host's own words."""
    if stage == "MAIL" and reason in ("userunknown", "hostunknown", "filtered", *NO_CAUSE):
        # it refused the sender, not the recipient: MAIL FROM names no domain but the
        # sender's, so a domain it does not know there is the sender's
        return "rejected"
    if stage == "CONN" and reason in _NOT_OF_A_CLIENT:
        # it refused the client before hearing of any address, for good (5xx) or for now
        # (4xx: "421 Service not available" at the greeting); too many connections and the
        # like keep their own reason
        return "blocked"
    if reason == "userunknown" and stage != "RCPT" and not names_address(detail) and (
            stage == "DATA" or quoted or detail.startswith(("2.", "7."))):
        # "user unknown" is believed from the code (X.1.x), in reply to RCPT TO, or from the
        # host that keeps the mailbox saying so in its own words.  After RCPT TO was taken
        # the mailbox exists and a filter refused the data; X.2.x says the mailbox exists,
        # X.7.x that policy refused; and a remote reply quoted without saying to which
        # command is as likely a filter's (carriers and gateways answer "user unknown" for
        # a mailbox that refuses this sender) as the address's
        return "filtered"
    return reason


def may_be_hard(reason: str, detail: str, stage: str | None) -> bool:
    """Whether a refusal at this stage can say the recipient's address is bad: at RCPT or
    at an unknown stage yes; after RCPT TO was taken only with an addressing code; before
    it only of the whole domain (at the greeting or HELO: no SMTP service, no such host; at
    MAIL, whose only domain is the sender's: a server that takes no mail at all)."""
    if stage == "CONN":
        return reason in ("hostunknown", "notaccept")
    if stage == "MAIL":
        return reason == "notaccept"  # a server that takes no mail at all
    return stage != "DATA" or names_address(detail)
