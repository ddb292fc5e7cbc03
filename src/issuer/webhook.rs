//! Didit webhooks as an event source: `POST /webhooks/didit` on its own listener (`issuer.webhook.listen`), never the
//! admin port.
//!
//! **Trust.** A delivery is trusted only after its signature verifies: `X-Signature-V2` (canonical JSON, survives
//! proxies that re-serialise), or — only where configured — `X-Signature` (raw body) or `X-Signature-Simple`
//! (`timestamp:session_id:status:webhook_type` only). A verified body whose fields do not parse (a missing
//! `session_id`, a `status` that is not a string, …) is answered 400 naming the field: Didit does not retry a 400,
//! and a 200 would tell it the event arrived.
//!
//! **Freshness comes only from signed data.** `X-Timestamp` is covered by none of Didit's three signatures
//! (didit-contract.md §9: V2 and raw sign the body alone, Simple signs the body's `timestamp`), so a captured body
//! would pass with any fresh header. The time checked against `max_skew_s` is the body's `timestamp`, or when a body
//! has none, its `created_at` (both signed by V2 and raw; Simple cannot verify without `timestamp`). A body with
//! neither is refused as `stale`, whatever `X-Timestamp` says. `X-Timestamp` is only cross-checked: present and
//! different from the body's `timestamp` is refused (Didit sends the same value in both).
//!
//! **Replays are recognised per event, not per signature header.** The delivery key is a hash of the fields every
//! accepted signature covers — `session_id`, `status`, `webhook_type` and the signed timestamp — so one capture
//! sent once with `X-Signature-V2` and once with `X-Signature` is one delivery. (`event_id` is not used: Simple does
//! not sign it.)
//!
//! **A key is final only after the broker confirmed its event** (DESIGN.md §5). The key is claimed *pending* (held by
//! this attempt, with a lease of about three confirm timeouts), the `onboarding.finished` event is published, and only
//! the broker's confirm makes the key final; a failed publish forgets the key and answers 503 so that Didit delivers
//! again. The publish and its bookkeeping run in a task of their own, so a caller that hangs up does not leave the key
//! half done. A delivery that finds:
//! - a final key is a retry of an accepted delivery: 200 `duplicate`, nothing published;
//! - a pending key whose holder is gone (its lease lapsed, or the previous run of this process died holding it —
//!   the embedded ledger voids those at start) publishes again and finalises: the earlier attempt's event may have
//!   reached the broker too, and the share ledger absorbs the duplicate event;
//! - a pending key another request is publishing right now waits up to [`BUSY_WAIT`] for it, then answers 503
//!   `busy` so that Didit retries.
//!
//! A stale delivery is never taken in for the first time, but a known one is still answered by its key: final gives
//! 200 `duplicate`, pending (it was fresh when first seen) is published again. Unfinished statuses and other event
//! types are answered 200 and ignored without touching the ledger. Every answer is counted in
//! `webhook_requests_total{outcome}`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::amqp::publisher::{Outgoing, Publisher};
use crate::amqp::{HeaderValue, Names};
use crate::didit::signature;
use crate::didit::wire::{SessionKind, SessionStatus};
use crate::envelope::{self, OnboardingFinished};
use crate::issuer::onboarding::HEADER_SOURCE;
use crate::ledger::{DeliveryClaim, Ledger};
use crate::metrics::{Metrics, pipeline};
use crate::secret::SecretSource;

/// How long a delivery waits for another request that is publishing the same event before answering 503.
pub const BUSY_WAIT: Duration = Duration::from_secs(2);

/// What the intake needs.
pub(crate) struct WebhookState {
    pub secret: SecretSource,
    /// During a rotation, the next secret (`next_secret_file`): a delivery signed with either is accepted.
    pub next_secret: Option<SecretSource>,
    pub accept_raw: bool,
    pub accept_simple: bool,
    pub max_skew_s: u64,
    pub max_body_bytes: usize,
    /// How long a pending delivery key is held before another attempt may take it over: longer than the slowest
    /// publish (opening a channel and waiting for its confirm).
    pub lease: Duration,
    pub publisher: Publisher,
    pub names: Names,
    pub ledger: Ledger,
    pub metrics: Arc<Metrics>,
}

