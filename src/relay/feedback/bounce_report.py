"""What reading a bounce, complaint or auto-reply yields: the report, its recipients and the
original message it is about (values only; `bounces.parse` makes them)."""

from __future__ import annotations

from dataclasses import dataclass, field


# RFC 3464's actions that say the message reached the recipient or went on: no failure
DELIVERED_ACTIONS = ("delivered", "relayed", "expanded")


@dataclass(frozen=True, kw_only=True)
class BouncedRecipient:
    address: str
    action: str
    status: str | None
    reason: str
    bounce_class: str
    diagnostic: str
    remote_mta: str | None
    reply_code: int | None = None


@dataclass(frozen=True, kw_only=True)
class Original:
    return_path: str | None = None
    message_id: str | None = None
    feedback_id: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, kw_only=True)
class Report:
    type: str
    feedback_type: str | None = None
    recipients: tuple[BouncedRecipient, ...] = ()
    original: Original = field(default_factory=Original)

    @property
    def is_bounce(self) -> bool:
        return self.type == "dsn" and any(r.action == "failed" for r in self.recipients)
