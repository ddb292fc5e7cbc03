//! `cargo bench --bench pipeline`: the performance bars of DESIGN.md §10, measured on this machine against the local
//! RabbitMQ, with the sandbox standing in for Didit (rate limit off).
//!
//! One run measures, in this order:
//! 1. **ceiling** — the broker alone: publish → consume from queue 1 → publish with a confirm to queue 2 → consume
//!    and ack, quorum queues, ~600-byte persistent messages, prefetch 200, mandatory publishes, everything on this
//!    machine. Every other throughput is a ratio to this one, so a busy machine moves both alike.
//! 2. **ready** (d) — an in-process receiver and issuer, timed from the `app::start` call to `/readyz` 200.
//! 3. **zero latency** (a) — events published as fast as confirms allow, until every import is seen on the
//!    receiver's results queue: events per second, and the ratio to the ceiling (bar ≥ 0.70).
//! 4. **Didit at 200 ms** (b) — sandbox latency 200 ms on every route: throughput against `concurrency / 0.4 s`
//!    (bar ≥ 0.80), then open-loop publishing at half that rate, p99 end to end from each event's scheduled send
//!    time to its `import.result` (bar ≤ 425 ms).
//! 5. **binary** (c, d) — the real `partner-bridge run` for each side, so memory belongs to one bridge only (the
//!    bench process also holds the sandbox, the load generator and both in-process bridges): ready time cold (fresh
//!    queues) and warm (restart), resident memory idle and peak under a zero-latency load (bars ≤ 20 MiB idle,
//!    ≤ 64 MiB under load).
//! 6. **webhook** (e) — `POST /webhooks/didit` from many keep-alive HTTP/1.1 clients, each body signed with
//!    `X-Signature-V2`, each answered 200 only after the broker confirmed its event (bar ≥ 5,000 per second).
//! 7. **failover** — two receiver replicas on one PostgreSQL ledger, one SIGKILLed mid-stream: the time from the
//!    kill to the last of its sessions imported by the other (bar ≤ 10 s, reported). See [`failover`].
//! 8. **backlog** — Didit's write limit on (scaled: 300 writes per 15 s window), 900 events at once: drain time
//!    against the floor the limit allows (bar ≥ 0.97) and the share of Didit writes answered 429 (bar ≤ 1%). See
//!    [`backlog`].
//!
//! Progress goes to stderr; the last line of stdout is one JSON object with every figure, its bar and pass/fail.
//! Sizes come from the environment (see [`Settings::from_env`]). Every name the bench declares on the broker
//! carries a fresh `pb-bench-<id>` prefix and is deleted at the end, whatever happened.
#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::Utc;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use partner_bridge::amqp::topology::{self, Entity};
use partner_bridge::amqp::{HeaderValue, Names};
use partner_bridge::app::{self, Running};
use partner_bridge::config::Config;
use partner_bridge::didit::signature;
use partner_bridge::didit::wire::SessionKind;
use partner_bridge::envelope::{OnboardingFinished, SigningKey};
use partner_bridge::sandbox::{
    ApplicationInfo, Control, FaultEndpoint, FaultSettings, Sandbox, SandboxOptions,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Confirms outstanding at once when a producer publishes "as fast as confirms allow" (the same for the ceiling
/// and the bridge, so the comparison is fair).
const PUBLISH_WINDOW: usize = 512;
/// The ceiling's consumer prefetch (DESIGN.md §3).
const CEILING_PREFETCH: u16 = 200;
/// Size of the ceiling's messages.
const CEILING_BODY_BYTES: usize = 600;

const BAR_ZERO_LATENCY_RATIO: f64 = 0.70;
const BAR_LATENCY_THROUGHPUT_RATIO: f64 = 0.80;
const BAR_P99_MS: f64 = 425.0;
const BAR_LOAD_MIB: f64 = 64.0;
const BAR_IDLE_MIB: f64 = 20.0;
const BAR_READY_MS: f64 = 300.0;
const BAR_WEBHOOKS_PER_SECOND: f64 = 5000.0;

// ---------------------------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------------------------

/// What to run, and how big.
#[derive(Debug, Clone)]
struct Settings {
    amqp_url: String,
    ceiling_messages: usize,
    events: usize,
    prefetch: u16,
    latency_ms: u64,
    latency_events: usize,
    open_loop_seconds: f64,
    memory_events: usize,
    webhooks: usize,
    webhook_clients: usize,
    scenarios: BTreeSet<String>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("{name}={text:?}: {e}")),
        Err(_) => Ok(default),
    }
}

impl Settings {
    /// `PB_BENCH_AMQP_URL`, `PB_BENCH_CEILING_MESSAGES` (20000), `PB_BENCH_EVENTS` (8000, scenario a),
    /// `PB_BENCH_PREFETCH` (64: the bridges' `amqp.prefetch`, hence their concurrency), `PB_BENCH_LATENCY_MS`
    /// (200), `PB_BENCH_LATENCY_EVENTS` (20 × prefetch, scenario b throughput), `PB_BENCH_OPEN_LOOP_SECONDS` (20),
    /// `PB_BENCH_MEMORY_EVENTS` (3000, through the binaries), `PB_BENCH_WEBHOOKS` (20000),
    /// `PB_BENCH_WEBHOOK_CLIENTS` (64), `PB_BENCH_FAILOVER_EVENTS` (600), `PB_BENCH_FAILOVER_LATENCY_MS` (200),
    /// `PB_BENCH_POSTGRES_URL` (the failover's shared ledger), `PB_BENCH_BACKLOG_EVENTS` (900),
    /// `PB_BENCH_BACKLOG_LIMIT` (300), `PB_BENCH_BACKLOG_WINDOW_MS` (15000), `PB_BENCH_SCENARIOS` (comma list of
    /// ceiling, zero, latency, binary, webhook, failover, backlog; default all).
    fn from_env() -> anyhow::Result<Settings> {
        let prefetch: u16 = env_or("PB_BENCH_PREFETCH", 64)?;
        let all = "ceiling,zero,latency,binary,webhook,failover,backlog";
        let scenarios: BTreeSet<String> = env_or("PB_BENCH_SCENARIOS", all.to_string())?
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        for s in &scenarios {
            ensure!(
                all.split(',').any(|known| known == s),
                "PB_BENCH_SCENARIOS: unknown scenario {s} (known: {all})"
            );
        }
        Ok(Settings {
            amqp_url: env_or(
                "PB_BENCH_AMQP_URL",
                "amqp://guest:guest@127.0.0.1:5672/%2f".to_string(),
            )?,
            ceiling_messages: env_or("PB_BENCH_CEILING_MESSAGES", 20_000)?,
            events: env_or("PB_BENCH_EVENTS", 8_000)?,
            prefetch,
            latency_ms: env_or("PB_BENCH_LATENCY_MS", 200)?,
            latency_events: env_or("PB_BENCH_LATENCY_EVENTS", 20 * usize::from(prefetch))?,
            open_loop_seconds: env_or("PB_BENCH_OPEN_LOOP_SECONDS", 20.0)?,
            memory_events: env_or("PB_BENCH_MEMORY_EVENTS", 3_000)?,
            webhooks: env_or("PB_BENCH_WEBHOOKS", 20_000)?,
            webhook_clients: env_or("PB_BENCH_WEBHOOK_CLIENTS", 64)?,
            scenarios,
        })
    }

