//! The idempotency ledger: what each side has already done, so that at-least-once delivery has exactly-once effect
//! (DESIGN.md §5).
//!
//! - Issuer side, key (source session, partner application): the last share token minted for that partner — its
//!   envelope's message id and expiry. A duplicate or redelivered onboarding event within the token's lifetime is
//!   acked without minting again.
//! - Receiver side, key (issuer application, source session): the import Didit made, forever (import rows are never
//!   pruned: a pruned row would let a later token import the person a second time), the count of reshare
//!   requests sent for that session, and the import *intent*: the token (by digest) about to be sent to Didit,
//!   written before the call and kept until the import is recorded or known not to have happened
//!   ([`Ledger::begin_import`]). The intent outlives leases (a crash, [`Ledger::void_leases_of_previous_run`]), so
//!   whoever handles the session next knows an import may have happened without a row.
//! - Webhook delivery keys, one per Didit event: *pending* (held by one attempt, with a lease) from the moment a
//!   delivery is taken in until the broker confirms its event, then *final*. A key is final only once its event is
//!   confirmed, so a process that dies in between leaves a pending key that the same delivery, retried by Didit,
//!   takes over ([`Ledger::claim_webhook`]).
//!
//! Duplicates can be handled concurrently (prefetch, several replicas), so a read-then-write is not enough: a key is
//! first *claimed* with a lease ([`Ledger::claim_share`], [`Ledger::claim_import`]), the Didit call happens, and the
//! key is then *completed* (the record is written and the lease cleared) or *released* (the lease is cleared, the
//! work was not done). A lease that expired (its holder crashed) can be taken by anyone. A holder that lost its lease
//! and completes anyway still writes its record — the Didit call has happened and its result is the truth — but never
//! clears another holder's lease; a release by a non-holder changes nothing.
//!
//! Leases are short (`ledger.lease_ms`, seconds) and kept alive while their work lives ([`Ledger::keep_alive`]
//! renews one every third of its length), so a live handler keeps its key through long backoffs while a dead
//! replica's keys move to the others within one lease.
//!
//! A `holder` names one attempt at the work, not a process: use a fresh id per handling (a UUID, or the replica's
//! name plus the delivery's message id and attempt). A holder may re-claim its own lease — that is what makes a
//! retried claim harmless — so two concurrent handlers sharing a holder would both be let in.
//!
//! Two backends with the same schema and the same rules: embedded SQLite in WAL mode ([`sqlite`], the default, under
//! `state_dir`) and PostgreSQL ([`postgres`], for several replicas sharing one ledger). Times are stored as unix
//! milliseconds, so records read back carry millisecond precision. "Now" for leases and validity comes from the
//! caller (`now` arguments) so that the rules are testable; "last touched" times written by completions, releases and
//! counters come from the wall clock.
//!
//! This module knows nothing of queues, Didit or pipelines: it remembers, and the pipelines decide.

pub mod backfill;
pub mod notices;
pub mod pg_tls;
pub mod postgres;
pub mod sqlite;

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

use crate::didit::wire::SessionKind;
use crate::secret::SecretUrl;

pub use notices::{AckRecorded, ReceivedNotice, SentNotice};
pub use pg_tls::{PgTlsSettings, SslMode};
pub use postgres::PostgresLedger;
pub use sqlite::SqliteLedger;

/// Why a ledger operation failed. Texts carry ids and paths at most, never a password or a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// The ledger could not be opened or its schema prepared (bad URL, unreachable server, unwritable directory,
    /// a schema newer than this binary). Fatal at startup: the process cannot guarantee idempotency without it.
    #[error("cannot open the ledger: {0}")]
    Open(String),
    /// A read or write failed (disk full, read-only file, database locked too long, connection lost). Transient:
    /// the message that needed the ledger must not be acked; the pipeline pauses until the ledger answers again
    /// (see [`LedgerError::is_unavailable`]).
    #[error("ledger I/O failed: {0}")]
    Io(String),
    /// The ledger did not answer within its time limit (`ledger.timeout_ms`): a hung server, a frozen network, a
    /// file locked by another process. Transient, like [`LedgerError::Io`]; the pipelines pause on both.
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
    /// A stored row could not be understood (unknown session kind, a time out of range, a damaged file). An operator
    /// must look: retrying will not help.
    #[error("ledger data is corrupt: {0}")]
    Corrupt(String),
}

