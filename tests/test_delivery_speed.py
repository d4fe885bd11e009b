"""What the delivery path does for speed: DATA octets made without needless passes (wire_data,
against aiosmtplib's own two passes) and processes on uvloop."""

from __future__ import annotations

from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from relay.delivery.transaction import wire_data


def aiosmtplib_wire(data: bytes) -> bytes:
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"


@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"x.y", b" "]),
                max_size=30).map(b"".join))
def test_wire_data_is_what_aiosmtplib_would_send(data: bytes) -> None:
    assert wire_data(data) == aiosmtplib_wire(data)


def test_wire_data_cases() -> None:
    assert wire_data(b"") == b"\r\n.\r\n"
    assert wire_data(b"a\r\n.b\r\n") == b"a\r\n..b\r\n.\r\n"
    assert wire_data(b".a\nb\rc") == b"..a\r\nb\r\nc\r\n.\r\n"
    plain = b"Subject: x\r\n\r\nbody\r\n"
    assert wire_data(plain) == plain + b".\r\n"


def test_processes_run_on_uvloop() -> None:
    """relay serve and its delivery worker run their loops through aio.run_loop."""
    import asyncio

    from relay.aio import run_loop

    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    run_loop(main())
    assert seen and seen[0].startswith("uvloop")
