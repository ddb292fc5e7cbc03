//! The operations surface (DESIGN.md §7, §8), as an operator and Prometheus meet it:
//! - `/metrics` of an issuer and a receiver bridge after a real flow (sessions, a duplicate event, a bad message),
//!   scraped over HTTP, parsed as the Prometheus text format, checked family by family (HELP, TYPE, exactly the
//!   label names of §7) and counter by counter (each moved by exactly what the flow did);
//! - `/livez`, `/readyz` and `partner-bridge healthcheck --url` exit codes;
//! - `partner-bridge topology show|declare` and `partner-bridge dead-letters list|replay` through the real binary,
//!   on configuration files pointing at the test's own prefix.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use partner_bridge::amqp::topology::{self, Entity};
use partner_bridge::amqp::{AmqpError, HeaderValue, Names};
use partner_bridge::app;
use partner_bridge::didit::wire::SessionKind;
use partner_bridge::envelope::ImportOutcome;
use tokio_util::sync::CancellationToken;

use crate::support::bridge::{Amqp, Collector, World};
use crate::support::{amqp_url, wait_for};

// ---------------------------------------------------------------------------------------------------------------
// The Prometheus text format (0.0.4), parsed strictly enough that a scraper's complaints would show up here.
// ---------------------------------------------------------------------------------------------------------------

/// One sample line.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One metric family: its HELP, its TYPE and its samples (which the format requires to be contiguous).
#[derive(Debug, Default)]
struct Family {
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<Sample>,
}

