"""The protocol factory of one listener: its config turned into aiosmtpd's arguments."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from .handler import RelayHandler
from .protocol import RelaySMTP


def make_server_factory(handler: RelayHandler,
                        tls_context: ssl.SSLContext | None) -> Callable[[], RelaySMTP]:
    listener = handler.listener  # its address, mode and tls do not change while it runs
    submission = listener.mode == "submission"
    implicit = listener.tls == "implicit"

    def factory() -> RelaySMTP:
        config = handler.config  # read per connection: a reload's limits apply to new ones
        limits = config.limits
        return RelaySMTP(
            handler,
            implicit_tls=implicit,
            data_size_limit=limits.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=config.server.hostname,
            ident="relay",
            tls_context=tls_context if listener.tls == "starttls" else None,
            timeout=limits.idle_timeout,
            auth_required=submission,
            auth_exclude_mechanism=() if submission else ("PLAIN", "LOGIN"),
            command_call_limit=limits.max_commands,
            loop=asyncio.get_running_loop(),  # aiosmtpd looks it up with warnings caught
        )

    return factory
