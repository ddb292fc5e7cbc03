//! Pacing under Didit's write limit (issue #12): with the sandbox's limit on (scaled down: a few writes per
//! window of a few seconds, the same shape as Didit's 300 per 60 s), a burst larger than the limit drains without
//! 429s and without dead letters; one 429 makes every caller of the key wait for its `Retry-After`; and waiting for
//! the limit uses up no attempt. Counted in the sandbox's statistics, never timed.

use std::sync::Arc;
use std::time::Duration;

use partner_bridge::config::DiditAccess;
use partner_bridge::didit::client::DiditClient;
use partner_bridge::didit::error::DiditError;
use partner_bridge::didit::pacing::Pacing;
use partner_bridge::didit::wire::SessionKind;
use partner_bridge::metrics::Metrics;
use partner_bridge::sandbox::{FaultEndpoint, FaultSettings, RateLimitHeaders, Settings};
use partner_bridge::secret::SecretSource;

use crate::support::bridge::{Amqp, Collector, World, metric};
use crate::support::faults::{assert_exactly_once, publish_sessions, set_key, wait_settled};
use crate::support::wait_for;

/// Turns the sandbox's limit on: `limit` writes per key per `window_ms`, headers only on 429 (Didit today).
async fn limit_sandbox(world: &World, limit: u32, window_ms: u64) {
    world
        .control
        .set_settings(Settings {
            rate_limit: true,
            writes_per_minute: limit,
            window_ms,
            rate_limit_headers: RateLimitHeaders::On429,
        })
        .await
        .unwrap();
}

/// The same limit in a bridge's configuration.
fn paced(toml: &str, limit: u32, window_ms: u64) -> String {
    let toml = set_key(toml, "writes_per_minute", &limit.to_string());
    toml.replace(
        "writes_per_minute =",
        &format!("rate_window_ms = {window_ms}\nwrites_per_minute ="),
    )
}

