//! Keeps the user documentation (`README.md`, `docs/`, `deploy/examples/`) true to the code:
//! - the JSON Schemas in `docs/schemas/` accept what the bridge's own types serialize, what a real in-process run puts
//!   on the broker, and the examples in `docs/messages.md`; they require exactly what the parser requires;
//! - every relative link in README.md and docs/ names a file of the repository (and an anchor a heading there);
//! - every alert's `runbook_url` names a heading of `docs/operations.md`, and the reasons, headers and control routes
//!   the code uses are all documented;
//! - `deploy/examples/{issuer,receiver}.toml` pass `check-config` through the real binary, match the sandbox fixture,
//!   and `topology show` prints for them exactly what `docs/topology.md` shows.
//!
//! Each test fails on the code before the documentation existed (no docs/, no schemas, no examples, no runbook_url,
//! control routes missing from `/openapi.json`), and fails again when a name drifts on either side.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use partner_bridge::amqp::topology;
use partner_bridge::didit::wire::{SessionKind, SessionStatus};
use partner_bridge::envelope::{
    self, ImportOutcome, ImportResult, NoticeAck, NoticeAction, NoticeKind, NoticeRequested,
    OnboardingFinished, ReshareRequest, ShareTokenEnvelope, SubjectNotice,
};
use partner_bridge::secret::ShareToken;
use serde_json::{Value, json};

use crate::support::bridge::{Amqp, Collector, World};
use crate::support::faults::republish;
use crate::support::t_receiver::Tap;

const WAIT: Duration = Duration::from_secs(30);
const TYPES: [&str; 7] = [
    "onboarding.finished",
    "share_token",
    "import.result",
    "reshare.request",
    "subject.notice.requested",
    "subject.notice",
    "subject.notice.ack",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---- schemas -------------------------------------------------------------------------------------------------------

fn schema(kind: &str) -> Value {
    let path = format!("docs/schemas/{kind}.schema.json");
    let schema: Value =
        serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"));
    if let Err(e) = jsonschema::meta::validate(&schema) {
        panic!("{path} is not a valid JSON Schema: {e}");
    }
    schema
}

fn validator(kind: &str) -> jsonschema::Validator {
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema(kind))
        .unwrap_or_else(|e| panic!("schema {kind}: {e}"))
}

