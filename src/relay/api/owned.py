"""Ids to objects, for a caller: the one place the API looks up a message or template a
request names and answers 404 when it is not the caller's (owners.py), exactly as when it
does not exist, so that no id of another owner leaks."""

from __future__ import annotations

from .. import owners
from ..store import MessageDetail, SQLiteStore
from ..types import ApiKey, Template
from . import auth
from .errors import ApiError


async def owned_message(store: SQLiteStore, key: ApiKey, message_id: str) -> None:
    """404 unless the message exists and is the key's (owners.py): another owner's id is
    answered as if it did not exist."""
    domain = await store.sender_domain_of(message_id)
    if domain is None or not owners.sees_domain(auth.reach(key), domain):
        raise ApiError(404, f"no email {message_id}", param="id")


async def found_message(store: SQLiteStore, key: ApiKey, message_id: str) -> MessageDetail:
    """The message with its recipients, attempts and events, if it is the key's; else 404."""
    detail = await store.get_message(message_id)
    if detail is None or not owners.sees_domain(auth.reach(key), detail.message.sender_domain):
        raise ApiError(404, f"no email {message_id}", param="id")
    return detail


async def found_template(store: SQLiteStore, domains: tuple[str, ...], template_id: str,
                         param: str = "id") -> Template:
    """The template if it is within reach of a key with these domains; else 404, as if it
    did not exist (the sending dialects use it too)."""
    t = await store.get_template(template_id)
    if t is None or not owners.sees(owners.within(domains), t.owner):
        raise ApiError(404, f"no template {template_id}", param=param)
    return t
