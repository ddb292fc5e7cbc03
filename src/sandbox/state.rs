//! The sandbox's memory and Didit's rules over it: applications and their keys, workflows, sessions, vendor
//! entities, imports, webhook destinations, counters and the virtual clock.
//!
//! One [`State`] lives behind a `std::sync::Mutex` that is never held across an await. Every rule that depends
//! on stored state is decided here by plain methods that take parsed input and return a value or an [`ApiError`];
//! the routes parse, authenticate and render, and webhook delivery happens outside the lock. Every lookup on a
//! request's path is a hash-map access: no scan over all sessions (only an unfiltered `GET /v3/sessions/`, a
//! reconciliation call, pages through one application's sessions).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;
use rand::distr::Alphanumeric;
use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::error::{ApiError, NOT_FINISHED_DETAIL, SOURCE_GONE_DETAIL};
use super::model::{ApplicationInfo, EntityInfo, ImportCount, Stats, WebhookDelivery, WorkflowIds};
use super::payload::{Features, array_names};
use super::token::TokenKey;
use crate::didit::wire::{SessionKind, SessionStatus, ShareResponse, ShareTokenClaims};
use crate::secret::{Secret, ShareToken};

/// Privilege needed to read sessions.
pub const READ_SESSIONS: &str = "read:sessions";
/// Privilege needed to create, change, delete and share sessions.
pub const WRITE_SESSIONS: &str = "write:sessions";
/// `ttl_in_seconds` bounds and default (product page).
pub const TTL_MIN: i64 = 60;
/// Upper bound of `ttl_in_seconds`.
pub const TTL_MAX: i64 = 86_400;
/// Default `ttl_in_seconds`.
pub const TTL_DEFAULT: i64 = 3_600;
/// How many finished webhook deliveries are remembered for `GET /sandbox/webhook-deliveries`.
const DELIVERY_HISTORY: usize = 10_000;
/// Events a destination may subscribe to (Didit's list; no wildcard).
pub const WEBHOOK_EVENTS: &[&str] = &[
    "status.updated",
    "data.updated",
    "user.status.updated",
    "user.data.updated",
    "business.status.updated",
    "business.data.updated",
    "activity.created",
    "transaction.created",
    "transaction.status.updated",
];

/// Unix seconds of the real clock.
pub fn real_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// RFC 3339 (UTC, seconds) of unix seconds.
pub fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A random API key: 40 alphanumeric characters.
pub fn random_key() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect()
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Whether a string is a uuid in its canonical hyphenated form or any form the `uuid` crate reads.
pub fn is_uuid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok()
}

/// Who is calling: the application behind a valid API key.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The calling application.
    pub application_id: String,
    /// Its key's privileges.
    pub privileges: Vec<String>,
}

impl Caller {
    /// Fails with 403 `permission_denied` unless the key holds `privilege`.
    pub fn require(&self, privilege: &str) -> Result<(), ApiError> {
        if self.privileges.iter().any(|p| p == privilege) {
            Ok(())
        } else {
            Err(ApiError::PermissionDenied)
        }
    }
}

struct Application {
    name: String,
    api_key: String,
    privileges: Vec<String>,
    deleted: bool,
    workflows: WorkflowIds,
    next_number: i64,
    /// session_number → session_id, for listing in order.
    sessions: BTreeMap<i64, String>,
    destinations: Vec<Destination>,
}

/// A webhook destination of an application.
#[derive(Clone)]
struct Destination {
    uuid: String,
    label: String,
    url: String,
    enabled: bool,
    webhook_version: String,
    secret: Secret,
    subscribed_events: Vec<String>,
    created_at: i64,
    updated_at: i64,
    deliveries_count: u64,
    failed_deliveries_count: u64,
    last_delivery_at: Option<i64>,
}

impl Destination {
    fn to_json(&self, with_secret: bool) -> Value {
        let secret = self.secret.expose();
        let last4 = &secret[secret.len().saturating_sub(4)..];
        let mut v = json!({
            "uuid": self.uuid,
            "label": self.label,
            "url": self.url,
            "enabled": self.enabled,
            "webhook_version": self.webhook_version,
            "subscribed_events": self.subscribed_events,
            "secret_last4": last4,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
            "metrics_window_days": 30,
            "deliveries_count": self.deliveries_count,
            "failed_deliveries_count": self.failed_deliveries_count,
            "last_delivery_at": self.last_delivery_at.map(rfc3339),
        });
        if with_secret {
            v["secret_shared_key"] = Value::String(secret.to_string());
        }
        v
    }
}

/// Where one webhook goes: the destination's id, URL and secret.
#[derive(Clone)]
pub struct WebhookTarget {
    /// The destination's uuid.
    pub uuid: String,
    /// Its URL.
    pub url: String,
    /// Its HMAC secret.
    pub secret: Secret,
}

