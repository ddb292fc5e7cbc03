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
    /// The last error, which is either not retryable or would need a wait past the deadline. When the last try
    /// only found no room in the rate limit ([`DiditError::is_pacing`]) after an earlier try of the same call had
    /// failed for real, this is that real failure: the delivery did fail, and its attempt counts.
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
///
/// Waiting for the rate limit is not a failure, but it must not hide one either: a call that failed (a 5xx, a
/// timeout) and then ran out of hold while waiting for the limiter reports the failure, so a Didit that keeps
/// failing uses up `max_attempts` and is dead-lettered instead of cycling through the retry queue for ever.
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
    let mut failed_for_real: Option<DiditError> = None;
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
            if !e.is_pacing() {
                failed_for_real = Some(e.clone());
            }
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
        Err(e) if e.is_pacing() => Err(Failure::Didit(failed_for_real.unwrap_or(e))),
        Err(e) => Err(Failure::Didit(e)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;

    /// Runs `with_backoff` over a scripted sequence of answers and returns its result and the number of calls.
    async fn script(answers: Vec<Result<u32, DiditError>>) -> (Result<u32, Failure>, usize) {
        let config = RetryConfig {
            initial_ms: 1,
            max_ms: 2,
            ..RetryConfig::default()
        };
        let answers = Mutex::new(VecDeque::from(answers));
        let calls = Mutex::new(0);
        let result = with_backoff(
            &config,
            Instant::now() + Duration::from_secs(5),
            "share",
            &Arc::new(Metrics::new()),
            &CancellationToken::new(),
            || {
                *calls.lock().unwrap() += 1;
                let answer = answers.lock().unwrap().pop_front().expect("scripted");
                async move { answer }
            },
        )
        .await;
        (result, calls.into_inner().unwrap())
    }

    fn paced() -> DiditError {
        DiditError::Paced {
            wait: Duration::from_secs(30),
        }
    }

    #[tokio::test]
    async fn a_failure_is_not_hidden_by_the_limiter_wait_that_ends_the_hold() {
        let (result, calls) =
            script(vec![Err(DiditError::Server { status: 503 }), Err(paced())]).await;
        assert_eq!(calls, 2);
        assert!(
            matches!(
                result,
                Err(Failure::Didit(DiditError::Server { status: 503 }))
            ),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn waiting_for_the_limiter_alone_is_reported_as_pacing() {
        let (result, calls) = script(vec![Err(paced())]).await;
        assert_eq!(calls, 1);
        assert!(matches!(result, Err(Failure::Didit(e)) if e.is_pacing()));
    }

    #[tokio::test]
    async fn a_later_real_failure_or_a_success_wins() {
        let (result, _) = script(vec![Err(DiditError::Timeout), Ok(7)]).await;
        assert!(matches!(result, Ok(7)));
        let (result, _) = script(vec![
            Err(DiditError::Timeout),
            Err(DiditError::Server { status: 502 }),
            Err(DiditError::ImportRejected {
                code: None,
                detail: None,
            }),
        ])
        .await;
        assert!(
            matches!(
                result,
                Err(Failure::Didit(DiditError::ImportRejected { .. }))
            ),
            "{result:?}"
        );
    }
}
