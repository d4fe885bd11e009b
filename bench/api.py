#!/usr/bin/env python3
"""HTTP API benchmark: durable sends per second over loopback.

Starts relay (delivery paused, so only accepting is measured) on a temp data dir, makes a
key, then posts with CONNECTIONS concurrent keep-alive connections from `wrk` (C, one
thread: a Python client would take as much CPU as the server) for SECONDS each:

  single   POST /v1/emails, a text+html message each; each 202 means committed to disk
  batch    POST /v1/emails/batch with 100 such messages each

Prints requests/s and messages/s for each, p50 and p99 latency, how many answers were not
202/207, and relay's CPU per message (Linux /proc: user and system time of the relay process,
all its threads). Then how the store committed them (relay's /metrics): the group commits,
writes a commit, and how much of the time the SQLite file's writers' lock was held, which
every process's commits take in turn (with API workers, the limit once it nears 100 %).
Needs Debian's wrk (installed if missing).

--profile DIR records each phase with py-spy (samples while a thread holds the GIL, which is
Python's CPU time) into DIR/<phase>.txt (py-spy's raw format, for flamegraph.pl or speedscope)
and prints the functions that take the most of it, inclusive.

relay logs at WARNING unless --log-level says otherwise (INFO, the default of `relay serve`,
adds an access line per request and an accept line per message).

--workers N sets `[api] workers` (the master and N - 1 API worker processes on one port);
the CPU time is then all of relay's processes', and --profile records each of them.

--close sends each request on a connection of its own (Connection: close), as a client without
a connection pool does: with API workers the master then accepts and hands over every one.

Usage: python bench/api.py [--seconds 10] [--connections 32] [--only single|batch]
                           [--profile DIR] [--log-level INFO] [--workers N] [--close]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchprof import spy, summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> dict[int, float]:
    """User and system time of relay by process: the master and its children (API workers)."""
    times = {}
    for one in (pid, *children(pid)):
        fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        times[one] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return times


# the store's commit series (relay's /metrics, every process's counts summed)
STORE_SERIES = ("relay_store_commit_seconds_count", "relay_store_lock_held_seconds_sum",
                "relay_store_lock_wait_seconds_sum", "relay_store_commit_writes_sum")
SETTLE = 2.5  # seconds for the workers' counts to reach the master and back (1 s each way)


def store_totals(base: str) -> dict[str, float]:
    """The group commits so far, summed over relay's processes and their labels."""
    with urllib.request.urlopen(base + "/metrics", timeout=30) as answer:
        text = answer.read().decode()
    totals = dict.fromkeys(STORE_SERIES, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def store_line(before: dict[str, float], after: dict[str, float], took: float) -> str:
    """How the phase's writes were committed: commits, writes a commit, and the share of the
    time the SQLite file's writers' lock was held (by one process's commit at a time)."""
    d = {k: after[k] - before[k] for k in STORE_SERIES}
    commits = max(d["relay_store_commit_seconds_count"], 1.0)
    held = d["relay_store_lock_held_seconds_sum"]
    # the commits of requests still in flight when wrk stopped count too: at most all of it
    share = min(100.0, 100 * held / took)
    writes = d["relay_store_commit_writes_sum"] / commits
    return (f"       store: {commits:.0f} commits of {writes:.1f} writes on average; the"
            f" writers' lock held {share:.0f} % of the time"
            f" ({1000 * held / commits:.2f} ms a commit), waited for "
            f"{1000 * d['relay_store_lock_wait_seconds_sum'] / commits:.2f} ms a commit")


def listening(port: int) -> int:
    """How many sockets listen on the TCP port (the master's)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for r in rows if r.split()[1].endswith(f":{port:04X}") and r.split()[3] == "0A")


def api_workers_up(pid: int, data_dir: Path) -> int:
    """How many of the master's API workers have the store open (they take connections a
    moment later: the master hands them out once each says it is ready)."""
    up = 0
    for child in children(pid):
        try:
            if b"relay.frontworker" not in Path(f"/proc/{child}/cmdline").read_bytes():
                continue
            fds = Path(f"/proc/{child}/fd").iterdir()
            up += any(str(data_dir) in os.readlink(fd) for fd in fds)
        except OSError:
            continue
    return up


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


EMAIL = {"from": "Alice <alice@example.com>", "to": ["bob@example.org"],
         "subject": "Your receipt", "text": "Thanks for your order.\n" * 20,
         "html": "<p>Thanks for your order.</p>" * 20, "tags": [{"name": "kind", "value": "r"}]}


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
if os.getenv("BENCH_CLOSE") == "1" then wrk.headers["Connection"] = "close" end
local f = io.open(os.getenv("BENCH_BODY"), "rb")
wrk.body = f:read("*a")
f:close()
bad = 0
response = function(status, headers, body)
  if status ~= 202 and status ~= 207 then bad = bad + 1 end
end
done = function(summary, latency, requests)
  io.write(string.format("requests=%d seconds=%.3f p50ms=%.2f p99ms=%.2f\\n",
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000,
    latency:percentile(99) / 1000))
end
"""


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    print("installing wrk ...", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                   stdout=subprocess.DEVNULL)


