//! Mistakes that used to pass `check-config` and `/readyz` and then fail quietly, through the real binary: a Didit
//! key that Didit refuses, tokens nobody can receive, and the log lines an operator needs to see what is up (issue
//! #10, item 2); and the demo saying what its partner accepts (item 3).

use std::net::SocketAddr;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use partner_bridge::amqp::topology;
use partner_bridge::didit::wire::SessionKind;

use crate::support::bridge::{Amqp, World, metric};
use crate::support::faults::{
    BIN, Binary, binary_config, free_port, get, set_key, showing_log, tuned,
};
use crate::support::wait_for;

/// Writes `toml` as the binary's configuration with the admin server on a free port and info logs.
fn write_config(world: &World, toml: &str) -> (std::path::PathBuf, SocketAddr) {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let toml = tuned(toml, &crate::support::amqp_url(), 4);
    let toml = set_key(&toml, "listen", &format!("\"{admin}\""));
    let toml = set_key(&toml, "level", "\"info\"");
    let path = world.dir.path().join("bridge.toml");
    std::fs::write(&path, toml).unwrap();
    (path, admin)
}

/// `/readyz` until `check` finds what it wants in the body.
async fn wait_readyz(bridge: &Binary, what: &str, check: impl Fn(u16, &str) -> bool) -> String {
    let http = &bridge.http;
    let admin = bridge.admin;
    let check = &check;
    showing_log(
        &bridge.log,
        wait_for(what, Duration::from_secs(20), || async move {
            let (status, body) = get(http, admin, "/readyz").await?;
            check(status, &body).then_some(body)
        }),
    )
    .await
}

/// A wrong API key used to go unnoticed until the first event paused the pipeline. Now the start-up check makes the
/// role unready with a reason naming where the key comes from, logs an error without the key, and clears once the
/// key file holds the right key (re-read by the check, no restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_didit_key_shows_in_readyz_before_the_first_event() {
    let world = World::new("misconf-key").await;
    let key_file = world.dir.path().join("api.key");
    std::fs::write(&key_file, "sk_wrong_key_never_logged\n").unwrap();
    let toml = world.issuer_toml().replace(
        &format!("api_key = \"{}\"", world.issuer_app.api_key.expose()),
        &format!("api_key_file = \"{}\"", key_file.display()),
    );
    let (config, admin) = write_config(&world, &toml);
    let log = world.dir.path().join("bridge.log");
    let bridge = Binary::spawn(&config, admin, log.clone());

    let body = wait_readyz(
        &bridge,
        "/readyz to name the refused key",
        |status, body| status == 503 && body.contains("didit_credentials:issuer"),
    )
    .await;
    let line = body
        .lines()
        .find(|l| l.starts_with("didit_credentials:issuer"))
        .unwrap();
    assert_eq!(
        line,
        format!(
            "didit_credentials:issuer: Didit refused the API key from didit.api_key_file ({}): Didit rejected the API key (HTTP 401): Invalid or missing API key; check the key and its privileges",
            key_file.display()
        ),
        "{body}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let error = text
        .lines()
        .find(|l| l.contains("Didit refused the API key at start"))
        .unwrap_or_else(|| panic!("no error line in the log:\n{text}"));
    assert!(error.contains("\"level\":\"ERROR\""), "{error}");
    assert!(
        error.contains(&format!(
            "\"key_source\":\"didit.api_key_file ({})\"",
            key_file.display()
        )),
        "{error}"
    );
    assert!(
        !text.contains("sk_wrong_key_never_logged"),
        "the key leaked"
    );
    assert_eq!(world.control.stats().await.unwrap().shares, 0);

    // The right key in the file: the check re-reads it and the reason goes.
    std::fs::write(&key_file, world.issuer_app.api_key.expose()).unwrap();
    wait_readyz(
        &bridge,
        "/readyz to answer 200 with the right key",
        |status, _| status == 200,
    )
    .await;
    bridge.terminate();
    world.cleanup().await;
}

/// An issuer alone (its partner's receiver has not declared its queue yet) used to retry its token publishes
/// forever with nothing but a generic warning. Now the log, `/readyz` and `partner_bridge_unroutable_total` name the
/// partner and the routing key, and the reason clears once the queue exists and a token is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_tokens_name_the_partner_and_the_routing_key() {
    let world = World::new("misconf-noroute").await;
    let (config, admin) = write_config(&world, &world.issuer_toml());
    let log = world.dir.path().join("bridge.log");
    let bridge = Binary::start(&config, admin, log.clone()).await;
    let amqp = Amqp::connect().await;
    let session = world
        .session(SessionKind::User, "Approved", "crm-noroute")
        .await;
    world
        .publish_event(&amqp, &world.event(&session, SessionKind::User, "Approved"))
        .await;

    let routing_key = format!("token.{}", world.partner_app.application_id);
    let body = wait_readyz(
        &bridge,
        "/readyz to name the unroutable partner",
        |status, body| status == 503 && body.contains("unroutable:sponsor-bank"),
    )
    .await;
    let line = body.lines().find(|l| l.starts_with("unroutable:")).unwrap();
    assert_eq!(
        line,
        format!(
            "unroutable:sponsor-bank: tokens for partner sponsor-bank come back unroutable (312 NO_ROUTE): no queue is bound to {}.tokens for routing key {routing_key}; start the partner's receiver or declare its queue",
            world.prefix
        ),
        "{body}"
    );
    assert!(
        metric(
            &bridge.metrics().await,
            "partner_bridge_unroutable_total{partner=\"sponsor-bank\"}"
        ) >= 1.0
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let error = text
        .lines()
        .find(|l| l.contains("token unroutable"))
        .unwrap_or_else(|| panic!("no unroutable line in the log:\n{text}"));
    assert!(error.contains("\"partner\":\"sponsor-bank\""), "{error}");
    assert!(
        error.contains(&format!("\"routing_key\":\"{routing_key}\"")),
        "{error}"
    );

    // The partner's receiver declares its queue: the next mint is delivered and the reason clears.
    let receiver = world.config(&world.receiver_toml(false));
    topology::declare(
        &amqp.channel,
        &partner_bridge::app::declared_topology(&receiver),
    )
    .await
    .unwrap();
    wait_readyz(
        &bridge,
        "/readyz to clear once the queue exists",
        |status, _| status == 200,
    )
    .await;
    bridge.terminate();
    amqp.close().await;
    world.cleanup().await;
}