fn errors(kind: &str, instance: &Value) -> Vec<String> {
    validator(kind)
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// `instance` is valid for its type's schema, and the schema documents every field it has.
fn assert_valid(instance: &Value, what: &str) {
    let kind = instance["type"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no type: {instance}"));
    let errors = errors(kind, instance);
    assert!(
        errors.is_empty(),
        "{what} ({kind}) does not validate: {errors:?}\n{instance:#}"
    );
    let schema = schema(kind);
    let documented = schema["properties"].as_object().expect("properties");
    for key in instance.as_object().expect("an object").keys() {
        assert!(
            documented.contains_key(key),
            "{what}: field {key:?} is not in docs/schemas/{kind}.schema.json"
        );
    }
}

fn required(kind: &str) -> BTreeSet<String> {
    schema(kind)["required"]
        .as_array()
        .expect("required")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn at(seconds: i64) -> chrono::DateTime<Utc> {
    Utc.timestamp_opt(1_795_000_000 + seconds, 0).unwrap()
}

fn onboarding(full: bool) -> OnboardingFinished {
    OnboardingFinished {
        kind: envelope::types::ONBOARDING_FINISHED.into(),
        event_id: "e-1".into(),
        session_id: "9cf1d519-61d9-4788-b23e-afbad32810c8".into(),
        status: "IN_REVIEW".into(),
        session_kind: full.then_some(SessionKind::Business),
        vendor_data: full.then(|| "company-1".into()),
        occurred_at: full.then(|| at(0)),
        partners: full.then(|| vec!["5e443cde-44aa-4f22-b94c-3b6a8d9f05ce".into()]),
    }
}

fn share_token(vendor_data: bool) -> ShareTokenEnvelope {
    ShareTokenEnvelope {
        kind: envelope::types::SHARE_TOKEN.into(),
        message_id: "m-1".into(),
        event_id: "e-1".into(),
        share_token: ShareToken::new("eyJhbGciOiJIUzI1NiJ9.e30.c2ln"),
        session_kind: SessionKind::User,
        source_session_id: "s-1".into(),
        from_application_id: "a-1".into(),
        for_application_id: "b-1".into(),
        source_status: "Approved".into(),
        source_vendor_data: vendor_data.then(|| "user-1".into()),
        minted_at: at(1),
        expires_at: at(3601),
        occurred_at: at(0),
        agreement_id: vendor_data.then(|| "DSA-2026-001".into()),
    }
}

fn import_result(outcome: ImportOutcome) -> ImportResult {
    let imported = outcome == ImportOutcome::Imported;
    ImportResult {
        kind: envelope::types::IMPORT_RESULT.into(),
        outcome,
        source_session_id: "s-1".into(),
        from_application_id: "a-1".into(),
        imported_session_id: imported.then(|| "i-1".into()),
        session_number: imported.then_some(43762),
        status: imported.then(|| "In Review".into()),
        session_kind: SessionKind::User,
        vendor_data: imported.then(|| "fintech-a:user-1".into()),
        trust_review: false,
        imported_at: at(2),
        reason: (!imported).then(|| format!("{}: why", outcome.as_str())),
        agreement_id: Some("DSA-2026-001".into()),
    }
}

fn notice_requested(full: bool) -> NoticeRequested {
    NoticeRequested {
        kind: envelope::types::NOTICE_REQUESTED.into(),
        request_id: "r-1".into(),
        session_id: "s-1".into(),
        notice_kind: NoticeKind::Erasure,
        reason: full.then(|| "the person asked to be forgotten".into()),
    }
}

fn notice(full: bool) -> SubjectNotice {
    SubjectNotice {
        kind: envelope::types::NOTICE.into(),
        notice_id: "n-1".into(),
        notice_kind: NoticeKind::Rectification,
        source_session_id: "s-1".into(),
        from_application_id: "a-1".into(),
        for_application_id: "b-1".into(),
        agreement_id: full.then(|| "DSA-2026-001".into()),
        reason: full.then(|| "address corrected".into()),
        issued_at: at(5),
        imported_session_id: full.then(|| "i-1".into()),
        action: full.then_some(NoticeAction::Notified),
    }
}

fn notice_ack(imported: bool) -> NoticeAck {
    NoticeAck {
        kind: envelope::types::NOTICE_ACK.into(),
        notice_id: "n-1".into(),
        source_session_id: "s-1".into(),
        from_application_id: "a-1".into(),
        for_application_id: "b-1".into(),
        imported_session_id: imported.then(|| "i-1".into()),
        action: if imported {
            NoticeAction::Deleted
        } else {
            NoticeAction::Notified
        },
        acted_at: at(6),
    }
}

fn reshare() -> ReshareRequest {
    ReshareRequest {
        kind: envelope::types::RESHARE_REQUEST.into(),
        source_session_id: "s-1".into(),
        for_application_id: "b-1".into(),
        reason: "token_expired".into(),
        attempt: 1,
        original_message_id: "m-1".into(),
    }
}

/// Every message the bridge's types can produce validates; the required set of each consumed type is exactly what
/// `envelope::parse` requires, and leaving out an optional field is fine for both.
#[test]
fn the_schemas_accept_the_bridges_own_types_and_require_what_the_parser_requires() {
    for kind in TYPES {
        validator(kind); // each file exists, is JSON and a valid schema
    }
    let mut samples: Vec<Value> = vec![
        serde_json::to_value(onboarding(true)).unwrap(),
        serde_json::to_value(onboarding(false)).unwrap(),
        serde_json::to_value(share_token(true)).unwrap(),
        serde_json::to_value(share_token(false)).unwrap(),
        serde_json::to_value(reshare()).unwrap(),
        serde_json::to_value(notice_requested(true)).unwrap(),
        serde_json::to_value(notice_requested(false)).unwrap(),
        serde_json::to_value(notice(true)).unwrap(),
        serde_json::to_value(notice(false)).unwrap(),
        serde_json::to_value(notice_ack(true)).unwrap(),
        serde_json::to_value(notice_ack(false)).unwrap(),
    ];
    for outcome in ImportOutcome::ALL {
        samples.push(serde_json::to_value(import_result(outcome)).unwrap());
    }
    for sample in &samples {
        assert_valid(sample, "a serialized bridge type");
    }

    // Consumed types: a required field removed is refused by both the schema and the parser; an optional one by
    // neither.
    for full in [
        serde_json::to_value(onboarding(true)).unwrap(),
        serde_json::to_value(share_token(true)).unwrap(),
        serde_json::to_value(reshare()).unwrap(),
        serde_json::to_value(notice_requested(true)).unwrap(),
        serde_json::to_value(notice(true)).unwrap(),
        serde_json::to_value(notice_ack(true)).unwrap(),
    ] {
        let kind = full["type"].as_str().unwrap().to_string();
        let needed = required(&kind);
        for key in full.as_object().unwrap().keys() {
            let mut without = full.clone();
            without.as_object_mut().unwrap().remove(key);
            let schema_ok = errors(&kind, &without).is_empty();
            let parser_ok =
                envelope::parse(&serde_json::to_vec(&without).unwrap(), 1 << 20).is_ok();
            assert_eq!(
                schema_ok, parser_ok,
                "{kind} without {key}: the schema says {schema_ok}, the parser says {parser_ok}"
            );
            assert_eq!(
                !schema_ok,
                needed.contains(key),
                "{kind}: is {key} required?"
            );
        }
    }

    // import.result: every field is always present (null when it does not apply), so `required` lists them all.
    let result = serde_json::to_value(import_result(ImportOutcome::Imported)).unwrap();
    let keys: BTreeSet<String> = result.as_object().unwrap().keys().cloned().collect();
    assert_eq!(required("import.result"), keys);
    let mut bad = result.clone();
    bad["reason"] = json!("should be null for imported");
    assert!(
        !errors("import.result", &bad).is_empty(),
        "imported with a reason must not validate"
    );
    let mut bad = serde_json::to_value(import_result(ImportOutcome::Rejected)).unwrap();
    bad["reason"] = Value::Null;
    assert!(
        !errors("import.result", &bad).is_empty(),
        "a failure without a reason must not validate"
    );
    let mut bad = result;
    bad["outcome"] = json!("exploded");
    assert!(!errors("import.result", &bad).is_empty());

    // The enums are the code's: every outcome, every status in both casings, nothing else.
    let outcomes: BTreeSet<String> = schema("import.result")["properties"]["outcome"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        outcomes,
        ImportOutcome::ALL
            .iter()
            .map(|o| o.as_str().to_string())
            .collect()
    );
    let statuses: BTreeSet<String> = schema("onboarding.finished")["properties"]["status"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let expected: BTreeSet<String> = SessionStatus::all()
        .iter()
        .flat_map(|s| [s.title().to_string(), s.upper_snake().to_string()])
        .collect();
    assert_eq!(statuses, expected);
}

/// Every JSON example in docs/messages.md is a valid message: its schema accepts it and, for the types the bridge
/// consumes, so does the bridge's parser.
#[test]
fn the_examples_in_messages_md_are_valid_messages() {
    let text = read("docs/messages.md");
    let mut seen = BTreeMap::new();
    for block in fenced_blocks(&text, "json") {
        let value: Value = serde_json::from_str(&block).unwrap_or_else(|e| {
            panic!("a json block of docs/messages.md is not JSON: {e}\n{block}")
        });
        let Some(kind) = value["type"].as_str() else {
            continue;
        };
        assert_valid(&value, "an example of docs/messages.md");
        if kind != envelope::types::IMPORT_RESULT {
            envelope::parse(block.as_bytes(), 1 << 20)
                .unwrap_or_else(|e| panic!("the bridge refuses the {kind} example: {e}"));
        } else {
            serde_json::from_value::<ImportResult>(value.clone()).expect("an ImportResult");
        }
        *seen.entry(kind.to_string()).or_insert(0) += 1;
    }
    for kind in TYPES {
        assert!(
            seen.contains_key(kind),
            "docs/messages.md has no JSON example of {kind}"
        );
    }
}

/// Messages captured from a real run validate: an `onboarding.finished` made by the webhook intake from the
/// sandbox's signed delivery, both `share_token`s (the first expires in the sandbox's clock before the receiver
/// starts, so the receiver sends a real `reshare.request` and the issuer mints again), and `import.result`s for the
/// import and for a redelivered token (`duplicate`). Their AMQP properties are the documented ones. Exactly one
/// import for the session, and its result names the imported session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_captured_from_a_real_run_validate_against_the_schemas() {
    const SECRET: &str = "docs-webhook-secret";
    let world = World::new("docs").await;
    let amqp = Amqp::connect().await;
    // Everything both roles use exists before anything is published (topology.md: receiver first).
    topology::declare(&amqp.channel, &world.topology())
        .await
        .expect("declare the world's topology");
    let events = Tap::start(&world.names.onboarding_exchange(), "onboarding.finished").await;
    let tokens = Tap::start(&world.names.tokens_exchange(), "token.#").await;
    let reshares = Tap::start(&world.names.reshare_exchange(), "reshare.#").await;
    let results = Collector::start(&world.results_queue()).await;

    let issuer_toml = format!(
        "{}\n[issuer.webhook]\nlisten = \"127.0.0.1:0\"\nsecret = \"{SECRET}\"\n",
        world.issuer_toml()
    );
    let issuer = world.start(world.config(&issuer_toml)).await;
    let url = format!(
        "http://{}/webhooks/didit",
        issuer.webhook_addr().expect("webhook intake")
    );
    world
        .control
        .add_webhook_destination(world.issuer_app.api_key.expose(), &url, Some(SECRET))
        .await
        .unwrap();
    let session = world
        .session(SessionKind::User, "Approved", "user-docs")
        .await;
    let first = tokens.wait_count(1, WAIT).await;
    // The receiver is not running yet: this token waits in its queue while the sandbox's clock passes its expiry.
    world.control.advance_clock(7200).await.unwrap();
    let receiver = world.start(world.config(&world.receiver_toml(false))).await;
    let requests = reshares.wait_count(1, WAIT).await;
    let all_tokens = tokens.wait_count(2, WAIT).await;
    results.wait_count(1, WAIT).await;
    // A redelivery of the fresh token: answered `duplicate`, without a second import.
    republish(
        &amqp,
        &world.names.tokens_exchange(),
        &all_tokens[1].routing_key,
        &all_tokens[1].got,
    )
    .await;
    let got_results = results.wait_count(2, WAIT).await;

    let captured_events = events.all();
    assert_eq!(captured_events.len(), 1, "one event from the webhook");
    let mut captured = vec![&captured_events[0].got];
    captured.extend(all_tokens.iter().map(|t| &t.got));
    captured.extend(requests.iter().map(|t| &t.got));
    captured.extend(got_results.iter());
    for got in &captured {
        let body = got.json();
        assert_valid(&body, "a captured message");
        assert_eq!(
            got.kind.as_deref(),
            body["type"].as_str(),
            "AMQP type = body type"
        );
        assert_eq!(got.app_id.as_deref(), Some("partner-bridge"));
        assert_eq!(got.content_type.as_deref(), Some("application/json"));
        assert_eq!(got.delivery_mode, Some(2), "persistent");
        assert!(got.message_id.is_some() && got.timestamp.is_some());
    }
    assert_eq!(
        captured_events[0].got.header("x-pb-source"),
        Some("webhook")
    );
    let public = world.key.verifying_key();
    for token in &all_tokens {
        let body = token.got.json();
        assert_eq!(token.got.message_id.as_deref(), body["message_id"].as_str());
        assert_eq!(token.got.header("x-pb-key-id"), Some(public.key_id()));
        public
            .verify(
                &token.got.body,
                token.got.header("x-pb-signature").expect("signed"),
            )
            .expect("the documented signature verifies");
        assert_eq!(
            token.routing_key,
            format!("token.{}", world.partner_app.application_id)
        );
    }
    let request = requests[0].got.json();
    assert_eq!(
        request["original_message_id"],
        first[0].got.json()["message_id"]
    );
    assert_eq!(
        requests[0].routing_key,
        format!("reshare.{}", world.issuer_app.application_id)
    );

    // Exactly once: one import of the session, one `imported` result naming it, then one `duplicate`.
    let stats = world.control.stats().await.unwrap();
    assert_eq!(
        stats.import_count(&session, &world.partner_app.application_id),
        1,
        "{stats:?}"
    );
    let parsed = results.results();
    let outcomes: Vec<ImportOutcome> = parsed.iter().map(|r| r.outcome).collect();
    assert_eq!(
        outcomes,
        [ImportOutcome::Imported, ImportOutcome::Duplicate]
    );
    let imported = parsed[0]
        .imported_session_id
        .clone()
        .expect("the imported session");
    assert_eq!(parsed[0].source_session_id, session);
    let clone = world.control.session(&imported).await.unwrap();
    assert_eq!(
        clone.decision.shared_from_session.as_deref(),
        Some(session.as_str())
    );

    results.stop();
    drop((events, tokens, reshares));
    receiver.stop().await.unwrap();
    issuer.stop().await.unwrap();
    amqp.close().await;
    world.cleanup().await;
}

// ---- links, anchors, names -------------------------------------------------------------------------------------------

/// The bodies of the fenced blocks of `lang` in a Markdown text.
fn fenced_blocks(text: &str, lang: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    // Inside a block: whether it is one of `lang`, and its text so far.
    let mut current: Option<(bool, String)> = None;
    for line in text.lines() {
        let fence = line.trim_start().strip_prefix("```");
        match (&mut current, fence) {
            (None, Some(info)) => current = Some((info.trim() == lang, String::new())),
            (Some((keep, body)), Some(_)) => {
                if *keep {
                    blocks.push(std::mem::take(body));
                }
                current = None;
            }
            (Some((_, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    blocks
}

/// Lines of a Markdown text outside fenced code blocks.
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The targets of inline Markdown links `[text](target)` outside code blocks and code spans.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in prose(text).lines() {
        // Drop code spans: a `[x](y)` inside backticks is not a link.
        let mut plain = String::new();
        let mut in_code = false;
        for c in line.chars() {
            if c == '`' {
                in_code = !in_code;
            } else if !in_code {
                plain.push(c);
            }
        }
        let mut rest = plain.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            match after.find(')') {
                Some(end) => {
                    out.push(after[..end].trim().to_string());
                    rest = &after[end + 1..];
                }
                None => break,
            }
        }
    }
    out
}

/// GitHub's anchor of a heading: lower case, spaces to `-`, punctuation other than `-` and `_` dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    prose(markdown)
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect()
}

fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![repo().join("README.md")];
    let mut stack = vec![repo().join("docs")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Every relative link in README.md and docs/ names a file or directory of the repository (inside it: no
/// `../shared`), every anchor a heading of its target, and links to the web stay few.
#[test]
fn every_link_in_the_readme_and_docs_points_into_the_repository() {
    let files = markdown_files();
    for name in [
        "messages.md",
        "topology.md",
        "guarantees.md",
        "operations.md",
        "sandbox.md",
        "deployment.md",
    ] {
        assert!(
            files.contains(&repo().join("docs").join(name)),
            "docs/{name} is missing"
        );
    }
    let root = repo().canonicalize().unwrap();
    let mut problems = Vec::new();
    let mut web = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let shown = file.strip_prefix(repo()).unwrap().display().to_string();
        for target in links(&text) {
            if target.starts_with("http://") || target.starts_with("https://") {
                web.push(format!("{shown}: {target}"));
                continue;
            }
            if target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            let Ok(real) = resolved.canonicalize() else {
                problems.push(format!("{shown}: {target}: no such file"));
                continue;
            };
            if !real.starts_with(&root) {
                problems.push(format!("{shown}: {target}: outside the repository"));
                continue;
            }
            if let Some(anchor) = anchor
                && real.extension().is_some_and(|e| e == "md")
                && !anchors(&std::fs::read_to_string(&real).unwrap()).contains(anchor)
            {
                problems.push(format!("{shown}: {target}: no heading #{anchor}"));
            }
        }
        assert!(
            !text.contains("../shared"),
            "{shown} refers to ../shared, which users do not have"
        );
    }
    assert!(
        checked > 30,
        "only {checked} relative links found: is the extraction broken?"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n  {}",
        problems.join("\n  ")
    );
    assert!(web.len() <= 5, "links to the web should be few: {web:#?}");
    // The extraction itself: a link in a code span or a code block is not one, an anchor is checked.
    assert_eq!(
        links("a [x](y.md) `[no](z.md)` b\n```\n[no](w.md)\n```\n[v](#h)"),
        ["y.md", "#h"]
    );
    assert_eq!(
        slug(" What must exist before what"),
        "what-must-exist-before-what"
    );
    assert_eq!(slug("/readyz reasons"), "readyz-reasons");
}

/// Every alert has a `runbook_url` naming its own heading in docs/operations.md.
#[test]
fn every_alert_links_its_section_of_operations_md() {
    let rules = read("deploy/prometheus/rules/partner-bridge.rules.yml");
    let headings = anchors(&read("docs/operations.md"));
    let mut alerts = 0;
    let mut current = None;
    for line in rules.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("- alert:") {
            if let Some(previous) = current.replace(name.trim().to_string()) {
                panic!("alert {previous} has no runbook_url");
            }
            alerts += 1;
        }
        if let Some(url) = line.strip_prefix("runbook_url:") {
            let alert = current.take().expect("a runbook_url inside an alert");
            let url = url.trim().trim_matches('"');
            assert_eq!(url, format!("docs/operations.md#{}", alert.to_lowercase()));
            assert!(
                headings.contains(&alert.to_lowercase()),
                "docs/operations.md has no heading {alert}"
            );
        }
    }
    assert!(current.is_none(), "the last alert has no runbook_url");
    assert!(alerts >= 10, "only {alerts} alerts found");
}

/// The words in `src/` that operators see — dead-letter reasons, pause reasons, `x-pb-*` headers — are documented.
#[test]
fn every_reason_and_header_in_the_code_is_documented() {
    let mut sources = String::new();
    let mut stack = vec![repo().join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if !path.ends_with("sandbox") {
                    stack.push(path);
                }
            } else {
                sources.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let quoted_after = |marker: &str| -> BTreeSet<String> {
        let mut words = BTreeSet::new();
        let mut rest = sources.as_str();
        while let Some(i) = rest.find(marker) {
            rest = &rest[i + marker.len()..];
            if let Some(end) = rest.find('"') {
                words.insert(rest[..end].to_string());
            }
        }
        words
    };
    // The first string argument of a call, when it is a literal (within the call's first 80 characters).
    let first_literal_of = |call: &str| -> BTreeSet<String> {
        let mut words = BTreeSet::new();
        for piece in sources.split(call).skip(1) {
            let head = &piece[..piece.len().min(80)];
            if let Some(start) = head.find('"')
                && !head[..start].contains(')')
                && let Some(len) = head[start + 1..].find('"')
            {
                words.insert(head[start + 1..start + 1 + len].to_string());
            }
        }
        words
    };
    let mut reasons = quoted_after("reason: \"");
    reasons.extend(first_literal_of("BadMessage::new("));
    reasons.extend(first_literal_of(".finish_failed("));
    reasons.insert("retries_exhausted".into());
    reasons.remove("");
    // Not dead-letter reasons: the reshare request's own field and the pause reasons (documented with /readyz).
    reasons.remove("token_expired");
    for word in [
        "unknown_partner",
        "share_rejected",
        "misrouted",
        "expired",
        "no_workflow",
        "bad_signature",
    ] {
        assert!(
            reasons.contains(word),
            "the extraction missed {word}: {reasons:?}"
        );
    }
    let operations = read("docs/operations.md");
    let missing: Vec<&String> = reasons
        .iter()
        .filter(|r| !operations.contains(&format!("`{r}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operations.md does not explain these reasons: {missing:?}"
    );

    let headers = quoted_after("\"x-pb-");
    assert!(headers.len() >= 7, "{headers:?}");
    let messages = read("docs/messages.md");
    let missing: Vec<String> = headers
        .iter()
        .map(|h| format!("x-pb-{h}"))
        .filter(|h| !messages.contains(&format!("`{h}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/messages.md does not explain these headers: {missing:?}"
    );
}

/// Every control route of the sandbox is in `/openapi.json`, tagged `test-only`, and in docs/sandbox.md; every
/// Didit operation is tagged `didit`.
#[tokio::test]
async fn the_sandbox_openapi_and_docs_describe_every_control_route() {
    let source = read("src/sandbox/control.rs");
    let mut routes = Vec::new();
    let mut rest = source.as_str();
    while let Some(i) = rest.find(".route(") {
        rest = &rest[i + ".route(".len()..];
        let call = &rest[..rest
            .find("\n        .route(")
            .unwrap_or(rest.find("\n}").unwrap())];
        let path = call.split('"').nth(1).expect("a path").to_string();
        for method in ["get", "post", "delete", "patch", "put"] {
            if call.contains(&format!("{method}(")) {
                routes.push((path.clone(), method));
            }
        }
    }
    assert!(
        routes.len() >= 20,
        "only {} control routes found: {routes:?}",
        routes.len()
    );

    let sandbox = partner_bridge::sandbox::Sandbox::start(
        "127.0.0.1:0".parse().unwrap(),
        partner_bridge::sandbox::SandboxOptions::default(),
    )
    .await
    .unwrap();
    let doc: Value = crate::support::faults::http()
        .get(format!("{}/openapi.json", sandbox.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    sandbox.shutdown().await;
    let docs = read("docs/sandbox.md");
    for (path, method) in &routes {
        let op = &doc["paths"][path][method];
        assert!(op.is_object(), "/openapi.json lacks {method} {path}");
        assert_eq!(op["tags"], json!(["test-only"]), "{method} {path}");
        assert_eq!(op["security"], json!([]), "{method} {path} needs no key");
        assert!(
            docs.contains(&format!("{} {path}", method.to_uppercase())),
            "docs/sandbox.md does not list {} {path}",
            method.to_uppercase()
        );
    }
    for (path, operations) in doc["paths"].as_object().unwrap() {
        if path.starts_with("/v3/") {
            for (method, op) in operations.as_object().unwrap() {
                assert_eq!(op["tags"], json!(["didit"]), "{method} {path}");
            }
        }
    }
    // Every $ref of the document resolves.
    let text = doc.to_string();
    for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = &piece[..piece.find('"').unwrap()];
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "dangling $ref {name}"
        );
    }
}

// ---- deploy/examples -------------------------------------------------------------------------------------------------

/// A directory with the secret files the examples name (relative paths), as their header comments create them.
fn example_secrets() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let sandbox_secrets = repo().join("deploy/compose/sandbox-secrets");
    for (role, app) in [("issuer", "fintech-a"), ("receiver", "sponsor-bank")] {
        std::fs::create_dir_all(dir.path().join("secrets").join(role)).unwrap();
        std::fs::copy(
            sandbox_secrets.join(format!("{app}-didit-api-key")),
            dir.path().join(format!("secrets/{role}/didit-api-key")),
        )
        .unwrap();
    }
    let keygen = Command::new(env!("CARGO_BIN_EXE_partner-bridge"))
        .args(["keygen", "--out", "secrets/issuer"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{keygen:?}");
    std::fs::copy(
        dir.path().join("secrets/issuer/signing.pub"),
        dir.path().join("secrets/receiver/fintech-a.pub"),
    )
    .unwrap();
    // The receiver's own pair, for its reshare requests; the issuer verifies them with its signing.pub.
    let keygen = Command::new(env!("CARGO_BIN_EXE_partner-bridge"))
        .args(["keygen", "--out", "secrets/receiver"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{keygen:?}");
    std::fs::copy(
        dir.path().join("secrets/receiver/signing.pub"),
        dir.path().join("secrets/issuer/sponsor-bank.pub"),
    )
    .unwrap();
    dir
}

fn run_binary(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_partner-bridge"))
        .args(args)
        .current_dir(dir)
        .env_remove("PARTNER_BRIDGE_CONFIG")
        .output()
        .unwrap()
}

/// The issuer and receiver examples pass `check-config` through the binary (and exit 64 naming the key while their
/// secret files do not exist yet), use the sandbox fixture's ids, and `topology show` prints what topology.md shows.
#[test]
fn the_example_configs_pass_check_config_against_the_sandbox_fixture() {
    let examples = repo().join("deploy/examples");
    let empty = tempfile::tempdir().unwrap();
    let secrets = example_secrets();
    let fixture: Value =
        serde_json::from_str(&read("deploy/compose/sandbox-fixture.json")).unwrap();
    let app = |name: &str| {
        fixture["applications"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .cloned()
            .unwrap()
    };
    let listings = fenced_blocks(&read("docs/topology.md"), "text");
    for (file, listing) in ["issuer.toml", "receiver.toml"].into_iter().zip(&listings) {
        let config = examples.join(file);
        let config = config.to_str().unwrap();
        let missing = run_binary(&["check-config", "--config", config], empty.path());
        assert_eq!(
            missing.status.code(),
            Some(64),
            "{file} without its secret files: {missing:?}"
        );
        assert!(
            String::from_utf8_lossy(&missing.stderr).contains("_file"),
            "{missing:?}"
        );

        let checked = run_binary(&["check-config", "--config", config], secrets.path());
        let stdout = String::from_utf8_lossy(&checked.stdout);
        assert!(
            checked.status.success() && stdout.starts_with("# configuration is valid"),
            "{file}: {checked:?}"
        );
        assert!(
            !String::from_utf8_lossy(&checked.stderr).contains("warning"),
            "{file} warns: {checked:?}"
        );
        let shown = run_binary(&["topology", "show", "--config", config], secrets.path());
        assert!(shown.status.success(), "{shown:?}");
        assert_eq!(
            &String::from_utf8_lossy(&shown.stdout),
            listing,
            "docs/topology.md shows another topology for deploy/examples/{file}"
        );
    }

    let issuer = toml::Value::Table(toml::from_str(&read("deploy/examples/issuer.toml")).unwrap());
    let receiver =
        toml::Value::Table(toml::from_str(&read("deploy/examples/receiver.toml")).unwrap());
    let (fintech, bank) = (app("fintech-a"), app("sponsor-bank"));
    assert_eq!(
        issuer["didit"]["application_id"].as_str(),
        fintech["application_id"].as_str()
    );
    assert_eq!(
        issuer["issuer"]["partners"][0]["application_id"].as_str(),
        bank["application_id"].as_str()
    );
    assert_eq!(
        receiver["didit"]["application_id"].as_str(),
        bank["application_id"].as_str()
    );
    assert_eq!(
        receiver["receiver"]["workflow_user"].as_str(),
        bank["workflows"]["user"].as_str()
    );
    assert_eq!(
        receiver["receiver"]["workflow_business"].as_str(),
        bank["workflows"]["business"].as_str()
    );
    assert_eq!(
        receiver["receiver"]["issuers"][0]["application_id"].as_str(),
        fintech["application_id"].as_str()
    );
    for config in [&issuer, &receiver] {
        assert_eq!(
            config["didit"]["base_url"].as_str(),
            Some("http://127.0.0.1:8089")
        );
        assert!(
            !config.to_string().contains("/run/secrets"),
            "examples use user-writable paths"
        );
    }
}

/// Every test that README.md and docs/guarantees.md name as the proof of a promise exists (`module::name` is
/// `fn name` in `tests/it/module.rs`), so the list of guarantees cannot drift from the tests that hold them up.
#[test]
fn every_test_named_as_a_proof_exists() {
    let root = repo();
    let mut named = BTreeSet::new();
    for doc in ["README.md", "docs/guarantees.md"] {
        let text = std::fs::read_to_string(root.join(doc)).expect("read the doc");
        for span in text.split('`').skip(1).step_by(2) {
            if let Some((module, name)) = span.split_once("::")
                && !module.is_empty()
                && module.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                && name.len() > 12
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                named.insert((doc, module.to_string(), name.to_string()));
            }
        }
    }
    assert!(
        named.len() >= 20,
        "expected the guarantees to name their tests, found {}",
        named.len()
    );
    let missing: Vec<String> = named
        .iter()
        .filter(|(_, module, name)| {
            let file = root.join("tests/it").join(format!("{module}.rs"));
            let source = std::fs::read_to_string(&file).unwrap_or_default();
            !source.contains(&format!("fn {name}("))
        })
        .map(|(doc, module, name)| format!("{doc}: {module}::{name}"))
        .collect();
    assert!(
        missing.is_empty(),
        "named as proofs but no such test: {missing:#?}"
    );
}
