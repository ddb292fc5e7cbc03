//! Helpers for the receiver and end-to-end tests: share tokens made by hand (minted at the sandbox as the issuer,
//! wrapped in a `share_token` envelope, signed or not, published to the tokens exchange), a tap that records what an
//! exchange routes together with each routing key, configuration variants of the world's TOML, and small readers of
//! sandbox stats, metrics and `/readyz`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use partner_bridge::amqp::{Names, topology};
use partner_bridge::app::{self, Running};
use partner_bridge::config::DiditAccess;
use partner_bridge::didit::client::DiditClient;
use partner_bridge::didit::wire::{SessionKind, ShareResponse, ShareTokenClaims};
use partner_bridge::envelope::{self, ShareTokenEnvelope, SigningKey};
use partner_bridge::metrics::Metrics;
use partner_bridge::sandbox::ApplicationInfo;
use partner_bridge::secret::SecretSource;
use tokio_util::sync::CancellationToken;

use super::bridge::{Amqp, Got, World};
use super::wait_for;

/// A message an exchange routed to a [`Tap`], with the routing key it was published with.
#[derive(Debug, Clone)]
pub struct Tapped {
    /// The routing key.
    pub routing_key: String,
    /// The message.
    pub got: Got,
}

/// Records everything an exchange routes with a binding key, through an exclusive server-named queue (a classic
/// queue the broker deletes with the tap's connection, so nothing is left behind).
pub struct Tap {
    received: Arc<Mutex<Vec<Tapped>>>,
    stop: CancellationToken,
}

