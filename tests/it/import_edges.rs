//! The receiver's import path at its failure edges (issue #8, items 2 and 3; DESIGN.md §5, §11): a crash between
//! Didit's import and the ledger row followed by a second token for the session, Didit acting on a request and its
//! answer lost, the ledger failing right after Didit imported, and import rows under pruning; plus the sandbox's
//! `GET /v3/sessions/` filters and its lost-answer faults, and the Didit client's `list_sessions`.
//!
//! Every fault is real: the receiver binary is SIGKILLed, the sandbox resets the connection after acting (or holds
//! its answer), PostgreSQL is cut off through a TCP proxy. Every import test ends with the sandbox's per-session
//! import count at exactly 1 and checks that each `import.result` names the session Didit created.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use partner_bridge::config::DiditAccess;
use partner_bridge::didit::client::{DiditClient, KindFilter, SessionQuery};
use partner_bridge::didit::error::DiditError;
use partner_bridge::didit::wire::{ImportRequest, SessionKind};
use partner_bridge::envelope::{ImportOutcome, ImportResult};
use partner_bridge::ledger::{
    Claim, DeliveryClaim, ImportIntent, ImportRecord, IntentClaim, Ledger,
};
use partner_bridge::metrics::Metrics;
use partner_bridge::sandbox::{
    ApplicationInfo, FaultEndpoint, FaultSettings, Sandbox, SandboxOptions,
};
use partner_bridge::secret::{SecretSource, SecretUrl};
use serde_json::Value;

use crate::support::bridge::{Amqp, Collector, World, metric};
use crate::support::faults::*;
use crate::support::pg_ledger::{PgSchema, admin};
use crate::support::proxy::Proxy;
use crate::support::t_receiver::{
    Tap, drain_n, envelope_for, hand_token, mint, publish_signed, receiver_dead_queue,
};
use crate::support::wait_for;

const WAIT: Duration = Duration::from_secs(60);

fn import_fault(settings: FaultSettings) -> FaultSettings {
    FaultSettings {
        endpoint: FaultEndpoint::Import,
        ..settings
    }
}

/// Every `import.result` received for `source`.
fn results_for(results: &[ImportResult], source: &str) -> Vec<ImportResult> {
    results
        .iter()
        .filter(|r| r.source_session_id == source)
        .cloned()
        .collect()
}

/// The session in the partner's application that the sandbox says was imported from `source` — the truth the
/// results are checked against.
async fn clone_of(world: &World, imported_session_id: &str, source: &str) {
    let clone = world
        .control
        .session(imported_session_id)
        .await
        .expect("the imported session exists");
    assert_eq!(clone.application_id, world.partner_app.application_id);
    assert_eq!(
        clone.decision.shared_from_session.as_deref(),
        Some(source),
        "{imported_session_id} is the import of {source}"
    );
}

// ---- a crash between Didit's import and the ledger row, then a second token --------------------------------

