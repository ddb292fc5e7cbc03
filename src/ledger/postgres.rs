//! The shared ledger: PostgreSQL, for deployments where several replicas must agree on what was done.
//!
//! Same tables, columns and rules as [`super::sqlite`]. Claims are single `INSERT … ON CONFLICT … DO UPDATE … WHERE`
//! statements: PostgreSQL locks the conflicting row and re-checks the `WHERE` against its latest version, so two
//! replicas claiming one key at once cannot both win. The rule in that `WHERE` is the parent module's
//! `decide_share` / `decide_import` written as SQL; when a claim is refused, the row is read and the same Rust rule
//! says whether it was Done or Busy.
//!
//! Durability, the same trade as SQLite's: everything except import completions runs on a connection with
//! `synchronous_commit = off`. Its commits are visible to every replica at once and can never corrupt anything, but
//! a server crash can lose the last fraction of a second of them — at worst one extra mint or one repeated
//! action, which the receiver side absorbs. Without it each claim and completion waits for its own WAL flush and one
//! connection manages about a thousand claim+complete pairs per second; with it, ten times that. Import completions
//! and import intents use a second connection with the server's own `synchronous_commit`, so [`PostgresLedger::complete_import`]
//! returns only once the import is as durable as the server is configured to make it (its flush also covers every
//! earlier commit).
//!
//! Each connection is pipelined (tokio-postgres sends concurrent queries without waiting), so one of each is
//! enough. A lost connection is re-established on the next call (the failed call reports [`LedgerError::Io`] and is
//! not retried here, because a claim or a webhook key might have been written before the answer was lost — the
//! caller's retry is safe where a silent one might not be).
//!
//! Every call is bounded (see [`super::Ledger`]): a call that times out drops both connections, so the next call
//! connects afresh rather than queueing behind a server that stopped answering; each session also carries the same
//! limit as its `statement_timeout`, and TCP keepalives notice a vanished server on an idle connection.
//!
//! The tables live in the connection's `search_path` (choose a schema with `?options=-c%20search_path%3Dmy_schema`
//! in the URL).
//!
//! TLS is rustls, `sslmode` as libpq (see [`super::pg_tls`]): each connection says in the log whether it is
//! encrypted, and one that fell back to plain text under `prefer` (the default) is a warning.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Row, Statement};

use super::pg_tls::{PgTls, PgTlsSettings, SslMode};
use super::sqlite::{PRUNE_CHUNK, lease_of, required};
use super::{
    Claim, DeliveryClaim, ImportIntent, ImportRecord, IntentClaim, Lease, LeaseKey, LedgerError,
    ShareRecord, after, decide_import, decide_intent, decide_share, decide_webhook, from_millis,
    millis, parse_kind, to_u32,
};
use crate::secret::SecretUrl;

/// The schema this binary writes (kept in `ledger_meta`, key `schema_version`).
pub const SCHEMA_VERSION: i64 = 3;

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// TCP keepalives: first probe after this much silence, then every interval, the connection dropped after the
/// retries go unanswered (about 25 s in all).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

/// How often a refused claim is re-tried when the row changed between the claim and the read that explains it.
const CLAIM_ATTEMPTS: usize = 10;

/// Version 1, as released (public so that tests can build a v1 database and check that it migrates); `ledger_meta`
/// is created before it, outside this text.
pub const SCHEMA_V1: &str = "
CREATE TABLE shares (
    source_session_id      TEXT    NOT NULL,
    partner_application_id TEXT    NOT NULL,
    message_id             TEXT,
    event_id               TEXT,
    session_kind           TEXT,
    status                 TEXT,
    vendor_data            TEXT,
    occurred_at            BIGINT,
    minted_at              BIGINT,
    expires_at             BIGINT,
    reshares               BIGINT  NOT NULL DEFAULT 0,
    lease_holder           TEXT,
    lease_until            BIGINT,
    touched_at             BIGINT  NOT NULL,
    PRIMARY KEY (source_session_id, partner_application_id)
);
CREATE INDEX shares_touched_at ON shares (touched_at);
CREATE TABLE imports (
    issuer_application_id  TEXT    NOT NULL,
    source_session_id      TEXT    NOT NULL,
    imported_session_id    TEXT,
    session_number         BIGINT,
    status                 TEXT,
    session_kind           TEXT,
    vendor_data            TEXT,
    trust_review           BOOLEAN,
    imported_at            BIGINT,
    result_published       BOOLEAN NOT NULL DEFAULT FALSE,
    reshares               BIGINT  NOT NULL DEFAULT 0,
    lease_holder           TEXT,
    lease_until            BIGINT,
    touched_at             BIGINT  NOT NULL,
    PRIMARY KEY (issuer_application_id, source_session_id)
);
CREATE INDEX imports_touched_at ON imports (touched_at);
CREATE TABLE webhook_deliveries (
    key     TEXT   NOT NULL PRIMARY KEY,
    seen_at BIGINT NOT NULL
);
CREATE INDEX webhook_deliveries_seen_at ON webhook_deliveries (seen_at);
";

/// Version 2, applied after [`SCHEMA_V1`] (on a fresh database too). Every helper's block is one `-- <task>:` section.
const SCHEMA_V2: &str = "
-- webhook-intake: a delivery key is pending (held by one attempt until lease_until) until its event is confirmed,
-- then final (confirmed). Keys written by version 1 migrate as pending without a holder (see the SQLite backend).
ALTER TABLE webhook_deliveries ADD COLUMN confirmed BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE webhook_deliveries ADD COLUMN lease_holder TEXT;
ALTER TABLE webhook_deliveries ADD COLUMN lease_until BIGINT;
-- receiver-import-intent: the import intent (token digest, envelope, holder, vendor_data sent, first attempt),
-- written before Didit is called and cleared when the import is recorded or known not to have happened.
ALTER TABLE imports ADD COLUMN IF NOT EXISTS intent_digest TEXT;
ALTER TABLE imports ADD COLUMN IF NOT EXISTS intent_message_id TEXT;
ALTER TABLE imports ADD COLUMN IF NOT EXISTS intent_holder TEXT;
ALTER TABLE imports ADD COLUMN IF NOT EXISTS intent_vendor_data TEXT;
ALTER TABLE imports ADD COLUMN IF NOT EXISTS intent_at BIGINT;
";

