//! The Didit sandbox: an in-process emulator of the Didit routes the bridge uses, with Didit's B2B Reusable KYC
//! semantics, served with axum. It backs `partner-bridge sandbox --listen ADDR`, `partner-bridge demo`, the
//! integration tests and the benchmark. It shares `crate::didit::wire` (and `crate::didit::signature` for
//! webhooks) and nothing else of the bridge; no production path calls it.
//!
//! Read in this order: `state` (the rules: share, import, sessions, entities), `token` (HS256 share
//! tokens), `routes` (the `/v3` surface and its gate: write limit, key, faults), `limits`, `webhooks`
//! (signed deliveries), `control` and [`Control`] (the `/sandbox` routes and their client), `payload` (fake but
//! realistic decisions), `fixture`, `openapi`.
//!
//! # Didit routes
//!
//! `POST /v3/session/`, `GET /v3/session/{id}/decision/`, `PATCH /v3/session/{id}/update-status/`,
//! `DELETE /v3/session/{id}/delete/`, `POST /v3/session/{id}/share/`, `POST /v3/session/import-shared/`,
//! `GET /v3/sessions/`, `POST|GET /v3/webhook/destinations/`, `GET /v3/webhook/destinations/{uuid}/`; described
//! at `/openapi.json`. Errors are `{"detail", "code"}` with the codes of `crate::didit::wire::codes`.
//!
//! Decisions the contract left open, taken here:
//! - Every `/v3` request passes, in order: the write limit (POST/PATCH/DELETE, keyed by the `x-api-key` value,
//!   60 s sliding window of real time), the key (401 `invalid_api_key`), the faults, then the route.
//! - Share checks: `write:sessions` (403) → session visible to the caller (404) → body is JSON (400
//!   `validation_error`) → `ttl_in_seconds` an integer in 60..=86400, `null` or absent meaning 3600 (400
//!   `invalid_ttl`) → `for_application_id` present, live and not the caller (400 `invalid_application`) →
//!   status finished (400 `session_not_finished`) → 201.
//! - Import checks: `write:sessions` (403) → body (400 `validation_error`) → token format and signature (401 `invalid_share_token`) →
//!   expiry on the virtual clock (401 `share_token_expired`) → token's application (403
//!   `token_not_for_application`) → workflow in the caller's application (404 `workflow_not_found`) → its kind
//!   (400 `workflow_kind_mismatch`) → (token, application) already imported (403 `already_imported`) → source
//!   session still there (404 `session_not_found`, "Original session no longer exists.") → 201 with the clone.
//!   Like share, import needs the `write:sessions` privilege (Didit's import page says so; a key without it
//!   gets 403 `permission_denied` before its body is read).
//! - Two tokens with identical claims (same session, partner, second and TTL) are the same string, hence the
//!   same token for the duplicate check; Didit's tokens carry no `jti` either.
//! - `GET /v3/sessions/` takes Didit's documented filters, ANDed: `vendor_data` (exact), `status` (either casing),
//!   `session_kind` (`user`, the default, `business`, or `all`: one page of each kind, concatenated),
//!   `workflow_id`, `date_from` / `date_to` (created date: `YYYY-MM-DD` covers the whole day, or an RFC 3339
//!   time); `limit` (default 50, as Didit's, at most 100) / `offset`, with `next` / `previous` links that keep the filters;
//!   newest first; unknown parameters ignored, bad values 400 `validation_error`. `count` is exact for both kinds
//!   (Didit caps KYB counts at 100; follow `next` rather than trusting `count`). `country` and `search` are not
//!   emulated.
//! - KYC statuses are Title Case, KYB statuses UPPER_SNAKE, everywhere (create answers `NOT_STARTED` for a KYB
//!   workflow).
//! - Webhook `timestamp` and `created_at` use the real clock (receivers compare with theirs); tokens and session
//!   `created_at` use the virtual clock.
//! - The destination list omits `secret_shared_key` (it shows `secret_last4`), as Didit's does; create and
//!   `GET /v3/webhook/destinations/{uuid}/` show it.
//!
//! # Control routes (sandbox only, no key, JSON in and out)
//!
//! | route | does |
//! |---|---|
//! | `POST /sandbox/applications` `{"name", "privileges"?}` | an application: `{"application_id", "api_key", "workflows": {"user", "business"}, "name", "privileges"}` |
//! | `GET /sandbox/applications`, `DELETE /sandbox/applications/{id}` | list; soft-delete |
//! | `POST /sandbox/applications/{id}/revoke-key` | `{"application_id", "api_key"}`: the old key is 401 from now on |
//! | `POST /sandbox/applications/{id}/workflows` `{"kind"}` | an extra workflow: `{"workflow_id", "kind"}` |
//! | `DELETE /sandbox/applications/{id}/workflows/{workflow_id}` | removes one |
//! | `GET /sandbox/applications/{id}/entities` | the vendor entities (users, businesses) |
//! | `POST /sandbox/sessions` `{"application_id", "session_kind", "status", "vendor_data"?, "workflow_id"?, "metadata"?, "session_id"?}` | a session with a realistic payload |
//! | `GET`, `DELETE /sandbox/sessions/{id}` | any application's session |
//! | `POST /sandbox/sessions/{id}/status` `{"status"}` | plays the end user: any status, webhook sent |
//! | `POST /sandbox/sessions/{id}/webhook` | re-sends the current `status.updated` (same `event_id`, fresh `timestamp`): `{"sent": [{"body", "headers", ...}]}` |
//! | `POST /sandbox/faults` `{"endpoint", "latency_ms", "error_rate", "rate_limit_rate", "hang_rate", "drop_response_rate", "hang_after_rate"}` | `endpoint`: `share`, `import` or `*`; `{}` clears (lost answers: below) |
//! | `POST /sandbox/clock` `{"advance_seconds"}` | `{"now", "offset_seconds"}` |
//! | `POST /sandbox/settings` `{"rate_limit", "writes_per_minute", "window_ms", "rate_limit_headers"}` | the write limit: on or off, its size, its window (test-only), `X-RateLimit-*` headers `on_429` (Didit now) or `always` |
//! | `GET /sandbox/stats` | `{"shares", "imports": [{"source_session_id", "application_id", "count"}], "rejections": {code: n}, "entities", "sessions", "webhook_deliveries", "deletions": [{"session_id", "application_id", "shared_from_session"}]}` |
//! | `GET /sandbox/webhook-deliveries` | finished deliveries: attempts, status code, delivered |
//!
//! Lost answers: `drop_response_rate` carries the request out in full (an import is imported, a share minted),
//! then resets the connection instead of answering — the client sees a connection error, never the status, exactly
//! as when a load balancer or the network loses Didit's answer. `hang_after_rate` (test-only) also carries the
//! request out but then withholds the answer until the sandbox stops or 120 s pass, so that a test can kill the
//! client between Didit's action and the client's record of it. Both apply to any answer (201, 403, …).
//!
//! # Fixture format (`--fixture FILE`)
//!
//! JSON (or TOML when the name ends in `.toml`); unknown fields are an error naming the field:
//!
//! ```json
//! {"applications": [{"name": "fintech-a", "application_id": "<uuid>", "api_key": "<string>",
//!                    "workflows": {"user": "<uuid>", "business": "<uuid>"},
//!                    "privileges": ["read:sessions", "write:sessions"]}],
//!  "sessions": [{"application_id": "<uuid>", "session_kind": "user", "status": "Approved",
//!                "vendor_data": "user-1", "session_id": "<uuid, optional>"}]}
//! ```
//!
//! `privileges` (default read and write sessions), `sessions`, `vendor_data` and `session_id` are optional.
//! Sessions run in their application's default workflow of their kind.

