//! Fuzz targets (issue #9 item 8) for the three places that read bytes from outside: envelope parsing and Ed25519
//! verification ([`partner_bridge::envelope`]), Didit webhook canonicalisation and HMAC verification
//! ([`partner_bridge::didit::signature`]), and configuration loading ([`partner_bridge::config::Config`]).
//!
//! These are `proptest` properties, not `cargo fuzz` targets: cargo-fuzz (libFuzzer) needs a nightly toolchain,
//! and the project's machines and CI have only the one stable toolchain. The properties run in the ordinary test
//! binary, so a panic anywhere in the code under test is a test failure, and proptest prints the shrunk input.
//!
//! Inputs come from two sources: the seed corpus in `tests/fuzz-corpus/<target>/` (real examples and edge cases,
//! mutated byte-wise and structurally) and pure random data. `PB_FUZZ_CASES` sets the number of cases per
//! property (default 256, so that `cargo test` stays fast); `.ci/run fuzz` runs them with many more. Failing seeds
//! are not persisted to files: a failure prints its minimal input, which belongs in the corpus once fixed.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use partner_bridge::config::Config;
use partner_bridge::didit::signature;
use partner_bridge::envelope::{self, Message, SigningKey, VerifyingKey};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::Value;

/// Cases per property: `PB_FUZZ_CASES`, default 256.
fn fuzz_config() -> ProptestConfig {
    scaled_fuzz_config(1)
}

/// `PB_FUZZ_CASES / divisor` cases (at least 16), for a property whose cases are expensive: Ed25519 in a debug
/// build takes milliseconds per signature, a hundred times what a parse costs.
fn scaled_fuzz_config(divisor: u32) -> ProptestConfig {
    let cases: u32 = std::env::var("PB_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases: (cases / divisor).max(16),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The seed corpus of one target, sorted by file name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-corpus")
        .join(target);
    let mut entries: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    entries.sort();
    assert!(!entries.is_empty(), "corpus {} is empty", dir.display());
    entries
}

