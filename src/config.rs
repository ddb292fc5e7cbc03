//! Configuration: defaults in code, then a TOML file, then environment overrides `PARTNER_BRIDGE__SECTION__KEY`;
//! secrets from the environment or from `*_file` paths.
//!
//! [`Config::load`] builds the value and [`Config::validate`] checks it before anything connects; both fail with
//! a [`ConfigError`] that names the offending key, which `main` turns into exit code 64. This module owns the
//! shape of the file (`deploy/config.example.toml` documents every key) and nothing that uses it.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::didit::wire::{SessionKind, SessionStatus};
use crate::ledger::pg_tls::{PgTls, PgTlsSettings, SslMode};
use crate::secret::{Secret, SecretSource, SecretUrl, read_secret_file};

/// The prefix of environment overrides: `PARTNER_BRIDGE__AMQP__URL` sets `amqp.url`.
pub const ENV_PREFIX: &str = "PARTNER_BRIDGE";

/// An invalid configuration: the key (dotted path, e.g. `issuer.partners[0].ttl_seconds`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: `{key}`: {reason}")]
pub struct ConfigError {
    /// The dotted key that is wrong.
    pub key: String,
    /// What is wrong with it, for a person.
    pub reason: String,
}

impl ConfigError {
    /// A new error about `key`.
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for local state: the embedded ledger lives here.
    pub state_dir: PathBuf,
    /// Didit API access shared by both roles unless a role overrides it.
    pub didit: DiditConfig,
    /// The RabbitMQ broker and topology naming.
    pub amqp: AmqpConfig,
    /// The admin HTTP server (`/metrics`, `/livez`, `/readyz`).
    pub admin: AdminConfig,
    /// Bounds of every HTTP server (the admin server and the webhook listener).
    pub http: HttpConfig,
    /// Backoff, holding limits and attempts for Didit calls.
    pub retry: RetryConfig,
    /// The idempotency ledger.
    pub ledger: LedgerConfig,
    /// The audit log (in the ledger's database).
    pub audit: AuditConfig,
    /// Log output.
    pub log: LogConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// The issuer role: onboarding events in, share tokens out.
    pub issuer: IssuerConfig,
    /// The receiver role: share tokens in, imports and outcomes out.
    pub receiver: ReceiverConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/partner-bridge"),
            didit: DiditConfig::default(),
            amqp: AmqpConfig::default(),
            admin: AdminConfig::default(),
            http: HttpConfig::default(),
            retry: RetryConfig::default(),
            ledger: LedgerConfig::default(),
            audit: AuditConfig::default(),
            log: LogConfig::default(),
            shutdown: ShutdownConfig::default(),
            issuer: IssuerConfig::default(),
            receiver: ReceiverConfig::default(),
        }
    }
}

/// `[didit]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiditConfig {
    /// Base URL of the verification API, without `/v3`.
    pub base_url: String,
    /// This side's Didit application id (roles may override).
    pub application_id: Option<String>,
    /// The API key, inline (prefer env `PARTNER_BRIDGE__DIDIT__API_KEY` or `api_key_file`).
    pub api_key: Option<Secret>,
    /// A file holding the API key; re-read when Didit rejects the key, so rotation needs no restart.
    pub api_key_file: Option<PathBuf>,
    /// Whole-request timeout for one Didit call.
    pub timeout_ms: u64,
    /// TCP + TLS connect timeout.
    pub connect_timeout_ms: u64,
    /// Writes (share, import) this process sends per API key within one `rate_window_ms`; `0` switches pacing off
    /// (a 429 still stops every caller of the key until its `Retry-After`). Didit's limit is 300; replicas sharing
    /// a key each take their part (300 / N).
    pub writes_per_minute: u32,
    /// The sliding window Didit counts writes over (60 s). Only a sandbox started with another window needs another
    /// value.
    pub rate_window_ms: u64,
}

impl DiditConfig {
    /// The window writes are counted over.
    pub fn rate_window(&self) -> Duration {
        Duration::from_millis(self.rate_window_ms)
    }
}

impl Default for DiditConfig {
    fn default() -> Self {
        Self {
            base_url: "https://verification.didit.me".into(),
            application_id: None,
            api_key: None,
            api_key_file: None,
            timeout_ms: 10_000,
            connect_timeout_ms: 3_000,
            writes_per_minute: 300,
            rate_window_ms: 60_000,
        }
    }
}

/// `[amqp]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// Broker URL (`amqp://` or `amqps://`); intake and reshare consumers, results and the receiver's tokens.
    /// Several nodes of one cluster may be given as a comma-separated list (`amqp://n1/…,amqp://n2/…`).
    pub url: Option<SecretUrl>,
    /// The nodes of a RabbitMQ cluster, instead of `url`: every link connects to the first that answers and moves
    /// to the next one (round-robin) when its node goes away.
    pub urls: Vec<SecretUrl>,
    /// A file holding the broker URL.
    pub url_file: Option<PathBuf>,
    /// Replaces `partner-bridge` in every exchange and queue name.
    pub prefix: String,
    /// Unacknowledged deliveries per consumer; also the number of messages handled at once.
    pub prefetch: u16,
    /// How long to wait for a publisher confirm before the publish counts as failed.
    pub confirm_timeout_ms: u64,
    /// `x-delivery-limit` of every quorum queue: redeliveries before the broker dead-letters a message.
    pub delivery_limit: u32,
    /// How long a message waits in a `.retry` queue before it returns to its queue (the queue's TTL).
    pub retry_delay_ms: u64,
    /// `classic` (default) or `quorum`: the type of the `.retry` queues. A classic queue lives on one node, so on a
    /// cluster choose `quorum` (a changed type needs the `.retry` queues drained and deleted first).
    pub retry_queue_type: String,
    /// Larger message bodies are dead-lettered as `oversized` without being parsed.
    pub max_message_bytes: usize,
    /// AMQP heartbeat in seconds.
    pub heartbeat_s: u16,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: None,
            url_file: None,
            urls: Vec::new(),
            prefix: "partner-bridge".into(),
            prefetch: 64,
            confirm_timeout_ms: 10_000,
            delivery_limit: 20,
            retry_delay_ms: 30_000,
            retry_queue_type: "classic".into(),
            max_message_bytes: 256 * 1024,
            heartbeat_s: 30,
        }
    }
}

/// The broker URL used when none is configured: a local RabbitMQ.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// `[admin]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin server.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9464".parse().expect("static address"),
        }
    }
}

/// `[http]`: bounds applied to each connection of the admin server and the webhook listener (see
/// [`crate::http_server`]).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Request line and headers must arrive within this, in milliseconds.
    pub header_read_timeout_ms: u64,
    /// The request body must have arrived this long after its head, in milliseconds.
    pub request_timeout_ms: u64,
    /// A connection with no I/O for this long while no request is handled is closed, in milliseconds.
    pub idle_timeout_ms: u64,
    /// Connections served at once per listener; more are closed at once.
    pub max_connections: usize,
    /// Largest request line plus headers, in bytes (8192..=1048576).
    pub max_header_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        let limits = crate::http_server::HttpLimits::default();
        Self {
            header_read_timeout_ms: millis(limits.header_read_timeout),
            request_timeout_ms: millis(limits.request_timeout),
            idle_timeout_ms: millis(limits.idle_timeout),
            max_connections: limits.max_connections,
            max_header_bytes: limits.max_header_bytes,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl HttpConfig {
    /// The limits [`crate::http_server::serve`] applies.
    pub fn limits(&self) -> crate::http_server::HttpLimits {
        crate::http_server::HttpLimits {
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_connections: self.max_connections,
            max_header_bytes: self.max_header_bytes,
        }
    }

    fn validate(&self, p: &mut Problems) {
        // Zero would disable a bound (or, for hyper's timer, close every connection at once); a day is far past any
        // sane value and keeps Duration arithmetic clear of overflow.
        for (value, key) in [
            (self.header_read_timeout_ms, "http.header_read_timeout_ms"),
            (self.request_timeout_ms, "http.request_timeout_ms"),
            (self.idle_timeout_ms, "http.idle_timeout_ms"),
        ] {
            if value == 0 || value > 86_400_000 {
                p.push(ConfigError::new(
                    key,
                    format!("must be between 1 and 86400000 (got {value})"),
                ));
            }
        }
        if self.max_connections == 0 || self.max_connections > 1_000_000 {
            p.push(ConfigError::new(
                "http.max_connections",
                format!(
                    "must be between 1 and 1000000 (got {})",
                    self.max_connections
                ),
            ));
        }
        let min = crate::http_server::MIN_HEADER_BYTES;
        if !(min..=1_048_576).contains(&self.max_header_bytes) {
            p.push(ConfigError::new(
                "http.max_header_bytes",
                format!(
                    "must be between {min} and 1048576 (got {})",
                    self.max_header_bytes
                ),
            ));
        }
    }
}

/// `[retry]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// First backoff delay.
    pub initial_ms: u64,
    /// Largest backoff delay.
    pub max_ms: u64,
    /// Longest time one delivery is held in process (backoff and `Retry-After` waits) before it goes to `.retry`.
    pub hold_max_s: u64,
    /// Deliveries of one message (in-process budgets through the retry queue) before `retries_exhausted`.
    pub max_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_ms: 200,
            max_ms: 30_000,
            hold_max_s: 60,
            max_attempts: 10,
        }
    }
}

