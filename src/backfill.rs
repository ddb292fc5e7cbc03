//! `partner-bridge backfill`: moves an issuer's existing customer base to one partner, through the normal pipeline.
//!
//! It lists the issuer's sessions through `GET /v3/sessions/` (Didit's filters, `next` paging), keeps the ones the
//! command's filters and the partner's policy accept, and publishes for each an `onboarding.finished` naming that
//! partner only (`partners: [its application id]`, header `x-pb-source: backfill`) to the onboarding exchange,
//! with publisher confirms. The running issuer bridge then mints and publishes the token as for any event, so its
//! share ledger and the receiver's import ledger keep the effect exactly-once: a session whose token is still valid
//! mints nothing, an imported one is never imported again.
//!
//! - **Lanes.** One listing query per (kind, status) the filters name: `--kind all` lists KYC and KYB separately,
//!   each `--status` is Didit's `status` filter (none: every status, the policy decides). Lanes run in order.
//! - **Checkpoint** ([`crate::ledger::backfill`]): the lane and offset every page before which is done, and each
//!   session published (written after the broker's confirm), under a key hashed from the partner and the filters.
//!   A run with the same arguments resumes there, one page early (rows deleted meanwhile shift the offsets; the
//!   rows seen again are recognised by the sent list) and never publishes a recorded session again. A finished
//!   backfill run again starts a new pass (the pipeline's ledgers make its sessions cost nothing).
//! - **Budget.** Each published event costs the issuer at most one Didit write (the share), so events go out evenly
//!   spaced at `budget × didit.writes_per_minute` per `didit.rate_window_ms` (Didit's 300 when pacing is off):
//!   the rest of the key's rate stays for live onboarding. The partner's imports follow at the same rate.
//! - **Output.** Progress on stderr (a bar with counts and ETA on a terminal, a plain line per page otherwise), the
//!   events of `--dry-run` as JSON lines on stdout, and a summary on stdout.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::NaiveDate;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::publisher::{Outgoing, PublishError, Publisher};
use crate::amqp::{HeaderValue, Link, LinkOptions, Names};
use crate::config::{Config, ConfigError, PartnerConfig};
use crate::didit::client::{
    DiditClient, DiditError, Disposition, KindFilter, ListedPage, PageLink, SessionQuery,
};
use crate::didit::wire::{SessionKind, SessionStatus, SessionSummary};
use crate::envelope::{self, OnboardingFinished};
use crate::health::Health;
use crate::issuer::onboarding::HEADER_SOURCE;
use crate::ledger::backfill::{BackfillStore, Checkpoint};
use crate::metrics::Metrics;

/// The default `--budget`: half of the key's write rate.
pub const DEFAULT_BUDGET: f64 = 0.5;

/// Rows per listing page (Didit's default is 50; the sandbox and, as far as documented, Didit allow 100).
pub const PAGE: u32 = 100;

/// The base rate when `didit.writes_per_minute` is 0 (pacing off in the bridge): Didit's own limit.
const DIDIT_WRITES_PER_MINUTE: u32 = 300;

/// How often one failed listing or publish is tried before the backfill stops (it resumes from its checkpoint).
const ATTEMPTS: u32 = 6;

/// `--kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    /// KYC sessions.
    User,
    /// KYB sessions.
    Business,
    /// Both (listed one kind after the other).
    All,
}

/// The command line of `backfill` (besides `--config`), as given: values are checked by [`Plan::new`], so that a
/// bad one exits 64 naming its flag.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// The `[[issuer.partners]]` name to backfill.
    #[arg(long)]
    pub partner: String,
    /// Only sessions in this status (repeatable; either casing). Default: every status the policy accepts.
    #[arg(long = "status", value_name = "S")]
    pub statuses: Vec<String>,
    /// Which kinds to list.
    #[arg(long, value_enum, default_value_t = KindArg::All)]
    pub kind: KindArg,
    /// Only sessions created on or after this day (YYYY-MM-DD, UTC).
    #[arg(long, value_name = "DATE")]
    pub since: Option<String>,
    /// Only sessions created on or before this day (YYYY-MM-DD, UTC).
    #[arg(long, value_name = "DATE")]
    pub until: Option<String>,
    /// Print the events that would be published (JSON lines) and send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Share of the key's write rate (`didit.writes_per_minute`) the backfill may use: 0 < x <= 1 (default 0.5).
    #[arg(long, value_name = "FRACTION", allow_hyphen_values = true)]
    pub budget: Option<String>,
    /// Serve this command's own `/metrics` (`partner_bridge_backfill_sessions_total`) here while it runs.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

