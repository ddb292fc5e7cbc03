//! Helpers shared by the integration tests: unique names, the broker URL, and waiting for a condition with a
//! deadline instead of sleeping.
#![allow(dead_code)]

pub mod bridge;
pub mod faults;
pub mod pg_ledger;
pub mod pg_tls;
pub mod proxy;
pub mod rabbit_nodes;
pub mod stub_didit;
pub mod t_receiver;
pub mod webhooks;

use std::future::Future;
use std::process::Command;
use std::time::{Duration, Instant};

/// Whether the tests run as root (helpers that start servers then run them as their service users).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Starts a detached watcher that runs the shell commands `cleanup` once this test process is gone, however it
/// ended (finished, panicked or killed): how servers the tests start for themselves are always stopped.
pub fn on_exit(cleanup: &str, what: &str) {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {cleanup}",
        pid = std::process::id()
    );
    // `setsid -f`: in a session of its own (a Ctrl-C to the tests' process group does not reach it), forked off so
    // that this returns at once.
    let status = Command::new("setsid")
        .args(["-f", "sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("start the watcher that stops {what}: {e}"));
    assert!(status.success(), "setsid -f: {status}");
}

/// Runs `cmd`, failing the test with `what` and the command's output when it fails.
pub fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The broker every test uses (override with `PB_TEST_AMQP_URL`).
pub fn amqp_url() -> String {
    std::env::var("PB_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// A prefix no other test (or earlier run) uses: `pbt-<name>-<random>`.
pub fn unique_prefix(name: &str) -> String {
    format!(
        "pbt-{name}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Polls `check` until it returns `Some`, failing the test with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