impl RetryConfig {
    /// First backoff delay.
    pub fn initial(&self) -> Duration {
        Duration::from_millis(self.initial_ms)
    }
    /// Largest backoff delay.
    pub fn max(&self) -> Duration {
        Duration::from_millis(self.max_ms)
    }
    /// Longest in-process hold of one delivery.
    pub fn hold_max(&self) -> Duration {
        Duration::from_secs(self.hold_max_s)
    }
}

/// `[ledger]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// `sqlite://PATH` or `postgres://…`; default `sqlite://<state_dir>/ledger.sqlite3`.
    pub url: Option<SecretUrl>,
    /// Rows older than this are pruned.
    pub retention_days: u32,
    /// The longest one ledger call may take (also PostgreSQL's `statement_timeout`); past it the ledger counts as
    /// unavailable and the pipelines pause.
    pub timeout_ms: u64,
    /// How long a claim on a key lasts without renewal. A live handler renews it every third of this; a replica
    /// that died leaves its keys to the others after at most this long.
    pub lease_ms: u64,
    /// PostgreSQL only: libpq's `sslmode` (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`); also read
    /// from the URL's `sslmode=`. Unset: `prefer`, with a warning for each connection left in plain text.
    pub sslmode: Option<String>,
    /// PostgreSQL only: the PEM file of the CA certificate(s) the server's certificate must chain to (libpq's
    /// `sslrootcert`, also read from the URL), or `system` for the machine's trusted CAs.
    pub ca_file: Option<PathBuf>,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            url: None,
            retention_days: 30,
            timeout_ms: 3000,
            lease_ms: 6000,
            sslmode: None,
            ca_file: None,
        }
    }
}

impl LedgerConfig {
    /// The longest one ledger call may take.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// How long a claim lasts without renewal.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    /// The PostgreSQL TLS settings, as written.
    pub fn tls_settings(&self) -> PgTlsSettings {
        PgTlsSettings {
            sslmode: self.sslmode.clone(),
            ca_file: self.ca_file.clone(),
        }
    }
}

/// `[audit]`: the audit log of every sharing act (docs/compliance.md), kept in the ledger's database.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Rows older than this are pruned, behind a signed `prune` checkpoint. Independent of
    /// `ledger.retention_days`: the default, 1825 (five years), is what EU AML rules ask for.
    pub retention_days: u32,
    /// How often the chain's head is signed and stored as a checkpoint (also written on shutdown).
    pub checkpoint_interval_secs: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention_days: 1825,
            checkpoint_interval_secs: 300,
        }
    }
}

impl AuditConfig {
    /// How often a checkpoint is written.
    pub fn checkpoint_interval(&self) -> Duration {
        Duration::from_secs(self.checkpoint_interval_secs)
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `json` (one object per line) or `pretty`.
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `partner_bridge=debug,lapin=warn`); `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable, for terminals.
    Pretty,
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long in-flight messages may take to finish after SIGTERM before they are handed back to the broker.
    pub grace_s: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_s: 20 }
    }
}

/// `[issuer]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IssuerConfig {
    /// Run the issuer role.
    #[serde(deserialize_with = "strict_bool")]
    pub enabled: bool,
    /// Overrides `didit.application_id` for this role.
    pub application_id: Option<String>,
    /// Overrides `didit.api_key` for this role.
    pub api_key: Option<Secret>,
    /// Overrides `didit.api_key_file` for this role.
    pub api_key_file: Option<PathBuf>,
    /// The Ed25519 signing key (base64 of 32 bytes), inline; prefer `signing_key_file`.
    pub signing_key: Option<Secret>,
    /// A key-set file written by `partner-bridge keygen` (one base64 key per line, the last one signs; `keygen
    /// --rotate` appends a new key). Re-read when it changes, so a rotated key signs without a restart.
    pub signing_key_file: Option<PathBuf>,
    /// Fresh tokens minted for one (session, partner) on reshare requests before they are refused.
    pub max_reshares: u32,
    /// Accept reshare requests without a signature, and from partners with no `public_keys` (never in production:
    /// anyone who can publish to the reshare exchange could then ask for tokens).
    #[serde(deserialize_with = "strict_bool")]
    pub allow_unsigned_reshare: bool,
    /// Messages handled at once (default: `amqp.prefetch`).
    pub concurrency: Option<usize>,
    /// Broker for publishing share tokens, when it differs from `amqp.url` (two organisations).
    pub tokens_url: Option<SecretUrl>,
    /// A file holding `tokens_url`.
    pub tokens_url_file: Option<PathBuf>,
    /// Didit webhooks as an event source.
    pub webhook: Option<WebhookConfig>,
    /// Seconds between sends of an erasure or rectification notice that its recipient has not acknowledged yet.
    pub notice_retry_secs: u64,
    /// The partners tokens are minted for.
    pub partners: Vec<PartnerConfig>,
}

impl Default for IssuerConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            application_id: None,
            api_key: None,
            api_key_file: None,
            signing_key: None,
            signing_key_file: None,
            max_reshares: 3,
            allow_unsigned_reshare: false,
            concurrency: None,
            tokens_url: None,
            tokens_url_file: None,
            webhook: None,
            notice_retry_secs: 300,
            partners: Vec::new(),
        }
    }
}

/// `[issuer.webhook]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Address of the webhook listener (never the admin port).
    pub listen: SocketAddr,
    /// The destination's `secret_shared_key`, inline; prefer `secret_file` or env.
    pub secret: Option<Secret>,
    /// A file holding the webhook secret (re-read on every delivery).
    pub secret_file: Option<PathBuf>,
    /// During a rotation: the next secret, inline; deliveries signed with it or with `secret` are accepted.
    pub next_secret: Option<Secret>,
    /// During a rotation: a file holding the next secret (re-read on every delivery); deliveries signed with it or
    /// with `secret_file`'s are accepted. Once Didit signs with the new one, move it to `secret_file` and drop this.
    pub next_secret_file: Option<PathBuf>,
    /// Also accept `X-Signature` (HMAC of the raw body) when `X-Signature-V2` is absent.
    #[serde(deserialize_with = "strict_bool")]
    pub accept_raw_signature: bool,
    /// Also accept `X-Signature-Simple` (covers only a few fields) when the others are absent.
    #[serde(deserialize_with = "strict_bool")]
    pub accept_simple_signature: bool,
    /// Deliveries whose signed timestamp (the body's `timestamp`, else `created_at`; never `X-Timestamp` alone) is
    /// further than this from now are refused.
    pub max_skew_s: u64,
    /// Larger bodies are refused with 413.
    pub max_body_bytes: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".parse().expect("static address"),
            secret: None,
            secret_file: None,
            next_secret: None,
            next_secret_file: None,
            accept_raw_signature: false,
            accept_simple_signature: false,
            max_skew_s: 300,
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// `[[issuer.partners]]`: one receiving application and what it may receive.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PartnerConfig {
    /// A short name used in metrics and logs.
    pub name: String,
    /// The partner's Didit application id (`for_application_id`).
    pub application_id: String,
    /// Lifetime of minted share tokens (60..=86400).
    #[serde(default = "default_ttl")]
    pub ttl_seconds: u32,
    /// Session statuses this partner receives (either casing).
    #[serde(default = "default_statuses")]
    pub statuses: Vec<String>,
    /// Session kinds this partner receives.
    #[serde(default = "default_kinds")]
    pub session_kinds: Vec<SessionKind>,
    /// Whether `source_vendor_data` travels to this partner.
    #[serde(default, deserialize_with = "strict_bool")]
    pub share_vendor_data: bool,
    /// The partner receiver's Ed25519 public keys (base64, its `signing.pub`), which its `reshare.request`s must be
    /// signed with. Any listed key is accepted, so a receiver can rotate: list the new key, then drop the old one.
    #[serde(default)]
    pub public_keys: Vec<String>,
    /// Key-set files holding more such keys (the receiver's `signing.pub` as written by `keygen`, one key per
    /// line), accepted like `public_keys` and re-read when they change.
    #[serde(default)]
    pub public_key_files: Vec<PathBuf>,
    /// The broker this partner's share tokens go to (its own organisation's broker), when it differs from
    /// `issuer.tokens_url`; the issuer also consumes this partner's reshare requests there. Default:
    /// `issuer.tokens_url`, else `amqp.url`.
    #[serde(default)]
    pub tokens_url: Option<SecretUrl>,
    /// A file holding `tokens_url`.
    #[serde(default)]
    pub tokens_url_file: Option<PathBuf>,
    /// The reference of the data-sharing agreement with this partner: carried in every `share_token` and notice
    /// for it, and recorded in the audit log.
    #[serde(default)]
    pub agreement_id: Option<String>,
}

fn default_ttl() -> u32 {
    3600
}
fn default_statuses() -> Vec<String> {
    vec!["Approved".into()]
}
fn default_kinds() -> Vec<SessionKind> {
    vec![SessionKind::User, SessionKind::Business]
}

impl PartnerConfig {
    /// Whether an event with this status and kind goes to this partner.
    pub fn accepts(&self, status: SessionStatus, kind: SessionKind) -> bool {
        self.session_kinds.contains(&kind)
            && self
                .statuses
                .iter()
                .any(|s| SessionStatus::parse(s) == Some(status))
    }
}

