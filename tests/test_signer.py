"""The DKIM signer process: RSA signatures made in a child process, the same bytes as in the
worker; while it starts and after it dies, the worker signs itself and nothing fails."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.config import DkimConfig
from relay.delivery import dkim
from relay.delivery import signer as signer_module
from relay.delivery.render import Job, KeyRing, Rendered, Renderer
from relay.delivery.signer import SignerProcess
from relay.store import Outgoing

from .test_dkim import key_store

SRC = Path(__file__).resolve().parents[1] / "src"


async def ready(signer: SignerProcess, key: rsa.RSAPrivateKey) -> None:
    await signer.sign([(key, bytes(32))])  # signed here; starts the child
    deadline = time.monotonic() + 20
    while not signer.ready:
        assert time.monotonic() < deadline, "the signer process did not start"
        await asyncio.sleep(0.05)


async def test_signatures_come_from_the_child_and_equal_the_workers_own() -> None:
    key, other = (rsa.generate_private_key(public_exponent=65537, key_size=2048)
                  for _ in range(2))
    signer = SignerProcess()
    try:
        await ready(signer, key)
        items = [(k, hashlib.sha256(b"m%d" % i).digest())
                 for i, k in enumerate((key, other, key))]
        got = await signer.sign(items)
        assert signer.remote == 3
        assert got == [dkim.raw_signature(k, d) for k, d in items]  # PKCS#1 v1.5: the same

        pipe, pid = signer._pipe, signer.pid
        assert pipe is not None and pid is not None
        os.kill(pid, signal.SIGKILL)
        again = await signer.sign(items)  # the child is gone: signed here, no error
        await asyncio.wait_for(pipe.exited, 10)
        again += await signer.sign(items)
        assert again == got + got and signer.remote == 3 and not signer.ready
    finally:
        await signer.close()


def test_the_child_starts_on_the_loop_the_worker_runs() -> None:
    """The delivery worker runs on uvloop (aio.run_loop), whose subprocess transport is not
    asyncio's class: the signer must start and sign there too, not fail to start at every
    message and leave the worker signing alone."""
    from relay.aio import run_loop

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    seen: list[object] = []

    async def main() -> None:
        signer = SignerProcess()
        try:
            await ready(signer, key)
            got = await signer.sign([(key, bytes(32))])
            seen.extend([type(asyncio.get_running_loop()).__module__, signer.remote, got])
        finally:
            await signer.close()

    run_loop(main())
    assert seen == ["uvloop", 1, [dkim.raw_signature(key, bytes(32))]]


async def test_pipelined_requests_get_their_own_answers() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signer = SignerProcess()
    try:
        await ready(signer, key)
        digests = [[hashlib.sha256(b"%d.%d" % (i, j)).digest() for j in range(i % 3 + 1)]
                   for i in range(30)]
        got = await asyncio.gather(*[signer.sign([(key, d) for d in ds]) for ds in digests])
        assert signer.remote == sum(map(len, digests))
        assert got == [[dkim.raw_signature(key, d) for d in ds] for ds in digests]
    finally:
        await signer.close()


async def test_a_stalled_child_is_given_up_and_the_worker_signs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signer = SignerProcess()
    try:
        await ready(signer, key)
        monkeypatch.setattr(signer_module, "TIMEOUT", 0.5)
        assert signer.pid is not None
        os.kill(signer.pid, signal.SIGSTOP)
        started = time.monotonic()
        out = await asyncio.wait_for(signer.sign([(key, bytes(32))]), 10)
        assert out == [dkim.raw_signature(key, bytes(32))] and signer.remote == 0
        assert time.monotonic() - started < 5 and not signer.ready
    finally:
        await signer.close()


async def test_rendered_batches_verify_with_the_signatures_from_the_child(
        tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    records = {b"r1._domainkey.example.test.": dkim.record_text(rsa_key).encode(),
               b"e1._domainkey.example.test.": dkim.record_text(ed_key).encode()}
    store = key_store(tmp_path, [("r1", rsa_key, "rsa-sha256"), ("e1", ed_key, "ed25519-sha256")])
    signer = SignerProcess()
    renderer = Renderer(DkimConfig(), KeyRing(store), signer=signer)  # type: ignore[arg-type]
    try:
        await ready(signer, rsa_key)
        jobs = [Job(Outgoing(body=b"From: a@example.test\r\nTo: b@x.test\r\nSubject: %d\r\n"
                             b"\r\nbody %d\r\n" % (i, i), sign_domains=(), dkim=None))
                for i in range(5)]
        out = await renderer.render_all(jobs)
        assert signer.remote == 5  # one batch: the five RSA signatures
        for r in out:
            assert isinstance(r, Rendered)
            d = dkimpy.DKIM(r.data)
            for i in range(2):
                assert d.verify(idx=i, dnsfunc=lambda name, timeout=5: records[name])
    finally:
        await renderer.close()


async def test_a_signal_death_of_the_child_is_logged_by_name_and_its_close_is_not(
        caplog: pytest.LogCaptureFixture) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    killed, closed = SignerProcess(), SignerProcess()
    try:
        with caplog.at_level(logging.WARNING, logger="relay.delivery.signer"):
            await ready(killed, key)
            pipe, pid = killed._pipe, killed.pid
            assert pipe is not None and pid is not None
            os.kill(pid, signal.SIGKILL)
            await asyncio.wait_for(pipe.exited, 10)
            assert caplog.messages == [("the DKIM signer was killed by SIGKILL; signing in the "
                                        "worker until a new one starts")]
            caplog.clear()
            await ready(closed, key)
            await closed.close()
            assert caplog.messages == []
    finally:
        await killed.close()
        await closed.close()


async def test_the_worker_starts_the_signer_before_its_first_message_when_it_has_rsa_keys(
        tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signer = SignerProcess()
    renderer = Renderer(DkimConfig(), KeyRing(key_store(tmp_path, [  # type: ignore[arg-type]
        ("r1", rsa_key, "rsa-sha256")])), signer=signer)
    try:
        await renderer.warm()  # Scheduler.start does this before it takes any work
        deadline = time.monotonic() + 20
        while not signer.ready:
            assert time.monotonic() < deadline, "the signer process did not start"
            await asyncio.sleep(0.02)
        job = Job(Outgoing(body=b"From: a@example.test\r\nTo: b@x.test\r\n\r\nhi\r\n",
                           sign_domains=(), dkim=None))
        (out,) = await renderer.render_all([job])
        assert isinstance(out, Rendered) and signer.remote == 1  # the first one, in the child
    finally:
        await renderer.close()
    # no RSA key (Ed25519 only), or signing off: no process
    for config, keys in ((DkimConfig(), [("e1", ed25519.Ed25519PrivateKey.generate(),
                                          "ed25519-sha256")]),
                         (DkimConfig(enabled=False), [("r1", rsa_key, "rsa-sha256")])):
        idle = SignerProcess()
        renderer = Renderer(config, KeyRing(key_store(tmp_path, keys)),  # type: ignore[arg-type]
                            signer=idle)
        await renderer.warm()
        await asyncio.sleep(0.3)
        assert idle.pid is None and not idle._children
        await renderer.close()


def test_the_signer_child_imports_no_more_than_it_signs_with() -> None:
    """It starts at every worker start and restart: dkimpy and dnspython, relay's logging
    (its config) and metrics took ~0.25 s of its start's 0.33 s of CPU."""
    child = subprocess.run(  # as SignerProcess starts it; stdin at its end: it returns
        [sys.executable, "-X", "importtime", "-m", signer_module.CHILD, "json", "INFO"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(SRC)})
    assert child.stdout == "!"  # up, then done
    imported = {line.rsplit("|", 1)[-1].strip() for line in child.stderr.splitlines()}
    assert "cryptography" in imported
    assert not imported & {"dkim", "dns", "relay.logs", "relay.config", "relay.metrics",
                           "prometheus_client", "asyncio"}