/// Version 3, applied after [`SCHEMA_V2`]. Every helper's block is one `-- <task>:` section.
const SCHEMA_V3: &str = "
-- backfill: one checkpoint per backfill (`partner-bridge backfill`; run_key hashes the partner and the filters): the
-- listing lane and offset every page before which is done, when it started and finished; and each session it has
-- published (after the broker's confirm), so that a killed run resumed with the same arguments sends none again.
CREATE TABLE IF NOT EXISTS backfill_runs (
    run_key     TEXT    NOT NULL PRIMARY KEY,
    partner     TEXT    NOT NULL,
    arguments   TEXT    NOT NULL,
    lane        BIGINT NOT NULL DEFAULT 0,
    next_offset BIGINT NOT NULL DEFAULT 0,
    started_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE TABLE IF NOT EXISTS backfill_sent (
    run_key    TEXT    NOT NULL,
    session_id TEXT    NOT NULL,
    sent_at    BIGINT NOT NULL,
    PRIMARY KEY (run_key, session_id)
);
-- notices: erasure and rectification notices (GDPR Art. 19). Issuer side, one row per (request, recipient): the
-- notice sent, how often, and its acknowledgement (a notice is sent again until acked). Receiver side, one row per
-- notice received: what was done with it (the imported copy deleted, the backend told), so that a redelivered
-- notice does neither twice.
CREATE TABLE IF NOT EXISTS notices_sent (
    notice_id              TEXT   NOT NULL PRIMARY KEY,
    request_id             TEXT   NOT NULL,
    session_id             TEXT   NOT NULL,
    partner                TEXT   NOT NULL,
    partner_application_id TEXT   NOT NULL,
    agreement_id           TEXT,
    kind                   TEXT   NOT NULL,
    reason                 TEXT,
    requested_at           BIGINT NOT NULL,
    sends                  BIGINT NOT NULL DEFAULT 0,
    last_sent_at           BIGINT,
    acked_at               BIGINT,
    action                 TEXT,
    imported_session_id    TEXT,
    UNIQUE (request_id, partner_application_id)
);
CREATE INDEX IF NOT EXISTS notices_sent_unacked ON notices_sent (acked_at, last_sent_at);
CREATE TABLE IF NOT EXISTS notices_received (
    issuer_application_id  TEXT   NOT NULL,
    notice_id              TEXT   NOT NULL,
    source_session_id      TEXT   NOT NULL,
    kind                   TEXT   NOT NULL,
    received_at            BIGINT NOT NULL,
    imported_session_id    TEXT,
    deleted_at             BIGINT,
    published_at           BIGINT,
    action                 TEXT,
    PRIMARY KEY (issuer_application_id, notice_id)
);
";

const SHARE_COLUMNS: &str = "message_id, event_id, session_kind, status, vendor_data, occurred_at, minted_at, expires_at, reshares";
const IMPORT_COLUMNS: &str = "imported_session_id, session_number, status, session_kind, vendor_data, trust_review, \
                              imported_at, result_published";

/// Every statement, prepared once per connection.
struct Statements {
    probe: Statement,
    renew_share: Statement,
    renew_import: Statement,
    claim_share: Statement,
    read_share: Statement,
    complete_share: Statement,
    release_share_delete: Statement,
    release_share_update: Statement,
    claim_import: Statement,
    read_import: Statement,
    complete_import: Statement,
    release_import_delete: Statement,
    release_import_update: Statement,
    begin_import: Statement,
    read_intent: Statement,
    abandon_intent: Statement,
    mark_published: Statement,
    bump_reshares: Statement,
    claim_webhook: Statement,
    read_webhook: Statement,
    confirm_webhook: Statement,
    release_webhook: Statement,
    prune_shares: Statement,
    prune_imports: Statement,
    prune_webhooks: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            probe: client
                .prepare(
                    "INSERT INTO ledger_meta (key, value) VALUES ('writable_probe', $1)
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                )
                .await?,
            renew_share: client
                .prepare(
                    "UPDATE shares SET lease_until = $4
                     WHERE source_session_id = $1 AND partner_application_id = $2 AND lease_holder = $3",
                )
                .await?,
            renew_import: client
                .prepare(
                    "UPDATE imports SET lease_until = $4
                     WHERE issuer_application_id = $1 AND source_session_id = $2 AND lease_holder = $3",
                )
                .await?,
            claim_share: client
                .prepare(&format!(
                    "INSERT INTO shares (source_session_id, partner_application_id, lease_holder, lease_until, touched_at)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (source_session_id, partner_application_id) DO UPDATE SET
                         lease_holder = EXCLUDED.lease_holder, lease_until = EXCLUDED.lease_until,
                         touched_at = EXCLUDED.touched_at
                     WHERE NOT (shares.message_id IS NOT NULL AND shares.expires_at > $6
                                AND shares.message_id IS DISTINCT FROM $7)
                       AND (shares.lease_holder IS NULL OR shares.lease_until <= $5 OR shares.lease_holder = $3)
                     RETURNING {SHARE_COLUMNS}"
                ))
                .await?,
            read_share: client
                .prepare(&format!(
                    "SELECT {SHARE_COLUMNS}, lease_holder, lease_until FROM shares
                     WHERE source_session_id = $1 AND partner_application_id = $2"
                ))
                .await?,
            complete_share: client
                .prepare(
                    "INSERT INTO shares (source_session_id, partner_application_id, message_id, event_id, session_kind,
                         status, vendor_data, occurred_at, minted_at, expires_at, reshares, touched_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                     ON CONFLICT (source_session_id, partner_application_id) DO UPDATE SET
                         message_id = EXCLUDED.message_id, event_id = EXCLUDED.event_id,
                         session_kind = EXCLUDED.session_kind, status = EXCLUDED.status,
                         vendor_data = EXCLUDED.vendor_data, occurred_at = EXCLUDED.occurred_at,
                         minted_at = EXCLUDED.minted_at, expires_at = EXCLUDED.expires_at,
                         reshares = EXCLUDED.reshares, touched_at = EXCLUDED.touched_at,
                         lease_until = CASE WHEN shares.lease_holder = $13 THEN NULL ELSE shares.lease_until END,
                         lease_holder = CASE WHEN shares.lease_holder = $13 THEN NULL ELSE shares.lease_holder END",
                )
                .await?,
            release_share_delete: client
                .prepare(
                    "DELETE FROM shares WHERE source_session_id = $1 AND partner_application_id = $2
                         AND lease_holder = $3 AND message_id IS NULL",
                )
                .await?,
            release_share_update: client
                .prepare(
                    "UPDATE shares SET lease_holder = NULL, lease_until = NULL, touched_at = $4
                     WHERE source_session_id = $1 AND partner_application_id = $2 AND lease_holder = $3",
                )
                .await?,
            claim_import: client
                .prepare(&format!(
                    "INSERT INTO imports (issuer_application_id, source_session_id, lease_holder, lease_until, touched_at)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (issuer_application_id, source_session_id) DO UPDATE SET
                         lease_holder = EXCLUDED.lease_holder, lease_until = EXCLUDED.lease_until,
                         touched_at = EXCLUDED.touched_at
                     WHERE imports.imported_at IS NULL
                       AND (imports.lease_holder IS NULL OR imports.lease_until <= $5 OR imports.lease_holder = $3)
                     RETURNING {IMPORT_COLUMNS}"
                ))
                .await?,
            read_import: client
                .prepare(&format!(
                    "SELECT {IMPORT_COLUMNS}, lease_holder, lease_until FROM imports
                     WHERE issuer_application_id = $1 AND source_session_id = $2"
                ))
                .await?,
            complete_import: client
                .prepare(
                    "INSERT INTO imports (issuer_application_id, source_session_id, imported_session_id, session_number,
                         status, session_kind, vendor_data, trust_review, imported_at, result_published, touched_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                     ON CONFLICT (issuer_application_id, source_session_id) DO UPDATE SET
                         imported_session_id = EXCLUDED.imported_session_id,
                         session_number = EXCLUDED.session_number, status = EXCLUDED.status,
                         session_kind = EXCLUDED.session_kind, vendor_data = EXCLUDED.vendor_data,
                         trust_review = EXCLUDED.trust_review, imported_at = EXCLUDED.imported_at,
                         result_published = (imports.result_published OR EXCLUDED.result_published),
                         touched_at = EXCLUDED.touched_at, reshares = 0,
                         intent_digest = NULL, intent_message_id = NULL, intent_holder = NULL,
                         intent_vendor_data = NULL, intent_at = NULL,
                         lease_until = CASE WHEN imports.lease_holder = $12 THEN NULL ELSE imports.lease_until END,
                         lease_holder = CASE WHEN imports.lease_holder = $12 THEN NULL ELSE imports.lease_holder END",
                )
                .await?,
            release_import_delete: client
                .prepare(
                    "DELETE FROM imports WHERE issuer_application_id = $1 AND source_session_id = $2
                         AND lease_holder = $3 AND imported_at IS NULL AND intent_digest IS NULL AND reshares = 0",
                )
                .await?,
            release_import_update: client
                .prepare(
                    "UPDATE imports SET lease_holder = NULL, lease_until = NULL, touched_at = $4
                     WHERE issuer_application_id = $1 AND source_session_id = $2 AND lease_holder = $3",
                )
                .await?,
            begin_import: client
                .prepare(
                    "INSERT INTO imports (issuer_application_id, source_session_id, intent_digest, intent_message_id,
                         intent_holder, intent_vendor_data, intent_at, touched_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (issuer_application_id, source_session_id) DO UPDATE SET
                         intent_vendor_data = CASE WHEN imports.intent_digest IS NULL
                                                   THEN EXCLUDED.intent_vendor_data ELSE imports.intent_vendor_data END,
                         intent_at = CASE WHEN imports.intent_digest IS NULL THEN EXCLUDED.intent_at
                                          ELSE imports.intent_at END,
                         intent_digest = EXCLUDED.intent_digest, intent_message_id = EXCLUDED.intent_message_id,
                         intent_holder = EXCLUDED.intent_holder, touched_at = EXCLUDED.touched_at
                     WHERE imports.imported_at IS NULL
                       AND (imports.intent_digest IS NULL OR imports.intent_digest = EXCLUDED.intent_digest)
                     RETURNING 1",
                )
                .await?,
            read_intent: client
                .prepare(
                    "SELECT intent_digest, intent_message_id, intent_holder, intent_vendor_data, intent_at
                     FROM imports WHERE issuer_application_id = $1 AND source_session_id = $2",
                )
                .await?,
            abandon_intent: client
                .prepare(
                    "UPDATE imports SET intent_digest = NULL, intent_message_id = NULL, intent_holder = NULL,
                         intent_vendor_data = NULL, intent_at = NULL, touched_at = $4
                     WHERE issuer_application_id = $1 AND source_session_id = $2 AND intent_digest = $3",
                )
                .await?,
            mark_published: client
                .prepare(
                    "UPDATE imports SET result_published = TRUE, touched_at = $3
                     WHERE issuer_application_id = $1 AND source_session_id = $2 AND imported_at IS NOT NULL",
                )
                .await?,
            bump_reshares: client
                .prepare(
                    "INSERT INTO imports (issuer_application_id, source_session_id, reshares, touched_at)
                     VALUES ($1, $2, 1, $3)
                     ON CONFLICT (issuer_application_id, source_session_id) DO UPDATE SET
                         reshares = imports.reshares + 1, touched_at = EXCLUDED.touched_at
                     RETURNING reshares",
                )
                .await?,
            // The rule of `decide_webhook` as SQL: insert when new, take over a pending key whose lease is gone or
            // is the caller's own; `xmax = 0` tells an insert from an update.
            claim_webhook: client
                .prepare(
                    "INSERT INTO webhook_deliveries (key, seen_at, confirmed, lease_holder, lease_until)
                     VALUES ($1, $2, FALSE, $3, $4)
                     ON CONFLICT (key) DO UPDATE SET
                         lease_holder = EXCLUDED.lease_holder, lease_until = EXCLUDED.lease_until
                     WHERE NOT webhook_deliveries.confirmed
                       AND (webhook_deliveries.lease_holder IS NULL OR webhook_deliveries.lease_until <= $2
                            OR webhook_deliveries.lease_holder = $3)
                     RETURNING (xmax = 0) AS inserted",
                )
                .await?,
            read_webhook: client
                .prepare("SELECT confirmed, lease_holder, lease_until FROM webhook_deliveries WHERE key = $1")
                .await?,
            confirm_webhook: client
                .prepare(
                    "INSERT INTO webhook_deliveries (key, seen_at, confirmed) VALUES ($1, $2, TRUE)
                     ON CONFLICT (key) DO UPDATE SET confirmed = TRUE, lease_holder = NULL, lease_until = NULL",
                )
                .await?,
            release_webhook: client
                .prepare(
                    "DELETE FROM webhook_deliveries WHERE key = $1 AND NOT confirmed AND lease_holder = $2",
                )
                .await?,
            prune_shares: client
                .prepare(
                    "DELETE FROM shares WHERE (source_session_id, partner_application_id) IN (
                         SELECT source_session_id, partner_application_id FROM shares
                         WHERE touched_at < $1 AND (lease_holder IS NULL OR lease_until <= $2) LIMIT $3)",
                )
                .await?,
            prune_imports: client
                .prepare(
                    // Recorded imports and unresolved intents are never pruned (see the SQLite backend).
                    "DELETE FROM imports WHERE (issuer_application_id, source_session_id) IN (
                         SELECT issuer_application_id, source_session_id FROM imports
                         WHERE touched_at < $1 AND imported_at IS NULL AND intent_digest IS NULL
                           AND (lease_holder IS NULL OR lease_until <= $2) LIMIT $3)",
                )
                .await?,
            prune_webhooks: client
                .prepare(
                    "DELETE FROM webhook_deliveries WHERE key IN (
                         SELECT key FROM webhook_deliveries
                         WHERE seen_at < $1 AND (lease_holder IS NULL OR lease_until <= $2) LIMIT $3)",
                )
                .await?,
        })
    }
}

