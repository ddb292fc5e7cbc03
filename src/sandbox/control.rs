//! The sandbox-only control routes (`/sandbox/...`, JSON in and out), for tests, demos and people: create
//! applications and sessions, play the end user, inject faults, move the clock, revoke keys, switch the rate
//! limit, and read what happened (stats, entities, webhook deliveries). None of these exist at Didit; none needs
//! an API key. Bodies are strict (`deny_unknown_fields`): a typo is a 400 naming the field.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::error::ApiError;
use super::model::{ClockInfo, FaultSettings, RateLimitHeaders, Settings};
use super::routes::{Shared, json_object};
use super::state::{NewApplication, NewSession, Session};
use crate::didit::wire::{SessionKind, SessionStatus};

/// The control routes (state attached by the caller).
pub fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/sandbox/applications",
            post(create_application).get(list_applications),
        )
        .route("/sandbox/applications/{id}", delete(delete_application))
        .route("/sandbox/applications/{id}/revoke-key", post(revoke_key))
        .route("/sandbox/applications/{id}/keys", post(add_key))
        .route("/sandbox/applications/{id}/workflows", post(add_workflow))
        .route(
            "/sandbox/applications/{id}/workflows/{workflow_id}",
            delete(remove_workflow),
        )
        .route("/sandbox/applications/{id}/entities", get(entities))
        .route("/sandbox/sessions", post(create_session))
        .route(
            "/sandbox/sessions/{id}",
            get(get_session).delete(delete_session),
        )
        .route("/sandbox/sessions/{id}/status", post(set_status))
        .route("/sandbox/sessions/{id}/webhook", post(resend_webhook))
        .route("/sandbox/faults", post(set_faults).get(get_faults))
        .route("/sandbox/clock", post(advance_clock).get(get_clock))
        .route("/sandbox/settings", post(set_settings).get(get_settings))
        .route("/sandbox/stats", get(stats))
        .route("/sandbox/webhook-deliveries", get(deliveries))
}

fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let map = json_object(body)?;
    serde_json::from_value(Value::Object(map)).map_err(|e| ApiError::Validation(e.to_string()))
}

fn parse_kind(s: &str) -> Result<SessionKind, ApiError> {
    SessionKind::parse(s)
        .ok_or_else(|| ApiError::Validation(format!("session_kind `{s}` is not user or business")))
}

fn parse_status(s: &str) -> Result<SessionStatus, ApiError> {
    SessionStatus::parse(s)
        .ok_or_else(|| ApiError::Validation(format!("status `{s}` is not a Didit session status")))
}

/// The control routes' rendering of a session.
pub fn session_json(session: &Session) -> Value {
    json!({
        "application_id": session.application_id,
        "session_id": session.id,
        "session_number": session.number,
        "session_kind": session.kind,
        "status": session.status_str(),
        "vendor_data": session.vendor_data,
        "workflow_id": session.workflow_id,
        "decision": session.decision(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewApplicationBody {
    name: String,
    #[serde(default)]
    privileges: Option<Vec<String>>,
}

async fn create_application(
    AxState(shared): AxState<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: NewApplicationBody = parse(body)?;
    let app = shared.state().create_application(NewApplication {
        name: body.name,
        privileges: body.privileges,
        ..Default::default()
    })?;
    Ok((StatusCode::CREATED, Json(app.to_json())).into_response())
}

async fn list_applications(AxState(shared): AxState<Arc<Shared>>) -> Json<Vec<Value>> {
    Json(
        shared
            .state()
            .applications()
            .iter()
            .map(|a| a.to_json())
            .collect(),
    )
}

async fn delete_application(
    AxState(shared): AxState<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    shared.state().delete_application(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn revoke_key(
    AxState(shared): AxState<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = shared.state().revoke_key(&id)?;
    Ok(Json(json!({ "application_id": id, "api_key": key })))
}

async fn add_key(
    AxState(shared): AxState<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let key = shared.state().add_key(&id)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "application_id": id, "api_key": key })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowBody {
    kind: String,
}

async fn add_workflow(
    AxState(shared): AxState<Arc<Shared>>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: WorkflowBody = parse(body)?;
    let kind = parse_kind(&body.kind)?;
    let workflow_id = shared.state().add_workflow(&id, kind)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "workflow_id": workflow_id, "kind": kind, "application_id": id })),
    )
        .into_response())
}

