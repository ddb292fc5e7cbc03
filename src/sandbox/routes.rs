//! The HTTP surface: Didit's `/v3` routes behind one gate (write limit, API key, faults, rejection counting), the
//! control routes from [`super::control`], `/openapi.json`, and a placeholder hosted-flow page.
//!
//! Handlers parse bodies themselves (any content type, so a client that forgets `Content-Type` still gets
//! Didit's answers, and every malformed body is a JSON 400 rather than a framework's plain-text rejection), call
//! one [`State`] method under the lock, and send webhooks after the lock is released.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{ConnectInfo, Extension, MatchedPath, Path, Query, Request, State as AxState};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::conn::ConnHandle;
use super::error::{ApiError, RejectedWith};
use super::limits::{FaultAction, Faults, RateLimiter};
use super::model::{FaultEndpoint, SentWebhook};
use super::state::{
    Caller, ImportInput, ListFilter, READ_SESSIONS, Session, State, WEBHOOK_EVENTS, WRITE_SESSIONS,
    real_now,
};
use super::token::TokenKey;
use super::webhooks;
use crate::didit::wire::{SessionKind, SessionStatus};

/// How long a request hit by `hang_rate` stays unanswered (unless the sandbox shuts down first).
const HANG: Duration = Duration::from_secs(120);
/// Default page of `GET /v3/sessions/`: Didit's documented 50 (docs.didit.me/sessions-api/list-sessions).
const PAGE_DEFAULT: usize = 50;
/// Largest page of `GET /v3/sessions/`.
const PAGE_MAX: usize = 100;

/// Everything the handlers share.
pub struct Shared {
    /// Applications, sessions and counters.
    pub state: Mutex<State>,
    /// The per-key write limit.
    pub limiter: Mutex<RateLimiter>,
    /// The injected faults.
    pub faults: Mutex<Faults>,
    /// The share-token signing key.
    pub key: TokenKey,
    /// The client webhooks go out with.
    pub http: reqwest::Client,
    /// Cancelled at shutdown: hung requests answer, deliveries stop.
    pub cancel: CancellationToken,
    /// Webhook deliveries in flight.
    pub tracker: TaskTracker,
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep serving rather than poisoning every request.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// The state, locked.
    pub fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The write limiter, locked.
    pub fn limiter(&self) -> MutexGuard<'_, RateLimiter> {
        lock(&self.limiter)
    }

    /// The fault settings, locked.
    pub fn faults(&self) -> MutexGuard<'_, Faults> {
        lock(&self.faults)
    }

    /// Announces `session`'s current status to its application's destinations, in the background.
    pub fn notify(self: &Arc<Self>, session: &Session) {
        let targets = self
            .state()
            .webhook_targets(&session.application_id, webhooks::STATUS_UPDATED);
        if targets.is_empty() {
            return;
        }
        let prepared = Arc::new(webhooks::prepare(session, real_now()));
        for target in targets {
            let shared = Arc::clone(self);
            let prepared = Arc::clone(&prepared);
            self.tracker.spawn(async move {
                let (_, record) =
                    webhooks::deliver(&shared.http, &target, &prepared, &shared.cancel).await;
                shared.state().record_delivery(record);
            });
        }
    }

    /// Sends `session`'s current status now (same event id, fresh timestamp) and waits for the outcome.
    pub async fn send_now(&self, session: &Session) -> Vec<SentWebhook> {
        let targets = self
            .state()
            .webhook_targets(&session.application_id, webhooks::STATUS_UPDATED);
        let prepared = webhooks::prepare(session, real_now());
        let mut sent = Vec::with_capacity(targets.len());
        for target in targets {
            let (webhook, record) =
                webhooks::deliver(&self.http, &target, &prepared, &self.cancel).await;
            self.state().record_delivery(record);
            sent.push(webhook);
        }
        sent
    }
}

/// The whole sandbox as one router.
pub fn router(shared: Arc<Shared>) -> Router {
    let didit = Router::new()
        .route("/v3/session/", post(create_session))
        .route("/v3/session/{id}/decision/", get(decision))
        .route("/v3/session/{id}/update-status/", patch(update_status))
        .route("/v3/session/{id}/delete/", delete(delete_session))
        .route("/v3/session/{id}/share/", post(share))
        .route("/v3/session/import-shared/", post(import_shared))
        .route("/v3/sessions/", get(list_sessions))
        .route(
            "/v3/webhook/destinations/",
            post(create_destination).get(list_destinations),
        )
        .route("/v3/webhook/destinations/{uuid}/", get(get_destination))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&shared), gate));
    Router::new()
        .merge(didit)
        .merge(super::control::router())
        .route("/openapi.json", get(openapi))
        .route("/session/{token}", get(hosted_flow))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(shared)
}

