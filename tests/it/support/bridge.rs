//! A whole bridge world for pipeline tests: a sandbox (rate limit off) with an issuer application (`fintech-a`) and
//! a partner application (`sponsor-bank`), a signing key, a unique AMQP prefix, temporary state directories, and
//! configurations for the issuer, the receiver or both, started in-process with `app::start` exactly as `run` does.
//! Plus raw AMQP access to publish events, read results and look into `.dead` queues, and a cleanup that deletes
//! every queue the world declared (call it at the end of a test).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use partner_bridge::amqp::{Entity, Names, topology};
use partner_bridge::app::{self, Running};
use partner_bridge::config::Config;
use partner_bridge::didit::wire::SessionKind;
use partner_bridge::envelope::{ImportResult, OnboardingFinished, SigningKey};
use partner_bridge::sandbox::{ApplicationInfo, Control, Sandbox, SandboxOptions};
use tokio_util::sync::CancellationToken;

use super::{amqp_url, unique_prefix, wait_for};

/// The data-sharing agreement every world's issuer and receiver are configured with.
pub const AGREEMENT: &str = "DSA-test-1";

/// A message read from a queue.
#[derive(Debug, Clone)]
pub struct Got {
    /// The body.
    pub body: Vec<u8>,
    /// String and integer headers.
    pub headers: BTreeMap<String, String>,
    /// AMQP properties of interest.
    pub message_id: Option<String>,
    /// AMQP `type`.
    pub kind: Option<String>,
    /// AMQP `app_id`.
    pub app_id: Option<String>,
    /// AMQP `content_type`.
    pub content_type: Option<String>,
    /// AMQP delivery mode (2 = persistent).
    pub delivery_mode: Option<u8>,
    /// AMQP timestamp.
    pub timestamp: Option<u64>,
}

impl Got {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    /// A header as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

fn headers_of(table: Option<&FieldTable>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(table) = table {
        for (k, v) in table.inner() {
            let text = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_string(),
                AMQPValue::LongInt(i) => i.to_string(),
                AMQPValue::LongLongInt(i) => i.to_string(),
                AMQPValue::ShortInt(i) => i.to_string(),
                AMQPValue::ShortShortInt(i) => i.to_string(),
                AMQPValue::LongUInt(i) => i.to_string(),
                AMQPValue::ShortUInt(i) => i.to_string(),
                AMQPValue::ShortShortUInt(i) => i.to_string(),
                other => format!("{other:?}"),
            };
            out.insert(k.as_str().to_string(), text);
        }
    }
    out
}

fn got(delivery: &lapin::message::Delivery) -> Got {
    let p = &delivery.properties;
    Got {
        body: delivery.data.clone(),
        headers: headers_of(p.headers().as_ref()),
        message_id: p.message_id().as_ref().map(|s| s.as_str().to_string()),
        kind: p.kind().as_ref().map(|s| s.as_str().to_string()),
        app_id: p.app_id().as_ref().map(|s| s.as_str().to_string()),
        content_type: p.content_type().as_ref().map(|s| s.as_str().to_string()),
        delivery_mode: *p.delivery_mode(),
        timestamp: *p.timestamp(),
    }
}

/// Raw AMQP access for tests (its own connection, a channel in confirm mode).
pub struct Amqp {
    connection: Connection,
    /// The channel.
    pub channel: Channel,
}

impl Amqp {
    /// Connects to the test broker.
    pub async fn connect() -> Amqp {
        Self::connect_to(&amqp_url()).await
    }

    /// Connects to `url`.
    pub async fn connect_to(url: &str) -> Amqp {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("connect to RabbitMQ");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        Amqp {
            connection,
            channel,
        }
    }