fn rate_limited(stats: &partner_bridge::sandbox::Stats) -> u64 {
    stats.rejected("rate_limited")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_three_times_the_limit_drains_with_no_429_and_nothing_dead_lettered() {
    const LIMIT: u32 = 20;
    const WINDOW_MS: u64 = 2_000;
    let world = World::new("pace-burst").await;
    limit_sandbox(&world, LIMIT, WINDOW_MS).await;
    let receiver = world
        .start(world.config(&paced(&world.receiver_toml(false), LIMIT, WINDOW_MS)))
        .await;
    let issuer = world
        .start(world.config(&paced(&world.issuer_toml(), LIMIT, WINDOW_MS)))
        .await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let sessions = publish_sessions(&world, &amqp, 3 * LIMIT as usize, "burst").await;

    wait_settled(
        &world,
        &amqp,
        &results,
        &sessions,
        Duration::from_secs(60),
        || async { vec![issuer.metrics().encode(), receiver.metrics().encode()] },
    )
    .await;
    let stats = world.control.stats().await.unwrap();
    assert_eq!(
        rate_limited(&stats),
        0,
        "Didit answered 429 to a paced bridge: {:?}",
        stats.rejections
    );
    assert_eq!(
        stats.writes,
        2 * sessions.len() as u64,
        "one share and one import each"
    );
    // The burst did have to wait: the last third of the shares each waited most of a window.
    let text = issuer.metrics().encode();
    let waited = metric(
        &text,
        "partner_bridge_didit_limiter_wait_seconds_sum{key=\"issuer\"}",
    );
    assert!(
        waited >= 1.0,
        "the issuer hardly waited for its budget\n{text}"
    );
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    assert_exactly_once(&world, &amqp, &sessions).await;
    results.stop();
    amqp.close().await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_the_limit_past_hold_max_uses_no_attempt() {
    // One attempt only, and a hold shorter than the window: every write beyond the first window's waits longer than
    // the hold and goes through the retry queue. A counted retry would dead-letter it at once.
    const LIMIT: u32 = 5;
    const WINDOW_MS: u64 = 2_000;
    let world = World::new("pace-attempts").await;
    limit_sandbox(&world, LIMIT, WINDOW_MS).await;
    let strict = |toml: String| {
        let toml = set_key(&toml, "max_attempts", "1");
        let toml = set_key(&toml, "hold_max_s", "1");
        paced(&toml, LIMIT, WINDOW_MS)
    };
    let receiver = world
        .start(world.config(&strict(world.receiver_toml(false))))
        .await;
    let issuer = world
        .start(world.config(&strict(world.issuer_toml())))
        .await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let sessions = publish_sessions(&world, &amqp, 4 * LIMIT as usize, "attempts").await;

    wait_settled(
        &world,
        &amqp,
        &results,
        &sessions,
        Duration::from_secs(90),
        || async { vec![issuer.metrics().encode(), receiver.metrics().encode()] },
    )
    .await;
    let deferred = metric(
        &issuer.metrics().encode(),
        "partner_bridge_didit_limiter_deferred_total{key=\"issuer\"}",
    );
    assert!(
        deferred > 0.0,
        "no write waited past the hold, so the test proved nothing"
    );
    let stats = world.control.stats().await.unwrap();
    assert_eq!(rate_limited(&stats), 0, "{:?}", stats.rejections);
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    // Nothing dead-lettered (not even `retries_exhausted` with max_attempts = 1), each session imported once.
    assert_exactly_once(&world, &amqp, &sessions).await;
    results.stop();
    amqp.close().await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_429_makes_every_caller_of_the_key_wait_instead_of_each_getting_its_own() {
    let world = World::new("pace-gate").await;
    let metrics = Arc::new(Metrics::new());
    // Pacing off (0): only the gate is under test. Two clients of one key, as the issuer's pipelines are.
    let pacing = Pacing::new(0, Duration::from_secs(60), metrics.clone());
    let access = DiditAccess {
        base_url: world.sandbox.base_url().to_string(),
        application_id: world.issuer_app.application_id.clone(),
        api_key: SecretSource::Inline(world.issuer_app.api_key.clone()),
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
    };
    let first = DiditClient::paced(&access, metrics.clone(), &pacing, "issuer").unwrap();
    let second = DiditClient::paced(&access, metrics.clone(), &pacing, "issuer").unwrap();
    let mut sessions = Vec::new();
    for i in 0..10 {
        sessions.push(
            world
                .session(SessionKind::User, "Approved", &format!("gate-{i}"))
                .await,
        );
    }
    let partner = world.partner_app.application_id.clone();

    // Every share is answered 429 (Retry-After: 1) while the fault is on.
    world
        .control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::Share,
            rate_limit_rate: 1.0,
            ..FaultSettings::default()
        })
        .await
        .unwrap();
    let refused = first.share(&sessions[0], &partner, 600).await.unwrap_err();
    assert!(
        matches!(refused, DiditError::RateLimited { .. }),
        "{refused}"
    );
    let budget = first.budget().unwrap().clone();
    assert!(budget.gate().is_some(), "the 429 closed the key's gate");

    // Nine more callers of the key, on both clients, while Didit still answers 429: they wait at the gate.
    let callers: Vec<_> = sessions[1..]
        .iter()
        .enumerate()
        .map(|(i, session)| {
            let client = if i % 2 == 0 {
                first.clone()
            } else {
                second.clone()
            };
            let (session, partner) = (session.clone(), partner.clone());
            tokio::spawn(async move { client.share(&session, &partner, 600).await })
        })
        .collect();
    wait_for(
        "nine callers waiting at the gate",
        Duration::from_secs(5),
        || async { (budget.waiting() == 9).then_some(()) },
    )
    .await;
    assert!(
        budget.gate().is_some(),
        "the gate opened before the test could look (the machine is too slow for this check)"
    );
    world.control.clear_faults().await.unwrap();
    for caller in callers {
        caller.await.unwrap().expect("a gated caller's share");
    }
    let stats = world.control.stats().await.unwrap();
    assert_eq!(
        rate_limited(&stats),
        1,
        "each caller found the limit by its own 429: {:?}",
        stats.rejections
    );
    assert_eq!(stats.shares, 9);
    let text = metrics.encode();
    assert_eq!(
        metric(
            &text,
            "partner_bridge_didit_rate_limited_total{operation=\"share\"}"
        ),
        1.0
    );
    world.cleanup().await;
}