fn corpus_cached(target: &'static str) -> &'static [(String, Vec<u8>)] {
    use std::sync::OnceLock;
    static ENVELOPE: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    static WEBHOOK: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    static CONFIG: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    let cell = match target {
        "envelope" => &ENVELOPE,
        "webhook" => &WEBHOOK,
        "config" => &CONFIG,
        other => panic!("no corpus {other}"),
    };
    cell.get_or_init(|| corpus(target))
}

// ---------------------------------------------------------------------------------------------------------------
// Byte mutations shared by all targets.

/// Tokens that tend to reach new parser states when spliced in.
const DICTIONARY: &[&str] = &[
    "\"",
    "\\",
    "\\u",
    "\\ud800",
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "=",
    "\n",
    "null",
    "true",
    "1e400",
    "-0",
    "0.5",
    "18446744073709551616",
    "\"type\"",
    "\"share_token\"",
    "\"import.result\"",
    "\"reshare.request\"",
    "\"onboarding.finished\"",
    "[[",
    "]]",
    "'''",
    "\"\"\"",
    "#",
    "😀",
    "\u{0}",
    "\u{7f}",
    "é",
];

#[derive(Debug, Clone)]
enum ByteMutation {
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    Splice(Index, Index),
    Truncate(Index),
    Duplicate(Index, Index),
}

fn byte_mutation() -> impl Strategy<Value = ByteMutation> {
    prop_oneof![
        (any::<Index>(), 1..=255u8).prop_map(|(i, b)| ByteMutation::Flip(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| ByteMutation::Insert(i, b)),
        any::<Index>().prop_map(ByteMutation::Delete),
        (any::<Index>(), any::<Index>()).prop_map(|(i, t)| ByteMutation::Splice(i, t)),
        any::<Index>().prop_map(ByteMutation::Truncate),
        (any::<Index>(), any::<Index>()).prop_map(|(i, j)| ByteMutation::Duplicate(i, j)),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[ByteMutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        match m {
            ByteMutation::Flip(i, b) if len > 0 => bytes[i.index(len)] ^= b,
            ByteMutation::Insert(i, b) => bytes.insert(i.index(len + 1), *b),
            ByteMutation::Delete(i) if len > 0 => {
                bytes.remove(i.index(len));
            }
            ByteMutation::Splice(i, t) => {
                let at = i.index(len + 1);
                let token = DICTIONARY[t.index(DICTIONARY.len())].as_bytes();
                bytes.splice(at..at, token.iter().copied());
            }
            ByteMutation::Truncate(i) => bytes.truncate(i.index(len + 1)),
            ByteMutation::Duplicate(i, j) if len > 0 => {
                let (a, b) = (i.index(len), j.index(len));
                let (from, to) = (a.min(b), a.max(b));
                let chunk: Vec<u8> = bytes[from..=to.min(from + 64)].to_vec();
                bytes.splice(to..to, chunk);
            }
            _ => {}
        }
    }
    bytes
}

/// A corpus entry of `target`, mutated by a handful of byte mutations.
fn mutated_corpus(target: &'static str) -> impl Strategy<Value = (String, Vec<u8>)> {
    (any::<Index>(), prop::collection::vec(byte_mutation(), 0..8)).prop_map(
        move |(pick, mutations)| {
            let entries = corpus_cached(target);
            let (name, bytes) = &entries[pick.index(entries.len())];
            (name.clone(), mutate(bytes.clone(), &mutations))
        },
    )
}

// ---------------------------------------------------------------------------------------------------------------
// Arbitrary JSON values (nested, unicode, integer-valued and other floats, big numbers).

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{0,12}",
        any::<String>(),
        Just("type".to_string()),
        Just("status".to_string()),
        Just("session_id".to_string()),
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        // Integer-valued floats, on both sides of the 1e18 cut-off of the canonical form.
        (-1e6f64..1e6).prop_map(|f| Value::from(f.trunc())),
        prop::sample::select(vec![
            0.0f64,
            -0.0,
            1e17,
            1e18,
            -1e18,
            1e20,
            9_007_199_254_740_993.0,
            1e308,
            -1e308,
            5e-324,
            0.1
        ])
        .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        "[A-Za-z ]{0,16}".prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(6, 96, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(json_key(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Target 1: envelopes.

/// Every `x-pb-reason` word `parse` and `verify` may give.
const REASONS: &[&str] = &[
    "malformed_json",
    "unknown_type",
    "missing_field",
    "invalid_field",
    "oversized",
    "unsigned",
    "bad_signature",
    "unknown_issuer",
];

const MAX: usize = 64 * 1024;

/// Parses, and checks that a refusal carries one of the documented reasons and a detail.
fn parse_checked(body: &[u8], max: usize) -> Result<Option<Message>, TestCaseError> {
    match envelope::parse(body, max) {
        Ok(message) => Ok(Some(message)),
        Err(bad) => {
            prop_assert!(
                REASONS.contains(&bad.reason),
                "unknown reason {:?}",
                bad.reason
            );
            prop_assert!(
                !bad.detail.trim().is_empty(),
                "empty detail for {}",
                bad.reason
            );
            Ok(None)
        }
    }
}

fn type_of(message: &Message) -> &'static str {
    match message {
        Message::OnboardingFinished(_) => envelope::types::ONBOARDING_FINISHED,
        Message::ShareToken(_) => envelope::types::SHARE_TOKEN,
        Message::ReshareRequest(_) => envelope::types::RESHARE_REQUEST,
        Message::ImportResult(_) => envelope::types::IMPORT_RESULT,
        Message::NoticeRequested(_) => envelope::types::NOTICE_REQUESTED,
        Message::Notice(_) => envelope::types::NOTICE,
        Message::NoticeAck(_) => envelope::types::NOTICE_ACK,
    }
}

/// A fixed issuer key (seed from the test's own bytes: fuzz runs are reproducible).
fn issuer_key() -> SigningKey {
    SigningKey::from_base64(&B64.encode([7u8; 32])).unwrap()
}

/// A structural change of a valid envelope: a field removed, replaced, or the type swapped.
#[derive(Debug, Clone)]
enum FieldMutation {
    Remove(Index),
    Replace(Index, Value),
    Add(String, Value),
    SwapType(Index),
}

fn field_mutation() -> impl Strategy<Value = FieldMutation> {
    prop_oneof![
        any::<Index>().prop_map(FieldMutation::Remove),
        (any::<Index>(), json_value()).prop_map(|(i, v)| FieldMutation::Replace(i, v)),
        (
            any::<Index>(),
            prop::sample::select(vec![
                "",
                " ",
                "\t\n",
                "😀",
                "Approved",
                "approved",
                "In Review",
                "user",
                "BUSINESS",
                "imported",
                "2026-13-01T00:00:00Z",
                "2026-12-01T10:00:00Z",
                "-1",
                "\u{0}"
            ])
        )
            .prop_map(|(i, s)| FieldMutation::Replace(i, Value::from(s))),
        (json_key(), json_value()).prop_map(|(k, v)| FieldMutation::Add(k, v)),
        any::<Index>().prop_map(FieldMutation::SwapType),
    ]
}

const TYPES: [&str; 4] = [
    envelope::types::ONBOARDING_FINISHED,
    envelope::types::SHARE_TOKEN,
    envelope::types::RESHARE_REQUEST,
    envelope::types::IMPORT_RESULT,
];

fn apply_field_mutations(mut value: Value, mutations: &[FieldMutation]) -> Value {
    let Value::Object(map) = &mut value else {
        return value;
    };
    for m in mutations {
        let keys: Vec<String> = map.keys().cloned().collect();
        match m {
            FieldMutation::Remove(i) if !keys.is_empty() => {
                map.remove(&keys[i.index(keys.len())]);
            }
            FieldMutation::Replace(i, v) if !keys.is_empty() => {
                map.insert(keys[i.index(keys.len())].clone(), v.clone());
            }
            FieldMutation::Add(k, v) => {
                map.insert(k.clone(), v.clone());
            }
            FieldMutation::SwapType(i) => {
                map.insert("type".into(), Value::from(TYPES[i.index(TYPES.len())]));
            }
            _ => {}
        }
    }
    value
}

proptest! {
    #![proptest_config(fuzz_config())]

    /// Arbitrary bytes never panic the parser; every refusal has a reason and a detail.
    #[test]
    fn envelope_arbitrary_bytes_get_a_reason(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        parse_checked(&body, MAX)?;
    }

    /// Byte-mutated corpus envelopes never panic the parser; a parsed message is of the type its body names.
    #[test]
    fn envelope_mutated_corpus_gets_a_reason((name, body) in mutated_corpus("envelope")) {
        if let Some(message) = parse_checked(&body, MAX)? {
            let value: Value = serde_json::from_slice(&body).unwrap();
            prop_assert_eq!(value["type"].as_str(), Some(type_of(&message)), "{}", name);
        }
    }

    /// Structural mutations of valid envelopes (every message type): fields removed, replaced with arbitrary
    /// JSON, added, or the type swapped. Never a panic; a refusal has a reason; an accepted one has its type.
    #[test]
    fn envelope_field_mutations_get_a_reason(
        pick in any::<Index>(),
        mutations in prop::collection::vec(field_mutation(), 1..4),
    ) {
        let valid: Vec<Value> = corpus_cached("envelope")
            .iter()
            .filter(|(_, bytes)| envelope::parse(bytes, MAX).is_ok())
            .map(|(_, bytes)| serde_json::from_slice(bytes).unwrap())
            .collect();
        prop_assert!(valid.len() >= 4, "the corpus must hold valid envelopes of every type");
        let value = apply_field_mutations(valid[pick.index(valid.len())].clone(), &mutations);
        let body = serde_json::to_vec(&value).unwrap();
        if let Some(message) = parse_checked(&body, MAX)? {
            prop_assert_eq!(value["type"].as_str(), Some(type_of(&message)));
        }
    }

    /// A body over the limit is refused as `oversized` whatever it holds; at the limit it is parsed.
    #[test]
    fn envelope_oversized_bodies_are_refused(
        (_, body) in mutated_corpus("envelope"),
        under in 1usize..4096,
    ) {
        let max = body.len().saturating_sub(under);
        if body.len() > max {
            prop_assert_eq!(envelope::parse(&body, max).unwrap_err().reason, "oversized");
        }
        if let Err(bad) = envelope::parse(&body, body.len()) {
            prop_assert_ne!(bad.reason, "oversized");
        }
    }
}

proptest! {
    // Six Ed25519 operations per case: an eighth of the cases keeps this property's time in line with the others.
    #![proptest_config(scaled_fuzz_config(8))]

    /// A signed body verifies; any single-byte change of the body, or of the signature's bytes, or any single
    /// character of the header, fails with `bad_signature`; arbitrary header text never panics.
    #[test]
    fn envelope_signatures_cover_every_byte(
        (_, body) in mutated_corpus("envelope"),
        at in any::<Index>(),
        flip in 1..=255u8,
        replacement in any::<char>(),
        header in ".{0,120}",
    ) {
        let key = issuer_key();
        let public = VerifyingKey::from_base64(&key.verifying_key().to_base64()).unwrap();
        let signed = key.sign(&body);
        prop_assert!(public.verify(&body, &signed).is_ok());

        if !body.is_empty() {
            let mut changed = body.clone();
            changed[at.index(body.len())] ^= flip;
            prop_assert_eq!(public.verify(&changed, &signed).unwrap_err().reason, "bad_signature");
        }

        let mut raw = B64.decode(signed.strip_prefix("ed25519:").unwrap()).unwrap();
        let k = at.index(raw.len());
        raw[k] ^= flip;
        let forged = format!("ed25519:{}", B64.encode(&raw));
        prop_assert_eq!(public.verify(&body, &forged).unwrap_err().reason, "bad_signature");

        let chars: Vec<char> = signed.chars().collect();
        let i = at.index(chars.len());
        if chars[i] != replacement {
            let mut edited = chars.clone();
            edited[i] = replacement;
            let edited: String = edited.into_iter().collect();
            prop_assert_eq!(
                public.verify(&body, &edited).unwrap_err().reason,
                "bad_signature",
                "header {:?}",
                edited
            );
        }

        if let Err(bad) = public.verify(&body, &header) {
            prop_assert_eq!(bad.reason, "bad_signature");
        }
        let other = SigningKey::from_base64(&B64.encode([8u8; 32])).unwrap().verifying_key();
        prop_assert!(other.verify(&body, &signed).is_err());
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Target 2: webhook canonicalisation and verification.

const SECRET: &str = "whsec_fuzz_secret";

/// The same value with every object's keys inserted in reverse order.
fn reordered(value: &Value) -> Value {
    match value {
        Value::Array(items) => Value::Array(items.iter().map(reordered).collect()),
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map.iter().rev() {
                out.insert(k.clone(), reordered(v));
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// Canonicalisation is deterministic and idempotent, independent of key order, and both forms parse to the same.
fn check_canonical(value: &Value) -> Result<(), TestCaseError> {
    let canonical = signature::canonical_json(value);
    prop_assert_eq!(&canonical, &signature::canonical_json(&value.clone()));
    prop_assert_eq!(&canonical, &signature::canonical_json(&reordered(value)));
    let reparsed: Value = serde_json::from_str(&canonical).map_err(|e| {
        TestCaseError::fail(format!("canonical form is not JSON: {e}: {canonical}"))
    })?;
    prop_assert_eq!(
        &signature::canonical_json(&reparsed),
        &canonical,
        "not idempotent"
    );
    let ascii = signature::canonical_json_ascii(value);
    prop_assert!(ascii.is_ascii());
    let from_ascii: Value = serde_json::from_str(&ascii)
        .map_err(|e| TestCaseError::fail(format!("ASCII form is not JSON: {e}: {ascii}")))?;
    prop_assert_eq!(
        from_ascii,
        reparsed,
        "the two canonical forms differ in meaning"
    );
    Ok(())
}

/// A different hex digit at one position (not just another case of the same digit).
fn other_hex_digit(c: char, pick: u8) -> char {
    let digits = b"0123456789abcdef";
    let current = c.to_digit(16).unwrap() as u8;
    digits[((current + 1 + pick % 15) % 16) as usize] as char
}

proptest! {
    #![proptest_config(fuzz_config())]

    /// Arbitrary JSON (nested, unicode, floats, big numbers) canonicalises deterministically and idempotently.
    #[test]
    fn webhook_canonical_json_is_deterministic(value in json_value()) {
        check_canonical(&value)?;
    }

    /// Corpus bodies, byte-mutated, and arbitrary bytes: never a panic in canonicalisation or verification.
    #[test]
    fn webhook_arbitrary_bytes_never_panic(
        (_, mutated) in mutated_corpus("webhook"),
        random in prop::collection::vec(any::<u8>(), 0..512),
        sig in ".{0,80}",
    ) {
        for body in [&mutated, &random] {
            prop_assert!(!signature::verify_raw(SECRET, body, &sig) || sig.len() >= 64);
            if let Ok(value) = serde_json::from_slice::<Value>(body) {
                check_canonical(&value)?;
                let _ = signature::verify_v2(SECRET, &value, &sig);
            }
        }
    }

    /// A correct signature of every kind verifies; a mutated body or a changed signature digit fails.
    #[test]
    fn webhook_signatures_verify_and_mutations_fail(
        value in prop_oneof![
            json_value(),
            any::<Index>().prop_map(|i| {
                let entries = corpus_cached("webhook");
                serde_json::from_slice(&entries[i.index(entries.len())].1).unwrap()
            }),
        ],
        change in json_value(),
        at in any::<Index>(),
        flip in 1..=255u8,
        digit in any::<u8>(),
    ) {
        // V2, both canonical forms.
        let v2 = signature::sign_v2(SECRET, &value);
        prop_assert!(signature::verify_v2(SECRET, &value, &v2));
        prop_assert!(signature::verify_v2(SECRET, &value, &signature::sign_v2_ascii(SECRET, &value)));
        prop_assert!(!signature::verify_v2("another secret", &value, &v2));
        let mut changed = value.clone();
        match &mut changed {
            Value::Object(map) => {
                map.insert("__fuzz".into(), change);
            }
            other => *other = serde_json::json!({ "__fuzz": change }),
        }
        prop_assert!(!signature::verify_v2(SECRET, &changed, &v2), "mutated body verified");
        let i = at.index(v2.len());
        let mut bad = v2.clone().into_bytes();
        bad[i] = other_hex_digit(bad[i] as char, digit) as u8;
        let bad = String::from_utf8(bad).unwrap();
        prop_assert!(!signature::verify_v2(SECRET, &value, &bad), "changed signature verified");

        // Raw: over the exact bytes.
        let raw = serde_json::to_vec(&value).unwrap();
        let sig = signature::sign_raw(SECRET, &raw);
        prop_assert!(signature::verify_raw(SECRET, &raw, &sig));
        prop_assert!(signature::verify_raw(SECRET, &raw, &format!(" {sig}\n")), "surrounding space is trimmed");
        let mut raw_changed = raw.clone();
        raw_changed[at.index(raw.len())] ^= flip;
        prop_assert!(!signature::verify_raw(SECRET, &raw_changed, &sig));
        let j = at.index(sig.len());
        let mut sig_bad = sig.clone().into_bytes();
        sig_bad[j] = other_hex_digit(sig_bad[j] as char, digit) as u8;
        prop_assert!(!signature::verify_raw(SECRET, &raw, &String::from_utf8(sig_bad).unwrap()));

        // Simple: over the four fields.
        let session = value["session_id"].as_str().unwrap_or("s");
        let status = value["status"].as_str().unwrap_or("Approved");
        let kind = value["webhook_type"].as_str().unwrap_or("status.updated");
        let ts = value["timestamp"].as_i64().unwrap_or(0);
        let simple = signature::sign_simple(SECRET, ts, session, status, kind);
        prop_assert!(signature::verify_simple(SECRET, ts, session, status, kind, &simple));
        prop_assert!(!signature::verify_simple(SECRET, ts.wrapping_add(1), session, status, kind, &simple));
        let other_session = format!("{session}x");
        prop_assert!(!signature::verify_simple(SECRET, ts, &other_session, status, kind, &simple));
    }

    /// The constant-time comparison takes signatures of any length and any text: a mismatch, never a panic.
    #[test]
    fn webhook_compare_takes_any_length(
        body in prop::collection::vec(any::<u8>(), 0..256),
        secret in prop::collection::vec(any::<u8>(), 0..200),
        len in 0usize..200,
        text in ".{0,200}",
    ) {
        let good = signature::hmac_hex(&secret, &body);
        prop_assert!(signature::verify_hmac_hex(&secret, &body, &good));
        let prefix: String = good.chars().cycle().take(len).collect();
        prop_assert_eq!(signature::verify_hmac_hex(&secret, &body, &prefix), prefix == good);
        let _ = signature::verify_hmac_hex(&secret, &body, &text);
        let _ = signature::verify_hmac_hex(&secret, &body, &hex::encode(text.as_bytes()));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Target 3: configuration loading.

/// Checks that an error names a key and says why.
fn check_config_error(err: &partner_bridge::config::ConfigError) -> Result<(), TestCaseError> {
    prop_assert!(!err.key.trim().is_empty(), "error without a key: {err}");
    prop_assert!(
        !err.reason.trim().is_empty(),
        "error without a reason: {err}"
    );
    Ok(())
}

/// Loads and, when that works, validates and renders; no step may panic.
fn check_loaded(
    loaded: Result<Config, partner_bridge::config::ConfigError>,
) -> Result<(), TestCaseError> {
    match loaded {
        Err(err) => check_config_error(&err),
        Ok(config) => {
            let _ = config.warnings();
            let _ = config.redacted_toml();
            match config.validate() {
                Err(err) => check_config_error(&err),
                Ok(()) => Ok(()),
            }
        }
    }
}

/// Keys the environment may override, as `PARTNER_BRIDGE__...` suffixes (and a few that do not exist).
const ENV_KEYS: &[&str] = &[
    "STATE_DIR",
    "AMQP__URL",
    "AMQP__PREFIX",
    "AMQP__PREFETCH",
    "AMQP__DELIVERY_LIMIT",
    "AMQP__MAX_MESSAGE_BYTES",
    "DIDIT__API_KEY",
    "DIDIT__BASE_URL",
    "DIDIT__TIMEOUT_MS",
    "RETRY__INITIAL_MS",
    "LEDGER__TIMEOUT_MS",
    "LEDGER__URL",
    "LEDGER__SSLMODE",
    "LEDGER__CA_FILE",
    "LOG__FORMAT",
    "ISSUER__ENABLED",
    "RECEIVER__ENABLED",
    "ISSUER__PARTNERS",
    "ISSUER__PARTNERS__0__TTL_SECONDS",
    "RECEIVER__ISSUERS",
    "NOPE",
    "AMQP__NOPE",
    "",
    "__",
    "AMQP____URL",
];

fn env_override() -> impl Strategy<Value = (String, String)> {
    let key = prop_oneof![
        prop::sample::select(ENV_KEYS).prop_map(str::to_string),
        "[A-Z_]{0,24}",
        any::<String>(),
    ];
    let value = prop_oneof![
        prop::sample::select(vec![
            "",
            "0",
            "-1",
            "7",
            "1e400",
            "true",
            "false",
            "yes",
            "[1,2]",
            "{a=1}",
            "amqp://x",
            "postgres://h/db?sslmode=verify-full",
            "postgres://h/db?sslrootcert=%ZZ&sslmode=",
            "verify-ca",
            "system",
            "😀",
            "18446744073709551616",
            "pretty",
            "json"
        ])
        .prop_map(str::to_string),
        any::<String>(),
    ];
    (key, value).prop_map(|(k, v)| (format!("PARTNER_BRIDGE__{k}"), v))
}

/// TOML-ish text: lines assembled from keys, tables and values the config knows, plus noise.
fn tomlish_text() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        prop::sample::select(vec![
            "[didit]",
            "[amqp]",
            "[issuer]",
            "[receiver]",
            "[[issuer.partners]]",
            "[[receiver.issuers]]",
            "[issuer.webhook]",
            "[retry]",
            "[ledger]",
            "[log]",
            "[admin]",
            "[http]",
            "[shutdown]",
            "[amqp.url]",
            "enabled = true",
            "prefetch = 0",
            "prefetch = 99999999999999999999",
            "url = \"amqp://a:b@h/%2f\"",
            "state_dir = \"\"",
            "ttl_seconds = -5",
            "statuses = [\"Approved\", 3]",
            "format = \"json\"",
            "application_id = \"x\"",
            "a.b.c = 1",
            "x = { y = [ { z = 1 } ] }",
            "= 1",
            "[",
            "\"\"\"",
            "key = 1979-05-27T07:32:00Z",
            "inf = inf",
            "nan = -nan",
            "k = 0x10",
            "k = 1_000",
        ])
        .prop_map(str::to_string),
        (
            "[a-z_.]{1,20}",
            prop_oneof![
                "[0-9]{1,5}",
                "\"[^\"\\\\]{0,10}\"",
                Just("true".to_string())
            ]
        )
            .prop_map(|(k, v)| format!("{k} = {v}")),
        ".{0,40}",
    ];
    prop::collection::vec(line, 0..24).prop_map(|lines| lines.join("\n"))
}

/// A line-level change of a corpus file: a line removed, duplicated, or given a new value.
fn line_mutated_config() -> impl Strategy<Value = String> {
    (
        any::<Index>(),
        prop::collection::vec(
            (
                0u8..3,
                any::<Index>(),
                prop::sample::select(vec![
                    "0",
                    "-1",
                    "\"\"",
                    "\"😀\"",
                    "[]",
                    "{}",
                    "true",
                    "1.5",
                    "99999999999999999999",
                    "\"x\"",
                ]),
            ),
            1..6,
        ),
    )
        .prop_map(|(pick, edits)| {
            let entries = corpus_cached("config");
            let text = String::from_utf8_lossy(&entries[pick.index(entries.len())].1).into_owned();
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            for (op, at, value) in edits {
                if lines.is_empty() {
                    break;
                }
                let i = at.index(lines.len());
                match op {
                    0 => {
                        lines.remove(i);
                    }
                    1 => lines.insert(i, lines[i].clone()),
                    _ => {
                        if let Some((key, _)) = lines[i].split_once('=') {
                            lines[i] = format!("{key}= {value}");
                        }
                    }
                }
            }
            lines.join("\n")
        })
}

proptest! {
    #![proptest_config(fuzz_config())]

    /// TOML-ish text, arbitrary text and corpus files mutated byte- and line-wise: loading, validating and
    /// rendering never panic, and every error names a key (or `--config` for text that is not TOML) and a reason.
    #[test]
    fn config_text_never_panics(
        text in prop_oneof![
            tomlish_text(),
            line_mutated_config(),
            mutated_corpus("config").prop_map(|(_, b)| String::from_utf8_lossy(&b).into_owned()),
            any::<String>(),
        ],
    ) {
        check_loaded(Config::from_toml(&text))?;
    }

    /// Corpus files with arbitrary environment overrides, through the same `Config::load` the binary uses.
    #[test]
    fn config_env_overrides_never_panic(
        pick in any::<Index>(),
        env in prop::collection::vec(env_override(), 0..6),
    ) {
        let entries = corpus_cached("config");
        let (name, text) = &entries[pick.index(entries.len())];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let env: HashMap<String, String> = env.into_iter().collect();
        check_loaded(Config::load(Some(&path), env))?;
    }
}

/// The corpus itself: every config seed either loads or fails with a key, and the valid envelope seeds cover every
/// message type (the field-mutation target starts from them).
#[test]
fn fuzz_corpus_covers_every_target() {
    let types: BTreeMap<&str, usize> = corpus_cached("envelope")
        .iter()
        .filter_map(|(_, bytes)| envelope::parse(bytes, MAX).ok())
        .fold(BTreeMap::new(), |mut acc, m| {
            *acc.entry(type_of(&m)).or_default() += 1;
            acc
        });
    assert_eq!(types.len(), 4, "valid envelope seeds by type: {types:?}");
    for (name, bytes) in corpus_cached("webhook") {
        serde_json::from_slice::<Value>(bytes)
            .unwrap_or_else(|e| panic!("webhook seed {name}: {e}"));
    }
    for (name, bytes) in corpus_cached("config") {
        let text = std::str::from_utf8(bytes).unwrap_or_else(|e| panic!("config seed {name}: {e}"));
        if let Err(err) = Config::from_toml(text) {
            assert!(!err.key.is_empty(), "config seed {name}: {err}");
        }
    }
}

/// Found by `config_env_overrides_never_panic`: an environment variable whose name holds a backtick made the
/// unknown-field error name no key at all (`key` was empty), because the key was cut at the first backtick pair.
/// Fails on the old `from_config_error`.
#[test]
fn fuzz_found_env_key_with_backtick_is_named() {
    let env = HashMap::from([("PARTNER_BRIDGE__`X".to_string(), "1".to_string())]);
    let err = Config::load(None, env).unwrap_err();
    assert_eq!(err.key, "`x", "{err}");
    let env = HashMap::from([("PARTNER_BRIDGE__A`B".to_string(), "1".to_string())]);
    assert!(!Config::load(None, env).unwrap_err().key.is_empty());
}

/// Cases the fuzz targets found, kept as plain tests so they run on every `cargo test`: a blank key from an
/// environment variable named `PARTNER_BRIDGE__ ` (or `PARTNER_BRIDGE__` and a no-break space), and an out-of-range
/// `ledger.timeout_ms` reaching the lease check once every problem is reported at once (it overflowed).
#[test]
fn fuzz_findings_stay_fixed() {
    let (name, text) = &corpus_cached("config")[0];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    for env in [
        vec![("PARTNER_BRIDGE__ ", "x")],
        vec![("PARTNER_BRIDGE__\u{a0}", "x")],
        vec![("PARTNER_BRIDGE__LEDGER__TIMEOUT_MS", "18446744073709551615")],
    ] {
        let env: HashMap<String, String> = env
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        check_loaded(Config::load(Some(&path), env.clone()))
            .unwrap_or_else(|e| panic!("{env:?}: {e}"));
    }
}