impl LedgerError {
    /// What a pipeline should do with the message that hit this error: `true` when retrying later can succeed (keep
    /// the message, retry with backoff), `false` when it cannot (stop and tell an operator: `/readyz` fails).
    pub fn is_retryable(&self) -> bool {
        matches!(self, LedgerError::Io(_) | LedgerError::Unavailable(_))
    }

    /// Whether the fault is the ledger's, not the message's: the ledger cannot be read or written right now. A
    /// pipeline that hits this pauses (the message waits without using up an attempt) until the ledger answers its
    /// probe again, instead of burning delivery attempts and dead-lettering work that is perfectly fine.
    pub fn is_unavailable(&self) -> bool {
        self.is_retryable()
    }
}

/// How long one ledger call may take by default (`ledger.timeout_ms`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs one backend call under `limit`. `on_timeout` lets the backend drop a connection that stopped answering, so
/// that the next call reconnects instead of queueing behind it.
async fn bounded<T>(
    op: &'static str,
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, LedgerError>>,
    on_timeout: impl FnOnce(),
) -> Result<T, LedgerError> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => {
            on_timeout();
            Err(LedgerError::Unavailable(format!(
                "no answer to {op} within {} ms",
                limit.as_millis()
            )))
        }
    }
}

/// Issuer side: the last share token minted for a partner, key (`source_session_id`, `partner_application_id`).
#[derive(Debug, Clone, PartialEq)]
pub struct ShareRecord {
    /// The issuer's Didit session.
    pub source_session_id: String,
    /// The partner's Didit application.
    pub partner_application_id: String,
    /// The `share_token` envelope's message id.
    pub message_id: String,
    /// The onboarding event that caused the mint.
    pub event_id: String,
    /// `user` or `business`.
    pub session_kind: SessionKind,
    /// The source session's status when shared.
    pub status: String,
    /// The issuer's `vendor_data`, when known.
    pub vendor_data: Option<String>,
    /// When the verification finished.
    pub occurred_at: DateTime<Utc>,
    /// When the token was minted.
    pub minted_at: DateTime<Utc>,
    /// When the token stops working.
    pub expires_at: DateTime<Utc>,
    /// How many times the token was re-minted at the receiver's request.
    pub reshares: u32,
}

/// Receiver side: an import Didit made, key (`issuer_application_id`, `source_session_id`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImportRecord {
    /// The issuer's Didit application.
    pub issuer_application_id: String,
    /// The issuer's session.
    pub source_session_id: String,
    /// The new session in this application (unknown when Didit only said "already imported").
    pub imported_session_id: Option<String>,
    /// Its session number.
    pub session_number: Option<i64>,
    /// Its status.
    pub status: Option<String>,
    /// `user` or `business`.
    pub session_kind: SessionKind,
    /// The `vendor_data` the import used.
    pub vendor_data: Option<String>,
    /// Whether the issuer's decision was kept.
    pub trust_review: bool,
    /// When the import was recorded.
    pub imported_at: DateTime<Utc>,
    /// Whether the `import.result` for it was confirmed by the broker. Once set it stays set.
    pub result_published: bool,
}

/// Receiver side: the import about to be attempted, written before Didit is called and kept until the import is
/// recorded or known not to have happened. It names the token by its SHA-256 digest, never the token itself (see
/// `receiver::tokens` for why the token is not needed to resolve it).
#[derive(Debug, Clone, PartialEq)]
pub struct ImportIntent {
    /// Lower-case hex SHA-256 of the share token.
    pub token_digest: String,
    /// The `share_token` envelope's message id: the delivery whose token this is (a log and an operator can
    /// name the message that must come back).
    pub message_id: String,
    /// The attempt that last wrote it.
    pub holder: String,
    /// The `vendor_data` sent with the import: what finds the imported session when Didit's answer is lost.
    pub vendor_data: Option<String>,
    /// When it was first written for this token: Didit's import, if any, happened after this.
    pub at: DateTime<Utc>,
}

/// The answer to [`Ledger::begin_import`].
#[derive(Debug, Clone, PartialEq)]
pub enum IntentClaim {
    /// The caller's token is the intent now. `replay` when it already was (an earlier attempt with the same
    /// token may have reached Didit).
    Recorded {
        /// An intent with the same token digest was already there.
        replay: bool,
    },
    /// Another token's intent is unresolved: it must be resolved before any other token for the session is sent.
    Pending(ImportIntent),
    /// The import is recorded meanwhile.
    Done(ImportRecord),
}

