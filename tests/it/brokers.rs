//! Two organisations on separate brokers (issue #11 items 1 and 2): the issuer's tokens go to the partner's broker,
//! the partner's reshare requests are answered there, and with a broker per partner a broker that stops keeps only
//! its partner waiting. The partners' brokers are the extra test nodes of tests/it/support/rabbit_nodes.rs.

use std::collections::BTreeMap;
use std::time::Duration;

use partner_bridge::amqp::Names;
use partner_bridge::amqp::topology;
use partner_bridge::sandbox::ApplicationInfo;

use crate::support::bridge::{Amqp, World, metric};
use crate::support::faults::{create_sessions, publish_events, set_key, test_logs};
use crate::support::rabbit_nodes::{self, Node};
use crate::support::wait_for;

/// `toml` (a World configuration) with its `[amqp] url` set to `url`.
pub(crate) fn on_broker(toml: &str, url: &str) -> String {
    set_key(toml, "url", &format!("\"{url}\""))
}

/// The World's receiver configuration for another partner application `app`, on `url`, with its own state_dir.
fn receiver_of(world: &World, app: &ApplicationInfo, url: &str) -> String {
    let partner = &world.partner_app;
    let toml = world
        .receiver_toml(false)
        .replace(&partner.application_id, &app.application_id)
        .replace(partner.api_key.expose(), app.api_key.expose())
        .replace(&partner.workflows.user, &app.workflows.user)
        .replace(&partner.workflows.business, &app.workflows.business);
    let toml = set_key(
        &toml,
        "state_dir",
        &format!("\"{}/receiver-{}\"", world.dir.path().display(), app.name),
    );
    on_broker(&toml, url)
}

/// A `[[issuer.partners]]` entry like the World's, for `app`, with its tokens on `url`.
fn partner_entry(world: &World, app: &ApplicationInfo, url: &str) -> String {
    format!(
        r#"
[[issuer.partners]]
name = "{name}"
application_id = "{id}"
ttl_seconds = 3600
statuses = ["Approved", "In Review", "Declined"]
session_kinds = ["user", "business"]
public_keys = ["{public}"]
tokens_url = "{url}"
"#,
        name = app.name,
        id = app.application_id,
        public = world.receiver_key.verifying_key().to_base64(),
    )
}

/// Imports the sandbox has counted into `application_id`, per source session.
pub(crate) async fn imports_into(world: &World, application_id: &str) -> BTreeMap<String, u64> {
    world
        .control
        .stats()
        .await
        .expect("sandbox stats")
        .imports
        .into_iter()
        .filter(|i| i.application_id == application_id)
        .map(|i| (i.source_session_id, i.count))
        .collect()
}

/// Waits until `application_id` has imported every one of `sessions`.
pub(crate) async fn wait_imported(
    world: &World,
    application_id: &str,
    sessions: &[String],
    limit: Duration,
) {
    wait_for(
        &format!("{} sessions imported into {application_id}", sessions.len()),
        limit,
        || async {
            let counts = imports_into(world, application_id).await;
            sessions
                .iter()
                .all(|s| counts.contains_key(s))
                .then_some(())
        },
    )
    .await;
}

/// Every session of `sessions` imported exactly once into `application_id`, and nothing else.
pub(crate) async fn assert_once_into(world: &World, application_id: &str, sessions: &[String]) {
    let counts = imports_into(world, application_id).await;
    let expected: BTreeMap<String, u64> = sessions.iter().map(|s| (s.clone(), 1)).collect();
    assert_eq!(counts, expected, "imports into {application_id}");
}

/// The bridge's queues on a partner's broker (the receiver's, and the issuer's reshare queue there): nothing
/// waiting, nothing dead-lettered.
async fn assert_broker_clean(world: &World, url: &str) {
    let amqp = Amqp::connect_to(url).await;
    let names = &world.names;
    let mut queues = Vec::new();
    for queue in [names.issuer_reshare_queue(), names.receiver_tokens_queue()] {
        queues.push(Names::retry_queue(&queue));
        queues.push(Names::dead_queue(&queue));
        queues.push(queue);
    }
    queues.push(Names::dead_queue(&world.results_queue()));
    for queue in &queues {
        assert_eq!(amqp.depth(queue).await, 0, "{queue} on {url}");
    }
    amqp.close().await;
}

/// Deletes this world's queues and exchanges on a partner's broker.
pub(crate) async fn cleanup_broker(world: &World, url: &str) {
    let amqp = Amqp::connect_to(url).await;
    let _ = topology::delete(&amqp.channel, &world.topology()).await;
    amqp.close().await;
}

