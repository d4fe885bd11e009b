"""One relay on one data dir (DESIGN.md section 9): `serve` holds an exclusive lock on
`<data_dir>/relay.lock` while it runs. A second one on the same dir would take the first's
leased work back into the queue and deliver it again, so it stops at once instead."""

from __future__ import annotations

import fcntl
import os
import pwd
from pathlib import Path

from .errors import StoreError

LOCK_NAME = "relay.lock"


def check_owner(data_dir: Path) -> None:
    """Root must not work in another user's data dir: the files it made (the WAL, keys,
    certificates) would be root's, and the relay user could no longer open them. Raises
    StoreError saying whom to run as."""
    if os.geteuid() != 0:
        return
    try:
        owner = data_dir.stat().st_uid
    except OSError:  # not there (yet), or not a directory: the command itself says so
        return
    if owner != 0:
        try:
            name = pwd.getpwuid(owner).pw_name
        except KeyError:
            name = str(owner)
        raise StoreError(f"{data_dir} belongs to user {name}; run relay as that user "
                         f"(sudo -u {name} relay ...), not as root, so that the files it "
                         "makes stay readable by the service")


def holder(data_dir: Path) -> int | None:
    """The pid of the relay serving `data_dir`, or None when none does (no lock file, or
    nobody holds the lock: a pid left by a crash is not trusted). Raises OSError when the
    lock file cannot be read (another user's)."""
    try:
        fd = os.open(data_dir / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: read whose
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else None
        return None  # we could take it: nobody serves
    finally:
        os.close(fd)  # drops our shared lock, if we took it


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise StoreError naming the process that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "another process"
            os.close(fd)
            raise StoreError(f"{self.path.parent} is in use by relay (pid {holder}); one relay "
                             "serves one data dir (stop it first, or give this one its own "
                             "[server] data_dir)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None