/// `[receiver]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiverConfig {
    /// Run the receiver role.
    #[serde(deserialize_with = "strict_bool")]
    pub enabled: bool,
    /// Overrides `didit.application_id` for this role.
    pub application_id: Option<String>,
    /// Overrides `didit.api_key` for this role.
    pub api_key: Option<Secret>,
    /// Overrides `didit.api_key_file` for this role.
    pub api_key_file: Option<PathBuf>,
    /// The KYC workflow imported `user` sessions land in.
    pub workflow_user: Option<String>,
    /// The KYB workflow imported `business` sessions land in.
    pub workflow_business: Option<String>,
    /// Template of the imported session's `vendor_data`: `{source_vendor_data}`, `{source_session_id}`, `{issuer}`.
    pub vendor_data: String,
    /// Reshare requests for one session before an expired token is dead-lettered as `expired`.
    pub max_reshares: u32,
    /// The receiver's own Ed25519 signing key (base64 of 32 bytes), inline; prefer `signing_key_file` or env
    /// `PARTNER_BRIDGE__RECEIVER__SIGNING_KEY`. Signs `reshare.request`s; without it they go out unsigned, which
    /// issuers refuse unless they set `issuer.allow_unsigned_reshare`.
    pub signing_key: Option<Secret>,
    /// A key-set file with the receiver's signing keys written by `partner-bridge keygen` (the last one signs),
    /// re-read when it changes.
    pub signing_key_file: Option<PathBuf>,
    /// Accept envelopes without a signature (never in production).
    #[serde(deserialize_with = "strict_bool")]
    pub allow_unsigned: bool,
    /// Accept envelopes from issuers not listed below (never in production).
    #[serde(deserialize_with = "strict_bool")]
    pub allow_unknown_issuers: bool,
    /// Messages handled at once (default: `amqp.prefetch`).
    pub concurrency: Option<usize>,
    /// Declare `<prefix>.receiver.results`, bound to the imports exchange with `import.#`, so every
    /// `import.result` is kept until the backend reads it. Set false when the backend binds its own queue.
    #[serde(deserialize_with = "strict_bool")]
    pub results_queue: bool,
    /// The receiver's token queue instead of `<prefix>.receiver.tokens`: a second receiving application on the
    /// same broker and prefix needs a queue of its own (e.g. `<prefix>.receiver.<application id>.tokens`). Its
    /// notice queue follows the name (`app::receiver_notices_queue`).
    pub queue_name: Option<String>,
    /// What an erasure notice does here: `notify` (publish it to the backend only, the default) or `delete` (also
    /// delete the imported copy of the session in this Didit application).
    pub on_erasure: OnErasure,
    /// The issuers whose tokens are accepted.
    pub issuers: Vec<IssuerPeerConfig>,
}

/// `receiver.on_erasure`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnErasure {
    /// Publish the notice to the backend; the backend decides.
    #[default]
    Notify,
    /// Publish it and delete the imported session in this application's Didit.
    Delete,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            application_id: None,
            api_key: None,
            api_key_file: None,
            workflow_user: None,
            workflow_business: None,
            vendor_data: "{source_vendor_data}".into(),
            max_reshares: 3,
            signing_key: None,
            signing_key_file: None,
            allow_unsigned: false,
            allow_unknown_issuers: false,
            concurrency: None,
            results_queue: true,
            queue_name: None,
            on_erasure: OnErasure::Notify,
            issuers: Vec::new(),
        }
    }
}

/// `[[receiver.issuers]]`: one issuing application we trust.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerPeerConfig {
    /// A short name used in metrics and logs.
    pub name: String,
    /// The issuer's Didit application id (`from_application_id`).
    pub application_id: String,
    /// The issuer's Ed25519 public key, base64.
    #[serde(default)]
    pub public_key: Option<String>,
    /// More public keys of this issuer (base64); any of them is accepted, so the issuer can rotate: list the new
    /// key, let the issuer sign with it, then drop the old one.
    #[serde(default)]
    pub public_keys: Vec<String>,
    /// A key-set file with the issuer's public keys (its `signing.pub` as written by `keygen`, one key per line),
    /// accepted like `public_keys` and re-read when it changes.
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// Keep the issuer's decision on import (`true`) or land in review (`false`, the safe default).
    #[serde(default, deserialize_with = "strict_bool")]
    pub trust_review: bool,
    /// The data-sharing agreement with this issuer: when set, a `share_token` that carries another agreement id,
    /// or none, is dead-lettered `agreement_mismatch`.
    #[serde(default)]
    pub agreement_id: Option<String>,
}

/// Public keys given inline (decoded) and key-set files to read them from, each with its config key.
pub type KeySources = (Vec<crate::envelope::VerifyingKey>, Vec<(String, PathBuf)>);

/// Everything one role needs to call Didit, resolved from `[didit]` and the role's overrides.
#[derive(Debug, Clone)]
pub struct DiditAccess {
    /// Base URL without `/v3`.
    pub base_url: String,
    /// This role's application id.
    pub application_id: String,
    /// Where the API key comes from.
    pub api_key: SecretSource,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
}

impl Config {
    /// Builds the configuration from defaults, an optional TOML file and environment variables (`env` is passed
    /// in so that tests never touch the process environment). Does not validate; call [`Config::validate`].
    /// Fails with the first problem; [`Config::load_report`] gives all of them.
    pub fn load(file: Option<&Path>, env: HashMap<String, String>) -> Result<Config, ConfigError> {
        match Self::load_report(file, env) {
            (Some(config), errors) if errors.is_empty() => Ok(config),
            (_, mut errors) => Err(errors.remove(0)),
        }
    }

    /// Loads like [`Config::load`] but collects every problem of the file and the environment: unknown keys (with
    /// their full path, e.g. `issuer.partners[0].statuse`), values of the wrong type, and `PARTNER_BRIDGE_*`
    /// variables that match no key. A key that is wrong is left at its default and loading goes on, so the
    /// configuration comes back too (for [`Config::problems`]) unless something required is missing.
    pub fn load_report(
        file: Option<&Path>,
        env: HashMap<String, String>,
    ) -> (Option<Config>, Vec<ConfigError>) {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                return (
                    None,
                    vec![ConfigError::new(
                        "--config",
                        format!("file {} does not exist", path.display()),
                    )],
                );
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let mut errors = unknown_env_vars(&env);
        let env: HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        let env_keys: HashMap<String, String> =
            env.keys().map(|var| (env_key(var), var.clone())).collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        let (config, more) = match builder.build() {
            Ok(raw) => deserialize_all(raw, &env_keys),
            Err(e) => (None, vec![from_config_error(e)]),
        };
        errors.extend(more);
        (config, errors)
    }

