#!/usr/bin/env python3
"""Delivery to a distant MX: messages over one session to a server that answers every
group of commands DELAY ms late (its round trip), as a remote MX does; loopback otherwise.

A message costs round trips, not CPU, here: MAIL+RCPT+DATA (one group, RFC 2920), then the
data. With the next message's commands written behind this one's data (transaction.py), a
message on a reused session costs one round trip instead of two.

Usage: python bench/distant_mx.py [--messages 20] [--delay 25]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

from relay.config import DeliveryConfig
from relay.delivery import pipelining
from relay.delivery.deliver import Deliverer
from relay.delivery.outbound import OutMessage, OutRecipient, Target

DATA = b"From: a@example.com\r\nSubject: bench\r\n\r\n" + (b"x" * 78 + b"\r\n") * 64


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def far_server(delay: float, connections: list[asyncio.StreamWriter]) -> Serve:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        writer.write(b"220 far.example ESMTP\r\n")
        in_data = False
        pending = b""
        while chunk := await reader.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\r\n")
            out = b""
            for line in lines:
                if in_data:
                    if line == b".":
                        in_data, out = False, out + b"250 2.0.0 queued\r\n"
                    continue
                verb = line[:4].upper()
                if verb == b"EHLO":
                    out += b"250-far.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
                elif verb == b"DATA":
                    in_data, out = True, out + b"354 go ahead\r\n"
                elif verb == b"QUIT":
                    out += b"221 2.0.0 bye\r\n"
                else:
                    out += b"250 2.0.0 ok\r\n"
            if out:
                await asyncio.sleep(delay)  # the round trip
                writer.write(out)
        writer.close()
    return serve


async def main(messages: int, delay_ms: float) -> None:
    connections: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(far_server(delay_ms / 1000, connections),
                                        "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pipelining.install()
    d = Deliverer(hostname="relay.bench",
                  delivery=DeliveryConfig(connect_timeout=10, command_timeout=30,
                                          messages_per_session=messages))
    batch = [OutMessage(id=f"m{i}", mail_from="a@example.com", data=DATA,
                        recipients=(OutRecipient(id=i, address=f"r{i}@example.org"),))
             for i in range(messages)]
    started = time.perf_counter()
    results = await d.deliver([Target(hostname="far.example", address="127.0.0.1",
                                      port=port)], batch)
    took = time.perf_counter() - started
    await d.close()
    server.close()
    for writer in connections:
        writer.close()
    await asyncio.sleep(0.01)
    delivered = sum(r.outcome == "delivered" for r in results)
    print(f"{delivered} of {messages} messages delivered over one session to a server "
          f"{delay_ms:.0f} ms away in {took * 1000:.0f} ms = "
          f"{took * 1000 / messages / delay_ms:.2f} round trips a message (connect and EHLO "
          f"included; {len(connections)} connection(s))")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20)
    ap.add_argument("--delay", type=float, default=25.0, help="ms per reply")
    args = ap.parse_args()
    asyncio.run(main(args.messages, args.delay))
