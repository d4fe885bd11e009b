"""One message over an open session: MAIL, RCPT for each recipient, DATA, and a result
per recipient from what the server replied (or from what the session cannot carry)."""

from __future__ import annotations

import re
import time

import aiosmtplib
from aiosmtplib import SMTPResponse

from .outbound import OutMessage, OutRecipient, Result, classify, enhanced_code
from .pipelining import QueuedReplies
from .sessions import Session


async def transaction(session: Session, msg: OutMessage, *, timeout: float,
                      data_timeout: float | None = None,
                      then: OutMessage | None = None) -> list[Result]:
    """`timeout` for each reply but the data's: `data_timeout` (default `timeout`), counted
    from when the data stops moving.

    `then`: the message to go next over this session, whose MAIL, RCPT and DATA may then
    follow this one's data in the same write (RFC 2920 3.1) when the server pipelines:
    a round trip a message less. Its transaction then starts by reading their replies."""
    started = time.time()
    smtp = session.smtp

    def done(r: OutRecipient, code: int | None, text: str, outcome: str | None = None,
             enhanced: str | None = None, hard: bool | None = None,
             stage: str | None = None) -> Result:
        enhanced = enhanced or enhanced_code(text)
        kind, is_hard = classify(code, enhanced, text, stage)
        return Result(
            recipient_id=r.id, message_id=msg.id, outcome=outcome or kind, code=code,
            enhanced=enhanced, text=text, hard=is_hard if hard is None else hard,
            mx_host=session.target.hostname, ip=session.target.address,
            port=session.target.port, tls_version=session.tls_version,
            tls_cipher=session.tls_cipher, started_at=started,
            duration=time.time() - started, peer_dsn=session.supports("dsn"),
            source_ip=session.source.address, tls_policy=session.policy.label,
            tls_failure=session.tls_failure, stage=stage)

    refusal = _unsendable(session, msg)
    if refusal is not None:
        text, enhanced = refusal
        return [done(r, None, text, "bounced", enhanced, False) for r in msg.recipients]
    if _pipelines(session):
        if then is not None and _unsendable(session, then) is not None:
            then = None  # it is refused before a word is sent: not written ahead
        replies = await _pipelined(session, msg, timeout, data_timeout or timeout, then)
        if isinstance(replies, SMTPResponse):  # MAIL refused, then the server hung up
            return [done(r, replies.code, replies.message, stage="MAIL")
                    for r in msg.recipients]
    else:
        replies = await _one_by_one(session, msg, timeout, data_timeout or timeout)
    mail, rcpts, final = replies
    # after the reply to the data's end the server is ready for MAIL again (RFC 5321
    # 4.1.1.4); a RSET then would land behind the next message's commands written ahead
    ahead = session.ahead is not None
    if mail.code != 250:
        if not ahead:
            await _rset(smtp)
        return [done(r, mail.code, mail.message, stage="MAIL") for r in msg.recipients]
    accepted, results = [], []
    for r, rcpt in zip(msg.recipients, rcpts, strict=True):
        if rcpt.code in (250, 251):
            accepted.append(r)
        else:
            results.append(done(r, rcpt.code, rcpt.message, stage="RCPT"))
    if not accepted:
        if not ahead:
            await _rset(smtp)
        return results
    assert final is not None  # sent whenever a recipient was taken
    if final.code != 250 and not ahead:
        await _rset(smtp)
    return results + [done(r, final.code, final.message, stage="DATA") for r in accepted]


def _pipelines(session: Session) -> bool:
    return session.supports("pipelining") and isinstance(session.smtp.protocol, QueuedReplies)


def _unsendable(session: Session, msg: OutMessage) -> tuple[str, str] | None:
    """Why this session cannot carry the message at all (text, enhanced code), or None."""
    if msg.smtputf8 and not session.supports("smtputf8"):
        return (f"{session.target.hostname} does not support SMTPUTF8, which this message "
                "needs", "5.6.7")
    size = session.smtp.esmtp_extensions.get("size", "")
    if size.isdigit() and int(size) and len(msg.data) > int(size):
        return (f"message of {len(msg.data)} octets is larger than "
                f"{session.target.hostname} accepts ({size})", "5.3.4")
    return None


# MAIL's reply, each RCPT's (none when MAIL was refused), and the end of the data's (or
# DATA's refusal; None when no recipient was taken)
Replies = tuple[SMTPResponse, list[SMTPResponse], SMTPResponse | None]


async def _one_by_one(session: Session, msg: OutMessage, timeout: float,
                      data_timeout: float) -> Replies:
    smtp = session.smtp
    mail = await smtp.execute_command(b"MAIL", *_mail_args(session, msg), timeout=timeout)
    if mail.code != 250:
        return mail, [], None
    rcpts: list[SMTPResponse] = []
    for r in msg.recipients:
        rcpts.append(await smtp.execute_command(b"RCPT", *_rcpt_args(session, r),
                                                timeout=timeout))
        if rcpts[-1].code == 421:  # the server closes the channel (aiosmtplib has closed it)
            return mail, _closing(rcpts, len(msg.recipients)), None
    if not any(rcpt.code in (250, 251) for rcpt in rcpts):
        return mail, rcpts, None
    return mail, rcpts, await _data(smtp, msg.data, timeout, data_timeout)


def _closing(rcpts: list[SMTPResponse], count: int) -> list[SMTPResponse]:
    """RCPT's replies when the last was a 421 (RFC 5321 3.8, the server closing the
    channel): a recipient refused keeps its own reply, every other one gets the 421, the
    words that say why the message was not sent."""
    closing = rcpts[-1]
    kept = [r if r.code not in (250, 251) else closing for r in rcpts]
    return kept + [closing] * (count - len(kept))


