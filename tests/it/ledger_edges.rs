//! Guarantees at the ledger's failure edges (issue #8, items 4 and 5; DESIGN.md §5 and §11): an unavailable ledger
//! pauses the pipelines — nothing dead-lettered, no delivery attempt used up — and they resume by themselves; a
//! SIGKILLed replica's sessions are finished by its peer on the same PostgreSQL ledger; one `state_dir`, one process.
//!
//! The faults are real: a TCP relay in front of PostgreSQL that freezes (a hung server), a second SQLite connection
//! holding the write lock of the receiver's ledger file (root ignores file modes, a lock it cannot ignore), SIGKILL of
//! the real binary, and the real binary started twice on one directory. Moments are chosen by the sandbox's import
//! count; every wait polls with a deadline. Each test ends with the exactly-once check (one import per session in the
//! sandbox, nothing left in a work queue, nothing dead-lettered) and, where results are involved, an `import.result`
//! naming each session's imported session.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use partner_bridge::app::Running;
use partner_bridge::envelope::ImportOutcome;
use partner_bridge::sandbox::{FaultEndpoint, FaultSettings};

use crate::support::bridge::{Amqp, Collector, World};
use crate::support::faults::*;
use crate::support::pg_ledger::{PgSchema, postgres_address};
use crate::support::proxy::Proxy;
use crate::support::{amqp_url, wait_for};

/// Ledger limits for these tests: a call gives up after 1 s, a lease lasts 3 s unless renewed.
const LEDGER_TIMEOUT_MS: u64 = 1000;
const LEASE_MS: u64 = 3000;

/// `toml` (a World role's) tuned for fault tests, with a retry budget (3 attempts × 1 s hold + 0.3 s delay) far
/// shorter than the ledger outages below, and `ledger` (a `[ledger]` section, or empty) appended.
fn edge_toml(toml: &str, ledger: &str) -> String {
    let toml = tuned(toml, &amqp_url(), 4);
    let toml = set_key(&toml, "hold_max_s", "1");
    let toml = set_key(&toml, "max_attempts", "3");
    format!("{toml}{ledger}")
}

/// Sandbox latency, so that a stream of sessions lasts long enough to be interrupted.
async fn slow_didit(world: &World, latency_ms: u64) {
    world
        .control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::All,
            latency_ms,
            ..FaultSettings::default()
        })
        .await
        .unwrap();
}

/// Whether an exposition says some pipeline is paused because of the ledger.
fn paused_for_ledger(exposition: &str) -> bool {
    exposition.lines().any(|l| {
        l.starts_with("partner_bridge_paused{")
            && l.contains("reason=\"ledger\"")
            && l.ends_with(" 1")
    })
}

/// `/readyz`'s reasons when it would answer 503 because of the ledger (its own part or a ledger pause).
fn ledger_reasons(running: &Running) -> Option<Vec<String>> {
    let reasons = running.health().check().err()?;
    reasons
        .iter()
        .any(|r| r.contains("ledger"))
        .then_some(reasons)
}

/// Every session has an `import.result` (imported, or duplicate after a redelivery) naming its imported session.
fn assert_results_name_imports(results: &Collector, sessions: &[String]) {
    let named: BTreeSet<String> = results
        .results()
        .into_iter()
        .filter(|r| {
            matches!(
                r.outcome,
                ImportOutcome::Imported | ImportOutcome::Duplicate
            )
        })
        .filter(|r| r.imported_session_id.is_some())
        .map(|r| r.source_session_id)
        .collect();
    let missing: Vec<&String> = sessions.iter().filter(|s| !named.contains(*s)).collect();
    assert!(
        missing.is_empty(),
        "sessions without an import.result naming their imported session: {missing:?}"
    );
}