async fn remove_workflow(
    AxState(shared): AxState<Arc<Shared>>,
    Path((id, workflow_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    shared.state().remove_workflow(&id, &workflow_id)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn entities(AxState(shared): AxState<Arc<Shared>>, Path(id): Path<String>) -> Json<Value> {
    Json(json!(shared.state().entities(&id)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSessionBody {
    application_id: String,
    session_kind: String,
    status: String,
    #[serde(default)]
    vendor_data: Option<String>,
    #[serde(default)]
    workflow_id: Option<String>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    session_id: Option<String>,
}

async fn create_session(
    AxState(shared): AxState<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: NewSessionBody = parse(body)?;
    let kind = parse_kind(&body.session_kind)?;
    let status = parse_status(&body.status)?;
    let session = shared.state().insert_session(NewSession {
        application_id: body.application_id,
        kind,
        status,
        workflow_id: body.workflow_id,
        vendor_data: body.vendor_data,
        metadata: body.metadata,
        callback: None,
        session_id: body.session_id,
        features: None,
        generate: status != SessionStatus::NotStarted,
        shared_from: None,
    })?;
    shared.notify(&session);
    Ok((StatusCode::CREATED, Json(session_json(&session))).into_response())
}

async fn get_session(
    AxState(shared): AxState<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let session = shared.state().session(&id)?.clone();
    Ok(Json(session_json(&session)))
}

async fn delete_session(
    AxState(shared): AxState<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    shared.state().delete_session(None, &id)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusBody {
    status: String,
}

async fn set_status(
    AxState(shared): AxState<Arc<Shared>>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body: StatusBody = parse(body)?;
    let status = parse_status(&body.status)?;
    let (session, changed) = shared.state().set_status(&id, status)?;
    if changed {
        shared.notify(&session);
    }
    Ok(Json(session_json(&session)))
}

async fn resend_webhook(
    AxState(shared): AxState<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let session = shared.state().session(&id)?.clone();
    let sent = shared.send_now(&session).await;
    if sent.is_empty() {
        return Err(ApiError::Validation(
            "The session's application has no enabled webhook destination subscribed to status.updated.".to_string(),
        ));
    }
    Ok(Json(json!({ "sent": sent })))
}

async fn set_faults(
    AxState(shared): AxState<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let map = json_object(body)?;
    if map.is_empty() {
        shared.faults().clear();
    } else {
        let settings: FaultSettings = serde_json::from_value(Value::Object(map))
            .map_err(|e| ApiError::Validation(e.to_string()))?;
        shared.faults().set(settings)?;
    }
    Ok(Json(json!(shared.faults().state())))
}

async fn get_faults(AxState(shared): AxState<Arc<Shared>>) -> Json<Value> {
    Json(json!(shared.faults().state()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockBody {
    advance_seconds: i64,
}

async fn advance_clock(
    AxState(shared): AxState<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ClockInfo>, ApiError> {
    let body: ClockBody = parse(body)?;
    if body.advance_seconds < 0 {
        return Err(ApiError::Validation(
            "advance_seconds must not be negative: the clock only moves forward".to_string(),
        ));
    }
    let (now, offset_seconds) = shared.state().advance_clock(body.advance_seconds);
    Ok(Json(ClockInfo {
        now,
        offset_seconds,
    }))
}

async fn get_clock(AxState(shared): AxState<Arc<Shared>>) -> Json<ClockInfo> {
    let (now, offset_seconds) = shared.state().advance_clock(0);
    Json(ClockInfo {
        now,
        offset_seconds,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsBody {
    #[serde(default)]
    rate_limit: Option<bool>,
    #[serde(default)]
    writes_per_minute: Option<u32>,
    #[serde(default)]
    window_ms: Option<u64>,
    #[serde(default)]
    rate_limit_headers: Option<RateLimitHeaders>,
}

async fn set_settings(
    AxState(shared): AxState<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Settings>, ApiError> {
    let body: SettingsBody = parse(body)?;
    if body.writes_per_minute == Some(0) {
        return Err(ApiError::Validation(
            "writes_per_minute must be at least 1".to_string(),
        ));
    }
    if body
        .window_ms
        .is_some_and(|w| !(100..=3_600_000).contains(&w))
    {
        return Err(ApiError::Validation(
            "window_ms must be between 100 and 3600000".to_string(),
        ));
    }
    let mut limiter = shared.limiter();
    let current = limiter.settings();
    let settings = Settings {
        rate_limit: body.rate_limit.unwrap_or(current.rate_limit),
        writes_per_minute: body.writes_per_minute.unwrap_or(current.writes_per_minute),
        window_ms: body.window_ms.unwrap_or(current.window_ms),
        rate_limit_headers: body
            .rate_limit_headers
            .unwrap_or(current.rate_limit_headers),
    };
    limiter.configure(settings);
    Ok(Json(settings))
}

async fn get_settings(AxState(shared): AxState<Arc<Shared>>) -> Json<Settings> {
    Json(shared.limiter().settings())
}

async fn stats(AxState(shared): AxState<Arc<Shared>>) -> Json<Value> {
    Json(json!(shared.state().stats()))
}

async fn deliveries(AxState(shared): AxState<Arc<Shared>>) -> Json<Value> {
    Json(json!(shared.state().deliveries()))
}
