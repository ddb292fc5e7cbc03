//! 8. **backlog** (DESIGN.md §10: "Didit's rate limit on, a backlog at once: drain rate ≥ 97% of what the limit
//!    allows, ≤ 1% of calls answered 429") — the sandbox's write limit on, headers only on 429 as Didit sends them
//!    now, and both in-process bridges pacing to the same limit. `PB_BENCH_BACKLOG_EVENTS` (900) events are
//!    published at once; the figure is the time from the first publish to the last `import.result`.
//!
//!    What the limit allows: Didit counts writes per key over a sliding window, so the first `limit` writes go at
//!    once and each later batch of `limit` one window after the batch before: `N` writes take at least
//!    `(⌈N / limit⌉ − 1) × window` (900 at 300 per 60 s: 120 s). The issuer's shares and the receiver's imports use
//!    two keys, each with its own window, so that floor holds for the whole pipeline. The ratio reported is that
//!    floor ÷ the measured drain time (1.0 = as fast as the limit allows), with the 429 share of every Didit write
//!    and an exactly-once check (each session imported once, nothing dead-lettered).
//!
//!    Scaled to run in well under a minute with the shape unchanged: `PB_BENCH_BACKLOG_LIMIT` (300) writes per
//!    `PB_BENCH_BACKLOG_WINDOW_MS` (15000) — 1,200 writes per minute, the same 300-write batches as Didit's. A
//!    shorter window is the harder test: the pipeline's own time per batch is a larger part of it.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use partner_bridge::amqp::Names;
use partner_bridge::sandbox::{RateLimitHeaders, Settings as SandboxSettings};
use serde_json::{Value, json};

use super::{
    BenchWorld, Cleanup, Producer, ResultWatcher, Settings, env_or, round, series,
    start_in_process, started, verdict,
};

/// The bar: drain rate ≥ this share of what the limit allows.
pub const BAR_BACKLOG_RATIO: f64 = 0.97;
/// The bar: at most this share of Didit calls answered 429.
pub const BAR_BACKLOG_429_SHARE: f64 = 0.01;

/// Paces a bridge's configuration to `limit` writes per `window_ms`.
fn paced(toml: &str, limit: u32, window_ms: u64) -> String {
    toml.replacen(
        "writes_per_minute = 0\n",
        &format!("writes_per_minute = {limit}\nrate_window_ms = {window_ms}\n"),
        1,
    )
}

