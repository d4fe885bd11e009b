"""Where relay's log lines go and what they look like: `configure(config.log)` in every
process (the command, the delivery worker, the DKIM signer), so all of them write the same
format to stderr.

A line is made by one logging call: its message is the human line (Postfix-like) and its
`extra=` fields are the same facts by name, so the text line and the JSON object never
disagree. Text lines escape control characters (a remote reply or a header with CR/LF in it
cannot forge a line of its own); JSON escapes by construction. Under systemd the text line
carries no timestamp (journald adds one) and starts with a `<N>` syslog priority, which
journald reads as the entry's priority.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import orjson

from .config import LogConfig

ACCESS_LOGGER = "relay.access"  # the HTTP access log: `[log] access_log = false` quiets it
LIMIT = 500  # characters of one outside value (a remote reply, a header) in a line

# aiosmtpd logs every SMTP command at INFO
QUIET = ("mail.log",)

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# RFC 5424 severities, the `<N>` prefix journald reads (sd-daemon(3))
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


def cut(value: object, limit: int = LIMIT) -> str:
    """A value from outside, no longer than `limit` characters (and a mark that it was cut)."""
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def escape(text: str) -> str:
    """Control characters as visible escapes: the text stays on one line."""
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}")
                        if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text)


def under_systemd(environ: Mapping[str, str]) -> bool:
    """Started by systemd: stderr goes to the journal, which stamps each line itself."""
    return bool(environ.get("JOURNAL_STREAM") or environ.get("INVOCATION_ID"))


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The `extra=` fields a record was logged with."""
    return {k: v for k, v in vars(record).items()
            if k not in _STANDARD and not k.startswith("_")}


@functools.lru_cache(maxsize=4)
def _second(second: int) -> str:
    return datetime.datetime.fromtimestamp(second, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.")


def _iso(created: float) -> str:
    """UTC with milliseconds; the date and time to the second made once a second (a line
    per request and per message: strftime was a third of a line's cost)."""
    second = int(created)
    micro = round((created - second) * 1_000_000)  # as datetime rounds it
    if micro == 1_000_000:
        second, micro = second + 1, 0
    return f"{_second(second)}{micro // 1000:03d}Z"


class TextFormatter(logging.Formatter):
    """`2026-12-04T17:43:10.123Z INFO relay.delivery: msg_...: to=<a@b>, ...`; the
    message's control characters escaped."""

    def __init__(self, *, stamp: bool = True, priority: bool = False, process: str = "") -> None:
        super().__init__()
        self.stamp, self.priority = stamp, priority
        self.tag = f"[{process}]" if process else ""

    def format(self, record: logging.LogRecord) -> str:
        head = f"<{_PRIORITY.get(record.levelno, 6)}>" if self.priority else ""
        if self.stamp:
            head += _iso(record.created) + " "
        line = f"{head}{record.levelname} {record.name}{self.tag}: {escape(record.getMessage())}"
        if record.exc_info:
            # a trace is many lines; each gets the prefix, so none passes for a record
            trace = self.formatException(record.exc_info)
            line += "".join(f"\n{head}{record.levelname} {record.name}{self.tag}: | {escape(t)}"
                            for t in trace.splitlines())
        return line


class JsonFormatter(logging.Formatter):
    """One object a line: ts, level, logger, msg, the record's fields, exc when it has one."""

    def __init__(self, *, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _iso(record.created), "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        if self.process:
            out["process"] = self.process
        for key, value in fields(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(out, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:  # an int past 64 bits, say: the slower encoder takes anything
            return json.dumps(out, default=str, ensure_ascii=False)


def level_of(config: LogConfig, environ: Mapping[str, str]) -> int:
    """RELAY_LOG_LEVEL if it names a level, else `[log] level`."""
    for name in (environ.get("RELAY_LOG_LEVEL", ""), config.level):
        level = logging.getLevelName(name.strip().upper())
        if isinstance(level, int):
            return level
    return logging.INFO


def formatter(config: LogConfig, *, process: str = "",
              environ: Mapping[str, str] | None = None) -> logging.Formatter:
    environ = os.environ if environ is None else environ
    if config.format == "json":
        return JsonFormatter(process=process)
    systemd = under_systemd(environ)
    return TextFormatter(stamp=not systemd, priority=systemd, process=process)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours, so that configuring again replaces it rather than adding a second."""


def configure(config: LogConfig, *, process: str = "", environ: Mapping[str, str] | None = None,
              stream: TextIO | None = None) -> None:
    """Send every record at the configured level to stderr in the configured format."""
    environ = os.environ if environ is None else environ
    root = logging.getLogger()
    mine = [h for h in root.handlers if isinstance(h, _Handler)]
    if root.handlers and not mine:
        # someone configured logging first (a test runner, an embedding program): leave
        # their handlers be, as logging.basicConfig does
        _quiet(config)
        return
    for h in mine:
        root.removeHandler(h)
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(formatter(config, process=process, environ=environ))
    root.addHandler(handler)
    root.setLevel(level_of(config, environ))
    # No line shows the caller's file, line, thread or process name: skip looking them up
    # for each record (the logging HOWTO's "Optimization"; about 5 µs of a line's 13)
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    _quiet(config)


class _NotOurs(logging.Filter):
    """aiosmtpd warns of its own deprecated `Session.login_data` at every successful AUTH
    (it sets the attribute itself): a line per login that says nothing about relay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Session.login_data is deprecated")


def _quiet(config: LogConfig) -> None:
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    # flufl.bounce logs a line per detector it tries, and a detector's failure with its
    # traceback before relay hears of it and reads the bounce without it
    # (feedback/bounce_heuristics.py)
    logging.getLogger("flufl.bounce").setLevel(logging.CRITICAL)
    aiosmtpd = logging.getLogger("mail.log")
    if not any(isinstance(f, _NotOurs) for f in aiosmtpd.filters):
        aiosmtpd.addFilter(_NotOurs())
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.NOTSET if config.access_log
                                              else logging.WARNING)