/// A session (KYC or KYB) as stored.
#[derive(Debug, Clone)]
pub struct Session {
    /// Its uuid.
    pub id: String,
    /// The owning application.
    pub application_id: String,
    /// `user` or `business`.
    pub kind: SessionKind,
    /// Current status.
    pub status: SessionStatus,
    /// The workflow it ran in.
    pub workflow_id: String,
    /// The application's id for the entity.
    pub vendor_data: Option<String>,
    /// Free-form metadata given at creation.
    pub metadata: Option<Value>,
    /// Callback URL given at creation.
    pub callback: Option<String>,
    /// Per-application sequence number.
    pub number: i64,
    /// The hosted flow's token.
    pub session_token: String,
    /// Hosted flow URL (`None` for imported sessions).
    pub session_url: Option<String>,
    /// Creation time, virtual unix seconds.
    pub created_at: i64,
    /// The original session, for imported ones.
    pub shared_from: Option<String>,
    /// Feature reports (`None` until the flow ran).
    pub features: Option<Arc<Features>>,
    /// The id of the last status change, reused when it is re-sent.
    pub event_id: String,
    /// When the last status change happened, real unix seconds.
    pub event_at: i64,
}

impl Session {
    /// The status in the kind's casing.
    pub fn status_str(&self) -> &'static str {
        self.status.for_kind(self.kind)
    }

    /// The decision as `GET /v3/session/{id}/decision/` renders it.
    pub fn decision(&self) -> DecisionView<'_> {
        DecisionView(self)
    }

    fn summary(&self) -> Value {
        json!({
            "session_id": self.id,
            "session_number": self.number,
            "session_kind": self.kind,
            "status": self.status_str(),
            "workflow_id": self.workflow_id,
            "vendor_data": self.vendor_data,
            "session_url": self.session_url,
            "shared_from_session": self.shared_from,
            "created_at": rfc3339(self.created_at),
        })
    }

    /// The `POST /v3/session/` answer.
    pub fn created_json(&self) -> Value {
        json!({
            "session_id": self.id,
            "session_number": self.number,
            "session_token": self.session_token,
            "session_kind": self.kind,
            "vendor_data": self.vendor_data,
            "metadata": self.metadata,
            "status": self.status_str(),
            "workflow_id": self.workflow_id,
            "callback": self.callback,
            "url": self.session_url,
            "created_at": rfc3339(self.created_at),
        })
    }
}

/// Serialises a session as its full decision without copying its feature arrays.
pub struct DecisionView<'a>(&'a Session);

impl Serialize for DecisionView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let s = self.0;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("session_id", &s.id)?;
        map.serialize_entry("session_number", &s.number)?;
        map.serialize_entry("session_kind", &s.kind)?;
        map.serialize_entry("session_url", &s.session_url)?;
        map.serialize_entry("status", s.status_str())?;
        map.serialize_entry("environment", "sandbox")?;
        map.serialize_entry("workflow_id", &s.workflow_id)?;
        map.serialize_entry("features", &s.features.as_ref().map(|f| &f.features))?;
        map.serialize_entry("vendor_data", &s.vendor_data)?;
        map.serialize_entry("metadata", &s.metadata)?;
        map.serialize_entry("callback", &s.callback)?;
        map.serialize_entry("shared_from_session", &s.shared_from)?;
        map.serialize_entry("created_at", &rfc3339(s.created_at))?;
        if s.kind == SessionKind::Business {
            map.serialize_entry("business_session_id", &s.id)?;
        }
        for name in array_names(s.kind) {
            let value = s
                .features
                .as_ref()
                .and_then(|f| f.arrays.get(*name))
                .unwrap_or(&Value::Null);
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

struct Workflow {
    application_id: String,
    kind: SessionKind,
}

struct Entity {
    id: String,
    sessions: u64,
}

/// What a new application needs; `None` fields are generated.
#[derive(Debug, Clone, Default)]
pub struct NewApplication {
    /// Human name.
    pub name: String,
    /// Fixed uuid (fixtures) or a fresh one.
    pub application_id: Option<String>,
    /// Fixed key (fixtures) or a fresh one.
    pub api_key: Option<String>,
    /// Fixed default workflows (fixtures) or fresh ones.
    pub workflows: Option<WorkflowIds>,
    /// The key's privileges (default read and write sessions).
    pub privileges: Option<Vec<String>>,
}

/// What a new session needs.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// The owning application.
    pub application_id: String,
    /// `user` or `business`.
    pub kind: SessionKind,
    /// Initial status.
    pub status: SessionStatus,
    /// The workflow (must be of `kind` in the application); the default one when `None`.
    pub workflow_id: Option<String>,
    /// The application's id for the entity.
    pub vendor_data: Option<String>,
    /// Free-form metadata.
    pub metadata: Option<Value>,
    /// Callback URL.
    pub callback: Option<String>,
    /// Fixed uuid (fixtures) or a fresh one.
    pub session_id: Option<String>,
    /// Feature reports; generated from kind, status and number when `None` and `generate` is set.
    pub features: Option<Arc<Features>>,
    /// Whether to generate a realistic payload when `features` is `None`.
    pub generate: bool,
    /// The original session, for imports.
    pub shared_from: Option<String>,
}