pub(crate) async fn separate(i: usize) -> &'static Node {
    tokio::task::spawn_blocking(move || rabbit_nodes::separate(i))
        .await
        .expect("extra broker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_expire_on_the_partners_broker_are_reshared_there_and_imported_once() {
    test_logs();
    const SESSIONS: usize = 6;
    let partner_broker = separate(0).await.amqp_url();
    let world = World::new("brokers-reshare").await;
    let receiver_config = world.config(&on_broker(&world.receiver_toml(false), &partner_broker));
    // The issuer's own broker is the machine's; its tokens go to the partner's.
    let issuer_config = world.config(&world.issuer_toml().replacen(
        "[issuer]\nenabled = true\n",
        &format!("[issuer]\nenabled = true\ntokens_url = \"{partner_broker}\"\n"),
        1,
    ));
    // The receiver has run once (its queue exists on its broker) and is down now.
    world
        .start(receiver_config.clone())
        .await
        .stop()
        .await
        .unwrap();
    let issuer = world.start(issuer_config).await;
    let amqp = Amqp::connect().await;
    let remote = Amqp::connect_to(&partner_broker).await;

    let sessions = publish_events(
        &world,
        &amqp,
        &create_sessions(&world, SESSIONS, "reshare").await,
    )
    .await;
    let queue = world.names.receiver_tokens_queue();
    wait_for(
        "every token waiting on the partner's broker",
        Duration::from_secs(30),
        || async { (remote.depth(&queue).await as usize == SESSIONS).then_some(()) },
    )
    .await;

    // Past the tokens' one-hour TTL (on Didit's clock), the receiver comes back: every token is refused as expired,
    // and its reshare request goes out on the partner's broker.
    world.control.advance_clock(3700).await.unwrap();
    let receiver = world.start(receiver_config).await;
    wait_imported(
        &world,
        &world.partner_app.application_id,
        &sessions,
        Duration::from_secs(60),
    )
    .await;
    let stats = world.control.stats().await.unwrap();
    assert_eq!(stats.rejected("share_token_expired"), SESSIONS as u64);
    assert_eq!(stats.shares, 2 * SESSIONS as u64, "one fresh token each");
    assert_eq!(
        metric(
            &issuer.metrics().encode(),
            "partner_bridge_reshare_requests_total{direction=\"received\"}"
        ),
        SESSIONS as f64
    );
    receiver.stop().await.unwrap();
    issuer.stop().await.unwrap();
    assert_once_into(&world, &world.partner_app.application_id, &sessions).await;
    assert_broker_clean(&world, &partner_broker).await;
    for dead in [
        world.names.issuer_onboarding_queue(),
        world.names.issuer_reshare_queue(),
    ] {
        assert_eq!(amqp.depth(&Names::dead_queue(&dead)).await, 0, "{dead}");
    }

    remote.close().await;
    amqp.close().await;
    cleanup_broker(&world, &partner_broker).await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_whose_broker_stops_waits_alone_and_finishes_when_it_returns() {
    test_logs();
    const BEFORE: usize = 4;
    const DURING: usize = 8;
    let (b_node, c_node) = (separate(0).await, separate(1).await);
    let (b_broker, c_broker) = (b_node.amqp_url(), c_node.amqp_url());
    let world = World::new("brokers-per-partner").await;
    let bank_b = world.control.create_application("bank-b").await.unwrap();
    let bank_c = world.control.create_application("bank-c").await.unwrap();

    // Partner A (`sponsor-bank`) on the issuer's own broker, B and C each on a broker of its own. Partner C's
    // broker stays down for a while: its retries must outlast that (the event's attempts are counted as for any
    // unconfirmed publish).
    let issuer_toml = format!(
        "{}{}{}",
        world.issuer_toml(),
        partner_entry(&world, &bank_b, &b_broker),
        partner_entry(&world, &bank_c, &c_broker)
    );
    let issuer_toml = set_key(&issuer_toml, "max_attempts", "300");
    let issuer_toml = set_key(&issuer_toml, "retry_delay_ms", "1000");
    let issuer = world.start(world.config(&issuer_toml)).await;
    let receivers = [
        world.start_receiver(false).await,
        world
            .start(world.config(&receiver_of(&world, &bank_b, &b_broker)))
            .await,
        world
            .start(world.config(&receiver_of(&world, &bank_c, &c_broker)))
            .await,
    ];
    let apps = [
        world.partner_app.application_id.clone(),
        bank_b.application_id.clone(),
        bank_c.application_id.clone(),
    ];
    let amqp = Amqp::connect().await;

    let created = create_sessions(&world, BEFORE + DURING, "per-partner").await;
    let first = publish_events(&world, &amqp, &created[..BEFORE]).await;
    for app in &apps {
        wait_imported(&world, app, &first, Duration::from_secs(60)).await;
    }

    // Partner C's broker stops mid-stream.
    let guard = c_node.exclusive().await;
    c_node.stop_app().await;
    let rest = publish_events(&world, &amqp, &created[BEFORE..]).await;
    let all: Vec<String> = first.iter().chain(&rest).cloned().collect();
    for app in &apps[..2] {
        wait_imported(&world, app, &all, Duration::from_secs(60)).await;
    }
    assert_eq!(
        imports_into(&world, &apps[2]).await.len(),
        BEFORE,
        "nothing reaches bank-c while its broker is down"
    );
    let link = "issuer_tokens:bank-c";
    let reasons = wait_for(
        "the issuer to report bank-c's broker down",
        Duration::from_secs(30),
        || async {
            let reasons = issuer.health().check().err()?;
            let connected = metric(
                &issuer.metrics().encode(),
                &format!("partner_bridge_amqp_connected{{pipeline=\"{link}\"}}"),
            );
            (connected == 0.0 && reasons.iter().any(|r| r.contains(link))).then_some(reasons)
        },
    )
    .await;
    // Only bank-c's links are down: bank-b's and the default one (sponsor-bank's) are up.
    assert!(
        reasons.iter().all(|r| r.contains("bank-c")),
        "only bank-c's links are down: {reasons:?}"
    );
    for up in [
        "issuer_tokens",
        "issuer_tokens:bank-b",
        "issuer_reshare:bank-b",
    ] {
        assert_eq!(
            metric(
                &issuer.metrics().encode(),
                &format!("partner_bridge_amqp_connected{{pipeline=\"{up}\"}}")
            ),
            1.0,
            "{up}"
        );
    }

    // Its broker returns: bank-c gets the rest, once each.
    c_node.start_app().await;
    drop(guard);
    wait_imported(&world, &apps[2], &all, Duration::from_secs(120)).await;

    // An erasure notice for one session goes to each partner on its own broker, beside its tokens, and each
    // acknowledgement comes back from there (the receivers publish it on their own broker).
    let out = partner_bridge::commands::notify(
        &world.config(&issuer_toml),
        &all[0],
        partner_bridge::envelope::NoticeKind::Erasure,
        None,
        None,
    )
    .await
    .expect("notify");
    assert!(out.contains("to 3 recipient(s)"), "{out}");
    assert!(!out.contains("not confirmed"), "{out}");
    wait_for(
        "an acknowledgement from each partner's broker",
        Duration::from_secs(60),
        || async {
            let text = issuer.metrics().encode();
            ["sponsor-bank", "bank-b", "bank-c"]
                .iter()
                .all(|peer| {
                    metric(
                        &text,
                        &format!(
                            "partner_bridge_notices_total{{peer=\"{peer}\",event=\"acknowledged\"}}"
                        ),
                    ) == 1.0
                })
                .then_some(())
        },
    )
    .await;
    for running in receivers {
        running.stop().await.unwrap();
    }
    issuer.stop().await.unwrap();
    for app in &apps {
        assert_once_into(&world, app, &all).await;
    }
    for url in [&b_broker, &c_broker] {
        assert_broker_clean(&world, url).await;
    }
    for queue in [
        world.names.issuer_onboarding_queue(),
        world.names.issuer_reshare_queue(),
        world.names.receiver_tokens_queue(),
    ] {
        for q in [Names::retry_queue(&queue), Names::dead_queue(&queue), queue] {
            assert_eq!(amqp.depth(&q).await, 0, "{q}");
        }
    }

    amqp.close().await;
    for url in [&b_broker, &c_broker] {
        cleanup_broker(&world, url).await;
    }
    world.cleanup().await;
}

/// `partner-bridge check-config` on `toml`: exit code, stdout, stderr.
fn check_config(world: &World, toml: &str) -> (i32, String, String) {
    let path = world.dir.path().join("check.toml");
    std::fs::write(&path, toml).unwrap();
    let out = std::process::Command::new(crate::support::faults::BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_partners_broker_that_is_not_an_amqp_url_exits_64_naming_the_partner() {
    let world = World::new("brokers-config").await;
    let bank_b = world.control.create_application("bank-b").await.unwrap();
    let bank_c = world.control.create_application("bank-c").await.unwrap();
    let missing = world.dir.path().join("no-such-url-file");
    let bad = format!(
        "{}{}{}",
        world.issuer_toml(),
        partner_entry(&world, &bank_b, "http://broker-b:5672/"),
        partner_entry(&world, &bank_c, "unused").replace(
            "tokens_url = \"unused\"",
            &format!("tokens_url_file = \"{}\"", missing.display())
        ),
    );
    let (code, _, stderr) = check_config(&world, &bad);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("`issuer.partners[1].tokens_url`: must be a URL starting with amqp://"),
        "{stderr}"
    );
    assert!(
        stderr.contains("`issuer.partners[2].tokens_url_file`"),
        "{stderr}"
    );

    // A valid one: the partner's broker password never shows.
    let good = format!(
        "{}{}",
        world.issuer_toml(),
        partner_entry(&world, &bank_b, "amqps://bank:hunter2@broker-b:5671/%2f"),
    );
    let (code, stdout, stderr) = check_config(&world, &good);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("broker-b"), "{stdout}");
    assert!(!stdout.contains("hunter2") && !stderr.contains("hunter2"));
    world.cleanup().await;
}