def drive(tmp: Path, url: str, key: str, body: bytes, seconds: float,
          connections: int, close: bool = False) -> tuple[int, float, str]:
    script, payload = tmp / "post.lua", tmp / "body.json"
    script.write_text(WRK_SCRIPT)
    payload.write_bytes(body)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "30s", "-s",
         str(script), url], capture_output=True, text=True, check=True,
        env={**os.environ, "BENCH_KEY": key, "BENCH_BODY": str(payload),
             "BENCH_CLOSE": "1" if close else "0"}).stdout
    found = re.search(r"requests=(\d+) seconds=([\d.]+) p50ms=([\d.]+) p99ms=([\d.]+)", out)
    if not found:
        raise SystemExit(f"wrk said:\n{out}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"{errors.group(1)} requests failed:\n{out}")
    return (int(found.group(1)), float(found.group(2)),
            f"p50 {found.group(3)} ms, p99 {found.group(4)} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--only", choices=("single", "batch"))
    ap.add_argument("--profile", type=Path, metavar="DIR")
    ap.add_argument("--log-level", default="WARNING")
    ap.add_argument("--workers", type=int, default=1,
                    help="[api] workers: processes serving the API (the master and N - 1 more)")
    ap.add_argument("--close", action="store_true",
                    help="a connection per request (Connection: close), not keep-alive")
    args = ap.parse_args()
    ensure_wrk()
    with tempfile.TemporaryDirectory(prefix="bench-api-") as t:
        tmp = Path(t)
        port = free_port()
        conf = tmp / "relay.toml"
        conf.write_text(f"[server]\nhostname = 'relay.bench'\ndata_dir = '{tmp / 'data'}'\n"
                        f"[[smtp.listeners]]\nport = {free_port()}\n"
                        f"[api]\nport = {port}\nworkers = {args.workers}\n"
                        f"[delivery]\npaused = true\n")
        made = subprocess.run([sys.executable, "-m", "relay.cli", "--config", str(conf), "keys",
                               "create", "--name", "bench", "--json"],
                              check=True, capture_output=True, text=True)
        key = json.loads(made.stdout)["key"]
        # warnings and errors show here; at a lower level the lines go to a file, as the
        # journal would take them
        quiet = args.log_level.upper() in ("WARNING", "ERROR")
        log = None if quiet else (tmp / "relay.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "--config", str(conf),
                                 "serve"], env={**os.environ, "RELAY_LOG_LEVEL": args.log_level},
                                stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 30
            while not listening(port) or api_workers_up(proc.pid, tmp / "data") < args.workers - 1:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("relay did not start")
                time.sleep(0.05)
            time.sleep(0.5)  # the workers' "ready" to the master
            base = f"http://127.0.0.1:{port}"
            single = json.dumps(EMAIL).encode()
            batch = json.dumps({"emails": [EMAIL] * 100}).encode()
            time.sleep(SETTLE)
            committed = store_totals(base)
            for name, path, body, per in (("single", "/v1/emails", single, 1),
                                          ("batch", "/v1/emails/batch", batch, 100)):
                if args.only and name != args.only:
                    continue
                spies: list[tuple[Path, subprocess.Popen[bytes]]] = []
                if args.profile is not None:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    workers = [c for c in children(proc.pid)
                               if b"relay.frontworker" in Path(f"/proc/{c}/cmdline").read_bytes()]
                    for i, pid in enumerate([proc.pid, *workers]):
                        out = args.profile / (f"{name}.txt" if i == 0 else f"{name}-api{i}.txt")
                        spies.append((out, spy(pid, args.seconds, out)))
                before = cpu_seconds(proc.pid)
                requests, took, latency = drive(tmp, base + path, key, body, args.seconds,
                                                args.connections, args.close)
                spent = {p: t - before.get(p, 0.0) for p, t in cpu_seconds(proc.pid).items()}
                cpu = sum(spent.values())
                # with API workers, how the kernel spread the connections shows in each share
                shares = "" if len(spent) < 2 else " (by process: " + ", ".join(
                    f"{100 * t / max(cpu, 1e-9):.0f} %" for t in spent.values()) + ")"
                print(f"{name:6s} {requests} requests, {requests * per} messages, "
                      f"{args.connections} connections"
                      f"{' (one a request)' if args.close else ''}: {took:.2f} s = "
                      f"{requests / took:.0f} requests/s, {requests * per / took:.0f} "
                      f"messages/s ({latency}); relay CPU "
                      f"{1000 * cpu / max(1, requests * per):.3f} ms/message{shares}",
                      flush=True)
                time.sleep(SETTLE)
                committed, before_store = store_totals(base), committed
                print(store_line(before_store, committed, took), flush=True)
                for out, profile in spies:
                    profile.wait(60)
                    print(f"-- {out.name}\n{summary(out)}", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
            if log is not None:
                log.close()


if __name__ == "__main__":
    main()
