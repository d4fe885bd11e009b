#!/usr/bin/env python3
"""Acceptance benchmark: how fast relay accepts mail durably over SMTP.

Starts `relay serve` on a temp data dir with a relay-mode listener, then:
 1. Postfix's smtp-source (the load generator; Debian package `postfix`, installed
    if missing) sends MESSAGES messages of 5 KB over 20 concurrent sessions:
    messages/s accepted.
 2. An asyncio client does the same and times each message from the end of DATA
    to the 250 reply: p50 and p99.
 3. The same client opens MESSAGES sessions that say only EHLO and QUIT: what a
    connection alone costs relay (smtp-source's phase pays it once a message).
Each phase also prints the CPU time relay's process spent per message, which a shared
host's load moves far less than the rates.

Usage: python bench/accept.py [--messages 5000] [--sessions 20] [--size 5120]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_smtp_source() -> str:
    found = shutil.which("smtp-source") or (
        "/usr/sbin/smtp-source" if os.path.exists("/usr/sbin/smtp-source") else None)
    if found:
        return found
    print("installing postfix (for smtp-source) ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-q", "postfix"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return "/usr/sbin/smtp-source"


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"relay exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("relay did not start")


def start_relay(tmp: Path, log_level: str = "WARNING", smtp_workers: int = 1
                ) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = tmp / "relay.toml"
    conf.write_text(
        f"[server]\nhostname = 'relay.bench'\ndata_dir = '{tmp / 'data'}'\n"
        f"[smtp]\nworkers = {smtp_workers}\n"
        f"[[smtp.listeners]]\nport = {port}\nmode = 'relay'\ntls = 'none'\n"
        f"allowed_networks = ['127.0.0.0/8']\n"
        f"[api]\nport = {free_port()}\n"  # not 8025: a bench may run beside the test suite
        "[delivery]\npaused = true\n"  # acceptance alone: bench/deliver.py measures delivery
    )
    env = {**os.environ, "RELAY_LOG_LEVEL": log_level}
    proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "--config", str(conf), "serve"],
                            env=env, stdout=subprocess.DEVNULL,
                            stderr=None if log_level.upper() == "WARNING" else subprocess.DEVNULL)
    wait_port(port, proc)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(workers(proc.pid)) < smtp_workers - 1:
        time.sleep(0.05)
    if smtp_workers > 1:
        time.sleep(1.0)  # each opens its store and says it listens
    return proc, port


def workers(pid: int) -> list[int]:
    """relay's SMTP worker processes ([smtp] workers - 1 of them)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(k) for k in kids
            if b"relay.frontworker" in Path(f"/proc/{k}/cmdline").read_bytes()]


def count_messages(tmp: Path) -> int:
    with sqlite3.connect(tmp / "data" / "relay.sqlite") as db:
        return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time so far (Linux /proc) of relay's accepting processes: the
    master and its SMTP workers."""
    total = 0.0
    for p in (pid, *workers(pid)):
        fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_smtp_source(binary: str, port: int, messages: int, sessions: int, size: int) -> float:
    cmd = [binary, "-c", "-l", str(size), "-m", str(messages), "-s", str(sessions),
           "-f", "sender@example.com", "-t", "rcpt@example.org", f"127.0.0.1:{port}"]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


async def timed_session(port: int, count: int, body: bytes, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def reply() -> bytes:
        while True:
            line = await reader.readline()
            if line[3:4] != b"-":
                return line

    await reply()
    writer.write(b"EHLO bench.client\r\n")
    await reply()
    for _ in range(count):
        writer.write(b"MAIL FROM:<sender@example.com>\r\nRCPT TO:<rcpt@example.org>\r\nDATA\r\n")
        for _ in range(3):
            await reply()
        writer.write(body)
        await writer.drain()
        t0 = time.perf_counter()
        line = await reply()
        latencies.append(time.perf_counter() - t0)
        if not line.startswith(b"250"):
            raise SystemExit(f"relay refused a message: {line!r}")
    writer.write(b"QUIT\r\n")
    await reply()
    writer.close()
    await writer.wait_closed()


async def run_timed(port: int, messages: int, sessions: int, size: int) -> tuple[float, list[float]]:
    head = b"From: sender@example.com\r\nTo: rcpt@example.org\r\nSubject: bench\r\n\r\n"
    line = b"x" * 78 + b"\r\n"
    body = head + line * max(1, (size - len(head)) // len(line)) + b".\r\n"
    latencies: list[float] = []
    per = [messages // sessions + (1 if i < messages % sessions else 0) for i in range(sessions)]
    started = time.perf_counter()
    await asyncio.gather(*(timed_session(port, n, body, latencies) for n in per))
    return time.perf_counter() - started, latencies


async def run_connections(port: int, connections: int, sessions: int) -> float:
    """`connections` sessions of EHLO and QUIT, `sessions` at a time."""
    async def one_after_another(n: int) -> None:
        for _ in range(n):
            await timed_session(port, 0, b"", [])

    per = [connections // sessions + (1 if i < connections % sessions else 0)
           for i in range(sessions)]
    started = time.perf_counter()
    await asyncio.gather(*(one_after_another(n) for n in per))
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=5120)
    ap.add_argument("--log-level", default="WARNING",
                    help="relay's log level; INFO writes the accept line of every message "
                         "(to /dev/null here), as a production relay does")
    ap.add_argument("--smtp-workers", type=int, default=1,
                    help="relay's [smtp] workers: processes taking its SMTP connections")
    args = ap.parse_args()
    binary = ensure_smtp_source()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as d:
        tmp = Path(d)
        proc, port = start_relay(tmp, args.log_level, args.smtp_workers)
        try:
            cpu0 = cpu_seconds(proc.pid)
            took = run_smtp_source(binary, port, args.messages, args.sessions, args.size)
            cpu1 = cpu_seconds(proc.pid)
            stored = count_messages(tmp)
            elapsed, lat = asyncio.run(run_timed(port, args.messages, args.sessions, args.size))
            cpu2 = cpu_seconds(proc.pid)
            connecting = asyncio.run(run_connections(port, args.messages, args.sessions))
            cpu3 = cpu_seconds(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
        lat.sort()
        print(f"smtp-source: {args.messages} messages of {args.size} B over {args.sessions} "
              f"sessions in {took:.2f} s = {args.messages / took:.0f} msg/s accepted "
              f"({stored} committed); relay CPU {(cpu1 - cpu0) / args.messages * 1000:.2f} ms/msg")
        print(f"timed client: {len(lat) / elapsed:.0f} msg/s; DATA end -> 250: "
              f"p50 {statistics.median(lat) * 1000:.1f} ms, "
              f"p99 {lat[int(len(lat) * 0.99) - 1] * 1000:.1f} ms; "
              f"relay CPU {(cpu2 - cpu1) / len(lat) * 1000:.2f} ms/msg")
        print(f"connections: {args.messages} sessions of EHLO and QUIT, {args.sessions} at a "
              f"time, in {connecting:.2f} s = {args.messages / connecting:.0f}/s; relay CPU "
              f"{(cpu3 - cpu2) / args.messages * 1000:.2f} ms/connection")


if __name__ == "__main__":
    main()
