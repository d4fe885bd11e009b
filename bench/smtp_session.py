#!/usr/bin/env python3
"""What one SMTP connection and one SMTP command cost relay, in-process, on one core.

aiosmtpd builds its tables of smtp_*, handle_* and auth_* methods (dir(),
inspect.getmembers(), inspect.signature()) in SMTP.__init__, once per connection; a
command is then a dict lookup. This times:
 1. building the protocol of one connection (what the listener does at each accept);
 2. command round trips over one loopback connection: NOOP, and MAIL+RCPT+RSET.
Each figure is the median of 7 (resp. 5) runs.

Usage: python bench/smtp_session.py [--connections 2000] [--commands 1500]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import socket
import statistics
import tempfile
import time
from pathlib import Path

from relay.config import (
    ApiConfig,
    Config,
    DeliveryConfig,
    ListenerConfig,
    ServerConfig,
    SmtpConfig,
    TrackingConfig,
)
from relay.smtp.handler import RelayHandler
from relay.smtp.server import make_server_factory
from relay.store import SQLiteStore
from relay.submit import Submitter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main(connections: int, commands: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    listener = ListenerConfig(port=free_port(), mode="relay", tls="none",
                              allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))
    config = Config(server=ServerConfig(hostname="relay.bench", data_dir=tmp / "data"),
                    smtp=SmtpConfig(listeners=(listener,)), delivery=DeliveryConfig(paused=True),
                    api=ApiConfig(port=0), tracking=TrackingConfig(allow_insecure_public_url=True))
    store = SQLiteStore(config.db_path)
    await store.open()
    handler = RelayHandler(config, listener, store, Submitter(config, store))
    factory = make_server_factory(handler, None)

    for _ in range(200):
        factory()
    runs = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(connections):
            factory()
        runs.append((time.perf_counter() - t0) / connections * 1e6)
    print(f"protocol set-up: {statistics.median(runs):.1f} us per connection")

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", listener.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if line[3:4] != b"-":
                return line

    await reply()
    writer.write(b"EHLO bench.client\r\n")
    await reply()
    rounds = (("NOOP", (b"NOOP\r\n",)),
              ("MAIL+RCPT+RSET", (b"MAIL FROM:<a@example.com>\r\n", b"RCPT TO:<b@example.org>\r\n",
                                  b"RSET\r\n")))
    for label, lines in rounds:
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(commands):
                for line in lines:
                    writer.write(line)
                    await reply()
            runs.append((time.perf_counter() - t0) / (commands * len(lines)) * 1e6)
        print(f"{label}: {statistics.median(runs):.1f} us per command round trip")
    writer.close()
    server.close()
    await store.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--commands", type=int, default=1500)  # 5 runs stay under max_commands
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)  # aiosmtpd logs every command
    asyncio.run(main(args.connections, args.commands))
