//! Trust boundaries (issue #9): what a hostile or broken peer can do to the bridge's HTTP servers, and how Didit's
//! permission answers are classified.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use partner_bridge::didit::signature;
use partner_bridge::didit::wire::SessionKind;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::support::bridge::World;
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