/// The receiver's intent rule, shared by both backends: a recorded import wins; another token's intent blocks;
/// otherwise the caller's intent is written (keeping the first `at` of the same token).
pub(crate) fn decide_intent(
    record: Option<ImportRecord>,
    current: Option<&ImportIntent>,
    token_digest: &str,
) -> IntentClaim {
    if let Some(r) = record {
        return IntentClaim::Done(r);
    }
    match current {
        Some(i) if i.token_digest != token_digest => IntentClaim::Pending(i.clone()),
        Some(_) => IntentClaim::Recorded { replay: true },
        None => IntentClaim::Recorded { replay: false },
    }
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim<R> {
    /// The caller holds the lease now and must do the work, then complete or release. `previous` is the last
    /// completed record for the key, if any (on the issuer side: the token being replaced).
    Acquired {
        /// The last completed record, if any.
        previous: Option<R>,
    },
    /// The work is already done and still valid: do nothing (ack).
    Done(R),
    /// Another holder's lease is live: try again after `until` (or a little later), without doing the work.
    Busy {
        /// When that lease expires if not completed or released before.
        until: DateTime<Utc>,
    },
}

/// The answer to a claim on a webhook delivery key ([`Ledger::claim_webhook`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryClaim {
    /// Never seen: the key is now pending, held by the caller, who must publish the event and then
    /// [`Ledger::confirm_webhook`] (or [`Ledger::release_webhook`] when the publish failed).
    Fresh,
    /// Left pending by an attempt that is gone (its lease lapsed, or it belonged to an earlier run): the caller holds
    /// it now and publishes again, as for [`DeliveryClaim::Fresh`]. The earlier attempt's event may have reached the
    /// broker too; the share ledger absorbs the duplicate.
    Retaken,
    /// Final: the event was confirmed by the broker. A duplicate delivery; do nothing.
    Done,
    /// Another attempt holds the key and is publishing right now: do nothing until `until`.
    Busy {
        /// When that attempt's lease ends if it neither confirms nor releases before.
        until: DateTime<Utc>,
    },
    /// Never seen, and the caller asked not to record a first sighting (a delivery too old to be taken in).
    Unknown,
}

/// The webhook key rule, shared by both backends. `row` is the stored key, if any: whether it is final, and its
/// lease. `first_sight` says whether an unseen key may be recorded.
pub(crate) fn decide_webhook(
    row: Option<(bool, Option<&Lease>)>,
    holder: &str,
    now: DateTime<Utc>,
    first_sight: bool,
) -> DeliveryClaim {
    match row {
        None if first_sight => DeliveryClaim::Fresh,
        None => DeliveryClaim::Unknown,
        Some((true, _)) => DeliveryClaim::Done,
        Some((false, lease)) => match busy(lease, holder, now) {
            Some(until) => DeliveryClaim::Busy { until },
            None => DeliveryClaim::Retaken,
        },
    }
}

/// A lease on a key: who holds it, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) holder: String,
    pub(crate) until: DateTime<Utc>,
}

/// The issuer's claim rule, shared by both backends (the PostgreSQL backend writes the same rule as SQL and uses
/// this to interpret a refused claim).
///
/// Done when a completed record outlives `now + min_validity` and is not the token the caller knows to be stale;
/// else Busy when someone else's lease is live; else the caller may take the lease (a holder may re-claim its own
/// lease, which makes a retried claim harmless).
pub(crate) fn decide_share(
    record: Option<ShareRecord>,
    lease: Option<&Lease>,
    holder: &str,
    now: DateTime<Utc>,
    min_validity: Duration,
    stale_message_id: Option<&str>,
) -> Claim<ShareRecord> {
    if let Some(r) = &record {
        let fresh_enough = millis(r.expires_at) > millis(after(now, min_validity));
        if fresh_enough && stale_message_id != Some(r.message_id.as_str()) {
            return Claim::Done(record.expect("checked above"));
        }
    }
    match busy(lease, holder, now) {
        Some(until) => Claim::Busy { until },
        None => Claim::Acquired { previous: record },
    }
}

/// The receiver's claim rule: an import, once recorded, is done forever.
pub(crate) fn decide_import(
    record: Option<ImportRecord>,
    lease: Option<&Lease>,
    holder: &str,
    now: DateTime<Utc>,
) -> Claim<ImportRecord> {
    if let Some(r) = record {
        return Claim::Done(r);
    }
    match busy(lease, holder, now) {
        Some(until) => Claim::Busy { until },
        None => Claim::Acquired { previous: None },
    }
}

