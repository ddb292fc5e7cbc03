//! [`Control`]: a typed client of the sandbox's control routes (and two Didit-route conveniences), for tests,
//! the demo and the benchmark, in this process or against a sandbox in another one.

use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::model::{
    ApplicationInfo, ClockInfo, EntityInfo, FaultSettings, FaultState, SentWebhook, SessionInfo,
    Settings, Stats, WebhookDelivery, WebhookDestination,
};
use crate::didit::wire::{ErrorBody, SessionKind};
use crate::secret::Secret;

/// How long a pooled connection may stay idle before the client drops it: well under the servers' 5 s header read
/// timeout.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// A reqwest client for local HTTP (no proxies), with rustls' `ring` provider installed if none is.
pub(crate) fn http_client(timeout: Duration) -> reqwest::Client {
    // reqwest is built without a default crypto provider; the crate's rustls uses ring. Installing fails only
    // when a provider is already installed, which is just as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .no_proxy()
        // Our HTTP servers close a keep-alive connection that sends no request within their header read timeout
        // (5 s by default): a pooled connection idle that long may be closed just as a request goes out on it
        // ("connection closed before message completed"). Dropping idle connections sooner avoids the race.
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build()
        .expect("a plain HTTP client always builds once a crypto provider is installed")
}

/// Typed client of one sandbox's control routes. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Control {
    base_url: String,
    http: reqwest::Client,
}

impl Control {
    /// A client of the sandbox at `base_url` (`http://127.0.0.1:PORT`).
    pub fn new(base_url: impl Into<String>) -> Control {
        Control {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            // Long enough for a re-sent webhook that retries against a failing receiver.
            http: http_client(Duration::from_secs(60)),
        }
    }

