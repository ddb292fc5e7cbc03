//! The embedded ledger: one SQLite file in WAL mode, usually `<state_dir>/ledger.sqlite3`.
//!
//! All SQLite work happens on one dedicated thread that owns the only connection; async callers send it jobs over
//! a bounded channel and await the answer, so no tokio worker ever blocks on disk. The thread drains whatever jobs
//! are waiting (up to [`MAX_BATCH`]) and runs them in one `BEGIN IMMEDIATE` transaction, each inside its own
//! savepoint (one failing job rolls back alone), then commits once and only then answers every job of the batch.
//! Group commit is what lets many concurrent handlers claim and complete thousands of keys per second on two cores
//! without a pool, and it makes the occasional synced commit (below) cheap.
//!
//! Durability: `journal_mode=WAL` with `synchronous=NORMAL`. A commit in that mode is not fsynced; a power loss (not a
//! process crash — the OS still has the pages) can lose the last transactions, but never corrupts the file. Losing
//! an issuer row, a lease, a reshare count, a webhook key or a "result published" flag costs at most one repeated
//! action: an extra mint (which the receiver's ledger absorbs), a repeated `import.result`, one more reshare, a
//! replayed webhook within its 300 s window (which becomes a duplicate event, absorbed the same way). Losing a
//! receiver's import row is different: it is the last line of defence against a second import of the same person
//! into the same application (Didit's own duplicate check is not documented to cover a fresh token), and so is
//! losing an import intent. So a batch that contains an import completion or an intent runs with `synchronous=FULL`, which syncs the WAL — and with it every earlier
//! commit — before [`SqliteLedger::complete_import`] returns. Imports are bounded by Didit's rate limit, and group
//! commit shares one sync among all completions waiting at that moment, so this costs little.
//!
//! Schema version: `PRAGMA user_version`, created or migrated when the ledger opens; a file from a newer binary is
//! refused rather than misread.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, ErrorCode, OptionalExtension, Row, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use super::{
    Claim, DeliveryClaim, ImportIntent, ImportRecord, IntentClaim, Lease, LeaseKey, LedgerError,
    ShareRecord, decide_import, decide_intent, decide_share, decide_webhook, from_millis, millis,
    parse_kind, to_u32,
};

/// The schema this binary writes.
pub const SCHEMA_VERSION: i64 = 3;

/// The most jobs committed in one transaction.
pub const MAX_BATCH: usize = 256;

/// How long a write waits for another process's lock before failing with [`LedgerError::Io`].
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Jobs waiting for the writer thread; senders wait (asynchronously) when it is full.
const QUEUE_DEPTH: usize = 4096;

/// Version 1, as released (public so that tests can build a v1 file and check that it migrates). The same tables and columns as the PostgreSQL backend. A share or import row exists as soon as its key
/// is claimed; it holds a completed record once `message_id` (shares) or `imported_at` (imports) is set.
pub const SCHEMA_V1: &str = "
CREATE TABLE shares (
    source_session_id      TEXT    NOT NULL,
    partner_application_id TEXT    NOT NULL,
    message_id             TEXT,
    event_id               TEXT,
    session_kind           TEXT,
    status                 TEXT,
    vendor_data            TEXT,
    occurred_at            INTEGER,
    minted_at              INTEGER,
    expires_at             INTEGER,
    reshares               INTEGER NOT NULL DEFAULT 0,
    lease_holder           TEXT,
    lease_until            INTEGER,
    touched_at             INTEGER NOT NULL,
    PRIMARY KEY (source_session_id, partner_application_id)
) WITHOUT ROWID;
CREATE INDEX shares_touched_at ON shares (touched_at);
CREATE TABLE imports (
    issuer_application_id  TEXT    NOT NULL,
    source_session_id      TEXT    NOT NULL,
    imported_session_id    TEXT,
    session_number         INTEGER,
    status                 TEXT,
    session_kind           TEXT,
    vendor_data            TEXT,
    trust_review           INTEGER,
    imported_at            INTEGER,
    result_published       INTEGER NOT NULL DEFAULT 0,
    reshares               INTEGER NOT NULL DEFAULT 0,
    lease_holder           TEXT,
    lease_until            INTEGER,
    touched_at             INTEGER NOT NULL,
    PRIMARY KEY (issuer_application_id, source_session_id)
) WITHOUT ROWID;
CREATE INDEX imports_touched_at ON imports (touched_at);
CREATE TABLE webhook_deliveries (
    key     TEXT    NOT NULL PRIMARY KEY,
    seen_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX webhook_deliveries_seen_at ON webhook_deliveries (seen_at);
CREATE TABLE ledger_meta (
    key   TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
";

/// Version 2, applied after [`SCHEMA_V1`] (on a fresh file too). Every helper's block is one `-- <task>:` section.
const SCHEMA_V2: &str = "
-- webhook-intake: a delivery key is pending (held by one attempt until lease_until) until its event is confirmed,
-- then final (confirmed = 1). Keys written by version 1 cannot tell a confirmed event from a crash before the
-- confirm, so they migrate as pending without a holder: a retry of their delivery publishes again (the share
-- ledger absorbs the duplicate) instead of being lost.
ALTER TABLE webhook_deliveries ADD COLUMN confirmed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE webhook_deliveries ADD COLUMN lease_holder TEXT;
ALTER TABLE webhook_deliveries ADD COLUMN lease_until INTEGER;
-- receiver-import-intent: the import intent (token digest, envelope, holder, vendor_data sent, first attempt),
-- written before Didit is called and cleared when the import is recorded or known not to have happened.
ALTER TABLE imports ADD COLUMN intent_digest TEXT;
ALTER TABLE imports ADD COLUMN intent_message_id TEXT;
ALTER TABLE imports ADD COLUMN intent_holder TEXT;
ALTER TABLE imports ADD COLUMN intent_vendor_data TEXT;
ALTER TABLE imports ADD COLUMN intent_at INTEGER;
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
    lane        INTEGER NOT NULL DEFAULT 0,
    next_offset INTEGER NOT NULL DEFAULT 0,
    started_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE TABLE IF NOT EXISTS backfill_sent (
    run_key    TEXT    NOT NULL,
    session_id TEXT    NOT NULL,
    sent_at    INTEGER NOT NULL,
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

/// The SQLite backend. Clones share the one writer thread, which ends when the last clone is dropped.
#[derive(Clone)]
pub struct SqliteLedger {
    jobs: mpsc::Sender<Box<dyn Job>>,
    path: Arc<PathBuf>,
    /// How long one call may take (see [`super::Ledger`]'s dispatch).
    timeout: Duration,
}

impl std::fmt::Debug for SqliteLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteLedger")
            .field("path", &self.path)
            .finish()
    }
}

/// One unit of work for the writer thread: run inside a savepoint, answer after the commit.
trait Job: Send {
    /// Whether the batch holding this job must be synced to disk before answering.
    fn durable(&self) -> bool;
    /// Runs the job; `false` when it failed (its savepoint is rolled back).
    fn run(&mut self, conn: &Connection) -> bool;
    /// Answers the caller: the job's own result, or `batch_error` when the transaction as a whole failed.
    fn answer(self: Box<Self>, batch_error: Option<&LedgerError>);
}

struct Pending<T, F> {
    work: Option<F>,
    result: Option<Result<T, LedgerError>>,
    reply: oneshot::Sender<Result<T, LedgerError>>,
    durable: bool,
}

impl<T, F> Job for Pending<T, F>
where
    T: Send,
    F: FnOnce(&Connection) -> Result<T, LedgerError> + Send,
{
    fn durable(&self) -> bool {
        self.durable
    }

    fn run(&mut self, conn: &Connection) -> bool {
        let work = self.work.take().expect("a job runs once");
        let result = work(conn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, batch_error: Option<&LedgerError>) {
        let answer = match (self.result, batch_error) {
            // The job's own failure is the more precise reason, whatever happened to the batch.
            (Some(Err(e)), _) => Err(e),
            (_, Some(e)) => Err(e.clone()),
            (Some(Ok(value)), None) => Ok(value),
            (None, None) => Err(LedgerError::Io("the ledger job was not run".into())),
        };
        // The caller may have gone away (cancelled); the work is committed either way.
        let _ = self.reply.send(answer);
    }
}

/// Maps a SQLite error: damage is [`LedgerError::Corrupt`], the rest (full disk, read-only, locked) is transient.
pub(crate) fn db_error(e: rusqlite::Error) -> LedgerError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) =>
        {
            LedgerError::Corrupt(e.to_string())
        }
        rusqlite::Error::FromSqlConversionFailure(..) | rusqlite::Error::InvalidColumnType(..) => {
            LedgerError::Corrupt(e.to_string())
        }
        _ => LedgerError::Io(e.to_string()),
    }
}

