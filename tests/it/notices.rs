//! Erasure and rectification notices (GDPR Art. 19) and data-sharing agreements, through real pipelines against the
//! sandbox: one issuer sharing with two partners, each partner's own receiver (the second under a prefix of its own,
//! wired to the issuer's exchanges with exchange-to-exchange bindings, as a shovel would), `partner-bridge notify`
//! for some of the sessions; then a redelivered notice, a forged one, a lost one, and tokens under the wrong
//! agreement.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lapin::options::{ExchangeBindOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use partner_bridge::amqp::{Entity, Names, topology};
use partner_bridge::app;
use partner_bridge::audit::{AuditLog, Filter};
use partner_bridge::commands;
use partner_bridge::config::Config;
use partner_bridge::didit::wire::SessionKind;
use partner_bridge::envelope::{NoticeKind, SigningKey, SubjectNotice};
use partner_bridge::ledger::Ledger;
use partner_bridge::sandbox::ApplicationInfo;

use crate::support::bridge::{AGREEMENT, Amqp, Got, World, metric_of};
use crate::support::faults::republish;
use crate::support::t_receiver::{
    Tap, drain_n, envelope_for, hand_token, mint, publish_signed, receiver_toml_with,
    wait_imports_into,
};
use crate::support::wait_for;

const WAIT: Duration = Duration::from_secs(60);
const PARTNER_B: &str = "partner-b";
const AGREEMENT_B: &str = "DSA-test-2";

fn notices(peer: &str, event: &str) -> String {
    format!("partner_bridge_notices_total{{peer=\"{peer}\",event=\"{event}\"}}")
}

fn unacked(partner: &str) -> String {
    format!("partner_bridge_notices_unacknowledged{{partner=\"{partner}\"}}")
}

/// The world's issuer with a second partner and `notice_retry_secs`.
fn issuer_toml(world: &World, b: &ApplicationInfo, retry_secs: u64) -> String {
    let toml = world.issuer_toml().replacen(
        "[issuer]\nenabled = true\n",
        &format!("[issuer]\nenabled = true\nnotice_retry_secs = {retry_secs}\n"),
        1,
    );
    format!(
        r#"{toml}
[[issuer.partners]]
name = "{PARTNER_B}"
application_id = "{id}"
ttl_seconds = 3600
statuses = ["Approved", "In Review", "Declined"]
session_kinds = ["user", "business"]
public_keys = ["{public}"]
agreement_id = "{AGREEMENT_B}"
"#,
        id = b.application_id,
        public = world.receiver_key.verifying_key().to_base64(),
    )
}

/// Partner A's receiver (`sponsor-bank`, the world's own): deletes its copy on an erasure.
fn receiver_a_toml(world: &World) -> String {
    receiver_toml_with(world, false, &[("on_erasure", "\"delete\"")])
}

/// Partner B's receiver: its own application, prefix and state, notices passed on only.
fn receiver_b_toml(world: &World, b: &ApplicationInfo, prefix_b: &str) -> String {
    let a = &world.partner_app;
    world
        .receiver_toml(false)
        .replace(
            &format!("prefix = \"{}\"", world.prefix),
            &format!("prefix = \"{prefix_b}\""),
        )
        .replace(
            &format!("{}/receiver\"", world.dir.path().display()),
            &format!("{}/receiver-b\"", world.dir.path().display()),
        )
        .replace(&a.application_id, &b.application_id)
        .replace(a.api_key.expose(), b.api_key.expose())
        .replace(&a.workflows.user, &b.workflows.user)
        .replace(&a.workflows.business, &b.workflows.business)
        .replacen(
            "[receiver]\nenabled = true\n",
            "[receiver]\nenabled = true\non_erasure = \"notify\"\n",
            1,
        )
}

