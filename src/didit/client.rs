//! The typed Didit client: one pooled HTTPS client per Didit application, whose every call ends in either the
//! parsed answer or one [`DiditError`] with its [`Disposition`] (the tables of DESIGN.md §4, implemented in
//! [`super::error`]).
//!
//! It owns the HTTP side only: the API key (held behind a lock, re-read from its file by [`DiditClient::reload_key`]
//! so a rotated key needs no restart), timeouts, the `didit_requests_total` / `didit_request_duration_seconds`
//! metrics and a debug line per call. It never retries: whether and when to try again is the pipelines' decision,
//! made from the disposition. Its one wait is before a write, for room in the API key's budget under Didit's rate
//! limit ([`super::pacing`]), bounded by the caller's deadline. Redirects are not followed, because reqwest would carry the
//! custom `x-api-key` header to whatever host a redirect names.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{ACCEPT, HeaderMap, HeaderValue};
use reqwest::{RequestBuilder, Url};
use serde::de::DeserializeOwned;
use tracing::Instrument;

use super::error::{Answer, Context, Verdict, classify, resolve_probe, retry_after, scrub};
pub use super::error::{DiditError, Disposition, Operation};
use super::pacing::{Budget, Pacing};
use super::wire::{
    ImportRequest, ImportedSession, SessionDecision, SessionKind, SessionPage, SessionSummary,
    ShareRequest, ShareResponse, ShareTokenClaims,
};
use crate::config::DiditAccess;
use crate::keys::Watched;
use crate::metrics::Metrics;
use crate::secret::{Secret, SecretSource, redact_url};

/// The `User-Agent` of every call.
pub const USER_AGENT: &str = concat!("partner-bridge/", env!("CARGO_PKG_VERSION"));

/// The header Didit reads the API key from.
pub const API_KEY_HEADER: &str = "x-api-key";

/// Answers larger than this are refused rather than buffered (a decision with every feature is tens of KiB).
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Which kinds `GET /v3/sessions/` lists: Didit's default is KYC only; `all` concatenates a KYC and a KYB page
/// (up to twice `limit` rows per page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindFilter {
    /// KYC sessions (Didit's default).
    User,
    /// KYB sessions.
    Business,
    /// Both.
    All,
}

impl KindFilter {
    fn as_str(self) -> &'static str {
        match self {
            KindFilter::User => "user",
            KindFilter::Business => "business",
            KindFilter::All => "all",
        }
    }
}

impl From<SessionKind> for KindFilter {
    fn from(kind: SessionKind) -> Self {
        match kind {
            SessionKind::User => KindFilter::User,
            SessionKind::Business => KindFilter::Business,
        }
    }
}

/// The documented filters of `GET /v3/sessions/` (docs.didit.me/sessions-api/list-sessions), ANDed by Didit.
/// `None` leaves a filter out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionQuery {
    /// Exact `vendor_data`.
    pub vendor_data: Option<String>,
    /// A status, in either casing (`APPROVED`, `In Review`, …).
    pub status: Option<String>,
    /// Kinds listed (Didit's default: `user`).
    pub session_kind: Option<KindFilter>,
    /// Sessions of one workflow.
    pub workflow_id: Option<String>,
    /// Created on or after this day (ISO 8601 date).
    pub date_from: Option<chrono::NaiveDate>,
    /// Created on or before this day.
    pub date_to: Option<chrono::NaiveDate>,
    /// Page size (Didit's default 50).
    pub limit: Option<u32>,
    /// Rows to skip (Didit's default 0): where a resumed listing starts.
    pub offset: Option<u64>,
}

/// What [`DiditClient::list_sessions`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionListing {
    /// Every row read, newest first within each page.
    pub sessions: Vec<SessionSummary>,
    /// False when `max_pages` ran out while Didit still offered a `next` page.
    pub complete: bool,
}