/// One listing query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lane {
    /// The kind listed.
    pub kind: SessionKind,
    /// Didit's `status` filter, if any.
    pub status: Option<SessionStatus>,
}

/// A validated backfill.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The partner.
    pub partner: PartnerConfig,
    /// The statuses asked for (empty: any).
    pub statuses: Vec<SessionStatus>,
    /// The kinds asked for.
    pub kinds: Vec<SessionKind>,
    /// Created on or after.
    pub since: Option<NaiveDate>,
    /// Created on or before.
    pub until: Option<NaiveDate>,
    /// Print, send nothing.
    pub dry_run: bool,
    /// Share of the key's write rate.
    pub budget: f64,
    /// `--metrics-addr`.
    pub metrics_addr: Option<SocketAddr>,
}

fn parse_day(
    raw: &Option<String>,
    flag: &str,
    problems: &mut Vec<ConfigError>,
) -> Option<NaiveDate> {
    let raw = raw.as_deref()?;
    match NaiveDate::parse_from_str(raw.trim(), "%Y-%m-%d") {
        Ok(day) => Some(day),
        Err(_) => {
            problems.push(ConfigError::new(
                flag,
                format!("`{raw}` is not a date (YYYY-MM-DD, the session's creation day in UTC)"),
            ));
            None
        }
    }
}