impl Tap {
    /// Binds a fresh exclusive queue to `exchange` with `binding_key` and starts consuming (acking everything).
    /// The exchange must exist.
    pub async fn start(exchange: &str, binding_key: &str) -> Tap {
        let amqp = Amqp::connect().await;
        let queue = amqp
            .channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the tap's queue");
        let name = queue.name().clone();
        amqp.channel
            .queue_bind(
                name.clone(),
                exchange.into(),
                binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the tap's queue");
        let mut consumer = amqp
            .channel
            .basic_consume(
                name,
                format!("tap-{}", uuid::Uuid::new_v4()).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume the tap's queue");
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (r, s) = (received.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = s.cancelled() => break,
                    next = consumer.next() => match next {
                        Some(Ok(delivery)) => {
                            r.lock().unwrap().push(Tapped {
                                routing_key: delivery.routing_key.as_str().to_string(),
                                got: got(&delivery),
                            });
                            let _ = delivery.ack(BasicAckOptions::default()).await;
                        }
                        _ => break,
                    }
                }
            }
            amqp.close().await;
        });
        Tap { received, stop }
    }

    /// Everything received so far.
    pub fn all(&self) -> Vec<Tapped> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until at least `n` messages arrived, and returns them all.
    pub async fn wait_count(&self, n: usize, timeout: Duration) -> Vec<Tapped> {
        wait_for(&format!("{n} tapped messages"), timeout, || async {
            let all = self.all();
            (all.len() >= n).then_some(all)
        })
        .await
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn got(delivery: &lapin::message::Delivery) -> Got {
    let p = &delivery.properties;
    let mut headers = BTreeMap::new();
    if let Some(table) = p.headers().as_ref() {
        for (k, v) in table.inner() {
            let text = match v {
                AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                AMQPValue::ShortString(s) => s.as_str().to_string(),
                AMQPValue::LongLongInt(i) => i.to_string(),
                AMQPValue::LongInt(i) => i.to_string(),
                other => format!("{other:?}"),
            };
            headers.insert(k.as_str().to_string(), text);
        }
    }
    Got {
        body: delivery.data.clone(),
        headers,
        message_id: p.message_id().as_ref().map(|s| s.as_str().to_string()),
        kind: p.kind().as_ref().map(|s| s.as_str().to_string()),
        app_id: p.app_id().as_ref().map(|s| s.as_str().to_string()),
        content_type: p.content_type().as_ref().map(|s| s.as_str().to_string()),
        delivery_mode: *p.delivery_mode(),
        timestamp: *p.timestamp(),
    }
}

/// A Didit client acting as `app` against the world's sandbox.
pub fn client_for(world: &World, app: &ApplicationInfo) -> DiditClient {
    DiditClient::new(
        &DiditAccess {
            base_url: world.sandbox.base_url().to_string(),
            application_id: app.application_id.clone(),
            api_key: SecretSource::Inline(app.api_key.clone()),
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
        },
        Arc::new(Metrics::new()),
    )
    .expect("a Didit client for the sandbox")
}

/// Mints a share token for `session_id` (owned by `from`) for application `for_application_id`, as the issuer's
/// bridge would, but by hand.
pub async fn mint(
    world: &World,
    from: &ApplicationInfo,
    session_id: &str,
    for_application_id: &str,
    ttl_seconds: u32,
) -> ShareResponse {
    client_for(world, from)
        .share(session_id, for_application_id, ttl_seconds)
        .await
        .expect("the sandbox shares a finished session")
}

/// A `share_token` envelope around a hand-minted token, as `fintech-a`'s bridge would write it: expiry from the
/// token's own claims, `source_vendor_data` as given.
pub fn envelope_for(
    world: &World,
    share: &ShareResponse,
    session_id: &str,
    status: &str,
    source_vendor_data: Option<&str>,
) -> ShareTokenEnvelope {
    let claims = ShareTokenClaims::peek(share.share_token.expose()).expect("a readable JWT");
    let now = Utc::now();
    ShareTokenEnvelope {
        kind: envelope::types::SHARE_TOKEN.to_string(),
        message_id: uuid::Uuid::now_v7().to_string(),
        event_id: uuid::Uuid::new_v4().to_string(),
        share_token: share.share_token.clone(),
        session_kind: share.session_kind.unwrap_or(SessionKind::User),
        source_session_id: session_id.to_string(),
        from_application_id: world.issuer_app.application_id.clone(),
        for_application_id: share.for_application_id.clone(),
        source_status: status.to_string(),
        source_vendor_data: source_vendor_data.map(str::to_string),
        minted_at: now,
        expires_at: DateTime::<Utc>::from_timestamp(claims.exp, 0).expect("a valid exp"),
        occurred_at: now,
        agreement_id: Some(super::bridge::AGREEMENT.to_string()),
    }
}

/// Creates a finished session at the issuer, mints a token for the partner and wraps it in an envelope.
pub async fn hand_token(
    world: &World,
    kind: SessionKind,
    status: &str,
    source_vendor_data: Option<&str>,
) -> ShareTokenEnvelope {
    let session_id = world
        .session(kind, status, source_vendor_data.unwrap_or("crm-id"))
        .await;
    let share = mint(
        world,
        &world.issuer_app,
        &session_id,
        &world.partner_app.application_id,
        3600,
    )
    .await;
    envelope_for(world, &share, &session_id, status, source_vendor_data)
}

/// The JSON body of an envelope, exactly as it will be signed and sent.
pub fn body_of(envelope: &ShareTokenEnvelope) -> Vec<u8> {
    serde_json::to_vec(envelope).expect("envelopes serialise")
}

/// Publishes `body` to the world's tokens exchange with the partner's routing key and these headers.
pub async fn publish_token_body(world: &World, amqp: &Amqp, body: &[u8], headers: &[(&str, &str)]) {
    amqp.publish(
        &world.names.tokens_exchange(),
        &Names::token_key(&world.partner_app.application_id),
        body,
        headers,
    )
    .await;
}

/// Signs `body` with `key` and publishes it with `x-pb-signature` and `x-pb-key-id`.
pub async fn publish_signed_body(world: &World, amqp: &Amqp, body: &[u8], key: &SigningKey) {
    let signature = key.sign(body);
    publish_token_body(
        world,
        amqp,
        body,
        &[
            (envelope::HEADER_SIGNATURE, signature.as_str()),
            (envelope::HEADER_KEY_ID, key.key_id()),
        ],
    )
    .await;
}

/// Publishes an envelope signed with the world's issuer key; answers the body sent.
pub async fn publish_signed(world: &World, amqp: &Amqp, envelope: &ShareTokenEnvelope) -> Vec<u8> {
    let body = body_of(envelope);
    publish_signed_body(world, amqp, &body, &world.key).await;
    body
}

/// The receiver's TOML with extra `[receiver]` keys (each `key = value` line replaces the same key if the world's
/// TOML already sets it, else is added).
pub fn receiver_toml_with(world: &World, trust_review: bool, settings: &[(&str, &str)]) -> String {
    let toml = world.receiver_toml(trust_review);
    let (head, issuers) = toml
        .split_once("[[receiver.issuers]]")
        .expect("the receiver TOML has an issuer table");
    let (before, receiver) = head
        .split_once("[receiver]")
        .expect("the receiver TOML has a [receiver] table");
    let mut lines: Vec<String> = receiver.lines().map(str::to_string).collect();
    for (key, value) in settings {
        let line = format!("{key} = {value}");
        match lines
            .iter_mut()
            .find(|l| l.split('=').next().map(str::trim) == Some(*key))
        {
            Some(existing) => *existing = line,
            None => lines.push(line),
        }
    }
    format!(
        "{before}[receiver]{}\n[[receiver.issuers]]{issuers}",
        lines.join("\n")
    )
}

/// Replaces the receiver's inline API key with `api_key_file = path`.
pub fn with_api_key_file(world: &World, toml: &str, path: &std::path::Path) -> String {
    let inline = format!("api_key = \"{}\"", world.partner_app.api_key.expose());
    assert!(toml.contains(&inline), "the TOML carries the partner's key");
    toml.replace(&inline, &format!("api_key_file = \"{}\"", path.display()))
}

/// Declares the issuer's intake topology (onboarding and reshare queues) without running the issuer, so reshare
/// requests are routed and can be read from `<prefix>.issuer.reshare`.
pub async fn declare_issuer_queues(world: &World, amqp: &Amqp) {
    let config = world.config(&world.issuer_toml());
    topology::declare(&amqp.channel, &app::declared_topology(&config))
        .await
        .expect("declare the issuer's topology");
}

/// Takes messages from `queue` until `n` have been read (waiting for them), and answers them.
pub async fn drain_n(amqp: &Amqp, queue: &str, n: usize, timeout: Duration) -> Vec<Got> {
    let deadline = std::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        seen.extend(amqp.drain(queue).await);
        if seen.len() >= n {
            return seen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {n} messages in {queue} (got {})",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Per-source-session import counts into `application_id`, from the sandbox's stats.
pub async fn import_counts(world: &World, application_id: &str) -> BTreeMap<String, u64> {
    let stats = world.control.stats().await.expect("sandbox stats");
    stats
        .imports
        .iter()
        .filter(|i| i.application_id == application_id)
        .map(|i| (i.source_session_id.clone(), i.count))
        .collect()
}

/// Waits until `n` source sessions are imported into `application_id`; answers the counts.
pub async fn wait_imports_into(
    world: &World,
    application_id: &str,
    n: usize,
    timeout: Duration,
) -> BTreeMap<String, u64> {
    wait_for(
        &format!("{n} sessions imported into {application_id}"),
        timeout,
        || async {
            let counts = import_counts(world, application_id).await;
            (counts.len() >= n).then_some(counts)
        },
    )
    .await
}

pub use super::bridge::metric_of;

/// Every exposition line of a running bridge that starts with `prefix`.
pub fn metric_lines(running: &Running, prefix: &str) -> Vec<String> {
    running
        .metrics()
        .encode()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// `GET /readyz` of a running bridge: status code and body.
pub async fn readyz(running: &Running) -> (u16, String) {
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("an HTTP client")
        .get(format!("http://{}/readyz", running.admin_addr()))
        .send()
        .await
        .expect("/readyz answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// The receiver's dead-letter queue under the world's prefix.
pub fn receiver_dead_queue(world: &World) -> String {
    Names::dead_queue(&world.names.receiver_tokens_queue())
}
