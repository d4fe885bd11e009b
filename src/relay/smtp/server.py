"""The protocol factory of one listener: its config turned into aiosmtpd's arguments, once
per configuration, and each connection's protocol copied from the protocol they make."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from ..config import Config
from .handler import RelayHandler
from .protocol import RelaySMTP


def make_server_factory(handler: RelayHandler,
                        tls_context: ssl.SSLContext | None) -> Callable[[], RelaySMTP]:
    listener = handler.listener  # its address, mode and tls do not change while it runs
    submission = listener.mode == "submission"
    implicit = listener.tls == "implicit"

    # the protocol every connection's is copied from (RelaySMTP.fresh), built anew when a
    # reload gives the handler another configuration
    made: list[tuple[Config, asyncio.AbstractEventLoop, RelaySMTP]] = []

    def factory() -> RelaySMTP:
        config = handler.config  # read per connection: a reload's limits apply to new ones
        loop = asyncio.get_running_loop()
        if not made or made[0][0] is not config or made[0][1] is not loop:
            made[:] = [(config, loop, build(config, loop))]
        return made[0][2].fresh()

    def build(config: Config, loop: asyncio.AbstractEventLoop) -> RelaySMTP:
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
            loop=loop,  # aiosmtpd looks it up with warnings caught
        )

    return factory
