#!/usr/bin/env python3
"""End-to-end relaying benchmark: relay vs Postfix, same machine, same sink, same load.

For each side: Postfix's `smtp-sink` is the destination; `smtp-source` sends
MESSAGES messages of SIZE bytes over SESSIONS concurrent sessions (one message
per connection, smtp-source's default; --reuse sends many per connection) to
the relay under test, which relays everything to the sink:

  relay:   a relay-mode listener, [delivery] smarthost = the sink (no TLS)
  Postfix: a private instance (its own config, queue and data directories in a
           temp dir, nothing of /etc/postfix touched) with
           relayhost = [127.0.0.1]:<sink>, mynetworks = 127.0.0.0/8,
           everything else at its defaults

The time runs from the first connection to the last message received by the
sink (smtp-sink -c prints a running "mesg=N" count, which the script reads).
Prints each side's rate and the ratio relay/Postfix.

Usage: python bench/deliver.py [--messages 5000] [--sessions 20] [--size 5120]
                               [--only relay|postfix] [--reuse] [--timeout 300]
                               [--dkim off|on|compare] [--rounds N]
  --dkim compare: relay with DKIM off, then on (an RSA-2048 and an Ed25519 signature on
  every message), same load, and the ratio on/off.
  --rounds N: the sides N times, alternating; each round's ratio and their median. Each run
  also prints the host's steal time: on a busy host every rate drops and ratios scatter.
  The run starts by printing the disk's fsync time: Postfix syncs every message's queue
  file, relay a group of messages at once, so the ratio grows with the disk's latency.
Needs Debian's postfix package (smtp-source, smtp-sink, postfix); installed if missing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchprof import spy, stop

SINK_RATE = re.compile(rb"mesg=(\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_postfix() -> None:
    if all(os.path.exists(f"/usr/sbin/{b}") for b in ("smtp-source", "smtp-sink", "postfix")):
        return
    print("installing postfix ...", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "-q", "postfix"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                   stdout=subprocess.DEVNULL)


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


class Sink:
    """smtp-sink, counting the messages it has received."""

    def __init__(self) -> None:
        self.port = free_port()
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            ["/usr/sbin/smtp-sink", *user, "-c", f"127.0.0.1:{self.port}", "1024"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.count = 0
        threading.Thread(target=self._read, daemon=True).start()
        wait_port(self.port)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):  # type: ignore[attr-defined]
            found = SINK_RATE.findall(chunk)
            if found:
                self.count = int(found[-1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def start_relay(tmp: Path, sink_port: int, dkim: bool = False, smtp_workers: int = 1
                ) -> tuple[subprocess.Popen[bytes], int]:
    """relay on its defaults; with `dkim`, example.com (smtp-source's From domain) has keys
    (RSA-2048 and Ed25519: two signatures a message), else signing is off."""
    port = free_port()
    conf = tmp / "relay.toml"
    conf.write_text(
        f"[server]\nhostname = 'relay.bench'\ndata_dir = '{tmp / 'relay-data'}'\n"
        f"[smtp]\nworkers = {smtp_workers}\n"
        f"[[smtp.listeners]]\nport = {port}\nmode = 'relay'\ntls = 'none'\n"
        f"allowed_networks = ['127.0.0.0/8']\n"
        f"[api]\nport = {free_port()}\n"  # not 8025: a bench may run beside the test suite
        f"[delivery]\nsmarthost = '127.0.0.1:{sink_port}'\nsmarthost_tls = 'none'\n"
        f"[dkim]\nenabled = {'true' if dkim else 'false'}\n")
    if dkim:
        subprocess.run([sys.executable, "-m", "relay.cli", "--config", str(conf), "domains",
                        "add", "example.com"], check=True, stdout=subprocess.DEVNULL)
    proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "--config", str(conf), "serve"],
                            env={**os.environ, "RELAY_LOG_LEVEL": "WARNING"},
                            stdout=subprocess.DEVNULL)
    wait_port(port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum(  # its SMTP workers, before the clock starts
            b"relay.frontworker" in Path(f"/proc/{c}/cmdline").read_bytes()
            for c in _children(proc.pid)) < smtp_workers - 1:
        time.sleep(0.05)
    if smtp_workers > 1:
        time.sleep(1.0)  # each opens its store and says it listens
    return proc, port


def start_postfix(tmp: Path, sink_port: int) -> tuple[Path, int]:
    d = tmp / "postfix"
    for sub in ("etc", "queue", "data"):
        (d / sub).mkdir(parents=True)
    shutil.copy("/etc/postfix/master.cf", d / "etc" / "master.cf")
    (d / "etc" / "main.cf").write_text("compatibility_level = 3.6\n")
    port = free_port()
    settings = {
        "queue_directory": d / "queue", "data_directory": d / "data",
        "myhostname": "postfix.bench", "mydestination": "", "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4", "relayhost": f"[127.0.0.1]:{sink_port}",
        "mynetworks": "127.0.0.0/8", "maillog_file": d / "maillog",
        "maillog_file_prefixes": tmp,
        "alias_maps": "", "alias_database": "", "local_recipient_maps": "",
    }
    etc = str(d / "etc")
    subprocess.run(["postconf", "-c", etc, "-e", *(f"{k}={v}" for k, v in settings.items())],
                   check=True)
    # a private instance: its smtpd on a free loopback port, no chroot (its own queue dir)
    subprocess.run(["postconf", "-c", etc, "-M#", "smtp/inet"], check=True)
    subprocess.run(["postconf", "-c", etc, "-Me",
                    f"127.0.0.1:{port}/inet = 127.0.0.1:{port} inet n - n - - smtpd"], check=True)
    subprocess.run(["postconf", "-c", etc, "-F", "*/*/chroot = n"], check=True)
    if os.geteuid() == 0:
        tmp.chmod(0o755)  # postfix's own processes must reach their directories
        shutil.chown(d / "data", "postfix")  # master's lock file lives there
    started = subprocess.run(["postfix", "-c", etc, "start"], capture_output=True, text=True)
    if started.returncode:
        log = (d / "maillog").read_text() if (d / "maillog").exists() else ""
        raise SystemExit(f"postfix did not start: {started.stderr}{log[-2000:]}")
    wait_port(port)
    return d, port


def stop_postfix(d: Path) -> None:
    subprocess.run(["postfix", "-c", str(d / "etc"), "stop"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def run(port: int, sink: Sink, args: argparse.Namespace) -> tuple[float, int]:
    cmd = ["/usr/sbin/smtp-source", "-c", "-l", str(args.size), "-m", str(args.messages),
           "-s", str(args.sessions), "-f", "sender@example.com", "-t", "rcpt@example.org"]
    if args.reuse:
        cmd.append("-d")
    before = sink.count
    started = time.perf_counter()
    subprocess.run([*cmd, f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + args.timeout
    while sink.count - before < args.messages and time.monotonic() < deadline:
        time.sleep(0.005)
    return time.perf_counter() - started, sink.count - before


def report_stuck(db_path: Path) -> None:
    """Say what became of messages the sink has not seen."""
    import sqlite3

    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT status, count(*), max(last_reply), max(attempts),"
                          " max(leased_until) - unixepoch('subsec') FROM recipients"
                          " WHERE status != 'delivered' GROUP BY status").fetchall()
    for status, count, reply, attempts, lease in rows:
        print(f"  relay: {count} recipient(s) {status} after {attempts} attempt(s); last reply:"
              f" {reply}; lease ends in {lease} s", flush=True)


def _cpu_seconds(pid: int, *, reaped: bool = False) -> float:
    """A process's CPU seconds; with `reaped`, its children's that it has waited for too
    (/proc's cutime and cstime). Raises OSError when it is gone."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15 if reaped else 13]) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its descendants, those it has reaped included: all
    of relay's processes, or all of Postfix's under its master (smtpd, cleanup, qmgr, smtp,
    trivial-rewrite, ... come and go)."""
    try:
        own, kids = _cpu_seconds(pid, reaped=True), _children(pid)
    except OSError:
        return 0.0
    return own + sum(tree_cpu(k) for k in kids)


def postfix_master(d: Path) -> int:
    return int((d / "queue" / "pid" / "master.pid").read_text().split()[0])


def relay_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of relay's main process, its delivery worker and the worker's DKIM
    signer process (Linux), by name; {} when one is gone."""
    try:
        parts = {"main (accept)": _cpu_seconds(pid)}
        for worker in _children(pid):
            parts[f"worker {worker}"] = _cpu_seconds(worker)
            parts.update({f"signer {c}": _cpu_seconds(c) for c in _children(worker)})
    except OSError:
        return {}
    return parts


def report_cpu(before: dict[str, float], after: dict[str, float], messages: int) -> None:
    """Each of relay's processes' CPU time per message over the run (not their start-up)."""
    if after:
        print("  relay CPU per message: " + ", ".join(
            f"{name} {1000 * (cpu - before.get(name, 0.0)) / max(1, messages):.2f} ms"
            for name, cpu in after.items()), flush=True)


def profile(pid: int, into: Path | None, name: str) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """py-spy on relay's main process and its delivery worker, until stopped."""
    if into is None:
        return []
    into.mkdir(parents=True, exist_ok=True)
    time.sleep(1.0)  # the worker is started once the store is open
    pids = {"main": pid}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        pids["worker"] = int(child)
    return [(spy(p, None, into / f"{name}-{what}.txt"), into / f"{name}-{what}.txt")
            for what, p in pids.items()]


def cpu_ticks() -> list[int]:
    """The machine's CPU time so far by kind (/proc/stat's first line)."""
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def steal_share(before: list[int], after: list[int]) -> float:
    """The share of the CPU time between two readings that the hypervisor took (steal): high
    on a busy host, where every rate here is lower and the ratios noisier."""
    delta = [b - a for a, b in zip(before, after)]
    return delta[7] / max(1, sum(delta[:8])) if len(delta) > 7 else 0.0


def report_signing(db_path: Path, messages: int) -> None:
    """How many attempts were DKIM-signed, and how (the attempt log's line). The worker
    records outcomes a moment after the sink has the mail (its writes linger to share a
    commit: store/groupcommit.py), so this waits up to 2 s for all of them."""
    import sqlite3

    deadline = time.monotonic() + 2.0
    with sqlite3.connect(db_path) as db:
        while True:
            rows = db.execute("SELECT signed, count(*) FROM attempts GROUP BY signed").fetchall()
            if sum(n for _, n in rows) >= messages or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    for signed, count in rows:
        print(f"  {count} attempt(s): {signed}", flush=True)


def fsync_ms(directory: str, writes: int = 200) -> float:
    """The disk's time for a 4 KB write and fsync where the runs keep their queues: Postfix
    syncs each message's queue file (several times on its way), relay one group commit for
    the messages that arrive together, so a slower disk widens relay's lead."""
    fd, name = tempfile.mkstemp(dir=directory, prefix="bench-fsync-")
    try:
        started = time.perf_counter()
        for _ in range(writes):
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        return 1000 * (time.perf_counter() - started) / writes
    finally:
        os.close(fd)
        os.unlink(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=5120)
    ap.add_argument("--only", choices=("relay", "postfix"))
    ap.add_argument("--reuse", action="store_true", help="many messages per connection (-d)")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--dkim", choices=("off", "on", "compare"), default="off",
                    help="relay's signing: off, on (RSA + Ed25519), or compare: relay with "
                         "DKIM off, then on, and the ratio on/off (no Postfix)")
    ap.add_argument("--smtp-workers", type=int, default=1,
                    help="relay's [smtp] workers: processes taking its SMTP connections")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the sides this many times, alternating, and give each round's "
                         "ratio and the median (a host's load drifts between runs)")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="record relay's processes with py-spy during each relay run, into "
                         "DIR/<side>-<round>-<process>.txt, and print where the time went")
    args = ap.parse_args()
    print(f"fsync of 4 KB in {tempfile.gettempdir()}: {fsync_ms(tempfile.gettempdir()):.2f} ms",
          flush=True)
    ensure_postfix()
    sides = ["relay-nodkim", "relay-dkim"] if args.dkim == "compare" else ["relay", "postfix"]
    sides = [side for side in sides if not args.only or side == args.only]
    first, second = sides[0], sides[-1]
    ratios, thrift = [], []
    for round_no in range(1, args.rounds + 1):
        if args.rounds > 1:
            print(f"round {round_no} of {args.rounds}", flush=True)
        runs = {side: run_side(side, args, round_no) for side in sides}
        if len(runs) == 2:
            # relay/Postfix (relay runs first), or DKIM on/off (off runs first)
            (rate_1, cpu_1), (rate_2, cpu_2) = runs[first], runs[second]
            ratios.append(rate_1 / rate_2 if args.dkim != "compare" else rate_2 / rate_1)
            # messages a CPU-second, the same way round: what the machine's load moves least
            thrift.append(cpu_2 / cpu_1 if args.dkim != "compare" else cpu_1 / cpu_2)
            name = "DKIM on/off" if args.dkim == "compare" else "relay/Postfix"
            print(f"ratio {name} = {ratios[-1]:.2f}; messages a CPU-second "
                  f"{thrift[-1]:.2f}", flush=True)
    if len(ratios) > 1:
        print("ratios " + ", ".join(f"{r:.2f}" for r in ratios)
              + f"; median {statistics.median(ratios):.2f}")
        print("messages a CPU-second, ratios " + ", ".join(f"{r:.2f}" for r in thrift)
              + f"; median {statistics.median(thrift):.2f}")


