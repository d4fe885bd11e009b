"""RSA signatures in a process of their own, beside the delivery worker.

An RSA-2048 signature costs ~0.45 ms of CPU (OpenSSL's own figure on these machines), and
the `cryptography` library holds the GIL while it makes one, so in the worker it is CPU the
delivery loop cannot use: with DKIM on, the worker, not the machine, was the limit
(bench/deliver.py --dkim compare). The worker hashes and canonicalizes (dkim.prepare) and
sends only the 32-octet digests, a batch at a time, to this process, which holds the keys it
was sent and answers the signatures in order. Ed25519 (~0.04 ms) stays in the worker.

It is an optimisation and never a way to lose or stall mail: while it starts, and if it
dies or answers wrongly, the worker signs in its own process (the same bytes) and starts a
new one later.

Protocol on the child's stdin/stdout: frames of a 4-octet big-endian length and a pickle;
("key", id, DER) registers a key, ("sign", [(id, digest), ...]) answers [signature, ...].
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import struct
import sys
import time
from typing import Any, BinaryIO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from . import dkim

log = logging.getLogger(__name__)

RESTART_AFTER = 30.0  # seconds before a new signer process after one failed
MAX_KEYS = 256  # keys remembered in the child; past it, it starts afresh
TIMEOUT = 5.0  # an answer slower than this: the child is stuck, sign here instead
_LEN = struct.Struct(">I")


class SignerProcess:
    def __init__(self, *, python: str = sys.executable) -> None:
        self._python = python
        self._proc: asyncio.subprocess.Process | None = None
        self._starting: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._sent: dict[int, tuple[rsa.RSAPrivateKey, int]] = {}  # id(key) -> (key, kid)
        self._failed_at: float | None = None
        self.remote = 0  # signatures made in the child (for tests and the bench)

    @property
    def ready(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def sign(self, items: list[tuple[rsa.RSAPrivateKey, bytes]]) -> list[bytes]:
        """A signature for each (key, digest), in order: the child's when it is up, else
        made here."""
        if items and self.ready:
            try:
                async with self._lock:
                    out = await asyncio.wait_for(self._ask(items), TIMEOUT)
                self.remote += len(out)
                return out
            except (OSError, EOFError, asyncio.TimeoutError, pickle.PickleError, ValueError,
                    asyncio.IncompleteReadError) as exc:
                log.warning("the DKIM signer process failed (%s); signing in the worker",
                            exc)
                self._kill()
                self._failed_at = time.monotonic()
        self._start_soon()
        return [dkim.raw_signature(key, digest) for key, digest in items]

    def _start_soon(self) -> None:
        if self._proc is not None or (self._starting and not self._starting.done()):
            return
        if self._failed_at is not None and time.monotonic() - self._failed_at < RESTART_AFTER:
            return
        self._starting = asyncio.get_running_loop().create_task(self._start(),
                                                                name="dkim-signer-start")

    async def _start(self) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                self._python, "-m", "relay.signer", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE)
            assert proc.stdout is not None
            await asyncio.wait_for(proc.stdout.readexactly(1), TIMEOUT)  # it is listening
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
            log.warning("the DKIM signer process did not start (%s); signing in the worker",
                        exc)
            self._failed_at = time.monotonic()
            return
        self._sent.clear()
        self._proc = proc

    async def _ask(self, items: list[tuple[rsa.RSAPrivateKey, bytes]]) -> list[bytes]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        frames = []
        if len(self._sent) + len(items) > MAX_KEYS and any(
                id(k) not in self._sent for k, _ in items):
            self._sent.clear()
            frames.append(_frame(("reset",)))
        request = []
        for key, digest in items:
            known = self._sent.get(id(key))
            if known is None:
                kid = len(self._sent)
                self._sent[id(key)] = (key, kid)  # holds the key: its id stays its own
                frames.append(_frame(("key", kid, key.private_bytes(
                    serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption()))))
            else:
                kid = known[1]
            request.append((kid, digest))
        frames.append(_frame(("sign", request)))
        proc.stdin.write(b"".join(frames))
        await proc.stdin.drain()
        size = _LEN.unpack(await proc.stdout.readexactly(_LEN.size))[0]
        out = pickle.loads(await proc.stdout.readexactly(size))
        if not isinstance(out, list) or len(out) != len(items):
            raise ValueError("the signer answered the wrong number of signatures")
        return out

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        self._sent.clear()
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def close(self) -> None:
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starting
        proc = self._proc
        self._kill()
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()


def _frame(value: Any) -> bytes:
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """The child: sign until stdin ends (the worker is gone)."""
    keys: dict[int, Any] = {}
    stdout.write(b"!")
    stdout.flush()
    while True:
        head = stdin.read(_LEN.size)
        if len(head) < _LEN.size:
            return
        message = pickle.loads(stdin.read(_LEN.unpack(head)[0]))
        if message[0] == "key":
            keys[message[1]] = serialization.load_der_private_key(message[2], password=None)
        elif message[0] == "reset":
            keys.clear()
        elif message[0] == "sign":
            stdout.write(_frame([dkim.raw_signature(keys[kid], digest)
                                 for kid, digest in message[1]]))
            stdout.flush()


def main() -> None:
    from .worker import _die_with_parent

    _die_with_parent()
    serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