/// One page of `GET /v3/sessions/`, as [`DiditClient::list_page`] read it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListedPage {
    /// Didit's `count` of matching sessions (exact for KYC, capped at 100 for KYB).
    pub count: Option<u64>,
    /// The rows, newest first.
    pub results: Vec<SessionSummary>,
    /// Where the next page is; `None` on the last page.
    pub next: Option<PageLink>,
}

/// A `next` link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageLink {
    /// The next page's query string (to pass back to [`DiditClient::list_page`]).
    Next(String),
    /// Didit named a next page in a form that cannot be followed (no URL, or no query): the listing stops here.
    Unusable,
}

impl PageLink {
    /// The `offset` parameter of the next page, when it has one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            PageLink::Next(query) => url_offset(query),
            PageLink::Unusable => None,
        }
    }
}

fn url_offset(query: &str) -> Option<u64> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == "offset")
        .and_then(|(_, v)| v.trim().parse().ok())
}

/// A client for one Didit application. Cheap to clone (an `Arc` inside); clones share the connection pool and the
/// current API key. `Debug` shows where the key comes from, never the key.
#[derive(Clone)]
pub struct DiditClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: Url,
    application_id: String,
    key_source: SecretSource,
    key: KeyHolder,
    metrics: Arc<Metrics>,
    timeout: Duration,
    connect_timeout: Duration,
    /// The key's write budget, shared with every other client of the same key (`None`: unpaced).
    budget: Option<Arc<Budget>>,
}

/// The key in use: given inline, or from a file whose every change is picked up on the next call (one `stat` per
/// call; see [`crate::keys::Watched`]), so rotating the file switches keys without a restart, paused or not.
enum KeyHolder {
    Inline(CurrentKey),
    File(Watched<CurrentKey>),
}

/// The key as loaded, and the header value made from it (marked sensitive, so HTTP/2 never indexes it).
struct CurrentKey {
    secret: Secret,
    header: HeaderValue,
}

/// A complete HTTP answer.
struct Raw {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl DiditClient {
    /// Builds the client: loads the API key, installs rustls' ring provider (once per process) and sets up one
    /// connection pool with `access`'s connect and request timeouts. Fails with [`DiditError::Config`] when the
    /// base URL is unusable or the key cannot be read.
    pub fn new(access: &DiditAccess, metrics: Arc<Metrics>) -> Result<DiditClient, DiditError> {
        Self::build(access, metrics, None)
    }

    /// [`DiditClient::new`], with its writes paced by the budget `pacing` keeps for its API key (shared with every
    /// other client of the key); `role` names the budget in metrics.
    pub fn paced(
        access: &DiditAccess,
        metrics: Arc<Metrics>,
        pacing: &Pacing,
        role: &str,
    ) -> Result<DiditClient, DiditError> {
        Self::build(access, metrics, Some((pacing, role)))
    }

