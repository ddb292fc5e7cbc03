//! The idempotency ledger against real storage: every rule runs on both backends — a SQLite file in a temporary
//! directory, and PostgreSQL at 127.0.0.1:5432 in a schema of its own (dropped afterwards), so tests run in
//! parallel. Backend-specific behaviour (files, permissions, schema versions, URL handling) follows at the end.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use partner_bridge::didit::wire::SessionKind;
use partner_bridge::ledger::{
    Claim, DeliveryClaim, ImportRecord, Ledger, LedgerError, ShareRecord,
};
use partner_bridge::secret::SecretUrl;

use crate::support;

const LEASE: Duration = Duration::from_secs(30);
const MIN_VALIDITY: Duration = Duration::from_secs(300);

/// The PostgreSQL server the tests use (override with `PB_TEST_POSTGRES_URL`).
fn postgres_url() -> String {
    std::env::var("PB_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh, empty ledger and what it takes to reopen it. Fields drop in order: the ledger first, then its storage.
struct Fixture {
    ledger: Ledger,
    url: SecretUrl,
    _dir: Option<tempfile::TempDir>,
    _schema: Option<SchemaGuard>,
}

/// Drops a test's PostgreSQL schema when the test ends, passed or failed.
struct SchemaGuard {
    schema: String,
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let schema = self.schema.clone();
        // Drop cannot await; a separate thread with its own runtime can, without blocking the test's runtime on
        // itself.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(client) = pg_admin().await {
                    let _ = client
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .await;
                }
            });
        })
        .join();
    }
}

async fn pg_admin() -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) =
        tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The server processes serving connections named `app`.
async fn pg_backends(admin: &tokio_postgres::Client, app: &str) -> Vec<i32> {
    admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn fixture(backend: Backend) -> Fixture {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            // A directory that does not exist yet: opening creates it.
            let url = SecretUrl::new(format!(
                "sqlite://{}",
                dir.path().join("state/ledger.sqlite3").display()
            ));
            let ledger = Ledger::open(&url).await.expect("open sqlite ledger");
            Fixture {
                ledger,
                url,
                _dir: Some(dir),
                _schema: None,
            }
        }
        Backend::Postgres => {
            let schema = format!(
                "pbt_ledger_{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            );
            let admin = pg_admin().await.expect("postgres at 127.0.0.1:5432");
            admin
                .batch_execute(&format!("CREATE SCHEMA {schema}"))
                .await
                .unwrap();
            let guard = SchemaGuard {
                schema: schema.clone(),
            };
            let url = SecretUrl::new(format!(
                "{}?options=-c%20search_path%3D{schema}",
                postgres_url()
            ));
            let ledger = Ledger::open(&url).await.expect("open postgres ledger");
            Fixture {
                ledger,
                url,
                _dir: None,
                _schema: Some(guard),
            }
        }
    }
}

/// Now, at the millisecond precision the ledger stores.
fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap()
}

fn secs(n: i64) -> TimeDelta {
    TimeDelta::seconds(n)
}

fn share(session: &str, message_id: &str, minted: DateTime<Utc>, ttl: TimeDelta) -> ShareRecord {
    ShareRecord {
        source_session_id: session.to_string(),
        partner_application_id: "partner-app".to_string(),
        message_id: message_id.to_string(),
        event_id: format!("event-{message_id}"),
        session_kind: SessionKind::Business,
        status: "APPROVED".to_string(),
        vendor_data: Some("issuer-user-42".to_string()),
        occurred_at: minted - secs(60),
        minted_at: minted,
        expires_at: minted + ttl,
        reshares: 0,
    }
}

fn import(session: &str, imported: &str, at: DateTime<Utc>) -> ImportRecord {
    ImportRecord {
        issuer_application_id: "issuer-app".to_string(),
        source_session_id: session.to_string(),
        imported_session_id: Some(imported.to_string()),
        session_number: Some(43762),
        status: Some("In Review".to_string()),
        session_kind: SessionKind::User,
        vendor_data: None,
        trust_review: false,
        imported_at: at,
        result_published: false,
    }
}

async fn claim_share(
    l: &Ledger,
    session: &str,
    holder: &str,
    stale: Option<&str>,
    at: DateTime<Utc>,
) -> Claim<ShareRecord> {
    l.claim_share(
        session,
        "partner-app",
        holder,
        LEASE,
        MIN_VALIDITY,
        stale,
        at,
    )
    .await
    .unwrap()
}

/// Takes a webhook delivery in as the intake does (claim, then final): `true` when it was new.
async fn seen_webhook(l: &Ledger, key: &str, at: DateTime<Utc>) -> bool {
    match l
        .claim_webhook(key, "intake", LEASE, at, true)
        .await
        .unwrap()
    {
        DeliveryClaim::Fresh | DeliveryClaim::Retaken => {
            l.confirm_webhook(key, at).await.unwrap();
            true
        }
        _ => false,
    }
}

