//! The webhook intake at its failure edges (issue #8, item 1): a bridge killed between a delivery's claim and its
//! event's confirm, Didit's retry of an accepted delivery, one capture under two signature headers, a capture sent
//! again with a fresh `X-Timestamp`, and signed bodies whose fields do not parse. Plus the ledger's delivery keys
//! (pending → final) on both backends, and a version-1 ledger opening with this binary.
//!
//! The kill test runs the real binary (both roles) with its AMQP connections through a TCP proxy that freezes, so
//! the delivery really hangs waiting for its confirm when the process dies. The others run in-process. Whether a
//! second event was published is decided by a marker: a delivery for another session posted afterwards, whose event
//! the onboarding exchange routes after any earlier one from the same intake.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use partner_bridge::app::Running;
use partner_bridge::didit::wire::SessionKind;
use partner_bridge::envelope::ImportOutcome;
use partner_bridge::ledger::{DeliveryClaim, Ledger};
use partner_bridge::secret::SecretUrl;
use serde_json::{Value, json};

use crate::support::bridge::{Amqp, Collector, World, metric_of};
use crate::support::faults::*;
use crate::support::pg_ledger::{PgSchema, admin};
use crate::support::proxy::Proxy;
use crate::support::t_receiver::Tap;
use crate::support::wait_for;
use crate::support::webhooks::{self, Sig};

const WAIT: Duration = Duration::from_secs(30);

fn requests(outcome: &str) -> String {
    format!("partner_bridge_webhook_requests_total{{outcome=\"{outcome}\"}}")
}

