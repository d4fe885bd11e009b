"""Migrations after 18, each in SQLite's words and PostgreSQL's (schema.py and schema_pg.py
add these to their own); numbered, append-only, never edited once released."""

from __future__ import annotations

SQLITE: dict[int, str] = {
    # 19: outbound shaping and TLS policy (issue 21): the source pool an API message asked
    # for; each attempt's source address, TLS policy and TLS failure (RFC 8460 result type);
    # sites held back by a remote's reply; messages sent per source address and day (warm-up);
    # cached MTA-STS policies; TLS sessions counted for TLS-RPT, and the reports sent
    19: """
    ALTER TABLE messages ADD COLUMN pool TEXT;
    ALTER TABLE attempts ADD COLUMN source_ip TEXT;
    ALTER TABLE attempts ADD COLUMN tls_policy TEXT;
    ALTER TABLE attempts ADD COLUMN tls_failure TEXT;
    CREATE TABLE site_backoff (
        site   TEXT PRIMARY KEY,
        until  REAL NOT NULL,
        rate   REAL,
        reason TEXT NOT NULL,
        since  REAL NOT NULL
    );
    CREATE TABLE source_usage (
        address TEXT NOT NULL,
        day     TEXT NOT NULL,
        sent    INTEGER NOT NULL,
        PRIMARY KEY (address, day)
    );
    CREATE TABLE mta_sts_policies (
        domain     TEXT PRIMARY KEY,
        id         TEXT NOT NULL,
        mode       TEXT NOT NULL,
        mx         TEXT NOT NULL,
        max_age    INTEGER NOT NULL,
        fetched_at REAL NOT NULL,
        policy     TEXT NOT NULL
    );
    CREATE TABLE tls_results (
        day           TEXT NOT NULL,
        policy_domain TEXT NOT NULL,
        policy_type   TEXT NOT NULL,
        policy_string TEXT NOT NULL DEFAULT '',
        mx_host       TEXT NOT NULL DEFAULT '',
        result_type   TEXT NOT NULL DEFAULT '',
        sending_ip    TEXT NOT NULL DEFAULT '',
        receiving_ip  TEXT NOT NULL DEFAULT '',
        sessions      INTEGER NOT NULL,
        PRIMARY KEY (day, policy_domain, policy_type, mx_host, result_type, sending_ip,
                     receiving_ip)
    );
    CREATE TABLE tls_reports (
        day           TEXT NOT NULL,
        policy_domain TEXT NOT NULL,
        sent_at       REAL,
        error         TEXT,
        PRIMARY KEY (day, policy_domain)
    );
    """,
    # 20: issue 22: the custom headers a MailerLogic message was sent with, which its
    # webhooks carry beside the metadata (NULL for every other entry point); and an id for
    # each sending domain, which PiiSend's domain_id may name instead of the domain
    20: """
    ALTER TABLE messages ADD COLUMN webhook_headers TEXT;
    ALTER TABLE domains ADD COLUMN id TEXT;
    UPDATE domains SET id = 'dom_' || lower(hex(randomblob(8)));
    CREATE UNIQUE INDEX domains_id ON domains(id);
    """,
    # 21: issue 23 (a million queued): the recipients a scheduler may pick, by when they fall
    # due, so that a pick reads its LIMIT of them soonest first (and the leases in flight)
    # however many wait. Before, PostgreSQL read every due row and sorted them at each pick
    # (O(n)); SQLite sorted its LIMIT from recipients_due's runs in a temp b-tree.
    # leased_until stays out of it: taking or giving back a lease changes no index
    21: """
    CREATE INDEX recipients_pending ON recipients(next_attempt_at)
        WHERE status IN ('queued', 'deferred', 'scheduled');
    """,
}

PG: dict[int, str] = {
    19: """
    ALTER TABLE messages ADD COLUMN pool text;
    ALTER TABLE attempts ADD COLUMN source_ip text;
    ALTER TABLE attempts ADD COLUMN tls_policy text;
    ALTER TABLE attempts ADD COLUMN tls_failure text;
    CREATE TABLE site_backoff (
        site   text PRIMARY KEY,
        until  double precision NOT NULL,
        rate   double precision,
        reason text NOT NULL,
        since  double precision NOT NULL
    );
    CREATE TABLE source_usage (
        address text NOT NULL,
        day     text NOT NULL,
        sent    integer NOT NULL,
        PRIMARY KEY (address, day)
    );
    CREATE TABLE mta_sts_policies (
        domain     text PRIMARY KEY,
        id         text NOT NULL,
        mode       text NOT NULL,
        mx         text NOT NULL,
        max_age    bigint NOT NULL,
        fetched_at double precision NOT NULL,
        policy     text NOT NULL
    );
    CREATE TABLE tls_results (
        day           text NOT NULL,
        policy_domain text NOT NULL,
        policy_type   text NOT NULL,
        policy_string text NOT NULL DEFAULT '',
        mx_host       text NOT NULL DEFAULT '',
        result_type   text NOT NULL DEFAULT '',
        sending_ip    text NOT NULL DEFAULT '',
        receiving_ip  text NOT NULL DEFAULT '',
        sessions      bigint NOT NULL,
        PRIMARY KEY (day, policy_domain, policy_type, mx_host, result_type, sending_ip,
                     receiving_ip)
    );
    CREATE TABLE tls_reports (
        day           text NOT NULL,
        policy_domain text NOT NULL,
        sent_at       double precision,
        error         text,
        PRIMARY KEY (day, policy_domain)
    );
    """,
    20: """
    ALTER TABLE messages ADD COLUMN webhook_headers text;
    ALTER TABLE domains ADD COLUMN id text;
    UPDATE domains SET id = 'dom_' || substr(md5(random()::text || name), 1, 16);
    CREATE UNIQUE INDEX domains_id ON domains(id);
    """,
    21: """
    CREATE INDEX recipients_pending ON recipients(next_attempt_at)
        WHERE status IN ('queued', 'deferred', 'scheduled');
    """,
}
