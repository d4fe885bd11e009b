"""A commit's WAL synced to disk by the writer itself, after the writers' lock is given back.

With `synchronous = FULL`, SQLite syncs the WAL inside COMMIT, while it holds the file's write
lock (and relay's writers' lock, groupcommit.WriteLock): every other process's commit waits
for that fsync as well. With two processes writing (an API worker beside the master, the
delivery worker beside either) the lock was held 83 % of the time (bench/api.py).

So a writer connection runs `synchronous = NORMAL`, which is FULL without the sync at each
commit (SQLite still syncs the WAL before each checkpoint, the database file after it, and
the WAL's header when the file is reused), and the group-commit writer calls `sync()` after
each COMMIT, out of the lock and before any caller of the batch is answered: an fdatasync of
the WAL. That writes out every frame the file has, this commit's and whatever other
processes appended since, so no 250 or 2xx ever comes before its mail is on disk. Another
process may read the commit in the moment before the sync; anything it does with it that
must last is a commit of its own, whose sync writes out this one's frames too.

The first sync also syncs the directory, so that the WAL file's own name is on disk (SQLite
does that at its first sync of a new WAL, which with NORMAL comes at the first checkpoint).
The WAL file lives as long as any connection to the database, this one included, so the
descriptor opened at the first sync is the file's for the life of the store.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from ..errors import StoreError


class WalSync:
    """The WAL of the SQLite file at `database`, synced by its writer."""

    def __init__(self, database: Path) -> None:
        self.wal = database.with_name(database.name + "-wal")
        self._fd: int | None = None
        self.active = False  # prepared on a connection in WAL mode

    def prepare(self, db: sqlite3.Connection) -> None:
        """On the writer's connection, outside a transaction: SQLite leaves the commits'
        syncs to `sync`. Where the file could not be put in WAL mode (a file system without
        the shared memory WAL needs), SQLite keeps its own syncs (FULL) and `sync` does
        nothing."""
        (mode,) = db.execute("PRAGMA journal_mode").fetchone()
        if str(mode).lower() != "wal":
            return
        db.execute("PRAGMA synchronous = NORMAL")
        self.active = True

    def sync(self) -> None:
        """After a COMMIT (on the writer's thread): the WAL, and the first time its name, on
        disk. An error is the commit's: its callers get StoreError, not an answer."""
        if not self.active:
            return
        try:
            if self._fd is None:
                fd = os.open(self.wal, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _sync_directory(self.wal.parent)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd = fd
            # fdatasync, as SQLite's own sync on Linux; fsync where there is none (macOS)
            (getattr(os, "fdatasync", None) or os.fsync)(self._fd)
        except OSError as exc:
            raise StoreError(f"{self.wal}: cannot sync the commit to disk: "
                             f"{exc.strerror or exc}") from exc

    def close(self) -> None:
        """Once the writer's connection is closed."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
