//! The receiver pipeline on its own (DESIGN.md §2, §4, §6): a receiver bridge in-process, the sandbox as Didit, the
//! real broker, and share tokens made by hand (minted at the sandbox as the issuer, wrapped in an envelope, signed
//! with the world's key or deliberately not), so that every row of the import table can be produced on purpose.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use partner_bridge::didit::wire::SessionKind;
use partner_bridge::envelope::{ReshareRequest, SigningKey};
use partner_bridge::sandbox::{FaultEndpoint, FaultSettings};
use partner_bridge::secret::ShareToken;

use crate::support::bridge::{Amqp, Got, World};
use crate::support::t_receiver::{
    Tap, body_of, declare_issuer_queues, drain_n, envelope_for, hand_token, import_counts,
    metric_lines, metric_of, mint, publish_signed, publish_signed_body, publish_token_body, readyz,
    receiver_dead_queue, receiver_toml_with, wait_imports_into, with_api_key_file,
};
use crate::support::wait_for;

const WAIT: Duration = Duration::from_secs(15);

/// The fields DESIGN.md §2 gives `import.result`, no more and no fewer.
const RESULT_FIELDS: [&str; 13] = [
    "type",
    "outcome",
    "source_session_id",
    "from_application_id",
    "imported_session_id",
    "session_number",
    "status",
    "session_kind",
    "vendor_data",
    "trust_review",
    "imported_at",
    "reason",
    "agreement_id",
];

fn imports_series(issuer: &str, outcome: &str) -> String {
    format!("partner_bridge_imports_total{{issuer=\"{issuer}\",outcome=\"{outcome}\"}}")
}

fn dead_series(world: &World, reason: &str) -> String {
    format!(
        "partner_bridge_dead_lettered_total{{queue=\"{}\",reason=\"{reason}\"}}",
        world.names.receiver_tokens_queue()
    )
}

