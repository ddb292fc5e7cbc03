//! The audit log: one append-only row per act of information sharing, kept `audit.retention_days` (default 1825,
//! five years), separate from the idempotency ledger but in the same database (tables `audit_log` and
//! `audit_checkpoints`). docs/compliance.md says what is recorded and why.
//!
//! - **What a row holds.** Ids (event, source session, imported session, share-token digest, message), the act, the
//!   side that recorded it, the counterpart (partner or issuer: its name and application id), the data-sharing
//!   agreement id, a status and a reason, and the time. No personal data: `vendor_data` is kept only as an
//!   HMAC-SHA256 under a key derived from the side's first signing key ([`vendor_data_key`]), so a known value can be
//!   matched but the column reveals nothing by itself.
//! - **Hash chain.** Rows are numbered `seq` 1, 2, 3… without gaps; each carries the SHA-256 of the previous row
//!   (`prev_hash`, 64 zeros before the first) and its own SHA-256 over a canonical encoding of all its columns
//!   ([`row_hash`]). Changing, removing or inserting a row breaks the chain at that row.
//! - **Checkpoints.** Every `audit.checkpoint_interval_secs` and on shutdown, the chain's head (seq and hash) is
//!   signed with the side's Ed25519 key and stored in `audit_checkpoints`. A rewritten chain (every hash recomputed
//!   after an edit) no longer matches the signed checkpoints, and removing the last rows leaves a checkpoint past
//!   the end.
//! - **Retention.** Pruning deletes the rows older than the retention and writes a signed `prune` checkpoint at the
//!   last deleted row: the retained chain starts there, and [`verify`] accepts a chain whose first row is not seq 1
//!   only when such a checkpoint names its predecessor.
//!
//! **When an act cannot be recorded** the message that caused it is not acked: every act is recorded before its
//! delivery is settled, and a failed audit write is handled exactly like a failed ledger write (the pipeline pauses
//! while the database is unavailable, the message comes back). Acts that a redelivery would reach again carry a
//! `dedupe_key`, so the retry records what is missing and nothing twice. On SQLite the audit inserts run on the
//! ledger's writer thread, group-committed with the ledger's own writes (one extra insert per act) and synced like an
//! import completion; on PostgreSQL they run on a connection of their own, one transaction per call, serialised
//! across replicas by an advisory lock (the chain needs one writer at a time).

mod store;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::envelope::{SigningKey, VerifyingKey};
use crate::keys::SigningKeys;
use crate::ledger::{Ledger, LedgerError};
use crate::metrics::Metrics;

pub use store::AuditStore;

/// `prev_hash` of the first row ever written.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened. Stored by name (`share_minted`, …); new acts are new names, old rows keep theirs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActKind {
    /// Issuer: Didit minted a share token for a partner.
    ShareMinted,
    /// Issuer: the token's envelope was confirmed by the broker on its way to the partner.
    TokenPublished,
    /// Receiver: a share-token envelope arrived and passed its checks (issuer known, signature, addressee).
    TokenReceived,
    /// Receiver: Didit imported the session into this application.
    Imported,
    /// Receiver: the session was imported here already; the token changed nothing.
    Duplicate,
    /// Either side: a message was dead-lettered (its reason in `reason`).
    DeadLettered,
    /// Receiver: asked the issuer for a fresh token (the one received had expired).
    ReshareRequested,
    /// Issuer: answered a partner's reshare request with a fresh token.
    ReshareAnswered,
    /// Issuer: an erasure or rectification notice was sent to a recipient.
    NoticeSent,
    /// Receiver: a notice arrived from the issuer.
    NoticeReceived,
    /// Issuer: the recipient acknowledged a notice.
    NoticeAcknowledged,
}

impl ActKind {
    /// Every act, in declaration order.
    pub const ALL: [ActKind; 11] = [
        ActKind::ShareMinted,
        ActKind::TokenPublished,
        ActKind::TokenReceived,
        ActKind::Imported,
        ActKind::Duplicate,
        ActKind::DeadLettered,
        ActKind::ReshareRequested,
        ActKind::ReshareAnswered,
        ActKind::NoticeSent,
        ActKind::NoticeReceived,
        ActKind::NoticeAcknowledged,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ActKind::ShareMinted => "share_minted",
            ActKind::TokenPublished => "token_published",
            ActKind::TokenReceived => "token_received",
            ActKind::Imported => "imported",
            ActKind::Duplicate => "duplicate",
            ActKind::DeadLettered => "dead_lettered",
            ActKind::ReshareRequested => "reshare_requested",
            ActKind::ReshareAnswered => "reshare_answered",
            ActKind::NoticeSent => "notice_sent",
            ActKind::NoticeReceived => "notice_received",
            ActKind::NoticeAcknowledged => "notice_acknowledged",
        }
    }

    /// The act of a stored name.
    pub fn parse(s: &str) -> Option<ActKind> {
        ActKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for ActKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which side recorded an act.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The issuer role (shares its sessions).
    Issuer,
    /// The receiver role (imports them).
    Receiver,
}

