//! Every key rotates without downtime (issue #9 item 6): the issuer's signing key, the receiver's reshare key, the
//! webhook secret and the Didit API key, each rotated while messages flow, with nothing lost and every session
//! imported exactly once. Plus the key material checks at start: a public key where a private signing key belongs,
//! and a bad line in a key-set file, both exit 64 naming the key.
//!
//! The bridges run in-process against the sandbox and the real broker; keys are made and rotated with the real
//! binary's `keygen --out` / `keygen --rotate`, and installed the way a mounted secret changes: the new file is
//! written next to the old one and renamed over it.
//!
//! Old code: key files were read once at start and held one key (a second line was an error), there was no
//! `keygen --rotate`, no `next_secret_file` and no `public_keys` for a receiver's issuer, and the API key file was
//! re-read only while a pipeline was paused on credentials; each test below fails there.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use partner_bridge::amqp::Names;
use partner_bridge::didit::signature;
use partner_bridge::didit::wire::SessionKind;
use partner_bridge::envelope::SigningKey;
use partner_bridge::sandbox::{FaultEndpoint, FaultSettings};

use crate::support::bridge::{Amqp, Collector, World, metric};
use crate::support::faults::{
    BIN, Binary, assert_exactly_once, assert_no_secrets_in_log, binary_config, both_toml,
    create_sessions, imported_sessions, log_tail, publish_sessions, showing_log, wait_settled,
};
use crate::support::t_receiver::Tap;
use crate::support::wait_for;
use crate::support::webhooks::{body, bytes_of, post};

const WAIT: Duration = Duration::from_secs(60);