impl Plan {
    /// Checks the command line against the configuration, reporting every problem at once, each naming its flag
    /// or key (exit 64).
    pub fn new(config: &Config, options: &Options) -> Result<Plan, Vec<ConfigError>> {
        let mut problems = Vec::new();
        if !config.issuer.enabled {
            problems.push(ConfigError::new(
                "issuer.enabled",
                "backfill publishes for the issuer role: this configuration must be the issuer's (enabled = true)",
            ));
        }
        let partner = config
            .issuer
            .partners
            .iter()
            .find(|p| p.name == options.partner)
            .cloned();
        if partner.is_none() {
            let known: Vec<&str> = config
                .issuer
                .partners
                .iter()
                .map(|p| p.name.as_str())
                .collect();
            problems.push(ConfigError::new(
                "--partner",
                format!(
                    "`{}` is not the name of any [[issuer.partners]] entry (configured: {})",
                    options.partner,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        let budget = match options.budget.as_deref() {
            None => DEFAULT_BUDGET,
            Some(raw) => match raw.trim().parse::<f64>() {
                Ok(b) if b > 0.0 && b <= 1.0 => b,
                _ => {
                    problems.push(ConfigError::new(
                        "--budget",
                        format!(
                            "`{raw}` is not a share of the key's write rate: a number greater than 0 and at most 1 (default {DEFAULT_BUDGET})"
                        ),
                    ));
                    DEFAULT_BUDGET
                }
            },
        };
        let mut statuses = Vec::new();
        for raw in &options.statuses {
            match SessionStatus::parse(raw) {
                Some(s) if s.is_finished() => {
                    if !statuses.contains(&s) {
                        statuses.push(s);
                    }
                }
                Some(s) => problems.push(ConfigError::new(
                    "--status",
                    format!("`{s}` is not finished: only Approved, Declined and In Review sessions can be shared"),
                )),
                None => problems.push(ConfigError::new(
                    "--status",
                    format!("`{raw}` is not a Didit session status (Approved, Declined, In Review, in either casing)"),
                )),
            }
        }
        // One order whatever the command line's, so that the same filters always find the same checkpoint.
        statuses.sort_by_key(|s| SessionStatus::all().iter().position(|x| x == s));
        let since = parse_day(&options.since, "--since", &mut problems);
        let until = parse_day(&options.until, "--until", &mut problems);
        if let (Some(s), Some(u)) = (since, until)
            && u < s
        {
            problems.push(ConfigError::new(
                "--until",
                format!("{u} is before --since {s}: nothing could match"),
            ));
        }
        let kinds = match options.kind {
            KindArg::User => vec![SessionKind::User],
            KindArg::Business => vec![SessionKind::Business],
            KindArg::All => vec![SessionKind::User, SessionKind::Business],
        };
        match partner {
            Some(partner) if problems.is_empty() => Ok(Plan {
                partner,
                statuses,
                kinds,
                since,
                until,
                dry_run: options.dry_run,
                budget,
                metrics_addr: options.metrics_addr,
            }),
            _ => Err(problems),
        }
    }

    /// The listing queries, in order.
    pub fn lanes(&self) -> Vec<Lane> {
        let mut lanes = Vec::new();
        for &kind in &self.kinds {
            if self.statuses.is_empty() {
                lanes.push(Lane { kind, status: None });
            }
            for &status in &self.statuses {
                lanes.push(Lane {
                    kind,
                    status: Some(status),
                });
            }
        }
        lanes
    }

    /// The filters, as a person would type them (stored with the checkpoint, shown in the summary).
    pub fn arguments(&self) -> String {
        let mut text = format!("--partner {}", self.partner.name);
        let kind = match self.kinds.as_slice() {
            [SessionKind::User] => "user",
            [SessionKind::Business] => "business",
            _ => "all",
        };
        text.push_str(&format!(" --kind {kind}"));
        for s in &self.statuses {
            text.push_str(&format!(" --status '{s}'"));
        }
        if let Some(d) = self.since {
            text.push_str(&format!(" --since {d}"));
        }
        if let Some(d) = self.until {
            text.push_str(&format!(" --until {d}"));
        }
        text
    }

    /// The checkpoint's key: the partner (name and application) and the filters, hashed. The budget and
    /// `--dry-run` are not part of it: a resumed run may use another budget.
    pub fn run_key(&self) -> String {
        use sha2::Digest;
        let text = format!(
            "backfill/v1\n{}\n{}",
            self.partner.application_id,
            self.arguments()
        );
        hex::encode(&sha2::Sha256::digest(text.as_bytes())[..16])
    }

    fn query(&self, lane: Lane, offset: u64) -> SessionQuery {
        SessionQuery {
            status: lane.status.map(|s| s.upper_snake().to_string()),
            session_kind: Some(KindFilter::from(lane.kind)),
            date_from: self.since,
            date_to: self.until,
            limit: Some(PAGE),
            offset: (offset > 0).then_some(offset),
            ..SessionQuery::default()
        }
    }

    /// What to do with one listed row of `lane`.
    pub fn classify(&self, lane: Lane, row: &SessionSummary) -> Verdict {
        let kind = row.session_kind.unwrap_or(lane.kind);
        let Some(status) = SessionStatus::parse(&row.status) else {
            return Verdict::SkippedPolicy;
        };
        // Didit applies the filters; these checks only guard against a filter it ignored.
        if kind != lane.kind
            || (!self.statuses.is_empty() && !self.statuses.contains(&status))
            || !self.in_dates(row)
        {
            return Verdict::SkippedFilter;
        }
        if !status.is_finished() || !self.partner.accepts(status, kind) {
            return Verdict::SkippedPolicy;
        }
        Verdict::Send { kind }
    }

    fn in_dates(&self, row: &SessionSummary) -> bool {
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        let Some(day) = row
            .created_at
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc).date_naive())
        else {
            // No creation time to check: Didit's own date filter is all there is.
            return true;
        };
        self.since.is_none_or(|s| day >= s) && self.until.is_none_or(|u| day <= u)
    }

    /// The event for one row.
    pub fn event(
        &self,
        run_key: &str,
        row: &SessionSummary,
        kind: SessionKind,
    ) -> OnboardingFinished {
        OnboardingFinished {
            kind: envelope::types::ONBOARDING_FINISHED.to_string(),
            event_id: format!("backfill:{}:{}", &run_key[..12], row.session_id),
            session_id: row.session_id.clone(),
            status: row.status.clone(),
            session_kind: Some(kind),
            vendor_data: row.vendor_data.clone(),
            occurred_at: None,
            partners: Some(vec![self.partner.application_id.clone()]),
        }
    }
}

/// What a backfill does with one listed row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Publish an event for it.
    Send {
        /// Its kind.
        kind: SessionKind,
    },
    /// The partner's policy refuses its status or kind (or the status is not finished).
    SkippedPolicy,
    /// Outside the command's filters.
    SkippedFilter,
}

/// The counts a backfill ends with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Rows read from Didit (each session once).
    pub listed: u64,
    /// Rows the filters and the policy accept.
    pub matching: u64,
    /// Events confirmed by the broker in this run (`--dry-run`: events that would be sent).
    pub published: u64,
    /// Matching sessions published by an earlier, interrupted run with the same arguments.
    pub already_done: u64,
    /// Refused by the partner's policy.
    pub skipped_policy: u64,
    /// Outside the filters.
    pub skipped_filter: u64,
}