impl SqliteLedger {
    /// Opens (creating directories and the file when missing) the ledger at `path` and prepares its schema.
    pub async fn open(path: &Path) -> Result<SqliteLedger, LedgerError> {
        let path = path.to_path_buf();
        let (jobs, queue) = mpsc::channel::<Box<dyn Job>>(QUEUE_DEPTH);
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread_path = path.clone();
        std::thread::Builder::new()
            .name("pb-ledger-sqlite".into())
            .spawn(move || match open_connection(&thread_path) {
                Ok(conn) => {
                    let _ = ready_tx.send(Ok(()));
                    writer_loop(conn, queue);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| LedgerError::Open(format!("cannot start the ledger thread: {e}")))?;
        ready_rx
            .await
            .map_err(|_| LedgerError::Open("the ledger thread stopped while opening".into()))??;
        Ok(SqliteLedger {
            jobs,
            path: Arc::new(path),
            timeout: super::DEFAULT_TIMEOUT,
        })
    }

    /// The same ledger, its calls bounded by `timeout` instead.
    pub fn with_timeout(mut self, timeout: Duration) -> SqliteLedger {
        self.timeout = timeout;
        self
    }

    /// How long one call may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on the writer thread and waits for its commit.
    async fn call<T, F>(&self, durable: bool, work: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, LedgerError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Pending {
            work: Some(work),
            result: None,
            reply,
            durable,
        });
        self.jobs
            .send(job)
            .await
            .map_err(|_| LedgerError::Io("the ledger thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| LedgerError::Io("the ledger thread stopped before answering".into()))?
    }

    /// Runs `work` on the writer thread, in the same group-committed transactions as the ledger's own jobs (the
    /// audit log uses this: one more insert per act, batched with the ledger's writes). `durable` syncs the batch
    /// to disk before answering, like an import completion.
    pub(crate) async fn run<T, F>(&self, durable: bool, work: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, LedgerError> + Send + 'static,
    {
        self.call(durable, work).await
    }

    /// See [`super::Ledger::void_leases_of_previous_run`].
    pub async fn void_all_leases(&self) -> Result<u64, LedgerError> {
        self.call(false, |conn| {
            let mut n = 0;
            for table in ["shares", "imports", "webhook_deliveries"] {
                n += conn
                    .execute(
                        &format!(
                            "UPDATE {table} SET lease_holder = NULL, lease_until = NULL WHERE lease_holder IS NOT NULL"
                        ),
                        [],
                    )
                    .map_err(db_error)? as u64;
            }
            Ok(n)
        })
        .await
    }

    /// See [`super::Ledger::check_writable`].
    pub async fn check_writable(&self) -> Result<(), LedgerError> {
        self.call(false, |conn| {
            conn.prepare_cached(
                "INSERT INTO ledger_meta (key, value) VALUES ('writable_probe', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .and_then(|mut st| st.execute(params![Utc::now().to_rfc3339()]))
            .map_err(db_error)?;
            Ok(())
        })
        .await
        // `/readyz` shows this text: name the file an operator must look at.
        .map_err(|e| match e {
            LedgerError::Io(text) => LedgerError::Io(format!("{}: {text}", self.path.display())),
            other => other,
        })
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
        let (s, p, h) = (
            source_session_id.to_string(),
            partner_application_id.to_string(),
            holder.to_string(),
        );
        let stale = stale_message_id.map(str::to_string);
        self.call(false, move |conn| {
            let (record, current) = read_share(conn, &s, &p)?;
            let claim = decide_share(record, current.as_ref(), &h, now, min_validity, stale.as_deref());
            if matches!(claim, Claim::Acquired { .. }) {
                conn.prepare_cached(
                    "INSERT INTO shares (source_session_id, partner_application_id, lease_holder, lease_until, touched_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (source_session_id, partner_application_id) DO UPDATE SET
                         lease_holder = excluded.lease_holder, lease_until = excluded.lease_until,
                         touched_at = excluded.touched_at",
                )
                .and_then(|mut st| st.execute(params![s, p, h, millis(super::after(now, lease)), millis(now)]))
                .map_err(db_error)?;
            }
            Ok(claim)
        })
        .await
    }

    /// See [`super::Ledger::complete_share`].
    pub async fn complete_share(
        &self,
        record: &ShareRecord,
        holder: &str,
    ) -> Result<(), LedgerError> {
        let r = record.clone();
        let h = holder.to_string();
        self.call(false, move |conn| {
            conn.prepare_cached(
                "INSERT INTO shares (source_session_id, partner_application_id, message_id, event_id, session_kind,
                     status, vendor_data, occurred_at, minted_at, expires_at, reshares, touched_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                 ON CONFLICT (source_session_id, partner_application_id) DO UPDATE SET
                     message_id = excluded.message_id, event_id = excluded.event_id,
                     session_kind = excluded.session_kind, status = excluded.status,
                     vendor_data = excluded.vendor_data, occurred_at = excluded.occurred_at,
                     minted_at = excluded.minted_at, expires_at = excluded.expires_at,
                     reshares = excluded.reshares, touched_at = excluded.touched_at,
                     lease_until = CASE WHEN lease_holder = ?13 THEN NULL ELSE lease_until END,
                     lease_holder = CASE WHEN lease_holder = ?13 THEN NULL ELSE lease_holder END",
            )
            .and_then(|mut st| {
                st.execute(params![
                    r.source_session_id,
                    r.partner_application_id,
                    r.message_id,
                    r.event_id,
                    r.session_kind.as_str(),
                    r.status,
                    r.vendor_data,
                    millis(r.occurred_at),
                    millis(r.minted_at),
                    millis(r.expires_at),
                    i64::from(r.reshares),
                    millis(Utc::now()),
                    h,
                ])
            })
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    /// See [`super::Ledger::release_share`].
    pub async fn release_share(
        &self,
        source_session_id: &str,
        partner_application_id: &str,
        holder: &str,
    ) -> Result<(), LedgerError> {
        let (s, p, h) = (
            source_session_id.to_string(),
            partner_application_id.to_string(),
            holder.to_string(),
        );
        self.call(false, move |conn| {
            // A row that only ever held this lease goes away entirely; a completed one keeps its record.
            conn.prepare_cached(
                "DELETE FROM shares WHERE source_session_id = ?1 AND partner_application_id = ?2
                     AND lease_holder = ?3 AND message_id IS NULL",
            )
            .and_then(|mut st| st.execute(params![s, p, h]))
            .map_err(db_error)?;
            conn.prepare_cached(
                "UPDATE shares SET lease_holder = NULL, lease_until = NULL, touched_at = ?4
                 WHERE source_session_id = ?1 AND partner_application_id = ?2 AND lease_holder = ?3",
            )
            .and_then(|mut st| st.execute(params![s, p, h, millis(Utc::now())]))
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    /// See [`super::Ledger::share`].
    pub async fn share(
        &self,
        source_session_id: &str,
        partner_application_id: &str,
    ) -> Result<Option<ShareRecord>, LedgerError> {
        let (s, p) = (
            source_session_id.to_string(),
            partner_application_id.to_string(),
        );
        self.call(false, move |conn| Ok(read_share(conn, &s, &p)?.0))
            .await
    }

    /// See [`super::Ledger::renew`].
    pub async fn renew(
        &self,
        key: &LeaseKey,
        holder: &str,
        until: DateTime<Utc>,
    ) -> Result<bool, LedgerError> {
        let sql = match key {
            LeaseKey::Share { .. } => {
                "UPDATE shares SET lease_until = ?4
                 WHERE source_session_id = ?1 AND partner_application_id = ?2 AND lease_holder = ?3"
            }
            LeaseKey::Import { .. } => {
                "UPDATE imports SET lease_until = ?4
                 WHERE issuer_application_id = ?1 AND source_session_id = ?2 AND lease_holder = ?3"
            }
        };
        let (a, b) = key.columns();
        let (a, b, h) = (a.to_string(), b.to_string(), holder.to_string());
        self.call(false, move |conn| {
            conn.prepare_cached(sql)
                .and_then(|mut st| st.execute(params![a, b, h, millis(until)]))
                .map(|n| n > 0)
                .map_err(db_error)
        })
        .await
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
        let (i, s, h) = (
            issuer_application_id.to_string(),
            source_session_id.to_string(),
            holder.to_string(),
        );
        self.call(false, move |conn| {
            let (record, current) = read_import(conn, &i, &s)?;
            let claim = decide_import(record, current.as_ref(), &h, now);
            if matches!(claim, Claim::Acquired { .. }) {
                conn.prepare_cached(
                    "INSERT INTO imports (issuer_application_id, source_session_id, lease_holder, lease_until, touched_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (issuer_application_id, source_session_id) DO UPDATE SET
                         lease_holder = excluded.lease_holder, lease_until = excluded.lease_until,
                         touched_at = excluded.touched_at",
                )
                .and_then(|mut st| st.execute(params![i, s, h, millis(super::after(now, lease)), millis(now)]))
                .map_err(db_error)?;
            }
            Ok(claim)
        })
        .await
    }

    /// See [`super::Ledger::complete_import`]. Synced to disk before it returns.
    pub async fn complete_import(
        &self,
        record: &ImportRecord,
        holder: &str,
    ) -> Result<(), LedgerError> {
        let r = record.clone();
        let h = holder.to_string();
        self.call(true, move |conn| {
            conn.prepare_cached(
                "INSERT INTO imports (issuer_application_id, source_session_id, imported_session_id, session_number,
                     status, session_kind, vendor_data, trust_review, imported_at, result_published, touched_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (issuer_application_id, source_session_id) DO UPDATE SET
                     imported_session_id = excluded.imported_session_id,
                     session_number = excluded.session_number, status = excluded.status,
                     session_kind = excluded.session_kind, vendor_data = excluded.vendor_data,
                     trust_review = excluded.trust_review, imported_at = excluded.imported_at,
                     result_published = (result_published OR excluded.result_published),
                     touched_at = excluded.touched_at, reshares = 0,
                     intent_digest = NULL, intent_message_id = NULL, intent_holder = NULL,
                     intent_vendor_data = NULL, intent_at = NULL,
                     lease_until = CASE WHEN lease_holder = ?12 THEN NULL ELSE lease_until END,
                     lease_holder = CASE WHEN lease_holder = ?12 THEN NULL ELSE lease_holder END",
            )
            .and_then(|mut st| {
                st.execute(params![
                    r.issuer_application_id,
                    r.source_session_id,
                    r.imported_session_id,
                    r.session_number,
                    r.status,
                    r.session_kind.as_str(),
                    r.vendor_data,
                    r.trust_review,
                    millis(r.imported_at),
                    r.result_published,
                    millis(Utc::now()),
                    h,
                ])
            })
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    /// See [`super::Ledger::release_import`].
    pub async fn release_import(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
        holder: &str,
    ) -> Result<(), LedgerError> {
        let (i, s, h) = (
            issuer_application_id.to_string(),
            source_session_id.to_string(),
            holder.to_string(),
        );
        self.call(false, move |conn| {
            // Keep a row that carries an import, an intent or a reshare count; drop one that only ever held this
            // lease.
            conn.prepare_cached(
                "DELETE FROM imports WHERE issuer_application_id = ?1 AND source_session_id = ?2
                     AND lease_holder = ?3 AND imported_at IS NULL AND intent_digest IS NULL AND reshares = 0",
            )
            .and_then(|mut st| st.execute(params![i, s, h]))
            .map_err(db_error)?;
            conn.prepare_cached(
                "UPDATE imports SET lease_holder = NULL, lease_until = NULL, touched_at = ?4
                 WHERE issuer_application_id = ?1 AND source_session_id = ?2 AND lease_holder = ?3",
            )
            .and_then(|mut st| st.execute(params![i, s, h, millis(Utc::now())]))
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    /// See [`super::Ledger::begin_import`]. Synced to disk before it returns, like an import completion.
    pub async fn begin_import(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
        intent: &ImportIntent,
    ) -> Result<IntentClaim, LedgerError> {
        let (i, s) = (
            issuer_application_id.to_string(),
            source_session_id.to_string(),
        );
        let n = intent.clone();
        self.call(true, move |conn| {
            let (record, _) = read_import(conn, &i, &s)?;
            let current = read_intent(conn, &i, &s)?;
            let claim = decide_intent(record, current.as_ref(), &n.token_digest);
            if matches!(claim, IntentClaim::Recorded { .. }) {
                // A replay of the same token keeps the first attempt's time and vendor_data: those are what Didit
                // saw if that attempt reached it.
                conn.prepare_cached(
                    "INSERT INTO imports (issuer_application_id, source_session_id, intent_digest, intent_message_id,
                         intent_holder, intent_vendor_data, intent_at, touched_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (issuer_application_id, source_session_id) DO UPDATE SET
                         intent_vendor_data = CASE WHEN intent_digest IS NULL THEN excluded.intent_vendor_data
                                                   ELSE intent_vendor_data END,
                         intent_at = CASE WHEN intent_digest IS NULL THEN excluded.intent_at ELSE intent_at END,
                         intent_digest = excluded.intent_digest, intent_message_id = excluded.intent_message_id,
                         intent_holder = excluded.intent_holder, touched_at = excluded.touched_at",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        i,
                        s,
                        n.token_digest,
                        n.message_id,
                        n.holder,
                        n.vendor_data,
                        millis(n.at),
                        millis(Utc::now()),
                    ])
                })
                .map_err(db_error)?;
            }
            Ok(claim)
        })
        .await
    }

    /// See [`super::Ledger::abandon_import_intent`].
    pub async fn abandon_import_intent(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
        token_digest: &str,
    ) -> Result<(), LedgerError> {
        let (i, s, d) = (
            issuer_application_id.to_string(),
            source_session_id.to_string(),
            token_digest.to_string(),
        );
        self.call(false, move |conn| {
            conn.prepare_cached(
                "UPDATE imports SET intent_digest = NULL, intent_message_id = NULL, intent_holder = NULL,
                     intent_vendor_data = NULL, intent_at = NULL, touched_at = ?4
                 WHERE issuer_application_id = ?1 AND source_session_id = ?2 AND intent_digest = ?3",
            )
            .and_then(|mut st| st.execute(params![i, s, d, millis(Utc::now())]))
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    /// See [`super::Ledger::import_intent`].
    pub async fn import_intent(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<Option<ImportIntent>, LedgerError> {
        let (i, s) = (
            issuer_application_id.to_string(),
            source_session_id.to_string(),
        );
        self.call(false, move |conn| read_intent(conn, &i, &s))
            .await
    }

    /// See [`super::Ledger::mark_result_published`].
    pub async fn mark_result_published(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<(), LedgerError> {
        let (i, s) = (
            issuer_application_id.to_string(),
            source_session_id.to_string(),
        );
        self.call(false, move |conn| {
            conn.prepare_cached(
                "UPDATE imports SET result_published = 1, touched_at = ?3
                 WHERE issuer_application_id = ?1 AND source_session_id = ?2 AND imported_at IS NOT NULL",
            )
            .and_then(|mut st| st.execute(params![i, s, millis(Utc::now())]))
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    /// See [`super::Ledger::import`].
    pub async fn import(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<Option<ImportRecord>, LedgerError> {
        let (i, s) = (
            issuer_application_id.to_string(),
            source_session_id.to_string(),
        );
        self.call(false, move |conn| Ok(read_import(conn, &i, &s)?.0))
            .await
    }

    /// See [`super::Ledger::reshares`].
    pub async fn reshares(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<u32, LedgerError> {
        let (i, s) = (
            issuer_application_id.to_string(),
            source_session_id.to_string(),
        );
        self.call(false, move |conn| {
            let n: Option<i64> = conn
                .prepare_cached(
                    "SELECT reshares FROM imports WHERE issuer_application_id = ?1 AND source_session_id = ?2",
                )
                .and_then(|mut st| st.query_row(params![i, s], |row| row.get(0)).optional())
                .map_err(db_error)?;
            to_u32(n.unwrap_or(0), "reshares")
        })
        .await
    }

    /// See [`super::Ledger::reset_reshares`].
    pub async fn reset_reshares(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<(), LedgerError> {
        let (i, s) = (
            issuer_application_id.to_string(),
            source_session_id.to_string(),
        );
        self.call(false, move |conn| {
            conn.prepare_cached(
                "UPDATE imports SET reshares = 0, touched_at = ?3
                 WHERE issuer_application_id = ?1 AND source_session_id = ?2 AND reshares <> 0",
            )
            .and_then(|mut st| st.execute(params![i, s, millis(Utc::now())]))
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    /// See [`super::Ledger::bump_reshares`].
    pub async fn bump_reshares(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<u32, LedgerError> {
        let (i, s) = (
            issuer_application_id.to_string(),
            source_session_id.to_string(),
        );
        self.call(false, move |conn| {
            let n: i64 = conn
                .prepare_cached(
                    "INSERT INTO imports (issuer_application_id, source_session_id, reshares, touched_at)
                     VALUES (?1, ?2, 1, ?3)
                     ON CONFLICT (issuer_application_id, source_session_id) DO UPDATE SET
                         reshares = reshares + 1, touched_at = excluded.touched_at
                     RETURNING reshares",
                )
                .and_then(|mut st| st.query_row(params![i, s, millis(Utc::now())], |row| row.get(0)))
                .map_err(db_error)?;
            to_u32(n, "reshares")
        })
        .await
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
        let (k, h) = (key.to_string(), holder.to_string());
        self.call(false, move |conn| {
            let row = conn
                .prepare_cached(
                    "SELECT confirmed, lease_holder, lease_until FROM webhook_deliveries WHERE key = ?1",
                )
                .and_then(|mut st| {
                    st.query_row(params![k], |row| {
                        Ok((
                            row.get::<_, bool>(0)?,
                            row.get::<_, Option<String>>(1)?,
                            row.get::<_, Option<i64>>(2)?,
                        ))
                    })
                    .optional()
                })
                .map_err(db_error)?;
            let row = match row {
                Some((confirmed, holder, until)) => Some((confirmed, lease_of(holder, until)?)),
                None => None,
            };
            let claim = decide_webhook(
                row.as_ref().map(|(c, l)| (*c, l.as_ref())),
                &h,
                now,
                first_sight,
            );
            let until = millis(super::after(now, lease));
            match claim {
                DeliveryClaim::Fresh => conn
                    .prepare_cached(
                        "INSERT INTO webhook_deliveries (key, seen_at, confirmed, lease_holder, lease_until)
                         VALUES (?1, ?2, 0, ?3, ?4)",
                    )
                    .and_then(|mut st| st.execute(params![k, millis(now), h, until])),
                DeliveryClaim::Retaken => conn
                    .prepare_cached(
                        "UPDATE webhook_deliveries SET lease_holder = ?2, lease_until = ?3 WHERE key = ?1",
                    )
                    .and_then(|mut st| st.execute(params![k, h, until])),
                _ => Ok(0),
            }
            .map_err(db_error)?;
            Ok(claim)
        })
        .await
    }

    /// See [`super::Ledger::confirm_webhook`].
    pub async fn confirm_webhook(&self, key: &str, now: DateTime<Utc>) -> Result<(), LedgerError> {
        let k = key.to_string();
        self.call(false, move |conn| {
            conn.prepare_cached(
                "INSERT INTO webhook_deliveries (key, seen_at, confirmed) VALUES (?1, ?2, 1)
                 ON CONFLICT (key) DO UPDATE SET confirmed = 1, lease_holder = NULL, lease_until = NULL",
            )
            .and_then(|mut st| st.execute(params![k, millis(now)]))
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    /// See [`super::Ledger::release_webhook`].
    pub async fn release_webhook(&self, key: &str, holder: &str) -> Result<(), LedgerError> {
        let (k, h) = (key.to_string(), holder.to_string());
        self.call(false, move |conn| {
            conn.prepare_cached(
                "DELETE FROM webhook_deliveries WHERE key = ?1 AND confirmed = 0 AND lease_holder = ?2",
            )
            .and_then(|mut st| st.execute(params![k, h]))
            .map_err(db_error)?;
            Ok(())
        })
        .await
    }

    /// See [`super::Ledger::prune`]. Deletes in chunks of [`PRUNE_CHUNK`] rows, one transaction each, so that
    /// claims keep flowing between them however much there is to prune.
    pub async fn prune(&self, older_than: DateTime<Utc>) -> Result<u64, LedgerError> {
        let cutoff = millis(older_than);
        let live_from = cutoff.min(millis(Utc::now()));
        let mut deleted = 0u64;
        for sql in [PRUNE_SHARES, PRUNE_IMPORTS, PRUNE_WEBHOOKS] {
            loop {
                let n = self
                    .call(false, move |conn| {
                        let mut st = conn.prepare_cached(sql).map_err(db_error)?;
                        st.execute(params![cutoff, live_from, PRUNE_CHUNK])
                            .map_err(db_error)
                    })
                    .await?;
                deleted += n as u64;
                if (n as i64) < PRUNE_CHUNK {
                    break;
                }
            }
        }
        Ok(deleted)
    }
}

/// Rows deleted per transaction while pruning.
pub const PRUNE_CHUNK: i64 = 2000;

const PRUNE_SHARES: &str =
    "DELETE FROM shares WHERE (source_session_id, partner_application_id) IN (
    SELECT source_session_id, partner_application_id FROM shares
    WHERE touched_at < ?1 AND (lease_holder IS NULL OR lease_until <= ?2) LIMIT ?3)";
/// Recorded imports and unresolved intents are never pruned: without them a later token for the same person would
/// be imported again. Abandoned claims and reshare counters age out like everything else.
const PRUNE_IMPORTS: &str =
    "DELETE FROM imports WHERE (issuer_application_id, source_session_id) IN (
    SELECT issuer_application_id, source_session_id FROM imports
    WHERE touched_at < ?1 AND imported_at IS NULL AND intent_digest IS NULL
      AND (lease_holder IS NULL OR lease_until <= ?2) LIMIT ?3)";
const PRUNE_WEBHOOKS: &str = "DELETE FROM webhook_deliveries WHERE key IN (
    SELECT key FROM webhook_deliveries
    WHERE seen_at < ?1 AND (lease_holder IS NULL OR lease_until <= ?2) LIMIT ?3)";

/// Opens the file with the pragmas this module's doc argues for, and creates or migrates the schema.
fn open_connection(path: &Path) -> Result<Connection, LedgerError> {
    let shown = path.display();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            LedgerError::Open(format!("cannot create directory {}: {e}", dir.display()))
        })?;
    }
    let open_error = |e: rusqlite::Error| LedgerError::Open(format!("{shown}: {e}"));
    let mut conn = Connection::open(path).map_err(open_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(open_error)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(LedgerError::Open(format!(
            "{shown}: journal_mode is {mode:?}, WAL is required (is the file system local?)"
        )));
    }
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(open_error)?;
    // Bounds the -wal file after a burst: it is truncated to this size at the next checkpoint.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)
        .map_err(open_error)?;
    // Every statement the ledger, the audit log and the transaction control use stays prepared (about 50).
    conn.set_prepared_statement_cache_capacity(128);
    migrate(&mut conn).map_err(|e| LedgerError::Open(format!("{shown}: {e}")))?;
    if conn.is_readonly("main").unwrap_or(false) {
        // SQLite falls back to read-only when the file is write-protected. Reads still answer; every write and
        // `check_writable` fail, so `/readyz` says why instead of the process refusing to start.
        tracing::warn!(path = %shown, "ledger file is read-only: nothing can be recorded until it is writable");
    }
    Ok(conn)
}

/// Brings the schema to [`SCHEMA_VERSION`] in one transaction.
fn migrate(conn: &mut Connection) -> Result<(), LedgerError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_error)?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(db_error)?;
    if version > SCHEMA_VERSION {
        return Err(LedgerError::Open(format!(
            "ledger schema version {version} is newer than this binary's ({SCHEMA_VERSION}); upgrade partner-bridge"
        )));
    }
    if version < 1 {
        tx.execute_batch(SCHEMA_V1).map_err(db_error)?;
    }
    if version < 2 {
        tx.execute_batch(SCHEMA_V2).map_err(db_error)?;
    }
    if version < 3 {
        tx.execute_batch(SCHEMA_V3).map_err(db_error)?;
    }
    // Later versions add `if version < N { … }` steps here.
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(db_error)?;
    }
    tx.commit().map_err(db_error)
}

/// The writer thread: batches waiting jobs into one transaction each, until every sender is gone.
fn writer_loop(conn: Connection, mut queue: mpsc::Receiver<Box<dyn Job>>) {
    let mut synced = false;
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let durable = batch.iter().any(|job| job.durable());
        // `synchronous` can only change outside a transaction; switch only when needed.
        if durable != synced {
            let level = if durable {
                "PRAGMA synchronous = FULL"
            } else {
                "PRAGMA synchronous = NORMAL"
            };
            if let Err(error) = exec_cached(&conn, level) {
                batch.into_iter().for_each(|job| job.answer(Some(&error)));
                continue;
            }
            synced = durable;
        }
        let outcome = run_batch(&conn, &mut batch);
        batch
            .into_iter()
            .for_each(|job| job.answer(outcome.as_ref().err()));
    }
}

/// Runs one statement without rows from the connection's statement cache. The transaction's own statements
/// (`BEGIN`, `SAVEPOINT`, `RELEASE`, `COMMIT`) run several times per batch: rusqlite's `Transaction` and `Savepoint`
/// parse them afresh each time, which cost the writer thread more than some of the jobs it wraps.
fn exec_cached(conn: &Connection, sql: &str) -> Result<(), LedgerError> {
    conn.prepare_cached(sql)
        .and_then(|mut statement| statement.raw_execute())
        .map(|_| ())
        .map_err(db_error)
}

/// Runs every job of a batch in one transaction, each in its own savepoint, and commits.
fn run_batch(conn: &Connection, batch: &mut [Box<dyn Job>]) -> Result<(), LedgerError> {
    exec_cached(conn, "BEGIN IMMEDIATE")?;
    let outcome = run_jobs(conn, batch).and_then(|()| exec_cached(conn, "COMMIT"));
    if outcome.is_err() && !conn.is_autocommit() {
        // Whatever failed, nothing of the batch stays half done (a failed COMMIT leaves the transaction open).
        let _ = exec_cached(conn, "ROLLBACK");
    }
    outcome
}

fn run_jobs(conn: &Connection, batch: &mut [Box<dyn Job>]) -> Result<(), LedgerError> {
    for job in batch.iter_mut() {
        exec_cached(conn, "SAVEPOINT pb_job")?;
        if !job.run(conn) {
            // A failed job's work rolls back alone, leaving the others' work intact.
            exec_cached(conn, "ROLLBACK TO pb_job")?;
        }
        exec_cached(conn, "RELEASE pb_job")?;
    }
    Ok(())
}

/// The share row for a key: its completed record, if any, and its lease, if any.
fn read_share(
    conn: &Connection,
    s: &str,
    p: &str,
) -> Result<(Option<ShareRecord>, Option<Lease>), LedgerError> {
    let row = conn
        .prepare_cached(
            "SELECT message_id, event_id, session_kind, status, vendor_data, occurred_at, minted_at, expires_at,
                    reshares, lease_holder, lease_until
             FROM shares WHERE source_session_id = ?1 AND partner_application_id = ?2",
        )
        .and_then(|mut st| st.query_row(params![s, p], |row| Ok(ShareColumns::read(row))).optional())
        .map_err(db_error)?;
    match row {
        None => Ok((None, None)),
        Some(columns) => columns?.into_parts(s, p),
    }
}

/// The raw columns of a share row, checked outside rusqlite's closure so that damage becomes [`LedgerError`].
struct ShareColumns {
    message_id: Option<String>,
    event_id: Option<String>,
    session_kind: Option<String>,
    status: Option<String>,
    vendor_data: Option<String>,
    occurred_at: Option<i64>,
    minted_at: Option<i64>,
    expires_at: Option<i64>,
    reshares: i64,
    lease_holder: Option<String>,
    lease_until: Option<i64>,
}

impl ShareColumns {
    fn read(row: &Row<'_>) -> Result<ShareColumns, LedgerError> {
        let get = |e: rusqlite::Error| db_error(e);
        Ok(ShareColumns {
            message_id: row.get(0).map_err(get)?,
            event_id: row.get(1).map_err(get)?,
            session_kind: row.get(2).map_err(get)?,
            status: row.get(3).map_err(get)?,
            vendor_data: row.get(4).map_err(get)?,
            occurred_at: row.get(5).map_err(get)?,
            minted_at: row.get(6).map_err(get)?,
            expires_at: row.get(7).map_err(get)?,
            reshares: row.get(8).map_err(get)?,
            lease_holder: row.get(9).map_err(get)?,
            lease_until: row.get(10).map_err(get)?,
        })
    }

    fn into_parts(
        self,
        s: &str,
        p: &str,
    ) -> Result<(Option<ShareRecord>, Option<Lease>), LedgerError> {
        let lease = lease_of(self.lease_holder, self.lease_until)?;
        let Some(message_id) = self.message_id else {
            return Ok((None, lease));
        };
        let record = ShareRecord {
            source_session_id: s.to_string(),
            partner_application_id: p.to_string(),
            message_id,
            event_id: required(self.event_id, "event_id")?,
            session_kind: parse_kind(&required(self.session_kind, "session_kind")?)?,
            status: required(self.status, "status")?,
            vendor_data: self.vendor_data,
            occurred_at: from_millis(required(self.occurred_at, "occurred_at")?, "occurred_at")?,
            minted_at: from_millis(required(self.minted_at, "minted_at")?, "minted_at")?,
            expires_at: from_millis(required(self.expires_at, "expires_at")?, "expires_at")?,
            reshares: to_u32(self.reshares, "reshares")?,
        };
        Ok((Some(record), lease))
    }
}

/// The import row for a key: its recorded import, if any, and its lease, if any.
fn read_import(
    conn: &Connection,
    i: &str,
    s: &str,
) -> Result<(Option<ImportRecord>, Option<Lease>), LedgerError> {
    let row = conn
        .prepare_cached(
            "SELECT imported_session_id, session_number, status, session_kind, vendor_data, trust_review,
                    imported_at, result_published, lease_holder, lease_until
             FROM imports WHERE issuer_application_id = ?1 AND source_session_id = ?2",
        )
        .and_then(|mut st| st.query_row(params![i, s], |row| Ok(ImportColumns::read(row))).optional())
        .map_err(db_error)?;
    match row {
        None => Ok((None, None)),
        Some(columns) => columns?.into_parts(i, s),
    }
}

struct ImportColumns {
    imported_session_id: Option<String>,
    session_number: Option<i64>,
    status: Option<String>,
    session_kind: Option<String>,
    vendor_data: Option<String>,
    trust_review: Option<bool>,
    imported_at: Option<i64>,
    result_published: bool,
    lease_holder: Option<String>,
    lease_until: Option<i64>,
}

impl ImportColumns {
    fn read(row: &Row<'_>) -> Result<ImportColumns, LedgerError> {
        let get = |e: rusqlite::Error| db_error(e);
        Ok(ImportColumns {
            imported_session_id: row.get(0).map_err(get)?,
            session_number: row.get(1).map_err(get)?,
            status: row.get(2).map_err(get)?,
            session_kind: row.get(3).map_err(get)?,
            vendor_data: row.get(4).map_err(get)?,
            trust_review: row.get(5).map_err(get)?,
            imported_at: row.get(6).map_err(get)?,
            result_published: row.get(7).map_err(get)?,
            lease_holder: row.get(8).map_err(get)?,
            lease_until: row.get(9).map_err(get)?,
        })
    }

    fn into_parts(
        self,
        i: &str,
        s: &str,
    ) -> Result<(Option<ImportRecord>, Option<Lease>), LedgerError> {
        let lease = lease_of(self.lease_holder, self.lease_until)?;
        let Some(imported_at) = self.imported_at else {
            return Ok((None, lease));
        };
        let record = ImportRecord {
            issuer_application_id: i.to_string(),
            source_session_id: s.to_string(),
            imported_session_id: self.imported_session_id,
            session_number: self.session_number,
            status: self.status,
            session_kind: parse_kind(&required(self.session_kind, "session_kind")?)?,
            vendor_data: self.vendor_data,
            trust_review: required(self.trust_review, "trust_review")?,
            imported_at: from_millis(imported_at, "imported_at")?,
            result_published: self.result_published,
        };
        Ok((Some(record), lease))
    }
}

/// The unresolved import intent of a key, if any.
fn read_intent(conn: &Connection, i: &str, s: &str) -> Result<Option<ImportIntent>, LedgerError> {
    type Columns = (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<i64>,
    );
    let row: Option<Columns> = conn
        .prepare_cached(
            "SELECT intent_digest, intent_message_id, intent_holder, intent_vendor_data, intent_at
             FROM imports WHERE issuer_application_id = ?1 AND source_session_id = ?2",
        )
        .and_then(|mut st| {
            st.query_row(params![i, s], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            })
            .optional()
        })
        .map_err(db_error)?;
    match row {
        Some((Some(token_digest), message_id, holder, vendor_data, at)) => Ok(Some(ImportIntent {
            token_digest,
            message_id: message_id.unwrap_or_default(),
            holder: holder.unwrap_or_default(),
            vendor_data,
            at: from_millis(required(at, "intent_at")?, "intent_at")?,
        })),
        _ => Ok(None),
    }
}

/// A lease from its two columns (both set, or both empty).
pub(crate) fn lease_of(
    holder: Option<String>,
    until: Option<i64>,
) -> Result<Option<Lease>, LedgerError> {
    match (holder, until) {
        (Some(holder), Some(until)) => Ok(Some(Lease {
            holder,
            until: from_millis(until, "lease_until")?,
        })),
        (None, None) => Ok(None),
        _ => Err(LedgerError::Corrupt(
            "a lease with a holder but no end, or an end but no holder".into(),
        )),
    }
}

/// A column a completed record must have.
pub(crate) fn required<T>(value: Option<T>, column: &str) -> Result<T, LedgerError> {
    value.ok_or_else(|| LedgerError::Corrupt(format!("completed row without `{column}`")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job for [`run_batch`]: inserts `value` into `t`, then fails when `fail` is set.
    fn insert(
        value: i64,
        fail: bool,
    ) -> (Box<dyn Job>, oneshot::Receiver<Result<(), LedgerError>>) {
        let (reply, answer) = oneshot::channel();
        let work = move |conn: &Connection| {
            conn.execute("INSERT INTO t (x) VALUES (?1)", params![value])
                .map_err(db_error)?;
            if fail {
                return Err(LedgerError::Io(format!(
                    "job {value} fails after its insert"
                )));
            }
            Ok(())
        };
        (pending(work, reply), answer)
    }

    /// A non-durable job running `work`, answering on `reply`.
    fn pending<F>(work: F, reply: oneshot::Sender<Result<(), LedgerError>>) -> Box<dyn Job>
    where
        F: FnOnce(&Connection) -> Result<(), LedgerError> + Send + 'static,
    {
        Box::new(Pending {
            work: Some(work),
            result: None,
            reply,
            durable: false,
        })
    }

    fn values(conn: &Connection) -> Vec<i64> {
        let mut statement = conn.prepare("SELECT x FROM t ORDER BY x").unwrap();
        statement
            .query_map([], |row| row.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn a_failing_job_rolls_back_alone_and_the_batch_commits_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_connection(&dir.path().join("ledger.sqlite3")).unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER NOT NULL)")
            .unwrap();
        for round in 0..3 {
            let (first, first_answer) = insert(round * 10 + 1, false);
            let (second, mut second_answer) = insert(round * 10 + 2, true);
            let (third, third_answer) = insert(round * 10 + 3, false);
            let mut batch = vec![first, second, third];
            run_batch(&conn, &mut batch).unwrap();
            assert!(conn.is_autocommit(), "the batch's transaction is closed");
            batch.into_iter().for_each(|job| job.answer(None));
            first_answer.blocking_recv().unwrap().unwrap();
            assert!(second_answer.try_recv().unwrap().is_err());
            third_answer.blocking_recv().unwrap().unwrap();
        }
        // The same cached statements served every round, and only the failing jobs' rows are missing.
        assert_eq!(values(&conn), vec![1, 3, 11, 13, 21, 23]);
    }

    #[test]
    fn a_batch_that_cannot_commit_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_connection(&dir.path().join("ledger.sqlite3")).unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER NOT NULL)")
            .unwrap();
        // A job that leaves a deferred foreign-key violation: the COMMIT fails, and the batch is rolled back.
        conn.execute_batch(
            "PRAGMA foreign_keys = ON;
             CREATE TABLE parent (id INTEGER PRIMARY KEY);
             CREATE TABLE child (p INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);",
        )
        .unwrap();
        let (ok, _ok_answer) = insert(1, false);
        let (reply, _answer) = oneshot::channel();
        let orphan = pending(
            |conn: &Connection| {
                conn.execute("INSERT INTO child (p) VALUES (42)", [])
                    .map(|_| ())
                    .map_err(db_error)
            },
            reply,
        );
        let mut batch = vec![ok, orphan];
        assert!(run_batch(&conn, &mut batch).is_err());
        assert!(
            conn.is_autocommit(),
            "the failed batch's transaction is rolled back"
        );
        assert_eq!(values(&conn), Vec::<i64>::new());
        // The connection goes on working.
        let (next, next_answer) = insert(7, false);
        let mut batch = vec![next];
        run_batch(&conn, &mut batch).unwrap();
        batch.into_iter().for_each(|job| job.answer(None));
        next_answer.blocking_recv().unwrap().unwrap();
        assert_eq!(values(&conn), vec![7]);
    }
}