async fn claim_import(
    l: &Ledger,
    session: &str,
    holder: &str,
    at: DateTime<Utc>,
) -> Claim<ImportRecord> {
    l.claim_import("issuer-app", session, holder, LEASE, at)
        .await
        .unwrap()
}

// ---- rules, on both backends ----

async fn claim_complete_then_done(f: Fixture) {
    let l = &f.ledger;
    let t = now();
    assert_eq!(
        claim_share(l, "s1", "a", None, t).await,
        Claim::Acquired { previous: None }
    );
    assert_eq!(
        l.share("s1", "partner-app").await.unwrap(),
        None,
        "a claim is not a record"
    );
    let rec = share("s1", "m1", t, secs(3600));
    l.complete_share(&rec, "a").await.unwrap();
    assert_eq!(
        l.share("s1", "partner-app").await.unwrap(),
        Some(rec.clone())
    );
    // A duplicate event, by anyone, while the token is valid: nothing to do.
    assert_eq!(
        claim_share(l, "s1", "b", None, t + secs(1)).await,
        Claim::Done(rec.clone())
    );
    assert_eq!(
        claim_share(l, "s1", "a", None, t + secs(1)).await,
        Claim::Done(rec)
    );
    // Other keys are independent.
    assert_eq!(l.share("s1", "other-partner").await.unwrap(), None);
    assert_eq!(
        claim_share(l, "s2", "b", None, t).await,
        Claim::Acquired { previous: None }
    );
}

async fn done_ends_within_min_validity(f: Fixture) {
    let l = &f.ledger;
    let t = now();
    let rec = share("s1", "m1", t, secs(600));
    assert!(matches!(
        claim_share(l, "s1", "a", None, t).await,
        Claim::Acquired { .. }
    ));
    l.complete_share(&rec, "a").await.unwrap();
    // 600 s left, 300 s needed: done.
    assert_eq!(
        claim_share(l, "s1", "b", None, t + secs(299)).await,
        Claim::Done(rec.clone())
    );
    // 300 s left is not more than 300 s: mint again, knowing what is replaced.
    assert_eq!(
        claim_share(l, "s1", "b", None, t + secs(300)).await,
        Claim::Acquired {
            previous: Some(rec.clone())
        }
    );
    // A caller that needs more validity than is left also mints again (b's lease is its own).
    let longer = l
        .claim_share(
            "s1",
            "partner-app",
            "b",
            LEASE,
            Duration::from_secs(3600),
            None,
            t,
        )
        .await
        .unwrap();
    assert_eq!(
        longer,
        Claim::Acquired {
            previous: Some(rec)
        }
    );
}

async fn stale_message_id_forces_a_fresh_mint(f: Fixture) {
    let l = &f.ledger;
    let t = now();
    let rec = share("s1", "m1", t, secs(3600));
    assert!(matches!(
        claim_share(l, "s1", "a", None, t).await,
        Claim::Acquired { .. }
    ));
    l.complete_share(&rec, "a").await.unwrap();
    // Some other envelope expired: this token is still good.
    assert_eq!(
        claim_share(l, "s1", "r", Some("m0"), t).await,
        Claim::Done(rec.clone())
    );
    // This very token expired at the receiver, whatever our clock says: mint again.
    assert_eq!(
        claim_share(l, "s1", "r", Some("m1"), t).await,
        Claim::Acquired {
            previous: Some(rec.clone())
        }
    );
    let mut fresh = share("s1", "m2", t + secs(5), secs(3600));
    fresh.reshares = 1;
    l.complete_share(&fresh, "r").await.unwrap();
    assert_eq!(
        l.share("s1", "partner-app").await.unwrap(),
        Some(fresh.clone())
    );
    // A duplicate reshare request about m1 now finds m2.
    assert_eq!(
        claim_share(l, "s1", "r2", Some("m1"), t + secs(6)).await,
        Claim::Done(fresh)
    );
}

async fn busy_while_another_lease_is_live(f: Fixture) {
    let l = &f.ledger;
    let t = now();
    assert!(matches!(
        claim_share(l, "s1", "a", None, t).await,
        Claim::Acquired { .. }
    ));
    let until = t + secs(30);
    assert_eq!(
        claim_share(l, "s1", "b", None, t + secs(1)).await,
        Claim::Busy { until }
    );
    assert_eq!(
        claim_share(l, "s1", "b", Some("m0"), t + secs(29)).await,
        Claim::Busy { until }
    );
    // The holder itself may claim again (a retried claim), which extends its lease.
    assert!(matches!(
        claim_share(l, "s1", "a", None, t + secs(10)).await,
        Claim::Acquired { .. }
    ));
    assert_eq!(
        claim_share(l, "s1", "b", None, t + secs(11)).await,
        Claim::Busy {
            until: t + secs(40)
        }
    );

    assert!(matches!(
        claim_import(l, "s1", "a", t).await,
        Claim::Acquired { previous: None }
    ));
    assert_eq!(
        claim_import(l, "s1", "b", t + secs(1)).await,
        Claim::Busy { until }
    );
}

