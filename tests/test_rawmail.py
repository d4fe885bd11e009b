"""rawmail's reading of header fields: address_domains takes a fast path for the common
one-mailbox From and must answer exactly as the email package's full parser does."""

from __future__ import annotations

import email.utils

import pytest

from relay import rawmail

VALUES = [
    "a@b", "<a@b>", " Name <a@b.com> ", "John Q. Public <j@x.com>", "ä <ü@ö.de>",
    "Name\r\n <a@b.example>", "Sender <sender@EXAMPLE.com>",
    # forms the fast path leaves to the parser
    '"Q, R" <a@b>', "a@b, c@d", "Name <a@b> (comment)", "Grp: a@b, c@d;", "x <a@b>>",
    "<<a@b>", "a@@b", "@b", "a@", "Bob <a@b", "a@b>", "", "  ", "a @b", "a@b c@d",
    "x<a@b>y", "<a@b> x", "(c) a@b", "<@route:a@b>", "a@[127.0.0.1]",
]


@pytest.mark.parametrize("value", VALUES)
def test_address_domains_answers_as_the_full_parser(value: str) -> None:
    full = [a.rpartition("@")[2] for _, a in email.utils.getaddresses([value]) if "@" in a]
    assert rawmail.address_domains(value) == full


def test_the_fast_path_is_linear() -> None:
    # no backtracking between the display name, the spaces and the address
    assert rawmail.address_domains(" " * 200_000 + "x") == []
    assert rawmail.address_domains("a" * 100_000 + " <" + "b" * 100_000) == []


def test_comments_nested_past_the_parsers_stack_are_refused() -> None:
    """email.utils.getaddresses recurses once a nested comment: ~300 deep raised
    RecursionError wherever a From was read (accept, delivery)."""
    with pytest.raises(ValueError, match="comments"):
        rawmail.address_domains("(" * 600 + "a@b.example")
    assert rawmail.address_domains("(c) a@b.example") == ["b.example"]