    /// The sandbox's base URL.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        api_key: Option<&str>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base_url);
        let mut request = self.http.request(method.clone(), &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        if let Some(key) = api_key {
            request = request.header("x-api-key", key);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .with_context(|| format!("{method} {path}: reading the answer"))?;
        if !status.is_success() {
            let error = ErrorBody::parse(&bytes);
            bail!(
                "{method} {path}: {status} {} {}",
                error.code.unwrap_or_default(),
                error.detail.unwrap_or_default()
            );
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{method} {path}: answer is not JSON"))
    }

    async fn typed<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<T> {
        let value = self.call(method.clone(), path, body, None).await?;
        serde_json::from_value(value).with_context(|| format!("{method} {path}: unexpected answer"))
    }

    /// `POST /sandbox/applications` with the default privileges.
    pub async fn create_application(&self, name: &str) -> anyhow::Result<ApplicationInfo> {
        self.typed(
            Method::POST,
            "/sandbox/applications",
            Some(json!({ "name": name })),
        )
        .await
    }

    /// `POST /sandbox/applications` with explicit privileges (e.g. none, to test `permission_denied`).
    pub async fn create_application_with_privileges(
        &self,
        name: &str,
        privileges: &[&str],
    ) -> anyhow::Result<ApplicationInfo> {
        self.typed(
            Method::POST,
            "/sandbox/applications",
            Some(json!({ "name": name, "privileges": privileges })),
        )
        .await
    }

    /// `GET /sandbox/applications`.
    pub async fn applications(&self) -> anyhow::Result<Vec<ApplicationInfo>> {
        self.typed(Method::GET, "/sandbox/applications", None).await
    }

    /// `DELETE /sandbox/applications/{id}`: soft-deletes it (its key stops working, tokens cannot name it).
    pub async fn delete_application(&self, application_id: &str) -> anyhow::Result<()> {
        self.call(
            Method::DELETE,
            &format!("/sandbox/applications/{application_id}"),
            None,
            None,
        )
        .await
        .map(|_| ())
    }

    /// `POST /sandbox/sessions`: a session with a realistic payload, in any status (either casing).
    pub async fn create_session(
        &self,
        application_id: &str,
        kind: SessionKind,
        status: &str,
        vendor_data: Option<&str>,
    ) -> anyhow::Result<SessionInfo> {
        self.typed(
            Method::POST,
            "/sandbox/sessions",
            Some(json!({
                "application_id": application_id,
                "session_kind": kind,
                "status": status,
                "vendor_data": vendor_data,
            })),
        )
        .await
    }

    /// `GET /sandbox/sessions/{id}` (any application's session).
    pub async fn session(&self, session_id: &str) -> anyhow::Result<SessionInfo> {
        self.typed(
            Method::GET,
            &format!("/sandbox/sessions/{session_id}"),
            None,
        )
        .await
    }

    /// `POST /sandbox/sessions/{id}/status`: moves a session to any status, as the end user's flow would, and
    /// sends the webhook.
    pub async fn set_status(&self, session_id: &str, status: &str) -> anyhow::Result<SessionInfo> {
        self.typed(
            Method::POST,
            &format!("/sandbox/sessions/{session_id}/status"),
            Some(json!({ "status": status })),
        )
        .await
    }

    /// `DELETE /sandbox/sessions/{id}`.
    pub async fn delete_session(&self, session_id: &str) -> anyhow::Result<()> {
        self.call(
            Method::DELETE,
            &format!("/sandbox/sessions/{session_id}"),
            None,
            None,
        )
        .await
        .map(|_| ())
    }

    /// `POST /sandbox/faults` for one endpoint.
    pub async fn set_faults(&self, faults: FaultSettings) -> anyhow::Result<FaultState> {
        self.typed(
            Method::POST,
            "/sandbox/faults",
            Some(serde_json::to_value(faults)?),
        )
        .await
    }

    /// `POST /sandbox/faults {}`: removes every fault.
    pub async fn clear_faults(&self) -> anyhow::Result<()> {
        self.call(Method::POST, "/sandbox/faults", Some(json!({})), None)
            .await
            .map(|_| ())
    }

    /// `POST /sandbox/clock`: moves the virtual clock forward.
    pub async fn advance_clock(&self, seconds: i64) -> anyhow::Result<ClockInfo> {
        self.typed(
            Method::POST,
            "/sandbox/clock",
            Some(json!({ "advance_seconds": seconds })),
        )
        .await
    }

    /// `POST /sandbox/applications/{id}/revoke-key`: answers the new key.
    pub async fn revoke_key(&self, application_id: &str) -> anyhow::Result<Secret> {
        let value = self
            .call(
                Method::POST,
                &format!("/sandbox/applications/{application_id}/revoke-key"),
                None,
                None,
            )
            .await?;
        let key = value
            .get("api_key")
            .and_then(Value::as_str)
            .context("revoke-key answer has no api_key")?;
        Ok(Secret::new(key))
    }

    /// `POST /sandbox/applications/{id}/keys`: one more key for the application (the others keep working).
    pub async fn add_key(&self, application_id: &str) -> anyhow::Result<Secret> {
        let value = self
            .call(
                Method::POST,
                &format!("/sandbox/applications/{application_id}/keys"),
                None,
                None,
            )
            .await?;
        let key = value
            .get("api_key")
            .and_then(Value::as_str)
            .context("keys answer has no api_key")?;
        Ok(Secret::new(key))
    }

    /// `POST /sandbox/settings` with every field: the limit, its window and when its headers are sent.
    pub async fn set_settings(&self, settings: Settings) -> anyhow::Result<Settings> {
        self.typed(
            Method::POST,
            "/sandbox/settings",
            Some(serde_json::to_value(settings)?),
        )
        .await
    }

    /// `GET /sandbox/stats`.
    pub async fn stats(&self) -> anyhow::Result<Stats> {
        self.typed(Method::GET, "/sandbox/stats", None).await
    }

    /// `POST /sandbox/settings`: the rate limit on or off, and its size.
    pub async fn settings(
        &self,
        rate_limit: bool,
        writes_per_minute: u32,
    ) -> anyhow::Result<Settings> {
        self.typed(
            Method::POST,
            "/sandbox/settings",
            Some(json!({ "rate_limit": rate_limit, "writes_per_minute": writes_per_minute })),
        )
        .await
    }

    /// `POST /sandbox/applications/{id}/workflows`: answers the new workflow's id.
    pub async fn add_workflow(
        &self,
        application_id: &str,
        kind: SessionKind,
    ) -> anyhow::Result<String> {
        let value = self
            .call(
                Method::POST,
                &format!("/sandbox/applications/{application_id}/workflows"),
                Some(json!({ "kind": kind })),
                None,
            )
            .await?;
        value
            .get("workflow_id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .context("workflow answer has no workflow_id")
    }

    /// `DELETE /sandbox/applications/{id}/workflows/{workflow_id}`.
    pub async fn remove_workflow(
        &self,
        application_id: &str,
        workflow_id: &str,
    ) -> anyhow::Result<()> {
        self.call(
            Method::DELETE,
            &format!("/sandbox/applications/{application_id}/workflows/{workflow_id}"),
            None,
            None,
        )
        .await
        .map(|_| ())
    }

    /// `GET /sandbox/applications/{id}/entities`.
    pub async fn entities(&self, application_id: &str) -> anyhow::Result<Vec<EntityInfo>> {
        self.typed(
            Method::GET,
            &format!("/sandbox/applications/{application_id}/entities"),
            None,
        )
        .await
    }

    /// `POST /sandbox/sessions/{id}/webhook`: re-sends the session's current `status.updated` to every enabled
    /// destination and answers what went to each.
    pub async fn resend_webhooks(&self, session_id: &str) -> anyhow::Result<Vec<SentWebhook>> {
        let value = self
            .call(
                Method::POST,
                &format!("/sandbox/sessions/{session_id}/webhook"),
                None,
                None,
            )
            .await?;
        serde_json::from_value(value.get("sent").cloned().unwrap_or(Value::Null))
            .context("webhook answer has no `sent` list")
    }

    /// As [`Control::resend_webhooks`], answering the first (usually only) destination's delivery.
    pub async fn resend_webhook(&self, session_id: &str) -> anyhow::Result<SentWebhook> {
        self.resend_webhooks(session_id)
            .await?
            .into_iter()
            .next()
            .context("no webhook was sent")
    }

    /// `GET /sandbox/webhook-deliveries`: finished deliveries, oldest first.
    pub async fn webhook_deliveries(&self) -> anyhow::Result<Vec<WebhookDelivery>> {
        self.typed(Method::GET, "/sandbox/webhook-deliveries", None)
            .await
    }

    /// Didit's `POST /v3/webhook/destinations/` with `api_key`: a destination subscribed to `status.updated`.
    pub async fn add_webhook_destination(
        &self,
        api_key: &str,
        url: &str,
        secret: Option<&str>,
    ) -> anyhow::Result<WebhookDestination> {
        let mut body =
            json!({ "url": url, "label": "sandbox test", "subscribed_events": ["status.updated"] });
        if let Some(secret) = secret {
            body["secret_shared_key"] = Value::from(secret);
        }
        let value = self
            .call(
                Method::POST,
                "/v3/webhook/destinations/",
                Some(body),
                Some(api_key),
            )
            .await?;
        serde_json::from_value(value).context("unexpected destination answer")
    }

    /// Didit's `PATCH /v3/session/{id}/update-status/` with `api_key`.
    pub async fn update_status(
        &self,
        api_key: &str,
        session_id: &str,
        new_status: &str,
    ) -> anyhow::Result<()> {
        self.call(
            Method::PATCH,
            &format!("/v3/session/{session_id}/update-status/"),
            Some(json!({ "new_status": new_status })),
            Some(api_key),
        )
        .await
        .map(|_| ())
    }
}