/// A hung PostgreSQL (the relay in front of it freezes: connections stay open, no byte moves) for far longer than
/// the retry budget, while events flow through an issuer and a receiver sharing that ledger. `/readyz` turns 503
/// naming the ledger and the pipelines pause (`paused{reason="ledger"}`); after the thaw they resume by themselves
/// and every session is imported exactly once, nothing dead-lettered.
///
/// On the old code a ledger call had no time limit: handlers hung on the frozen connection past `hold_max` and
/// their leases, the writability check hung with them so `/readyz` stayed 200, and no pause was ever reported (the
/// wait for the 503 fails); a ledger that failed instead of hanging was `Retry` and ended `retries_exhausted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_postgres_pauses_and_resumes_without_dead_letters() {
    let world = World::new("edge-pgfreeze").await;
    test_logs();
    slow_didit(&world, 40).await;
    let pg = PgSchema::create("edge_freeze").await;
    let relay = Proxy::start_to(&postgres_address()).await;
    let ledger = pg.ledger_section(&relay.addr().to_string(), LEDGER_TIMEOUT_MS, LEASE_MS);
    let receiver = world
        .start(world.config(&edge_toml(&world.receiver_toml(false), &ledger)))
        .await;
    let issuer = world
        .start(world.config(&edge_toml(&world.issuer_toml(), &ledger)))
        .await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let n = 30;
    let sessions = publish_sessions(&world, &amqp, n, "freeze").await;

    wait_for("imports under way", Duration::from_secs(30), || async {
        (imported_sessions(&world).await >= 5).then_some(())
    })
    .await;
    relay.freeze(true);
    let at_freeze = imported_sessions(&world).await;
    assert!(at_freeze < n, "the freeze came after the stream ended");
    wait_explained(
        "both bridges to report the ledger in /readyz and a ledger pause",
        Duration::from_secs(20),
        || async {
            let reasons = [ledger_reasons(&issuer), ledger_reasons(&receiver)];
            let paused = paused_for_ledger(&issuer.metrics().encode())
                || paused_for_ledger(&receiver.metrics().encode());
            if reasons.iter().all(Option::is_some) && paused {
                Ok(())
            } else {
                Err(format!(
                    "readyz reasons {reasons:?}; paused for the ledger: {paused}"
                ))
            }
        },
    )
    .await;
    // The outage's length (the fault, not a wait for a result): well past 3 attempts × (1 s hold + 0.3 s delay).
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        ledger_reasons(&receiver).is_some(),
        "the receiver says ready while its ledger is frozen"
    );
    relay.freeze(false);

    wait_settled(
        &world,
        &amqp,
        &results,
        &sessions,
        Duration::from_secs(60),
        || async { vec![issuer.metrics().encode(), receiver.metrics().encode()] },
    )
    .await;
    for (name, bridge) in [("issuer", &issuer), ("receiver", &receiver)] {
        wait_explained(
            &format!("the {name} to be ready again"),
            Duration::from_secs(20),
            || async { bridge.health().check().map_err(|r| format!("{r:?}")) },
        )
        .await;
    }
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    assert_exactly_once(&world, &amqp, &sessions).await;
    assert_results_name_imports(&results, &sessions);
    results.stop();
    amqp.close().await;
    world.cleanup().await;
}