mod client;
mod conn;
mod control;
mod error;
mod fixture;
mod limits;
mod model;
mod openapi;
mod payload;
mod routes;
mod state;
mod token;
mod webhooks;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use client::Control;
pub use fixture::{Fixture, FixtureApplication, FixtureError, FixtureSession};
pub use model::{
    ApplicationInfo, ClockInfo, Deletion, EntityInfo, FaultEndpoint, FaultSettings, FaultState,
    ImportCount, RateLimitHeaders, SentWebhook, SessionInfo, Settings, Stats, WebhookDelivery,
    WebhookDestination, WorkflowIds,
};

use routes::Shared;
use state::{NewApplication, State};

/// How a sandbox starts.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// Enforce the per-key write limit.
    pub rate_limit: bool,
    /// Writes per key per sliding window.
    pub writes_per_minute: u32,
    /// The sliding window (Didit's: 60 s; shorter ones keep tests short).
    pub window: Duration,
    /// When the `X-RateLimit-*` headers are sent (Didit now: only on 429).
    pub rate_limit_headers: RateLimitHeaders,
    /// Applications (and sessions) to load instead of the defaults.
    pub fixture: Option<PathBuf>,
    /// Without a fixture: create `fintech-a` and `sponsor-bank`.
    pub default_applications: bool,
    /// Connection bounds (the same server as the bridge's listeners, see [`crate::http_server`]).
    pub http: crate::http_server::HttpLimits,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            rate_limit: true,
            writes_per_minute: 300,
            window: limits::WINDOW,
            rate_limit_headers: RateLimitHeaders::On429,
            fixture: None,
            default_applications: true,
            http: crate::http_server::HttpLimits::default(),
        }
    }
}