/// A parsed import request whose token signature already verified.
#[derive(Debug, Clone)]
pub struct ImportInput {
    /// The token as sent (the duplicate check is on it).
    pub token: String,
    /// Its verified claims.
    pub claims: ShareTokenClaims,
    /// The receiving workflow.
    pub workflow_id: String,
    /// The receiver's id for the entity.
    pub vendor_data: Option<String>,
    /// Keep the source status (`true`) or land in review.
    pub trust_review: bool,
}

/// The filters of `GET /v3/sessions/`, parsed; every one that is set must match.
#[derive(Debug, Clone)]
pub struct ListFilter {
    /// Exact `vendor_data`.
    pub vendor_data: Option<String>,
    /// The status, either casing.
    pub status: Option<SessionStatus>,
    /// Kinds listed, each as its own page (Didit's default: `user` only).
    pub kinds: Vec<SessionKind>,
    /// One workflow.
    pub workflow_id: Option<String>,
    /// Created at or after (virtual unix seconds).
    pub created_from: Option<i64>,
    /// Created at or before.
    pub created_to: Option<i64>,
}

impl Default for ListFilter {
    fn default() -> Self {
        ListFilter {
            vendor_data: None,
            status: None,
            kinds: vec![SessionKind::User],
            workflow_id: None,
            created_from: None,
            created_to: None,
        }
    }
}

impl ListFilter {
    fn matches(&self, s: &Session) -> bool {
        self.vendor_data
            .as_ref()
            .is_none_or(|v| s.vendor_data.as_ref() == Some(v))
            && self.status.is_none_or(|st| s.status == st)
            && self
                .workflow_id
                .as_ref()
                .is_none_or(|w| &s.workflow_id == w)
            && self.created_from.is_none_or(|t| s.created_at >= t)
            && self.created_to.is_none_or(|t| s.created_at <= t)
    }
}

/// Everything the sandbox remembers.
pub struct State {
    base_url: String,
    apps: HashMap<String, Application>,
    keys: HashMap<String, String>,
    workflows: HashMap<String, Workflow>,
    sessions: HashMap<String, Session>,
    /// (application, workflow, vendor_data) → the latest session, for create-session idempotency.
    latest_by_vendor: HashMap<(String, String, String), String>,
    /// (application, vendor_data) → session numbers, for `GET /v3/sessions/?vendor_data=` without a scan.
    by_vendor: HashMap<(String, String), std::collections::BTreeSet<i64>>,
    entities: HashMap<(String, SessionKind, String), Entity>,
    /// (SHA-256 of the token, importing application) → imported session. A digest rather than the token
    /// keeps this ledger small under the benchmark's load; distinct tokens have distinct digests.
    imported: HashMap<([u8; 32], String), String>,
    import_counts: HashMap<(String, String), u64>,
    shares: u64,
    writes: u64,
    rejections: BTreeMap<String, u64>,
    clock_offset: i64,
    deliveries: VecDeque<WebhookDelivery>,
    deliveries_total: u64,
    deletions: Vec<super::model::Deletion>,
}

impl State {
    /// An empty sandbox whose hosted-flow URLs start with `base_url`.
    pub fn new(base_url: String) -> State {
        State {
            base_url,
            apps: HashMap::new(),
            keys: HashMap::new(),
            workflows: HashMap::new(),
            sessions: HashMap::new(),
            latest_by_vendor: HashMap::new(),
            by_vendor: HashMap::new(),
            entities: HashMap::new(),
            imported: HashMap::new(),
            import_counts: HashMap::new(),
            shares: 0,
            writes: 0,
            rejections: BTreeMap::new(),
            clock_offset: 0,
            deliveries: VecDeque::new(),
            deliveries_total: 0,
            deletions: Vec::new(),
        }
    }

    /// Virtual unix seconds (real time plus every `POST /sandbox/clock` advance).
    pub fn now(&self) -> i64 {
        real_now() + self.clock_offset
    }

    /// Moves the virtual clock forward; answers the new virtual time and the offset.
    pub fn advance_clock(&mut self, seconds: i64) -> (i64, i64) {
        self.clock_offset = self.clock_offset.saturating_add(seconds);
        (self.now(), self.clock_offset)
    }

    /// Counts a write request to a Didit route.
    pub fn count_write(&mut self) {
        self.writes += 1;
    }

    /// Counts an error answer of a Didit route.
    pub fn count_rejection(&mut self, code: &str) {
        *self.rejections.entry(code.to_string()).or_default() += 1;
    }

    // ---- applications, keys, workflows -------------------------------------------------------------------

    /// The caller behind `key`: 401 `invalid_api_key` for a missing, unknown or revoked key or a deleted app.
    pub fn authenticate(&self, key: Option<&str>) -> Result<Caller, ApiError> {
        let key = key
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(ApiError::InvalidApiKey)?;
        let app_id = self.keys.get(key).ok_or(ApiError::InvalidApiKey)?;
        let app = self
            .apps
            .get(app_id)
            .filter(|a| !a.deleted)
            .ok_or(ApiError::InvalidApiKey)?;
        Ok(Caller {
            application_id: app_id.clone(),
            privileges: app.privileges.clone(),
        })
    }

