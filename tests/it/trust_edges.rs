//! Trust boundaries (issue #9): what a hostile or broken peer can do to the bridge's HTTP servers, and how Didit's
//! permission answers are classified.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use partner_bridge::amqp::topology;
use partner_bridge::app;
use partner_bridge::didit::signature;
use partner_bridge::didit::wire::SessionKind;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::support::bridge::{Amqp, World};
use crate::support::faults::{Binary, free_port, set_key, showing_log};
use crate::support::wait_for;

const WEBHOOK_SECRET: &str = "whsec-trust-edges";
/// The header-read timeout the flooded binary runs with.
const HEADER_TIMEOUT_MS: u64 = 2_000;
/// Half-sent requests per listener: 1,000 in all, each listener just under its default cap of 512 so that the real
/// requests below find a free slot while every flood connection is still open.
const FLOOD_PER_LISTENER: usize = 500;
/// How long after the header timeout a flood socket may stay open before the test fails (generous: 2 shared cores).
const EOF_MARGIN: Duration = Duration::from_secs(20);
/// Resident memory the flooded binary must stay under.
const RSS_LIMIT_KIB: u64 = 64 * 1024;

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// One half-sent request: a request line and a large header that never ends (about 6 KiB, under
/// `max_header_bytes`, so it is the timeout and not the size that ends it), then one more byte every 300 ms. Returns
/// how long after the first byte the server closed the socket (EOF or reset), or `Err` when it stayed open past
/// `limit`.
async fn half_sent(
    addr: SocketAddr,
    path: &str,
    limit: Duration,
    opened: Arc<AtomicUsize>,
) -> Result<Duration, String> {
    let mut socket = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let started = Instant::now();
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nX-Pad: ").into_bytes();
    head.extend(std::iter::repeat_n(b'a', 6 * 1024));
    if socket.write_all(&head).await.is_err() {
        // Closed by the server before the head was even written: closed is what the test wants.
        return Ok(started.elapsed());
    }
    opened.fetch_add(1, Ordering::Relaxed);
    let mut buf = [0u8; 1024];
    loop {
        if started.elapsed() > limit {
            return Err(format!("{addr}{path}: still open after {limit:?}"));
        }
        tokio::select! {
            read = socket.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Ok(started.elapsed()),
                Ok(_) => {} // an error answer before the close
            },
            () = tokio::time::sleep(Duration::from_millis(300)) => {
                if socket.write_all(b"a").await.is_err() {
                    return Ok(started.elapsed());
                }
            }
        }
    }
}

