//! Reliability on the real broker (DESIGN.md §11): the exactly-once effect — the sandbox counts exactly one import
//! per source session, and nothing is left over or dead-lettered — after broker connections are cut mid-stream
//! (twice), after the real binary is SIGKILLed mid-stream and restarted, under 20% 5xx plus 10% 429 from Didit, after
//! the receiver was offline past its tokens' expiry and comes back, with duplicate and redelivered events and tokens,
//! and after SIGTERM with messages in flight; plus `/readyz` going 503 → 200 → 503 → 200 → 503 across start, broker
//! loss and shutdown (issue #5).
//!
//! Bridges run in-process (`app::start`) where a test reaches inside (metrics, a TCP proxy to the broker), and as
//! the real binary (`partner-bridge run --config FILE`) where the process itself must die. The moments to cut or
//! kill are chosen by the sandbox's import count, so they land mid-stream whatever the machine's speed; every wait
//! polls with a deadline. Each test ends by letting the bridges settle (every session has its `import.result`, no
//! work queue holds a message, nothing in flight), stopping them, and only then counting imports, so a late second
//! import could not slip in after the count.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use partner_bridge::amqp::Names;
use partner_bridge::app::{self, Running};
use partner_bridge::didit::wire::codes;
use partner_bridge::envelope::ImportOutcome;
use partner_bridge::sandbox::{FaultEndpoint, FaultSettings};
use tokio_util::sync::CancellationToken;

use crate::support::bridge::{Amqp, Collector, World, metric};
use crate::support::faults::*;
use crate::support::proxy::Proxy;
use crate::support::wait_for;

