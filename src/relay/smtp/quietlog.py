"""aiosmtpd's log of each command line, masked only when it is written.

aiosmtpd logs every command line twice (at debug and info), through its module's
sanitized_log, which masks AUTH's secret in a copy of the arguments before the logger looks
at its level. relay keeps aiosmtpd's logger at WARNING (logs.py), so the masking was made
for lines never written: ~3 % of the accept path's CPU. Importing this module has aiosmtpd
call a sanitized_log that asks the logger first; the lines that are written are masked as
before (tests/test_smtpd.py)."""

from __future__ import annotations

import logging
from typing import Any

import aiosmtpd.smtp

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}
_sanitized_log = aiosmtpd.smtp.sanitized_log


def _sanitized_log_if_enabled(func: Any, msg: Any, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd's sanitized_log, called only when its logger would write the line."""
    level = _LEVELS.get(getattr(func, "__name__", ""))
    logger = getattr(func, "__self__", None)
    if level is not None and isinstance(logger, logging.Logger) \
            and not logger.isEnabledFor(level):
        return
    _sanitized_log(func, msg, *args, **kwargs)


aiosmtpd.smtp.sanitized_log = _sanitized_log_if_enabled  # aiosmtpd calls it by that name