    fn build(
        access: &DiditAccess,
        metrics: Arc<Metrics>,
        pacing: Option<(&Pacing, &str)>,
    ) -> Result<DiditClient, DiditError> {
        // reqwest is built with `rustls-no-provider`; without a process default it would panic on the first
        // client. Whoever installs first wins, and any provider will do, so the result is ignored.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = Url::parse(access.base_url.trim_end_matches('/'))
            .map_err(|e| DiditError::Config(format!("didit.base_url is not a URL: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(DiditError::Config(format!(
                "didit.base_url must be an http:// or https:// URL (got {})",
                redact_url(base.as_str())
            )));
        }
        let key = match &access.api_key {
            SecretSource::Inline(_) => KeyHolder::Inline(
                load_key(&access.api_key).map_err(|e| DiditError::Config(e.to_string()))?,
            ),
            SecretSource::File(path) => {
                let p = path.clone();
                KeyHolder::File(
                    Watched::new(
                        "api_key_file",
                        path,
                        move |text| {
                            key_from(Secret::new(text.trim()))
                                .map_err(|e| format!("the API key file {}: {e}", p.display()))
                        },
                        Some(metrics.clone()),
                    )
                    .map_err(|e| {
                        DiditError::Config(format!("cannot read the API key file: {e}"))
                    })?,
                )
            }
        };
        // Keyed by the key first loaded: a rotated key keeps its budget (Didit starts the new key afresh, so this
        // only errs on the slow side for one window).
        let first = match &key {
            KeyHolder::Inline(k) => k.secret.clone(),
            KeyHolder::File(w) => w.current().secret.clone(),
        };
        let budget = pacing.map(|(pacing, role)| pacing.budget(first.expose(), role));
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(access.connect_timeout)
            .timeout(access.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .tcp_keepalive(Duration::from_secs(60))
            .build()
            .map_err(|e| {
                DiditError::Config(format!("cannot build the HTTP client: {}", describe(e)))
            })?;
        Ok(DiditClient {
            inner: Arc::new(Inner {
                http,
                base,
                application_id: access.application_id.clone(),
                key_source: access.api_key.clone(),
                key,
                metrics,
                timeout: access.timeout,
                connect_timeout: access.connect_timeout,
                budget,
            }),
        })
    }

    /// The write budget of this client's key, when paced.
    pub fn budget(&self) -> Option<&Arc<Budget>> {
        self.inner.budget.as_ref()
    }

    /// This side's Didit application id.
    pub fn application_id(&self) -> &str {
        &self.inner.application_id
    }

    /// Mints a share token for `session_id`, usable only by `for_application_id`, valid `ttl_seconds`
    /// (`POST /v3/session/{id}/share/`). 200, 201 and any other 2xx with a readable body are success.
    pub async fn share(
        &self,
        session_id: &str,
        for_application_id: &str,
        ttl_seconds: u32,
    ) -> Result<ShareResponse, DiditError> {
        self.share_by(session_id, for_application_id, ttl_seconds, None)
            .await
    }

