"""The errors relay's stages raise, so that callers can act on them.

    RelayError
    ├── DeliveryFailure            an attempt to hand mail on did not succeed
    │   ├── TemporaryFailure       try again later (4xx, timeouts, SERVFAIL)
    │   └── PermanentFailure       give up now (5xx, null MX, NXDOMAIN)
    ├── ValidationError            bad input; `param` names the field or header
    ├── StoreError                 the queue could not commit (disk full, locked, I/O)
    └── ConfigError                a bad config file; `file`, `key` and `reason`

A `DeliveryFailure` carries the SMTP reply when there was one (`code`,
`enhanced`, `text`), so a bounce or an attempt log can quote it.
"""

from __future__ import annotations


class RelayError(Exception):
    """The root of every error relay raises on purpose."""


class DeliveryFailure(RelayError):
    permanent: bool = False

    def __init__(
        self,
        text: str,
        *,
        code: int | None = None,
        enhanced: str | None = None,
        hard: bool = False,
    ) -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.enhanced = enhanced
        self.hard = hard  # the address itself is bad (only meaningful when permanent)

    def __str__(self) -> str:
        parts = [str(self.code)] if self.code else []
        if self.enhanced:
            parts.append(self.enhanced)
        parts.append(self.text)
        return " ".join(parts)


class TemporaryFailure(DeliveryFailure):
    permanent = False


class PermanentFailure(DeliveryFailure):
    permanent = True


class ValidationError(RelayError):
    """Bad input. `param` names the field or header; `smtp` is the reply an SMTP client gets."""

    def __init__(self, message: str, *, param: str | None = None, smtp: str = "550 5.6.0") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.smtp = smtp


class StoreError(RelayError):
    """The store could not commit; nothing of the operation remains."""


class ConfigError(RelayError):
    def __init__(self, file: str, key: str, reason: str) -> None:
        super().__init__(f"{file}: {key}: {reason}")
        self.file = file
        self.key = key
        self.reason = reason