async fn post_in_process(
    running: &Running,
    bytes: &[u8],
    headers: &[(&'static str, String)],
) -> (u16, Value) {
    webhooks::post(
        &webhooks::patient_http(),
        running.webhook_addr().expect("the intake is configured"),
        bytes,
        headers,
    )
    .await
    .expect("the intake answers")
}

/// Events the onboarding exchange routed for `session`.
fn events_for(tap: &Tap, session: &str) -> usize {
    tap.all()
        .iter()
        .filter(|t| t.got.json()["session_id"] == session)
        .count()
}

/// Posts a fresh delivery for a new session and waits until its event was routed: every event published before it
/// by this intake has been routed by then too.
async fn marker(world: &World, running: &Running, tap: &Tap) -> String {
    let session = world.session(SessionKind::User, "Approved", "marker").await;
    let body = webhooks::body(&session, "Approved", Utc::now().timestamp());
    let (status, answer) = post_in_process(
        running,
        &webhooks::bytes_of(&body),
        &webhooks::headers(&body, Sig::V2, None),
    )
    .await;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (200, Some("accepted"))
    );
    wait_for("the marker's event", WAIT, || async {
        (events_for(tap, &session) == 1).then_some(())
    })
    .await;
    session
}

/// Both roles in-process with the intake, a results collector, and a tap on the onboarding exchange.
async fn in_process(world: &World) -> (Running, Tap, Collector) {
    let running = world
        .start(world.config(&webhooks::both_with_intake(world)))
        .await;
    let tap = Tap::start(&world.names.onboarding_exchange(), "onboarding.finished").await;
    let results = Collector::start(&world.results_queue()).await;
    (running, tap, results)
}

/// The import.result of `session` says `imported` and names the imported session.
fn assert_result_names_import(results: &Collector, session: &str) {
    let imported: Vec<_> = results
        .results()
        .into_iter()
        .filter(|r| r.source_session_id == session && r.outcome == ImportOutcome::Imported)
        .collect();
    assert_eq!(imported.len(), 1, "one `imported` result for {session}");
    assert!(
        imported[0]
            .imported_session_id
            .as_deref()
            .is_some_and(|id| !id.is_empty()),
        "the result names the imported session: {:?}",
        imported[0]
    );
}

// ---- the kill between claim and confirm ----------------------------------------------------------------------

/// A delivery claimed, its event published into a frozen broker connection, the bridge SIGKILLed while the request
/// hangs for the confirm; after a restart, Didit's retry of the very same bytes and headers is accepted (200), and
/// the session ends imported exactly once with its `import.result`.
///
/// On the old code the key was final from the claim on, so this retry got `401 replay` and the onboarding was lost
/// (seen failing: `assertion failed … left: (401, Some("replay"))`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_killed_before_the_confirm_takes_the_retried_delivery_and_imports_once() {
    let world = World::new("wh-kill").await;
    test_logs();
    let proxy = Proxy::start().await;
    // The confirm timeout outlasts the test's wait, so the delivery hangs until the kill.
    let (config, admin, intake) =
        webhooks::binary_config_with_intake(&world, &proxy.amqp_url(), 60_000);
    let log = world.dir.path().join("bridge.log");
    let mut bridge = Binary::start(&config, admin, log.clone()).await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let session = world
        .session(SessionKind::User, "Approved", "hook-kill")
        .await;
    let body = webhooks::body(&session, "Approved", Utc::now().timestamp());
    let bytes = webhooks::bytes_of(&body);
    let headers = webhooks::headers(&body, Sig::V2, None);
    let http = webhooks::patient_http();

    proxy.freeze(true);
    let hanging = tokio::spawn({
        let (http, bytes, headers) = (http.clone(), bytes.clone(), headers.clone());
        async move { webhooks::post(&http, intake, &bytes, &headers).await }
    });
    let ledger_file = webhooks::issuer_ledger_file(&world);
    showing_log(
        &log,
        wait_for("the delivery key to be claimed", WAIT, || async {
            (webhooks::stored_delivery_keys(&ledger_file) >= 1).then_some(())
        }),
    )
    .await;
    assert!(
        !hanging.is_finished(),
        "the delivery waits for the broker's confirm"
    );
    bridge.child.kill().await.expect("SIGKILL the bridge");
    let first = hanging.await.expect("the request task");
    assert!(
        !matches!(first, Ok((200, _))),
        "the killed bridge cannot have answered 200: {first:?}"
    );
    proxy.freeze(false);

    let bridge = Binary::start(&config, admin, log.clone()).await;
    // Didit retries the delivery it got no answer for: the same bytes, the same headers.
    let (status, answer) = showing_log(&log, async {
        webhooks::post(&http, intake, &bytes, &headers)
            .await
            .expect("the restarted intake answers")
    })
    .await;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (200, Some("accepted")),
        "{answer}"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("an earlier attempt left it pending"),
        "the retry took over the key the killed process left pending\n{}",
        log_tail(&log)
    );
    let sessions = vec![session.clone()];
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
    // A second retry now finds the key final.
    let (status, answer) = webhooks::post(&http, intake, &bytes, &headers)
        .await
        .unwrap();
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (200, Some("duplicate"))
    );
    let mut bridge = bridge;
    bridge.terminate();
    let exit = bridge.exited_within(Duration::from_secs(20)).await;
    assert!(exit.success(), "exit after SIGTERM: {exit}");
    showing_log(&log, assert_exactly_once(&world, &amqp, &sessions)).await;
    assert_result_names_import(&results, &session);
    results.stop();
    amqp.close().await;
    world.cleanup().await;
}