    /// Creates an application with its two default workflows.
    pub fn create_application(&mut self, new: NewApplication) -> Result<ApplicationInfo, ApiError> {
        let id = new.application_id.unwrap_or_else(new_id);
        if !is_uuid(&id) {
            return Err(ApiError::Validation(format!(
                "application_id `{id}` is not a uuid"
            )));
        }
        if self.apps.contains_key(&id) {
            return Err(ApiError::Validation(format!(
                "application {id} already exists"
            )));
        }
        let key = new.api_key.unwrap_or_else(random_key);
        if key.trim().is_empty() || self.keys.contains_key(&key) {
            return Err(ApiError::Validation(format!(
                "application {id}: the api_key is empty or used by another application"
            )));
        }
        let workflows = new.workflows.unwrap_or_else(|| WorkflowIds {
            user: new_id(),
            business: new_id(),
        });
        for wf in [&workflows.user, &workflows.business] {
            if !is_uuid(wf)
                || self.workflows.contains_key(wf.as_str())
                || workflows.user == workflows.business
            {
                return Err(ApiError::Validation(format!(
                    "application {id}: workflow `{wf}` is not a uuid or is not unique"
                )));
            }
        }
        let privileges = new
            .privileges
            .unwrap_or_else(|| vec![READ_SESSIONS.to_string(), WRITE_SESSIONS.to_string()]);
        for (wf, kind) in [
            (&workflows.user, SessionKind::User),
            (&workflows.business, SessionKind::Business),
        ] {
            self.workflows.insert(
                wf.clone(),
                Workflow {
                    application_id: id.clone(),
                    kind,
                },
            );
        }
        self.keys.insert(key.clone(), id.clone());
        self.apps.insert(
            id.clone(),
            Application {
                name: new.name.clone(),
                api_key: key.clone(),
                privileges: privileges.clone(),
                deleted: false,
                workflows: workflows.clone(),
                next_number: 0,
                sessions: BTreeMap::new(),
                destinations: Vec::new(),
            },
        );
        Ok(ApplicationInfo {
            name: new.name,
            application_id: id,
            api_key: Secret::new(key),
            workflows,
            privileges,
        })
    }

    fn app_info(&self, id: &str, app: &Application) -> ApplicationInfo {
        ApplicationInfo {
            name: app.name.clone(),
            application_id: id.to_string(),
            api_key: Secret::new(app.api_key.clone()),
            workflows: app.workflows.clone(),
            privileges: app.privileges.clone(),
        }
    }

    /// Every live application.
    pub fn applications(&self) -> Vec<ApplicationInfo> {
        let mut apps: Vec<ApplicationInfo> = self
            .apps
            .iter()
            .filter(|(_, a)| !a.deleted)
            .map(|(id, a)| self.app_info(id, a))
            .collect();
        apps.sort_by(|a, b| {
            a.name
                .cmp(&b.name)
                .then(a.application_id.cmp(&b.application_id))
        });
        apps
    }

    fn live_app_mut(&mut self, id: &str) -> Result<&mut Application, ApiError> {
        self.apps.get_mut(id).filter(|a| !a.deleted).ok_or_else(|| {
            ApiError::InvalidApplication(format!("Application {id} does not exist."))
        })
    }

    /// Replaces the application's key: the old one answers 401 from now on.
    pub fn revoke_key(&mut self, id: &str) -> Result<String, ApiError> {
        let key = random_key();
        let app = self.live_app_mut(id)?;
        let old = std::mem::replace(&mut app.api_key, key.clone());
        self.keys.remove(&old);
        self.keys.insert(key.clone(), id.to_string());
        Ok(key)
    }

    /// Issues one more key for the application; every key it had keeps working (a key rotation: the bridge moves to
    /// the new key, then the old one is revoked with [`State::revoke_key`], which leaves this one valid).
    pub fn add_key(&mut self, id: &str) -> Result<String, ApiError> {
        self.live_app_mut(id)?;
        let key = random_key();
        self.keys.insert(key.clone(), id.to_string());
        Ok(key)
    }

    /// Soft-deletes an application: its key stops working and tokens can no longer name it.
    pub fn delete_application(&mut self, id: &str) -> Result<(), ApiError> {
        let app = self.live_app_mut(id)?;
        app.deleted = true;
        Ok(())
    }

    /// Adds a workflow of `kind`; answers its id.
    pub fn add_workflow(&mut self, app_id: &str, kind: SessionKind) -> Result<String, ApiError> {
        self.live_app_mut(app_id)?;
        let id = new_id();
        self.workflows.insert(
            id.clone(),
            Workflow {
                application_id: app_id.to_string(),
                kind,
            },
        );
        Ok(id)
    }

    /// Removes a workflow of the application (sessions that ran in it stay).
    pub fn remove_workflow(&mut self, app_id: &str, workflow_id: &str) -> Result<(), ApiError> {
        self.live_app_mut(app_id)?;
        match self.workflows.get(workflow_id) {
            Some(w) if w.application_id == app_id => {
                self.workflows.remove(workflow_id);
                Ok(())
            }
            _ => Err(ApiError::WorkflowNotFound(format!(
                "Workflow {workflow_id} not found in application {app_id}."
            ))),
        }
    }

