//! Helpers for fault tests, shared by every module that needs them: the real binary as a child process (start,
//! scrape, SIGTERM, wait), configurations tuned so that leases lapse within seconds, sessions and events in bulk,
//! waiting until the bridges are settled, and the exactly-once assertion (the sandbox counts one import per session,
//! nothing left in a work queue, nothing dead-lettered).

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
use partner_bridge::didit::wire::SessionKind;
use partner_bridge::envelope::ImportOutcome;

use super::bridge::{Amqp, Collector, Got, World};
use super::wait_for;

/// The binary under test, built by cargo for this test target.
pub const BIN: &str = env!("CARGO_BIN_EXE_partner-bridge");

// ---- configuration ------------------------------------------------------------------------------------------

/// Replaces the value of every `key = …` line (the World's TOMLs name each key in one section only); `value` is
/// TOML (quote strings).
pub fn set_key(toml: &str, key: &str, value: &str) -> String {
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
pub fn both_toml(world: &World) -> String {
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
/// that a killed process's deliveries come back within seconds (its claims lapse with their leases,
/// `ledger.lease_ms`, renewed only while their work is alive).
pub fn tuned(toml: &str, amqp_url: &str, prefetch: u16) -> String {
    let toml = set_key(toml, "url", &format!("\"{amqp_url}\""));
    let toml = set_key(&toml, "prefetch", &prefetch.to_string());
    let toml = set_key(&toml, "hold_max_s", "2");
    let toml = set_key(&toml, "timeout_ms", "1000");
    set_key(&toml, "confirm_timeout_ms", "2000")
}

/// With `PB_TEST_LOG` set (a `tracing` filter, e.g. `partner_bridge=info`), the in-process bridges log to the test
/// output: the way to see why a reliability test failed.
pub fn test_logs() {
    if let Ok(filter) = std::env::var("PB_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

// ---- sessions, queues, settling -----------------------------------------------------------------------------

pub fn kind_status(i: usize) -> (SessionKind, &'static str) {
    if i % 3 == 2 {
        (SessionKind::Business, "APPROVED")
    } else {
        (SessionKind::User, "Approved")
    }
}

/// Creates `n` finished sessions at the issuer (KYC and KYB mixed).
pub async fn create_sessions(
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
pub async fn publish_events(
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
pub async fn publish_sessions(world: &World, amqp: &Amqp, n: usize, tag: &str) -> Vec<String> {
    let sessions = create_sessions(world, n, tag).await;
    publish_events(world, amqp, &sessions).await
}

/// Imports the sandbox has counted, per source session.
pub async fn import_counts(world: &World) -> BTreeMap<String, u64> {
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
pub async fn imported_sessions(world: &World) -> usize {
    world
        .control
        .stats()
        .await
        .map(|s| s.imports.len())
        .unwrap_or(0)
}

/// The queues work waits in (each work queue and its `.retry`).
pub fn work_queues(world: &World) -> Vec<String> {
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
pub fn dead_queues(world: &World) -> Vec<String> {
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
pub async fn non_empty(amqp: &Amqp, queues: &[String]) -> BTreeMap<String, u32> {
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
pub fn in_flight(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("partner_bridge_in_flight{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Source sessions with an `import.result` saying they are in the partner's application and naming the session
/// they became there (`imported`, or `duplicate` for a later token of an imported session): the partner's backend
/// must always learn the imported session's id, whatever crashed or was lost on the way.
pub fn sessions_with_results(results: &Collector) -> BTreeSet<String> {
    results
        .results()
        .into_iter()
        .filter(|r| {
            matches!(
                r.outcome,
                ImportOutcome::Imported | ImportOutcome::Duplicate
            ) && r.imported_session_id.is_some()
        })
        .map(|r| r.source_session_id)
        .collect()
}

/// [`wait_for`], with a check that says why it is not done yet: the last reason goes into the failure.
pub async fn wait_explained<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
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
pub async fn wait_settled<F, Fut>(
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
pub async fn assert_exactly_once(world: &World, amqp: &Amqp, sessions: &[String]) {
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
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("HTTP client")
}

/// `GET http://{addr}{path}`: status and body, `None` when nothing answers.
pub async fn get(http: &reqwest::Client, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let response = http.get(format!("http://{addr}{path}")).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// `partner-bridge run --config FILE` as a child process, its output in a log file.
pub struct Binary {
    pub child: tokio::process::Child,
    pub admin: SocketAddr,
    pub log: PathBuf,
    pub http: reqwest::Client,
}

impl Binary {
    /// Starts the binary and waits until its `/readyz` answers 200.
    pub async fn start(config: &Path, admin: SocketAddr, log: PathBuf) -> Binary {
        Binary::start_with(config, admin, log, &[]).await
    }

    /// [`Binary::start`] with environment variables set (`Some`) or removed (`None`).
    pub async fn start_with(
        config: &Path,
        admin: SocketAddr,
        log: PathBuf,
        env: &[(&str, Option<String>)],
    ) -> Binary {
        let binary = Binary::spawn_with(config, admin, log, env);
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

    /// Starts the binary without waiting for it to be ready (for tests of what keeps it unready).
    pub fn spawn(config: &Path, admin: SocketAddr, log: PathBuf) -> Binary {
        Binary::spawn_with(config, admin, log, &[])
    }

    /// [`Binary::spawn`] with environment variables set (`Some`) or removed (`None`).
    pub fn spawn_with(
        config: &Path,
        admin: SocketAddr,
        log: PathBuf,
        env: &[(&str, Option<String>)],
    ) -> Binary {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the log file");
        let mut command = tokio::process::Command::new(BIN);
        command
            .arg("run")
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file handle"))
            .stderr(file)
            .kill_on_drop(true);
        for (name, value) in env {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        let child = command.spawn().expect("start partner-bridge");
        Binary {
            child,
            admin,
            log,
            http: http(),
        }
    }

    /// The binary's `/metrics` (empty when it does not answer).
    pub async fn metrics(&self) -> String {
        get(&self.http, self.admin, "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// Sends SIGTERM, the way an orchestrator stops a container.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("the child is running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
    }

    /// Waits for the process to exit within `limit` and returns its status.
    pub async fn exited_within(&mut self, limit: Duration) -> std::process::ExitStatus {
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
pub fn log_tail(log: &Path) -> String {
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
pub async fn showing_log<T>(log: &Path, fut: impl Future<Output = T>) -> T {
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(value) => value,
        Err(panic) => {
            eprintln!("{}", log_tail(log));
            std::panic::resume_unwind(panic)
        }
    }
}

/// Writes a configuration for the binary: both roles, admin on a free port, info logs.
pub fn binary_config(world: &World, prefetch: u16, grace_s: u64) -> (PathBuf, SocketAddr) {
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
pub async fn tap_tokens(world: &World, amqp: &Amqp) -> String {
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
pub async fn republish(amqp: &Amqp, exchange: &str, routing_key: &str, got: &Got) {
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

/// Fails when the binary's log holds a secret of `world` (either API key, the signing key) or anything shaped like a
/// share token (every HS256 JWT starts `eyJ`, the base64 of `{"`): DESIGN's "no secret in logs", checked on a real
/// run's whole output rather than on one error's text.
pub fn assert_no_secrets_in_log(world: &World, log: &Path) {
    let text = std::fs::read_to_string(log).expect("read the binary's log");
    assert!(
        !text.is_empty(),
        "the binary wrote no log at {}",
        log.display()
    );
    let secrets = [
        (
            "the issuer's API key",
            world.issuer_app.api_key.expose().to_string(),
        ),
        (
            "the partner's API key",
            world.partner_app.api_key.expose().to_string(),
        ),
        ("the signing key", world.key.to_base64()),
    ];
    for (what, secret) in &secrets {
        assert!(
            !text.contains(secret.as_str()),
            "{what} appears in {}",
            log.display()
        );
    }
    if let Some(line) = text.lines().find(|l| l.contains("eyJ")) {
        panic!("a share token appears in {}: {line}", log.display());
    }
}
