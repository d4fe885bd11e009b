"""The logs (issue 19): a line per delivery attempt and terminal outcome, per accepted message
and per HTTP request; text like Postfix's or one JSON object a line; no timestamp of its own
under systemd; a remote reply cannot forge a line. Real deliveries to tests/sink.py, a real
`relay serve` process for the worker's lines."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from relay import keys, logs
from relay.config import (
    BouncesConfig,
    DeliveryConfig,
    DnsConfig,
    ListenerConfig,
    LogConfig,
    load,
)
from relay.errors import ConfigError
from relay.service import Service

from .apiutil import SIMPLE, Api, api_client
from .conftest import free_port, make_config, relay_cmd, run_relay, wait_port
from .dnsserver import DNSServer
from .sink import Sink
from .smtputil import connect, in_thread
from .test_delivery import FAST, route, server_tls, start_relay, submit, wait_final
from .test_inbound import COMPLAINTS, arf, delivered_via_api, dsn, send_report

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")


def lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger]


def text(record: logging.LogRecord) -> str:
    return logs.TextFormatter().format(record)


# -- delivery lines, in process ---------------------------------------------------------------


async def test_a_delivery_and_its_acceptance_each_get_a_line(
        tmp_path: Path, dns: DNSServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with Sink() as sink:
        route(dns, "a.test", (10, "mx.a.test", "127.0.0.1"))
        svc, key = await start_relay(tmp_path, dns, sink.port)
        try:
            mid = await in_thread(submit, svc.bound[0][1], key, ["one@a.test", "two@a.test"])
            await wait_final(svc, mid)
            await _settle()
        finally:
            await svc.stop()
    sent = [r for r in lines(caplog, "relay.delivery") if r.queue_id == mid]  # type: ignore[attr-defined]
    assert sorted(r.to for r in sent) == ["one@a.test", "two@a.test"]  # type: ignore[attr-defined]
    line = text(sent[0])
    assert re.search(
        rf"INFO relay.delivery: {mid}: to=<(one|two)@a.test>, message-id=<[^>]+@relay.test>, "
        rf"relay=mx.a.test\[127.0.0.1\]:{sink.port}, delay=[0-9.]+, dsn=2.0.0, "
        r"status=sent \(250 2.0.0 Ok: queued\)$", line), line
    assert ISO.match(line)
    r = sent[0]
    assert (r.status, r.dsn, r.ip, r.port, r.relay) == (  # type: ignore[attr-defined]
        "sent", "2.0.0", "127.0.0.1", sink.port, "mx.a.test")
    assert 0 <= r.delay < 20  # type: ignore[attr-defined]

    (accepted,) = [r for r in lines(caplog, "relay.accept")
                   if r.queue_id == mid]  # type: ignore[attr-defined]
    assert re.fullmatch(
        rf"{mid}: message-id=<[^>]+@relay.test>, from=<alice@sender.test>, size=\d+, "
        rf"nrcpt=2, via=smtp, key=rk_\w+, status=queued", accepted.getMessage())
    assert accepted.nrcpt == 2 and accepted.via == "smtp"  # type: ignore[attr-defined]
    # the delivery line names the message as its recipient sees it, as the accept line does
    assert f"message-id=<{r.message_id}>" in accepted.getMessage()  # type: ignore[attr-defined]


async def test_a_delivery_over_starttls_names_the_tls_version_and_cipher(
        tmp_path: Path, dns: DNSServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    async with Sink(tls=server_tls(trustme.CA())) as sink:
        route(dns, "a.test", (10, "mx.a.test", "127.0.0.1"))
        svc, key = await start_relay(tmp_path, dns, sink.port)
        try:
            mid = await in_thread(submit, svc.bound[0][1], key, ["x@a.test"])
            await wait_final(svc, mid)
            await _settle()
        finally:
            await svc.stop()
    (record,) = [r for r in lines(caplog, "relay.delivery")
                 if r.queue_id == mid]  # type: ignore[attr-defined]
    assert re.search(r", tls=TLSv1\.[23]/[A-Z0-9_-]+, dsn=2.0.0, status=sent ",
                     record.getMessage()), record.getMessage()
    assert record.tls_version.startswith("TLSv1")  # type: ignore[attr-defined]
    assert record.tls_cipher  # type: ignore[attr-defined]


async def test_deferral_and_bounce_lines_carry_dsn_and_status(
        tmp_path: Path, dns: DNSServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    replies = {"slow@a.test": ["451 4.3.2 try again later", "250 2.1.5 Ok"],
               "gone@a.test": ["550 5.1.1 <gone@a.test>: no such user"]}
    async with Sink(replies=replies) as sink:
        route(dns, "a.test", (10, "mx.a.test", "127.0.0.1"))
        svc, key = await start_relay(tmp_path, dns, sink.port)
        try:
            mid = await in_thread(submit, svc.bound[0][1], key, ["slow@a.test", "gone@a.test"])
            await wait_final(svc, mid)
            await _settle()
        finally:
            await svc.stop()
    said = [r.getMessage() for r in lines(caplog, "relay.delivery")]
    deferred = [m for m in said if "to=<slow@a.test>" in m]
    assert len(deferred) == 2, said
    assert re.search(r"dsn=4.3.2, status=deferred \(451 4.3.2 try again later\)$", deferred[0])
    assert "status=sent" in deferred[1]
    (bounced,) = [m for m in said if "to=<gone@a.test>" in m]
    assert re.search(r"relay=mx.a.test\[127.0.0.1\]:\d+, delay=[0-9.]+, dsn=5.1.1, "
                     r"status=bounced \(550 5.1.1 <gone@a.test>: no such user\)$", bounced)


async def test_a_remote_reply_with_line_breaks_cannot_forge_a_line(
        tmp_path: Path, dns: DNSServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    forged = "Dec  4 relay.delivery: msg_FORGED: to=<x@y>, status=sent"
    replies = {"evil@a.test": [f"550-5.1.1 first\r\n550 5.1.1 {forged}\x1b[31m"]}
    async with Sink(replies=replies) as sink:
        route(dns, "a.test", (10, "mx.a.test", "127.0.0.1"))
        svc, key = await start_relay(tmp_path, dns, sink.port)
        try:
            mid = await in_thread(submit, svc.bound[0][1], key, ["evil@a.test"])
            await wait_final(svc, mid)
            await _settle()
        finally:
            await svc.stop()
    (record,) = [r for r in lines(caplog, "relay.delivery") if r.queue_id == mid]  # type: ignore[attr-defined]
    assert "\n" in record.reply  # type: ignore[attr-defined]  # the field keeps what was said
    line = text(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert "first\\n" in line and "\\x1b[31m" in line
    # in JSON the break is escaped by construction
    obj = json.loads(logs.JsonFormatter().format(record))
    assert forged in obj["reply"] and obj["status"] == "bounced"


def test_long_values_are_cut_and_control_characters_escaped() -> None:
    assert logs.escape("a\r\nb\x00c\u2028") == "a\\r\\nb\\x00c\\u2028"
    assert logs.cut("x" * 2000) == "x" * logs.LIMIT + "..."


async def _settle() -> None:
    """The outcome's line is written just after its commit, which wait_final may see first."""
    await asyncio.sleep(0.3)


