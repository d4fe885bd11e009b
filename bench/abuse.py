#!/usr/bin/env python3
"""Abuse benchmark (issue 17): relay's peak memory, and the API latency a legitimate client
sees, while relay takes four denial-of-service inputs.

Each phase starts a fresh relay (`relay serve`, delivery paused, on a temp data dir) with a
submission listener, an inbound listener and the API, makes a key with every scope, and
starts a legitimate client (a process of its own, from 127.0.0.2) that posts a small
`POST /v1/emails` RATE times a second, open loop, each with a TIMEOUT-second limit. Then:

  0  baseline      nothing else, 5 s: what the client sees from an idle relay
  a  dsn-bomb      a 1.1 MB multipart/report DSN with 8,000 message/delivery-status parts,
                   over SMTP to the inbound listener (bounces+...@relay.bench), COUNT
                   times, two sessions at once
  b  mc-expansion  POST /tx/v1/send?dry-run=true (MailChannels): 300 personalizations
                   sharing one 1 MiB attachment, COUNT times, two at once
  c  metadata      a webhook endpoint on a local receiver that answers 200; POST /v1/emails
                   with 10 MiB of metadata and 100 recipients COUNT times, and as many with
                   metadata just under the 16 KiB default limit and 100 recipients
  d  conn-flood    FLOOD TCP connections to the SMTP submission port that send nothing and
                   FLOOD to the API port that send a partial request and then a byte a
                   second (slowloris), from 127.0.1.1 (--flood-sources spreads them), held
                   for SECONDS but at least 15 s (past the 10 s http_header_timeout)

A phase lasts SECONDS, and then until relay is quiet again (under 15% of a core for a
second, no webhook arriving), up to CAP seconds from the input's start; an answer still
missing at the cap is reported as such. Every 100 ms it samples the RSS of relay's master
and all its descendants (/proc) and each one's VmHWM; a tree over --rss-limit MB is
killed (and reported) to spare the machine.

One line a phase: peak RSS (the tree's sum as sampled, and the largest single process's
VmHWM), the client's p50/p99/max and its errors (a refused connection, a timeout, an
answer other than 202; its max is the best view of an event-loop stall), relay's CPU
seconds in the phase, what relay answered the input, and its logged warnings/errors;
then whether the issue's targets hold (peak RSS < 300 MB, p99 < 200 ms; the baseline is
not judged). relay is only driven from outside (CLI, config file, SMTP, HTTP), so
PYTHONPATH can point it at any branch. Linux only (/proc).

Usage: python bench/abuse.py [--phases 0,a,b,c,d] [--seconds 10] [--cap 45] [--count 3]
                             [--flood 2000] [--flood-sources 1] [--rate 20] [--timeout 5]
                             [--rss-limit 6144]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import os
import re
import resource
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

HOST = "relay.bench"
BOUNCE_RCPT = f"bounces+aaaaaaaaaaaaaaaaaaaa@{HOST}"  # any bounces+ token reaches the parser
SCOPES = ("emails:send", "emails:read", "domains:manage", "webhooks:manage",
          "suppressions:manage", "keys:manage", "templates:manage", "contacts:manage")
RSS_TARGET_MB = 300.0
P99_TARGET_S = 0.200
FLOOD_HOLD = 15.0  # seconds at least: longer than relay's default http_header_timeout (10)
MB = 1024 * 1024
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (WARNING|ERROR|CRITICAL) (\S+): (.*)")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Timeout)\b")
PHASES = {"0": "baseline", "a": "dsn-bomb", "b": "mc-expansion", "c": "metadata",
          "d": "conn-flood"}
LEGIT_EMAIL = {"from": "Alice <alice@example.com>", "to": ["bob@example.org"],
               "subject": "Your receipt", "text": "Thanks for your order.\n"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.1f} s"


def fmt_counts(items: list[str]) -> str:
    return ", ".join(f"{n}x {what}" for what, n in collections.Counter(items).most_common())


# -- relay's process tree (/proc) -------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3 is index 0)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                children[int(fields[1])].append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def status_kb(pid: int, *names: str) -> dict[str, int]:
    found: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in names:
                found[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return found


def cpu_of(pid: int, children: bool = False) -> float:
    fields = _stat(pid)
    if not fields:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:  # reaped children's time (a worker that died and was waited for)
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """Every 100 ms: RSS of relay's whole tree, each process's VmHWM and CPU."""

    def __init__(self, root: int, limit_mb: float) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.root = root
        self.limit_kb = limit_mb * 1024
        self.killed_at_kb = 0
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.peak_tree_kb = 0
        self.peak_master_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.max_procs = 0
        self.max_fds = 0
        self.now_tree_kb = 0
        self._ticks = 0

    def reset_peaks(self) -> None:
        with self.lock:
            self.peak_tree_kb = self.now_tree_kb
            self.peak_master_kb = 0

    def cpu_total(self) -> float:
        with self.lock:
            return sum(v for p, v in self.cpu.items() if p != self.root) + cpu_of(self.root, True)

    def run(self) -> None:
        while not self.halt.wait(0.1):
            self.sample()

    def sample(self) -> None:
        pids = descendants(self.root)
        total = 0
        with self.lock:
            for pid in pids:
                got = status_kb(pid, "VmRSS", "VmHWM")
                rss = got.get("VmRSS", 0)
                total += rss
                if pid == self.root:
                    self.peak_master_kb = max(self.peak_master_kb, rss)
                self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), got.get("VmHWM", 0))
                if pid != self.root:
                    self.cpu[pid] = max(self.cpu.get(pid, 0.0), cpu_of(pid))
                if pid not in self.names:
                    try:
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                        self.names[pid] = " ".join(c.decode(errors="replace")
                                                   for c in cmd[1:4] if c)
                    except OSError:
                        pass
            self.now_tree_kb = total
            if total > self.limit_kb and not self.killed_at_kb:  # spare the shared machine
                self.killed_at_kb = total
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self.peak_tree_kb = max(self.peak_tree_kb, total)
            self.max_procs = max(self.max_procs, len(pids))
            self._ticks += 1
            if self._ticks % 5 == 0:
                try:
                    self.max_fds = max(self.max_fds, len(os.listdir(f"/proc/{self.root}/fd")))
                except OSError:
                    pass


# -- relay, started and stopped -----------------------------------------------------------

class Relay:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.api_port, self.sub_port, self.inbound_port = free_port(), free_port(), free_port()
        self.conf = tmp / "relay.toml"
        self.log = tmp / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.key = ""

    def cli(self, *argv: str) -> list[str]:
        return [sys.executable, "-m", "relay.cli", "--config", str(self.conf), *argv]

    def start(self) -> None:
        self.conf.write_text(
            f"[server]\nhostname = '{HOST}'\ndata_dir = '{self.tmp / 'data'}'\n"
            f"[[smtp.listeners]]\nport = {self.sub_port}\n"
            f"[[smtp.listeners]]\nport = {self.inbound_port}\nmode = 'inbound'\ntls = 'none'\n"
            f"[api]\nport = {self.api_port}\npublic_url = 'http://127.0.0.1:{self.api_port}'\n"
            "[delivery]\npaused = true\n[webhooks]\nallow_private_targets = true\n")
        scopes = [a for s in SCOPES for a in ("--scope", s)]
        made = subprocess.run(self.cli("keys", "create", "--name", "bench", *scopes, "--json"),
                              capture_output=True, text=True, timeout=60, check=False)
        if made.returncode:
            raise SystemExit(f"relay keys create failed:\n{made.stderr}")
        self.key = json.loads(made.stdout)["key"]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.cli("serve"), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL,
                                         env={**os.environ, "RELAY_LOG_LEVEL": "WARNING"})
        deadline = time.monotonic() + 60
        for port in (self.api_port, self.sub_port, self.inbound_port):
            while True:
                if self.proc.poll() is not None:
                    raise SystemExit(f"relay exited with {self.proc.returncode}:\n"
                                     f"{self.log.read_text(errors='replace')[-3000:]}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("relay did not start within 60 s") from None
                    time.sleep(0.05)

    def nofile(self) -> str:
        assert self.proc is not None
        try:
            for line in Path(f"/proc/{self.proc.pid}/limits").read_text().splitlines():
                if line.startswith("Max open files"):
                    return line.split()[3]
        except OSError:
            pass
        return "?"

    def stop(self) -> list[str]:
        """SIGTERM, then SIGKILL for the master and any descendant left; what it took."""
        if self.proc is None:
            return []
        notes: list[str] = []
        pid = self.proc.pid
        family = [(p, (_stat(p) or ["?"] * 20)[19]) for p in descendants(pid) if p != pid]
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                notes.append("relay ignored SIGTERM for 20 s: killed")
                self.proc.kill()
                self.proc.wait(10)
        for child, started in family:  # same pid and start time: the same process
            fields = _stat(child)
            if fields and fields[19] == started:
                notes.append(f"child {child} outlived the master: killed")
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return notes

    def log_summary(self) -> str:
        """relay's warnings and errors (its log format: time LEVEL logger: message), and the
        last line of each traceback."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        records: collections.Counter[str] = collections.Counter()
        ends: collections.Counter[str] = collections.Counter()
        for line in lines:
            found = LOG_RECORD.match(line)
            if found:
                records[f"{found[1]} {found[2]}: {found[3][:70]}"] += 1
            elif EXCEPTION_LINE.match(line):
                ends[line[:80]] += 1
        if not records and not ends:
            return ""
        text = f"relay log: {sum(records.values())} warnings/errors"
        if records:
            text += " (" + " | ".join(f"{n}x {w}" for w, n in records.most_common(3)) + ")"
        if ends:
            text += f", {sum(ends.values())} tracebacks ending " + " | ".join(
                f"{n}x {w}" for w, n in ends.most_common(3))
        return text