/// The same delivery twice at once: while the first waits for its confirm (the broker connection frozen), the
/// second finds the key pending under a live lease and, after a short wait, answers 503 `busy` (Didit retries)
/// without publishing; once the broker answers, the first is accepted and a later retry is a `duplicate`. On the old
/// code the second was answered `401 replay` while the first could still fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_already_being_queued_is_answered_503_busy() {
    let world = World::new("wh-busy").await;
    let proxy = Proxy::start().await;
    let toml = set_key(
        &webhooks::both_with_intake(&world),
        "url",
        &format!("\"{}\"", proxy.amqp_url()),
    );
    let toml = set_key(&toml, "confirm_timeout_ms", "60000");
    let running = world.start(world.config(&toml)).await;
    let tap = Tap::start(&world.names.onboarding_exchange(), "onboarding.finished").await;
    let results = Collector::start(&world.results_queue()).await;
    let session = world
        .session(SessionKind::User, "Approved", "hook-busy")
        .await;
    let body = webhooks::body(&session, "Approved", Utc::now().timestamp());
    let bytes = webhooks::bytes_of(&body);
    let headers = webhooks::headers(&body, Sig::V2, None);
    let intake = running.webhook_addr().unwrap();
    let http = webhooks::patient_http();

    proxy.freeze(true);
    let first = tokio::spawn({
        let (http, bytes, headers) = (http.clone(), bytes.clone(), headers.clone());
        async move { webhooks::post(&http, intake, &bytes, &headers).await }
    });
    let ledger_file = webhooks::issuer_ledger_file(&world);
    wait_for("the first delivery's key", WAIT, || async {
        (webhooks::stored_delivery_keys(&ledger_file) >= 1).then_some(())
    })
    .await;
    let (status, answer) = webhooks::post(&http, intake, &bytes, &headers)
        .await
        .unwrap();
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (503, Some("busy")),
        "{answer}"
    );
    assert!(
        !first.is_finished(),
        "the first still waits for its confirm"
    );
    proxy.freeze(false);
    let (status, answer) = first.await.unwrap().unwrap();
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (200, Some("accepted")),
        "{answer}"
    );
    let (status, answer) = post_in_process(&running, &bytes, &headers).await;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (200, Some("duplicate"))
    );
    let marker = marker(&world, &running, &tap).await;
    assert_eq!(events_for(&tap, &session), 1);
    assert_eq!(metric_of(&running, &requests("busy")), 1.0);

    world.wait_imports(2, WAIT).await;
    wait_for("both results", WAIT, || async {
        (sessions_with_results(&results).len() == 2).then_some(())
    })
    .await;
    running.stop().await.unwrap();
    let amqp = Amqp::connect().await;
    assert_exactly_once(&world, &amqp, &[session.clone(), marker]).await;
    assert_result_names_import(&results, &session);
    tap_done(tap, results, amqp, world).await;
}

// ---- duplicates and replays ------------------------------------------------------------------------------------

/// Didit's retry of a delivery whose event was confirmed gets 200 `duplicate` and publishes nothing; the session is
/// imported once. On the old code the retry got `401 replay`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_confirmed_delivery_is_a_200_duplicate_and_publishes_nothing() {
    let world = World::new("wh-dup").await;
    let (running, tap, results) = in_process(&world).await;
    let session = world
        .session(SessionKind::User, "Approved", "hook-dup")
        .await;
    let body = webhooks::body(&session, "Approved", Utc::now().timestamp());
    let bytes = webhooks::bytes_of(&body);
    let headers = webhooks::headers(&body, Sig::V2, None);

    let (status, answer) = post_in_process(&running, &bytes, &headers).await;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (200, Some("accepted"))
    );
    for _ in 0..2 {
        let (status, answer) = post_in_process(&running, &bytes, &headers).await;
        assert_eq!(
            (status, answer["outcome"].as_str()),
            (200, Some("duplicate")),
            "{answer}"
        );
    }
    let marker = marker(&world, &running, &tap).await;
    assert_eq!(
        events_for(&tap, &session),
        1,
        "one event for three deliveries"
    );
    assert_eq!(metric_of(&running, &requests("duplicate")), 2.0);
    assert_eq!(metric_of(&running, &requests("accepted")), 2.0);

    world.wait_imports(2, WAIT).await;
    wait_for("both results", WAIT, || async {
        (sessions_with_results(&results).len() == 2).then_some(())
    })
    .await;
    running.stop().await.unwrap();
    let amqp = Amqp::connect().await;
    assert_exactly_once(&world, &amqp, &[session.clone(), marker]).await;
    assert_result_names_import(&results, &session);
    tap_done(tap, results, amqp, world).await;
}

