"""How much of what a connection was given to send its peer has not yet taken: the
transport's own buffer and, on Linux, the socket's send queue (SIOCOUTQ, tcp(7)), where the
kernel holds megabytes. Read while a large message goes out, to tell a slow transfer from a
stalled one."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import sys

if sys.platform == "linux":
    import fcntl
    import termios

    _SIOCOUTQ: int | None = termios.TIOCOUTQ  # the same request as SIOCOUTQ
else:
    _SIOCOUTQ = None


def unsent(transport: asyncio.BaseTransport | None) -> int:
    """Octets written to `transport` and not yet acknowledged by the peer (0 when closed).
    Not an isinstance check: uvloop's transports are not asyncio's classes."""
    if transport is None:
        return 0
    octets: int = transport.get_write_buffer_size()  # type: ignore[attr-defined]
    sock = transport.get_extra_info("socket")
    if _SIOCOUTQ is not None and sock is not None:
        with contextlib.suppress(OSError, ValueError):
            octets += struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]
    return octets
