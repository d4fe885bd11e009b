"""types.py: the values made for every message keep what frozen dataclasses promise with
quick_init's faster __init__."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field

import pytest

from relay.frozen import quick_init
from relay.store.base import NewMessage
from relay.types import Mailbox, Submission


def test_quick_init_keeps_frozen_dataclass_behaviour() -> None:
    a = Submission(mail_from="a@example.com", recipients=())
    b = Submission(mail_from="a@example.com", recipients=())
    assert a == b and a.metadata == {} and a.metadata is not b.metadata  # a fresh dict each
    assert a.stream == "transactional" and a.tags == () and a.webhook_headers is None
    given = {"k": 1}
    assert Submission(mail_from="", recipients=(), metadata=given).metadata is given
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.mail_from = "b@example.com"  # type: ignore[misc]
    assert dataclasses.replace(a, mail_from="c@example.com").mail_from == "c@example.com"
    assert pickle.loads(pickle.dumps(a)) == a
    assert hash(Mailbox(email="x@example.com")) == hash(Mailbox(email="x@example.com", name=None))
    with pytest.raises(TypeError, match="mail_from"):
        Submission(recipients=())  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="bogus"):
        NewMessage(id="m", created_at=0.0, mail_from="", recipients=(), body=b"",
                   source="api", bogus=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Mailbox("x@example.com")  # type: ignore[misc]  # keyword-only, as before


def test_quick_init_refuses_a_class_it_would_get_wrong() -> None:
    @dataclass(frozen=True, kw_only=True)
    class Checked:
        n: int = 0

        def __post_init__(self) -> None:
            raise ValueError

    with pytest.raises(TypeError, match="Checked"):
        quick_init(Checked)

    @quick_init
    @dataclass(frozen=True, kw_only=True)
    class Plain:
        n: int = 1
        items: list[int] = field(default_factory=list)

    assert Plain() == Plain(n=1, items=[]) and Plain().items is not Plain().items
