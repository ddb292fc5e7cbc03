//! Keeps `deploy/` honest against the code: every metric name the Grafana dashboard, the alert rules and their
//! promtool tests use must be one the bridge exposes; `deploy/config.example.toml` must parse and show every
//! configuration key (with its default); the compose stack's configs must validate and work against the sandbox
//! loaded with its fixture; the Kubernetes manifests' configs may use only known keys. So none of them drifts as
//! metrics and keys are added or renamed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use partner_bridge::config::{Config, IssuerPeerConfig, PartnerConfig, WebhookConfig};
use partner_bridge::metrics::{Metrics, pipeline};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in
            std::fs::read_dir(&d).unwrap_or_else(|e| panic!("cannot read {}: {e}", d.display()))
        {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Identifiers in `text` that start with one of `prefixes` at an identifier boundary (so `rabbitmq_process_open_fds`
/// does not count as `process_open_fds`).
fn metric_tokens(text: &str, prefixes: &[&str]) -> BTreeSet<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = BTreeSet::new();
    let mut start = None;
    for (i, c) in text
        .char_indices()
        .chain(std::iter::once((text.len(), ' ')))
    {
        match (start, is_ident(c)) {
            (None, true) => start = Some(i),
            (Some(s), false) => {
                let word = &text[s..i];
                if prefixes.iter().any(|p| word.starts_with(p)) {
                    out.insert(word.to_string());
                }
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// The series names a scrape of `exposition` can contain: sample names, plus the names implied by each `# TYPE`
/// line (a counter's `_total`, a histogram's `_bucket`/`_sum`/`_count`, an info's `_info`), so a family with no
/// series yet (e.g. Didit calls before the first call) still counts as exposed.
fn exposed_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    names.insert(format!("{}_total", name.trim_end_matches("_total")));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                "info" => {
                    names.insert(format!("{name}_info"));
                }
                _ => {
                    names.insert(name.to_string());
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

fn bridge_exposition() -> String {
    let metrics = Metrics::new();
    metrics.init_known(
        &["bank".into()],
        &["fintech".into()],
        &["q".into()],
        &pipeline::ALL,
    );
    // `didit_requests_total{operation, status}` carries the HTTP status Didit answered, which no configuration
    // knows in advance, so `init_known` cannot create it: the family appears with the first Didit call.
    metrics.didit_request("share", "200", std::time::Duration::from_millis(5));
    // One series per key file the configuration names (`partner_bridge_key_reload_errors_total{key}`).
    metrics.key_watched("issuer.signing_key_file");
    // The rate limiter's series are per key, named by the roles using it (`issuer`, `issuer+receiver`), which only
    // the running process knows: they appear with the key's first paced write and first deferral.
    metrics.limiter_wait("issuer", std::time::Duration::from_millis(1));
    metrics.limiter_deferred("issuer");
    metrics.encode()
}

#[test]
fn every_metric_the_dashboard_and_alerts_use_is_exposed() {
    let exposition = bridge_exposition();
    let exposed = exposed_names(&exposition);
    // The extraction itself must work, or this test would pass on anything.
    for name in [
        "partner_bridge_events_total",
        "partner_bridge_didit_requests_total",
        "partner_bridge_didit_request_duration_seconds_bucket",
        "partner_bridge_last_success_timestamp_seconds",
        "partner_bridge_build_info",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(
            exposed.contains(name),
            "{name} missing from the parsed exposition:\n{exposition}"
        );
    }
    assert!(!exposed.contains("partner_bridge_no_such_metric_total"));

    let mut files = Vec::new();
    for dir in ["deploy/grafana", "deploy/prometheus"] {
        files.extend(files_under(&repo().join(dir)));
    }
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "json")),
        "no dashboard JSON under deploy/grafana"
    );
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().contains("/tests/")),
        "no promtool rule tests under deploy/prometheus/tests"
    );

    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let shown = file
            .strip_prefix(repo())
            .unwrap_or(file)
            .display()
            .to_string();
        for token in metric_tokens(&text, &["partner_bridge_", "process_"]) {
            used.entry(token).or_default().insert(shown.clone());
        }
    }
    assert!(
        used.len() >= 20,
        "only {} metric names found in deploy/: is the extraction broken? {used:?}",
        used.len()
    );
    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| !exposed.contains(name.as_str()))
        .map(|(name, where_)| {
            format!(
                "{name} (used in {})",
                where_.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/ uses metrics the bridge does not expose:\n  {}\nexposed: {exposed:?}",
        missing.join("\n  ")
    );
}

#[test]
fn metric_tokens_respect_identifier_boundaries() {
    let found = metric_tokens(
        r#"rate(partner_bridge_events_total{x="y"}[5m]) rabbitmq_process_open_fds process_open_fds"#,
        &["partner_bridge_", "process_"],
    );
    assert_eq!(
        found,
        BTreeSet::from([
            "partner_bridge_events_total".to_string(),
            "process_open_fds".to_string()
        ])
    );
}

// --------------------------------------------------------------------------------------------------------------------
// deploy/config.example.toml

fn example_text() -> String {
    std::fs::read_to_string(repo().join("deploy/config.example.toml"))
        .expect("deploy/config.example.toml")
}

/// Leaf keys of a TOML table as dotted paths, with their values.
fn leaves(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
    match value {
        toml::Value::Table(table) => {
            for (key, v) in table {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                leaves(&path, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// The value at a dotted path, looking into the first element of arrays of tables.
fn lookup<'a>(root: &'a toml::Value, path: &str) -> Option<&'a toml::Value> {
    path.split('.').try_fold(root, |v, key| match v {
        toml::Value::Array(items) => items.first()?.get(key),
        _ => v.get(key),
    })
}

/// Keys whose example value is not the default on purpose: the example runs both roles, with one partner and one
/// issuer, whose required names and ids have no default.
const NOT_THE_DEFAULT: [&str; 8] = [
    "issuer.enabled",
    "receiver.enabled",
    "issuer.partners",
    "receiver.issuers",
    "issuer.partners.name",
    "issuer.partners.application_id",
    "receiver.issuers.name",
    "receiver.issuers.application_id",
];

#[test]
fn config_example_parses_and_shows_every_default() {
    let text = example_text();
    Config::from_toml(&text)
        .unwrap_or_else(|e| panic!("deploy/config.example.toml does not load: {e}"));
    let example: toml::Value = toml::from_str(&text).expect("deploy/config.example.toml is TOML");

    let mut defaults = BTreeMap::new();
    leaves(
        "",
        &toml::Value::try_from(Config::default()).expect("serialise defaults"),
        &mut defaults,
    );
    leaves(
        "issuer.webhook",
        &toml::Value::try_from(WebhookConfig::default()).expect("serialise webhook defaults"),
        &mut defaults,
    );
    // The array tables have required keys; everything else in them has a default.
    let partner: PartnerConfig = toml::from_str("name = \"p\"\napplication_id = \"a\"")
        .expect("a minimal [[issuer.partners]]");
    leaves(
        "issuer.partners",
        &toml::Value::try_from(partner).expect("serialise partner"),
        &mut defaults,
    );
    let peer: IssuerPeerConfig = toml::from_str("name = \"i\"\napplication_id = \"a\"")
        .expect("a minimal [[receiver.issuers]]");
    leaves(
        "receiver.issuers",
        &toml::Value::try_from(peer).expect("serialise issuer"),
        &mut defaults,
    );
    assert!(
        defaults.len() > 30,
        "too few default keys found: {defaults:?}"
    );

    let mut problems = Vec::new();
    for (key, default) in &defaults {
        match lookup(&example, key) {
            None => problems.push(format!("{key} is missing (default {default})")),
            Some(_) if NOT_THE_DEFAULT.contains(&key.as_str()) => {}
            Some(shown) if shown != default => {
                problems.push(format!("{key} = {shown} but the default is {default}"))
            }
            Some(_) => {}
        }
    }
    assert!(
        problems.is_empty(),
        "deploy/config.example.toml:\n  {}",
        problems.join("\n  ")
    );
}

/// Every field serde knows for a section, read from the `deny_unknown_fields` error (which lists them all), so
/// optional keys without a default are covered too.
fn fields_of(section_toml: &str) -> Vec<String> {
    let err = Config::from_toml(section_toml).expect_err("an unknown key must be refused");
    let message = err.to_string();
    // "... unknown field `zz_unknown_probe`, expected one of `a`, `b` for key `section`" (or "expected `a` or `b`").
    let expected = message
        .split_once("expected ")
        .map(|(_, rest)| rest.split(" for key `").next().unwrap_or(rest))
        .unwrap_or_default();
    let fields: Vec<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    assert!(
        !fields.is_empty(),
        "cannot read the field list from {message:?} (for {section_toml:?})"
    );
    fields
}

/// `(section, key)` for every `key =` line of the example, commented out or not.
fn shown_keys(text: &str) -> BTreeSet<(String, String)> {
    let mut section = String::new();
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            continue;
        }
        let body = line.trim_start_matches('#').trim();
        if let Some((key, _)) = body.split_once('=') {
            let key = key.trim();
            if !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                out.insert((section.clone(), key.to_string()));
            }
        }
    }
    out
}

#[test]
fn config_example_mentions_every_key_including_optional_ones() {
    let text = example_text();
    let shown = shown_keys(&text);
    let sections: [(&str, &str); 15] = [
        ("", "zz_unknown_probe = 1"),
        ("audit", "[audit]\nzz_unknown_probe = 1"),
        ("didit", "[didit]\nzz_unknown_probe = 1"),
        ("amqp", "[amqp]\nzz_unknown_probe = 1"),
        ("admin", "[admin]\nzz_unknown_probe = 1"),
        ("http", "[http]\nzz_unknown_probe = 1"),
        ("retry", "[retry]\nzz_unknown_probe = 1"),
        ("ledger", "[ledger]\nzz_unknown_probe = 1"),
        ("log", "[log]\nzz_unknown_probe = 1"),
        ("shutdown", "[shutdown]\nzz_unknown_probe = 1"),
        ("issuer", "[issuer]\nzz_unknown_probe = 1"),
        ("issuer.webhook", "[issuer.webhook]\nzz_unknown_probe = 1"),
        (
            "issuer.partners",
            "[[issuer.partners]]\nname = \"p\"\napplication_id = \"a\"\nzz_unknown_probe = 1",
        ),
        ("receiver", "[receiver]\nzz_unknown_probe = 1"),
        (
            "receiver.issuers",
            "[[receiver.issuers]]\nname = \"i\"\napplication_id = \"a\"\nzz_unknown_probe = 1",
        ),
    ];
    let mut missing = Vec::new();
    for (section, probe) in sections {
        for field in fields_of(probe) {
            // A table of its own (`[issuer.webhook]`) is checked as its own section.
            let nested = if section.is_empty() {
                field.clone()
            } else {
                format!("{section}.{field}")
            };
            if sections.iter().any(|(s, _)| *s == nested) {
                continue;
            }
            // Secrets may be shown as their environment override instead of an inline key.
            let env = format!(
                "PARTNER_BRIDGE__{}",
                nested.replace('.', "__").to_uppercase()
            );
            let env_shown = text.match_indices(&env).any(|(at, _)| {
                !text[at + env.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            });
            if !shown.contains(&(section.to_string(), field.clone())) && !env_shown {
                missing.push(nested);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "deploy/config.example.toml does not show these keys (as `key = ...`, commented out if optional, or as \
         their PARTNER_BRIDGE__ env override): {missing:?}"
    );
}

// --------------------------------------------------------------------------------------------------------------------
// deploy/compose/: the demo stack's configs must pass the same validation `run` does, against the sandbox fixture.

/// Loads a compose config with its container paths moved to where the files are here: compose secrets
/// (`/run/secrets/NAME`) to `deploy/compose/sandbox-secrets/NAME`, the keygen volume to `keys`, the receiver-keygen
/// volume to `keys/receiver` (written here if missing).
fn compose_config(name: &str, keys: &Path) -> Config {
    let receiver_keys = keys.join("receiver");
    partner_bridge::commands::keygen(&receiver_keys, true)
        .expect("keygen, as the compose receiver-keygen service runs it");
    let secrets = repo().join("deploy/compose/sandbox-secrets");
    let text = std::fs::read_to_string(repo().join("deploy/compose").join(name))
        .unwrap_or_else(|e| panic!("deploy/compose/{name}: {e}"))
        .replace("/run/secrets/", &format!("{}/", secrets.display()))
        .replace("/etc/partner-bridge/keys/", &format!("{}/", keys.display()))
        .replace(
            "/etc/partner-bridge/receiver-keys/",
            &format!("{}/", receiver_keys.display()),
        );
    let config = Config::from_toml(&text)
        .unwrap_or_else(|e| panic!("deploy/compose/{name} does not load: {e}"));
    config
        .validate()
        .unwrap_or_else(|e| panic!("deploy/compose/{name} is invalid: {e}"));
    config
}

#[test]
fn compose_configs_validate_and_match_the_sandbox_fixture() {
    let keys = tempfile::tempdir().expect("temp dir");
    partner_bridge::commands::keygen(keys.path(), false)
        .expect("keygen, as the compose keygen service runs it");
    let issuer = compose_config("issuer.toml", keys.path());
    let receiver = compose_config("receiver.toml", keys.path());

    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/compose/sandbox-fixture.json"))
            .expect("sandbox fixture"),
    )
    .expect("sandbox fixture is JSON");
    let app = |id: &str| {
        fixture["applications"]
            .as_array()
            .expect("applications")
            .iter()
            .find(|a| a["application_id"] == id)
            .unwrap_or_else(|| panic!("application {id} is not in the sandbox fixture"))
            .clone()
    };
    let api_key = |access: &partner_bridge::config::DiditAccess| {
        access
            .api_key
            .load()
            .expect("API key file")
            .expose()
            .to_string()
    };

    let issuer_access = issuer.issuer_didit().expect("issuer Didit access");
    let issuer_app = app(&issuer_access.application_id);
    assert_eq!(
        api_key(&issuer_access),
        issuer_app["api_key"].as_str().unwrap()
    );
    assert_eq!(
        issuer.didit.base_url, "http://sandbox:8089",
        "compose's sandbox service"
    );

    let receiver_access = receiver.receiver_didit().expect("receiver Didit access");
    let receiver_app = app(&receiver_access.application_id);
    assert_eq!(
        api_key(&receiver_access),
        receiver_app["api_key"].as_str().unwrap()
    );
    assert_eq!(
        receiver.receiver.workflow_user.as_deref(),
        receiver_app["workflows"]["user"].as_str()
    );
    assert_eq!(
        receiver.receiver.workflow_business.as_deref(),
        receiver_app["workflows"]["business"].as_str()
    );

    // The two sides point at each other, and agree on the broker's names.
    assert_eq!(issuer.issuer.partners.len(), 1);
    assert_eq!(
        issuer.issuer.partners[0].application_id,
        receiver_access.application_id
    );
    assert_eq!(receiver.receiver.issuers.len(), 1);
    assert_eq!(
        receiver.receiver.issuers[0].application_id,
        issuer_access.application_id
    );
    assert_eq!(issuer.amqp.prefix, receiver.amqp.prefix);
    // The receiver trusts the key the issuer signs with.
    let signing = partner_bridge::envelope::SigningKey::from_base64(
        issuer
            .signing_key_source()
            .expect("signing key")
            .load()
            .expect("signing key file")
            .expose(),
    )
    .expect("a signing key");
    assert_eq!(
        receiver.issuer_public_keys(0).expect("issuer public key")[0].key_id(),
        signing.key_id()
    );
    // And the issuer verifies reshare requests with the key the receiver signs them with.
    let reshare_key = receiver
        .receiver_signing_key()
        .expect("receiver signing key")
        .expect("the compose receiver signs its reshare requests");
    let partner_keys = issuer.partner_public_keys(0).expect("partner keys");
    assert_eq!(partner_keys.len(), 1);
    assert_eq!(partner_keys[0].key_id(), reshare_key.key_id());
    assert!(issuer.warnings().is_empty(), "{:?}", issuer.warnings());
    assert!(receiver.warnings().is_empty(), "{:?}", receiver.warnings());
}

/// The compose stack's wiring, end to end through the real sandbox loaded with the compose fixture: the issuer's
/// key shares each fixture session with the receiver's application, and the receiver's key imports it into the
/// workflow of its kind.
#[tokio::test]
async fn compose_fixture_lets_the_issuer_share_and_the_receiver_import() {
    use partner_bridge::didit::client::DiditClient;
    use partner_bridge::didit::wire::ImportRequest;
    use partner_bridge::sandbox::{Sandbox, SandboxOptions};
    use std::sync::Arc;

    let fixture_path = repo().join("deploy/compose/sandbox-fixture.json");
    let sandbox = Sandbox::start(
        "127.0.0.1:0".parse().expect("address"),
        SandboxOptions {
            fixture: Some(fixture_path.clone()),
            ..SandboxOptions::default()
        },
    )
    .await
    .expect("the sandbox loads the compose fixture");

    let keys = tempfile::tempdir().expect("temp dir");
    partner_bridge::commands::keygen(keys.path(), false).expect("keygen");
    let issuer = compose_config("issuer.toml", keys.path());
    let receiver = compose_config("receiver.toml", keys.path());
    let client = |mut access: partner_bridge::config::DiditAccess| {
        access.base_url = sandbox.base_url();
        DiditClient::new(&access, Arc::new(Metrics::new())).expect("Didit client")
    };
    let issuer_client = client(issuer.issuer_didit().expect("issuer access"));
    let receiver_client = client(receiver.receiver_didit().expect("receiver access"));
    let partner = &issuer.issuer.partners[0];

    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&fixture_path).expect("fixture"))
            .expect("fixture JSON");
    let sessions = fixture["sessions"]
        .as_array()
        .expect("the fixture has sessions to share");
    assert!(!sessions.is_empty());
    for session in sessions {
        let id = session["session_id"]
            .as_str()
            .expect("fixed session ids, so people can refer to them");
        let shared = issuer_client
            .share(id, &partner.application_id, partner.ttl_seconds)
            .await
            .unwrap_or_else(|e| panic!("share {id}: {e}"));
        let workflow = match session["session_kind"].as_str() {
            Some("business") => receiver.receiver.workflow_business.clone(),
            _ => receiver.receiver.workflow_user.clone(),
        }
        .expect("a workflow of the session's kind");
        let imported = receiver_client
            .import(&ImportRequest {
                share_token: shared.share_token,
                workflow_id: workflow,
                vendor_data: session["vendor_data"].as_str().map(str::to_string),
                trust_review: receiver.receiver.issuers[0].trust_review,
            })
            .await
            .unwrap_or_else(|e| panic!("import {id}: {e}"));
        assert_ne!(
            imported.session_id, id,
            "an import is a new session in the receiver's application"
        );
    }
    sandbox.shutdown().await;
}

/// The `config.toml` block of each Kubernetes ConfigMap (a YAML literal block, read without a YAML parser).
fn k8s_config_blocks(manifest: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut lines = manifest.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim_end() != "  config.toml: |" {
            continue;
        }
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            if !next.is_empty() && !next.starts_with("    ") {
                break;
            }
            block.push_str(next.strip_prefix("    ").unwrap_or(""));
            block.push('\n');
            lines.next();
        }
        blocks.push(block);
    }
    blocks
}

/// The manifests' configs hold placeholders an operator fills in (so they do not validate as shipped), but every
/// key in them must be one the bridge knows, in the right place.
#[test]
fn k8s_configs_use_only_known_keys() {
    for name in ["issuer.yaml", "receiver.yaml"] {
        let manifest = std::fs::read_to_string(repo().join("deploy/k8s").join(name))
            .unwrap_or_else(|e| panic!("deploy/k8s/{name}: {e}"));
        let blocks = k8s_config_blocks(&manifest);
        assert_eq!(
            blocks.len(),
            1,
            "deploy/k8s/{name}: one ConfigMap with config.toml"
        );
        let config = Config::from_toml(&blocks[0])
            .unwrap_or_else(|e| panic!("deploy/k8s/{name} config.toml: {e}"));
        assert!(config.issuer.enabled || config.receiver.enabled);
        assert_eq!(
            config.admin.listen.port(),
            9464,
            "probes and scrape annotations use 9464"
        );
    }
}