    fn runs(&self, scenario: &str) -> bool {
        self.scenarios.contains(scenario)
    }
}

macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!("[bench {:>7.1}s] {}", started().elapsed().as_secs_f64(), format!($($arg)*))
    };
}

#[path = "pipeline/backlog.rs"]
mod backlog;
#[path = "pipeline/failover.rs"]
mod failover;

fn started() -> &'static Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now)
}

fn main() -> ExitCode {
    let _ = started();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(64);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut cleanup = Cleanup::default();
    let outcome = runtime.block_on(run(&settings, &mut cleanup));
    runtime.block_on(cleanup.run(&settings.amqp_url));
    match outcome {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: the benchmark could not finish: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What to delete from the broker at the end.
#[derive(Default)]
struct Cleanup {
    plans: Vec<Vec<Entity>>,
}

impl Cleanup {
    fn add_config(&mut self, config: &Config) {
        self.plans.push(app::declared_topology(config));
    }

    async fn run(self, url: &str) {
        if self.plans.is_empty() {
            return;
        }
        let plan = topology::combine(self.plans);
        match Connection::connect(url, ConnectionProperties::default()).await {
            Ok(connection) => {
                match connection.create_channel().await {
                    Ok(channel) => match topology::delete(&channel, &plan).await {
                        Ok(()) => progress!("deleted the bench's queues and exchanges"),
                        Err(e) => progress!("could not delete every bench queue: {e}"),
                    },
                    Err(e) => progress!("could not open a channel to clean up: {e}"),
                }
                let _ = connection.close(200, "bench done".into()).await;
            }
            Err(e) => progress!("could not connect to clean up: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------------------------

async fn run(settings: &Settings, cleanup: &mut Cleanup) -> anyhow::Result<Value> {
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let base = format!("pb-bench-{run_id}");
    progress!(
        "run {base}: {} cores, settings {settings:?}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut report = serde_json::Map::new();
    report.insert("bench".into(), json!("partner-bridge pipeline"));
    report.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    report.insert(
        "cores".into(),
        json!(std::thread::available_parallelism().map_or(0, |n| n.get())),
    );
    report.insert(
        "settings".into(),
        json!({
            "ceiling_messages": settings.ceiling_messages,
            "events": settings.events,
            "prefetch": settings.prefetch,
            "latency_ms": settings.latency_ms,
            "latency_events": settings.latency_events,
            "open_loop_seconds": settings.open_loop_seconds,
            "memory_events": settings.memory_events,
            "webhooks": settings.webhooks,
            "webhook_clients": settings.webhook_clients,
        }),
    );
    let mut passes: Vec<(String, bool)> = Vec::new();

    // 1. The broker-only ceiling.
    let ceiling = if settings.runs("ceiling") || settings.runs("zero") {
        let names = format!("{base}-ceiling");
        let plan = ceiling_plan(&names);
        cleanup.plans.push(plan.clone());
        let rate = measure_ceiling(&settings.amqp_url, &plan, &names, settings.ceiling_messages)
            .await
            .context("broker-only ceiling")?;
        progress!("ceiling: {rate:.0} messages/s through two queue hops");
        report.insert(
            "ceiling".into(),
            json!({
                "messages": settings.ceiling_messages,
                "messages_per_second": round(rate, 1),
                "prefetch": CEILING_PREFETCH,
                "body_bytes": CEILING_BODY_BYTES,
            }),
        );
        Some(rate)
    } else {
        None
    };

    let world = BenchWorld::new(settings, &base).await?;

    // 2–4. In-process bridges.
    if settings.runs("zero") || settings.runs("latency") {
        let prefix = format!("{base}-inproc");
        let receiver_config = world.config(&world.receiver_toml(&prefix, "127.0.0.1:0"))?;
        let issuer_config = world.config(&world.issuer_toml(&prefix, "127.0.0.1:0", None))?;
        cleanup.add_config(&receiver_config);
        cleanup.add_config(&issuer_config);
        let (receiver, receiver_ready) = start_in_process(receiver_config).await?;
        let (issuer, issuer_ready) = start_in_process(issuer_config).await?;
        progress!(
            "in-process bridges ready: receiver {:.0} ms, issuer {:.0} ms after app::start (fresh queues)",
            ms(receiver_ready),
            ms(issuer_ready)
        );
        let idle = ProcStatus::read("self")?;
        let watcher =
            ResultWatcher::start(&settings.amqp_url, &format!("{prefix}.receiver.results")).await?;
        let producer = Producer::connect(&settings.amqp_url).await?;
        let onboarding = Names::new(&prefix).onboarding_exchange();
        let ready_worst = ms(receiver_ready.max(issuer_ready));
        let ready_pass = ready_worst <= BAR_READY_MS;
        passes.push(("ready_in_process".into(), ready_pass));
        let mut in_process = serde_json::Map::new();
        in_process.insert(
            "ready".into(),
            json!({
                "receiver_ms": round(ms(receiver_ready), 1),
                "issuer_ms": round(ms(issuer_ready), 1),
                "measured_from": "the app::start call to the health check /readyz answers with (fresh queues)",
                "bar_ms": BAR_READY_MS,
                "pass": ready_pass,
            }),
        );

        if settings.runs("zero") {
            let ceiling = ceiling.expect("the ceiling runs with zero");
            let sessions = world.sessions(settings.events).await?;
            progress!("zero latency: publishing {} events", sessions.len());
            let run = closed_loop(&producer, &watcher, &onboarding, &sessions).await?;
            let ratio = run.per_second / ceiling;
            let pass = ratio >= BAR_ZERO_LATENCY_RATIO;
            progress!(
                "zero latency: {:.0} events/s end to end ({:.0} published/s), {:.2} of the ceiling (bar {BAR_ZERO_LATENCY_RATIO}) {}",
                run.per_second,
                run.published_per_second,
                ratio,
                verdict(pass)
            );
            passes.push(("zero_latency".into(), pass));
            report.insert(
                "zero_latency".into(),
                json!({
                    "events": sessions.len(),
                    "seconds": round(run.seconds, 3),
                    "events_per_second": round(run.per_second, 1),
                    "published_per_second": round(run.published_per_second, 1),
                    "ceiling_per_second": round(ceiling, 1),
                    "ratio_to_ceiling": round(ratio, 3),
                    "bar": format!(">= {BAR_ZERO_LATENCY_RATIO}"),
                    "pass": pass,
                    "not_imported": run.not_imported,
                    "note": "an event crosses three quorum queues (onboarding, tokens, results) where the ceiling's \
                             message crosses two, and the bridges share the cores with the broker and the in-process \
                             Didit sandbox",
                }),
            );
        }

        if settings.runs("latency") {
            let concurrency = f64::from(settings.prefetch);
            let call_s = settings.latency_ms as f64 / 1000.0;
            let target = concurrency / (2.0 * call_s);
            world
                .control
                .set_faults(FaultSettings {
                    endpoint: FaultEndpoint::All,
                    latency_ms: settings.latency_ms,
                    ..FaultSettings::default()
                })
                .await?;
            let sessions = world.sessions(settings.latency_events).await?;
            progress!(
                "Didit at {} ms: publishing {} events (target {target:.0}/s = concurrency {concurrency} / {:.1} s)",
                settings.latency_ms,
                sessions.len(),
                2.0 * call_s
            );
            let run = closed_loop(&producer, &watcher, &onboarding, &sessions).await?;
            let ratio = run.per_second / target;
            let pass = ratio >= BAR_LATENCY_THROUGHPUT_RATIO;
            progress!(
                "Didit at {} ms: {:.1} events/s, {:.2} of {target:.0}/s (bar {BAR_LATENCY_THROUGHPUT_RATIO}) {}",
                settings.latency_ms,
                run.per_second,
                ratio,
                verdict(pass)
            );
            passes.push(("didit_latency_throughput".into(), pass));

            let rate = target / 2.0;
            let count = (rate * settings.open_loop_seconds).round().max(1.0) as usize;
            let sessions = world.sessions(count).await?;
            progress!(
                "Didit at {} ms: open loop at {rate:.1} events/s for {:.0} s ({count} events)",
                settings.latency_ms,
                settings.open_loop_seconds
            );
            let latencies = open_loop(&producer, &watcher, &onboarding, &sessions, rate).await?;
            let p99 = percentile(&latencies.millis, 0.99);
            let p99_pass = latencies.missing == 0 && p99 <= BAR_P99_MS;
            progress!(
                "Didit at {} ms: end to end p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms (bar p99 <= {BAR_P99_MS}) {}",
                settings.latency_ms,
                percentile(&latencies.millis, 0.50),
                percentile(&latencies.millis, 0.90),
                p99,
                percentile(&latencies.millis, 1.0),
                verdict(p99_pass)
            );
            progress!(
                "Didit at {} ms: stages p50/p99: send to import {:.0}/{:.0} ms, import to result {:.0}/{:.0} ms",
                settings.latency_ms,
                percentile(&latencies.to_import, 0.50),
                percentile(&latencies.to_import, 0.99),
                percentile(&latencies.after_import, 0.50),
                percentile(&latencies.after_import, 0.99),
            );
            passes.push(("didit_latency_p99".into(), p99_pass));
            world.control.clear_faults().await?;
            report.insert(
                "didit_latency".into(),
                json!({
                    "latency_ms_per_call": settings.latency_ms,
                    "concurrency": settings.prefetch,
                    "throughput": {
                        "events": settings.latency_events,
                        "seconds": round(run.seconds, 3),
                        "events_per_second": round(run.per_second, 2),
                        "target_per_second": round(target, 2),
                        "ratio": round(ratio, 3),
                        "bar": format!(">= {BAR_LATENCY_THROUGHPUT_RATIO}"),
                        "pass": pass,
                        "not_imported": run.not_imported,
                    },
                    "open_loop": {
                        "rate_per_second": round(rate, 2),
                        "events": count,
                        "p50_ms": round(percentile(&latencies.millis, 0.50), 1),
                        "p90_ms": round(percentile(&latencies.millis, 0.90), 1),
                        "p99_ms": round(p99, 1),
                        "max_ms": round(percentile(&latencies.millis, 1.0), 1),
                        "missing": latencies.missing,
                        "measured_from": "each event's scheduled send time to its import.result on the results queue",
                        "stages_ms": {
                            "to_import_p50": round(percentile(&latencies.to_import, 0.50), 1),
                            "to_import_p99": round(percentile(&latencies.to_import, 0.99), 1),
                            "after_import_p50": round(percentile(&latencies.after_import, 0.50), 1),
                            "after_import_p99": round(percentile(&latencies.after_import, 0.99), 1),
                            "note": "to_import: scheduled send to the receiver's imported_at (wall clock); \
                                     after_import: ledger, import.result publish and the results hop",
                        },
                        "bar_p99_ms": BAR_P99_MS,
                        "pass": p99_pass,
                    },
                }),
            );
        }

        let loaded = ProcStatus::read("self")?;
        in_process.insert(
            "memory_mib".into(),
            json!({
                "idle_rss": round(mib(idle.rss_kib), 1),
                "peak_hwm": round(mib(loaded.hwm_kib), 1),
                "note": "the bench process: sandbox, load generator, result watcher, the ceiling's clients and \
                         both bridges together; see `binary` for one bridge alone",
            }),
        );
        report.insert("in_process".into(), Value::Object(in_process));
        watcher.stop().await;
        producer.close().await;
        issuer.stop().await?;
        receiver.stop().await?;
    }

    // 5. The real binary: readiness and memory of one bridge per process.
    if settings.runs("binary") {
        let value = binary_phase(
            settings,
            &world,
            &format!("{base}-bin"),
            cleanup,
            &mut passes,
        )
        .await?;
        report.insert("binary".into(), value);
    }

    // 6. Webhook intake.
    if settings.runs("webhook") {
        let value = webhook_phase(
            settings,
            &world,
            &format!("{base}-hook"),
            cleanup,
            &mut passes,
        )
        .await?;
        report.insert("webhook".into(), value);
    }

    // 7. A replica SIGKILLed: how soon its peer on the shared ledger finishes its sessions.
    if settings.runs("failover") {
        let value = failover::failover_phase(
            settings,
            &world,
            &format!("{base}-failover"),
            cleanup,
            &mut passes,
        )
        .await?;
        report.insert("failover".into(), value);
    }

    // 8. Didit's rate limit on, a backlog at once: how close to the limit's own floor it drains.
    if settings.runs("backlog") {
        let value = backlog::backlog_phase(
            settings,
            &world,
            &format!("{base}-backlog"),
            cleanup,
            &mut passes,
        )
        .await?;
        report.insert("backlog".into(), value);
    }

    world.sandbox.shutdown().await;
    let all = passes.iter().all(|(_, p)| *p);
    report.insert(
        "bars".into(),
        Value::Object(
            passes
                .iter()
                .map(|(name, pass)| (name.clone(), json!(pass)))
                .collect(),
        ),
    );
    report.insert("pass".into(), json!(all));
    progress!(
        "done: {}",
        if all {
            "every bar met".to_string()
        } else {
            format!(
                "missed: {}",
                passes
                    .iter()
                    .filter(|(_, p)| !p)
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    Ok(Value::Object(report))
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "MISS" }
}

fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (value * scale).round() / scale
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

// ---------------------------------------------------------------------------------------------------------------
// The sandbox, applications and configurations
// ---------------------------------------------------------------------------------------------------------------

struct BenchWorld {
    sandbox: Sandbox,
    control: Control,
    issuer_app: ApplicationInfo,
    partner_app: ApplicationInfo,
    key: SigningKey,
    dir: tempfile::TempDir,
    amqp_url: String,
    prefetch: u16,
}

impl BenchWorld {
    async fn new(settings: &Settings, base: &str) -> anyhow::Result<BenchWorld> {
        let sandbox = Sandbox::start(
            "127.0.0.1:0".parse().expect("static address"),
            SandboxOptions {
                rate_limit: false,
                default_applications: false,
                ..SandboxOptions::default()
            },
        )
        .await
        .context("starting the sandbox")?;
        let control = sandbox.control();
        let issuer_app = control.create_application("fintech-a").await?;
        let partner_app = control.create_application("sponsor-bank").await?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("{base}-"))
            .tempdir()
            .context("temporary directory")?;
        Ok(BenchWorld {
            sandbox,
            control,
            issuer_app,
            partner_app,
            key: SigningKey::generate(),
            dir,
            amqp_url: settings.amqp_url.clone(),
            prefetch: settings.prefetch,
        })
    }

    fn common_toml(&self, prefix: &str, role: &str, admin: &str, app: &ApplicationInfo) -> String {
        format!(
            r#"
state_dir = "{state}/{prefix}/{role}"
[didit]
base_url = "{base}"
application_id = "{application_id}"
api_key = "{api_key}"
[amqp]
url = "{amqp}"
prefix = "{prefix}"
prefetch = {prefetch}
[admin]
listen = "{admin}"
[log]
level = "warn"
"#,
            state = self.dir.path().display(),
            base = self.sandbox.base_url(),
            application_id = app.application_id,
            api_key = app.api_key.expose(),
            amqp = self.amqp_url,
            prefetch = self.prefetch,
        )
    }

    /// The issuer; `webhook` adds an intake with that secret (and a partner that receives nothing, so the
    /// intake is measured rather than the shares behind it).
    fn issuer_toml(&self, prefix: &str, admin: &str, webhook: Option<&str>) -> String {
        let (statuses, intake) = match webhook {
            None => (
                r#"["Approved", "In Review", "Declined"]"#.to_string(),
                String::new(),
            ),
            Some(secret) => (
                r#"["Declined"]"#.to_string(),
                format!(
                    "[issuer.webhook]\nlisten = \"127.0.0.1:{}\"\nsecret = \"{secret}\"\n",
                    free_port().unwrap_or(0)
                ),
            ),
        };
        format!(
            r#"{common}
[issuer]
enabled = true
signing_key = "{key}"
{intake}
[[issuer.partners]]
name = "sponsor-bank"
application_id = "{partner}"
ttl_seconds = 3600
statuses = {statuses}
session_kinds = ["user", "business"]
share_vendor_data = true
"#,
            common = self.common_toml(prefix, "issuer", admin, &self.issuer_app),
            key = self.key.to_base64(),
            partner = self.partner_app.application_id,
        )
    }

    fn receiver_toml(&self, prefix: &str, admin: &str) -> String {
        format!(
            r#"{common}
[receiver]
enabled = true
workflow_user = "{wf_user}"
workflow_business = "{wf_business}"
vendor_data = "{{issuer}}:{{source_vendor_data}}"
[[receiver.issuers]]
name = "fintech-a"
application_id = "{issuer}"
public_key = "{public}"
trust_review = false
"#,
            common = self.common_toml(prefix, "receiver", admin, &self.partner_app),
            wf_user = self.partner_app.workflows.user,
            wf_business = self.partner_app.workflows.business,
            issuer = self.issuer_app.application_id,
            public = self.key.verifying_key().to_base64(),
        )
    }

    fn config(&self, toml: &str) -> anyhow::Result<Config> {
        let config = Config::from_toml(toml).context("bench configuration")?;
        config.validate().context("bench configuration")?;
        Ok(config)
    }

    /// Creates `n` finished sessions at the issuer (half KYC, half KYB), returning `(id, kind, status)`.
    async fn sessions(&self, n: usize) -> anyhow::Result<Vec<SourceSession>> {
        let started = Instant::now();
        let next = Arc::new(AtomicUsize::new(0));
        let made = Arc::new(Mutex::new(Vec::with_capacity(n)));
        let mut workers = Vec::new();
        for _ in 0..16 {
            let (next, made, control) = (next.clone(), made.clone(), self.control.clone());
            let app = self.issuer_app.application_id.clone();
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<(), anyhow::Error>(());
                    }
                    let (kind, status) = if i % 2 == 0 {
                        (SessionKind::User, "Approved")
                    } else {
                        (SessionKind::Business, "APPROVED")
                    };
                    let info = control
                        .create_session(&app, kind, status, Some(&format!("bench-{i}")))
                        .await?;
                    made.lock().unwrap().push(SourceSession {
                        id: info.session_id,
                        kind,
                        status,
                    });
                }
            }));
        }
        for worker in workers {
            worker.await??;
        }
        let made = std::mem::take(&mut *made.lock().unwrap());
        progress!(
            "created {n} sessions in the sandbox in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(made)
    }
}

#[derive(Debug, Clone)]
struct SourceSession {
    id: String,
    kind: SessionKind,
    status: &'static str,
}

impl SourceSession {
    fn event(&self) -> Vec<u8> {
        let event = OnboardingFinished {
            kind: "onboarding.finished".into(),
            event_id: uuid::Uuid::new_v4().to_string(),
            session_id: self.id.clone(),
            status: self.status.to_string(),
            session_kind: Some(self.kind),
            vendor_data: Some(format!("vendor-{}", self.id)),
            occurred_at: Some(Utc::now()),
            partners: None,
        };
        serde_json::to_vec(&event).expect("events serialise")
    }
}

async fn start_in_process(config: Config) -> anyhow::Result<(Running, Duration)> {
    let started = Instant::now();
    let running = app::start(config, CancellationToken::new()).await?;
    let deadline = started + Duration::from_secs(30);
    loop {
        if running.health().check().is_ok() {
            return Ok((running, started.elapsed()));
        }
        if Instant::now() > deadline {
            bail!(
                "bridge not ready after 30 s: {:?}",
                running.health().check().err()
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// AMQP: a confirming producer and a watcher of import.results
// ---------------------------------------------------------------------------------------------------------------

/// A connection with one channel in confirm mode.
struct Producer {
    connection: Connection,
    channel: Channel,
}

impl Producer {
    async fn connect(url: &str) -> anyhow::Result<Producer> {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .context("connecting to RabbitMQ")?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Producer {
            connection,
            channel,
        })
    }

    fn properties(kind: &str) -> BasicProperties {
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
            .with_type(kind.into())
            .with_app_id("partner-bridge-bench".into())
            .with_timestamp(Utc::now().timestamp() as u64)
    }

    /// Publishes one message (mandatory) and returns its pending confirm.
    async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        kind: &str,
    ) -> anyhow::Result<lapin::PublisherConfirm> {
        Ok(self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                Self::properties(kind),
            )
            .await?)
    }

    /// Publishes every body with at most [`PUBLISH_WINDOW`] confirms outstanding; fails unless each is a plain ack.
    async fn publish_all(
        &self,
        exchange: &str,
        routing_key: &str,
        bodies: impl IntoIterator<Item = Vec<u8>>,
        kind: &str,
    ) -> anyhow::Result<()> {
        let mut pending = FuturesUnordered::new();
        for body in bodies {
            if pending.len() >= PUBLISH_WINDOW {
                check_confirm(pending.next().await.expect("not empty"))?;
            }
            pending.push(self.send(exchange, routing_key, &body, kind).await?);
        }
        while let Some(confirm) = pending.next().await {
            check_confirm(confirm)?;
        }
        Ok(())
    }

    async fn close(self) {
        let _ = self.connection.close(200, "bench done".into()).await;
    }
}

fn check_confirm(confirm: lapin::Result<Confirmation>) -> anyhow::Result<()> {
    match confirm? {
        Confirmation::Ack(None) => Ok(()),
        other => bail!("publish not delivered: {other:?}"),
    }
}

/// Consumes the receiver's results queue and notes when each source session's `import.result` arrived.
struct ResultWatcher {
    seen: Arc<Mutex<HashMap<String, Seen>>>,
    /// How many distinct sessions have a result (so waiting costs one load, not a scan of every id).
    distinct: Arc<AtomicUsize>,
    arrived: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ResultWatcher {
    async fn start(url: &str, queue: &str) -> anyhow::Result<ResultWatcher> {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel.basic_qos(500, BasicQosOptions::default()).await?;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                format!("bench-{}", uuid::Uuid::new_v4()).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("consuming {queue}"))?;
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let distinct = Arc::new(AtomicUsize::new(0));
        let arrived = Arc::new(tokio::sync::Notify::new());
        let stop = CancellationToken::new();
        let (s, d, a, halt) = (
            seen.clone(),
            distinct.clone(),
            arrived.clone(),
            stop.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = halt.cancelled() => break,
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => {
                            let at = Instant::now();
                            if let Ok(result) = serde_json::from_slice::<Outcome>(&delivery.data) {
                                let mut seen = s.lock().unwrap();
                                if let std::collections::hash_map::Entry::Vacant(slot) =
                                    seen.entry(result.source_session_id)
                                {
                                    slot.insert(Seen {
                                        at,
                                        outcome: result.outcome,
                                        imported_at: result.imported_at,
                                    });
                                    d.fetch_add(1, Ordering::Release);
                                    a.notify_waiters();
                                }
                            }
                            let _ = delivery.ack(BasicAckOptions::default()).await;
                        }
                        Some(Err(e)) => {
                            progress!("result watcher stopped: {e}");
                            break;
                        }
                        None => break,
                    }
                }
            }
            let _ = connection.close(200, "bench done".into()).await;
        });
        Ok(ResultWatcher {
            seen,
            distinct,
            arrived,
            stop,
            task,
        })
    }

    /// How many sessions have a result so far; pass it to [`ResultWatcher::wait_all`] for sessions published
    /// after this call.
    fn mark(&self) -> usize {
        self.distinct.load(Ordering::Acquire)
    }

    /// Waits until every session of `ids` (all published after `mark`) has a result, or `timeout` passes; returns
    /// their arrival times and how many were not `imported`, or the number still missing. The ids are looked up
    /// only once enough results arrived, so waiting does not compete with the bridges for CPU.
    async fn wait_all(
        &self,
        ids: &[&str],
        mark: usize,
        timeout: Duration,
    ) -> Result<(Vec<Instant>, usize), usize> {
        let deadline = tokio::time::Instant::now() + timeout;
        let missing = || {
            let seen = self.seen.lock().unwrap();
            ids.iter().filter(|id| !seen.contains_key(**id)).count()
        };
        loop {
            let notified = self.arrived.notified();
            if self.mark() >= mark + ids.len() && missing() == 0 {
                let seen = self.seen.lock().unwrap();
                let times = ids.iter().map(|id| seen[*id].at).collect();
                let bad = ids
                    .iter()
                    .filter(|id| seen[**id].outcome != "imported")
                    .count();
                return Ok((times, bad));
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => return Err(missing()),
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// When the session's result arrived, and the `imported_at` it carries.
    fn arrival(&self, id: &str) -> Option<(Instant, Option<chrono::DateTime<Utc>>)> {
        self.seen
            .lock()
            .unwrap()
            .get(id)
            .map(|seen| (seen.at, seen.imported_at))
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The part of an `import.result` the watcher reads.
#[derive(serde::Deserialize)]
struct Outcome {
    source_session_id: String,
    outcome: String,
    imported_at: Option<chrono::DateTime<Utc>>,
}

/// One session's result, as the watcher saw it.
struct Seen {
    at: Instant,
    outcome: String,
    imported_at: Option<chrono::DateTime<Utc>>,
}

/// A closed-loop run: publish every event as fast as confirms allow, wait for every import.
struct ClosedLoop {
    seconds: f64,
    per_second: f64,
    published_per_second: f64,
    not_imported: usize,
}

async fn closed_loop(
    producer: &Producer,
    watcher: &ResultWatcher,
    exchange: &str,
    sessions: &[SourceSession],
) -> anyhow::Result<ClosedLoop> {
    let bodies: Vec<Vec<u8>> = sessions.iter().map(SourceSession::event).collect();
    let ids: Vec<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
    let mark = watcher.mark();
    let t0 = Instant::now();
    producer
        .publish_all(
            exchange,
            "onboarding.finished",
            bodies,
            "onboarding.finished",
        )
        .await?;
    let published = t0.elapsed();
    let timeout = Duration::from_secs(120);
    let (times, not_imported) = watcher
        .wait_all(&ids, mark, timeout)
        .await
        .map_err(|missing| {
            anyhow::anyhow!(
                "{missing} of {} imports missing after {timeout:?}",
                ids.len()
            )
        })?;
    let last = times.into_iter().max().expect("at least one event");
    let seconds = (last - t0).as_secs_f64();
    Ok(ClosedLoop {
        seconds,
        per_second: sessions.len() as f64 / seconds,
        published_per_second: sessions.len() as f64 / published.as_secs_f64(),
        not_imported,
    })
}

/// End-to-end latencies of an open-loop run, sorted, in milliseconds.
struct Latencies {
    millis: Vec<f64>,
    /// From the scheduled send to the receiver's `imported_at` (issuer, share, token hop, import), wall clock.
    to_import: Vec<f64>,
    /// From `imported_at` to the result on the watcher (ledger, result publish, results hop).
    after_import: Vec<f64>,
    missing: usize,
}

/// Publishes one event every `1 / rate` seconds on a fixed schedule (a late publish does not delay the next one's
/// schedule), and measures each from its scheduled time to its result.
async fn open_loop(
    producer: &Producer,
    watcher: &ResultWatcher,
    exchange: &str,
    sessions: &[SourceSession],
    rate: f64,
) -> anyhow::Result<Latencies> {
    let mark = watcher.mark();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let t0 = Instant::now() + Duration::from_millis(50);
    let wall0 = Utc::now() + chrono::Duration::milliseconds(50);
    let mut scheduled = Vec::with_capacity(sessions.len());
    let mut pending = FuturesUnordered::new();
    for (i, session) in sessions.iter().enumerate() {
        let at = t0 + interval * i as u32;
        // Confirms are collected while waiting for the next slot, so they never hold the schedule back.
        loop {
            tokio::select! {
                biased;
                Some(confirm) = pending.next(), if !pending.is_empty() => check_confirm(confirm)?,
                () = tokio::time::sleep_until(at.into()) => break,
            }
        }
        scheduled.push(at);
        let body = session.event();
        pending.push(
            producer
                .send(
                    exchange,
                    "onboarding.finished",
                    &body,
                    "onboarding.finished",
                )
                .await?,
        );
    }
    while let Some(confirm) = pending.next().await {
        check_confirm(confirm)?;
    }
    let ids: Vec<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
    let missing = watcher
        .wait_all(&ids, mark, Duration::from_secs(30))
        .await
        .err()
        .unwrap_or(0);
    let (mut millis, mut to_import, mut after_import) = (Vec::new(), Vec::new(), Vec::new());
    for (session, at) in sessions.iter().zip(&scheduled) {
        let Some((got, imported_at)) = watcher.arrival(&session.id) else {
            continue;
        };
        let total = ms(got - *at);
        millis.push(total);
        if let Some(imported_at) = imported_at {
            let sent = wall0 + chrono::Duration::from_std(*at - t0).unwrap_or_default();
            let first = (imported_at - sent).num_microseconds().unwrap_or(0) as f64 / 1000.0;
            to_import.push(first);
            after_import.push(total - first);
        }
    }
    for list in [&mut millis, &mut to_import, &mut after_import] {
        list.sort_by(f64::total_cmp);
    }
    Ok(Latencies {
        millis,
        to_import,
        after_import,
        missing,
    })
}

// ---------------------------------------------------------------------------------------------------------------
// 1. The broker-only ceiling
// ---------------------------------------------------------------------------------------------------------------

fn ceiling_plan(prefix: &str) -> Vec<Entity> {
    let dead_letter = format!("{prefix}.dead-letter");
    let queue = |name: &str| Entity::Queue {
        name: name.to_string(),
        arguments: vec![
            ("x-queue-type".into(), HeaderValue::Str("quorum".into())),
            ("x-delivery-limit".into(), HeaderValue::Int(20)),
            (
                "x-dead-letter-exchange".into(),
                HeaderValue::Str(dead_letter.clone()),
            ),
            (
                "x-dead-letter-routing-key".into(),
                HeaderValue::Str(name.to_string()),
            ),
        ],
    };
    vec![
        Entity::Exchange {
            name: format!("{prefix}.in"),
            kind: "topic",
        },
        Entity::Exchange {
            name: format!("{prefix}.out"),
            kind: "topic",
        },
        Entity::Exchange {
            name: dead_letter.clone(),
            kind: "direct",
        },
        queue(&format!("{prefix}.q1")),
        queue(&format!("{prefix}.q2")),
        Entity::Binding {
            queue: format!("{prefix}.q1"),
            exchange: format!("{prefix}.in"),
            routing_key: "hop.one".into(),
        },
        Entity::Binding {
            queue: format!("{prefix}.q2"),
            exchange: format!("{prefix}.out"),
            routing_key: "hop.two".into(),
        },
    ]
}

/// Publish → q1 → relay (publish with confirm, then ack) → q2 → consume and ack; messages per second from the
/// first publish to the last consumed message.
async fn measure_ceiling(
    url: &str,
    plan: &[Entity],
    prefix: &str,
    messages: usize,
) -> anyhow::Result<f64> {
    let setup = Producer::connect(url).await?;
    topology::declare(&setup.channel, plan).await?;
    setup.close().await;

    // Sink: consume q2 and ack.
    let sink_connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let sink_channel = sink_connection.create_channel().await?;
    sink_channel
        .basic_qos(CEILING_PREFETCH, BasicQosOptions::default())
        .await?;
    let mut sink = sink_channel
        .basic_consume(
            format!("{prefix}.q2").as_str().into(),
            "bench-sink".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Instant>();
    let sink_task = tokio::spawn(async move {
        let mut count = 0;
        let mut done = Some(done_tx);
        while let Some(Ok(delivery)) = sink.next().await {
            let _ = delivery.ack(BasicAckOptions::default()).await;
            count += 1;
            if count == messages
                && let Some(done) = done.take()
            {
                let _ = done.send(Instant::now());
            }
        }
    });

    // Relay: consume q1; republish each with a confirm on its own channel, then ack (the bridge's order).
    let relay_connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let relay_in = relay_connection.create_channel().await?;
    relay_in
        .basic_qos(CEILING_PREFETCH, BasicQosOptions::default())
        .await?;
    let relay_out = relay_connection.create_channel().await?;
    relay_out
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut relay = relay_in
        .basic_consume(
            format!("{prefix}.q1").as_str().into(),
            "bench-relay".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let out_exchange = format!("{prefix}.out");
    let relay_task = tokio::spawn(async move {
        while let Some(Ok(delivery)) = relay.next().await {
            let channel = relay_out.clone();
            let exchange = out_exchange.clone();
            tokio::spawn(async move {
                let confirm = channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "hop.two".into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &delivery.data,
                        delivery.properties.clone(),
                    )
                    .await;
                if let Ok(confirm) = confirm
                    && matches!(confirm.await, Ok(Confirmation::Ack(None)))
                {
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                }
            });
        }
    });

    let producer = Producer::connect(url).await?;
    let body = ceiling_body();
    progress!("ceiling: {messages} messages of {} bytes", body.len());
    let t0 = Instant::now();
    producer
        .publish_all(
            &format!("{prefix}.in"),
            "hop.one",
            std::iter::repeat_n(body, messages),
            "bench.ceiling",
        )
        .await?;
    let done = tokio::time::timeout(Duration::from_secs(120), done_rx)
        .await
        .context("the ceiling's messages did not all arrive within 120 s")?
        .context("the sink stopped")?;
    let rate = messages as f64 / (done - t0).as_secs_f64();
    producer.close().await;
    let _ = relay_connection.close(200, "bench done".into()).await;
    let _ = sink_connection.close(200, "bench done".into()).await;
    relay_task.abort();
    sink_task.abort();
    Ok(rate)
}

/// A 600-byte JSON body shaped like a share-token envelope (the token padded to the size).
fn ceiling_body() -> Vec<u8> {
    let body = |token: &str| {
        serde_json::to_vec(&json!({
            "type": "share_token",
            "message_id": uuid::Uuid::new_v4().to_string(),
            "event_id": uuid::Uuid::new_v4().to_string(),
            "share_token": token,
            "session_kind": "user",
            "source_session_id": uuid::Uuid::new_v4().to_string(),
            "from_application_id": uuid::Uuid::new_v4().to_string(),
            "for_application_id": uuid::Uuid::new_v4().to_string(),
            "source_status": "Approved",
        }))
        .expect("json")
    };
    let bare = body("").len();
    body(&"x".repeat(CEILING_BODY_BYTES.saturating_sub(bare)))
}

// ---------------------------------------------------------------------------------------------------------------
// 5. The real binary
// ---------------------------------------------------------------------------------------------------------------

/// `VmHWM` and `VmRSS` of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy)]
struct ProcStatus {
    hwm_kib: u64,
    rss_kib: u64,
}

impl ProcStatus {
    fn read(pid: &str) -> anyhow::Result<ProcStatus> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{name} in /proc/{pid}/status"))
        };
        Ok(ProcStatus {
            hwm_kib: field("VmHWM:")?,
            rss_kib: field("VmRSS:")?,
        })
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One `partner-bridge run` child.
struct Child {
    child: tokio::process::Child,
    admin: String,
    pid: String,
}

impl Child {
    /// Spawns the binary (its output appended to `log`) and waits for `/readyz` 200, returning the time from spawn
    /// to ready.
    async fn spawn(
        config: &Path,
        log: &Path,
        admin_port: u16,
        http: &reqwest::Client,
    ) -> anyhow::Result<(Child, Duration)> {
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let started = Instant::now();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_partner-bridge"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdin(std::process::Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .kill_on_drop(true)
            .spawn()
            .context("spawning partner-bridge run")?;
        let pid = child.id().context("child pid")?.to_string();
        let admin = format!("http://127.0.0.1:{admin_port}");
        let mut child = Child { child, admin, pid };
        let ready = child.wait_ready(http, started).await?;
        Ok((child, ready))
    }

    async fn wait_ready(
        &mut self,
        http: &reqwest::Client,
        since: Instant,
    ) -> anyhow::Result<Duration> {
        let url = format!("{}/readyz", self.admin);
        let deadline = since + Duration::from_secs(30);
        loop {
            if let Ok(response) = http.get(&url).send().await
                && response.status() == 200
            {
                return Ok(since.elapsed());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("partner-bridge run exited with {status} before it was ready");
            }
            if Instant::now() > deadline {
                bail!("partner-bridge run not ready after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn status(&self) -> anyhow::Result<ProcStatus> {
        ProcStatus::read(&self.pid)
    }

    /// SIGTERM, then waits for the exit (the bridge drains first).
    async fn terminate(mut self) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
        let started = Instant::now();
        let sent = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(&self.pid)
            .status()
            .context("running kill -TERM")?;
        ensure!(sent.success(), "kill -TERM {} failed", self.pid);
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .context("the bridge did not exit within 30 s of SIGTERM")??;
        Ok((status, started.elapsed()))
    }
}

async fn binary_phase(
    settings: &Settings,
    world: &BenchWorld,
    prefix: &str,
    cleanup: &mut Cleanup,
    passes: &mut Vec<(String, bool)>,
) -> anyhow::Result<Value> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()?;
    let (receiver_port, issuer_port) = (free_port()?, free_port()?);
    let receiver_toml = world.receiver_toml(prefix, &format!("127.0.0.1:{receiver_port}"));
    let issuer_toml = world.issuer_toml(prefix, &format!("127.0.0.1:{issuer_port}"), None);
    cleanup.add_config(&world.config(&receiver_toml)?);
    cleanup.add_config(&world.config(&issuer_toml)?);
    let dir: PathBuf = world.dir.path().join(prefix);
    std::fs::create_dir_all(&dir)?;
    let receiver_path = dir.join("receiver.toml");
    let issuer_path = dir.join("issuer.toml");
    std::fs::write(&receiver_path, &receiver_toml)?;
    std::fs::write(&issuer_path, &issuer_toml)?;

    let receiver_log = dir.join("receiver.log");
    let issuer_log = dir.join("issuer.log");
    let outcome = binary_runs(
        settings,
        world,
        prefix,
        passes,
        &http,
        [
            (&receiver_path, &receiver_log, receiver_port),
            (&issuer_path, &issuer_log, issuer_port),
        ],
    )
    .await;
    if outcome.is_err() {
        for log in [&receiver_log, &issuer_log] {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            progress!("last lines of {}:", log.display());
            for line in &lines[lines.len().saturating_sub(20)..] {
                eprintln!("    {line}");
            }
        }
    }
    outcome
}

type BinarySetup<'a> = [(&'a Path, &'a Path, u16); 2];

async fn binary_runs(
    settings: &Settings,
    world: &BenchWorld,
    prefix: &str,
    passes: &mut Vec<(String, bool)>,
    http: &reqwest::Client,
    [
        (receiver_path, receiver_log, receiver_port),
        (issuer_path, issuer_log, issuer_port),
    ]: BinarySetup<'_>,
) -> anyhow::Result<Value> {
    let (receiver, receiver_cold) =
        Child::spawn(receiver_path, receiver_log, receiver_port, http).await?;
    let (issuer, issuer_cold) = Child::spawn(issuer_path, issuer_log, issuer_port, http).await?;
    progress!(
        "binary: ready after spawn (fresh queues): receiver {:.0} ms, issuer {:.0} ms",
        ms(receiver_cold),
        ms(issuer_cold)
    );
    // Idle: ready, nothing to do, a moment for the runtime to settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let receiver_idle = receiver.status()?;
    let issuer_idle = issuer.status()?;

    let sessions = world.sessions(settings.memory_events).await?;
    let watcher =
        ResultWatcher::start(&settings.amqp_url, &format!("{prefix}.receiver.results")).await?;
    let producer = Producer::connect(&settings.amqp_url).await?;
    let onboarding = Names::new(prefix).onboarding_exchange();
    progress!(
        "binary: {} events through the two processes",
        sessions.len()
    );
    let run = closed_loop(&producer, &watcher, &onboarding, &sessions).await?;
    progress!(
        "binary: {:.0} events/s end to end (bridges in their own processes)",
        run.per_second
    );
    watcher.stop().await;
    producer.close().await;
    let receiver_loaded = receiver.status()?;
    let issuer_loaded = issuer.status()?;

    // Warm restart: the queues exist, the ledger is there.
    let (issuer_exit, issuer_drain) = issuer.terminate().await?;
    let (issuer, issuer_warm) = Child::spawn(issuer_path, issuer_log, issuer_port, http).await?;
    let (receiver_exit, _) = receiver.terminate().await?;
    let (receiver, receiver_warm) =
        Child::spawn(receiver_path, receiver_log, receiver_port, http).await?;
    progress!(
        "binary: ready after a restart: receiver {:.0} ms, issuer {:.0} ms (SIGTERM exits: issuer {issuer_exit} after {:.0} ms, receiver {receiver_exit})",
        ms(receiver_warm),
        ms(issuer_warm),
        ms(issuer_drain)
    );
    let _ = issuer.terminate().await?;
    let _ = receiver.terminate().await?;

    let peak = mib(receiver_loaded.hwm_kib.max(issuer_loaded.hwm_kib));
    let idle = mib(receiver_idle.rss_kib.max(issuer_idle.rss_kib));
    let load_pass = peak <= BAR_LOAD_MIB;
    let idle_pass = idle <= BAR_IDLE_MIB;
    let ready_worst = [receiver_cold, issuer_cold, receiver_warm, issuer_warm]
        .into_iter()
        .max()
        .expect("four figures");
    let ready_warm_worst = receiver_warm.max(issuer_warm);
    let ready_pass = ms(ready_worst) <= BAR_READY_MS;
    progress!(
        "binary: peak RSS under load {peak:.1} MiB (bar {BAR_LOAD_MIB}) {}, idle RSS {idle:.1} MiB (bar {BAR_IDLE_MIB}) {}, ready worst {:.0} ms (bar {BAR_READY_MS}) {}",
        verdict(load_pass),
        verdict(idle_pass),
        ms(ready_worst),
        verdict(ready_pass)
    );
    passes.push(("memory_under_load".into(), load_pass));
    passes.push(("memory_idle".into(), idle_pass));
    passes.push(("ready".into(), ready_pass));
    let process = |idle: ProcStatus, loaded: ProcStatus, cold: Duration, warm: Duration| {
        json!({
            "idle_rss_mib": round(mib(idle.rss_kib), 1),
            "peak_hwm_mib": round(mib(loaded.hwm_kib), 1),
            "rss_after_load_mib": round(mib(loaded.rss_kib), 1),
            "ready_ms_fresh_queues": round(ms(cold), 1),
            "ready_ms_restart": round(ms(warm), 1),
        })
    };
    Ok(json!({
        "receiver": process(receiver_idle, receiver_loaded, receiver_cold, receiver_warm),
        "issuer": process(issuer_idle, issuer_loaded, issuer_cold, issuer_warm),
        "load": {
            "events": sessions.len(),
            "events_per_second": round(run.per_second, 1),
            "not_imported": run.not_imported,
        },
        "memory": {
            "peak_under_load_mib": round(peak, 1),
            "bar_load_mib": BAR_LOAD_MIB,
            "pass_load": load_pass,
            "idle_mib": round(idle, 1),
            "bar_idle_mib": BAR_IDLE_MIB,
            "pass_idle": idle_pass,
        },
        "ready": {
            "worst_ms": round(ms(ready_worst), 1),
            "worst_restart_ms": round(ms(ready_warm_worst), 1),
            "measured_from": "spawning `partner-bridge run` to /readyz 200",
            "bar_ms": BAR_READY_MS,
            "pass": ready_pass,
        },
        "sigterm_exit": { "issuer": issuer_exit.to_string(), "receiver": receiver_exit.to_string() },
    }))
}

// ---------------------------------------------------------------------------------------------------------------
// 6. Webhook intake
// ---------------------------------------------------------------------------------------------------------------

async fn webhook_phase(
    settings: &Settings,
    world: &BenchWorld,
    prefix: &str,
    cleanup: &mut Cleanup,
    passes: &mut Vec<(String, bool)>,
) -> anyhow::Result<Value> {
    let secret = uuid::Uuid::new_v4().simple().to_string();
    let config = world.config(&world.issuer_toml(prefix, "127.0.0.1:0", Some(&secret)))?;
    cleanup.add_config(&config);
    let (issuer, _) = start_in_process(config).await?;
    let url = format!(
        "http://{}/webhooks/didit",
        issuer
            .webhook_addr()
            .context("the webhook intake is configured")?
    );
    let clients = settings.webhook_clients.max(1);
    let warmup = clients * 4;
    let total = settings.webhooks + warmup;
    progress!("webhook: signing {total} deliveries");
    let now = Utc::now().timestamp();
    let deliveries: Arc<Vec<(Vec<u8>, String)>> = Arc::new(
        (0..total)
            .map(|i| {
                let body = json!({
                    "session_id": uuid::Uuid::new_v4().to_string(),
                    "status": "Approved",
                    "webhook_type": "status.updated",
                    "session_kind": "user",
                    "vendor_data": format!("bench-hook-{i}"),
                    "workflow_id": world.issuer_app.workflows.user,
                    "timestamp": now,
                    "created_at": now,
                });
                let signature = signature::sign_v2(&secret, &body);
                (serde_json::to_vec(&body).expect("json"), signature)
            })
            .collect(),
    );
    let http = reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .pool_max_idle_per_host(clients)
        .timeout(Duration::from_secs(30))
        .build()?;

    let send = |range: std::ops::Range<usize>| {
        let next = Arc::new(AtomicUsize::new(range.start));
        let failures = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (next, failures, deliveries, http, url) = (
                next.clone(),
                failures.clone(),
                deliveries.clone(),
                http.clone(),
                url.clone(),
            );
            let end = range.end;
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= end {
                        return;
                    }
                    let (body, signature) = &deliveries[i];
                    let answer = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("x-signature-v2", signature)
                        .body(body.clone())
                        .send()
                        .await;
                    match answer {
                        Ok(response) if response.status() == 200 => {
                            let _ = response.bytes().await;
                        }
                        _ => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        async move {
            for task in tasks {
                let _ = task.await;
            }
            failures.load(Ordering::Relaxed)
        }
    };
    // Warm-up: open the keep-alive connections.
    let warm_failures = send(0..warmup).await;
    progress!(
        "webhook: {} deliveries from {clients} keep-alive HTTP/1.1 clients",
        settings.webhooks
    );
    let t0 = Instant::now();
    let failures = send(warmup..total).await;
    let seconds = t0.elapsed().as_secs_f64();
    let rate = (settings.webhooks - failures) as f64 / seconds;

    // Every 200 stands for an event the broker confirmed: the issuer's consumer sees each one.
    let text = issuer.metrics().encode();
    let accepted = series(
        &text,
        "partner_bridge_webhook_requests_total{outcome=\"accepted\"}",
    );
    let consumed_deadline = Instant::now() + Duration::from_secs(60);
    let consumed = loop {
        let text = issuer.metrics().encode();
        let consumed = series(
            &text,
            "partner_bridge_events_total{source=\"webhook\",outcome=\"no_matching_partner\"}",
        );
        if consumed >= accepted || Instant::now() > consumed_deadline {
            break consumed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pass = failures == 0 && warm_failures == 0 && rate >= BAR_WEBHOOKS_PER_SECOND;
    progress!(
        "webhook: {rate:.0} verified deliveries/s (bar {BAR_WEBHOOKS_PER_SECOND}) {}; {failures} failed; {accepted} accepted, {consumed} events consumed from the broker",
        verdict(pass)
    );
    passes.push(("webhook_intake".into(), pass));
    issuer.stop().await?;
    Ok(json!({
        "deliveries": settings.webhooks,
        "clients": clients,
        "seconds": round(seconds, 3),
        "per_second": round(rate, 1),
        "failed": failures + warm_failures,
        "accepted_total": accepted,
        "events_consumed_total": consumed,
        "bar_per_second": BAR_WEBHOOKS_PER_SECOND,
        "pass": pass,
    }))
}

/// The value of one exposition line, 0 when absent.
fn series(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
