"""SMTP command pipelining (RFC 2920) over aiosmtplib's connection.

aiosmtplib reads one reply per command it writes and drops what arrives when no command is
waiting, so MAIL, RCPT and DATA written together would lose their replies. Its protocol is
given a queue instead: every reply the connection was told to expect is kept, in order, and
read_response hands them out one by one; unsolicited data is still dropped, as before.
read_response times each reply out itself, the data's only once the data stops moving
(sendqueue.py says how much is left to go).

`aiosmtplib.SMTP` makes its protocol from the module's `SMTPProtocol` name when it connects
and has no hook for another class; `install()` points that name at the subclass here, in
the delivery worker (the only user of aiosmtplib in the process), before any connection.
"""

from __future__ import annotations

import asyncio
import collections

import aiosmtplib.smtp
from aiosmtplib import SMTPResponse
from aiosmtplib.errors import SMTPReadTimeoutError, SMTPResponseException, SMTPServerDisconnected
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, MAX_RESPONSE_LENGTH, SMTPProtocol

from .sendqueue import unsent


class QueuedReplies(SMTPProtocol):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._replies: collections.deque[SMTPResponse] = collections.deque()
        self._expected = 0  # replies to pipelined commands not yet received
        self._timer: asyncio.TimerHandle | None = None  # the reply's timeout

    def write_commands(self, commands: list[bytes], *, after_data: bytes = b"") -> None:
        """Write these commands at once; one reply is then read for each, in order. With
        `after_data` (a message's data and its ending, RFC 2920: the data may open a group),
        the commands follow it in the same write and its reply is read first."""
        for command in commands:
            if COMMAND_INJECTION_REGEX.search(command):
                raise ValueError("Command contains a prohibited control character")
        self._expected += len(commands) + (1 if after_data else 0)
        self.write(after_data + b"".join(c + b"\r\n" for c in commands))

    def data_received(self, data: bytes) -> None:
        waiter = self._response_waiter
        if waiter is None:
            return
        if not self._response_pending and not self._expected:
            return  # unsolicited: never paired with a later command (aiosmtplib's rule)
        self._buffer.extend(data)
        if len(self._buffer) > MAX_RESPONSE_LENGTH:
            del self._buffer[:]
            self._fail(SMTPResponseException(-1, "Response too long"))
            return
        while True:
            try:
                reply = self._read_response_from_buffer()
            except Exception as exc:  # a malformed line: the reader waiting gets it
                self._fail(exc)
                return
            if reply is None:
                break
            self._expected = max(0, self._expected - 1)
            self._replies.append(reply)
        self._hand_over()

    def _hand_over(self) -> None:
        waiter = self._response_waiter
        if waiter is not None and not waiter.done() and self._replies:
            waiter.set_result(self._replies.popleft())

    def _fail(self, exc: BaseException) -> None:
        waiter = self._response_waiter
        if waiter is not None and not waiter.done():
            self._set_response_exception(waiter, exc)

    async def read_response(self, timeout: float | None = None, *,
                            sending: bool = False) -> SMTPResponse:
        """The next reply, as aiosmtplib's read_response gives it, without asyncio.wait_for:
        on Python 3.11 that makes a future, a timer and a callback per reply, and a turn of
        the loop even when the reply is already here (four replies a message).

        `sending`: the reply to data still on its way out. A large message on a slow link
        can take longer to send than `timeout`; the reply's time then runs from when the
        data stops moving (Postfix's smtp_data_xfer_timeout is per stall likewise)."""
        # the waiter, when done, holds the oldest reply; else the queue's head is the oldest
        waiter = self._response_waiter
        if waiter is None:
            raise SMTPServerDisconnected("Connection lost")
        if not waiter.done() and self._replies:
            return self._replies.popleft()
        self._response_pending = True
        self._timer = None
        try:
            if not waiter.done():
                if timeout is not None:
                    self._arm(waiter, timeout, unsent(self.transport) if sending else 0)
                await waiter
            reply = waiter.result()
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._response_pending = False
            # a lost connection makes no new waiter (aiosmtplib's rule)
            self._response_waiter = None if self.transport is None else self._loop.create_future()
        self._hand_over()  # the fresh waiter takes the next reply already here
        return reply

    def _arm(self, waiter: asyncio.Future[SMTPResponse], timeout: float, left: int) -> None:
        self._timer = self._loop.call_later(timeout, self._time_out, waiter, timeout, left)

    def _time_out(self, waiter: asyncio.Future[SMTPResponse], timeout: float,
                  left: int) -> None:
        if waiter.done():
            return
        if left:  # data was on its way out: time out only once it stopped moving
            now = unsent(self.transport)
            if now < left:
                self._arm(waiter, timeout, now)
                return
        self._set_response_exception(
            waiter, SMTPReadTimeoutError("Timed out waiting for server response"))


def install() -> None:
    """Make every aiosmtplib connection of this process keep its pipelined replies."""
    aiosmtplib.smtp.SMTPProtocol = QueuedReplies  # type: ignore[misc]
