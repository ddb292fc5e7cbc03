//! Configuration through the real binary: invalid configurations exit 64 and name the key; a valid one prints with
//! every secret redacted. Also the layering of file and environment.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use partner_bridge::config::Config;

const ISSUER_APP: &str = "dbd20e34-42e9-4f2c-ba91-cf0762016f64";
const PARTNER_APP: &str = "a5f3bca2-46e2-411e-90ef-a580900a57ee";

/// A valid issuer+receiver config whose secrets live in files under `dir`.
fn write_valid(dir: &Path, ttl: u32) -> std::path::PathBuf {
    let key = partner_bridge::envelope::SigningKey::generate();
    std::fs::write(dir.join("signing.key"), key.to_base64()).unwrap();
    std::fs::write(dir.join("api.key"), "sk_test_super_secret_key\n").unwrap();
    let text = format!(
        r#"
state_dir = "{state}"
[didit]
base_url = "http://127.0.0.1:1"
application_id = "{ISSUER_APP}"
api_key_file = "{dir}/api.key"
[amqp]
url = "amqp://guest:hunter2@127.0.0.1:5672/%2f"
[issuer]
enabled = true
signing_key_file = "{dir}/signing.key"
[[issuer.partners]]
name = "sponsor-bank"
application_id = "{PARTNER_APP}"
ttl_seconds = {ttl}
statuses = ["Approved", "IN_REVIEW"]
[receiver]
enabled = true
workflow_user = "9f9b1234-aaaa-bbbb-cccc-1234567890ab"
[[receiver.issuers]]
name = "fintech-a"
application_id = "{PARTNER_APP}"
public_key = "{public}"
"#,
        state = dir.join("state").display(),
        dir = dir.display(),
        public = key.verifying_key().to_base64(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn check_config(path: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_partner-bridge"));
    cmd.arg("check-config").arg("--config").arg(path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn valid_config_prints_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), 3600);
    let (code, stdout, stderr) = check_config(
        &path,
        &[("PARTNER_BRIDGE__DIDIT__API_KEY", "env_secret_key_123")],
    );
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(stdout.contains("sponsor-bank"));
    assert!(
        stdout.contains("amqp://guest:***@127.0.0.1:5672/%2f"),
        "{stdout}"
    );
    for secret in ["hunter2", "env_secret_key_123", "sk_test_super_secret_key"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} leaked"
        );
    }
}

#[test]
fn ttl_out_of_bounds_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for ttl in [59, 86_401] {
        let path = write_valid(dir.path(), ttl);
        let (code, _, stderr) = check_config(&path, &[]);
        assert_eq!(code, 64, "ttl {ttl}: {stderr}");
        assert!(
            stderr.contains("issuer.partners[0].ttl_seconds"),
            "{stderr}"
        );
        assert!(stderr.contains(&ttl.to_string()), "{stderr}");
    }
}

#[test]
fn missing_key_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), 3600);
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "workflow_user = \"9f9b1234-aaaa-bbbb-cccc-1234567890ab\"\n",
        "",
    );
    std::fs::write(&path, text).unwrap();
    let (code, _, stderr) = check_config(&path, &[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("receiver.workflow_user"), "{stderr}");

    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(&format!("application_id = \"{ISSUER_APP}\"\n"), "");
    std::fs::write(&path, text).unwrap();
    let (code, _, stderr) = check_config(&path, &[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("didit.application_id"), "{stderr}");
}

#[test]
fn unreadable_secret_file_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), 3600);
    std::fs::remove_file(dir.path().join("api.key")).unwrap();
    let (code, _, stderr) = check_config(&path, &[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("didit.api_key_file"), "{stderr}");

    let path = write_valid(dir.path(), 3600);
    std::fs::remove_file(dir.path().join("signing.key")).unwrap();
    let (code, _, stderr) = check_config(&path, &[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("issuer.signing_key_file"), "{stderr}");
}

#[test]
fn unknown_and_mistyped_keys_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), 3600);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("[amqp]\n", "[amqp]\nprefetsh = 10\n");
    std::fs::write(&path, text).unwrap();
    let (code, _, stderr) = check_config(&path, &[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("prefetsh"), "{stderr}");

    let path = write_valid(dir.path(), 3600);
    let (code, _, stderr) = check_config(&path, &[("PARTNER_BRIDGE__RETRY__INITIAL_MS", "soon")]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("retry.initial_ms"), "{stderr}");

    let (code, _, stderr) = check_config(&dir.path().join("nope.toml"), &[]);
    assert_eq!(code, 64, "{stderr}");
}

