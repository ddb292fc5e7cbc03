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

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::FutureExt;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use partner_bridge::amqp::Names;
use partner_bridge::app::{self, Running};
use partner_bridge::didit::wire::{SessionKind, codes};
use partner_bridge::envelope::ImportOutcome;
use partner_bridge::sandbox::{FaultEndpoint, FaultSettings};
use tokio_util::sync::CancellationToken;

use crate::support::bridge::{Amqp, Collector, Got, World, metric};
use crate::support::proxy::Proxy;
use crate::support::wait_for;

/// The binary under test, built by cargo for this test target.
const BIN: &str = env!("CARGO_BIN_EXE_partner-bridge");

// ---- configuration ------------------------------------------------------------------------------------------

/// Replaces the value of every `key = …` line (the World's TOMLs name each key in one section only); `value` is
/// TOML (quote strings).
fn set_key(toml: &str, key: &str, value: &str) -> String {
    let mut found = false;
    let mut out = String::with_capacity(toml.len());
    for line in toml.lines() {
        if line.split_once('=').is_some_and(|(k, _)| k.trim() == key) {
            found = true;
            out.push_str(&format!("{key} = {value}"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    assert!(found, "the configuration has no `{key}` to set");
    out
}

/// Both roles in one process, as a multi-brand group runs them: the issuer as `fintech-a` (from `[didit]`), the
/// receiver as `sponsor-bank` (its own `application_id` and `api_key` in `[receiver]`).
fn both_toml(world: &World) -> String {
    let receiver = world.receiver_toml(false);
    let start = receiver
        .find("\n[receiver]")
        .expect("the receiver configuration has a [receiver] section");
    let section = receiver[start..].replacen(
        "enabled = true",
        &format!(
            "enabled = true\napplication_id = \"{}\"\napi_key = \"{}\"",
            world.partner_app.application_id,
            world.partner_app.api_key.expose()
        ),
        1,
    );
    format!("{}{section}", world.issuer_toml())
}

/// `toml` through `amqp_url`, handling `prefetch` messages at once per consumer, with short Didit and hold limits so
/// that a claim left behind by a killed process lapses within seconds (the lease is hold + 2 × Didit timeout +
/// confirm timeout + 5 s).
fn tuned(toml: &str, amqp_url: &str, prefetch: u16) -> String {
    let toml = set_key(toml, "url", &format!("\"{amqp_url}\""));
    let toml = set_key(&toml, "prefetch", &prefetch.to_string());
    let toml = set_key(&toml, "hold_max_s", "2");
    let toml = set_key(&toml, "timeout_ms", "1000");
    set_key(&toml, "confirm_timeout_ms", "2000")
}

/// With `PB_TEST_LOG` set (a `tracing` filter, e.g. `partner_bridge=info`), the in-process bridges log to the test
/// output: the way to see why a reliability test failed.
fn test_logs() {
    if let Ok(filter) = std::env::var("PB_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

// ---- sessions, queues, settling -----------------------------------------------------------------------------

fn kind_status(i: usize) -> (SessionKind, &'static str) {
    if i % 3 == 2 {
        (SessionKind::Business, "APPROVED")
    } else {
        (SessionKind::User, "Approved")
    }
}

/// Creates `n` finished sessions at the issuer (KYC and KYB mixed).
async fn create_sessions(
    world: &World,
    n: usize,
    tag: &str,
) -> Vec<(String, SessionKind, &'static str)> {
    let mut sessions = Vec::with_capacity(n);
    for i in 0..n {
        let (kind, status) = kind_status(i);
        let id = world.session(kind, status, &format!("{tag}-{i}")).await;
        sessions.push((id, kind, status));
    }
    sessions
}

/// Publishes one `onboarding.finished` per session and returns the session ids.
async fn publish_events(
    world: &World,
    amqp: &Amqp,
    sessions: &[(String, SessionKind, &'static str)],
) -> Vec<String> {
    for (id, kind, status) in sessions {
        world
            .publish_event(amqp, &world.event(id, *kind, status))
            .await;
    }
    sessions.iter().map(|(id, _, _)| id.clone()).collect()
}

/// Creates `n` sessions and publishes their events.
async fn publish_sessions(world: &World, amqp: &Amqp, n: usize, tag: &str) -> Vec<String> {
    let sessions = create_sessions(world, n, tag).await;
    publish_events(world, amqp, &sessions).await
}

/// Imports the sandbox has counted, per source session.
async fn import_counts(world: &World) -> BTreeMap<String, u64> {
    world
        .control
        .stats()
        .await
        .expect("sandbox stats")
        .imports
        .into_iter()
        .map(|i| (i.source_session_id, i.count))
        .collect()
}

/// How many source sessions the sandbox has imported so far.
async fn imported_sessions(world: &World) -> usize {
    world
        .control
        .stats()
        .await
        .map(|s| s.imports.len())
        .unwrap_or(0)
}

/// The queues work waits in (each work queue and its `.retry`).
fn work_queues(world: &World) -> Vec<String> {
    let names = &world.names;
    let mut queues = Vec::new();
    for queue in [
        names.issuer_onboarding_queue(),
        names.issuer_reshare_queue(),
        names.receiver_tokens_queue(),
    ] {
        queues.push(Names::retry_queue(&queue));
        queues.push(queue);
    }
    queues
}

/// The `.dead` queues of both roles.
fn dead_queues(world: &World) -> Vec<String> {
    let names = &world.names;
    [
        names.issuer_onboarding_queue(),
        names.issuer_reshare_queue(),
        names.receiver_tokens_queue(),
        world.results_queue(),
    ]
    .iter()
    .map(|q| Names::dead_queue(q))
    .collect()
}

/// Queues among `queues` holding ready messages, with their depth.
async fn non_empty(amqp: &Amqp, queues: &[String]) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for queue in queues {
        let depth = amqp.depth(queue).await;
        if depth > 0 {
            out.insert(queue.clone(), depth);
        }
    }
    out
}

/// Sum of `partner_bridge_in_flight{…}` over every pipeline of an exposition.
fn in_flight(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("partner_bridge_in_flight{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Source sessions with an `import.result` saying they are in the partner's application (`imported`, or
/// `duplicate` after a redelivery whose first result was lost with a crash).
fn sessions_with_results(results: &Collector) -> BTreeSet<String> {
    results
        .results()
        .into_iter()
        .filter(|r| {
            matches!(
                r.outcome,
                ImportOutcome::Imported | ImportOutcome::Duplicate
            )
        })
        .map(|r| r.source_session_id)
        .collect()
}

/// [`wait_for`], with a check that says why it is not done yet: the last reason goes into the failure.
async fn wait_explained<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let last = RefCell::new(String::new());
    let waited = AssertUnwindSafe(wait_for(what, timeout, || {
        let checked = check();
        let last = &last;
        async move { checked.await.map_err(|why| *last.borrow_mut() = why).ok() }
    }))
    .catch_unwind()
    .await;
    match waited {
        Ok(value) => value,
        Err(panic) => {
            eprintln!("not done waiting for {what}: {}", last.borrow());
            std::panic::resume_unwind(panic)
        }
    }
}

/// Waits until every session has its `import.result`, no work queue holds a message and nothing is in flight in
/// any bridge (`expositions` scrapes each bridge), seen on three polls in a row.
async fn wait_settled<F, Fut>(
    world: &World,
    amqp: &Amqp,
    results: &Collector,
    sessions: &[String],
    timeout: Duration,
    expositions: F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = Vec<String>>,
{
    let queues = work_queues(world);
    let streak = Cell::new(0);
    wait_explained(
        "every session to have its result and every bridge to be idle",
        timeout,
        || {
            let (queues, expositions, streak) = (&queues, &expositions, &streak);
            async move {
                let reported = sessions_with_results(results);
                let missing = sessions.iter().filter(|s| !reported.contains(*s)).count();
                let waiting = non_empty(amqp, queues).await;
                let busy: Vec<f64> = expositions().await.iter().map(|t| in_flight(t)).collect();
                if missing == 0 && waiting.is_empty() && busy.iter().all(|b| *b == 0.0) {
                    streak.set(streak.get() + 1);
                } else {
                    streak.set(0);
                }
                if streak.get() >= 3 {
                    Ok(())
                } else {
                    Err(format!(
                        "{missing} sessions without a result; queues with messages {waiting:?}; in flight per \
                         bridge {busy:?}"
                    ))
                }
            }
        },
    )
    .await;
}

/// After the bridges stopped: nothing is left in any work queue, nothing was dead-lettered, and the sandbox counts
/// exactly one import for each of `sessions` and none for anything else.
async fn assert_exactly_once(world: &World, amqp: &Amqp, sessions: &[String]) {
    let left = non_empty(amqp, &work_queues(world)).await;
    assert!(
        left.is_empty(),
        "work left in queues after the stop: {left:?}"
    );
    let dead = dead_queues(world);
    let dead_depths = non_empty(amqp, &dead).await;
    if !dead_depths.is_empty() {
        let mut reasons = Vec::new();
        for queue in dead_depths.keys() {
            for got in amqp.drain(queue).await {
                reasons.push(format!(
                    "{queue}: {} {}",
                    got.header("x-pb-reason").unwrap_or("?"),
                    got.header("x-pb-detail").unwrap_or("")
                ));
            }
        }
        panic!("messages were dead-lettered: {reasons:#?}");
    }
    let counts = import_counts(world).await;
    let expected: BTreeSet<&String> = sessions.iter().collect();
    let got: BTreeSet<&String> = counts.keys().collect();
    assert_eq!(
        got, expected,
        "imported sessions differ from the sessions sent"
    );
    let twice: Vec<_> = counts.iter().filter(|(_, c)| **c != 1).collect();
    assert!(
        twice.is_empty(),
        "sessions not imported exactly once: {twice:?}"
    );
}

// ---- the real binary ----------------------------------------------------------------------------------------

/// A port free right now on 127.0.0.1 (the binary prints nothing about its admin port, so the test picks it).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("HTTP client")
}

/// `GET http://{addr}{path}`: status and body, `None` when nothing answers.
async fn get(http: &reqwest::Client, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let response = http.get(format!("http://{addr}{path}")).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// `partner-bridge run --config FILE` as a child process, its output in a log file.
struct Binary {
    child: tokio::process::Child,
    admin: SocketAddr,
    log: PathBuf,
    http: reqwest::Client,
}

impl Binary {
    /// Starts the binary and waits until its `/readyz` answers 200.
    async fn start(config: &Path, admin: SocketAddr, log: PathBuf) -> Binary {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the log file");
        let child = tokio::process::Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file handle"))
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("start partner-bridge");
        let binary = Binary {
            child,
            admin,
            log,
            http: http(),
        };
        let http = &binary.http;
        showing_log(
            &binary.log,
            wait_for(
                "the binary's /readyz to answer 200",
                Duration::from_secs(20),
                || async move {
                    get(http, admin, "/readyz")
                        .await
                        .and_then(|(status, _)| (status == 200).then_some(()))
                },
            ),
        )
        .await;
        binary
    }

    /// The binary's `/metrics` (empty when it does not answer).
    async fn metrics(&self) -> String {
        get(&self.http, self.admin, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// Sends SIGTERM, the way an orchestrator stops a container.
    fn terminate(&self) {
        let pid = self.child.id().expect("the child is running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
    }

    /// Waits for the process to exit within `limit` and returns its status.
    async fn exited_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.expect("wait for the child"),
            Err(_) => {
                eprintln!("{}", log_tail(&self.log));
                panic!("partner-bridge did not exit within {limit:?}");
            }
        }
    }
}

/// The last lines of a log file.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(60);
    format!(
        "--- last lines of {} ---\n{}",
        log.display(),
        lines[from..].join("\n")
    )
}

/// Runs `fut`; if it panics, prints the tail of the binary's log first, so a failure explains itself.
async fn showing_log<T>(log: &Path, fut: impl Future<Output = T>) -> T {
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(value) => value,
        Err(panic) => {
            eprintln!("{}", log_tail(log));
            std::panic::resume_unwind(panic)
        }
    }
}

/// Writes a configuration for the binary: both roles, admin on a free port, info logs.
fn binary_config(world: &World, prefetch: u16, grace_s: u64) -> (PathBuf, SocketAddr) {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let toml = tuned(&both_toml(world), &crate::support::amqp_url(), prefetch);
    let toml = set_key(&toml, "listen", &format!("\"{admin}\""));
    let toml = set_key(&toml, "grace_s", &grace_s.to_string());
    let toml = set_key(&toml, "level", "\"info\"");
    let path = world.dir.path().join("bridge.toml");
    std::fs::write(&path, toml).expect("write the configuration");
    (path, admin)
}

// ---- raw AMQP -----------------------------------------------------------------------------------------------

/// An exclusive queue bound to the tokens exchange with `token.#`: a copy of every token envelope published.
async fn tap_tokens(world: &World, amqp: &Amqp) -> String {
    let queue = format!("{}.test.tap", world.prefix);
    amqp.channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare the tap queue");
    amqp.channel
        .queue_bind(
            queue.as_str().into(),
            world.names.tokens_exchange().as_str().into(),
            "token.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the tap queue");
    queue
}

/// Publishes `got` again exactly as it was (body, message id, type, app id, headers), as a broker redelivery or an
/// at-least-once hop upstream would hand it over a second time.
async fn republish(amqp: &Amqp, exchange: &str, routing_key: &str, got: &Got) {
    let mut headers = FieldTable::default();
    for (k, v) in &got.headers {
        headers.insert(
            ShortString::from(k.clone()),
            AMQPValue::LongString(v.clone().into()),
        );
    }
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(headers);
    if let Some(id) = &got.message_id {
        properties = properties.with_message_id(id.clone().into());
    }
    if let Some(kind) = &got.kind {
        properties = properties.with_type(kind.clone().into());
    }
    if let Some(app_id) = &got.app_id {
        properties = properties.with_app_id(app_id.clone().into());
    }
    let confirm = amqp
        .channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &got.body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(
        matches!(confirm, lapin::Confirmation::Ack(None)),
        "republish to {exchange}/{routing_key} not routed: {confirm:?}"
    );
}

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
