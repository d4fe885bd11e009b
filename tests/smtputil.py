"""smtplib clients for tests, run in a thread so an in-process relay keeps serving."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

MESSAGE = (b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: hello\r\n\r\n"
           b"Hello Bob.\r\n")


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect(port: int, *, starttls: bool = True, key: str | None = None,
            implicit: bool = False) -> smtplib.SMTP:
    if implicit:
        s: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", port, context=client_tls(), timeout=20)
    else:
        s = smtplib.SMTP("127.0.0.1", port, timeout=20)
    s.ehlo("client.test")
    if starttls:
        s.starttls(context=client_tls())
        s.ehlo("client.test")
    if key is not None:
        s.login("anyone", key)
    return s


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


def send(port: int, key: str | None, data: bytes = MESSAGE, sender: str = "alice@example.com",
         rcpts: tuple[str, ...] = ("bob@example.org",), starttls: bool = True
         ) -> tuple[int, bytes]:
    """One message in one session; returns the reply to the end of DATA."""
    with connect(port, starttls=starttls, key=key) as s:
        code, text = s.mail(sender)
        if code != 250:
            return code, text
        for r in rcpts:
            code, text = s.rcpt(r)
            if code >= 400:
                return code, text
        return s.data(data)
