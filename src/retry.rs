//! In-process retries of Didit calls with `backon`: exponential backoff with jitter between `retry.initial_ms` and
//! `retry.max_ms`, or exactly the wait Didit asked for (`Retry-After`, `X-RateLimit-Reset`), but never past the
//! delivery's hold deadline (`retry.hold_max_s` from when the delivery arrived): a quorum queue times out unacked
//! deliveries, so longer waits go through the `.retry` queue instead. Only errors whose disposition is `Retry` are
//! retried; everything else returns at once for the caller's decision table.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::RetryConfig;
use crate::didit::error::{DiditError, Disposition};
use crate::metrics::Metrics;

/// Why a call with retries did not succeed.
#[derive(Debug)]
pub enum Failure {
    /// The last error, which is either not retryable or would need a wait past the deadline.
    Didit(DiditError),
    /// Shutdown began while waiting to retry: hand the message back.
    Shutdown,
}

/// What a consumer does with a call that did not succeed, by the error's disposition (a pacing wait defers without
/// counting an attempt); `unexpected` decides for an answer the call does not expect (`Duplicate`, `Reshare`).
pub(crate) fn decision_for(
    failure: Failure,
    detail: impl FnOnce(&DiditError) -> String,
    unexpected: impl FnOnce(String) -> crate::amqp::consumer::Decision,
) -> crate::amqp::consumer::Decision {
    use crate::amqp::consumer::Decision;
    let e = match failure {
        Failure::Shutdown => return Decision::Requeue,
        Failure::Didit(e) => e,
    };
    let detail = detail(&e);
    match e.disposition() {
        Disposition::Retry { .. } if e.is_pacing() => Decision::Defer {
            detail,
            headers: Vec::new(),
        },
        Disposition::Retry { .. } => Decision::Retry {
            detail,
            headers: Vec::new(),
        },
        Disposition::Pause { reason } => Decision::Pause { reason, detail },
        Disposition::DeadLetter { reason } => Decision::DeadLetter { reason, detail },
        Disposition::Duplicate | Disposition::Reshare => unexpected(detail),
    }
}

/// Runs `call` until it succeeds, fails for good, or the next wait would end after `deadline`.
pub async fn with_backoff<T, F, Fut>(
    config: &RetryConfig,
    deadline: Instant,
    operation: &'static str,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
    call: F,
) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DiditError>>,
{
    let backoff = ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(config.initial())
        .with_max_delay(config.max())
        .without_max_times();
    let retried = call
        .retry(backoff)
        .when(|e: &DiditError| matches!(e.disposition(), Disposition::Retry { .. }))
        .adjust(|e: &DiditError, planned: Option<Duration>| {
            let wait = match e.disposition() {
                Disposition::Retry { after: Some(after) } => Some(after),
                _ => planned,
            }?;
            // Stop retrying once shutdown began; an in-flight call is never cut off (an import that Didit has
            // done must be recorded), only further attempts are skipped.
            (!shutdown.is_cancelled() && Instant::now() + wait <= deadline).then_some(wait)
        })
        .notify(|e: &DiditError, wait: Duration| {
            metrics.retry(operation);
            tracing::debug!(operation, error = %e, wait_ms = wait.as_millis() as u64, "retrying Didit call");
        });
    match retried.await {
        Ok(value) => Ok(value),
        Err(e)
            if shutdown.is_cancelled() && matches!(e.disposition(), Disposition::Retry { .. }) =>
        {
            Err(Failure::Shutdown)
        }
        Err(e) => Err(Failure::Didit(e)),
    }
}
