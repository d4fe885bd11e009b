#!/usr/bin/env python3
"""DKIM signing speed on one core (the process is pinned to CPU 0).

Prints, per second:
  rsa-2048 signatures        the bare RSA-2048 PKCS#1 v1.5 signature, as relay makes it
                             (cryptography / OpenSSL), over a SHA-256 digest
  ed25519 signatures         the bare Ed25519 signature
  sign(rsa)                  relay.dkim.sign of a whole message with one RSA-2048 key:
                             parse, relaxed canonicalization, body and header hashes, fold
  sign(rsa + ed25519)        the same with both keys, as relay signs by default
  render                     relay.render: 7-bit check, key choice and both signatures
  prepare(rsa + ed25519)     relay.dkim.prepare: all of signing but the private-key operations
                             (what the delivery worker does when RSA is left to the signer)
  dkimpy sign(rsa)           dkimpy's own DKIM.sign, pure-Python RSA, for comparison

Usage: python bench/dkim_sign.py [--seconds 3] [--size 5120]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Callable

import dkim as dkimpy
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.config import DkimConfig
from relay.delivery import dkim
from relay.delivery.rawsign import raw_signature
from relay.delivery.render import Renderer
from relay.store import Outgoing


def rate(fn: Callable[[], object], seconds: float) -> float:
    fn()
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(20):
            fn()
        count += 20
    return count / elapsed


class _Ring:
    def __init__(self, keys: list[dkim.SigningKey]) -> None:
        self._keys = keys

    async def fresh(self) -> None:
        return None

    def keys_for(self, domain: str) -> list[dkim.SigningKey]:
        return self._keys if domain == "example.com" else []


def message(size: int) -> bytes:
    head = (b"Received: from client.example ([192.0.2.1])\r\n\tby relay.example (relay) with "
            b"ESMTPSA id msg_01jx; Sun, 22 Nov 2026 10:00:00 +0000\r\n"
            b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\n"
            b"Subject: The quarterly report\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
            b"Message-ID: <01jx@relay.example>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=5120)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    both = [dkim.SigningKey("example.com", "r2026a", rsa_key),
            dkim.SigningKey("example.com", "e2026a", ed_key)]
    data = message(args.size)
    digest = bytes(32)
    renderer = Renderer(DkimConfig(), _Ring(both))  # type: ignore[arg-type]
    outgoing = Outgoing(body=data, sign_domains=(), dkim=None)
    pem = dkim.private_pem(rsa_key)
    rows = [
        ("rsa-2048 signatures", lambda: raw_signature(rsa_key, digest)),
        ("ed25519 signatures", lambda: raw_signature(ed_key, digest)),
        ("sign(rsa)", lambda: dkim.sign(data, both[:1])),
        ("sign(rsa + ed25519)", lambda: dkim.sign(data, both)),
        ("render", lambda: renderer.render(outgoing)),
        ("prepare(rsa + ed25519)", lambda: dkim.prepare(data, both)),
        ("dkimpy sign(rsa)", lambda: dkimpy.sign(
            data, b"r2026a", b"example.com", pem, canonicalize=(b"relaxed", b"relaxed"))),
    ]
    print(f"one core, a {len(data)}-octet message, {args.seconds:g} s each")
    for name, fn in rows:
        seconds = args.seconds if not name.startswith("dkimpy") else min(args.seconds, 2.0)
        per_second = rate(fn, seconds)
        print(f"{name:22s} {per_second:9.0f}/s  {1000 / per_second:7.3f} ms each", flush=True)
    asyncio.run(renderer.close())


if __name__ == "__main__":
    main()