/// A live connection and its prepared statements.
struct Connection {
    client: Client,
    st: Statements,
}

/// One of the two connections, replaced when lost.
struct Slot {
    /// Whether commits on it wait for the WAL flush (the server's `synchronous_commit`) or not (`off`).
    synced: bool,
    current: Mutex<Option<Arc<Connection>>>,
    /// Serialises reconnection, so that a lost connection is replaced once, not once per waiting call.
    reconnecting: tokio::sync::Mutex<()>,
}

impl Slot {
    fn new(synced: bool) -> Slot {
        Slot {
            synced,
            current: Mutex::new(None),
            reconnecting: tokio::sync::Mutex::new(()),
        }
    }

    fn live(&self) -> Option<Arc<Connection>> {
        self.current
            .lock()
            .expect("ledger connection lock")
            .as_ref()
            .filter(|c| !c.client.is_closed())
            .cloned()
    }

    fn set(&self, conn: Arc<Connection>) {
        *self.current.lock().expect("ledger connection lock") = Some(conn);
    }
}

struct Inner {
    config: tokio_postgres::Config,
    /// How connections are encrypted.
    tls: PgTls,
    /// Every host is a Unix-domain socket: `sslmode` does not apply (as in libpq), nothing to warn about.
    local: bool,
    /// The URL as it may be shown (password masked, query dropped).
    shown: String,
    /// The password, only to scrub it from error texts should a driver ever echo it.
    password: Option<String>,
    /// Everything but import completions: asynchronous commit.
    fast: Slot,
    /// Import completions: commits wait for the WAL flush. Opened on first use.
    durable: Slot,
    /// Set as each session's `statement_timeout` (unless the URL's `options` set one), so that the server, too,
    /// gives up on a statement the caller has stopped waiting for.
    statement_timeout: Option<Duration>,
}