/// Token A is in flight: the sandbox imports it and holds its answer, so the receiver binary has written its
/// intent but no row when it is SIGKILLed. A re-minted token B for the same session is then handled before A's
/// redelivery (the test holds A back, the way a slow redelivery or a shovel would). B must not be imported:
/// it finds A's import through Didit's list and reports it `imported` with A's session. A, put back afterwards,
/// is a `duplicate` naming the same session.
///
/// On the old code (no intent: the lease voided at restart freed the key) B imported the session a second time
/// (count 2) — seen with `git stash` on this branch's fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_token_after_a_crash_between_didits_import_and_the_ledger_row_imports_nothing_more()
 {
    let world = World::new("edge-kill").await;
    test_logs();
    let (config, admin) = binary_config(&world, 4, 5);
    // A patient Didit client: token A's handling stays inside its first, held call until the kill (no timeout,
    // no retry copy of A in flight).
    let toml = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, set_key(&toml, "timeout_ms", "30000")).unwrap();
    let log = world.dir.path().join("bridge.log");
    let mut bridge = Binary::start(&config, admin, log.clone()).await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let partner = world.partner_app.application_id.clone();

    let session = world
        .session(SessionKind::User, "Approved", "crm-edge-kill")
        .await;
    let a = mint(&world, &world.issuer_app, &session, &partner, 3600).await;
    let envelope_a = envelope_for(&world, &a, &session, "Approved", Some("crm-edge-kill"));
    world
        .control
        .set_faults(import_fault(FaultSettings {
            hang_after_rate: 1.0,
            ..FaultSettings::default()
        }))
        .await
        .unwrap();
    publish_signed(&world, &amqp, &envelope_a).await;
    showing_log(
        &log,
        wait_for("Didit to import token A", WAIT, || async {
            (import_counts(&world).await.get(&session) == Some(&1)).then_some(())
        }),
    )
    .await;
    // Didit has imported A; its answer is held, so the receiver has no row for it.
    bridge.child.kill().await.expect("SIGKILL the receiver");
    world.control.clear_faults().await.unwrap();
    let queue = world.names.receiver_tokens_queue();
    let held_a = drain_n(&amqp, &queue, 1, WAIT).await;
    assert_eq!(held_a.len(), 1, "A came back to the queue unacked");

    let b = mint(&world, &world.issuer_app, &session, &partner, 1800).await;
    assert_ne!(a.share_token, b.share_token, "a second, distinct token");
    let envelope_b = envelope_for(&world, &b, &session, "Approved", Some("crm-edge-kill"));
    publish_signed(&world, &amqp, &envelope_b).await;
    let bridge = Binary::start(&config, admin, log.clone()).await;
    let first = showing_log(
        &log,
        wait_for("token B's result", WAIT, || async {
            results_for(&results.results(), &session).into_iter().next()
        }),
    )
    .await;
    assert_eq!(first.outcome, ImportOutcome::Imported, "{first:?}");
    let imported_id = first
        .imported_session_id
        .clone()
        .expect("the result names the imported session");
    clone_of(&world, &imported_id, &session).await;

    // A's redelivery, late: answered from the ledger.
    republish(&amqp, "", &queue, &held_a[0]).await;
    showing_log(
        &log,
        wait_for("token A's result", WAIT, || async {
            (results_for(&results.results(), &session).len() >= 2).then_some(())
        }),
    )
    .await;
    showing_log(
        &log,
        wait_settled(
            &world,
            &amqp,
            &results,
            std::slice::from_ref(&session),
            WAIT,
            || async { vec![bridge.metrics().await] },
        ),
    )
    .await;
    let mut bridge = bridge;
    bridge.terminate();
    assert!(
        bridge
            .exited_within(Duration::from_secs(20))
            .await
            .success()
    );
    showing_log(
        &log,
        assert_exactly_once(&world, &amqp, std::slice::from_ref(&session)),
    )
    .await;
    let all = results_for(&results.results(), &session);
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[1].outcome, ImportOutcome::Duplicate);
    for r in &all {
        assert_eq!(r.imported_session_id.as_deref(), Some(imported_id.as_str()));
    }
    results.stop();
    amqp.close().await;
    world.cleanup().await;
}

// ---- answers lost after Didit acted ---------------------------------------------------------------------------

/// Half of Didit's import answers are lost after the import was done (the sandbox resets the connection instead
/// of answering), across 30 sessions through both pipelines: every session is imported exactly once and every
/// `import.result` is `imported`, naming the session Didit made — none is a `duplicate` without an id.
///
/// On the old code a lost answer's retry got 403 already-imported and was reported `duplicate` with no
/// `imported_session_id` (the assertion on every result fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_lost_after_didit_imported_still_end_imported_with_the_session() {
    let world = World::new("edge-drop").await;
    test_logs();
    world
        .control
        .set_faults(import_fault(FaultSettings {
            drop_response_rate: 0.5,
            ..FaultSettings::default()
        }))
        .await
        .unwrap();
    let receiver = world.start_receiver(false).await;
    let issuer = world.start_issuer().await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let sessions = publish_sessions(&world, &amqp, 30, "drop").await;

    wait_settled(&world, &amqp, &results, &sessions, WAIT, || async {
        vec![issuer.metrics().encode(), receiver.metrics().encode()]
    })
    .await;
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    assert_exactly_once(&world, &amqp, &sessions).await;
    let stats = world.control.stats().await.unwrap();
    assert!(
        stats.rejected("already_imported") > 0,
        "answers were lost and replayed: {:?}",
        stats.rejections
    );
    let all = results.results();
    for session in &sessions {
        let mine = results_for(&all, session);
        assert!(!mine.is_empty(), "{session} has a result");
        for r in &mine {
            assert_eq!(r.outcome, ImportOutcome::Imported, "{r:?}");
            let id = r
                .imported_session_id
                .as_deref()
                .unwrap_or_else(|| panic!("no imported_session_id: {r:?}"));
            clone_of(&world, id, session).await;
        }
    }
    results.stop();
    amqp.close().await;
    world.cleanup().await;
}

