//! `partner-bridge backfill` (issue #12 item 4), run as the real binary against the sandbox, a real broker and
//! in-process issuer and receiver bridges:
//! - a few hundred sessions of both kinds and mixed statuses, some created before `--since`: a dry run prints
//!   exactly the matching ones and sends nothing; a backfill SIGKILLed halfway and started again imports each
//!   matching session exactly once (the sandbox's share and import counts), never one outside the policy or the
//!   filters, and a run after the finished one mints nothing;
//! - an unknown partner and a bad `--budget` exit 64 naming them; a key Didit refuses is a clear error.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use partner_bridge::didit::wire::SessionKind;

use crate::support::bridge::{Amqp, World, metric_of};
use crate::support::wait_for;

/// What a run of the binary printed.
#[derive(Debug)]
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

fn command(config: &Path, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_partner-bridge"));
    command
        .arg("backfill")
        .arg("--config")
        .arg(config)
        .args(args)
        .kill_on_drop(true);
    for (key, _) in std::env::vars() {
        if key.starts_with("PARTNER_BRIDGE") {
            command.env_remove(key);
        }
    }
    command
}

/// Runs `partner-bridge backfill --config CONFIG ARGS` to completion.
async fn backfill(config: &Path, args: &[&str]) -> Ran {
    let output = tokio::time::timeout(Duration::from_secs(120), command(config, args).output())
        .await
        .unwrap_or_else(|_| panic!("backfill {args:?} did not finish within 120 s"))
        .expect("the binary runs");
    Ran {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A count of the summary (`  published: 12`).
fn count(ran: &Ran, label: &str) -> u64 {
    let prefix = format!("  {label}: ");
    ran.stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{label}` in the summary: {ran:?}"))
}

fn write_config(world: &World, name: &str, toml: &str) -> PathBuf {
    let path = world.dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, toml).expect("write config");
    path
}

/// The issuer of `world`, its partner taking Approved and In Review sessions of both kinds (not Declined).
fn issuer_toml(world: &World) -> String {
    let all = r#"statuses = ["Approved", "In Review", "Declined"]"#;
    let toml = world.issuer_toml();
    assert!(toml.contains(all), "the world's partner policy changed");
    toml.replace(all, r#"statuses = ["Approved", "In Review"]"#)
}

const STATUSES: [&str; 4] = ["Approved", "In Review", "Declined", "In Progress"];

/// `n` sessions at the issuer: statuses cycle through [`STATUSES`], kinds alternate every four. Returns (id,
/// status, kind).
async fn seed(world: &World, n: usize, tag: &str) -> Vec<(String, &'static str, SessionKind)> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let status = STATUSES[i % 4];
        let kind = if (i / 4) % 2 == 0 {
            SessionKind::User
        } else {
            SessionKind::Business
        };
        let id = world
            .control
            .create_session(
                &world.issuer_app.application_id,
                kind,
                status,
                Some(&format!("{tag}-{i}")),
            )
            .await
            .expect("create a session");
        out.push((id.session_id, status, kind));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backfill_killed_halfway_and_started_again_imports_each_matching_session_once() {
    let world = World::new("backfill").await;
    let issuer_toml = issuer_toml(&world);
    // Sessions created before --since: outside the filters. Then 240 more, three (virtual) days later.
    let early = seed(&world, 60, "early").await;
    world.control.advance_clock(3 * 86_400).await.unwrap();
    let late = seed(&world, 240, "late").await;
    let expected: BTreeSet<String> = late
        .iter()
        .filter(|(_, status, _)| matches!(*status, "Approved" | "In Review"))
        .map(|(id, _, _)| id.clone())
        .collect();
    assert_eq!(expected.len(), 120);
    assert!(late.iter().any(|(id, s, k)| *s == "Approved"
        && *k == SessionKind::Business
        && expected.contains(id)));
    let since = (Utc::now() + chrono::TimeDelta::days(1))
        .date_naive()
        .to_string();
    // The bridges run unpaced against a sandbox with its limit off; the backfill takes its budget from this rate:
    // 0.25 × 6000 per minute, 25 events per second.
    let config = write_config(
        &world,
        "backfill",
        &issuer_toml.replace("writes_per_minute = 0", "writes_per_minute = 6000"),
    );
    let args = [
        "--partner",
        "sponsor-bank",
        "--since",
        &since,
        "--budget",
        "0.25",
    ];

    // The issuer's topology exists (so a sent event would wait in its queue), no bridge runs yet.
    let issuer_config = world.config(&issuer_toml);
    partner_bridge::commands::topology_declare(&issuer_config)
        .await
        .expect("declare the issuer's topology");
    let amqp = Amqp::connect().await;
    let queue = world.names.issuer_onboarding_queue();

    // --dry-run: the matching sessions' events on stdout, for this partner only; nothing sent.
    let mut dry_args = args.to_vec();
    dry_args.push("--dry-run");
    let dry = backfill(&config, &dry_args).await;
    assert_eq!(dry.code, 0, "{dry:?}");
    let printed: Vec<serde_json::Value> = dry
        .stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON event"))
        .collect();
    let printed_ids: BTreeSet<String> = printed
        .iter()
        .map(|e| e["session_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(printed_ids, expected);
    for event in &printed {
        assert_eq!(event["type"], "onboarding.finished");
        assert_eq!(
            event["partners"],
            serde_json::json!([world.partner_app.application_id])
        );
    }
    assert_eq!(count(&dry, "would publish"), 120);
    assert_eq!(count(&dry, "listed"), 240);
    assert_eq!(count(&dry, "skipped by policy"), 120);
    assert_eq!(amqp.depth(&queue).await, 0, "a dry run sends nothing");
    assert_eq!(world.control.stats().await.unwrap().shares, 0);

    let receiver = world.start_receiver(false).await;
    let issuer = world.start(world.config(&issuer_toml)).await;

    // The first run, SIGKILLed once about a third of the sessions are published.
    let log = std::fs::File::create(world.dir.path().join("killed.log")).unwrap();
    let mut child = command(&config, &args)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the backfill");
    // Killed by what the backfill itself recorded (its checkpoint in the issuer's SQLite ledger), so that how fast
    // the bridge follows does not matter.
    let ledger_file = world.dir.path().join("issuer/ledger.sqlite3");
    wait_for(
        "a third of the sessions published",
        Duration::from_secs(60),
        || async {
            let conn = rusqlite::Connection::open_with_flags(
                &ledger_file,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .ok()?;
            let sent: i64 = conn
                .query_row("SELECT COUNT(*) FROM backfill_sent", [], |r| r.get(0))
                .ok()?;
            (sent >= 40).then_some(())
        },
    )
    .await;
    child.start_kill().expect("SIGKILL");
    let status = child.wait().await.unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "the backfill was killed: {status:?}"
    );
    // Let what it published before dying be shared, then read how far it got.
    wait_for(
        "the onboarding queue drained",
        Duration::from_secs(30),
        || async { (amqp.depth(&queue).await == 0).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shared_before = world.control.stats().await.unwrap().shares;
    assert!(
        (40..120).contains(&shared_before),
        "killed halfway, not at the end: {shared_before} shared"
    );

    // Started again with the same arguments: it continues, and sends none of the recorded sessions again.
    let resumed = backfill(&config, &args).await;
    assert_eq!(resumed.code, 0, "{resumed:?}");
    assert!(resumed.stderr.contains("resuming"), "{resumed:?}");
    assert_eq!(count(&resumed, "listed"), 240);
    assert_eq!(count(&resumed, "matching"), 120);
    assert_eq!(count(&resumed, "skipped by policy"), 120);
    let already = count(&resumed, "already done");
    let published = count(&resumed, "published");
    assert_eq!(already + published, 120, "{resumed:?}");
    // Each event is recorded after its confirm: at most the one in flight at the kill is sent twice.
    assert!(
        already + 1 >= shared_before,
        "{already} recorded, {shared_before} shared before the kill"
    );

    let counts: BTreeMap<String, u64> = world.wait_imports(120, Duration::from_secs(90)).await;
    let imported: BTreeSet<String> = counts.keys().cloned().collect();
    assert_eq!(imported, expected, "exactly the matching sessions");
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    for (id, _, _) in &early {
        assert!(!counts.contains_key(id), "{id} is before --since");
    }
    wait_for(
        "the onboarding queue drained",
        Duration::from_secs(30),
        || async { (amqp.depth(&queue).await == 0).then_some(()) },
    )
    .await;
    let stats = world.control.stats().await.unwrap();
    assert_eq!(stats.shares, 120, "no session was minted twice");
    assert_eq!(
        metric_of(
            &issuer,
            r#"partner_bridge_events_total{source="backfill",outcome="processed"}"#
        ),
        120.0
    );

    // A run after the finished one is a new pass: every token is still valid, so nothing is minted or imported.
    // It serves its own counts on --metrics-addr while it runs.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut again_args = args.to_vec();
    again_args.extend(["--metrics-addr", &addr]);
    let child = command(&config, &again_args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the backfill");
    let http = reqwest::Client::new();
    let published =
        r#"partner_bridge_backfill_sessions_total{partner="sponsor-bank",outcome="published"}"#;
    wait_for(
        "the backfill's own /metrics",
        Duration::from_secs(60),
        || async {
            let text = http
                .get(format!("http://{addr}/metrics"))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            (crate::support::bridge::metric(&text, published) > 0.0).then_some(())
        },
    )
    .await;
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the backfill ends")
        .unwrap();
    let again = Ran {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stderr.contains("starting a new pass"), "{again:?}");
    assert_eq!(count(&again, "published"), 120);
    assert_eq!(count(&again, "already done"), 0);
    wait_for(
        "the second pass handled",
        Duration::from_secs(60),
        || async {
            let duplicates = metric_of(
                &issuer,
                r#"partner_bridge_events_total{source="backfill",outcome="duplicate"}"#,
            );
            (duplicates >= 120.0).then_some(())
        },
    )
    .await;
    let stats = world.control.stats().await.unwrap();
    assert_eq!(
        stats.shares, 120,
        "a second run mints nothing already valid"
    );
    assert!(
        stats.imports.iter().all(|i| i.count == 1) && stats.imports.len() == 120,
        "{stats:?}"
    );

    amqp.close().await;
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_names_a_bad_partner_or_budget_and_reports_didit_refusing_the_key() {
    let world = World::new("backfill-args").await;
    let config = write_config(&world, "backfill", &issuer_toml(&world));

    let ran = backfill(&config, &["--partner", "nobody"]).await;
    assert_eq!(ran.code, 64, "{ran:?}");
    assert!(
        ran.stderr.contains("`--partner`") && ran.stderr.contains("nobody"),
        "{ran:?}"
    );
    assert!(
        ran.stderr.contains("sponsor-bank"),
        "lists the partners: {ran:?}"
    );
    for budget in ["0", "1.5", "-0.2", "half"] {
        let ran = backfill(&config, &["--partner", "sponsor-bank", "--budget", budget]).await;
        assert_eq!(ran.code, 64, "--budget {budget}: {ran:?}");
        assert!(ran.stderr.contains("`--budget`"), "{ran:?}");
    }

    // Didit refuses the issuer's key: a clear message and a failure, nothing published.
    world
        .control
        .revoke_key(&world.issuer_app.application_id)
        .await
        .unwrap();
    let ran = backfill(&config, &["--partner", "sponsor-bank"]).await;
    assert_eq!(ran.code, 1, "{ran:?}");
    assert!(
        ran.stderr.contains("cannot list the issuer's sessions") && ran.stderr.contains("API key"),
        "{ran:?}"
    );
    world.cleanup().await;
}

/// The checkpoint itself, on both ledger backends: it survives reopening the ledger, a session recorded twice is
/// one, a finished backfill restarts empty, and each backfill (key) has its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_survives_a_reopen_on_sqlite_and_postgres() {
    use partner_bridge::ledger::Ledger;
    use partner_bridge::ledger::backfill::BackfillStore;
    use partner_bridge::secret::SecretUrl;

    let dir = tempfile::tempdir().unwrap();
    let pg = crate::support::pg_ledger::PgSchema::create("backfill").await;
    for url in [
        format!("sqlite://{}/ledger.sqlite3", dir.path().display()),
        pg.url(),
    ] {
        let url = SecretUrl::new(url);
        let started = Utc::now() - chrono::TimeDelta::minutes(5);
        {
            let ledger = Ledger::open(&url).await.unwrap();
            let store = BackfillStore::new(&ledger);
            assert!(store.peek("run-a").await.unwrap().is_none());
            let fresh = store
                .begin("run-a", "bank", "--partner bank", started)
                .await
                .unwrap();
            assert_eq!((fresh.lane, fresh.offset), (0, 0));
            assert!(fresh.sent.is_empty() && fresh.finished_at.is_none());
            for id in ["s-1", "s-2", "s-1"] {
                store.sent("run-a", id).await.unwrap();
            }
            store.advance("run-a", 1, 200).await.unwrap();
            store
                .begin("run-b", "bank", "--partner bank --kind user", started)
                .await
                .unwrap();
        }
        let ledger = Ledger::open(&url).await.unwrap();
        let store = BackfillStore::new(&ledger);
        let resumed = store
            .begin("run-a", "bank", "--partner bank", Utc::now())
            .await
            .unwrap();
        assert_eq!((resumed.lane, resumed.offset), (1, 200), "{url:?}");
        assert_eq!(
            resumed.sent,
            ["s-1", "s-2"].iter().map(|s| s.to_string()).collect()
        );
        assert_eq!(
            resumed.started_at.timestamp_millis(),
            started.timestamp_millis(),
            "begin keeps the first start"
        );
        assert!(store.peek("run-b").await.unwrap().unwrap().sent.is_empty());
        store.finish("run-a").await.unwrap();
        assert!(
            store
                .peek("run-a")
                .await
                .unwrap()
                .unwrap()
                .finished_at
                .is_some()
        );
        let again = store.restart("run-a", Utc::now()).await.unwrap();
        assert_eq!((again.lane, again.offset, again.finished_at), (0, 0, None));
        assert!(again.sent.is_empty());
    }
}

/// The listing a backfill reads, as Didit documents it: 50 rows by default, newest first, `count`, and `next`
/// paging that an `offset` reproduces (what a resumed backfill starts from).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_lists_fifty_newest_first_by_default_and_an_offset_resumes_the_paging() {
    use partner_bridge::didit::client::{DiditClient, PageLink, SessionQuery};

    let world = World::new("backfill-list").await;
    let mut created = Vec::new();
    for i in 0..60 {
        let id = world
            .session(SessionKind::User, "Approved", &format!("list-{i}"))
            .await;
        created.push(id);
    }
    world
        .session(SessionKind::Business, "APPROVED", "kyb")
        .await;
    let access = world
        .config(&world.issuer_toml())
        .issuer_didit()
        .expect("issuer access");
    let client = DiditClient::new(&access, Default::default()).unwrap();

    let first = client
        .list_page(&SessionQuery::default(), None)
        .await
        .unwrap();
    assert_eq!(first.count, Some(60), "KYC only by default");
    assert_eq!(first.results.len(), 50, "Didit's default page size");
    let newest_first: Vec<&str> = created.iter().rev().take(50).map(String::as_str).collect();
    let listed: Vec<&str> = first
        .results
        .iter()
        .map(|s| s.session_id.as_str())
        .collect();
    assert_eq!(listed, newest_first);
    let next = first.next.clone().expect("a next page");
    assert_eq!(next.offset(), Some(50));
    let PageLink::Next(link) = next else {
        panic!("a next link that can be followed")
    };
    let followed = client
        .list_page(&SessionQuery::default(), Some(&link))
        .await
        .unwrap();
    let resumed = client
        .list_page(
            &SessionQuery {
                offset: Some(50),
                ..SessionQuery::default()
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(followed.results.len(), 10);
    assert_eq!(followed.results, resumed.results);
    assert!(followed.next.is_none() && resumed.next.is_none());
    world.cleanup().await;
}