async fn expired_lease_is_taken_over(f: Fixture) {
    let l = &f.ledger;
    let t = now();
    assert!(matches!(
        claim_share(l, "s1", "crashed", None, t).await,
        Claim::Acquired { .. }
    ));
    assert_eq!(
        claim_share(l, "s1", "b", None, t + secs(30)).await,
        Claim::Acquired { previous: None },
        "a lease ends at its `until`"
    );
    // Now the crashed holder is the outsider.
    assert_eq!(
        claim_share(l, "s1", "crashed", None, t + secs(31)).await,
        Claim::Busy {
            until: t + secs(60)
        }
    );

    assert!(matches!(
        claim_import(l, "s1", "crashed", t).await,
        Claim::Acquired { .. }
    ));
    assert_eq!(
        claim_import(l, "s1", "b", t + secs(31)).await,
        Claim::Acquired { previous: None }
    );
    assert_eq!(
        claim_import(l, "s1", "crashed", t + secs(32)).await,
        Claim::Busy {
            until: t + secs(61)
        }
    );
}

async fn release_frees_only_the_holders_lease(f: Fixture) {
    let l = &f.ledger;
    let t = now();
    // Shares: an outsider's release changes nothing; the holder's frees the key at once.
    assert!(matches!(
        claim_share(l, "s1", "a", None, t).await,
        Claim::Acquired { .. }
    ));
    l.release_share("s1", "partner-app", "intruder")
        .await
        .unwrap();
    assert_eq!(
        claim_share(l, "s1", "b", None, t + secs(1)).await,
        Claim::Busy {
            until: t + secs(30)
        }
    );
    l.release_share("s1", "partner-app", "a").await.unwrap();
    assert_eq!(
        claim_share(l, "s1", "b", None, t + secs(1)).await,
        Claim::Acquired { previous: None }
    );
    // Releasing a re-mint keeps the record it was going to replace.
    let rec = share("s1", "m1", t, secs(3600));
    l.complete_share(&rec, "b").await.unwrap();
    assert!(matches!(
        claim_share(l, "s1", "c", Some("m1"), t + secs(2)).await,
        Claim::Acquired { .. }
    ));
    l.release_share("s1", "partner-app", "c").await.unwrap();
    assert_eq!(
        l.share("s1", "partner-app").await.unwrap(),
        Some(rec.clone())
    );
    assert_eq!(
        claim_share(l, "s1", "d", Some("m1"), t + secs(3)).await,
        Claim::Acquired {
            previous: Some(rec)
        }
    );

    // Imports: the same, and a release keeps the reshare count.
    assert!(matches!(
        claim_import(l, "s1", "a", t).await,
        Claim::Acquired { .. }
    ));
    assert_eq!(l.bump_reshares("issuer-app", "s1").await.unwrap(), 1);
    l.release_import("issuer-app", "s1", "intruder")
        .await
        .unwrap();
    assert_eq!(
        claim_import(l, "s1", "b", t + secs(1)).await,
        Claim::Busy {
            until: t + secs(30)
        }
    );
    l.release_import("issuer-app", "s1", "a").await.unwrap();
    assert_eq!(
        claim_import(l, "s1", "b", t + secs(1)).await,
        Claim::Acquired { previous: None }
    );
    assert_eq!(l.import("issuer-app", "s1").await.unwrap(), None);
    assert_eq!(l.bump_reshares("issuer-app", "s1").await.unwrap(), 2);
}

async fn completion_by_a_non_holder_keeps_the_new_lease(f: Fixture) {
    let l = &f.ledger;
    let t = now();
    // a's lease runs out mid-call; b takes over; then a's call returns and a completes anyway.
    assert!(matches!(
        claim_share(l, "s1", "a", None, t).await,
        Claim::Acquired { .. }
    ));
    assert!(matches!(
        claim_share(l, "s1", "b", None, t + secs(31)).await,
        Claim::Acquired { .. }
    ));
    let late = share("s1", "m-a", t + secs(20), secs(3600));
    l.complete_share(&late, "a").await.unwrap();
    // a's token exists, so it is recorded...
    assert_eq!(
        l.share("s1", "partner-app").await.unwrap(),
        Some(late.clone())
    );
    assert_eq!(
        claim_share(l, "s1", "c", None, t + secs(32)).await,
        Claim::Done(late)
    );
    // ...but b still holds the key for anyone who must re-mint.
    assert_eq!(
        claim_share(l, "s1", "c", Some("m-a"), t + secs(32)).await,
        Claim::Busy {
            until: t + secs(61)
        }
    );
    let mine = share("s1", "m-b", t + secs(33), secs(3600));
    l.complete_share(&mine, "b").await.unwrap();
    assert_eq!(l.share("s1", "partner-app").await.unwrap(), Some(mine));
    assert!(matches!(
        claim_share(l, "s1", "c", Some("m-b"), t + secs(34)).await,
        Claim::Acquired { .. }
    ));

    // Imports: the late completion is recorded, and from then on the key is done.
    assert!(matches!(
        claim_import(l, "s1", "a", t).await,
        Claim::Acquired { .. }
    ));
    assert!(matches!(
        claim_import(l, "s1", "b", t + secs(31)).await,
        Claim::Acquired { .. }
    ));
    let rec = import("s1", "new-session-a", t + secs(20));
    l.complete_import(&rec, "a").await.unwrap();
    assert_eq!(
        claim_import(l, "s1", "c", t + secs(32)).await,
        Claim::Done(rec)
    );
}