/// The PostgreSQL backend. Clones share one connection.
#[derive(Clone)]
pub struct PostgresLedger {
    inner: Arc<Inner>,
    /// How long one call may take (see [`super::Ledger`]'s dispatch).
    timeout: Duration,
}

impl std::fmt::Debug for PostgresLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresLedger")
            .field("url", &self.inner.shown)
            .finish()
    }
}

impl Inner {
    /// An error text with the cause chain, the password scrubbed.
    fn text(&self, e: &tokio_postgres::Error) -> String {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        match &self.password {
            Some(p) if !p.is_empty() => text.replace(p.as_str(), "***"),
            _ => text,
        }
    }

    /// Damage is [`LedgerError::Corrupt`]; anything else (lost connection, read-only standby, lock timeout) is
    /// transient.
    fn error(&self, e: tokio_postgres::Error) -> LedgerError {
        let text = self.text(&e);
        let corrupt = matches!(e.code(), Some(c) if *c == SqlState::DATA_CORRUPTED || *c == SqlState::INDEX_CORRUPTED)
            || text.starts_with("error deserializing column");
        if corrupt {
            LedgerError::Corrupt(text)
        } else {
            LedgerError::Io(text)
        }
    }

    /// Opens one connection, encrypted as `sslmode` says, and logs how it is.
    async fn connect(&self) -> Result<Client, LedgerError> {
        let failed = |e: tokio_postgres::Error| {
            LedgerError::Io(format!(
                "{} ({}): {}",
                self.shown,
                self.tls.describe(),
                self.text(&e)
            ))
        };
        let shown = self.shown.clone();
        let lost = move |e: tokio_postgres::Error| {
            // Only the kind: the next call reconnects and reports its own error in full.
            tracing::warn!(ledger = %shown, error = %e, "ledger connection lost");
        };
        let (client, encrypted) = match self.tls.connector() {
            Some((make, encrypted)) if !self.local => {
                let (client, connection) = self.config.connect(make).await.map_err(failed)?;
                tokio::spawn(async move { connection.await.map_err(lost) });
                (client, encrypted.load(std::sync::atomic::Ordering::SeqCst))
            }
            _ => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(failed)?;
                tokio::spawn(async move { connection.await.map_err(lost) });
                (client, false)
            }
        };
        let sslmode = self.tls.mode().as_str();
        if encrypted {
            tracing::info!(ledger = %self.shown, tls = %self.tls.describe(), "ledger connection encrypted (TLS)");
        } else if self.local || self.tls.mode() == SslMode::Disable {
            tracing::info!(
                ledger = %self.shown,
                sslmode,
                tls = false,
                "ledger connection in plain text ({})",
                if self.local { "Unix-domain socket" } else { "sslmode=disable" }
            );
        } else if self.tls.explicit() {
            tracing::warn!(
                ledger = %self.shown,
                sslmode,
                tls = false,
                "ledger connection NOT encrypted: the server refused TLS (sslmode=prefer); \
                 set sslmode=require or stronger to refuse plain text"
            );
        } else {
            tracing::warn!(
                ledger = %self.shown,
                sslmode,
                tls = false,
                "ledger connection NOT encrypted: the server refused TLS and ledger.sslmode is not set \
                 (default prefer falls back to plain text); set ledger.sslmode = \"require\" or stronger to refuse \
                 plain text, or \"disable\" to say plain text is intended"
            );
        }
        Ok(client)
    }

    /// Makes `client` ready to serve `slot`: its commit mode, then its statements.
    async fn prepare(
        &self,
        client: Client,
        slot: &Slot,
    ) -> Result<Arc<Connection>, tokio_postgres::Error> {
        if !slot.synced {
            client
                .batch_execute("SET synchronous_commit TO off")
                .await?;
        }
        if let Some(limit) = self.statement_timeout {
            client
                .batch_execute(&format!("SET statement_timeout = {}", limit.as_millis()))
                .await?;
        }
        let st = Statements::prepare(&client).await?;
        Ok(Arc::new(Connection { client, st }))
    }

    /// The slot's live connection, reconnecting when the last one was lost.
    async fn connection(&self, slot: &Slot) -> Result<Arc<Connection>, LedgerError> {
        if let Some(conn) = slot.live() {
            return Ok(conn);
        }
        let _guard = slot.reconnecting.lock().await;
        if let Some(conn) = slot.live() {
            return Ok(conn);
        }
        let client = self.connect().await?;
        let conn = self
            .prepare(client, slot)
            .await
            .map_err(|e| self.error(e))?;
        slot.set(conn.clone());
        tracing::info!(
            ledger = %self.shown,
            synced = slot.synced,
            tls = %self.tls.describe(),
            "ledger connected to postgres"
        );
        Ok(conn)
    }
}