    /// Loads a TOML string (tests and the demo build configs this way).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(from_config_error)?;
        match deserialize_all(raw, &HashMap::new()) {
            (Some(config), errors) if errors.is_empty() => Ok(config),
            (_, mut errors) => Err(errors.remove(0)),
        }
    }

    /// Loads and validates, collecting every problem instead of the first (what the binary does for every command,
    /// so `check-config` lists them all). A key that was refused while loading takes its default; problems that
    /// default would cause are not reported a second time.
    pub fn load_checked(
        file: Option<&Path>,
        env: HashMap<String, String>,
    ) -> Result<Config, Vec<ConfigError>> {
        let (config, mut errors) = Self::load_report(file, env);
        let Some(config) = config else {
            return Err(errors);
        };
        let refused: Vec<String> = errors.iter().map(|e| e.key.clone()).collect();
        errors.extend(
            config
                .problems()
                .into_iter()
                .filter(|e| !refused.iter().any(|r| related_keys(r, &e.key))),
        );
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }

    /// Checks every rule the file format cannot express, reading each secret file once to prove it is there.
    /// Fails with the first problem; [`Config::problems`] gives all of them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.problems().into_iter().next() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Every problem [`Config::validate`] checks for, in the order of the file, so that `check-config` can name
    /// them all at once.
    pub fn problems(&self) -> Vec<ConfigError> {
        let mut p = Problems::default();
        if !self.issuer.enabled && !self.receiver.enabled {
            p.push(ConfigError::new(
                "issuer.enabled",
                "neither the issuer nor the receiver role is enabled; enable at least one",
            ));
        }
        if self.state_dir.as_os_str().is_empty() {
            p.push(ConfigError::new("state_dir", "must not be empty"));
        }
        p.check(check_base_url(&self.didit.base_url));
        p.check(positive(self.didit.timeout_ms, "didit.timeout_ms"));
        p.check(positive(
            self.didit.connect_timeout_ms,
            "didit.connect_timeout_ms",
        ));
        if !(100..=3_600_000).contains(&self.didit.rate_window_ms) {
            p.push(ConfigError::new(
                "didit.rate_window_ms",
                "must be between 100 and 3600000 (Didit's window is 60000)",
            ));
        }

        if let Some(amqp) = p.ok(self.amqp_url()) {
            let key = if self.amqp.urls.is_empty() {
                "amqp.url"
            } else {
                "amqp.urls"
            };
            p.check(check_addresses(&amqp, key));
        }
        if self.amqp.prefix.is_empty()
            || !self
                .amqp
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            p.push(ConfigError::new(
                "amqp.prefix",
                "must be non-empty and use only letters, digits, '-', '_' and '.'",
            ));
        }
        if self.amqp.prefetch == 0 {
            p.push(ConfigError::new("amqp.prefetch", "must be at least 1"));
        }
        p.check(positive(
            self.amqp.confirm_timeout_ms,
            "amqp.confirm_timeout_ms",
        ));
        if self.amqp.delivery_limit == 0 {
            p.push(ConfigError::new(
                "amqp.delivery_limit",
                "must be at least 1",
            ));
        }
        p.check(positive(self.amqp.retry_delay_ms, "amqp.retry_delay_ms"));
        if !["classic", "quorum"].contains(&self.amqp.retry_queue_type.as_str()) {
            p.push(ConfigError::new(
                "amqp.retry_queue_type",
                format!(
                    "must be \"classic\" or \"quorum\" (got {:?})",
                    self.amqp.retry_queue_type
                ),
            ));
        }
        if self.amqp.max_message_bytes < 1024 {
            p.push(ConfigError::new(
                "amqp.max_message_bytes",
                "must be at least 1024",
            ));
        }

        p.check(positive(self.retry.initial_ms, "retry.initial_ms"));
        if self.retry.max_ms < self.retry.initial_ms {
            p.push(ConfigError::new(
                "retry.max_ms",
                "must not be below retry.initial_ms",
            ));
        }
        p.check(positive(self.retry.hold_max_s, "retry.hold_max_s"));
        if self.retry.hold_max_s > 25 * 60 {
            p.push(ConfigError::new(
                "retry.hold_max_s",
                "must stay well below RabbitMQ's 30 minute delivery timeout (at most 1500)",
            ));
        }
        if self.retry.max_attempts == 0 {
            p.push(ConfigError::new("retry.max_attempts", "must be at least 1"));
        }

        let ledger = self.ledger_url();
        if !(ledger.expose().starts_with("sqlite://") || is_postgres(ledger.expose())) {
            p.push(ConfigError::new(
                "ledger.url",
                "must start with sqlite:// or postgres://",
            ));
        }
        if is_postgres(ledger.expose()) {
            // Reads the CA file, so that a missing one is a config error and not a failed start.
            p.check(
                PgTls::resolve(ledger.expose(), &self.ledger.tls_settings())
                    .map(drop)
                    .map_err(|e| ConfigError::new(e.key, e.reason)),
            );
        } else if let Some(mode) = &self.ledger.sslmode
            && SslMode::parse(mode).is_none()
        {
            p.push(ConfigError::new(
                "ledger.sslmode",
                format!("\"{mode}\" is not one of {}", SslMode::NAMES),
            ));
        }
        if self.ledger.retention_days == 0 {
            p.push(ConfigError::new(
                "ledger.retention_days",
                "must be at least 1",
            ));
        }
        if !(100..=60_000).contains(&self.ledger.timeout_ms) {
            p.push(ConfigError::new(
                "ledger.timeout_ms",
                "must be between 100 and 60000",
            ));
        }
        if !(1_000..=600_000).contains(&self.ledger.lease_ms) {
            p.push(ConfigError::new(
                "ledger.lease_ms",
                "must be between 1000 and 600000",
            ));
        } else if u128::from(self.ledger.timeout_ms) * 3 > u128::from(self.ledger.lease_ms) * 2 {
            // (Widened: with every problem reported at once, an out-of-range timeout_ms reaches this check too;
            // found by tests/it/fuzz.rs.)
            // A renewal (every third of the lease) that takes up to the timeout must still land before the lease
            // ends.
            p.push(ConfigError::new(
                "ledger.lease_ms",
                "must be at least 1.5 × ledger.timeout_ms, so that a slow renewal still lands in time",
            ));
        }
        if self.audit.retention_days == 0 || self.audit.retention_days > 36_500 {
            p.push(ConfigError::new(
                "audit.retention_days",
                "must be between 1 and 36500 (EU AML rules ask for 1825, five years)",
            ));
        }
        if !(1..=86_400).contains(&self.audit.checkpoint_interval_secs) {
            p.push(ConfigError::new(
                "audit.checkpoint_interval_secs",
                "must be between 1 and 86400",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            p.push(ConfigError::new(
                "log.level",
                format!("not a valid filter: {e}"),
            ));
        }

        self.http.validate(&mut p);

        if self.issuer.enabled {
            self.validate_issuer(&mut p);
        }
        if self.receiver.enabled {
            self.validate_receiver(&mut p);
        }
        if self.issuer.enabled
            && let Some(webhook) = &self.issuer.webhook
            && clash(webhook.listen, self.admin.listen)
        {
            p.push(ConfigError::new(
                "issuer.webhook.listen",
                "must differ from admin.listen",
            ));
        }
        p.0
    }

    fn validate_issuer(&self, p: &mut Problems) {
        let didit = p.ok(self.issuer_didit());
        if let Some(didit) = &didit {
            p.check(
                load_source(&didit.api_key, &self.role_key_name("issuer"))
                    .map(drop)
                    .map_err(|e| ConfigError::new(e.key, format!("the API key: {}", e.reason))),
            );
        }
        p.check(self.issuer_signing_keys().map(drop));
        p.check(self.tokens_url().map(drop));
        if self.issuer.concurrency == Some(0) {
            p.push(ConfigError::new("issuer.concurrency", "must be at least 1"));
        }
        if self.issuer.partners.is_empty() {
            p.push(ConfigError::new(
                "issuer.partners",
                "the issuer needs at least one [[issuer.partners]] entry",
            ));
        }
        let own = didit.map(|d| d.application_id);
        let mut names = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for (i, partner) in self.issuer.partners.iter().enumerate() {
            let key = |field: &str| format!("issuer.partners[{i}].{field}");
            p.check(check_name(&partner.name, &key("name")));
            if !names.insert(partner.name.clone()) {
                p.push(ConfigError::new(
                    key("name"),
                    format!("duplicate partner name {:?}", partner.name),
                ));
            }
            p.check(check_id(&partner.application_id, &key("application_id")));
            if own.as_ref() == Some(&partner.application_id) {
                p.push(ConfigError::new(
                    key("application_id"),
                    "must differ from the issuer's own application id (Didit refuses to share with yourself)",
                ));
            }
            if !ids.insert(partner.application_id.clone()) {
                p.push(ConfigError::new(key("application_id"), "listed twice"));
            }
            if !(60..=86_400).contains(&partner.ttl_seconds) {
                p.push(ConfigError::new(
                    key("ttl_seconds"),
                    format!("must be between 60 and 86400 (got {})", partner.ttl_seconds),
                ));
            }
            if partner.statuses.is_empty() {
                p.push(ConfigError::new(
                    key("statuses"),
                    "must list at least one status",
                ));
            }
            for (j, s) in partner.statuses.iter().enumerate() {
                match SessionStatus::parse(s) {
                    Some(st) if st.is_finished() => {}
                    Some(_) => p.push(ConfigError::new(
                        format!("issuer.partners[{i}].statuses[{j}]"),
                        format!(
                            "{s:?} is not a finished status; only Approved, Declined and In Review can be shared"
                        ),
                    )),
                    None => p.push(ConfigError::new(
                        format!("issuer.partners[{i}].statuses[{j}]"),
                        format!("unknown status {s:?}"),
                    )),
                }
            }
            if partner.session_kinds.is_empty() {
                p.push(ConfigError::new(
                    key("session_kinds"),
                    "must list at least one kind",
                ));
            }
            p.check(self.partner_public_keys(i).map(drop));
            p.check(self.partner_tokens_url(i).map(drop));
            p.check(check_agreement(
                partner.agreement_id.as_deref(),
                &key("agreement_id"),
            ));
        }
        if self.issuer.notice_retry_secs == 0 {
            p.push(ConfigError::new(
                "issuer.notice_retry_secs",
                "must be at least 1",
            ));
        }
        if let Some(webhook) = &self.issuer.webhook {
            match next_webhook_secret_source(webhook) {
                Some((SecretSource::Inline(secret), name)) if secret.is_empty() => {
                    p.push(ConfigError::new(name, "is empty"));
                }
                // A missing or empty file means no rotation is under way (see `warnings`); any other read error
                // is a mistake.
                Some((SecretSource::File(path), name)) => match std::fs::read_to_string(&path) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => p.push(ConfigError::new(
                        name,
                        format!("cannot read {}: {e}", path.display()),
                    )),
                },
                _ => {}
            }
            if let Some(source) = p.ok(self.webhook_secret_source(webhook)) {
                p.check(load_source(&source, webhook_secret_name(webhook)).map(drop));
            }
            if webhook.max_skew_s == 0 {
                p.push(ConfigError::new(
                    "issuer.webhook.max_skew_s",
                    "must be at least 1",
                ));
            }
            if webhook.max_body_bytes < 1024 {
                p.push(ConfigError::new(
                    "issuer.webhook.max_body_bytes",
                    "must be at least 1024",
                ));
            }
        }
    }

    fn validate_receiver(&self, p: &mut Problems) {
        if let Some(queue) = &self.receiver.queue_name
            && (queue.is_empty()
                || queue.len() > 200
                || !queue
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        {
            p.push(ConfigError::new(
                "receiver.queue_name",
                "must be 1-200 characters of letters, digits, '-', '_' and '.'",
            ));
        }
        if let Some(didit) = p.ok(self.receiver_didit()) {
            p.check(
                load_source(&didit.api_key, &self.role_key_name("receiver"))
                    .map(drop)
                    .map_err(|e| ConfigError::new(e.key, format!("the API key: {}", e.reason))),
            );
        }
        if self.receiver.workflow_user.is_none() && self.receiver.workflow_business.is_none() {
            p.push(ConfigError::new(
                "receiver.workflow_user",
                "set workflow_user and/or workflow_business: imports need a workflow of the token's kind",
            ));
        }
        if let Some(w) = &self.receiver.workflow_user {
            p.check(check_id(w, "receiver.workflow_user"));
        }
        if let Some(w) = &self.receiver.workflow_business {
            p.check(check_id(w, "receiver.workflow_business"));
        }
        p.check(check_template(&self.receiver.vendor_data));
        if self.receiver.concurrency == Some(0) {
            p.push(ConfigError::new(
                "receiver.concurrency",
                "must be at least 1",
            ));
        }
        if self.receiver.issuers.is_empty() && !self.receiver.allow_unknown_issuers {
            p.push(ConfigError::new(
                "receiver.issuers",
                "the receiver needs at least one [[receiver.issuers]] entry (or allow_unknown_issuers)",
            ));
        }
        let mut names = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for (i, peer) in self.receiver.issuers.iter().enumerate() {
            let key = |field: &str| format!("receiver.issuers[{i}].{field}");
            p.check(check_name(&peer.name, &key("name")));
            if !names.insert(peer.name.clone()) {
                p.push(ConfigError::new(
                    key("name"),
                    format!("duplicate issuer name {:?}", peer.name),
                ));
            }
            p.check(check_id(&peer.application_id, &key("application_id")));
            if !ids.insert(peer.application_id.clone()) {
                p.push(ConfigError::new(key("application_id"), "listed twice"));
            }
            p.check(self.issuer_public_keys(i).map(drop));
            p.check(check_agreement(
                peer.agreement_id.as_deref(),
                &key("agreement_id"),
            ));
        }
        p.check(self.receiver_signing_key().map(drop));
    }

    /// Where `role`'s API key comes from, for log lines and `/readyz`: the config key, and the path when it is a
    /// file (never the key itself).
    pub fn api_key_origin(&self, role: &str) -> String {
        let name = self.role_key_name(role);
        let file = match name.as_str() {
            "issuer.api_key_file" => &self.issuer.api_key_file,
            "receiver.api_key_file" => &self.receiver.api_key_file,
            "didit.api_key_file" => &self.didit.api_key_file,
            _ => &None,
        };
        match file {
            Some(path) => format!("{name} ({})", path.display()),
            None => name,
        }
    }

    fn role_key_name(&self, role: &str) -> String {
        let (inline, file) = match role {
            "issuer" => (&self.issuer.api_key, &self.issuer.api_key_file),
            _ => (&self.receiver.api_key, &self.receiver.api_key_file),
        };
        if inline.is_some() {
            format!("{role}.api_key")
        } else if file.is_some() {
            format!("{role}.api_key_file")
        } else if self.didit.api_key.is_some() {
            "didit.api_key".into()
        } else {
            "didit.api_key_file".into()
        }
    }

    fn didit_access(
        &self,
        role: &str,
        application_id: &Option<String>,
        api_key: &Option<Secret>,
        api_key_file: &Option<PathBuf>,
    ) -> Result<DiditAccess, ConfigError> {
        let application_id = application_id
            .clone()
            .or_else(|| self.didit.application_id.clone())
            .ok_or_else(|| {
                ConfigError::new(
                    "didit.application_id",
                    format!("required (or {role}.application_id)"),
                )
            })?;
        let id_key = if self.didit.application_id.as_ref() == Some(&application_id) {
            "didit.application_id".to_string()
        } else {
            format!("{role}.application_id")
        };
        check_id(&application_id, &id_key)?;
        let api_key = match (
            api_key,
            api_key_file,
            &self.didit.api_key,
            &self.didit.api_key_file,
        ) {
            (Some(k), _, _, _) => SecretSource::Inline(nonempty(k, &format!("{role}.api_key"))?),
            (None, Some(f), _, _) => SecretSource::File(f.clone()),
            (None, None, Some(k), _) => SecretSource::Inline(nonempty(k, "didit.api_key")?),
            (None, None, None, Some(f)) => SecretSource::File(f.clone()),
            (None, None, None, None) => {
                return Err(ConfigError::new(
                    "didit.api_key",
                    format!(
                        "required: set env PARTNER_BRIDGE__DIDIT__API_KEY, didit.api_key_file or {role}.api_key_file"
                    ),
                ));
            }
        };
        Ok(DiditAccess {
            base_url: self.didit.base_url.trim_end_matches('/').to_string(),
            application_id,
            api_key,
            timeout: Duration::from_millis(self.didit.timeout_ms),
            connect_timeout: Duration::from_millis(self.didit.connect_timeout_ms),
        })
    }

    /// Didit access for the issuer role.
    pub fn issuer_didit(&self) -> Result<DiditAccess, ConfigError> {
        self.didit_access(
            "issuer",
            &self.issuer.application_id,
            &self.issuer.api_key,
            &self.issuer.api_key_file,
        )
    }

    /// Didit access for the receiver role.
    pub fn receiver_didit(&self) -> Result<DiditAccess, ConfigError> {
        self.didit_access(
            "receiver",
            &self.receiver.application_id,
            &self.receiver.api_key,
            &self.receiver.api_key_file,
        )
    }

    /// The main broker URL (`amqp.url`, `amqp.url_file`, or a local RabbitMQ). With `amqp.urls`, the nodes as
    /// one comma-separated list, which [`crate::amqp::Link`] splits again ([`SecretUrl::addresses`]).
    pub fn amqp_url(&self) -> Result<SecretUrl, ConfigError> {
        if !self.amqp.urls.is_empty() {
            if self.amqp.url.is_some() || self.amqp.url_file.is_some() {
                return Err(ConfigError::new(
                    "amqp.urls",
                    "set either amqp.urls or amqp.url / amqp.url_file, not both",
                ));
            }
            return Ok(SecretUrl::list(&self.amqp.urls));
        }
        url_from(
            &self.amqp.url,
            &self.amqp.url_file,
            "amqp.url",
            Some(DEFAULT_AMQP_URL),
        )
    }

    /// The broker share tokens are published to (`issuer.tokens_url`, else `amqp.url`).
    pub fn tokens_url(&self) -> Result<SecretUrl, ConfigError> {
        if self.issuer.tokens_url.is_none() && self.issuer.tokens_url_file.is_none() {
            return self.amqp_url();
        }
        let url = url_from(
            &self.issuer.tokens_url,
            &self.issuer.tokens_url_file,
            "issuer.tokens_url",
            None,
        )?;
        check_addresses(&url, "issuer.tokens_url")?;
        Ok(url)
    }

    /// The broker partner `i`'s share tokens go to (and its reshare requests come from):
    /// `issuer.partners[i].tokens_url`, else [`Config::tokens_url`].
    pub fn partner_tokens_url(&self, i: usize) -> Result<SecretUrl, ConfigError> {
        let partner = &self.issuer.partners[i];
        if partner.tokens_url.is_none() && partner.tokens_url_file.is_none() {
            return self.tokens_url();
        }
        let key = format!("issuer.partners[{i}].tokens_url");
        let url = url_from(&partner.tokens_url, &partner.tokens_url_file, &key, None)?;
        check_url(url.expose(), &key, &["amqp", "amqps"])?;
        Ok(url)
    }

    /// Every broker the issuer's share tokens go to, each with the indices of the partners it serves: first the
    /// default ([`Config::tokens_url`], possibly serving no partner), then each other broker named by a partner's
    /// own `tokens_url`, in the order the partners are listed. Brokers are told apart by their URL.
    pub fn token_brokers(&self) -> Result<Vec<(SecretUrl, Vec<usize>)>, ConfigError> {
        let mut brokers: Vec<(SecretUrl, Vec<usize>)> = vec![(self.tokens_url()?, Vec::new())];
        for i in 0..self.issuer.partners.len() {
            let url = self.partner_tokens_url(i)?;
            match brokers.iter_mut().find(|(u, _)| u.expose() == url.expose()) {
                Some((_, partners)) => partners.push(i),
                None => brokers.push((url, vec![i])),
            }
        }
        Ok(brokers)
    }

    /// The ledger URL, defaulting to SQLite under `state_dir`.
    pub fn ledger_url(&self) -> SecretUrl {
        self.ledger.url.clone().unwrap_or_else(|| {
            SecretUrl::new(format!(
                "sqlite://{}",
                self.state_dir.join("ledger.sqlite3").display()
            ))
        })
    }

    /// Where the issuer's signing key comes from.
    pub fn signing_key_source(&self) -> Result<SecretSource, ConfigError> {
        match (&self.issuer.signing_key, &self.issuer.signing_key_file) {
            (Some(k), _) => Ok(SecretSource::Inline(k.clone())),
            (None, Some(f)) => Ok(SecretSource::File(f.clone())),
            (None, None) => Err(ConfigError::new(
                "issuer.signing_key_file",
                "required: the issuer signs every envelope (create one with `partner-bridge keygen --out DIR`)",
            )),
        }
    }

    /// Where the webhook secret comes from.
    pub fn webhook_secret_source(
        &self,
        webhook: &WebhookConfig,
    ) -> Result<SecretSource, ConfigError> {
        match (&webhook.secret, &webhook.secret_file) {
            (Some(s), _) => Ok(SecretSource::Inline(s.clone())),
            (None, Some(f)) => Ok(SecretSource::File(f.clone())),
            (None, None) => Err(ConfigError::new(
                "issuer.webhook.secret_file",
                "required when [issuer.webhook] is set (or env PARTNER_BRIDGE__ISSUER__WEBHOOK__SECRET)",
            )),
        }
    }

    /// Where the public keys of `receiver.issuers[index]` come from: `public_key` and `public_keys` (decoded), and
    /// `public_key_file` (a key-set file, with its config key). At least one is required.
    pub fn issuer_key_sources(&self, index: usize) -> Result<KeySources, ConfigError> {
        let peer = &self.receiver.issuers[index];
        let mut fixed = Vec::new();
        if let Some(text) = &peer.public_key {
            fixed.push(decode_public(
                text,
                format!("receiver.issuers[{index}].public_key"),
            )?);
        }
        for (j, text) in peer.public_keys.iter().enumerate() {
            fixed.push(decode_public(
                text,
                format!("receiver.issuers[{index}].public_keys[{j}]"),
            )?);
        }
        let files: Vec<(String, PathBuf)> = peer
            .public_key_file
            .iter()
            .map(|f| {
                (
                    format!("receiver.issuers[{index}].public_key_file"),
                    f.clone(),
                )
            })
            .collect();
        if fixed.is_empty() && files.is_empty() {
            return Err(ConfigError::new(
                format!("receiver.issuers[{index}].public_key"),
                "required: the issuer's Ed25519 public key (base64), or public_keys, or public_key_file",
            ));
        }
        Ok((fixed, files))
    }

    /// Every public key `receiver.issuers[index]` is accepted with now (`public_key`, `public_keys`, then the keys of
    /// `public_key_file`).
    pub fn issuer_public_keys(
        &self,
        index: usize,
    ) -> Result<Vec<crate::envelope::VerifyingKey>, ConfigError> {
        let (mut keys, files) = self.issuer_key_sources(index)?;
        for (name, path) in files {
            keys.extend(read_public_set(&name, &path)?);
        }
        Ok(keys)
    }

    /// Where the reshare keys of `issuer.partners[index]` come from: `public_keys` (decoded) and `public_key_files`
    /// (key-set files, with their config keys).
    pub fn partner_key_sources(&self, index: usize) -> Result<KeySources, ConfigError> {
        let partner = &self.issuer.partners[index];
        let mut fixed = Vec::new();
        for (j, text) in partner.public_keys.iter().enumerate() {
            fixed.push(decode_public(
                text,
                format!("issuer.partners[{index}].public_keys[{j}]"),
            )?);
        }
        let files = partner
            .public_key_files
            .iter()
            .enumerate()
            .map(|(j, f)| {
                (
                    format!("issuer.partners[{index}].public_key_files[{j}]"),
                    f.clone(),
                )
            })
            .collect();
        Ok((fixed, files))
    }

    /// The decoded reshare keys of `issuer.partners[index]`: `public_keys`, then every key of `public_key_files`
    /// (empty when the partner has none; see [`Config::warnings`]).
    pub fn partner_public_keys(
        &self,
        index: usize,
    ) -> Result<Vec<crate::envelope::VerifyingKey>, ConfigError> {
        let (mut keys, files) = self.partner_key_sources(index)?;
        for (name, path) in files {
            keys.extend(read_public_set(&name, &path)?);
        }
        Ok(keys)
    }

    /// Every public key this configuration names (inline or in readable files), on both sides: a signing key equal
    /// to one of them is a public key given where a private one belongs.
    pub fn known_public_keys(&self) -> Vec<crate::envelope::VerifyingKey> {
        let mut out = Vec::new();
        for i in 0..self.receiver.issuers.len() {
            if let Ok(keys) = self.issuer_public_keys(i) {
                out.extend(keys);
            }
        }
        for i in 0..self.issuer.partners.len() {
            if let Ok(keys) = self.partner_public_keys(i) {
                out.extend(keys);
            }
        }
        out
    }

    /// The issuer's signing key set (the last one signs), with the config key it was given under.
    pub fn issuer_signing_keys(&self) -> Result<Vec<crate::envelope::SigningKey>, ConfigError> {
        let source = self.signing_key_source()?;
        signing_set(
            &source,
            signing_key_name(&self.issuer),
            &self.known_public_keys(),
        )
    }

    /// Where the receiver's signing keys come from, with the config key, when configured.
    pub fn receiver_signing_key_source(&self) -> Option<(SecretSource, &'static str)> {
        match (&self.receiver.signing_key, &self.receiver.signing_key_file) {
            (Some(k), _) => Some((SecretSource::Inline(k.clone()), "receiver.signing_key")),
            (None, Some(f)) => Some((SecretSource::File(f.clone()), "receiver.signing_key_file")),
            (None, None) => None,
        }
    }

    /// The receiver's signing key for `reshare.request`s (the newest of its set), when one is configured.
    pub fn receiver_signing_key(&self) -> Result<Option<crate::envelope::SigningKey>, ConfigError> {
        let Some((source, name)) = self.receiver_signing_key_source() else {
            return Ok(None);
        };
        let mut keys = signing_set(&source, name, &self.known_public_keys())?;
        Ok(keys.pop())
    }

    /// Valid but unsafe or incomplete settings, one sentence each, for `check-config` (stderr) and the startup log.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let ledger = self.ledger_url();
        if is_postgres(ledger.expose()) {
            if let Ok((_, tls)) = PgTls::resolve(ledger.expose(), &self.ledger.tls_settings())
                && !tls.explicit()
                && tls.mode() == SslMode::Prefer
            {
                out.push(
                    "ledger.sslmode is not set: the PostgreSQL ledger uses prefer, which falls back to plain text \
                     when the server refuses TLS (set require, verify-ca or verify-full; or disable to say plain \
                     text is intended)"
                        .into(),
                );
            }
        } else if self.ledger.sslmode.is_some() || self.ledger.ca_file.is_some() {
            out.push(
                "ledger.sslmode and ledger.ca_file apply to a PostgreSQL ledger only; the SQLite ledger ignores them"
                    .into(),
            );
        }
        if self.didit.writes_per_minute > 0
            && u128::from(self.retry.hold_max_s) * 1000 < u128::from(self.didit.rate_window_ms)
        {
            out.push(format!(
                "retry.hold_max_s ({} s) is shorter than didit.rate_window_ms ({} ms): in a backlog, writes waiting for the rate limit go through the retry queue (amqp.retry_delay_ms) instead of waiting in process, and drain slower",
                self.retry.hold_max_s, self.didit.rate_window_ms
            ));
        }
        if self.issuer.enabled {
            for (i, p) in self.issuer.partners.iter().enumerate() {
                if p.agreement_id.is_none() {
                    out.push(format!(
                        "issuer.partners[{i}] ({}) has no agreement_id: its tokens and the audit log name no data-sharing agreement",
                        p.name
                    ));
                }
            }
            for (i, p) in self.issuer.partners.iter().enumerate() {
                if p.public_keys.is_empty() && p.public_key_files.is_empty() {
                    out.push(if self.issuer.allow_unsigned_reshare {
                        format!(
                            "issuer.partners[{i}] ({}) has no public_keys: its reshare requests are accepted unverified (issuer.allow_unsigned_reshare)",
                            p.name
                        )
                    } else {
                        format!(
                            "issuer.partners[{i}] ({}) has no public_keys: its reshare requests are refused (no_partner_key)",
                            p.name
                        )
                    });
                }
            }
            if let Some(webhook) = &self.issuer.webhook
                && let Some(path) = &webhook.next_secret_file
                && webhook.next_secret.is_none()
                && read_secret_file(path).map_or(true, |s| s.is_empty())
            {
                out.push(format!(
                    "issuer.webhook.next_secret_file {} is missing or empty: only the current secret is accepted until it holds the next one",
                    path.display()
                ));
            }
            if self.issuer.allow_unsigned_reshare {
                out.push(
                    "issuer.allow_unsigned_reshare is set: unsigned reshare requests are honoured (never in production)"
                        .into(),
                );
            }
        }
        if self.receiver.enabled {
            for (i, p) in self.receiver.issuers.iter().enumerate() {
                if p.agreement_id.is_none() {
                    out.push(format!(
                        "receiver.issuers[{i}] ({}) has no agreement_id: its tokens are taken whatever agreement they name",
                        p.name
                    ));
                }
            }
        }
        if self.receiver.enabled
            && self.receiver.signing_key.is_none()
            && self.receiver.signing_key_file.is_none()
        {
            out.push(
                "receiver.signing_key_file is not set: reshare requests go out unsigned and issuers refuse them (unsigned)"
                    .into(),
            );
        }
        out
    }

    /// How many messages the issuer handles at once.
    pub fn issuer_concurrency(&self) -> usize {
        self.issuer
            .concurrency
            .unwrap_or(self.amqp.prefetch as usize)
    }

    /// How many messages the receiver handles at once.
    pub fn receiver_concurrency(&self) -> usize {
        self.receiver
            .concurrency
            .unwrap_or(self.amqp.prefetch as usize)
    }

    /// The configuration as TOML with every secret redacted, for `check-config`.
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