def run_side(side: str, args: argparse.Namespace, round_no: int = 1
             ) -> tuple[float, float]:
    """One side's run on a fresh sink and a fresh relay or Postfix: its rate in msg/s and
    the CPU seconds a message of all its processes."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as t:
        tmp = Path(t)
        sink = Sink()
        try:
            if side.startswith("relay"):
                signing = side == "relay-dkim" or (side == "relay" and args.dkim == "on")
                proc, port = start_relay(tmp, sink.port, dkim=signing,
                                         smtp_workers=args.smtp_workers)
                try:
                    spies = profile(proc.pid, args.profile, f"{side}-{round_no}")
                    ticks, cpu, parts = cpu_ticks(), tree_cpu(proc.pid), relay_cpu(proc.pid)
                    took, got = run(port, sink, args)
                    cpu = tree_cpu(proc.pid) - cpu
                    report_cpu(parts, relay_cpu(proc.pid), got)
                    stop(spies, side)
                    steal = steal_share(ticks, cpu_ticks())
                    if got < args.messages:
                        report_stuck(tmp / "relay-data" / "relay.sqlite")
                    report_signing(tmp / "relay-data" / "relay.sqlite", got)
                finally:
                    proc.terminate()
                    proc.wait(120)
            else:
                pdir, port = start_postfix(tmp, sink.port)
                try:
                    master = postfix_master(pdir)
                    ticks, cpu = cpu_ticks(), tree_cpu(master)
                    took, got = run(port, sink, args)
                    cpu = tree_cpu(master) - cpu
                    steal = steal_share(ticks, cpu_ticks())
                finally:
                    stop_postfix(pdir)
        finally:
            sink.stop()
    rate = got / took
    print(f"{side:12s} {got} of {args.messages} messages of {args.size} B over "
          f"{args.sessions} sessions, source to sink, in {took:.2f} s = {rate:.0f} msg/s "
          f"(host steal {100 * steal:.0f}%); CPU {1000 * cpu / max(1, got):.2f} ms a message, "
          f"all its processes", flush=True)
    return rate, cpu / max(1, got)


if __name__ == "__main__":
    main()