    /// [`DiditClient::share`], refused with [`DiditError::Paced`] (without calling Didit) when the key's write budget
    /// has no room before `deadline`.
    pub async fn share_by(
        &self,
        session_id: &str,
        for_application_id: &str,
        ttl_seconds: u32,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<ShareResponse, DiditError> {
        let url = self.session_url(session_id, "share")?;
        let body = ShareRequest {
            for_application_id: for_application_id.to_string(),
            ttl_in_seconds: Some(i64::from(ttl_seconds)),
        };
        let request = self.inner.http.post(url).json(&body);
        let raw = self.exchange(Operation::Share, request, deadline).await?;
        match self.classify(Operation::Share, &raw, None, None) {
            Verdict::Success => {
                let answer: ShareResponse = parse(Operation::Share, &raw, &self.secrets(None))?;
                // A token we cannot use, or one for another partner, must never be published.
                let problem = if answer.share_token.expose().trim().is_empty() {
                    Some("share succeeded but the answer holds no share token".to_string())
                } else if answer.for_application_id != for_application_id {
                    Some(format!(
                        "share succeeded but the token is for application {}, not {for_application_id}",
                        answer.for_application_id
                    ))
                } else {
                    None
                };
                match problem {
                    Some(detail) => Err(DiditError::Unexpected {
                        status: raw.status,
                        detail: Some(detail),
                    }),
                    None => Ok(answer),
                }
            }
            Verdict::Failed(e) => Err(e),
            // Only an import's 401 is ever ambiguous; should the table change, a share 401 is about the key.
            Verdict::AskProbe { detail } => Err(DiditError::ApiKeyRejected {
                status: raw.status,
                detail,
            }),
        }
    }

    /// Imports a shared session into this application (`POST /v3/session/import-shared/`). An ambiguous 401 (no
    /// code, no telling detail) costs one extra call, [`DiditClient::probe`], to learn whether the key or the token
    /// was refused.
    pub async fn import(&self, req: &ImportRequest) -> Result<SessionDecision, DiditError> {
        self.import_as(req, None).await
    }

    /// [`DiditClient::import`], refused with [`DiditError::Paced`] (without calling Didit) when the key's write
    /// budget has no room before `deadline`; the answer is read only as far as [`ImportedSession`] goes (the
    /// receiver's path: the full decision's feature reports cost more to decode than the rest of the import).
    pub async fn import_by(
        &self,
        req: &ImportRequest,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<ImportedSession, DiditError> {
        self.import_as(req, deadline).await
    }

    /// The import, its answer decoded as `T`: the whole decision, or only what the receiver reads of it.
    async fn import_as<T: DeserializeOwned>(
        &self,
        req: &ImportRequest,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<T, DiditError> {
        let url = self.url(&["v3", "session", "import-shared", ""]);
        let token = req.share_token.expose();
        let claims = ShareTokenClaims::peek(token);
        let request = self.inner.http.post(url).json(req);
        let raw = self.exchange(Operation::Import, request, deadline).await?;
        match self.classify(Operation::Import, &raw, claims.as_ref(), Some(token)) {
            Verdict::Success => parse(Operation::Import, &raw, &self.secrets(Some(token))),
            Verdict::Failed(e) => Err(e),
            Verdict::AskProbe { detail } => {
                tracing::debug!(
                    operation = "import",
                    "Didit's 401 names neither the key nor the token; probing the key"
                );
                let probe = self.probe().await;
                Err(resolve_probe(
                    probe,
                    detail,
                    claims.as_ref(),
                    SystemTime::now(),
                ))
            }
        }
    }

    /// Reads a session's decision (`GET /v3/session/{id}/decision/`).
    pub async fn decision(&self, session_id: &str) -> Result<SessionDecision, DiditError> {
        let url = self.session_url(session_id, "decision")?;
        let raw = self
            .exchange(Operation::Decision, self.inner.http.get(url), None)
            .await?;
        match self.classify(Operation::Decision, &raw, None, None) {
            Verdict::Success => parse(Operation::Decision, &raw, &self.secrets(None)),
            Verdict::Failed(e) => Err(e),
            Verdict::AskProbe { detail } => Err(DiditError::ApiKeyRejected {
                status: raw.status,
                detail,
            }),
        }
    }

    /// Deletes a session of this application (`DELETE /v3/session/{id}/delete/`). `Ok(true)` when Didit deleted
    /// it (any 2xx, 204 as documented), `Ok(false)` when it answers 404 (deleted before, or never here): either way
    /// the session is gone. Paced like every write.
    pub async fn delete_session(
        &self,
        session_id: &str,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<bool, DiditError> {
        let url = self.session_url(session_id, "delete")?;
        let raw = self
            .exchange(Operation::Delete, self.inner.http.delete(url), deadline)
            .await?;
        match self.classify(Operation::Delete, &raw, None, None) {
            Verdict::Success => Ok(true),
            Verdict::Failed(DiditError::SessionNotFound { .. }) => Ok(false),
            Verdict::Failed(e) => Err(e),
            Verdict::AskProbe { detail } => Err(DiditError::ApiKeyRejected {
                status: raw.status,
                detail,
            }),
        }
    }

    /// Is the API key accepted? (`GET /v3/sessions/?limit=1`, body ignored.) `Ok` on any 2xx; a refused key is
    /// [`DiditError::ApiKeyRejected`]; anything else (timeout, 5xx, …) means the question could not be answered.
    pub async fn probe(&self) -> Result<(), DiditError> {
        let mut url = self.url(&["v3", "sessions", ""]);
        url.set_query(Some("limit=1"));
        let raw = self
            .exchange(Operation::Probe, self.inner.http.get(url), None)
            .await?;
        match self.classify(Operation::Probe, &raw, None, None) {
            Verdict::Success => Ok(()),
            Verdict::Failed(e) => Err(e),
            Verdict::AskProbe { detail } => Err(DiditError::ApiKeyRejected {
                status: raw.status,
                detail,
            }),
        }
    }

    /// Lists this application's sessions matching `query` (`GET /v3/sessions/`), following `next` for at most
    /// `max_pages` pages. Only the query string of a `next` URL is used, applied to `didit.base_url`: the API key is
    /// never sent to whatever host a `next` link names. Errors are classified like every other call (a 401/403 is
    /// the key, a 429 carries its wait, a 5xx or a timeout is retryable).
    pub async fn list_sessions(
        &self,
        query: &SessionQuery,
        max_pages: usize,
    ) -> Result<SessionListing, DiditError> {
        let mut listing = SessionListing::default();
        let mut next = None;
        for _ in 0..max_pages.max(1) {
            let page = self.list_page(query, next.as_deref()).await?;
            listing.sessions.extend(page.results);
            match page.next {
                Some(PageLink::Next(link)) => next = Some(link),
                Some(PageLink::Unusable) => return Ok(listing),
                None => {
                    listing.complete = true;
                    return Ok(listing);
                }
            }
        }
        Ok(listing)
    }

    /// One page of `GET /v3/sessions/`: the first page of `query` when `next` is `None`, else the page a previous
    /// answer's [`PageLink::Next`] names (only its query string is used, applied to `didit.base_url`).
    pub async fn list_page(
        &self,
        query: &SessionQuery,
        next: Option<&str>,
    ) -> Result<ListedPage, DiditError> {
        let mut url = self.url(&["v3", "sessions", ""]);
        match next {
            Some(query_string) => url.set_query(Some(query_string)),
            None => {
                let mut pairs = url.query_pairs_mut();
                let day = |d: chrono::NaiveDate| d.format("%Y-%m-%d").to_string();
                for (name, value) in [
                    ("vendor_data", query.vendor_data.clone()),
                    ("status", query.status.clone()),
                    (
                        "session_kind",
                        query.session_kind.map(|k| k.as_str().to_string()),
                    ),
                    ("workflow_id", query.workflow_id.clone()),
                    ("date_from", query.date_from.map(day)),
                    ("date_to", query.date_to.map(day)),
                    ("limit", query.limit.map(|l| l.to_string())),
                    ("offset", query.offset.map(|o| o.to_string())),
                ] {
                    if let Some(value) = value {
                        pairs.append_pair(name, &value);
                    }
                }
            }
        }
        let raw = self
            .exchange(Operation::List, self.inner.http.get(url), None)
            .await?;
        let page: SessionPage = match self.classify(Operation::List, &raw, None, None) {
            Verdict::Success => parse(Operation::List, &raw, &self.secrets(None))?,
            Verdict::Failed(e) => return Err(e),
            Verdict::AskProbe { detail } => {
                return Err(DiditError::ApiKeyRejected {
                    status: raw.status,
                    detail,
                });
            }
        };
        let next =
            page.next
                .as_deref()
                .filter(|n| !n.trim().is_empty())
                .map(
                    |n| match Url::parse(n).or_else(|_| self.inner.base.join(n)) {
                        Ok(url) => match url.query() {
                            Some(q) => PageLink::Next(q.to_string()),
                            None => PageLink::Unusable,
                        },
                        // A `next` that is not a URL: what was read is all that can be read.
                        Err(_) => PageLink::Unusable,
                    },
                );
        Ok(ListedPage {
            count: page.count,
            results: page.results,
            next,
        })
    }

    /// Re-reads the API key from its file (a rotated secret). `Ok(true)` when the key changed, `Ok(false)` when it
    /// is the same or was given inline; an unreadable, empty or unsendable file is an error and the current key
    /// stays in use.
    pub fn reload_key(&self) -> io::Result<bool> {
        match &self.inner.key {
            KeyHolder::Inline(_) => Ok(false),
            KeyHolder::File(file) => file
                .reload()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }

    /// `base` + segments, each percent-encoded (a session id can never change the path's shape).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.inner.base.clone();
        url.path_segments_mut()
            .expect("checked in new(): the base URL can be a base")
            .pop_if_empty()
            .extend(segments);
        url
    }

    /// `/v3/session/{id}/{action}/`. `.` and `..` would be dropped from the path by URL normalisation and aim the
    /// call at another endpoint, so they (and an empty id) are refused without calling Didit.
    fn session_url(&self, session_id: &str, action: &str) -> Result<Url, DiditError> {
        if matches!(session_id.trim(), "" | "." | "..") {
            return Err(DiditError::SessionNotFound {
                detail: Some(format!("{session_id:?} is not a session id")),
            });
        }
        Ok(self.url(&["v3", "session", session_id, action, ""]))
    }

    fn current_key(&self) -> (Secret, HeaderValue) {
        match &self.inner.key {
            KeyHolder::Inline(key) => (key.secret.clone(), key.header.clone()),
            KeyHolder::File(file) => {
                let key = file.current();
                (key.secret.clone(), key.header.clone())
            }
        }
    }

    /// The strings scrubbed from anything Didit sends back: the key in use and, on import, the token.
    fn secrets(&self, token: Option<&str>) -> Vec<String> {
        let mut secrets = vec![self.current_key().0.expose().to_string()];
        secrets.extend(token.map(str::to_string));
        secrets
    }

    fn classify(
        &self,
        op: Operation,
        raw: &Raw,
        claims: Option<&ShareTokenClaims>,
        token: Option<&str>,
    ) -> Verdict {
        let secrets = self.secrets(token);
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let ctx = Context {
            application_id: &self.inner.application_id,
            claims,
            secrets: &secrets,
            now: SystemTime::now(),
        };
        let answer = Answer {
            status: raw.status,
            headers: &raw.headers,
            body: &raw.body,
        };
        classify(op, &answer, &ctx)
    }

    /// Sends one request with the current key, reads the whole answer, and records the call's metric and debug
    /// line. Transport failures come back typed; HTTP statuses are left to [`classify`]. A write first waits for
    /// room in the key's budget (until `deadline` at most), holds its place while in flight, and closes the key's
    /// gate when Didit answers 429.
    async fn exchange(
        &self,
        op: Operation,
        request: RequestBuilder,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Raw, DiditError> {
        let permit = match &self.inner.budget {
            Some(budget) if op.is_write() => Some(
                budget
                    .acquire(deadline)
                    .await
                    .map_err(|paced| DiditError::Paced { wait: paced.wait })?,
            ),
            _ => None,
        };
        let (_, key) = self.current_key();
        let started = Instant::now();
        // One span per call (docs/tracing.md): method, host and status only, never the key, a URL's query or a body.
        let span = tracing::info_span!(
            "didit",
            otel.name = %format!("didit {}", op.as_str()),
            otel.kind = "client",
            didit.operation = op.as_str(),
            http.request.method = tracing::field::Empty,
            server.address = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
        );
        let result = async {
            let (client, built) = request
                .header(API_KEY_HEADER, key)
                .header(ACCEPT, "application/json")
                .build_split();
            let built = built.map_err(transport_error)?;
            let current = tracing::Span::current();
            current.record("http.request.method", built.method().as_str());
            if let Some(host) = built.url().host_str() {
                current.record("server.address", host);
            }
            let mut response = client.execute(built).await.map_err(transport_error)?;
            let status = response.status().as_u16();
            current.record("http.response.status_code", status);
            let headers = response.headers().clone();
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(DiditError::Unexpected {
                        status,
                        detail: Some(format!(
                            "the answer is larger than {} MiB",
                            MAX_BODY_BYTES >> 20
                        )),
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Raw {
                status,
                headers,
                body,
            })
        }
        .instrument(span)
        .await;
        let elapsed = started.elapsed();
        let label = match &result {
            Ok(raw) => raw.status.to_string(),
            Err(e) => e.status_label(),
        };
        self.inner
            .metrics
            .didit_request(op.as_str(), &label, elapsed);
        if let Ok(raw) = &result
            && raw.status == 429
        {
            self.inner.metrics.didit_rate_limited(op.as_str());
            if let Some(permit) = &permit {
                permit.rate_limited(retry_after(&raw.headers, SystemTime::now()));
            }
        }
        // The write counts against the window from now, when its answer (or its failure) is in.
        drop(permit);
        tracing::debug!(
            operation = op.as_str(),
            status = %label,
            elapsed_ms = elapsed.as_millis() as u64,
            "didit call"
        );
        if let Ok(raw) = &result
            && (200..300).contains(&raw.status)
            && !matches!(raw.status, 200 | 201)
        {
            tracing::info!(
                operation = op.as_str(),
                status = raw.status,
                "Didit answered with an unusual success status; treated as success"
            );
        }
        result
    }
}

impl fmt::Debug for DiditClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = match &self.inner.key_source {
            SecretSource::Inline(_) => "<redacted> (inline)".to_string(),
            SecretSource::File(path) => format!("<redacted> (from {})", path.display()),
        };
        f.debug_struct("DiditClient")
            .field("base_url", &redact_url(self.inner.base.as_str()))
            .field("application_id", &self.inner.application_id)
            .field("api_key", &key)
            .field("timeout", &self.inner.timeout)
            .field("connect_timeout", &self.inner.connect_timeout)
            .finish()
    }
}

/// Loads the key and makes its header value; errors say what is wrong without the key itself.
fn load_key(source: &SecretSource) -> io::Result<CurrentKey> {
    let secret = source.load().map_err(|e| match source {
        SecretSource::File(path) => io::Error::new(
            e.kind(),
            format!("cannot read the API key file {}: {e}", path.display()),
        ),
        SecretSource::Inline(_) => e,
    })?;
    key_from(secret)
}

/// The header value of a key; errors say what is wrong without the key itself.
fn key_from(secret: Secret) -> io::Result<CurrentKey> {
    if secret.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the API key is empty",
        ));
    }
    let mut header = HeaderValue::from_str(secret.expose()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the API key holds characters that cannot be sent in an HTTP header",
        )
    })?;
    header.set_sensitive(true);
    Ok(CurrentKey { secret, header })
}