/// The problems found so far by [`Config::problems`]; the same problem found twice (both roles share `[didit]`) is
/// kept once.
#[derive(Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn push(&mut self, error: ConfigError) {
        if !self.0.contains(&error) {
            self.0.push(error);
        }
    }

    fn check(&mut self, result: Result<(), ConfigError>) {
        if let Err(error) = result {
            self.push(error);
        }
    }

    /// The value, or `None` with its error noted.
    fn ok<T>(&mut self, result: Result<T, ConfigError>) -> Option<T> {
        result.map_err(|error| self.push(error)).ok()
    }
}

/// `didit.base_url` is the origin only: the client appends `/v3/...` itself, so `https://verification.didit.me/v3`
/// would call `/v3/v3/...` and fail on the first event with a 404 instead of here.
fn check_base_url(url: &str) -> Result<(), ConfigError> {
    check_url(url, "didit.base_url", &["http", "https"])?;
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
    let host = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    if !rest.trim_end_matches('/').eq(host) {
        return Err(ConfigError::new(
            "didit.base_url",
            format!(
                "must be the API origin without a path (got {url:?}): the client appends /v3/... itself; use \"{scheme}://{host}\""
            ),
        ));
    }
    Ok(())
}

/// Reads a secret file: a missing, unreadable or empty file is an error naming `key` and the path.
fn secret_from_file(path: &Path, key: &str) -> Result<Secret, ConfigError> {
    let secret = read_secret_file(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
    if secret.is_empty() {
        return Err(ConfigError::new(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(secret)
}

/// The secret's current value; empty is an error (a file's names its path).
fn load_source(source: &SecretSource, key: &str) -> Result<Secret, ConfigError> {
    match source {
        SecretSource::Inline(secret) => nonempty(secret, key),
        SecretSource::File(path) => secret_from_file(path, key),
    }
}

/// Whether one key is the other or lies inside it (`issuer` and `issuer.enabled`, `a.b[0]` and `a.b[0].c`).
fn related_keys(a: &str, b: &str) -> bool {
    let inside = |outer: &str, inner: &str| {
        inner == outer
            || inner
                .strip_prefix(outer)
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
    };
    inside(a, b) || inside(b, a)
}

/// Two listeners on the same address cannot both bind, except on port 0, where the system picks a free port for each.
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a == b && a.port() != 0
}

fn signing_key_name(issuer: &IssuerConfig) -> &'static str {
    if issuer.signing_key.is_some() {
        "issuer.signing_key"
    } else {
        "issuer.signing_key_file"
    }
}

/// Where the next webhook secret comes from during a rotation (`next_secret`, else `next_secret_file`).
pub fn next_webhook_secret_source(webhook: &WebhookConfig) -> Option<(SecretSource, &'static str)> {
    match (&webhook.next_secret, &webhook.next_secret_file) {
        (Some(s), _) => Some((
            SecretSource::Inline(s.clone()),
            "issuer.webhook.next_secret",
        )),
        (None, Some(f)) => Some((
            SecretSource::File(f.clone()),
            "issuer.webhook.next_secret_file",
        )),
        (None, None) => None,
    }
}

fn decode_public(text: &str, key: String) -> Result<crate::envelope::VerifyingKey, ConfigError> {
    crate::envelope::VerifyingKey::from_base64(text.trim())
        .map_err(|e| ConfigError::new(key, e.to_string()))
}

fn read_public_set(
    name: &str,
    path: &Path,
) -> Result<Vec<crate::envelope::VerifyingKey>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(name, format!("cannot read {}: {e}", path.display())))?;
    if text.trim().is_empty() {
        return Err(ConfigError::new(
            name,
            format!("{} is empty", path.display()),
        ));
    }
    crate::keys::parse_public_set(&text, path).map_err(|e| ConfigError::new(name, e.to_string()))
}

