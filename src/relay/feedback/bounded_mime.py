"""Parse a message from an untrusted sender into a bounded `email` tree.

Reports come from anyone on the inbound listener. The stdlib parser builds every part it
is given, and some of its own steps are quadratic in a header's length (parameter parsing
counts quotes from the start of the value for every ";"). So the tree keeps at most
`max_parts` MIME parts and `max_blocks` delivery-status field blocks, the parser stops being
fed soon after either is reached, header values are cut to `MAX_HEADER` characters, and the
bodies of all parts together to `MAX_TEXT`: what reads the tree afterwards (flufl.bounce's
detectors go line by line) then costs the same for a 1 MB report as for a 36 MB one.
"""

from __future__ import annotations

from email.feedparser import BytesFeedParser
from email.message import Message
from email.policy import Policy, compat32
from functools import partial
from typing import Any

__all__ = ["MAX_HEADER", "MAX_TEXT", "Budget", "parse"]

# Long enough for any header a report needs (a Diagnostic-Code, a folded Received line);
# short enough that the stdlib's quadratic parameter parsing stays in microseconds.
MAX_HEADER = 4096
# A report's words for people come first; what follows (the returned message) is cut.
MAX_TEXT = 1 << 20
# The parser is fed this much at a time; parsing overshoots a reached limit by at most this.
_CHUNK = 8192
_FIELD_PARENTS = ("message/delivery-status",)  # the stdlib parses these into field blocks


class Budget:
    """What a tree may still take: MIME parts, and field blocks of delivery-status parts."""

    def __init__(self, *, max_parts: int, max_blocks: int) -> None:
        self.parts = max_parts
        self.blocks = max_blocks
        self.text = MAX_TEXT
        self.dropped = 0

    def take(self, parent_type: str) -> bool:
        if parent_type in _FIELD_PARENTS:
            if self.blocks <= 0:
                self.dropped += 1
                return False
            self.blocks -= 1
            return True
        if self.parts <= 0:
            self.dropped += 1
            return False
        self.parts -= 1
        return True

    def cut(self, body: str) -> str:
        """The part of a body that still fits."""
        body = body[:max(self.text, 0)]
        self.text -= len(body)
        return body

    @property
    def spent(self) -> bool:
        return self.dropped > 0


class _Part(Message):
    """A message part that refuses children once the budget is spent."""

    def __init__(self, policy: Policy = compat32, *, budget: Budget) -> None:
        super().__init__(policy)
        self._budget = budget

    def attach(self, payload: Any) -> None:
        if self._budget.take(self.get_content_type()):
            super().attach(payload)

    def set_payload(self, payload: Any, charset: Any = None) -> None:
        if isinstance(payload, str):
            payload = self._budget.cut(payload)
        super().set_payload(payload, charset)

    def set_raw(self, name: str, value: Any) -> None:
        if isinstance(value, str) and len(value) > MAX_HEADER:
            value = value[:MAX_HEADER]
        super().set_raw(name, value)


def parse(raw: bytes, *, max_parts: int, max_blocks: int) -> tuple[Message, Budget]:
    """The message as a tree of at most 1 + `max_parts` parts (the root is not counted) and
    `max_blocks` field blocks; the budget tells whether anything was left out."""
    budget = Budget(max_parts=max_parts, max_blocks=max_blocks)
    parser = BytesFeedParser(_factory=partial(_Part, budget=budget), policy=compat32)
    for start in range(0, len(raw), _CHUNK):
        parser.feed(raw[start:start + _CHUNK])
        if budget.spent:
            break
    return parser.close(), budget