fn reasons(dead: &[Got]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for got in dead {
        *out.entry(got.header("x-pb-reason").unwrap_or("<none>").to_string())
            .or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_token_is_reported_with_every_field_of_import_result() {
    let world = World::new("rx-result").await;
    let receiver = world.start_receiver(false).await;
    let amqp = Amqp::connect().await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;

    let envelope = hand_token(
        &world,
        SessionKind::User,
        "Approved",
        Some("issuer-user-42"),
    )
    .await;
    publish_signed(&world, &amqp, &envelope).await;

    let tapped = results.wait_count(1, WAIT).await;
    assert_eq!(tapped.len(), 1);
    let result = &tapped[0];
    assert_eq!(result.routing_key, "import.imported");
    assert_eq!(result.got.kind.as_deref(), Some("import.result"));
    assert_eq!(result.got.app_id.as_deref(), Some("partner-bridge"));
    assert_eq!(result.got.content_type.as_deref(), Some("application/json"));
    assert_eq!(result.got.delivery_mode, Some(2), "published persistent");
    assert!(result.got.message_id.is_some(), "has a message_id");
    assert!(result.got.timestamp.is_some(), "has a timestamp");

    let body = result.got.json();
    let fields: BTreeSet<&str> = body
        .as_object()
        .expect("a JSON object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(fields, RESULT_FIELDS.into_iter().collect());
    assert_eq!(body["type"], "import.result");
    assert_eq!(body["outcome"], "imported");
    assert_eq!(
        body["source_session_id"],
        envelope.source_session_id.as_str()
    );
    assert_eq!(
        body["from_application_id"],
        world.issuer_app.application_id.as_str()
    );
    assert_eq!(body["session_kind"], "user");
    assert_eq!(
        body["status"], "In Review",
        "trust_review false lands in review"
    );
    assert_eq!(body["trust_review"], false);
    assert_eq!(body["vendor_data"], "fintech-a:issuer-user-42");
    assert!(body["reason"].is_null(), "an import has no reason: {body}");
    let imported_at = body["imported_at"].as_str().expect("imported_at");
    let imported_at = DateTime::parse_from_rfc3339(imported_at).expect("RFC 3339");
    assert!(
        (Utc::now() - imported_at.with_timezone(&Utc))
            .num_seconds()
            .abs()
            < 60
    );

    // The session named in the result exists in the partner's application, cloned from the source, with the
    // vendor_data the template rendered (and its entity created).
    let imported_id = body["imported_session_id"]
        .as_str()
        .expect("imported_session_id");
    let session = world.control.session(imported_id).await.unwrap();
    assert_eq!(session.application_id, world.partner_app.application_id);
    assert_eq!(body["session_number"], session.session_number);
    assert_eq!(session.status, "In Review");
    assert_eq!(
        session.vendor_data.as_deref(),
        Some("fintech-a:issuer-user-42")
    );
    assert_eq!(
        session.decision.shared_from_session.as_deref(),
        Some(envelope.source_session_id.as_str())
    );
    let entities = world
        .control
        .entities(&world.partner_app.application_id)
        .await
        .unwrap();
    assert!(
        entities
            .iter()
            .any(|e| e.vendor_data == "fintech-a:issuer-user-42"),
        "the import created the partner's entity: {entities:?}"
    );

    assert_eq!(
        import_counts(&world, &world.partner_app.application_id).await,
        BTreeMap::from([(envelope.source_session_id.clone(), 1)])
    );
    assert_eq!(
        metric_of(&receiver, &imports_series("fintech-a", "imported")),
        1.0
    );
    assert!(amqp.drain(&receiver_dead_queue(&world)).await.is_empty());

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vendor_data_template_renders_every_placeholder_into_the_imported_session() {
    let world = World::new("rx-vendor").await;
    let toml = receiver_toml_with(
        &world,
        true,
        &[(
            "vendor_data",
            "\"{issuer}|{source_session_id}|{source_vendor_data}\"",
        )],
    );
    let receiver = world.start(world.config(&toml)).await;
    let amqp = Amqp::connect().await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;

    let with_vendor = hand_token(&world, SessionKind::User, "Approved", Some("crm-7")).await;
    // The issuer's value is data, not template: placeholders in it stay as they are.
    let odd_vendor = hand_token(
        &world,
        SessionKind::User,
        "Declined",
        Some("crm-{issuer}-{source_session_id}"),
    )
    .await;
    // A partner whose policy withholds the issuer's vendor_data gets no `source_vendor_data`.
    let without_vendor = hand_token(&world, SessionKind::Business, "APPROVED", None).await;
    publish_signed(&world, &amqp, &with_vendor).await;
    publish_signed(&world, &amqp, &without_vendor).await;
    publish_signed(&world, &amqp, &odd_vendor).await;

    let tapped = results.wait_count(3, WAIT).await;
    let expected = [
        (
            &with_vendor,
            format!("fintech-a|{}|crm-7", with_vendor.source_session_id),
            "Approved",
        ),
        (
            &without_vendor,
            format!("fintech-a|{}|", without_vendor.source_session_id),
            "APPROVED",
        ),
        (
            &odd_vendor,
            format!(
                "fintech-a|{}|crm-{{issuer}}-{{source_session_id}}",
                odd_vendor.source_session_id
            ),
            "Declined",
        ),
    ];
    for (envelope, vendor_data, status) in expected {
        let result = tapped
            .iter()
            .map(|t| t.got.json())
            .find(|b| b["source_session_id"] == envelope.source_session_id.as_str())
            .expect("a result for each token");
        assert_eq!(result["outcome"], "imported");
        assert_eq!(result["vendor_data"], vendor_data.as_str());
        assert_eq!(result["trust_review"], true);
        assert_eq!(
            result["status"], status,
            "trust_review keeps the source status"
        );
        let session = world
            .control
            .session(result["imported_session_id"].as_str().unwrap())
            .await
            .unwrap();
        assert_eq!(session.vendor_data.as_deref(), Some(vendor_data.as_str()));
        assert_eq!(session.status, status);
    }

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn didit_saying_already_imported_is_reported_as_the_import_it_was_not_a_failure() {
    let world = World::new("rx-didit-dup").await;
    let amqp = Amqp::connect().await;
    let first = world.start_receiver(false).await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;
    let envelope = hand_token(&world, SessionKind::Business, "DECLINED", Some("biz-1")).await;
    let body = publish_signed(&world, &amqp, &envelope).await;
    let first_result = results.wait_count(1, WAIT).await[0].got.json();
    first.stop().await.unwrap();

    // A receiver that lost its ledger (a fresh state_dir) gets the same token again: Didit answers 403 already
    // imported, which is success, not a dead-letter: the receiver finds the session Didit made (by the vendor_data
    // it sent) and reports it `imported` with its id.
    let fresh_state = format!(
        "state_dir = \"{}/receiver-fresh\"",
        world.dir.path().display()
    );
    let toml = world.receiver_toml(false).replace(
        &format!("state_dir = \"{}/receiver\"", world.dir.path().display()),
        &fresh_state,
    );
    assert!(toml.contains(&fresh_state));
    let second = world.start(world.config(&toml)).await;
    publish_signed_body(&world, &amqp, &body, &world.key).await;
    let tapped = results.wait_count(2, WAIT).await;
    assert_eq!(tapped[1].routing_key, "import.imported");
    let found = tapped[1].got.json();
    assert_eq!(found["outcome"], "imported");
    assert_eq!(
        found["source_session_id"],
        envelope.source_session_id.as_str()
    );
    assert_eq!(
        found["imported_session_id"], first_result["imported_session_id"],
        "the lost answer's session is found"
    );
    let stats = world.control.stats().await.unwrap();
    assert_eq!(stats.rejected("already_imported"), 1);
    assert_eq!(
        stats.import_count(
            &envelope.source_session_id,
            &world.partner_app.application_id
        ),
        1
    );

    // Now the ledger knows: a third delivery is answered from it, without asking Didit again.
    publish_signed_body(&world, &amqp, &body, &world.key).await;
    let tapped = results.wait_count(3, WAIT).await;
    assert_eq!(tapped[2].routing_key, "import.duplicate");
    let stats = world.control.stats().await.unwrap();
    assert_eq!(
        stats.rejected("already_imported"),
        1,
        "Didit not asked again"
    );
    assert_eq!(
        metric_of(&second, &imports_series("fintech-a", "duplicate")),
        1.0
    );
    assert!(amqp.drain(&receiver_dead_queue(&world)).await.is_empty());

    amqp.close().await;
    second.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misrouted_tokens_are_reported_and_dead_lettered_without_an_import() {
    let world = World::new("rx-misrouted").await;
    let receiver = world.start_receiver(false).await;
    let amqp = Amqp::connect().await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;
    let other = world
        .control
        .create_application("other-bank")
        .await
        .unwrap();

    // A token for another partner that reached this queue (an issuer's binding gone wrong)...
    let s1 = world.session(SessionKind::User, "Approved", "u1").await;
    let share1 = mint(&world, &world.issuer_app, &s1, &other.application_id, 3600).await;
    let honest = envelope_for(&world, &share1, &s1, "Approved", None);
    assert_eq!(honest.for_application_id, other.application_id);
    // ...and one whose envelope claims this partner while the token itself names another.
    let s2 = world.session(SessionKind::Business, "APPROVED", "b2").await;
    let share2 = mint(&world, &world.issuer_app, &s2, &other.application_id, 3600).await;
    let mut lying = envelope_for(&world, &share2, &s2, "APPROVED", None);
    lying.for_application_id = world.partner_app.application_id.clone();
    let bodies = [
        publish_signed(&world, &amqp, &honest).await,
        publish_signed(&world, &amqp, &lying).await,
    ];

    let tapped = results.wait_count(2, WAIT).await;
    for t in &tapped {
        assert_eq!(t.routing_key, "import.misrouted");
        let body = t.got.json();
        assert_eq!(body["outcome"], "misrouted");
        assert!(body["imported_session_id"].is_null());
        let reason = body["reason"].as_str().expect("a reason");
        assert!(reason.contains(&other.application_id), "{reason}");
    }
    let dead = drain_n(&amqp, &receiver_dead_queue(&world), 2, WAIT).await;
    assert_eq!(
        reasons(&dead),
        BTreeMap::from([("misrouted".to_string(), 2)])
    );
    let dead_bodies: BTreeSet<Vec<u8>> = dead.iter().map(|g| g.body.clone()).collect();
    assert_eq!(
        dead_bodies,
        bodies.into_iter().collect(),
        "nothing lost: the envelopes are kept as sent"
    );
    assert_eq!(
        metric_of(&receiver, &imports_series("fintech-a", "misrouted")),
        2.0
    );
    assert_eq!(metric_of(&receiver, &dead_series(&world, "misrouted")), 2.0);
    assert!(world.control.stats().await.unwrap().imports.is_empty());

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_whose_source_session_was_deleted_is_source_gone() {
    let world = World::new("rx-gone").await;
    let receiver = world.start_receiver(false).await;
    let amqp = Amqp::connect().await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;

    let envelope = hand_token(&world, SessionKind::User, "Declined", Some("gone-1")).await;
    world
        .control
        .delete_session(&envelope.source_session_id)
        .await
        .unwrap();
    let body = publish_signed(&world, &amqp, &envelope).await;

    let tapped = results.wait_count(1, WAIT).await;
    assert_eq!(tapped[0].routing_key, "import.source_gone");
    let result = tapped[0].got.json();
    assert_eq!(result["outcome"], "source_gone");
    assert_eq!(
        result["source_session_id"],
        envelope.source_session_id.as_str()
    );
    assert!(result["imported_session_id"].is_null());
    assert!(result["reason"].is_string());
    let dead = drain_n(&amqp, &receiver_dead_queue(&world), 1, WAIT).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].header("x-pb-reason"), Some("source_gone"));
    assert_eq!(dead[0].body, body);
    assert_eq!(
        metric_of(&receiver, &imports_series("fintech-a", "source_gone")),
        1.0
    );
    assert_eq!(
        metric_of(&receiver, &dead_series(&world, "source_gone")),
        1.0
    );
    let stats = world.control.stats().await.unwrap();
    assert!(stats.imports.is_empty());
    assert_eq!(stats.rejected("session_not_found"), 1, "asked Didit once");

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_forged_and_unknown_issuer_envelopes_are_dead_lettered_and_the_consumer_keeps_going()
 {
    let world = World::new("rx-refused").await;
    let receiver = world.start_receiver(false).await;
    let amqp = Amqp::connect().await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;

    // Unsigned.
    let unsigned = body_of(&hand_token(&world, SessionKind::User, "Approved", Some("a")).await);
    publish_token_body(&world, &amqp, &unsigned, &[]).await;
    // Signed by a key that is not the issuer's.
    let wrong_key = body_of(&hand_token(&world, SessionKind::User, "Approved", Some("b")).await);
    publish_signed_body(&world, &amqp, &wrong_key, &SigningKey::generate()).await;
    // Signed by the issuer's key, then altered on the way.
    let original = hand_token(&world, SessionKind::Business, "APPROVED", Some("c")).await;
    let signature = world.key.sign(&body_of(&original));
    let mut altered = original.clone();
    altered.source_status = "Declined".into();
    let tampered = body_of(&altered);
    publish_token_body(
        &world,
        &amqp,
        &tampered,
        &[
            ("x-pb-signature", signature.as_str()),
            ("x-pb-key-id", world.key.key_id()),
        ],
    )
    .await;
    // From an application that is not a [[receiver.issuers]] entry, with its own key.
    let stranger = world.control.create_application("stranger").await.unwrap();
    let session = world
        .control
        .create_session(
            &stranger.application_id,
            SessionKind::User,
            "Approved",
            Some("s"),
        )
        .await
        .unwrap()
        .session_id;
    let share = mint(
        &world,
        &stranger,
        &session,
        &world.partner_app.application_id,
        3600,
    )
    .await;
    let mut foreign = envelope_for(&world, &share, &session, "Approved", None);
    foreign.from_application_id = stranger.application_id.clone();
    let foreign = body_of(&foreign);
    publish_signed_body(&world, &amqp, &foreign, &SigningKey::generate()).await;
    // And then a good one.
    let good = hand_token(&world, SessionKind::User, "In Review", Some("d")).await;
    publish_signed(&world, &amqp, &good).await;

    let dead = drain_n(&amqp, &receiver_dead_queue(&world), 4, WAIT).await;
    assert_eq!(
        reasons(&dead),
        BTreeMap::from([
            ("bad_signature".to_string(), 2),
            ("unknown_issuer".to_string(), 1),
            ("unsigned".to_string(), 1),
        ])
    );
    let dead_bodies: BTreeSet<Vec<u8>> = dead.iter().map(|g| g.body.clone()).collect();
    let sent: BTreeSet<Vec<u8>> = [unsigned, wrong_key, tampered, foreign]
        .into_iter()
        .collect();
    assert_eq!(
        dead_bodies, sent,
        "nothing lost: the refused envelopes are kept as sent"
    );
    for got in &dead {
        assert!(!got.header("x-pb-detail").unwrap_or("").is_empty());
    }

    let counts = wait_imports_into(&world, &world.partner_app.application_id, 1, WAIT).await;
    assert_eq!(
        counts,
        BTreeMap::from([(good.source_session_id.clone(), 1)])
    );
    let tapped = results.wait_count(1, WAIT).await;
    assert_eq!(
        tapped.len(),
        1,
        "refused envelopes produce no import.result"
    );
    assert_eq!(
        tapped[0].got.json()["source_session_id"],
        good.source_session_id.as_str()
    );

    assert_eq!(metric_of(&receiver, &dead_series(&world, "unsigned")), 1.0);
    assert_eq!(
        metric_of(&receiver, &dead_series(&world, "bad_signature")),
        2.0
    );
    assert_eq!(
        metric_of(&receiver, &dead_series(&world, "unknown_issuer")),
        1.0
    );
    assert_eq!(
        metric_of(&receiver, &imports_series("fintech-a", "bad_message")),
        3.0
    );
    assert_eq!(
        metric_of(&receiver, &imports_series("unknown", "bad_message")),
        1.0
    );
    assert_eq!(
        metric_of(&receiver, &imports_series("fintech-a", "imported")),
        1.0
    );
    assert!(
        world
            .control
            .stats()
            .await
            .unwrap()
            .rejections
            .values()
            .all(|n| *n == 0)
    );

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_envelopes_are_imported_only_when_allow_unsigned_is_set() {
    let world = World::new("rx-unsigned-ok").await;
    let toml = receiver_toml_with(&world, false, &[("allow_unsigned", "true")]);
    let receiver = world.start(world.config(&toml)).await;
    let amqp = Amqp::connect().await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;

    let unsigned = hand_token(&world, SessionKind::User, "Approved", Some("u")).await;
    publish_token_body(&world, &amqp, &body_of(&unsigned), &[]).await;
    // Allowing unsigned envelopes is no licence for a wrong signature.
    let forged = body_of(&hand_token(&world, SessionKind::User, "Approved", Some("f")).await);
    publish_signed_body(&world, &amqp, &forged, &SigningKey::generate()).await;

    let tapped = results.wait_count(1, WAIT).await;
    assert_eq!(tapped[0].routing_key, "import.imported");
    assert_eq!(
        tapped[0].got.json()["source_session_id"],
        unsigned.source_session_id.as_str()
    );
    let dead = drain_n(&amqp, &receiver_dead_queue(&world), 1, WAIT).await;
    assert_eq!(dead[0].header("x-pb-reason"), Some("bad_signature"));
    assert_eq!(dead[0].body, forged);
    assert_eq!(
        import_counts(&world, &world.partner_app.application_id).await,
        BTreeMap::from([(unsigned.source_session_id.clone(), 1)])
    );

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_past_its_expiry_is_never_sent_to_didit_and_becomes_a_reshare_request() {
    let world = World::new("rx-stale").await;
    let amqp = Amqp::connect().await;
    declare_issuer_queues(&world, &amqp).await;
    let receiver = world.start_receiver(false).await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;

    let mut envelope = hand_token(&world, SessionKind::Business, "IN_REVIEW", Some("late")).await;
    envelope.expires_at = Utc::now() - chrono::Duration::seconds(30);
    publish_signed(&world, &amqp, &envelope).await;

    let requests = drain_n(&amqp, &world.names.issuer_reshare_queue(), 1, WAIT).await;
    assert_eq!(requests.len(), 1);
    let got = &requests[0];
    assert_eq!(got.kind.as_deref(), Some("reshare.request"));
    assert_eq!(got.app_id.as_deref(), Some("partner-bridge"));
    assert_eq!(got.delivery_mode, Some(2));
    let request: ReshareRequest = serde_json::from_slice(&got.body).expect("a reshare.request");
    assert_eq!(request.kind, "reshare.request");
    assert_eq!(request.source_session_id, envelope.source_session_id);
    assert_eq!(request.for_application_id, world.partner_app.application_id);
    assert_eq!(request.reason, "token_expired");
    assert_eq!(request.attempt, 1);
    assert_eq!(request.original_message_id, envelope.message_id);

    // Didit never saw the token: no import, no rejection, no import call at all.
    let stats = world.control.stats().await.unwrap();
    assert!(stats.imports.is_empty());
    assert!(
        stats.rejections.values().all(|n| *n == 0),
        "{:?}",
        stats.rejections
    );
    assert_eq!(
        metric_lines(
            &receiver,
            "partner_bridge_didit_requests_total{operation=\"import\""
        ),
        Vec::<String>::new()
    );
    assert_eq!(
        metric_of(
            &receiver,
            "partner_bridge_reshare_requests_total{direction=\"sent\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_of(&receiver, &imports_series("fintech-a", "reshare_requested")),
        1.0
    );
    assert!(
        results.all().is_empty(),
        "asking for a fresh token is not an outcome"
    );
    assert!(amqp.drain(&receiver_dead_queue(&world)).await.is_empty());

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausting_max_reshares_reports_expired_and_dead_letters_the_token() {
    let world = World::new("rx-reshares").await;
    let amqp = Amqp::connect().await;
    declare_issuer_queues(&world, &amqp).await;
    let toml = receiver_toml_with(&world, false, &[("max_reshares", "2")]);
    let receiver = world.start(world.config(&toml)).await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;

    let session = world.session(SessionKind::User, "Approved", "again").await;
    let share = mint(
        &world,
        &world.issuer_app,
        &session,
        &world.partner_app.application_id,
        3600,
    )
    .await;
    let stale = || {
        let mut envelope = envelope_for(&world, &share, &session, "Approved", None);
        envelope.expires_at = Utc::now() - chrono::Duration::seconds(5);
        envelope
    };
    for attempt in 1..=2 {
        publish_signed(&world, &amqp, &stale()).await;
        let requests = drain_n(&amqp, &world.names.issuer_reshare_queue(), 1, WAIT).await;
        assert_eq!(requests.len(), 1);
        let request: ReshareRequest = serde_json::from_slice(&requests[0].body).unwrap();
        assert_eq!(request.attempt, attempt);
    }
    let last = stale();
    let body = publish_signed(&world, &amqp, &last).await;

    let tapped = results.wait_count(1, WAIT).await;
    assert_eq!(tapped[0].routing_key, "import.expired");
    let result = tapped[0].got.json();
    assert_eq!(result["outcome"], "expired");
    assert_eq!(result["source_session_id"], session.as_str());
    assert!(result["imported_session_id"].is_null());
    let reason = result["reason"].as_str().expect("a reason");
    assert!(reason.contains("max_reshares"), "{reason}");
    let dead = drain_n(&amqp, &receiver_dead_queue(&world), 1, WAIT).await;
    assert_eq!(dead[0].header("x-pb-reason"), Some("expired"));
    assert_eq!(dead[0].body, body);
    assert_eq!(
        amqp.depth(&world.names.issuer_reshare_queue()).await,
        0,
        "no third request"
    );
    assert_eq!(
        metric_of(
            &receiver,
            "partner_bridge_reshare_requests_total{direction=\"sent\"}"
        ),
        2.0
    );
    assert_eq!(
        metric_of(&receiver, &imports_series("fintech-a", "expired")),
        1.0
    );
    assert_eq!(metric_of(&receiver, &dead_series(&world, "expired")), 1.0);
    assert!(world.control.stats().await.unwrap().imports.is_empty());

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_workflow_pauses_the_receiver_and_a_fixed_receiver_imports_every_parked_token_once()
 {
    let world = World::new("rx-workflow").await;
    let receiver = world.start_receiver(false).await;
    let amqp = Amqp::connect().await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;
    let partner = world.partner_app.application_id.clone();
    world
        .control
        .remove_workflow(&partner, &world.partner_app.workflows.user)
        .await
        .unwrap();

    let mut sessions = BTreeSet::new();
    for i in 0..5 {
        let envelope = hand_token(
            &world,
            SessionKind::User,
            "Approved",
            Some(&format!("w{i}")),
        )
        .await;
        publish_signed(&world, &amqp, &envelope).await;
        sessions.insert(envelope.source_session_id);
    }

    let paused = "partner_bridge_paused{pipeline=\"receiver_tokens\",reason=\"workflow_missing\"}";
    // The probe tries the real work again now and then (and pauses again), so look at a moment it is paused.
    wait_for("the receiver paused and /readyz 503", WAIT, || async {
        if metric_of(&receiver, paused) != 1.0 {
            return None;
        }
        let (status, body) = readyz(&receiver).await;
        (status == 503 && body.contains("paused: workflow_missing")).then_some(())
    })
    .await;
    let stats = world.control.stats().await.unwrap();
    assert!(stats.imports.is_empty());
    assert!(stats.rejected("workflow_not_found") >= 1);

    // Nothing is lost while paused: once the receiver is down, every token is back in its queue.
    receiver.stop().await.unwrap();
    let queue = world.names.receiver_tokens_queue();
    let retry = format!("{queue}.retry");
    wait_for("every parked token back in the queue", WAIT, || async {
        let (ready, parked) = (amqp.depth(&queue).await, amqp.depth(&retry).await);
        (ready == 5 && parked == 0).then_some(())
    })
    .await;
    assert_eq!(amqp.depth(&receiver_dead_queue(&world)).await, 0);
    assert!(results.all().is_empty());

    // The operator creates the workflow and restarts the receiver with it.
    let workflow = world
        .control
        .add_workflow(&partner, SessionKind::User)
        .await
        .unwrap();
    let toml = receiver_toml_with(
        &world,
        false,
        &[("workflow_user", &format!("\"{workflow}\""))],
    );
    let fixed = world.start(world.config(&toml)).await;
    let counts = wait_imports_into(&world, &partner, 5, WAIT).await;
    assert_eq!(counts.keys().cloned().collect::<BTreeSet<_>>(), sessions);
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    let tapped = results.wait_count(5, WAIT).await;
    assert_eq!(tapped.len(), 5);
    for t in &tapped {
        assert_eq!(t.routing_key, "import.imported");
        let session = world
            .control
            .session(t.got.json()["imported_session_id"].as_str().unwrap())
            .await
            .unwrap();
        assert_eq!(session.workflow_id, workflow);
    }
    assert!(fixed.health().check().is_ok());

    amqp.close().await;
    fixed.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_api_key_pauses_the_receiver_until_the_key_file_holds_the_new_key() {
    let world = World::new("rx-revoked").await;
    let key_file = world.dir.path().join("partner-api-key");
    std::fs::write(
        &key_file,
        format!("{}\n", world.partner_app.api_key.expose()),
    )
    .unwrap();
    let toml = with_api_key_file(&world, &world.receiver_toml(false), &key_file);
    let receiver = world.start(world.config(&toml)).await;
    let amqp = Amqp::connect().await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;
    let partner = world.partner_app.application_id.clone();
    let new_key = world.control.revoke_key(&partner).await.unwrap();

    let mut sessions = BTreeSet::new();
    for i in 0..5 {
        let kind = if i % 2 == 0 {
            SessionKind::User
        } else {
            SessionKind::Business
        };
        let envelope = hand_token(&world, kind, "Approved", Some(&format!("k{i}"))).await;
        publish_signed(&world, &amqp, &envelope).await;
        sessions.insert(envelope.source_session_id);
    }

    let paused = "partner_bridge_paused{pipeline=\"receiver_tokens\",reason=\"credentials\"}";
    wait_for("the receiver to pause", WAIT, || async {
        (metric_of(&receiver, paused) == 1.0).then_some(())
    })
    .await;
    let (status, body) = readyz(&receiver).await;
    assert_eq!(status, 503);
    assert!(body.contains("paused: credentials"), "{body}");
    assert!(!body.contains(new_key.expose()) && !body.contains(world.partner_app.api_key.expose()));
    let stats = world.control.stats().await.unwrap();
    assert!(stats.imports.is_empty());
    assert!(stats.rejected("invalid_api_key") >= 1);
    assert!(results.all().is_empty());

    // The operator rotates the secret file (written aside, then renamed, as Kubernetes does); no restart.
    let staged = world.dir.path().join("partner-api-key.new");
    std::fs::write(&staged, format!("{}\n", new_key.expose())).unwrap();
    std::fs::rename(&staged, &key_file).unwrap();

    let counts = wait_imports_into(&world, &partner, 5, Duration::from_secs(30)).await;
    assert_eq!(counts.keys().cloned().collect::<BTreeSet<_>>(), sessions);
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    let tapped = results.wait_count(5, WAIT).await;
    assert_eq!(tapped.len(), 5);
    assert!(tapped.iter().all(|t| t.routing_key == "import.imported"));
    wait_for("the receiver ready again", WAIT, || async {
        receiver.health().check().ok()
    })
    .await;
    assert_eq!(metric_of(&receiver, paused), 0.0);
    assert_eq!(amqp.depth(&receiver_dead_queue(&world)).await, 0);
    assert!(!receiver.metrics().encode().contains(new_key.expose()));

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_didit_refuses_with_400_or_without_a_workflow_of_its_kind_is_rejected() {
    let world = World::new("rx-rejected").await;
    // The KYC workflow setting names the partner's KYB workflow (Didit answers 400), and no KYB workflow is set.
    let business_line = format!(
        "workflow_business = \"{}\"\n",
        world.partner_app.workflows.business
    );
    let toml = receiver_toml_with(
        &world,
        false,
        &[(
            "workflow_user",
            &format!("\"{}\"", world.partner_app.workflows.business),
        )],
    );
    assert!(toml.contains(&business_line));
    let toml = toml.replacen(&business_line, "", 1);
    let receiver = world.start(world.config(&toml)).await;
    let amqp = Amqp::connect().await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;

    let kyc = hand_token(&world, SessionKind::User, "Approved", Some("p")).await;
    let kyb = hand_token(&world, SessionKind::Business, "APPROVED", Some("q")).await;
    let kyc_body = publish_signed(&world, &amqp, &kyc).await;
    let kyb_body = publish_signed(&world, &amqp, &kyb).await;

    let tapped = results.wait_count(2, WAIT).await;
    for t in &tapped {
        assert_eq!(t.routing_key, "import.rejected");
        let body = t.got.json();
        assert_eq!(body["outcome"], "rejected");
        assert!(body["imported_session_id"].is_null());
        assert!(body["reason"].is_string());
    }
    let dead = drain_n(&amqp, &receiver_dead_queue(&world), 2, WAIT).await;
    let by_reason: BTreeMap<&str, &Vec<u8>> = dead
        .iter()
        .map(|g| (g.header("x-pb-reason").unwrap_or(""), &g.body))
        .collect();
    assert_eq!(
        by_reason,
        BTreeMap::from([("no_workflow", &kyb_body), ("rejected", &kyc_body)])
    );
    let stats = world.control.stats().await.unwrap();
    assert!(stats.imports.is_empty());
    assert_eq!(
        stats.rejected("workflow_kind_mismatch"),
        1,
        "only the KYC token reached Didit"
    );
    assert_eq!(
        metric_of(&receiver, &imports_series("fintech-a", "rejected")),
        2.0
    );
    assert_eq!(metric_of(&receiver, &dead_series(&world, "rejected")), 1.0);
    assert_eq!(
        metric_of(&receiver, &dead_series(&world, "no_workflow")),
        1.0
    );
    assert!(
        receiver.health().check().is_ok(),
        "a refused token is no reason to pause"
    );

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_rate_limits_on_import_are_retried_until_each_token_is_imported_once() {
    let world = World::new("rx-flaky").await;
    let receiver = world.start_receiver(false).await;
    let amqp = Amqp::connect().await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;
    world
        .control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::Import,
            error_rate: 0.3,
            rate_limit_rate: 0.1,
            ..FaultSettings::default()
        })
        .await
        .unwrap();

    let mut sessions = BTreeSet::new();
    // Enough tokens that a 40% fault rate cannot miss them all (0.6^20 is about 4 in 100,000).
    for i in 0..20 {
        let kind = if i % 2 == 0 {
            SessionKind::User
        } else {
            SessionKind::Business
        };
        let envelope = hand_token(&world, kind, "Approved", Some(&format!("f{i}"))).await;
        publish_signed(&world, &amqp, &envelope).await;
        sessions.insert(envelope.source_session_id);
    }

    let counts = wait_imports_into(
        &world,
        &world.partner_app.application_id,
        20,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(counts.keys().cloned().collect::<BTreeSet<_>>(), sessions);
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    let tapped = results.wait_count(20, WAIT).await;
    assert_eq!(tapped.len(), 20);
    assert!(tapped.iter().all(|t| t.routing_key == "import.imported"));
    let stats = world.control.stats().await.unwrap();
    assert!(
        stats.rejected("internal_error") + stats.rejected("rate_limited") > 0,
        "the faults were injected: {:?}",
        stats.rejections
    );
    assert!(
        metric_of(
            &receiver,
            "partner_bridge_retries_total{operation=\"import\"}"
        ) >= 1.0
    );
    assert_eq!(amqp.depth(&receiver_dead_queue(&world)).await, 0);

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_different_tokens_for_one_session_arriving_together_import_it_once() {
    const SESSIONS: usize = 10;
    let world = World::new("rx-race").await;
    let receiver = world.start_receiver(false).await;
    let amqp = Amqp::connect().await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;

    // Two distinct tokens per session (different TTLs, so Didit itself would import both), published back to
    // back so that the receiver handles them at the same time.
    let mut envelopes = Vec::new();
    for i in 0..SESSIONS {
        let kind = if i % 2 == 0 {
            SessionKind::User
        } else {
            SessionKind::Business
        };
        let session = world.session(kind, "Approved", &format!("r{i}")).await;
        for ttl in [3600, 1800] {
            let share = mint(
                &world,
                &world.issuer_app,
                &session,
                &world.partner_app.application_id,
                ttl,
            )
            .await;
            envelopes.push(envelope_for(&world, &share, &session, "Approved", None));
        }
    }
    assert_ne!(envelopes[0].share_token, envelopes[1].share_token);
    for envelope in &envelopes {
        publish_signed(&world, &amqp, envelope).await;
    }

    let tapped = results.wait_count(2 * SESSIONS, WAIT).await;
    assert_eq!(tapped.len(), 2 * SESSIONS);
    let mut by_session: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for t in &tapped {
        let body = t.got.json();
        assert_eq!(
            t.routing_key,
            format!("import.{}", body["outcome"].as_str().unwrap())
        );
        by_session
            .entry(body["source_session_id"].as_str().unwrap().to_string())
            .or_default()
            .push(body);
    }
    assert_eq!(by_session.len(), SESSIONS);
    for (session, bodies) in &by_session {
        let outcomes: BTreeSet<&str> = bodies
            .iter()
            .map(|b| b["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(
            outcomes,
            BTreeSet::from(["duplicate", "imported"]),
            "{session}"
        );
        assert_eq!(
            bodies[0]["imported_session_id"], bodies[1]["imported_session_id"],
            "the duplicate names the session the first token created"
        );
    }
    let stats = world.control.stats().await.unwrap();
    for session in by_session.keys() {
        assert_eq!(
            stats.import_count(session, &world.partner_app.application_id),
            1
        );
    }
    assert_eq!(
        stats.rejected("already_imported"),
        0,
        "the ledger answered, not Didit"
    );
    assert_eq!(
        metric_of(&receiver, &imports_series("fintech-a", "duplicate")),
        SESSIONS as f64
    );

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_token_for_an_already_imported_session_is_a_duplicate_not_a_reshare() {
    let world = World::new("rx-stale-dup").await;
    let amqp = Amqp::connect().await;
    declare_issuer_queues(&world, &amqp).await;
    let receiver = world.start_receiver(false).await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;

    let envelope = hand_token(&world, SessionKind::User, "Approved", Some("once")).await;
    publish_signed(&world, &amqp, &envelope).await;
    results.wait_count(1, WAIT).await;
    let mut stale = envelope.clone();
    stale.message_id = uuid::Uuid::now_v7().to_string();
    stale.expires_at = Utc::now() - chrono::Duration::seconds(60);
    publish_signed(&world, &amqp, &stale).await;

    let tapped = results.wait_count(2, WAIT).await;
    assert_eq!(tapped[1].routing_key, "import.duplicate");
    assert_eq!(amqp.depth(&world.names.issuer_reshare_queue()).await, 0);
    assert_eq!(
        metric_of(
            &receiver,
            "partner_bridge_reshare_requests_total{direction=\"sent\"}"
        ),
        0.0
    );
    let stats = world.control.stats().await.unwrap();
    assert_eq!(
        stats.import_count(
            &envelope.source_session_id,
            &world.partner_app.application_id
        ),
        1
    );
    assert!(stats.rejections.values().all(|n| *n == 0));

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_issuers_are_imported_only_when_allowed_and_never_trusted() {
    let world = World::new("rx-unknown-ok").await;
    let toml = receiver_toml_with(&world, true, &[("allow_unknown_issuers", "true")]);
    let receiver = world.start(world.config(&toml)).await;
    let amqp = Amqp::connect().await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;

    let stranger = world.control.create_application("stranger").await.unwrap();
    let session = world
        .control
        .create_session(
            &stranger.application_id,
            SessionKind::User,
            "Approved",
            Some("s"),
        )
        .await
        .unwrap()
        .session_id;
    let share = mint(
        &world,
        &stranger,
        &session,
        &world.partner_app.application_id,
        3600,
    )
    .await;
    let mut foreign = envelope_for(&world, &share, &session, "Approved", None);
    foreign.from_application_id = stranger.application_id.clone();
    publish_signed_body(&world, &amqp, &body_of(&foreign), &SigningKey::generate()).await;
    let known = hand_token(&world, SessionKind::User, "Approved", Some("k")).await;
    publish_signed(&world, &amqp, &known).await;

    let tapped = results.wait_count(2, WAIT).await;
    let result_for = |id: &str| {
        tapped
            .iter()
            .map(|t| t.got.json())
            .find(|b| b["source_session_id"] == id)
            .expect("a result")
    };
    let foreign_result = result_for(&session);
    assert_eq!(foreign_result["outcome"], "imported");
    assert_eq!(
        foreign_result["from_application_id"],
        stranger.application_id.as_str()
    );
    assert_eq!(
        foreign_result["trust_review"], false,
        "an unknown issuer's review is never trusted"
    );
    assert_eq!(foreign_result["status"], "In Review");
    let known_result = result_for(&known.source_session_id);
    assert_eq!(known_result["trust_review"], true);
    assert_eq!(known_result["status"], "Approved");
    assert_eq!(
        metric_of(&receiver, &imports_series("unknown", "imported")),
        1.0
    );
    assert_eq!(
        metric_of(&receiver, &imports_series("fintech-a", "imported")),
        1.0
    );

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_didit_calls_invalid_is_answered_with_a_reshare_request() {
    let world = World::new("rx-invalid").await;
    let amqp = Amqp::connect().await;
    declare_issuer_queues(&world, &amqp).await;
    let receiver = world.start_receiver(false).await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;

    // The envelope is genuine (signed by the issuer) but the token in it is not one Didit can read.
    let mut envelope = hand_token(&world, SessionKind::User, "Approved", Some("x")).await;
    envelope.share_token = ShareToken::new("not-a-share-token");
    publish_signed(&world, &amqp, &envelope).await;

    let requests = drain_n(&amqp, &world.names.issuer_reshare_queue(), 1, WAIT).await;
    let request: ReshareRequest = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(request.source_session_id, envelope.source_session_id);
    assert_eq!(request.attempt, 1);
    assert_eq!(request.original_message_id, envelope.message_id);
    let stats = world.control.stats().await.unwrap();
    assert_eq!(stats.rejected("invalid_share_token"), 1);
    assert!(stats.imports.is_empty());
    assert!(results.all().is_empty());
    assert!(amqp.drain(&receiver_dead_queue(&world)).await.is_empty());
    assert!(
        receiver.health().check().is_ok(),
        "a bad token is not a bad key: no pause"
    );

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_envelopes_are_dead_lettered_with_their_reason_and_the_consumer_keeps_going() {
    let world = World::new("rx-malformed").await;
    let receiver = world.start_receiver(false).await;
    let amqp = Amqp::connect().await;

    let good = hand_token(&world, SessionKind::Business, "IN_REVIEW", Some("m")).await;
    let mut missing = serde_json::to_value(&good).unwrap();
    missing.as_object_mut().unwrap().remove("source_session_id");
    let mut oversized = serde_json::to_value(&good).unwrap();
    oversized["padding"] = "x".repeat(300 * 1024).into();
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("malformed_json", b"{not json".to_vec()),
        (
            "unknown_type",
            br#"{"type":"share_token_v9","message_id":"m"}"#.to_vec(),
        ),
        ("missing_field", serde_json::to_vec(&missing).unwrap()),
        ("oversized", serde_json::to_vec(&oversized).unwrap()),
    ];
    for (_, body) in &bad {
        publish_signed_body(&world, &amqp, body, &world.key).await;
    }
    publish_signed(&world, &amqp, &good).await;

    let dead = drain_n(&amqp, &receiver_dead_queue(&world), bad.len(), WAIT).await;
    let by_reason: BTreeMap<&str, &Vec<u8>> = dead
        .iter()
        .map(|g| (g.header("x-pb-reason").unwrap_or(""), &g.body))
        .collect();
    let expected: BTreeMap<&str, &Vec<u8>> = bad.iter().map(|(r, b)| (*r, b)).collect();
    assert_eq!(by_reason, expected);
    for (reason, _) in &bad {
        assert_eq!(
            metric_of(&receiver, &dead_series(&world, reason)),
            1.0,
            "{reason}"
        );
    }
    let counts = wait_imports_into(&world, &world.partner_app.application_id, 1, WAIT).await;
    assert_eq!(
        counts,
        BTreeMap::from([(good.source_session_id.clone(), 1)])
    );

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_envelope_whose_token_names_another_session_is_refused() {
    let world = World::new("rx-mismatch").await;
    let receiver = world.start_receiver(false).await;
    let amqp = Amqp::connect().await;

    // A genuine token for session A, wrapped (and signed) as if it were about session B: the ledger would record
    // the import under B, and A could later be imported a second time.
    let token_a = hand_token(&world, SessionKind::User, "Approved", Some("a")).await;
    let session_b = world.session(SessionKind::User, "Approved", "b").await;
    let mut lying = token_a.clone();
    lying.source_session_id = session_b.clone();
    let body = body_of(&lying);
    publish_signed_body(&world, &amqp, &body, &world.key).await;
    // The honest envelope still goes through afterwards.
    publish_signed(&world, &amqp, &token_a).await;

    let dead = drain_n(&amqp, &receiver_dead_queue(&world), 1, WAIT).await;
    assert_eq!(dead[0].header("x-pb-reason"), Some("invalid_field"));
    assert!(
        dead[0]
            .header("x-pb-detail")
            .unwrap_or("")
            .contains(&session_b)
    );
    assert_eq!(dead[0].body, body, "kept exactly as sent");
    let counts = wait_imports_into(&world, &world.partner_app.application_id, 1, WAIT).await;
    assert_eq!(
        counts,
        BTreeMap::from([(token_a.source_session_id.clone(), 1)])
    );

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}
