"""What relay's child processes (the delivery worker, the DKIM signer) do first: ask the
kernel to kill them when their parent dies, so that a SIGKILLed master leaves no orphan
delivering or signing on its own."""

from __future__ import annotations

import contextlib
import ctypes
import signal

PR_SET_PDEATHSIG = 1


def ignore_hangup() -> None:
    """SIGHUP is the master's (reload); a hangup sent to the whole process group, as a
    closing terminal does, must not end a child in the middle of its work."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def signal_name(returncode: int | None) -> str | None:
    """"SIGKILL" for a process that a signal ended (a negative return code), else None."""
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def die_with_parent() -> None:
    """Linux prctl(PR_SET_PDEATHSIG, SIGKILL); elsewhere nothing (the parent's pipe closing
    still ends the child)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