/// Reads a signing key set from its source; `known` are the configuration's public keys (plus, for a file, the
/// `signing.pub` next to it), none of which may appear in it.
fn signing_set(
    source: &SecretSource,
    name: &str,
    known: &[crate::envelope::VerifyingKey],
) -> Result<Vec<crate::envelope::SigningKey>, ConfigError> {
    match source {
        SecretSource::Inline(secret) => {
            let key = crate::envelope::SigningKey::from_base64(secret.expose())
                .map_err(|e| ConfigError::new(name, e.to_string()))?;
            if let Some(p) = known.iter().find(|p| key.is_public_key(p)) {
                return Err(ConfigError::new(
                    name,
                    format!(
                        "holds a public key (key id {}), not a private signing key",
                        p.key_id()
                    ),
                ));
            }
            Ok(vec![key])
        }
        SecretSource::File(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(name, format!("cannot read {}: {e}", path.display()))
            })?;
            if text.trim().is_empty() {
                return Err(ConfigError::new(
                    name,
                    format!("{} is empty", path.display()),
                ));
            }
            let mut known = known.to_vec();
            known.extend(crate::keys::sibling_public_keys(path));
            crate::keys::parse_signing_set(&text, path, &known)
                .map_err(|e| ConfigError::new(name, e.to_string()))
        }
    }
}