# -- formats ------------------------------------------------------------------------------------


def _record(**extra: object) -> logging.LogRecord:
    logger = logging.getLogger("relay.delivery")
    return logger.makeRecord("relay.delivery", logging.INFO, __file__, 1,
                             "msg_X: to=<a@b.example>, status=sent", (), None, extra=extra)


def test_json_is_one_object_a_line_with_stable_keys() -> None:
    out = logs.JsonFormatter(process="worker").format(
        _record(queue_id="msg_X", to="a@b.example", status="sent", delay=1.25))
    assert "\n" not in out
    obj = json.loads(out)
    assert ISO.match(obj["ts"] + " ")
    assert {k: obj[k] for k in ("level", "logger", "msg", "queue_id", "to", "status", "delay",
                                "process")} == {
        "level": "info", "logger": "relay.delivery", "msg": "msg_X: to=<a@b.example>, "
        "status=sent", "queue_id": "msg_X", "to": "a@b.example", "status": "sent",
        "delay": 1.25, "process": "worker"}


def test_text_under_systemd_has_no_timestamp_of_its_own() -> None:
    plain = logs.formatter(LogConfig(), environ={}).format(_record())
    assert ISO.match(plain), plain
    journal = logs.formatter(LogConfig(), environ={"JOURNAL_STREAM": "8:12345"}).format(
        _record())
    assert journal == "<6>INFO relay.delivery: msg_X: to=<a@b.example>, status=sent"
    unit = logs.formatter(LogConfig(), environ={"INVOCATION_ID": "abc"}).format(_record())
    assert not ISO.match(unit.removeprefix("<6>"))
    # JSON always carries its timestamp
    obj = json.loads(logs.formatter(LogConfig(format="json"),
                                    environ={"JOURNAL_STREAM": "8:1"}).format(_record()))
    assert "ts" in obj