/// Runs `partner-bridge keygen ARGS…` and returns its standard output.
fn keygen(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("keygen")
        .args(args)
        .output()
        .expect("run keygen");
    assert!(
        out.status.success(),
        "keygen {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Replaces `to` with a copy of `from` atomically (written beside it, then renamed), as a secret volume changes.
fn install(from: &Path, to: &Path) {
    let tmp = to.with_extension("installing");
    std::fs::copy(from, &tmp).expect("copy the new key file");
    std::fs::rename(&tmp, to).expect("rename the new key file into place");
}

/// Writes `text` into `to` atomically.
fn install_text(text: &str, to: &Path) {
    let tmp = to.with_extension("installing");
    std::fs::write(&tmp, text).expect("write the new file");
    std::fs::rename(&tmp, to).expect("rename the new file into place");
}

/// `keygen --rotate` on a staging copy of `live` (which a bridge reads): answers the staging directory. Nothing
/// the bridges read has changed yet.
fn rotate_staged(live: &Path, stage: &Path) -> PathBuf {
    std::fs::create_dir_all(stage).unwrap();
    for name in ["signing.key", "signing.pub"] {
        std::fs::copy(live.join(name), stage.join(name)).unwrap();
    }
    let printed = keygen(&["--rotate", stage.to_str().unwrap()]);
    assert!(printed.contains("2 keys; the newest signs"), "{printed}");
    stage.to_path_buf()
}

/// The key ids (`x-pb-key-id`) of every tapped message, in order.
fn key_ids(tap: &Tap) -> Vec<String> {
    tap.all()
        .iter()
        .map(|t| t.got.header("x-pb-key-id").unwrap_or("").to_string())
        .collect()
}

/// The key id of the last key of a key-set file (the one that signs).
fn signer_id(key_file: &Path) -> String {
    let text = std::fs::read_to_string(key_file).unwrap();
    let last = text
        .lines()
        .rfind(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .unwrap();
    SigningKey::from_base64(last).unwrap().key_id().to_string()
}

/// Issuer signing key, rotated mid-stream the safe way round: `keygen --rotate` on a staging copy, the receiver's
/// public key file gets the new set (old and new key) first, then the issuer's key set. Tokens signed before the
/// switch (old key) and after it (new key) are all accepted; every session is imported exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issuer_signing_key_rotates_while_tokens_flow() {
    const BATCH: usize = 10;
    let world = World::new("rot-sign").await;
    let live = world.dir.path().join("issuer-keys");
    keygen(&["--out", live.to_str().unwrap()]);
    let old_id = signer_id(&live.join("signing.key"));
    let receiver_pub = world.dir.path().join("fintech-a.pub");
    std::fs::copy(live.join("signing.pub"), &receiver_pub).unwrap();

    let issuer_toml = world.issuer_toml().replacen(
        &format!("signing_key = \"{}\"", world.key.to_base64()),
        &format!(
            "signing_key_file = \"{}\"",
            live.join("signing.key").display()
        ),
        1,
    );
    let receiver_toml = world.receiver_toml(false).replacen(
        &format!("public_key = \"{}\"", world.key.verifying_key().to_base64()),
        &format!("public_key_file = \"{}\"", receiver_pub.display()),
        1,
    );
    assert!(issuer_toml.contains("signing_key_file") && receiver_toml.contains("public_key_file"));
    let receiver = world.start(world.config(&receiver_toml)).await;
    let issuer = world.start(world.config(&issuer_toml)).await;
    let amqp = Amqp::connect().await;
    let results = Collector::start(&world.results_queue()).await;
    let tap = Tap::start(
        &world.names.tokens_exchange(),
        &Names::token_key(&world.partner_app.application_id),
    )
    .await;

    let mut sessions = publish_sessions(&world, &amqp, BATCH, "before").await;
    wait_for("a few imports before the rotation", WAIT, || async {
        (imported_sessions(&world).await >= 3).then_some(())
    })
    .await;

    let stage = rotate_staged(&live, &world.dir.path().join("stage"));
    let new_id = signer_id(&stage.join("signing.key"));
    assert_ne!(new_id, old_id);
    install(&stage.join("signing.pub"), &receiver_pub);
    install(&stage.join("signing.key"), &live.join("signing.key"));

    sessions.extend(publish_sessions(&world, &amqp, BATCH, "after").await);
    let expositions = || async { vec![issuer.metrics().encode(), receiver.metrics().encode()] };
    wait_settled(&world, &amqp, &results, &sessions, WAIT, expositions).await;

    let ids = key_ids(&tap);
    let used: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(
        used,
        BTreeSet::from([old_id.as_str(), new_id.as_str()]),
        "tokens signed with the old key before the switch and the new one after it"
    );
    assert_eq!(
        ids.last().map(String::as_str),
        Some(new_id.as_str()),
        "the newest key signs after the rotation"
    );
    let issuer_text = issuer.metrics().encode();
    assert!(
        issuer_text
            .contains("partner_bridge_key_reload_errors_total{key=\"issuer.signing_key_file\"} 0"),
        "the key set was watched and every reload of it succeeded:\n{issuer_text}"
    );

    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    assert_exactly_once(&world, &amqp, &sessions).await;
    amqp.close().await;
    world.cleanup().await;
}

/// Receiver reshare key, rotated mid-stream: tokens that expired while the receiver was down come back as reshare
/// requests one at a time (imports slowed down), and while they flow the issuer's `public_key_files` entry gets the
/// new set, then the receiver's key set. Requests signed with the old and the new key are all honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiver_reshare_key_rotates_while_reshares_flow() {
    const SESSIONS: usize = 12;
    let world = World::new("rot-reshare").await;
    let live = world.dir.path().join("receiver-keys");
    keygen(&["--out", live.to_str().unwrap()]);
    let old_id = signer_id(&live.join("signing.key"));
    let issuer_copy = world.dir.path().join("sponsor-bank.pub");
    std::fs::copy(live.join("signing.pub"), &issuer_copy).unwrap();

    let issuer_toml = world.issuer_toml().replacen(
        &format!(
            "public_keys = [\"{}\"]",
            world.receiver_key.verifying_key().to_base64()
        ),
        &format!("public_key_files = [\"{}\"]", issuer_copy.display()),
        1,
    );
    let receiver_toml = world.receiver_toml(false).replacen(
        &format!("signing_key = \"{}\"", world.receiver_key.to_base64()),
        &format!(
            "signing_key_file = \"{}\"\nconcurrency = 1",
            live.join("signing.key").display()
        ),
        1,
    );
    assert!(issuer_toml.contains("public_key_files") && receiver_toml.contains("signing_key_file"));

    // The receiver has run once (its queue exists) and is down while the tokens are minted.
    world
        .start(world.config(&receiver_toml))
        .await
        .stop()
        .await
        .unwrap();
    let issuer = world.start(world.config(&issuer_toml)).await;
    let amqp = Amqp::connect().await;
    let sessions = publish_sessions(&world, &amqp, SESSIONS, "late").await;
    let queue = world.names.receiver_tokens_queue();
    wait_for("every token waiting for the receiver", WAIT, || async {
        (amqp.depth(&queue).await as usize == SESSIONS).then_some(())
    })
    .await;
    // Past the tokens' one-hour TTL on Didit's clock; each import takes a while, so reshares come one by one.
    world.control.advance_clock(3700).await.unwrap();
    world
        .control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::Import,
            latency_ms: 150,
            ..FaultSettings::default()
        })
        .await
        .unwrap();
    let requests = Tap::start(
        &world.names.reshare_exchange(),
        &Names::reshare_key(&world.issuer_app.application_id),
    )
    .await;
    let receiver = world.start(world.config(&receiver_toml)).await;
    let results = Collector::start(&world.results_queue()).await;

    requests.wait_count(2, WAIT).await;
    let stage = rotate_staged(&live, &world.dir.path().join("stage"));
    let new_id = signer_id(&stage.join("signing.key"));
    install(&stage.join("signing.pub"), &issuer_copy);
    install(&stage.join("signing.key"), &live.join("signing.key"));

    let expositions = || async { vec![issuer.metrics().encode(), receiver.metrics().encode()] };
    wait_settled(&world, &amqp, &results, &sessions, WAIT, expositions).await;
    let ids = key_ids(&requests);
    assert_eq!(ids.len(), SESSIONS, "one reshare request per expired token");
    let used: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(
        used,
        BTreeSet::from([old_id.as_str(), new_id.as_str()]),
        "requests signed with the old key before the switch and the new one after it"
    );
    let received = metric(
        &issuer.metrics().encode(),
        "partner_bridge_reshare_requests_total{direction=\"received\"}",
    );
    assert_eq!(received, SESSIONS as f64);
    assert_eq!(
        amqp.depth(&Names::dead_queue(&world.names.issuer_reshare_queue()))
            .await,
        0
    );

    world.control.clear_faults().await.unwrap();
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    assert_exactly_once(&world, &amqp, &sessions).await;
    amqp.close().await;
    world.cleanup().await;
}

