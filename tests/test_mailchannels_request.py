"""What one MailChannels request may expand into, over real HTTP: past [limits]
max_request_expansion it is a 413 before anything is built; an attachment shared by the
personalizations is stored once and still reaches every recipient; mustache partials read
nothing from the server's disks."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp

from relay import keys
from relay.config import ApiConfig, DeliveryConfig, DnsConfig, LimitsConfig
from relay.service import Service

from .conftest import free_port, make_config, store_rows
from .dnsserver import DNSServer
from .rss import PeakRss
from .sink import Sink
from .test_delivery import FAST, route, wait_final
from .test_mailchannels_send import parsed

MiB = 1024 * 1024


async def start(tmp_path: Path, dns: DNSServer, sink: Sink, **limits: Any
                ) -> tuple[Service, str]:
    route(dns, "example.org", (10, "mx.example.org", "127.0.0.1"))
    port = free_port()
    svc = Service(make_config(
        tmp_path, delivery=DeliveryConfig(mx_port=sink.port, **FAST),
        dns=DnsConfig(nameservers=(dns.nameserver,), timeout=1.0),
        api=ApiConfig(port=port, public_url=f"http://127.0.0.1:{port}"),
        limits=LimitsConfig(**limits)))
    await svc.start()
    _, secret = await keys.create_key(svc.store, name="mc", scopes=("emails:send",))
    return svc, secret


async def post(svc: Service, secret: str, body: dict[str, Any], query: str = ""
               ) -> tuple[int, Any]:
    assert svc.api_bound is not None
    url = "http://{}:{}/tx/v1/send{}".format(*svc.api_bound, query)
    data = io.BytesIO(json.dumps(body).encode())  # a stream: aiohttp warns on large bytes
    headers = {"X-Api-Key": secret, "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s, s.post(url, data=data, headers=headers) as r:
        return r.status, await r.json()


def request(personalizations: int, attachment: bytes, **extra: Any) -> dict[str, Any]:
    return {
        "from": {"email": "alice@example.com"}, "subject": "Your report",
        "content": [{"type": "text/plain", "value": "Attached."}],
        "attachments": [{"filename": "report.bin", "type": "application/octet-stream",
                         "content": base64.b64encode(attachment).decode()}],
        "personalizations": [{"to": [{"email": f"r{i}@example.org"}]}
                             for i in range(personalizations)],
        **extra}


async def stored(svc: Service, sql: str) -> Any:
    return (await store_rows(svc, sql))[0]


async def test_300_personalizations_of_one_mib_are_a_413_at_once(tmp_path: Path,
                                                                 dns: DNSServer) -> None:
    """It was 1.3 GB of RSS and an 18 s stall of the event loop, for a 441 MB answer."""
    body = request(300, os.urandom(MiB))
    async with Sink() as sink:
        svc, secret = await start(tmp_path, dns, sink)
        try:
            for query in ("?dry-run=true", ""):
                with PeakRss() as peak:
                    began = time.monotonic()
                    status, answer = await post(svc, secret, body, query)
                    took = time.monotonic() - began
                assert status == 413, answer
                assert answer["param"] == "personalizations"
                assert "max_request_expansion" in answer["errors"][0]
                assert peak.growth < 64 * MiB, f"{peak.growth / MiB:.0f} MiB"
                assert took < 5.0
            assert (await svc.store.list_messages()).items == ()
        finally:
            await svc.stop()


async def test_a_shared_attachment_is_stored_once_and_reaches_everyone(
        tmp_path: Path, dns: DNSServer) -> None:
    report = os.urandom(200 * 1024)
    async with Sink() as sink:
        svc, secret = await start(tmp_path, dns, sink)
        try:
            status, answer = await post(svc, secret, request(3, report))
            assert status == 200, answer
            assert [r["status"] for r in answer["results"]] == ["sent"] * 3
            ids = [r["message_id"] for r in answer["results"]]
            for message_id in ids:
                await wait_final(svc, message_id)
            assert len(sink.messages) == 3
            for m in sink.messages:
                (part,) = [p for p in parsed(m.data).iter_attachments()]
                assert part.get_filename() == "report.bin"
                assert part.get_content() == report
            # one row of the file for the three messages; their bodies only name it
            assert await stored(svc, "SELECT count(*), sum(length(data)) FROM parts") == (
                1, len(report))
            assert await stored(svc, "SELECT count(DISTINCT message_id), count(DISTINCT part_id)"
                               " FROM message_parts") == (3, 1)
            (largest,) = await stored(svc, "SELECT max(length(data)) FROM bodies")
            assert largest < 4096
        finally:
            await svc.stop()


async def test_mustache_that_grows_past_the_limit_is_a_413_while_building(
        tmp_path: Path, dns: DNSServer) -> None:
    """The request is small; what its sections fill in is not (20 x 100 x 1 KiB)."""
    async with Sink() as sink:
        svc, secret = await start(tmp_path, dns, sink, max_request_expansion=MiB)
        try:
            body = request(20, b"x", content=[{
                "type": "text/plain", "value": "{{#items}}" + "y" * 1024 + "{{/items}}",
                "template_type": "mustache"}])
            for p in body["personalizations"]:
                p["dynamic_template_data"] = {"items": list(range(100))}
            status, answer = await post(svc, secret, body, "?dry-run=true")
            assert status == 413 and answer["param"] == "personalizations", answer
            assert "built so far" in answer["errors"][0]
        finally:
            await svc.stop()


async def test_nested_sections_and_repeated_variables_stop_at_the_limit(
        tmp_path: Path, dns: DNSServer) -> None:
    """A few hundred octets of template and data that would write 50**6 passes, or a
    variable of 100 KiB inserted 10,000 times: a 413 naming the content, quickly."""
    async with Sink() as sink:
        svc, secret = await start(tmp_path, dns, sink)
        try:
            for value, data in (("{{#a}}" * 6 + "x" + "{{/a}}" * 6, {"a": list(range(50))}),
                                ("{{b}}" * 10_000, {"b": "y" * 100 * 1024})):
                body = request(1, b"x", content=[{"type": "text/html", "value": value,
                                                  "template_type": "mustache"}])
                body["personalizations"][0]["dynamic_template_data"] = data
                began = time.monotonic()
                status, answer = await post(svc, secret, body, "?dry-run=true")
                assert status == 413 and answer["param"] == "content[0].value", answer
                assert "max_request_expansion" in answer["errors"][0]
                assert time.monotonic() - began < 10.0
            status, answer = await post(svc, secret, request(1, b"x"), "?dry-run=true")
            assert status == 200  # the server is still fine
        finally:
            await svc.stop()


async def test_mustache_partials_are_never_read_from_files(tmp_path: Path,
                                                           dns: DNSServer) -> None:
    secret_file = tmp_path / "secret.mustache"
    secret_file.write_text("TOP-SECRET-CONTENT")
    template = "before {{>" + str(tmp_path / "secret") + "}} after"
    async with Sink() as sink:
        svc, secret = await start(tmp_path, dns, sink)
        try:
            body = request(1, b"x", content=[
                {"type": "text/plain", "value": template, "template_type": "mustache"},
                {"type": "text/html", "value": template, "template_type": "mustache"}])
            status, answer = await post(svc, secret, body, "?dry-run=true")
            assert status == 200, answer
            (message,) = answer["data"]
            assert "TOP-SECRET" not in message
            assert "before  after" in message
        finally:
            await svc.stop()