# -- the legitimate client (its own process, so the attackers' CPU here does not delay it) -

async def legit_main(url: str, key: str, rate: float, timeout: float, out: str) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    records: list[dict[str, Any]] = []
    body = json.dumps(LEGIT_EMAIL).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def one(lag: float) -> None:
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"t": time.time(), "lag": lag}
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                rec["status"] = resp.status
        except TimeoutError:
            rec["error"] = "timeout"
        except aiohttp.ClientConnectorError as exc:
            rec["error"] = f"connect: {exc.os_error.strerror or exc.os_error}"
        except aiohttp.ClientError as exc:
            rec["error"] = type(exc).__name__
        except OSError as exc:
            rec["error"] = exc.strerror or type(exc).__name__
        rec["latency"] = time.perf_counter() - t0
        records.append(rec)

    tasks: set[asyncio.Task[None]] = set()
    # limit=0: a stalled relay must not queue us on our own pool. Another loopback address
    # than the flood's, so that relay's per-client caps can tell the two apart.
    connector = aiohttp.TCPConnector(limit=0, local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        due = time.perf_counter()
        while not stop.is_set():
            task = asyncio.create_task(one(max(0.0, time.perf_counter() - due)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            due += 1 / rate
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, due - time.perf_counter()))
            except TimeoutError:
                pass
        if tasks:  # each ends by its own timeout at the latest
            await asyncio.gather(*tasks)
    Path(out).write_text(json.dumps(records))


class Legit:
    def __init__(self, relay: Relay, args: argparse.Namespace, tmp: Path) -> None:
        self.out = tmp / "legit.json"
        self.timeout = args.timeout
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--legit", f"http://127.0.0.1:{relay.api_port}/v1/emails",
             relay.key, str(args.rate), str(args.timeout), str(self.out)],
            stdin=subprocess.DEVNULL)

    def stop(self) -> list[dict[str, Any]]:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.timeout + 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        try:
            return list(json.loads(self.out.read_text()))
        except (OSError, ValueError):
            return []