#[test]
fn environment_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), 3600);
    let env: HashMap<String, String> = [
        ("PARTNER_BRIDGE__AMQP__PREFIX", "acme-bridge"),
        ("PARTNER_BRIDGE__AMQP__PREFETCH", "7"),
        ("PARTNER_BRIDGE__DIDIT__API_KEY", "12345"),
        ("UNRELATED", "x"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let config = Config::load(Some(&path), env).unwrap();
    config.validate().unwrap();
    assert_eq!(config.amqp.prefix, "acme-bridge");
    assert_eq!(config.amqp.prefetch, 7);
    assert_eq!(
        config.didit.api_key.as_ref().map(|k| k.expose()),
        Some("12345")
    );
    assert_eq!(
        config.ledger_url().expose(),
        format!(
            "sqlite://{}",
            dir.path().join("state/ledger.sqlite3").display()
        )
    );
}

#[test]
fn a_partner_status_must_be_finished() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), 3600);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"IN_REVIEW\"", "\"In Progress\"");
    let config = Config::from_toml(&text).unwrap();
    let err = config.validate().unwrap_err();
    assert_eq!(err.key, "issuer.partners[0].statuses[1]");
}

/// The `error: ` lines of a failed command's stderr.
fn error_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .map(str::to_string)
        .collect()
}

/// Rewrites the config file at `path` with `edit`.
fn edit(path: &Path, edit: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(path).unwrap();
    std::fs::write(path, edit(text)).unwrap();
}

#[test]
fn a_didit_base_url_with_a_path_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), 3600);
    edit(&path, |t| {
        t.replace(
            "base_url = \"http://127.0.0.1:1\"",
            "base_url = \"https://verification.didit.me/v3\"",
        )
    });
    let (code, _, stderr) = check_config(&path, &[]);
    assert_eq!(code, 64, "{stderr}");
    assert_eq!(
        error_lines(&stderr),
        [
            "error: invalid configuration: `didit.base_url`: must be the API origin without a path (got \"https://verification.didit.me/v3\"): the client appends /v3/... itself; use \"https://verification.didit.me\""
        ],
        "{stderr}"
    );
    // A trailing slash is no path.
    let path = write_valid(dir.path(), 3600);
    edit(&path, |t| {
        t.replace(
            "base_url = \"http://127.0.0.1:1\"",
            "base_url = \"http://127.0.0.1:1/\"",
        )
    });
    let (code, _, stderr) = check_config(&path, &[]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn check_config_reports_every_problem_at_once_with_full_key_paths() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), 59);
    edit(&path, |t| {
        t.replace("[amqp]\n", "[amqp]\nprefetch = 0\n").replace(
            "statuses = [\"Approved\", \"IN_REVIEW\"]\n",
            "statuses = [\"Approved\", \"IN_REVIEW\"]\nstatuse = [\"Declined\"]\n",
        )
    });
    let (code, _, stderr) = check_config(&path, &[]);
    assert_eq!(code, 64, "{stderr}");
    assert_eq!(
        error_lines(&stderr),
        [
            "error: invalid configuration: `issuer.partners[0].statuse`: unknown key; did you mean `issuer.partners[0].statuses`? (unknown field `statuse`, expected one of `name`, `application_id`, `ttl_seconds`, `statuses`, `session_kinds`, `share_vendor_data`, `public_keys`, `public_key_files`, `tokens_url`, `tokens_url_file`, `agreement_id`)",
            "error: invalid configuration: `amqp.prefetch`: must be at least 1",
            "error: invalid configuration: `issuer.partners[0].ttl_seconds`: must be between 60 and 86400 (got 59)",
        ],
        "{stderr}"
    );
}

