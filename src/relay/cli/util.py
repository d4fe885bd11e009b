"""What the `relay` subcommands share: parsers that take --config, the store, tables."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ..config import Config
from ..store import SQLiteStore, store_for
from ..timefmt import iso_seconds


class Subparsers:
    """add_subparsers() whose every parser also takes --config."""

    def __init__(self, action: Any, common: argparse.ArgumentParser) -> None:
        self._action, self._common = action, common

    def add_parser(self, name: str, **kw: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self._action.add_parser(
            name, parents=[self._common], **kw)
        return parser


def with_store(config: Config, fn: Callable[[SQLiteStore], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        store = store_for(config)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(go())


iso = iso_seconds  # the CLI's tables: to the second


def table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def relay_version() -> str:
    """The installed package's version, as `relay --version` and backups name it."""
    try:
        return version("relay")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"
