//! Trust boundaries of `reshare.request` (issue #9 item 2): a fresh token lets Didit clone personal data into the
//! asking application, so the issuer honours a request only when it is signed by that partner's receiver key, the
//! session was shared with that partner, and the partner's policy still accepts what Didit says the session is now.
//!
//! Each test runs the real issuer in-process against the sandbox and the real broker, publishes requests to the
//! reshare exchange as anyone with publish rights could, and reads the verdict from `<prefix>.issuer.reshare.dead`
//! (`x-pb-reason`) and from the sandbox's share count (`GET /sandbox/stats` `shares`), which moves only when Didit
//! minted a token.
//!
//! Old code: the issuer read neither `x-pb-signature` nor its share ledger's existence nor the policy — every request
//! below was honoured with a fresh token (the share count moved, no dead letter appeared), so each test fails there.

use std::process::Command;
use std::time::Duration;

use partner_bridge::amqp::Names;
use partner_bridge::app::Running;
use partner_bridge::didit::wire::SessionKind;
use partner_bridge::envelope::{ReshareRequest, ShareTokenEnvelope, SigningKey, VerifyingKey};

use crate::support::bridge::{Amqp, Got, World, metric_of};
use crate::support::t_receiver::{
    Tap, declare_issuer_queues, drain_n, hand_token, publish_signed, receiver_toml_with,
};
use crate::support::wait_for;

const WAIT: Duration = Duration::from_secs(30);

fn request(world: &World, session: &str, original_message_id: &str) -> Vec<u8> {
    serde_json::to_vec(&ReshareRequest {
        kind: "reshare.request".into(),
        source_session_id: session.to_string(),
        for_application_id: world.partner_app.application_id.clone(),
        reason: "token_expired".into(),
        attempt: 1,
        original_message_id: original_message_id.to_string(),
    })
    .unwrap()
}

/// Publishes a request body to the issuer's reshare routing key with these headers.
async fn send(world: &World, amqp: &Amqp, body: &[u8], headers: &[(&str, &str)]) {
    amqp.publish(
        &world.names.reshare_exchange(),
        &Names::reshare_key(&world.issuer_app.application_id),
        body,
        headers,
    )
    .await;
}

/// Publishes a request signed by `key` (its own key id, unless `claimed_key_id` names another).
async fn send_signed(
    world: &World,
    amqp: &Amqp,
    body: &[u8],
    key: &SigningKey,
    claimed_key_id: Option<&str>,
) {
    let signature = key.sign(body);
    let key_id = claimed_key_id.unwrap_or(key.key_id());
    send(
        world,
        amqp,
        body,
        &[("x-pb-signature", &signature), ("x-pb-key-id", key_id)],
    )
    .await;
}

async fn shares(world: &World) -> u64 {
    world.control.stats().await.expect("sandbox stats").shares
}

/// Waits for the next dead-lettered request and checks its reason.
async fn expect_dead(world: &World, amqp: &Amqp, reason: &str) -> Got {
    let dead = Names::dead_queue(&world.names.issuer_reshare_queue());
    let mut copies = drain_n(amqp, &dead, 1, WAIT).await;
    assert_eq!(copies.len(), 1, "one dead letter at a time");
    let copy = copies.remove(0);
    assert_eq!(
        copy.header("x-pb-reason"),
        Some(reason),
        "detail: {:?}",
        copy.header("x-pb-detail")
    );
    copy
}

/// Shares one session with the partner through an `onboarding.finished` event; answers the token's envelope.
async fn share_once(
    world: &World,
    amqp: &Amqp,
    tap: &Tap,
    status: &str,
    seen: usize,
) -> (String, ShareTokenEnvelope) {
    let session = world.session(SessionKind::User, status, "user-t").await;
    world
        .publish_event(amqp, &world.event(&session, SessionKind::User, status))
        .await;
    let tokens = tap.wait_count(seen + 1, WAIT).await;
    let envelope: ShareTokenEnvelope = serde_json::from_slice(&tokens[seen].got.body).unwrap();
    assert_eq!(envelope.source_session_id, session);
    (session, envelope)
}