/// Runs before every Didit route: the write limit (keyed by the `x-api-key` value, as Didit does), the key,
/// the faults; after it, the `X-RateLimit-*` headers (on 429, or on every write when switched to `always`) and the
/// write and rejection counts.
async fn gate(AxState(shared): AxState<Arc<Shared>>, mut request: Request, next: Next) -> Response {
    let endpoint = match request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
    {
        Some("/v3/session/{id}/share/") => Some(FaultEndpoint::Share),
        Some("/v3/session/import-shared/") => Some(FaultEndpoint::Import),
        _ => None,
    };
    let is_write = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    let key = request
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (rate, headers_on_success) = if is_write {
        shared.state().count_write();
        let mut limiter = shared.limiter();
        let rate = limiter.check(key.as_deref().unwrap_or(""), Instant::now());
        let always = rate.is_some_and(|d| d.allowed && limiter.sends_headers(&d));
        (rate, always)
    } else {
        (None, false)
    };
    let mut throttled_by_fault = false;
    let mut response = if rate.is_some_and(|d| !d.allowed) {
        ApiError::RateLimited.into_response()
    } else {
        let caller = shared.state().authenticate(key.as_deref());
        match caller {
            Err(e) => e.into_response(),
            Ok(caller) => {
                let (latency, action) =
                    shared
                        .faults()
                        .plan(endpoint, rand::random(), rand::random());
                if !latency.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(latency) => {}
                        _ = shared.cancel.cancelled() => {}
                    }
                }
                match action {
                    FaultAction::Pass => {
                        request.extensions_mut().insert(caller);
                        next.run(request).await
                    }
                    FaultAction::DropAnswer | FaultAction::HangAfter => {
                        let conn = request
                            .extensions()
                            .get::<ConnectInfo<ConnHandle>>()
                            .map(|c| c.0.clone());
                        request.extensions_mut().insert(caller);
                        let response = next.run(request).await;
                        match (action, conn) {
                            // Done, and the answer is lost: the connection resets instead of carrying it.
                            (FaultAction::DropAnswer, Some(conn)) => conn.break_connection(),
                            // Done, and the answer waits (also a dropped answer when served without connect info,
                            // as under `oneshot`, where there is no connection to break).
                            _ => {
                                tokio::select! {
                                    _ = tokio::time::sleep(HANG) => {}
                                    _ = shared.cancel.cancelled() => {}
                                }
                            }
                        }
                        response
                    }
                    FaultAction::Hang => {
                        tokio::select! {
                            _ = tokio::time::sleep(HANG) => {}
                            _ = shared.cancel.cancelled() => {}
                        }
                        ApiError::Internal {
                            status: StatusCode::GATEWAY_TIMEOUT,
                            detail: "Injected fault: the request hung.".to_string(),
                            with_body: true,
                        }
                        .into_response()
                    }
                    FaultAction::Fail(e) => e.into_response(),
                    FaultAction::Throttle => {
                        throttled_by_fault = true;
                        ApiError::RateLimited.into_response()
                    }
                }
            }
        }
    };
    // Didit sends the headers only on 429 now; `rate_limit_headers = always` keeps the older behaviour.
    if let Some(decision) = rate
        && (!decision.allowed || headers_on_success)
    {
        decision.apply(response.headers_mut());
    }
    if throttled_by_fault {
        let limit = shared.limiter().settings().writes_per_minute;
        let headers = response.headers_mut();
        headers.insert("retry-after", HeaderValue::from(1u32));
        headers.insert("x-ratelimit-limit", HeaderValue::from(limit));
        headers.insert("x-ratelimit-remaining", HeaderValue::from(0u32));
        headers.insert("x-ratelimit-reset", HeaderValue::from(real_now() + 1));
    }
    if let Some(RejectedWith(code)) = response.extensions().get::<RejectedWith>().copied() {
        shared.state().count_rejection(code);
    }
    response
}

/// A request body as a JSON object; an empty body is `{}`.
pub fn json_object(body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(|e| ApiError::Validation(format!("Unreadable request body: {e}")))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::Validation("Expected a JSON object.".to_string())),
        Err(e) => Err(ApiError::Validation(format!("JSON parse error - {e}"))),
    }
}

fn required_string(body: &Map<String, Value>, field: &str) -> Result<String, ApiError> {
    match body.get(field) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) | None | Some(Value::Null) => Err(ApiError::Validation(format!(
            "{field}: This field is required."
        ))),
        Some(_) => Err(ApiError::Validation(format!(
            "{field}: Not a valid string."
        ))),
    }
}

fn optional_string(body: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::Validation(format!(
            "{field}: Not a valid string."
        ))),
    }
}

