//! The command line (DESIGN.md §8): `run`, `sandbox`, `demo`, `check-config`, `topology declare|show`,
//! `dead-letters list|replay`, `audit list|export|verify|recipients`, `backfill`, `keygen`, `notify`, `healthcheck`.
//! Parsing only; each command's work lives in its module.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// partner-bridge: share verified identities between partner businesses through Didit's B2B Reusable KYC API.
#[derive(Debug, Parser)]
#[command(name = "partner-bridge", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the bridge (issuer role, receiver role, or both) until SIGTERM.
    Run {
        /// The TOML configuration file.
        #[arg(long, env = "PARTNER_BRIDGE_CONFIG")]
        config: PathBuf,
    },
    /// Serve the Didit-compatible sandbox (an emulator of Didit's API) for tests and demos.
    Sandbox {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8089")]
        listen: SocketAddr,
        /// A JSON file of applications and sessions to start with (instead of two default applications).
        #[arg(long)]
        fixture: Option<PathBuf>,
        /// Switch off Didit's per-key rate limit (300 writes per minute).
        #[arg(long)]
        no_rate_limit: bool,
        /// Writes per API key per 60 s sliding window (Didit's: 300); a higher one keeps a test short with the
        /// same shape.
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(1..))]
        rate_limit_per_minute: u32,
        /// When the `X-RateLimit-*` headers are sent: `on-429` (Didit now) or `always` (an older revision).
        #[arg(long, value_enum, default_value_t = RateLimitHeadersArg::On429)]
        rate_limit_headers: RateLimitHeadersArg,
    },
    /// Run the whole product on one machine: the sandbox, an issuer and a receiver on a local RabbitMQ.
    Demo {
        /// The broker to use.
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        amqp_url: String,
        /// Number of verifications to share (a mix of KYC and KYB).
        #[arg(long, default_value_t = 12)]
        sessions: usize,
        /// Keep the bridge and its admin endpoints up after the run (for Prometheus and Grafana).
        #[arg(long)]
        keep_running: bool,
        /// Admin address of the demo's issuer bridge; the receiver's is the next port.
        #[arg(long, default_value = "127.0.0.1:9464")]
        admin_listen: SocketAddr,
        /// Let the receiver keep the issuer's decisions (default: imported sessions land in review).
        #[arg(long)]
        trust_review: bool,
    },
    /// Validate a configuration and print it with every secret redacted.
    CheckConfig {
        /// The TOML configuration file.
        #[arg(long, env = "PARTNER_BRIDGE_CONFIG")]
        config: PathBuf,
    },
    /// Declare or show the AMQP topology of the configured roles.
    Topology {
        /// declare or show.
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// Inspect dead-lettered messages or move them back for another try.
    DeadLetters {
        /// list or replay.
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Read, export and verify this side's audit log (in the ledger's database; see docs/compliance.md).
    Audit {
        /// list, export, verify or recipients.
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Share the issuer's existing finished sessions with one partner (a new partnership): lists them from Didit,
    /// applies the partner's policy and publishes `onboarding.finished` for that partner only through the running
    /// issuer bridge. Resumable (a checkpoint in the ledger) and paced to `--budget` of the key's write rate.
    Backfill {
        /// The issuer's TOML configuration file (the running issuer bridge's).
        #[arg(long, env = "PARTNER_BRIDGE_CONFIG")]
        config: PathBuf,
        /// The partner, the filters and the pace.
        #[command(flatten)]
        options: crate::backfill::Options,
    },
    /// Create an Ed25519 key pair: an issuer signs share-token envelopes with it, a receiver its reshare requests.
    Keygen {
        /// Directory to write signing.key (mode 0600) and signing.pub into.
        #[arg(long, required_unless_present = "rotate")]
        out: Option<PathBuf>,
        /// Add a new key to the key set in DIR (default: --out): appended to signing.key, where the last key signs,
        /// and to signing.pub, which keeps the old public keys. Distribute signing.pub to the verifiers before the
        /// signer reads the new signing.key.
        #[arg(long, value_name = "DIR", num_args = 0..=1, conflicts_with = "if_missing")]
        rotate: Option<Option<PathBuf>>,
        /// When DIR/signing.key exists, keep it and print its key id instead of failing (for init jobs).
        #[arg(long)]
        if_missing: bool,
        /// Also write signing.pub (only) into this directory: what receivers mount, so that they never see the
        /// private key (the compose demo's keygen service).
        #[arg(long)]
        public_out: Option<PathBuf>,
    },
    /// Tell every partner that received a session about an erasure or rectification (GDPR Art. 19): a signed
    /// notice to each recipient the audit log (or the ledger) shows; the running issuer collects the
    /// acknowledgements and resends until each is acknowledged.
    Notify {
        /// The TOML configuration file (the issuer's).
        #[arg(long, env = "PARTNER_BRIDGE_CONFIG")]
        config: PathBuf,
        /// The issuer's Didit session the person's data came from.
        #[arg(long)]
        session: String,
        /// What happened at the source.
        #[arg(long, value_enum)]
        kind: NoticeKindArg,
        /// A sentence for the recipients (no personal data).
        #[arg(long)]
        reason: Option<String>,
        /// Makes a repeated command send nothing new (default: a fresh id each time).
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Exit 0 when the URL answers 200 (a HEALTHCHECK for images without curl).
    Healthcheck {
        /// The URL to check.
        #[arg(long, default_value = "http://127.0.0.1:9464/readyz")]
        url: String,
    },
}

/// `topology` subcommands.
#[derive(Debug, Subcommand)]
pub enum TopologyAction {
    /// Declare every exchange, queue and binding of the enabled roles (idempotent).
    Declare {
        /// The TOML configuration file.
        #[arg(long, env = "PARTNER_BRIDGE_CONFIG")]
        config: PathBuf,
    },
    /// Print what `declare` would declare, without connecting.
    Show {
        /// The TOML configuration file.
        #[arg(long, env = "PARTNER_BRIDGE_CONFIG")]
        config: PathBuf,
    },
}

/// `dead-letters` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeadLetterAction {
    /// Show dead-lettered messages of a queue with their reasons (messages stay where they are).
    List {
        /// The TOML configuration file.
        #[arg(long, env = "PARTNER_BRIDGE_CONFIG")]
        config: PathBuf,
        /// The source queue (e.g. partner-bridge.receiver.tokens); its `.dead` queue is read.
        #[arg(long)]
        queue: String,
        /// At most this many messages.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Move dead-lettered messages back into their queue for another try: at most the ones there when it starts
    /// (messages that fail again meanwhile stay in `.dead`), each marked `x-pb-replayed`.
    Replay {
        /// The TOML configuration file.
        #[arg(long, env = "PARTNER_BRIDGE_CONFIG")]
        config: PathBuf,
        /// The source queue; messages move from `<queue>.dead` back to it.
        #[arg(long)]
        queue: String,
        /// At most this many messages.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// `notify --kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NoticeKindArg {
    /// The person's data was erased.
    Erasure,
    /// The person's data was rectified.
    Rectification,
}

impl From<NoticeKindArg> for crate::envelope::NoticeKind {
    fn from(k: NoticeKindArg) -> Self {
        match k {
            NoticeKindArg::Erasure => crate::envelope::NoticeKind::Erasure,
            NoticeKindArg::Rectification => crate::envelope::NoticeKind::Rectification,
        }
    }
}

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// Show the audit rows that match the filters, oldest first, one per line (tab-separated, with a header).
    List {
        /// The TOML configuration file.
        #[arg(long, env = "PARTNER_BRIDGE_CONFIG")]
        config: PathBuf,
        /// Which rows.
        #[command(flatten)]
        filter: AuditFilterArgs,
    },
    /// Write the matching rows with every stored column (hashes included, so they can be checked independently)
    /// to stdout, for a regulator or the partner.
    Export {
        /// The TOML configuration file.
        #[arg(long, env = "PARTNER_BRIDGE_CONFIG")]
        config: PathBuf,
        /// `jsonl` (one JSON object per line) or `csv` (RFC 4180, a header line, empty for NULL).
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Which rows.
        #[command(flatten)]
        filter: AuditFilterArgs,
    },
    /// Recompute the hash chain and check every signed checkpoint: exit 0 with a summary when they hold, exit 1
    /// naming the first row that does not match.
    Verify {
        /// The TOML configuration file.
        #[arg(long, env = "PARTNER_BRIDGE_CONFIG")]
        config: PathBuf,
    },
    /// Who received this person's data: every partner a token for the session was published to (issuer side).
    Recipients {
        /// The TOML configuration file.
        #[arg(long, env = "PARTNER_BRIDGE_CONFIG")]
        config: PathBuf,
        /// The issuer's (source) session id.
        #[arg(long)]
        session: String,
        /// Print a JSON array (partner, partner_application_id, agreement_id, tokens, first_ms, last_ms) instead.
        #[arg(long)]
        json: bool,
    },
}

/// The filters of `audit list` and `audit export`.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditFilterArgs {
    /// Rows about this session (source or imported).
    #[arg(long)]
    pub session: Option<String>,
    /// Rows about this counterpart (its configured name or application id).
    #[arg(long)]
    pub partner: Option<String>,
    /// Rows at or after this time (RFC 3339, or a date: YYYY-MM-DD, midnight UTC).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Rows at or before this time (RFC 3339, or a date: YYYY-MM-DD, the end of that day UTC).
    #[arg(long, value_parser = parse_until)]
    pub until: Option<chrono::DateTime<chrono::Utc>>,
}

/// `--format` of `audit export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header line.
    Csv,
}

fn parse_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    parse_instant(text, false)
}

fn parse_until(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    parse_instant(text, true)
}

/// RFC 3339, or a bare date (its first or, for `--until`, last millisecond, UTC).
fn parse_instant(text: &str, end_of_day: bool) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    let day = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|_| {
        format!("{text:?} is neither RFC 3339 (2026-01-31T12:00:00Z) nor a date (2026-01-31)")
    })?;
    let start = day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc();
    Ok(if end_of_day {
        start + chrono::Duration::days(1) - chrono::Duration::milliseconds(1)
    } else {
        start
    })
}

/// `--rate-limit-headers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RateLimitHeadersArg {
    /// Only on 429 answers (Didit's current documentation).
    #[value(name = "on-429")]
    On429,
    /// On every answer to a write (an older revision of Didit's page).
    Always,
}