/// A running sandbox. Dropping it stops serving; [`Sandbox::shutdown`] also waits for the server and for
/// webhook deliveries in flight.
pub struct Sandbox {
    addr: SocketAddr,
    base_url: String,
    shared: Arc<Shared>,
    initial: Vec<ApplicationInfo>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

/// The names of the two default applications.
pub const DEFAULT_APPLICATIONS: [&str; 2] = ["fintech-a", "sponsor-bank"];

impl Sandbox {
    /// Binds `listen` (port 0 for any free port), loads the fixture or the default applications, and serves.
    pub async fn start(listen: SocketAddr, options: SandboxOptions) -> std::io::Result<Sandbox> {
        let fixture = options.fixture.as_deref().map(Fixture::read).transpose()?;
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shown = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
            }
            _ => addr,
        };
        let base_url = format!("http://{shown}");
        let mut state = State::new(base_url.clone());
        let initial = match (&fixture, options.default_applications) {
            (Some(fixture), _) => {
                let path = options
                    .fixture
                    .as_deref()
                    .unwrap_or_else(|| std::path::Path::new("?"));
                fixture
                    .load(&mut state)
                    .map_err(|reason| {
                        std::io::Error::from(FixtureError::Invalid {
                            path: path.display().to_string(),
                            reason,
                        })
                    })?
                    .0
            }
            (None, true) => DEFAULT_APPLICATIONS
                .iter()
                .map(|name| {
                    state
                        .create_application(NewApplication {
                            name: name.to_string(),
                            ..Default::default()
                        })
                        .expect("fresh ids never collide")
                })
                .collect(),
            (None, false) => Vec::new(),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            limiter: Mutex::new(limits::RateLimiter::with_window(
                options.rate_limit,
                options.writes_per_minute,
                options.window,
                options.rate_limit_headers,
            )),
            faults: Mutex::new(limits::Faults::default()),
            key: token::TokenKey::random(),
            http: client::http_client(Duration::from_secs(10)),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            base_url: base_url.clone(),
        });
        let app = routes::router(Arc::clone(&shared));
        let stop = shared.cancel.clone();
        let server = tokio::spawn(async move {
            crate::http_server::serve_wrapped(
                listener,
                app,
                options.http,
                stop.cancelled_owned(),
                conn::breakable,
            )
            .await
        });
        tracing::debug!(%base_url, "sandbox listening");
        Ok(Sandbox {
            addr,
            base_url,
            shared,
            initial,
            server: Some(server),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (the loopback address when bound to an unspecified one).
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// A typed client of this sandbox's control routes.
    pub fn control(&self) -> Control {
        Control::new(self.base_url.clone())
    }

    /// The applications created at start (the two defaults, or the fixture's).
    pub fn initial_applications(&self) -> Vec<ApplicationInfo> {
        self.initial.clone()
    }

    /// Stops serving: hung requests are answered, deliveries stop retrying, and the server and deliveries are
    /// awaited (each for at most a few seconds).
    pub async fn shutdown(mut self) {
        self.shared.cancel.cancel();
        if let Some(server) = self.server.take() {
            match tokio::time::timeout(Duration::from_secs(10), server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "sandbox server ended with an error"),
                Ok(Err(e)) => tracing::warn!(error = %e, "sandbox server task failed"),
                Err(_) => tracing::warn!("sandbox server did not stop within 10 s"),
            }
        }
        self.shared.tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), self.shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("webhook deliveries still running after 5 s");
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

/// Waits for SIGINT or SIGTERM.
async fn stop_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}

/// `partner-bridge sandbox --listen ADDR [--fixture FILE] [--no-rate-limit] [--rate-limit-per-minute N]
/// [--rate-limit-headers on-429|always]`: prints the address and the applications with their ids, keys and
/// workflows, serves until SIGINT or SIGTERM, then stops cleanly.
pub async fn run_cli(
    listen: SocketAddr,
    fixture: Option<PathBuf>,
    rate_limit: bool,
    writes_per_minute: u32,
    rate_limit_headers: RateLimitHeaders,
) -> anyhow::Result<()> {
    let options = SandboxOptions {
        rate_limit,
        writes_per_minute,
        rate_limit_headers,
        fixture: fixture.clone(),
        ..SandboxOptions::default()
    };
    let sandbox = Sandbox::start(listen, options)
        .await
        .with_context(|| match &fixture {
            Some(path) => format!(
                "starting the sandbox on {listen} with fixture {}",
                path.display()
            ),
            None => format!("starting the sandbox on {listen}"),
        })?;
    tracing::info!(listener = "sandbox", addr = %sandbox.addr(), "listening (Didit emulator)");
    println!(
        "partner-bridge sandbox (Didit emulator) listening on {}",
        sandbox.base_url()
    );
    println!("  OpenAPI document: {}/openapi.json", sandbox.base_url());
    if rate_limit {
        println!(
            "  rate limit: {writes_per_minute} writes per minute per API key, X-RateLimit-* headers {} (switch off with --no-rate-limit)",
            match rate_limit_headers {
                RateLimitHeaders::On429 => "only on 429",
                RateLimitHeaders::Always => "on every write",
            }
        );
    } else {
        println!("  rate limit: off");
    }
    for app in sandbox.initial_applications() {
        // A sandbox key is a test credential; printing it is the point of this command.
        println!("application {}", app.name);
        println!("  application_id     {}", app.application_id);
        println!("  api_key            {}", app.api_key.expose());
        println!("  workflow user      {}", app.workflows.user);
        println!("  workflow business  {}", app.workflows.business);
    }
    stop_signal().await?;
    println!("stopping the sandbox");
    sandbox.shutdown().await;
    Ok(())
}
