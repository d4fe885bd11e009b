"""At which SMTP stage a remote refused a message, read from a report's words: the greeting
or HELO ("CONN"), MAIL, RCPT, or DATA (the DATA command or the end of the data).

A refusal says more by when it came than by its words: a server that took RCPT TO and
refused only after the data knows the mailbox; its "user unknown" there means the content
or a filter, not the address.  All patterns are bounded (no nested repetition), so reading
stays linear in the text.
"""

from __future__ import annotations

import functools
import re

STAGES = ("CONN", "MAIL", "RCPT", "DATA")

# "in reply to end of DATA command" (Postfix), "after end of data" / "after RCPT TO:<...>"
# / "after initial connection" (Exim), "while sending DATA" and the like
# (bounce_reasons blanks these out: they are the reporter's words, not the remote's)
STAGE_SAID = re.compile(
    r"(?:in reply to|in response to|after|while sending|during|while receiving)(?: the)?"
    r" (?:pipelined )?(end of data|data|bdat|message (?:body|data|content)|rcpt|mail from"
    r"|initial (?:connection|server greeting)|connect|greeting|banner|ehlo|helo|starttls)\b"
    # "SMTP command: DATA", "Last SMTP command: RCPT TO" (m-FILTER, appliances)
    r"|smtp command:?[\s\-]{0,5}(data|bdat|rcpt|mail|ehlo|helo)\b"
    # "550 5.2.1 <a@example.org>... User Unknown [RCPT_TO]" (qmail-ldap, Yahoo)
    r"|\[(rcpt_to|mail_from|data)\]"
    # Postfix: "host mx.example.org[192.0.2.1] refused to talk to me: 554 ..." (the greeting)
    r"|(refused to talk to me)"
    # DragonFly Mail Agent: "mx.example.org [192.0.2.1] did not like our RCPT TO:"
    r"|did not like our (?:final )?(data|rcpt|mail from)\b"
    # qmail: "192.0.2.1 does not like recipient.", "Connected to 192.0.2.1 but greeting
    # failed." (its "... but sender was rejected." is read apart: the words say why too)
    r"|does not like (recipient|sender)\b|but (greeting) failed"
    # Exchange and gateways: "Technical details: SMTP:RCPT host 192.0.2.1: 553 ..."
    r"|\bsmtp: ?(rcpt|data|mail)\b"
    # Gmail's older reports name the state of its session: "550 550 User unknown (state 14)."
    # (14: the reply to RCPT TO; 15, 17, 18: to DATA or the end of the data)
    r"|\(state (1[4578])\)"
    # qmail-remote when every MX refused: "most progress was RCPT TO response", "192.0.2.1
    # said 550 for RCPT TO response"
    r"|most progress was (rcpt|mail|data)\b|said \d{3} for (rcpt|mail|data)\b"
    # Coremail (163.com, 126.com): "Host mx.example.org(192.0.2.1) RCPT TO said 550 ...";
    # IMail: "RCPT TO generated following response: 553 ..."
    r"|\b(rcpt|mail|data)(?: to| from)? (?:said \d{3}|generated following response)\b", re.I)
_NAMES = {"end of data": "DATA", "data": "DATA", "bdat": "DATA", "message body": "DATA",
          "message data": "DATA", "message content": "DATA", "rcpt": "RCPT",
          "mail from": "MAIL", "mail": "MAIL",
          "initial connection": "CONN", "initial server greeting": "CONN", "connect": "CONN",
          "greeting": "CONN", "banner": "CONN", "ehlo": "CONN", "helo": "CONN",
          "starttls": "CONN", "refused to talk to me": "CONN", "rcpt_to": "RCPT",
          "mail_from": "MAIL", "recipient": "RCPT", "sender": "MAIL",
          "14": "RCPT", "15": "DATA", "17": "DATA", "18": "DATA"}
# words said only of the address itself, that is in reply to RCPT TO: the reporter's own
# summary (Gmail, Google Workspace: "Address not found ... because the address couldn't be
# found"), or the remote's "<a@example.org>: Recipient address rejected: ..." (Postfix's
# smtpd and Exchange Online answer RCPT TO so, and nothing else)
_ADDRESS_REFUSED = re.compile(r"\baddress (?:couldn.?t|could not|can ?not) be found"
                              r"|\baddress not found\b|recipient address rejected:",
                              re.IGNORECASE)