def legit_summary(records: list[dict[str, Any]]) -> tuple[str, float | None]:
    if not records:
        return "legit client: no records", None
    lat = sorted(r["latency"] for r in records)
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, max(0, int(len(lat) * 0.99 + 0.5) - 1))]
    bad = [r.get("error") or str(r.get("status")) for r in records
           if r.get("status") != 202]
    text = (f"legit {len(records)} req p50 {fmt_s(p50)} p99 {fmt_s(p99)} max {fmt_s(lat[-1])} "
            f"errors {len(bad)}")
    if bad:
        text += f" ({fmt_counts(bad)})"
    lag = max(r["lag"] for r in records)
    if lag > 0.1:
        text += f" [client's own loop late by up to {fmt_s(lag)}]"
    return text, p99


# -- the four inputs ---------------------------------------------------------------------

def in_thread(fn: Callable[[], str]) -> Awaitable[str]:
    """A daemon thread (a blocked smtplib call must not hold up the script's exit)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 (reported as a figure)
            result = f"{type(exc).__name__}: {exc}"[:120]
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits for it
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(result))

    threading.Thread(target=run, daemon=True).start()
    return fut


class Answers:
    """What relay answered so far: a phase cut short at the cap still reports these."""

    def __init__(self) -> None:
        self.head = ""
        self.expected = 0
        self.got: list[tuple[str, str]] = []  # (kind of input, the answer)

    def text(self) -> str:
        by: dict[str, list[str]] = collections.defaultdict(list)
        for kind, answer in self.got:
            by[kind].append(answer)
        parts = [f"{kind}: " * bool(kind) + ", ".join(answers) for kind, answers in by.items()]
        if self.expected > len(self.got):
            parts.append(f"{self.expected - len(self.got)} still unanswered at the cap")
        return self.head + "; ".join(parts)


async def pooled(jobs: list[tuple[str, Callable[[], Awaitable[str]]]], concurrency: int,
                 answers: Answers) -> None:
    """The jobs, CONCURRENCY at a time; each answer recorded as it comes."""
    queue = list(jobs)
    answers.expected += len(jobs)

    async def worker() -> None:
        while queue:
            kind, job = queue.pop(0)
            answers.got.append((kind, await job()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def dsn_bomb_bytes(parts: int = 8000) -> bytes:
    """An RFC 3464 report with PARTS delivery-status parts (8,000 make about 1.1 MB)."""
    head = (f"From: MAILER-DAEMON@mx.example.net\r\nTo: {BOUNCE_RCPT}\r\n"
            "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/report; report-type=delivery-status;\r\n"
            " boundary=\"BOMB\"\r\n\r\n--BOMB\r\nContent-Type: text/plain\r\n\r\n"
            "Delivery failed.\r\n").encode()
    part = ("--BOMB\r\nContent-Type: message/delivery-status\r\n\r\n"
            "Reporting-MTA: dns;m\r\n\r\nFinal-Recipient: rfc822;u{:04d}@x\r\n"
            "Action: failed\r\nStatus: 5.1.1\r\n")
    return head + "".join(part.format(i) for i in range(parts)).encode() + b"--BOMB--\r\n"


async def attack_dsn(relay: Relay, args: argparse.Namespace, answers: Answers) -> None:
    data = dsn_bomb_bytes()

    def send() -> str:
        t0 = time.perf_counter()
        try:
            with smtplib.SMTP("127.0.0.1", relay.inbound_port, timeout=args.cap) as s:
                s.ehlo("mx.example.net")
                s.sendmail("", [BOUNCE_RCPT], data)
            return f"250 in {fmt_s(time.perf_counter() - t0)}"
        except smtplib.SMTPResponseException as exc:
            return f"{exc.smtp_code} in {fmt_s(time.perf_counter() - t0)}"
        except smtplib.SMTPRecipientsRefused as exc:
            return f"RCPT refused {next(iter(exc.recipients.values()))[0]}"
        except TimeoutError:
            return f"timed out after {fmt_s(time.perf_counter() - t0)}"
        except (OSError, smtplib.SMTPException) as exc:
            return f"{type(exc).__name__} after {fmt_s(time.perf_counter() - t0)}"

    answers.head = f"{len(data) / 1e6:.2f} MB DSN x{args.count}: "
    await pooled([("", lambda: in_thread(send))] * args.count, 2, answers)


async def post_and_drain(url: str, body: bytes, headers: dict[str, str],
                         timeout: float) -> str:
    """POST, read the answer without keeping it: its status, size and time."""
    t0 = time.perf_counter()
    size = 0
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s, \
                s.post(url, data=body, headers=headers) as resp:
            first = b""
            async for chunk in resp.content.iter_chunked(1 << 20):
                if not first:
                    first = chunk[:300]
                size += len(chunk)
            what = f"{resp.status}"
            if resp.status >= 400:
                what += " " + first.decode(errors="replace")[:100]
    except TimeoutError:
        what = "timed out"
    except (aiohttp.ClientError, OSError) as exc:
        what = type(exc).__name__
    return (f"{what} ({size / 1e6:.0f} MB answer)" if size > 1e6 else what) + \
        f" in {fmt_s(time.perf_counter() - t0)}"


async def attack_mc(relay: Relay, args: argparse.Namespace, answers: Answers) -> None:
    attachment = base64.b64encode(os.urandom(MB)).decode()
    body = json.dumps({
        "personalizations": [{"to": [{"email": f"user{i}@example.org"}]} for i in range(300)],
        "from": {"email": "bench@example.com", "name": "Bench"}, "subject": "expansion",
        "content": [{"type": "text/plain", "value": "see attached"}],
        "attachments": [{"content": attachment, "filename": "blob.bin",
                         "type": "application/octet-stream"}]}).encode()
    url = f"http://127.0.0.1:{relay.api_port}/tx/v1/send?dry-run=true"
    headers = {"X-Api-Key": relay.key, "Content-Type": "application/json"}
    answers.head = f"{len(body) / 1e6:.1f} MB request x{args.count}: "
    await pooled([("", lambda: post_and_drain(url, body, headers, args.cap))] * args.count, 2,
                 answers)


class Receiver:
    """A webhook target on loopback: answers 200, counts what it got, keeps nothing."""

    def __init__(self) -> None:
        self.posts = 0
        self.octets = 0
        self.largest = 0
        self.runner: web.AppRunner | None = None
        self.port = free_port()

    async def handle(self, request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_chunked(1 << 20):
            size += len(chunk)
        self.posts += 1
        self.octets += size
        self.largest = max(self.largest, size)
        return web.Response(status=200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()


async def attack_metadata(relay: Relay, args: argparse.Namespace, hook: Receiver,
                          answers: Answers) -> None:
    base = f"http://127.0.0.1:{relay.api_port}"
    headers = {"Authorization": f"Bearer {relay.key}", "Content-Type": "application/json"}
    made = await post_and_drain(base + "/v1/webhooks", json.dumps(
        {"url": f"http://127.0.0.1:{hook.port}/hook"}).encode(), headers, 10)
    if not made.startswith("201"):
        answers.head = f"webhook registration failed: {made}"
        return
    hook.posts = hook.octets = hook.largest = 0
    rcpts = [f"user{i}@example.org" for i in range(100)]
    big_meta = {f"k{i:04d}": "x" * 10240 for i in range(1024)}  # 10 MiB
    small_meta = {f"k{i:02d}": "y" * 300 for i in range(50)}
    while len(json.dumps(small_meta)) < 16384 - 400:  # just under the 16 KiB default
        small_meta[f"k{len(small_meta):02d}"] = "y" * 300
    bodies = {"10 MiB": json.dumps({**LEGIT_EMAIL, "to": rcpts, "metadata": big_meta}).encode(),
              "16 KiB": json.dumps({**LEGIT_EMAIL, "to": rcpts, "metadata": small_meta}).encode()}
    order = [name for _ in range(args.count) for name in bodies]
    await pooled([(f"{name} metadata x100 rcpts", lambda name=name: post_and_drain(
        base + "/v1/emails", bodies[name], headers, args.cap)) for name in order], 2, answers)


async def attack_flood(relay: Relay, args: argparse.Namespace, answers: Answers) -> None:
    hold_until = time.monotonic() + max(args.seconds, FLOOD_HOLD)
    connect_gate = asyncio.Semaphore(200)
    tally: dict[str, collections.Counter[str]] = {"smtp": collections.Counter(),
                                                  "http": collections.Counter()}
    said: dict[str, collections.Counter[str]] = {"smtp": collections.Counter(),
                                                 "http": collections.Counter()}
    closed_after: dict[str, list[float]] = {"smtp": [], "http": []}
    opened: list[int] = []

    async def conn(kind: str, port: int) -> None:
        count = tally[kind]
        async with connect_gate:
            try:
                source = f"127.0.1.{len(opened) % args.flood_sources + 1}"
                opened.append(port)
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(source, 0)), 5)
            except TimeoutError:
                count["connect timed out"] += 1
                return
            except ConnectionRefusedError:
                count["refused"] += 1
                return
            except OSError as exc:
                count[f"connect error {exc.strerror or type(exc).__name__}"] += 1
                return
        count["connected"] += 1
        t0 = time.monotonic()

        async def slow_writer() -> None:
            if kind != "http":
                return
            writer.write(b"POST /v1/emails HTTP/1.1\r\nHost: x\r\n")
            while True:
                await asyncio.sleep(1)
                writer.write(b"X")
                await writer.drain()

        drip = asyncio.create_task(slow_writer())
        first = True
        try:
            while True:
                left = hold_until - time.monotonic()
                if left <= 0:
                    count["held to the end"] += 1
                    break
                try:
                    chunk = await asyncio.wait_for(reader.read(4096), left)
                except TimeoutError:
                    continue
                if first and chunk:
                    said[kind][chunk.split(b"\r\n", 1)[0].decode(errors="replace")[:60]] += 1
                    first = False
                if not chunk:
                    count["closed by relay"] += 1
                    closed_after[kind].append(time.monotonic() - t0)
                    break
        except (ConnectionResetError, BrokenPipeError):
            count["reset by relay"] += 1
            closed_after[kind].append(time.monotonic() - t0)
        finally:
            drip.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await drip  # a reset the writer saw first is an OSError too
            writer.transport.abort()

    await asyncio.gather(*(conn("smtp", relay.sub_port) for _ in range(args.flood)),
                         *(conn("http", relay.api_port) for _ in range(args.flood)))
    parts = []
    for kind in ("smtp", "http"):
        text = f"{kind} x{args.flood}: " + ", ".join(f"{n} {w}" for w, n in tally[kind].items())
        if closed_after[kind]:
            text += f" (closed after median {fmt_s(statistics.median(closed_after[kind]))})"
        if said[kind]:
            text += " said " + ", ".join(f"{n}x {w!r}" for w, n in said[kind].most_common(3))
        parts.append(text)
    answers.head = "; ".join(parts)


# -- phases ------------------------------------------------------------------------------

async def settle(sampler: Sampler, hook: Receiver, started: float, deadline: float) -> str:
    """Wait until relay spends under 15% of a core for a second and no webhook arrives."""
    cpu, posts = sampler.cpu_total(), hook.posts
    while time.monotonic() < deadline:
        await asyncio.sleep(1)
        if not Path(f"/proc/{sampler.root}").exists() or sampler.killed_at_kb:
            return ""
        now, got = sampler.cpu_total(), hook.posts
        if now - cpu < 0.15 and got == posts:
            return f"relay quiet again {time.monotonic() - started:.0f} s into the phase"
        cpu, posts = now, got
    return "relay still busy at the cap"


async def run_phase(letter: str, args: argparse.Namespace, hook: Receiver) -> dict[str, Any]:
    name = PHASES[letter]
    with tempfile.TemporaryDirectory(prefix=f"bench-abuse-{name}-") as t:
        tmp = Path(t)
        relay = Relay(tmp)
        legit: Legit | None = None
        sampler: Sampler | None = None
        notes: list[str] = []
        answered = ""
        try:
            await asyncio.to_thread(relay.start)
            assert relay.proc is not None
            sampler = Sampler(relay.proc.pid, args.rss_limit)
            sampler.start()
            legit = Legit(relay, args, tmp)
            await asyncio.sleep(1.0)  # the client's first requests: a fresh relay's baseline
            idle_kb = sampler.now_tree_kb
            sampler.reset_peaks()
            cpu0 = sampler.cpu_total()
            t0 = time.monotonic()
            answers = Answers()
            attacks: dict[str, Callable[[], Awaitable[None]]] = {
                "a": lambda: attack_dsn(relay, args, answers),
                "b": lambda: attack_mc(relay, args, answers),
                "c": lambda: attack_metadata(relay, args, hook, answers),
                "d": lambda: attack_flood(relay, args, answers),
            }
            if letter in attacks:
                task = asyncio.ensure_future(attacks[letter]())
                done, _ = await asyncio.wait({task}, timeout=args.cap)
                if done:
                    task.result()
                else:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                answered = answers.text() or "(cut short at the cap)"
            rest = args.seconds - (time.monotonic() - t0)
            if letter == "0":
                rest = min(args.seconds, 5.0)
            if rest > 0:
                await asyncio.sleep(rest)
            if letter != "0":  # "or until done": until relay has gone quiet, up to the cap
                notes.append(await settle(sampler, hook, t0, t0 + args.cap))
            if letter == "c":
                answered += (f"; webhook receiver got {hook.posts} POSTs, "
                             f"{hook.octets / 1e6:.0f} MB, largest {hook.largest / 1e6:.1f} MB")
            records = await asyncio.to_thread(legit.stop)
            legit = None
            sampler.sample()
            elapsed = time.monotonic() - t0
            cpu = sampler.cpu_total() - cpu0
            if sampler.killed_at_kb:
                notes.append(f"relay KILLED by the bench at {sampler.killed_at_kb / 1024:.0f} "
                             f"MB (over --rss-limit {args.rss_limit:.0f})")
            elif relay.proc.poll() is not None:
                notes.append(f"relay EXITED during the phase with {relay.proc.returncode}")
            nofile, fds = relay.nofile(), sampler.max_fds
        finally:
            if legit is not None:
                await asyncio.to_thread(legit.stop)
            if sampler is not None:
                sampler.halt.set()
            notes += await asyncio.to_thread(relay.stop)
            log_text = relay.log_summary()
    hwm = max(sampler.hwm_kb.items(), key=lambda kv: kv[1], default=(0, 0))
    largest = sampler.names.get(hwm[0], "?")
    peak_mb = max(sampler.peak_tree_kb, hwm[1]) / 1024
    legit_text, p99 = legit_summary(records)
    line = (f"{name:13s} peak RSS {sampler.peak_tree_kb / 1024:.0f} MB "
            f"(largest process VmHWM {hwm[1] / 1024:.0f} MB: "
            f"{'master' if hwm[0] == relay.proc.pid else largest}; "  # type: ignore[union-attr]
            f"idle {idle_kb / 1024:.0f} MB, {sampler.max_procs} procs)  {legit_text}  "
            f"relay CPU {cpu:.1f} s in {elapsed:.0f} s")
    if letter == "d":
        line += f"  relay fds up to {fds} (nofile {nofile})"
    if answered:
        line += f"  [relay answered: {answered}]"
    if log_text:
        line += f"  [{log_text}]"
    if notes:
        line += "  [" + "; ".join(n for n in notes if n) + "]"
    print(line, flush=True)
    return {"name": name, "peak_mb": peak_mb, "p99": p99}


async def main_async(args: argparse.Namespace) -> None:
    hook = Receiver()
    await hook.start()
    results = []
    try:
        for letter in args.phases:
            try:
                results.append(await run_phase(letter, args, hook))
            except (Exception, SystemExit) as exc:  # noqa: BLE001 (the next phase still runs)
                print(f"{PHASES[letter]:13s} FAILED: {type(exc).__name__}: {exc}", flush=True)
                results.append({"name": PHASES[letter], "peak_mb": float("inf"), "p99": None})
    finally:
        await hook.stop()
    judged = [r for r in results if r["name"] != "baseline"] or results
    worst_rss = max(judged, key=lambda r: r["peak_mb"])
    worst_p99 = max(judged, key=lambda r: r["p99"] if r["p99"] is not None else float("inf"))
    rss_ok = worst_rss["peak_mb"] < RSS_TARGET_MB
    p99 = worst_p99["p99"]
    p99_ok = p99 is not None and p99 < P99_TARGET_S
    print(f"targets: peak RSS < {RSS_TARGET_MB:.0f} MB {'HOLDS' if rss_ok else 'FAILS'} "
          f"(worst {worst_rss['peak_mb']:.0f} MB, {worst_rss['name']}); legit p99 < "
          f"{P99_TARGET_S * 1000:.0f} ms {'HOLDS' if p99_ok else 'FAILS'} (worst "
          f"{fmt_s(p99) if p99 is not None else 'no answers'}, {worst_p99['name']})",
          flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--legit":
        url, key, rate, timeout, out = sys.argv[2:7]
        asyncio.run(legit_main(url, key, float(rate), float(timeout), out))
        return
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="0,a,b,c,d",
                    help="comma-separated, of 0 (baseline) a b c d (default: all)")
    ap.add_argument("--seconds", type=float, default=10, help="length of a phase")
    ap.add_argument("--cap", type=float, default=45,
                    help="longest wait for relay to answer a phase's input")
    ap.add_argument("--count", type=int, default=3,
                    help="DSNs, MailChannels requests, metadata requests of each size")
    ap.add_argument("--flood", type=int, default=2000,
                    help="connections to each of the SMTP and API ports")
    ap.add_argument("--rate", type=float, default=20, help="legit requests a second")
    ap.add_argument("--timeout", type=float, default=5, help="legit request timeout")
    ap.add_argument("--flood-sources", type=int, default=1,
                    help="loopback addresses the flood comes from (127.0.1.1 ...)")
    ap.add_argument("--rss-limit", type=float, default=6144,
                    help="MB: relay's tree is killed above this, to spare the machine")
    args = ap.parse_args()
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in args.phases if p not in PHASES]
    if unknown:
        ap.error(f"unknown phases {unknown}: choose from {','.join(PHASES)}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # relay inherits it too: the flood meets relay's caps, not the default
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2 * args.flood + 500:
        print(f"warning: RLIMIT_NOFILE {hard} < the flood's {2 * args.flood} connections",
              file=sys.stderr)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