fn optional_bool(body: &Map<String, Value>, field: &str) -> Result<Option<bool>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::Validation(format!(
            "{field}: Must be a valid boolean."
        ))),
    }
}

async fn create_session(
    AxState(shared): AxState<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(WRITE_SESSIONS)?;
    let body = json_object(body)?;
    let workflow_id = required_string(&body, "workflow_id")?;
    let vendor_data = optional_string(&body, "vendor_data")?;
    let callback = optional_string(&body, "callback")?;
    let metadata = match body.get("metadata") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(_) => {
            return Err(ApiError::Validation(
                "metadata: Must be a JSON object.".to_string(),
            ));
        }
    };
    let (session, created) =
        shared
            .state()
            .create_session(&caller, &workflow_id, vendor_data, metadata, callback)?;
    if created {
        shared.notify(&session);
    }
    Ok((StatusCode::CREATED, Json(session.created_json())).into_response())
}

async fn decision(
    AxState(shared): AxState<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(READ_SESSIONS)?;
    let session = shared.state().session_for(&caller, &id)?.clone();
    Ok(Json(session.decision()).into_response())
}

async fn update_status(
    AxState(shared): AxState<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(WRITE_SESSIONS)?;
    let body = json_object(body)?;
    let raw = required_string(&body, "new_status")?;
    let new_status = SessionStatus::parse(&raw).ok_or_else(|| {
        ApiError::Validation(
            "new_status must be one of Approved, Declined, Resubmitted.".to_string(),
        )
    })?;
    let (session, changed) = shared.state().update_status(&caller, &id, new_status)?;
    if changed {
        shared.notify(&session);
    }
    Ok(Json(json!({ "session_id": session.id })).into_response())
}

async fn delete_session(
    AxState(shared): AxState<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(WRITE_SESSIONS)?;
    shared.state().delete_session(Some(&caller), &id)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn share(
    AxState(shared): AxState<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(WRITE_SESSIONS)?;
    let body = json_object(body)?;
    let answer = shared.state().share(&caller, &id, &body, &shared.key)?;
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

async fn import_shared(
    AxState(shared): AxState<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(WRITE_SESSIONS)?;
    let body = json_object(body)?;
    let token = required_string(&body, "share_token")?;
    let workflow_id = required_string(&body, "workflow_id")?;
    let vendor_data = optional_string(&body, "vendor_data")?;
    let trust_review = optional_bool(&body, "trust_review")?.unwrap_or(false);
    // The signature is checked before taking the lock: it is the only CPU work of an import.
    let claims = shared
        .key
        .verify(&token)
        .map_err(|_| ApiError::InvalidShareToken("Share token invalid or expired.".to_string()))?;
    let session = shared.state().import(
        &caller,
        ImportInput {
            token,
            claims,
            workflow_id,
            vendor_data,
            trust_review,
        },
    )?;
    shared.notify(&session);
    Ok((StatusCode::CREATED, Json(session.decision())).into_response())
}

fn parse_page_param(
    query: &std::collections::HashMap<String, String>,
    name: &str,
) -> Result<Option<usize>, ApiError> {
    match query.get(name) {
        None => Ok(None),
        Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
            ApiError::Validation(format!("{name}: A valid non-negative integer is required."))
        }),
    }
}

/// A `date_from` / `date_to` value: an ISO 8601 date (the whole day: from its first second, or through its last)
/// or an RFC 3339 time.
fn parse_day_param(
    query: &std::collections::HashMap<String, String>,
    name: &str,
    end_of_day: bool,
) -> Result<Option<i64>, ApiError> {
    let Some(raw) = query.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    if let Ok(day) = chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d") {
        let start = day
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc()
            .timestamp();
        return Ok(Some(if end_of_day { start + 86_399 } else { start }));
    }
    chrono::DateTime::parse_from_rfc3339(raw)
        .map(|t| Some(t.timestamp()))
        .map_err(|_| {
            ApiError::Validation(format!(
                "{name}: Enter a valid date (YYYY-MM-DD) or date-time (ISO 8601)."
            ))
        })
}