    /// Publishes and waits for the broker's ack (panics on anything else).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: &[(&str, &str)],
    ) {
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert(
                ShortString::from(k.to_string()),
                AMQPValue::LongString(v.to_string().into()),
            );
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
            .with_headers(table);
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(
            matches!(confirm, lapin::Confirmation::Ack(None)),
            "publish to {exchange}/{routing_key} not routed: {confirm:?}"
        );
    }

    /// Takes (and acks) every message currently in `queue`.
    pub async fn drain(&self, queue: &str) -> Vec<Got> {
        let mut out = Vec::new();
        while let Some(message) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic_get")
        {
            out.push(got(&message.delivery));
            message
                .delivery
                .ack(BasicAckOptions::default())
                .await
                .expect("ack");
        }
        out
    }

    /// Number of ready messages in `queue`.
    pub async fn depth(&self, queue: &str) -> u32 {
        topology::queue_depth(&self.channel, queue)
            .await
            .expect("queue depth")
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

/// Collects messages from a queue in the background.
pub struct Collector {
    received: std::sync::Arc<std::sync::Mutex<Vec<Got>>>,
    stop: CancellationToken,
}

impl Collector {
    /// Starts consuming `queue` (acking everything).
    pub async fn start(queue: &str) -> Collector {
        Self::start_on(&amqp_url(), queue).await
    }

    /// Starts consuming `queue` on the broker at `url`.
    pub async fn start_on(url: &str, queue: &str) -> Collector {
        let amqp = Amqp::connect_to(url).await;
        let mut consumer = amqp
            .channel
            .basic_consume(
                queue.into(),
                format!("test-{}", uuid::Uuid::new_v4()).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (r, s) = (received.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = s.cancelled() => break,
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => {
                            r.lock().unwrap().push(got(&delivery));
                            let _ = delivery.ack(BasicAckOptions::default()).await;
                        }
                        _ => break,
                    }
                }
            }
            amqp.close().await;
        });
        Collector { received, stop }
    }

    /// Everything received so far.
    pub fn all(&self) -> Vec<Got> {
        self.received.lock().unwrap().clone()
    }

    /// Received `import.result`s.
    pub fn results(&self) -> Vec<ImportResult> {
        self.all()
            .iter()
            .filter_map(|g| serde_json::from_slice(&g.body).ok())
            .collect()
    }

    /// Waits until at least `n` messages arrived.
    pub async fn wait_count(&self, n: usize, timeout: Duration) -> Vec<Got> {
        wait_for(&format!("{n} messages"), timeout, || async {
            let all = self.all();
            (all.len() >= n).then_some(all)
        })
        .await
    }

    /// Stops consuming.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The world of one test.
pub struct World {
    /// The Didit sandbox.
    pub sandbox: Sandbox,
    /// Its control routes.
    pub control: Control,
    /// The issuing application.
    pub issuer_app: ApplicationInfo,
    /// The partner (receiving) application.
    pub partner_app: ApplicationInfo,
    /// The issuer's signing key.
    pub key: SigningKey,
    /// The receiver's signing key (its `reshare.request`s); the issuer lists its public key for the partner.
    pub receiver_key: SigningKey,
    /// The AMQP prefix.
    pub prefix: String,
    /// Names under the prefix.
    pub names: Names,
    /// Temporary directory for ledgers and key files.
    pub dir: tempfile::TempDir,
    /// `amqp.retry_delay_ms` of the configurations this world writes.
    pub retry_delay_ms: u64,
    /// Deletes this world's queues when a test panics before [`World::cleanup`].
    panic_cleanup: PanicCleanup,
}

/// Deletes a topology plan if the thread is panicking when it is dropped: a failing test never reaches
/// [`World::cleanup`], and leaked quorum queues slow the shared broker down for every other test.
#[derive(Default)]
struct PanicCleanup {
    plan: Vec<Entity>,
}

impl Drop for PanicCleanup {
    fn drop(&mut self) {
        if !std::thread::panicking() || self.plan.is_empty() {
            return;
        }
        let plan = std::mem::take(&mut self.plan);
        // Drop cannot await, and this thread may be a runtime worker: delete from a thread of its own.
        let deleting = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async {
                let amqp = Amqp::connect().await;
                let _ = topology::delete(&amqp.channel, &plan).await;
                amqp.close().await;
            });
        });
        let _ = deleting.join();
    }
}