/// A transport failure, typed. The URL (which holds a session id and the base URL) is stripped; the causes are kept.
fn transport_error(error: reqwest::Error) -> DiditError {
    if error.is_timeout() {
        DiditError::Timeout
    } else if error.is_builder() {
        DiditError::Config(describe(error))
    } else {
        DiditError::Connect(describe(error))
    }
}

/// The error and its causes on one line, without the URL.
fn describe(error: reqwest::Error) -> String {
    use std::error::Error as _;
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Reads a 2xx body as `T`; a body that does not fit is [`DiditError::Unexpected`] with the status and what is
/// wrong (field names kept, values dropped: a value could be a token).
fn parse<T: DeserializeOwned>(
    op: Operation,
    raw: &Raw,
    secrets: &[String],
) -> Result<T, DiditError> {
    serde_json::from_slice(&raw.body).map_err(|e| {
        use serde_json::error::Category;
        let what = if raw.body.iter().all(u8::is_ascii_whitespace) {
            "the answer has no body".to_string()
        } else {
            match e.classify() {
                Category::Syntax | Category::Eof => {
                    format!(
                        "the answer is not JSON (line {}, column {})",
                        e.line(),
                        e.column()
                    )
                }
                Category::Data => format!(
                    "the answer does not have the expected shape: {}",
                    drop_quoted(&e.to_string())
                ),
                Category::Io => "the answer could not be read".to_string(),
            }
        };
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        DiditError::Unexpected {
            status: raw.status,
            detail: Some(scrub(&format!("{op} succeeded but {what}"), &secrets)),
        }
    })
}

/// `invalid type: string "abc", expected u32` → `invalid type: string "…", expected u32`.
fn drop_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for c in text.chars() {
        if c == '"' {
            if inside {
                out.push_str("…\"");
            } else {
                out.push('"');
            }
            inside = !inside;
        } else if !inside {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn access(base_url: &str, key: SecretSource) -> DiditAccess {
        DiditAccess {
            base_url: base_url.into(),
            application_id: "11111111-1111-4111-8111-111111111111".into(),
            api_key: key,
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
        }
    }

    fn inline(key: &str) -> SecretSource {
        SecretSource::Inline(Secret::new(key))
    }

    #[test]
    fn urls_keep_a_base_path_and_encode_segments() {
        let client = DiditClient::new(
            &access("https://gw.example/didit/", inline("sk_x")),
            Arc::default(),
        )
        .unwrap();
        assert_eq!(
            client.session_url("a/b?c", "share").unwrap().as_str(),
            "https://gw.example/didit/v3/session/a%2Fb%3Fc/share/"
        );
        assert_eq!(
            client.url(&["v3", "session", "import-shared", ""]).as_str(),
            "https://gw.example/didit/v3/session/import-shared/"
        );
        assert!(matches!(
            client.session_url("..", "share"),
            Err(DiditError::SessionNotFound { .. })
        ));
    }

    #[test]
    fn bad_configuration_is_a_config_error_without_the_key() {
        let e = DiditClient::new(&access("not a url", inline("sk_x")), Arc::default()).unwrap_err();
        assert!(matches!(e, DiditError::Config(_)));
        assert_eq!(
            e.disposition(),
            Disposition::Pause {
                reason: "credentials"
            }
        );
        let e = DiditClient::new(&access("ftp://x", inline("sk_x")), Arc::default()).unwrap_err();
        assert!(matches!(e, DiditError::Config(_)));
        let e = DiditClient::new(&access("https://x", inline("  ")), Arc::default()).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let e = DiditClient::new(&access("https://x", inline("sk_bad\nkey")), Arc::default())
            .unwrap_err();
        assert!(!e.to_string().contains("sk_bad"), "{e}");
        let missing = SecretSource::File(PathBuf::from("/nonexistent/partner-bridge/key"));
        let e = DiditClient::new(&access("https://x", missing), Arc::default()).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/partner-bridge/key"),
            "{e}"
        );
    }

    #[test]
    fn debug_never_shows_the_key() {
        let client = DiditClient::new(
            &access("https://u:pw@x.example", inline("sk_live_secret")),
            Arc::default(),
        )
        .unwrap();
        let text = format!("{client:?}");
        assert!(!text.contains("sk_live_secret"), "{text}");
        assert!(!text.contains("pw@"), "{text}");
        assert!(text.contains("application_id"), "{text}");
    }

    #[test]
    fn parse_errors_drop_values() {
        let raw = Raw {
            status: 201,
            headers: HeaderMap::new(),
            body: br#"{"share_token": 5, "for_application_id": "eyJsecret.x.y"}"#.to_vec(),
        };
        let e = parse::<ShareResponse>(Operation::Share, &raw, &[]).unwrap_err();
        assert!(matches!(e, DiditError::Unexpected { status: 201, .. }));
        assert_eq!(e.disposition(), Disposition::Retry { after: None });
        let empty = Raw {
            body: Vec::new(),
            ..raw
        };
        let e = parse::<ShareResponse>(Operation::Share, &empty, &[]).unwrap_err();
        assert!(e.to_string().contains("no body"), "{e}");
        assert_eq!(
            drop_quoted(r#"invalid type: string "abc", expected u32"#),
            r#"invalid type: string "…", expected u32"#
        );
    }
}