/// Evenly spaced sends at `per_window` per `window`.
struct Spacing {
    interval: Duration,
    next: Option<Instant>,
}

impl Spacing {
    fn new(config: &Config, budget: f64) -> Spacing {
        let limit = match config.didit.writes_per_minute {
            0 => DIDIT_WRITES_PER_MINUTE,
            n => n,
        };
        let per_window = (budget * f64::from(limit)).max(f64::MIN_POSITIVE);
        let window = config.didit.rate_window();
        Spacing {
            interval: window.div_f64(per_window),
            next: None,
        }
    }

    async fn wait(&mut self) {
        let now = Instant::now();
        let at = self.next.map_or(now, |n| n.max(now));
        tokio::time::sleep_until(at).await;
        self.next = Some(at + self.interval);
    }

    fn per_second(&self) -> f64 {
        1.0 / self.interval.as_secs_f64().max(1e-9)
    }
}

/// Progress on stderr.
struct Progress {
    tty: bool,
    started: std::time::Instant,
    last_draw: Option<std::time::Instant>,
    total: u64,
    /// Rows of the listing behind the cursor (including those a resumed run skipped).
    position: u64,
    /// Rows read by this run.
    read: u64,
    partner: String,
    /// Events per second the budget allows (`None`: a dry run, which sends nothing and waits for nothing).
    send_rate: Option<f64>,
}

impl Progress {
    fn line(&self, s: &Summary) -> String {
        let elapsed = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = self.read as f64 / elapsed;
        let left = self.total.saturating_sub(self.position) as f64;
        // The rows left are listed at the rate seen so far, and the share of them sent so far waits for the budget.
        let eta = if self.read == 0 || rate <= 0.0 {
            "?".to_string()
        } else {
            let listing = left / rate;
            let sending = match self.send_rate {
                Some(per_second) => left * (s.published as f64 / self.read as f64) / per_second,
                None => 0.0,
            };
            human(Duration::from_secs_f64(listing.max(sending)))
        };
        format!(
            "backfill {}: {}/{} listed, {} matching, {} {}, {} already done, {} skipped (policy {}, filter {}), {:.1} rows/s, ETA {eta}",
            self.partner,
            self.position,
            self.total.max(self.position),
            s.matching,
            s.published,
            if self.send_rate.is_some() {
                "published"
            } else {
                "would publish"
            },
            s.already_done,
            s.skipped_policy + s.skipped_filter,
            s.skipped_policy,
            s.skipped_filter,
            rate
        )
    }

