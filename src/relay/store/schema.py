"""The SQLite schema as numbered forward migrations; `migrate` applies the missing ones."""

from __future__ import annotations

import sqlite3

from ..errors import StoreError
from . import schema_late

MIGRATIONS: tuple[str, ...] = (
    # 1: messages, bodies, recipients, attempts, events, idempotency keys, API keys
    """
    CREATE TABLE messages (
        id           TEXT PRIMARY KEY,
        created_at   REAL NOT NULL,
        mail_from    TEXT NOT NULL,
        size         INTEGER NOT NULL,
        source       TEXT NOT NULL,
        api_key_id   TEXT,
        tags         TEXT NOT NULL DEFAULT '[]',
        metadata     TEXT NOT NULL DEFAULT '{}',
        stream       TEXT NOT NULL DEFAULT 'transactional',
        subject      TEXT NOT NULL DEFAULT '',
        header_from  TEXT NOT NULL DEFAULT '',
        dsn_ret      TEXT,
        dsn_envid    TEXT,
        smtputf8     INTEGER NOT NULL DEFAULT 0,
        scheduled_at REAL,
        report_of    TEXT
    );
    CREATE INDEX messages_created ON messages(created_at, id);
    CREATE TABLE bodies (
        message_id TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        data       BLOB NOT NULL
    );
    CREATE TABLE recipients (
        id              INTEGER PRIMARY KEY,
        message_id      TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        address         TEXT NOT NULL,
        domain          TEXT NOT NULL,
        status          TEXT NOT NULL,
        next_attempt_at REAL,
        leased_until    REAL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        last_reply      TEXT,
        notify          TEXT NOT NULL DEFAULT '',
        orcpt           TEXT,
        bounce_class    TEXT,
        dsn_pending     TEXT,
        updated_at      REAL NOT NULL
    );
    CREATE INDEX recipients_dsn ON recipients(dsn_pending) WHERE dsn_pending IS NOT NULL;
    CREATE INDEX recipients_due ON recipients(status, next_attempt_at);
    CREATE INDEX recipients_message ON recipients(message_id);
    CREATE TABLE attempts (
        id           INTEGER PRIMARY KEY,
        recipient_id INTEGER NOT NULL REFERENCES recipients(id) ON DELETE CASCADE,
        message_id   TEXT NOT NULL,
        started_at   REAL NOT NULL,
        duration     REAL NOT NULL,
        mx_host      TEXT,
        ip           TEXT,
        port         INTEGER,
        tls_version  TEXT,
        tls_cipher   TEXT,
        code         INTEGER,
        enhanced     TEXT,
        text         TEXT NOT NULL,
        outcome      TEXT NOT NULL,
        signed       TEXT
    );
    CREATE INDEX attempts_message ON attempts(message_id);
    CREATE TABLE events (
        id           INTEGER PRIMARY KEY,
        message_id   TEXT,
        recipient_id INTEGER,
        type         TEXT NOT NULL,
        created_at   REAL NOT NULL,
        data         TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_message ON events(message_id);
    CREATE TABLE idempotency (
        scope       TEXT NOT NULL,
        key         TEXT NOT NULL,
        fingerprint TEXT,
        message_id  TEXT NOT NULL,
        created_at  REAL NOT NULL,
        PRIMARY KEY (scope, key)
    );
    CREATE TABLE api_keys (
        id           TEXT PRIMARY KEY,
        name         TEXT NOT NULL,
        hash         BLOB NOT NULL,
        scopes       TEXT NOT NULL,
        domains      TEXT NOT NULL DEFAULT '[]',
        created_at   REAL NOT NULL,
        revoked_at   REAL,
        last_used_at REAL
    );
    """,
    # 2: sending domains and their DKIM keys; keys given with a message; what a message may sign
    """
    CREATE TABLE domains (
        name        TEXT PRIMARY KEY,
        created_at  REAL NOT NULL,
        return_path TEXT NOT NULL
    );
    CREATE TABLE dkim_keys (
        domain       TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
        selector     TEXT NOT NULL,
        algorithm    TEXT NOT NULL,
        public_key   TEXT NOT NULL,
        path         TEXT NOT NULL,
        state        TEXT NOT NULL,
        created_at   REAL NOT NULL,
        activated_at REAL,
        retire_after REAL,
        PRIMARY KEY (domain, selector)
    );
    CREATE TABLE message_dkim (
        message_id  TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
        domain      TEXT NOT NULL,
        selector    TEXT NOT NULL,
        private_key TEXT NOT NULL
    );
    ALTER TABLE messages ADD COLUMN sign_domains TEXT NOT NULL DEFAULT '[]';
    """,
    # 3: a body is raw RFC 5322 bytes, or a composition (JSON) that is built at delivery
    """
    ALTER TABLE bodies ADD COLUMN kind TEXT NOT NULL DEFAULT 'raw';
    """,
    # 4: an idempotency key keeps the API's first answer, to replay it
    """
    ALTER TABLE idempotency ADD COLUMN status INTEGER;
    ALTER TABLE idempotency ADD COLUMN response BLOB;
    """,
    # 5: the suppression list; the domain a message is sent from (an unsubscribe's scope)
    """
    CREATE TABLE suppressions (
        address    TEXT NOT NULL,
        scope      TEXT NOT NULL DEFAULT '',
        reason     TEXT NOT NULL,
        source     TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        PRIMARY KEY (address, scope)
    );
    ALTER TABLE messages ADD COLUMN sender_domain TEXT NOT NULL DEFAULT '';
    """,
    # 6: webhook endpoints and the outbox, filled by a trigger in the event's own transaction
    """
    CREATE TABLE webhook_endpoints (
        id              TEXT PRIMARY KEY,
        url             TEXT NOT NULL,
        secret          TEXT NOT NULL,
        events          TEXT NOT NULL DEFAULT '[]',
        enabled         INTEGER NOT NULL DEFAULT 1,
        created_at      REAL NOT NULL,
        disabled_at     REAL,
        disabled_reason TEXT,
        failing_since   REAL
    );
    CREATE TABLE webhook_outbox (
        id              INTEGER PRIMARY KEY,
        endpoint_id     TEXT NOT NULL REFERENCES webhook_endpoints(id) ON DELETE CASCADE,
        event_id        INTEGER NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        leased_until    REAL,
        delivered_at    REAL,
        last_status     INTEGER,
        last_error      TEXT,
        created_at      REAL NOT NULL
    );
    CREATE INDEX webhook_outbox_due ON webhook_outbox(next_attempt_at)
        WHERE delivered_at IS NULL AND next_attempt_at IS NOT NULL;
    CREATE TRIGGER events_fan_out AFTER INSERT ON events BEGIN
        INSERT INTO webhook_outbox (endpoint_id, event_id, next_attempt_at, created_at)
        SELECT w.id, NEW.id, NEW.created_at, NEW.created_at FROM webhook_endpoints w
        WHERE w.enabled AND (w.events = '[]' OR EXISTS (
            SELECT 1 FROM json_each(w.events) WHERE json_each.value = NEW.type));
    END;
    """,
    # 7: open and click tracking, asked for per message ("opens", "clicks", both, or "")
    """
    ALTER TABLE messages ADD COLUMN track TEXT NOT NULL DEFAULT '';
    """,
    # 8: stored templates (subject, html, text with {{var}}; a type; a default sender)
    """
    CREATE TABLE templates (
        id         TEXT PRIMARY KEY,
        name       TEXT NOT NULL,
        type       TEXT NOT NULL CHECK (type IN ('transactional', 'marketing')),
        subject    TEXT NOT NULL,
        html       TEXT NOT NULL,
        text       TEXT,
        from_email TEXT,
        from_name  TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX templates_created ON templates(created_at, id);
    """,
    # 9: contacts (one per address, their data and subscription state) and their events
    """
    CREATE TABLE contacts (
        id         TEXT PRIMARY KEY,
        email      TEXT NOT NULL UNIQUE COLLATE NOCASE,
        subscribed INTEGER NOT NULL DEFAULT 0,
        data       TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE contact_events (
        id         INTEGER PRIMARY KEY,
        contact_id TEXT NOT NULL REFERENCES contacts(id) ON DELETE CASCADE,
        name       TEXT NOT NULL,
        data       TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL
    );
    CREATE INDEX contact_events_contact ON contact_events(contact_id, created_at);
    """,
    # 10: a resent message names the one it copies in metadata.resend_of (PiiSend's resend)
    """
    CREATE INDEX messages_resend_of ON messages(json_extract(metadata, '$.resend_of'))
        WHERE json_extract(metadata, '$.resend_of') IS NOT NULL;
    """,
    # 11: a webhook endpoint's format: the body and signing it gets (native | mailchannels)
    """
    ALTER TABLE webhook_endpoints ADD COLUMN format TEXT NOT NULL DEFAULT 'native';
    """,
    # 12: bounces and complaints: whether a message keeps its own envelope sender (no VERP),
    # and every report that came back, matched or not
    """
    ALTER TABLE messages ADD COLUMN keep_mail_from INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE inbound_reports (
        id           INTEGER PRIMARY KEY,
        received_at  REAL NOT NULL,
        envelope_to  TEXT NOT NULL,
        mail_from    TEXT NOT NULL,
        type         TEXT NOT NULL,
        message_id   TEXT,
        recipient_id INTEGER,
        outcome      TEXT NOT NULL,
        summary      TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX inbound_reports_message ON inbound_reports(message_id)
        WHERE message_id IS NOT NULL;
    """,
    # 13: owners (DESIGN.md section 10): the domains of the key that made a webhook, template,
    # suppression or contact ('[]': the whole relay). A suppression or contact is one per
    # address and owner, so the tables are made again with owner in their keys.
    """
    ALTER TABLE webhook_endpoints ADD COLUMN owner TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE templates ADD COLUMN owner TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE suppressions_13 (
        address    TEXT NOT NULL,
        scope      TEXT NOT NULL DEFAULT '',
        owner      TEXT NOT NULL DEFAULT '[]',
        reason     TEXT NOT NULL,
        source     TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        PRIMARY KEY (address, scope, owner)
    );
    INSERT INTO suppressions_13 (address, scope, reason, source, created_at)
        SELECT address, scope, reason, source, created_at FROM suppressions;
    DROP TABLE suppressions;
    ALTER TABLE suppressions_13 RENAME TO suppressions;
    CREATE TABLE contacts_13 (
        id         TEXT PRIMARY KEY,
        email      TEXT NOT NULL COLLATE NOCASE,
        owner      TEXT NOT NULL DEFAULT '[]',
        subscribed INTEGER NOT NULL DEFAULT 0,
        data       TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (owner, email)
    );
    INSERT INTO contacts_13 (id, email, subscribed, data, created_at, updated_at)
        SELECT id, email, subscribed, data, created_at, updated_at FROM contacts;
    DROP TABLE contacts;
    ALTER TABLE contacts_13 RENAME TO contacts;
    CREATE INDEX contacts_email ON contacts(email);
    DROP TRIGGER events_fan_out;
    CREATE TRIGGER events_fan_out AFTER INSERT ON events BEGIN
        INSERT INTO webhook_outbox (endpoint_id, event_id, next_attempt_at, created_at)
        SELECT w.id, NEW.id, NEW.created_at, NEW.created_at FROM webhook_endpoints w
        WHERE w.enabled AND (w.events = '[]' OR EXISTS (
            SELECT 1 FROM json_each(w.events) WHERE json_each.value = NEW.type))
        AND (w.owner = '[]' OR EXISTS (
            SELECT 1 FROM messages m, json_each(w.owner) o WHERE m.id = NEW.message_id
            AND (m.sender_domain = o.value
                 OR substr(m.sender_domain, -length(o.value) - 1) = '.' || o.value))
            -- an event of no message (webhook.disabled) goes to its endpoint's owner
            OR (NEW.message_id IS NULL AND w.owner = (
                SELECT d.owner FROM webhook_endpoints d
                WHERE d.id = json_extract(NEW.data, '$.endpointId'))));
    END;
    """,
    # 14: large attachments stored once (by SHA-256) and named by each composition carrying
    # them; a part no message names any more is deleted with its last link
    """
    CREATE TABLE parts (
        id   TEXT PRIMARY KEY,
        data BLOB NOT NULL
    );
    CREATE TABLE message_parts (
        message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
        part_id    TEXT NOT NULL REFERENCES parts(id),
        PRIMARY KEY (message_id, part_id)
    );
    CREATE INDEX message_parts_part ON message_parts(part_id);
    CREATE TRIGGER message_parts_unlinked AFTER DELETE ON message_parts
    WHEN NOT EXISTS (SELECT 1 FROM message_parts WHERE part_id = OLD.part_id) BEGIN
        DELETE FROM parts WHERE id = OLD.part_id;
    END;
    """,
    # 15: retention (store/retention.py): when a message's body was pruned, and the indexes
    # that make each prune batch a range scan: messages still holding a body, by age; an
    # outbox row by its event, by delivery, or given up by age; old idempotency keys,
    # contact events and unmatched reports; attempts by recipient (the cascade's lookup)
    """
    ALTER TABLE messages ADD COLUMN body_pruned_at REAL;
    CREATE INDEX messages_with_body ON messages(created_at, id) WHERE body_pruned_at IS NULL;
    CREATE INDEX webhook_outbox_event ON webhook_outbox(event_id);
    CREATE INDEX webhook_outbox_delivered ON webhook_outbox(delivered_at)
        WHERE delivered_at IS NOT NULL;
    CREATE INDEX webhook_outbox_given_up ON webhook_outbox(created_at)
        WHERE delivered_at IS NULL AND next_attempt_at IS NULL;
    CREATE INDEX idempotency_created ON idempotency(created_at);
    CREATE INDEX contact_events_created ON contact_events(created_at);
    CREATE INDEX inbound_reports_unmatched ON inbound_reports(received_at)
        WHERE message_id IS NULL;
    CREATE INDEX attempts_recipient ON attempts(recipient_id);
    """,
    # 16: the dashboard's last-day outcomes, failures and bounce reasons (store/stats.py) read
    # events by type and time
    """
    CREATE INDEX events_type_created ON events(type, created_at);
    """,
    # 17: many nodes, one queue (issue 20): the node holding a recipient's or a webhook
    # delivery's lease, so a node starting again frees its own leases and no other's
    """
    ALTER TABLE recipients ADD COLUMN leased_by TEXT;
    ALTER TABLE webhook_outbox ADD COLUMN leased_by TEXT;
    """,
    # 18: failed SMTP logins per listener and client, counted across the nodes sharing a
    # queue (smtp/handler.py asks on PostgreSQL; one node's own count suffices on SQLite)
    """
    CREATE TABLE auth_failures (
        scope    TEXT NOT NULL,
        client   TEXT NOT NULL,
        failures INTEGER NOT NULL,
        last_at  REAL NOT NULL,
        PRIMARY KEY (scope, client)
    );
    CREATE INDEX auth_failures_last ON auth_failures(last_at);
    """,
    # 19 on: schema_late.py
    *(schema_late.SQLITE[n] for n in sorted(schema_late.SQLITE)),
)
assert sorted(schema_late.SQLITE) == list(range(19, 19 + len(schema_late.SQLITE)))


def current_version(db: sqlite3.Connection) -> int:
    """The schema version the database has (0: none yet), on either backend; StoreError
    when it is newer than this relay knows."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = db.execute("SELECT version FROM schema_version").fetchone()
    current: int = row[0] if row else 0
    if current > len(MIGRATIONS):
        raise StoreError(
            f"the database schema is version {current}, newer than this relay knows "
            f"({len(MIGRATIONS)}); upgrade relay"
        )
    return current


def migrate(db: sqlite3.Connection) -> int:
    """Bring the schema up to the newest version; returns that version. Runs on the
    writer's thread (`DbThread.run`), before anything else is written."""
    current = current_version(db)
    for version in range(current + 1, len(MIGRATIONS) + 1):
        # foreign keys off while a step runs: a table made again (SQLite's way to change a
        # key) must not take its dependants' rows with it when the old one is dropped
        db.executescript(
            "PRAGMA foreign_keys = OFF;\nBEGIN IMMEDIATE;\n" + MIGRATIONS[version - 1]
            + ("\nDELETE FROM schema_version;" if current else "")
            + f"\nINSERT INTO schema_version (version) VALUES ({version});\nCOMMIT;"
            + "\nPRAGMA foreign_keys = ON;"
        )
        current = version
    return current