// ---- the tests ----------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connection_cut_twice_mid_stream_imports_each_session_once() {
    let world = World::new("rel-cut").await;
    test_logs();
    let proxy = Proxy::start().await;
    world
        .control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::All,
            latency_ms: 60,
            ..FaultSettings::default()
        })
        .await
        .unwrap();
    let receiver = world
        .start(world.config(&tuned(&world.receiver_toml(false), &proxy.amqp_url(), 4)))
        .await;
    let issuer = world
        .start(world.config(&tuned(&world.issuer_toml(), &proxy.amqp_url(), 4)))
        .await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let n = 40;
    let sessions = publish_sessions(&world, &amqp, n, "cut").await;

    for (round, at) in [(1.0, 10), (2.0, 25)] {
        wait_for(
            &format!("{at} imports before cut {round}"),
            Duration::from_secs(30),
            || async { (imported_sessions(&world).await >= at).then_some(()) },
        )
        .await;
        let accepted = proxy.accepted();
        proxy.cut();
        let so_far = imported_sessions(&world).await;
        assert!(
            so_far < n,
            "cut {round} came after the stream ended ({so_far} of {n} imported)"
        );
        // Every link (issuer: onboarding, reshare, tokens; receiver: tokens) connects again before the next cut.
        wait_explained(
            &format!("every link to reconnect after cut {round}"),
            Duration::from_secs(20),
            || async {
                let reconnects: Vec<f64> = [&issuer, &receiver]
                    .iter()
                    .map(|b| {
                        metric(
                            &b.metrics().encode(),
                            "partner_bridge_amqp_reconnects_total",
                        )
                    })
                    .collect();
                let new = proxy.accepted() - accepted;
                if new >= 4 && reconnects.iter().all(|r| *r >= round) {
                    Ok(())
                } else {
                    Err(format!(
                        "{new} new connections; reconnects (issuer, receiver) {reconnects:?}; readyz {:?} {:?}",
                        issuer.health().check(),
                        receiver.health().check()
                    ))
                }
            },
        )
        .await;
    }

    wait_settled(
        &world,
        &amqp,
        &results,
        &sessions,
        Duration::from_secs(40),
        || async { vec![issuer.metrics().encode(), receiver.metrics().encode()] },
    )
    .await;
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    assert_exactly_once(&world, &amqp, &sessions).await;
    results.stop();
    amqp.close().await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_and_restart_imports_each_session_once() {
    let world = World::new("rel-kill").await;
    test_logs();
    world
        .control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::All,
            latency_ms: 150,
            ..FaultSettings::default()
        })
        .await
        .unwrap();
    let (config, admin) = binary_config(&world, 4, 5);
    let log = world.dir.path().join("bridge.log");
    let mut bridge = Binary::start(&config, admin, log.clone()).await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let n = 30;
    let sessions = publish_sessions(&world, &amqp, n, "kill").await;

    showing_log(&log, async {
        wait_for(
            "imports under way with more in flight",
            Duration::from_secs(30),
            || async {
                let busy = in_flight(&bridge.metrics().await) > 0.0;
                (busy && imported_sessions(&world).await >= 8).then_some(())
            },
        )
        .await;
    })
    .await;
    bridge.child.kill().await.expect("SIGKILL the bridge");
    let at_kill = imported_sessions(&world).await;
    assert!(at_kill < n, "the kill came after the stream ended");

    let bridge = Binary::start(&config, admin, log.clone()).await;
    showing_log(
        &log,
        wait_settled(
            &world,
            &amqp,
            &results,
            &sessions,
            Duration::from_secs(45),
            || async { vec![bridge.metrics().await] },
        ),
    )
    .await;
    let mut bridge = bridge;
    bridge.terminate();
    let status = bridge.exited_within(Duration::from_secs(20)).await;
    assert!(status.success(), "exit after SIGTERM: {status}");
    showing_log(&log, assert_exactly_once(&world, &amqp, &sessions)).await;
    assert_no_secrets_in_log(&world, &log);
    results.stop();
    amqp.close().await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn didit_5xx_and_429_still_import_each_session_once() {
    let world = World::new("rel-faults").await;
    test_logs();
    world
        .control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::All,
            error_rate: 0.2,
            rate_limit_rate: 0.1,
            ..FaultSettings::default()
        })
        .await
        .unwrap();
    let receiver = world.start_receiver(false).await;
    let issuer = world.start_issuer().await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let sessions = publish_sessions(&world, &amqp, 30, "faults").await;

    wait_settled(
        &world,
        &amqp,
        &results,
        &sessions,
        Duration::from_secs(40),
        || async { vec![issuer.metrics().encode(), receiver.metrics().encode()] },
    )
    .await;
    let stats = world.control.stats().await.unwrap();
    let rejected = |code: &str| stats.rejections.get(code).copied().unwrap_or(0);
    assert!(
        rejected(codes::INTERNAL_ERROR) > 0 && rejected(codes::RATE_LIMITED) > 0,
        "the faults did not happen: {:?}",
        stats.rejections
    );
    let issuer_metrics = issuer.metrics().encode();
    let receiver_metrics = receiver.metrics().encode();
    assert!(
        metric(
            &issuer_metrics,
            "partner_bridge_retries_total{operation=\"share\"}"
        ) > 0.0,
        "the issuer never retried a share"
    );
    assert!(
        metric(
            &receiver_metrics,
            "partner_bridge_retries_total{operation=\"import\"}"
        ) > 0.0,
        "the receiver never retried an import"
    );
    assert_eq!(
        stats.shares,
        sessions.len() as u64,
        "a failed share is retried, never minted twice once it succeeded"
    );
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    assert_exactly_once(&world, &amqp, &sessions).await;
    results.stop();
    amqp.close().await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_offline_past_token_expiry_imports_each_session_once_after_restart() {
    let world = World::new("rel-offline").await;
    test_logs();
    let receiver = world.start_receiver(false).await;
    let issuer = world.start_issuer().await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let tap = tap_tokens(&world, &amqp).await;

    // Before the outage: a few sessions go through normally.
    let before = publish_sessions(&world, &amqp, 4, "before").await;
    wait_for(
        "the first sessions' results",
        Duration::from_secs(20),
        || async {
            let reported = sessions_with_results(&results);
            before.iter().all(|s| reported.contains(s)).then_some(())
        },
    )
    .await;
    receiver.stop().await.unwrap();
    let delivered = amqp.drain(&tap).await;
    assert_eq!(delivered.len(), before.len(), "one token per session");

    // The receiver is offline: tokens for new sessions wait in its queue and expire there.
    let during = publish_sessions(&world, &amqp, 6, "during").await;
    let tokens_queue = world.names.receiver_tokens_queue();
    wait_for(
        "tokens waiting for the receiver",
        Duration::from_secs(20),
        || async { (amqp.depth(&tokens_queue).await as usize == during.len()).then_some(()) },
    )
    .await;
    world.control.advance_clock(2 * 3600).await.unwrap();
    // And the tokens of sessions imported before the outage arrive again (an upstream redelivery), now expired too.
    for got in &delivered {
        republish(
            &amqp,
            &world.names.tokens_exchange(),
            &Names::token_key(&world.partner_app.application_id),
            got,
        )
        .await;
    }

    // The receiver comes back.
    let receiver = world.start_receiver(false).await;
    let all: Vec<String> = before.iter().chain(&during).cloned().collect();
    wait_settled(
        &world,
        &amqp,
        &results,
        &all,
        Duration::from_secs(40),
        || async { vec![issuer.metrics().encode(), receiver.metrics().encode()] },
    )
    .await;
    let reshares = metric(
        &receiver.metrics().encode(),
        "partner_bridge_reshare_requests_total{direction=\"sent\"}",
    );
    assert_eq!(
        reshares,
        during.len() as f64,
        "one reshare per expired token of a session not yet imported, none for imported ones"
    );
    assert_eq!(
        world.control.stats().await.unwrap().shares,
        (before.len() + 2 * during.len()) as u64,
        "every session minted once, plus one fresh token per expired one"
    );
    let replayed: Vec<_> = results
        .results()
        .into_iter()
        .filter(|r| before.contains(&r.source_session_id))
        .map(|r| r.outcome)
        .collect();
    assert_eq!(
        replayed
            .iter()
            .filter(|o| **o == ImportOutcome::Duplicate)
            .count(),
        before.len(),
        "the tokens redelivered after the outage are duplicates: {replayed:?}"
    );
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    assert_exactly_once(&world, &amqp, &all).await;
    results.stop();
    amqp.close().await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_redelivered_events_and_tokens_import_each_session_once() {
    let world = World::new("rel-dup").await;
    test_logs();
    let receiver = world.start_receiver(false).await;
    let issuer = world.start_issuer().await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let tap = tap_tokens(&world, &amqp).await;
    let n = 8;

    // Every event three times, back to back so the copies are in flight together: the same event twice (an
    // at-least-once publisher retrying) and a second event for the same session (another source reporting it).
    let created = create_sessions(&world, n, "dup").await;
    let mut originals = Vec::new();
    for (id, kind, status) in &created {
        let event = world.event(id, *kind, status);
        world.publish_event(&amqp, &event).await;
        world.publish_event(&amqp, &event).await;
        world
            .publish_event(&amqp, &world.event(id, *kind, status))
            .await;
        originals.push(event);
    }
    let sessions: Vec<String> = created.iter().map(|(id, _, _)| id.clone()).collect();
    let events_metric = |outcome: &str| {
        metric(
            &issuer.metrics().encode(),
            &format!("partner_bridge_events_total{{source=\"amqp\",outcome=\"{outcome}\"}}"),
        )
    };
    wait_for("every event handled", Duration::from_secs(30), || async {
        (events_metric("processed") + events_metric("duplicate") >= (3 * n) as f64).then_some(())
    })
    .await;
    assert_eq!(events_metric("processed"), n as f64, "one mint per session");
    wait_for(
        "every session's result",
        Duration::from_secs(20),
        || async {
            let reported = sessions_with_results(&results);
            sessions.iter().all(|s| reported.contains(s)).then_some(())
        },
    )
    .await;

    // The tokens are handed over again, twice, exactly as they were (a broker redelivery after a lost ack).
    let tokens = amqp.drain(&tap).await;
    let minted: BTreeSet<String> = tokens
        .iter()
        .map(|t| t.json()["source_session_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(tokens.len(), n, "one token per session");
    assert_eq!(minted, sessions.iter().cloned().collect());
    for _ in 0..2 {
        for got in &tokens {
            republish(
                &amqp,
                &world.names.tokens_exchange(),
                &Names::token_key(&world.partner_app.application_id),
                got,
            )
            .await;
        }
    }
    // And the original events arrive once more after everything is done.
    for event in &originals {
        world.publish_event(&amqp, event).await;
    }
    let all = results
        .wait_count(3 * n, Duration::from_secs(20))
        .await
        .len();
    assert_eq!(all, 3 * n, "one result per token delivery");
    wait_for(
        "the late events handled",
        Duration::from_secs(20),
        || async { (events_metric("duplicate") >= (3 * n) as f64).then_some(()) },
    )
    .await;
    wait_settled(
        &world,
        &amqp,
        &results,
        &sessions,
        Duration::from_secs(20),
        || async { vec![issuer.metrics().encode(), receiver.metrics().encode()] },
    )
    .await;

    let outcomes: BTreeMap<String, Vec<ImportOutcome>> =
        results
            .results()
            .into_iter()
            .fold(BTreeMap::new(), |mut map, r| {
                map.entry(r.source_session_id).or_default().push(r.outcome);
                map
            });
    for id in &sessions {
        let mut got = outcomes.get(id).cloned().unwrap_or_default();
        got.sort_by_key(|o| o.as_str());
        assert_eq!(
            got,
            vec![
                ImportOutcome::Duplicate,
                ImportOutcome::Duplicate,
                ImportOutcome::Imported
            ],
            "results of session {id}"
        );
    }
    let stats = world.control.stats().await.unwrap();
    assert_eq!(stats.shares, n as u64, "duplicates never mint again");
    assert_eq!(
        stats.rejections.get(codes::ALREADY_IMPORTED),
        None,
        "redelivered tokens are answered from the receiver's ledger, without asking Didit"
    );
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    assert_exactly_once(&world, &amqp, &sessions).await;
    results.stop();
    amqp.close().await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_messages_in_flight_exits_zero_and_loses_nothing() {
    let world = World::new("rel-term").await;
    test_logs();
    world
        .control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::All,
            latency_ms: 300,
            ..FaultSettings::default()
        })
        .await
        .unwrap();
    let grace_s = 5;
    let (config, admin) = binary_config(&world, 4, grace_s);
    let log = world.dir.path().join("bridge.log");
    let mut bridge = Binary::start(&config, admin, log.clone()).await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let n = 20;
    let sessions = publish_sessions(&world, &amqp, n, "term").await;

    showing_log(&log, async {
        wait_for(
            "imports under way with more in flight",
            Duration::from_secs(30),
            || async {
                let busy = in_flight(&bridge.metrics().await) > 0.0;
                (busy && imported_sessions(&world).await >= 4).then_some(())
            },
        )
        .await;
    })
    .await;
    bridge.terminate();
    let status = bridge
        .exited_within(Duration::from_secs(grace_s + 10))
        .await;
    assert!(
        status.success(),
        "exit after SIGTERM with work in flight: {status}\n{}",
        log_tail(&log)
    );
    let at_stop = imported_sessions(&world).await;
    assert!(at_stop < n, "SIGTERM came after the stream ended");
    // The work in flight finished within the grace instead of being abandoned (app and consumer say so if not).
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !logged.contains("grace period"),
        "in-flight work did not drain within shutdown.grace_s\n{}",
        log_tail(&log)
    );

    let bridge = Binary::start(&config, admin, log.clone()).await;
    showing_log(
        &log,
        wait_settled(
            &world,
            &amqp,
            &results,
            &sessions,
            Duration::from_secs(40),
            || async { vec![bridge.metrics().await] },
        ),
    )
    .await;
    let mut bridge = bridge;
    bridge.terminate();
    let status = bridge
        .exited_within(Duration::from_secs(grace_s + 10))
        .await;
    assert!(status.success(), "exit after SIGTERM: {status}");
    showing_log(&log, assert_exactly_once(&world, &amqp, &sessions)).await;
    results.stop();
    amqp.close().await;
    world.cleanup().await;
}

/// `/readyz` of an in-process bridge: status and body.
async fn readyz(http: &reqwest::Client, running: &Running) -> (u16, String) {
    get(http, running.admin_addr(), "/readyz")
        .await
        .expect("the admin server answers")
}

/// Polls `/readyz` until `want` holds for (status, body).
async fn wait_readyz(
    http: &reqwest::Client,
    running: &Running,
    what: &str,
    want: impl Fn(u16, &str) -> bool,
) -> String {
    let last = std::sync::Mutex::new(String::new());
    let waited = AssertUnwindSafe(wait_for(what, Duration::from_secs(20), || async {
        let (status, body) = readyz(http, running).await;
        if want(status, &body) {
            return Some(body);
        }
        *last.lock().unwrap() = format!("{status} {body}");
        None
    }))
    .catch_unwind()
    .await;
    match waited {
        Ok(body) => body,
        Err(panic) => {
            eprintln!("last /readyz answer: {}", last.lock().unwrap());
            std::panic::resume_unwind(panic)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_start_broker_loss_and_shutdown() {
    let world = World::new("rel-ready").await;
    test_logs();
    let http = http();
    let proxy = Proxy::start().await;
    proxy.refuse(true);
    // Didit's timeout well above the slow share below, so that share is still running when the drain starts.
    let toml = tuned(&both_toml(&world), &proxy.amqp_url(), 4);
    let config = world.config(&set_key(&toml, "timeout_ms", "8000"));
    let running = app::start(config, CancellationToken::new())
        .await
        .expect("the bridge starts without a broker");

    // Start, broker unreachable: alive, not ready, and the reason names the broker connection.
    let (status, body) = readyz(&http, &running).await;
    assert_eq!(status, 503, "ready without a broker: {body}");
    assert!(body.contains("amqp:"), "no AMQP reason: {body}");
    assert_eq!(
        get(&http, running.admin_addr(), "/livez")
            .await
            .map(|r| r.0),
        Some(200)
    );
    wait_readyz(&http, &running, "a refused connection reported", |s, b| {
        s == 503 && b.contains("cannot connect")
    })
    .await;

    // The broker becomes reachable.
    proxy.refuse(false);
    wait_readyz(&http, &running, "ready once connected", |s, _| s == 200).await;

    // The broker is lost (connections cut, new ones refused).
    proxy.refuse(true);
    proxy.cut();
    let body = wait_readyz(&http, &running, "not ready after broker loss", |s, b| {
        s == 503 && b.contains("amqp:")
    })
    .await;
    assert!(
        body.lines().any(|l| l.starts_with("amqp:")),
        "reasons do not name the AMQP connection: {body}"
    );
    assert!(
        !body.contains("guest:guest"),
        "the broker password leaked into /readyz: {body}"
    );

    // It comes back.
    proxy.refuse(false);
    wait_readyz(&http, &running, "ready again after reconnecting", |s, _| {
        s == 200
    })
    .await;
    assert!(
        metric(
            &running.metrics().encode(),
            "partner_bridge_amqp_reconnects_total"
        ) >= 1.0
    );

    // Shutdown with a share in flight (Didit answers slowly): draining is not ready, and says so.
    world
        .control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::Share,
            latency_ms: 2000,
            ..FaultSettings::default()
        })
        .await
        .unwrap();
    let amqp = Amqp::connect().await;
    let session = publish_sessions(&world, &amqp, 1, "ready").await;
    wait_for("a share in flight", Duration::from_secs(20), || async {
        (metric(
            &running.metrics().encode(),
            "partner_bridge_in_flight{pipeline=\"issuer_onboarding\"}",
        ) >= 1.0)
            .then_some(())
    })
    .await;
    let admin = running.admin_addr();
    running.shutdown_token().cancel();
    let stopped = tokio::spawn(running.wait());
    wait_for(
        "not ready while draining",
        Duration::from_secs(5),
        || async {
            let (status, body) = get(&http, admin, "/readyz").await?;
            (status == 503 && body.contains("draining")).then_some(())
        },
    )
    .await;
    stopped.await.unwrap().unwrap();
    assert!(
        get(&http, admin, "/readyz").await.is_none(),
        "the admin server stops last, after the drain"
    );
    // The share in flight finished during the drain: its token waits for the (stopped) receiver and the event
    // was acked, nothing lost and nothing to do twice.
    assert_eq!(world.control.stats().await.unwrap().shares, 1);
    let tokens = amqp.drain(&world.names.receiver_tokens_queue()).await;
    assert_eq!(
        tokens.len(),
        1,
        "the drained share's token is on the broker"
    );
    assert_eq!(tokens[0].json()["source_session_id"], session[0].as_str());
    assert_eq!(amqp.depth(&world.names.issuer_onboarding_queue()).await, 0);
    amqp.close().await;
    world.cleanup().await;
}