// ---- the ledger failing right after Didit imported ------------------------------------------------------------

/// Didit imports (its answer held), then the PostgreSQL ledger becomes unreachable: the receiver learns the
/// session but cannot record it. It must not ack: no `import.result`, nothing dead-lettered, the pipeline paused
/// on the ledger while it is down; once the ledger is back, the session ends `imported` with its id, imported once.
///
/// On the old code the failed `complete_import` was logged and the envelope acked (with a `duplicate` result),
/// so a result arrived during the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_ledger_write_after_didits_import_is_not_acked_and_ends_imported_once() {
    let world = World::new("edge-ledger").await;
    test_logs();
    let schema = PgSchema::create("edge").await;
    let proxy = Proxy::start_to("127.0.0.1:5432").await;
    let toml = tuned(&world.receiver_toml(false), &crate::support::amqp_url(), 4);
    let toml = format!(
        "{toml}\n[ledger]\nurl = \"{}\"\n",
        schema.url_via(&proxy.addr().to_string())
    );
    let receiver = world.start(world.config(&toml)).await;
    let tap = Tap::start(&world.names.imports_exchange(), "import.#").await;
    let amqp = Amqp::connect().await;
    world
        .control
        .set_faults(import_fault(FaultSettings {
            hang_after_rate: 1.0,
            ..FaultSettings::default()
        }))
        .await
        .unwrap();
    let envelope = hand_token(&world, SessionKind::User, "Approved", Some("crm-edge-pg")).await;
    let session = envelope.source_session_id.clone();
    publish_signed(&world, &amqp, &envelope).await;
    wait_for("Didit to import the token", WAIT, || async {
        (import_counts(&world).await.get(&session) == Some(&1)).then_some(())
    })
    .await;
    // The ledger goes away while the answer is still held; then Didit answers again (403 already imported).
    proxy.refuse(true);
    proxy.cut();
    world.control.clear_faults().await.unwrap();
    // The unrecorded import pauses the pipeline (an unavailable ledger is not the message's fault), so nothing
    // is acked and no attempt is used up while the ledger is away.
    let paused = "partner_bridge_paused{pipeline=\"receiver_tokens\",reason=\"ledger\"}";
    wait_for("the receiver to pause on the ledger", WAIT, || async {
        (metric(&receiver.metrics().encode(), paused) == 1.0).then_some(())
    })
    .await;
    assert!(
        tap.all().is_empty(),
        "no result while the ledger is down: {:?}",
        tap.all().iter().map(|t| &t.routing_key).collect::<Vec<_>>()
    );
    assert_eq!(amqp.depth(&receiver_dead_queue(&world)).await, 0);

    proxy.refuse(false);
    let tapped = tap.wait_count(1, WAIT).await;
    assert_eq!(tapped[0].routing_key, "import.imported");
    let result: ImportResult = serde_json::from_slice(&tapped[0].got.body).unwrap();
    let id = result.imported_session_id.expect("names the session");
    clone_of(&world, &id, &session).await;
    let tokens = world.names.receiver_tokens_queue();
    let queues = [partner_bridge::amqp::Names::retry_queue(&tokens), tokens];
    wait_for("the receiver to settle", WAIT, || async {
        let waiting = non_empty(&amqp, &queues).await;
        (waiting.is_empty() && in_flight(&receiver.metrics().encode()) == 0.0).then_some(())
    })
    .await;
    receiver.stop().await.unwrap();
    assert_eq!(tap.all().len(), 1);
    assert_eq!(import_counts(&world).await.get(&session), Some(&1));
    assert_eq!(amqp.depth(&receiver_dead_queue(&world)).await, 0);
    drop(tap);
    amqp.close().await;
    world.cleanup().await;
}

// ---- the ledger: intents, and import rows under pruning (both backends) ---------------------------------------

enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh ledger on one backend; the temporary directory or schema lives as long as the returned guard.
async fn ledger_on(backend: Backend) -> (Ledger, tempfile::TempDir, Option<PgSchema>) {
    let dir = tempfile::tempdir().unwrap();
    match backend {
        Backend::Sqlite => {
            let url = format!("sqlite://{}", dir.path().join("ledger.sqlite3").display());
            (Ledger::open(&SecretUrl::new(url)).await.unwrap(), dir, None)
        }
        Backend::Postgres => {
            let schema = PgSchema::create("ledger").await;
            let ledger = Ledger::open(&SecretUrl::new(schema.url())).await.unwrap();
            (ledger, dir, Some(schema))
        }
    }
}