pub async fn backlog_phase(
    settings: &Settings,
    world: &BenchWorld,
    prefix: &str,
    cleanup: &mut Cleanup,
    passes: &mut Vec<(String, bool)>,
) -> anyhow::Result<Value> {
    let events: usize = env_or("PB_BENCH_BACKLOG_EVENTS", 900)?;
    let limit: u32 = env_or("PB_BENCH_BACKLOG_LIMIT", 300)?;
    let window_ms: u64 = env_or("PB_BENCH_BACKLOG_WINDOW_MS", 15_000)?;
    ensure!(
        events > 0 && limit > 0,
        "PB_BENCH_BACKLOG_EVENTS and _LIMIT must be positive"
    );
    world
        .control
        .set_settings(SandboxSettings {
            rate_limit: true,
            writes_per_minute: limit,
            window_ms,
            rate_limit_headers: RateLimitHeaders::On429,
        })
        .await
        .context("turning the sandbox's write limit on")?;
    let outcome = run(
        settings, world, prefix, cleanup, passes, events, limit, window_ms,
    )
    .await;
    // Whatever happened, the scenarios after this one run without the limit.
    let _ = world
        .control
        .set_settings(SandboxSettings {
            rate_limit: false,
            writes_per_minute: 300,
            window_ms: 60_000,
            rate_limit_headers: RateLimitHeaders::On429,
        })
        .await;
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn run(
    settings: &Settings,
    world: &BenchWorld,
    prefix: &str,
    cleanup: &mut Cleanup,
    passes: &mut Vec<(String, bool)>,
    events: usize,
    limit: u32,
    window_ms: u64,
) -> anyhow::Result<Value> {
    let receiver_config = world.config(&paced(
        &world.receiver_toml(prefix, "127.0.0.1:0"),
        limit,
        window_ms,
    ))?;
    let issuer_config = world.config(&paced(
        &world.issuer_toml(prefix, "127.0.0.1:0", None),
        limit,
        window_ms,
    ))?;
    cleanup.add_config(&receiver_config);
    cleanup.add_config(&issuer_config);
    let (receiver, _) = start_in_process(receiver_config).await?;
    let (issuer, _) = start_in_process(issuer_config).await?;
    let watcher =
        ResultWatcher::start(&settings.amqp_url, &format!("{prefix}.receiver.results")).await?;
    let producer = Producer::connect(&settings.amqp_url).await?;
    let sessions = world.sessions(events).await?;
    let before = world.control.stats().await?;
    let batches = events.div_ceil(limit as usize);
    let floor_s = (batches.saturating_sub(1) as f64) * window_ms as f64 / 1000.0;
    progress!(
        "backlog: {events} events at once, Didit's limit {limit} writes per {:.0} s per key (floor {floor_s:.0} s)",
        window_ms as f64 / 1000.0
    );
    let bodies: Vec<Vec<u8>> = sessions.iter().map(|s| s.event()).collect();
    let ids: Vec<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
    let mark = watcher.mark();
    let t0 = Instant::now();
    producer
        .publish_all(
            &Names::new(prefix).onboarding_exchange(),
            "onboarding.finished",
            bodies,
            "onboarding.finished",
        )
        .await?;
    let timeout = Duration::from_secs_f64(floor_s * 3.0 + 60.0);
    let (times, not_imported) = watcher
        .wait_all(&ids, mark, timeout)
        .await
        .map_err(|missing| {
            anyhow::anyhow!("{missing} of {events} imports missing after {timeout:?}")
        })?;
    let seconds = (times.into_iter().max().expect("at least one event") - t0).as_secs_f64();
    let after = world.control.stats().await?;
    let writes = after.writes - before.writes;
    let throttled = after.rejected("rate_limited") - before.rejected("rate_limited");
    let share_429 = throttled as f64 / writes.max(1) as f64;
    let counts: std::collections::HashMap<&str, u64> = after
        .imports
        .iter()
        .map(|i| (i.source_session_id.as_str(), i.count))
        .collect();
    let not_once = ids
        .iter()
        .filter(|id| counts.get(**id).copied() != Some(1))
        .count();
    let dead: f64 = [issuer.metrics().encode(), receiver.metrics().encode()]
        .iter()
        .map(|text| {
            text.lines()
                .filter(|l| l.starts_with("partner_bridge_dead_lettered_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum();
    let issuer_text = issuer.metrics().encode();
    let waited_s = series(
        &issuer_text,
        "partner_bridge_didit_limiter_wait_seconds_sum{key=\"issuer\"}",
    );
    let deferred = series(
        &issuer_text,
        "partner_bridge_didit_limiter_deferred_total{key=\"issuer\"}",
    );
    let ratio = if seconds > 0.0 {
        floor_s / seconds
    } else {
        0.0
    };
    let ratio_pass = ratio >= BAR_BACKLOG_RATIO;
    let share_pass = share_429 <= BAR_BACKLOG_429_SHARE;
    let once_pass = not_once == 0 && not_imported == 0 && dead == 0.0;
    progress!(
        "backlog: drained in {seconds:.1} s against a floor of {floor_s:.0} s: {ratio:.3} of the allowed rate (bar {BAR_BACKLOG_RATIO}) {}; {throttled} of {writes} Didit writes answered 429 ({:.2}%, bar {:.0}%) {}; {} {}",
        verdict(ratio_pass),
        share_429 * 100.0,
        BAR_BACKLOG_429_SHARE * 100.0,
        verdict(share_pass),
        if once_pass {
            "each session imported once, nothing dead-lettered".to_string()
        } else {
            format!("{not_once} sessions not imported exactly once, {dead} dead-lettered")
        },
        verdict(once_pass)
    );
    passes.push(("backlog_drain_ratio".into(), ratio_pass));
    passes.push(("backlog_429_share".into(), share_pass));
    passes.push(("backlog_exactly_once".into(), once_pass));
    watcher.stop().await;
    producer.close().await;
    issuer.stop().await?;
    receiver.stop().await?;
    Ok(json!({
        "events": events,
        "limit_writes": limit,
        "window_ms": window_ms,
        "writes_per_minute_equivalent": round(f64::from(limit) * 60_000.0 / window_ms as f64, 0),
        "floor_seconds": round(floor_s, 1),
        "seconds": round(seconds, 3),
        "ratio_to_allowed": round(ratio, 4),
        "bar": format!(">= {BAR_BACKLOG_RATIO}"),
        "pass": ratio_pass,
        "didit_writes": writes,
        "answered_429": throttled,
        "share_429": round(share_429, 5),
        "bar_429": format!("<= {BAR_BACKLOG_429_SHARE}"),
        "pass_429": share_pass,
        "not_imported_once": not_once,
        "dead_lettered": dead,
        "pass_exactly_once": once_pass,
        "issuer_wait_seconds_total": round(waited_s, 1),
        "deferred_through_retry_queue": deferred,
        "measured_from": "the first publish of the backlog to the last import.result on the results queue",
        "floor": "(ceil(events / limit) - 1) x window: Didit's sliding window lets limit writes through per window",
    }))
}
