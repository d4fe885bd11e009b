"""One recipient's outcome in a report: the reason and hard/soft class of its action, status,
reply code and the remote's words, read with the SMTP stage the remote refused at."""

from __future__ import annotations

import re

from .bounce_reasons import NAME_SERVICE, NO_CAUSE, classify, may_be_hard
from .bounce_report import DELIVERED_ACTIONS, BouncedRecipient
from .bounce_stage import smtp_stage

# what a retrying queue saw last, not why the message failed in the end
_TIMED_OUT = re.compile(r"timed? ?out", re.I)
# a reporter's own look-up of the mailbox in its directory (Domino, Exchange 2003, IMail,
# Verizon's MMS gateway), where a plain report's words are otherwise a remote's reply quoted
# without its code or command, as likely a filter's answer as the address's
_OWN_DIRECTORY = re.compile(
    r"not listed in (the )?(domino directory|public name & address book)"
    r"|recipient name is not recognized|\bunknown user: |invalid final delivery userid"
    r"|no valid recipients for this", re.I)

# OpenSMTPD (up to 6.8, as Debian 12 ships it) writes its own expiry in its delay notice's
# words ("A message is delayed for more than 0 seconds ... Envelope expired", Action:
# delayed; OpenSMTPD pull request 1133): the message was dropped, not delayed
_DROPPED = re.compile(r"\benvelope expired\b", re.I)
# RFC 3463's X.4.2 bad connection, X.4.4 unable to route, X.4.6 routing loop
_NO_WAY_STATUS = frozenset({".4.2", ".4.4", ".4.6"})
# a network with no way to the host (no route, unreachable, a loop), which waiting for does
# not mend
_NO_WAY = re.compile(r"no route to host|unreachable|unroutable|unrouteable|\bloop|too many hops",
                     re.I)


def _passes(diagnostic: str) -> bool:
    """Whether the trouble the words tell of passes with waiting: not a name service failure
    (the reporter's own) and not a network with no way to the host."""
    return not NAME_SERVICE.search(diagnostic) and not _NO_WAY.search(diagnostic)


def recipient(address: str, action: str, status: str | None, reply: int | None,
              diagnostic: str, remote: str | None, context: str = "",
              transcript: str = "", remote_reply: bool | None = None,
              own_host: bool = False) -> BouncedRecipient:
    """`remote_reply`: `diagnostic` is a remote server's reply though it quotes no code
    (bounce_reasons.classify); None: words of a report's prose, which are one unless they
    are a reporter's own directory look-up. `own_host`: the reporter keeps the recipient's
    domain and names no remote, so the words are the mailbox host's own."""
    if remote_reply is None:
        remote_reply = not _OWN_DIRECTORY.search(diagnostic)
    if action == "delayed" and _DROPPED.search(diagnostic):
        action = "failed"
    if action in DELIVERED_ACTIONS:
        reason, cls = "delivered", "soft"
    else:
        if reply is not None and reply < 400:
            reply = None  # a report of a failure quotes no 2xx reply: a number in other words
        if action == "delayed" and status and status[0] == "5":
            status = "4" + status[1:]
        stage = smtp_stage(context or diagnostic, address, diagnostic, transcript)
        reason, cls = classify(status, reply, diagnostic, stage=stage,
                               remote_reply=remote_reply, own_host=own_host)
        if action in ("delayed", "expired") and (reason == "networkerror" or reason in NO_CAUSE) \
                and _passes(diagnostic) and not (status and status[1:] in _NO_WAY_STATUS):
            # still retrying (or no longer: SendGrid's "expired") after trouble that passes,
            # a timeout or no answer: the queue's delay, not a network that has no way there
            reason = "expired"
        if action == "delayed":
            cls = "soft"
        elif reason == "userunknown" and may_be_hard(reason, "", stage):
            cls = "hard"  # the remote said so, however transient its code, until giving up
        elif action == "failed" and (status or "").startswith("4") and (
                reason in NO_CAUSE or status == "4.4.7" or _TIMED_OUT.search(diagnostic)
                or (reason == "networkerror" and status[1:] not in _NO_WAY_STATUS)) \
                and not (reason == "networkerror" and not _passes(diagnostic)):
            # failed with a temporary status: relay's peer retried until its queue ran out
            # (after no answer, or a connection refused: trouble that passes, not a name
            # service failure or a network with no way there)
            reason = "expired"
        elif action == "failed" and status in (None, "", "5.0.0") and reason == "networkerror" and (
                reply is None or 400 <= reply < 500) and _passes(diagnostic):
            # failed for good on trouble that passes (no answer, a 4xx reply) and no code of
            # its own, or X.0.0, which says no more (nullmailer's "5.0.0 Connect failed"): the
            # peer gave up retrying, its queue lifetime ran out (a name service failure is the
            # reporter's own trouble, and stays one)
            reason = "expired"
    return BouncedRecipient(address=address, action=action, status=status, reason=reason,
                            bounce_class=cls, diagnostic=diagnostic, remote_mta=remote,
                            reply_code=reply)

