"""Addresses as a request gives them: each item exactly one mailbox (a bare address or
Name <address>), normalized, and each address kept once across to, cc and bcc."""

from __future__ import annotations

import functools
import re
from typing import Any

from .. import compose, rawmail
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
    elif isinstance(value, str):
        # one mailbox per item: parseaddr would silently keep the first of a list
        # ("a@x, b@y") or read "Name: evil@x <good@y>" as a group naming evil@x
        try:
            found = rawmail.getaddresses([value])
        except ValueError as exc:
            raise ApiError(422, f"not an email address: {exc}", param=param) from None
        if len(found) != 1 or _GROUP.search(_QUOTED.sub("", value)):
            raise ApiError(422, f"{value!r} is not one email address (a list or a group; "
                           "give one address per item)", param=param)
        name, address = found[0]
        if not address or "@" not in address:
            raise ApiError(422, f"{value!r} is not an email address", param=param)
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