/// Webhook secret rotation: `next_secret_file` is configured from the start (missing: no rotation under way). The
/// operator writes the new secret into it; deliveries signed with the old and the new secret are both accepted
/// while Didit switches; then the new secret moves to `secret_file` and the next file is removed: the new secret
/// alone is accepted. Every accepted delivery's session is imported exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_secret_rotates_with_two_secrets_accepted_meanwhile() {
    let world = World::new("rot-hook").await;
    let (old, new) = ("whsec-old-0123456789", "whsec-new-9876543210");
    let secret_file = world.dir.path().join("webhook.secret");
    let next_file = world.dir.path().join("webhook.next");
    std::fs::write(&secret_file, format!("{old}\n")).unwrap();
    let toml = format!(
        "{}\n[issuer.webhook]\nlisten = \"127.0.0.1:0\"\nsecret_file = \"{}\"\nnext_secret_file = \"{}\"\n",
        both_toml(&world),
        secret_file.display(),
        next_file.display()
    );
    let config = world.config(&toml);
    assert!(
        config
            .warnings()
            .iter()
            .any(|w| w.contains("next_secret_file") && w.contains("missing or empty")),
        "{:?}",
        config.warnings()
    );
    let bridge = world.start(config).await;
    let intake = bridge.webhook_addr().expect("the intake listens");
    let amqp = Amqp::connect().await;
    let results = Collector::start(&world.results_queue()).await;
    let http = crate::support::faults::http();

    let created = create_sessions(&world, 16, "hook").await;
    let mut accepted = Vec::new();
    let mut deliver = async |i: usize, secret: &str| -> u16 {
        let (id, kind, status) = &created[i];
        let mut body = body(id, status, chrono::Utc::now().timestamp());
        body["session_kind"] = serde_json::json!(kind.to_string());
        let headers = vec![("x-signature-v2", signature::sign_v2(secret, &body))];
        let (status, answer) = post(&http, intake, &bytes_of(&body), &headers)
            .await
            .expect("the intake answers");
        if status == 200 {
            accepted.push(id.clone());
        }
        assert!(
            status == 200 || status == 401,
            "delivery {i}: {status} {answer}"
        );
        status
    };
    // Before the rotation: the old secret only.
    for i in 0..4 {
        assert_eq!(deliver(i, old).await, 200);
    }
    assert_eq!(
        deliver(4, new).await,
        401,
        "the new secret is not known yet"
    );
    // During: both.
    install_text(&format!("{new}\n"), &next_file);
    for i in 5..11 {
        let secret = if i % 2 == 0 { old } else { new };
        assert_eq!(
            deliver(i, secret).await,
            200,
            "delivery {i} during the rotation"
        );
    }
    // After: the new secret is the current one, the next file is gone; the old one is refused.
    install_text(&format!("{new}\n"), &secret_file);
    std::fs::remove_file(&next_file).unwrap();
    for i in 11..15 {
        assert_eq!(
            deliver(i, new).await,
            200,
            "delivery {i} after the rotation"
        );
    }
    assert_eq!(deliver(15, old).await, 401, "the old secret is retired");
    assert_eq!(accepted.len(), 14);

    let expositions = || async { vec![bridge.metrics().encode()] };
    wait_settled(&world, &amqp, &results, &accepted, WAIT, expositions).await;
    let text = bridge.metrics().encode();
    assert_eq!(
        metric(
            &text,
            "partner_bridge_webhook_requests_total{outcome=\"accepted\"}"
        ),
        14.0
    );
    bridge.stop().await.unwrap();
    assert_exactly_once(&world, &amqp, &accepted).await;
    amqp.close().await;
    world.cleanup().await;
}