CONFIGURED = ("import logging, sys; from relay import logs; from relay.config import LogConfig; "
              "logs.configure(LogConfig(format=sys.argv[1])); "
              "logging.getLogger('relay.delivery').info('msg_X: to=<a@b.example>, status=sent', "
              "extra={'queue_id': 'msg_X'}); "
              "logging.getLogger('mail.log').info('EHLO, at INFO: not shown')")


@pytest.mark.parametrize("journal", [{}, {"JOURNAL_STREAM": "8:12345"}, {"INVOCATION_ID": "x"}])
def test_a_configured_process_stamps_its_lines_unless_journald_does(
        journal: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("JOURNAL_STREAM", "INVOCATION_ID", "RELAY_LOG_LEVEL")}
    for fmt in ("text", "json"):
        done = subprocess.run([sys.executable, "-c", CONFIGURED, fmt], env={**env, **journal},
                              capture_output=True, text=True, timeout=30, check=True)
        (line,) = done.stderr.splitlines()
        if fmt == "json":
            assert json.loads(line)["queue_id"] == "msg_X" and "ts" in json.loads(line)
        elif journal:
            assert line == "<6>INFO relay.delivery: msg_X: to=<a@b.example>, status=sent"
        else:
            assert ISO.match(line) and line.endswith(
                " INFO relay.delivery: msg_X: to=<a@b.example>, status=sent")


def test_relay_log_level_overrides_the_file() -> None:
    assert logs.level_of(LogConfig(level="warning"), {}) == logging.WARNING
    assert logs.level_of(LogConfig(level="warning"), {"RELAY_LOG_LEVEL": "debug"}) == \
        logging.DEBUG
    assert logs.level_of(LogConfig(level="error"), {"RELAY_LOG_LEVEL": "nonsense"}) == \
        logging.ERROR


def test_a_bad_log_format_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[log]\nformat = "xml"\n')
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    assert caught.value.key == "log.format"
    assert "text, json" in caught.value.reason and str(path) in str(caught.value)
    path.write_text('[log]\nlevel = "loud"\n')
    with pytest.raises(ConfigError, match="log.level"):
        load(path, environ={})
    assert load(None, environ={"RELAY_LOG_FORMAT": "json"}).log.format == "json"
    assert load(None, environ={"RELAY_LOG_LEVEL": "x", "RELAY_LOG_ACCESS_LOG": "false",
                               "RELAY_CONFIG": ""}).log.access_log is False
    path.write_text('[log]\nlevel = "WARNING"\n')
    assert load(path, environ={}).log.level == "warning"


