//! Helpers for webhook intake tests: signed Didit `status.updated` bodies and their headers (all three signatures,
//! computed with the crate's own `didit::signature`), posting a delivery's exact bytes, configurations with an
//! `[issuer.webhook]` intake (in-process, or for the real binary on a fixed port), and a read-only look into the
//! binary's SQLite ledger.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use partner_bridge::didit::signature;
use serde_json::{Value, json};

use super::bridge::World;
use super::faults::{both_toml, free_port, set_key, tuned};

/// The webhook secret of every configuration written here.
pub const SECRET: &str = "whsec-webhook-edges";

/// The `[issuer.webhook]` section with every signature accepted.
pub fn intake_section(listen: &str) -> String {
    format!(
        "\n[issuer.webhook]\nlisten = \"{listen}\"\nsecret = \"{SECRET}\"\naccept_raw_signature = true\n\
         accept_simple_signature = true\n"
    )
}

/// Both roles in one process with the intake on `127.0.0.1:0`, for `World::start`.
pub fn both_with_intake(world: &World) -> String {
    format!("{}{}", both_toml(world), intake_section("127.0.0.1:0"))
}

/// A configuration file for the real binary: both roles, AMQP through `amqp_url`, admin and webhook intake on free
/// ports, confirms given `confirm_timeout_ms`. Returns the file, the admin address and the intake address.
pub fn binary_config_with_intake(
    world: &World,
    amqp_url: &str,
    confirm_timeout_ms: u64,
) -> (PathBuf, SocketAddr, SocketAddr) {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let intake: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let toml = tuned(&both_toml(world), amqp_url, 4);
    let toml = set_key(&toml, "listen", &format!("\"{admin}\""));
    let toml = set_key(&toml, "confirm_timeout_ms", &confirm_timeout_ms.to_string());
    let toml = set_key(&toml, "grace_s", "5");
    let toml = set_key(&toml, "level", "\"info\"");
    // After `set_key("listen")`, which would also move the intake's address onto the admin port.
    let toml = format!("{toml}{}", intake_section(&intake.to_string()));
    let path = world.dir.path().join("bridge.toml");
    std::fs::write(&path, toml).expect("write the configuration");
    (path, admin, intake)
}

/// The issuer's SQLite ledger of a [`both_toml`] configuration.
pub fn issuer_ledger_file(world: &World) -> PathBuf {
    world.dir.path().join("issuer").join("ledger.sqlite3")
}

/// Webhook delivery keys stored in a SQLite ledger (any schema version), read-only; 0 while the file is missing.
pub fn stored_delivery_keys(path: &Path) -> i64 {
    let Ok(conn) =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return 0;
    };
    conn.query_row("SELECT count(*) FROM webhook_deliveries", [], |r| r.get(0))
        .unwrap_or(0)
}

/// A `status.updated` body as Didit sends it, with `timestamp` and `created_at` at `at` (unix seconds).
pub fn body(session_id: &str, status: &str, at: i64) -> Value {
    json!({
        "session_id": session_id,
        "status": status,
        "webhook_type": "status.updated",
        "session_kind": "user",
        "vendor_data": format!("hook-{session_id}"),
        "event_id": uuid::Uuid::new_v4().to_string(),
        "created_at": at,
        "timestamp": at,
        "decision": { "score": 98.0, "features": ["ID_VERIFICATION"] },
    })
}

/// Which signature header a delivery carries.
#[derive(Debug, Clone, Copy)]
pub enum Sig {
    /// `X-Signature-V2` over the canonical JSON.
    V2,
    /// `X-Signature` over the raw bytes.
    Raw,
    /// `X-Signature-Simple` over `timestamp:session_id:status:webhook_type`.
    Simple,
}

/// The exact bytes sent for `body`.
pub fn bytes_of(body: &Value) -> Vec<u8> {
    serde_json::to_vec(body).unwrap()
}

/// One signature header for `body` (sent as [`bytes_of`]) plus `X-Timestamp` (the body's `timestamp`, or
/// `x_timestamp` when given).
pub fn headers(body: &Value, sig: Sig, x_timestamp: Option<i64>) -> Vec<(&'static str, String)> {
    let signed = match sig {
        Sig::V2 => ("x-signature-v2", signature::sign_v2(SECRET, body)),
        Sig::Raw => ("x-signature", signature::sign_raw(SECRET, &bytes_of(body))),
        Sig::Simple => (
            "x-signature-simple",
            signature::sign_simple(
                SECRET,
                body["timestamp"]
                    .as_i64()
                    .expect("Simple signs the body's timestamp"),
                body["session_id"].as_str().unwrap(),
                body["status"].as_str().unwrap(),
                body["webhook_type"].as_str().unwrap(),
            ),
        ),
    };
    let mut out = vec![signed];
    if let Some(ts) = x_timestamp.or_else(|| body["timestamp"].as_i64()) {
        out.push(("x-timestamp", ts.to_string()));
    }
    out
}

/// An HTTP client that waits long enough for a delivery that hangs on the broker.
pub fn patient_http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("HTTP client")
}

/// Posts `bytes` with `headers` to the intake at `addr`: the status and the JSON answer, or the transport error.
pub async fn post(
    http: &reqwest::Client,
    addr: SocketAddr,
    bytes: &[u8],
    headers: &[(&'static str, String)],
) -> Result<(u16, Value), reqwest::Error> {
    let mut request = http
        .post(format!("http://{addr}/webhooks/didit"))
        .header("content-type", "application/json")
        .body(bytes.to_vec());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}