async fn start_issuer(world: &World, toml: &str) -> (Running, Tap) {
    let issuer = world.start(world.config(toml)).await;
    let tap = Tap::start(
        &world.names.tokens_exchange(),
        &Names::token_key(&world.partner_app.application_id),
    )
    .await;
    (issuer, tap)
}

fn dead_lettered(world: &World, reason: &str) -> String {
    format!(
        "partner_bridge_dead_lettered_total{{queue=\"{}\",reason=\"{reason}\"}}",
        world.names.issuer_reshare_queue()
    )
}

/// Faults injected: a request with no signature, one signed by a stranger's key (under its own key id, and claiming
/// the partner's key id), and one whose body was altered after the partner signed it. Each is dead-lettered
/// (`unsigned`, `bad_signature` ×3) and Didit mints nothing; then the partner's own correctly signed request is
/// honoured with a fresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_unsigned_reshare_requests_mint_nothing_and_a_signed_one_is_honoured() {
    let world = World::new("rt-sig").await;
    let amqp = Amqp::connect().await;
    let (issuer, tap) = start_issuer(&world, &world.issuer_toml()).await;
    let (session, first) = share_once(&world, &amqp, &tap, "Approved", 0).await;
    assert_eq!(shares(&world).await, 1);
    let body = request(&world, &session, &first.message_id);

    send(&world, &amqp, &body, &[]).await;
    expect_dead(&world, &amqp, "unsigned").await;
    assert_eq!(
        shares(&world).await,
        1,
        "an unsigned request minted a token"
    );

    let stranger = SigningKey::generate();
    send_signed(&world, &amqp, &body, &stranger, None).await;
    expect_dead(&world, &amqp, "bad_signature").await;
    send_signed(
        &world,
        &amqp,
        &body,
        &stranger,
        Some(world.receiver_key.key_id()),
    )
    .await;
    expect_dead(&world, &amqp, "bad_signature").await;
    // The partner's signature over another body (a request for another session, replayed with this body).
    let other = request(&world, "another-session", &first.message_id);
    let signature = world.receiver_key.sign(&other);
    send(
        &world,
        &amqp,
        &body,
        &[
            ("x-pb-signature", &signature),
            ("x-pb-key-id", world.receiver_key.key_id()),
        ],
    )
    .await;
    let copy = expect_dead(&world, &amqp, "bad_signature").await;
    assert_eq!(copy.body, body, "the dead letter keeps the exact request");
    assert_eq!(shares(&world).await, 1, "a forged request minted a token");
    assert_eq!(
        tap.all().len(),
        1,
        "no token published for a refused request"
    );

    // The partner's own signed request: a fresh token for the same session.
    send_signed(&world, &amqp, &body, &world.receiver_key, None).await;
    let tokens = tap.wait_count(2, WAIT).await;
    let fresh: ShareTokenEnvelope = serde_json::from_slice(&tokens[1].got.body).unwrap();
    assert_eq!(fresh.source_session_id, session);
    assert_ne!(fresh.message_id, first.message_id);
    assert_eq!(fresh.event_id, first.event_id);
    assert_eq!(shares(&world).await, 2);

    assert_eq!(metric_of(&issuer, &dead_lettered(&world, "unsigned")), 1.0);
    assert_eq!(
        metric_of(&issuer, &dead_lettered(&world, "bad_signature")),
        3.0
    );
    let dead = Names::dead_queue(&world.names.issuer_reshare_queue());
    assert_eq!(amqp.depth(&dead).await, 0);

    drop(tap);
    amqp.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