/// The intake's routes.
pub(crate) fn router(state: Arc<WebhookState>) -> Router {
    Router::new()
        .route("/webhooks/didit", post(receive))
        .with_state(state)
}

fn answer(metrics: &Metrics, status: StatusCode, outcome: &'static str, detail: &str) -> Response {
    metrics.webhook_request(outcome);
    (
        status,
        axum::Json(json!({ "outcome": outcome, "detail": detail })),
    )
        .into_response()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// A field of a verified body that is missing or of the wrong type: answered 400 naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}` {problem}")]
pub struct FieldError {
    /// The body's field.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl FieldError {
    fn new(field: &'static str, problem: impl Into<String>) -> FieldError {
        FieldError {
            field,
            problem: problem.into(),
        }
    }

    fn response(&self, metrics: &Metrics) -> Response {
        metrics.webhook_request("malformed");
        tracing::warn!(
            field = self.field,
            "webhook refused: a signed field does not parse"
        );
        (
            StatusCode::BAD_REQUEST,
            axum::Json(
                json!({ "outcome": "malformed", "detail": self.to_string(), "field": self.field }),
            ),
        )
            .into_response()
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An optional string field (absent or null is `None`).
fn opt_str(body: &Map<String, Value>, field: &'static str) -> Result<Option<String>, FieldError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(FieldError::new(
            field,
            format!("must be a string, not {}", type_name(other)),
        )),
    }
}

/// A required, non-empty string field.
fn req_str(body: &Map<String, Value>, field: &'static str) -> Result<String, FieldError> {
    match opt_str(body, field)? {
        Some(s) if !s.trim().is_empty() => Ok(s),
        Some(_) => Err(FieldError::new(field, "is empty")),
        None => Err(FieldError::new(field, "is missing")),
    }
}

/// An optional integer field: unix seconds (an integer-valued float such as `1753630666.0` counts).
fn opt_int(body: &Map<String, Value>, field: &'static str) -> Result<Option<i64>, FieldError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
                    .map(|f| f as i64)
            })
            .map(Some)
            .ok_or_else(|| FieldError::new(field, "must be a whole number of seconds")),
        Some(other) => Err(FieldError::new(
            field,
            format!("must be a number, not {}", type_name(other)),
        )),
    }
}

/// Which signature verified (for logs).
#[derive(Debug, Clone, Copy)]
enum Verified {
    V2,
    Raw,
    Simple,
}

impl Verified {
    fn as_str(self) -> &'static str {
        match self {
            Verified::V2 => "v2",
            Verified::Raw => "raw",
            Verified::Simple => "simple",
        }
    }
}

/// The replay key of an event: a hash of the fields every accepted signature covers.
pub fn delivery_key(session_id: &str, status: &str, webhook_type: &str, signed_at: i64) -> String {
    let mut hash = Sha256::new();
    for part in [session_id, status, webhook_type] {
        hash.update(part.as_bytes());
        hash.update([0u8]);
    }
    hash.update(signed_at.to_string().as_bytes());
    format!("event:{}", hex::encode(hash.finalize()))
}