/// A whole exposition.
#[derive(Debug, Default)]
struct Exposition {
    families: BTreeMap<String, Family>,
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s
            .parse::<f64>()
            .map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

/// Parses `name{a="x",b="y"} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or_else(|| "no value after the name".to_string())?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let closed_at = loop {
            // Label name up to '=' (or the closing brace, possibly after a trailing comma).
            let start = match chars.peek() {
                Some(&(i, '}')) => break i,
                Some(&(i, _)) => i,
                None => return Err("unterminated label set".into()),
            };
            let mut eq = None;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    eq = Some(i);
                    break;
                }
            }
            let eq = eq.ok_or("label without '='")?;
            let label = &after[start..eq];
            if !is_label_name(label) {
                return Err(format!("bad label name {label:?}"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {label} value is not quoted"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => return Err(format!("bad escape {other:?} in label {label}")),
                    },
                    Some((_, '"')) => break,
                    Some((_, '\n')) | None => {
                        return Err(format!("unterminated value of label {label}"));
                    }
                    Some((_, c)) => value.push(c),
                }
            }
            if labels.insert(label.to_string(), value).is_some() {
                return Err(format!("label {label} given twice"));
            }
            match chars.next() {
                Some((_, ',')) => continue,
                Some((i, '}')) => break i,
                other => return Err(format!("expected ',' or '}}' after a label, got {other:?}")),
            }
        };
        rest = &after[closed_at + 1..];
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or_else(|| format!("expected one space before the value in {line:?}"))?;
    let mut parts = rest.split(' ');
    let value = parse_value(parts.next().unwrap_or_default())?;
    if let Some(ts) = parts.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if parts.next().is_some() {
        return Err("trailing fields after the timestamp".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

impl Exposition {
    /// Parses a whole exposition; every line must be a comment, a HELP, a TYPE or a sample of a typed family.
    fn parse(text: &str) -> Result<Exposition, String> {
        if !text.ends_with('\n') {
            return Err("the exposition does not end with a newline".into());
        }
        let mut out = Exposition::default();
        let mut current: Option<String> = None;
        let mut finished: BTreeSet<String> = BTreeSet::new();
        for (n, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
            if line.is_empty() {
                return Err(at("empty line".into()));
            }
            if let Some(comment) = line.strip_prefix('#') {
                let words: Vec<&str> = comment.trim_start().splitn(3, ' ').collect();
                match words.as_slice() {
                    ["HELP", name, rest @ ..] => {
                        if !is_metric_name(name) {
                            return Err(at("bad name in HELP".into()));
                        }
                        let family = out.families.entry(name.to_string()).or_default();
                        if family.help.is_some() {
                            return Err(at("second HELP for a family".into()));
                        }
                        family.help = Some(rest.first().copied().unwrap_or_default().to_string());
                    }
                    ["TYPE", name, kind] => {
                        if !is_metric_name(name) {
                            return Err(at("bad name in TYPE".into()));
                        }
                        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(kind) {
                            return Err(at(format!("unknown type {kind}")));
                        }
                        let family = out.families.entry(name.to_string()).or_default();
                        if family.kind.is_some() {
                            return Err(at("second TYPE for a family".into()));
                        }
                        if !family.samples.is_empty() {
                            return Err(at("TYPE after the family's samples".into()));
                        }
                        family.kind = Some(kind.to_string());
                    }
                    ["TYPE", ..] => return Err(at("malformed TYPE".into())),
                    _ => {} // any other comment is allowed by the format
                }
                continue;
            }
            let sample = parse_sample(line).map_err(at)?;
            let family_name = out.family_of(&sample.name).ok_or_else(|| {
                at(format!(
                    "sample {} belongs to no family with a TYPE",
                    sample.name
                ))
            })?;
            if current.as_deref() != Some(family_name.as_str()) {
                if finished.contains(&family_name) {
                    return Err(at(format!("samples of {family_name} are not contiguous")));
                }
                if let Some(previous) = current.take() {
                    finished.insert(previous);
                }
                current = Some(family_name.clone());
            }
            out.families
                .get_mut(&family_name)
                .expect("family_of found it")
                .samples
                .push(sample);
        }
        for (name, family) in &out.families {
            if family.help.is_none() {
                return Err(format!("family {name} has no HELP"));
            }
            if family.kind.is_none() {
                return Err(format!("family {name} has no TYPE"));
            }
            if family.kind.as_deref() == Some("histogram") {
                check_histogram(name, family)?;
            }
            if family.kind.as_deref() == Some("counter") {
                for s in &family.samples {
                    if s.value.is_nan() || s.value < 0.0 {
                        return Err(format!("counter {name} has value {}", s.value));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The typed family a sample name belongs to (`x_bucket`, `x_sum`, `x_count` belong to histogram `x`).
    fn family_of(&self, sample: &str) -> Option<String> {
        if self
            .families
            .get(sample)
            .is_some_and(|f| f.kind.is_some() && f.kind.as_deref() != Some("histogram"))
        {
            return Some(sample.to_string());
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = sample.strip_suffix(suffix)
                && self.families.get(base).is_some_and(|f| {
                    matches!(f.kind.as_deref(), Some("histogram"))
                        || (suffix != "_bucket" && matches!(f.kind.as_deref(), Some("summary")))
                })
            {
                return Some(base.to_string());
            }
        }
        None
    }

    fn family(&self, name: &str) -> &Family {
        self.families
            .get(name)
            .unwrap_or_else(|| panic!("family {name} is missing"))
    }

    /// The value of the series `name` with exactly `labels` (panics when absent: every series the tests read is
    /// initialised or caused by the flow).
    fn get(&self, family: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.family(family)
            .samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
            .unwrap_or_else(|| panic!("no series {name}{want:?} in family {family}"))
    }

    /// A counter or gauge series.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, name, labels)
    }

    /// Sum of every series of `name` whose labels pass `filter` (0 for a family without series, which the
    /// exposition leaves out; [`check_contract`] checks which families must be there).
    fn sum(&self, name: &str, filter: impl Fn(&BTreeMap<String, String>) -> bool) -> f64 {
        let Some(family) = self.families.get(name) else {
            return 0.0;
        };
        family
            .samples
            .iter()
            .filter(|s| s.name == name && filter(&s.labels))
            .map(|s| s.value)
            .sum()
    }

    /// Every series of a family as `(labels, value)`, for failure messages.
    fn dump(&self, name: &str) -> String {
        self.family(name)
            .samples
            .iter()
            .map(|s| format!("{}{:?} {}", s.name, s.labels, s.value))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One histogram series: its `(le, count)` buckets, its `_count`, whether it has a `_sum`.
#[derive(Default)]
struct HistogramSeries {
    buckets: Vec<(f64, f64)>,
    count: Option<f64>,
    has_sum: bool,
}

fn check_histogram(name: &str, family: &Family) -> Result<(), String> {
    // Group by the labels other than `le`.
    let mut groups: BTreeMap<BTreeMap<String, String>, HistogramSeries> = BTreeMap::new();
    for s in &family.samples {
        let mut labels = s.labels.clone();
        let le = labels.remove("le");
        let group = groups.entry(labels).or_default();
        if s.name.ends_with("_bucket") {
            let le = le.ok_or_else(|| format!("{name}: a bucket without le"))?;
            group.buckets.push((parse_value(&le)?, s.value));
        } else if le.is_some() {
            return Err(format!("{name}: le on {}", s.name));
        } else if s.name.ends_with("_count") {
            group.count = Some(s.value);
        } else {
            group.has_sum = true;
        }
    }
    for (labels, series) in groups {
        let count = series
            .count
            .ok_or_else(|| format!("{name}{labels:?}: no _count"))?;
        if !series.has_sum {
            return Err(format!("{name}{labels:?}: no _sum"));
        }
        if !series
            .buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
        {
            return Err(format!("{name}{labels:?}: buckets not cumulative"));
        }
        match series.buckets.last() {
            Some((le, n)) if le.is_infinite() && *n == count => {}
            _ => {
                return Err(format!(
                    "{name}{labels:?}: +Inf bucket missing or not _count"
                ));
            }
        }
    }
    Ok(())
}

/// Every family of DESIGN.md §7 (plus `delivery_retries`, which the stall alert reads): exposition name, TYPE,
/// label names.
const CONTRACT: [(&str, &str, &[&str]); 20] = [
    ("partner_bridge_build_info", "gauge", &["version"]),
    (
        "partner_bridge_events_total",
        "counter",
        &["source", "outcome"],
    ),
    (
        "partner_bridge_webhook_requests_total",
        "counter",
        &["outcome"],
    ),
    (
        "partner_bridge_shares_total",
        "counter",
        &["partner", "outcome"],
    ),
    (
        "partner_bridge_tokens_published_total",
        "counter",
        &["partner"],
    ),
    (
        "partner_bridge_imports_total",
        "counter",
        &["issuer", "outcome"],
    ),
    (
        "partner_bridge_reshare_requests_total",
        "counter",
        &["direction"],
    ),
    (
        "partner_bridge_didit_requests_total",
        "counter",
        &["operation", "status"],
    ),
    (
        "partner_bridge_didit_request_duration_seconds",
        "histogram",
        &["operation"],
    ),
    ("partner_bridge_retries_total", "counter", &["operation"]),
    (
        "partner_bridge_dead_lettered_total",
        "counter",
        &["queue", "reason"],
    ),
    (
        "partner_bridge_publish_confirms_total",
        "counter",
        &["result"],
    ),
    (
        "partner_bridge_token_age_at_import_seconds",
        "histogram",
        &[],
    ),
    ("partner_bridge_end_to_end_seconds", "histogram", &[]),
    ("partner_bridge_in_flight", "gauge", &["pipeline"]),
    ("partner_bridge_amqp_connected", "gauge", &["pipeline"]),
    ("partner_bridge_amqp_reconnects_total", "counter", &[]),
    ("partner_bridge_paused", "gauge", &["pipeline", "reason"]),
    (
        "partner_bridge_last_success_timestamp_seconds",
        "gauge",
        &["pipeline"],
    ),
    (
        "partner_bridge_delivery_retries_total",
        "counter",
        &["pipeline"],
    ),
];

/// The `process_*` families §7 asks for (resident memory, CPU, open fds).
const PROCESS: [(&str, &str); 3] = [
    ("process_resident_memory_bytes", "gauge"),
    ("process_cpu_seconds_total", "counter"),
    ("process_open_fds", "gauge"),
];

/// Checks every contract family of one bridge: present with HELP and TYPE, the right type, and every series
/// carrying exactly the §7 label names (plus `le` on buckets), at least one series per family, and no label value
/// containing any of `forbidden_values` (ids).
fn check_contract(who: &str, expo: &Exposition, forbidden_values: &[&str], other_role: &[&str]) {
    let missing: Vec<&str> = CONTRACT
        .iter()
        .map(|(name, _, _)| *name)
        .filter(|name| !expo.families.contains_key(*name) && !other_role.contains(name))
        .collect();
    assert!(missing.is_empty(), "{who}: families missing: {missing:?}");
    for (name, kind, labels) in CONTRACT {
        let Some(family) = expo.families.get(name) else {
            continue;
        };
        assert_eq!(family.kind.as_deref(), Some(kind), "{who}: TYPE of {name}");
        assert!(
            family.help.as_deref().is_some_and(|h| !h.trim().is_empty()),
            "{who}: {name} has an empty HELP"
        );
        assert!(
            !family.samples.is_empty(),
            "{who}: {name} has no series at all"
        );
        let want: BTreeSet<&str> = labels.iter().copied().collect();
        for sample in &family.samples {
            let mut got: BTreeSet<&str> = sample.labels.keys().map(String::as_str).collect();
            if sample.name.ends_with("_bucket") && kind == "histogram" {
                assert!(got.remove("le"), "{who}: {} without le", sample.name);
            }
            assert_eq!(
                got, want,
                "{who}: label names of {}{:?}",
                sample.name, sample.labels
            );
            for value in sample.labels.values() {
                for id in forbidden_values {
                    assert!(
                        !value.contains(id),
                        "{who}: {} carries an id in a label: {value}",
                        sample.name
                    );
                }
            }
        }
    }
    for (name, kind) in PROCESS {
        let family = expo
            .families
            .get(name)
            .unwrap_or_else(|| panic!("{who}: family {name} is missing"));
        assert_eq!(family.kind.as_deref(), Some(kind), "{who}: TYPE of {name}");
        assert_eq!(family.samples.len(), 1, "{who}: {name}");
        assert!(
            family.samples[0].value > 0.0,
            "{who}: {name} is not positive"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Small helpers: HTTP, the binary, configuration files.
// ---------------------------------------------------------------------------------------------------------------

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client")
}

async fn get(http: &reqwest::Client, url: &str) -> (u16, Option<String>, String) {
    let response = http.get(url).send().await.expect("GET");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, content_type, response.text().await.expect("body"))
}

/// `GET /metrics` on an admin address, parsed (panics with the text when it does not parse).
async fn scrape(http: &reqwest::Client, admin: SocketAddr) -> Exposition {
    let (status, content_type, text) = get(http, &format!("http://{admin}/metrics")).await;
    assert_eq!(status, 200, "/metrics answered {status}");
    assert_eq!(
        content_type.as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8"),
        "content type of /metrics"
    );
    Exposition::parse(&text).unwrap_or_else(|e| panic!("/metrics does not parse: {e}\n{text}"))
}

/// What a run of the binary printed.
#[derive(Debug)]
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `partner-bridge ARGS` (without any `PARTNER_BRIDGE*` variable of this environment) to completion.
async fn run_binary(args: &[&str]) -> Ran {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_partner-bridge"));
    command.args(args).kill_on_drop(true);
    for (key, _) in std::env::vars() {
        if key.starts_with("PARTNER_BRIDGE") {
            command.env_remove(key);
        }
    }
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .unwrap_or_else(|_| panic!("partner-bridge {args:?} did not finish within 30 s"))
        .expect("the binary runs");
    Ran {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn write_config(world: &World, name: &str, toml: &str) -> PathBuf {
    let path = world.dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, toml).expect("write config");
    path
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A local port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn is_2xx(status: &str) -> bool {
    status.len() == 3 && status.starts_with('2')
}

// ---------------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_every_contract_name_and_count_exactly_what_a_flow_did() {
    const N: usize = 4;
    let world = World::new("ops-metrics").await;
    let started = now_unix();
    let receiver = world.start_receiver(false).await;
    let issuer = world.start_issuer().await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let http = http();
    let onboarding = world.names.issuer_onboarding_queue();

    // N sessions, KYC and KYB, each shared and imported once.
    let mut sessions = Vec::new();
    let mut events = Vec::new();
    for i in 0..N {
        let (kind, status) = if i % 2 == 0 {
            (SessionKind::User, "Approved")
        } else {
            (SessionKind::Business, "APPROVED")
        };
        let id = world.session(kind, status, &format!("ops-{i}")).await;
        let event = world.event(&id, kind, status);
        world.publish_event(&amqp, &event).await;
        sessions.push(id);
        events.push(event);
    }
    results.wait_count(N, Duration::from_secs(30)).await;
    // The same event again (a redelivery from the backend): nothing minted, counted as a duplicate.
    world.publish_event(&amqp, &events[0]).await;
    // A body that is not JSON: dead-lettered with its reason.
    amqp.publish(
        &world.names.onboarding_exchange(),
        "onboarding.finished",
        b"{this is not json",
        &[],
    )
    .await;

    // Counters settle once both extra messages are handled and nothing is in flight.
    let (issuer_admin, receiver_admin) = (issuer.admin_addr(), receiver.admin_addr());
    let issuer_expo = wait_for(
        "the issuer's counters to settle",
        Duration::from_secs(20),
        || {
            let http = http.clone();
            async move {
                let e = scrape(&http, issuer_admin).await;
                let settled = e.value(
                    "partner_bridge_events_total",
                    &[("source", "amqp"), ("outcome", "duplicate")],
                ) >= 1.0
                    && e.value(
                        "partner_bridge_events_total",
                        &[("source", "amqp"), ("outcome", "bad_message")],
                    ) >= 1.0
                    && e.value(
                        "partner_bridge_events_total",
                        &[("source", "amqp"), ("outcome", "processed")],
                    ) >= N as f64
                    && e.sum("partner_bridge_dead_lettered_total", |_| true) >= 1.0
                    && e.sum("partner_bridge_in_flight", |_| true) == 0.0;
                settled.then_some(e)
            }
        },
    )
    .await;
    let receiver_expo = wait_for(
        "the receiver's counters to settle",
        Duration::from_secs(20),
        || {
            let http = http.clone();
            async move {
                let e = scrape(&http, receiver_admin).await;
                let settled = e.value(
                    "partner_bridge_imports_total",
                    &[("issuer", "fintech-a"), ("outcome", "imported")],
                ) >= N as f64
                    && e.sum("partner_bridge_in_flight", |_| true) == 0.0;
                settled.then_some(e)
            }
        },
    )
    .await;
    let n = N as f64;

    // ---- Shape: every §7 family, HELP, TYPE, label names; no ids in labels. -----------------------------------
    let mut ids: Vec<&str> = sessions.iter().map(String::as_str).collect();
    ids.push(&world.issuer_app.application_id);
    ids.push(&world.partner_app.application_id);
    // A family whose labels come only from the other role's configuration has no series here, and
    // prometheus-client leaves series-less families out; between them, the two bridges show every family.
    check_contract(
        "issuer",
        &issuer_expo,
        &ids,
        &["partner_bridge_imports_total"],
    );
    check_contract(
        "receiver",
        &receiver_expo,
        &ids,
        &[
            "partner_bridge_shares_total",
            "partner_bridge_tokens_published_total",
        ],
    );
    for expo in [&issuer_expo, &receiver_expo] {
        assert_eq!(
            expo.value(
                "partner_bridge_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            1.0
        );
        assert_eq!(expo.value("partner_bridge_amqp_reconnects_total", &[]), 0.0);
        assert_eq!(
            expo.sum("partner_bridge_paused", |_| true),
            0.0,
            "{}",
            expo.dump("partner_bridge_paused")
        );
        assert_eq!(
            expo.sum("partner_bridge_retries_total", |_| true),
            0.0,
            "{}",
            expo.dump("partner_bridge_retries_total")
        );
        assert_eq!(
            expo.sum("partner_bridge_delivery_retries_total", |_| true),
            0.0,
            "{}",
            expo.dump("partner_bridge_delivery_retries_total")
        );
        assert_eq!(
            expo.sum("partner_bridge_reshare_requests_total", |_| true),
            0.0
        );
        assert_eq!(
            expo.sum("partner_bridge_publish_confirms_total", |l| l["result"]
                != "ack"),
            0.0,
            "{}",
            expo.dump("partner_bridge_publish_confirms_total")
        );
        assert_eq!(
            expo.sum("partner_bridge_webhook_requests_total", |_| true),
            0.0
        );
    }

    // ---- Issuer: N shared and published, one duplicate, one bad message dead-lettered. ------------------------
    let i = &issuer_expo;
    let events_dump = i.dump("partner_bridge_events_total");
    for (outcome, want) in [
        ("processed", n),
        ("duplicate", 1.0),
        ("bad_message", 1.0),
        ("ignored_unfinished", 0.0),
        ("no_matching_partner", 0.0),
        ("retried", 0.0),
        ("dead_lettered", 0.0),
    ] {
        assert_eq!(
            i.value(
                "partner_bridge_events_total",
                &[("source", "amqp"), ("outcome", outcome)]
            ),
            want,
            "events_total{{amqp,{outcome}}}\n{events_dump}"
        );
    }
    assert_eq!(
        i.sum("partner_bridge_events_total", |l| l["source"] == "webhook"),
        0.0
    );
    let shares_dump = i.dump("partner_bridge_shares_total");
    for (outcome, want) in [
        ("minted", n),
        ("skipped_valid", 1.0),
        ("rejected", 0.0),
        ("not_found", 0.0),
        ("retried", 0.0),
        ("paused", 0.0),
        ("exhausted", 0.0),
        ("failed", 0.0),
    ] {
        assert_eq!(
            i.value(
                "partner_bridge_shares_total",
                &[("partner", "sponsor-bank"), ("outcome", outcome)]
            ),
            want,
            "shares_total{{sponsor-bank,{outcome}}}\n{shares_dump}"
        );
    }
    assert_eq!(
        i.value(
            "partner_bridge_tokens_published_total",
            &[("partner", "sponsor-bank")]
        ),
        n
    );
    // Exactly N Didit calls besides the start-up key check (one probe), all shares, all answered 2xx (the duplicate
    // never reached Didit).
    let didit_dump = i.dump("partner_bridge_didit_requests_total");
    assert_eq!(
        i.sum("partner_bridge_didit_requests_total", |_| true),
        n + 1.0,
        "{didit_dump}"
    );
    assert_eq!(
        i.sum("partner_bridge_didit_requests_total", |l| l["operation"]
            == "probe"
            && is_2xx(&l["status"])),
        1.0,
        "{didit_dump}"
    );
    assert_eq!(
        i.sum("partner_bridge_didit_requests_total", |l| l["operation"]
            == "share"
            && is_2xx(&l["status"])),
        n,
        "{didit_dump}"
    );
    assert_eq!(
        i.get(
            "partner_bridge_didit_request_duration_seconds",
            "partner_bridge_didit_request_duration_seconds_count",
            &[("operation", "share")]
        ),
        n
    );
    assert_eq!(world.control.stats().await.unwrap().shares, N as u64);
    let dead_dump = i.dump("partner_bridge_dead_lettered_total");
    assert_eq!(
        i.value(
            "partner_bridge_dead_lettered_total",
            &[("queue", onboarding.as_str()), ("reason", "malformed_json")]
        ),
        1.0,
        "{dead_dump}"
    );
    assert_eq!(
        i.sum("partner_bridge_dead_lettered_total", |_| true),
        1.0,
        "{dead_dump}"
    );
    // N token envelopes plus the dead-letter copy, each confirmed by the broker.
    assert_eq!(
        i.value(
            "partner_bridge_publish_confirms_total",
            &[("result", "ack")]
        ),
        n + 1.0
    );
    assert_eq!(
        i.sum("partner_bridge_imports_total", |_| true),
        0.0,
        "the issuer imports nothing"
    );
    for histogram in [
        "partner_bridge_end_to_end_seconds",
        "partner_bridge_token_age_at_import_seconds",
    ] {
        assert_eq!(i.get(histogram, &format!("{histogram}_count"), &[]), 0.0);
    }
    for pipeline in ["issuer_onboarding", "issuer_reshare", "issuer_tokens"] {
        assert_eq!(
            i.value("partner_bridge_amqp_connected", &[("pipeline", pipeline)]),
            1.0,
            "amqp_connected{{{pipeline}}}"
        );
    }
    let last = i.value(
        "partner_bridge_last_success_timestamp_seconds",
        &[("pipeline", "issuer_onboarding")],
    );
    assert!(
        last >= started - 1.0 && last <= now_unix() + 1.0,
        "last_success {last}"
    );
    assert_eq!(
        amqp.depth(&Names::dead_queue(&onboarding)).await,
        1,
        "the bad message waits in the .dead queue"
    );

    // ---- Receiver: N imported, each with its end-to-end time and token age. -----------------------------------
    let r = &receiver_expo;
    let imports_dump = r.dump("partner_bridge_imports_total");
    for outcome in ImportOutcome::ALL {
        let want = if outcome == ImportOutcome::Imported {
            n
        } else {
            0.0
        };
        assert_eq!(
            r.value(
                "partner_bridge_imports_total",
                &[("issuer", "fintech-a"), ("outcome", outcome.as_str())]
            ),
            want,
            "imports_total{{fintech-a,{}}}\n{imports_dump}",
            outcome.as_str()
        );
    }
    assert_eq!(
        r.sum("partner_bridge_imports_total", |_| true),
        n,
        "{imports_dump}"
    );
    // N imports and the start-up key check.
    let didit_dump = r.dump("partner_bridge_didit_requests_total");
    assert_eq!(
        r.sum("partner_bridge_didit_requests_total", |_| true),
        n + 1.0,
        "{didit_dump}"
    );
    assert_eq!(
        r.sum("partner_bridge_didit_requests_total", |l| l["operation"]
            == "probe"),
        1.0,
        "{didit_dump}"
    );
    assert_eq!(
        r.sum("partner_bridge_didit_requests_total", |l| l["operation"]
            == "import"
            && is_2xx(&l["status"])),
        n,
        "{didit_dump}"
    );
    assert_eq!(
        r.get(
            "partner_bridge_didit_request_duration_seconds",
            "partner_bridge_didit_request_duration_seconds_count",
            &[("operation", "import")]
        ),
        n
    );
    for histogram in [
        "partner_bridge_end_to_end_seconds",
        "partner_bridge_token_age_at_import_seconds",
    ] {
        assert_eq!(
            r.get(histogram, &format!("{histogram}_count"), &[]),
            n,
            "{histogram}_count"
        );
        let sum = r.get(histogram, &format!("{histogram}_sum"), &[]);
        assert!(
            sum >= 0.0 && sum < 60.0 * n,
            "{histogram}_sum {sum} is not the sum of N short waits"
        );
    }
    // N import.results, confirmed; nothing dead-lettered; the issuer-side families stay at zero here.
    assert_eq!(
        r.value(
            "partner_bridge_publish_confirms_total",
            &[("result", "ack")]
        ),
        n
    );
    assert_eq!(r.sum("partner_bridge_dead_lettered_total", |_| true), 0.0);
    assert_eq!(r.sum("partner_bridge_events_total", |_| true), 0.0);
    assert_eq!(r.sum("partner_bridge_shares_total", |_| true), 0.0);
    assert_eq!(
        r.value(
            "partner_bridge_amqp_connected",
            &[("pipeline", "receiver_tokens")]
        ),
        1.0
    );
    let last = r.value(
        "partner_bridge_last_success_timestamp_seconds",
        &[("pipeline", "receiver_tokens")],
    );
    assert!(
        last >= started - 1.0 && last <= now_unix() + 1.0,
        "last_success {last}"
    );
    let counts = world.wait_imports(N, Duration::from_secs(5)).await;
    assert!(sessions.iter().all(|s| counts.get(s) == Some(&1)));
    assert_eq!(results.results().len(), N, "no result for the duplicate");

    amqp.close().await;
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn livez_readyz_and_the_healthcheck_command_agree() {
    let world = World::new("ops-health").await;
    let http = http();
    // A bridge whose broker is not there: alive, never ready.
    let dead_broker = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port());
    let toml = world
        .receiver_toml(false)
        .replace(&amqp_url(), &dead_broker);
    assert_ne!(
        toml,
        world.receiver_toml(false),
        "the broker URL was replaced"
    );
    let unready = app::start(world.config(&toml), CancellationToken::new())
        .await
        .expect("starts without its broker");
    let admin = unready.admin_addr();
    let (status, _, body) = get(&http, &format!("http://{admin}/livez")).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = get(&http, &format!("http://{admin}/readyz")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("amqp"), "readyz names the broker: {body}");

    let livez = format!("http://{admin}/livez");
    let readyz = format!("http://{admin}/readyz");
    let missing = format!("http://{admin}/no-such-route");
    let nobody = format!("http://127.0.0.1:{}/livez", closed_port());
    let ran = run_binary(&["healthcheck", "--url", &livez]).await;
    assert_eq!(ran.code, 0, "livez: {ran:?}");
    let ran = run_binary(&["healthcheck", "--url", &readyz]).await;
    assert_eq!(ran.code, 1, "readyz 503: {ran:?}");
    assert!(ran.stderr.contains("503"), "{ran:?}");
    let ran = run_binary(&["healthcheck", "--url", &missing]).await;
    assert_eq!(ran.code, 1, "404: {ran:?}");
    let ran = run_binary(&["healthcheck", "--url", &nobody]).await;
    assert_eq!(ran.code, 1, "connection refused: {ran:?}");
    unready.stop().await.unwrap();

    // The same bridge with its broker: ready, and the healthcheck says so.
    let ready = world.start_receiver(false).await;
    let readyz = format!("http://{}/readyz", ready.admin_addr());
    let (status, _, body) = get(&http, &readyz).await;
    assert_eq!(status, 200, "{body}");
    let ran = run_binary(&["healthcheck", "--url", &readyz]).await;
    assert_eq!(ran.code, 0, "ready: {ran:?}");
    ready.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_never_answers_200_while_the_bridge_is_starting() {
    // A bridge whose broker never answers can never be ready. `/readyz` is polled as fast as possible from before
    // the admin port is bound until well after `app::start` returned: not one 200 may slip through, in particular
    // not while the parts that will report "not connected" are still being created.
    let world = World::new("ops-early-ready").await;
    let dead_broker = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port());
    for round in 0..5 {
        let admin = closed_port();
        let toml = world
            .issuer_toml()
            .replace(&amqp_url(), &dead_broker)
            .replace(
                "[admin]\nlisten = \"127.0.0.1:0\"",
                &format!("[admin]\nlisten = \"127.0.0.1:{admin}\""),
            );
        assert!(
            toml.contains(&format!("127.0.0.1:{admin}")),
            "admin port set"
        );
        let config = world.config(&toml);
        let stop = CancellationToken::new();
        let poller = {
            let stop = stop.clone();
            let http = http();
            let url = format!("http://127.0.0.1:{admin}/readyz");
            tokio::spawn(async move {
                let (mut ok, mut unready) = (0u32, 0u32);
                while !stop.is_cancelled() {
                    match http.get(&url).send().await {
                        Ok(r) if r.status() == 200 => ok += 1,
                        Ok(_) => unready += 1,
                        Err(_) => tokio::task::yield_now().await,
                    }
                }
                (ok, unready)
            })
        };
        let running = app::start(config, CancellationToken::new())
            .await
            .expect("starts without its broker");
        assert!(running.health().check().is_err(), "round {round}");
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        tokio::time::sleep_until(deadline).await;
        stop.cancel();
        let (ok, unready) = poller.await.unwrap();
        assert!(
            unready > 0,
            "round {round}: the poller never reached /readyz"
        );
        assert_eq!(
            ok, 0,
            "round {round}: /readyz said ready {ok} time(s) without a broker"
        );
        running.stop().await.unwrap();
    }
    world.cleanup().await;
}

/// A concrete routing key a binding key matches.
fn key_for(binding: &str) -> String {
    binding.replace(['#', '*'], "any")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_declare_creates_what_show_prints_and_is_idempotent() {
    let world = World::new("ops-topology").await;
    let p = world.prefix.clone();
    let roles = [
        ("issuer", world.issuer_toml()),
        ("receiver", world.receiver_toml(false)),
    ];
    for (role, toml) in &roles {
        let path = write_config(&world, role, toml);
        let config = world.config(toml);
        let plan = app::declared_topology(&config);

        // show: one line per entity of the plan, without touching the broker.
        let shown = run_binary(&["topology", "show", "--config", path_str(&path)]).await;
        assert_eq!(shown.code, 0, "{role}: {shown:?}");
        let lines: Vec<&str> = shown.stdout.lines().collect();
        let want: Vec<String> = plan.iter().map(ToString::to_string).collect();
        assert_eq!(lines, want, "{role}: show prints the plan");
        let expected: Vec<String> = if *role == "issuer" {
            vec![
                format!("exchange {p}.onboarding (topic, durable)"),
                format!("exchange {p}.tokens (topic, durable)"),
                format!("exchange {p}.reshare (topic, durable)"),
                format!("exchange {p}.dead-letter (direct, durable)"),
                format!(
                    "queue    {p}.issuer.onboarding (durable, x-queue-type=\"quorum\", x-delivery-limit="
                ),
                format!("queue    {p}.issuer.onboarding.dead (durable, x-queue-type=\"quorum\""),
                format!("queue    {p}.issuer.onboarding.retry (durable"),
                format!("queue    {p}.issuer.reshare (durable, x-queue-type=\"quorum\""),
                format!("binding  {p}.onboarding --[onboarding.finished]--> {p}.issuer.onboarding"),
                format!(
                    "binding  {p}.reshare --[reshare.{}]--> {p}.issuer.reshare",
                    world.issuer_app.application_id
                ),
                format!(
                    "binding  {p}.dead-letter --[{p}.issuer.onboarding]--> {p}.issuer.onboarding.dead"
                ),
            ]
        } else {
            vec![
                format!("exchange {p}.tokens (topic, durable)"),
                format!("exchange {p}.imports (topic, durable)"),
                format!("exchange {p}.reshare (topic, durable)"),
                format!("exchange {p}.dead-letter (direct, durable)"),
                format!(
                    "queue    {p}.receiver.tokens (durable, x-queue-type=\"quorum\", x-delivery-limit="
                ),
                format!("queue    {p}.receiver.tokens.dead (durable, x-queue-type=\"quorum\""),
                format!("queue    {p}.receiver.tokens.retry (durable"),
                format!(
                    "binding  {p}.tokens --[token.{}]--> {p}.receiver.tokens",
                    world.partner_app.application_id
                ),
                format!(
                    "binding  {p}.dead-letter --[{p}.receiver.tokens]--> {p}.receiver.tokens.dead"
                ),
            ]
        };
        for entity in expected {
            assert!(
                lines.iter().any(|l| l.starts_with(&entity)),
                "{role}: show lacks `{entity}`:\n{}",
                shown.stdout
            );
        }

        let queues: Vec<&Entity> = plan
            .iter()
            .filter(|e| matches!(e, Entity::Queue { .. }))
            .collect();
        let first_queue = match queues[0] {
            Entity::Queue { name, .. } => name.clone(),
            _ => unreachable!(),
        };
        let probe = Amqp::connect().await;
        let before = topology::queue_depth(&probe.channel, &first_queue).await;
        assert!(
            matches!(before, Err(AmqpError::NotFound { .. })),
            "{role}: {first_queue} before declare: {before:?}"
        );
        probe.close().await;

        // declare: everything show printed, then again (idempotent), same output both times.
        let declared = run_binary(&["topology", "declare", "--config", path_str(&path)]).await;
        assert_eq!(declared.code, 0, "{role}: {declared:?}");
        assert_eq!(declared.stdout, format!("declared:\n{}", shown.stdout));
        let again = run_binary(&["topology", "declare", "--config", path_str(&path)]).await;
        assert_eq!(again.code, 0, "{role}: second declare: {again:?}");
        assert_eq!(again.stdout, declared.stdout);

        let amqp = Amqp::connect().await;
        for entity in &plan {
            match entity {
                Entity::Exchange { name, .. } => {
                    amqp.channel
                        .exchange_declare(
                            name.as_str().into(),
                            lapin::ExchangeKind::Topic,
                            ExchangeDeclareOptions {
                                passive: true,
                                ..Default::default()
                            },
                            FieldTable::default(),
                        )
                        .await
                        .unwrap_or_else(|e| panic!("{role}: exchange {name} missing: {e}"));
                }
                Entity::Queue { name, .. } => {
                    assert_eq!(amqp.depth(name).await, 0, "{role}: queue {name}");
                }
                Entity::Binding { .. } => {}
            }
        }
        // Each queue has exactly the declared type: redeclaring it as another type is refused.
        for entity in &queues {
            let Entity::Queue { name, arguments } = entity else {
                unreachable!()
            };
            let quorum = arguments
                .iter()
                .any(|(k, v)| k == "x-queue-type" && *v == HeaderValue::Str("quorum".into()));
            let mut other: Vec<(String, HeaderValue)> = arguments
                .iter()
                .filter(|(k, _)| k != "x-queue-type")
                .cloned()
                .collect();
            other.push((
                "x-queue-type".into(),
                HeaderValue::Str(if quorum { "classic" } else { "quorum" }.into()),
            ));
            let changed = Entity::Queue {
                name: name.clone(),
                arguments: other,
            };
            let scratch = Amqp::connect().await;
            let refused = topology::declare(&scratch.channel, &[changed]).await;
            assert!(
                refused.is_err(),
                "{role}: {name} accepted another queue type, so it was not declared as planned"
            );
            scratch.close().await;
        }
        // Each binding routes: a message with a matching key reaches the bound queue.
        let mut routed: BTreeMap<String, u32> = BTreeMap::new();
        for entity in &plan {
            if let Entity::Binding {
                queue,
                exchange,
                routing_key,
            } = entity
            {
                amqp.publish(exchange, &key_for(routing_key), b"{}", &[])
                    .await;
                *routed.entry(queue.clone()).or_default() += 1;
            }
        }
        for (queue, n) in &routed {
            wait_for(
                &format!("{role}: {n} routed message(s) in {queue}"),
                Duration::from_secs(5),
                || async { (amqp.depth(queue).await == *n).then_some(()) },
            )
            .await;
            amqp.drain(queue).await;
        }
        amqp.close().await;

        // The bridge itself accepts what the command declared (its consumers re-declare the same plan).
        let running = world.start(config).await;
        running.stop().await.unwrap();
    }
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_with_their_reason_and_replayed_into_processing() {
    let world = World::new("ops-deadletters").await;
    let receiver = world.start_receiver(false).await;
    let issuer = world.start_issuer().await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let onboarding = world.names.issuer_onboarding_queue();
    let dead = Names::dead_queue(&onboarding);
    let path = write_config(&world, "issuer", &world.issuer_toml());

    // The backend announces a verification Didit does not consider finished yet: the share is refused (400
    // session_not_finished) and the event is dead-lettered for that partner.
    let session = world
        .session(SessionKind::User, "In Progress", "ops-dl")
        .await;
    world
        .publish_event(&amqp, &world.event(&session, SessionKind::User, "Approved"))
        .await;
    wait_for("the event in .dead", Duration::from_secs(20), || async {
        (amqp.depth(&dead).await == 1).then_some(())
    })
    .await;

    let listed = run_binary(&[
        "dead-letters",
        "list",
        "--config",
        path_str(&path),
        "--queue",
        &onboarding,
    ])
    .await;
    assert_eq!(listed.code, 0, "{listed:?}");
    assert!(
        listed
            .stdout
            .starts_with(&format!("1 message(s) shown from {dead}\n")),
        "{}",
        listed.stdout
    );
    assert!(
        listed.stdout.contains("reason=share_rejected"),
        "{}",
        listed.stdout
    );
    assert!(
        listed.stdout.contains("detail: partner sponsor-bank"),
        "{}",
        listed.stdout
    );
    assert!(listed.stdout.contains(&session), "{}", listed.stdout);
    // Listing takes nothing away.
    wait_for(
        "the listed message back in .dead",
        Duration::from_secs(5),
        || async { (amqp.depth(&dead).await == 1).then_some(()) },
    )
    .await;
    assert_eq!(world.control.stats().await.unwrap().imports.len(), 0);

    // The operator fixes the cause, then replays: the event is processed and the session imported once.
    world
        .control
        .set_status(&session, "Approved")
        .await
        .unwrap();
    let replayed = run_binary(&[
        "dead-letters",
        "replay",
        "--config",
        path_str(&path),
        "--queue",
        &onboarding,
    ])
    .await;
    assert_eq!(replayed.code, 0, "{replayed:?}");
    assert_eq!(
        replayed.stdout.trim(),
        format!("moved 1 message(s) from {dead} back to {onboarding}")
    );
    let counts = world.wait_imports(1, Duration::from_secs(20)).await;
    assert_eq!(counts.get(&session), Some(&1));
    let got = results.wait_count(1, Duration::from_secs(10)).await;
    let result: partner_bridge::envelope::ImportResult =
        serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(result.outcome, ImportOutcome::Imported);
    assert_eq!(result.source_session_id, session);
    assert_eq!(
        amqp.depth(&dead).await,
        0,
        ".dead is empty after the replay"
    );

    let listed = run_binary(&[
        "dead-letters",
        "list",
        "--config",
        path_str(&path),
        "--queue",
        &onboarding,
    ])
    .await;
    assert_eq!(listed.code, 0, "{listed:?}");
    assert!(
        listed
            .stdout
            .starts_with(&format!("0 message(s) shown from {dead}\n")),
        "{}",
        listed.stdout
    );

    // The issuer counted both lives of the event.
    let expo = scrape(&http(), issuer.admin_addr()).await;
    assert_eq!(
        expo.value(
            "partner_bridge_dead_lettered_total",
            &[("queue", onboarding.as_str()), ("reason", "share_rejected")]
        ),
        1.0,
        "{}",
        expo.dump("partner_bridge_dead_lettered_total")
    );
    assert_eq!(
        expo.value(
            "partner_bridge_shares_total",
            &[("partner", "sponsor-bank"), ("outcome", "rejected")]
        ),
        1.0
    );
    assert_eq!(
        expo.value(
            "partner_bridge_shares_total",
            &[("partner", "sponsor-bank"), ("outcome", "minted")]
        ),
        1.0
    );

    amqp.close().await;
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[test]
fn the_exposition_parser_refuses_what_a_scraper_would() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\"} 2\n\
                # HELP h H.\n# TYPE h histogram\nh_sum 0.5\nh_count 2\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\n";
    let expo = Exposition::parse(good).expect("a well-formed exposition parses");
    assert_eq!(expo.value("a_total", &[("x", "1"), ("y", "q\"")]), 2.0);
    assert_eq!(expo.get("h", "h_count", &[]), 2.0);
    for (bad, why) in [
        (
            "# TYPE a_total counter\na_total{x=1} 2\n",
            "unquoted label value",
        ),
        ("# HELP a_total A.\na_total 2\n", "no TYPE"),
        ("# TYPE a_total counter\na_total 2\n", "no HELP"),
        ("# HELP a A.\n# TYPE a gauge\na 1", "no final newline"),
        ("# HELP a A.\n# TYPE a gauge\na{x=\"1\"}  1\n", "two spaces"),
        (
            "# HELP a A.\n# TYPE a gauge\na{x=\"1\",x=\"2\"} 1\n",
            "label twice",
        ),
        (
            "# HELP a A.\n# TYPE a gauge\nb 1\n",
            "sample without family",
        ),
        (
            "# HELP a A.\n# TYPE a gauge\n# HELP b B.\n# TYPE b gauge\na 1\nb 1\na{x=\"y\"} 1\n",
            "family not contiguous",
        ),
        (
            "# HELP h H.\n# TYPE h histogram\nh_sum 1\nh_count 3\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n",
            "buckets not cumulative",
        ),
        ("# HELP a A.\n# TYPE a counter\na -1\n", "negative counter"),
    ] {
        assert!(Exposition::parse(bad).is_err(), "accepted: {why}");
    }
}
