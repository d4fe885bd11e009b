#!/usr/bin/env python3
"""Accept and end-to-end, side by side: 1 node on SQLite, 1 node on PostgreSQL, 2 nodes on
one PostgreSQL database (issue 20).

Each setup runs real `relay serve` processes (one per node, own data dir) delivering to an
SMTP sink (a smarthost on loopback), and a throwaway PostgreSQL server (Debian's, as the
tests start it; fsync on). An asyncio client sends MESSAGES messages of SIZE bytes over
SESSIONS concurrent SMTP sessions, spread evenly over the nodes:
 - accept: messages/s answered 250 (each committed to disk first);
 - end-to-end: messages/s from the first MAIL FROM to the last message at the sink.

Usage: python bench/cluster.py [--messages 3000] [--sessions 20] [--size 5120]
         [--setups sqlite,pg,pg2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port, relay_cmd, wait_port
from tests.pgserver import PgServer
from tests.sink import Sink


def start_node(tmp: Path, name: str, store_url: str,
               sink_port: int) -> tuple[subprocess.Popen[bytes], int, Path]:
    smtp, api = free_port(), free_port()
    path = tmp / f"{name}.toml"
    path.write_text(
        f"[server]\nhostname = 'relay-{name}.test'\ndata_dir = '{tmp / name}'\n"
        f"[store]\nurl = '{store_url}'\nnode = 'node-{name}'\n"
        f"[[smtp.listeners]]\nport = {smtp}\nmode = 'relay'\ntls = 'none'\n"
        f"allowed_networks = ['127.0.0.0/8']\n"
        f"[api]\nport = {api}\n"
        f"[delivery]\nsmarthost = '127.0.0.1:{sink_port}'\nsmarthost_tls = 'none'\n"
        f"[dkim]\nenabled = false\n[log]\nlevel = 'warning'\naccess_log = false\n")
    proc = subprocess.Popen(relay_cmd("--config", str(path), "serve"), cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(smtp, timeout=60, proc=proc)
    return proc, smtp, path


async def send(ports: list[int], messages: int, sessions: int, size: int) -> float:
    body = ("Subject: bench\r\nFrom: a@sender.test\r\n\r\n" + "x" * size + "\r\n").encode()
    counter = iter(range(messages))

    async def session(port: int) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await client.connect()
        try:
            for i in counter:
                await client.sendmail("a@sender.test", [f"r{i}@a.test"], body)
        finally:
            await client.quit()

    started = time.perf_counter()
    await asyncio.gather(*(session(ports[i % len(ports)]) for i in range(sessions)))
    return time.perf_counter() - started


async def run_setup(kind: str, args: argparse.Namespace, pg: PgServer | None) -> dict[str, float]:
    nodes = 2 if kind == "pg2" else 1
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmpdir:
        tmp = Path(tmpdir)
        if kind == "sqlite":
            url = f"sqlite://{tmp / 'q.sqlite'}"
        else:
            assert pg is not None
            name = f"bench_{kind}_{int(time.time())}"
            url = pg.create_database(name)
        async with Sink() as sink:
            procs = [start_node(tmp, f"n{i}", url, sink.port) for i in range(nodes)]
            try:
                started = time.perf_counter()
                accept = await send([p[1] for p in procs], args.messages, args.sessions,
                                    args.size)
                while len(sink.messages) < args.messages:
                    await asyncio.sleep(0.05)
                e2e = time.perf_counter() - started
            finally:
                for proc, _, _ in procs:
                    proc.terminate()
                for proc, _, _ in procs:
                    proc.wait(30)
        return {"accept_per_s": args.messages / accept, "end_to_end_per_s": args.messages / e2e}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=5120)
    p.add_argument("--setups", default="sqlite,pg,pg2")
    args = p.parse_args()
    setups = args.setups.split(",")
    pg = None
    if any(s.startswith("pg") for s in setups):
        pg = PgServer()
        pg.start()
    try:
        results = {kind: await run_setup(kind, args, pg) for kind in setups}
    finally:
        if pg is not None:
            pg.stop()
    names = {"sqlite": "1 node, SQLite", "pg": "1 node, PostgreSQL", "pg2": "2 nodes, PostgreSQL"}
    print(f"{args.messages} messages of {args.size} B over {args.sessions} SMTP sessions")
    print(f"{'setup':<22}{'accept msg/s':>14}{'end-to-end msg/s':>18}")
    for kind, r in results.items():
        print(f"{names[kind]:<22}{r['accept_per_s']:>14.0f}{r['end_to_end_per_s']:>18.0f}")
    print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