async fn imports_are_done_forever(f: Fixture) {
    let l = &f.ledger;
    let t = now();
    assert_eq!(
        claim_import(l, "s1", "a", t).await,
        Claim::Acquired { previous: None }
    );
    let rec = import("s1", "new-session", t);
    l.complete_import(&rec, "a").await.unwrap();
    assert_eq!(
        l.import("issuer-app", "s1").await.unwrap(),
        Some(rec.clone())
    );
    assert_eq!(
        claim_import(l, "s1", "b", t + secs(1)).await,
        Claim::Done(rec.clone())
    );
    // Ten years on, with a fresh token: still the same import.
    assert_eq!(
        claim_import(l, "s1", "b", t + TimeDelta::days(3650)).await,
        Claim::Done(rec)
    );
    // Only this issuer's session.
    assert_eq!(l.import("other-issuer", "s1").await.unwrap(), None);
    assert!(matches!(
        l.claim_import("other-issuer", "s1", "b", LEASE, t)
            .await
            .unwrap(),
        Claim::Acquired { .. }
    ));
}

async fn result_published_flag(f: Fixture) {
    let l = &f.ledger;
    let t = now();
    l.mark_result_published("issuer-app", "nothing-here")
        .await
        .unwrap();
    assert_eq!(l.import("issuer-app", "nothing-here").await.unwrap(), None);

    assert!(matches!(
        claim_import(l, "s1", "a", t).await,
        Claim::Acquired { .. }
    ));
    let rec = import("s1", "new-session", t);
    l.complete_import(&rec, "a").await.unwrap();
    assert!(
        !l.import("issuer-app", "s1")
            .await
            .unwrap()
            .unwrap()
            .result_published
    );
    l.mark_result_published("issuer-app", "s1").await.unwrap();
    let published = l.import("issuer-app", "s1").await.unwrap().unwrap();
    assert!(published.result_published);
    assert_eq!(claim_import(l, "s1", "b", t).await, Claim::Done(published));
    // A late completion does not un-publish.
    l.complete_import(&rec, "late").await.unwrap();
    assert!(
        l.import("issuer-app", "s1")
            .await
            .unwrap()
            .unwrap()
            .result_published
    );
}

async fn reshares_count_per_session(f: Fixture) {
    let l = &f.ledger;
    for expected in 1..=3 {
        assert_eq!(l.bump_reshares("issuer-app", "s1").await.unwrap(), expected);
    }
    assert_eq!(l.bump_reshares("issuer-app", "s2").await.unwrap(), 1);
    assert_eq!(l.bump_reshares("other-issuer", "s1").await.unwrap(), 1);
    // A counter is not an import.
    assert_eq!(l.import("issuer-app", "s1").await.unwrap(), None);
    let t = now();
    assert_eq!(
        claim_import(l, "s1", "a", t).await,
        Claim::Acquired { previous: None }
    );
    l.complete_import(&import("s1", "new-session", t), "a")
        .await
        .unwrap();
    // Recording the import starts the session's count again (the receiver asks for no reset after it), and
    // touches no other session.
    assert_eq!(l.reshares("issuer-app", "s1").await.unwrap(), 0);
    assert_eq!(l.reshares("other-issuer", "s1").await.unwrap(), 1);
    for expected in 1..=4 {
        assert_eq!(l.bump_reshares("issuer-app", "s1").await.unwrap(), expected);
    }
    // Reading does not count; a reset starts the session's count again, and touches no other session.
    assert_eq!(l.reshares("issuer-app", "s1").await.unwrap(), 4);
    assert_eq!(l.reshares("issuer-app", "never").await.unwrap(), 0);
    l.reset_reshares("issuer-app", "s1").await.unwrap();
    l.reset_reshares("issuer-app", "never").await.unwrap();
    assert_eq!(l.reshares("issuer-app", "s1").await.unwrap(), 0);
    assert_eq!(l.reshares("issuer-app", "s2").await.unwrap(), 1);
    assert_eq!(l.bump_reshares("issuer-app", "s1").await.unwrap(), 1);
    assert!(
        l.import("issuer-app", "s1").await.unwrap().is_some(),
        "a reset keeps the import"
    );
}