#[test]
fn empty_and_missing_secret_files_are_refused_naming_key_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), 3600);
    std::fs::write(dir.path().join("api.key"), "\n").unwrap();
    std::fs::write(dir.path().join("signing.key"), "").unwrap();
    let (code, _, stderr) = check_config(&path, &[]);
    assert_eq!(code, 64, "{stderr}");
    let d = dir.path().display();
    assert_eq!(
        error_lines(&stderr),
        [
            format!(
                "error: invalid configuration: `didit.api_key_file`: the API key: {d}/api.key is empty"
            ),
            format!(
                "error: invalid configuration: `issuer.signing_key_file`: {d}/signing.key is empty"
            ),
        ],
        "{stderr}"
    );

    let path = write_valid(dir.path(), 3600);
    std::fs::remove_file(dir.path().join("api.key")).unwrap();
    let (code, _, stderr) = check_config(&path, &[]);
    assert_eq!(code, 64, "{stderr}");
    assert_eq!(
        error_lines(&stderr),
        [format!(
            "error: invalid configuration: `didit.api_key_file`: the API key: cannot read {d}/api.key: No such file or directory (os error 2)"
        )],
        "{stderr}"
    );
}

#[test]
fn booleans_are_strict_in_the_file_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), 3600);
    edit(&path, |t| {
        t.replace(
            "[receiver]\nenabled = true\n",
            "[receiver]\nenabled = true\nallow_unsigned = \"yes\"\n",
        )
    });
    let (code, _, stderr) = check_config(
        &path,
        &[
            ("PARTNER_BRIDGE__ISSUER__ALLOW_UNSIGNED_RESHARE", "1"),
            ("PARTNER_BRIDGE__RECEIVER__RESULTS_QUEUE", "yes"),
        ],
    );
    assert_eq!(code, 64, "{stderr}");
    let mut lines = error_lines(&stderr);
    lines.sort();
    assert_eq!(
        lines,
        [
            "error: invalid configuration: `issuer.allow_unsigned_reshare`: invalid type: integer `1`, expected true or false (unquoted) (set by environment variable PARTNER_BRIDGE__ISSUER__ALLOW_UNSIGNED_RESHARE)",
            "error: invalid configuration: `receiver.allow_unsigned`: invalid type: string \"yes\", expected true or false (unquoted)",
            "error: invalid configuration: `receiver.results_queue`: invalid type: string \"yes\", expected true or false (unquoted) (set by environment variable PARTNER_BRIDGE__RECEIVER__RESULTS_QUEUE)",
        ],
        "{stderr}"
    );

    // `true` and `false` still work from the environment.
    let path = write_valid(dir.path(), 3600);
    let (code, stdout, stderr) = check_config(
        &path,
        &[("PARTNER_BRIDGE__RECEIVER__RESULTS_QUEUE", "false")],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("results_queue = false"), "{stdout}");
}

#[test]
fn every_boolean_key_is_strict() {
    // Guards keys added later: every boolean of a full configuration refuses "yes".
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), 3600);
    let text = std::fs::read_to_string(&path).unwrap()
        + "[issuer.webhook]\nlisten = \"127.0.0.1:0\"\nsecret = \"s\"\n";
    let config = Config::from_toml(&text).unwrap();
    let value: toml::Value = toml::Value::try_from(&config).unwrap();
    fn walk(prefix: &str, value: &toml::Value, out: &mut Vec<String>) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    walk(&format!("{prefix}{k}."), v, out);
                }
            }
            toml::Value::Array(items) => {
                if let Some(first) = items.first().filter(|f| f.is_table()) {
                    walk(prefix, first, out);
                }
            }
            toml::Value::Boolean(_) => out.push(prefix.trim_end_matches('.').to_string()),
            _ => {}
        }
    }
    let mut booleans = Vec::new();
    walk("", &value, &mut booleans);
    assert!(booleans.len() >= 10, "{booleans:?}");
    for key in booleans {
        let (section, field) = key.rsplit_once('.').unwrap();
        let header = match section {
            "issuer.partners" => {
                "[[issuer.partners]]\nname = \"x\"\napplication_id = \"y\"".to_string()
            }
            "receiver.issuers" => {
                "[[receiver.issuers]]\nname = \"x\"\napplication_id = \"y\"".to_string()
            }
            s => format!("[{s}]"),
        };
        let err = Config::from_toml(&format!("{header}\n{field} = \"yes\"\n"))
            .expect_err(&format!("{key} = \"yes\" must be refused"));
        assert!(
            err.reason.contains("expected true or false"),
            "{key}: {err}"
        );
    }
}