/// `GET /v3/sessions/`: Didit's documented filters (ANDed) — `vendor_data` (exact), `status` (either casing),
/// `session_kind` (`user`, the default, `business` or `all`: one page of each, concatenated), `workflow_id`,
/// `date_from` / `date_to` (created date) — and `limit` / `offset` paging with `next` / `previous` links that keep
/// the filters. Newest first. Unknown parameters are ignored, as Didit's framework does.
async fn list_sessions(
    AxState(shared): AxState<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<std::collections::HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    caller.require(READ_SESSIONS)?;
    let Query(query) = query.map_err(|e| ApiError::Validation(format!("Invalid query: {e}")))?;
    let limit = parse_page_param(&query, "limit")?
        .unwrap_or(PAGE_DEFAULT)
        .clamp(1, PAGE_MAX);
    let offset = parse_page_param(&query, "offset")?.unwrap_or(0);
    let text = |name: &str| query.get(name).filter(|v| !v.is_empty()).cloned();
    let status = match text("status") {
        None => None,
        Some(raw) => Some(SessionStatus::parse(&raw).ok_or_else(|| {
            ApiError::Validation(format!("status: `{raw}` is not a valid status."))
        })?),
    };
    let kinds = match text("session_kind").as_deref() {
        None | Some("user") => vec![SessionKind::User],
        Some("business") => vec![SessionKind::Business],
        Some("all") => vec![SessionKind::User, SessionKind::Business],
        Some(other) => {
            return Err(ApiError::Validation(format!(
                "session_kind: `{other}` is not one of user, business, all."
            )));
        }
    };
    let filter = ListFilter {
        vendor_data: text("vendor_data"),
        status,
        kinds,
        workflow_id: text("workflow_id"),
        created_from: parse_day_param(&query, "date_from", false)?,
        created_to: parse_day_param(&query, "date_to", true)?,
    };
    let (count, more, results) = shared
        .state()
        .list_sessions(&caller, &filter, limit, offset);
    let page = |offset: usize| {
        let mut url = reqwest::Url::parse(&format!("{}/v3/sessions/", shared.base_url))
            .expect("the sandbox's base URL is a URL");
        {
            let mut pairs = url.query_pairs_mut();
            for name in [
                "vendor_data",
                "status",
                "session_kind",
                "workflow_id",
                "date_from",
                "date_to",
            ] {
                if let Some(value) = text(name) {
                    pairs.append_pair(name, &value);
                }
            }
            pairs.append_pair("limit", &limit.to_string());
            pairs.append_pair("offset", &offset.to_string());
        }
        url.to_string()
    };
    let next = more.then(|| page(offset + limit));
    let previous = (offset > 0).then(|| page(offset.saturating_sub(limit)));
    Ok(
        Json(json!({ "count": count, "next": next, "previous": previous, "results": results }))
            .into_response(),
    )
}

async fn create_destination(
    AxState(shared): AxState<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = json_object(body)?;
    let url = required_string(&body, "url")?;
    let parsed = reqwest::Url::parse(&url)
        .map_err(|_| ApiError::Validation("url: Enter a valid URL.".to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(ApiError::Validation(
            "url: Enter a valid http or https URL.".to_string(),
        ));
    }
    let label = optional_string(&body, "label")?.unwrap_or_default();
    let enabled = optional_bool(&body, "enabled")?.unwrap_or(true);
    let version = optional_string(&body, "webhook_version")?.unwrap_or_else(|| "v3".to_string());
    if !matches!(version.as_str(), "v1" | "v2" | "v3") {
        return Err(ApiError::Validation(
            "webhook_version: must be one of v1, v2, v3.".to_string(),
        ));
    }
    let secret = optional_string(&body, "secret_shared_key")?.filter(|s| !s.is_empty());
    let events = match body.get("subscribed_events") {
        None | Some(Value::Null) => vec![webhooks::STATUS_UPDATED.to_string()],
        Some(Value::Array(items)) => {
            let mut events = Vec::with_capacity(items.len());
            for item in items {
                match item.as_str() {
                    Some(e) if WEBHOOK_EVENTS.contains(&e) => events.push(e.to_string()),
                    _ => {
                        return Err(ApiError::Validation(format!(
                            "subscribed_events: {item} is not a valid event; choose from {}.",
                            WEBHOOK_EVENTS.join(", ")
                        )));
                    }
                }
            }
            events
        }
        Some(_) => {
            return Err(ApiError::Validation(
                "subscribed_events: Expected a list of event names.".to_string(),
            ));
        }
    };
    let answer = shared
        .state()
        .create_destination(&caller, label, url, enabled, version, secret, events)?;
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

async fn list_destinations(
    AxState(shared): AxState<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
) -> Json<Vec<Value>> {
    Json(shared.state().list_destinations(&caller))
}

async fn get_destination(
    AxState(shared): AxState<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Path(uuid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(shared.state().destination(&caller, &uuid)?))
}

async fn openapi() -> Json<Value> {
    Json(super::openapi::document())
}

async fn hosted_flow(Path(token): Path<String>) -> Html<String> {
    let token: String = token
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(64)
        .collect();
    Html(format!(
        "<!doctype html><title>Didit sandbox</title><h1>Sandbox verification flow</h1>\
         <p>Session token <code>{token}</code>. The sandbox has no interactive flow: finish a session with \
         <code>POST /sandbox/sessions/{{session_id}}/status</code>.</p>"
    ))
}