async fn receive(
    State(state): State<Arc<WebhookState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let metrics = &state.metrics;
    let _in_flight = metrics.in_flight(pipeline::ISSUER_WEBHOOK);
    let bytes = match axum::body::to_bytes(body, state.max_body_bytes).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return answer(
                metrics,
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                &format!("body larger than {} bytes", state.max_body_bytes),
            );
        }
    };
    let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let Some(fields) = value.as_object() else {
        return answer(
            metrics,
            StatusCode::BAD_REQUEST,
            "malformed",
            "body is not a JSON object",
        );
    };
    // The current secret and, during a rotation, the next one: a delivery signed with either is accepted.
    let mut secrets = Vec::with_capacity(2);
    let mut unreadable = false;
    for (which, source) in std::iter::once(("secret", &state.secret))
        .chain(state.next_secret.iter().map(|s| ("next_secret", s)))
    {
        let next = which == "next_secret";
        match source.load() {
            Ok(secret) if !secret.is_empty() => secrets.push((which, secret)),
            // No next secret yet (or any more): no rotation under way.
            Ok(_) if next => {}
            Err(e) if next && e.kind() == std::io::ErrorKind::NotFound => {}
            Ok(_) => {
                unreadable = true;
                tracing::error!(which, "the webhook secret file is empty");
            }
            Err(e) => {
                unreadable = true;
                tracing::error!(which, error = %e, "cannot read the webhook secret");
            }
        }
    }
    let check = |secret: &str| {
        if let Some(sig) = header(&headers, "x-signature-v2") {
            signature::verify_v2(secret, &value, sig).then_some(Verified::V2)
        } else if let (true, Some(sig)) = (state.accept_raw, header(&headers, "x-signature")) {
            signature::verify_raw(secret, &bytes, sig).then_some(Verified::Raw)
        } else if let (true, Some(sig)) =
            (state.accept_simple, header(&headers, "x-signature-simple"))
        {
            // Read leniently here: a field that does not parse cannot have been signed this way.
            let text = |name: &str| fields.get(name).and_then(Value::as_str);
            match (
                fields.get("timestamp").and_then(Value::as_i64),
                text("session_id"),
                text("status"),
                text("webhook_type"),
            ) {
                (Some(ts), Some(id), Some(status), Some(kind)) => {
                    signature::verify_simple(secret, ts, id, status, kind, sig)
                        .then_some(Verified::Simple)
                }
                _ => None,
            }
        } else {
            None
        }
    };
    let verified = secrets
        .iter()
        .find_map(|(which, secret)| check(secret.expose()).map(|v| (*which, v)));
    let Some((which, verified)) = verified else {
        if unreadable {
            // The delivery may be signed with the secret that cannot be read: let Didit deliver again.
            tracing::error!("webhook secret unavailable; answering 503 so Didit delivers again");
            return answer(
                metrics,
                StatusCode::SERVICE_UNAVAILABLE,
                "broker_unavailable",
                "webhook secret unavailable",
            );
        }
        tracing::warn!("webhook refused: missing or wrong signature");
        return answer(
            metrics,
            StatusCode::UNAUTHORIZED,
            "bad_signature",
            "missing or invalid signature",
        );
    };
    tracing::debug!(
        secret = which,
        signature = verified.as_str(),
        "webhook signature verified"
    );

    // From here on the body is signed: a field that does not parse is the sender's error, named in a 400.
    let common = (|| {
        Ok::<_, FieldError>((
            req_str(fields, "webhook_type")?,
            opt_int(fields, "timestamp")?,
            opt_int(fields, "created_at")?,
        ))
    })();
    let (webhook_type, body_ts, created_at) = match common {
        Ok(common) => common,
        Err(e) => return e.response(metrics),
    };
    let signed_at = match (body_ts, header(&headers, "x-timestamp")) {
        (_, Some(h)) if h.parse::<i64>().is_err() => {
            return answer(
                metrics,
                StatusCode::UNAUTHORIZED,
                "bad_signature",
                "X-Timestamp is not a number",
            );
        }
        (Some(ts), Some(h)) if h.parse::<i64>().ok() != Some(ts) => {
            return answer(
                metrics,
                StatusCode::UNAUTHORIZED,
                "bad_signature",
                "X-Timestamp does not match the signed body's timestamp",
            );
        }
        (Some(ts), _) => ts,
        // Only what the signature covers counts: `X-Timestamp` alone proves nothing about when this was sent.
        (None, _) => match created_at {
            Some(ts) => ts,
            None => {
                tracing::warn!("webhook refused: no signed timestamp in the body");
                return answer(
                    metrics,
                    StatusCode::UNAUTHORIZED,
                    "stale",
                    "the signed body carries no timestamp (X-Timestamp alone is not signed)",
                );
            }
        },
    };
    let now = Utc::now().timestamp();
    let fresh = now.abs_diff(signed_at) <= state.max_skew_s;
    let stale = |metrics: &Metrics| {
        tracing::warn!(
            timestamp = signed_at,
            now,
            "webhook refused: timestamp outside the allowed window"
        );
        answer(
            metrics,
            StatusCode::UNAUTHORIZED,
            "stale",
            &format!("timestamp is more than {} s from now", state.max_skew_s),
        )
    };

    if !matches!(
        webhook_type.as_str(),
        "status.updated" | "user.status.updated" | "business.status.updated"
    ) {
        if !fresh {
            return stale(metrics);
        }
        return answer(
            metrics,
            StatusCode::OK,
            "unsupported_type",
            "event type not used by the bridge",
        );
    }
    let parsed = (|| {
        let session_id = req_str(fields, "session_id")?;
        let status_text = req_str(fields, "status")?;
        let status = SessionStatus::parse(&status_text).ok_or_else(|| {
            FieldError::new("status", format!("is not a Didit status: {status_text:?}"))
        })?;
        let session_kind = match opt_str(fields, "session_kind")? {
            None => None,
            Some(k) => Some(SessionKind::parse(&k).ok_or_else(|| {
                FieldError::new(
                    "session_kind",
                    format!("must be user or business, not {k:?}"),
                )
            })?),
        };
        let vendor_data = opt_str(fields, "vendor_data")?;
        let event_id = opt_str(fields, "event_id")?;
        Ok::<_, FieldError>((
            session_id,
            status_text,
            status,
            session_kind,
            vendor_data,
            event_id,
        ))
    })();
    let (session_id, status_text, status, session_kind, vendor_data, event_id) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => return e.response(metrics),
    };
    if !status.is_finished() {
        if !fresh {
            return stale(metrics);
        }
        metrics.event("webhook", "ignored_unfinished");
        return answer(metrics, StatusCode::OK, "ignored", "status not finished");
    }

    let key = delivery_key(&session_id, &status_text, &webhook_type, signed_at);
    let holder = uuid::Uuid::now_v7().to_string();
    let waiting_since = tokio::time::Instant::now();
    let claim = loop {
        match state
            .ledger
            .claim_webhook(&key, &holder, state.lease, Utc::now(), fresh)
            .await
        {
            Ok(DeliveryClaim::Busy { .. }) if waiting_since.elapsed() < BUSY_WAIT => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(claim) => break claim,
            Err(e) => {
                tracing::warn!(error = %e, "ledger unavailable for replay protection; answering 503");
                return answer(
                    metrics,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "broker_unavailable",
                    "ledger unavailable",
                );
            }
        }
    };
    match claim {
        DeliveryClaim::Fresh => {}
        DeliveryClaim::Retaken => {
            tracing::info!(source_session_id = %session_id, "publishing a delivery again: an earlier attempt left it pending");
        }
        DeliveryClaim::Done => {
            tracing::info!(source_session_id = %session_id, "webhook delivery seen before and its event queued: duplicate");
            return answer(
                metrics,
                StatusCode::OK,
                "duplicate",
                "delivery already received and queued",
            );
        }
        DeliveryClaim::Busy { .. } => {
            tracing::info!(source_session_id = %session_id, "the same delivery is being queued by another request; answering 503");
            return answer(
                metrics,
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "the same delivery is being queued right now, retry later",
            );
        }
        DeliveryClaim::Unknown => return stale(metrics),
    }

    let kind = session_kind
        .or_else(|| {
            fields
                .get("decision")
                .and_then(|d| d.get("session_kind"))
                .and_then(|k| k.as_str())
                .and_then(SessionKind::parse)
        })
        .or((webhook_type == "business.status.updated").then_some(SessionKind::Business))
        .unwrap_or(SessionKind::User);
    let occurred_at = DateTime::<Utc>::from_timestamp(created_at.unwrap_or(signed_at), 0)
        .unwrap_or_else(Utc::now);
    let event = OnboardingFinished {
        kind: envelope::types::ONBOARDING_FINISHED.to_string(),
        event_id: event_id.unwrap_or_else(|| {
            format!("webhook:{session_id}:{}:{signed_at}", status.for_kind(kind))
        }),
        session_id: session_id.clone(),
        status: status.for_kind(kind).to_string(),
        session_kind: Some(kind),
        vendor_data,
        occurred_at: Some(occurred_at),
        partners: None,
    };
    // The publish and the key's bookkeeping run to the end even if Didit hangs up: a key must not stay pending only
    // because the caller went away.
    // The event carries the caller's `traceparent` (or a new trace) onward: the webhook is this organisation's
    // entry point (docs/tracing.md).
    let span = tracing::info_span!(
        "webhook",
        otel.name = "POST webhook",
        otel.kind = "server",
        http.request.method = "POST",
        source_session_id = %session_id,
    );
    let incoming = header(&headers, crate::trace::HEADER_TRACEPARENT).and_then(|tp| {
        crate::trace::TraceContext::parse(tp, header(&headers, crate::trace::HEADER_TRACESTATE))
    });
    let traced = crate::trace::begin(&span, incoming, crate::trace::Relation::Parent);
    let queued = crate::trace::scope(
        traced,
        queue_event(state.clone(), event, key, holder, verified),
    );
    let task = tokio::spawn(tracing::Instrument::instrument(queued, span));
    match task.await {
        Ok(Ok(())) => answer(metrics, StatusCode::OK, "accepted", "event queued"),
        Ok(Err(())) | Err(_) => answer(
            metrics,
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            "broker unavailable, retry later",
        ),
    }
}