fn intent(digest: &str, message_id: &str) -> ImportIntent {
    ImportIntent {
        token_digest: digest.into(),
        message_id: message_id.into(),
        holder: format!("h-{message_id}"),
        vendor_data: Some("fintech-a:crm".into()),
        at: Utc::now(),
    }
}

fn record(source: &str) -> ImportRecord {
    ImportRecord {
        issuer_application_id: "issuer-app".into(),
        source_session_id: source.into(),
        imported_session_id: Some(format!("clone-of-{source}")),
        session_number: Some(1),
        status: Some("In Review".into()),
        session_kind: SessionKind::User,
        vendor_data: None,
        trust_review: false,
        imported_at: Utc::now(),
        result_published: true,
    }
}

async fn claim(l: &Ledger, source: &str, holder: &str) -> Claim<ImportRecord> {
    l.claim_import(
        "issuer-app",
        source,
        holder,
        Duration::from_secs(30),
        Utc::now(),
    )
    .await
    .unwrap()
}

/// The intent rule: the first token's intent is recorded; the same token is a replay; another token meets the
/// pending intent (nothing written); the intent survives its lease being voided (a restart) and its holder's
/// release; abandoning clears it only for its own token; a completed import wins over everything.
async fn intents_block_other_tokens_until_resolved(l: Ledger) {
    assert!(matches!(claim(&l, "s1", "a").await, Claim::Acquired { .. }));
    let a = intent("digest-a", "m-a");
    assert_eq!(
        l.begin_import("issuer-app", "s1", &a).await.unwrap(),
        IntentClaim::Recorded { replay: false }
    );
    // A crash: the lease is voided (SQLite) or lapses, the holder never comes back; the intent stays.
    l.void_leases_of_previous_run().await.unwrap();
    l.release_import("issuer-app", "s1", "a").await.unwrap();
    let stored = l.import_intent("issuer-app", "s1").await.unwrap().unwrap();
    assert_eq!(stored.token_digest, "digest-a");
    assert_eq!(stored.message_id, "m-a");
    assert_eq!(stored.vendor_data.as_deref(), Some("fintech-a:crm"));
    assert!(matches!(claim(&l, "s1", "b").await, Claim::Acquired { .. }));
    match l
        .begin_import("issuer-app", "s1", &intent("digest-b", "m-b"))
        .await
        .unwrap()
    {
        IntentClaim::Pending(other) => assert_eq!(other.message_id, "m-a"),
        other => panic!("expected the pending intent, got {other:?}"),
    }
    // The same token again (its redelivery) is a replay that keeps the first attempt's time.
    let mut again = intent("digest-a", "m-a2");
    again.at = stored.at + TimeDelta::seconds(90);
    assert_eq!(
        l.begin_import("issuer-app", "s1", &again).await.unwrap(),
        IntentClaim::Recorded { replay: true }
    );
    let replayed = l.import_intent("issuer-app", "s1").await.unwrap().unwrap();
    assert_eq!(replayed.message_id, "m-a2");
    assert_eq!(replayed.at.timestamp_millis(), stored.at.timestamp_millis());
    // Abandoning another token's intent changes nothing; abandoning its own clears it.
    l.abandon_import_intent("issuer-app", "s1", "digest-b")
        .await
        .unwrap();
    assert!(l.import_intent("issuer-app", "s1").await.unwrap().is_some());
    l.abandon_import_intent("issuer-app", "s1", "digest-a")
        .await
        .unwrap();
    assert!(l.import_intent("issuer-app", "s1").await.unwrap().is_none());
    assert_eq!(
        l.begin_import("issuer-app", "s1", &intent("digest-b", "m-b"))
            .await
            .unwrap(),
        IntentClaim::Recorded { replay: false }
    );
    // Completing resolves the intent; from then on every token meets the record.
    l.complete_import(&record("s1"), "b").await.unwrap();
    assert!(l.import_intent("issuer-app", "s1").await.unwrap().is_none());
    assert!(matches!(
        l.begin_import("issuer-app", "s1", &intent("digest-c", "m-c"))
            .await
            .unwrap(),
        IntentClaim::Done(r) if r.imported_session_id.as_deref() == Some("clone-of-s1")
    ));
}