    fn workflow_of(&self, app_id: &str, workflow_id: &str) -> Result<SessionKind, ApiError> {
        match self.workflows.get(workflow_id) {
            Some(w) if w.application_id == app_id => Ok(w.kind),
            _ => Err(ApiError::WorkflowNotFound(
                "workflow_id not found in your application.".to_string(),
            )),
        }
    }

    // ---- sessions ----------------------------------------------------------------------------------------

    /// Stores a new session (creating its vendor entity when missing) and answers a copy.
    pub fn insert_session(&mut self, new: NewSession) -> Result<Session, ApiError> {
        let app_id = new.application_id.clone();
        let workflow_id = match new.workflow_id {
            Some(wf) => {
                let kind = self.workflow_of(&app_id, &wf)?;
                if kind != new.kind {
                    return Err(ApiError::WorkflowKindMismatch(format!(
                        "Workflow {wf} is a {kind} workflow, not a {} one.",
                        new.kind
                    )));
                }
                wf
            }
            None => {
                let app = self.live_app_mut(&app_id)?;
                app.workflows.for_kind(new.kind).to_string()
            }
        };
        let id = new.session_id.unwrap_or_else(new_id);
        if !is_uuid(&id) || self.sessions.contains_key(&id) {
            return Err(ApiError::Validation(format!(
                "session_id `{id}` is not a uuid or already exists"
            )));
        }
        let now = self.now();
        let base_url = self.base_url.clone();
        let app = self.live_app_mut(&app_id)?;
        app.next_number += 1;
        let number = app.next_number;
        app.sessions.insert(number, id.clone());
        let features = match (new.features, new.generate) {
            (Some(f), _) => Some(f),
            (None, true) => Some(Arc::new(super::payload::generate(
                new.kind, new.status, number,
            ))),
            (None, false) => None,
        };
        let session_token: String = rand::rng()
            .sample_iter(&Alphanumeric)
            .take(12)
            .map(char::from)
            .collect();
        let session_url = match new.shared_from {
            None => Some(format!("{base_url}/session/{session_token}")),
            Some(_) => None,
        };
        let session = Session {
            id: id.clone(),
            application_id: app_id.clone(),
            kind: new.kind,
            status: new.status,
            workflow_id: workflow_id.clone(),
            vendor_data: new.vendor_data.clone(),
            metadata: new.metadata,
            callback: new.callback,
            number,
            session_token,
            session_url,
            created_at: now,
            shared_from: new.shared_from,
            features,
            event_id: new_id(),
            event_at: real_now(),
        };
        if let Some(vendor) = &new.vendor_data {
            self.by_vendor
                .entry((app_id.clone(), vendor.clone()))
                .or_default()
                .insert(number);
            self.latest_by_vendor
                .insert((app_id.clone(), workflow_id, vendor.clone()), id.clone());
            self.entities
                .entry((app_id, new.kind, vendor.clone()))
                .or_insert_with(|| Entity {
                    id: new_id(),
                    sessions: 0,
                })
                .sessions += 1;
        }
        self.sessions.insert(id, session.clone());
        Ok(session)
    }

    /// `POST /v3/session/`: a new `Not Started` session, or the caller's latest unfinished session for the same
    /// workflow and `vendor_data` (with `callback` and `metadata` updated). The flag says whether it is new.
    pub fn create_session(
        &mut self,
        caller: &Caller,
        workflow_id: &str,
        vendor_data: Option<String>,
        metadata: Option<Value>,
        callback: Option<String>,
    ) -> Result<(Session, bool), ApiError> {
        let kind = self.workflow_of(&caller.application_id, workflow_id)?;
        if let Some(vendor) = &vendor_data {
            let key = (
                caller.application_id.clone(),
                workflow_id.to_string(),
                vendor.clone(),
            );
            let reusable = self
                .latest_by_vendor
                .get(&key)
                .and_then(|id| self.sessions.get_mut(id))
                .filter(|s| {
                    matches!(
                        s.status,
                        SessionStatus::NotStarted
                            | SessionStatus::InProgress
                            | SessionStatus::Resubmitted
                            | SessionStatus::AwaitingUser
                    )
                });
            if let Some(existing) = reusable {
                if callback.is_some() {
                    existing.callback = callback;
                }
                if metadata.is_some() {
                    existing.metadata = metadata;
                }
                return Ok((existing.clone(), false));
            }
        }
        let session = self.insert_session(NewSession {
            application_id: caller.application_id.clone(),
            kind,
            status: SessionStatus::NotStarted,
            workflow_id: Some(workflow_id.to_string()),
            vendor_data,
            metadata,
            callback,
            session_id: None,
            features: None,
            generate: false,
            shared_from: None,
        })?;
        Ok((session, true))
    }