/// The receiver's SQLite ledger cannot be written: a second connection (the test's) holds its write lock with
/// `BEGIN EXCLUSIVE` — tests run as root, which file modes do not stop, but SQLite's lock stops everyone. Writes fail
/// (`SQLITE_BUSY`, or no answer within `ledger.timeout_ms`): the receiver pauses for the ledger, nothing is
/// dead-lettered; once the lock goes it resumes by itself and every session is imported exactly once.
///
/// On the old code the failed claim was `Retry`: with the lock held past 3 attempts the tokens were dead-lettered
/// `retries_exhausted` (and no `paused{reason="ledger"}` existed, so the wait for it fails first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_sqlite_ledger_pauses_and_resumes_without_dead_letters() {
    let world = World::new("edge-sqlock").await;
    test_logs();
    slow_didit(&world, 40).await;
    let ledger = format!("\n[ledger]\ntimeout_ms = {LEDGER_TIMEOUT_MS}\nlease_ms = {LEASE_MS}\n");
    let receiver = world
        .start(world.config(&edge_toml(&world.receiver_toml(false), &ledger)))
        .await;
    let issuer = world
        .start(world.config(&edge_toml(&world.issuer_toml(), &ledger)))
        .await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let n = 30;
    let sessions = publish_sessions(&world, &amqp, n, "lock").await;

    wait_for("imports under way", Duration::from_secs(30), || async {
        (imported_sessions(&world).await >= 5).then_some(())
    })
    .await;
    let file = world.dir.path().join("receiver").join("ledger.sqlite3");
    let locker = rusqlite::Connection::open(&file).expect("open the receiver's ledger");
    locker
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("take the ledger's write lock");
    let at_lock = imported_sessions(&world).await;
    assert!(at_lock < n, "the lock came after the stream ended");
    wait_explained(
        "the receiver to pause for its ledger and say so in /readyz",
        Duration::from_secs(30),
        || async {
            let reasons = ledger_reasons(&receiver);
            let paused = paused_for_ledger(&receiver.metrics().encode());
            if reasons.is_some() && paused {
                Ok(())
            } else {
                Err(format!(
                    "readyz reasons {reasons:?}; paused for the ledger: {paused}"
                ))
            }
        },
    )
    .await;
    // The outage's length: past the retry budget, as above.
    tokio::time::sleep(Duration::from_secs(6)).await;
    locker.execute_batch("ROLLBACK").expect("release the lock");
    drop(locker);

    wait_settled(
        &world,
        &amqp,
        &results,
        &sessions,
        Duration::from_secs(60),
        || async { vec![issuer.metrics().encode(), receiver.metrics().encode()] },
    )
    .await;
    wait_explained(
        "the receiver to be ready again",
        Duration::from_secs(20),
        || async { receiver.health().check().map_err(|r| format!("{r:?}")) },
    )
    .await;
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    assert_exactly_once(&world, &amqp, &sessions).await;
    assert_results_name_imports(&results, &sessions);
    results.stop();
    amqp.close().await;
    world.cleanup().await;
}

/// One replica of the real binary: its own state directory, admin port and log, sharing the PostgreSQL ledger.
async fn replica(world: &World, role: &str, name: &str, toml: &str) -> Binary {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let toml = set_key(
        toml,
        "state_dir",
        &format!("\"{}/{name}\"", world.dir.path().display()),
    );
    let toml = set_key(&toml, "listen", &format!("\"{admin}\""));
    let toml = set_key(&toml, "level", "\"info\"");
    let toml = set_key(&toml, "grace_s", "5");
    let path = world.dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, toml).expect("write the configuration");
    let log = world.dir.path().join(format!("{name}.log"));
    eprintln!("{role} replica {name}: log {}", log.display());
    Binary::start(&path, admin, log).await
}

