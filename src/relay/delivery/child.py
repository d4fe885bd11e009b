"""What relay's child processes (the delivery worker, the DKIM signer) do first: ask the
kernel to kill them when their parent dies, so that a SIGKILLed master leaves no orphan
delivering or signing on its own."""

from __future__ import annotations

import contextlib
import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux prctl(PR_SET_PDEATHSIG, SIGKILL); elsewhere nothing (the parent's pipe closing
    still ends the child)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
