"""The private-key operation of DKIM, and the signer process that makes it (signer.py starts
it as `python -m relay.delivery.rawsign`).

Kept lean on purpose: the child imports no more than `cryptography`, so it is signing ~75 ms
after it is started, against ~330 ms when it imported relay's signing module (dkimpy,
dnspython), its logging and its metrics (0.3 s of CPU each start, most of what DKIM cost a
short run beyond its signatures). relay.logs is read only if the child fails.

Protocol on the child's stdin/stdout: frames of a 4-octet big-endian length and a pickle;
("key", id, DER) registers a key, ("reset",) forgets them all, ("sign", [(id, digest), ...])
answers [signature, ...]. The child writes "!" first: it is up.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from .child import die_with_parent, ignore_hangup

_PKCS1 = padding.PKCS1v15()
_PREHASHED = Prehashed(hashes.SHA256())
_LEN = struct.Struct(">I")
_READ = 1 << 16
UP = b"!"  # the child's first octet


def raw_signature(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey, digest: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(digest)  # RFC 8463: Ed25519 over the SHA-256 of the headers
    return key.sign(digest, _PKCS1, _PREHASHED)


def frame(value: Any) -> bytes:
    body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


def take_frames(buf: bytearray) -> list[bytes]:
    """The bodies of the complete frames at the start of `buf`, taken out of it."""
    pos, bodies = 0, []
    while len(buf) - pos >= _LEN.size:
        size = _LEN.unpack_from(buf, pos)[0]
        if len(buf) - pos - _LEN.size < size:
            break
        start = pos + _LEN.size
        pos = start + size
        bodies.append(bytes(buf[start:pos]))
    del buf[:pos]
    return bodies


def serve(stdin: int, stdout: int) -> None:
    """The child: sign until stdin ends (the worker is gone), answering all it has read at
    once."""
    keys: dict[int, Any] = {}
    _write_all(stdout, UP)
    buf = bytearray()
    while True:
        data = os.read(stdin, _READ)
        if not data:
            return
        buf += data
        answers = []
        for body in take_frames(buf):
            message = pickle.loads(body)
            if message[0] == "key":
                keys[message[1]] = serialization.load_der_private_key(message[2],
                                                                      password=None)
            elif message[0] == "reset":
                keys.clear()
            elif message[0] == "sign":
                answers.append(frame([raw_signature(keys[kid], digest)
                                      for kid, digest in message[1]]))
        if answers:
            _write_all(stdout, b"".join(answers))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main() -> None:
    die_with_parent()
    ignore_hangup()
    try:
        serve(sys.stdin.fileno(), sys.stdout.fileno())
    except Exception:  # the worker sees the pipe close and signs itself; say why, as it logs
        import logging

        from .. import logs
        from ..config import LogConfig
        if len(sys.argv) >= 3:  # [log] format and level, from the worker that started us
            logs.configure(LogConfig(format=sys.argv[1], level=sys.argv[2]), process="signer")
        logging.getLogger("relay.delivery.signer").exception("the DKIM signer failed")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