/// Two receivers and two issuers (the real binary) on one PostgreSQL ledger; one of each is SIGKILLed mid-stream,
/// then every event is published again (duplicates). Every session is imported exactly once, and the killed
/// replicas' sessions are finished by their peers within a generous deadline.
///
/// The retry budget here (3 attempts × (1 s hold + 0.3 s delay), about 4 s) is shorter than the old lease
/// (hold + 2 × Didit timeout + confirm timeout + 5 s = 10 s): on the old code the peer found the dead replica's
/// claims busy on every attempt and dead-lettered them `retries_exhausted`; with short renewed leases (3 s) the
/// claims lapse within the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_sigkilled_on_shared_postgres_its_peer_finishes_each_session_once() {
    let world = World::new("edge-replicas").await;
    test_logs();
    slow_didit(&world, 120).await;
    let pg = PgSchema::create("edge_replicas").await;
    let ledger = pg.ledger_section(&postgres_address(), LEDGER_TIMEOUT_MS, LEASE_MS);
    let issuer_toml = edge_toml(&world.issuer_toml(), &ledger);
    let receiver_toml = edge_toml(&world.receiver_toml(false), &ledger);
    let mut issuer_a = replica(&world, "issuer", "issuer-a", &issuer_toml).await;
    let issuer_b = replica(&world, "issuer", "issuer-b", &issuer_toml).await;
    let mut receiver_a = replica(&world, "receiver", "receiver-a", &receiver_toml).await;
    let receiver_b = replica(&world, "receiver", "receiver-b", &receiver_toml).await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let n = 40;
    let created = create_sessions(&world, n, "replica").await;
    let sessions = publish_events(&world, &amqp, &created).await;

    wait_for(
        "imports under way with work in flight in both replicas to be killed",
        Duration::from_secs(40),
        || async {
            let busy = in_flight(&issuer_a.metrics().await) > 0.0
                && in_flight(&receiver_a.metrics().await) > 0.0;
            (busy && imported_sessions(&world).await >= 8).then_some(())
        },
    )
    .await;
    issuer_a.child.kill().await.expect("SIGKILL issuer a");
    receiver_a.child.kill().await.expect("SIGKILL receiver a");
    let at_kill = imported_sessions(&world).await;
    assert!(at_kill < n, "the kill came after the stream ended");
    // Duplicate events for every session, as an at-least-once upstream would send them.
    publish_events(&world, &amqp, &created).await;

    showing_log(
        &receiver_b.log,
        wait_settled(
            &world,
            &amqp,
            &results,
            &sessions,
            Duration::from_secs(60),
            || async { vec![issuer_b.metrics().await, receiver_b.metrics().await] },
        ),
    )
    .await;
    for mut survivor in [issuer_b, receiver_b] {
        survivor.terminate();
        let status = survivor.exited_within(Duration::from_secs(20)).await;
        assert!(status.success(), "exit after SIGTERM: {status}");
    }
    assert_exactly_once(&world, &amqp, &sessions).await;
    assert_results_name_imports(&results, &sessions);
    results.stop();
    amqp.close().await;
    world.cleanup().await;
}

/// A second process on the same `state_dir` is refused with a clear error and exit code 1, while the first keeps
/// working (it still imports every session exactly once afterwards).
///
/// On the old code the second process started (there was no lock) and voided the first one's live leases as "left
/// by an earlier run"; the wait for its exit fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_process_on_the_same_state_dir_is_refused() {
    let world = World::new("edge-statedir").await;
    test_logs();
    let (config, admin) = binary_config(&world, 4, 5);
    let log = world.dir.path().join("first.log");
    let mut first = Binary::start(&config, admin, log.clone()).await;

    // Same configuration, another admin port: only the state directory is shared.
    let second_admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let toml = std::fs::read_to_string(&config).unwrap();
    let toml = set_key(&toml, "listen", &format!("\"{second_admin}\""));
    let second_config = world.dir.path().join("second.toml");
    std::fs::write(&second_config, toml).unwrap();
    let second = tokio::process::Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&second_config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(20), second)
        .await
        .expect("the second process exits instead of running")
        .expect("run the second process");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(1), "exit code; output: {said}");
    assert!(
        said.contains("is in use by another partner-bridge process"),
        "the refusal names the reason: {said}"
    );
    assert!(
        said.contains(&format!("pid {}", first.child.id().unwrap())),
        "the refusal names the holder: {said}"
    );

    // The first one was not disturbed.
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let sessions = publish_sessions(&world, &amqp, 6, "statedir").await;
    showing_log(
        &log,
        wait_settled(
            &world,
            &amqp,
            &results,
            &sessions,
            Duration::from_secs(40),
            || async { vec![first.metrics().await] },
        ),
    )
    .await;
    first.terminate();
    let status = first.exited_within(Duration::from_secs(20)).await;
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert_exactly_once(&world, &amqp, &sessions).await;
    assert_results_name_imports(&results, &sessions);
    results.stop();
    amqp.close().await;
    world.cleanup().await;
}