/// Pruning with a cutoff ahead of everything: share rows, abandoned import claims, reshare counters and webhook
/// keys go; recorded imports and unresolved intents stay, however old.
///
/// On the old code the import row was pruned with the rest (`l.import(..)` became `None`), after which any later
/// token imported the session again.
async fn import_rows_and_intents_survive_prune(l: Ledger) {
    assert!(matches!(
        claim(&l, "done", "a").await,
        Claim::Acquired { .. }
    ));
    l.complete_import(&record("done"), "a").await.unwrap();
    assert!(matches!(
        claim(&l, "pending", "a").await,
        Claim::Acquired { .. }
    ));
    l.begin_import("issuer-app", "pending", &intent("digest-p", "m-p"))
        .await
        .unwrap();
    l.release_import("issuer-app", "pending", "a")
        .await
        .unwrap();
    l.bump_reshares("issuer-app", "counted").await.unwrap();
    let long_ago = Utc::now() - TimeDelta::days(400);
    assert!(matches!(
        l.claim_import(
            "issuer-app",
            "abandoned",
            "crashed",
            Duration::from_secs(1),
            long_ago
        )
        .await
        .unwrap(),
        Claim::Acquired { .. }
    ));
    assert!(matches!(
        l.claim_webhook(
            "old-delivery",
            "intake",
            Duration::from_secs(1),
            long_ago,
            true
        )
        .await
        .unwrap(),
        DeliveryClaim::Fresh
    ));
    l.confirm_webhook("old-delivery", long_ago).await.unwrap();
    let cutoff = Utc::now() + TimeDelta::days(3650);
    let deleted = l.prune(cutoff).await.unwrap();
    assert_eq!(
        deleted, 3,
        "the abandoned claim, the reshare counter, the webhook key"
    );
    assert_eq!(
        l.import("issuer-app", "done")
            .await
            .unwrap()
            .and_then(|r| r.imported_session_id),
        Some("clone-of-done".into())
    );
    assert!(
        l.import_intent("issuer-app", "pending")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(l.bump_reshares("issuer-app", "counted").await.unwrap(), 1);
    assert_eq!(l.prune(cutoff).await.unwrap(), 1, "the new counter only");
    assert!(matches!(
        claim(&l, "done", "later").await,
        Claim::Done(r) if r.imported_session_id.as_deref() == Some("clone-of-done")
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_intents_block_other_tokens_until_resolved() {
    let (l, _dir, _) = ledger_on(Backend::Sqlite).await;
    intents_block_other_tokens_until_resolved(l).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_intents_block_other_tokens_until_resolved() {
    let (l, _dir, _schema) = ledger_on(Backend::Postgres).await;
    intents_block_other_tokens_until_resolved(l).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_import_rows_and_intents_survive_prune() {
    let (l, _dir, _) = ledger_on(Backend::Sqlite).await;
    import_rows_and_intents_survive_prune(l).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_import_rows_and_intents_survive_prune() {
    let (l, _dir, _schema) = ledger_on(Backend::Postgres).await;
    import_rows_and_intents_survive_prune(l).await;
}

/// A v1 ledger (the released schema) opens with this binary: its import rows are kept and intents work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_sqlite_ledger_migrates_to_v2_and_keeps_its_imports() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite3");
    let url = SecretUrl::new(format!("sqlite://{}", path.display()));
    {
        let l = Ledger::open(&url).await.unwrap();
        assert!(matches!(
            claim(&l, "old", "a").await,
            Claim::Acquired { .. }
        ));
        l.complete_import(&record("old"), "a").await.unwrap();
    }
    // Back to exactly the v1 shape: the v2 columns gone, user_version 1.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        for column in [
            "intent_digest",
            "intent_message_id",
            "intent_holder",
            "intent_vendor_data",
            "intent_at",
        ] {
            conn.execute_batch(&format!("ALTER TABLE imports DROP COLUMN {column}"))
                .unwrap();
        }
        for column in ["confirmed", "lease_holder", "lease_until"] {
            conn.execute_batch(&format!(
                "ALTER TABLE webhook_deliveries DROP COLUMN {column}"
            ))
            .unwrap();
        }
        conn.pragma_update(None, "user_version", 1).unwrap();
    }
    let l = Ledger::open(&url).await.unwrap();
    let version: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    // Through v2 to the current version (v3 adds the backfill's and the notices' tables).
    assert_eq!(version, partner_bridge::ledger::sqlite::SCHEMA_VERSION);
    assert!(matches!(claim(&l, "old", "b").await, Claim::Done(_)));
    assert!(matches!(
        claim(&l, "new", "b").await,
        Claim::Acquired { .. }
    ));
    assert_eq!(
        l.begin_import("issuer-app", "new", &intent("d", "m"))
            .await
            .unwrap(),
        IntentClaim::Recorded { replay: false }
    );
}

/// The same for PostgreSQL: a v1 schema (no intent or delivery-state columns, `schema_version` 1) migrates in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_postgres_ledger_migrates_to_v2_and_keeps_its_imports() {
    let schema = PgSchema::create("v1").await;
    let url = SecretUrl::new(schema.url());
    {
        let l = Ledger::open(&url).await.unwrap();
        assert!(matches!(
            claim(&l, "old", "a").await,
            Claim::Acquired { .. }
        ));
        l.complete_import(&record("old"), "a").await.unwrap();
    }
    let client = admin().await.unwrap();
    client
        .batch_execute(&format!(
            "ALTER TABLE {s}.imports DROP COLUMN intent_digest, DROP COLUMN intent_message_id,
                 DROP COLUMN intent_holder, DROP COLUMN intent_vendor_data, DROP COLUMN intent_at;
             ALTER TABLE {s}.webhook_deliveries DROP COLUMN confirmed, DROP COLUMN lease_holder,
                 DROP COLUMN lease_until;
             UPDATE {s}.ledger_meta SET value = '1' WHERE key = 'schema_version';",
            s = schema.schema
        ))
        .await
        .unwrap();
    let l = Ledger::open(&url).await.unwrap();
    assert!(matches!(claim(&l, "old", "b").await, Claim::Done(_)));
    assert!(matches!(
        claim(&l, "new", "b").await,
        Claim::Acquired { .. }
    ));
    assert_eq!(
        l.begin_import("issuer-app", "new", &intent("d", "m"))
            .await
            .unwrap(),
        IntentClaim::Recorded { replay: false }
    );
    let version: String = client
        .query_one(
            &format!(
                "SELECT value FROM {}.ledger_meta WHERE key = 'schema_version'",
                schema.schema
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        version,
        partner_bridge::ledger::postgres::SCHEMA_VERSION.to_string()
    );
    drop(l);
}

// ---- the sandbox: GET /v3/sessions/ and the lost-answer faults -----------------------------------------------

struct Env {
    sandbox: Sandbox,
    a: ApplicationInfo,
    b: ApplicationInfo,
    http: reqwest::Client,
}

async fn env() -> Env {
    let sandbox = Sandbox::start(
        "127.0.0.1:0".parse().unwrap(),
        SandboxOptions {
            rate_limit: false,
            default_applications: false,
            ..SandboxOptions::default()
        },
    )
    .await
    .unwrap();
    let control = sandbox.control();
    let a = control.create_application("fintech-a").await.unwrap();
    let b = control.create_application("sponsor-bank").await.unwrap();
    Env {
        sandbox,
        a,
        b,
        http: http(),
    }
}

impl Env {
    fn client(&self, app: &ApplicationInfo, timeout: Duration) -> DiditClient {
        DiditClient::new(
            &DiditAccess {
                base_url: self.sandbox.base_url(),
                application_id: app.application_id.clone(),
                api_key: SecretSource::Inline(app.api_key.clone()),
                timeout,
                connect_timeout: Duration::from_secs(2),
            },
            std::sync::Arc::new(Metrics::new()),
        )
        .unwrap()
    }

    async fn list(&self, app: &ApplicationInfo, query: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}/v3/sessions/{query}", self.sandbox.base_url()))
            .header("x-api-key", app.api_key.expose())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A finished session at A, shared to B and imported there with `vendor_data`; answers (source, clone).
    async fn imported(&self, kind: SessionKind, vendor_data: &str) -> (String, String) {
        let control = self.sandbox.control();
        let status = if kind == SessionKind::User {
            "Approved"
        } else {
            "APPROVED"
        };
        let source = control
            .create_session(&self.a.application_id, kind, status, Some("issuer-crm"))
            .await
            .unwrap()
            .session_id;
        let share = self
            .client(&self.a, Duration::from_secs(5))
            .share(&source, &self.b.application_id, 3600)
            .await
            .unwrap();
        let clone = self
            .client(&self.b, Duration::from_secs(5))
            .import(&ImportRequest {
                share_token: share.share_token,
                workflow_id: self.b.workflows.for_kind(kind).to_string(),
                vendor_data: Some(vendor_data.into()),
                trust_review: false,
            })
            .await
            .unwrap();
        (source, clone.session_id)
    }
}

fn ids(body: &Value) -> Vec<String> {
    body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["session_id"].as_str().unwrap().to_string())
        .collect()
}

/// Didit's documented filters, ANDed, newest first, with `next` keeping the filters; `session_kind` defaults to
/// `user` and `all` concatenates a page of each kind; bad values are 400 `validation_error`.
#[tokio::test]
async fn session_list_filters_by_vendor_data_status_kind_and_date_and_pages_with_next() {
    let e = env().await;
    let mut clones = BTreeMap::new();
    for _ in 0..3 {
        let (source, clone) = e.imported(SessionKind::User, "shared-crm").await;
        clones.insert(clone, source);
    }
    let (_, kyb_clone) = e.imported(SessionKind::Business, "shared-crm").await;
    let (_, other) = e.imported(SessionKind::User, "other-crm").await;
    let control = e.sandbox.control();
    control
        .create_session(
            &e.b.application_id,
            SessionKind::User,
            "Approved",
            Some("shared-crm"),
        )
        .await
        .unwrap();

    // vendor_data is exact; the default kind is user; newest first.
    let (status, body) = e.list(&e.b, "?vendor_data=shared-crm").await;
    assert_eq!(status, 200);
    assert_eq!(body["count"], 4);
    let listed = ids(&body);
    assert!(!listed.contains(&kyb_clone) && !listed.contains(&other));
    let numbers: Vec<i64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["session_number"].as_i64().unwrap())
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0] > w[1]),
        "newest first: {numbers:?}"
    );
    for row in body["results"].as_array().unwrap() {
        assert_eq!(row["vendor_data"], "shared-crm");
    }
    let imports: Vec<&Value> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["shared_from_session"].is_string())
        .collect();
    assert_eq!(imports.len(), 3, "the imports say where they came from");

    // status (either casing) and kind.
    let (_, in_review) = e
        .list(&e.b, "?vendor_data=shared-crm&status=IN_REVIEW")
        .await;
    assert_eq!(in_review["count"], 3);
    let (_, approved) = e
        .list(&e.b, "?vendor_data=shared-crm&status=Approved")
        .await;
    assert_eq!(approved["count"], 1);
    let (_, kyb) = e
        .list(&e.b, "?vendor_data=shared-crm&session_kind=business")
        .await;
    assert_eq!(ids(&kyb), vec![kyb_clone.clone()]);
    let (_, all) = e
        .list(&e.b, "?vendor_data=shared-crm&session_kind=all")
        .await;
    assert_eq!(all["count"], 5);

    // Created dates: today is in, tomorrow is not.
    let today = Utc::now().date_naive();
    let tomorrow = today + TimeDelta::days(1);
    let (_, from_today) = e
        .list(&e.b, &format!("?vendor_data=shared-crm&date_from={today}"))
        .await;
    assert_eq!(from_today["count"], 4);
    let (_, from_tomorrow) = e.list(&e.b, &format!("?date_from={tomorrow}")).await;
    assert_eq!(from_tomorrow["count"], 0);
    let (_, to_today) = e.list(&e.b, &format!("?date_to={today}")).await;
    assert_eq!(to_today["count"], 5);

    // Paging: next keeps the filters and walks every row exactly once.
    let (_, first) = e.list(&e.b, "?vendor_data=shared-crm&limit=3").await;
    assert_eq!(ids(&first).len(), 3);
    let next = first["next"].as_str().unwrap();
    assert!(
        next.contains("vendor_data=shared-crm") && next.contains("offset=3"),
        "{next}"
    );
    let second: Value = e
        .http
        .get(next)
        .header("x-api-key", e.b.api_key.expose())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ids(&second).len(), 1);
    assert_eq!(second["next"], Value::Null);
    assert!(second["previous"].is_string());

    // The client follows next, with typed filters.
    let client = e.client(&e.b, Duration::from_secs(5));
    let listing = client
        .list_sessions(
            &SessionQuery {
                vendor_data: Some("shared-crm".into()),
                session_kind: Some(KindFilter::User),
                date_from: Some(today - TimeDelta::days(1)),
                limit: Some(2),
                ..SessionQuery::default()
            },
            10,
        )
        .await
        .unwrap();
    assert!(listing.complete);
    assert_eq!(listing.sessions.len(), 4);
    let from_list: Vec<&str> = listing
        .sessions
        .iter()
        .filter_map(|s| {
            s.shared_from_session
                .clone()
                .flatten()
                .map(|_| s.session_id.as_str())
        })
        .collect();
    assert_eq!(from_list.len(), 3);
    for id in from_list {
        assert!(clones.contains_key(id));
    }
    let cut = client
        .list_sessions(
            &SessionQuery {
                vendor_data: Some("shared-crm".into()),
                limit: Some(1),
                ..SessionQuery::default()
            },
            2,
        )
        .await
        .unwrap();
    assert_eq!((cut.sessions.len(), cut.complete), (2, false));

    // Bad filters are Didit's 400.
    for bad in [
        "?status=Finished",
        "?session_kind=robot",
        "?date_from=yesterday",
    ] {
        let (status, body) = e.list(&e.b, bad).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (400, Some("validation_error")),
            "{bad}"
        );
    }
    let (status, _) = e.list(&e.b, "?vendor_data=shared-crm&unknown=1").await;
    assert_eq!(status, 200, "unknown parameters are ignored");
    e.sandbox.shutdown().await;
}

