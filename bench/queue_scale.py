#!/usr/bin/env python3
"""Queue scale: a million messages queued while delivery is paused, then resumed.

Starts a real `relay serve` (SQLite, a relay-mode listener, the API, `[delivery] paused =
true`, smarthost = Postfix's `smtp-sink` on loopback) on a temp data dir. This script then
fills the queue through relay's own store code, the code the accept path commits with
(`Submitter.prepare` builds one message, copies get fresh ids and recipients, and
`store.rows.insert_messages` writes them, BATCH messages a transaction, into the same file
relay serves), so what is measured is the state of the queue, not the accept rate. Each
message has one recipient, spread over DOMAINS domains, SIZE octets of body, due now.

At each checkpoint (10 k, 100 k, 1 M queued, up to --messages) it measures:
  pick        the store's `lease_due` as the scheduler calls it (the first pick of a
              started scheduler, concurrency x messages_per_session = 10,000, and a pick of
              100, one session's worth), median of 5, each lease given back after; and the
              pick's SELECT alone (no commit, no fsync), median of 20
  next due    `next_due_at` (what an idle scheduler asks), median of 20
  list        `relay queue list` (first page, 100 messages) wall time, the CLI process
              from start to exit; and `relay queue summary` (qshape) the same way
  RSS         relay's master and its children (summed), now and the peak while filling
  bytes/msg   (relay.sqlite + its WAL) / messages queued
then prints EXPLAIN QUERY PLAN of each hot query at the largest size, and with --profile
a py-spy profile of the pick path there (top functions, self time share).

Then delivery is resumed (`paused = false`, SIGHUP: relay reloads), the queue drains to
the sink for --drain seconds, and it prints the delivery rate and relay's peak RSS while
draining from the full queue.

Usage: python bench/queue_scale.py [--messages 1000000] [--size 1024] [--domains 200]
                                   [--batch 20000] [--drain 30] [--profile]
Needs Debian's postfix package for smtp-sink (installed if missing).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from deliver import Sink, ensure_postfix, free_port, wait_port

from relay.config import load as load_config
from relay.store import SQLiteStore
from relay.store.base import NewRecipient
from relay.store.delivery import NEXT_DUE, PICK_DUE, on_pending
from relay.store.rows import insert_messages
from relay.store.thread import PRAGMAS
from relay.submit import Submitter, new_message_id
from relay.types import EnvelopeRecipient, Submission

CHECKPOINTS = (10_000, 100_000, 1_000_000)


# -- relay's processes -------------------------------------------------------------------


def family(pid: int) -> list[int]:
    """A process and all its descendants (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in
                         Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return found


def rss_mb(pid: int) -> float:
    """Resident memory of relay's master and its children, summed, in MB."""
    return sum(rss_mb_one(p) for p in family(pid))


class RssWatch:
    """Samples relay's RSS every 100 ms; `peak()` since the last `reset()`."""

    def __init__(self, pid: int) -> None:
        self.pid, self._peak, self._stop = pid, 0.0, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._peak = max(self._peak, rss_mb(self.pid))

    def reset(self) -> None:
        self._peak = rss_mb(self.pid)

    def peak(self) -> float:
        return max(self._peak, rss_mb(self.pid))

    def stop(self) -> None:
        self._stop.set()


def write_config(path: Path, data: Path, sink_port: int, *, paused: bool) -> None:
    path.write_text(
        f"[server]\nhostname = 'relay.bench'\ndata_dir = '{data}'\n"
        f"[[smtp.listeners]]\nport = {free_port()}\nmode = 'relay'\ntls = 'none'\n"
        f"allowed_networks = ['127.0.0.0/8']\n"
        f"[api]\nport = {free_port()}\n"
        f"[delivery]\npaused = {'true' if paused else 'false'}\n"
        f"smarthost = '127.0.0.1:{sink_port}'\nsmarthost_tls = 'none'\n"
        f"[dkim]\nenabled = false\n")


def relay(conf: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "relay.cli", "--config", str(conf), *args]


# -- filling -----------------------------------------------------------------------------


class Filler:
    """Writes messages into relay's SQLite file through the store's own insert."""

    def __init__(self, conf: Path, db_path: Path, size: int, domains: int) -> None:
        config = load_config(conf)
        text = b"Thanks for your order.\r\n" * max(1, size // 24)
        data = (b"From: Shop <shop@example.com>\r\nTo: someone@example.org\r\n"
                b"Subject: Your receipt\r\n\r\n" + text)
        self.template = Submitter(config, None).prepare(Submission(  # type: ignore[arg-type]
            mail_from="shop@example.com", data=data, source="api",
            recipients=(EnvelopeRecipient(address="someone@example.org"),)))
        self.domains = domains
        self.db = sqlite3.connect(db_path, isolation_level=None, timeout=60)
        for pragma in PRAGMAS:
            self.db.execute(pragma)
        self.count = 0

    def fill(self, upto: int, batch: int) -> None:
        while self.count < upto:
            n = min(batch, upto - self.count)
            now = time.time()
            messages = []
            for k, i in enumerate(range(self.count, self.count + n)):
                domain, at = f"d{i % self.domains}.example", now + k * 1e-6
                messages.append(dataclasses.replace(
                    self.template, id=new_message_id(at), created_at=at,
                    recipients=(NewRecipient(address=f"u{i}@{domain}", domain=domain),)))
            self.db.execute("BEGIN IMMEDIATE")
            insert_messages(self.db, messages)
            self.db.execute("COMMIT")
            self.count += n


# -- measuring ---------------------------------------------------------------------------


def timed(fn: Callable[[], object], times: int) -> float:
    """The median wall time of fn(), in ms."""
    took = []
    for _ in range(times):
        started = time.perf_counter()
        fn()
        took.append(1000 * (time.perf_counter() - started))
    return statistics.median(took)


async def picks(store: SQLiteStore, db_path: Path) -> dict[str, float]:
    """lease_due as the scheduler calls it (each lease given back after), its SELECT alone,
    and next_due_at; medians in ms."""
    found: dict[str, float] = {}
    db = sqlite3.connect(db_path, isolation_level=None, timeout=60)
    for limit in (10_000, 100):
        took = []
        for _ in range(5):
            started = time.perf_counter()
            due = await store.lease_due(time.time(), limit, 600.0)
            took.append(1000 * (time.perf_counter() - started))
            assert len(due) == limit, (len(due), limit)
            give_back(db, [r.id for r in due])
        found[f"lease {limit}"] = statistics.median(took)
    pick, nxt = on_pending(PICK_DUE, db), on_pending(NEXT_DUE, db)
    found["select 100"] = timed(lambda: db.execute(
        pick, (time.time(), time.time(), 100)).fetchall(), 20)
    found["next due"] = timed(lambda: db.execute(nxt).fetchall(), 20)
    db.close()
    return found


def give_back(db: sqlite3.Connection, ids: list[int]) -> None:
    """The bench's leases, given back by id (`recover` would read every recipient)."""
    for i in range(0, len(ids), 500):
        part = ids[i:i + 500]
        db.execute("UPDATE recipients SET leased_until = NULL, leased_by = NULL"
                   f" WHERE id IN ({','.join('?' * len(part))})", part)


def cli_seconds(conf: Path, *args: str) -> float:
    started = time.perf_counter()
    subprocess.run(relay(conf, "queue", *args), check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "RELAY_LOG_LEVEL": "WARNING"})
    return time.perf_counter() - started


def file_bytes(db_path: Path) -> tuple[int, int]:
    wal = db_path.with_name(db_path.name + "-wal")
    return db_path.stat().st_size, wal.stat().st_size if wal.exists() else 0


def hot_queries(db: sqlite3.Connection) -> dict[str, tuple[str, tuple[object, ...]]]:
    """The queries a big queue makes hot, as the store runs them, with sample arguments."""
    from relay.store.counts import WAITING_SQL
    from relay.store.operator import Selector, list_sql, shape_sql

    now = time.time()
    m_where, m_args = Selector().message_where()
    r_where, r_args = Selector().recipient_where()
    shape, shape_args = shape_sql(now, "domain", ("queued", "deferred", "scheduled", "held",
                                                  "failed"))
    return {
        "pick (lease_due)": (on_pending(PICK_DUE, db), (now, now, 100)),
        "next_due_at": (on_pending(NEXT_DUE, db), ()),
        "queue list": (list_sql(m_where, r_where), (*m_args, *r_args, 100)),
        "counts (metrics)": (WAITING_SQL, ("queued", "deferred", "scheduled", "held",
                                           "failed")),
        "queue summary": (shape, shape_args),
    }


def explain(db_path: Path) -> None:
    db = sqlite3.connect(db_path)
    for name, (sql, args) in hot_queries(db).items():
        plan = db.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall()
        print(f"  {name}:")
        for row in plan:
            print(f"    {row[3]}")
    db.close()


PICKER = """
import asyncio, sqlite3, sys, time
sys.path.insert(0, {bench!r})
from queue_scale import give_back
from relay.store import SQLiteStore
async def go():
    s = SQLiteStore({db!r}); await s.open()
    db = sqlite3.connect({db!r}, isolation_level=None, timeout=60)
    end, picks = time.monotonic() + {seconds}, 0
    while time.monotonic() < end:
        give_back(db, [r.id for r in await s.lease_due(time.time(), 100, 600.0)])
        await s.next_due_at()
        picks += 1
    await s.close()
    print(picks)
asyncio.run(go())
"""


def spy(args: list[str], out: Path) -> str:
    """py-spy record (Python frames), then where the time went, as text."""
    spy = Path(sys.executable).with_name("py-spy")
    subprocess.run([str(spy), "record", "--format", "raw", "--rate", "200", "-o", str(out),
                    *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return summarise(out)


def profile_picks(store_path: Path, seconds: float) -> None:
    """A process that does nothing but pick (lease 100, give them back, ask next_due_at)."""
    code = PICKER.format(bench=str(Path(__file__).resolve().parent), db=str(store_path),
                         seconds=seconds)
    print(spy(["--", sys.executable, "-c", code], store_path.with_name("picks.txt")))


def summarise(out: Path, top: int = 10) -> str:
    """Samples by the innermost frame of relay's own code (a statement's SQLite and fsync
    time counts to the line that runs it), and by the innermost frame of all (self time)."""
    mine: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        total += n
        relay = [f for f in frames if "relay/" in f]
        where = short(relay[-1]) if relay else "(outside relay: " + short(frames[-1]) + ")"
        mine[where] = mine.get(where, 0) + n
        own[short(frames[-1])] = own.get(short(frames[-1]), 0) + n
    lines = [f"  py-spy, {total} samples; by relay's innermost frame:"]
    lines += [f"    {100 * c / total:5.1f}%  {name}"
              for name, c in sorted(mine.items(), key=lambda kv: -kv[1])[:top]]
    lines += ["  by self time:"]
    lines += [f"    {100 * c / total:5.1f}%  {name}"
              for name, c in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(lines)


def short(frame: str) -> str:
    """'op (relay/store/delivery.py:131)' from py-spy's 'op (/long/path/relay/...:131)'."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rpartition('src/')[2].rpartition('site-packages/')[2]}" \
        if where else name


# -- the run ------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=1024, help="body octets of each message")
    ap.add_argument("--domains", type=int, default=200)
    ap.add_argument("--batch", type=int, default=20_000, help="messages a transaction")
    ap.add_argument("--drain", type=float, default=30, help="seconds of delivery after")
    ap.add_argument("--profile", action="store_true", help="py-spy the pick path at the end")
    args = ap.parse_args()
    ensure_postfix()
    checkpoints = sorted({c for c in CHECKPOINTS if c < args.messages} | {args.messages})
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as t:
        tmp = Path(t)
        conf, data = tmp / "relay.toml", tmp / "data"
        db_path = data / "relay.sqlite"
        sink = Sink()
        write_config(conf, data, sink.port, paused=True)
        api_port = load_config(conf).api.port
        proc = subprocess.Popen(relay(conf, "serve"), stdout=subprocess.DEVNULL,
                                env={**os.environ, "RELAY_LOG_LEVEL": "WARNING"})
        try:
            wait_port(api_port)
            run(args, proc, conf, db_path, sink, checkpoints)
        finally:
            proc.terminate()
            proc.wait(120)
            sink.stop()


def run(args: argparse.Namespace, proc: subprocess.Popen[bytes], conf: Path, db_path: Path,
        sink: Sink, checkpoints: list[int]) -> None:
    watch = RssWatch(proc.pid)
    filler = Filler(conf, db_path, args.size, args.domains)
    rows = []
    store = SQLiteStore(db_path)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(store.open())
    idle = rss_mb(proc.pid)
    print(f"relay up, RSS {idle:.0f} MB; filling to {args.messages:,} messages of "
          f"{len(filler.template.body)} B, {args.domains} domains, {args.batch:,} a transaction",
          flush=True)
    for upto in checkpoints:
        watch.reset()
        started, before = time.perf_counter(), filler.count
        filler.fill(upto, args.batch)
        filled = time.perf_counter() - started
        fill_peak = watch.peak()
        pick = loop.run_until_complete(picks(store, db_path))
        listed = statistics.median(cli_seconds(conf, "list") for _ in range(3))
        summary = statistics.median(cli_seconds(conf, "summary") for _ in range(3))
        main_db, wal = file_bytes(db_path)
        rows.append((upto, pick, listed, summary, rss_mb(proc.pid), fill_peak,
                     (main_db + wal) / upto))
        print(f"  {upto:>9,} queued: filled {upto - before:,} in {filled:.1f} s "
              f"({(upto - before) / filled:,.0f} msg/s); db {main_db / 1e6:.0f} MB + "
              f"wal {wal / 1e6:.0f} MB", flush=True)
    loop.run_until_complete(store.close())
    loop.close()
    print()
    print("queued     lease 10k ms  lease 100 ms  select 100 ms  next due ms  list s  "
          "summary s  RSS MB  peak fill MB  bytes/msg")
    for upto, pick, listed, summary, rss, peak, per in rows:
        print(f"{upto:>9,}  {pick['lease 10000']:>12.1f}  {pick['lease 100']:>12.2f}  "
              f"{pick['select 100']:>13.3f}  {pick['next due']:>11.3f}  {listed:>6.2f}  "
              f"{summary:>9.2f}  {rss:>6.0f}  {peak:>12.0f}  {per:>9,.0f}")
    print(f"\nquery plans at {checkpoints[-1]:,} queued:")
    explain(db_path)
    if args.profile:
        print(f"\nprofile of the pick path at {checkpoints[-1]:,} (a process doing nothing "
              "else: lease_due 100, the leases given back by id, next_due_at):")
        profile_picks(db_path, 15)
    drain(args, proc, conf, sink, watch)
    watch.stop()


def drain(args: argparse.Namespace, proc: subprocess.Popen[bytes], conf: Path, sink: Sink,
          watch: RssWatch) -> None:
    """Resume delivery (paused = false, SIGHUP) and let it drain to the sink for a while;
    with --profile, py-spy the delivery worker for 10 s of it."""
    text = conf.read_text().replace("paused = true", "paused = false")
    conf.write_text(text)
    watch.reset()
    before, started = sink.count, time.perf_counter()
    cpu = {p: cpu_seconds(p) for p in family(proc.pid)}
    proc.send_signal(signal.SIGHUP)
    print("\ndelivery resumed (paused = false, SIGHUP):", flush=True)
    first, spying = None, None
    marks, profiled = [], []
    while (took := time.perf_counter() - started) < args.drain:
        time.sleep(1)
        if first is None and sink.count > before:
            first = took
        marks.append((took, sink.count - before, rss_mb(proc.pid)))
        if len(marks) % 10 == 0:
            print(f"  {took:5.0f} s: {marks[-1][1]:>9,} delivered, relay RSS "
                  f"{marks[-1][2]:.0f} MB", flush=True)
        workers = [p for p in family(proc.pid) if p != proc.pid and "serve" not in cmdline(p)]
        if args.profile and spying is None and first is not None and took > first + 3 and \
                workers:
            spying = threading.Thread(target=lambda w=workers[0]: profiled.append(spy(
                ["--pid", str(w), "--duration", "10"], conf.with_name("worker.txt"))))
            spying.start()
    sent = sink.count - before
    steady = [m for m in marks if first is not None and m[0] >= first + 2]
    rate = ((steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0])
            if len(steady) > 1 else 0.0)
    print(f"resumed: first message at the sink after {first or 0:.1f} s; {sent:,} delivered "
          f"in {args.drain:.0f} s ({rate:,.0f} msg/s once running); relay RSS peak "
          f"{watch.peak():.0f} MB, at the end {marks[-1][2]:.0f} MB", flush=True)
    for p in family(proc.pid):
        used = cpu_seconds(p) - cpu.get(p, 0.0)
        print(f"  pid {p} ({cmdline(p)[:60]}): RSS {rss_mb_one(p):.0f} MB, CPU "
              f"{1000 * used / max(1, sent):.2f} ms/message", flush=True)
    if spying is not None:
        spying.join()
        print("\nprofile of the delivery worker while draining (10 s):")
        print(*profiled)


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return "?"


def rss_mb_one(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


if __name__ == "__main__":
    main()