impl Side {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Issuer => "issuer",
            Side::Receiver => "receiver",
        }
    }
}

/// One act to record. Build it with [`Act::new`] and set what is known; `vendor_data` is hashed before it is
/// stored, never kept as given.
#[derive(Debug, Clone, PartialEq)]
pub struct Act {
    /// What happened.
    pub kind: ActKind,
    /// Who recorded it.
    pub side: Side,
    /// When it happened (default: now).
    pub at: DateTime<Utc>,
    /// The counterpart's configured name (the partner on the issuer side, the issuer on the receiver side).
    pub partner: Option<String>,
    /// The counterpart's Didit application.
    pub partner_application_id: Option<String>,
    /// The data-sharing agreement the act falls under.
    pub agreement_id: Option<String>,
    /// The issuer's (source) session.
    pub session_id: Option<String>,
    /// The session the import created in the receiver's application.
    pub imported_session_id: Option<String>,
    /// The onboarding event that started it.
    pub event_id: Option<String>,
    /// The message (envelope, request, notice) it is about.
    pub message_id: Option<String>,
    /// The share token, by its SHA-256 digest (Didit's tokens carry no `jti`).
    pub token_id: Option<String>,
    /// A status (the session's, or the outcome's).
    pub status: Option<String>,
    /// A reason (a dead-letter reason, a notice kind).
    pub reason: Option<String>,
    /// The `vendor_data` involved, hashed on the way in.
    pub vendor_data: Option<String>,
    /// Recorded at most once per key: a redelivery that reaches the same act again records nothing.
    pub dedupe_key: Option<String>,
}

impl Act {
    /// An act of `kind` on `side`, happening now, nothing else known yet.
    pub fn new(kind: ActKind, side: Side) -> Act {
        Act {
            kind,
            side,
            at: Utc::now(),
            partner: None,
            partner_application_id: None,
            agreement_id: None,
            session_id: None,
            imported_session_id: None,
            event_id: None,
            message_id: None,
            token_id: None,
            status: None,
            reason: None,
            vendor_data: None,
            dedupe_key: None,
        }
    }

    /// Sets the counterpart.
    pub fn partner(mut self, name: &str, application_id: &str) -> Act {
        self.partner = Some(name.to_string());
        self.partner_application_id = Some(application_id.to_string());
        self
    }

    /// Sets the source session.
    pub fn session(mut self, session_id: &str) -> Act {
        self.session_id = Some(session_id.to_string());
        self
    }

    /// Sets the message id.
    pub fn message(mut self, message_id: &str) -> Act {
        self.message_id = Some(message_id.to_string());
        self
    }

    /// Sets the share token, by its digest ([`token_id`]).
    pub fn token(mut self, token_id: &str) -> Act {
        self.token_id = Some(token_id.to_string());
        self
    }

    /// Sets the onboarding event.
    pub fn event(mut self, event_id: &str) -> Act {
        self.event_id = Some(event_id.to_string());
        self
    }

    /// Sets the status.
    pub fn status(mut self, status: impl Into<String>) -> Act {
        self.status = Some(status.into());
        self
    }

    /// Sets the reason.
    pub fn reason(mut self, reason: impl Into<String>) -> Act {
        self.reason = Some(reason.into());
        self
    }

    /// Records this act at most once for `key` (scoped by the act's name).
    pub fn once(mut self, key: impl std::fmt::Display) -> Act {
        self.dedupe_key = Some(format!("{}:{key}", self.kind));
        self
    }
}

/// A stored row, as read back (and exported).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRow {
    /// Position in the chain (1, 2, 3…).
    pub seq: i64,
    /// When the act happened, unix milliseconds.
    pub at_ms: i64,
    /// `issuer` or `receiver`.
    pub side: String,
    /// The act's name.
    pub act: String,
    /// See [`Act`].
    pub partner: Option<String>,
    /// See [`Act`].
    pub partner_application_id: Option<String>,
    /// See [`Act`].
    pub agreement_id: Option<String>,
    /// See [`Act`].
    pub session_id: Option<String>,
    /// See [`Act`].
    pub imported_session_id: Option<String>,
    /// See [`Act`].
    pub event_id: Option<String>,
    /// See [`Act`].
    pub message_id: Option<String>,
    /// See [`Act`].
    pub token_id: Option<String>,
    /// See [`Act`].
    pub status: Option<String>,
    /// See [`Act`].
    pub reason: Option<String>,
    /// Lower-case hex HMAC-SHA256 of the `vendor_data` ([`vendor_data_key`]).
    pub vendor_data_hash: Option<String>,
    /// See [`Act`].
    pub dedupe_key: Option<String>,
    /// The previous row's `hash` ([`GENESIS`] before the first).
    pub prev_hash: String,
    /// [`row_hash`] of this row.
    pub hash: String,
}