impl World {
    /// A new world with a fresh prefix, sandbox and applications.
    pub async fn new(name: &str) -> World {
        let sandbox = Sandbox::start(
            "127.0.0.1:0".parse().unwrap(),
            SandboxOptions {
                rate_limit: false,
                default_applications: false,
                ..SandboxOptions::default()
            },
        )
        .await
        .expect("sandbox");
        let control = sandbox.control();
        let issuer_app = control.create_application("fintech-a").await.unwrap();
        let partner_app = control.create_application("sponsor-bank").await.unwrap();
        let prefix = unique_prefix(name);
        let mut world = World {
            names: Names::new(&prefix),
            sandbox,
            control,
            issuer_app,
            partner_app,
            key: SigningKey::generate(),
            receiver_key: SigningKey::generate(),
            prefix,
            dir: tempfile::tempdir().unwrap(),
            retry_delay_ms: 300,
            panic_cleanup: PanicCleanup::default(),
        };
        world.panic_cleanup.plan = world.topology();
        world
    }

    /// Every queue and exchange both roles declare under this world's prefix.
    pub fn topology(&self) -> Vec<Entity> {
        let mut plans = Vec::new();
        for toml in [self.issuer_toml(), self.receiver_toml(false)] {
            if let Ok(config) = Config::from_toml(&toml) {
                plans.push(app::declared_topology(&config));
            }
        }
        topology::combine(plans)
    }

    fn common_toml(&self, role: &str, application_id: &str, api_key: &str) -> String {
        format!(
            r#"
state_dir = "{state}/{role}"
[didit]
base_url = "{base}"
application_id = "{application_id}"
api_key = "{api_key}"
timeout_ms = 2000
connect_timeout_ms = 1000
# This world's sandbox has its rate limit off, so the bridges do not pace (tests/it/pacing.rs turns both on).
writes_per_minute = 0
[amqp]
url = "{amqp}"
prefix = "{prefix}"
prefetch = 32
retry_delay_ms = {retry_delay}
confirm_timeout_ms = 5000
[admin]
listen = "127.0.0.1:0"
[retry]
initial_ms = 20
max_ms = 300
hold_max_s = 5
max_attempts = 10
[shutdown]
grace_s = 10
[log]
level = "warn"
"#,
            state = self.dir.path().display(),
            base = self.sandbox.base_url(),
            amqp = amqp_url(),
            prefix = self.prefix,
            retry_delay = self.retry_delay_ms,
        )
    }

    /// Issuer-only configuration: one partner (`sponsor-bank`) receiving every finished status of both kinds, with
    /// vendor data shared.
    pub fn issuer_toml(&self) -> String {
        format!(
            r#"{common}
[issuer]
enabled = true
signing_key = "{key}"
max_reshares = 3
[[issuer.partners]]
name = "sponsor-bank"
application_id = "{partner}"
ttl_seconds = 3600
statuses = ["Approved", "In Review", "Declined"]
session_kinds = ["user", "business"]
share_vendor_data = true
public_keys = ["{receiver_public}"]
agreement_id = "{agreement}"
"#,
            common = self.common_toml(
                "issuer",
                &self.issuer_app.application_id,
                self.issuer_app.api_key.expose()
            ),
            key = self.key.to_base64(),
            partner = self.partner_app.application_id,
            receiver_public = self.receiver_key.verifying_key().to_base64(),
            agreement = AGREEMENT,
        )
    }

    /// Receiver-only configuration trusting `fintech-a` with `trust_review`.
    pub fn receiver_toml(&self, trust_review: bool) -> String {
        format!(
            r#"{common}
[receiver]
enabled = true
workflow_user = "{wf_user}"
workflow_business = "{wf_business}"
vendor_data = "{{issuer}}:{{source_vendor_data}}"
max_reshares = 3
signing_key = "{receiver_key}"
[[receiver.issuers]]
name = "fintech-a"
application_id = "{issuer}"
public_key = "{public}"
trust_review = {trust_review}
"#,
            common = self.common_toml(
                "receiver",
                &self.partner_app.application_id,
                self.partner_app.api_key.expose()
            ),
            wf_user = self.partner_app.workflows.user,
            wf_business = self.partner_app.workflows.business,
            issuer = self.issuer_app.application_id,
            public = self.key.verifying_key().to_base64(),
            receiver_key = self.receiver_key.to_base64(),
        )
    }

