"""TOML file plus RELAY_* environment → the frozen config values of sections.py.

Every bad key or value is a `ConfigError(file, key, reason)`, printed by the
CLI as one line `<file>: <key>: <reason>` before anything listens.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .outbound import outbound_problems
from .sections import Config

DEFAULTS_SOURCE = "<defaults>"
ENV_SOURCE = "environment"


def load(path: str | os.PathLike[str] | None = None,
         environ: Mapping[str, str] | None = None) -> Config:
    """Build the config from `path` (or $RELAY_CONFIG) and RELAY_* overrides."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get("RELAY_CONFIG"):
        path = environ["RELAY_CONFIG"]
    raw: dict[str, Any] = {}
    source = DEFAULTS_SOURCE
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(source, "-", f"cannot read: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, "-", f"not valid TOML: {exc}") from None
    _apply_env(raw, environ)
    config = _build(Config, raw, source, prefix="", env_keys=_env_keys(environ))
    config = dataclasses.replace(config, source=source)
    _check_tls_files(config)
    return config


# RELAY_* variables that are not settings: the config path, log level, and `relay send`'s key.
NOT_SETTINGS = frozenset({"RELAY_CONFIG", "RELAY_LOG_LEVEL", "RELAY_API_KEY"})


def _env_keys(environ: Mapping[str, str]) -> set[str]:
    return {k for k in environ if k.startswith("RELAY_") and k not in NOT_SETTINGS}


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    """RELAY_<SECTION>_<KEY>=value overrides [section] key (value read as TOML if it parses)."""
    sections = {f.name: f for f in dataclasses.fields(Config) if not f.metadata.get("internal")}
    for name in sorted(_env_keys(environ)):
        rest = name[len("RELAY_"):].lower()
        section, _, key = rest.partition("_")
        if section not in sections or (section == "smtp" and key != "workers"):
            raise ConfigError(ENV_SOURCE, name, "no such setting (use RELAY_<SECTION>_<KEY>; "
                              "listeners are set in the file)")
        try:
            value = tomllib.loads(f"v = {environ[name]}")["v"]
        except tomllib.TOMLDecodeError:
            value = environ[name]
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(ENV_SOURCE, name, f"[{section}] is not a table in the file")
        raw[section][key] = value


def _build(cls: type[Any], raw: Any, source: str, *, prefix: str, env_keys: set[str]) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(source, prefix.rstrip(".") or "-", "must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in raw:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(_src(source, prefix, key, env_keys), prefix + key,
                              f"unknown key (known: {known})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = prefix + name
        src = _src(source, prefix, name, env_keys)
        values[name] = _convert(hints[name], raw[name], f, src, key, env_keys)
    return cls(**values)


def _src(source: str, prefix: str, name: str, env_keys: set[str]) -> str:
    env_name = "RELAY_" + (prefix + name).replace(".", "_").upper()
    return ENV_SOURCE if env_name in env_keys else source


def _convert(hint: Any, value: Any, f: dataclasses.Field[Any], source: str, key: str,
             env_keys: set[str]) -> Any:
    check = f.metadata.get("check")
    item = f.metadata.get("item")
    try:
        if dataclasses.is_dataclass(hint):
            return _build(hint, value, source, prefix=key + ".", env_keys=env_keys)
        origin = typing.get_origin(hint)
        if origin is tuple:
            inner = typing.get_args(hint)[0]
            if not isinstance(value, list):
                raise ValueError(f"must be a list, not {_tname(value)}")
            if dataclasses.is_dataclass(inner):
                return tuple(
                    _build(inner, v, source, prefix=f"{key}[{i}].", env_keys=env_keys)
                    for i, v in enumerate(value)
                )
            out = []
            for i, v in enumerate(value):
                if inner is int:
                    if isinstance(v, bool) or not isinstance(v, int):
                        raise ValueError(f"item {i} must be an integer, not {_tname(v)}")
                elif not isinstance(v, str):
                    raise ValueError(f"item {i} must be a string, not {_tname(v)}")
                try:
                    out.append(item(v) if item else v)
                except ValueError as exc:
                    raise ValueError(f"item {i} ({v!r}): {exc}") from None
            return tuple(out)
        if hint is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, not {_tname(value)}")
        elif hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"must be an integer, not {_tname(value)}")
        elif hint is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"must be a number, not {_tname(value)}")
            value = float(value)
        elif hint is str:
            if not isinstance(value, str):
                raise ValueError(f"must be a string, not {_tname(value)}")
        elif hint is Path:
            if not isinstance(value, str) or not value:
                raise ValueError("must be a non-empty path string")
            value = Path(value)
        return check(value) if check else value
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(source, key, str(exc)) from None


def _tname(value: Any) -> str:
    return {list: "a list", dict: "a table", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _check_tls_files(config: Config) -> None:
    for i, listener in enumerate(config.smtp.listeners):
        if (listener.tls_cert == "") != (listener.tls_key == ""):
            raise ConfigError(config.source, f"smtp.listeners[{i}].tls_key",
                              "tls_cert and tls_key must be set together")
        for name in ("tls_cert", "tls_key"):
            path = getattr(listener, name)
            reason = _unreadable(path) if path else None
            if reason:
                raise ConfigError(config.source, f"smtp.listeners[{i}].{name}", f"{path}: {reason}")
    ports = [(lst.address, lst.port) for lst in config.smtp.listeners if lst.port]
    for i, where in enumerate(ports):
        if where in ports[:i]:
            raise ConfigError(config.source, f"smtp.listeners[{i}].port",
                              f"{where[0]}:{where[1]} is used by another listener")
    ca_file = config.delivery.tls_ca_file
    if ca_file and (reason := _unreadable(ca_file)):
        raise ConfigError(config.source, "delivery.tls_ca_file", f"{ca_file}: {reason}")
    for key, reason in outbound_problems(config.delivery)[:1]:
        raise ConfigError(config.source, key, reason)


def _unreadable(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except FileNotFoundError:
        return "no such file"
    except IsADirectoryError:
        return "is a directory, not a file"
    except OSError as exc:
        return f"not readable ({exc.strerror or exc})"
    return None
