//! The whole bridge end to end: issuer and receiver bridges (as two in-process apps, the way two sidecars run),
//! the sandbox as Didit, the real broker between them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lapin::options::ExchangeBindOptions;
use lapin::types::FieldTable;
use partner_bridge::amqp::{Names, topology};
use partner_bridge::app;
use partner_bridge::didit::wire::SessionKind;
use partner_bridge::envelope::{ImportOutcome, ImportResult};

use crate::support::bridge::{Amqp, Collector, World, metric};
use crate::support::t_receiver::{Tap, envelope_for, mint, publish_signed, wait_imports_into};
use crate::support::{unique_prefix, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mix_of_kyc_and_kyb_sessions_is_imported_once_each() {
    let world = World::new("e2e-mix").await;
    let receiver = world.start_receiver(false).await;
    let issuer = world.start_issuer().await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let mut sessions = Vec::new();
    for i in 0..10 {
        let (kind, status) = if i % 2 == 0 {
            (SessionKind::User, "Approved")
        } else {
            (SessionKind::Business, "IN_REVIEW")
        };
        let id = world.session(kind, status, &format!("v{i}")).await;
        world
            .publish_event(&amqp, &world.event(&id, kind, status))
            .await;
        sessions.push(id);
    }
    let counts = world
        .wait_imports(sessions.len(), Duration::from_secs(30))
        .await;
    for id in &sessions {
        assert_eq!(counts.get(id), Some(&1), "session {id}");
    }
    results
        .wait_count(sessions.len(), Duration::from_secs(10))
        .await;
    let results = results.results();
    assert!(results.iter().all(|r| r.outcome == ImportOutcome::Imported));
    amqp.close().await;
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

/// The status a session of `kind` shows for `base` (a Title Case KYC status), in that kind's own casing.
fn native(kind: SessionKind, base: &str) -> String {
    match kind {
        SessionKind::User => base.to_string(),
        SessionKind::Business => upper_snake(base),
    }
}

fn upper_snake(status: &str) -> String {
    status.to_uppercase().replace(' ', "_")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_mixed_events_reach_two_partners_once_each_with_the_right_status() {
    const EVENTS: usize = 200;
    let world = World::new("e2e-200").await;
    let amqp = Amqp::connect().await;
    let dir = world.dir.path().display().to_string();

    // Partner A is the world's `sponsor-bank` (trust_review false). Partner B, `brand-b`, trusts the issuer's
    // review and runs its receiver on its own broker namespace (prefix): its tokens get there the way they would
    // between two organisations' brokers, through a shovel, played here by an exchange-to-exchange binding.
    let brand_b = world.control.create_application("brand-b").await.unwrap();
    let prefix_b = unique_prefix("e2e-200b");
    let toml_b = world
        .receiver_toml(true)
        .replace(&world.partner_app.application_id, &brand_b.application_id)
        .replace(world.partner_app.api_key.expose(), brand_b.api_key.expose())
        .replace(&world.partner_app.workflows.user, &brand_b.workflows.user)
        .replace(
            &world.partner_app.workflows.business,
            &brand_b.workflows.business,
        )
        .replace(
            &format!("prefix = \"{}\"", world.prefix),
            &format!("prefix = \"{prefix_b}\""),
        )
        .replace(
            &format!("state_dir = \"{dir}/receiver\""),
            &format!("state_dir = \"{dir}/receiver-b\""),
        );
    assert!(toml_b.contains(&prefix_b) && toml_b.contains("receiver-b"));
    let config_b = world.config(&toml_b);
    let names_b = Names::new(&prefix_b);
    let issuer_toml = format!(
        r#"{}
[[issuer.partners]]
name = "brand-b"
application_id = "{}"
ttl_seconds = 3600
statuses = ["APPROVED", "DECLINED", "IN_REVIEW"]
session_kinds = ["user", "business"]
share_vendor_data = false
"#,
        world.issuer_toml(),
        brand_b.application_id
    );

    let receiver_a = world.start_receiver(false).await;
    let receiver_b = world.start(config_b.clone()).await;
    let issuer = world.start(world.config(&issuer_toml)).await;
    amqp.channel
        .exchange_bind(
            names_b.tokens_exchange().as_str().into(),
            world.names.tokens_exchange().as_str().into(),
            Names::token_key(&brand_b.application_id).as_str().into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind brand-b's tokens exchange to the issuer's");
    let results_a = Collector::start(&world.results_queue()).await;
    let results_b = Collector::start(&format!("{prefix_b}.receiver.results")).await;

    // Both kinds, every finished status, each in both casings.
    let mut expected = BTreeMap::new();
    for i in 0..EVENTS {
        let kind = if i % 2 == 0 {
            SessionKind::User
        } else {
            SessionKind::Business
        };
        let base = ["Approved", "Declined", "In Review"][(i / 2) % 3];
        let event_status = if (i / 6) % 2 == 0 {
            base.to_string()
        } else {
            upper_snake(base)
        };
        let id = world
            .session(kind, &native(kind, base), &format!("v{i}"))
            .await;
        world
            .publish_event(&amqp, &world.event(&id, kind, &event_status))
            .await;
        expected.insert(id, (kind, base));
    }

    for (app, results, trust_review) in [
        (&world.partner_app.application_id, &results_a, false),
        (&brand_b.application_id, &results_b, true),
    ] {
        let counts = wait_imports_into(&world, app, EVENTS, Duration::from_secs(30)).await;
        assert_eq!(
            counts.keys().collect::<BTreeSet<_>>(),
            expected.keys().collect::<BTreeSet<_>>()
        );
        assert!(counts.values().all(|n| *n == 1), "{counts:?}");
        results.wait_count(EVENTS, Duration::from_secs(10)).await;
        let results = results.results();
        assert_eq!(results.len(), EVENTS, "one import.result per session");
        let by_session: BTreeMap<&str, &ImportResult> = results
            .iter()
            .map(|r| (r.source_session_id.as_str(), r))
            .collect();
        assert_eq!(by_session.len(), EVENTS);
        for (id, (kind, base)) in &expected {
            let result = by_session[id.as_str()];
            let status = if trust_review {
                native(*kind, base)
            } else {
                native(*kind, "In Review")
            };
            assert_eq!(result.outcome, ImportOutcome::Imported, "{id}");
            assert_eq!(result.status.as_deref(), Some(status.as_str()), "{id}");
            assert_eq!(result.session_kind, *kind);
            assert_eq!(result.trust_review, trust_review);
            assert_eq!(result.from_application_id, world.issuer_app.application_id);
            let vendor_data = if trust_review {
                // brand-b's policy withholds the issuer's vendor_data; its template renders without it.
                "fintech-a:".to_string()
            } else {
                format!("fintech-a:vendor-{id}")
            };
            assert_eq!(result.vendor_data.as_deref(), Some(vendor_data.as_str()));
        }
        // What the results say is what Didit holds.
        for result in results.iter().take(6) {
            let session = world
                .control
                .session(result.imported_session_id.as_deref().unwrap())
                .await
                .unwrap();
            assert_eq!(session.application_id, *app);
            assert_eq!(Some(session.status), result.status);
            assert_eq!(
                session.decision.shared_from_session.as_deref(),
                Some(result.source_session_id.as_str())
            );
        }
    }
    for receiver in [&receiver_a, &receiver_b] {
        let text = receiver.metrics().encode();
        for series in [
            "partner_bridge_imports_total{issuer=\"fintech-a\",outcome=\"imported\"}",
            "partner_bridge_end_to_end_seconds_count",
            "partner_bridge_token_age_at_import_seconds_count",
            "partner_bridge_didit_requests_total{operation=\"import\",status=\"201\"}",
        ] {
            assert_eq!(metric(&text, series), EVENTS as f64, "{series}");
        }
    }
    let stats = world.control.stats().await.unwrap();
    assert_eq!(
        stats.shares,
        2 * EVENTS as u64,
        "one token per session and partner"
    );
    assert_eq!(
        metric(
            &issuer.metrics().encode(),
            "partner_bridge_tokens_published_total{partner=\"brand-b\"}"
        ),
        EVENTS as f64
    );

    amqp.close().await;
    issuer.stop().await.unwrap();
    receiver_a.stop().await.unwrap();
    receiver_b.stop().await.unwrap();
    let cleanup = Amqp::connect().await;
    topology::delete(&cleanup.channel, &app::declared_topology(&config_b))
        .await
        .expect("delete brand-b's queues");
    cleanup.close().await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_event_and_a_second_token_for_the_same_session_import_it_once() {
    let world = World::new("e2e-dup").await;
    let receiver = world.start_receiver(false).await;
    let issuer = world.start_issuer().await;
    let amqp = Amqp::connect().await;
    let results = Tap::start(&world.names.imports_exchange(), "import.#").await;

    let id = world
        .session(SessionKind::Business, "APPROVED", "dup-co")
        .await;
    let event = world.event(&id, SessionKind::Business, "APPROVED");
    world.publish_event(&amqp, &event).await;
    let first = results.wait_count(1, Duration::from_secs(15)).await;
    assert_eq!(first[0].routing_key, "import.imported");
    let imported_id = first[0].got.json()["imported_session_id"]
        .as_str()
        .expect("an imported session")
        .to_string();

    // The backend sends the same event again, and a second event for the same session: the issuer's token is
    // still valid, so neither mints again.
    world.publish_event(&amqp, &event).await;
    world
        .publish_event(&amqp, &world.event(&id, SessionKind::Business, "Approved"))
        .await;
    wait_for(
        "the issuer to skip both events",
        Duration::from_secs(15),
        || async {
            let text = issuer.metrics().encode();
            (metric(
                &text,
                "partner_bridge_events_total{source=\"amqp\",outcome=\"duplicate\"}",
            ) == 2.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(world.control.stats().await.unwrap().shares, 1);

    // A second, different token for the same session reaches the receiver anyway (minted by hand with another
    // TTL, so Didit would import it again): the receiver's ledger answers `duplicate` without calling Didit.
    let share = mint(
        &world,
        &world.issuer_app,
        &id,
        &world.partner_app.application_id,
        1800,
    )
    .await;
    publish_signed(
        &world,
        &amqp,
        &envelope_for(&world, &share, &id, "APPROVED", None),
    )
    .await;
    let tapped = results.wait_count(2, Duration::from_secs(15)).await;
    assert_eq!(tapped.len(), 2);
    assert_eq!(tapped[1].routing_key, "import.duplicate");
    let duplicate = tapped[1].got.json();
    assert_eq!(duplicate["outcome"], "duplicate");
    assert_eq!(duplicate["source_session_id"], id.as_str());
    assert_eq!(duplicate["imported_session_id"], imported_id.as_str());

    let stats = world.control.stats().await.unwrap();
    assert_eq!(
        stats.import_count(&id, &world.partner_app.application_id),
        1
    );
    assert_eq!(stats.rejected("already_imported"), 0, "Didit was not asked");
    let imports: Vec<String> = receiver
        .metrics()
        .encode()
        .lines()
        .filter(|l| l.starts_with("partner_bridge_didit_requests_total{operation=\"import\""))
        .map(str::to_string)
        .collect();
    assert_eq!(
        imports,
        vec!["partner_bridge_didit_requests_total{operation=\"import\",status=\"201\"} 1"]
    );

    amqp.close().await;
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_expired_while_the_receiver_was_down_are_reshared_and_imported_once() {
    const SESSIONS: usize = 12;
    let world = World::new("e2e-expiry").await;
    // The receiver has run once (its queue exists) and is down now.
    world.start_receiver(false).await.stop().await.unwrap();
    let issuer = world.start_issuer().await;
    let amqp = Amqp::connect().await;

    let mut sessions = BTreeSet::new();
    for i in 0..SESSIONS {
        let (kind, status) = if i % 2 == 0 {
            (SessionKind::User, "Approved")
        } else {
            (SessionKind::Business, "DECLINED")
        };
        let id = world.session(kind, status, &format!("late{i}")).await;
        world
            .publish_event(&amqp, &world.event(&id, kind, status))
            .await;
        sessions.insert(id);
    }
    let queue = world.names.receiver_tokens_queue();
    wait_for(
        "every token waiting for the receiver",
        Duration::from_secs(15),
        || async { (amqp.depth(&queue).await as usize == SESSIONS).then_some(()) },
    )
    .await;

    // Past the tokens' one-hour TTL (on Didit's clock), the receiver comes back.
    world.control.advance_clock(3700).await.unwrap();
    let receiver = world.start_receiver(false).await;
    let results = Collector::start(&world.results_queue()).await;

    let counts = world.wait_imports(SESSIONS, Duration::from_secs(30)).await;
    assert_eq!(counts.keys().cloned().collect::<BTreeSet<_>>(), sessions);
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    results.wait_count(SESSIONS, Duration::from_secs(10)).await;
    let results = results.results();
    assert_eq!(results.len(), SESSIONS);
    assert!(results.iter().all(|r| r.outcome == ImportOutcome::Imported));

    // Through reshare: each stale token was refused by Didit once and replaced by one fresh token.
    let stats = world.control.stats().await.unwrap();
    assert_eq!(stats.rejected("share_token_expired"), SESSIONS as u64);
    assert_eq!(stats.shares, 2 * SESSIONS as u64);
    let sent = metric(
        &receiver.metrics().encode(),
        "partner_bridge_reshare_requests_total{direction=\"sent\"}",
    );
    let received = metric(
        &issuer.metrics().encode(),
        "partner_bridge_reshare_requests_total{direction=\"received\"}",
    );
    assert_eq!((sent, received), (SESSIONS as f64, SESSIONS as f64));
    assert_eq!(amqp.depth(&Names::dead_queue(&queue)).await, 0);
    assert_eq!(
        amqp.depth(&Names::dead_queue(&world.names.issuer_reshare_queue()))
            .await,
        0
    );

    amqp.close().await;
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    world.cleanup().await;
}