    /// Parses and validates a configuration.
    pub fn config(&self, toml: &str) -> Config {
        let config = Config::from_toml(toml).expect("config parses");
        config.validate().expect("config is valid");
        config
    }

    /// Starts a bridge in-process and waits until it is ready.
    pub async fn start(&self, config: Config) -> Running {
        let running = app::start(config, CancellationToken::new())
            .await
            .expect("bridge starts");
        wait_ready(&running).await;
        running
    }

    /// Starts the issuer.
    pub async fn start_issuer(&self) -> Running {
        self.start(self.config(&self.issuer_toml())).await
    }

    /// Starts the receiver.
    pub async fn start_receiver(&self, trust_review: bool) -> Running {
        self.start(self.config(&self.receiver_toml(trust_review)))
            .await
    }

    /// Creates a finished session at the issuer and returns its id.
    pub async fn session(&self, kind: SessionKind, status: &str, vendor_data: &str) -> String {
        self.control
            .create_session(
                &self.issuer_app.application_id,
                kind,
                status,
                Some(vendor_data),
            )
            .await
            .unwrap()
            .session_id
    }

    /// An `onboarding.finished` event for a session.
    pub fn event(&self, session_id: &str, kind: SessionKind, status: &str) -> OnboardingFinished {
        OnboardingFinished {
            kind: "onboarding.finished".into(),
            event_id: uuid::Uuid::new_v4().to_string(),
            session_id: session_id.to_string(),
            status: status.to_string(),
            session_kind: Some(kind),
            vendor_data: Some(format!("vendor-{session_id}")),
            occurred_at: Some(Utc::now()),
            partners: None,
        }
    }

    /// Publishes an event to the onboarding exchange (confirmed).
    pub async fn publish_event(&self, amqp: &Amqp, event: &OnboardingFinished) {
        amqp.publish(
            &self.names.onboarding_exchange(),
            "onboarding.finished",
            &serde_json::to_vec(event).unwrap(),
            &[],
        )
        .await;
    }

    /// The receiver's results queue.
    pub fn results_queue(&self) -> String {
        format!("{}.receiver.results", self.prefix)
    }

    /// Waits until the sandbox counts `n` imported source sessions, and returns the per-session counts.
    pub async fn wait_imports(&self, n: usize, timeout: Duration) -> BTreeMap<String, u64> {
        wait_for(&format!("{n} imported sessions"), timeout, || async {
            let stats = self.control.stats().await.ok()?;
            let counts: BTreeMap<String, u64> = stats
                .imports
                .iter()
                .map(|i| (i.source_session_id.clone(), i.count))
                .collect();
            (counts.len() >= n).then_some(counts)
        })
        .await
    }

    /// Deletes every queue and exchange of both roles under this world's prefix.
    pub async fn cleanup(self) {
        self.cleanup_on(&amqp_url()).await
    }

    /// [`World::cleanup`] on the broker at `url` (a test node or cluster).
    pub async fn cleanup_on(self, url: &str) {
        let amqp = Amqp::connect_to(url).await;
        let _ = topology::delete(&amqp.channel, &self.topology()).await;
        amqp.close().await;
        self.sandbox.shutdown().await;
    }
}

/// Waits until `/readyz` would answer 200.
pub async fn wait_ready(running: &Running) {
    wait_for("bridge ready", Duration::from_secs(20), || async {
        running.health().check().ok()
    })
    .await;
}

/// The value of one metric series of a running bridge (0 when absent).
pub fn metric_of(running: &Running, series: &str) -> f64 {
    metric(&running.metrics().encode(), series)
}

/// The value of one exposition line (`name{labels} value`), 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