    /// A redraw on a terminal (at most every 100 ms, or when `force`), a plain line otherwise (when `force`:
    /// once per page).
    fn show(&mut self, s: &Summary, force: bool) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            if !force
                && self
                    .last_draw
                    .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
            {
                return;
            }
            self.last_draw = Some(std::time::Instant::now());
            let total = self.total.max(self.position).max(1);
            let filled = ((self.position.min(total) * 24) / total) as usize;
            let bar = format!("[{}{}]", "#".repeat(filled), "-".repeat(24 - filled));
            let _ = write!(err, "\r\x1b[2K{bar} {}", self.line(s));
            let _ = err.flush();
        } else if force {
            let _ = writeln!(err, "{}", self.line(s));
        }
    }

    fn done(&mut self) {
        if self.tty && self.last_draw.is_some() {
            let _ = writeln!(std::io::stderr());
        }
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Retries transient Didit failures (5xx, timeouts, 429 after its wait) a few times; anything else fails at once.
async fn list_with_retry(
    client: &DiditClient,
    query: &SessionQuery,
    next: Option<&str>,
) -> anyhow::Result<ListedPage> {
    let mut backoff = Duration::from_millis(500);
    for attempt in 1..=ATTEMPTS {
        match client.list_page(query, next).await {
            Ok(page) => return Ok(page),
            Err(e) => {
                let wait = match e.disposition() {
                    Disposition::Retry { after } if attempt < ATTEMPTS => after.unwrap_or(backoff),
                    _ => return Err(listing_error(e)),
                };
                tracing::warn!(error = %e, attempt, "listing the issuer's sessions failed; trying again");
                tokio::time::sleep(wait.min(Duration::from_secs(60))).await;
                backoff = (backoff * 2).min(Duration::from_secs(20));
            }
        }
    }
    unreachable!("the last attempt returns")
}

fn listing_error(e: DiditError) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot list the issuer's sessions (GET /v3/sessions/): {e}. Nothing more was published; run the same \
         command again to continue from the checkpoint"
    )
}

async fn publish_with_retry(
    publisher: &Publisher,
    exchange: &str,
    body: &[u8],
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(500);
    for attempt in 1..=ATTEMPTS {
        let message_id = uuid::Uuid::new_v4().to_string();
        let result = publisher
            .publish(Outgoing {
                exchange,
                routing_key: envelope::types::ONBOARDING_FINISHED,
                body,
                message_id: &message_id,
                kind: envelope::types::ONBOARDING_FINISHED,
                headers: vec![(
                    HEADER_SOURCE.to_string(),
                    HeaderValue::Str("backfill".into()),
                )],
            })
            .await;
        match result {
            Ok(()) => return Ok(()),
            Err(PublishError::Returned { .. }) => anyhow::bail!(
                "the broker returned the event as unroutable: no queue is bound to {exchange} for {}; declare the \
                 issuer's topology first (`partner-bridge topology declare`, or start the issuer bridge)",
                envelope::types::ONBOARDING_FINISHED
            ),
            Err(e) if attempt < ATTEMPTS => {
                tracing::warn!(error = %e, attempt, "publishing a backfill event failed; trying again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "cannot publish to {exchange}: {e}; run the same command again to continue from the checkpoint"
                ));
            }
        }
    }
    unreachable!("the last attempt returns")
}

/// Runs the backfill; prints progress on stderr and the events of `--dry-run` on stdout. Returns the counts.
pub async fn run(config: &Config, plan: &Plan) -> anyhow::Result<Summary> {
    let metrics = Arc::new(Metrics::new());
    metrics.init_backfill(&plan.partner.name);
    let health = Arc::new(Health::new());
    let stop_admin = CancellationToken::new();
    if let Some(addr) = plan.metrics_addr {
        let admin = crate::admin::AdminServer::bind(addr, metrics.clone(), health.clone())
            .await
            .with_context(|| format!("cannot listen on --metrics-addr {addr}"))?;
        tracing::info!(addr = %admin.local_addr()?, "serving the backfill's /metrics");
        tokio::spawn(admin.serve(stop_admin.clone()));
    }
    let result = backfill(config, plan, &metrics, &health).await;
    stop_admin.cancel();
    result
}