class NotStarted(aiosmtplib.SMTPServerDisconnected):
    """The connection ended before the server answered the MAIL that was written ahead
    with the last message's data: nothing of this message was taken, so it may go over
    another session at once (like a parked session found closed)."""


async def _pipelined(session: Session, msg: OutMessage, timeout: float, data_timeout: float,
                     then: OutMessage | None) -> Replies | SMTPResponse:
    """MAIL, every RCPT and DATA in one write (RFC 2920), their replies read in order; then
    the message, or (no recipient taken) the end of an empty one, which the server refuses,
    with `then`'s MAIL, RCPT and DATA after it. MAIL's reply alone when it refused and the
    server hung up (a 421)."""
    smtp = session.smtp
    protocol = smtp.protocol
    assert isinstance(protocol, QueuedReplies)
    refused_all = False
    assert session.ahead is None or session.ahead is msg, "the message written ahead comes next"
    written_ahead = session.ahead is msg  # with the last message's data
    session.ahead = None
    try:
        if not written_ahead:
            protocol.write_commands(_envelope(session, msg))
        try:
            mail = await protocol.read_response(timeout=timeout)
        except aiosmtplib.SMTPServerDisconnected as exc:
            if written_ahead:
                raise NotStarted(str(exc)) from exc
            raise
        refused_all = mail.code != 250  # what follows is moot (a 421 hangs up at once)
        rcpts: list[SMTPResponse] = []
        for _ in msg.recipients:
            rcpts.append(await protocol.read_response(timeout=timeout))
            if rcpts[-1].code == 421:  # and the server hangs up: no more replies come
                smtp.close()
                return mail, _closing(rcpts, len(msg.recipients)), None
        start = await protocol.read_response(timeout=timeout)
        if start.code == 354:  # the data, or an empty message if no recipient was taken
            ok = mail.code == 250 and any(r.code in (250, 251) for r in rcpts)
            data = wire_data(msg.data) if ok else b".\r\n"
            protocol.write_commands(_envelope(session, then) if then else [], after_data=data)
            session.ahead = then
            final = await protocol.read_response(timeout=data_timeout, sending=True)
        else:
            final = start
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        if not refused_all:
            raise
        return mail
    return mail, rcpts, final


def _envelope(session: Session, msg: OutMessage) -> list[bytes]:
    return ([b" ".join([b"MAIL", *_mail_args(session, msg)])]
            + [b" ".join([b"RCPT", *_rcpt_args(session, r)]) for r in msg.recipients]
            + [b"DATA"])


async def _data(smtp: aiosmtplib.SMTP, data: bytes, timeout: float,
                data_timeout: float) -> SMTPResponse:
    """DATA and the message, as aiosmtplib's SMTP.data sends them, but with its two passes
    over the message (line endings, dot-stuffing) made only when the message needs them:
    they were an eighth of the delivery worker's CPU."""
    start = await smtp.execute_command(b"DATA", timeout=timeout)
    if start.code != 354:
        return start
    protocol = smtp.protocol
    assert protocol is not None  # execute_command raised if the connection was lost
    try:
        if isinstance(protocol, QueuedReplies):
            protocol.write_commands([], after_data=wire_data(data))
            return await protocol.read_response(timeout=data_timeout, sending=True)
        protocol.write(wire_data(data))
        # no await between the write and this read: the reply cannot arrive unawaited
        return await protocol.read_response(timeout=data_timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        raise


_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")


def wire_data(data: bytes) -> bytes:
    """A message as DATA carries it (RFC 5321 4.5.2): CRLF line endings, a line that starts
    with "." doubled, and the ending "." line."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        data = _LINE_ENDINGS.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b".") or b"\n." in data:
        data = _LEADING_DOT.sub(b"..", data)
    return data + b".\r\n"


def _mail_args(session: Session, msg: OutMessage) -> list[bytes]:
    args = [b"FROM:<" + msg.mail_from.encode("utf-8") + b">"]
    if session.supports("size"):
        args.append(f"SIZE={len(msg.data)}".encode())
    if session.supports("8bitmime") and not msg.data.isascii():
        args.append(b"BODY=8BITMIME")
    if msg.smtputf8:
        args.append(b"SMTPUTF8")
    if session.supports("dsn"):
        if msg.dsn_ret:
            args.append(f"RET={msg.dsn_ret}".encode())
        if msg.dsn_envid:
            args.append(b"ENVID=" + _xtext(msg.dsn_envid))
    return args


def _rcpt_args(session: Session, r: OutRecipient) -> list[bytes]:
    args = [b"TO:<" + r.address.encode("utf-8") + b">"]
    if session.supports("dsn"):
        if r.notify:
            args.append(("NOTIFY=" + ",".join(r.notify)).encode())
        if r.orcpt:
            kind, _, addr = r.orcpt.partition(";")
            args.append(b"ORCPT=" + (kind.strip() or "rfc822").encode() + b";"
                        + _xtext(addr.strip() if addr else r.orcpt))
    return args


async def _rset(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.execute_command(b"RSET")
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        smtp.close()


def _xtext(value: str) -> bytes:
    """RFC 3461 xtext: "+", "=" and anything outside printable ASCII as +HH."""
    out = bytearray()
    for b in value.encode("utf-8"):
        out += f"+{b:02X}".encode() if b < 33 or b > 126 or b in (43, 61) else bytes([b])
    return bytes(out)
