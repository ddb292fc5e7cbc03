//! Webhook deliveries: the `status.updated` body Didit sends on every status change, its three signatures and
//! `X-Timestamp` (didit-contract.md §9, computed with `crate::didit::signature`), and the bounded retry on 5xx,
//! 404 and connection errors.
//!
//! Bodies are compact JSON with sorted keys (Didit serialises with `sort_keys=True`), raw UTF-8, and keep floats
//! as floats (`45.0`), so `X-Signature` (raw bytes) and `X-Signature-V2` (canonical form) really differ and a
//! receiver that verifies the wrong one finds out. `timestamp` and `created_at` are real unix seconds, not the
//! virtual clock: receivers check them against their own clock.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::model::{SentWebhook, WebhookDelivery};
use super::state::{Session, WebhookTarget};
use crate::didit::signature;
use crate::didit::wire::SessionStatus;

/// The event type the sandbox sends.
pub const STATUS_UPDATED: &str = "status.updated";
/// Didit's webhook user agent.
pub const USER_AGENT: &str = "DiditWebhook/2.0 +https://didit.me";
/// Attempts per delivery (the first plus two retries).
pub const MAX_ATTEMPTS: u32 = 3;
/// Waits before the second and third attempt: short, because this is a sandbox.
const RETRY_DELAYS: [Duration; 2] = [Duration::from_millis(250), Duration::from_millis(1000)];
/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// A body ready to send: the parsed value (what V2 signs) and its exact bytes (what the raw signature signs).
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The owning application.
    pub application_id: String,
    /// The session.
    pub session_id: String,
    /// The status announced, in the kind's casing.
    pub status: String,
    /// The event id.
    pub event_id: String,
    /// Body `timestamp` (= `X-Timestamp`).
    pub timestamp: i64,
    /// The parsed body.
    pub value: Value,
    /// The bytes sent.
    pub body: Vec<u8>,
}

/// Builds the `status.updated` body of `session`'s current status, sent at `timestamp`. `vendor_data`,
/// `workflow_id` and `metadata` appear only when set; `decision` only for Approved, Declined, In Review and
/// Abandoned.
pub fn prepare(session: &Session, timestamp: i64) -> Prepared {
    let mut body = Map::new();
    body.insert("session_id".into(), Value::from(session.id.clone()));
    body.insert("status".into(), Value::from(session.status_str()));
    body.insert("webhook_type".into(), Value::from(STATUS_UPDATED));
    body.insert("created_at".into(), Value::from(session.event_at));
    body.insert("timestamp".into(), Value::from(timestamp));
    body.insert("session_kind".into(), Value::from(session.kind.as_str()));
    body.insert("event_id".into(), Value::from(session.event_id.clone()));
    body.insert(
        "workflow_id".into(),
        Value::from(session.workflow_id.clone()),
    );
    if let Some(vendor) = &session.vendor_data {
        body.insert("vendor_data".into(), Value::from(vendor.clone()));
    }
    if let Some(metadata) = &session.metadata {
        body.insert("metadata".into(), metadata.clone());
    }
    if session.kind == crate::didit::wire::SessionKind::Business {
        body.insert(
            "business_session_id".into(),
            Value::from(session.id.clone()),
        );
    }
    if matches!(
        session.status,
        SessionStatus::Approved
            | SessionStatus::Declined
            | SessionStatus::InReview
            | SessionStatus::Abandoned
    ) {
        let decision = serde_json::to_value(session.decision()).expect("decisions serialise");
        body.insert("decision".into(), decision);
    }
    let value = Value::Object(body);
    let bytes = serde_json::to_vec(&value).expect("bodies serialise");
    Prepared {
        application_id: session.application_id.clone(),
        session_id: session.id.clone(),
        status: session.status_str().to_string(),
        event_id: session.event_id.clone(),
        timestamp,
        value,
        body: bytes,
    }
}

/// The headers of `prepared` signed with `secret`, lower-case names.
pub fn headers(secret: &str, prepared: &Prepared) -> BTreeMap<String, String> {
    let mut h = BTreeMap::new();
    h.insert("content-type".into(), "application/json".into());
    h.insert("user-agent".into(), USER_AGENT.into());
    h.insert(
        "x-signature".into(),
        signature::sign_raw(secret, &prepared.body),
    );
    h.insert(
        "x-signature-v2".into(),
        signature::sign_v2(secret, &prepared.value),
    );
    h.insert(
        "x-signature-simple".into(),
        signature::sign_simple(
            secret,
            prepared.timestamp,
            &prepared.session_id,
            &prepared.status,
            STATUS_UPDATED,
        ),
    );
    h.insert("x-timestamp".into(), prepared.timestamp.to_string());
    h
}

/// Whether an answer deserves another attempt (Didit retries 5xx and 404).
fn retryable(status: reqwest::StatusCode) -> bool {
    status.is_server_error() || status == reqwest::StatusCode::NOT_FOUND
}

/// Sends `prepared` to `target`, retrying on 5xx, 404 and connection errors; stops early on `cancel`.
/// Answers what was sent and how it went, plus the record for `GET /sandbox/webhook-deliveries`.
pub async fn deliver(
    client: &reqwest::Client,
    target: &WebhookTarget,
    prepared: &Prepared,
    cancel: &CancellationToken,
) -> (SentWebhook, WebhookDelivery) {
    let headers = headers(target.secret.expose(), prepared);
    let mut attempts = 0;
    let mut status_code = None;
    let mut error = None;
    let mut delivered = false;
    while attempts < MAX_ATTEMPTS {
        if attempts > 0 {
            let delay = RETRY_DELAYS[(attempts as usize - 1).min(RETRY_DELAYS.len() - 1)];
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => break,
            }
        }
        attempts += 1;
        let mut request = client
            .post(&target.url)
            .timeout(ATTEMPT_TIMEOUT)
            .body(prepared.body.clone());
        for (name, value) in &headers {
            request = request.header(name, value);
        }
        let outcome = tokio::select! {
            r = request.send() => r,
            _ = cancel.cancelled() => break,
        };
        match outcome {
            Ok(response) => {
                let status = response.status();
                status_code = Some(status.as_u16());
                if status.is_success() {
                    delivered = true;
                    error = None;
                    break;
                }
                error = Some(format!("answered {status}"));
                if !retryable(status) {
                    break;
                }
            }
            Err(e) => {
                // reqwest's error text names the URL, never the headers: no secret leaks into the record.
                error = Some(if e.is_timeout() {
                    "timed out".to_string()
                } else if e.is_connect() {
                    "connection failed".to_string()
                } else {
                    "request failed".to_string()
                });
            }
        }
    }
    let sent = SentWebhook {
        destination_uuid: target.uuid.clone(),
        url: target.url.clone(),
        body: String::from_utf8_lossy(&prepared.body).into_owned(),
        headers,
        status_code,
        attempts,
        delivered,
    };
    let record = WebhookDelivery {
        delivery_id: uuid::Uuid::new_v4().to_string(),
        event_id: prepared.event_id.clone(),
        destination_uuid: target.uuid.clone(),
        url: target.url.clone(),
        application_id: prepared.application_id.clone(),
        session_id: prepared.session_id.clone(),
        status: prepared.status.clone(),
        webhook_type: STATUS_UPDATED.to_string(),
        attempts,
        status_code,
        delivered,
        error,
    };
    (sent, record)
}
