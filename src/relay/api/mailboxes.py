"""Addresses as a request gives them: each item exactly one mailbox (a bare address or
Name <address>), normalized, and each address kept once across to, cc and bcc."""

from __future__ import annotations

import functools
import re
from typing import Any

from .. import compose
from ..addresses import normalize_address
from ..errors import ValidationError
from ..types import Mailbox
from .errors import ApiError

_SPECIAL = re.compile(r'[<"(,;]')  # none of these: a bare address
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')  # a quoted display name, which may hold : or ;
_GROUP = re.compile(r"[:;]")  # outside quotes: RFC 5322 group syntax, not one mailbox
# Name <address>: the name is all before the one "<" (stripped where it is used), and each
# run can end in one place only; the name lazily between two runs of spaces took cubic
# time (0.19 s for 600 spaces and a "<", the most an address may be)
_NAME_ADDR = re.compile(r"^([^<>\"(),;:@\\]*)<([^<>\s\"(),;\\@]+@[^<>\s\"(),;\\@]+)>\s*$")
# "Quoted, Name" <address>: a quoted name may hold what an atom may not (RFC 5322 3.2.4)
_QUOTED_ADDR = re.compile(r'^\s*"((?:[^"\\]|\\.)*)"\s*<([^<>\s"(),;\\@]+@[^<>\s"(),;\\@]+)>\s*$')
_ESCAPED = re.compile(r"\\(.)")


def unique(boxes: tuple[Mailbox, ...], seen: set[str]) -> tuple[Mailbox, ...]:
    out = []
    for mb in boxes:
        if mb.email not in seen:
            seen.add(mb.email)
            out.append(mb)
    return tuple(out)


def mailboxes(value: Any, param: str) -> tuple[Mailbox, ...]:
    if not value:
        return ()
    if not isinstance(value, list):
        return (mailbox(value, f"{param}[0]"),)
    return tuple([mailbox(v, f"{param}[{i}]") for i, v in enumerate(value)])


def mailbox(value: Any, param: str) -> Mailbox:
    if isinstance(value, str):
        try:
            return _known(value)
        except ApiError:
            pass  # again, for the error naming `param`
    return _mailbox(value, param)


@functools.lru_cache(maxsize=4096)
def _known(value: str) -> Mailbox:
    """A mailbox given as text, remembered: bulk mail repeats its senders and recipients (a
    refusal is not remembered; Mailbox is frozen, so one may be shared)."""
    return _mailbox(value, "")


def _mailbox(value: Any, param: str) -> Mailbox:
    if isinstance(value, str) and not _SPECIAL.search(value):
        name, address = "", value.strip()  # a bare address, the common case: no parsing
    elif isinstance(value, str) and (simple := _NAME_ADDR.match(value)) is not None:
        name, address = simple.group(1).strip(), simple.group(2)  # Name <address>
    elif isinstance(value, str) and (quoted := _QUOTED_ADDR.match(value)) is not None:
        name, address = _ESCAPED.sub(r"\1", quoted.group(1)), quoted.group(2)
    elif isinstance(value, str):
        # Not the email package's parser, which reads more forms: it kept the first of a
        # list ("a@x, b@y") or read "Name: evil@x <good@y>" as a group naming evil@x, and
        # it takes ~2 ms for some 600 characters (a request of many such, seconds of the
        # event loop) and recurses once a nested comment. One mailbox an item, in the
        # forms above; lists, groups and comments are refused.
        if _GROUP.search(_QUOTED.sub("", value)) or "," in _QUOTED.sub("", value):
            raise ApiError(422, f"{value!r} is not one email address (a list or a group; "
                           "give one address per item)", param=param)
        raise ApiError(422, f"{value!r} is not an email address: give one as address, "
                       'Name <address> or "Name" <address>', param=param)
    else:
        name, address = value.name or "", value.email
    try:
        address, _ = normalize_address(address, smtputf8=True, param=param)
        # here, not only in submit, so that the error names the request's own field
        if name:
            compose.check_header_text(name, param if isinstance(value, str) else f"{param}.name")
    except ValidationError as exc:
        raise ApiError(422, str(exc), param=exc.param) from None
    return Mailbox(email=address, name=name or None)