/// `drop_response_rate`: the import is done, then the connection is reset — the client sees a connection error,
/// never the 201 — and the replay of the same token is 403 already imported. `hang_after_rate`: the import is
/// done and the answer withheld until the client times out. Both are in `/openapi.json`, marked test-only.
#[tokio::test]
async fn lost_answer_faults_act_and_then_lose_the_answer() {
    let e = env().await;
    let control = e.sandbox.control();
    let stats_for = |source: String| {
        let control = control.clone();
        let app = e.b.application_id.clone();
        async move { control.stats().await.unwrap().import_count(&source, &app) }
    };
    let share = |source: String| {
        let client = e.client(&e.a, Duration::from_secs(5));
        let b = e.b.application_id.clone();
        async move { client.share(&source, &b, 3600).await.unwrap() }
    };
    let source = control
        .create_session(&e.a.application_id, SessionKind::User, "Approved", None)
        .await
        .unwrap()
        .session_id;
    let token = share(source.clone()).await;
    let request = ImportRequest {
        share_token: token.share_token,
        workflow_id: e.b.workflows.user.clone(),
        vendor_data: Some("crm-drop".into()),
        trust_review: false,
    };
    control
        .set_faults(import_fault(FaultSettings {
            drop_response_rate: 1.0,
            ..FaultSettings::default()
        }))
        .await
        .unwrap();
    let b = e.client(&e.b, Duration::from_secs(5));
    let lost = b.import(&request).await.unwrap_err();
    assert!(matches!(lost, DiditError::Connect(_)), "{lost:?}");
    assert_eq!(stats_for(source.clone()).await, 1, "Didit acted");
    // Shares are not affected by an import fault.
    let source_2 = control
        .create_session(&e.a.application_id, SessionKind::User, "Approved", None)
        .await
        .unwrap()
        .session_id;
    let token_2 = share(source_2.clone()).await;
    control.clear_faults().await.unwrap();
    let replay = b.import(&request).await.unwrap_err();
    assert!(
        matches!(replay, DiditError::AlreadyImported { .. }),
        "{replay:?}"
    );
    assert_eq!(stats_for(source.clone()).await, 1);

    control
        .set_faults(import_fault(FaultSettings {
            hang_after_rate: 1.0,
            ..FaultSettings::default()
        }))
        .await
        .unwrap();
    let impatient = e.client(&e.b, Duration::from_millis(800));
    let held = impatient
        .import(&ImportRequest {
            share_token: token_2.share_token,
            ..request.clone()
        })
        .await
        .unwrap_err();
    assert!(matches!(held, DiditError::Timeout), "{held:?}");
    assert_eq!(
        stats_for(source_2).await,
        1,
        "Didit acted before holding the answer"
    );
    let state = control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::All,
            drop_response_rate: 1.5,
            ..FaultSettings::default()
        })
        .await;
    assert!(state.is_err(), "rates above 1 are refused");
    control.clear_faults().await.unwrap();

    let doc: Value = e
        .http
        .get(format!("{}/openapi.json", e.sandbox.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let faults = &doc["paths"]["/sandbox/faults"]["post"];
    assert_eq!(faults["tags"], serde_json::json!(["test-only"]));
    let props = &doc["components"]["schemas"]["SandboxFaultSettings"]["properties"];
    assert!(props["drop_response_rate"].is_object() && props["hang_after_rate"].is_object());
    let params: Vec<&str> = doc["paths"]["/v3/sessions/"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for name in [
        "vendor_data",
        "status",
        "session_kind",
        "date_from",
        "date_to",
        "limit",
        "offset",
    ] {
        assert!(params.contains(&name), "{name} in {params:?}");
    }
    e.sandbox.shutdown().await;
}
