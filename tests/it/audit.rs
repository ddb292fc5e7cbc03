//! The audit log wired into the flows (issue #13): every act on both sides recorded once, the chain and its signed
//! checkpoints verified by `partner-bridge audit verify` (and broken by a row altered, removed or inserted by hand),
//! `audit export` and `audit list` agreeing, `audit recipients` naming exactly the applications the sandbox says
//! imported the session, and a failed audit write that settles nothing: the work comes back and each act is in
//! the log once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lapin::options::ExchangeBindOptions;
use lapin::types::FieldTable;
use partner_bridge::amqp::{Names, topology};
use partner_bridge::app;
use partner_bridge::audit::{AuditLog, AuditRow, Filter};
use partner_bridge::config::Config;
use partner_bridge::envelope::{ImportOutcome, SigningKey};

use crate::support::bridge::{Amqp, Collector, World, metric_of};
use crate::support::faults::{BIN, create_sessions, publish_events};
use crate::support::pg_ledger::PgSchema;
use crate::support::{unique_prefix, wait_for};

/// A second partner (`second-bank`) with a receiver on a broker namespace of its own, its tokens carried over by
/// an exchange-to-exchange binding (as in the e2e tests), and the issuer configured for both partners.
struct TwoPartners {
    issuer_toml: String,
    second_toml: String,
    second_prefix: String,
    second_app: String,
}

async fn two_partners(world: &World) -> TwoPartners {
    let dir = world.dir.path().display().to_string();
    let second = world
        .control
        .create_application("second-bank")
        .await
        .unwrap();
    let second_key = SigningKey::generate();
    let second_prefix = unique_prefix("audit-b");
    let second_toml = world
        .receiver_toml(false)
        .replace(&world.partner_app.application_id, &second.application_id)
        .replace(world.partner_app.api_key.expose(), second.api_key.expose())
        .replace(&world.partner_app.workflows.user, &second.workflows.user)
        .replace(
            &world.partner_app.workflows.business,
            &second.workflows.business,
        )
        .replace(&world.receiver_key.to_base64(), &second_key.to_base64())
        .replace(
            &format!("prefix = \"{}\"", world.prefix),
            &format!("prefix = \"{second_prefix}\""),
        )
        .replace(
            &format!("state_dir = \"{dir}/receiver\""),
            &format!("state_dir = \"{dir}/receiver-b\""),
        );
    assert!(second_toml.contains(&second_prefix) && second_toml.contains("receiver-b"));
    let issuer_toml = format!(
        r#"{}
[[issuer.partners]]
name = "second-bank"
application_id = "{}"
ttl_seconds = 3600
statuses = ["Approved", "In Review", "Declined"]
session_kinds = ["user", "business"]
share_vendor_data = true
public_keys = ["{}"]
"#,
        world.issuer_toml(),
        second.application_id,
        second_key.verifying_key().to_base64()
    );
    TwoPartners {
        issuer_toml,
        second_toml,
        second_prefix,
        second_app: second.application_id,
    }
}