/// 1,000 half-sent requests (500 at the webhook listener, 500 at the admin server) against the real binary:
/// every socket is closed by the server soon after `http.header_read_timeout_ms`, the process stays under 64 MiB
/// resident, and while every flood connection is open `/readyz` answers 200 and a correctly signed webhook is
/// accepted (200).
///
/// Old code: `axum::serve` had no header-read timeout, so no flood socket was ever closed and the test fails at
/// "still open after"; it also grew past 100 MiB with 1,200 such connections (issue #9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_half_sent_requests_is_closed_and_bounded_while_real_requests_are_answered() {
    let world = World::new("trust-flood").await;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let webhook: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let toml = set_key(&world.issuer_toml(), "listen", &format!("\"{admin}\""));
    let toml = format!(
        "{toml}
[http]
header_read_timeout_ms = {HEADER_TIMEOUT_MS}
[issuer.webhook]
listen = \"{webhook}\"
secret = \"{WEBHOOK_SECRET}\"
"
    );
    let config = world.dir.path().join("flood.toml");
    std::fs::write(&config, toml).unwrap();
    let log = world.dir.path().join("flood.log");
    // The partner's queue exists, as in production: the webhook's token is delivered, not returned unroutable (which
    // would make `/readyz` name the partner).
    let amqp = Amqp::connect().await;
    let receiver = world.config(&world.receiver_toml(false));
    topology::declare(&amqp.channel, &app::declared_topology(&receiver))
        .await
        .unwrap();
    amqp.close().await;
    let mut binary = Binary::start(&config, admin, log.clone()).await;
    let pid = binary.child.id().expect("running");
    let session = world.session(SessionKind::User, "Approved", "flood").await;

    showing_log(&log, async {
        let before = rss_kib(pid).expect("VmRSS of the binary");
        let limit = Duration::from_millis(HEADER_TIMEOUT_MS) + EOF_MARGIN;
        let opened = Arc::new(AtomicUsize::new(0));
        let mut flood = JoinSet::new();
        for i in 0..FLOOD_PER_LISTENER * 2 {
            let (addr, path) = if i % 2 == 0 {
                (webhook, "/webhooks/didit")
            } else {
                (admin, "/readyz")
            };
            flood.spawn(half_sent(addr, path, limit, Arc::clone(&opened)));
        }

        // Peak memory, sampled while the flood is open.
        let sampling = tokio::spawn(async move {
            let mut peak = 0;
            let until = Instant::now() + Duration::from_millis(HEADER_TIMEOUT_MS) + Duration::from_secs(3);
            while Instant::now() < until {
                peak = peak.max(rss_kib(pid).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        });

        wait_for(
            "most flood connections to have sent their partial head",
            Duration::from_secs(10),
            || {
                let opened = Arc::clone(&opened);
                async move { (opened.load(Ordering::Relaxed) >= FLOOD_PER_LISTENER).then_some(()) }
            },
        )
        .await;

        // Real requests while the flood holds its connections.
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let ready = http
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .expect("/readyz answers during the flood");
        assert_eq!(ready.status().as_u16(), 200, "/readyz during the flood");
        let now = chrono::Utc::now().timestamp();
        let body = json!({
            "session_id": session,
            "status": "Approved",
            "webhook_type": "status.updated",
            "session_kind": "user",
            "vendor_data": "flood",
            "event_id": uuid::Uuid::new_v4().to_string(),
            "created_at": now,
            "timestamp": now,
        });
        let hook = http
            .post(format!("http://{webhook}/webhooks/didit"))
            .header("content-type", "application/json")
            .header("x-signature-v2", signature::sign_v2(WEBHOOK_SECRET, &body))
            .header("x-timestamp", now.to_string())
            .body(serde_json::to_vec(&body).unwrap())
            .send()
            .await
            .expect("the webhook answers during the flood");
        assert_eq!(
            hook.status().as_u16(),
            200,
            "a signed webhook during the flood"
        );

        let mut closed_after = Vec::new();
        while let Some(joined) = flood.join_next().await {
            match joined.expect("flood task") {
                Ok(after) => closed_after.push(after),
                Err(open) => panic!("{open}"),
            }
        }
        let peak = sampling.await.unwrap();
        let slowest = closed_after.iter().max().copied().unwrap_or_default();
        eprintln!(
            "flood: {} sockets closed by the server, slowest after {slowest:?}; VmRSS {before} KiB before, peak {peak} KiB",
            closed_after.len()
        );
        assert_eq!(closed_after.len(), FLOOD_PER_LISTENER * 2);
        assert!(
            peak < RSS_LIMIT_KIB,
            "the binary reached {peak} KiB resident under the flood (limit {RSS_LIMIT_KIB} KiB)"
        );
        // Still serving after the flood.
        let after = http.get(format!("http://{admin}/readyz")).send().await.unwrap();
        assert_eq!(after.status().as_u16(), 200);
    })
    .await;

    binary.terminate();
    let status = binary.exited_within(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}");
    world.cleanup().await;
}

// ---- 403 classification through the real client ----------------------------------------------------------------

const APP: &str = "0b6f3a52-8f7e-4b59-9a43-5d1f0c2e7a11";
const OTHER_APP: &str = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d";
const SESSION: &str = "20bb3c3b-6146-439f-84a4-bd30d00ac6a2";
const DRF_403: &str = "You do not have permission to perform this action.";

/// A JWT-shaped share token naming `for_application_id` (the signature is not checked by anyone here).
fn share_token(for_application_id: &str) -> String {
    use base64::Engine;
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let now = chrono::Utc::now().timestamp();
    format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(json!({"alg": "HS256", "typ": "JWT"})),
        b64(json!({
            "session_id": SESSION, "session_kind": "user", "from_application_id": OTHER_APP,
            "for_application_id": for_application_id, "iat": now - 60, "exp": now + 600,
        }))
    )
}

/// Django REST framework's default 403 text, sent by a scripted Didit for share and for import (with a token for
/// this application), pauses with `credentials` instead of dead-lettering as `forbidden`; "already imported" stays
/// a duplicate and "not intended for your application" a dead letter.
///
/// Old code: the import 403 with this text (no key word in it, the token for this application) was
/// `Forbidden`, i.e. `DeadLetter("forbidden")`, and this test failed at its first import assertion.
#[tokio::test]
async fn drf_permission_403_pauses_share_and_import_through_the_client() {
    use partner_bridge::config::DiditAccess;
    use partner_bridge::didit::client::{DiditClient, Disposition};
    use partner_bridge::didit::wire::ImportRequest;
    use partner_bridge::metrics::Metrics;
    use partner_bridge::secret::{Secret, SecretSource, ShareToken};

    use crate::support::stub_didit::{Reply, Route, StubDidit};

    let stub = StubDidit::start().await;
    let client = DiditClient::new(
        &DiditAccess {
            base_url: stub.url(),
            application_id: APP.to_string(),
            api_key: SecretSource::Inline(Secret::new("sk_test_trust_edges")),
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
        },
        Arc::new(Metrics::new()),
    )
    .expect("client");
    let import = |text: &str| {
        stub.set(Route::Import, Reply::detail(403, text));
        let request = ImportRequest {
            share_token: ShareToken::new(share_token(APP)),
            workflow_id: "9f9b1234-aaaa-4bbb-8ccc-1234567890ab".into(),
            vendor_data: None,
            trust_review: false,
        };
        let client = &client;
        async move {
            client
                .import(&request)
                .await
                .expect_err("the import fails")
                .disposition()
        }
    };
    let pause = Disposition::Pause {
        reason: "credentials",
    };

    assert_eq!(import(DRF_403).await, pause, "import: {DRF_403}");
    stub.set(Route::Share, Reply::detail(403, DRF_403));
    let share = client
        .share(SESSION, OTHER_APP, 600)
        .await
        .expect_err("the share fails");
    assert_eq!(share.disposition(), pause, "share: {DRF_403}");
    assert_eq!(
        import("Session has already been imported.").await,
        Disposition::Duplicate
    );
    assert_eq!(
        import("Token not intended for your application.").await,
        Disposition::DeadLetter {
            reason: "misrouted"
        }
    );
}

