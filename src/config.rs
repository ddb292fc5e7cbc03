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
    pub url: Option<SecretUrl>,
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
            prefix: "partner-bridge".into(),
            prefetch: 64,
            confirm_timeout_ms: 10_000,
            delivery_limit: 20,
            retry_delay_ms: 30_000,
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

    fn validate(&self) -> Result<(), ConfigError> {
        // Zero would disable a bound (or, for hyper's timer, close every connection at once); a day is far past any
        // sane value and keeps Duration arithmetic clear of overflow.
        for (value, key) in [
            (self.header_read_timeout_ms, "http.header_read_timeout_ms"),
            (self.request_timeout_ms, "http.request_timeout_ms"),
            (self.idle_timeout_ms, "http.idle_timeout_ms"),
        ] {
            if value == 0 || value > 86_400_000 {
                return Err(ConfigError::new(
                    key,
                    format!("must be between 1 and 86400000 (got {value})"),
                ));
            }
        }
        if self.max_connections == 0 || self.max_connections > 1_000_000 {
            return Err(ConfigError::new(
                "http.max_connections",
                format!(
                    "must be between 1 and 1000000 (got {})",
                    self.max_connections
                ),
            ));
        }
        let min = crate::http_server::MIN_HEADER_BYTES;
        if !(min..=1_048_576).contains(&self.max_header_bytes) {
            return Err(ConfigError::new(
                "http.max_header_bytes",
                format!(
                    "must be between {min} and 1048576 (got {})",
                    self.max_header_bytes
                ),
            ));
        }
        Ok(())
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
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            url: None,
            retention_days: 30,
            timeout_ms: 3000,
            lease_ms: 6000,
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
    pub enabled: bool,
    /// Overrides `didit.application_id` for this role.
    pub application_id: Option<String>,
    /// Overrides `didit.api_key` for this role.
    pub api_key: Option<Secret>,
    /// Overrides `didit.api_key_file` for this role.
    pub api_key_file: Option<PathBuf>,
    /// The Ed25519 signing key (base64 of 32 bytes), inline; prefer `signing_key_file`.
    pub signing_key: Option<Secret>,
    /// A file with the Ed25519 signing key written by `partner-bridge keygen`.
    pub signing_key_file: Option<PathBuf>,
    /// Fresh tokens minted for one (session, partner) on reshare requests before they are refused.
    pub max_reshares: u32,
    /// Accept reshare requests without a signature, and from partners with no `public_keys` (never in production:
    /// anyone who can publish to the reshare exchange could then ask for tokens).
    pub allow_unsigned_reshare: bool,
    /// Messages handled at once (default: `amqp.prefetch`).
    pub concurrency: Option<usize>,
    /// Broker for publishing share tokens, when it differs from `amqp.url` (two organisations).
    pub tokens_url: Option<SecretUrl>,
    /// A file holding `tokens_url`.
    pub tokens_url_file: Option<PathBuf>,
    /// Didit webhooks as an event source.
    pub webhook: Option<WebhookConfig>,
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
    /// A file holding the webhook secret.
    pub secret_file: Option<PathBuf>,
    /// Also accept `X-Signature` (HMAC of the raw body) when `X-Signature-V2` is absent.
    pub accept_raw_signature: bool,
    /// Also accept `X-Signature-Simple` (covers only a few fields) when the others are absent.
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
    #[serde(default)]
    pub share_vendor_data: bool,
    /// The partner receiver's Ed25519 public keys (base64, its `signing.pub`), which its `reshare.request`s must be
    /// signed with. Any listed key is accepted, so a receiver can rotate: list the new key, then drop the old one.
    #[serde(default)]
    pub public_keys: Vec<String>,
    /// Files holding more such keys (as written by `keygen`), accepted like `public_keys`.
    #[serde(default)]
    pub public_key_files: Vec<PathBuf>,
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
    /// A file with the receiver's signing key written by `partner-bridge keygen`.
    pub signing_key_file: Option<PathBuf>,
    /// Accept envelopes without a signature (never in production).
    pub allow_unsigned: bool,
    /// Accept envelopes from issuers not listed below (never in production).
    pub allow_unknown_issuers: bool,
    /// Messages handled at once (default: `amqp.prefetch`).
    pub concurrency: Option<usize>,
    /// Declare `<prefix>.receiver.results`, bound to the imports exchange with `import.#`, so every
    /// `import.result` is kept until the backend reads it. Set false when the backend binds its own queue.
    pub results_queue: bool,
    /// The issuers whose tokens are accepted.
    pub issuers: Vec<IssuerPeerConfig>,
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
    /// A file holding the public key (as written by `keygen`).
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// Keep the issuer's decision on import (`true`) or land in review (`false`, the safe default).
    #[serde(default)]
    pub trust_review: bool,
}

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
    pub fn load(file: Option<&Path>, env: HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::new(
                    "--config",
                    format!("file {} does not exist", path.display()),
                ));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let env: HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        );
        let raw = builder.build().map_err(from_config_error)?;
        raw.try_deserialize::<Config>().map_err(from_config_error)
    }

    /// Loads a TOML string (tests and the demo build configs this way).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(from_config_error)?;
        raw.try_deserialize::<Config>().map_err(from_config_error)
    }

    /// Checks every rule the file format cannot express, reading each secret file once to prove it is there.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.issuer.enabled && !self.receiver.enabled {
            return Err(ConfigError::new(
                "issuer.enabled",
                "neither the issuer nor the receiver role is enabled; enable at least one",
            ));
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err(ConfigError::new("state_dir", "must not be empty"));
        }
        check_url(&self.didit.base_url, "didit.base_url", &["http", "https"])?;
        positive(self.didit.timeout_ms, "didit.timeout_ms")?;
        positive(self.didit.connect_timeout_ms, "didit.connect_timeout_ms")?;
        if !(100..=3_600_000).contains(&self.didit.rate_window_ms) {
            return Err(ConfigError::new(
                "didit.rate_window_ms",
                "must be between 100 and 3600000 (Didit's window is 60000)",
            ));
        }

        let amqp = self.amqp_url()?;
        check_url(amqp.expose(), "amqp.url", &["amqp", "amqps"])?;
        if self.amqp.prefix.is_empty()
            || !self
                .amqp
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ConfigError::new(
                "amqp.prefix",
                "must be non-empty and use only letters, digits, '-', '_' and '.'",
            ));
        }
        if self.amqp.prefetch == 0 {
            return Err(ConfigError::new("amqp.prefetch", "must be at least 1"));
        }
        positive(self.amqp.confirm_timeout_ms, "amqp.confirm_timeout_ms")?;
        if self.amqp.delivery_limit == 0 {
            return Err(ConfigError::new(
                "amqp.delivery_limit",
                "must be at least 1",
            ));
        }
        positive(self.amqp.retry_delay_ms, "amqp.retry_delay_ms")?;
        if self.amqp.max_message_bytes < 1024 {
            return Err(ConfigError::new(
                "amqp.max_message_bytes",
                "must be at least 1024",
            ));
        }

        positive(self.retry.initial_ms, "retry.initial_ms")?;
        if self.retry.max_ms < self.retry.initial_ms {
            return Err(ConfigError::new(
                "retry.max_ms",
                "must not be below retry.initial_ms",
            ));
        }
        positive(self.retry.hold_max_s, "retry.hold_max_s")?;
        if self.retry.hold_max_s > 25 * 60 {
            return Err(ConfigError::new(
                "retry.hold_max_s",
                "must stay well below RabbitMQ's 30 minute delivery timeout (at most 1500)",
            ));
        }
        if self.retry.max_attempts == 0 {
            return Err(ConfigError::new("retry.max_attempts", "must be at least 1"));
        }

        let ledger = self.ledger_url();
        if !(ledger.expose().starts_with("sqlite://")
            || ledger.expose().starts_with("postgres://")
            || ledger.expose().starts_with("postgresql://"))
        {
            return Err(ConfigError::new(
                "ledger.url",
                "must start with sqlite:// or postgres://",
            ));
        }
        if self.ledger.retention_days == 0 {
            return Err(ConfigError::new(
                "ledger.retention_days",
                "must be at least 1",
            ));
        }
        if !(100..=60_000).contains(&self.ledger.timeout_ms) {
            return Err(ConfigError::new(
                "ledger.timeout_ms",
                "must be between 100 and 60000",
            ));
        }
        if !(1_000..=600_000).contains(&self.ledger.lease_ms) {
            return Err(ConfigError::new(
                "ledger.lease_ms",
                "must be between 1000 and 600000",
            ));
        }
        // A renewal (every third of the lease) that takes up to the timeout must still land before the lease ends.
        if self.ledger.timeout_ms * 3 > self.ledger.lease_ms * 2 {
            return Err(ConfigError::new(
                "ledger.lease_ms",
                "must be at least 1.5 × ledger.timeout_ms, so that a slow renewal still lands in time",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::new("log.level", format!("not a valid filter: {e}")))?;

        self.http.validate()?;

        if self.issuer.enabled {
            self.validate_issuer()?;
        }
        if self.receiver.enabled {
            self.validate_receiver()?;
        }
        if self.issuer.enabled
            && let Some(webhook) = &self.issuer.webhook
            && clash(webhook.listen, self.admin.listen)
        {
            return Err(ConfigError::new(
                "issuer.webhook.listen",
                "must differ from admin.listen",
            ));
        }
        Ok(())
    }

    fn validate_issuer(&self) -> Result<(), ConfigError> {
        self.issuer_didit()?.api_key.load().map_err(|e| {
            ConfigError::new(
                self.role_key_name("issuer"),
                format!("cannot read the API key: {e}"),
            )
        })?;
        self.signing_key_source()?
            .load()
            .map_err(|e| {
                ConfigError::new(signing_key_name(&self.issuer), format!("cannot read: {e}"))
            })
            .and_then(|s| {
                crate::envelope::SigningKey::from_base64(s.expose())
                    .map(|_| ())
                    .map_err(|e| ConfigError::new(signing_key_name(&self.issuer), e.to_string()))
            })?;
        self.tokens_url()?;
        if self.issuer.concurrency == Some(0) {
            return Err(ConfigError::new("issuer.concurrency", "must be at least 1"));
        }
        if self.issuer.partners.is_empty() {
            return Err(ConfigError::new(
                "issuer.partners",
                "the issuer needs at least one [[issuer.partners]] entry",
            ));
        }
        let own = self.issuer_didit()?.application_id;
        let mut names = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for (i, p) in self.issuer.partners.iter().enumerate() {
            let key = |field: &str| format!("issuer.partners[{i}].{field}");
            check_name(&p.name, &key("name"))?;
            if !names.insert(p.name.clone()) {
                return Err(ConfigError::new(
                    key("name"),
                    format!("duplicate partner name {:?}", p.name),
                ));
            }
            check_id(&p.application_id, &key("application_id"))?;
            if p.application_id == own {
                return Err(ConfigError::new(
                    key("application_id"),
                    "must differ from the issuer's own application id (Didit refuses to share with yourself)",
                ));
            }
            if !ids.insert(p.application_id.clone()) {
                return Err(ConfigError::new(key("application_id"), "listed twice"));
            }
            if !(60..=86_400).contains(&p.ttl_seconds) {
                return Err(ConfigError::new(
                    key("ttl_seconds"),
                    format!("must be between 60 and 86400 (got {})", p.ttl_seconds),
                ));
            }
            if p.statuses.is_empty() {
                return Err(ConfigError::new(
                    key("statuses"),
                    "must list at least one status",
                ));
            }
            for (j, s) in p.statuses.iter().enumerate() {
                match SessionStatus::parse(s) {
                    Some(st) if st.is_finished() => {}
                    Some(_) => {
                        return Err(ConfigError::new(
                            format!("issuer.partners[{i}].statuses[{j}]"),
                            format!(
                                "{s:?} is not a finished status; only Approved, Declined and In Review can be shared"
                            ),
                        ));
                    }
                    None => {
                        return Err(ConfigError::new(
                            format!("issuer.partners[{i}].statuses[{j}]"),
                            format!("unknown status {s:?}"),
                        ));
                    }
                }
            }
            if p.session_kinds.is_empty() {
                return Err(ConfigError::new(
                    key("session_kinds"),
                    "must list at least one kind",
                ));
            }
            self.partner_public_keys(i)?;
        }
        if let Some(webhook) = &self.issuer.webhook {
            self.webhook_secret_source(webhook)?
                .load()
                .map_err(|e| {
                    ConfigError::new(webhook_secret_name(webhook), format!("cannot read: {e}"))
                })
                .and_then(|s| {
                    if s.is_empty() {
                        Err(ConfigError::new(webhook_secret_name(webhook), "is empty"))
                    } else {
                        Ok(())
                    }
                })?;
            if webhook.max_skew_s == 0 {
                return Err(ConfigError::new(
                    "issuer.webhook.max_skew_s",
                    "must be at least 1",
                ));
            }
            if webhook.max_body_bytes < 1024 {
                return Err(ConfigError::new(
                    "issuer.webhook.max_body_bytes",
                    "must be at least 1024",
                ));
            }
        }
        Ok(())
    }

    fn validate_receiver(&self) -> Result<(), ConfigError> {
        self.receiver_didit()?.api_key.load().map_err(|e| {
            ConfigError::new(
                self.role_key_name("receiver"),
                format!("cannot read the API key: {e}"),
            )
        })?;
        if self.receiver.workflow_user.is_none() && self.receiver.workflow_business.is_none() {
            return Err(ConfigError::new(
                "receiver.workflow_user",
                "set workflow_user and/or workflow_business: imports need a workflow of the token's kind",
            ));
        }
        if let Some(w) = &self.receiver.workflow_user {
            check_id(w, "receiver.workflow_user")?;
        }
        if let Some(w) = &self.receiver.workflow_business {
            check_id(w, "receiver.workflow_business")?;
        }
        check_template(&self.receiver.vendor_data)?;
        if self.receiver.concurrency == Some(0) {
            return Err(ConfigError::new(
                "receiver.concurrency",
                "must be at least 1",
            ));
        }
        if self.receiver.issuers.is_empty() && !self.receiver.allow_unknown_issuers {
            return Err(ConfigError::new(
                "receiver.issuers",
                "the receiver needs at least one [[receiver.issuers]] entry (or allow_unknown_issuers)",
            ));
        }
        let mut names = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for (i, peer) in self.receiver.issuers.iter().enumerate() {
            let key = |field: &str| format!("receiver.issuers[{i}].{field}");
            check_name(&peer.name, &key("name"))?;
            if !names.insert(peer.name.clone()) {
                return Err(ConfigError::new(
                    key("name"),
                    format!("duplicate issuer name {:?}", peer.name),
                ));
            }
            check_id(&peer.application_id, &key("application_id"))?;
            if !ids.insert(peer.application_id.clone()) {
                return Err(ConfigError::new(key("application_id"), "listed twice"));
            }
            self.issuer_public_key(i)?;
        }
        self.receiver_signing_key()?;
        Ok(())
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

    /// The main broker URL (`amqp.url`, `amqp.url_file`, or a local RabbitMQ).
    pub fn amqp_url(&self) -> Result<SecretUrl, ConfigError> {
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
        check_url(url.expose(), "issuer.tokens_url", &["amqp", "amqps"])?;
        Ok(url)
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

    /// The decoded public key of `receiver.issuers[index]`.
    pub fn issuer_public_key(
        &self,
        index: usize,
    ) -> Result<crate::envelope::VerifyingKey, ConfigError> {
        let peer = &self.receiver.issuers[index];
        let (text, key) = match (&peer.public_key, &peer.public_key_file) {
            (Some(k), _) => (k.clone(), format!("receiver.issuers[{index}].public_key")),
            (None, Some(f)) => {
                let key = format!("receiver.issuers[{index}].public_key_file");
                let text = std::fs::read_to_string(f).map_err(|e| {
                    ConfigError::new(&key, format!("cannot read {}: {e}", f.display()))
                })?;
                (text, key)
            }
            (None, None) => {
                return Err(ConfigError::new(
                    format!("receiver.issuers[{index}].public_key"),
                    "required: the issuer's Ed25519 public key (base64), or public_key_file",
                ));
            }
        };
        crate::envelope::VerifyingKey::from_base64(text.trim())
            .map_err(|e| ConfigError::new(key, e.to_string()))
    }

    /// The decoded reshare keys of `issuer.partners[index]`: `public_keys`, then `public_key_files` (empty when
    /// the partner has none; see [`Config::warnings`]).
    pub fn partner_public_keys(
        &self,
        index: usize,
    ) -> Result<Vec<crate::envelope::VerifyingKey>, ConfigError> {
        let partner = &self.issuer.partners[index];
        let mut keys = Vec::new();
        for (j, text) in partner.public_keys.iter().enumerate() {
            let key = crate::envelope::VerifyingKey::from_base64(text.trim()).map_err(|e| {
                ConfigError::new(
                    format!("issuer.partners[{index}].public_keys[{j}]"),
                    e.to_string(),
                )
            })?;
            keys.push(key);
        }
        for (j, path) in partner.public_key_files.iter().enumerate() {
            let name = format!("issuer.partners[{index}].public_key_files[{j}]");
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(&name, format!("cannot read {}: {e}", path.display()))
            })?;
            let key = crate::envelope::VerifyingKey::from_base64(text.trim())
                .map_err(|e| ConfigError::new(&name, e.to_string()))?;
            keys.push(key);
        }
        Ok(keys)
    }

    /// The receiver's signing key for `reshare.request`s, when one is configured.
    pub fn receiver_signing_key(&self) -> Result<Option<crate::envelope::SigningKey>, ConfigError> {
        let (source, name) = match (&self.receiver.signing_key, &self.receiver.signing_key_file) {
            (Some(k), _) => (SecretSource::Inline(k.clone()), "receiver.signing_key"),
            (None, Some(f)) => (SecretSource::File(f.clone()), "receiver.signing_key_file"),
            (None, None) => return Ok(None),
        };
        let secret = source
            .load()
            .map_err(|e| ConfigError::new(name, format!("cannot read: {e}")))?;
        crate::envelope::SigningKey::from_base64(secret.expose())
            .map(Some)
            .map_err(|e| ConfigError::new(name, e.to_string()))
    }

    /// Valid but unsafe or incomplete settings, one sentence each, for `check-config` (stderr) and the startup log.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
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
            if self.issuer.allow_unsigned_reshare {
                out.push(
                    "issuer.allow_unsigned_reshare is set: unsigned reshare requests are honoured (never in production)"
                        .into(),
                );
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

fn webhook_secret_name(webhook: &WebhookConfig) -> &'static str {
    if webhook.secret.is_some() {
        "issuer.webhook.secret"
    } else {
        "issuer.webhook.secret_file"
    }
}

fn url_from(
    inline: &Option<SecretUrl>,
    file: &Option<PathBuf>,
    key: &str,
    default: Option<&str>,
) -> Result<SecretUrl, ConfigError> {
    match (inline, file) {
        (Some(u), _) => Ok(u.clone()),
        (None, Some(f)) => read_secret_file(f)
            .map(|s| SecretUrl::new(s.expose()))
            .map_err(|e| {
                ConfigError::new(
                    format!("{key}_file"),
                    format!("cannot read {}: {e}", f.display()),
                )
            }),
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
                .filter(|field| !field.is_empty())
                .or_else(|| {
                    msg.split_once('`')
                        .and_then(|(_, rest)| rest.split_once("`, "))
                        .map(|(field, _)| field)
                        .filter(|field| !field.is_empty())
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