fn webhook_secret_name(webhook: &WebhookConfig) -> &'static str {
    if webhook.secret.is_some() {
        "issuer.webhook.secret"
    } else {
        "issuer.webhook.secret_file"
    }
}

/// A PostgreSQL ledger URL.
fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

fn url_from(
    inline: &Option<SecretUrl>,
    file: &Option<PathBuf>,
    key: &str,
    default: Option<&str>,
) -> Result<SecretUrl, ConfigError> {
    match (inline, file) {
        (Some(u), _) => Ok(u.clone()),
        (None, Some(f)) => {
            secret_from_file(f, &format!("{key}_file")).map(|s| SecretUrl::new(s.expose()))
        }
        (None, None) => default
            .map(SecretUrl::new)
            .ok_or_else(|| ConfigError::new(key, "required")),
    }
}

fn nonempty(secret: &Secret, key: &str) -> Result<Secret, ConfigError> {
    if secret.is_empty() {
        Err(ConfigError::new(key, "is empty"))
    } else {
        Ok(secret.clone())
    }
}

fn positive(value: u64, key: &str) -> Result<(), ConfigError> {
    if value == 0 {
        Err(ConfigError::new(key, "must be greater than 0"))
    } else {
        Ok(())
    }
}

fn check_url(url: &str, key: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let scheme = url.split_once("://");
    match scheme {
        Some((s, rest)) if schemes.contains(&s) && !rest.is_empty() => Ok(()),
        _ => Err(ConfigError::new(
            key,
            format!("must be a URL starting with {}://", schemes.join(":// or ")),
        )),
    }
}

/// Every address of a broker setting (one URL, a comma-separated list or `amqp.urls`) is an `amqp(s)://` URL. A
/// list names the bad element: `amqp.urls[1]` (0-based), `amqp.url[1]` for a list in `amqp.url`.
fn check_addresses(url: &SecretUrl, key: &str) -> Result<(), ConfigError> {
    let addresses = url.addresses();
    let list = addresses.len() > 1 || key == "amqp.urls";
    for (i, address) in addresses.iter().enumerate() {
        let name = if list {
            format!("{key}[{i}]")
        } else {
            key.to_string()
        };
        check_url(address.expose(), &name, &["amqp", "amqps"])?;
    }
    Ok(())
}

/// Names end up in metric labels and routing keys: keep them short and plain.
fn check_name(name: &str, key: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ConfigError::new(
            key,
            "must be 1-64 characters of letters, digits, '-', '_' or '.'",
        ));
    }
    Ok(())
}

/// An agreement reference, when given: 1-128 printable characters, no surrounding blanks (it is compared exactly).
fn check_agreement(agreement: Option<&str>, key: &str) -> Result<(), ConfigError> {
    match agreement {
        None => Ok(()),
        Some(a) if a.trim().is_empty() => Err(ConfigError::new(
            key,
            "is empty (leave the key out when there is no agreement)",
        )),
        Some(a) if a.trim() != a || a.chars().count() > 128 || a.chars().any(char::is_control) => {
            Err(ConfigError::new(
                key,
                "must be 1-128 printable characters without leading or trailing blanks",
            ))
        }
        Some(_) => Ok(()),
    }
}

/// Didit ids are UUIDs; routing keys are built from them, so nothing else is allowed.
fn check_id(id: &str, key: &str) -> Result<(), ConfigError> {
    uuid::Uuid::parse_str(id)
        .map(|_| ())
        .map_err(|_| ConfigError::new(key, format!("must be a UUID (got {id:?})")))
}

fn check_template(template: &str) -> Result<(), ConfigError> {
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        let end = after
            .find('}')
            .ok_or_else(|| ConfigError::new("receiver.vendor_data", "unclosed '{'"))?;
        let name = &after[..end];
        if !["source_vendor_data", "source_session_id", "issuer"].contains(&name) {
            return Err(ConfigError::new(
                "receiver.vendor_data",
                format!(
                    "unknown placeholder {{{name}}}; use {{source_vendor_data}}, {{source_session_id}} or {{issuer}}"
                ),
            ));
        }
        rest = &after[end + 1..];
    }
    Ok(())
}

/// Turns the `config` crate's error into ours, keeping the key it names.
fn from_config_error(err: config::ConfigError) -> ConfigError {
    match &err {
        config::ConfigError::Type { key: Some(key), .. } => {
            ConfigError::new(key.clone(), err.to_string())
        }
        config::ConfigError::NotFound(key) => ConfigError::new(key.clone(), "not found"),
        config::ConfigError::Message(msg) => {
            // serde's messages look like "unknown field `foo`, expected one of ..." (sometimes followed by
            // " for key `section`"); name the field. A field name with a backtick in it (an environment variable
            // can be called anything) ends at "`, " instead; an empty name falls back to `config` (found by
            // tests/it/fuzz.rs: the error named no key at all).
            let key = msg
                .split('`')
                .nth(1)
                .filter(|field| !field.trim().is_empty())
                .or_else(|| {
                    msg.split_once('`')
                        .and_then(|(_, rest)| rest.split_once("`, "))
                        .map(|(field, _)| field)
                        .filter(|field| !field.trim().is_empty())
                })
                .map(|field| match msg.rsplit_once("for key `") {
                    Some((_, section)) => format!("{}.{field}", section.trim_end_matches('`')),
                    None => field.to_string(),
                })
                .unwrap_or_else(|| "config".to_string());
            ConfigError::new(key, msg.clone())
        }
        config::ConfigError::FileParse { uri, cause } => ConfigError::new(
            uri.clone().unwrap_or_else(|| "--config".into()),
            format!("not valid TOML: {cause}"),
        ),
        _ => ConfigError::new("config", err.to_string()),
    }
}