// ---- compose: who holds which key, where the sandbox is reachable ------------------------------------------

/// The lines of one top-level entry of a compose section (`services:` → `  name:` and its indented lines).
fn compose_block<'a>(text: &'a str, section: &str, name: &str) -> Vec<&'a str> {
    let mut in_section = false;
    let mut block = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() && !line.starts_with('#') {
            in_section = line.trim_end() == format!("{section}:");
            inside = false;
            continue;
        }
        if !in_section {
            continue;
        }
        if line.starts_with("  ") && !line.starts_with("   ") && !line.trim_start().starts_with('#')
        {
            inside = line.trim() == format!("{name}:");
            continue;
        }
        if inside {
            block.push(line);
        }
    }
    assert!(!block.is_empty(), "compose.yaml has no {section}.{name}");
    block
}

/// deploy/compose.yaml gives no container a key it does not use: only the issuer (and keygen, which writes it)
/// mounts the signing-key volume; the receiver mounts the public-key volume; the sandbox (test-only control routes)
/// publishes no port and sits only on an internal network with the two bridges.
///
/// Old file: the receiver mounted the shared `keys` volume holding `signing.key`, and the sandbox published 8089
/// to the host on the default network; both assertions below failed.
#[test]
fn compose_gives_no_container_a_key_it_does_not_need() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/compose.yaml"),
    )
    .unwrap();
    let mounts = |service: &str| -> String {
        compose_block(&text, "services", service)
            .into_iter()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| l.split(" #").next().unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for service in ["receiver", "sandbox", "rabbitmq", "prometheus", "grafana"] {
        let block = mounts(service);
        assert!(
            !block.contains("issuer-signing-key") && !block.contains("keys:/"),
            "{service} must not mount the issuer's signing key:\n{block}"
        );
        assert!(
            !block.contains("didit-webhook-secret") && !block.contains("fintech-a-didit-api-key"),
            "{service} must not get the issuer's secrets:\n{block}"
        );
    }
    assert!(mounts("receiver").contains("issuer-public-key:/etc/partner-bridge/keys:ro"));
    assert!(mounts("issuer").contains("issuer-signing-key:/etc/partner-bridge/keys:ro"));
    assert!(!mounts("issuer").contains("sponsor-bank-didit-api-key"));
    let sandbox = mounts("sandbox");
    assert!(
        !sandbox.contains("ports:"),
        "the sandbox publishes nothing:\n{sandbox}"
    );
    assert!(sandbox.contains("networks: [sandbox]"), "{sandbox}");
    let network = compose_block(&text, "networks", "sandbox").join("\n");
    assert!(network.contains("internal: true"), "{network}");
}

// ---- [http] validation ---------------------------------------------------------------------------------------

/// Each `[http]` bound refuses a value that would disable it or that hyper cannot take (a read buffer under
/// 8192 bytes panics): `check-config` exits 64 naming the key.
#[test]
fn http_bounds_out_of_range_exit_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = partner_bridge::envelope::SigningKey::generate();
    let state = format!("state_dir = \"{}\"", dir.path().join("state").display());
    let base = format!(
        r#"
[didit]
base_url = "http://127.0.0.1:1"
application_id = "{APP}"
api_key = "sk_test_trust_edges"
[issuer]
enabled = true
signing_key = "{key}"
[[issuer.partners]]
name = "sponsor-bank"
application_id = "{OTHER_APP}"
ttl_seconds = 600
statuses = ["Approved"]
"#,
        key = key.to_base64(),
    );
    let run = |extra: &str| {
        let path = dir.path().join("config.toml");
        // [http] before the issuer's tables, so its keys do not land in [[issuer.partners]].
        std::fs::write(&path, format!("{state}\n[http]\n{extra}\n{base}")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_partner-bridge"))
            .args(["check-config", "--config"])
            .arg(&path)
            .env_remove("PARTNER_BRIDGE_CONFIG")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(run("").0, 0, "the defaults are valid: {}", run("").1);
    for (line, key) in [
        ("header_read_timeout_ms = 0", "http.header_read_timeout_ms"),
        ("request_timeout_ms = 0", "http.request_timeout_ms"),
        ("idle_timeout_ms = 0", "http.idle_timeout_ms"),
        ("max_connections = 0", "http.max_connections"),
        ("max_header_bytes = 4096", "http.max_header_bytes"),
        ("max_header_bytes = 2000000", "http.max_header_bytes"),
    ] {
        let (code, stderr) = run(line);
        assert_eq!(code, 64, "{line}: {stderr}");
        assert!(stderr.contains(key), "{line}: {stderr}");
    }
}