async fn webhook_keys_are_claimed_once(f: Fixture) {
    let l = &f.ledger;
    let t = now();
    assert!(seen_webhook(l, "delivery-1", t).await);
    assert!(!seen_webhook(l, "delivery-1", t + secs(1)).await);
    assert!(!seen_webhook(l, "delivery-1", t).await);
    // A released key (its event could not be queued) can be claimed again by Didit's retry.
    let claim = l
        .claim_webhook("delivery-2", "h", LEASE, t, true)
        .await
        .unwrap();
    assert_eq!(claim, DeliveryClaim::Fresh);
    l.release_webhook("delivery-2", "h").await.unwrap();
    assert!(seen_webhook(l, "delivery-2", t).await);
    assert!(!seen_webhook(l, "delivery-2", t).await);
}

async fn prune_keeps_live_leases(f: Fixture) {
    let l = &f.ledger;
    let t = now();
    // Completed records (touched now), an abandoned claim, a counter: all prunable once old enough.
    assert!(matches!(
        claim_share(l, "done", "a", None, t).await,
        Claim::Acquired { .. }
    ));
    l.complete_share(&share("done", "m1", t, secs(3600)), "a")
        .await
        .unwrap();
    assert!(matches!(
        claim_import(l, "done", "a", t).await,
        Claim::Acquired { .. }
    ));
    l.complete_import(&import("done", "new-session", t), "a")
        .await
        .unwrap();
    let long_ago = t - TimeDelta::days(40);
    assert!(matches!(
        claim_share(l, "abandoned", "crashed", None, long_ago).await,
        Claim::Acquired { .. }
    ));
    l.bump_reshares("issuer-app", "counted").await.unwrap();
    assert!(seen_webhook(l, "old-delivery", long_ago).await);
    assert!(seen_webhook(l, "new-delivery", t + TimeDelta::days(1)).await);
    // Live leases: one running past the cutoff, one ending before it but live now.
    let long_lease = Duration::from_secs(7200);
    let live = l
        .claim_share(
            "working",
            "partner-app",
            "w",
            long_lease,
            MIN_VALIDITY,
            None,
            t,
        )
        .await
        .unwrap();
    assert!(matches!(live, Claim::Acquired { .. }));
    let short_lease = Duration::from_secs(1800);
    let live = l
        .claim_import("issuer-app", "working", "w", short_lease, t)
        .await
        .unwrap();
    assert!(matches!(live, Claim::Acquired { .. }));

    // A cutoff in the past removes only what was touched before it.
    assert_eq!(
        l.prune(t - TimeDelta::days(30)).await.unwrap(),
        2,
        "the abandoned claim and the old webhook"
    );
    assert!(
        seen_webhook(l, "old-delivery", t).await,
        "its key was forgotten"
    );
    assert_eq!(
        l.share("done", "partner-app")
            .await
            .unwrap()
            .map(|r| r.message_id),
        Some("m1".into())
    );

    // A cutoff an hour ahead: everything touched so far goes, except the live leases, the future webhook and the
    // recorded import (import rows are never pruned).
    let deleted = l.prune(t + TimeDelta::hours(1)).await.unwrap();
    assert_eq!(
        deleted, 3,
        "the share, the counter and the re-claimed webhook key"
    );
    assert_eq!(l.share("done", "partner-app").await.unwrap(), None);
    assert!(l.import("issuer-app", "done").await.unwrap().is_some());
    assert_eq!(l.bump_reshares("issuer-app", "counted").await.unwrap(), 1);
    assert!(!seen_webhook(l, "new-delivery", t).await);
    assert_eq!(
        claim_share(l, "working", "other", None, t + secs(1)).await,
        Claim::Busy {
            until: t + secs(7200)
        }
    );
    assert_eq!(
        claim_import(l, "working", "other", t + secs(1)).await,
        Claim::Busy {
            until: t + secs(1800)
        }
    );
}