/// Booleans are `true` or `false` only. The `config` crate would also turn `"yes"`, `"on"`, `"1"` or `1` into
/// `true` (and an environment override is a string to begin with), so a typo such as `enabled = "flase"` would
/// silently mean something; here anything but a real boolean is an error. An environment override `true` or
/// `false` arrives as a boolean (`try_parsing`), so `PARTNER_BRIDGE__ISSUER__ENABLED=true` still works.
fn strict_bool<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    struct Strict;
    impl serde::de::Visitor<'_> for Strict {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("true or false (unquoted)")
        }
        fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<bool, E> {
            Ok(value)
        }
    }
    deserializer.deserialize_any(Strict)
}

/// The dotted key an override variable sets: `PARTNER_BRIDGE__AMQP__URL` → `amqp.url` (as the `config` crate maps it).
fn env_key(var: &str) -> String {
    var.strip_prefix(&format!("{ENV_PREFIX}__"))
        .unwrap_or(var)
        .to_lowercase()
        .replace("__", ".")
}

/// Variables named like ours that configure nothing: `PARTNER_BRIDGE_AMQP__URL` (one underscore after the prefix)
/// would otherwise be ignored without a word. `PARTNER_BRIDGE_CONFIG` is the `--config` flag's variable.
fn unknown_env_vars(env: &HashMap<String, String>) -> Vec<ConfigError> {
    let mut vars: Vec<&String> = env
        .keys()
        .filter(|k| {
            k.starts_with(&format!("{ENV_PREFIX}_"))
                && !k.starts_with(&format!("{ENV_PREFIX}__"))
                && k.as_str() != "PARTNER_BRIDGE_CONFIG"
                && !is_service_link(k)
        })
        .collect();
    vars.sort();
    vars.into_iter()
        .map(|var| {
            let rest = &var[ENV_PREFIX.len() + 1..];
            let hint = match nearest_env_key(rest) {
                Some(key) => format!(
                    "; did you mean {ENV_PREFIX}__{} (for `{key}`)?",
                    key.to_uppercase().replace('.', "__")
                ),
                None => String::new(),
            };
            ConfigError::new(
                var.clone(),
                format!(
                    "environment variable matches no configuration key: overrides are named \
                     {ENV_PREFIX}__SECTION__KEY, with two underscores between the parts{hint}"
                ),
            )
        })
        .collect()
}

/// Kubernetes puts `<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT`, `<SERVICE>_PORT_8080_TCP_ADDR` and the like into
/// every pod of a namespace for each Service (a Service named `partner-bridge-issuer-webhook` gives
/// `PARTNER_BRIDGE_ISSUER_WEBHOOK_SERVICE_HOST`); those are nobody's mistake.
fn is_service_link(var: &str) -> bool {
    if var.ends_with("_SERVICE_HOST")
        || var.ends_with("_SERVICE_PORT")
        || var.contains("_SERVICE_PORT_")
        || var.ends_with("_PORT")
    {
        return true;
    }
    // `_PORT_<number>_<protocol>`, optionally followed by `_PROTO`, `_PORT` or `_ADDR`.
    var.split("_PORT_").skip(1).any(|rest| {
        let mut parts = rest.split('_');
        let number = parts.next().unwrap_or("");
        let protocol = parts.next().unwrap_or("");
        let tail: Vec<&str> = parts.collect();
        !number.is_empty()
            && number.chars().all(|c| c.is_ascii_digit())
            && ["TCP", "UDP", "SCTP"].contains(&protocol)
            && matches!(tail.as_slice(), [] | ["PROTO"] | ["PORT"] | ["ADDR"])
    })
}

/// The configuration key `rest` (`AMQP_URL`, `issuer_webhook_secret`) most likely means: each `_` may separate
/// two parts of the key or belong to a name; the first reading that is a real key wins.
fn nearest_env_key(rest: &str) -> Option<String> {
    let parts: Vec<String> = rest
        .to_lowercase()
        .split('_')
        .filter(|part| !part.is_empty())
        .map(str::to_string)
        .collect();
    let gaps = parts.len().saturating_sub(1);
    if parts.is_empty() || gaps > 8 {
        return None;
    }
    // Fewer dots first: `state_dir` before `state.dir`.
    let mut masks: Vec<u32> = (0..1u32 << gaps).collect();
    masks.sort_by_key(|m| m.count_ones());
    masks.into_iter().find_map(|mask| {
        let mut key = parts[0].clone();
        for (i, part) in parts.iter().enumerate().skip(1) {
            key.push(if mask & (1 << (i - 1)) != 0 { '.' } else { '_' });
            key.push_str(part);
        }
        is_known_key(&key).then_some(key)
    })
}

/// Whether `key` (dotted) names a configuration key: setting it alone is not refused as unknown.
fn is_known_key(key: &str) -> bool {
    let Ok(raw) = config::Config::builder()
        .set_override(key, "x")
        .and_then(|b| b.build())
    else {
        return false;
    };
    match serde_path_to_error::deserialize::<_, Config>(raw) {
        Ok(_) => true,
        Err(err) => {
            // A section given as a plain value is not a key either.
            let message = err.inner().to_string();
            !message.starts_with("unknown field") && err.path().to_string() == key
        }
    }
}

/// One step of a path into the raw configuration value.
enum Step {
    Key(String),
    Index(usize),
}

/// Deserializes the merged configuration, collecting every unknown key and mistyped value instead of stopping at
/// the first: each failing key is reported with its full path, removed (so it takes its default), and the rest is
/// tried again. Stops at a missing required field, which cannot be removed.
fn deserialize_all(
    raw: config::Config,
    env_keys: &HashMap<String, String>,
) -> (Option<Config>, Vec<ConfigError>) {
    let mut value: config::Value = match raw.try_deserialize() {
        Ok(value) => value,
        Err(e) => return (None, vec![from_config_error(e)]),
    };
    let mut errors: Vec<ConfigError> = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    // Bounded, so that no input can keep it going.
    for _ in 0..100 {
        let err = match serde_path_to_error::deserialize::<_, Config>(value.clone()) {
            Ok(config) => return (Some(config), errors),
            Err(err) => err,
        };
        let mut path = err.path().to_string();
        if path == "." {
            path.clear();
        }
        let steps: Option<Vec<Step>> = err
            .path()
            .iter()
            .map(|segment| match segment {
                serde_path_to_error::Segment::Map { key } => Some(Step::Key(key.clone())),
                serde_path_to_error::Segment::Seq { index } => Some(Step::Index(*index)),
                _ => None,
            })
            .collect();
        let inner = err.into_inner();
        if let config::ConfigError::NotFound(field) = &inner {
            let key = join_key(&path, field.as_str());
            // Left out because it was mistyped: already reported.
            if !removed.contains(&key) {
                errors.push(ConfigError::new(key, "required"));
            }
            return (None, errors);
        }
        let message = without_key_suffix(inner.to_string());
        let key = if path.is_empty() {
            from_config_error(inner).key
        } else {
            path.clone()
        };
        let mut reason = message.clone();
        if message.starts_with("unknown field") {
            if let Some(better) = nearest_field(&message) {
                let parent = path.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
                reason = format!(
                    "unknown key; did you mean `{}`? ({message})",
                    join_key(parent, &better)
                );
            } else {
                reason = format!("unknown key ({message})");
            }
        }
        let mut named = key.clone();
        if let Some(var) = env_keys.get(&key) {
            reason = format!("{reason} (set by environment variable {var})");
            // A variable can be called anything: `PARTNER_BRIDGE__ ` names a blank key, so name the variable
            // instead (found by tests/it/fuzz.rs).
            if key
                .split(['.', '[', ']'])
                .any(|part| part.trim().is_empty() && !part.is_empty())
                || key.trim().is_empty()
            {
                named = var.clone();
            }
        }
        errors.push(ConfigError::new(named, reason));
        match steps {
            Some(steps) if !steps.is_empty() && remove_at(&mut value, &steps) => removed.push(key),
            _ => return (None, errors),
        }
    }
    (None, errors)
}

/// The `config` crate ends its messages with " for key `issuer.partners[0]`" (the parent, not the key); the error
/// names the key already.
fn without_key_suffix(mut message: String) -> String {
    if let Some(at) = message.rfind(" for key `")
        && message.ends_with('`')
    {
        message.truncate(at);
    }
    message
}

fn join_key(parent: &str, field: &str) -> String {
    if parent.is_empty() {
        field.to_string()
    } else {
        format!("{parent}.{field}")
    }
}

/// Removes the value at `steps`; false when there is none.
fn remove_at(value: &mut config::Value, steps: &[Step]) -> bool {
    let Some((last, parents)) = steps.split_last() else {
        return false;
    };
    let mut here = value;
    for step in parents {
        let next = match (step, &mut here.kind) {
            (Step::Key(k), config::ValueKind::Table(map)) => map.get_mut(k),
            (Step::Index(i), config::ValueKind::Array(items)) => items.get_mut(*i),
            _ => None,
        };
        match next {
            Some(next) => here = next,
            None => return false,
        }
    }
    match (last, &mut here.kind) {
        (Step::Key(k), config::ValueKind::Table(map)) => {
            let before = map.len();
            map.retain(|name, _| name != k);
            map.len() < before
        }
        (Step::Index(i), config::ValueKind::Array(items)) if *i < items.len() => {
            items.remove(*i);
            true
        }
        _ => false,
    }
}

/// The expected field closest to the unknown one in serde's "unknown field `x`, expected one of `a`, `b`".
fn nearest_field(message: &str) -> Option<String> {
    let mut quoted = message.split('`').skip(1).step_by(2);
    let unknown = quoted.next()?.to_lowercase();
    quoted
        .map(|candidate| (edit_distance(&unknown, candidate), candidate))
        .filter(|(d, candidate)| *d <= (candidate.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, candidate)| candidate.to_string())
}

/// Levenshtein distance, for "did you mean" hints.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
