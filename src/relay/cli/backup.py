"""`relay backup DIR` and `relay restore DIR`: the queue and everything relay keeps beside it.

A backup holds the queue database (SQLite's online backup: consistent while relay runs and
accepts mail), every other file of the data dir (the DKIM private keys under dkim/, the
token key, the webhook signing key, the self-signed TLS pair: whatever relay made there),
the config file under config/, and manifest.json: relay's version, the schema version, the
time, and each file's size, mode and sha256. Modes are kept (keys stay 0600).

Restore refuses while a relay holds the data dir, into a data dir that is not empty unless
--force, and when a file's hash differs from the manifest's; it restores into the data dir of
the config it is given, and points the DKIM keys' recorded paths there."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

from ..config import Config, mask_url
from ..datadir import LOCK_NAME, DataDirLock
from ..store.backup import backup_database, known_schema, schema_version
from .util import Subparsers, relay_version, with_store

MANIFEST = "manifest.json"
DATA = "data"  # the data dir's files, under the backup dir
CONFIG = "config"
FORMAT = 1
DB_FILES = ("relay.sqlite", "relay.sqlite-wal", "relay.sqlite-shm", "relay.sqlite-journal",
            "relay.sqlite-writer.lock")  # the last: store/groupcommit.py's WriteLock
MAX_MANIFEST = 16 * 1024 * 1024


def add_parsers(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("backup", help="copy the queue, the keys and the config to DIR "
                       "(safe while relay runs)")
    s.add_argument("dir", type=Path, help="a new or empty directory")
    s.set_defaults(func=cmd_backup)
    s = sub.add_parser("restore", help="put a backup back into the data dir (relay stopped)")
    s.add_argument("dir", type=Path, help="a directory `relay backup` wrote")
    s.add_argument("--force", action="store_true",
                   help="replace the files of a data dir that is not empty")
    s.set_defaults(func=cmd_restore)


# -- backup ---------------------------------------------------------------------------------


def cmd_backup(args: argparse.Namespace, config: Config) -> int:
    try:
        return backup(args.dir, config)
    except OSError as exc:  # a full disk, a directory we may not write: said, not a traceback
        print(f"relay: backup to {args.dir} failed: {exc}", file=sys.stderr)
        return 1


def elsewhere(config: Config, verb: str, tool: str) -> bool:
    """Whether the queue is not the data dir's SQLite file (backup and restore copy only
    that one), said on stderr when so."""
    if config.sqlite_file == config.db_path.absolute():
        return False
    print(f"relay: the queue is in {mask_url(config.store_url)}, not the data dir's SQLite "
          f"file: {verb} with its own tools ({tool} for PostgreSQL)", file=sys.stderr)
    return True


def backup(target: Path, config: Config) -> int:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        print(f"relay: {target} exists and is not an empty directory", file=sys.stderr)
        return 1
    data_dir = config.server.data_dir
    if elsewhere(config, "back it up", "pg_dump"):
        return 1
    if not config.db_path.exists():
        print(f"relay: {config.db_path}: no queue database to back up", file=sys.stderr)
        return 1
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(target, 0o700)  # it holds private keys
    db_copy = target / DATA / config.db_path.name
    db_copy.parent.mkdir(mode=0o700)
    schema = backup_database(config.db_path, db_copy)
    for path in _data_files(data_dir):
        _copy(path, target / DATA / path.relative_to(data_dir))
    source = Path(config.source)
    if source.is_file():
        (target / CONFIG).mkdir(mode=0o700)
        _copy(source, target / CONFIG / source.name)
    files = [_entry(target, p) for p in sorted(target.rglob("*")) if p.is_file()]
    manifest = {"format": FORMAT, "relay": relay_version(), "schema": schema,
                "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "dataDir": str(data_dir), "config": str(source) if source.is_file() else None,
                "files": files}
    _write_synced(target / MANIFEST, json.dumps(manifest, indent=2).encode() + b"\n")
    _fsync_dir(target)
    size = sum(f["size"] for f in files)
    print(f"backed up {config.db_path} (schema {schema}) and {len(files) - 1} other file(s), "
          f"{size} octets, to {target}")
    return 0


def _data_files(data_dir: Path) -> list[Path]:
    """Every regular file of the data dir but the live database and the lock."""
    skip = {*DB_FILES, LOCK_NAME}
    return [p for p in sorted(data_dir.rglob("*"))
            if p.is_file() and not p.is_symlink()
            and not (p.parent == data_dir and (p.name in skip or p.name.endswith(".partial")))]


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(source.stat().st_mode)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o600 or 0o600)
    with os.fdopen(fd, "wb") as out, source.open("rb") as src:
        shutil.copyfileobj(src, out)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(target, mode)  # never wider than the original, not even while it is written


def _entry(root: Path, path: Path) -> dict[str, Any]:
    return {"path": path.relative_to(root).as_posix(), "size": path.stat().st_size,
            "mode": f"{stat.S_IMODE(path.stat().st_mode):04o}", "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- restore --------------------------------------------------------------------------------


class BadBackup(Exception):
    """The directory is not a whole, untouched backup this relay can restore."""


def cmd_restore(args: argparse.Namespace, config: Config) -> int:
    try:
        manifest = read_manifest(args.dir)
        return restore(args, manifest, config)
    except BadBackup as exc:
        print(f"relay: {args.dir}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"relay: restore from {args.dir} failed: {exc}", file=sys.stderr)
        return 1


def restore(args: argparse.Namespace, manifest: dict[str, Any], config: Config) -> int:
    data_dir = config.server.data_dir
    if elsewhere(config, "restore it", "pg_restore"):
        return 1
    present = [p for p in data_dir.iterdir() if p.name != LOCK_NAME] if data_dir.exists() else []
    if present and not args.force:
        print(f"relay: {data_dir} is not empty ({len(present)} entries); restore into an empty "
              "data dir, or give --force to replace its files", file=sys.stderr)
        return 1
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = DataDirLock(data_dir)
    lock.acquire()  # raises StoreError (exit 1) while relay serves this data dir
    try:
        for name in DB_FILES:  # the old database's WAL must not be replayed into the new one
            (data_dir / name).unlink(missing_ok=True)
        restored = 0
        for f in manifest["files"]:
            if f["path"].startswith(DATA + "/"):
                target = data_dir / f["path"][len(DATA) + 1:]
                target.unlink(missing_ok=True)
                _copy(args.dir / f["path"], target)
                restored += 1
        _fsync_dir(data_dir)
    finally:
        lock.release()
    old = manifest.get("dataDir")
    moved = 0
    if isinstance(old, str) and old != str(data_dir):
        moved = with_store(config, lambda s: s.move_key_paths(old, str(data_dir)))
    print(f"restored {restored} file(s) from {args.dir} (relay {manifest.get('relay')}, "
          f"schema {manifest['schema']}, made {manifest.get('created')}) into {data_dir}"
          + (f"; {moved} DKIM key path(s) now under it" if moved else ""))
    if manifest.get("config"):
        print(f"the config file was {manifest['config']}; a copy is in {args.dir / CONFIG}")
    return 0


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest, with every file it lists present and matching its sha256."""
    path = root / MANIFEST
    try:
        if path.stat().st_size > MAX_MANIFEST:
            raise BadBackup(f"{MANIFEST} is larger than {MAX_MANIFEST} octets")
        manifest = json.loads(path.read_bytes())
    except OSError as exc:
        raise BadBackup(f"no readable {MANIFEST} ({exc.strerror or exc}): not a relay "
                        "backup") from None
    except ValueError as exc:
        raise BadBackup(f"{MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(
            manifest.get("files"), list) or not isinstance(manifest.get("schema"), int):
        raise BadBackup(f"{MANIFEST} is not a relay backup manifest of format {FORMAT}")
    if manifest["schema"] > known_schema():
        raise BadBackup(f"its database has schema {manifest['schema']}, newer than this relay "
                        f"knows ({known_schema()}); restore it with relay "
                        f"{manifest.get('relay')} or newer")
    for f in manifest["files"]:
        name = f.get("path") if isinstance(f, dict) else None
        if not isinstance(name, str) or name.startswith("/") or ".." in name.split("/"):
            raise BadBackup(f"{MANIFEST} lists a file outside the backup: {name!r}")
        file = root / name
        if not file.is_file():
            raise BadBackup(f"{name} is missing")
        if _sha256(file) != f.get("sha256"):
            raise BadBackup(f"{name} does not match its sha256 in {MANIFEST}: the backup was "
                            "changed or damaged")
    db = root / DATA / "relay.sqlite"
    if schema_version(db) != manifest["schema"]:
        raise BadBackup(f"{DATA}/relay.sqlite is not the database the manifest describes")
    return manifest

