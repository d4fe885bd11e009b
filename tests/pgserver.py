"""A throwaway PostgreSQL server for the tests: Debian's postgresql, initdb in a temporary
directory, listening on 127.0.0.1 on a free port (and a socket in that directory), stopped
and removed at the end. fsync stays on: a commit here is on disk, as in production.

Run as root (CI's container), the server runs as the `postgres` user the Debian package
makes, since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "relay"


def binaries() -> Path | None:
    """The newest installed server's bin directory, or None when there is none."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    def __init__(self) -> None:
        bindir = binaries()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql "
                               "(.ci/run does)")
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
        os.chmod(self.dir, 0o700)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        data = self.dir / "data"
        subprocess.run([*self._as, str(self.bindir / "initdb"), "-D", str(data), "-U", USER,
                        "-A", "trust", "-E", "UTF8", "--locale", "C.UTF-8", "--no-sync"],
                       check=True, capture_output=True)
        log = open(self.dir / "server.log", "wb")  # noqa: SIM115 - the server's own for its life
        self.proc = subprocess.Popen(
            [*self._as, str(self.bindir / "postgres"), "-D", str(data), "-p", str(self.port),
             "-k", str(self.dir), "-c", "listen_addresses=127.0.0.1",
             "-c", "max_connections=300", "-c", "shared_buffers=64MB",
             "-c", "log_min_messages=warning"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("postgres exited: "
                                   + (self.dir / "server.log").read_text(errors="replace"))
            ready = subprocess.run([str(self.bindir / "pg_isready"), "-h", "127.0.0.1",
                                    "-p", str(self.port), "-U", USER, "-d", "postgres"],
                                   check=False, capture_output=True)
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("postgres did not become ready in 60 s")

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = subprocess.run(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                               self.url(database), "-c", sql],
                              check=True, capture_output=True, text=True)
        return done.stdout.strip()

    def create_database(self, name: str) -> str:
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: smart shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
