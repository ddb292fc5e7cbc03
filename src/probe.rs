//! Leaving a pause. A pipeline pauses when the fault is not in the message but in this side's setup: Didit rejects
//! the API key or its privileges (`credentials`) or the receiving workflow does not exist (`workflow_missing`).
//! Messages are parked in the retry queue meanwhile, so nothing is lost. This task watches one pipeline's pause and
//! ends it:
//! - `credentials`: re-read the key (a rotated Kubernetes secret or replaced file is picked up) and ask Didit with a
//!   cheap authenticated call, with exponential backoff; resume when the key is accepted.
//! - `ledger`: the ledger failed or did not answer in time (a PostgreSQL failover, a hung server, a locked or
//!   unwritable SQLite file), or an audit act could not be recorded (the audit log lives in the same database).
//!   Probe it with its own writability check, and the audit log's (an insert rolled back), with backoff (at most
//!   [`LEDGER_MAX_DELAY`] apart, so work resumes within seconds of the ledger coming back); resume when both
//!   answer. Handlers turn a ledger
//!   error into this pause through [`ledger_decision`], so that an outage costs no delivery attempt and
//!   dead-letters nothing.
//! - `workflow_missing` (and anything else): there is no cheap call that proves a workflow exists, so the probe is the
//!   real work: resume after a wait.
//!
//! Either way, a pause that comes back soon after a resume (a key that can read but lacks `write:sessions` passes
//! the cheap probe; a workflow still missing fails the real work again) doubles the wait before the next resume, up
//! to a minute, so a broken setup costs a trickle of retries rather than a storm.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::consumer::{Decision, PauseControl};
use crate::audit::AuditLog;
use crate::didit::client::DiditClient;
use crate::didit::error::Disposition;
use crate::health::Health;
use crate::ledger::{Ledger, LedgerError};

/// The pause reason (and `paused{reason}` label) of a ledger outage.
pub const LEDGER: &str = "ledger";

/// The longest wait between two probes of an unavailable ledger.
pub const LEDGER_MAX_DELAY: Duration = Duration::from_secs(5);

/// What a handler does with a message whose ledger call failed: the ledger being down or slow is not the message's
/// fault, so pause (the message waits in the retry queue without counting an attempt); damaged ledger data will not
/// heal by waiting, so that one message goes the ordinary retry way (and ends dead-lettered if it stays damaged).
pub fn ledger_decision(e: &LedgerError) -> Decision {
    if e.is_unavailable() {
        Decision::Pause {
            reason: LEDGER,
            detail: e.to_string(),
        }
    } else {
        Decision::Retry {
            detail: format!("ledger: {e}"),
            headers: Vec::new(),
        }
    }
}

const FIRST_DELAY: Duration = Duration::from_millis(500);
const MAX_DELAY: Duration = Duration::from_secs(60);
/// A resume that holds this long resets the backoff between episodes.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Watches `pause` until shutdown (a `ledger` pause probes the ledger only; see [`run_audited`]).
pub async fn run(
    pause: PauseControl,
    client: DiditClient,
    ledger: Ledger,
    pipeline: &'static str,
    shutdown: CancellationToken,
) {
    run_audited(pause, client, ledger, None, pipeline, shutdown).await
}

/// Watches `pause` until shutdown; a `ledger` pause ends when the ledger and, when given, the audit log accept
/// writes again.
pub async fn run_audited(
    pause: PauseControl,
    client: DiditClient,
    ledger: Ledger,
    audit: Option<AuditLog>,
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
        if reason == LEDGER {
            // The probe is exact (a real write), so there is no need to grow the wait between episodes.
            if !probe_ledger(&ledger, audit.as_ref(), pipeline, &shutdown).await {
                return;
            }
            tracing::info!(pipeline, reason, "ledger answers again; resuming pipeline");
            last_resume = Some(Instant::now());
            pause.resume();
            continue;
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

/// The `/readyz` part of a role's start-up check of its Didit API key.
pub fn credentials_part(role: &str) -> String {
    format!("didit_credentials:{role}")
}

/// Asks Didit at start whether `role`'s API key is accepted (the cheap authenticated probe, `GET
/// /v3/sessions/?limit=1`), so a wrong key shows in `/readyz` before the first event rather than after it.
///
/// - Accepted: nothing to report; the check ends.
/// - Refused (401/403, or an answer that pauses for `credentials`: a redirect, 402, an unreadable key): `/readyz`
///   names the role (`didit_credentials:<role>`) and an error line names where the key comes from (`source`, a
///   config key and path; never the key). The check goes on with backoff, re-reading a key file, and clears the
///   reason once the key is accepted.
/// - No answer (network, timeout, 5xx, 429): not a verdict and not fatal; tried again with backoff, readiness
///   untouched.
/// - Any other answer: Didit did not refuse the key; the check ends.
pub async fn check_key_at_start(
    client: DiditClient,
    role: &'static str,
    source: String,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let part = credentials_part(role);
    let mut delay = FIRST_DELAY;
    let mut refused = false;
    loop {
        let answer = tokio::select! {
            () = shutdown.cancelled() => return,
            answer = client.probe() => answer,
        };
        match answer {
            Ok(()) => {
                if refused {
                    tracing::info!(role, key_source = %source, "Didit accepts the API key now");
                }
                health.remove(&part);
                return;
            }
            Err(e) => match e.disposition() {
                Disposition::Pause { .. } => {
                    if !refused {
                        tracing::error!(role, key_source = %source, error = %e, "Didit refused the API key at start; the role is not ready until the key is fixed");
                    }
                    health.not_ready(
                        &part,
                        format!("Didit refused the API key from {source}: {e}"),
                    );
                    refused = true;
                }
                Disposition::Retry { .. } => {
                    tracing::warn!(role, error = %e, next_check_ms = delay.as_millis() as u64, "cannot check the Didit API key yet; trying again");
                }
                _ => {
                    tracing::info!(role, error = %e, "the API key check got an unexpected answer, but not a refusal of the key");
                    health.remove(&part);
                    return;
                }
            },
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_DELAY);
        if refused {
            match client.reload_key() {
                Ok(true) => {
                    tracing::info!(role, key_source = %source, "API key file changed; checking the new key")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(role, key_source = %source, error = %e, "cannot re-read the API key file")
                }
            }
        }
    }
}

/// Probes `ledger` (and `audit`) until a writability check succeeds; `false` on shutdown.
async fn probe_ledger(
    ledger: &Ledger,
    audit: Option<&AuditLog>,
    pipeline: &'static str,
    shutdown: &CancellationToken,
) -> bool {
    let mut delay = FIRST_DELAY / 2;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(delay) => {}
        }
        let checked = tokio::select! {
            () = shutdown.cancelled() => return false,
            checked = async {
                ledger.check_writable().await?;
                match audit {
                    Some(audit) => audit.check_writable().await,
                    None => Ok(()),
                }
            } => checked,
        };
        match checked {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(pipeline, error = %e, next_probe_ms = delay.as_millis() as u64, "ledger still unavailable")
            }
        }
        delay = (delay * 2).min(LEDGER_MAX_DELAY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unavailable_ledger_pauses_and_damage_retries() {
        for e in [
            LedgerError::Io("disk full".into()),
            LedgerError::Unavailable("no answer to claim_import within 3000 ms".into()),
        ] {
            assert!(
                matches!(ledger_decision(&e), Decision::Pause { reason: LEDGER, .. }),
                "{e:?}"
            );
        }
        assert!(matches!(
            ledger_decision(&LedgerError::Corrupt("bad kind".into())),
            Decision::Retry { .. }
        ));
    }
}
