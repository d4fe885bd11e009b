"""A consistent copy of the queue database while relay runs and writes (`relay backup`).

SQLite's online backup API copies the pages as of one read transaction: in WAL mode the
relay's writer carries on meanwhile and the copy is the database at one instant, never a
torn mix (copying the file and its -wal by hand can be). The copy is written beside its
final name and renamed, so a half-made backup never looks whole."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from ..errors import StoreError
from .schema import MIGRATIONS

BUSY_TIMEOUT_MS = 30_000  # the relay's writer holds its lock for one group commit at most


def backup_database(source: Path, target: Path) -> int:
    """Copy `source` to `target` (made 0600); returns the copy's schema version."""
    partial = target.with_name(target.name + ".partial")
    try:
        src = sqlite3.connect(source, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)  # all pages in one step: one snapshot
                dst.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
                version = _version(dst)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise StoreError(f"{source}: cannot back up the database: {exc}") from exc
    os.replace(partial, target)
    return version


def schema_version(path: Path) -> int:
    """The schema version of a database file (0 when it has none)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return _version(db)
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: not a readable relay database: {exc}") from exc


def known_schema() -> int:
    """The newest schema version this relay can open."""
    return len(MIGRATIONS)


def _version(db: sqlite3.Connection) -> int:
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchall():
        return 0
    row = db.execute("SELECT version FROM schema_version").fetchone()
    return int(row[0]) if row else 0
