//! Leaving a pause. A pipeline pauses when the fault is not in the message but in this side's setup: Didit rejects
//! the API key or its privileges (`credentials`) or the receiving workflow does not exist (`workflow_missing`).
//! Messages are parked in the retry queue meanwhile, so nothing is lost. This task watches one pipeline's pause and
//! ends it:
//! - `credentials`: re-read the key (a rotated Kubernetes secret or replaced file is picked up) and ask Didit with a
//!   cheap authenticated call, with exponential backoff; resume when the key is accepted.
//! - `workflow_missing` (and anything else): there is no cheap call that proves a workflow exists, so the probe is the
//!   real work: resume after a wait.
//!
//! Either way, a pause that comes back soon after a resume (a key that can read but lacks `write:sessions` passes
//! the cheap probe; a workflow still missing fails the real work again) doubles the wait before the next resume, up
//! to a minute, so a broken setup costs a trickle of retries rather than a storm.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::consumer::PauseControl;
use crate::didit::client::DiditClient;

const FIRST_DELAY: Duration = Duration::from_millis(500);
const MAX_DELAY: Duration = Duration::from_secs(60);
/// A resume that holds this long resets the backoff between episodes.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Watches `pause` until shutdown.
pub async fn run(
    pause: PauseControl,
    client: DiditClient,
    pipeline: &'static str,
    shutdown: CancellationToken,
) {
    let mut episode_delay = FIRST_DELAY;
    let mut last_resume: Option<Instant> = None;
    loop {
        let reason = tokio::select! {
            () = shutdown.cancelled() => return,
            reason = pause.wait_paused() => reason,
        };
        if last_resume.is_some_and(|t| t.elapsed() > STABLE_AFTER) {
            episode_delay = FIRST_DELAY;
        }
        tracing::warn!(
            pipeline,
            reason,
            wait_ms = episode_delay.as_millis() as u64,
            "pipeline paused; probing until it can resume"
        );
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(episode_delay) => {}
        }
        if reason == "credentials" {
            let mut delay = FIRST_DELAY;
            loop {
                match client.reload_key() {
                    Ok(true) => {
                        tracing::info!(pipeline, "API key file changed; trying the new key")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(pipeline, error = %e, "cannot re-read the API key file")
                    }
                }
                match client.probe().await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(pipeline, error = %e, next_probe_ms = delay.as_millis() as u64, "Didit still refuses the API key");
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_DELAY);
            }
        }
        episode_delay = (episode_delay * 2).min(MAX_DELAY);
        tracing::info!(pipeline, reason, "resuming pipeline");
        last_resume = Some(Instant::now());
        pause.resume();
    }
}