/// Didit API key rotation, through the real binary running both roles, each reading its key from a file. Mid-stream
/// the sandbox issues a second key for each application, the files are rewritten with them, and the old keys are
/// revoked; the bridge switches on its next call (not only when a pipeline pauses), so no call is ever refused and
/// every session is imported exactly once. No key, old or new, appears in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_file_is_reread_on_change_while_calls_flow() {
    const BATCH: usize = 10;
    let world = World::new("rot-apikey").await;
    let issuer_key = world.dir.path().join("issuer.api-key");
    let receiver_key = world.dir.path().join("receiver.api-key");
    let (old_issuer, old_partner) = (
        world.issuer_app.api_key.expose().to_string(),
        world.partner_app.api_key.expose().to_string(),
    );
    std::fs::write(&issuer_key, format!("{old_issuer}\n")).unwrap();
    std::fs::write(&receiver_key, format!("{old_partner}\n")).unwrap();
    let (config, admin) = binary_config(&world, 4, 5);
    let toml = std::fs::read_to_string(&config).unwrap();
    let toml = toml
        .replacen(
            &format!("api_key = \"{old_issuer}\""),
            &format!("api_key_file = \"{}\"", issuer_key.display()),
            1,
        )
        .replacen(
            &format!("api_key = \"{old_partner}\""),
            &format!("api_key_file = \"{}\"", receiver_key.display()),
            1,
        );
    assert!(!toml.contains(&old_issuer) && !toml.contains(&old_partner));
    std::fs::write(&config, toml).unwrap();
    let log = world.dir.path().join("bridge.log");
    let mut bridge = Binary::start(&config, admin, log.clone()).await;
    let amqp = Amqp::connect().await;
    let results = Collector::start(&world.results_queue()).await;

    let mut sessions = publish_sessions(&world, &amqp, BATCH, "before").await;
    showing_log(
        &log,
        wait_for("a few imports before the rotation", WAIT, || async {
            (imported_sessions(&world).await >= 3).then_some(())
        }),
    )
    .await;
    let issuer_new = world
        .control
        .add_key(&world.issuer_app.application_id)
        .await
        .unwrap();
    let receiver_new = world
        .control
        .add_key(&world.partner_app.application_id)
        .await
        .unwrap();
    install_text(&format!("{}\n", issuer_new.expose()), &issuer_key);
    install_text(&format!("{}\n", receiver_new.expose()), &receiver_key);
    // Calls already on the wire with the old key are answered before it is revoked.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for app in [&world.issuer_app, &world.partner_app] {
        world.control.revoke_key(&app.application_id).await.unwrap();
    }

    sessions.extend(publish_sessions(&world, &amqp, BATCH, "after").await);
    showing_log(
        &log,
        wait_settled(&world, &amqp, &results, &sessions, WAIT, || async {
            vec![bridge.metrics().await]
        }),
    )
    .await;
    let stats = world.control.stats().await.unwrap();
    assert_eq!(
        stats.rejected("invalid_api_key"),
        0,
        "no call went out with a revoked key"
    );
    let text = bridge.metrics().await;
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("partner_bridge_didit_requests_total{")
                && l.contains("status=\"401\"")),
        "{text}"
    );

    bridge.terminate();
    let status = bridge.exited_within(Duration::from_secs(20)).await;
    assert!(status.success(), "exit after SIGTERM: {status}");
    showing_log(&log, assert_exactly_once(&world, &amqp, &sessions)).await;
    assert_no_secrets_in_log(&world, &log);
    let written = std::fs::read_to_string(&log).unwrap();
    assert!(
        written.contains("key file changed; reloaded"),
        "{}",
        log_tail(&log)
    );
    for key in [issuer_new.expose(), receiver_new.expose()] {
        assert!(!written.contains(key), "a new API key appears in the log");
    }
    results.stop();
    amqp.close().await;
    world.cleanup().await;
}