/// Faults injected: correctly signed requests (1) for a session Didit has declined since it was shared with a partner
/// that receives only `Approved` (`policy_refused`), and (2) for an Approved session of this issuer that was never
/// shared with the partner (`not_shared`). Didit mints nothing for either; the share count stays put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_policy_and_never_shared_sessions_are_not_reshared() {
    let world = World::new("rt-policy").await;
    let amqp = Amqp::connect().await;
    let toml = world.issuer_toml().replacen(
        r#"statuses = ["Approved", "In Review", "Declined"]"#,
        r#"statuses = ["Approved"]"#,
        1,
    );
    assert_ne!(toml, world.issuer_toml());
    let (issuer, tap) = start_issuer(&world, &toml).await;

    // Shared while Approved, declined at Didit afterwards: the partner no longer receives it.
    let (declined, first) = share_once(&world, &amqp, &tap, "Approved", 0).await;
    world
        .control
        .set_status(&declined, "Declined")
        .await
        .unwrap();
    let body = request(&world, &declined, &first.message_id);
    send_signed(&world, &amqp, &body, &world.receiver_key, None).await;
    expect_dead(&world, &amqp, "policy_refused").await;
    assert_eq!(shares(&world).await, 1, "a declined session was reshared");

    // A real, Approved session of this issuer that the partner never received.
    let never = world.session(SessionKind::User, "Approved", "user-n").await;
    let body = request(&world, &never, "a-guessed-message-id");
    send_signed(&world, &amqp, &body, &world.receiver_key, None).await;
    expect_dead(&world, &amqp, "not_shared").await;
    assert_eq!(shares(&world).await, 1, "a never-shared session was shared");
    assert_eq!(tap.all().len(), 1);

    wait_for("refusals counted", WAIT, || async {
        (metric_of(&issuer, &dead_lettered(&world, "policy_refused")) == 1.0
            && metric_of(&issuer, &dead_lettered(&world, "not_shared")) == 1.0)
            .then_some(())
    })
    .await;

    drop(tap);
    amqp.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

/// Fault injected: the partner has no `public_keys` configured. `check-config` (the real binary) warns on stderr,
/// and even a signed request from it is dead-lettered `no_partner_key` without a share; with
/// `issuer.allow_unsigned_reshare = true` the same request is honoured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_without_keys_cannot_reshare_unless_explicitly_allowed() {
    let world = World::new("rt-nokey").await;
    let amqp = Amqp::connect().await;
    let public = format!(
        "public_keys = [\"{}\"]\n",
        world.receiver_key.verifying_key().to_base64()
    );
    let keyless = world.issuer_toml().replacen(&public, "", 1);
    assert_ne!(keyless, world.issuer_toml());

    let path = world.dir.path().join("keyless.toml");
    std::fs::write(&path, &keyless).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_partner-bridge"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("issuer.partners[0] (sponsor-bank) has no public_keys"),
        "{stderr}"
    );
    let path = world.dir.path().join("keyed.toml");
    std::fs::write(&path, world.issuer_toml()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_partner-bridge"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{out:?}"
    );

    let (issuer, tap) = start_issuer(&world, &keyless).await;
    let (session, first) = share_once(&world, &amqp, &tap, "Approved", 0).await;
    let body = request(&world, &session, &first.message_id);
    send_signed(&world, &amqp, &body, &world.receiver_key, None).await;
    expect_dead(&world, &amqp, "no_partner_key").await;
    assert_eq!(shares(&world).await, 1);
    issuer.stop().await.unwrap();

    let allowed = keyless.replacen(
        "max_reshares = 3",
        "max_reshares = 3\nallow_unsigned_reshare = true",
        1,
    );
    let issuer = world.start(world.config(&allowed)).await;
    send(&world, &amqp, &body, &[]).await;
    tap.wait_count(2, WAIT).await;
    assert_eq!(shares(&world).await, 2);

    drop(tap);
    amqp.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