    /// A session of the caller's application (another application's session is 404, as Didit does).
    pub fn session_for(&self, caller: &Caller, id: &str) -> Result<&Session, ApiError> {
        self.sessions
            .get(id)
            .filter(|s| s.application_id == caller.application_id)
            .ok_or_else(ApiError::session_not_found)
    }

    /// Any session, for the control routes.
    pub fn session(&self, id: &str) -> Result<&Session, ApiError> {
        self.sessions
            .get(id)
            .ok_or_else(ApiError::session_not_found)
    }

    /// `PATCH /v3/session/{id}/update-status/`: answers the session and whether its status changed.
    pub fn update_status(
        &mut self,
        caller: &Caller,
        id: &str,
        new_status: SessionStatus,
    ) -> Result<(Session, bool), ApiError> {
        let session = self.session_for(caller, id)?;
        if !matches!(
            new_status,
            SessionStatus::Approved | SessionStatus::Declined | SessionStatus::Resubmitted
        ) {
            return Err(ApiError::Validation(
                "new_status must be one of Approved, Declined, Resubmitted.".to_string(),
            ));
        }
        if !matches!(
            session.status,
            SessionStatus::Approved
                | SessionStatus::Declined
                | SessionStatus::InReview
                | SessionStatus::KycExpired
                | SessionStatus::Abandoned
                | SessionStatus::Resubmitted
        ) {
            return Err(ApiError::Validation(format!(
                "The status of a session in {} cannot be updated: only Approved, Declined, In Review, Kyc Expired, \
                 Abandoned or Resubmitted sessions can.",
                session.status_str()
            )));
        }
        if session.status == new_status {
            return Ok((session.clone(), false));
        }
        Ok((self.change_status(id, new_status, false), true))
    }

    /// Sets any status (the control route that plays the end user); regenerates the payload of a session that
    /// was not imported, so its feature statuses follow.
    pub fn set_status(
        &mut self,
        id: &str,
        status: SessionStatus,
    ) -> Result<(Session, bool), ApiError> {
        let session = self.session(id)?;
        if session.status == status {
            return Ok((session.clone(), false));
        }
        Ok((self.change_status(id, status, true), true))
    }

    fn change_status(&mut self, id: &str, status: SessionStatus, regenerate: bool) -> Session {
        let session = self.sessions.get_mut(id).expect("checked by the caller");
        session.status = status;
        session.event_id = new_id();
        session.event_at = real_now();
        if regenerate && session.shared_from.is_none() {
            session.features = if status == SessionStatus::NotStarted {
                None
            } else {
                Some(Arc::new(super::payload::generate(
                    session.kind,
                    status,
                    session.number,
                )))
            };
        }
        session.clone()
    }

    /// `DELETE /v3/session/{id}/delete/` (and the control route): the session is gone.
    pub fn delete_session(&mut self, caller: Option<&Caller>, id: &str) -> Result<(), ApiError> {
        match caller {
            Some(c) => self.session_for(c, id)?,
            None => self.session(id)?,
        };
        let session = self.sessions.remove(id).expect("checked above");
        self.deletions.push(super::model::Deletion {
            session_id: session.id.clone(),
            application_id: session.application_id.clone(),
            shared_from_session: session.shared_from.clone(),
        });
        if let Some(app) = self.apps.get_mut(&session.application_id) {
            app.sessions.remove(&session.number);
        }
        if let Some(vendor) = session.vendor_data {
            let index = (session.application_id.clone(), vendor.clone());
            if let Some(numbers) = self.by_vendor.get_mut(&index) {
                numbers.remove(&session.number);
                if numbers.is_empty() {
                    self.by_vendor.remove(&index);
                }
            }
            let key = (session.application_id, session.workflow_id, vendor);
            if self.latest_by_vendor.get(&key) == Some(&session.id) {
                self.latest_by_vendor.remove(&key);
            }
        }
        Ok(())
    }