async fn prune_works_through_large_backlogs(f: Fixture) {
    use futures_util::StreamExt;
    // More than two chunks' worth, so that pruning has to come back for more.
    let total = 2 * partner_bridge::ledger::sqlite::PRUNE_CHUNK as usize + 500;
    let t = now() - TimeDelta::days(60);
    let claimed: Vec<bool> = futures_util::stream::iter(0..total)
        .map(|n| {
            let l = f.ledger.clone();
            async move { seen_webhook(&l, &format!("delivery-{n}"), t).await }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(claimed.iter().all(|&fresh| fresh));
    assert_eq!(
        f.ledger.prune(now() - TimeDelta::days(30)).await.unwrap(),
        total as u64
    );
    assert_eq!(
        f.ledger.prune(now() - TimeDelta::days(30)).await.unwrap(),
        0
    );
    assert!(seen_webhook(&f.ledger, "delivery-0", now()).await);
}

async fn data_survives_reopening(f: Fixture) {
    let t = now();
    let rec = share("s1", "m1", t, secs(3600));
    let imp = import("s1", "new-session", t);
    {
        let l = &f.ledger;
        assert!(matches!(
            claim_share(l, "s1", "a", None, t).await,
            Claim::Acquired { .. }
        ));
        l.complete_share(&rec, "a").await.unwrap();
        assert!(matches!(
            claim_import(l, "s1", "a", t).await,
            Claim::Acquired { .. }
        ));
        l.complete_import(&imp, "a").await.unwrap();
        assert_eq!(l.bump_reshares("issuer-app", "s2").await.unwrap(), 1);
        assert!(matches!(
            claim_share(l, "s3", "holder", None, t).await,
            Claim::Acquired { .. }
        ));
        assert!(seen_webhook(l, "delivery-1", t).await);
    }
    let Fixture {
        ledger,
        url,
        _dir,
        _schema,
    } = f;
    drop(ledger);
    let l = Ledger::open(&url).await.expect("reopen");
    assert_eq!(
        l.share("s1", "partner-app").await.unwrap(),
        Some(rec.clone())
    );
    assert_eq!(claim_share(&l, "s1", "b", None, t).await, Claim::Done(rec));
    assert_eq!(claim_import(&l, "s1", "b", t).await, Claim::Done(imp));
    assert_eq!(l.bump_reshares("issuer-app", "s2").await.unwrap(), 2);
    assert_eq!(
        claim_share(&l, "s3", "b", None, t).await,
        Claim::Busy {
            until: t + secs(30)
        }
    );
    assert!(!seen_webhook(&l, "delivery-1", t).await);
    l.check_writable().await.unwrap();
}

async fn concurrent_claims_have_one_winner(f: Fixture) {
    const TASKS: usize = 50;
    const REPLICAS: usize = 5;
    let t = now();
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut tasks = Vec::new();
    // Several replicas (separate connections: SQLite writers taking turns on one file, PostgreSQL sessions), so
    // that the atomicity comes from the database and not from one connection serialising everything.
    let mut replicas = vec![f.ledger.clone()];
    for _ in 1..REPLICAS {
        replicas.push(Ledger::open(&f.url).await.unwrap());
    }
    for n in 0..TASKS {
        let (l, barrier) = (replicas[n % REPLICAS].clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            let holder = format!("holder-{n}");
            barrier.wait().await;
            let share = claim_share(&l, "hot", &holder, None, t).await;
            let import = claim_import(&l, "hot", &holder, t).await;
            (holder, share, import)
        }));
    }
    let mut share_winners = Vec::new();
    let mut import_winners = Vec::new();
    for task in tasks {
        let (holder, share, import) = task.await.unwrap();
        match share {
            Claim::Acquired { previous: None } => share_winners.push(holder.clone()),
            Claim::Busy { until } => assert_eq!(until, t + secs(30)),
            other => panic!("unexpected share claim {other:?}"),
        }
        match import {
            Claim::Acquired { previous: None } => import_winners.push(holder),
            Claim::Busy { until } => assert_eq!(until, t + secs(30)),
            other => panic!("unexpected import claim {other:?}"),
        }
    }
    assert_eq!(share_winners.len(), 1, "share winners: {share_winners:?}");
    assert_eq!(
        import_winners.len(),
        1,
        "import winners: {import_winners:?}"
    );

    // The winner completes while everyone else tries again: all of them now see it done.
    let l = &f.ledger;
    let rec = share("hot", "m1", t, secs(3600));
    let winner = share_winners[0].clone();
    let mut tasks = Vec::new();
    for n in 0..TASKS {
        let l = replicas[n % REPLICAS].clone();
        tasks.push(tokio::spawn(async move {
            claim_share(&l, "hot", &format!("late-{n}"), None, t + secs(1)).await
        }));
    }
    l.complete_share(&rec, &winner).await.unwrap();
    for task in tasks {
        match task.await.unwrap() {
            Claim::Done(r) => assert_eq!(r, rec),
            Claim::Busy { until } => assert_eq!(until, t + secs(30)),
            other => panic!("nobody may acquire a key that is held or done: {other:?}"),
        }
    }
    assert_eq!(
        claim_share(l, "hot", "after", None, t + secs(2)).await,
        Claim::Done(rec)
    );
}

async fn writable_ledger_passes_the_probe(f: Fixture) {
    f.ledger.check_writable().await.unwrap();
    f.ledger.check_writable().await.unwrap();
}

macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::fixture(super::Backend::Sqlite).await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::fixture(super::Backend::Postgres).await).await;
                }
            )*
        }
    };
}

