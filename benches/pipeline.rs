//! `cargo bench --bench pipeline`: the performance bars of DESIGN.md §10, measured on this machine against the local
//! RabbitMQ, with the sandbox standing in for Didit (`partner-bridge sandbox --no-rate-limit`, a process of its own,
//! driven through its HTTP control routes).
//!
//! One run measures, in this order:
//! 1. **ceiling** — the broker alone, through the same three queue hops an event crosses (onboarding, tokens,
//!    results): publish → q1 → relay (publish with a confirm, then ack) → q2 → relay → q3 → consume and ack; quorum
//!    queues, ~600-byte persistent messages, mandatory publishes, prefetch 200, everything on this machine. Reports
//!    messages per second, the broker's CPU per message-hop (its `utime + stime` over the run ÷ (messages × 3)) and
//!    the bench process's CPU per message. Every other throughput is a ratio to this one, so a busy machine moves
//!    both alike.
//! 2. **zero** (a) — the issuer and the receiver as two `partner-bridge run` processes, the sandbox at zero latency;
//!    events published as fast as confirms allow until every import is seen on the receiver's results queue:
//!    events per second and the ratio to the ceiling (bar ≥ 0.50, stretch 0.70 reported), and CPU per event from
//!    `/proc` (read just before the first publish and just after the last result) of the issuer, the receiver, both
//!    together (bar ≤ 250 µs, stretch 150), the broker (bar ≤ 1.5 × 3 × the ceiling's per-hop cost; not measured
//!    when the broker is not a process of this machine) and the sandbox (reported). See [`procstat`].
//! 3. **latency** (b) — the same two processes, sandbox latency 200 ms on every Didit route: throughput against
//!    `concurrency / 0.4 s` (bar ≥ 0.80), then open-loop publishing at half that rate: p99 end to end from each
//!    event's scheduled send time to its `import.result` (bar ≤ 425 ms), and the bridge's own latency — end to end
//!    minus the Didit calls on the event's path × the injected latency, the calls counted from the sandbox's
//!    `/sandbox/stats` over the open loop (bar p99 ≤ 10 ms). The two processes' memory (idle, peak) is reported.
//! 4. **binary** (c, d) — a fresh pair of `partner-bridge run` processes: ready time cold (fresh queues) and warm
//!    (restart), resident memory idle and peak under a zero-latency load (bars ≤ 20 MiB idle, ≤ 64 MiB under load,
//!    ready ≤ 300 ms).
//! 5. **webhook** (e) — `POST /webhooks/didit` from many keep-alive HTTP/1.1 clients to an in-process issuer, each
//!    body signed with `X-Signature-V2`, each answered 200 only after the broker confirmed its event (bar ≥ 5,000
//!    per second).
//! 6. **failover** — two receiver replicas on one PostgreSQL ledger, one SIGKILLed mid-stream: the time from the
//!    kill to the last of its sessions imported by the other (bar ≤ 10 s, reported). See [`failover`].
//! 7. **backlog** — Didit's write limit on (scaled: 300 writes per 15 s window), 900 events at once: drain time
//!    against the floor the limit allows (bar ≥ 0.97) and the share of Didit writes answered 429 (bar ≤ 1%). See
//!    [`backlog`].
//!
//! `zero` runs the ceiling too (its ratio needs it). Progress goes to stderr; the last line of stdout is one JSON
//! object with every figure, its bar and pass/fail (`bars`; a bar that could not be measured here says so instead
//! of failing). Sizes come from the environment (see [`Settings::from_env`]). Every name the bench declares on the
//! broker carries a fresh `pb-bench-<id>` prefix and is deleted at the end, whatever happened.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
use partner_bridge::envelope::{
    ImportOutcome, ImportResult, OnboardingFinished, ShareTokenEnvelope, SigningKey,
};
use partner_bridge::sandbox::{ApplicationInfo, Control, FaultEndpoint, FaultSettings};
use partner_bridge::secret::ShareToken;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Confirms outstanding at once when a producer publishes "as fast as confirms allow" (the same for the ceiling
/// and the bridge, so the comparison is fair).
const PUBLISH_WINDOW: usize = 512;
/// The ceiling's consumer prefetch (DESIGN.md §3).
const CEILING_PREFETCH: u16 = 200;

const BAR_ZERO_LATENCY_RATIO: f64 = 0.50;
/// Reported, not a bar: the zero-latency ratio the issue aims for.
const STRETCH_ZERO_LATENCY_RATIO: f64 = 0.70;
/// Issuer and receiver together, CPU per event at zero latency.
const BAR_BRIDGE_CPU_US: f64 = 250.0;
const STRETCH_BRIDGE_CPU_US: f64 = 150.0;
/// The broker's CPU per event may be this many times three of the ceiling's per-hop cost.
const BAR_BROKER_CPU_FACTOR: f64 = 1.5;
/// The broker-only chain crosses as many queues as an event does: onboarding, tokens, results.
const CEILING_HOPS: usize = 3;
/// End to end minus the time inside Didit calls, p99, at Didit 200 ms.
const BAR_BRIDGE_LATENCY_P99_MS: f64 = 10.0;
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
#[path = "pipeline/procstat.rs"]
mod procstat;

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
    // Bars that could not be measured on this machine (a broker elsewhere): reported as such, not failed.
    let mut unmeasured: Vec<String> = Vec::new();

    procstat::self_check()
        .context("checking the /proc CPU method against the bench's own process")?;
    let broker = procstat::broker_pid(&settings.amqp_url);
    match broker {
        Some(pid) => progress!("broker: process {pid} listens on the AMQP URL's port"),
        None => progress!(
            "broker: not a process of this machine (or not found): its CPU is not measured"
        ),
    }
    report.insert(
        "cpu_method".into(),
        json!({
            "source": "utime + stime of /proc/<pid>/stat (every thread), read just before the first publish and \
                       just after the last message or result",
            "clock_ticks_per_second": procstat::ticks_per_second(),
            "broker_pid": broker,
            "broker_found": broker.is_some(),
            "broker_found_by": "the process holding the LISTEN socket of the AMQP URL's port (/proc/net/tcp{,6}, \
                                /proc/*/fd); the broker's figures include whatever else uses it meanwhile",
        }),
    );

    let mut world = BenchWorld::new(settings, &base).await?;

    // 1. The broker-only ceiling.
    let mut ceiling_setup = None;
    let ceiling = if settings.runs("ceiling") || settings.runs("zero") {
        let names = format!("{base}-ceiling");
        let plan = ceiling_plan(&names);
        cleanup.plans.push(plan.clone());
        let sizes = world
            .message_sizes()
            .await
            .context("the bridge's message sizes")?;
        let ceiling = measure_ceiling(
            &settings.amqp_url,
            &plan,
            &names,
            settings.ceiling_messages,
            sizes,
            broker,
            None,
        )
        .await
        .context("broker-only ceiling")?;
        progress!(
            "ceiling: {:.0} messages/s through {CEILING_HOPS} queue hops; broker {} µs per message-hop, bench {} µs \
             per message",
            ceiling.per_second,
            show(ceiling.broker_us_per_hop()),
            show(ceiling.bench_us_per_message())
        );
        report.insert("ceiling".into(), ceiling.to_json());
        ceiling_setup = Some((plan, names, sizes));
        Some(ceiling)
    } else {
        None
    };

    // 2–3. Zero latency and Didit at 200 ms, through one pair of `partner-bridge run` processes.
    if settings.runs("zero") || settings.runs("latency") {
        let figures = pair_phase(
            settings,
            &world,
            &format!("{base}-run"),
            ceiling.as_ref(),
            broker,
            cleanup,
            &mut passes,
            &mut unmeasured,
        )
        .await?;
        report.extend(figures);
    }

    // 4. The same chain again, held to the rate the bridges reached at zero latency: what the broker spends per
    // message-hop at that rate, where it cannot batch as it does flat out.
    if let Some((plan, names, sizes)) = &ceiling_setup
        && let Some(rate) = report
            .get("zero_latency")
            .and_then(|z| z["events_per_second"].as_f64())
    {
        let messages =
            ((rate * PACED_CEILING_SECONDS) as usize).clamp(500, settings.ceiling_messages);
        let paced = measure_ceiling(
            &settings.amqp_url,
            plan,
            names,
            messages,
            *sizes,
            broker,
            Some(rate),
        )
        .await
        .context("broker-only chain at the bridges' rate")?;
        progress!(
            "ceiling at the bridges' rate ({rate:.0}/s): {:.0} messages/s; broker {} µs per message-hop",
            paced.per_second,
            show(paced.broker_us_per_hop()),
        );
        if let Some(broker_json) = report
            .get_mut("zero_latency")
            .and_then(|z| z.pointer_mut("/cpu/broker"))
            .and_then(Value::as_object_mut)
        {
            let bridge_hop = broker_json["us_per_event_hop"].as_f64();
            let same_rate = paced.broker_us_per_hop();
            broker_json.insert(
                "same_rate_ceiling_us_per_message_hop".into(),
                json!(same_rate.map(|v| round(v, 1))),
            );
            broker_json.insert(
                "ratio_to_same_rate_ceiling".into(),
                json!(bridge_hop.zip(same_rate).map(|(b, c)| round(b / c, 2))),
            );
            broker_json.insert(
                "same_rate_note".into(),
                json!("reported, no bar: the broker's cost per message-hop grows as the rate falls (fewer \
                       messages share each socket read, quorum-log write and fsync), so this compares the \
                       bridge with a broker-only client at the bridges' own rate"),
            );
        }
        report.insert("ceiling_at_bridge_rate".into(), paced.to_json());
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

    world.shutdown().await;
    let all = passes.iter().all(|(_, p)| *p);
    let mut bars: serde_json::Map<String, Value> = passes
        .iter()
        .map(|(name, pass)| (name.clone(), json!(pass)))
        .collect();
    for name in &unmeasured {
        bars.insert(name.clone(), json!("not measured"));
    }
    report.insert("bars".into(), Value::Object(bars));
    report.insert("pass".into(), json!(all));
    if !unmeasured.is_empty() {
        progress!("not measured here: {}", unmeasured.join(", "));
    }
    progress!(
        "done: {}",
        if all {
            "every measured bar met".to_string()
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

/// A figure for a progress line: "n/a" when it could not be measured.
fn show(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_string(), |v| format!("{v:.1}"))
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

/// Spawns `partner-bridge <args>` with its output to `output`, killed when the handle is dropped.
fn spawn_binary<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    output: std::fs::File,
) -> anyhow::Result<tokio::process::Child> {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_partner-bridge"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(output.try_clone()?)
        .stderr(output)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
            format!("spawning partner-bridge {}", shown.join(" "))
        })
}

/// `partner-bridge sandbox` in a process of its own (killed with the bench, whatever happens).
struct SandboxProcess {
    child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
}

impl SandboxProcess {
    /// Spawns the sandbox on a free port (rate limit off, its output to `log`) and waits until its control routes
    /// answer; returns it with a [`Control`] client of it.
    async fn spawn(log: PathBuf) -> anyhow::Result<(SandboxProcess, Control)> {
        let port = free_port()?;
        let output =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let listen = format!("127.0.0.1:{port}");
        let child = spawn_binary(&["sandbox", "--listen", &listen, "--no-rate-limit"], output)?;
        let pid = child.id().context("sandbox pid")?;
        let mut sandbox = SandboxProcess { child, pid, log };
        let control = Control::new(format!("http://127.0.0.1:{port}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if control.stats().await.is_ok() {
                return Ok((sandbox, control));
            }
            if let Ok(Some(status)) = sandbox.child.try_wait() {
                tail_logs(&[sandbox.log.as_path()]);
                bail!("partner-bridge sandbox exited with {status} before it answered");
            }
            if Instant::now() > deadline {
                tail_logs(&[sandbox.log.as_path()]);
                bail!("partner-bridge sandbox not answering after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

struct BenchWorld {
    sandbox: SandboxProcess,
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
        let dir = tempfile::Builder::new()
            .prefix(&format!("{base}-"))
            .tempdir()
            .context("temporary directory")?;
        let (sandbox, control) = SandboxProcess::spawn(dir.path().join("sandbox.log"))
            .await
            .context("starting the sandbox")?;
        progress!("sandbox: process {} at {}", sandbox.pid, control.base_url());
        let issuer_app = control.create_application("fintech-a").await?;
        let partner_app = control.create_application("sponsor-bank").await?;
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

    /// Kills the sandbox's process.
    async fn shutdown(&mut self) {
        let _ = self.sandbox.child.kill().await;
    }

    fn common_toml(&self, prefix: &str, role: &str, admin: &str, app: &ApplicationInfo) -> String {
        format!(
            r#"
state_dir = "{state}/{prefix}/{role}"
[didit]
base_url = "{base}"
# The sandbox runs with its rate limit off: pacing to Didit's 300 writes per minute would be the only figure.
writes_per_minute = 0
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
            base = self.control.base_url(),
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

    /// The body sizes of the three messages an event becomes, so that the ceiling carries what the bridges carry:
    /// an `onboarding.finished` event, a `share_token` envelope around a token the sandbox really mints (its size
    /// depends on the sandbox's claims), and the `import.result`.
    async fn message_sizes(&self) -> anyhow::Result<[usize; CEILING_HOPS]> {
        let session = self.sessions(1).await?.remove(0);
        let event = session.event();
        let answer: Value = reqwest::Client::builder()
            .no_proxy()
            .build()?
            .post(format!(
                "{}/v3/session/{}/share/",
                self.control.base_url(),
                session.id
            ))
            .header("x-api-key", self.issuer_app.api_key.expose())
            .json(&json!({"for_application_id": self.partner_app.application_id, "ttl_in_seconds": 3600}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let token = answer["share_token"]
            .as_str()
            .context("the sandbox's share answer has no share_token")?;
        let now = Utc::now();
        let envelope = ShareTokenEnvelope {
            kind: "share_token".into(),
            message_id: uuid::Uuid::new_v4().to_string(),
            event_id: uuid::Uuid::new_v4().to_string(),
            share_token: ShareToken::new(token.to_string()),
            session_kind: session.kind,
            source_session_id: session.id.clone(),
            from_application_id: self.issuer_app.application_id.clone(),
            for_application_id: self.partner_app.application_id.clone(),
            source_status: session.status.to_string(),
            source_vendor_data: Some(format!("vendor-{}", session.id)),
            minted_at: now,
            expires_at: now,
            occurred_at: now,
            agreement_id: None,
        };
        let result = ImportResult {
            kind: "import.result".into(),
            outcome: ImportOutcome::Imported,
            source_session_id: session.id.clone(),
            from_application_id: self.issuer_app.application_id.clone(),
            imported_session_id: Some(uuid::Uuid::new_v4().to_string()),
            session_number: Some(1000),
            status: Some(session.status.to_string()),
            session_kind: session.kind,
            vendor_data: Some(format!("fintech-a:vendor-{}", session.id)),
            trust_review: false,
            imported_at: now,
            reason: None,
            agreement_id: None,
        };
        Ok([
            event.len(),
            serde_json::to_vec(&envelope)?.len(),
            serde_json::to_vec(&result)?.len(),
        ])
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
        self.publish_paced(exchange, routing_key, bodies, kind, None)
            .await
    }

    /// [`Producer::publish_all`], starting message `i` no sooner than `i / rate` seconds after the first when a
    /// rate is given.
    async fn publish_paced(
        &self,
        exchange: &str,
        routing_key: &str,
        bodies: impl IntoIterator<Item = Vec<u8>>,
        kind: &str,
        rate: Option<f64>,
    ) -> anyhow::Result<()> {
        let mut pending = FuturesUnordered::new();
        let start = Instant::now();
        for (i, body) in bodies.into_iter().enumerate() {
            if let Some(rate) = rate {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                while Instant::now() < due {
                    // Keep collecting confirms while waiting for the next message's turn.
                    tokio::select! {
                        _ = tokio::time::sleep_until(due.into()) => {}
                        Some(confirm) = pending.next(), if !pending.is_empty() => check_confirm(confirm)?,
                    }
                }
            }
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
    /// CPU seconds of each process the meter follows, from just before the first publish to just after the last
    /// result (when a meter was given).
    cpu: Option<BTreeMap<String, Option<f64>>>,
}

async fn closed_loop(
    producer: &Producer,
    watcher: &ResultWatcher,
    exchange: &str,
    sessions: &[SourceSession],
    meter: Option<&procstat::CpuMeter>,
) -> anyhow::Result<ClosedLoop> {
    let bodies: Vec<Vec<u8>> = sessions.iter().map(SourceSession::event).collect();
    let ids: Vec<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
    let mark = watcher.mark();
    let before = meter.map(procstat::CpuMeter::sample);
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
    let cpu = meter
        .zip(before)
        .map(|(meter, before)| meter.spent(&before, &meter.sample()));
    let last = times.into_iter().max().expect("at least one event");
    let seconds = (last - t0).as_secs_f64();
    Ok(ClosedLoop {
        seconds,
        per_second: sessions.len() as f64 / seconds,
        published_per_second: sessions.len() as f64 / published.as_secs_f64(),
        not_imported,
        cpu,
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

/// Exchanges `{prefix}.hop1` … `.hop3`, each bound to its queue `{prefix}.q1` … `.q3` by `hop.<n>`.
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
    let mut plan = vec![Entity::Exchange {
        name: dead_letter.clone(),
        kind: "direct",
    }];
    for hop in 1..=CEILING_HOPS {
        plan.push(Entity::Exchange {
            name: format!("{prefix}.hop{hop}"),
            kind: "topic",
        });
        plan.push(queue(&format!("{prefix}.q{hop}")));
        plan.push(Entity::Binding {
            queue: format!("{prefix}.q{hop}"),
            exchange: format!("{prefix}.hop{hop}"),
            routing_key: format!("hop.{hop}"),
        });
    }
    plan
}

/// How long the ceiling held to the bridges' rate runs (its messages: this × the rate, within 500 and the
/// ceiling's own count).
const PACED_CEILING_SECONDS: f64 = 10.0;

/// The broker-only chain's figures.
struct Ceiling {
    messages: usize,
    seconds: f64,
    per_second: f64,
    /// The broker's CPU seconds over the run (`None`: not a process of this machine).
    broker_seconds: Option<f64>,
    /// The bench process's (producer, both relays, sink).
    bench_seconds: Option<f64>,
    /// Body bytes on each hop: the bridge's event, share-token envelope and `import.result`.
    sizes: [usize; CEILING_HOPS],
    /// Messages per second the producer was held to (`None`: as fast as the window of confirms allows).
    rate: Option<f64>,
}

impl Ceiling {
    fn broker_us_per_hop(&self) -> Option<f64> {
        self.broker_seconds
            .map(|s| s * 1e6 / (self.messages * CEILING_HOPS) as f64)
    }

    fn bench_us_per_message(&self) -> Option<f64> {
        self.bench_seconds.map(|s| s * 1e6 / self.messages as f64)
    }

    fn to_json(&self) -> Value {
        json!({
            "messages": self.messages,
            "hops": CEILING_HOPS,
            "route": "publish -> q1 -> relay (publish with a confirm, mandatory, then ack) -> q2 -> relay -> q3 -> \
                      consume and ack",
            "seconds": round(self.seconds, 3),
            "messages_per_second": round(self.per_second, 1),
            "prefetch": CEILING_PREFETCH,
            "paced_per_second": self.rate.map(|r| round(r, 1)),
            "body_bytes": self.sizes,
            "body_bytes_note": "per hop, the size of the bridge's own body there: an onboarding.finished event, a \
                                share_token envelope around a token the sandbox minted, an import.result",
            "cpu": {
                "broker_seconds": self.broker_seconds.map(|s| round(s, 2)),
                "broker_us_per_message_hop": self.broker_us_per_hop().map(|v| round(v, 1)),
                "bench_seconds": self.bench_seconds.map(|s| round(s, 2)),
                "bench_us_per_message": self.bench_us_per_message().map(|v| round(v, 1)),
                "measured_from": "broker: its utime + stime from just before the first publish to the last message \
                                  consumed from q3, / (messages x 3); bench: the same for this process, which runs \
                                  the producer, both relays and the sink, / messages",
            },
        })
    }
}

/// Consumes `queue` (prefetch [`CEILING_PREFETCH`]) on a connection of its own; republishes each delivery to
/// `exchange` with `routing_key` (mandatory, persistent as it came) on a confirm channel, and acks it once its
/// confirm is a plain ack — the bridge's order.
async fn spawn_relay(
    url: &str,
    queue: String,
    exchange: String,
    routing_key: String,
    body: Arc<Vec<u8>>,
) -> anyhow::Result<(Connection, tokio::task::JoinHandle<()>)> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let input = connection.create_channel().await?;
    input
        .basic_qos(CEILING_PREFETCH, BasicQosOptions::default())
        .await?;
    let output = connection.create_channel().await?;
    output
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut deliveries = input
        .basic_consume(
            queue.as_str().into(),
            format!("bench-relay-{queue}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let task = tokio::spawn(async move {
        while let Some(Ok(delivery)) = deliveries.next().await {
            let (channel, exchange, routing_key, body) = (
                output.clone(),
                exchange.clone(),
                routing_key.clone(),
                body.clone(),
            );
            tokio::spawn(async move {
                let confirm = channel
                    .basic_publish(
                        exchange.as_str().into(),
                        routing_key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &body,
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
    Ok((connection, task))
}

/// Publish → q1 → relay → q2 → relay → q3 → consume and ack; messages per second from the first publish to the
/// last consumed message, and the CPU the broker (`broker`, when it is a process here) and this process spent.
async fn measure_ceiling(
    url: &str,
    plan: &[Entity],
    prefix: &str,
    messages: usize,
    sizes: [usize; CEILING_HOPS],
    broker: Option<u32>,
    rate: Option<f64>,
) -> anyhow::Result<Ceiling> {
    let setup = Producer::connect(url).await?;
    topology::declare(&setup.channel, plan).await?;
    setup.close().await;

    // Sink: consume the last queue and ack.
    let sink_connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let sink_channel = sink_connection.create_channel().await?;
    sink_channel
        .basic_qos(CEILING_PREFETCH, BasicQosOptions::default())
        .await?;
    let mut sink = sink_channel
        .basic_consume(
            format!("{prefix}.q{CEILING_HOPS}").as_str().into(),
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

    // One relay per inner hop, each on its own connection (as the issuer and the receiver are).
    let mut relays = Vec::new();
    for (hop, &size) in sizes.iter().enumerate().skip(1) {
        relays.push(
            spawn_relay(
                url,
                format!("{prefix}.q{hop}"),
                format!("{prefix}.hop{}", hop + 1),
                format!("hop.{}", hop + 1),
                Arc::new(ceiling_body(size)),
            )
            .await?,
        );
    }

    let producer = Producer::connect(url).await?;
    let body = ceiling_body(sizes[0]);
    progress!(
        "ceiling: {messages} messages through {CEILING_HOPS} queues, of {sizes:?} bytes (an event, a token, a result)"
    );
    let meter = procstat::CpuMeter::new([
        ("broker".to_string(), broker),
        ("bench".to_string(), Some(std::process::id())),
    ]);
    let before = meter.sample();
    let t0 = Instant::now();
    producer
        .publish_paced(
            &format!("{prefix}.hop1"),
            "hop.1",
            std::iter::repeat_n(body, messages),
            "bench.ceiling",
            rate,
        )
        .await?;
    let done = tokio::time::timeout(Duration::from_secs(180), done_rx)
        .await
        .context("the ceiling's messages did not all arrive within 180 s")?
        .context("the sink stopped")?;
    let spent = meter.spent(&before, &meter.sample());
    let seconds = (done - t0).as_secs_f64();
    producer.close().await;
    for (connection, task) in relays {
        let _ = connection.close(200, "bench done".into()).await;
        task.abort();
    }
    let _ = sink_connection.close(200, "bench done".into()).await;
    sink_task.abort();
    Ok(Ceiling {
        messages,
        seconds,
        per_second: messages as f64 / seconds,
        broker_seconds: spent.get("broker").copied().flatten(),
        bench_seconds: spent.get("bench").copied().flatten(),
        sizes,
        rate,
    })
}

/// A JSON body of `size` bytes shaped like a share-token envelope (the token padded to the size).
fn ceiling_body(size: usize) -> Vec<u8> {
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
    body(&"x".repeat(size.saturating_sub(bare)))
}

// ---------------------------------------------------------------------------------------------------------------
// 2–3. Zero latency and Didit at 200 ms, through two `partner-bridge run` processes
// ---------------------------------------------------------------------------------------------------------------

/// A pair's files: `[(receiver config, log, admin port), (issuer config, log, admin port)]`.
type PairFiles = [(PathBuf, PathBuf, u16); 2];

/// Writes a receiver's and an issuer's configuration under `prefix` (admin on free ports) into the temporary
/// directory, and has their topology deleted at the end.
fn write_pair(
    world: &BenchWorld,
    prefix: &str,
    cleanup: &mut Cleanup,
) -> anyhow::Result<PairFiles> {
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
    Ok([
        (receiver_path, dir.join("receiver.log"), receiver_port),
        (issuer_path, dir.join("issuer.log"), issuer_port),
    ])
}

/// Runs `zero` and/or `latency` through one pair of `run` processes; returns the report's `zero_latency`,
/// `didit_latency` and `bridges` entries.
#[allow(clippy::too_many_arguments)]
async fn pair_phase(
    settings: &Settings,
    world: &BenchWorld,
    prefix: &str,
    ceiling: Option<&Ceiling>,
    broker: Option<u32>,
    cleanup: &mut Cleanup,
    passes: &mut Vec<(String, bool)>,
    unmeasured: &mut Vec<String>,
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()?;
    let files = write_pair(world, prefix, cleanup)?;
    let outcome = pair_runs(
        settings, world, prefix, ceiling, broker, passes, unmeasured, &http, &files,
    )
    .await;
    if outcome.is_err() {
        tail_logs(&[&files[0].1, &files[1].1]);
    }
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn pair_runs(
    settings: &Settings,
    world: &BenchWorld,
    prefix: &str,
    ceiling: Option<&Ceiling>,
    broker: Option<u32>,
    passes: &mut Vec<(String, bool)>,
    unmeasured: &mut Vec<String>,
    http: &reqwest::Client,
    [
        (receiver_path, receiver_log, receiver_port),
        (issuer_path, issuer_log, issuer_port),
    ]: &PairFiles,
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let (receiver, receiver_ready) =
        Child::spawn(receiver_path, receiver_log, *receiver_port, http).await?;
    let (issuer, issuer_ready) = Child::spawn(issuer_path, issuer_log, *issuer_port, http).await?;
    progress!(
        "bridges: receiver process {} ready {:.0} ms after spawn, issuer process {} {:.0} ms (fresh queues)",
        receiver.pid,
        ms(receiver_ready),
        issuer.pid,
        ms(issuer_ready)
    );
    // Idle: ready, nothing to do, a moment for the runtime to settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let receiver_idle = receiver.status()?;
    let issuer_idle = issuer.status()?;
    let watcher =
        ResultWatcher::start(&settings.amqp_url, &format!("{prefix}.receiver.results")).await?;
    let producer = Producer::connect(&settings.amqp_url).await?;
    let onboarding = Names::new(prefix).onboarding_exchange();
    let meter = procstat::CpuMeter::new([
        ("issuer".to_string(), Some(issuer.pid)),
        ("receiver".to_string(), Some(receiver.pid)),
        ("broker".to_string(), broker),
        ("sandbox".to_string(), Some(world.sandbox.pid)),
        ("bench".to_string(), Some(std::process::id())),
    ]);
    let load = Load {
        settings,
        world,
        producer: &producer,
        watcher: &watcher,
        onboarding: &onboarding,
    };

    let mut out = serde_json::Map::new();
    if settings.runs("zero") {
        let ceiling = ceiling.context("the ceiling runs with zero")?;
        let value = zero_latency(&load, &meter, ceiling, passes, unmeasured).await?;
        out.insert("zero_latency".into(), value);
    }
    if settings.runs("latency") {
        let value = didit_latency(&load, &meter, passes).await?;
        out.insert("didit_latency".into(), value);
    }

    let receiver_loaded = receiver.status()?;
    let issuer_loaded = issuer.status()?;
    watcher.stop().await;
    producer.close().await;
    let (issuer_exit, _) = issuer.terminate().await?;
    let (receiver_exit, _) = receiver.terminate().await?;
    let process =
        |idle: ProcStatus, loaded: ProcStatus, ready: Duration, exit: std::process::ExitStatus| {
            json!({
                "ready_ms_fresh_queues": round(ms(ready), 1),
                "idle_rss_mib": round(mib(idle.rss_kib), 1),
                "peak_hwm_mib": round(mib(loaded.hwm_kib), 1),
                "rss_after_load_mib": round(mib(loaded.rss_kib), 1),
                "sigterm_exit": exit.to_string(),
            })
        };
    progress!(
        "bridges: peak RSS receiver {:.1} MiB, issuer {:.1} MiB; idle RSS receiver {:.1} MiB, issuer {:.1} MiB",
        mib(receiver_loaded.hwm_kib),
        mib(issuer_loaded.hwm_kib),
        mib(receiver_idle.rss_kib),
        mib(issuer_idle.rss_kib)
    );
    out.insert(
        "bridges".into(),
        json!({
            "receiver": process(receiver_idle, receiver_loaded, receiver_ready, receiver_exit),
            "issuer": process(issuer_idle, issuer_loaded, issuer_ready, issuer_exit),
            "note": "the two `partner-bridge run` processes that carried zero_latency and didit_latency: idle RSS \
                     one second after ready, peak HWM after both; the memory and ready bars are binary's",
        }),
    );
    Ok(out)
}

/// What the zero and latency scenarios publish through.
struct Load<'a> {
    settings: &'a Settings,
    world: &'a BenchWorld,
    producer: &'a Producer,
    watcher: &'a ResultWatcher,
    onboarding: &'a str,
}

/// CPU seconds of each bridge, of both and of the broker over a run of `events` (reported, no bar).
struct RunCpu {
    issuer: Option<f64>,
    receiver: Option<f64>,
    broker: Option<f64>,
    events: usize,
}

impl RunCpu {
    fn new(spent: &BTreeMap<String, Option<f64>>, events: usize) -> RunCpu {
        let of = |name: &str| spent.get(name).copied().flatten();
        RunCpu {
            issuer: of("issuer"),
            receiver: of("receiver"),
            broker: of("broker"),
            events,
        }
    }

    fn bridges(&self) -> Option<f64> {
        self.issuer.zip(self.receiver).map(|(i, r)| i + r)
    }

    fn to_json(&self) -> Value {
        json!({
            "issuer": Value::Object(cpu_json(self.issuer, self.events)),
            "receiver": Value::Object(cpu_json(self.receiver, self.events)),
            "bridges": Value::Object(cpu_json(self.bridges(), self.events)),
            "broker": Value::Object(cpu_json(self.broker, self.events)),
            "note": "reported, no bar: utime + stime over the run / its events",
        })
    }

    /// `bridges … µs (issuer …, receiver …), broker … µs`, per event.
    fn summary(&self) -> String {
        let us = |seconds: Option<f64>| show(seconds.map(|s| s * 1e6 / self.events as f64));
        format!(
            "bridges {} µs (issuer {}, receiver {}), broker {} µs",
            us(self.bridges()),
            us(self.issuer),
            us(self.receiver),
            us(self.broker)
        )
    }
}

/// CPU seconds and microseconds per event of one process (`null`s when not measured).
fn cpu_json(seconds: Option<f64>, events: usize) -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    map.insert("seconds".into(), json!(seconds.map(|s| round(s, 2))));
    map.insert(
        "us_per_event".into(),
        json!(seconds.map(|s| round(s * 1e6 / events as f64, 1))),
    );
    map
}

async fn zero_latency(
    load: &Load<'_>,
    meter: &procstat::CpuMeter,
    ceiling: &Ceiling,
    passes: &mut Vec<(String, bool)>,
    unmeasured: &mut Vec<String>,
) -> anyhow::Result<Value> {
    let sessions = load.world.sessions(load.settings.events).await?;
    let events = sessions.len();
    progress!("zero latency: publishing {events} events");
    let run = closed_loop(
        load.producer,
        load.watcher,
        load.onboarding,
        &sessions,
        Some(meter),
    )
    .await?;
    let ratio = run.per_second / ceiling.per_second;
    let pass = ratio >= BAR_ZERO_LATENCY_RATIO;
    let stretch = ratio >= STRETCH_ZERO_LATENCY_RATIO;
    progress!(
        "zero latency: {:.0} events/s end to end ({:.0} published/s), {:.2} of the three-hop ceiling (bar \
         {BAR_ZERO_LATENCY_RATIO}, stretch {STRETCH_ZERO_LATENCY_RATIO}) {}",
        run.per_second,
        run.published_per_second,
        ratio,
        verdict(pass)
    );
    passes.push(("zero_latency".into(), pass));

    let cpu = run.cpu.context("the zero-latency run was metered")?;
    let spent = |name: &str| cpu.get(name).copied().flatten();
    let per_event = |seconds: Option<f64>| seconds.map(|s| s * 1e6 / events as f64);
    let (issuer, receiver) = (spent("issuer"), spent("receiver"));
    let bridges = issuer.zip(receiver).map(|(i, r)| i + r);
    let bridges_us = per_event(bridges).context("the bridges' CPU could not be read from /proc")?;
    let bridge_pass = bridges_us <= BAR_BRIDGE_CPU_US;
    passes.push(("bridge_cpu".into(), bridge_pass));
    let broker_us = per_event(spent("broker"));
    let broker_bar = ceiling
        .broker_us_per_hop()
        .map(|hop| BAR_BROKER_CPU_FACTOR * CEILING_HOPS as f64 * hop);
    let broker_pass = broker_us.zip(broker_bar).map(|(us, bar)| us <= bar);
    match broker_pass {
        Some(pass) => passes.push(("broker_cpu".into(), pass)),
        None => unmeasured.push("broker_cpu".into()),
    }
    progress!(
        "zero latency: CPU per event: issuer {} µs, receiver {} µs, both {bridges_us:.1} µs (bar {BAR_BRIDGE_CPU_US}, \
         stretch {STRETCH_BRIDGE_CPU_US}) {}; broker {} µs (bar {}) {}; sandbox {} µs, bench {} µs",
        show(per_event(issuer)),
        show(per_event(receiver)),
        verdict(bridge_pass),
        show(broker_us),
        show(broker_bar),
        broker_pass.map_or("not measured", verdict),
        show(per_event(spent("sandbox"))),
        show(per_event(spent("bench"))),
    );

    let mut bridges_json = cpu_json(bridges, events);
    bridges_json.insert("bar_us".into(), json!(BAR_BRIDGE_CPU_US));
    bridges_json.insert("pass".into(), json!(bridge_pass));
    bridges_json.insert("stretch_us".into(), json!(STRETCH_BRIDGE_CPU_US));
    bridges_json.insert(
        "stretch_met".into(),
        json!(bridges_us <= STRETCH_BRIDGE_CPU_US),
    );
    let mut broker_json = cpu_json(spent("broker"), events);
    broker_json.insert(
        "us_per_event_hop".into(),
        json!(broker_us.map(|us| round(us / CEILING_HOPS as f64, 1))),
    );
    broker_json.insert(
        "ceiling_us_per_message_hop".into(),
        json!(ceiling.broker_us_per_hop().map(|v| round(v, 1))),
    );
    broker_json.insert("bar_us".into(), json!(broker_bar.map(|v| round(v, 1))));
    broker_json.insert(
        "bar".into(),
        json!(format!(
            "<= {BAR_BROKER_CPU_FACTOR} x {CEILING_HOPS} x the ceiling's broker CPU per message-hop"
        )),
    );
    broker_json.insert(
        "pass".into(),
        broker_pass.map_or_else(|| json!("not measured"), |p| json!(p)),
    );
    let mut sandbox_json = cpu_json(spent("sandbox"), events);
    sandbox_json.insert(
        "note".into(),
        json!("the Didit emulator's process: reported, no bar"),
    );
    let mut bench_json = cpu_json(spent("bench"), events);
    bench_json.insert(
        "note".into(),
        json!("the bench process: the producer and the result watcher; reported, no bar"),
    );
    Ok(json!({
        "events": events,
        "seconds": round(run.seconds, 3),
        "events_per_second": round(run.per_second, 1),
        "published_per_second": round(run.published_per_second, 1),
        "ceiling_per_second": round(ceiling.per_second, 1),
        "ratio_to_ceiling": round(ratio, 3),
        "bar": format!(">= {BAR_ZERO_LATENCY_RATIO}"),
        "pass": pass,
        "stretch": format!(">= {STRETCH_ZERO_LATENCY_RATIO}"),
        "stretch_met": stretch,
        "not_imported": run.not_imported,
        "cpu": {
            "issuer": Value::Object(cpu_json(issuer, events)),
            "receiver": Value::Object(cpu_json(receiver, events)),
            "bridges": Value::Object(bridges_json),
            "broker": Value::Object(broker_json),
            "sandbox": Value::Object(sandbox_json),
            "bench": Value::Object(bench_json),
            "resolution_seconds": 1.0 / procstat::ticks_per_second() as f64,
            "measured_from": "utime + stime of each process's /proc/<pid>/stat, just before the first publish and \
                              just after the last import.result arrived, / events",
        },
        "note": "the issuer and the receiver are two `partner-bridge run` processes and the sandbox a third, \
                 sharing the machine's cores with the broker and the bench; an event crosses three quorum queues \
                 (onboarding, tokens, results), as the ceiling's message does",
    }))
}

async fn didit_latency(
    load: &Load<'_>,
    meter: &procstat::CpuMeter,
    passes: &mut Vec<(String, bool)>,
) -> anyhow::Result<Value> {
    let (settings, world) = (load.settings, load.world);
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
    let outcome = didit_latency_runs(load, meter, passes, concurrency, target).await;
    // Whatever happened, the scenarios after this one see Didit at zero latency.
    world.control.clear_faults().await?;
    outcome
}

async fn didit_latency_runs(
    load: &Load<'_>,
    meter: &procstat::CpuMeter,
    passes: &mut Vec<(String, bool)>,
    concurrency: f64,
    target: f64,
) -> anyhow::Result<Value> {
    let (settings, world) = (load.settings, load.world);
    let (producer, watcher, onboarding) = (load.producer, load.watcher, load.onboarding);
    let sessions = world.sessions(settings.latency_events).await?;
    let closed_events = sessions.len();
    progress!(
        "Didit at {} ms: publishing {} events (target {target:.0}/s = concurrency {concurrency} / {:.1} s)",
        settings.latency_ms,
        sessions.len(),
        2.0 * settings.latency_ms as f64 / 1000.0
    );
    let run = closed_loop(producer, watcher, onboarding, &sessions, Some(meter)).await?;
    let closed_cpu = RunCpu::new(
        run.cpu.as_ref().context("the 200 ms run was metered")?,
        closed_events,
    );
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
    let stats_before = world.control.stats().await?;
    let cpu_before = meter.sample();
    let latencies = open_loop(producer, watcher, onboarding, &sessions, rate).await?;
    let open_cpu = RunCpu::new(&meter.spent(&cpu_before, &meter.sample()), count);
    let stats_after = world.control.stats().await?;
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
    progress!(
        "Didit at {} ms: CPU per event flat out: {}; in the open loop: {}",
        settings.latency_ms,
        closed_cpu.summary(),
        open_cpu.summary(),
    );

    // The bridge's own latency: each event's end to end minus the Didit calls on its path × the injected latency.
    // The calls are the sandbox's Didit writes over the open loop ÷ its events (every call on the path — share,
    // import — is a write); a fraction (a retry here and there) is rounded down, so the figure errs high.
    let writes = stats_after.writes.saturating_sub(stats_before.writes);
    let rejected: u64 = stats_after
        .rejections
        .iter()
        .map(|(code, n)| n.saturating_sub(stats_before.rejected(code)))
        .sum();
    let calls_per_event = writes as f64 / count as f64;
    let calls_counted = (calls_per_event + 0.02).floor();
    let whole = (calls_per_event - calls_per_event.round()).abs() <= 0.02;
    let didit_ms = calls_counted * settings.latency_ms as f64;
    let own: Vec<f64> = latencies.millis.iter().map(|m| m - didit_ms).collect();
    let own_p50 = percentile(&own, 0.50);
    let own_p99 = percentile(&own, 0.99);
    let own_pass = latencies.missing == 0 && whole && own_p99 <= BAR_BRIDGE_LATENCY_P99_MS;
    progress!(
        "Didit at {} ms: {calls_per_event:.3} Didit calls per event ({writes} writes, {rejected} error answers); the \
         bridge's own latency p50 {own_p50:.1} ms, p99 {own_p99:.1} ms (bar p99 <= {BAR_BRIDGE_LATENCY_P99_MS}) {}",
        settings.latency_ms,
        verdict(own_pass)
    );
    passes.push(("bridge_latency_p99".into(), own_pass));
    Ok(json!({
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
            "cpu": closed_cpu.to_json(),
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
            "cpu": open_cpu.to_json(),
        },
        "bridge_latency": {
            "didit_calls_per_event": round(calls_per_event, 3),
            "didit_calls_counted": calls_counted,
            "calls_whole": whole,
            "didit_writes": writes,
            "didit_error_answers": rejected,
            "didit_ms_per_event": didit_ms,
            "p50_ms": round(own_p50, 1),
            "p99_ms": round(own_p99, 1),
            "bar_p99_ms": BAR_BRIDGE_LATENCY_P99_MS,
            "pass": own_pass,
            "measured_from": "each open-loop event's end to end minus (Didit calls per event x the injected latency); \
                              the calls per event are the sandbox's Didit writes (/sandbox/stats) over the open loop \
                              / its events, rounded down. The sandbox's own handling time, the rounding of its \
                              timers to the next millisecond and any delay of the bench's publish after its \
                              scheduled time are counted against the bridge, so the figure errs high; the bar is \
                              failed too when the calls per event are not (close to) whole",
        },
    }))
}

// ---------------------------------------------------------------------------------------------------------------
// 4. The real binary
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
    pid: u32,
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
        let child = spawn_binary(
            &[
                std::ffi::OsStr::new("run"),
                "--config".as_ref(),
                config.as_os_str(),
            ],
            output,
        )?;
        let pid = child.id().context("child pid")?;
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
        ProcStatus::read(&self.pid.to_string())
    }

    /// SIGTERM, then waits for the exit (the bridge drains first).
    async fn terminate(mut self) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
        let started = Instant::now();
        let sent = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
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
    let files = write_pair(world, prefix, cleanup)?;
    let [
        (receiver_path, receiver_log, receiver_port),
        (issuer_path, issuer_log, issuer_port),
    ] = &files;
    let outcome = binary_runs(
        settings,
        world,
        prefix,
        passes,
        &http,
        [
            (receiver_path, receiver_log, *receiver_port),
            (issuer_path, issuer_log, *issuer_port),
        ],
    )
    .await;
    if outcome.is_err() {
        tail_logs(&[receiver_log, issuer_log]);
    }
    outcome
}

/// The last lines of each log, to stderr (after a failure).
fn tail_logs(logs: &[&Path]) {
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        progress!("last lines of {}:", log.display());
        for line in &lines[lines.len().saturating_sub(20)..] {
            eprintln!("    {line}");
        }
    }
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
    let run = closed_loop(&producer, &watcher, &onboarding, &sessions, None).await?;
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
