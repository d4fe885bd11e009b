"""Retention: what goes when ([retention]), in small batches, on a real SQLite file, with a
controlled clock; the API's answer for a pruned body; `relay prune` as a real process."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from relay import config as config_mod
from relay.config import Config, RetentionConfig
from relay.errors import ConfigError
from relay.retention import DAY, Pruner
from relay.service import Service
from relay.store import NewMessage, NewRecipient, SQLiteStore
from relay.store.delivery import AttemptRecord, Outcome
from relay.store.pgconn import PgConnection
from relay.store.retention import BODIES_SCAN, MESSAGES_SCAN, ROWS
from relay.submit import new_message_id
from relay.types import EventType, GivenDkimKey, RecipientStatus, WebhookEndpoint

from .apiutil import SIMPLE, Api
from .conftest import make_config, run_relay, write_toml

NOW = 1_900_000_000.0  # the pass's clock in these tests
RAW = b"From: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n"


def message(created_at: float, **kw: Any) -> NewMessage:
    fields: dict[str, Any] = {
        "id": new_message_id(created_at), "created_at": created_at,
        "mail_from": "a@example.com", "body": RAW, "source": "smtp",
        "recipients": (NewRecipient(address="b@example.org", domain="example.org"),)}
    fields.update(kw)
    return NewMessage(**fields)


async def final(store: SQLiteStore, created_at: float, final_at: float, **kw: Any) -> str:
    """A message cancelled (a final status) at `final_at`."""
    m = message(created_at, **kw)
    await store.enqueue(m)
    assert await store.cancel(m.id, "test", final_at) >= 1
    return m.id


async def delivered(store: SQLiteStore, created_at: float, final_at: float,
                    **kw: Any) -> str:
    """A message delivered at `final_at`, with its attempt recorded."""
    m = message(created_at, **kw)
    await store.enqueue(m)
    detail = await store.get_message(m.id)
    assert detail is not None
    rcpt = detail.recipients[0]
    await store.record([Outcome(
        recipient_id=rcpt.id, message_id=m.id, status=RecipientStatus.DELIVERED, at=final_at,
        event=EventType.DELIVERED, last_reply="250 ok",
        attempt=AttemptRecord(started_at=final_at, duration=0.1, mx_host="mx.example.org",
                              ip="127.0.0.1", port=25, tls_version=None, tls_cipher=None,
                              code=250, enhanced="2.0.0", text="ok", outcome="delivered"))])
    return m.id


def rows(store: SQLiteStore, sql: str, *args: Any) -> list[Any]:
    if store.url:  # PgConnection runs its own loop: on a thread of its own, off the test's
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(_rows, PgConnection, store.url, sql, args).result()
    return _rows(sqlite3.connect, store.path, sql, args)


def _rows(connect: Any, where: Any, sql: str, args: tuple[Any, ...]) -> list[Any]:
    db = connect(where)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def count(store: SQLiteStore, table: str, where: str = "1 = 1", *args: Any) -> int:
    return int(rows(store, f"SELECT count(*) FROM {table} WHERE {where}", *args)[0][0])


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(store_url)
    await s.open()
    yield s
    await s.close()


def pruner(store: SQLiteStore, **kw: Any) -> Pruner:
    return Pruner(RetentionConfig(**kw), store, clock=lambda: NOW)


async def test_old_final_messages_lose_their_body_then_go_and_the_rest_stays(
        store: SQLiteStore) -> None:
    gone = await delivered(store, NOW - 41 * DAY, NOW - 40 * DAY,
                           parts=(("sha256-of-its-own-part", b"z" * 100),),
                           dkim=GivenDkimKey(domain="example.com", selector="s",
                                             private_key="secret"))
    bodiless = await final(store, NOW - 11 * DAY, NOW - 10 * DAY)
    # created long ago, but final only lately: counted from the final state
    young = await final(store, NOW - 40 * DAY, NOW - 2 * DAY)
    deferred = message(NOW - 40 * DAY)  # still queued after 40 days: never pruned
    await store.enqueue(deferred)
    held = message(NOW - 40 * DAY)
    await store.enqueue(held)
    await store.hold(held.id, "test", NOW - 39 * DAY)
    scheduled = message(NOW - 40 * DAY, scheduled_at=NOW + DAY)
    await store.enqueue(scheduled)
    assert count(store, "attempts", "message_id = ?", gone) == 1
    assert count(store, "parts") == 1

    result = await pruner(store).run_pass()

    assert result.counts["messages"] == 1
    assert result.counts["bodies"] == 1
    assert await store.get_message(gone) is None
    for table in ("recipients", "attempts", "events", "bodies", "message_dkim",
                  "message_parts"):
        assert count(store, table, "message_id = ?", gone) == 0, table
    assert count(store, "parts") == 0  # the trigger ran on the cascade too
    # the body went, the history stayed, and says when the body went
    kept = await store.get_message(bodiless)
    assert kept is not None and kept.recipients and kept.events
    assert kept.body_pruned_at == NOW
    assert await store.get_body(bodiless) is None
    assert await store.body_pruned_at(bodiless) == NOW
    for m_id in (young, deferred.id, held.id, scheduled.id):
        assert await store.get_body(m_id) == RAW, m_id
        assert await store.body_pruned_at(m_id) is None
    # a second pass finds nothing more
    again = await pruner(store).run_pass()
    assert again.counts["messages"] == again.counts["bodies"] == 0


async def test_zero_keeps_forever(store: SQLiteStore) -> None:
    m_id = await final(store, NOW - 400 * DAY, NOW - 400 * DAY)
    result = await pruner(store, bodies_days=0, messages_days=0).run_pass()
    assert result.counts["messages"] == result.counts["bodies"] == 0
    assert await store.get_body(m_id) == RAW


async def test_a_failed_recipient_or_a_dsn_to_send_keeps_the_message(store: SQLiteStore) -> None:
    m = message(NOW - 40 * DAY, recipients=(
        NewRecipient(address="b@example.org", domain="example.org", notify=("FAILURE",)),))
    await store.enqueue(m)
    detail = await store.get_message(m.id)
    assert detail is not None
    await store.record([Outcome(
        recipient_id=detail.recipients[0].id, message_id=m.id, status=RecipientStatus.BOUNCED,
        at=NOW - 39 * DAY, event=EventType.BOUNCED, last_reply="550 no", bounce_class="hard",
        dsn="failed")])
    parked = message(NOW - 40 * DAY)
    await store.enqueue(parked)
    assert store.writer is not None  # parked: a stage crashed on it (no store call does this)
    await store.writer.write(lambda db: db.execute(
        "UPDATE recipients SET status = 'failed', updated_at = ? WHERE message_id = ?",
        (NOW - 39 * DAY, parked.id)))

    result = await pruner(store).run_pass()

    assert result.counts["messages"] == result.counts["bodies"] == 0
    assert await store.get_body(m.id) == RAW  # the DSN still has to quote it
    assert await store.get_body(parked.id) == RAW


async def test_a_part_shared_with_a_live_message_survives(store: SQLiteStore) -> None:
    part = ("sha256-of-a-big-pdf", b"%PDF" + b"x" * 1000)
    old = await final(store, NOW - 11 * DAY, NOW - 10 * DAY, parts=(part,))
    live = message(NOW - 11 * DAY, parts=(part,))
    await store.enqueue(live)
    alone = await final(store, NOW - 11 * DAY, NOW - 10 * DAY,
                        parts=(("sha256-of-another", b"y" * 100),))

    await pruner(store).run_pass()

    assert count(store, "message_parts", "message_id = ?", old) == 0
    assert count(store, "parts", "id = ?", part[0]) == 1  # the live message still names it
    assert count(store, "message_parts", "message_id = ?", live.id) == 1
    assert count(store, "parts", "id = ?", "sha256-of-another") == 0  # named by none now
    assert await store.body_pruned_at(alone) == NOW

    await store.cancel(live.id, "test", NOW - 10 * DAY)
    await pruner(store).run_pass()
    assert count(store, "parts") == 0


async def test_webhook_deliveries_go_when_done_and_a_pending_one_keeps_its_message(
        store: SQLiteStore) -> None:
    await store.add_endpoint(WebhookEndpoint(id="wh_1", url="https://hooks.example/1",
                                             secret="whsec_x", events=(), created_at=0.0))
    m_id = await final(store, NOW - 41 * DAY, NOW - 40 * DAY)  # queued + cancelled events
    outbox = await store.outbox("wh_1")
    assert len(outbox) == 2
    leased = await store.lease_deliveries(NOW, 10, 60.0)
    first, second = sorted(leased, key=lambda d: d.outbox_id)
    await store.record_delivery(first, now=NOW - 8 * DAY, status=200, error=None, next_at=None)
    await store.record_delivery(second, now=NOW - DAY, status=500, error="boom",
                                next_at=NOW + 60)  # still to retry

    result = await pruner(store).run_pass()

    assert result.counts["webhook_outbox"] == 1
    assert [o["id"] for o in await store.outbox("wh_1")] == [second.outbox_id]
    assert result.counts["messages"] == 0  # its event's webhook is still pending
    assert await store.get_message(m_id) is not None

    await store.record_delivery(second, now=NOW - DAY, status=200, error=None, next_at=None)
    result = await pruner(store).run_pass()
    assert result.counts["messages"] == 1
    assert await store.outbox("wh_1") == []  # its events' deliveries went with it


async def test_given_up_deliveries_idempotency_keys_contact_events_and_reports(
        store: SQLiteStore) -> None:
    await store.add_endpoint(WebhookEndpoint(id="wh_1", url="https://hooks.example/1",
                                             secret="whsec_x", events=(), created_at=0.0))
    m = message(NOW - 9 * DAY, idempotency_scope="k", idempotency_key="once")
    await store.enqueue(m)
    fresh = message(NOW - 60, idempotency_scope="k", idempotency_key="twice")
    await store.enqueue(fresh)
    for d in await store.lease_deliveries(NOW, 10, 60.0):
        await store.record_delivery(d, now=NOW - DAY, status=500, error="gone", next_at=None)

    def seed(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO contacts (id, email, created_at, updated_at)"
                   " VALUES ('c1', 'c@example.org', 0, 0)")
        db.executemany("INSERT INTO contact_events (contact_id, name, created_at)"
                       " VALUES ('c1', 'signup', ?)", [(NOW - 100 * DAY,), (NOW - DAY,)])
        db.executemany("INSERT INTO inbound_reports (received_at, envelope_to, mail_from,"
                       " type, outcome) VALUES (?, 'x@b', '', 'dsn', 'unmatched')",
                       [(NOW - 31 * DAY,), (NOW - DAY,)])

    assert store.writer is not None
    await store.writer.write(seed)

    result = await pruner(store, contact_events_days=30).run_pass()

    # the given-up ones of m (created 9 days ago); fresh's are younger than 7 days
    assert result.counts["webhook_outbox"] == 1
    assert result.counts["idempotency"] == 1
    assert count(store, "idempotency") == 1
    assert result.counts["contact_events"] == 1
    assert count(store, "contact_events") == 1
    assert result.counts["inbound_reports"] == 1
    assert count(store, "inbound_reports") == 1


async def test_a_pass_takes_one_transaction_per_batch(store: SQLiteStore) -> None:
    for i in range(95):
        await final(store, NOW - 50 * DAY + i, NOW - 40 * DAY)
    assert store.writer is not None
    before = store.writer.batches

    result = await pruner(store, batch_size=10).run_pass()

    assert result.counts["messages"] == 95
    assert result.batches["messages"] == 10  # 9 of ten, and the last of five
    # one transaction per batch (the other kinds found nothing: one each)
    assert store.writer.batches - before == sum(result.batches.values())
    assert count(store, "messages") == 0


async def test_dry_run_counts_and_changes_nothing(store: SQLiteStore) -> None:
    gone = await final(store, NOW - 41 * DAY, NOW - 40 * DAY)
    bodiless = await final(store, NOW - 11 * DAY, NOW - 10 * DAY)
    assert store.writer is not None
    before = store.writer.batches

    result = await pruner(store).run_pass(dry_run=True)

    assert result.counts["messages"] == 1
    assert result.counts["bodies"] == 1  # the one whose message stays, not both
    assert store.writer.batches == before  # not one write
    assert await store.get_body(gone) == RAW and await store.get_body(bodiless) == RAW


def plan(store: SQLiteStore, sql: str, *args: Any) -> str:
    return "\n".join(r[3] for r in rows(store, "EXPLAIN QUERY PLAN " + sql, *args))


async def test_every_batch_is_an_index_range_scan(store: SQLiteStore) -> None:
    if store.url:
        pytest.skip("SQLite's EXPLAIN QUERY PLAN")
    messages = plan(store, MESSAGES_SCAN, NOW, 0.0, "", 10)
    assert "SEARCH m USING COVERING INDEX messages_created" in messages
    bodies = plan(store, BODIES_SCAN, NOW, 0.0, "", 10)
    assert "SEARCH m USING INDEX messages_with_body" in bodies
    for text in (messages, bodies):
        assert "SEARCH o USING INDEX webhook_outbox_event" in text
        assert "SCAN" not in text, text  # no table scanned whole
    for specs in ROWS.values():
        for table, key, where, order in specs:
            text = plan(store, f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table}"
                        f" WHERE {where} ORDER BY {order} LIMIT ?)", NOW, 10)
            assert "USING" in text and "INDEX" in text and "SCAN" not in text, text
    cascade = plan(store, "DELETE FROM recipients WHERE message_id = ?", "m")
    assert "recipients_message" in cascade
    assert "attempts_recipient" in plan(store, "SELECT 1 FROM attempts WHERE recipient_id = ?", 1)


# -- through the API and the service ---------------------------------------------------------


async def test_api_answers_410_for_a_pruned_body_and_still_shows_the_message(
        service: Service, api: Api) -> None:
    status, sent, _ = await api.call("POST", "/v1/emails", SIMPLE)
    assert status == 202, sent
    m_id = sent["id"]
    now = time.time()
    await service.store.cancel(m_id, "test", now)
    status, body, _ = await api.call("GET", f"/v1/emails/{m_id}/body")
    assert status == 200 and body["text"].strip() == "Hello Bob."

    await Pruner(service.config.retention, service.store).run_pass(now=now + 8 * DAY)

    status, body, _ = await api.call("GET", f"/v1/emails/{m_id}/body")
    assert status == 410, body
    assert body["error"]["type"] == "body_pruned"
    assert body["error"]["param"] == "id"
    assert "pruned" in body["error"]["message"]
    status, detail, _ = await api.call("GET", f"/v1/emails/{m_id}")
    assert status == 200
    assert detail["status"] == "cancelled" and detail["bodyPrunedAt"]
    assert [e["type"] for e in detail["events"]] == ["email.queued", "email.cancelled"]
    status, body, _ = await api.call("GET", "/v1/emails/msg_nonesuch/body")
    assert status == 404  # never there is still 404


async def test_the_api_keeps_answering_while_a_pass_runs(service: Service, api: Api) -> None:
    now = time.time()
    batch = [message(now - 50 * DAY + i) for i in range(3000)]
    await service.store.enqueue_all(batch)
    assert service.store.writer is not None
    await service.store.writer.write(lambda db: db.execute(
        "UPDATE recipients SET status = 'cancelled', updated_at = ?", (now - 40 * DAY,)))
    prune = asyncio.create_task(Pruner(
        dataclasses.replace(service.config.retention, batch_size=10), service.store,
    ).run_pass(now=now))
    answered_during = 0
    while not prune.done():
        status, sent, _ = await api.call("POST", "/v1/emails", SIMPLE)
        assert status == 202, sent
        answered_during += not prune.done()
    result = await prune
    assert result.counts["messages"] == 3000
    assert answered_during >= 3  # accepts went in between the batches


async def test_the_service_prunes_every_interval_and_stops_promptly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.retention")
    config = make_config(tmp_path, retention=RetentionConfig(interval=0.05))
    svc = Service(config)
    await svc.start()
    try:
        old = await final(svc.store, time.time() - 41 * DAY, time.time() - 40 * DAY)
        def logged() -> bool:  # one line per pass, with its counts
            return any(r.getMessage().startswith("retention pass: pruned messages 1, bodies 0,")
                       for r in caplog.records)

        for _ in range(200):
            if logged():
                break
            await asyncio.sleep(0.05)
        assert logged()
        assert await svc.store.get_message(old) is None
    finally:
        started = time.monotonic()
        await svc.stop()
    assert time.monotonic() - started < 5


# -- config and CLI ------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "key", "reason"), [
    ("batch_size = 0", "retention.batch_size", "must be 1..10000; got 0"),
    ("batch_size = 100000", "retention.batch_size", "must be 1..10000; got 100000"),
    ("bodies_days = -1", "retention.bodies_days", "must be zero or more"),
    ("messages_days = 'a month'", "retention.messages_days", "must be a number, not a string"),
    ("interval = 0", "retention.interval", "must be greater than zero"),
    ("keep = 1", "retention.keep", "unknown key"),
])
def test_config_errors_name_the_key(tmp_path: Path, line: str, key: str, reason: str) -> None:
    path = write_toml(tmp_path / "relay.toml", f"[retention]\n{line}\n")
    with pytest.raises(ConfigError) as err:
        config_mod.load(path, environ={})
    assert str(err.value).startswith(f"{path}: {key}: {reason}")


def test_config_defaults_and_environment(tmp_path: Path) -> None:
    assert Config().retention == RetentionConfig(bodies_days=7, messages_days=30,
                                                 webhook_outbox_days=7, contact_events_days=0,
                                                 batch_size=500, interval=300)
    loaded = config_mod.load(None, environ={"RELAY_RETENTION_BODIES_DAYS": "0"})
    assert loaded.retention.bodies_days == 0


async def test_relay_prune_dry_run_then_for_real(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path = write_toml(tmp_path / "relay.toml", f"[server]\ndata_dir = '{data}'\n")
    store = SQLiteStore(data / "relay.sqlite")
    await store.open()
    try:
        now = time.time()
        old = await final(store, now - 41 * DAY, now - 40 * DAY)
        bodiless = await final(store, now - 11 * DAY, now - 10 * DAY)
    finally:
        await store.close()

    dry = await asyncio.to_thread(run_relay, "--config", str(path), "prune", "--dry-run",
                                  "--json", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    out = json.loads(dry.stdout)
    assert out["dryRun"] is True
    assert out["pruned"]["messages"] == 1 and out["pruned"]["bodies"] == 1
    assert count(store, "messages") == 2 and count(store, "bodies") == 2

    real = await asyncio.to_thread(run_relay, "--config", str(path), "prune", cwd=tmp_path)
    assert real.returncode == 0, real.stderr
    lines = real.stdout.splitlines()
    assert lines[0].split() == ["KIND", "PRUNED", "BATCHES"]
    assert lines[1].split()[:2] == ["messages", "1"] and lines[2].split()[:2] == ["bodies", "1"]
    assert count(store, "messages", "id = ?", old) == 0
    assert count(store, "bodies", "message_id = ?", bodiless) == 0

    show = await asyncio.to_thread(run_relay, "--config", str(path), "queue", "show", bodiless,
                                   cwd=tmp_path)
    assert show.returncode == 0, show.stderr
    assert "pruned at" in show.stdout