/// The receiver side: an expired token (the fault: `expires_at` in the past) makes the real receiver publish a
/// `reshare.request` signed with `receiver.signing_key` — `x-pb-signature` over the exact body, `x-pb-key-id` its
/// key id — that verifies against the public key an issuer configures for it. Without a signing key (the same
/// receiver, key removed) the request goes out unsigned, which the issuer would refuse as `unsigned`.
/// Old code: no headers at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiver_signs_its_reshare_requests_with_its_own_key() {
    let world = World::new("rt-rx").await;
    let amqp = Amqp::connect().await;
    declare_issuer_queues(&world, &amqp).await;
    let receiver = world.start_receiver(false).await;

    let mut envelope = hand_token(&world, SessionKind::User, "Approved", Some("late")).await;
    envelope.expires_at = chrono::Utc::now() - chrono::Duration::seconds(30);
    publish_signed(&world, &amqp, &envelope).await;
    let requests = drain_n(&amqp, &world.names.issuer_reshare_queue(), 1, WAIT).await;
    assert_eq!(requests.len(), 1);
    let got = &requests[0];
    let request: ReshareRequest = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(request.source_session_id, envelope.source_session_id);
    assert_eq!(got.header("x-pb-key-id"), Some(world.receiver_key.key_id()));
    let signature = got.header("x-pb-signature").expect("signed");
    let public =
        VerifyingKey::from_base64(&world.receiver_key.verifying_key().to_base64()).unwrap();
    public
        .verify(&got.body, signature)
        .expect("the signature covers the exact body");
    assert!(
        world
            .key
            .verifying_key()
            .verify(&got.body, signature)
            .is_err(),
        "signed with the receiver's key, not the issuer's"
    );
    receiver.stop().await.unwrap();

    // Without receiver.signing_key: unsigned (and check-config / the startup log warn about it).
    let line = format!("signing_key = \"{}\"\n", world.receiver_key.to_base64());
    let unsigned_toml = receiver_toml_with(&world, false, &[]).replacen(&line, "", 1);
    assert!(!unsigned_toml.contains(&world.receiver_key.to_base64()));
    let config = world.config(&unsigned_toml);
    assert!(
        config
            .warnings()
            .iter()
            .any(|w| w.contains("receiver.signing_key_file is not set")),
        "{:?}",
        config.warnings()
    );
    let receiver = world.start(config).await;
    let mut envelope = hand_token(&world, SessionKind::User, "Approved", Some("late2")).await;
    envelope.expires_at = chrono::Utc::now() - chrono::Duration::seconds(30);
    publish_signed(&world, &amqp, &envelope).await;
    let requests = drain_n(&amqp, &world.names.issuer_reshare_queue(), 1, WAIT).await;
    assert_eq!(requests[0].header("x-pb-signature"), None);
    assert_eq!(requests[0].header("x-pb-key-id"), None);

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

/// Bad key material exits 64 naming the key (the binary turns a `ConfigError` into exit 64 with its key): a partner
/// public key that is not base64 or not 32 bytes, an unreadable `public_key_files` entry, a receiver signing key
/// that is no key. Listing two partner keys (rotation) is valid.
#[tokio::test]
async fn bad_reshare_keys_are_refused_naming_the_key() {
    let world = World::new("rt-cfg").await;
    let public = world.receiver_key.verifying_key().to_base64();
    let issuer = world.issuer_toml();
    let invalid = |toml: &str| {
        partner_bridge::config::Config::from_toml(toml)
            .expect("parses")
            .validate()
            .expect_err("invalid")
            .key
    };
    let with_keys = |keys: &str| issuer.replacen(&format!("[\"{public}\"]"), keys, 1);
    assert_eq!(
        invalid(&with_keys(r#"["not base64!"]"#)),
        "issuer.partners[0].public_keys[0]"
    );
    assert_eq!(
        invalid(&with_keys(&format!(r#"["{public}", "AAAA"]"#))),
        "issuer.partners[0].public_keys[1]"
    );
    let rotated = SigningKey::generate().verifying_key().to_base64();
    let two = world.config(&with_keys(&format!(r#"["{public}", "{rotated}"]"#)));
    assert_eq!(two.partner_public_keys(0).unwrap().len(), 2);
    assert!(two.warnings().is_empty(), "{:?}", two.warnings());
    let missing = issuer.replacen(
        "share_vendor_data = true\n",
        "share_vendor_data = true\npublic_key_files = [\"/nonexistent/sponsor-bank.pub\"]\n",
        1,
    );
    assert_eq!(invalid(&missing), "issuer.partners[0].public_key_files[0]");

    let receiver = world.receiver_toml(false);
    let bad = receiver.replacen(&world.receiver_key.to_base64(), "c2hvcnQ=", 1);
    assert_eq!(invalid(&bad), "receiver.signing_key");
    // The environment override, as for every secret.
    let env = std::collections::HashMap::from([(
        "PARTNER_BRIDGE__RECEIVER__SIGNING_KEY".to_string(),
        world.receiver_key.to_base64(),
    )]);
    let from_env = partner_bridge::config::Config::load(None, env).expect("loads");
    assert_eq!(
        from_env
            .receiver_signing_key()
            .unwrap()
            .expect("a key from the environment")
            .key_id(),
        world.receiver_key.key_id()
    );
    world.cleanup().await;
}