/// Declares the exchanges both prefixes use and routes B's tokens and notices from the issuer's tokens exchange to
/// B's, and B's acknowledgements back to the issuer's reshare exchange.
async fn wire_partner_b(amqp: &Amqp, world: &World, b: &ApplicationInfo, names_b: &Names) {
    let topic = |name: String| Entity::Exchange {
        name,
        kind: "topic",
    };
    topology::declare(
        &amqp.channel,
        &[
            topic(world.names.tokens_exchange()),
            topic(world.names.reshare_exchange()),
            topic(names_b.tokens_exchange()),
            topic(names_b.reshare_exchange()),
        ],
    )
    .await
    .expect("declare the exchanges");
    let bind = |destination: String, source: String, key: String| async move {
        amqp.channel
            .exchange_bind(
                destination.as_str().into(),
                source.as_str().into(),
                key.as_str().into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind exchange to exchange");
    };
    for key in [
        Names::token_key(&b.application_id),
        Names::notice_key(&b.application_id),
    ] {
        bind(
            names_b.tokens_exchange(),
            world.names.tokens_exchange(),
            key,
        )
        .await;
    }
    bind(
        world.names.reshare_exchange(),
        names_b.reshare_exchange(),
        Names::notice_ack_key(&world.issuer_app.application_id),
    )
    .await;
}

/// Every `subject.notice` in a queue read so far (the results queues hold import results too).
fn backend_notices(got: &[Got]) -> Vec<SubjectNotice> {
    got.iter()
        .filter(|g| g.kind.as_deref() == Some("subject.notice"))
        .map(|g| serde_json::from_slice(&g.body).expect("a subject.notice"))
        .collect()
}

async fn audit_acts(config: &Config, act: &str) -> usize {
    let ledger = Ledger::open(&config.ledger_url()).await.expect("ledger");
    let audit = AuditLog::open(&ledger, None, None, Duration::from_secs(5))
        .await
        .expect("audit log");
    audit
        .rows(&Filter::default())
        .await
        .expect("audit rows")
        .iter()
        .filter(|r| r.act == act)
        .count()
}

/// 50 sessions shared with two partners (20 with both, 15 with each alone), then erasure notices for 11 of them and
/// one never shared. Each partner that received a session gets exactly one notice; its backend sees it; the copy
/// is deleted at the partner that says `delete` and kept at the one that says `notify`; the issuer records every
/// acknowledgement; the never-shared session reaches nobody. Then a redelivered notice changes nothing, and a
/// forged one is dead-lettered.
#[tokio::test]
async fn erasure_notices_reach_every_recipient_once_and_each_receiver_acts_as_configured() {
    let world = World::new("notices").await;
    let b = world
        .control
        .create_application(PARTNER_B)
        .await
        .expect("partner B");
    let prefix_b = format!("{}-b", world.prefix);
    let names_b = Names::new(&prefix_b);
    let amqp = Amqp::connect().await;
    wire_partner_b(&amqp, &world, &b, &names_b).await;
    let issuer_config = world.config(&issuer_toml(&world, &b, 600));
    let b_config = world.config(&receiver_b_toml(&world, &b, &prefix_b));
    let plan_b = app::declared_topology(&b_config);
    let receiver_a = world.start(world.config(&receiver_a_toml(&world))).await;
    let receiver_b = world.start(b_config).await;
    let issuer = world.start(issuer_config.clone()).await;

    let a_id = world.partner_app.application_id.clone();
    let b_id = b.application_id.clone();
    let mut sessions = Vec::new();
    for i in 0..50 {
        let (kind, status) = crate::support::faults::kind_status(i);
        let id = world.session(kind, status, &format!("n-{i}")).await;
        let mut event = world.event(&id, kind, status);
        event.partners = Some(match i {
            0..20 => vec![a_id.clone(), b_id.clone()],
            20..35 => vec![a_id.clone()],
            _ => vec![b_id.clone()],
        });
        world.publish_event(&amqp, &event).await;
        sessions.push(id);
    }
    wait_imports_into(&world, &a_id, 35, WAIT).await;
    wait_imports_into(&world, &b_id, 35, WAIT).await;
    wait_for("every event processed", WAIT, || async {
        let done = metric_of(
            &issuer,
            "partner_bridge_events_total{source=\"amqp\",outcome=\"processed\"}",
        );
        (done >= 50.0).then_some(())
    })
    .await;

    let sent = Tap::start(&world.names.tokens_exchange(), "notice.#").await;
    let acks = Tap::start(&world.names.reshare_exchange(), "notice-ack.#").await;
    let chosen: Vec<&String> = sessions[0..5]
        .iter()
        .chain(&sessions[20..23])
        .chain(&sessions[35..38])
        .collect();
    let to_a: BTreeSet<String> = chosen[0..8].iter().map(|s| s.to_string()).collect();
    let to_b: BTreeSet<String> = chosen[0..5]
        .iter()
        .chain(&chosen[8..11])
        .map(|s| s.to_string())
        .collect();
    for (i, session) in chosen.iter().enumerate() {
        let out = commands::notify(
            &issuer_config,
            session,
            NoticeKind::Erasure,
            Some("the person asked to be forgotten".into()),
            None,
        )
        .await
        .expect("notify");
        let expected = if i < 5 { 2 } else { 1 };
        assert!(
            out.contains(&format!("to {expected} recipient(s)")),
            "{session}: {out}"
        );
        assert!(
            out.contains("sent, waiting for the acknowledgement"),
            "{out}"
        );
    }
    let never_shared = world.session(SessionKind::User, "Approved", "n-x").await;
    let out = commands::notify(
        &issuer_config,
        &never_shared,
        NoticeKind::Erasure,
        None,
        None,
    )
    .await
    .expect("notify");
    assert!(out.contains("reaches nobody"), "{out}");

    wait_for("16 acknowledgements", WAIT, || async {
        let a = metric_of(&issuer, &notices("sponsor-bank", "acknowledged"));
        let b = metric_of(&issuer, &notices(PARTNER_B, "acknowledged"));
        (a >= 8.0 && b >= 5.0 + 3.0).then_some(())
    })
    .await;
    assert_eq!(metric_of(&issuer, &unacked("sponsor-bank")), 0.0);
    assert_eq!(metric_of(&issuer, &unacked(PARTNER_B)), 0.0);

    // Exactly one notice per (recipient, session), and none for the session never shared.
    let on_the_wire = sent.wait_count(16, WAIT).await;
    let mut per: BTreeMap<(String, String), usize> = BTreeMap::new();
    for t in &on_the_wire {
        let n: SubjectNotice = serde_json::from_slice(&t.got.body).expect("a notice");
        assert_eq!(t.routing_key, Names::notice_key(&n.for_application_id));
        assert!(t.got.header("x-pb-signature").is_some());
        assert_eq!(n.from_application_id, world.issuer_app.application_id);
        let agreement = if n.for_application_id == a_id {
            AGREEMENT
        } else {
            AGREEMENT_B
        };
        assert_eq!(n.agreement_id.as_deref(), Some(agreement));
        *per.entry((n.for_application_id, n.source_session_id))
            .or_default() += 1;
    }
    let expected: BTreeMap<(String, String), usize> = to_a
        .iter()
        .map(|s| ((a_id.clone(), s.clone()), 1))
        .chain(to_b.iter().map(|s| ((b_id.clone(), s.clone()), 1)))
        .collect();
    assert_eq!(per, expected);

    // Each backend sees its notices, with what its receiver did.
    let results_a = format!("{}.receiver.results", world.prefix);
    let results_b = format!("{prefix_b}.receiver.results");
    let backend_a = backend_notices(&amqp.drain(&results_a).await);
    let backend_b = backend_notices(&amqp.drain(&results_b).await);
    let sessions_of = |ns: &[SubjectNotice]| -> Vec<String> {
        ns.iter().map(|n| n.source_session_id.clone()).collect()
    };
    assert_eq!(sessions_of(&backend_a).len(), 8, "{backend_a:?}");
    assert_eq!(
        sessions_of(&backend_a).into_iter().collect::<BTreeSet<_>>(),
        to_a
    );
    assert_eq!(sessions_of(&backend_b).len(), 8, "{backend_b:?}");
    assert_eq!(
        sessions_of(&backend_b).into_iter().collect::<BTreeSet<_>>(),
        to_b
    );
    assert!(backend_a.iter().all(|n| n.action
        == Some(partner_bridge::envelope::NoticeAction::Deleted)
        && n.imported_session_id.is_some()));
    assert!(backend_b.iter().all(|n| n.action
        == Some(partner_bridge::envelope::NoticeAction::Notified)
        && n.imported_session_id.is_some()));

    // The sandbox deleted A's copies, once each, and none of B's.
    let stats = world.control.stats().await.expect("stats");
    let deleted_a: Vec<String> = stats
        .deletions
        .iter()
        .filter(|d| d.application_id == a_id)
        .filter_map(|d| d.shared_from_session.clone())
        .collect();
    assert_eq!(deleted_a.len(), 8, "{:?}", stats.deletions);
    assert_eq!(deleted_a.iter().cloned().collect::<BTreeSet<_>>(), to_a);
    assert!(stats.deletions.iter().all(|d| d.application_id != b_id));
    let deletions_before = stats.deletions.len();

    // The issuer recorded every send and every acknowledgement in its audit log.
    assert_eq!(audit_acts(&issuer_config, "notice_sent").await, 16);
    assert_eq!(audit_acts(&issuer_config, "notice_acknowledged").await, 16);
    assert_eq!(acks.wait_count(16, WAIT).await.len(), 16);

    // A redelivered notice: acknowledged again, nothing deleted or published twice, nothing recorded twice.
    let again = on_the_wire
        .iter()
        .find(|t| t.routing_key == Names::notice_key(&a_id))
        .expect("a notice to A");
    republish(
        &amqp,
        &world.names.tokens_exchange(),
        &again.routing_key,
        &again.got,
    )
    .await;
    acks.wait_count(17, WAIT).await;
    wait_for("the duplicate counted", WAIT, || async {
        (metric_of(&receiver_a, &notices("fintech-a", "duplicate")) >= 1.0).then_some(())
    })
    .await;
    assert!(backend_notices(&amqp.drain(&results_a).await).is_empty());
    assert_eq!(
        world.control.stats().await.unwrap().deletions.len(),
        deletions_before
    );
    assert_eq!(
        metric_of(&issuer, &notices("sponsor-bank", "acknowledged")),
        8.0
    );
    assert_eq!(audit_acts(&issuer_config, "notice_acknowledged").await, 16);

    // Forged notices (a stranger's key; the issuer's key id on a stranger's signature) are dead-lettered.
    let stranger = SigningKey::generate();
    let mut forged: SubjectNotice = serde_json::from_slice(&again.got.body).unwrap();
    forged.notice_id = uuid::Uuid::new_v4().to_string();
    forged.source_session_id = sessions[25].clone();
    let body = serde_json::to_vec(&forged).unwrap();
    let signature = stranger.sign(&body);
    for key_id in [stranger.key_id(), world.key.key_id()] {
        amqp.publish(
            &world.names.tokens_exchange(),
            &Names::notice_key(&a_id),
            &body,
            &[("x-pb-signature", &signature), ("x-pb-key-id", key_id)],
        )
        .await;
    }
    let dead = drain_n(
        &amqp,
        &Names::dead_queue(&world.names.receiver_notices_queue()),
        2,
        WAIT,
    )
    .await;
    assert!(
        dead.iter()
            .all(|d| d.header("x-pb-reason") == Some("bad_signature")),
        "{dead:?}"
    );
    assert_eq!(
        world.control.stats().await.unwrap().deletions.len(),
        deletions_before
    );
    assert!(backend_notices(&amqp.drain(&results_a).await).is_empty());

    issuer.stop().await.unwrap();
    receiver_a.stop().await.unwrap();
    receiver_b.stop().await.unwrap();
    let _ = topology::delete(&amqp.channel, &plan_b).await;
    amqp.close().await;
    world.cleanup().await;
}

/// A notice lost while its receiver is down (its queue purged) is sent again every `notice_retry_secs` until the
/// receiver, back up, acknowledges it; the copies that piled up meanwhile delete and publish nothing more.
#[tokio::test]
async fn an_unacknowledged_notice_is_sent_again_until_the_receiver_acknowledges_it() {
    let world = World::new("notice-retry").await;
    let amqp = Amqp::connect().await;
    let receiver_config = world.config(&receiver_a_toml(&world));
    let receiver = world.start(receiver_config.clone()).await;
    let issuer_config = world.config(&world.issuer_toml().replacen(
        "[issuer]\nenabled = true\n",
        "[issuer]\nenabled = true\nnotice_retry_secs = 1\n",
        1,
    ));
    let issuer = world.start(issuer_config.clone()).await;
    let session = world.session(SessionKind::User, "Approved", "r-1").await;
    world
        .publish_event(&amqp, &world.event(&session, SessionKind::User, "Approved"))
        .await;
    wait_imports_into(&world, &world.partner_app.application_id, 1, WAIT).await;
    wait_for("the event processed", WAIT, || async {
        let done = metric_of(
            &issuer,
            "partner_bridge_events_total{source=\"amqp\",outcome=\"processed\"}",
        );
        (done >= 1.0).then_some(())
    })
    .await;
    receiver.stop().await.unwrap();

    let out = commands::notify(&issuer_config, &session, NoticeKind::Erasure, None, None)
        .await
        .expect("notify");
    assert!(out.contains("to 1 recipient(s)"), "{out}");
    let queue = world.names.receiver_notices_queue();
    wait_for("the notice queued", WAIT, || async {
        (amqp.depth(&queue).await >= 1).then_some(())
    })
    .await;
    // The notice is lost: only a resend can reach the receiver now.
    amqp.channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .expect("purge");
    wait_for("the notice sent again", WAIT, || async {
        (metric_of(&issuer, &notices("sponsor-bank", "resent")) >= 1.0
            && amqp.depth(&queue).await >= 1)
            .then_some(())
    })
    .await;
    assert_eq!(metric_of(&issuer, &unacked("sponsor-bank")), 1.0);
    assert_eq!(
        metric_of(&issuer, &notices("sponsor-bank", "acknowledged")),
        0.0
    );

    let receiver = world.start(receiver_config).await;
    wait_for("the acknowledgement", WAIT, || async {
        (metric_of(&issuer, &notices("sponsor-bank", "acknowledged")) >= 1.0).then_some(())
    })
    .await;
    wait_for("the gauge back to 0", WAIT, || async {
        (metric_of(&issuer, &unacked("sponsor-bank")) == 0.0).then_some(())
    })
    .await;
    // Copies still queued are absorbed by the receiver's ledger.
    wait_for("every copy handled", WAIT, || async {
        (amqp.depth(&queue).await == 0).then_some(())
    })
    .await;
    let stats = world.control.stats().await.unwrap();
    let deleted: Vec<_> = stats
        .deletions
        .iter()
        .filter(|d| d.shared_from_session.as_deref() == Some(session.as_str()))
        .collect();
    assert_eq!(deleted.len(), 1, "{:?}", stats.deletions);
    let backend = backend_notices(&amqp.drain(&world.results_queue()).await);
    assert_eq!(backend.len(), 1, "{backend:?}");
    assert_eq!(metric_of(&receiver, &notices("fintech-a", "deleted")), 1.0);
    assert_eq!(audit_acts(&issuer_config, "notice_acknowledged").await, 1);

    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    amqp.close().await;
    world.cleanup().await;
}

/// A receiver configured with an agreement id dead-letters tokens that name another agreement, or none, as
/// `agreement_mismatch` (counted), and imports the one under its agreement, whose `import.result` names it.
#[tokio::test]
async fn a_token_under_another_agreement_is_dead_lettered_agreement_mismatch() {
    let world = World::new("agreement").await;
    let amqp = Amqp::connect().await;
    let toml = format!(
        "{}agreement_id = \"{AGREEMENT}\"\n",
        world.receiver_toml(false)
    );
    let receiver = world.start(world.config(&toml)).await;

    let mut other = hand_token(&world, SessionKind::User, "Approved", Some("g-1")).await;
    other.agreement_id = Some("DSA-someone-else".into());
    publish_signed(&world, &amqp, &other).await;
    let mut none = hand_token(&world, SessionKind::User, "Approved", Some("g-2")).await;
    none.agreement_id = None;
    publish_signed(&world, &amqp, &none).await;
    let session = world.session(SessionKind::User, "Approved", "g-3").await;
    let share = mint(
        &world,
        &world.issuer_app,
        &session,
        &world.partner_app.application_id,
        3600,
    )
    .await;
    let right = envelope_for(&world, &share, &session, "Approved", Some("g-3"));
    assert_eq!(right.agreement_id.as_deref(), Some(AGREEMENT));
    publish_signed(&world, &amqp, &right).await;

    let dead = drain_n(
        &amqp,
        &Names::dead_queue(&world.names.receiver_tokens_queue()),
        2,
        WAIT,
    )
    .await;
    assert!(
        dead.iter()
            .all(|d| d.header("x-pb-reason") == Some("agreement_mismatch")),
        "{dead:?}"
    );
    let imported = wait_imports_into(&world, &world.partner_app.application_id, 1, WAIT).await;
    assert_eq!(imported.keys().collect::<Vec<_>>(), [&session]);
    let results = drain_n(&amqp, &world.results_queue(), 1, WAIT).await;
    let result = results[0].json();
    assert_eq!(result["outcome"], "imported");
    assert_eq!(result["agreement_id"], AGREEMENT);
    assert_eq!(
        metric_of(
            &receiver,
            &format!(
                "partner_bridge_dead_lettered_total{{queue=\"{}\",reason=\"agreement_mismatch\"}}",
                world.names.receiver_tokens_queue()
            )
        ),
        2.0
    );

    receiver.stop().await.unwrap();
    amqp.close().await;
    world.cleanup().await;
}

/// The notice tables behave the same on both ledger backends: one row per (request, recipient) however often the
/// request comes, due for a resend only while unacknowledged, acknowledged once; a received notice keeps what was
/// done with it.
#[tokio::test]
async fn the_notice_tables_keep_notices_exactly_once_on_sqlite_and_postgres() {
    use partner_bridge::ledger::{AckRecorded, ReceivedNotice, SentNotice};
    use partner_bridge::secret::SecretUrl;

    let dir = tempfile::tempdir().unwrap();
    let pg = crate::support::pg_ledger::PgSchema::create("notices").await;
    for url in [
        format!("sqlite://{}/ledger.db", dir.path().display()),
        pg.url(),
    ] {
        let ledger = Ledger::open(&SecretUrl::new(url.clone()))
            .await
            .expect("ledger");
        let now = chrono::Utc::now();
        let row = |notice_id: &str, request_id: &str, partner: &str| SentNotice {
            notice_id: notice_id.into(),
            request_id: request_id.into(),
            session_id: "s-1".into(),
            partner: partner.into(),
            partner_application_id: format!("app-{partner}"),
            agreement_id: Some("DSA-1".into()),
            kind: "erasure".into(),
            reason: None,
            requested_at: now,
            sends: 0,
            last_sent_at: None,
            acked_at: None,
            action: None,
            imported_session_id: None,
        };
        let first = ledger.record_notice(&row("n-1", "r-1", "a")).await.unwrap();
        let again = ledger.record_notice(&row("n-2", "r-1", "a")).await.unwrap();
        assert_eq!(
            again.notice_id, "n-1",
            "{url}: a repeated request keeps its notice"
        );
        assert_eq!(first, again);
        ledger.record_notice(&row("n-3", "r-1", "b")).await.unwrap();
        assert_eq!(
            ledger.unacknowledged_notices().await.unwrap(),
            [("a".to_string(), 1), ("b".to_string(), 1)]
        );
        let due = |t| ledger.notices_due(t, 10);
        assert_eq!(due(now).await.unwrap().len(), 2, "{url}: never sent is due");
        ledger.notice_sent("n-1", now).await.unwrap();
        let later = now + chrono::Duration::seconds(60);
        let ids = |v: Vec<SentNotice>| v.into_iter().map(|n| n.notice_id).collect::<Vec<_>>();
        assert_eq!(
            ids(due(now - chrono::Duration::seconds(1)).await.unwrap()),
            ["n-3"]
        );
        assert_eq!(ids(due(later).await.unwrap()), ["n-1", "n-3"]);
        assert_eq!(ledger.sent_notice("n-1").await.unwrap().unwrap().sends, 1);

        assert_eq!(
            ledger
                .ack_notice("n-1", "app-b", "deleted", None, later)
                .await
                .unwrap(),
            AckRecorded::Unknown,
            "{url}: only the recipient acknowledges"
        );
        assert!(matches!(
            ledger.ack_notice("n-1", "app-a", "deleted", Some("i-1"), later).await.unwrap(),
            AckRecorded::New(n) if n.action.as_deref() == Some("deleted") && n.acked_at.is_some()
        ));
        assert!(matches!(
            ledger.ack_notice("n-1", "app-a", "notified", None, later).await.unwrap(),
            AckRecorded::Again(n) if n.action.as_deref() == Some("deleted")
        ));
        assert_eq!(ids(due(later).await.unwrap()), ["n-3"]);
        assert_eq!(
            ledger.unacknowledged_notices().await.unwrap(),
            [("b".to_string(), 1)]
        );
        assert_eq!(ledger.notices_for_session("s-1").await.unwrap().len(), 2);

        let received = ReceivedNotice {
            issuer_application_id: "issuer".into(),
            notice_id: "n-1".into(),
            source_session_id: "s-1".into(),
            kind: "erasure".into(),
            received_at: now,
            imported_session_id: Some("i-1".into()),
            deleted_at: None,
            published_at: None,
            action: None,
        };
        let stored = ledger.receive_notice(&received).await.unwrap();
        assert_eq!(stored.deleted_at, None);
        ledger.notice_deleted("issuer", "n-1", now).await.unwrap();
        ledger
            .notice_published("issuer", "n-1", "deleted", now)
            .await
            .unwrap();
        let mut redelivered = received.clone();
        redelivered.received_at = later;
        redelivered.imported_session_id = None;
        let stored = ledger.receive_notice(&redelivered).await.unwrap();
        assert_eq!(stored.imported_session_id.as_deref(), Some("i-1"), "{url}");
        assert!(stored.deleted_at.is_some() && stored.published_at.is_some());
        assert_eq!(stored.action.as_deref(), Some("deleted"));
    }
}