/// Writes `toml` to `dir/name.toml` for the binary.
fn config_file(dir: &Path, name: &str, toml: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

/// Runs `partner-bridge audit ARGS --config CONFIG`: (exit code, stdout, stderr).
fn audit_cmd(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(BIN)
        .arg("audit")
        .arg(args[0])
        .arg("--config")
        .arg(config)
        .args(&args[1..])
        .env_remove("RUST_LOG")
        .output()
        .expect("run partner-bridge audit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn audit_of(config: &Config) -> AuditLog {
    partner_bridge::commands::open_audit(config)
        .await
        .expect("open the audit log")
        .0
}

async fn rows_of(config: &Config) -> Vec<AuditRow> {
    audit_of(config)
        .await
        .rows(&Filter::default())
        .await
        .unwrap()
}

/// How many rows of each act there are per (act, session, counterpart application).
fn acts(rows: &[AuditRow]) -> BTreeMap<(String, String, String), usize> {
    let mut out = BTreeMap::new();
    for r in rows {
        *out.entry((
            r.act.clone(),
            r.session_id.clone().unwrap_or_default(),
            r.partner_application_id.clone().unwrap_or_default(),
        ))
        .or_default() += 1;
    }
    out
}

/// Each of `names` is recorded exactly once for every session in `ids` with `counterpart`.
fn assert_once(
    seen: &BTreeMap<(String, String, String), usize>,
    names: &[&str],
    ids: &[String],
    counterpart: &str,
) {
    for id in ids {
        for act in names {
            assert_eq!(
                seen.get(&(act.to_string(), id.clone(), counterpart.to_string())),
                Some(&1),
                "{act} for {id} with {counterpart}: {seen:?}"
            );
        }
    }
}

/// The audit table of one side refuses rows of `act` (and the pause probe's test insert) until [`Refusal::lift`]:
/// a real write failure, from a trigger in the side's SQLite file.
struct Refusal {
    conn: rusqlite::Connection,
}

impl Refusal {
    fn of(world: &World, side: &str, act: &str) -> Refusal {
        let conn =
            rusqlite::Connection::open(world.dir.path().join(format!("{side}/ledger.sqlite3")))
                .unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute_batch(&format!(
            "CREATE TRIGGER refuse_act BEFORE INSERT ON audit_log
             WHEN NEW.act IN ('{act}', 'probe')
             BEGIN SELECT RAISE(ABORT, 'the test refuses this audit row'); END;"
        ))
        .unwrap();
        Refusal { conn }
    }

    fn lift(self) {
        self.conn.execute_batch("DROP TRIGGER refuse_act").unwrap();
    }
}

/// Waits until `pipeline` of `bridge` is paused for `ledger` (an act could not be recorded).
async fn paused_on_the_audit_log(bridge: &partner_bridge::app::Running, pipeline: &str) {
    let series = format!("partner_bridge_paused{{pipeline=\"{pipeline}\",reason=\"ledger\"}}");
    wait_for(
        "the pipeline paused on the audit log",
        Duration::from_secs(10),
        || async { (metric_of(bridge, &series) == 1.0).then_some(()) },
    )
    .await;
    assert!(metric_of(bridge, "partner_bridge_audit_write_failures_total") >= 1.0);
}

fn count(rows: &[AuditRow], act: &str) -> usize {
    rows.iter().filter(|r| r.act == act).count()
}

/// Publishes a body that is not an event to the onboarding exchange, and one that is not a token to a receiver.
async fn publish_junk(world: &World, amqp: &Amqp) {
    amqp.publish(
        &world.names.onboarding_exchange(),
        "onboarding.finished",
        b"{\"type\":\"onboarding.finished\"}",
        &[],
    )
    .await;
    amqp.publish(
        &world.names.tokens_exchange(),
        &Names::token_key(&world.partner_app.application_id),
        b"not json",
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shares_to_two_partners_are_recorded_once_on_both_sides_and_verify() {
    const SESSIONS: usize = 6;
    let world = World::new("audit-two").await;
    let two = two_partners(&world).await;
    let issuer_config = world.config(&two.issuer_toml);
    let first_config = world.config(&world.receiver_toml(false));
    let second_config = world.config(&two.second_toml);
    let amqp = Amqp::connect().await;

    let first = world.start(first_config.clone()).await;
    let second = world.start(second_config.clone()).await;
    let issuer = world.start(issuer_config.clone()).await;
    amqp.channel
        .exchange_bind(
            Names::new(&two.second_prefix)
                .tokens_exchange()
                .as_str()
                .into(),
            world.names.tokens_exchange().as_str().into(),
            Names::token_key(&two.second_app).as_str().into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind second-bank's tokens exchange to the issuer's");

    let sessions = create_sessions(&world, SESSIONS, "audit").await;
    let ids = publish_events(&world, &amqp, &sessions).await;
    publish_junk(&world, &amqp).await;
    wait_for(
        "every session imported into both applications",
        Duration::from_secs(30),
        || async {
            let stats = world.control.stats().await.ok()?;
            (stats.imports.len() == 2 * SESSIONS).then_some(())
        },
    )
    .await;
    // The imports are counted by the sandbox before the receivers record them: wait for the receivers' acts.
    for (config, junk) in [(&first_config, 1), (&second_config, 0)] {
        wait_for("every import recorded", Duration::from_secs(15), || async {
            let rows = rows_of(config).await;
            (count(&rows, "imported") == SESSIONS && count(&rows, "dead_lettered") == junk)
                .then_some(())
        })
        .await;
    }
    wait_for(
        "the bad event dead-lettered",
        Duration::from_secs(10),
        || async { (count(&rows_of(&issuer_config).await, "dead_lettered") == 1).then_some(()) },
    )
    .await;
    let written = metric_of(
        &issuer,
        "partner_bridge_audit_rows_total{act=\"token_published\"}",
    );
    assert_eq!(written, (2 * SESSIONS) as f64);
    issuer.stop().await.unwrap();
    first.stop().await.unwrap();
    second.stop().await.unwrap();

    // The issuer: one share minted and one token published per session and partner, one dead-letter.
    let rows = rows_of(&issuer_config).await;
    let seen = acts(&rows);
    for partner in [&world.partner_app.application_id, &two.second_app] {
        assert_once(&seen, &["share_minted", "token_published"], &ids, partner);
    }
    assert_eq!(rows.len(), 4 * SESSIONS + 1, "{seen:?}");
    let dead = rows.iter().find(|r| r.act == "dead_lettered").unwrap();
    assert_eq!(dead.side, "issuer");
    assert!(dead.reason.is_some(), "{dead:?}");
    assert!(
        rows.iter().all(|r| r.side == "issuer"),
        "one side per process"
    );
    // No personal data: vendor_data only as a keyed hash.
    let minted = rows.iter().find(|r| r.act == "share_minted").unwrap();
    let hash = minted
        .vendor_data_hash
        .as_deref()
        .expect("vendor_data hashed");
    assert_eq!(hash.len(), 64);

    // Each receiver: one token received and one import per session, from the issuer.
    for (config, junk) in [(&first_config, 1), (&second_config, 0)] {
        let rows = rows_of(config).await;
        let seen = acts(&rows);
        assert_once(
            &seen,
            &["token_received", "imported"],
            &ids,
            &world.issuer_app.application_id,
        );
        assert_eq!(count(&rows, "dead_lettered"), junk, "{seen:?}");
        assert_eq!(rows.len(), 2 * SESSIONS + junk);
        assert!(rows.iter().all(|r| r.side == "receiver"));
        let imported = rows.iter().find(|r| r.act == "imported").unwrap();
        assert!(imported.imported_session_id.is_some(), "{imported:?}");
        assert_eq!(imported.partner.as_deref(), Some("fintech-a"));
    }

    // The chain and the checkpoints hold: in process, and through the binary.
    let dir = world.dir.path();
    for (name, config, toml) in [
        ("issuer", &issuer_config, two.issuer_toml.clone()),
        ("first", &first_config, world.receiver_toml(false)),
        ("second", &second_config, two.second_toml.clone()),
    ] {
        let (audit, keys) = partner_bridge::commands::open_audit(config).await.unwrap();
        let verified = audit.verify(&keys).await.unwrap();
        assert_eq!(verified.problem, None, "{name}");
        assert!(verified.checkpoints >= 1, "a shutdown checkpoint ({name})");
        assert_eq!(verified.unsigned, 0, "signed with the side's key ({name})");
        let file = config_file(dir, name, &toml);
        let (code, out, err) = audit_cmd(&file, &["verify"]);
        assert_eq!(code, 0, "{name}: {out}{err}");
        assert!(out.contains("audit log verified"), "{out}");
    }

    // `audit export` (both formats) and `audit list` show the same rows, every column as stored.
    let issuer_file = config_file(dir, "issuer", &two.issuer_toml);
    let (code, list, err) = audit_cmd(&issuer_file, &["list"]);
    assert_eq!(code, 0, "{err}");
    let listed: Vec<(i64, String)> = list
        .lines()
        .skip(1)
        .map(|l| {
            let cells: Vec<&str> = l.split('\t').collect();
            (cells[0].parse().unwrap(), cells[3].to_string())
        })
        .collect();
    let stored: Vec<(i64, String)> = rows.iter().map(|r| (r.seq, r.act.clone())).collect();
    assert_eq!(listed, stored);
    let (code, jsonl, err) = audit_cmd(&issuer_file, &["export", "--format", "jsonl"]);
    assert_eq!(code, 0, "{err}");
    let exported: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(exported.len(), rows.len());
    for (value, row) in exported.iter().zip(&rows) {
        assert_eq!(value, &serde_json::to_value(row).unwrap());
    }
    let (code, csv, err) = audit_cmd(&issuer_file, &["export", "--format", "csv"]);
    assert_eq!(code, 0, "{err}");
    let records = parse_csv(&csv);
    assert_eq!(records[0], AuditRow::column_names().map(str::to_string));
    assert_eq!(records.len(), rows.len() + 1);
    for (record, row) in records[1..].iter().zip(&rows) {
        let expected: Vec<String> = row
            .columns()
            .iter()
            .map(|(_, v)| v.clone().unwrap_or_default())
            .collect();
        assert_eq!(record, &expected);
    }
    // Filters: one session, one partner.
    let (_, one, _) = audit_cmd(
        &issuer_file,
        &["export", "--format", "jsonl", "--session", &ids[0]],
    );
    assert_eq!(one.lines().count(), 4);
    let (_, theirs, _) = audit_cmd(&issuer_file, &["list", "--partner", "second-bank"]);
    assert_eq!(theirs.lines().count() - 1, 2 * SESSIONS);

    // `audit recipients` names exactly the applications the sandbox imported each session into.
    let stats = world.control.stats().await.unwrap();
    for id in &ids {
        let imported_into: BTreeSet<String> = stats
            .imports
            .iter()
            .filter(|i| &i.source_session_id == id)
            .map(|i| i.application_id.clone())
            .collect();
        let (code, out, err) = audit_cmd(&issuer_file, &["recipients", "--session", id]);
        assert_eq!(code, 0, "{err}");
        let recipients: BTreeSet<String> = out
            .lines()
            .skip(1)
            .map(|l| l.split('\t').nth(1).unwrap().to_string())
            .collect();
        assert_eq!(recipients, imported_into, "{out}");
        assert!(out.contains("sponsor-bank") && out.contains("second-bank"));
        let (_, json, _) = audit_cmd(&issuer_file, &["recipients", "--session", id, "--json"]);
        let listed: Vec<serde_json::Value> = serde_json::from_str(&json).expect("a JSON array");
        let from_json: BTreeSet<String> = listed
            .iter()
            .map(|r| r["partner_application_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(from_json, imported_into, "{json}");
    }
    let (_, nobody, _) = audit_cmd(&issuer_file, &["recipients", "--session", "never-shared"]);
    assert_eq!(nobody.lines().count(), 1, "a header only: {nobody}");

    amqp.close().await;
    let cleanup = Amqp::connect().await;
    topology::delete(&cleanup.channel, &app::declared_topology(&second_config))
        .await
        .expect("delete second-bank's queues");
    cleanup.close().await;
    world.cleanup().await;
}

/// A minimal RFC 4180 reader (quoted fields, doubled quotes, CRLF records).
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    records
}

/// Runs an issuer and a receiver over four sessions and returns the issuer's configuration (both stopped, so the
/// issuer's log ends with its shutdown checkpoint).
async fn issuer_with_history(world: &World) -> Config {
    let issuer_config = world.config(&world.issuer_toml());
    let receiver = world.start_receiver(false).await;
    let issuer = world.start(issuer_config.clone()).await;
    let amqp = Amqp::connect().await;
    let sessions = create_sessions(world, 4, "tamper").await;
    publish_events(world, &amqp, &sessions).await;
    world.wait_imports(4, Duration::from_secs(20)).await;
    wait_for("the imports recorded", Duration::from_secs(10), || async {
        (count(
            &rows_of(&world.config(&world.receiver_toml(false))).await,
            "imported",
        ) == 4)
            .then_some(())
    })
    .await;
    amqp.close().await;
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    issuer_config
}

/// A copy of the issuer's ledger (with its audit log) and a config file that points `audit verify` at it.
fn tampered_copy(world: &World, name: &str, tamper: &str) -> PathBuf {
    let original = world.dir.path().join("issuer/ledger.sqlite3");
    let copy = world.dir.path().join(format!("{name}.sqlite3"));
    let conn = rusqlite::Connection::open(&original).unwrap();
    conn.execute("VACUUM INTO ?1", [copy.display().to_string()])
        .unwrap();
    drop(conn);
    let conn = rusqlite::Connection::open(&copy).unwrap();
    conn.execute_batch(tamper).unwrap();
    drop(conn);
    let toml = format!(
        "{}\n[ledger]\nurl = \"sqlite://{}\"\n",
        world.issuer_toml(),
        copy.display()
    );
    config_file(world.dir.path(), name, &toml)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_the_row_altered_removed_or_inserted_by_hand() {
    let world = World::new("audit-tamper").await;
    let config = issuer_with_history(&world).await;
    let rows = rows_of(&config).await;
    assert_eq!(rows.len(), 8, "two acts per session");
    let dir = world.dir.path();

    let intact = config_file(dir, "intact", &world.issuer_toml());
    let (code, out, err) = audit_cmd(&intact, &["verify"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("8 row(s), seq 1 to 8"), "{out}");

    // Altered: another partner written into row 3.
    let altered = tampered_copy(
        &world,
        "altered",
        "UPDATE audit_log SET partner = 'someone-else' WHERE seq = 3",
    );
    let (code, _, err) = audit_cmd(&altered, &["verify"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("audit row seq=3 does not match") && err.contains("hash"),
        "{err}"
    );

    // Removed: row 5 deleted; the chain breaks at the row after it.
    let removed = tampered_copy(&world, "removed", "DELETE FROM audit_log WHERE seq = 5");
    let (code, _, err) = audit_cmd(&removed, &["verify"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("audit row seq=6 does not match") && err.contains("5..5 are missing"),
        "{err}"
    );

    // Inserted: rows from 4 on moved up by one, and a copy of row 3 put in at seq 4.
    let inserted = tampered_copy(
        &world,
        "inserted",
        "UPDATE audit_log SET seq = -seq - 1 WHERE seq >= 4;
         UPDATE audit_log SET seq = -seq WHERE seq < 0;
         INSERT INTO audit_log SELECT 4, at_ms, side, act, partner, partner_application_id, agreement_id,
             session_id, imported_session_id, event_id, message_id, token_id, status, reason, vendor_data_hash,
             NULL, hash, hash FROM audit_log WHERE seq = 3;",
    );
    let (code, _, err) = audit_cmd(&inserted, &["verify"]);
    assert_ne!(code, 0);
    assert!(err.contains("audit row seq=4 does not match"), "{err}");

    // Rewritten without a trace in the chain (every hash recomputed after the last row was dropped): the signed
    // shutdown checkpoint still names the row that is gone.
    let truncated = tampered_copy(&world, "truncated", "DELETE FROM audit_log WHERE seq = 8");
    let (code, _, err) = audit_cmd(&truncated, &["verify"]);
    assert_ne!(code, 0);
    assert!(err.contains("row seq=8 is missing"), "{err}");

    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_audit_write_settles_nothing_and_the_redelivery_records_each_act_once() {
    const SESSIONS: usize = 3;
    let world = World::new("audit-fail").await;
    let receiver_config = world.config(&world.receiver_toml(false));
    let receiver = world.start(receiver_config.clone()).await;
    let issuer = world.start_issuer().await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;

    // The receiver's audit table refuses `imported` rows (and the probe's test insert) from now on: Didit imports,
    // the ledger records it, and then the act cannot be written.
    let refusal = Refusal::of(&world, "receiver", "imported");

    let sessions = create_sessions(&world, SESSIONS, "fail").await;
    let ids = publish_events(&world, &amqp, &sessions).await;
    world.wait_imports(SESSIONS, Duration::from_secs(20)).await;
    paused_on_the_audit_log(&receiver, "receiver_tokens").await;
    // Nothing is reported while the act is missing: the envelopes wait.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        results.results().is_empty(),
        "an import.result went out without its act: {:?}",
        results.results()
    );
    let rows = rows_of(&receiver_config).await;
    assert_eq!(count(&rows, "imported"), 0);

    // The table accepts rows again: the pipeline resumes, every envelope comes back and is reported.
    refusal.lift();
    results.wait_count(SESSIONS, Duration::from_secs(30)).await;
    wait_for("every import recorded", Duration::from_secs(10), || async {
        (count(&rows_of(&receiver_config).await, "imported") == SESSIONS).then_some(())
    })
    .await;
    let outcomes: Vec<ImportOutcome> = results.results().iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, vec![ImportOutcome::Imported; SESSIONS]);
    let counts = world.wait_imports(SESSIONS, Duration::from_secs(5)).await;
    assert!(
        counts.values().all(|n| *n == 1),
        "imported once: {counts:?}"
    );

    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    // Each act once, although every envelope was handled at least twice.
    let rows = rows_of(&receiver_config).await;
    let seen = acts(&rows);
    assert_once(
        &seen,
        &["token_received", "imported"],
        &ids,
        &world.issuer_app.application_id,
    );
    assert_eq!(rows.len(), 2 * SESSIONS, "{seen:?}");
    let (audit, keys) = partner_bridge::commands::open_audit(&receiver_config)
        .await
        .unwrap();
    assert_eq!(audit.verify(&keys).await.unwrap().problem, None);

    amqp.close().await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_records_the_reshare_asked_and_answered() {
    let world = World::new("audit-reshare").await;
    let receiver_config = world.config(&world.receiver_toml(false));
    let issuer_config = world.config(&world.issuer_toml());
    // The receiver has run once (its queue exists) and is down while the token waits.
    world
        .start(receiver_config.clone())
        .await
        .stop()
        .await
        .unwrap();
    let issuer = world.start(issuer_config.clone()).await;
    let amqp = Amqp::connect().await;
    let sessions = create_sessions(&world, 1, "reshare").await;
    let ids = publish_events(&world, &amqp, &sessions).await;
    let queue = world.names.receiver_tokens_queue();
    wait_for("the token waiting", Duration::from_secs(15), || async {
        (amqp.depth(&queue).await == 1).then_some(())
    })
    .await;
    world.control.advance_clock(3700).await.unwrap();
    let receiver = world.start(receiver_config.clone()).await;
    world.wait_imports(1, Duration::from_secs(30)).await;
    wait_for("the import recorded", Duration::from_secs(10), || async {
        (count(&rows_of(&receiver_config).await, "imported") == 1).then_some(())
    })
    .await;
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();

    let issuer_rows = rows_of(&issuer_config).await;
    let receiver_rows = rows_of(&receiver_config).await;
    assert_eq!(count(&receiver_rows, "reshare_requested"), 1);
    assert_eq!(
        count(&receiver_rows, "token_received"),
        2,
        "the stale and the fresh token"
    );
    assert_eq!(count(&issuer_rows, "reshare_answered"), 1);
    assert_eq!(count(&issuer_rows, "token_published"), 2);
    let answered = issuer_rows
        .iter()
        .find(|r| r.act == "reshare_answered")
        .unwrap();
    assert_eq!(answered.session_id.as_deref(), Some(ids[0].as_str()));
    assert_eq!(answered.status.as_deref(), Some("minted"));
    // The session went to one partner, whatever the number of tokens.
    let recipients = audit_of(&issuer_config)
        .await
        .recipients(&ids[0])
        .await
        .unwrap();
    assert_eq!(recipients.len(), 1);
    assert_eq!(recipients[0].tokens, 2);

    amqp.close().await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_ledger_keeps_the_same_audit_log_and_verifies() {
    let world = World::new("audit-pg").await;
    let issuer_schema = PgSchema::create("audit_i").await;
    let receiver_schema = PgSchema::create("audit_r").await;
    let address = crate::support::pg_ledger::postgres_address();
    let issuer_toml = format!(
        "{}{}",
        world.issuer_toml(),
        issuer_schema.ledger_section(&address, 3000, 6000)
    );
    let receiver_toml = format!(
        "{}{}",
        world.receiver_toml(false),
        receiver_schema.ledger_section(&address, 3000, 6000)
    );
    let issuer_config = world.config(&issuer_toml);
    let receiver_config = world.config(&receiver_toml);
    let receiver = world.start(receiver_config.clone()).await;
    let issuer = world.start(issuer_config.clone()).await;
    let amqp = Amqp::connect().await;
    let sessions = create_sessions(&world, 3, "pg").await;
    let ids = publish_events(&world, &amqp, &sessions).await;
    world.wait_imports(3, Duration::from_secs(20)).await;
    wait_for("the imports recorded", Duration::from_secs(10), || async {
        (count(&rows_of(&receiver_config).await, "imported") == 3).then_some(())
    })
    .await;
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();

    assert_eq!(count(&rows_of(&issuer_config).await, "token_published"), 3);
    assert_eq!(count(&rows_of(&receiver_config).await, "token_received"), 3);
    let dir = world.dir.path();
    for (name, toml) in [("pg-issuer", &issuer_toml), ("pg-receiver", &receiver_toml)] {
        let file = config_file(dir, name, toml);
        let (code, out, err) = audit_cmd(&file, &["verify"]);
        assert_eq!(code, 0, "{name}: {out}{err}");
        assert!(
            out.contains("3 row(s)") || out.contains("6 row(s)"),
            "{out}"
        );
    }
    let file = config_file(dir, "pg-issuer", &issuer_toml);
    let (_, out, _) = audit_cmd(&file, &["recipients", "--session", &ids[0]]);
    assert!(out.contains(&world.partner_app.application_id), "{out}");

    // Altered by hand in PostgreSQL: caught the same way.
    let admin = crate::support::pg_ledger::admin().await.unwrap();
    admin
        .batch_execute(&format!(
            "UPDATE {}.audit_log SET status = 'Declined' WHERE seq = 2",
            issuer_schema.schema
        ))
        .await
        .unwrap();
    let (code, _, err) = audit_cmd(&file, &["verify"]);
    assert_ne!(code, 0);
    assert!(err.contains("audit row seq=2 does not match"), "{err}");

    amqp.close().await;
    world.cleanup().await;
}

#[tokio::test]
async fn audit_settings_out_of_range_exit_64_naming_the_key() {
    let world = World::new("audit-config").await;
    let file = config_file(world.dir.path(), "issuer", &world.issuer_toml());
    for (var, value, key) in [
        (
            "PARTNER_BRIDGE__AUDIT__RETENTION_DAYS",
            "0",
            "audit.retention_days",
        ),
        (
            "PARTNER_BRIDGE__AUDIT__CHECKPOINT_INTERVAL_SECS",
            "0",
            "audit.checkpoint_interval_secs",
        ),
    ] {
        for command in [&["check-config"][..], &["audit", "verify"][..]] {
            let out = std::process::Command::new(BIN)
                .args(command)
                .arg("--config")
                .arg(&file)
                .env(var, value)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{command:?} {var}: {stderr}");
            assert!(stderr.contains(key), "{stderr}");
        }
    }
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_leaves_a_chain_that_still_verifies_and_keeps_growing() {
    let world = World::new("audit-prune").await;
    let config = issuer_with_history(&world).await;
    let rows = rows_of(&config).await;
    assert_eq!(rows.len(), 8);

    // What the hourly task does, with a retention that makes the first half old: a signed `prune` checkpoint at
    // the last deleted row, the rows before it gone.
    let ledger = partner_bridge::ledger::Ledger::open(&config.ledger_url())
        .await
        .unwrap();
    let audit = AuditLog::open(
        &ledger,
        Some(partner_bridge::keys::SigningKeys::Fixed(Box::new(
            world.key.clone(),
        ))),
        Some(&world.key),
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    let cutoff = chrono::DateTime::from_timestamp_millis(rows[4].at_ms).unwrap();
    let pruned = audit.prune(cutoff).await.unwrap();
    assert!((1..8).contains(&pruned), "pruned {pruned}");
    let kept = rows_of(&config).await;
    assert_eq!(kept.len() as u64, 8 - pruned);
    assert_eq!(kept[0].seq, pruned as i64 + 1);
    let file = config_file(world.dir.path(), "issuer", &world.issuer_toml());
    let (code, out, err) = audit_cmd(&file, &["verify"]);
    assert_eq!(code, 0, "{out}{err}");
    drop(audit);
    drop(ledger);

    // The bridge appends after the pruned head, and the whole retained chain still verifies.
    let receiver = world.start_receiver(false).await;
    let issuer = world.start(config.clone()).await;
    let amqp = Amqp::connect().await;
    let sessions = create_sessions(&world, 1, "after-prune").await;
    publish_events(&world, &amqp, &sessions).await;
    wait_for(
        "the new token recorded",
        Duration::from_secs(20),
        || async {
            let rows = rows_of(&config).await;
            (rows.last().map(|r| r.seq) == Some(10)).then_some(())
        },
    )
    .await;
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    let after = rows_of(&config).await;
    assert_eq!(after.last().unwrap().seq, 10);
    let (code, out, err) = audit_cmd(&file, &["verify"]);
    assert_eq!(code, 0, "{out}{err}");
    // Removing the first retained row is still caught: the prune checkpoint names its predecessor.
    let removed = tampered_copy(
        &world,
        "pruned-removed",
        &format!("DELETE FROM audit_log WHERE seq = {}", pruned + 1),
    );
    let (code, _, err) = audit_cmd(&removed, &["verify"]);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("audit row seq={} does not match", pruned + 2)),
        "{err}"
    );

    amqp.close().await;
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_that_cannot_record_a_mint_publishes_nothing_until_it_can() {
    const SESSIONS: usize = 2;
    let world = World::new("audit-issuer-fail").await;
    let issuer_config = world.config(&world.issuer_toml());
    let receiver = world.start_receiver(false).await;
    let issuer = world.start(issuer_config.clone()).await;
    let amqp = Amqp::connect().await;
    let refusal = Refusal::of(&world, "issuer", "share_minted");

    let sessions = create_sessions(&world, SESSIONS, "issuer-fail").await;
    let ids = publish_events(&world, &amqp, &sessions).await;
    paused_on_the_audit_log(&issuer, "issuer_onboarding").await;
    // Didit minted, but no token left without its act.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        metric_of(
            &issuer,
            "partner_bridge_tokens_published_total{partner=\"sponsor-bank\"}"
        ),
        0.0
    );
    assert!(world.control.stats().await.unwrap().imports.is_empty());

    refusal.lift();
    let counts = world.wait_imports(SESSIONS, Duration::from_secs(30)).await;
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
    wait_for("every token recorded", Duration::from_secs(10), || async {
        (count(&rows_of(&issuer_config).await, "token_published") == SESSIONS).then_some(())
    })
    .await;
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    let rows = rows_of(&issuer_config).await;
    assert_once(
        &acts(&rows),
        &["share_minted", "token_published"],
        &ids,
        &world.partner_app.application_id,
    );
    assert_eq!(rows.len(), 2 * SESSIONS);
    let (audit, keys) = partner_bridge::commands::open_audit(&issuer_config)
        .await
        .unwrap();
    assert_eq!(audit.verify(&keys).await.unwrap().problem, None);

    amqp.close().await;
    world.cleanup().await;
}