    /// `GET /v3/sessions/`: per kind asked for (Didit lists KYC and KYB apart; `all` concatenates one page of
    /// each), the sessions matching every filter, newest first. Answers the total count, whether any kind has rows
    /// past this page, and the page. A `vendor_data` filter reads an index; without one the application's
    /// sessions are paged through (the list is for reconciliation, not for the request path).
    pub fn list_sessions(
        &self,
        caller: &Caller,
        filter: &ListFilter,
        limit: usize,
        offset: usize,
    ) -> (usize, bool, Vec<Value>) {
        let Some(app) = self.apps.get(&caller.application_id) else {
            return (0, false, Vec::new());
        };
        let numbers: Box<dyn DoubleEndedIterator<Item = &i64> + '_> = match &filter.vendor_data {
            Some(vendor) => match self
                .by_vendor
                .get(&(caller.application_id.clone(), vendor.clone()))
            {
                Some(numbers) => Box::new(numbers.iter()),
                None => Box::new(std::iter::empty()),
            },
            None => Box::new(app.sessions.keys()),
        };
        let matching: Vec<&Session> = numbers
            .rev()
            .filter_map(|n| app.sessions.get(n))
            .filter_map(|id| self.sessions.get(id))
            .filter(|s| filter.matches(s))
            .collect();
        let mut count = 0;
        let mut more = false;
        let mut page = Vec::new();
        for kind in &filter.kinds {
            let of_kind: Vec<&&Session> = matching.iter().filter(|s| s.kind == *kind).collect();
            count += of_kind.len();
            more |= of_kind.len() > offset + limit;
            page.extend(
                of_kind
                    .into_iter()
                    .skip(offset)
                    .take(limit)
                    .map(|s| s.summary()),
            );
        }
        (count, more, page)
    }

    // ---- share and import --------------------------------------------------------------------------------

    /// `POST /v3/session/{id}/share/` after authentication and the privilege check. Checks, in order: the
    /// session (404), `ttl_in_seconds` (400 `invalid_ttl`), `for_application_id` (400 `invalid_application`),
    /// the session's status (400 `session_not_finished`); then mints.
    pub fn share(
        &mut self,
        caller: &Caller,
        id: &str,
        body: &Map<String, Value>,
        key: &TokenKey,
    ) -> Result<ShareResponse, ApiError> {
        let session = self.session_for(caller, id)?;
        let ttl = match body.get("ttl_in_seconds") {
            None | Some(Value::Null) => TTL_DEFAULT,
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.as_i64().unwrap_or(i64::MAX),
            Some(_) => {
                return Err(ApiError::InvalidTtl(format!(
                    "ttl_in_seconds must be an integer between {TTL_MIN} and {TTL_MAX}."
                )));
            }
        };
        if !(TTL_MIN..=TTL_MAX).contains(&ttl) {
            return Err(ApiError::InvalidTtl(format!(
                "ttl_in_seconds must be an integer between {TTL_MIN} and {TTL_MAX}."
            )));
        }
        let for_app = match body.get("for_application_id") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
            _ => {
                return Err(ApiError::InvalidApplication(
                    "for_application_id is required.".to_string(),
                ));
            }
        };
        if for_app == caller.application_id {
            return Err(ApiError::InvalidApplication(
                "for_application_id must differ from the calling application.".to_string(),
            ));
        }
        if self.apps.get(&for_app).is_none_or(|a| a.deleted) {
            return Err(ApiError::InvalidApplication(format!(
                "Application {for_app} does not exist."
            )));
        }
        if !session.status.is_finished() {
            return Err(ApiError::SessionNotFinished(format!(
                "{NOT_FINISHED_DETAIL} This session is {}.",
                session.status_str()
            )));
        }
        let iat = self.now();
        let claims = ShareTokenClaims {
            session_id: session.id.clone(),
            session_kind: Some(session.kind),
            from_application_id: caller.application_id.clone(),
            for_application_id: for_app.clone(),
            iat,
            exp: iat + ttl,
        };
        let kind = session.kind;
        let token = key.mint(&claims);
        self.shares += 1;
        Ok(ShareResponse {
            share_token: ShareToken::new(token),
            for_application_id: for_app,
            session_kind: Some(kind),
        })
    }

    /// `POST /v3/session/import-shared/` after authentication, body validation and the token's signature.
    /// Checks, in order: expiry (401), the token's application (403), the workflow (404), its kind (400), a
    /// previous import of this token here (403), the source session (404); then clones.
    pub fn import(&mut self, caller: &Caller, input: ImportInput) -> Result<Session, ApiError> {
        let claims = &input.claims;
        if self.now() >= claims.exp {
            return Err(ApiError::ShareTokenExpired(
                "Share token invalid or expired: it is past its expiry; ask for a new one."
                    .to_string(),
            ));
        }
        if claims.for_application_id != caller.application_id {
            return Err(ApiError::TokenNotForApplication(
                "This share token is not intended for your application.".to_string(),
            ));
        }
        let kind = claims.session_kind.unwrap_or(SessionKind::User);
        let workflow_kind = self.workflow_of(&caller.application_id, &input.workflow_id)?;
        if workflow_kind != kind {
            return Err(ApiError::WorkflowKindMismatch(format!(
                "The share token is for a {kind} session but workflow {} is a {workflow_kind} workflow.",
                input.workflow_id
            )));
        }
        let digest: [u8; 32] = Sha256::digest(input.token.as_bytes()).into();
        let dedupe_key = (digest, caller.application_id.clone());
        if self.imported.contains_key(&dedupe_key) {
            return Err(ApiError::AlreadyImported(
                "This session has already been imported into your application.".to_string(),
            ));
        }
        let source = self
            .sessions
            .get(&claims.session_id)
            .filter(|s| s.application_id == claims.from_application_id)
            .ok_or_else(|| ApiError::SessionNotFound(SOURCE_GONE_DETAIL.to_string()))?;
        let status = if input.trust_review {
            source.status
        } else {
            SessionStatus::InReview
        };
        let new = NewSession {
            application_id: caller.application_id.clone(),
            kind: source.kind,
            status,
            workflow_id: Some(input.workflow_id.clone()),
            vendor_data: input.vendor_data.clone(),
            metadata: None,
            callback: None,
            session_id: None,
            features: source.features.clone(),
            generate: source.features.is_none(),
            shared_from: Some(source.id.clone()),
        };
        let source_id = source.id.clone();
        let session = self.insert_session(new)?;
        self.imported.insert(dedupe_key, session.id.clone());
        *self
            .import_counts
            .entry((source_id, caller.application_id.clone()))
            .or_default() += 1;
        Ok(session)
    }

    // ---- webhooks ----------------------------------------------------------------------------------------

    /// `POST /v3/webhook/destinations/` with a validated body; answers the destination with its secret.
    #[allow(clippy::too_many_arguments)]
    pub fn create_destination(
        &mut self,
        caller: &Caller,
        label: String,
        url: String,
        enabled: bool,
        webhook_version: String,
        secret: Option<String>,
        subscribed_events: Vec<String>,
    ) -> Result<Value, ApiError> {
        let now = self.now();
        let app = self.live_app_mut(&caller.application_id)?;
        let destination = Destination {
            uuid: new_id(),
            label,
            url,
            enabled,
            webhook_version,
            secret: Secret::new(secret.unwrap_or_else(|| format!("whsec_{}", random_key()))),
            subscribed_events,
            created_at: now,
            updated_at: now,
            deliveries_count: 0,
            failed_deliveries_count: 0,
            last_delivery_at: None,
        };
        let answer = destination.to_json(true);
        app.destinations.push(destination);
        Ok(answer)
    }

    /// `GET /v3/webhook/destinations/`: oldest first, without secrets.
    pub fn list_destinations(&self, caller: &Caller) -> Vec<Value> {
        self.apps
            .get(&caller.application_id)
            .map(|a| a.destinations.iter().map(|d| d.to_json(false)).collect())
            .unwrap_or_default()
    }

    /// `GET /v3/webhook/destinations/{uuid}/`: one destination with its secret.
    pub fn destination(&self, caller: &Caller, uuid: &str) -> Result<Value, ApiError> {
        self.apps
            .get(&caller.application_id)
            .and_then(|a| a.destinations.iter().find(|d| d.uuid == uuid))
            .map(|d| d.to_json(true))
            .ok_or(ApiError::NotFound)
    }

    /// The enabled destinations of `app_id` subscribed to `event`.
    pub fn webhook_targets(&self, app_id: &str, event: &str) -> Vec<WebhookTarget> {
        self.apps
            .get(app_id)
            .map(|a| {
                a.destinations
                    .iter()
                    .filter(|d| d.enabled && d.subscribed_events.iter().any(|e| e == event))
                    .map(|d| WebhookTarget {
                        uuid: d.uuid.clone(),
                        url: d.url.clone(),
                        secret: d.secret.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Remembers a finished delivery and updates its destination's counters.
    pub fn record_delivery(&mut self, delivery: WebhookDelivery) {
        if let Some(d) = self.apps.get_mut(&delivery.application_id).and_then(|a| {
            a.destinations
                .iter_mut()
                .find(|d| d.uuid == delivery.destination_uuid)
        }) {
            d.deliveries_count += 1;
            if !delivery.delivered {
                d.failed_deliveries_count += 1;
            }
            d.last_delivery_at = Some(real_now());
        }
        self.deliveries_total += 1;
        if self.deliveries.len() == DELIVERY_HISTORY {
            self.deliveries.pop_front();
        }
        self.deliveries.push_back(delivery);
    }

    /// The remembered deliveries, oldest first.
    pub fn deliveries(&self) -> Vec<WebhookDelivery> {
        self.deliveries.iter().cloned().collect()
    }

    // ---- reporting ---------------------------------------------------------------------------------------

    /// `GET /sandbox/stats`.
    pub fn stats(&self) -> Stats {
        let mut imports: Vec<ImportCount> = self
            .import_counts
            .iter()
            .map(|((source, app), count)| ImportCount {
                source_session_id: source.clone(),
                application_id: app.clone(),
                count: *count,
            })
            .collect();
        imports.sort_by(|a, b| {
            (a.source_session_id.as_str(), a.application_id.as_str())
                .cmp(&(b.source_session_id.as_str(), b.application_id.as_str()))
        });
        Stats {
            shares: self.shares,
            imports,
            rejections: self.rejections.clone(),
            writes: self.writes,
            entities: self.entities.len() as u64,
            sessions: self.sessions.len() as u64,
            webhook_deliveries: self.deliveries_total,
            deletions: self.deletions.clone(),
        }
    }

    /// The vendor entities of one application.
    pub fn entities(&self, app_id: &str) -> Vec<EntityInfo> {
        let mut list: Vec<EntityInfo> = self
            .entities
            .iter()
            .filter(|((app, _, _), _)| app == app_id)
            .map(|((app, kind, vendor), e)| EntityInfo {
                entity_id: e.id.clone(),
                application_id: app.clone(),
                session_kind: *kind,
                vendor_data: vendor.clone(),
                sessions: e.sessions,
            })
            .collect();
        list.sort_by(|a, b| {
            (a.session_kind, &a.vendor_data).cmp(&(b.session_kind, &b.vendor_data))
        });
        list
    }
}