/// Both backends: a renewal extends only the holder's lease, and a kept-alive lease outlives its length while its
/// keeper lives, then lapses once the keeper is dropped (the handler ended, or its process died).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_renewed_while_kept_alive_and_lapse_after() {
    use partner_bridge::ledger::{Claim, LeaseKey, Ledger};
    use partner_bridge::secret::SecretUrl;

    let dir = tempfile::tempdir().unwrap();
    let pg = PgSchema::create("edge_renew").await;
    let urls = [
        format!("sqlite://{}", dir.path().join("l.sqlite3").display()),
        pg.url_via(&postgres_address()),
    ];
    for url in urls {
        let ledger = Ledger::open(&SecretUrl::new(url)).await.unwrap();
        let lease = Duration::from_millis(600);
        let now = chrono::Utc::now();
        let claim = ledger
            .claim_import("i", "s", "a", lease, now)
            .await
            .unwrap();
        assert_eq!(
            claim,
            Claim::Acquired { previous: None },
            "{}",
            ledger.backend()
        );
        // Only the holder renews.
        let later = now + chrono::Duration::seconds(60);
        let import_key = LeaseKey::Import {
            issuer_application_id: "i".into(),
            source_session_id: "s".into(),
        };
        assert!(!ledger.renew(&import_key, "b", later).await.unwrap());
        assert!(ledger.renew(&import_key, "a", later).await.unwrap());
        assert!(matches!(
            ledger
                .claim_import("i", "s", "b", lease, now + chrono::Duration::seconds(30))
                .await
                .unwrap(),
            Claim::Busy { .. }
        ));
        assert!(
            !ledger
                .renew(
                    &LeaseKey::Share {
                        source_session_id: "s".into(),
                        partner_application_id: "p".into(),
                    },
                    "a",
                    later
                )
                .await
                .unwrap(),
            "no such share claim"
        );

        // Kept alive: still busy for others well past its 600 ms; dropped: lapses within one lease.
        let now = chrono::Utc::now();
        assert!(matches!(
            ledger
                .claim_share("s2", "p", "a", lease, Duration::ZERO, None, now)
                .await
                .unwrap(),
            Claim::Acquired { .. }
        ));
        let key = LeaseKey::Share {
            source_session_id: "s2".into(),
            partner_application_id: "p".into(),
        };
        let keeper = ledger.keep_alive(key, "a", lease);
        let claim_b = || async {
            ledger
                .claim_share(
                    "s2",
                    "p",
                    "b",
                    lease,
                    Duration::ZERO,
                    None,
                    chrono::Utc::now(),
                )
                .await
                .unwrap()
        };
        let until = std::time::Instant::now() + Duration::from_millis(1800);
        while std::time::Instant::now() < until {
            assert!(
                matches!(claim_b().await, Claim::Busy { .. }),
                "{}: a kept-alive lease was taken over",
                ledger.backend()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(keeper);
        wait_for(
            "the dropped lease to lapse",
            Duration::from_secs(5),
            || async { matches!(claim_b().await, Claim::Acquired { .. }).then_some(()) },
        )
        .await;
    }
}

/// The new `[ledger]` keys are validated, naming the key (exit 64 in `main`).
#[test]
fn ledger_timeout_and_lease_keys_are_validated() {
    use partner_bridge::config::Config;
    for (section, key) in [
        ("timeout_ms = 10", "ledger.timeout_ms"),
        ("lease_ms = 10", "ledger.lease_ms"),
        ("timeout_ms = 5000\nlease_ms = 6000", "ledger.lease_ms"),
    ] {
        // A role enabled, so that validation reaches `[ledger]` (the role's own keys are checked after it).
        let config = Config::from_toml(&format!(
            "[receiver]\nenabled = true\n[ledger]\n{section}\n"
        ))
        .expect("parses");
        let err = config.validate().expect_err("invalid");
        assert_eq!(err.key, key, "{section}");
    }
    let ok = Config::from_toml("[ledger]\ntimeout_ms = 2000\nlease_ms = 6000\n").unwrap();
    assert_eq!(ok.ledger.lease(), Duration::from_secs(6));
}
