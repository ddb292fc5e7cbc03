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