/// One capture sent with `X-Signature-V2`, then with `X-Signature` only, then with `X-Signature-Simple` only (every
/// signature accepted): one delivery, one event. On the old code each header was a replay key of its own, so the
/// capture was published three times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_capture_under_different_signature_headers_is_taken_in_once() {
    let world = World::new("wh-sigs").await;
    let (running, tap, results) = in_process(&world).await;
    let session = world
        .session(SessionKind::User, "Approved", "hook-sigs")
        .await;
    let body = webhooks::body(&session, "Approved", Utc::now().timestamp());
    let bytes = webhooks::bytes_of(&body);

    let mut outcomes = Vec::new();
    for sig in [Sig::V2, Sig::Raw, Sig::Simple] {
        let (status, answer) =
            post_in_process(&running, &bytes, &webhooks::headers(&body, sig, None)).await;
        outcomes.push((status, answer["outcome"].as_str().unwrap_or("").to_string()));
    }
    assert_eq!(
        outcomes,
        [
            (200, "accepted".to_string()),
            (200, "duplicate".to_string()),
            (200, "duplicate".to_string())
        ]
    );
    let marker = marker(&world, &running, &tap).await;
    assert_eq!(events_for(&tap, &session), 1, "one capture, one event");

    world.wait_imports(2, WAIT).await;
    wait_for("both results", WAIT, || async {
        (sessions_with_results(&results).len() == 2).then_some(())
    })
    .await;
    running.stop().await.unwrap();
    let amqp = Amqp::connect().await;
    assert_exactly_once(&world, &amqp, &[session.clone(), marker]).await;
    assert_result_names_import(&results, &session);
    tap_done(tap, results, amqp, world).await;
}

/// Freshness comes only from the signed body. A captured body without `timestamp` — its signed `created_at` ten
/// minutes old, or no time at all — sent again with a fresh `X-Timestamp` is refused `stale`; so is a body whose
/// `X-Timestamp` disagrees with its signed `timestamp`. On the old code the first two were accepted (the header
/// stood in for the missing body timestamp).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_sent_again_with_a_fresh_x_timestamp_is_refused() {
    let world = World::new("wh-fresh").await;
    let (running, tap, results) = in_process(&world).await;
    let session = world
        .session(SessionKind::User, "Approved", "hook-fresh")
        .await;
    let now = Utc::now().timestamp();

    let mut old = webhooks::body(&session, "Approved", now - 600);
    old.as_object_mut().unwrap().remove("timestamp");
    let mut timeless = webhooks::body(&session, "Approved", now);
    timeless.as_object_mut().unwrap().remove("timestamp");
    timeless.as_object_mut().unwrap().remove("created_at");
    for (what, capture) in [("old created_at", &old), ("no time at all", &timeless)] {
        for sig in [Sig::V2, Sig::Raw] {
            let (status, answer) = post_in_process(
                &running,
                &webhooks::bytes_of(capture),
                &webhooks::headers(capture, sig, Some(now)),
            )
            .await;
            assert_eq!(
                (status, answer["outcome"].as_str()),
                (401, Some("stale")),
                "{what}, {sig:?}: {answer}"
            );
        }
    }
    // A signed timestamp ten minutes old with a fresh header: the header is not what counts.
    let stale = webhooks::body(&session, "Approved", now - 600);
    let (status, answer) = post_in_process(
        &running,
        &webhooks::bytes_of(&stale),
        &webhooks::headers(&stale, Sig::V2, Some(now)),
    )
    .await;
    assert_eq!(status, 401, "{answer}");
    assert_eq!(metric_of(&running, &requests("stale")), 4.0);
    assert_eq!(metric_of(&running, &requests("accepted")), 0.0);

    let marker = marker(&world, &running, &tap).await;
    assert_eq!(
        events_for(&tap, &session),
        0,
        "nothing refused was published"
    );
    world.wait_imports(1, WAIT).await;
    wait_for("the marker's result", WAIT, || async {
        (sessions_with_results(&results).len() == 1).then_some(())
    })
    .await;
    running.stop().await.unwrap();
    let amqp = Amqp::connect().await;
    assert_exactly_once(&world, &amqp, &[marker]).await;
    tap_done(tap, results, amqp, world).await;
}