impl PostgresLedger {
    /// Connects, creates or migrates the schema (serialised across replicas by an advisory lock), and prepares the
    /// statements.
    pub async fn open(url: &SecretUrl) -> Result<PostgresLedger, LedgerError> {
        PostgresLedger::open_with_timeout(url, super::DEFAULT_TIMEOUT).await
    }

    /// [`PostgresLedger::open`], calls bounded by `timeout`, which is also each session's `statement_timeout`.
    /// TCP keepalives are tightened (unless the URL sets them) so that a server that vanished (failover, a cut
    /// network) is noticed within about half a minute even on an idle connection.
    pub async fn open_with_timeout(
        url: &SecretUrl,
        timeout: Duration,
    ) -> Result<PostgresLedger, LedgerError> {
        PostgresLedger::open_with_tls(url, timeout, &PgTlsSettings::default()).await
    }

    /// [`PostgresLedger::open_with_timeout`], TLS also from the config file's settings (the URL's `sslmode=` and
    /// `sslrootcert=` count either way). Reads the CA certificates once, here.
    pub async fn open_with_tls(
        url: &SecretUrl,
        timeout: Duration,
        tls: &PgTlsSettings,
    ) -> Result<PostgresLedger, LedgerError> {
        let shown = url.redacted();
        let (driver_url, tls) = PgTls::resolve(url.expose(), tls)
            .map_err(|e| LedgerError::Open(format!("{shown}: {e}")))?;
        let mut config: tokio_postgres::Config = driver_url
            .parse()
            .map_err(|_| LedgerError::Open(format!("not a valid PostgreSQL URL: {shown}")))?;
        config.ssl_mode(tls.driver_mode());
        // A bare `hostaddr` leaves TLS without a name to send and check (tokio-postgres then refuses TLS): the
        // address is the name, as an IP address in the certificate would say.
        if config.get_hosts().is_empty() {
            for addr in config.get_hostaddrs().to_vec() {
                config.host(addr.to_string());
            }
        }
        // libpq: sslmode does not apply to Unix-domain sockets.
        let local = !config.get_hosts().is_empty()
            && config
                .get_hosts()
                .iter()
                .all(|h| !matches!(h, Host::Tcp(_)));
        if local {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("partner-bridge");
        }
        // The driver's defaults (idle 2 h) notice nothing in time; a URL that chose its own values keeps them.
        if config.get_keepalives()
            && config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60)
        {
            config
                .keepalives_idle(KEEPALIVE_IDLE)
                .keepalives_interval(KEEPALIVE_INTERVAL)
                .keepalives_retries(KEEPALIVE_RETRIES);
        }
        let statement_timeout = (!config
            .get_options()
            .is_some_and(|o| o.contains("statement_timeout")))
        .then_some(timeout);
        let password = config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        let inner = Inner {
            config,
            tls,
            local,
            shown,
            password,
            fast: Slot::new(false),
            durable: Slot::new(true),
            statement_timeout,
        };
        let open = |e: LedgerError| match e {
            LedgerError::Open(text)
            | LedgerError::Io(text)
            | LedgerError::Unavailable(text)
            | LedgerError::Corrupt(text) => LedgerError::Open(text),
        };
        let mut client = inner.connect().await.map_err(open)?;
        let db_open = |e: tokio_postgres::Error| {
            LedgerError::Open(format!("{}: {}", inner.shown, inner.text(&e)))
        };
        migrate(&mut client).await.map_err(|e| match e {
            MigrateError::Db(e) => db_open(e),
            MigrateError::Ledger(e) => open(e),
        })?;
        let conn = inner.prepare(client, &inner.fast).await.map_err(db_open)?;
        inner.fast.set(conn);
        Ok(PostgresLedger {
            inner: Arc::new(inner),
            timeout,
        })
    }

    /// How long one call may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Forgets both connections (a call on one of them timed out: the server or the network hangs), so that the
    /// next call connects afresh instead of queueing behind the stuck one — after a failover, the fresh connection
    /// reaches the new primary.
    pub fn drop_connections(&self) {
        for slot in [&self.inner.fast, &self.inner.durable] {
            slot.current.lock().expect("ledger connection lock").take();
        }
    }

    /// See [`super::Ledger::renew`].
    pub async fn renew(
        &self,
        key: &LeaseKey,
        holder: &str,
        until: DateTime<Utc>,
    ) -> Result<bool, LedgerError> {
        let c = self.conn().await?;
        let statement = match key {
            LeaseKey::Share { .. } => &c.st.renew_share,
            LeaseKey::Import { .. } => &c.st.renew_import,
        };
        let (a, b) = key.columns();
        let n = c
            .client
            .execute(statement, &[&a, &b, &holder, &millis(until)])
            .await
            .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    /// A connection of its own, with the server's `synchronous_commit` and the ledger's `statement_timeout`, for
    /// work that needs transactions (the audit log's appends): the shared connections are pipelined and carry no
    /// transaction.
    pub(crate) async fn dedicated_client(&self) -> Result<Client, LedgerError> {
        let client = self.inner.connect().await?;
        if let Some(limit) = self.inner.statement_timeout {
            client
                .batch_execute(&format!("SET statement_timeout = {}", limit.as_millis()))
                .await
                .map_err(|e| self.inner.error(e))?;
        }
        Ok(client)
    }

    /// Runs one statement on the shared connection and returns its rows (for the notice tables, whose statements
    /// live in `ledger::notices` and are not prepared per connection).
    pub(crate) async fn query_rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, LedgerError> {
        let c = self.conn().await?;
        c.client.query(sql, params).await.map_err(|e| self.err(e))
    }

    /// A driver error as a [`LedgerError`], the password scrubbed.
    pub(crate) fn error_of(&self, e: tokio_postgres::Error) -> LedgerError {
        self.inner.error(e)
    }

    /// The connection for everything but import completions.
    async fn conn(&self) -> Result<Arc<Connection>, LedgerError> {
        self.inner.connection(&self.inner.fast).await
    }

    fn err(&self, e: tokio_postgres::Error) -> LedgerError {
        self.inner.error(e)
    }

    /// See [`super::Ledger::check_writable`]. Also fails on a read-only standby.
    pub async fn check_writable(&self) -> Result<(), LedgerError> {
        let c = self.conn().await?;
        c.client
            .execute(&c.st.probe, &[&Utc::now().to_rfc3339()])
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// See [`super::Ledger::claim_share`].
    #[allow(clippy::too_many_arguments)]
    pub async fn claim_share(
        &self,
        source_session_id: &str,
        partner_application_id: &str,
        holder: &str,
        lease: Duration,
        min_validity: Duration,
        stale_message_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Claim<ShareRecord>, LedgerError> {
        let c = self.conn().await?;
        let (s, p) = (source_session_id, partner_application_id);
        for _ in 0..CLAIM_ATTEMPTS {
            let taken = c
                .client
                .query_opt(
                    &c.st.claim_share,
                    &[
                        &s,
                        &p,
                        &holder,
                        &millis(after(now, lease)),
                        &millis(now),
                        &millis(after(now, min_validity)),
                        &stale_message_id,
                    ],
                )
                .await
                .map_err(|e| self.err(e))?;
            if let Some(row) = taken {
                return Ok(Claim::Acquired {
                    previous: share_record(&row, s, p).map_err(|e| self.err_or(e))?,
                });
            }
            // Refused: the row says whether because the work is done or someone else holds it.
            let (record, current) = self.read_share(&c, s, p).await?;
            match decide_share(
                record,
                current.as_ref(),
                holder,
                now,
                min_validity,
                stale_message_id,
            ) {
                Claim::Acquired { .. } => continue,
                decided => return Ok(decided),
            }
        }
        Err(LedgerError::Io(format!(
            "claim on ({s}, {p}) kept changing under contention; try again"
        )))
    }

    fn err_or(&self, e: RowError) -> LedgerError {
        match e {
            RowError::Db(e) => self.err(e),
            RowError::Ledger(e) => e,
        }
    }

    async fn read_share(
        &self,
        c: &Connection,
        s: &str,
        p: &str,
    ) -> Result<(Option<ShareRecord>, Option<Lease>), LedgerError> {
        let Some(row) = c
            .client
            .query_opt(&c.st.read_share, &[&s, &p])
            .await
            .map_err(|e| self.err(e))?
        else {
            return Ok((None, None));
        };
        let record = share_record(&row, s, p).map_err(|e| self.err_or(e))?;
        let current = lease_from(&row, 9).map_err(|e| self.err_or(e))?;
        Ok((record, current))
    }

    /// See [`super::Ledger::complete_share`].
    pub async fn complete_share(
        &self,
        record: &ShareRecord,
        holder: &str,
    ) -> Result<(), LedgerError> {
        let c = self.conn().await?;
        let r = record;
        c.client
            .execute(
                &c.st.complete_share,
                &[
                    &r.source_session_id,
                    &r.partner_application_id,
                    &r.message_id,
                    &r.event_id,
                    &r.session_kind.as_str(),
                    &r.status,
                    &r.vendor_data,
                    &millis(r.occurred_at),
                    &millis(r.minted_at),
                    &millis(r.expires_at),
                    &i64::from(r.reshares),
                    &millis(Utc::now()),
                    &holder,
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// See [`super::Ledger::release_share`].
    pub async fn release_share(
        &self,
        source_session_id: &str,
        partner_application_id: &str,
        holder: &str,
    ) -> Result<(), LedgerError> {
        let c = self.conn().await?;
        let (s, p) = (source_session_id, partner_application_id);
        // Delete first (a row that only ever held this lease), then clear the lease of a completed row. Both
        // match on the holder, so a lease taken over in between is never touched.
        c.client
            .execute(&c.st.release_share_delete, &[&s, &p, &holder])
            .await
            .map_err(|e| self.err(e))?;
        c.client
            .execute(
                &c.st.release_share_update,
                &[&s, &p, &holder, &millis(Utc::now())],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// See [`super::Ledger::share`].
    pub async fn share(
        &self,
        source_session_id: &str,
        partner_application_id: &str,
    ) -> Result<Option<ShareRecord>, LedgerError> {
        let c = self.conn().await?;
        Ok(self
            .read_share(&c, source_session_id, partner_application_id)
            .await?
            .0)
    }

    /// See [`super::Ledger::claim_import`].
    pub async fn claim_import(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
        holder: &str,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Claim<ImportRecord>, LedgerError> {
        let c = self.conn().await?;
        let (i, s) = (issuer_application_id, source_session_id);
        for _ in 0..CLAIM_ATTEMPTS {
            let taken = c
                .client
                .query_opt(
                    &c.st.claim_import,
                    &[&i, &s, &holder, &millis(after(now, lease)), &millis(now)],
                )
                .await
                .map_err(|e| self.err(e))?;
            if taken.is_some() {
                return Ok(Claim::Acquired { previous: None });
            }
            let (record, current) = self.read_import(&c, i, s).await?;
            match decide_import(record, current.as_ref(), holder, now) {
                Claim::Acquired { .. } => continue,
                decided => return Ok(decided),
            }
        }
        Err(LedgerError::Io(format!(
            "claim on ({i}, {s}) kept changing under contention; try again"
        )))
    }

    async fn read_import(
        &self,
        c: &Connection,
        i: &str,
        s: &str,
    ) -> Result<(Option<ImportRecord>, Option<Lease>), LedgerError> {
        let Some(row) = c
            .client
            .query_opt(&c.st.read_import, &[&i, &s])
            .await
            .map_err(|e| self.err(e))?
        else {
            return Ok((None, None));
        };
        let record = import_record(&row, i, s).map_err(|e| self.err_or(e))?;
        let current = lease_from(&row, 8).map_err(|e| self.err_or(e))?;
        Ok((record, current))
    }

    /// See [`super::Ledger::complete_import`]. Committed on the synced connection: durable (as far as the server's
    /// `synchronous_commit` makes it) before it returns.
    pub async fn complete_import(
        &self,
        record: &ImportRecord,
        holder: &str,
    ) -> Result<(), LedgerError> {
        let c = self.inner.connection(&self.inner.durable).await?;
        let r = record;
        c.client
            .execute(
                &c.st.complete_import,
                &[
                    &r.issuer_application_id,
                    &r.source_session_id,
                    &r.imported_session_id,
                    &r.session_number,
                    &r.status,
                    &r.session_kind.as_str(),
                    &r.vendor_data,
                    &r.trust_review,
                    &millis(r.imported_at),
                    &r.result_published,
                    &millis(Utc::now()),
                    &holder,
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// See [`super::Ledger::release_import`].
    pub async fn release_import(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
        holder: &str,
    ) -> Result<(), LedgerError> {
        let c = self.conn().await?;
        let (i, s) = (issuer_application_id, source_session_id);
        c.client
            .execute(&c.st.release_import_delete, &[&i, &s, &holder])
            .await
            .map_err(|e| self.err(e))?;
        c.client
            .execute(
                &c.st.release_import_update,
                &[&i, &s, &holder, &millis(Utc::now())],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// See [`super::Ledger::begin_import`]. Written on the synced connection, like an import completion. The row
    /// is read, the shared rule decides, and the write is conditional on the same rule (`WHERE`), so a change in
    /// between makes the write a no-op and the decision is taken again.
    pub async fn begin_import(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
        intent: &ImportIntent,
    ) -> Result<IntentClaim, LedgerError> {
        let c = self.inner.connection(&self.inner.durable).await?;
        let (i, s) = (issuer_application_id, source_session_id);
        for _ in 0..CLAIM_ATTEMPTS {
            let (record, _) = self.read_import(&c, i, s).await?;
            let current = self.read_intent(&c, i, s).await?;
            let claim = decide_intent(record, current.as_ref(), &intent.token_digest);
            if !matches!(claim, IntentClaim::Recorded { .. }) {
                return Ok(claim);
            }
            let written = c
                .client
                .query_opt(
                    &c.st.begin_import,
                    &[
                        &i,
                        &s,
                        &intent.token_digest,
                        &intent.message_id,
                        &intent.holder,
                        &intent.vendor_data,
                        &millis(intent.at),
                        &millis(Utc::now()),
                    ],
                )
                .await
                .map_err(|e| self.err(e))?;
            if written.is_some() {
                return Ok(claim);
            }
        }
        Err(LedgerError::Io(format!(
            "import intent on ({i}, {s}) kept changing under contention; try again"
        )))
    }

    async fn read_intent(
        &self,
        c: &Connection,
        i: &str,
        s: &str,
    ) -> Result<Option<ImportIntent>, LedgerError> {
        let Some(row) = c
            .client
            .query_opt(&c.st.read_intent, &[&i, &s])
            .await
            .map_err(|e| self.err(e))?
        else {
            return Ok(None);
        };
        let read = || -> Result<Option<ImportIntent>, RowError> {
            let Some(token_digest) = row.try_get::<_, Option<String>>(0)? else {
                return Ok(None);
            };
            let at: Option<i64> = row.try_get(4)?;
            Ok(Some(ImportIntent {
                token_digest,
                message_id: row.try_get::<_, Option<String>>(1)?.unwrap_or_default(),
                holder: row.try_get::<_, Option<String>>(2)?.unwrap_or_default(),
                vendor_data: row.try_get(3)?,
                at: from_millis(required(at, "intent_at")?, "intent_at")?,
            }))
        };
        read().map_err(|e| self.err_or(e))
    }

    /// See [`super::Ledger::abandon_import_intent`].
    pub async fn abandon_import_intent(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
        token_digest: &str,
    ) -> Result<(), LedgerError> {
        let c = self.conn().await?;
        c.client
            .execute(
                &c.st.abandon_intent,
                &[
                    &issuer_application_id,
                    &source_session_id,
                    &token_digest,
                    &millis(Utc::now()),
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// See [`super::Ledger::import_intent`].
    pub async fn import_intent(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<Option<ImportIntent>, LedgerError> {
        let c = self.conn().await?;
        self.read_intent(&c, issuer_application_id, source_session_id)
            .await
    }

    /// See [`super::Ledger::mark_result_published`].
    pub async fn mark_result_published(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<(), LedgerError> {
        let c = self.conn().await?;
        c.client
            .execute(
                &c.st.mark_published,
                &[
                    &issuer_application_id,
                    &source_session_id,
                    &millis(Utc::now()),
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// See [`super::Ledger::import`].
    pub async fn import(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<Option<ImportRecord>, LedgerError> {
        let c = self.conn().await?;
        Ok(self
            .read_import(&c, issuer_application_id, source_session_id)
            .await?
            .0)
    }

    /// See [`super::Ledger::reshares`].
    pub async fn reshares(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<u32, LedgerError> {
        let c = self.conn().await?;
        let row = c
            .client
            .query_opt(
                "SELECT reshares FROM imports WHERE issuer_application_id = $1 AND source_session_id = $2",
                &[&issuer_application_id, &source_session_id],
            )
            .await
            .map_err(|e| self.err(e))?;
        let n: i64 = match row {
            Some(row) => row.try_get(0).map_err(|e| self.err(e))?,
            None => 0,
        };
        to_u32(n, "reshares")
    }

    /// See [`super::Ledger::reset_reshares`].
    pub async fn reset_reshares(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<(), LedgerError> {
        let c = self.conn().await?;
        c.client
            .execute(
                "UPDATE imports SET reshares = 0, touched_at = $3
                 WHERE issuer_application_id = $1 AND source_session_id = $2 AND reshares <> 0",
                &[
                    &issuer_application_id,
                    &source_session_id,
                    &millis(Utc::now()),
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// See [`super::Ledger::bump_reshares`].
    pub async fn bump_reshares(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<u32, LedgerError> {
        let c = self.conn().await?;
        let row = c
            .client
            .query_one(
                &c.st.bump_reshares,
                &[
                    &issuer_application_id,
                    &source_session_id,
                    &millis(Utc::now()),
                ],
            )
            .await
            .map_err(|e| self.err(e))?;
        let n: i64 = row.try_get(0).map_err(|e| self.err(e))?;
        to_u32(n, "reshares")
    }

    /// See [`super::Ledger::claim_webhook`].
    pub async fn claim_webhook(
        &self,
        key: &str,
        holder: &str,
        lease: Duration,
        now: DateTime<Utc>,
        first_sight: bool,
    ) -> Result<DeliveryClaim, LedgerError> {
        let c = self.conn().await?;
        for _ in 0..CLAIM_ATTEMPTS {
            // A delivery that may not be seen for the first time never inserts: read, and take over only a
            // pending key.
            if first_sight {
                let taken = c
                    .client
                    .query_opt(
                        &c.st.claim_webhook,
                        &[&key, &millis(now), &holder, &millis(after(now, lease))],
                    )
                    .await
                    .map_err(|e| self.err(e))?;
                if let Some(row) = taken {
                    let inserted: bool = row.try_get(0).map_err(|e| self.err(e))?;
                    return Ok(if inserted {
                        DeliveryClaim::Fresh
                    } else {
                        DeliveryClaim::Retaken
                    });
                }
            }
            let row = c
                .client
                .query_opt(&c.st.read_webhook, &[&key])
                .await
                .map_err(|e| self.err(e))?;
            let row = match row {
                None => None,
                Some(row) => {
                    let confirmed: bool = row.try_get(0).map_err(|e| self.err(e))?;
                    let lease = lease_from(&row, 1).map_err(|e| self.err_or(e))?;
                    Some((confirmed, lease))
                }
            };
            let decided = decide_webhook(
                row.as_ref().map(|(c, l)| (*c, l.as_ref())),
                holder,
                now,
                first_sight,
            );
            match decided {
                DeliveryClaim::Retaken if !first_sight => {
                    // Take it over only if nobody did in between (the row is still pending and not live).
                    let updated = c
                        .client
                        .execute(
                            "UPDATE webhook_deliveries SET lease_holder = $2, lease_until = $3
                             WHERE key = $1 AND NOT confirmed
                               AND (lease_holder IS NULL OR lease_until <= $4 OR lease_holder = $2)",
                            &[&key, &holder, &millis(after(now, lease)), &millis(now)],
                        )
                        .await
                        .map_err(|e| self.err(e))?;
                    if updated == 1 {
                        return Ok(DeliveryClaim::Retaken);
                    }
                }
                // The row changed between the claim and the read: claim again.
                DeliveryClaim::Fresh | DeliveryClaim::Retaken => {}
                decided => return Ok(decided),
            }
        }
        Err(LedgerError::Io(format!(
            "claim on webhook key {key} kept changing under contention; try again"
        )))
    }

    /// See [`super::Ledger::confirm_webhook`].
    pub async fn confirm_webhook(&self, key: &str, now: DateTime<Utc>) -> Result<(), LedgerError> {
        let c = self.conn().await?;
        c.client
            .execute(&c.st.confirm_webhook, &[&key, &millis(now)])
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// See [`super::Ledger::release_webhook`].
    pub async fn release_webhook(&self, key: &str, holder: &str) -> Result<(), LedgerError> {
        let c = self.conn().await?;
        c.client
            .execute(&c.st.release_webhook, &[&key, &holder])
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// See [`super::Ledger::prune`]. Deletes in chunks of [`super::sqlite::PRUNE_CHUNK`] rows, so that no
    /// statement locks a large part of a table for long.
    pub async fn prune(&self, older_than: DateTime<Utc>) -> Result<u64, LedgerError> {
        let c = self.conn().await?;
        let cutoff = millis(older_than);
        let live_from = cutoff.min(millis(Utc::now()));
        let chunk = PRUNE_CHUNK;
        let mut deleted = 0;
        for st in [
            &c.st.prune_shares,
            &c.st.prune_imports,
            &c.st.prune_webhooks,
        ] {
            loop {
                let n = c
                    .client
                    .execute(st, &[&cutoff, &live_from, &chunk])
                    .await
                    .map_err(|e| self.err(e))?;
                deleted += n;
                if n < chunk as u64 {
                    break;
                }
            }
        }
        Ok(deleted)
    }
}

enum MigrateError {
    Db(tokio_postgres::Error),
    Ledger(LedgerError),
}

impl From<tokio_postgres::Error> for MigrateError {
    fn from(e: tokio_postgres::Error) -> Self {
        MigrateError::Db(e)
    }
}

/// Creates or migrates the schema in one transaction, holding an advisory lock keyed by the schema so that
/// replicas starting together do not race.
async fn migrate(client: &mut Client) -> Result<(), MigrateError> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('partner-bridge-ledger:' || coalesce(current_schema(), '')))",
        &[],
    )
    .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS ledger_meta (key TEXT NOT NULL PRIMARY KEY, value TEXT NOT NULL)")
        .await?;
    let version: i64 = match tx
        .query_opt(
            "SELECT value FROM ledger_meta WHERE key = 'schema_version'",
            &[],
        )
        .await?
    {
        None => 0,
        Some(row) => {
            let text: String = row.try_get(0)?;
            text.parse().map_err(|_| {
                MigrateError::Ledger(LedgerError::Corrupt(format!(
                    "schema_version is not a number: {text:?}"
                )))
            })?
        }
    };
    if version > SCHEMA_VERSION {
        return Err(MigrateError::Ledger(LedgerError::Open(format!(
            "ledger schema version {version} is newer than this binary's ({SCHEMA_VERSION}); upgrade partner-bridge"
        ))));
    }
    if version < 1 {
        tx.batch_execute(SCHEMA_V1).await?;
    }
    if version < 2 {
        tx.batch_execute(SCHEMA_V2).await?;
    }
    if version < 3 {
        tx.batch_execute(SCHEMA_V3).await?;
    }
    // Later versions add `if version < N { … }` steps here.
    if version < SCHEMA_VERSION {
        tx.execute(
            "INSERT INTO ledger_meta (key, value) VALUES ('schema_version', $1)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&SCHEMA_VERSION.to_string()],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// A row could not be read: a driver error, or a value the ledger does not understand.
enum RowError {
    Db(tokio_postgres::Error),
    Ledger(LedgerError),
}

impl From<tokio_postgres::Error> for RowError {
    fn from(e: tokio_postgres::Error) -> Self {
        RowError::Db(e)
    }
}

impl From<LedgerError> for RowError {
    fn from(e: LedgerError) -> Self {
        RowError::Ledger(e)
    }
}

/// The completed share record in columns `SHARE_COLUMNS` (0..9), if the row holds one.
fn share_record(row: &Row, s: &str, p: &str) -> Result<Option<ShareRecord>, RowError> {
    let Some(message_id) = row.try_get::<_, Option<String>>(0)? else {
        return Ok(None);
    };
    let time = |i: usize, column: &str| -> Result<DateTime<Utc>, RowError> {
        Ok(from_millis(
            required(row.try_get::<_, Option<i64>>(i)?, column)?,
            column,
        )?)
    };
    Ok(Some(ShareRecord {
        source_session_id: s.to_string(),
        partner_application_id: p.to_string(),
        message_id,
        event_id: required(row.try_get(1)?, "event_id")?,
        session_kind: parse_kind(&required::<String>(row.try_get(2)?, "session_kind")?)?,
        status: required(row.try_get(3)?, "status")?,
        vendor_data: row.try_get(4)?,
        occurred_at: time(5, "occurred_at")?,
        minted_at: time(6, "minted_at")?,
        expires_at: time(7, "expires_at")?,
        reshares: to_u32(row.try_get(8)?, "reshares")?,
    }))
}

/// The recorded import in columns `IMPORT_COLUMNS` (0..8), if the row holds one.
fn import_record(row: &Row, i: &str, s: &str) -> Result<Option<ImportRecord>, RowError> {
    let Some(imported_at) = row.try_get::<_, Option<i64>>(6)? else {
        return Ok(None);
    };
    Ok(Some(ImportRecord {
        issuer_application_id: i.to_string(),
        source_session_id: s.to_string(),
        imported_session_id: row.try_get(0)?,
        session_number: row.try_get(1)?,
        status: row.try_get(2)?,
        session_kind: parse_kind(&required::<String>(row.try_get(3)?, "session_kind")?)?,
        vendor_data: row.try_get(4)?,
        trust_review: required(row.try_get(5)?, "trust_review")?,
        imported_at: from_millis(imported_at, "imported_at")?,
        result_published: row.try_get(7)?,
    }))
}

/// The lease in columns `first` (holder) and `first + 1` (until).
fn lease_from(row: &Row, first: usize) -> Result<Option<Lease>, RowError> {
    Ok(lease_of(row.try_get(first)?, row.try_get(first + 1)?)?)
}