// ---- key material at start, through the binary --------------------------------------------------------------

const ISSUER_APP: &str = "dbd20e34-42e9-4f2c-ba91-cf0762016f64";
const PARTNER_APP: &str = "a5f3bca2-46e2-411e-90ef-a580900a57ee";

/// An issuer + receiver configuration: the issuer signs with `signing_key_file`, the receiver trusts
/// `public_key_file`.
fn write_config(dir: &Path, signing_key_file: &Path, public_key_file: &Path) -> PathBuf {
    std::fs::write(dir.join("api.key"), "sk_test_rotation\n").unwrap();
    let text = format!(
        r#"
state_dir = "{dir}/state"
[didit]
base_url = "http://127.0.0.1:1"
application_id = "{ISSUER_APP}"
api_key_file = "{dir}/api.key"
[issuer]
enabled = true
signing_key_file = "{signing}"
[[issuer.partners]]
name = "sponsor-bank"
application_id = "{PARTNER_APP}"
[receiver]
enabled = true
workflow_user = "9f9b1234-aaaa-bbbb-cccc-1234567890ab"
[[receiver.issuers]]
name = "fintech-a"
application_id = "{PARTNER_APP}"
public_key_file = "{public}"
"#,
        dir = dir.display(),
        signing = signing_key_file.display(),
        public = public_key_file.display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn check_config(path: &Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Issue #10 item 2: `signing_key_file` pointing at the `signing.pub` that `keygen` wrote (a public key where the
/// private one belongs — both are 32 bytes of base64) exits 64 naming the key, with this exact message; the right
/// file, and a rotated set of two keys, are valid. Old code: a public key decodes as a seed and was accepted.
#[test]
fn a_public_key_given_as_the_signing_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    keygen(&["--out", keys.to_str().unwrap()]);
    let public = keys.join("signing.pub");
    let id = signer_id(&keys.join("signing.key"));

    let path = write_config(dir.path(), &public, &public);
    let (code, stderr) = check_config(&path);
    assert_eq!(code, 64, "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "error: invalid configuration: `issuer.signing_key_file`: {} line 1: holds a public key (key id {id}), \
             not a private signing key: give the signing.key file `keygen` wrote, not signing.pub",
            public.display()
        )
    );
    assert!(!stderr.contains(&std::fs::read_to_string(&public).unwrap().trim().to_string()));

    // Copied elsewhere (no signing.pub beside it), it is still a key this configuration lists as public.
    let elsewhere = dir.path().join("issuer.key");
    std::fs::copy(&public, &elsewhere).unwrap();
    let (code, stderr) = check_config(&write_config(dir.path(), &elsewhere, &public));
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("`issuer.signing_key_file`"), "{stderr}");
    assert!(stderr.contains("holds a public key"), "{stderr}");

    let (code, stderr) = check_config(&write_config(
        dir.path(),
        &keys.join("signing.key"),
        &public,
    ));
    assert_eq!(code, 0, "{stderr}");
    keygen(&["--rotate", keys.to_str().unwrap()]);
    let (code, stderr) = check_config(&write_config(
        dir.path(),
        &keys.join("signing.key"),
        &public,
    ));
    assert_eq!(code, 0, "a rotated set of two keys is valid: {stderr}");
}

