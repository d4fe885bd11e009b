"""A stored message read back as MIME for the native API: its attachments as a list, and what a
reply needs from it to stay in its thread (Message-ID, References, From, To, Subject).
Retention may have dropped the body: then 410 body_pruned (pruned.py), never a guess."""

from __future__ import annotations

import email.message
import email.parser
import email.policy
from dataclasses import dataclass
from typing import Any

from .. import compose, rawmail
from ..store import SQLiteStore
from .errors import ApiError
from .pruned import raise_if_pruned

MAX_REFERENCES = 900  # characters of a References value: under RFC 5322's 998 with its name


async def stored_mime(store: SQLiteStore, message_id: str) -> email.message.EmailMessage:
    """The message as sent (the caller has checked that it is the key's)."""
    stored = await store.get_outgoing(message_id)
    if stored is None:
        await raise_if_pruned(store, message_id)
        raise ApiError(404, f"no email {message_id}", param="id")
    raw = compose.materialize(stored.body, stored.kind)
    return readable_mime(raw)


def readable_mime(raw: bytes) -> email.message.EmailMessage:
    """Stored bytes parsed for reading, or a 422 when a header field holds comments nested
    past what the email package's structured headers parse without RecursionError (a raw
    message takes any header; reading it then must not be a 500)."""
    parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(parsed, email.message.EmailMessage)
    for part in parsed.walk():
        for name, value in part.raw_items():
            if value.count("(") > rawmail.MAX_COMMENTS:
                raise ApiError(422, f"the stored message's {name} field cannot be read: more"
                               f" than {rawmail.MAX_COMMENTS} comments", param="id")
    return parsed


def attachments_json(parsed: email.message.EmailMessage) -> list[dict[str, Any]]:
    """The files the message carries, in MIME order: every leaf part with a file name
    (inline ones with a Content-ID too), never its text or HTML body. Ids are their places
    (att_1 is the first), stable because a stored message never changes."""
    out = []
    for part in parsed.walk():
        if part.is_multipart() or not part.get_filename():
            continue
        payload = part.get_payload(decode=True)
        item: dict[str, Any] = {
            "id": f"att_{len(out) + 1}", "filename": part.get_filename(),
            "contentType": part.get_content_type(),
            "size": len(payload) if isinstance(payload, bytes) else 0,
            "inline": part.get_content_disposition() == "inline"}
        if part["Content-ID"]:
            item["contentId"] = str(part["Content-ID"]).strip().strip("<>")
        out.append(item)
    return out


@dataclass(frozen=True)
class Thread:
    """What a reply to a message takes from it."""

    message_id: str  # the parent's Message-ID, with its angle brackets
    references: str  # the References a reply carries: the parent's chain and its Message-ID
    subject: str  # "Re: " and the parent's subject, not doubled
    sender: dict[str, str] | None  # the parent's From, {email, name}
    to: list[dict[str, str]]  # the parent's To


def thread_of(parsed: email.message.EmailMessage, subject: str) -> Thread:
    """`subject` is the parent's as the store keeps it (decoded)."""
    message_id = _message_id(parsed["Message-ID"])
    if message_id is None:
        raise ApiError(409, "the email has no Message-ID to reply to", type="conflict",
                       param="id")
    chain = _ids(parsed["References"]) or _ids(parsed["In-Reply-To"])[:1]
    return Thread(message_id=message_id, references=references(chain + [message_id]),
                  subject=reply_subject(subject), sender=next(iter(_mailboxes(parsed, "From")),
                                                              None),
                  to=_mailboxes(parsed, "To"))


def reply_subject(subject: str) -> str:
    subject = subject.strip()
    return subject if subject[:3].lower() == "re:" else f"Re: {subject}".strip()


def references(ids: list[str]) -> str:
    """The ids joined, within MAX_REFERENCES: the first (the thread's root) and the latest
    are kept, the oldest after the root dropped (RFC 5322 3.6.4 allows trimming)."""
    if len(" ".join(ids)) <= MAX_REFERENCES:
        return " ".join(ids)
    root, rest = ids[0], ids[1:]
    kept: list[str] = []
    for i in reversed(rest):
        if len(root) + sum(len(k) + 1 for k in kept) + len(i) + 1 > MAX_REFERENCES:
            break
        kept.insert(0, i)
    return " ".join([root, *kept])


def _ids(value: object) -> list[str]:
    found = []
    for word in str(value or "").replace(">", "> ").split():
        if (one := _message_id(word)) is not None:
            found.append(one)
    return found


def _message_id(value: object) -> str | None:
    text = str(value or "").strip()
    if text.startswith("<") and text.endswith(">") and "@" in text and len(text) <= 250 \
            and all(33 <= ord(c) <= 126 for c in text) and text.count("<") == 1:
        return text
    return None


def _mailboxes(parsed: email.message.EmailMessage, header: str) -> list[dict[str, str]]:
    out = []
    # (stored_mime refused comments nested deeper than getaddresses reads)
    for name, address in rawmail.getaddresses([str(v) for v in parsed.get_all(header, [])]):
        if "@" in address:
            out.append({"email": address, "name": name} if name else {"email": address})
    return out