def test_a_bad_log_format_stops_relay_serve_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[log]\nformat = "xml"\n')
    done = run_relay("--config", str(path), "serve", timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip() == f"{path}: log.format: must be one of text, json; got 'xml'"


# -- the access log -----------------------------------------------------------------------------


async def test_each_http_request_gets_an_access_line(
        api: Api, service: Service, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=logs.ACCESS_LOGGER)
    status, body, _ = await api.call("POST", "/v1/emails?secret=hunter2", SIMPLE,
                                     headers={"X-Request-Id": "req-test-1"})
    assert status == 202, body
    status, _, _ = await api.call("GET", "/v1/emails", key="not-a-key")
    assert status == 401
    sent, refused = lines(caplog, logs.ACCESS_LOGGER)[-2:]
    key_id = (await service.store.list_api_keys())[0].id
    assert re.fullmatch(rf"POST /v1/emails 202 [0-9.]+ms key={key_id} client=127.0.0.1 "
                        r"req=req-test-1", sent.getMessage()), sent.getMessage()
    assert "hunter2" not in text(sent)
    assert (sent.http_status, sent.key_id, sent.path) == (  # type: ignore[attr-defined]
        202, key_id, "/v1/emails")
    assert refused.http_status == 401 and not hasattr(refused, "key_id")  # type: ignore[attr-defined]
    assert " key=" not in refused.getMessage()


async def test_a_tracking_token_is_cut_in_the_access_line(
        api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=logs.ACCESS_LOGGER)
    token = "A" * 60
    await api.call("GET", f"/o/{token}", key=None)
    (line,) = [r.getMessage() for r in lines(caplog, logs.ACCESS_LOGGER)]
    assert token not in line and "/o/AAAAAAAA... " in line


async def test_the_access_log_can_be_turned_off(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=logs.ACCESS_LOGGER)
    svc = Service(make_config(tmp_path, log=LogConfig(access_log=False)))
    await svc.start()
    client = await api_client(svc)
    try:
        status, _, _ = await client.call("GET", "/v1/emails")
        assert status == 200
    finally:
        await client.close()
        await svc.stop()
    assert not lines(caplog, logs.ACCESS_LOGGER)


# -- a real `relay serve`: the worker process's lines, in JSON -----------------------------------


def serve_and_send(path: Path, smtp: int, key: str) -> tuple[str, list[str]]:
    """`relay serve` (not under systemd), one message through it; its stderr until the
    delivery line, which the worker process writes."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RELAY_") and k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
    proc = subprocess.Popen(relay_cmd("--config", str(path), "serve"), cwd=path.parent,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(proc.stderr.readline, "")),
                              daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_port(smtp, proc=proc)
        mid = submit(smtp, key, ["one@a.test"])
        deadline = time.monotonic() + 20
        while not any('"status":"sent"' in line for line in list(out)):
            assert time.monotonic() < deadline, "".join(out)
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(15)
        reader.join(5)
        proc.stderr.close()
    return mid, out


async def test_relay_serve_writes_the_workers_delivery_line_as_json(
        tmp_path: Path, dns: DNSServer) -> None:
    async with Sink() as sink:
        route(dns, "a.test", (10, "mx.a.test", "127.0.0.1"))
        smtp, api_port = free_port(), free_port()
        path = tmp_path / "relay.toml"
        path.write_text(
            f"[server]\nhostname = 'relay.test'\ndata_dir = '{tmp_path / 'data'}'\n"
            f"[[smtp.listeners]]\nport = {smtp}\n[api]\nport = {api_port}\n"
            f"[delivery]\nmx_port = {sink.port}\nretry_min = 0.2\n"
            f"[dns]\nnameservers = ['{dns.nameserver}']\ntimeout = 1.0\n"
            "[log]\nformat = 'json'\n")
        made = await in_thread(run_relay, "--config", str(path), "keys", "create", "--name",
                               "t", "--json")
        key = json.loads(made.stdout)["key"]
        mid, out = await in_thread(serve_and_send, path, smtp, key)
    objects = [json.loads(line) for line in out if line.strip()]  # every line is JSON
    (sent,) = [o for o in objects if o.get("status") == "sent"]
    assert sent["process"] == "worker" and sent["logger"] == "relay.delivery"
    assert (sent["queue_id"], sent["to"], sent["dsn"], sent["relay"], sent["ip"]) == (
        mid, "one@a.test", "2.0.0", "mx.a.test", "127.0.0.1")
    assert sent["ts"].endswith("Z") and sent["level"] == "info"
    (accepted,) = [o for o in objects if o.get("logger") == "relay.accept"]
    assert accepted["queue_id"] == mid and accepted["nrcpt"] == 1
    assert "process" not in accepted  # the master's line


# -- reports that come back ----------------------------------------------------------------------


@pytest.fixture
async def with_inbound(tmp_path: Path, dns: DNSServer) -> AsyncIterator[tuple[Service, Sink]]:
    """relay with an inbound listener too (as tests/test_inbound.py has it), and its sink."""
    async with Sink() as sink:
        route(dns, "example.org", (10, "mx.example.org", "127.0.0.1"))
        route(dns, "sender.test", (10, "mx.sender.test", "127.0.0.1"))
        svc = Service(make_config(
            tmp_path, ListenerConfig(port=free_port()),
            ListenerConfig(port=free_port(), mode="inbound", tls="none"),
            delivery=DeliveryConfig(mx_port=sink.port, **FAST),
            dns=DnsConfig(nameservers=(dns.nameserver,), timeout=1.0),
            bounces=BouncesConfig(complaint_addresses=(COMPLAINTS,))))
        await svc.start()
        try:
            yield svc, sink
        finally:
            await svc.stop()


async def test_a_late_bounce_a_complaint_and_a_stray_report_each_get_a_line(
        with_inbound: tuple[Service, Sink], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.inbound")
    relay, sink = with_inbound
    message_id, got = await delivered_via_api(relay, sink)
    code, _ = await send_report(relay, got.mail_from, dsn(got.data, "bob@example.org"))
    assert code == 250
    code, _ = await send_report(relay, COMPLAINTS, arf(got.data, return_path=got.mail_from),
                                sender="fbl@isp.example")
    assert code == 250
    code, _ = await send_report(relay, "bounces+forgedtoken@relay.test",
                                dsn(got.data, "bob@example.org"))
    assert code == 250
    bounced, complained, stray = [r.getMessage() for r in lines(caplog, "relay.inbound")]
    assert bounced.startswith(f"{message_id}: to=<bob@example.org>, dsn=5.1.1, status=bounced "
                              "(550 5.1.1 ")
    assert bounced.endswith(", via=dsn from <>")
    assert complained == (f"{message_id}: to=<bob@example.org>, status=complained "
                          "(feedback-type abuse), via=arf from <fbl@isp.example>")
    assert stray == "dsn report to bounces+forgedtoken@relay.test from <>: matches no " \
                    "message of ours; discarded"


async def test_a_cancelled_email_gets_a_line_per_recipient(
        api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    status, body, _ = await api.call("POST", "/v1/emails", {
        **SIMPLE, "scheduledAt": "2099-01-01T00:00:00Z"})
    assert status == 202, body
    status, _, _ = await api.call("POST", f"/v1/emails/{body['id']}/cancel")
    assert status == 200
    (line,) = [r.getMessage() for r in lines(caplog, "relay.delivery")]
    assert re.fullmatch(rf"{body['id']}: to=<bob@example.org>, status=cancelled "
                        r"\(by api:rk_\w+\)", line), line


async def test_a_login_leaves_no_aiosmtpd_deprecation_line(
        service: Service, caplog: pytest.LogCaptureFixture) -> None:
    """aiosmtpd warns "Session.login_data is deprecated" at every successful AUTH, on its
    own attribute: relay's logging drops that one line, and nothing else of mail.log."""
    logs.configure(LogConfig())
    _, key = await keys.create_key(service.store, name="t", scopes=["emails:send"])

    def login() -> None:
        with connect(service.bound[0][1], key=key):
            pass
    caplog.set_level(logging.INFO)
    await in_thread(login)
    assert not [r for r in caplog.records if "login_data" in r.getMessage()]
    logging.getLogger("mail.log").warning("something else")
    assert [r for r in caplog.records if r.getMessage() == "something else"]