/// A verified body whose fields do not parse is answered 400 naming the field, never 200. On the old code a field of
/// the wrong type made the whole body parse as empty, which was answered 200 `unsupported_type`, and a missing
/// field was not named in a field of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_body_with_a_field_that_does_not_parse_is_a_400_naming_it() {
    let world = World::new("wh-fields").await;
    let (running, tap, results) = in_process(&world).await;
    let session = world
        .session(SessionKind::User, "Approved", "hook-fields")
        .await;
    let now = Utc::now().timestamp();
    let good = webhooks::body(&session, "Approved", now);
    let cases: [(&str, Value); 7] = [
        ("session_id", Value::Null),
        ("session_id", json!(42)),
        ("status", json!(1)),
        ("status", json!("Finished-ish")),
        ("session_kind", json!("robot")),
        ("created_at", json!("yesterday")),
        ("webhook_type", json!(["status.updated"])),
    ];
    for (field, value) in cases {
        let mut body = good.clone();
        if value.is_null() {
            body.as_object_mut().unwrap().remove(field);
        } else {
            body[field] = value.clone();
        }
        let (status, answer) = post_in_process(
            &running,
            &webhooks::bytes_of(&body),
            &webhooks::headers(&body, Sig::V2, None),
        )
        .await;
        assert_eq!(
            (status, answer["outcome"].as_str(), answer["field"].as_str()),
            (400, Some("malformed"), Some(field)),
            "{field} = {value}: {answer}"
        );
        assert!(
            answer["detail"].as_str().unwrap_or("").contains(field),
            "{answer}"
        );
    }
    assert_eq!(metric_of(&running, &requests("malformed")), 7.0);
    let marker = marker(&world, &running, &tap).await;
    assert_eq!(events_for(&tap, &session), 0);
    world.wait_imports(1, WAIT).await;
    wait_for("the marker's result", WAIT, || async {
        (sessions_with_results(&results).len() == 1).then_some(())
    })
    .await;
    running.stop().await.unwrap();
    let amqp = Amqp::connect().await;
    assert_exactly_once(&world, &amqp, &[marker]).await;
    tap_done(tap, results, amqp, world).await;
}

async fn tap_done(tap: Tap, results: Collector, amqp: Amqp, world: World) {
    drop(tap);
    results.stop();
    amqp.close().await;
    world.cleanup().await;
}

// ---- the ledger's delivery keys ----------------------------------------------------------------------------------

const LEASE: Duration = Duration::from_secs(30);