impl AuditRow {
    /// `at_ms` as a time (the epoch if out of range).
    pub fn at(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.at_ms).unwrap_or_default()
    }

    /// The column names in stored order (as [`AuditRow::columns`] gives them).
    pub fn column_names() -> [&'static str; 18] {
        [
            "seq",
            "at_ms",
            "side",
            "act",
            "partner",
            "partner_application_id",
            "agreement_id",
            "session_id",
            "imported_session_id",
            "event_id",
            "message_id",
            "token_id",
            "status",
            "reason",
            "vendor_data_hash",
            "dedupe_key",
            "prev_hash",
            "hash",
        ]
    }

    /// The columns in stored order, as text (`None` for NULL): what [`row_hash`] encodes and `audit export`
    /// writes.
    pub fn columns(&self) -> [(&'static str, Option<String>); 18] {
        [
            ("seq", Some(self.seq.to_string())),
            ("at_ms", Some(self.at_ms.to_string())),
            ("side", Some(self.side.clone())),
            ("act", Some(self.act.clone())),
            ("partner", self.partner.clone()),
            (
                "partner_application_id",
                self.partner_application_id.clone(),
            ),
            ("agreement_id", self.agreement_id.clone()),
            ("session_id", self.session_id.clone()),
            ("imported_session_id", self.imported_session_id.clone()),
            ("event_id", self.event_id.clone()),
            ("message_id", self.message_id.clone()),
            ("token_id", self.token_id.clone()),
            ("status", self.status.clone()),
            ("reason", self.reason.clone()),
            ("vendor_data_hash", self.vendor_data_hash.clone()),
            ("dedupe_key", self.dedupe_key.clone()),
            ("prev_hash", Some(self.prev_hash.clone())),
            ("hash", Some(self.hash.clone())),
        ]
    }
}

/// The SHA-256 (lower-case hex) of a row: over `partner-bridge audit row v1` and a NUL byte, then every column
/// but `hash`, in stored order, each as one byte 0 for NULL or one byte 1, its length as a 4-byte big-endian
/// number and its UTF-8 bytes (numbers in decimal). `prev_hash` is among them, which links the chain.
pub fn row_hash(row: &AuditRow) -> String {
    let mut h = Sha256::new();
    h.update(b"partner-bridge audit row v1\0");
    for (name, value) in row.columns() {
        if name == "hash" {
            continue;
        }
        match value {
            None => h.update([0u8]),
            Some(v) => {
                h.update([1u8]);
                h.update((v.len() as u32).to_be_bytes());
                h.update(v.as_bytes());
            }
        }
    }
    hex::encode(h.finalize())
}

/// A signed checkpoint: the chain's head at a moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Checkpoint {
    /// Its own number (1, 2, 3…).
    pub id: i64,
    /// The last row it covers (0: none yet).
    pub seq: i64,
    /// That row's hash ([`GENESIS`] for none).
    pub hash: String,
    /// When it was written, unix milliseconds.
    pub at_ms: i64,
    /// `periodic`, `shutdown`, or `prune` (the retained chain starts after it).
    pub kind: String,
    /// The signing key's id; `None` when the side has no signing key.
    pub key_id: Option<String>,
    /// `ed25519:<base64>` over [`checkpoint_payload`]; `None` when the side has no signing key.
    pub signature: Option<String>,
}

/// What a checkpoint's signature covers.
pub fn checkpoint_payload(kind: &str, seq: i64, hash: &str, at_ms: i64) -> Vec<u8> {
    format!(
        "partner-bridge audit checkpoint v1\nkind={kind}\nseq={seq}\nhash={hash}\nat_ms={at_ms}\n"
    )
    .into_bytes()
}

/// The checkpoint kinds.
pub mod kinds {
    /// Written every `audit.checkpoint_interval_secs`.
    pub const PERIODIC: &str = "periodic";
    /// Written on shutdown.
    pub const SHUTDOWN: &str = "shutdown";
    /// Written by pruning: the retained chain starts after its row.
    pub const PRUNE: &str = "prune";
}

/// The HMAC key for `vendor_data`: SHA-256 of `partner-bridge audit vendor_data v1` and the side's *first* signing
/// key (the oldest of its set, so that rotating keys, which appends, keeps the key). `None` without a signing key:
/// then `vendor_data` is not recorded at all.
pub fn vendor_data_key(first_signing_key: Option<&SigningKey>) -> Option<[u8; 32]> {
    let key = first_signing_key?;
    let mut h = Sha256::new();
    h.update(b"partner-bridge audit vendor_data v1\0");
    h.update(key.to_base64().as_bytes());
    Some(h.finalize().into())
}