/// Each listener says it is up and where; `message_id` is a plain string in every line about a message (it was
/// `Some("…")` in the lines about bad and dead-lettered messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_log_their_address_and_message_ids_are_plain_strings() {
    let world = World::new("misconf-logs").await;
    let (config, admin) = binary_config(&world, 4, 5);
    let webhook: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[issuer.webhook]\nlisten = \"{webhook}\"\nsecret = \"whsec_test\"\n"
    ));
    std::fs::write(&config, text).unwrap();
    let log = world.dir.path().join("bridge.log");
    let bridge = Binary::start(&config, admin, log.clone()).await;

    let amqp = Amqp::connect().await;
    let message_id = format!("bad-{}", world.prefix);
    amqp.channel
        .basic_publish(
            world.names.onboarding_exchange().as_str().into(),
            "onboarding.finished".into(),
            BasicPublishOptions::default(),
            b"not json",
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(message_id.as_str().into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let lines = showing_log(
        &log,
        wait_for(
            "the bad event's log lines",
            Duration::from_secs(20),
            || async {
                let text = std::fs::read_to_string(&log).ok()?;
                let lines: Vec<String> = text
                    .lines()
                    .filter(|l| l.contains(&message_id))
                    .map(str::to_string)
                    .collect();
                (lines.iter().any(|l| l.contains("message dead-lettered"))).then_some(lines)
            },
        ),
    )
    .await;
    assert!(
        lines.iter().any(|l| l.contains("bad onboarding event")),
        "{lines:?}"
    );
    for line in &lines {
        assert!(
            line.contains(&format!("\"message_id\":\"{message_id}\"")),
            "message_id not a plain string: {line}"
        );
    }

    let text = std::fs::read_to_string(&log).unwrap();
    for (listener, addr) in [("admin", admin), ("webhook", webhook)] {
        assert!(
            text.lines().any(|l| l.contains("listening")
                && l.contains(&format!("\"listener\":\"{listener}\""))
                && l.contains(&format!("\"addr\":\"{addr}\""))),
            "no listening line for {listener} on {addr}:\n{text}"
        );
    }
    bridge.terminate();
    amqp.close().await;
    world.cleanup().await;
}

/// `partner-bridge sandbox` says where it listens in its log as well as on stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_logs_where_it_listens() {
    let port = free_port();
    let mut child = tokio::process::Command::new(BIN)
        .args(["sandbox", "--listen", &format!("127.0.0.1:{port}")])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let line = tokio::time::timeout(Duration::from_secs(20), async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("listening") {
                return line;
            }
        }
        panic!("the sandbox exited without a listening line");
    })
    .await
    .expect("a listening line within 20 s");
    assert!(
        line.contains(&format!("addr=127.0.0.1:{port}")) && line.contains("listener=\"sandbox\"")
            || line.contains(&format!("addr=127.0.0.1:{port}"))
                && line.contains("listener=sandbox"),
        "{line}"
    );
    child.kill().await.unwrap();
}

/// A CLI command that fails on the broker prints its own error, not lapin's internal lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_show_their_error_without_lapin_lines() {
    let world = World::new("misconf-cli").await;
    let path = world.dir.path().join("receiver.toml");
    std::fs::write(&path, world.receiver_toml(false)).unwrap();
    let queue = format!("{}.no-such-queue", world.prefix);
    let out = tokio::process::Command::new(BIN)
        .args(["dead-letters", "list", "--config"])
        .arg(&path)
        .args(["--queue", &queue])
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "only the command's own error: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(&format!("{queue}.dead")), "{stderr}");
    world.cleanup().await;
}

/// The demo says what its partner accepts and how that differs from a partner configured with the defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_explains_its_partner_policy() {
    let admin = format!("127.0.0.1:{}", free_port());
    let out = tokio::process::Command::new(BIN)
        .args(["demo", "--sessions", "1", "--admin-listen", &admin])
        .args(["--amqp-url", &crate::support::amqp_url()])
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(partner_bridge::demo::POLICY_EXPLANATION),
        "{stdout}"
    );
    assert!(
        stdout.contains("A partner configured without `statuses` receives\n            Approved only (the default, statuses = [\"Approved\"])"),
        "{stdout}"
    );
}