/// Pending → final, on one backend: a new key is held by its claimant (another attempt is busy), is taken over once
/// the lease lapses, is released only by its holder, and is final once confirmed; a stale delivery never records a
/// first sighting.
async fn delivery_keys_are_pending_until_confirmed(l: &Ledger) {
    let t = Utc::now();
    let claim = |key: &'static str, holder: &'static str, at, first| {
        let l = l.clone();
        async move {
            l.claim_webhook(key, holder, LEASE, at, first)
                .await
                .unwrap()
        }
    };
    assert_eq!(claim("k", "a", t, true).await, DeliveryClaim::Fresh);
    assert!(matches!(
        claim("k", "b", t, true).await,
        DeliveryClaim::Busy { .. }
    ));
    assert_eq!(claim("k", "a", t, true).await, DeliveryClaim::Retaken);
    // A release by someone else changes nothing; the lapsed lease is taken over.
    l.release_webhook("k", "b").await.unwrap();
    let later = t + TimeDelta::seconds(31);
    assert_eq!(claim("k", "b", later, false).await, DeliveryClaim::Retaken);
    l.confirm_webhook("k", later).await.unwrap();
    assert_eq!(claim("k", "c", later, true).await, DeliveryClaim::Done);
    assert_eq!(claim("k", "c", later, false).await, DeliveryClaim::Done);
    // A final key is not released.
    l.release_webhook("k", "b").await.unwrap();
    assert_eq!(claim("k", "c", later, true).await, DeliveryClaim::Done);
    // Unknown and stale: nothing is recorded.
    assert_eq!(claim("new", "a", t, false).await, DeliveryClaim::Unknown);
    assert_eq!(claim("new", "a", t, true).await, DeliveryClaim::Fresh);
    // A holder's release forgets the key.
    l.release_webhook("new", "a").await.unwrap();
    assert_eq!(claim("new", "b", t, false).await, DeliveryClaim::Unknown);
    // Pending keys with a live lease survive pruning; final ones go.
    assert_eq!(claim("live", "a", t, true).await, DeliveryClaim::Fresh);
    let pruned = l.prune(t + TimeDelta::seconds(1)).await.unwrap();
    assert_eq!(pruned, 1, "the final key only");
    assert!(matches!(
        claim("live", "b", t, true).await,
        DeliveryClaim::Busy { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_delivery_keys_are_pending_until_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let url = SecretUrl::new(format!(
        "sqlite://{}",
        dir.path().join("ledger.sqlite3").display()
    ));
    let l = Ledger::open(&url).await.unwrap();
    delivery_keys_are_pending_until_confirmed(&l).await;
    // The process dies holding a key: its next run voids the lease, and the retry takes the key over at once.
    let held = l
        .claim_webhook("held", "dead", LEASE, Utc::now(), true)
        .await
        .unwrap();
    assert_eq!(held, DeliveryClaim::Fresh);
    drop(l);
    let l = Ledger::open(&url).await.unwrap();
    assert!(l.void_leases_of_previous_run().await.unwrap() >= 1);
    assert_eq!(
        l.claim_webhook("held", "next", LEASE, Utc::now(), true)
            .await
            .unwrap(),
        DeliveryClaim::Retaken
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_delivery_keys_are_pending_until_confirmed() {
    let schema = PgSchema::create("wh").await;
    let l = Ledger::open(&SecretUrl::new(schema.url())).await.unwrap();
    delivery_keys_are_pending_until_confirmed(&l).await;
    drop(l);
}

/// A ledger written by version 1 opens with this binary (schema 2): its delivery keys, which cannot say whether
/// their event was confirmed, come back pending without a holder, so a retry publishes again instead of being lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_ledger_migrates_with_its_delivery_keys_pending() {
    use partner_bridge::ledger::{postgres, sqlite};
    let t = Utc::now();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite3");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(sqlite::SCHEMA_V1).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO webhook_deliveries (key, seen_at) VALUES ('v1-key', ?1)",
            [t.timestamp_millis()],
        )
        .unwrap();
    }
    let l = Ledger::open(&SecretUrl::new(format!("sqlite://{}", path.display())))
        .await
        .expect("a v1 file opens");
    let claim = l
        .claim_webhook("v1-key", "a", LEASE, t, false)
        .await
        .unwrap();
    assert_eq!(claim, DeliveryClaim::Retaken);
    drop(l);
    let version: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, sqlite::SCHEMA_VERSION);

    let schema = PgSchema::create("wh").await;
    let pg = admin().await.expect("postgres at 127.0.0.1:5432");
    pg.batch_execute(&format!(
        "SET search_path TO {s};
             CREATE TABLE ledger_meta (key TEXT NOT NULL PRIMARY KEY, value TEXT NOT NULL);
             {v1}
             INSERT INTO ledger_meta (key, value) VALUES ('schema_version', '1');
             INSERT INTO webhook_deliveries (key, seen_at) VALUES ('v1-key', {ms});",
        s = schema.schema,
        v1 = postgres::SCHEMA_V1,
        ms = t.timestamp_millis()
    ))
    .await
    .unwrap();
    let l = Ledger::open(&SecretUrl::new(schema.url()))
        .await
        .expect("a v1 database opens");
    assert_eq!(
        l.claim_webhook("v1-key", "a", LEASE, t, false)
            .await
            .unwrap(),
        DeliveryClaim::Retaken
    );
    drop(l);
    let version: String = pg
        .query_one(
            &format!(
                "SELECT value FROM {}.ledger_meta WHERE key = 'schema_version'",
                schema.schema
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, postgres::SCHEMA_VERSION.to_string());
}
