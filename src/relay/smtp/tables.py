"""aiosmtpd's tables of a protocol's and a handler's methods, made cheaply.

aiosmtpd's SMTP.__init__ reads the commands (smtp_*), AUTH mechanisms (auth_*) and hooks
(handle_*) of the protocol and its handler with dir() and inspect on every connection;
these give it the same tables for a fraction of that (protocol.RelaySMTP.fresh)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import MethodType
from typing import Any

_HOOK_PREFIXES = ("smtp_", "auth_", "handle_")
_hook_names: dict[type, tuple[str, ...]] = {}


def hook_names(obj: object) -> list[str]:
    """The names aiosmtpd looks for on a protocol or handler: its commands (smtp_*), AUTH
    mechanisms (auth_*) and hooks (handle_*), found once per class.

    aiosmtpd's SMTP.__init__ builds its tables of these with dir() and inspect.getmembers()
    on every connection, which reads every attribute of the protocol and its handler: a
    fifth of the accept path's CPU when a client opens a connection per message. A
    `__dir__` that returns only these names gives aiosmtpd the same tables for a fraction
    of that (tests/test_smtpd.py checks the tables are whole)."""
    cls = type(obj)
    names = _hook_names.get(cls)
    if names is None:
        names = _hook_names[cls] = tuple(sorted(
            n for n in object.__dir__(obj) if n.startswith(_HOOK_PREFIXES)))
    return list(names)  # a list of its own: the cache is not the caller's to change


class BoundOnLookup(Mapping[str, Any]):
    """aiosmtpd's table of commands (smtp_*) for one connection: each bound to its protocol
    when looked up (a command or two a connection) rather than all ~20 at every accept."""

    __slots__ = ("_functions", "_owner")

    def __init__(self, functions: dict[str, Any], owner: object) -> None:
        self._functions, self._owner = functions, owner

    def __getitem__(self, name: str) -> Any:
        return MethodType(self._functions[name], self._owner)

    def get(self, name: str, default: Any = None) -> Any:
        function = self._functions.get(name)
        return default if function is None else MethodType(function, self._owner)

    def __iter__(self) -> Iterator[str]:
        return iter(self._functions)

    def __len__(self) -> int:
        return len(self._functions)