on_both_backends!(
    claim_complete_then_done,
    done_ends_within_min_validity,
    stale_message_id_forces_a_fresh_mint,
    busy_while_another_lease_is_live,
    expired_lease_is_taken_over,
    release_frees_only_the_holders_lease,
    completion_by_a_non_holder_keeps_the_new_lease,
    imports_are_done_forever,
    result_published_flag,
    reshares_count_per_session,
    webhook_keys_are_claimed_once,
    prune_keeps_live_leases,
    prune_works_through_large_backlogs,
    data_survives_reopening,
    concurrent_claims_have_one_winner,
    writable_ledger_passes_the_probe,
);

// ---- backend specifics ----

#[tokio::test]
async fn sqlite_file_is_wal_with_a_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite3");
    let l = Ledger::open(&SecretUrl::new(format!("sqlite://{}", path.display())))
        .await
        .unwrap();
    assert_eq!(l.backend(), "sqlite");
    l.check_writable().await.unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, partner_bridge::ledger::sqlite::SCHEMA_VERSION);
}

#[tokio::test]
async fn sqlite_refuses_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite3");
    let url = SecretUrl::new(format!("sqlite://{}", path.display()));
    drop(Ledger::open(&url).await.unwrap());
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    match Ledger::open(&url).await {
        Err(LedgerError::Open(text)) => assert!(text.contains("99"), "{text}"),
        other => panic!("expected an open error, got {other:?}"),
    }
}

#[tokio::test]
async fn sqlite_damaged_rows_are_corrupt_not_guessed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.sqlite3");
    let l = Ledger::open(&SecretUrl::new(format!("sqlite://{}", path.display())))
        .await
        .unwrap();
    let t = now();
    assert!(matches!(
        claim_share(&l, "s1", "a", None, t).await,
        Claim::Acquired { .. }
    ));
    l.complete_share(&share("s1", "m1", t, secs(3600)), "a")
        .await
        .unwrap();
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute("UPDATE shares SET session_kind = 'robot'", [])
        .unwrap();
    let err = l.share("s1", "partner-app").await.unwrap_err();
    assert!(matches!(err, LedgerError::Corrupt(_)), "{err:?}");
    assert!(!err.is_retryable());
    let err = l
        .claim_share("s1", "partner-app", "b", LEASE, MIN_VALIDITY, None, t)
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::Corrupt(_)), "{err:?}");
    // One bad row does not stop the ledger.
    assert_eq!(
        claim_share(&l, "s2", "b", None, t).await,
        Claim::Acquired { previous: None }
    );
}

#[tokio::test]
async fn sqlite_open_fails_where_the_directory_cannot_be_created() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"x").unwrap();
    let url = SecretUrl::new(format!(
        "sqlite://{}",
        file.join("ledger.sqlite3").display()
    ));
    match Ledger::open(&url).await {
        Err(LedgerError::Open(text)) => assert!(text.contains("not-a-directory"), "{text}"),
        other => panic!("expected an open error, got {other:?}"),
    }
}

/// A ledger whose file and directory are read-only is not writable: it opens (for reading), but
/// `check_writable` and every write fail. Permission bits do not bind a privileged user (root, or
/// CAP_DAC_OVERRIDE): there the test says so and checks only that the ledger still works.
#[tokio::test]
async fn sqlite_read_only_file_is_not_writable() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let path = state.join("ledger.sqlite3");
    let url = SecretUrl::new(format!("sqlite://{}", path.display()));
    let l = Ledger::open(&url).await.unwrap();
    l.complete_share(&share("s1", "m1", now(), secs(3600)), "a")
        .await
        .unwrap();
    drop(l);
    let set = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
    };
    set(&path, 0o444).unwrap();
    set(&state, 0o555).unwrap();
    let privileged = std::fs::OpenOptions::new().append(true).open(&path).is_ok();
    // SQLite opens a write-protected file read-only: what was recorded can still be read, nothing can be written,
    // and the readiness probe names the file.
    let l = Ledger::open(&url)
        .await
        .expect("a read-only ledger still opens");
    if privileged {
        eprintln!(
            "privileged user: permission bits cannot make the ledger read-only; checked the rest only"
        );
        l.check_writable().await.unwrap();
    } else {
        assert_eq!(
            l.share("s1", "partner-app")
                .await
                .unwrap()
                .map(|r| r.message_id),
            Some("m1".into())
        );
        let err = l.check_writable().await.unwrap_err();
        assert!(
            matches!(&err, LedgerError::Io(text) if text.contains("ledger.sqlite3")),
            "{err:?}"
        );
        assert!(err.is_retryable());
        let write = l.claim_webhook("k", "h", LEASE, now(), true).await;
        assert!(matches!(write, Err(LedgerError::Io(_))), "{write:?}");
    }
    drop(l);
    set(&state, 0o755).unwrap();
    set(&path, 0o644).unwrap();
}