#[test]
fn an_environment_variable_that_matches_no_key_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_valid(dir.path(), 3600);
    let (code, _, stderr) = check_config(
        &path,
        &[
            ("PARTNER_BRIDGE_AMQP__URL", "amqp://elsewhere/%2f"),
            ("PARTNER_BRIDGE__AMQP__PREFETSH", "5"),
            ("PARTNER_BRIDGE_CONFIG", "ignored-because---config-is-given"),
            // Kubernetes' service links for a Service named partner-bridge-issuer-webhook: not mistakes.
            ("PARTNER_BRIDGE_ISSUER_WEBHOOK_SERVICE_HOST", "10.0.0.7"),
            ("PARTNER_BRIDGE_ISSUER_WEBHOOK_SERVICE_PORT", "8080"),
            ("PARTNER_BRIDGE_ISSUER_WEBHOOK_PORT", "tcp://10.0.0.7:8080"),
            (
                "PARTNER_BRIDGE_ISSUER_WEBHOOK_PORT_8080_TCP_ADDR",
                "10.0.0.7",
            ),
        ],
    );
    assert_eq!(code, 64, "{stderr}");
    assert_eq!(
        error_lines(&stderr),
        [
            "error: invalid configuration: `PARTNER_BRIDGE_AMQP__URL`: environment variable matches no configuration key: overrides are named PARTNER_BRIDGE__SECTION__KEY, with two underscores between the parts; did you mean PARTNER_BRIDGE__AMQP__URL (for `amqp.url`)?",
            "error: invalid configuration: `amqp.prefetsh`: unknown key; did you mean `amqp.prefetch`? (unknown field `prefetsh`, expected one of `url`, `urls`, `url_file`, `prefix`, `prefetch`, `confirm_timeout_ms`, `delivery_limit`, `retry_delay_ms`, `retry_queue_type`, `max_message_bytes`, `heartbeat_s`) (set by environment variable PARTNER_BRIDGE__AMQP__PREFETSH)",
        ],
        "{stderr}"
    );
}

/// A cluster's node list (issue #11 item 4): a bad node names its place in `amqp.urls`, `url` and `urls` together
/// are refused, a comma list in `url` is checked element by element, a valid list prints every node redacted, and
/// `amqp.retry_queue_type` takes only `classic` or `quorum`.
#[test]
fn cluster_node_lists_are_checked_per_node() {
    let dir = tempfile::tempdir().unwrap();
    let url = "url = \"amqp://guest:hunter2@127.0.0.1:5672/%2f\"";
    let cases = [
        (
            "urls = [\"amqp://guest:hunter2@n1:5672/%2f\", \"http://n2:5672/\"]",
            "`amqp.urls[1]`",
        ),
        (
            "url = \"amqp://a\"\nurls = [\"amqp://guest:hunter2@n1:5672/%2f\"]",
            "`amqp.urls`",
        ),
        (
            "url = \"amqp://guest:hunter2@n1/%2f,amqp://guest:hunter2@n2/%2f, ftp://n3/\"",
            "`amqp.url[2]`",
        ),
        (
            "url = \"amqp://n1/\"\nretry_queue_type = \"mirrored\"",
            "`amqp.retry_queue_type`",
        ),
    ];
    for (replacement, key) in cases {
        let path = write_valid(dir.path(), 3600);
        edit(&path, |t| t.replace(url, replacement));
        let (code, _, stderr) = check_config(&path, &[]);
        assert_eq!(code, 64, "{replacement}: {stderr}");
        assert!(stderr.contains(key), "{replacement}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
    let path = write_valid(dir.path(), 3600);
    edit(&path, |t| {
        t.replace(
            url,
            "urls = [\"amqp://guest:hunter2@n1:5672/%2f\", \"amqp://guest:hunter2@n2:5672/%2f\"]\nretry_queue_type = \"quorum\"",
        )
    });
    let (code, stdout, stderr) = check_config(&path, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("amqp://guest:***@n1:5672/%2f")
            && stdout.contains("amqp://guest:***@n2:5672/%2f"),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2"), "{stdout}");
}