async fn backfill(
    config: &Config,
    plan: &Plan,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
) -> anyhow::Result<Summary> {
    let access = config.issuer_didit()?;
    // Reads only: listing is not a write and is not paced against the key's write budget.
    let client = DiditClient::new(&access, metrics.clone())?;
    // Not `lock_state_dir`: the backfill runs next to the issuer bridge that holds that lock, and takes no lease.
    let ledger = crate::app::open_ledger(config).await?;
    let store = BackfillStore::new(&ledger);
    let run_key = plan.run_key();
    let arguments = plan.arguments();
    let mut checkpoint = if plan.dry_run {
        // Writes nothing: an empty checkpoint stands in when there is none.
        store.peek(&run_key).await?.unwrap_or_else(|| Checkpoint {
            lane: 0,
            offset: 0,
            started_at: chrono::Utc::now(),
            finished_at: None,
            sent: HashSet::new(),
        })
    } else {
        store
            .begin(&run_key, &plan.partner.name, &arguments, chrono::Utc::now())
            .await?
    };
    if let Some(finished) = checkpoint.finished_at {
        eprintln!(
            "backfill {}: the backfill with these arguments finished at {}; starting a new pass (sessions whose \
             token is still valid mint nothing)",
            plan.partner.name,
            envelope::rfc3339(finished)
        );
        checkpoint = if plan.dry_run {
            Checkpoint {
                lane: 0,
                offset: 0,
                finished_at: None,
                sent: HashSet::new(),
                ..checkpoint
            }
        } else {
            store.restart(&run_key, chrono::Utc::now()).await?
        };
    } else if checkpoint.lane > 0 || checkpoint.offset > 0 || !checkpoint.sent.is_empty() {
        eprintln!(
            "backfill {}: resuming the backfill started at {}: {} session(s) already published",
            plan.partner.name,
            envelope::rfc3339(checkpoint.started_at),
            checkpoint.sent.len()
        );
    }

    let names = Names::new(&config.amqp.prefix);
    let exchange = names.onboarding_exchange();
    let publisher = if plan.dry_run {
        None
    } else {
        let link = Link::new(
            config.amqp_url()?,
            "backfill",
            metrics.clone(),
            health.clone(),
            LinkOptions::from_config(&config.amqp, "partner-bridge backfill"),
        );
        Some(Publisher::new(
            link,
            Duration::from_millis(config.amqp.confirm_timeout_ms),
            metrics.clone(),
        ))
    };
    let mut spacing = Spacing::new(config, plan.budget);
    if !plan.dry_run {
        eprintln!(
            "backfill {}: at most {:.2} events/s ({} of didit.writes_per_minute per {} ms window)",
            plan.partner.name,
            spacing.per_second(),
            plan.budget,
            config.didit.rate_window_ms
        );
    }

    let lanes = plan.lanes();
    // Counts for the ETA (Didit's KYB count is capped at 100, so the ETA can only be an estimate).
    let mut counts = Vec::with_capacity(lanes.len());
    for &lane in &lanes {
        let mut query = plan.query(lane, 0);
        query.limit = Some(1);
        let page = list_with_retry(&client, &query, None).await?;
        counts.push(page.count.unwrap_or(page.results.len() as u64));
    }
    let start_lane = (checkpoint.lane as usize).min(lanes.len());
    let mut progress = Progress {
        tty: std::io::stderr().is_terminal(),
        started: std::time::Instant::now(),
        last_draw: None,
        total: counts.iter().sum(),
        position: counts[..start_lane].iter().sum(),
        read: 0,
        partner: plan.partner.name.clone(),
        send_rate: (!plan.dry_run).then(|| spacing.per_second()),
    };
    let mut summary = Summary::default();
    let mut seen: HashSet<String> = HashSet::new();
    let stdout = std::io::stdout();
    let mut complete = true;

    'lanes: for (index, &lane) in lanes.iter().enumerate().skip(start_lane) {
        let index_u32 = u32::try_from(index).unwrap_or(u32::MAX);
        let mut offset = if index == start_lane {
            // One page early: rows deleted since the checkpoint moved later rows forward.
            checkpoint.offset.saturating_sub(u64::from(PAGE))
        } else {
            0
        };
        progress.position += offset;
        let query = plan.query(lane, offset);
        let mut next: Option<String> = None;
        loop {
            let page = list_with_retry(&client, &query, next.as_deref()).await?;
            let rows = page.results.len() as u64;
            for row in &page.results {
                progress.position += 1;
                progress.read += 1;
                if !seen.insert(row.session_id.clone()) {
                    continue;
                }
                summary.listed += 1;
                let outcome = match plan.classify(lane, row) {
                    Verdict::SkippedPolicy => {
                        summary.skipped_policy += 1;
                        "skipped_policy"
                    }
                    Verdict::SkippedFilter => {
                        summary.skipped_filter += 1;
                        "skipped_filter"
                    }
                    Verdict::Send { .. } if checkpoint.sent.contains(&row.session_id) => {
                        summary.matching += 1;
                        summary.already_done += 1;
                        "already_done"
                    }
                    Verdict::Send { kind } => {
                        summary.matching += 1;
                        let event = plan.event(&run_key, row, kind);
                        let body = serde_json::to_vec(&event).expect("an event serializes");
                        match &publisher {
                            None => {
                                let mut out = stdout.lock();
                                let _ = out.write_all(&body);
                                let _ = writeln!(out);
                                summary.published += 1;
                                "would_publish"
                            }
                            Some(publisher) => {
                                spacing.wait().await;
                                publish_with_retry(publisher, &exchange, &body).await?;
                                store.sent(&run_key, &row.session_id).await?;
                                summary.published += 1;
                                "published"
                            }
                        }
                    }
                };
                metrics.backfill_session(&plan.partner.name, outcome);
                progress.show(&summary, false);
            }
            let after = page
                .next
                .as_ref()
                .and_then(PageLink::offset)
                .unwrap_or(offset + rows);
            match page.next {
                Some(PageLink::Next(link)) => {
                    if !plan.dry_run {
                        store.advance(&run_key, index_u32, after).await?;
                    }
                    progress.show(&summary, true);
                    offset = after;
                    next = Some(link);
                }
                Some(PageLink::Unusable) => {
                    tracing::warn!(
                        "Didit named a next page that cannot be followed; the listing stops here"
                    );
                    complete = false;
                    break 'lanes;
                }
                None => break,
            }
        }
        if !plan.dry_run {
            store
                .advance(&run_key, index_u32.saturating_add(1), 0)
                .await?;
        }
        progress.position = counts[..=index].iter().sum::<u64>().max(progress.position);
        progress.show(&summary, true);
    }
    progress.done();
    if let Some(publisher) = &publisher {
        publisher.link().close().await;
    }
    if !complete {
        anyhow::bail!(
            "the listing could not be followed to its end ({} published so far); run the same command again to continue",
            summary.published
        );
    }
    if !plan.dry_run {
        store.finish(&run_key).await?;
    }
    Ok(summary)
}

