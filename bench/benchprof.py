"""py-spy for the benchmarks: record a process while a phase runs, then name where its time
went (shared by bench/api.py and bench/deliver.py)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path


def spy(pid: int, seconds: float | None, out: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling `pid` 250 times a second while a thread holds the GIL (Python's CPU
    time) for `seconds` (None: until sent SIGINT), into `out` (py-spy's raw format, for
    flamegraph.pl or speedscope)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    limit = [] if seconds is None else ["-d", str(max(1, int(seconds - 1)))]
    return subprocess.Popen([py_spy, "record", "-p", str(pid), *limit, "-r", "250", "--gil",
                             "-f", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(spies: list[tuple[subprocess.Popen[bytes], Path]], title: str) -> None:
    """End open-ended recordings and print each one's summary."""
    for proc, _ in spies:
        proc.send_signal(signal.SIGINT)
    for proc, raw in spies:
        proc.wait(60)
        if raw.exists():
            print(f"  {title} {raw.stem} (py-spy --gil, share of samples, inclusive):\n"
                  f"{summary(raw)}", flush=True)


def summary(raw: Path, top: int = 25) -> str:
    """The relay and aiohttp functions with the most samples under them (a function counted
    once per stack), as shares of all samples."""
    total, under = 0, Counter[str]()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        for frame in set(stack.split(";")):
            if any(k in frame for k in ("relay/", "aiohttp/", "pydantic", "aiosmtp", "dkim/")):
                under[re.sub(r" \(.*/(relay|aiohttp|aiosmtpd|aiosmtplib|dkim)/", r" (\1/",
                             frame)] += n
    return "\n".join(f"  {100 * n / max(1, total):5.1f}%  {f}" for f, n in under.most_common(top))