/// Publishes the event of a claimed delivery key, then makes the key final (confirmed) or forgets it (not confirmed,
/// so that Didit's retry is taken in as new).
async fn queue_event(
    state: Arc<WebhookState>,
    event: OnboardingFinished,
    key: String,
    holder: String,
    verified: Verified,
) -> Result<(), ()> {
    let body = serde_json::to_vec(&event).expect("events serialise");
    let message_id = uuid::Uuid::now_v7().to_string();
    let exchange = state.names.onboarding_exchange();
    let published = state
        .publisher
        .publish(Outgoing {
            exchange: &exchange,
            routing_key: envelope::types::ONBOARDING_FINISHED,
            body: &body,
            message_id: &message_id,
            kind: envelope::types::ONBOARDING_FINISHED,
            headers: vec![(
                HEADER_SOURCE.to_string(),
                HeaderValue::Str("webhook".into()),
            )],
        })
        .await;
    let session_id = &event.session_id;
    match published {
        Ok(()) => {
            state.metrics.success(pipeline::ISSUER_WEBHOOK);
            if let Err(e) = state.ledger.confirm_webhook(&key, Utc::now()).await {
                // The event is queued, so the answer is still 200; the key stays pending, and a retry of the same
                // delivery publishes once more, which the share ledger absorbs.
                tracing::warn!(error = %e, source_session_id = %session_id, "event queued but its delivery key could not be made final");
            }
            tracing::info!(%message_id, source_session_id = %session_id, status = %event.status, signature = verified.as_str(), "webhook accepted");
            Ok(())
        }
        Err(e) => {
            // Forget the delivery so that Didit's retry of it is taken in as new.
            if let Err(le) = state.ledger.release_webhook(&key, &holder).await {
                tracing::warn!(error = %le, "could not forget the webhook delivery; its retry is taken in once its lease lapses");
            }
            tracing::warn!(error = %e, source_session_id = %session_id, "broker did not confirm the event; answering 503");
            Err(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn the_delivery_key_is_per_event() {
        let k = delivery_key("s", "Approved", "status.updated", 100);
        assert_eq!(k, delivery_key("s", "Approved", "status.updated", 100));
        assert!(k.starts_with("event:"));
        for other in [
            delivery_key("s", "Declined", "status.updated", 100),
            delivery_key("s", "Approved", "user.status.updated", 100),
            delivery_key("s", "Approved", "status.updated", 101),
            delivery_key("t", "Approved", "status.updated", 100),
            // The separator keeps fields from running into each other.
            delivery_key("sA", "pproved", "status.updated", 100),
        ] {
            assert_ne!(k, other);
        }
    }

    #[test]
    fn fields_are_named_when_they_do_not_parse() {
        let body = map(json!({"a": "x", "n": 5, "f": 5.0, "h": 5.5, "e": " ", "z": null}));
        assert_eq!(req_str(&body, "a").unwrap(), "x");
        assert_eq!(req_str(&body, "missing").unwrap_err().field, "missing");
        assert_eq!(req_str(&body, "z").unwrap_err().problem, "is missing");
        assert_eq!(req_str(&body, "e").unwrap_err().problem, "is empty");
        assert_eq!(
            req_str(&body, "n").unwrap_err().to_string(),
            "field `n` must be a string, not a number"
        );
        assert_eq!(opt_int(&body, "n").unwrap(), Some(5));
        assert_eq!(opt_int(&body, "f").unwrap(), Some(5));
        assert_eq!(opt_int(&body, "z").unwrap(), None);
        assert_eq!(opt_int(&body, "h").unwrap_err().field, "h");
        assert_eq!(opt_int(&body, "a").unwrap_err().field, "a");
        assert_eq!(opt_str(&body, "missing").unwrap(), None);
    }
}