/// Lower-case hex HMAC-SHA256 of `value` under `key`.
pub fn keyed_hash(key: &[u8; 32], value: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(value.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Which rows `audit list` and `audit export` show.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Rows whose source or imported session is this.
    pub session: Option<String>,
    /// Rows whose counterpart's name or application id is this.
    pub partner: Option<String>,
    /// Rows at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Rows at or before this time.
    pub until: Option<DateTime<Utc>>,
}

/// A partner that received a session: `audit recipients`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recipient {
    /// The partner's configured name when the token went out.
    pub partner: Option<String>,
    /// Its Didit application.
    pub partner_application_id: String,
    /// The agreement the share fell under (the newest recorded).
    pub agreement_id: Option<String>,
    /// How many tokens for the session were published to it.
    pub tokens: i64,
    /// The first one, unix milliseconds.
    pub first_ms: i64,
    /// The last one, unix milliseconds.
    pub last_ms: i64,
}

/// The audit log of one process. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    store: AuditStore,
    vendor_key: Option<[u8; 32]>,
    signer: Option<SigningKeys>,
    timeout: Duration,
    metrics: std::sync::OnceLock<Arc<Metrics>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// The audit log in `ledger`'s database, its tables created when missing. `signer` signs checkpoints (its first
    /// key also keys the `vendor_data` hash); `timeout` bounds each call.
    pub async fn open(
        ledger: &Ledger,
        signer: Option<SigningKeys>,
        first_key: Option<&SigningKey>,
        timeout: Duration,
    ) -> Result<AuditLog, LedgerError> {
        let store = AuditStore::open(ledger).await?;
        Ok(AuditLog {
            inner: Arc::new(Inner {
                store,
                vendor_key: vendor_data_key(first_key),
                signer,
                timeout,
                metrics: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Counts rows written (`audit_rows_total{act}`) and failed writes (`audit_write_failures_total`) in
    /// `metrics` from now on (once; later calls are ignored).
    pub fn set_metrics(&self, metrics: Arc<Metrics>) {
        let _ = self.inner.metrics.set(metrics);
    }

    /// Proves that a row could be appended right now (an insert rolled back at once), for the ledger probe of a
    /// pipeline paused because an act could not be recorded: the audit tables must accept writes again, not only
    /// the ledger's.
    pub async fn check_writable(&self) -> Result<(), LedgerError> {
        self.bounded("check_writable", self.inner.store.check_writable())
            .await
    }

    async fn bounded<T>(
        &self,
        op: &str,
        call: impl std::future::Future<Output = Result<T, LedgerError>>,
    ) -> Result<T, LedgerError> {
        match tokio::time::timeout(self.inner.timeout, call).await {
            Ok(r) => r,
            Err(_) => {
                self.inner.store.reset();
                Err(LedgerError::Unavailable(format!(
                    "the audit log did not answer {op} within {} ms",
                    self.inner.timeout.as_millis()
                )))
            }
        }
    }

    /// Records one act. `Ok(Some(seq))` with its row's number, `Ok(None)` when its `dedupe_key` was recorded
    /// already. An error means nothing was recorded: do not settle the message that caused the act.
    pub async fn record(&self, act: Act) -> Result<Option<i64>, LedgerError> {
        Ok(self.record_all(vec![act]).await?.pop().flatten())
    }

    /// Records several acts in one transaction, in order (all or none).
    pub async fn record_all(&self, acts: Vec<Act>) -> Result<Vec<Option<i64>>, LedgerError> {
        let key = self.inner.vendor_key;
        let kinds: Vec<ActKind> = acts.iter().map(|a| a.kind).collect();
        let drafts = acts
            .into_iter()
            .map(|a| Draft::from_act(a, key.as_ref()))
            .collect();
        let result = self
            .bounded("record", self.inner.store.append(drafts))
            .await;
        let metrics = self.inner.metrics.get();
        match &result {
            Ok(seqs) => {
                if let Some(m) = metrics {
                    for (kind, seq) in kinds.iter().zip(seqs) {
                        if seq.is_some() {
                            m.audit_row(kind.as_str());
                        }
                    }
                }
            }
            Err(e) => {
                if let Some(m) = metrics {
                    m.audit_write_failure();
                }
                tracing::warn!(error = %e, "audit act not recorded; the message that caused it is not settled");
            }
        }
        result
    }

    /// Who received `session_id`: the partners with a `token_published` act for it, one entry per partner.
    pub async fn recipients(&self, session_id: &str) -> Result<Vec<Recipient>, LedgerError> {
        self.inner.store.recipients(session_id).await
    }

    /// The rows matching `filter`, in chain order.
    pub async fn rows(&self, filter: &Filter) -> Result<Vec<AuditRow>, LedgerError> {
        let mut out = Vec::new();
        let mut after = i64::MIN;
        loop {
            let page = self.inner.store.rows(filter, after, PAGE).await?;
            let n = page.len();
            if let Some(last) = page.last() {
                after = last.seq;
            }
            out.extend(page);
            if (n as i64) < PAGE {
                return Ok(out);
            }
        }
    }

    /// Every checkpoint, oldest first.
    pub async fn checkpoints(&self) -> Result<Vec<Checkpoint>, LedgerError> {
        self.inner.store.checkpoints().await
    }

    /// Signs and stores the chain's head as a checkpoint of `kind`, unless the newest checkpoint already covers it
    /// (an idle log writes none). Returns the checkpoint written.
    pub async fn checkpoint(&self, kind: &'static str) -> Result<Option<Checkpoint>, LedgerError> {
        let signer = self.inner.signer.as_ref().map(SigningKeys::signer);
        self.bounded("checkpoint", self.inner.store.checkpoint(kind, signer))
            .await
    }

    /// Deletes the rows older than `older_than`, after a signed `prune` checkpoint at the last of them (so that the
    /// retained chain stays verifiable). Returns how many rows were deleted.
    pub async fn prune(&self, older_than: DateTime<Utc>) -> Result<u64, LedgerError> {
        let signer = self.inner.signer.as_ref().map(SigningKeys::signer);
        self.inner
            .store
            .prune(older_than.timestamp_millis(), signer)
            .await
    }

    /// Recomputes the chain and checks the checkpoints against `keys` (see [`verify`]).
    pub async fn verify(&self, keys: &[VerifyingKey]) -> Result<Verified, LedgerError> {
        let checkpoints = self.checkpoints().await?;
        let mut check = Verifier::new(checkpoints, keys);
        let mut after = i64::MIN;
        loop {
            let page = self
                .inner
                .store
                .rows(&Filter::default(), after, PAGE)
                .await?;
            let n = page.len();
            for row in page {
                after = row.seq;
                check.row(&row);
            }
            if (n as i64) < PAGE {
                break;
            }
        }
        Ok(check.finish())
    }
}

/// Rows read per query.
const PAGE: i64 = 5000;

/// An act ready to be chained: its columns, `vendor_data` already hashed.
#[derive(Debug, Clone)]
pub(crate) struct Draft {
    pub at_ms: i64,
    pub side: &'static str,
    pub act: &'static str,
    pub partner: Option<String>,
    pub partner_application_id: Option<String>,
    pub agreement_id: Option<String>,
    pub session_id: Option<String>,
    pub imported_session_id: Option<String>,
    pub event_id: Option<String>,
    pub message_id: Option<String>,
    pub token_id: Option<String>,
    pub status: Option<String>,
    pub reason: Option<String>,
    pub vendor_data_hash: Option<String>,
    pub dedupe_key: Option<String>,
}

impl Draft {
    fn from_act(a: Act, key: Option<&[u8; 32]>) -> Draft {
        Draft {
            at_ms: a.at.timestamp_millis(),
            side: a.side.as_str(),
            act: a.kind.as_str(),
            partner: a.partner,
            partner_application_id: a.partner_application_id,
            agreement_id: a.agreement_id,
            session_id: a.session_id,
            imported_session_id: a.imported_session_id,
            event_id: a.event_id,
            message_id: a.message_id,
            token_id: a.token_id,
            status: a.status,
            reason: a.reason,
            vendor_data_hash: match (key, a.vendor_data.as_deref()) {
                (Some(k), Some(v)) if !v.is_empty() => Some(keyed_hash(k, v)),
                _ => None,
            },
            dedupe_key: a.dedupe_key,
        }
    }

    /// The row this draft becomes after `(seq, hash)`.
    pub(crate) fn chain(self, prev_seq: i64, prev_hash: &str) -> AuditRow {
        let mut row = AuditRow {
            seq: prev_seq + 1,
            at_ms: self.at_ms,
            side: self.side.to_string(),
            act: self.act.to_string(),
            partner: self.partner,
            partner_application_id: self.partner_application_id,
            agreement_id: self.agreement_id,
            session_id: self.session_id,
            imported_session_id: self.imported_session_id,
            event_id: self.event_id,
            message_id: self.message_id,
            token_id: self.token_id,
            status: self.status,
            reason: self.reason,
            vendor_data_hash: self.vendor_data_hash,
            dedupe_key: self.dedupe_key,
            prev_hash: prev_hash.to_string(),
            hash: String::new(),
        };
        row.hash = row_hash(&row);
        row
    }
}

/// A signed checkpoint of `(seq, hash)`.
pub(crate) fn sign_checkpoint(
    id: i64,
    kind: &str,
    seq: i64,
    hash: &str,
    signer: Option<&SigningKey>,
) -> Checkpoint {
    let at_ms = Utc::now().timestamp_millis();
    let payload = checkpoint_payload(kind, seq, hash, at_ms);
    Checkpoint {
        id,
        seq,
        hash: hash.to_string(),
        at_ms,
        kind: kind.to_string(),
        key_id: signer.map(|k| k.key_id().to_string()),
        signature: signer.map(|k| k.sign(&payload)),
    }
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Rows checked.
    pub rows: u64,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// The first row (or checkpoint) that does not match, if any.
    pub problem: Option<Problem>,
    /// Checkpoints without a signature (the side has no signing key).
    pub unsigned: u64,
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The row that does not match (`None`: a checkpoint, or the chain as a whole).
    pub seq: Option<i64>,
    /// What is wrong, in a sentence.
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.seq {
            Some(seq) => write!(f, "audit row seq={seq} does not match: {}", self.detail),
            None => write!(f, "{}", self.detail),
        }
    }
}

/// Checks the chain row by row (in `seq` order) against the checkpoints.
///
/// A row does not match when its `seq` is not the previous one plus one (a row removed or inserted), when its
/// `prev_hash` is not the previous row's `hash`, or when its `hash` is not [`row_hash`] of its columns (altered).
/// The first row must be seq 1 after [`GENESIS`], or follow a signed `prune` checkpoint naming its predecessor.
/// Every checkpoint's signature must verify with one of `keys` (an unsigned one is accepted only when `keys` is
/// empty: a side without a signing key), and the row it names must exist and carry its hash.
pub struct Verifier<'k> {
    keys: &'k [VerifyingKey],
    checkpoints: Vec<Checkpoint>,
    by_seq: std::collections::HashMap<i64, Vec<usize>>,
    prev: Option<(i64, String)>,
    rows: u64,
    unsigned: u64,
    problem: Option<Problem>,
}

impl<'k> Verifier<'k> {
    /// Starts a check of a chain with these checkpoints.
    pub fn new(mut checkpoints: Vec<Checkpoint>, keys: &'k [VerifyingKey]) -> Verifier<'k> {
        checkpoints.sort_by_key(|c| (c.seq, c.id));
        let mut by_seq: std::collections::HashMap<i64, Vec<usize>> = Default::default();
        for (i, c) in checkpoints.iter().enumerate() {
            by_seq.entry(c.seq).or_default().push(i);
        }
        Verifier {
            keys,
            checkpoints,
            by_seq,
            prev: None,
            rows: 0,
            unsigned: 0,
            problem: None,
        }
    }

    fn fail(&mut self, seq: Option<i64>, detail: String) {
        if self.problem.is_none() {
            self.problem = Some(Problem { seq, detail });
        }
    }

    /// Checks a checkpoint's signature; `Some(reason)` when it does not hold.
    fn bad_signature(&self, c: &Checkpoint) -> Option<String> {
        let Some(signature) = &c.signature else {
            return (!self.keys.is_empty()).then(|| "it is not signed".to_string());
        };
        let payload = checkpoint_payload(&c.kind, c.seq, &c.hash, c.at_ms);
        let candidates: Vec<&VerifyingKey> = match &c.key_id {
            Some(id) => self.keys.iter().filter(|k| k.has_id(id)).collect(),
            None => self.keys.iter().collect(),
        };
        if candidates.is_empty() {
            return Some(format!(
                "it is signed with key {}, which is not one of this side's keys",
                c.key_id.as_deref().unwrap_or("(none)")
            ));
        }
        if candidates
            .iter()
            .any(|k| k.verify(&payload, signature).is_ok())
        {
            None
        } else {
            Some("its signature does not verify with this side's public key".into())
        }
    }

    /// Checks the next row.
    pub fn row(&mut self, row: &AuditRow) {
        self.rows += 1;
        if self.problem.is_some() {
            return;
        }
        let seq = row.seq;
        match self.prev.clone() {
            None => {
                if seq == 1 {
                    if row.prev_hash != GENESIS {
                        self.fail(
                            Some(seq),
                            "the first row's prev_hash is not the genesis value".into(),
                        );
                    }
                } else {
                    let anchor = self
                        .checkpoints
                        .iter()
                        .find(|c| c.kind == kinds::PRUNE && c.seq == seq - 1)
                        .cloned();
                    match anchor {
                        None => self.fail(
                            Some(seq),
                            format!(
                                "the chain starts at seq {seq} but no prune checkpoint covers seq {}: earlier rows were removed",
                                seq - 1
                            ),
                        ),
                        Some(c) if c.hash != row.prev_hash => self.fail(
                            Some(seq),
                            format!(
                                "prev_hash differs from the prune checkpoint #{} at seq {}",
                                c.id, c.seq
                            ),
                        ),
                        Some(c) => {
                            if let Some(why) = self.bad_signature(&c) {
                                self.fail(
                                    Some(seq),
                                    format!("the prune checkpoint #{} before it: {why}", c.id),
                                );
                            }
                        }
                    }
                }
            }
            Some((prev_seq, prev_hash)) => {
                if seq != prev_seq + 1 {
                    let what = if seq > prev_seq + 1 {
                        format!("row(s) {}..{} are missing", prev_seq + 1, seq - 1)
                    } else {
                        "it is out of order".to_string()
                    };
                    self.fail(
                        Some(seq),
                        format!("expected seq {} after seq {prev_seq}: {what}", prev_seq + 1),
                    );
                } else if row.prev_hash != prev_hash {
                    self.fail(
                        Some(seq),
                        format!(
                            "prev_hash is not the hash of row seq={prev_seq} (a row was removed, inserted or rewritten)"
                        ),
                    );
                }
            }
        }
        if self.problem.is_none() && row_hash(row) != row.hash {
            self.fail(
                Some(seq),
                "its hash does not match its contents (altered or inserted by hand)".into(),
            );
        }
        if self.problem.is_none() {
            let here: Vec<Checkpoint> = self
                .by_seq
                .get(&seq)
                .into_iter()
                .flatten()
                .map(|&i| self.checkpoints[i].clone())
                .collect();
            for c in here {
                if c.hash != row.hash {
                    self.fail(
                        Some(seq),
                        format!("it differs from signed checkpoint #{} ({})", c.id, c.kind),
                    );
                } else if let Some(why) = self.bad_signature(&c) {
                    self.fail(
                        Some(seq),
                        format!("checkpoint #{} at this row: {why}", c.id),
                    );
                }
            }
        }
        self.prev = Some((seq, row.hash.clone()));
    }

    /// The verdict, once every row is checked.
    pub fn finish(mut self) -> Verified {
        let last = self.prev.as_ref().map(|(s, _)| *s);
        let first_retained = self
            .checkpoints
            .iter()
            .filter(|c| c.kind == kinds::PRUNE)
            .map(|c| c.seq)
            .max();
        let checkpoints = std::mem::take(&mut self.checkpoints);
        for c in &checkpoints {
            if c.signature.is_none() {
                self.unsigned += 1;
            }
            let beyond = match last {
                Some(last) => c.seq > last,
                None => c.seq > 0 && Some(c.seq) != first_retained,
            };
            if beyond {
                let after = last.unwrap_or(first_retained.unwrap_or(0));
                self.fail(
                    Some(after + 1),
                    format!(
                        "row seq={} is missing: checkpoint #{} ({}) covers the chain up to seq {}, the log ends at seq {after}",
                        after + 1,
                        c.id,
                        c.kind,
                        c.seq
                    ),
                );
            } else if last.is_none() && c.seq > 0 {
                // Everything was pruned: the prune checkpoint stands alone and must be genuine.
                if let Some(why) = self.bad_signature(c) {
                    self.fail(
                        None,
                        format!("checkpoint #{} at seq {}: {why}", c.id, c.seq),
                    );
                }
            } else if let Some(why) = (c.seq == 0).then(|| self.bad_signature(c)).flatten() {
                self.fail(None, format!("checkpoint #{} at seq 0: {why}", c.id));
            }
        }
        Verified {
            rows: self.rows,
            checkpoints: checkpoints.len() as u64,
            problem: self.problem,
            unsigned: self.unsigned,
        }
    }
}

/// Checks a whole chain held in memory (see [`Verifier`]).
pub fn verify(rows: &[AuditRow], checkpoints: Vec<Checkpoint>, keys: &[VerifyingKey]) -> Verified {
    let mut v = Verifier::new(checkpoints, keys);
    for row in rows {
        v.row(row);
    }
    v.finish()
}

/// The hex SHA-256 of a share token: how the audit log (like the receiver's ledger) names a token.
pub fn token_id(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: usize) -> Vec<AuditRow> {
        let mut rows: Vec<AuditRow> = Vec::new();
        for i in 0..n {
            let mut act = Act::new(ActKind::TokenPublished, Side::Issuer)
                .partner("bank", "app-b")
                .session(&format!("s{i}"));
            act.vendor_data = Some("user-1".into());
            let (seq, hash) = rows
                .last()
                .map(|r| (r.seq, r.hash.clone()))
                .unwrap_or((0, GENESIS.to_string()));
            rows.push(Draft::from_act(act, Some(&[7u8; 32])).chain(seq, &hash));
        }
        rows
    }

    #[test]
    fn the_column_names_are_the_columns_in_order() {
        let names: Vec<&str> = chain(1)[0].columns().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, AuditRow::column_names());
    }

    #[test]
    fn act_names_round_trip_and_are_unique() {
        let names: std::collections::HashSet<_> = ActKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), ActKind::ALL.len());
        for k in ActKind::ALL {
            assert_eq!(ActKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(
            ActKind::parse("notice_acknowledged"),
            Some(ActKind::NoticeAcknowledged)
        );
        assert_eq!(ActKind::parse("nope"), None);
    }

    #[test]
    fn vendor_data_is_stored_only_as_a_keyed_hash() {
        let rows = chain(1);
        let h = rows[0].vendor_data_hash.clone().unwrap();
        assert_eq!(h, keyed_hash(&[7u8; 32], "user-1"));
        assert_ne!(h, keyed_hash(&[8u8; 32], "user-1"));
        assert!(!h.contains("user-1"));
        let key = SigningKey::generate();
        assert_eq!(vendor_data_key(Some(&key)), vendor_data_key(Some(&key)));
        assert_eq!(vendor_data_key(None), None);
    }

    #[test]
    fn an_intact_chain_verifies_and_each_tampering_names_its_row() {
        let key = SigningKey::generate();
        let keys = [key.verifying_key()];
        let rows = chain(5);
        let cp = sign_checkpoint(1, kinds::PERIODIC, 5, &rows[4].hash, Some(&key));
        assert_eq!(verify(&rows, vec![cp.clone()], &keys).problem, None);

        // Altered.
        let mut altered = rows.clone();
        altered[2].partner = Some("someone-else".into());
        assert_eq!(
            verify(&altered, vec![cp.clone()], &keys)
                .problem
                .unwrap()
                .seq,
            Some(3)
        );
        // Removed.
        let mut removed = rows.clone();
        removed.remove(1);
        assert_eq!(
            verify(&removed, vec![cp.clone()], &keys)
                .problem
                .unwrap()
                .seq,
            Some(3)
        );
        // Inserted (a made-up row at the end).
        let mut inserted = rows.clone();
        let mut extra = rows[4].clone();
        extra.seq = 6;
        extra.prev_hash = rows[4].hash.clone();
        inserted.push(extra);
        assert_eq!(
            verify(&inserted, vec![cp.clone()], &keys)
                .problem
                .unwrap()
                .seq,
            Some(6)
        );
        // The last row removed: the checkpoint names the gap.
        let truncated = rows[..4].to_vec();
        assert_eq!(
            verify(&truncated, vec![cp.clone()], &keys)
                .problem
                .unwrap()
                .seq,
            Some(5)
        );
        // A rewritten chain (hashes recomputed after an edit) no longer matches the signed checkpoint.
        let mut rewritten = rows.clone();
        rewritten[4].status = Some("x".into());
        rewritten[4].hash = row_hash(&rewritten[4]);
        assert_eq!(
            verify(&rewritten, vec![cp.clone()], &keys)
                .problem
                .unwrap()
                .seq,
            Some(5)
        );
    }

    #[test]
    fn checkpoint_signatures_are_checked_against_the_sides_keys() {
        let key = SigningKey::generate();
        let other = SigningKey::generate();
        let rows = chain(2);
        let cp = sign_checkpoint(1, kinds::SHUTDOWN, 2, &rows[1].hash, Some(&key));
        assert_eq!(
            verify(&rows, vec![cp.clone()], &[key.verifying_key()]).problem,
            None
        );
        let wrong = verify(&rows, vec![cp.clone()], &[other.verifying_key()]);
        assert!(
            wrong
                .problem
                .unwrap()
                .detail
                .contains("not one of this side's keys")
        );
        let mut forged = cp.clone();
        forged.at_ms += 1;
        let bad = verify(&rows, vec![forged], &[key.verifying_key()]);
        assert!(bad.problem.unwrap().detail.contains("does not verify"));
        let unsigned = sign_checkpoint(1, kinds::SHUTDOWN, 2, &rows[1].hash, None);
        assert!(
            verify(&rows, vec![unsigned.clone()], &[key.verifying_key()])
                .problem
                .is_some()
        );
        assert_eq!(verify(&rows, vec![unsigned], &[]).unsigned, 1);
    }

    #[test]
    fn a_pruned_chain_starts_at_a_prune_checkpoint_and_only_there() {
        let key = SigningKey::generate();
        let keys = [key.verifying_key()];
        let rows = chain(6);
        let prune = sign_checkpoint(2, kinds::PRUNE, 3, &rows[2].hash, Some(&key));
        assert_eq!(verify(&rows[3..], vec![prune.clone()], &keys).problem, None);
        // A periodic checkpoint does not license a missing prefix.
        let periodic = sign_checkpoint(1, kinds::PERIODIC, 3, &rows[2].hash, Some(&key));
        assert_eq!(
            verify(&rows[3..], vec![periodic], &keys)
                .problem
                .unwrap()
                .seq,
            Some(4)
        );
        // Rows removed past the prune point are caught.
        assert_eq!(
            verify(&rows[4..], vec![prune.clone()], &keys)
                .problem
                .unwrap()
                .seq,
            Some(5)
        );
        // Everything pruned: the checkpoint alone.
        let all = sign_checkpoint(3, kinds::PRUNE, 6, &rows[5].hash, Some(&key));
        assert_eq!(verify(&[], vec![all], &keys).problem, None);
    }
}
