//! The JSON shapes of the sandbox's control routes (`/sandbox/...`), shared by the server side and the typed
//! [`Control`](super::Control) client so the two cannot drift apart. Didit's own shapes live in
//! `crate::didit::wire`; nothing here is part of Didit's contract.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::didit::wire::{SessionDecision, SessionKind};
use crate::secret::Secret;

/// The default workflows of an application, one per kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowIds {
    /// The KYC workflow.
    pub user: String,
    /// The KYB workflow.
    pub business: String,
}

impl WorkflowIds {
    /// The workflow of `kind`.
    pub fn for_kind(&self, kind: SessionKind) -> &str {
        match kind {
            SessionKind::User => &self.user,
            SessionKind::Business => &self.business,
        }
    }
}

/// An application as `POST /sandbox/applications` answers it. `Debug` redacts the key; [`ApplicationInfo::to_json`]
/// is the one place that writes it out.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ApplicationInfo {
    /// Human name (`fintech-a`).
    pub name: String,
    /// The application's uuid.
    pub application_id: String,
    /// Its current API key.
    pub api_key: Secret,
    /// Its default workflows.
    pub workflows: WorkflowIds,
    /// The key's privileges (`read:sessions`, `write:sessions`).
    pub privileges: Vec<String>,
}

impl ApplicationInfo {
    /// The control routes' JSON, key included.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "application_id": self.application_id,
            "api_key": self.api_key.expose(),
            "workflows": self.workflows,
            "privileges": self.privileges,
        })
    }
}

/// A session created through `POST /sandbox/sessions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The owning application.
    pub application_id: String,
    /// The session's uuid.
    pub session_id: String,
    /// Its number in the application.
    pub session_number: i64,
    /// `user` or `business`.
    pub session_kind: SessionKind,
    /// Status in the kind's casing.
    pub status: String,
    /// The application's id for the entity.
    pub vendor_data: Option<String>,
    /// The workflow it ran in.
    pub workflow_id: String,
    /// The full decision, as `GET /v3/session/{id}/decision/` returns it.
    pub decision: SessionDecision,
}

/// Which Didit route a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum FaultEndpoint {
    /// `POST /v3/session/{id}/share/`.
    #[serde(rename = "share")]
    Share,
    /// `POST /v3/session/import-shared/`.
    #[serde(rename = "import")]
    Import,
    /// Every `/v3` route (used where no endpoint-specific setting exists).
    #[default]
    #[serde(rename = "*")]
    All,
}

/// `POST /sandbox/faults`: rates are probabilities in 0..=1 (missing = 0). One draw per request decides between
/// hang, error, rate limit, dropped answer and withheld answer, in that order; latency applies to every matching
/// request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct FaultSettings {
    /// The route the settings apply to.
    pub endpoint: FaultEndpoint,
    /// Added before answering.
    pub latency_ms: u64,
    /// Share of answers that are 500, 502 or 503.
    pub error_rate: f64,
    /// Share of answers that are 429 with `Retry-After: 1`.
    pub rate_limit_rate: f64,
    /// Share of requests never answered (until shutdown or 120 s).
    pub hang_rate: f64,
    /// Share of requests carried out in full whose answer is then lost: the connection is reset without a
    /// response (a client sees a connection error, never the status). Didit acted; the client cannot know.
    pub drop_response_rate: f64,
    /// Test-only: share of requests carried out in full whose answer is then withheld (until shutdown or 120 s),
    /// so that a test can kill the client between Didit's action and the client's own record of it.
    pub hang_after_rate: f64,
}

impl FaultSettings {
    /// True when the settings do nothing.
    pub fn is_noop(&self) -> bool {
        self.latency_ms == 0
            && self.error_rate <= 0.0
            && self.rate_limit_rate <= 0.0
            && self.hang_rate <= 0.0
            && self.drop_response_rate <= 0.0
            && self.hang_after_rate <= 0.0
    }
}

/// The fault settings in force, answered by `POST /sandbox/faults` and `GET /sandbox/faults`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FaultState {
    /// Every endpoint with settings.
    pub faults: Vec<FaultSettings>,
}

/// Successful imports of one source session into one application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportCount {
    /// The shared session in the issuing application.
    pub source_session_id: String,
    /// The importing application.
    pub application_id: String,
    /// How many times it was imported there.
    pub count: u64,
}

/// A session deleted through `DELETE /v3/session/{id}/delete/` (or the control routes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deletion {
    /// The deleted session.
    pub session_id: String,
    /// Its application.
    pub application_id: String,
    /// For an imported session: the session it was imported from.
    pub shared_from_session: Option<String>,
}

