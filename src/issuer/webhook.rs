//! Didit webhooks as an event source: `POST /webhooks/didit` on its own listener (`issuer.webhook.listen`), never the
//! admin port.
//!
//! A delivery is trusted only after its signature verifies: `X-Signature-V2` (canonical JSON, survives proxies that
//! re-serialise), or — only where configured — `X-Signature` (raw body) or `X-Signature-Simple` (a few fields). Its
//! timestamp must be within `max_skew_s` of now, and a delivery seen before is refused (the replay key is the hash
//! of the verified signature, kept in the ledger so replicas share it). A `status.updated` with a finished status
//! becomes an `onboarding.finished` event; the 200 goes out only after the broker confirmed that event, and when
//! the broker is down the answer is 503 so that Didit delivers again. Unfinished statuses and other event types are
//! answered 200 and ignored. Every answer is counted in `webhook_requests_total{outcome}`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::amqp::publisher::{Outgoing, Publisher};
use crate::amqp::{HeaderValue, Names};
use crate::didit::signature;
use crate::didit::wire::{SessionKind, SessionStatus, WebhookPayload};
use crate::envelope::{self, OnboardingFinished};
use crate::issuer::onboarding::HEADER_SOURCE;
use crate::ledger::Ledger;
use crate::metrics::{Metrics, pipeline};
use crate::secret::SecretSource;