# a session transcript (Sendmail, Exchange, appliances): ">>> DATA" then "<<< 550 ..."
# ("[ \t]*", not "\s*": a blank run must not be rescanned from every line it spans)
_TRANSCRIPT_SENT = re.compile(r"^[ \t]*>>> (\w+|\.)", re.M)
_SENT_NAMES = {"DATA": "DATA", "BDAT": "DATA", ".": "DATA", "RCPT": "RCPT", "MAIL": "MAIL",
               "EHLO": "CONN", "HELO": "CONN", "STARTTLS": "CONN"}
_TRANSCRIPT_REPLY = re.compile(r"^[ \t]*<<< [245]\d\d", re.M)
_REPLY_LINE = re.compile(r"[245]\d\d[ -].{0,20}")


def smtp_stage(context: str, address: str, diagnostic: str, transcript: str = "") -> str | None:
    """The stage the remote refused at: what the report says it replied to, or in a session
    transcript, the last command sent before the reply about this recipient."""
    if stage := _stage_said(context):
        return stage
    transcript = transcript or context
    lower = transcript.lower()
    reply = _reply_line(diagnostic).lower()
    # a reply line is the remote's own: its last copy is the one in the transcript (the first
    # is often a summary above it); an address alone, its first mention
    at = lower.rfind(reply) if reply else lower.find(address.lower()) if address else -1
    if at < 0:
        return None
    if reply and not _on_reply_line(transcript, at):
        # Sendmail repeats the remote's "<<< 550 ..." in its own summary line below it: the
        # copy in the transcript says which command it answered
        quoted = [i for i in _occurrences(lower, reply, at) if _on_reply_line(transcript, i)]
        at = quoted[-1] if quoted else at
    if m := STAGE_SAID.search(transcript, at, at + 300):  # "550 ...  SMTP command: DATA"
        return _said(m)
    return _transcript_stage(transcript, at)


# A report often gives all its recipients the same words: they are read once.
@functools.lru_cache(maxsize=256)
def _stage_said(context: str) -> str | None:
    """The stage the words about a recipient say in so many words, if they do."""
    if m := STAGE_SAID.search(context):
        return _said(m)
    if "ail" in context and "sent the message" in context:  # qmail: "failed after I sent..."
        return "DATA"
    if "but sender was rejected" in context:  # qmail: "Connected to ... but sender was ..."
        return "MAIL"
    if _ADDRESS_REFUSED.search(context):
        return "RCPT"
    return None


def _transcript_stage(transcript: str, at: int) -> str | None:
    """In a session transcript, the command a "<<<" reply at `at` answered: the last one sent
    before it, except that with PIPELINING the replies to RCPT come after DATA is sent, so a
    reply followed by another before the next command answered a RCPT, not the DATA."""
    line = transcript.rfind("\n", 0, at) + 1
    if not transcript[line:at].lstrip().startswith("<<<"):
        return None  # the words are not a reply quoted from a transcript
    sent = [m.group(1).upper() for m in _TRANSCRIPT_SENT.finditer(transcript, 0, at)]
    stage = _SENT_NAMES.get(sent[-1]) if sent else None
    if stage == "DATA":
        end = transcript.find("\n", at)
        nxt = _TRANSCRIPT_SENT.search(transcript, end if end > 0 else len(transcript))
        if _TRANSCRIPT_REPLY.search(transcript, end if end > 0 else len(transcript),
                                    nxt.start() if nxt else len(transcript)):
            return "RCPT"
    return stage


def _on_reply_line(transcript: str, at: int) -> bool:
    line = transcript.rfind("\n", 0, at) + 1
    return transcript[line:at].lstrip().startswith("<<<")


def _occurrences(lower: str, needle: str, end: int) -> list[int]:
    """Where `needle` starts in `lower` before `end` (at most 20 places)."""
    found: list[int] = []
    i = lower.find(needle)
    while 0 <= i < end and len(found) < 20:
        found.append(i)
        i = lower.find(needle, i + 1)
    return found


def _said(m: re.Match[str]) -> str:
    return _NAMES[next(g for g in m.groups() if g).lower()]


def _reply_line(diagnostic: str) -> str:
    m = _REPLY_LINE.search(diagnostic)
    return m.group(0) if m else ""