/// A key-set file with a bad line exits 64 naming the config key, the file and the line.
#[test]
fn a_bad_line_in_a_key_set_file_is_refused_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    keygen(&["--out", keys.to_str().unwrap()]);
    let public = dir.path().join("fintech-a.pub");
    let good = std::fs::read_to_string(keys.join("signing.pub")).unwrap();
    std::fs::write(&public, format!("# fintech-a\n{good}c2hvcnQ=\n")).unwrap();
    let (code, stderr) = check_config(&write_config(
        dir.path(),
        &keys.join("signing.key"),
        &public,
    ));
    assert_eq!(code, 64, "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!(
            "error: invalid configuration: `receiver.issuers[0].public_key_file`: {} line 3: not a public key: \
             must decode to 32 bytes (got 5)",
            public.display()
        )
    );
}

/// Upgrade: a token signed by the configured key under the key id earlier versions sent (the first 8 bytes of the
/// key's SHA-256, hex) — one already in the queue when the receiver is upgraded — is imported; the issuer is listed
/// through `public_keys`, beside a key it has not started using yet. A key id that names no configured key is
/// `bad_signature`. Old code: the hex id was the only one; `public_keys` did not exist for a receiver's issuer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_flight_under_the_old_key_id_is_imported_after_the_upgrade() {
    use partner_bridge::envelope;
    use sha2::Digest;

    use crate::support::t_receiver::{body_of, hand_token, publish_token_body};

    let world = World::new("rot-legacy").await;
    let next = SigningKey::generate();
    let toml = world.receiver_toml(false).replacen(
        &format!("public_key = \"{}\"", world.key.verifying_key().to_base64()),
        &format!(
            "public_keys = [\"{}\", \"{}\"]",
            next.verifying_key().to_base64(),
            world.key.verifying_key().to_base64()
        ),
        1,
    );
    let receiver = world.start(world.config(&toml)).await;
    let amqp = Amqp::connect().await;
    let results = Collector::start(&world.results_queue()).await;

    let public_bytes = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        world.key.verifying_key().to_base64(),
    )
    .unwrap();
    let legacy_id = hex::encode(&sha2::Sha256::digest(&public_bytes)[..8]);
    assert_ne!(legacy_id, world.key.key_id());
    let token = hand_token(&world, SessionKind::User, "Approved", Some("legacy")).await;
    let body = body_of(&token);
    let signature = world.key.sign(&body);
    publish_token_body(
        &world,
        &amqp,
        &body,
        &[
            (envelope::HEADER_SIGNATURE, signature.as_str()),
            (envelope::HEADER_KEY_ID, legacy_id.as_str()),
        ],
    )
    .await;
    let got = results.wait_count(1, WAIT).await;
    let result: envelope::ImportResult = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(result.source_session_id, token.source_session_id);
    assert_eq!(result.outcome, envelope::ImportOutcome::Imported);

    let stranger = hand_token(&world, SessionKind::User, "Approved", Some("stranger")).await;
    let body = body_of(&stranger);
    let signature = world.key.sign(&body);
    publish_token_body(
        &world,
        &amqp,
        &body,
        &[
            (envelope::HEADER_SIGNATURE, signature.as_str()),
            (envelope::HEADER_KEY_ID, "0123456789abcdef"),
        ],
    )
    .await;
    let dead = Names::dead_queue(&world.names.receiver_tokens_queue());
    let copies = crate::support::t_receiver::drain_n(&amqp, &dead, 1, WAIT).await;
    assert_eq!(copies[0].header("x-pb-reason"), Some("bad_signature"));
    let detail = copies[0].header("x-pb-detail").unwrap_or_default();
    assert!(detail.contains("0123456789abcdef"), "{detail}");
    assert!(detail.contains(world.key.key_id()), "{detail}");

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}