/// What the intake needs.
pub(crate) struct WebhookState {
    pub secret: SecretSource,
    pub accept_raw: bool,
    pub accept_simple: bool,
    pub max_skew_s: u64,
    pub max_body_bytes: usize,
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

/// Which signature verified.
enum Verified {
    V2(String),
    Raw(String),
    Simple(String),
}

impl Verified {
    fn replay_key(&self) -> String {
        let (kind, sig) = match self {
            Verified::V2(s) => ("v2", s),
            Verified::Raw(s) => ("raw", s),
            Verified::Simple(s) => ("simple", s),
        };
        format!(
            "{kind}:{}",
            hex::encode(Sha256::digest(sig.to_ascii_lowercase().as_bytes()))
        )
    }
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
    let value: Value = match serde_json::from_slice(&bytes) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return answer(
                metrics,
                StatusCode::BAD_REQUEST,
                "malformed",
                "body is not a JSON object",
            );
        }
    };
    let payload: WebhookPayload = serde_json::from_value(value.clone()).unwrap_or_default();
    let secret = match state.secret.load() {
        Ok(secret) => secret,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the webhook secret; answering 503 so Didit delivers again");
            return answer(
                metrics,
                StatusCode::SERVICE_UNAVAILABLE,
                "broker_unavailable",
                "webhook secret unavailable",
            );
        }
    };

    let verified = if let Some(sig) = header(&headers, "x-signature-v2") {
        signature::verify_v2(secret.expose(), &value, sig).then(|| Verified::V2(sig.to_string()))
    } else if let (true, Some(sig)) = (state.accept_raw, header(&headers, "x-signature")) {
        signature::verify_raw(secret.expose(), &bytes, sig).then(|| Verified::Raw(sig.to_string()))
    } else if let (true, Some(sig)) = (state.accept_simple, header(&headers, "x-signature-simple"))
    {
        match (
            &payload.timestamp,
            &payload.session_id,
            &payload.status,
            &payload.webhook_type,
        ) {
            (Some(ts), Some(id), Some(status), Some(kind)) => {
                signature::verify_simple(secret.expose(), *ts, id, status, kind, sig)
                    .then(|| Verified::Simple(sig.to_string()))
            }
            _ => None,
        }
    } else {
        None
    };
    let Some(verified) = verified else {
        tracing::warn!("webhook refused: missing or wrong signature");
        return answer(
            metrics,
            StatusCode::UNAUTHORIZED,
            "bad_signature",
            "missing or invalid signature",
        );
    };

    let header_ts = header(&headers, "x-timestamp").map(|v| v.parse::<i64>());
    let timestamp = match (payload.timestamp, header_ts) {
        (_, Some(Err(_))) => {
            return answer(
                metrics,
                StatusCode::UNAUTHORIZED,
                "bad_signature",
                "X-Timestamp is not a number",
            );
        }
        (Some(body_ts), Some(Ok(h))) if body_ts != h => {
            return answer(
                metrics,
                StatusCode::UNAUTHORIZED,
                "bad_signature",
                "X-Timestamp does not match the signed body's timestamp",
            );
        }
        (Some(ts), _) => ts,
        (None, Some(Ok(h))) => h,
        (None, None) => match payload.created_at {
            Some(ts) => ts,
            None => {
                return answer(
                    metrics,
                    StatusCode::UNAUTHORIZED,
                    "stale",
                    "delivery carries no timestamp",
                );
            }
        },
    };
    let now = Utc::now().timestamp();
    if now.abs_diff(timestamp) > state.max_skew_s {
        tracing::warn!(
            timestamp,
            now,
            "webhook refused: timestamp outside the allowed window"
        );
        return answer(
            metrics,
            StatusCode::UNAUTHORIZED,
            "stale",
            &format!("timestamp is more than {} s from now", state.max_skew_s),
        );
    }

    let webhook_type = payload.webhook_type.as_deref().unwrap_or("");
    if !matches!(
        webhook_type,
        "status.updated" | "user.status.updated" | "business.status.updated"
    ) {
        return answer(
            metrics,
            StatusCode::OK,
            "unsupported_type",
            "event type not used by the bridge",
        );
    }
    let (Some(session_id), Some(status_text)) =
        (payload.session_id.clone(), payload.status.clone())
    else {
        return answer(
            metrics,
            StatusCode::BAD_REQUEST,
            "malformed",
            "session_id and status are required",
        );
    };
    let Some(status) = SessionStatus::parse(&status_text) else {
        return answer(
            metrics,
            StatusCode::BAD_REQUEST,
            "malformed",
            "unknown status",
        );
    };

    let key = verified.replay_key();
    match state.ledger.claim_webhook(&key, Utc::now()).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(session_id = %session_id, "webhook refused: delivery seen before (replay)");
            return answer(
                metrics,
                StatusCode::UNAUTHORIZED,
                "replay",
                "delivery already received",
            );
        }
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

    if !status.is_finished() {
        metrics.event("webhook", "ignored_unfinished");
        return answer(metrics, StatusCode::OK, "ignored", "status not finished");
    }
    let kind = payload
        .session_kind
        .or_else(|| {
            payload
                .decision
                .as_ref()
                .and_then(|d| d.get("session_kind"))
                .and_then(|k| k.as_str())
                .and_then(SessionKind::parse)
        })
        .or((webhook_type == "business.status.updated").then_some(SessionKind::Business))
        .unwrap_or(SessionKind::User);
    let occurred_at = DateTime::<Utc>::from_timestamp(payload.created_at.unwrap_or(timestamp), 0)
        .unwrap_or_else(Utc::now);
    let event = OnboardingFinished {
        kind: envelope::types::ONBOARDING_FINISHED.to_string(),
        event_id: payload.event_id.clone().unwrap_or_else(|| {
            format!("webhook:{session_id}:{}:{timestamp}", status.for_kind(kind))
        }),
        session_id: session_id.clone(),
        status: status.for_kind(kind).to_string(),
        session_kind: Some(kind),
        vendor_data: payload.vendor_data.clone(),
        occurred_at: Some(occurred_at),
        partners: None,
    };
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
    match published {
        Ok(()) => {
            metrics.success(pipeline::ISSUER_WEBHOOK);
            tracing::info!(%message_id, source_session_id = %session_id, status = %status, "webhook accepted");
            answer(metrics, StatusCode::OK, "accepted", "event queued")
        }
        Err(e) => {
            // Forget the delivery so that Didit's retry of it is not refused as a replay.
            if let Err(le) = state.ledger.release_webhook(&key).await {
                tracing::warn!(error = %le, "could not forget the webhook delivery; its retry will be refused");
            }
            tracing::warn!(error = %e, source_session_id = %session_id, "broker did not confirm the event; answering 503");
            answer(
                metrics,
                StatusCode::SERVICE_UNAVAILABLE,
                "broker_unavailable",
                "broker unavailable, retry later",
            )
        }
    }
}