/// `Some(until)` when a lease other than `holder`'s is live at `now`.
fn busy(lease: Option<&Lease>, holder: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    lease
        .filter(|l| l.holder != holder && millis(l.until) > millis(now))
        .map(|l| l.until)
}

/// Unix milliseconds, the stored form of every time.
pub(crate) fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// Reads a stored time back.
pub(crate) fn from_millis(ms: i64, column: &str) -> Result<DateTime<Utc>, LedgerError> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| LedgerError::Corrupt(format!("`{column}` out of range: {ms}")))
}

/// `t + d`, saturating instead of overflowing (a lease of `Duration::MAX` means "forever").
pub(crate) fn after(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Reads a stored session kind back.
pub(crate) fn parse_kind(s: &str) -> Result<SessionKind, LedgerError> {
    SessionKind::parse(s).ok_or_else(|| LedgerError::Corrupt(format!("unknown session kind {s:?}")))
}

/// Reads a stored counter back.
pub(crate) fn to_u32(n: i64, column: &str) -> Result<u32, LedgerError> {
    u32::try_from(n).map_err(|_| LedgerError::Corrupt(format!("`{column}` out of range: {n}")))
}

/// A claimed key, for [`Ledger::keep_alive`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseKey {
    /// The issuer's key.
    Share {
        /// The issuer's session.
        source_session_id: String,
        /// The partner's application.
        partner_application_id: String,
    },
    /// The receiver's key.
    Import {
        /// The issuer's application.
        issuer_application_id: String,
        /// The issuer's session.
        source_session_id: String,
    },
}

impl LeaseKey {
    /// The key's two columns, in the order its table's primary key lists them.
    pub(crate) fn columns(&self) -> (&str, &str) {
        match self {
            LeaseKey::Share {
                source_session_id,
                partner_application_id,
            } => (source_session_id, partner_application_id),
            LeaseKey::Import {
                issuer_application_id,
                source_session_id,
            } => (issuer_application_id, source_session_id),
        }
    }
}

/// Renews a lease while it lives (see [`Ledger::keep_alive`]); dropping it stops the renewals.
#[derive(Debug)]
pub struct LeaseKeeper {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The idempotency ledger, on one of its backends. Cheap to clone: clones share one connection (SQLite: one writer
/// thread; PostgreSQL: one pipelined connection, re-established when lost).
#[derive(Debug, Clone)]
pub enum Ledger {
    /// Embedded SQLite, the default.
    Sqlite(SqliteLedger),
    /// PostgreSQL, shared by several replicas.
    Postgres(PostgresLedger),
}

/// Every call goes through here: bounded by the backend's timeout, so that a hung ledger turns into
/// [`LedgerError::Unavailable`] (a pause) instead of a handler frozen past `retry.hold_max` and its lease.
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self {
            Ledger::Sqlite(l) => {
                bounded(stringify!($method), l.timeout(), l.$method($($arg),*), || {}).await
            }
            Ledger::Postgres(l) => {
                bounded(stringify!($method), l.timeout(), l.$method($($arg),*), || l.drop_connections()).await
            }
        }
    };
}

impl Ledger {
    /// Opens the ledger at `url`: `sqlite://PATH` (creates missing directories and the file; an absolute path is
    /// `sqlite:///var/lib/...`) or `postgres://…` / `postgresql://…`. Creates or migrates the schema.
    pub async fn open(url: &SecretUrl) -> Result<Ledger, LedgerError> {
        Ledger::open_with_timeout(url, DEFAULT_TIMEOUT).await
    }

    /// [`Ledger::open`], every later call bounded by `timeout` (on PostgreSQL also the sessions'
    /// `statement_timeout`).
    pub async fn open_with_timeout(
        url: &SecretUrl,
        timeout: Duration,
    ) -> Result<Ledger, LedgerError> {
        Ledger::open_with_tls(url, timeout, &PgTlsSettings::default()).await
    }

