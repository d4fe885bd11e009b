"""compose's header rule as a property: whatever text a client puts in a subject, a display
name, a custom header or a template variable, the message the API path builds from it
(templates.render → Submitter.prepare → compose.materialize, no network) either is refused
with a ValidationError naming the field or has exactly the header lines relay writes."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from relay import compose, templates
from relay.config import Config, ServerConfig
from relay.errors import ValidationError
from relay.store import SQLiteStore
from relay.submit import Submitter
from relay.types import Composition, EnvelopeRecipient, Mailbox, Submission

# what the composed message's header block must hold, in order, whatever the text
EXPECTED = [b"From", b"To", b"Reply-To", b"Subject", b"Date", b"Message-ID", b"X-Custom",
            b"Content-Type", b"MIME-Version", b"Content-Transfer-Encoding"]
BREAKS = "\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
FIELDS = {"subject", "data.v", "from.name", "to[0].name", "replyTo[0].name",
          "headers.X-Custom"}

# any text, weighted towards what breaks headers: line breaks of every kind, header-like
# text after them, folding whitespace, address punctuation, encoded-word look-alikes, and
# words too long to fold
pieces = st.one_of(
    st.sampled_from(list(BREAKS)), st.sampled_from(["\r\n", "\n\n", "\r\n\r\n", " \r\n\t"]),
    st.sampled_from(["Bcc: x@evil.test", "Bcc : x@evil.test", "Reply-To: e@evil.test",
                     "\t", " ", ":", ";", ",", "<", ">", '"', "@", "=?utf-8?q?a=0D=0A?="]),
    st.characters(exclude_categories=("Cs",)),
    st.integers(min_value=70, max_value=1100).map(lambda n: "w" * n),
)
text = st.lists(pieces, max_size=12).map("".join)


def submitter() -> Submitter:
    """Submitter.prepare reads only the config; the store is never opened."""
    config = Config(server=ServerConfig(hostname="relay.test", data_dir=Path("/nonexistent")))
    return Submitter(config, SQLiteStore(Path("/nonexistent/queue.db")))


SUBMITTER = submitter()


def field_names(message: bytes) -> list[bytes]:
    """The header block's field names read off the bytes, as any MTA would: a line that does
    not start with SP or HTAB starts a field."""
    head = message.split(b"\r\n\r\n", 1)[0]
    assert b"\x00" not in head and not re.search(rb"\r(?!\n)|(?<!\r)\n", head), head
    return [line.split(b":", 1)[0] for line in head.split(b"\r\n")
            if line and line[:1] not in (b" ", b"\t")]


@settings(max_examples=200, deadline=None)
@given(subject=text, var=text, from_name=text, to_name=text, reply_name=text, value=text)
def test_no_text_adds_a_header_line(subject: str, var: str, from_name: str, to_name: str,
                                    reply_name: str, value: str) -> None:
    given_texts = (subject, var, from_name, to_name, reply_name, value)
    try:
        filled = templates.render(subject + " {{v}}", {"v": var}, escape=False,
                                  param="subject", header=True)
        message = SUBMITTER.prepare(Submission(
            mail_from="alice@example.com",
            recipients=(EnvelopeRecipient(address="bob@example.org"),),
            composition=Composition(
                sender=Mailbox(email="alice@example.com", name=from_name or None),
                to=(Mailbox(email="bob@example.org", name=to_name or None),),
                reply_to=(Mailbox(email="help@example.com", name=reply_name or None),),
                subject=filled, text="x", headers=(("X-Custom", value),)),
            source="api"))
    except ValidationError as exc:
        assert exc.param in FIELDS, exc.param
        assert any(c in t for t in given_texts for c in BREAKS), exc  # refused only for cause
        return
    assert field_names(compose.materialize(message.body, message.body_kind)) == EXPECTED
    assert not any(c in t for t in given_texts for c in BREAKS)  # and no break slipped in


def test_each_break_is_refused_naming_the_field() -> None:
    for c in BREAKS:
        for value, param in ((f"a{c}Bcc: x@evil.test", "headers.X-A"),):
            try:
                compose.check_header_text(value, param)
            except ValidationError as exc:
                assert exc.param == param and param in str(exc)
            else:
                raise AssertionError(f"{c!r} was let through")
    compose.check_header_text("Grüße\tfrom: the team; <x@y> =?utf-8?q?x?=", "subject")