#[tokio::test]
async fn open_refuses_unknown_urls_and_keeps_passwords_out_of_errors() {
    let err = Ledger::open(&SecretUrl::new("mysql://root:hunter2@db/ledger"))
        .await
        .unwrap_err();
    assert!(matches!(err, LedgerError::Open(_)), "{err:?}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(matches!(
        Ledger::open(&SecretUrl::new("sqlite://")).await,
        Err(LedgerError::Open(_))
    ));
    // Nothing listens on port 1.
    let err = Ledger::open(&SecretUrl::new(
        "postgres://bridge:hunter2@127.0.0.1:1/ledger?sslmode=disable",
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, LedgerError::Open(_)), "{err:?}");
    let text = format!("{err} {err:?}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("127.0.0.1:1"), "names the server: {text}");
    let err = Ledger::open(&SecretUrl::new(
        "postgres://bridge:hunter2@127.0.0.1:5432/ledger?bogus=1",
    ))
    .await
    .unwrap_err();
    assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
}

#[tokio::test]
async fn postgres_ledger_never_shows_its_password() {
    let f = fixture(Backend::Postgres).await;
    // The test server trusts every local user, so any password connects; it must still never be shown.
    let with_password =
        f.url
            .expose()
            .replacen("postgres://postgres@", "postgres://postgres:hunter2@", 1);
    let l = Ledger::open(&SecretUrl::new(with_password)).await.unwrap();
    l.check_writable().await.unwrap();
    let shown = format!("{l:?}");
    assert!(shown.contains("127.0.0.1:5432"), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[tokio::test]
async fn postgres_replicas_share_one_ledger() {
    let f = fixture(Backend::Postgres).await;
    assert_eq!(f.ledger.backend(), "postgres");
    // A second replica opening the same schema finds it migrated and sees the first one's lease and records.
    let replica = Ledger::open(&f.url).await.unwrap();
    let t = now();
    assert!(matches!(
        claim_share(&f.ledger, "s1", "replica-1", None, t).await,
        Claim::Acquired { .. }
    ));
    assert_eq!(
        claim_share(&replica, "s1", "replica-2", None, t).await,
        Claim::Busy {
            until: t + secs(30)
        }
    );
    let rec = share("s1", "m1", t, secs(3600));
    f.ledger.complete_share(&rec, "replica-1").await.unwrap();
    assert_eq!(
        claim_share(&replica, "s1", "replica-2", None, t).await,
        Claim::Done(rec)
    );
}

#[tokio::test]
async fn postgres_reconnects_after_losing_its_connection() {
    let f = fixture(Backend::Postgres).await;
    // Its own application name, so that only this test's connection is cut.
    let app = format!(
        "pbt-ledger-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let url = SecretUrl::new(format!("{}&application_name={app}", f.url.expose()));
    let l = Ledger::open(&url).await.unwrap();
    assert!(seen_webhook(&l, "before", now()).await);
    let admin = pg_admin().await.unwrap();
    let old = pg_backends(&admin, &app).await;
    assert_eq!(old.len(), 1, "one connection per ledger: {old:?}");
    let killed: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&old[0]])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    // Calls fail (transiently) until the loss is noticed; then the ledger reconnects by itself.
    support::wait_for("the ledger to reconnect", Duration::from_secs(10), || {
        let l = l.clone();
        async move {
            match l.check_writable().await {
                Ok(()) => Some(()),
                Err(e) => {
                    assert!(e.is_retryable(), "{e:?}");
                    None
                }
            }
        }
    })
    .await;
    let new = pg_backends(&admin, &app).await;
    assert_eq!(new.len(), 1, "{new:?}");
    assert_ne!(new, old);
    assert!(
        !seen_webhook(&l, "before", now()).await,
        "same data after reconnecting"
    );
}

#[tokio::test]
async fn sqlite_voids_the_leases_of_a_previous_run() {
    let dir = tempfile::tempdir().unwrap();
    let url = SecretUrl::new(format!(
        "sqlite://{}",
        dir.path().join("ledger.sqlite3").display()
    ));
    let l = Ledger::open(&url).await.unwrap();
    let lease = std::time::Duration::from_secs(600);
    let claim = l
        .claim_import("issuer", "s1", "dead-holder", lease, now())
        .await
        .unwrap();
    assert!(matches!(claim, Claim::Acquired { .. }));
    drop(l);
    // The process died holding the claim; the next run voids it and can claim at once.
    let l = Ledger::open(&url).await.unwrap();
    assert!(matches!(
        l.claim_import("issuer", "s1", "new-holder", lease, now())
            .await
            .unwrap(),
        Claim::Busy { .. }
    ));
    assert_eq!(l.void_leases_of_previous_run().await.unwrap(), 1);
    assert!(matches!(
        l.claim_import("issuer", "s1", "new-holder", lease, now())
            .await
            .unwrap(),
        Claim::Acquired { .. }
    ));
}