/// The summary, for stdout.
pub fn render_summary(plan: &Plan, summary: &Summary, took: Duration) -> String {
    let mut out = String::new();
    if plan.dry_run {
        out.push_str(&format!(
            "backfill (dry run, nothing sent) for partner {} ({}): {}\n",
            plan.partner.name,
            plan.partner.application_id,
            plan.arguments()
        ));
    } else {
        out.push_str(&format!(
            "backfill finished for partner {} ({}): {}\n",
            plan.partner.name,
            plan.partner.application_id,
            plan.arguments()
        ));
    }
    let published = if plan.dry_run {
        "would publish"
    } else {
        "published"
    };
    for (label, n) in [
        ("listed", summary.listed),
        ("matching", summary.matching),
        (published, summary.published),
        ("already done", summary.already_done),
        ("skipped by policy", summary.skipped_policy),
        ("skipped by filter", summary.skipped_filter),
    ] {
        out.push_str(&format!("  {label}: {n}\n"));
    }
    out.push_str(&format!("  took: {}\n", human(took)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let mut config = Config::default();
        config.issuer.enabled = true;
        config.issuer.partners = vec![PartnerConfig {
            name: "bank".into(),
            application_id: "5e443cde-44aa-4f22-b94c-3b6a8d9f05ce".into(),
            ttl_seconds: 3600,
            statuses: vec!["Approved".into()],
            session_kinds: vec![SessionKind::User],
            share_vendor_data: false,
            public_keys: Vec::new(),
            public_key_files: Vec::new(),
            tokens_url: None,
            tokens_url_file: None,
        }];
        config
    }

    fn options() -> Options {
        Options {
            partner: "bank".into(),
            statuses: Vec::new(),
            kind: KindArg::All,
            since: None,
            until: None,
            dry_run: false,
            budget: None,
            metrics_addr: None,
        }
    }

    fn row(kind: SessionKind, status: &str) -> SessionSummary {
        SessionSummary {
            session_id: "s-1".into(),
            session_number: None,
            session_kind: Some(kind),
            status: status.into(),
            workflow_id: None,
            vendor_data: None,
            shared_from_session: None,
            created_at: Some("2026-11-20T10:00:00Z".into()),
            extra: Default::default(),
        }
    }

    #[test]
    fn every_bad_flag_is_reported_by_name() {
        let config = config();
        let errors = Plan::new(
            &config,
            &Options {
                partner: "nobody".into(),
                statuses: vec!["Approvd".into(), "Not Started".into()],
                since: Some("2026-13-01".into()),
                budget: Some("1.5".into()),
                ..options()
            },
        )
        .unwrap_err();
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["--partner", "--budget", "--status", "--status", "--since"]
        );
        assert!(errors[0].reason.contains("nobody") && errors[0].reason.contains("bank"));
        for bad in ["0", "-0.1", "abc", "", "NaN", "inf"] {
            let e = Plan::new(
                &config,
                &Options {
                    budget: Some(bad.into()),
                    ..options()
                },
            )
            .unwrap_err();
            assert_eq!(e[0].key, "--budget", "{bad}");
        }
        let e = Plan::new(
            &config,
            &Options {
                since: Some("2026-11-02".into()),
                until: Some("2026-11-01".into()),
                ..options()
            },
        )
        .unwrap_err();
        assert_eq!(e[0].key, "--until");
    }

    #[test]
    fn lanes_policy_and_filters() {
        let config = config();
        let plan = Plan::new(
            &config,
            &Options {
                statuses: vec!["approved".into(), "IN_REVIEW".into()],
                since: Some("2026-11-01".into()),
                until: Some("2026-11-30".into()),
                budget: Some("1".into()),
                ..options()
            },
        )
        .unwrap();
        assert_eq!(plan.lanes().len(), 4);
        let lane = plan.lanes()[0];
        assert_eq!(
            plan.classify(lane, &row(SessionKind::User, "Approved")),
            Verdict::Send {
                kind: SessionKind::User
            }
        );
        // The partner takes Approved only: In Review passes the filter, not the policy.
        assert_eq!(
            plan.classify(lane, &row(SessionKind::User, "In Review")),
            Verdict::SkippedPolicy
        );
        assert_eq!(
            plan.classify(lane, &row(SessionKind::User, "Declined")),
            Verdict::SkippedFilter
        );
        let mut late = row(SessionKind::User, "Approved");
        late.created_at = Some("2026-12-01T00:00:01Z".into());
        assert_eq!(plan.classify(lane, &late), Verdict::SkippedFilter);
        // A KYB row in the KYC lane: Didit ignored the kind filter.
        assert_eq!(
            plan.classify(lane, &row(SessionKind::Business, "APPROVED")),
            Verdict::SkippedFilter
        );
        let business = plan.lanes()[2];
        assert_eq!(business.kind, SessionKind::Business);
        assert_eq!(
            plan.classify(business, &row(SessionKind::Business, "APPROVED")),
            Verdict::SkippedPolicy
        );
        let event = plan.event(
            &plan.run_key(),
            &row(SessionKind::User, "Approved"),
            SessionKind::User,
        );
        assert_eq!(
            event.partners,
            Some(vec!["5e443cde-44aa-4f22-b94c-3b6a8d9f05ce".to_string()])
        );
        // The same filters give the same checkpoint, whatever the budget (`again` has none); other filters another one.
        let again = Plan::new(
            &config,
            &Options {
                statuses: vec!["In Review".into(), "Approved".into(), "approved".into()],
                since: Some("2026-11-01".into()),
                until: Some("2026-11-30".into()),
                ..options()
            },
        )
        .unwrap();
        assert_eq!(
            plan.run_key(),
            again.run_key(),
            "the order of --status does not matter"
        );
        let users_only = Plan::new(
            &config,
            &Options {
                kind: KindArg::User,
                ..options()
            },
        )
        .unwrap();
        assert_ne!(plan.run_key(), users_only.run_key());
    }

    #[test]
    fn spacing_follows_the_budget() {
        let mut config = config();
        config.didit.writes_per_minute = 300;
        let spacing = Spacing::new(&config, 0.5);
        assert_eq!(spacing.interval, Duration::from_millis(400));
        config.didit.writes_per_minute = 0;
        assert_eq!(
            Spacing::new(&config, 1.0).interval,
            Duration::from_millis(200)
        );
    }
}