    /// [`Ledger::open_with_timeout`], with the config file's PostgreSQL TLS settings (`[ledger] sslmode`,
    /// `ca_file`; ignored for SQLite).
    pub async fn open_with_tls(
        url: &SecretUrl,
        timeout: Duration,
        tls: &PgTlsSettings,
    ) -> Result<Ledger, LedgerError> {
        let text = url.expose();
        if let Some(path) = text.strip_prefix("sqlite://") {
            if path.is_empty() || path.contains('?') {
                return Err(LedgerError::Open(format!(
                    "expected sqlite://PATH without options, got {}",
                    url.redacted()
                )));
            }
            Ok(Ledger::Sqlite(
                SqliteLedger::open(std::path::Path::new(path))
                    .await?
                    .with_timeout(timeout),
            ))
        } else if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Ok(Ledger::Postgres(
                PostgresLedger::open_with_tls(url, timeout, tls).await?,
            ))
        } else {
            Err(LedgerError::Open(format!(
                "unsupported ledger URL {} (expected sqlite://PATH or postgres://...)",
                url.redacted()
            )))
        }
    }

    /// `sqlite` or `postgres`, for logs.
    pub fn backend(&self) -> &'static str {
        match self {
            Ledger::Sqlite(_) => "sqlite",
            Ledger::Postgres(_) => "postgres",
        }
    }

    /// Voids the leases of an earlier run of this process, so that deliveries it held when it died (SIGKILL, OOM,
    /// power loss) are taken up at once instead of waiting out their leases — webhook delivery keys left pending
    /// included (they stay pending, without a holder). Only for the embedded SQLite ledger,
    /// which belongs to exactly one process (replicas share PostgreSQL, where a lease may be a live replica's and
    /// must expire by itself). "Exactly one" is enforced, not assumed: the process holds an exclusive lock on its
    /// `state_dir` (`app::lock_state_dir`) before it opens the ledger, so no live process can own these leases. Returns how many leases were voided.
    pub async fn void_leases_of_previous_run(&self) -> Result<u64, LedgerError> {
        match self {
            Ledger::Sqlite(l) => l.void_all_leases().await,
            Ledger::Postgres(_) => Ok(0),
        }
    }

    /// Performs a small real write, for `/readyz`: fails when the file, directory or database cannot be written.
    pub async fn check_writable(&self) -> Result<(), LedgerError> {
        dispatch!(self.check_writable())
    }

    /// Claims the issuer's key (`source_session_id`, `partner_application_id`) for `holder` until `now + lease`.
    ///
    /// `Done(rec)` when a completed record exists whose `expires_at > now + min_validity` and whose `message_id` is
    /// not `stale_message_id` (the reshare path passes the expired envelope's id to force a fresh mint even if the
    /// clock says the old token is still valid); `Busy` while another holder's lease is live; else the lease is
    /// taken and `Acquired { previous }` returned.
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
        dispatch!(self.claim_share(
            source_session_id,
            partner_application_id,
            holder,
            lease,
            min_validity,
            stale_message_id,
            now
        ))
    }

    /// Writes the share record (replacing any earlier one) and clears the lease if `holder` still holds it. A
    /// holder whose lease was taken over still writes its record (its token exists) but leaves the new holder's
    /// lease in place.
    pub async fn complete_share(
        &self,
        record: &ShareRecord,
        holder: &str,
    ) -> Result<(), LedgerError> {
        dispatch!(self.complete_share(record, holder))
    }

    /// Gives up `holder`'s lease without recording anything. No effect when `holder` does not hold the lease.
    pub async fn release_share(
        &self,
        source_session_id: &str,
        partner_application_id: &str,
        holder: &str,
    ) -> Result<(), LedgerError> {
        dispatch!(self.release_share(source_session_id, partner_application_id, holder))
    }

    /// The completed share record for the key, if any.
    pub async fn share(
        &self,
        source_session_id: &str,
        partner_application_id: &str,
    ) -> Result<Option<ShareRecord>, LedgerError> {
        dispatch!(self.share(source_session_id, partner_application_id))
    }

    /// Claims the receiver's key (`issuer_application_id`, `source_session_id`) for `holder` until `now + lease`.
    /// `Done(rec)` once an import is recorded (forever, whatever the token's lifetime), `Busy` while another
    /// holder's lease is live, else `Acquired { previous: None }`.
    pub async fn claim_import(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
        holder: &str,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> Result<Claim<ImportRecord>, LedgerError> {
        dispatch!(self.claim_import(issuer_application_id, source_session_id, holder, lease, now))
    }

    /// Writes the import intent for the key, before Didit is called: `Recorded` when the caller's token is the
    /// intent now (`replay` if it already was), `Pending(other)` when another token's intent is unresolved (nothing
    /// written), `Done(rec)` when an import is recorded. Durable like [`Ledger::complete_import`]: an intent lost
    /// to a power cut would let a second token import the session again.
    pub async fn begin_import(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
        intent: &ImportIntent,
    ) -> Result<IntentClaim, LedgerError> {
        dispatch!(self.begin_import(issuer_application_id, source_session_id, intent))
    }

    /// Removes the intent for the key if it is still `token_digest`'s: that token's import is known not to have
    /// happened. No effect otherwise.
    pub async fn abandon_import_intent(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
        token_digest: &str,
    ) -> Result<(), LedgerError> {
        dispatch!(self.abandon_import_intent(
            issuer_application_id,
            source_session_id,
            token_digest
        ))
    }

    /// The unresolved import intent for the key, if any.
    pub async fn import_intent(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<Option<ImportIntent>, LedgerError> {
        dispatch!(self.import_intent(issuer_application_id, source_session_id))
    }

    /// Records the import (which resolves any intent: it is cleared), resets the reshare counter (an imported
    /// session asks for no more tokens; one write instead of a [`Ledger::reset_reshares`] after it) and clears the
    /// lease if `holder` still holds it (same rule as [`Ledger::complete_share`]). `result_published` only ever goes
    /// from false to true. On SQLite this commit is synced to disk before it returns (see [`sqlite`]).
    pub async fn complete_import(
        &self,
        record: &ImportRecord,
        holder: &str,
    ) -> Result<(), LedgerError> {
        dispatch!(self.complete_import(record, holder))
    }

    /// Gives up `holder`'s lease without recording an import; an intent stays (the import may have happened). No
    /// effect when `holder` does not hold the lease.
    pub async fn release_import(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
        holder: &str,
    ) -> Result<(), LedgerError> {
        dispatch!(self.release_import(issuer_application_id, source_session_id, holder))
    }

    /// Notes that the `import.result` for a recorded import was confirmed by the broker. No effect when no import
    /// is recorded for the key.
    pub async fn mark_result_published(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<(), LedgerError> {
        dispatch!(self.mark_result_published(issuer_application_id, source_session_id))
    }

    /// The recorded import for the key, if any.
    pub async fn import(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<Option<ImportRecord>, LedgerError> {
        dispatch!(self.import(issuer_application_id, source_session_id))
    }

    /// The receiver's reshare counter for (issuer application, source session): the number of reshare requests
    /// the broker confirmed since the last reset (0 when there is no row).
    pub async fn reshares(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<u32, LedgerError> {
        dispatch!(self.reshares(issuer_application_id, source_session_id))
    }

    /// Sets the reshare counter back to 0: after a successful import, and when an operator replays the token
    /// (`x-pb-replayed`), so that a replayed `expired` token gets a fresh round of reshare requests. No effect
    /// when there is no row.
    pub async fn reset_reshares(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<(), LedgerError> {
        dispatch!(self.reset_reshares(issuer_application_id, source_session_id))
    }

    /// The receiver's reshare counter for (issuer application, source session): increments it atomically and
    /// returns the new count (1 after the first call). Call it only once a reshare request is confirmed by the
    /// broker: a request that was never sent must not use up one of `receiver.max_reshares`.
    pub async fn bump_reshares(
        &self,
        issuer_application_id: &str,
        source_session_id: &str,
    ) -> Result<u32, LedgerError> {
        dispatch!(self.bump_reshares(issuer_application_id, source_session_id))
    }

    /// Claims the webhook delivery key `key` for `holder` until `now + lease`, by [`decide_webhook`]'s rule:
    /// `Fresh` (recorded now, pending) when never seen and `first_sight`; `Unknown` when never seen and not
    /// `first_sight` (nothing is written); `Done` once final; `Busy` while another holder's lease is live; else
    /// `Retaken` (a pending key whose holder is gone, now held by `holder`). A holder may re-claim its own key.
    pub async fn claim_webhook(
        &self,
        key: &str,
        holder: &str,
        lease: Duration,
        now: DateTime<Utc>,
        first_sight: bool,
    ) -> Result<DeliveryClaim, LedgerError> {
        dispatch!(self.claim_webhook(key, holder, lease, now, first_sight))
    }

    /// Makes a webhook delivery key final: its event was confirmed by the broker. Final whoever holds the lease (the
    /// event is queued, whichever attempt queued it), and recorded even if the key was pruned meanwhile.
    pub async fn confirm_webhook(&self, key: &str, now: DateTime<Utc>) -> Result<(), LedgerError> {
        dispatch!(self.confirm_webhook(key, now))
    }

    /// Forgets a pending webhook delivery key held by `holder` (its event could not be queued, so Didit's retry of
    /// the same delivery is taken in as new). No effect on a final key or on another holder's.
    pub async fn release_webhook(&self, key: &str, holder: &str) -> Result<(), LedgerError> {
        dispatch!(self.release_webhook(key, holder))
    }

    /// Extends `holder`'s lease on `key` to `until`. `false` when `holder` no longer holds it (completed, released,
    /// or taken over after it lapsed).
    pub async fn renew(
        &self,
        key: &LeaseKey,
        holder: &str,
        until: DateTime<Utc>,
    ) -> Result<bool, LedgerError> {
        dispatch!(self.renew(key, holder, until))
    }

    /// Keeps `holder`'s lease on `key` alive while the returned keeper lives: every `lease / 3` the lease is
    /// extended to `now + lease`. Dropping the keeper (the handler finished, failed, panicked or was cancelled)
    /// stops the renewals; a process that dies stops them with it, and its leases lapse within `lease`, so that
    /// another replica takes the work over within seconds while a live handler can hold its key as long as it works
    /// (backoffs up to `retry.hold_max`, a slow Didit, a slow confirm).
    ///
    /// Why renewals and not a PostgreSQL session-level advisory lock: the ledger multiplexes every handler over one
    /// pipelined connection (advisory locks are re-entrant per session, so they would not separate two handlers of
    /// one process), and the embedded SQLite ledger has no such lock; a renewed lease works the same on both.
    pub fn keep_alive(&self, key: LeaseKey, holder: &str, lease: Duration) -> LeaseKeeper {
        let ledger = self.clone();
        let holder = holder.to_string();
        let every = (lease / 3).max(Duration::from_millis(50));
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let until = after(Utc::now(), lease);
                let renewed = ledger.renew(&key, &holder, until).await;
                match renewed {
                    Ok(true) => {}
                    // Completed or released (the normal end), or lapsed and taken over: nothing left to keep.
                    Ok(false) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not renew a ledger lease; it lapses unless renewed")
                    }
                }
            }
        });
        LeaseKeeper { task }
    }

    /// Deletes rows last touched before `older_than` (completed share records, abandoned claims, reshare counters)
    /// and webhook keys first seen before it; a row whose lease is still live (at `older_than` or at the wall clock,
    /// whichever is earlier) is kept, and so is every recorded import and every unresolved import intent, whatever
    /// its age (`ledger.retention_days` does not apply to them). Returns how many rows were deleted.
    pub async fn prune(&self, older_than: DateTime<Utc>) -> Result<u64, LedgerError> {
        // Many chunks in one call: a longer bound than one claim's (each chunk is its own statement, bounded on
        // PostgreSQL by `statement_timeout`), and no reconnect when it runs out: slow is not hung here.
        let limit = |t: Duration| (t * 20).max(Duration::from_secs(60));
        match self {
            Ledger::Sqlite(l) => {
                bounded("prune", limit(l.timeout()), l.prune(older_than), || {}).await
            }
            Ledger::Postgres(l) => {
                bounded("prune", limit(l.timeout()), l.prune(older_than), || {}).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap()
    }

    fn rec(message_id: &str, expires_ms: i64) -> ShareRecord {
        ShareRecord {
            source_session_id: "s".into(),
            partner_application_id: "p".into(),
            message_id: message_id.into(),
            event_id: "e".into(),
            session_kind: SessionKind::User,
            status: "Approved".into(),
            vendor_data: None,
            occurred_at: t(0),
            minted_at: t(0),
            expires_at: t(expires_ms),
            reshares: 0,
        }
    }

    fn lease(holder: &str, until_ms: i64) -> Lease {
        Lease {
            holder: holder.into(),
            until: t(until_ms),
        }
    }

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn share_rule_row_by_row() {
        // Nothing yet: acquire.
        assert_eq!(
            decide_share(None, None, "a", t(0), SEC, None),
            Claim::Acquired { previous: None }
        );
        // A record valid past now + min_validity: done, even while someone re-mints.
        let valid = rec("m1", 5_000);
        assert_eq!(
            decide_share(
                Some(valid.clone()),
                Some(&lease("b", 9_000)),
                "a",
                t(0),
                SEC,
                None
            ),
            Claim::Done(valid.clone())
        );
        // Valid by the clock but known stale: acquire, handing over the old record.
        assert_eq!(
            decide_share(Some(valid.clone()), None, "a", t(0), SEC, Some("m1")),
            Claim::Acquired {
                previous: Some(valid.clone())
            }
        );
        // Another id is stale, not this one: still done.
        assert_eq!(
            decide_share(Some(valid.clone()), None, "a", t(0), SEC, Some("m0")),
            Claim::Done(valid.clone())
        );
        // Expires within min_validity (exactly at the boundary counts as too late): acquire.
        assert_eq!(
            decide_share(Some(valid.clone()), None, "a", t(4_000), SEC, None),
            Claim::Acquired {
                previous: Some(valid.clone())
            }
        );
        // Too old and someone else's lease is live: busy until it ends.
        assert_eq!(
            decide_share(
                Some(valid.clone()),
                Some(&lease("b", 9_000)),
                "a",
                t(4_500),
                SEC,
                None
            ),
            Claim::Busy { until: t(9_000) }
        );
        // Our own lease: re-acquire. An expired lease (at exactly its end, too): take over.
        assert!(matches!(
            decide_share(None, Some(&lease("a", 9_000)), "a", t(0), SEC, None),
            Claim::Acquired { .. }
        ));
        assert!(matches!(
            decide_share(None, Some(&lease("b", 9_000)), "a", t(9_000), SEC, None),
            Claim::Acquired { .. }
        ));
    }

    #[test]
    fn import_rule_row_by_row() {
        let done = ImportRecord {
            issuer_application_id: "i".into(),
            source_session_id: "s".into(),
            imported_session_id: Some("n".into()),
            session_number: Some(7),
            status: Some("In Review".into()),
            session_kind: SessionKind::User,
            vendor_data: None,
            trust_review: false,
            imported_at: t(0),
            result_published: false,
        };
        assert_eq!(
            decide_import(
                Some(done.clone()),
                Some(&lease("b", 9_000)),
                "a",
                t(1_000_000_000),
            ),
            Claim::Done(done)
        );
        assert_eq!(
            decide_import(None, Some(&lease("b", 9_000)), "a", t(0)),
            Claim::Busy { until: t(9_000) }
        );
        assert_eq!(
            decide_import(None, Some(&lease("b", 9_000)), "a", t(9_001)),
            Claim::Acquired { previous: None }
        );
    }

    #[test]
    fn webhook_rule_row_by_row() {
        use DeliveryClaim::*;
        assert_eq!(decide_webhook(None, "a", t(0), true), Fresh);
        assert_eq!(decide_webhook(None, "a", t(0), false), Unknown);
        // Final is final, whatever the lease or the caller's freshness.
        assert_eq!(decide_webhook(Some((true, None)), "a", t(0), false), Done);
        assert_eq!(
            decide_webhook(Some((true, Some(&lease("b", 9_000)))), "a", t(0), true),
            Done
        );
        // Pending, another holder's lease live: busy; lapsed (at exactly its end, too) or voided: retaken.
        assert_eq!(
            decide_webhook(Some((false, Some(&lease("b", 9_000)))), "a", t(0), true),
            Busy { until: t(9_000) }
        );
        assert_eq!(
            decide_webhook(Some((false, Some(&lease("b", 9_000)))), "a", t(9_000), true),
            Retaken
        );
        assert_eq!(
            decide_webhook(Some((false, None)), "a", t(0), false),
            Retaken
        );
        // The holder itself may claim again.
        assert_eq!(
            decide_webhook(Some((false, Some(&lease("a", 9_000)))), "a", t(0), true),
            Retaken
        );
    }

    #[test]
    fn times_saturate_and_round_trip() {
        assert_eq!(after(t(0), Duration::MAX), DateTime::<Utc>::MAX_UTC);
        assert_eq!(from_millis(millis(t(123)), "x").unwrap(), t(123));
        assert!(matches!(
            from_millis(i64::MAX, "x"),
            Err(LedgerError::Corrupt(_))
        ));
        assert!(matches!(parse_kind("robot"), Err(LedgerError::Corrupt(_))));
        assert!(LedgerError::Io("x".into()).is_retryable());
        assert!(!LedgerError::Corrupt("x".into()).is_retryable());
    }
}
