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


async def transaction(session: Session, msg: OutMessage, *, timeout: float) -> list[Result]:
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

    if msg.smtputf8 and not session.supports("smtputf8"):
        return [done(r, None, f"{session.target.hostname} does not support SMTPUTF8, "
                     "which this message needs", "bounced", "5.6.7", False)
                for r in msg.recipients]
    size = session.smtp.esmtp_extensions.get("size", "")
    if size.isdigit() and int(size) and len(msg.data) > int(size):
        return [done(r, None, f"message of {len(msg.data)} octets is larger than "
                     f"{session.target.hostname} accepts ({size})", "bounced", "5.3.4", False)
                for r in msg.recipients]
    if session.supports("pipelining") and isinstance(smtp.protocol, QueuedReplies):
        replies = await _pipelined(session, msg, timeout)
        if isinstance(replies, SMTPResponse):  # MAIL refused, then the server hung up
            return [done(r, replies.code, replies.message, stage="MAIL")
                    for r in msg.recipients]
    else:
        replies = await _one_by_one(session, msg, timeout)
    mail, rcpts, final = replies
    if mail.code != 250:
        await _rset(smtp)
        return [done(r, mail.code, mail.message, stage="MAIL") for r in msg.recipients]
    accepted, results = [], []
    for r, rcpt in zip(msg.recipients, rcpts, strict=True):
        if rcpt.code in (250, 251):
            accepted.append(r)
        else:
            results.append(done(r, rcpt.code, rcpt.message, stage="RCPT"))
    if not accepted:
        await _rset(smtp)
        return results
    assert final is not None  # sent whenever a recipient was taken
    if final.code != 250:
        await _rset(smtp)
    return results + [done(r, final.code, final.message, stage="DATA") for r in accepted]


# MAIL's reply, each RCPT's (none when MAIL was refused), and the end of the data's (or
# DATA's refusal; None when no recipient was taken)
Replies = tuple[SMTPResponse, list[SMTPResponse], SMTPResponse | None]


async def _one_by_one(session: Session, msg: OutMessage, timeout: float) -> Replies:
    smtp = session.smtp
    mail = await smtp.execute_command(b"MAIL", *_mail_args(session, msg), timeout=timeout)
    if mail.code != 250:
        return mail, [], None
    rcpts = [await smtp.execute_command(b"RCPT", *_rcpt_args(session, r), timeout=timeout)
             for r in msg.recipients]
    if not any(rcpt.code in (250, 251) for rcpt in rcpts):
        return mail, rcpts, None
    return mail, rcpts, await _data(smtp, msg.data, timeout)


async def _pipelined(session: Session, msg: OutMessage,
                     timeout: float) -> Replies | SMTPResponse:
    """MAIL, every RCPT and DATA in one write (RFC 2920), their replies read in order; then
    the message, or (no recipient taken) the end of an empty one, which the server refuses.
    MAIL's reply alone when it refused and the server hung up (a 421)."""
    smtp = session.smtp
    protocol = smtp.protocol
    assert isinstance(protocol, QueuedReplies)
    refused_all = False
    try:
        protocol.write_commands(
            [b" ".join([b"MAIL", *_mail_args(session, msg)])]
            + [b" ".join([b"RCPT", *_rcpt_args(session, r)]) for r in msg.recipients]
            + [b"DATA"])
        mail = await protocol.read_response(timeout=timeout)
        refused_all = mail.code != 250  # what follows is moot (a 421 hangs up at once)
        rcpts = [await protocol.read_response(timeout=timeout) for _ in msg.recipients]
        start = await protocol.read_response(timeout=timeout)
        if start.code == 354:  # the data, or an empty message if no recipient was taken
            ok = mail.code == 250 and any(r.code in (250, 251) for r in rcpts)
            protocol.write(wire_data(msg.data) if ok else b".\r\n")
            final = await protocol.read_response(timeout=timeout)
        else:
            final = start
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        smtp.close()
        if not refused_all:
            raise
        return mail
    return mail, rcpts, final


async def _data(smtp: aiosmtplib.SMTP, data: bytes, timeout: float) -> SMTPResponse:
    """DATA and the message, as aiosmtplib's SMTP.data sends them, but with its two passes
    over the message (line endings, dot-stuffing) made only when the message needs them:
    they were an eighth of the delivery worker's CPU."""
    start = await smtp.execute_command(b"DATA", timeout=timeout)
    if start.code != 354:
        return start
    assert smtp.protocol is not None  # execute_command raised if the connection was lost
    try:
        smtp.protocol.write(wire_data(data))
        # no await between the write and this read: the reply cannot arrive unawaited
        return await smtp.protocol.read_response(timeout=timeout)
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