/// `GET /sandbox/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Stats {
    /// Share tokens minted.
    pub shares: u64,
    /// Successful imports per (source session, importing application).
    pub imports: Vec<ImportCount>,
    /// Every error answer of a Didit route, by code (faults and 429s included).
    pub rejections: BTreeMap<String, u64>,
    /// Write requests (POST, PATCH, DELETE) to Didit routes, answered or refused: with `rejections.rate_limited`,
    /// the share of writes answered 429.
    #[serde(default)]
    pub writes: u64,
    /// Vendor entities (users and businesses) across all applications.
    #[serde(default)]
    pub entities: u64,
    /// Live sessions across all applications.
    #[serde(default)]
    pub sessions: u64,
    /// Webhook deliveries finished (delivered or given up).
    #[serde(default)]
    pub webhook_deliveries: u64,
    /// Sessions deleted, in the order they were deleted.
    #[serde(default)]
    pub deletions: Vec<Deletion>,
}

impl Stats {
    /// Successful imports of `source_session_id` into `application_id`.
    pub fn import_count(&self, source_session_id: &str, application_id: &str) -> u64 {
        self.imports
            .iter()
            .filter(|i| {
                i.source_session_id == source_session_id && i.application_id == application_id
            })
            .map(|i| i.count)
            .sum()
    }

    /// Error answers with `code`.
    pub fn rejected(&self, code: &str) -> u64 {
        self.rejections.get(code).copied().unwrap_or(0)
    }
}

/// `POST /sandbox/clock`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockInfo {
    /// The virtual time, unix seconds.
    pub now: i64,
    /// How far ahead of the real clock it is.
    pub offset_seconds: i64,
}

/// When the `X-RateLimit-*` headers are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum RateLimitHeaders {
    /// Only on 429 answers, as Didit documents it now (the default).
    #[default]
    #[serde(rename = "on_429")]
    On429,
    /// On every answer to a write, as an older revision of Didit's page said.
    #[serde(rename = "always")]
    Always,
}

/// `POST /sandbox/settings` (every field optional on input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Whether the per-key write limit is enforced.
    pub rate_limit: bool,
    /// Writes per key per sliding window (a minute unless `window_ms` says otherwise).
    pub writes_per_minute: u32,
    /// The sliding window, in milliseconds (Didit's is 60000; shorter ones are for tests).
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
    /// When the `X-RateLimit-*` headers are sent.
    #[serde(default)]
    pub rate_limit_headers: RateLimitHeaders,
}

fn default_window_ms() -> u64 {
    60_000
}

/// A vendor entity (a user or a business) of an application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityInfo {
    /// The entity's uuid.
    pub entity_id: String,
    /// The application it belongs to.
    pub application_id: String,
    /// `user` or `business`.
    pub session_kind: SessionKind,
    /// The application's id for it.
    pub vendor_data: String,
    /// Sessions created for it (fresh or imported).
    pub sessions: u64,
}

/// One webhook the sandbox sent: exactly the bytes and headers, so a test can replay them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentWebhook {
    /// The destination's uuid.
    pub destination_uuid: String,
    /// Where it went.
    pub url: String,
    /// The raw body (UTF-8 JSON).
    pub body: String,
    /// The signature and metadata headers sent with it, lower-case names.
    pub headers: BTreeMap<String, String>,
    /// The last HTTP status received, if any.
    pub status_code: Option<u16>,
    /// Attempts made.
    pub attempts: u32,
    /// True when a 2xx came back.
    pub delivered: bool,
}

/// One finished delivery in `GET /sandbox/webhook-deliveries`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookDelivery {
    /// The delivery's own id.
    pub delivery_id: String,
    /// The event's id (the same across a resend of the same status change).
    pub event_id: String,
    /// The destination's uuid.
    pub destination_uuid: String,
    /// Where it went.
    pub url: String,
    /// The application whose session changed.
    pub application_id: String,
    /// The session.
    pub session_id: String,
    /// The status announced.
    pub status: String,
    /// `status.updated`.
    pub webhook_type: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last HTTP status received, if any.
    pub status_code: Option<u16>,
    /// True when a 2xx came back.
    pub delivered: bool,
    /// Why the last attempt failed, when it did (no secrets).
    pub error: Option<String>,
}

/// A webhook destination as `POST /v3/webhook/destinations/` answers it (read by the client; `Debug` redacts the
/// secret).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct WebhookDestination {
    /// The destination's uuid.
    pub uuid: String,
    /// Human label.
    pub label: String,
    /// Where deliveries go.
    pub url: String,
    /// Disabled destinations receive nothing.
    pub enabled: bool,
    /// `v1`, `v2` or `v3`.
    pub webhook_version: String,
    /// The HMAC secret (only in create and get-one answers).
    #[serde(default)]
    pub secret_shared_key: Option<Secret>,
    /// Events delivered (`status.updated`, …).
    pub subscribed_events: Vec<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}
