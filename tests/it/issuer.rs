//! The issuer pipeline on the real broker with the sandbox as Didit (issue #3): an event becomes one signed token per
//! matching partner; duplicate and redelivered events and unfinished statuses mint nothing new; each share answer row
//! of DESIGN.md §4 ends as the table says; poison messages are dead-lettered while the consumer keeps going; reshare
//! requests mint fresh tokens up to `issuer.max_reshares`; the webhook intake answers 200 only once the broker has
//! the event, and refuses forged, stale and replayed deliveries.
//!
//! Tokens are observed without a receiver: each test binds its own classic queue (with `x-expires`, so a failed test
//! leaves nothing behind) to `<prefix>.tokens` with `token.<partner application id>`. A test learns that the bridge
//! has finished with a message from the bridge's own counters, never from the passing of time.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::Utc;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeleteOptions};
use lapin::types::AMQPValue;
use partner_bridge::amqp::{Entity, HeaderValue, Names, topology};
use partner_bridge::app::Running;
use partner_bridge::didit::signature;
use partner_bridge::didit::wire::{SessionKind, ShareTokenClaims};
use partner_bridge::envelope::{OnboardingFinished, ReshareRequest, ShareTokenEnvelope};
use partner_bridge::sandbox::{FaultEndpoint, FaultSettings};
use serde_json::{Value, json};

use crate::support::bridge::{Amqp, World, metric, metric_of};
use crate::support::proxy::Proxy;
use crate::support::{amqp_url, wait_for};

/// How long any one condition may take to come true.
const WAIT: Duration = Duration::from_secs(20);
const WEBHOOK_SECRET: &str = "whsec-issuer-tests";

// ---- helpers ------------------------------------------------------------------------------------------------------

/// A message taken from a queue, with everything AMQP said about it.
#[derive(Debug, Clone)]
struct Taken {
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
}

impl Taken {
    fn header(&self, name: &str) -> Option<String> {
        let headers = self.properties.headers().as_ref()?;
        match headers.inner().get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
            AMQPValue::LongLongInt(i) => Some(i.to_string()),
            AMQPValue::LongInt(i) => Some(i.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    fn envelope(&self) -> ShareTokenEnvelope {
        serde_json::from_slice(&self.body).expect("a share_token envelope")
    }

    fn reason(&self) -> String {
        self.header("x-pb-reason").unwrap_or_default()
    }
}

/// A queue read with `basic.get`: either one of the bridge's (`.dead` queues) or our own tap bound to an exchange.
struct Tap {
    amqp: Amqp,
    queue: String,
    owned: bool,
    taken: Mutex<Vec<Taken>>,
}

impl Tap {
    /// Declares a classic queue that expires when unused and binds it to `exchange` (declared too, as the bridge
    /// declares it: durable, `kind`) with `routing_key`.
    async fn bind(exchange: &str, kind: &'static str, routing_key: &str) -> Tap {
        let amqp = Amqp::connect().await;
        let queue = format!(
            "{exchange}.tap.{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let plan = [
            Entity::Exchange {
                name: exchange.to_string(),
                kind,
            },
            Entity::Queue {
                name: queue.clone(),
                arguments: vec![("x-expires".into(), HeaderValue::Int(300_000))],
            },
            Entity::Binding {
                queue: queue.clone(),
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
            },
        ];
        topology::declare(&amqp.channel, &plan)
            .await
            .expect("declare the tap");
        Tap {
            amqp,
            queue,
            owned: true,
            taken: Mutex::new(Vec::new()),
        }
    }

    /// Observes the tokens for one partner application.
    async fn tokens(world: &World, partner_application_id: &str) -> Tap {
        Tap::bind(
            &world.names.tokens_exchange(),
            "topic",
            &Names::token_key(partner_application_id),
        )
        .await
    }

    /// Reads an existing queue (the bridge declares it).
    async fn on(queue: &str) -> Tap {
        Tap {
            amqp: Amqp::connect().await,
            queue: queue.to_string(),
            owned: false,
            taken: Mutex::new(Vec::new()),
        }
    }

    /// Takes (and acks) everything in the queue now; answers how many messages were taken in total.
    async fn poll(&self) -> usize {
        loop {
            let message = self
                .amqp
                .channel
                .basic_get(
                    self.queue.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .expect("basic.get");
            let Some(message) = message else { break };
            let delivery = &message.delivery;
            self.taken.lock().unwrap().push(Taken {
                routing_key: delivery.routing_key.as_str().to_string(),
                body: delivery.data.clone(),
                properties: delivery.properties.clone(),
            });
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
        }
        self.taken.lock().unwrap().len()
    }

    /// Waits until at least `n` messages were taken.
    async fn wait_count(&self, n: usize) -> Vec<Taken> {
        wait_for(
            &format!("{n} message(s) in {}", self.queue),
            WAIT,
            || async { (self.poll().await >= n).then(|| self.all()) },
        )
        .await
    }

    /// Everything taken so far, after one more look.
    async fn now(&self) -> Vec<Taken> {
        self.poll().await;
        self.all()
    }

    fn all(&self) -> Vec<Taken> {
        self.taken.lock().unwrap().clone()
    }

    async fn close(self) {
        if self.owned {
            let _ = self
                .amqp
                .channel
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        self.amqp.close().await;
    }
}

/// Replaces `from` (which must be there, so a changed harness fails loudly instead of testing defaults) in `toml`.
fn set(toml: &str, from: &str, to: &str) -> String {
    assert!(toml.contains(from), "the TOML has no {from:?}:\n{toml}");
    toml.replacen(from, to, 1)
}

/// One more `[[issuer.partners]]` entry (appended after the harness's `sponsor-bank`).
fn partner_toml(
    name: &str,
    application_id: &str,
    statuses: &[&str],
    kinds: &[&str],
    share_vendor_data: bool,
    ttl_seconds: u32,
) -> String {
    format!(
        r#"
[[issuer.partners]]
name = "{name}"
application_id = "{application_id}"
ttl_seconds = {ttl_seconds}
statuses = {statuses:?}
session_kinds = {kinds:?}
share_vendor_data = {share_vendor_data}
"#
    )
}

/// `[issuer.webhook]` on an ephemeral port with an inline secret.
fn webhook_toml() -> String {
    format!(
        r#"
[issuer.webhook]
listen = "127.0.0.1:0"
secret = "{WEBHOOK_SECRET}"
"#
    )
}

/// Waits until `series` reaches at least `at_least`.
async fn wait_metric(running: &Running, series: &str, at_least: f64) -> f64 {
    wait_for(&format!("{series} >= {at_least}"), WAIT, || async {
        let v = metric_of(running, series);
        (v >= at_least).then_some(v)
    })
    .await
}

fn events(source: &str, outcome: &str) -> String {
    format!("partner_bridge_events_total{{source=\"{source}\",outcome=\"{outcome}\"}}")
}

fn shares(partner: &str, outcome: &str) -> String {
    format!("partner_bridge_shares_total{{partner=\"{partner}\",outcome=\"{outcome}\"}}")
}

fn dead_lettered(queue: &str, reason: &str) -> String {
    format!("partner_bridge_dead_lettered_total{{queue=\"{queue}\",reason=\"{reason}\"}}")
}

fn webhook_requests(outcome: &str) -> String {
    format!("partner_bridge_webhook_requests_total{{outcome=\"{outcome}\"}}")
}

const PAUSED: &str = "partner_bridge_paused{pipeline=\"issuer_onboarding\",reason=\"credentials\"}";

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("HTTP client")
}

/// `GET /readyz`: status and body.
async fn readyz(running: &Running) -> (u16, String) {
    let response = http()
        .get(format!("http://{}/readyz", running.admin_addr()))
        .send()
        .await
        .expect("GET /readyz");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// A `status.updated` body as Didit sends it.
fn webhook_body(session_id: &str, status: &str, timestamp: i64) -> Value {
    json!({
        "session_id": session_id,
        "status": status,
        "webhook_type": "status.updated",
        "session_kind": "user",
        "vendor_data": format!("hook-{session_id}"),
        "event_id": uuid::Uuid::new_v4().to_string(),
        "created_at": timestamp,
        "timestamp": timestamp,
        "decision": { "score": 98.0, "features": ["ID_VERIFICATION"] },
    })
}

/// `X-Signature-V2` and `X-Timestamp` for `body`, signed with `secret`.
fn signed_headers(secret: &str, body: &Value) -> Vec<(&'static str, String)> {
    vec![
        ("x-signature-v2", signature::sign_v2(secret, body)),
        (
            "x-timestamp",
            body["timestamp"].as_i64().unwrap_or_default().to_string(),
        ),
    ]
}

/// Posts a webhook delivery (`body` sent as these exact bytes) and answers the status and JSON answer.
async fn post_webhook(
    running: &Running,
    body: &[u8],
    headers: &[(&'static str, String)],
) -> (u16, Value) {
    let addr = running
        .webhook_addr()
        .expect("the webhook intake is configured");
    let mut request = http()
        .post(format!("http://{addr}/webhooks/didit"))
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.expect("POST /webhooks/didit");
    let status = response.status().as_u16();
    let answer = response.json().await.unwrap_or(Value::Null);
    (status, answer)
}

fn event_with_partners(
    world: &World,
    session_id: &str,
    kind: SessionKind,
    status: &str,
    partners: &[&str],
) -> OnboardingFinished {
    let mut event = world.event(session_id, kind, status);
    event.partners = Some(partners.iter().map(|p| p.to_string()).collect());
    event
}

/// Asserts everything DESIGN.md §2 promises about one published token and answers its envelope.
fn check_token(
    world: &World,
    taken: &Taken,
    event: &OnboardingFinished,
    partner_application_id: &str,
    ttl_seconds: i64,
) -> ShareTokenEnvelope {
    // Routing and AMQP properties.
    assert_eq!(taken.routing_key, format!("token.{partner_application_id}"));
    let p = &taken.properties;
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(p.kind().as_ref().map(|s| s.as_str()), Some("share_token"));
    assert_eq!(
        p.app_id().as_ref().map(|s| s.as_str()),
        Some("partner-bridge")
    );
    assert!(
        p.expiration().is_none(),
        "no AMQP expiration: an expired token must still reach its receiver"
    );
    let timestamp = p.timestamp().expect("an AMQP timestamp");
    let now = Utc::now().timestamp() as u64;
    assert!(
        timestamp <= now && now - timestamp < 120,
        "timestamp {timestamp} is not about now ({now})"
    );

    // The signature covers the exact body bytes, with the issuer's key.
    let public = world.key.verifying_key();
    let signature_header = taken.header("x-pb-signature").expect("x-pb-signature");
    assert!(signature_header.starts_with("ed25519:"));
    public
        .verify(&taken.body, &signature_header)
        .expect("the signature verifies with the issuer's public key");
    assert_eq!(
        taken.header("x-pb-key-id").as_deref(),
        Some(world.key.key_id())
    );
    let mut tampered = taken.body.clone();
    let last = tampered.len() - 1;
    tampered.insert(last, b' ');
    assert!(
        public.verify(&tampered, &signature_header).is_err(),
        "a changed body must not verify"
    );

    // The body.
    let raw = taken.json();
    assert_eq!(raw["type"], "share_token");
    let envelope = taken.envelope();
    assert_eq!(
        p.message_id().as_ref().map(|s| s.as_str()),
        Some(envelope.message_id.as_str()),
        "AMQP message_id is the envelope's"
    );
    assert_eq!(envelope.event_id, event.event_id);
    assert_eq!(envelope.source_session_id, event.session_id);
    assert_eq!(
        envelope.from_application_id,
        world.issuer_app.application_id
    );
    assert_eq!(envelope.for_application_id, partner_application_id);
    let kind = event.session_kind.unwrap_or(SessionKind::User);
    assert_eq!(envelope.session_kind, kind);
    let claims = ShareTokenClaims::peek(envelope.share_token.expose()).expect("a JWT");
    assert_eq!(claims.session_id, event.session_id);
    assert_eq!(claims.for_application_id, partner_application_id);
    assert_eq!(claims.from_application_id, world.issuer_app.application_id);
    assert_eq!(envelope.expires_at.timestamp(), claims.exp);
    let lifetime = (envelope.expires_at - envelope.minted_at).num_seconds();
    assert!(
        (ttl_seconds - 5..=ttl_seconds).contains(&lifetime),
        "token lives {lifetime} s, partner ttl is {ttl_seconds} s"
    );
    let occurred = event.occurred_at.expect("the tests set occurred_at");
    assert!(
        (envelope.occurred_at - occurred).num_milliseconds().abs() < 1000,
        "occurred_at {} is the event's {occurred}",
        envelope.occurred_at
    );
    for field in [
        "message_id",
        "event_id",
        "share_token",
        "session_kind",
        "source_session_id",
        "from_application_id",
        "for_application_id",
        "source_status",
        "minted_at",
        "expires_at",
        "occurred_at",
    ] {
        assert!(
            raw.get(field).is_some(),
            "field {field} missing; the body has {:?}",
            fields(&raw)
        );
    }
    envelope
}

/// The field names of a JSON object (failure messages show these, never a body with its share token).
fn fields(value: &Value) -> Vec<String> {
    value
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// An issuer TOML with extra text appended (more partners, `[issuer.webhook]`).
fn issuer_toml_with(world: &World, extra: &str) -> String {
    format!("{}{extra}", world.issuer_toml())
}

// ---- tokens --------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_becomes_one_signed_token_per_matching_partner() {
    let world = World::new("iss-tokens").await;
    let broker = world
        .control
        .create_application("kyc-broker")
        .await
        .unwrap();
    let lender = world
        .control
        .create_application("kyb-lender")
        .await
        .unwrap();
    let sponsor_id = world.partner_app.application_id.clone();
    let broker_id = broker.application_id.clone();
    let lender_id = lender.application_id.clone();
    // sponsor-bank (harness): every finished status, both kinds, vendor data shared, ttl 3600.
    // kyc-broker: approved KYC only (written in KYB casing), no vendor data, ttl 600.
    // kyb-lender: approved KYB only.
    let toml = issuer_toml_with(
        &world,
        &format!(
            "{}{}",
            partner_toml(
                "kyc-broker",
                &broker_id,
                &["APPROVED"],
                &["user"],
                false,
                600
            ),
            partner_toml(
                "kyb-lender",
                &lender_id,
                &["Approved"],
                &["business"],
                true,
                3600
            ),
        ),
    );
    let sponsor_tap = Tap::tokens(&world, &sponsor_id).await;
    let broker_tap = Tap::tokens(&world, &broker_id).await;
    let lender_tap = Tap::tokens(&world, &lender_id).await;
    let issuer = world.start(world.config(&toml)).await;
    let amqp = Amqp::connect().await;

    // An approved KYC session: sponsor-bank and kyc-broker, not kyb-lender.
    let kyc = world
        .session(SessionKind::User, "Approved", "user-42")
        .await;
    let kyc_event = world.event(&kyc, SessionKind::User, "Approved");
    world.publish_event(&amqp, &kyc_event).await;
    // A declined KYB session: only sponsor-bank accepts declined sessions.
    let kyb = world
        .session(SessionKind::Business, "DECLINED", "company-7")
        .await;
    let kyb_event = world.event(&kyb, SessionKind::Business, "DECLINED");
    world.publish_event(&amqp, &kyb_event).await;
    // An event naming one partner narrows the set: only kyc-broker, although sponsor-bank's policy matches too.
    let narrowed = world
        .session(SessionKind::User, "Approved", "user-43")
        .await;
    let narrowed_event = event_with_partners(
        &world,
        &narrowed,
        SessionKind::User,
        "Approved",
        &[&broker_id],
    );
    world.publish_event(&amqp, &narrowed_event).await;

    // Tokens are confirmed before an event is counted, so once all three are counted every token is queued.
    wait_metric(&issuer, &events("amqp", "processed"), 3.0).await;
    let sponsor = sponsor_tap.wait_count(2).await;
    let broker_tokens = broker_tap.wait_count(2).await;
    assert_eq!(
        sponsor_tap.now().await.len(),
        2,
        "sponsor-bank: one token per matching event"
    );
    assert_eq!(
        broker_tap.now().await.len(),
        2,
        "kyc-broker: one token per matching event"
    );
    assert!(
        lender_tap.now().await.is_empty(),
        "kyb-lender's policy matches none of the events"
    );

    let by_session = |tokens: &[Taken], session: &str| -> Taken {
        let found: Vec<&Taken> = tokens
            .iter()
            .filter(|t| t.envelope().source_session_id == session)
            .collect();
        assert_eq!(found.len(), 1, "exactly one token for session {session}");
        found[0].clone()
    };

    // sponsor-bank, KYC: vendor data travels, status as the event said.
    let t = by_session(&sponsor, &kyc);
    let e = check_token(&world, &t, &kyc_event, &sponsor_id, 3600);
    assert_eq!(e.source_status, "Approved");
    assert_eq!(e.source_vendor_data, kyc_event.vendor_data);
    // sponsor-bank, KYB: KYB casing and kind.
    let t = by_session(&sponsor, &kyb);
    let e = check_token(&world, &t, &kyb_event, &sponsor_id, 3600);
    assert_eq!(e.session_kind, SessionKind::Business);
    assert_eq!(e.source_status, "DECLINED");
    assert_eq!(e.source_vendor_data, kyb_event.vendor_data);
    // kyc-broker: no vendor data at all (the field is absent, not null), and its own ttl.
    for (session, event) in [(&kyc, &kyc_event), (&narrowed, &narrowed_event)] {
        let t = by_session(&broker_tokens, session);
        let e = check_token(&world, &t, event, &broker_id, 600);
        assert_eq!(e.source_status, "Approved");
        assert!(
            t.json().get("source_vendor_data").is_none(),
            "share_vendor_data = false, yet the body has {:?}",
            fields(&t.json())
        );
    }
    assert!(
        sponsor
            .iter()
            .all(|t| t.envelope().source_session_id != narrowed),
        "an event naming kyc-broker only does not go to sponsor-bank"
    );
    let message_ids: std::collections::BTreeSet<String> = sponsor
        .iter()
        .chain(&broker_tokens)
        .map(|t| t.envelope().message_id)
        .collect();
    assert_eq!(
        message_ids.len(),
        4,
        "every envelope has its own message id"
    );

    assert_eq!(
        world.control.stats().await.unwrap().shares,
        4,
        "one share per token"
    );
    let text = issuer.metrics().encode();
    assert_eq!(
        metric(
            &text,
            "partner_bridge_tokens_published_total{partner=\"sponsor-bank\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            "partner_bridge_tokens_published_total{partner=\"kyc-broker\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            "partner_bridge_tokens_published_total{partner=\"kyb-lender\"}"
        ),
        0.0
    );
    assert_eq!(metric(&text, &shares("kyc-broker", "minted")), 2.0);

    for tap in [sponsor_tap, broker_tap, lender_tap] {
        tap.close().await;
    }
    amqp.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_events_mint_nothing_new_and_unfinished_ones_are_counted() {
    let world = World::new("iss-dup").await;
    let tap = Tap::tokens(&world, &world.partner_app.application_id).await;
    let issuer = world.start_issuer().await;
    let amqp = Amqp::connect().await;

    let session = world.session(SessionKind::User, "Approved", "user-1").await;
    let event = world.event(&session, SessionKind::User, "Approved");
    world.publish_event(&amqp, &event).await;
    let first = tap.wait_count(1).await;
    wait_metric(&issuer, &events("amqp", "processed"), 1.0).await;

    // The same event again (as the issuer's backend retrying its publish would send it), and another event about
    // the same session: the first token is still valid, so neither mints.
    world.publish_event(&amqp, &event).await;
    let mut again = world.event(&session, SessionKind::User, "Approved");
    again.occurred_at = Some(Utc::now());
    world.publish_event(&amqp, &again).await;
    wait_metric(&issuer, &events("amqp", "duplicate"), 2.0).await;

    // Unfinished statuses, in both casings: acked, counted, nothing shared.
    let pending = world
        .session(SessionKind::User, "In Progress", "user-2")
        .await;
    world
        .publish_event(
            &amqp,
            &world.event(&pending, SessionKind::User, "In Progress"),
        )
        .await;
    let kyb = world
        .session(SessionKind::Business, "NOT_STARTED", "company-2")
        .await;
    world
        .publish_event(
            &amqp,
            &world.event(&kyb, SessionKind::Business, "NOT_STARTED"),
        )
        .await;
    wait_metric(&issuer, &events("amqp", "ignored_unfinished"), 2.0).await;

    assert_eq!(
        tap.now().await.len(),
        1,
        "one token for the session, whatever the events"
    );
    assert_eq!(first[0].envelope().event_id, event.event_id);
    let text = issuer.metrics().encode();
    assert_eq!(metric(&text, &events("amqp", "processed")), 1.0);
    assert_eq!(metric(&text, &shares("sponsor-bank", "minted")), 1.0);
    assert_eq!(metric(&text, &shares("sponsor-bank", "skipped_valid")), 2.0);
    assert_eq!(world.control.stats().await.unwrap().shares, 1);
    let queue = world.names.issuer_onboarding_queue();
    assert_eq!(amqp.depth(&queue).await, 0, "every event was acked");
    assert_eq!(amqp.depth(&Names::dead_queue(&queue)).await, 0);

    tap.close().await;
    amqp.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_redelivered_after_its_token_was_published_mints_nothing_new() {
    let world = World::new("iss-redeliver").await;
    // Intake through a proxy we can cut; tokens straight to the broker, so the token goes out while the event's
    // ack cannot.
    let proxy = Proxy::start().await;
    let toml = set(
        &set(
            &world.issuer_toml(),
            &format!("url = \"{}\"", amqp_url()),
            &format!("url = \"{}\"", proxy.amqp_url()),
        ),
        "[issuer]\nenabled = true\n",
        &format!(
            "[issuer]\nenabled = true\ntokens_url = \"{}\"\n",
            amqp_url()
        ),
    );
    let tap = Tap::tokens(&world, &world.partner_app.application_id).await;
    let issuer = world.start(world.config(&toml)).await;
    let amqp = Amqp::connect().await;
    // A slow share, so the event is certainly being handled when the intake connection drops.
    world
        .control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::Share,
            latency_ms: 1500,
            ..FaultSettings::default()
        })
        .await
        .unwrap();

    let session = world.session(SessionKind::User, "Approved", "user-9").await;
    world
        .publish_event(&amqp, &world.event(&session, SessionKind::User, "Approved"))
        .await;
    wait_metric(
        &issuer,
        "partner_bridge_in_flight{pipeline=\"issuer_onboarding\"}",
        1.0,
    )
    .await;
    proxy.refuse(true);
    proxy.cut();

    // The handler finishes: the token is published on the other connection; its ack is lost with the channel.
    tap.wait_count(1).await;
    wait_metric(&issuer, &events("amqp", "processed"), 1.0).await;
    world.control.clear_faults().await.unwrap();
    proxy.refuse(false);

    // The broker hands the unacked event back; the ledger knows its token is valid.
    wait_metric(&issuer, &events("amqp", "duplicate"), 1.0).await;
    assert_eq!(tap.now().await.len(), 1, "the redelivery minted nothing");
    assert_eq!(world.control.stats().await.unwrap().shares, 1);
    assert_eq!(
        metric_of(&issuer, &shares("sponsor-bank", "skipped_valid")),
        1.0
    );
    let queue = world.names.issuer_onboarding_queue();
    wait_for("the redelivered event acked", WAIT, || async {
        (amqp.depth(&queue).await == 0).then_some(())
    })
    .await;

    tap.close().await;
    amqp.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

// ---- share answers (DESIGN.md §4) ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_shares_are_dead_lettered_for_their_partner_only() {
    let world = World::new("iss-400").await;
    // ghost-bank is configured, but Didit (the sandbox) knows no such application: every share for it is a 400.
    let ghost_id = uuid::Uuid::new_v4().to_string();
    let sponsor_id = world.partner_app.application_id.clone();
    let toml = issuer_toml_with(
        &world,
        &partner_toml(
            "ghost-bank",
            &ghost_id,
            &["Approved", "In Review", "Declined"],
            &["user", "business"],
            false,
            3600,
        ),
    );
    let tap = Tap::tokens(&world, &sponsor_id).await;
    let issuer = world.start(world.config(&toml)).await;
    let queue = world.names.issuer_onboarding_queue();
    let dead = Tap::on(&Names::dead_queue(&queue)).await;
    let amqp = Amqp::connect().await;

    // A: the session has not finished although the event says Approved → 400 for both partners.
    let unfinished = world
        .session(SessionKind::User, "Not Started", "user-a")
        .await;
    let a = world.event(&unfinished, SessionKind::User, "Approved");
    // B: a finished session → a token for sponsor-bank, 400 (unknown application) for ghost-bank.
    let finished = world.session(SessionKind::User, "Approved", "user-b").await;
    let b = world.event(&finished, SessionKind::User, "Approved");
    // C: the event names an application no [[issuer.partners]] entry has, and sponsor-bank.
    let stranger = uuid::Uuid::new_v4().to_string();
    let other = world.session(SessionKind::User, "Approved", "user-c").await;
    let c = event_with_partners(
        &world,
        &other,
        SessionKind::User,
        "Approved",
        &[&stranger, &sponsor_id],
    );
    // D: Didit has no such session → 404 for both partners.
    let missing = uuid::Uuid::new_v4().to_string();
    let d = world.event(&missing, SessionKind::User, "Approved");
    for event in [&a, &b, &c, &d] {
        world.publish_event(&amqp, event).await;
    }

    let copies = dead.wait_count(6).await;
    let tokens = tap.wait_count(2).await;
    wait_metric(&issuer, &events("amqp", "processed"), 2.0).await;
    wait_metric(&issuer, &events("amqp", "dead_lettered"), 2.0).await;

    // Every copy is the original event, with the partner it is about, a reason and a detail.
    let mut seen: BTreeMap<(String, String), String> = BTreeMap::new();
    for copy in &copies {
        let original: OnboardingFinished = serde_json::from_slice(&copy.body).unwrap();
        let partner = copy.header("x-pb-partner").expect("x-pb-partner");
        let detail = copy.header("x-pb-detail").unwrap_or_default();
        assert!(!detail.is_empty(), "x-pb-detail says why");
        assert!(
            seen.insert((original.event_id.clone(), partner), copy.reason())
                .is_none(),
            "one copy per event and partner"
        );
    }
    let expect = [
        (&a.event_id, &sponsor_id, "share_rejected"),
        (&a.event_id, &ghost_id, "share_rejected"),
        (&b.event_id, &ghost_id, "share_rejected"),
        (&c.event_id, &stranger, "unknown_partner"),
        (&d.event_id, &sponsor_id, "session_not_found"),
        (&d.event_id, &ghost_id, "session_not_found"),
    ];
    for (event_id, partner, reason) in expect {
        assert_eq!(
            seen.get(&(event_id.clone(), partner.clone()))
                .map(String::as_str),
            Some(reason),
            "event {event_id}, partner {partner}: {seen:?}"
        );
    }
    assert_eq!(seen.len(), expect.len());

    // The other partners were served.
    let served: Vec<String> = tokens
        .iter()
        .map(|t| t.envelope().source_session_id)
        .collect();
    assert_eq!(tap.now().await.len(), 2);
    assert!(
        served.contains(&finished) && served.contains(&other),
        "{served:?}"
    );

    let text = issuer.metrics().encode();
    assert_eq!(metric(&text, &shares("ghost-bank", "rejected")), 2.0);
    assert_eq!(metric(&text, &shares("ghost-bank", "not_found")), 1.0);
    assert_eq!(metric(&text, &shares("sponsor-bank", "rejected")), 1.0);
    assert_eq!(metric(&text, &shares("sponsor-bank", "not_found")), 1.0);
    assert_eq!(metric(&text, &dead_lettered(&queue, "share_rejected")), 3.0);
    assert_eq!(
        metric(&text, &dead_lettered(&queue, "session_not_found")),
        2.0
    );
    assert_eq!(
        metric(&text, &dead_lettered(&queue, "unknown_partner")),
        1.0
    );
    assert_eq!(amqp.depth(&queue).await, 0, "the originals were acked");
    assert_eq!(
        amqp.depth(&Names::retry_queue(&queue)).await,
        0,
        "nothing retried"
    );

    tap.close().await;
    dead.close().await;
    amqp.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_pauses_the_pipeline_and_a_new_key_file_resumes_it() {
    let world = World::new("iss-revoke").await;
    let key_file = world.dir.path().join("issuer-api-key");
    std::fs::write(&key_file, world.issuer_app.api_key.expose()).unwrap();
    let toml = set(
        &world.issuer_toml(),
        &format!("api_key = \"{}\"", world.issuer_app.api_key.expose()),
        &format!("api_key_file = \"{}\"", key_file.display()),
    );
    let tap = Tap::tokens(&world, &world.partner_app.application_id).await;
    let issuer = world.start(world.config(&toml)).await;
    let amqp = Amqp::connect().await;
    let queue = world.names.issuer_onboarding_queue();

    let before = world.session(SessionKind::User, "Approved", "user-1").await;
    world
        .publish_event(&amqp, &world.event(&before, SessionKind::User, "Approved"))
        .await;
    tap.wait_count(1).await;

    // Didit stops accepting the key: the pipeline pauses, says why, and keeps the event.
    let new_key = world
        .control
        .revoke_key(&world.issuer_app.application_id)
        .await
        .unwrap();
    let during = world.session(SessionKind::User, "Approved", "user-2").await;
    world
        .publish_event(&amqp, &world.event(&during, SessionKind::User, "Approved"))
        .await;
    wait_metric(&issuer, PAUSED, 1.0).await;
    let (status, body) = readyz(&issuer).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("paused: credentials"),
        "/readyz says why: {body}"
    );
    // Paused is not dead: liveness (and so the kubelet) leaves the process alone.
    let livez = http()
        .get(format!("http://{}/livez", issuer.admin_addr()))
        .send()
        .await
        .expect("GET /livez");
    assert_eq!(livez.status().as_u16(), 200, "/livez while paused");
    assert!(
        !body.contains(new_key.expose()) && !body.contains(world.issuer_app.api_key.expose()),
        "no key in /readyz"
    );
    wait_for("the event parked in the queue", WAIT, || async {
        let parked = amqp.depth(&queue).await + amqp.depth(&Names::retry_queue(&queue)).await;
        (parked == 1).then_some(())
    })
    .await;
    assert_eq!(
        amqp.depth(&Names::dead_queue(&queue)).await,
        0,
        "nothing dead-lettered"
    );
    assert_eq!(tap.now().await.len(), 1, "no token while paused");
    assert!(metric_of(&issuer, &shares("sponsor-bank", "paused")) >= 1.0);

    // The operator rotates the secret file; the probe picks it up and the parked event is served.
    std::fs::write(&key_file, new_key.expose()).unwrap();
    let tokens = tap.wait_count(2).await;
    assert_eq!(tokens[1].envelope().source_session_id, during);
    wait_for("the pipeline resumed", WAIT, || async {
        (metric_of(&issuer, PAUSED) == 0.0 && readyz(&issuer).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(tap.now().await.len(), 2);
    assert_eq!(world.control.stats().await.unwrap().shares, 2);
    assert_eq!(amqp.depth(&queue).await, 0);

    tap.close().await;
    amqp.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_the_share_privilege_pauses_without_losing_or_exhausting_the_event() {
    let world = World::new("iss-403").await;
    // A key that may read sessions but not write them: Didit answers share with 403 permission_denied. The probe
    // (a read) passes, so the pipeline resumes, meets the 403 again and pauses again, with growing waits.
    let readonly = world
        .control
        .create_application_with_privileges("fintech-ro", &["read:sessions"])
        .await
        .unwrap();
    let toml = set(
        &set(
            &set(
                &world.issuer_toml(),
                &format!("application_id = \"{}\"", world.issuer_app.application_id),
                &format!("application_id = \"{}\"", readonly.application_id),
            ),
            &format!("api_key = \"{}\"", world.issuer_app.api_key.expose()),
            &format!("api_key = \"{}\"", readonly.api_key.expose()),
        ),
        "max_attempts = 10",
        "max_attempts = 2",
    );
    let tap = Tap::tokens(&world, &world.partner_app.application_id).await;
    let issuer = world.start(world.config(&toml)).await;
    let amqp = Amqp::connect().await;
    let queue = world.names.issuer_onboarding_queue();

    let session = world
        .control
        .create_session(
            &readonly.application_id,
            SessionKind::User,
            "Approved",
            Some("user-ro"),
        )
        .await
        .unwrap()
        .session_id;
    world
        .publish_event(&amqp, &world.event(&session, SessionKind::User, "Approved"))
        .await;
    wait_for("/readyz failing because of the pause", WAIT, || async {
        let (status, body) = readyz(&issuer).await;
        (status == 503 && body.contains("paused: credentials")).then_some(())
    })
    .await;
    // Three refusals: more than retry.max_attempts = 2, yet a pause is not an attempt.
    wait_metric(
        &issuer,
        "partner_bridge_didit_requests_total{operation=\"share\",status=\"403\"}",
        3.0,
    )
    .await;
    wait_for("the event parked in the queue", WAIT, || async {
        let parked = amqp.depth(&queue).await + amqp.depth(&Names::retry_queue(&queue)).await;
        (parked == 1).then_some(())
    })
    .await;
    assert_eq!(
        amqp.depth(&Names::dead_queue(&queue)).await,
        0,
        "a pipeline fault is never dead-lettered"
    );
    assert_eq!(
        metric_of(&issuer, &dead_lettered(&queue, "retries_exhausted")),
        0.0
    );
    assert!(metric_of(&issuer, &shares("sponsor-bank", "paused")) >= 3.0);
    assert!(tap.now().await.is_empty());
    assert_eq!(world.control.stats().await.unwrap().shares, 0);

    tap.close().await;
    amqp.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_rate_limits_still_deliver_every_token_exactly_once() {
    let world = World::new("iss-flaky").await;
    let tap = Tap::tokens(&world, &world.partner_app.application_id).await;
    let issuer = world.start_issuer().await;
    let amqp = Amqp::connect().await;
    world
        .control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::Share,
            error_rate: 0.2,
            rate_limit_rate: 0.1,
            ..FaultSettings::default()
        })
        .await
        .unwrap();

    const N: usize = 30;
    let mut sessions = Vec::new();
    for i in 0..N {
        let (kind, status) = if i % 3 == 0 {
            (SessionKind::Business, "APPROVED")
        } else {
            (SessionKind::User, "Approved")
        };
        let id = world.session(kind, status, &format!("v{i}")).await;
        world
            .publish_event(&amqp, &world.event(&id, kind, status))
            .await;
        sessions.push(id);
    }
    wait_metric(&issuer, &events("amqp", "processed"), N as f64).await;
    let tokens = tap.wait_count(N).await;
    let mut per_session: BTreeMap<String, usize> = BTreeMap::new();
    for t in &tokens {
        *per_session
            .entry(t.envelope().source_session_id)
            .or_default() += 1;
    }
    for id in &sessions {
        assert_eq!(per_session.get(id), Some(&1), "session {id}");
    }
    let stats = world.control.stats().await.unwrap();
    assert_eq!(stats.shares, N as u64, "no token minted twice");
    let faults: u64 = stats.rejections.values().sum();
    assert!(faults > 0, "the faults happened: {:?}", stats.rejections);
    assert!(metric_of(&issuer, "partner_bridge_retries_total{operation=\"share\"}") > 0.0);
    let queue = world.names.issuer_onboarding_queue();
    assert_eq!(amqp.depth(&Names::dead_queue(&queue)).await, 0);
    assert_eq!(tap.now().await.len(), N, "nothing more arrived");

    tap.close().await;
    amqp.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_that_times_out_is_retried_and_delivered_once() {
    let world = World::new("iss-timeout").await;
    let toml = set(
        &world.issuer_toml(),
        "timeout_ms = 2000",
        "timeout_ms = 300",
    );
    let tap = Tap::tokens(&world, &world.partner_app.application_id).await;
    let issuer = world.start(world.config(&toml)).await;
    let amqp = Amqp::connect().await;
    world
        .control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::Share,
            hang_rate: 1.0,
            ..FaultSettings::default()
        })
        .await
        .unwrap();

    let session = world.session(SessionKind::User, "Approved", "user-t").await;
    world
        .publish_event(&amqp, &world.event(&session, SessionKind::User, "Approved"))
        .await;
    wait_metric(
        &issuer,
        "partner_bridge_didit_requests_total{operation=\"share\",status=\"timeout\"}",
        2.0,
    )
    .await;
    assert!(tap.now().await.is_empty());
    world.control.clear_faults().await.unwrap();

    tap.wait_count(1).await;
    wait_metric(&issuer, &events("amqp", "processed"), 1.0).await;
    assert_eq!(tap.now().await.len(), 1);
    assert_eq!(world.control.stats().await.unwrap().shares, 1);

    tap.close().await;
    amqp.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_that_keeps_failing_goes_through_the_retry_queue_then_to_dead() {
    let mut world = World::new("iss-exhaust").await;
    world.retry_delay_ms = 200;
    let toml = set(
        &set(&world.issuer_toml(), "hold_max_s = 5", "hold_max_s = 1"),
        "max_attempts = 10",
        "max_attempts = 3",
    );
    let tap = Tap::tokens(&world, &world.partner_app.application_id).await;
    let issuer = world.start(world.config(&toml)).await;
    let queue = world.names.issuer_onboarding_queue();
    let dead = Tap::on(&Names::dead_queue(&queue)).await;
    let amqp = Amqp::connect().await;
    world
        .control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::Share,
            error_rate: 1.0,
            ..FaultSettings::default()
        })
        .await
        .unwrap();

    let session = world.session(SessionKind::User, "Approved", "user-x").await;
    let event = world.event(&session, SessionKind::User, "Approved");
    world.publish_event(&amqp, &event).await;

    let copies = dead.wait_count(1).await;
    let copy = &copies[0];
    assert_eq!(copy.reason(), "retries_exhausted");
    assert_eq!(
        copy.header("x-pb-attempt").as_deref(),
        Some("3"),
        "dead-lettered on its third delivery, after two trips through {queue}.retry"
    );
    assert_eq!(
        copy.header("x-pb-pending-partners").as_deref(),
        Some(world.partner_app.application_id.as_str()),
        "a replay serves exactly the partners still pending"
    );
    assert!(
        copy.header("x-pb-detail")
            .unwrap_or_default()
            .contains("sponsor-bank"),
        "{:?}",
        copy.header("x-pb-detail")
    );
    let original: OnboardingFinished = serde_json::from_slice(&copy.body).unwrap();
    assert_eq!(original.event_id, event.event_id);
    wait_metric(&issuer, &dead_lettered(&queue, "retries_exhausted"), 1.0).await;
    assert_eq!(metric_of(&issuer, &events("amqp", "retried")), 2.0);
    assert_eq!(metric_of(&issuer, &events("amqp", "dead_lettered")), 1.0);
    // Each trip through the retry queue is counted for its pipeline (the stall alert reads it: an attempt that
    // fails fast is never seen in flight); the last attempt is a dead letter, not a retry.
    assert_eq!(
        metric_of(
            &issuer,
            "partner_bridge_delivery_retries_total{pipeline=\"issuer_onboarding\"}"
        ),
        2.0
    );
    assert_eq!(
        metric_of(&issuer, &shares("sponsor-bank", "exhausted")),
        1.0
    );
    assert!(metric_of(&issuer, &shares("sponsor-bank", "retried")) >= 3.0);
    assert!(tap.now().await.is_empty());
    assert_eq!(world.control.stats().await.unwrap().shares, 0);
    assert_eq!(amqp.depth(&queue).await, 0);
    assert_eq!(amqp.depth(&Names::retry_queue(&queue)).await, 0);
    assert_eq!(dead.now().await.len(), 1, "dead-lettered once");

    tap.close().await;
    dead.close().await;
    amqp.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_share_uses_up_its_attempts_even_when_the_rate_limit_ends_each_hold() {
    // One write per 3 s window and a 1 s hold: after a share fails, its retry within the hold finds no room in the
    // write budget. Waiting for the limit is not a failure, but it must not hide the failure before it: each such
    // delivery counts its attempt, so a Didit that keeps failing is dead-lettered instead of cycling through the
    // retry queue for ever (before, every delivery ended "paced" and no attempt was ever counted).
    let mut world = World::new("iss-paced-fail").await;
    world.retry_delay_ms = 200;
    let toml = set(
        &set(&world.issuer_toml(), "hold_max_s = 5", "hold_max_s = 1"),
        "max_attempts = 10",
        "max_attempts = 3",
    );
    let toml = crate::support::faults::set_key(&toml, "writes_per_minute", "1").replacen(
        "writes_per_minute =",
        "rate_window_ms = 3000\nwrites_per_minute =",
        1,
    );
    let issuer = world.start(world.config(&toml)).await;
    let queue = world.names.issuer_onboarding_queue();
    let dead = Tap::on(&Names::dead_queue(&queue)).await;
    let amqp = Amqp::connect().await;
    world
        .control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::Share,
            error_rate: 1.0,
            ..FaultSettings::default()
        })
        .await
        .unwrap();

    let session = world.session(SessionKind::User, "Approved", "user-p").await;
    let event = world.event(&session, SessionKind::User, "Approved");
    world.publish_event(&amqp, &event).await;

    let copies = dead.wait_count(1).await;
    assert_eq!(copies[0].reason(), "retries_exhausted");
    assert_eq!(copies[0].header("x-pb-attempt").as_deref(), Some("3"));
    assert!(
        metric_of(
            &issuer,
            "partner_bridge_didit_limiter_deferred_total{key=\"issuer\"}"
        ) > 0.0,
        "no retry waited for the limit past the hold, so the test proved nothing"
    );
    assert_eq!(
        metric_of(&issuer, &shares("sponsor-bank", "exhausted")),
        1.0
    );
    assert_eq!(world.control.stats().await.unwrap().shares, 0);

    dead.close().await;
    amqp.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

// ---- poison messages -----------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_a_reason_and_the_consumer_keeps_going() {
    let world = World::new("iss-poison").await;
    let tap = Tap::tokens(&world, &world.partner_app.application_id).await;
    let issuer = world.start_issuer().await;
    let queue = world.names.issuer_onboarding_queue();
    let dead = Tap::on(&Names::dead_queue(&queue)).await;
    let reshare_dead = Tap::on(&Names::dead_queue(&world.names.issuer_reshare_queue())).await;
    let amqp = Amqp::connect().await;
    let exchange = world.names.onboarding_exchange();

    let mut huge = serde_json::to_vec(&json!({
        "type": "onboarding.finished",
        "event_id": "huge",
        "session_id": uuid::Uuid::new_v4().to_string(),
        "status": "Approved",
        "padding": "",
    }))
    .unwrap();
    let pad = 1024 * 1024 - huge.len();
    let at = huge.len() - 2; // inside the empty "padding" string
    huge.splice(at..at, std::iter::repeat_n(b'x', pad));
    assert_eq!(huge.len(), 1024 * 1024);
    serde_json::from_slice::<Value>(&huge).expect("the 1 MiB body is valid JSON");

    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("malformed_json", b"this is not JSON {".to_vec()),
        (
            "unknown_type",
            br#"{"type":"onboarding.started","event_id":"e1","session_id":"s1","status":"Approved"}"#
                .to_vec(),
        ),
        (
            "missing_field",
            br#"{"type":"onboarding.finished","event_id":"e2","status":"Approved"}"#.to_vec(),
        ),
        ("oversized", huge),
    ];
    for (_, body) in &poison {
        amqp.publish(&exchange, "onboarding.finished", body, &[])
            .await;
    }
    // A reshare request that is not JSON, on the other consumer.
    amqp.publish(
        &world.names.reshare_exchange(),
        &Names::reshare_key(&world.issuer_app.application_id),
        b"\x00\x01 binary",
        &[],
    )
    .await;
    // And then a good event, which is still served.
    let session = world
        .session(SessionKind::User, "Approved", "user-ok")
        .await;
    world
        .publish_event(&amqp, &world.event(&session, SessionKind::User, "Approved"))
        .await;

    let copies = dead.wait_count(poison.len()).await;
    for (reason, body) in &poison {
        let copy = copies
            .iter()
            .find(|c| c.reason() == *reason)
            .unwrap_or_else(|| panic!("no copy with reason {reason}"));
        assert_eq!(
            &copy.body, body,
            "{reason}: the original bytes, for a replay"
        );
        assert!(
            !copy.header("x-pb-detail").unwrap_or_default().is_empty(),
            "{reason}: x-pb-detail says what is wrong"
        );
    }
    let reshare_copies = reshare_dead.wait_count(1).await;
    assert_eq!(reshare_copies[0].reason(), "malformed_json");

    let token = tap.wait_count(1).await;
    assert_eq!(token[0].envelope().source_session_id, session);
    wait_metric(&issuer, &events("amqp", "bad_message"), 4.0).await;
    let text = issuer.metrics().encode();
    for (reason, _) in &poison {
        assert_eq!(
            metric(&text, &dead_lettered(&queue, reason)),
            1.0,
            "{reason}"
        );
    }
    assert!(
        issuer.health().check().is_ok(),
        "still ready: {:?}",
        issuer.health().check()
    );
    assert_eq!(amqp.depth(&queue).await, 0);
    assert_eq!(dead.now().await.len(), poison.len());

    tap.close().await;
    dead.close().await;
    reshare_dead.close().await;
    amqp.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

// ---- reshare -------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshare_requests_mint_fresh_tokens_up_to_max_reshares() {
    let world = World::new("iss-reshare").await;
    let toml = set(&world.issuer_toml(), "max_reshares = 3", "max_reshares = 2");
    let sponsor_id = world.partner_app.application_id.clone();
    let tap = Tap::tokens(&world, &sponsor_id).await;
    let issuer = world.start(world.config(&toml)).await;
    let reshare_queue = world.names.issuer_reshare_queue();
    let dead = Tap::on(&Names::dead_queue(&reshare_queue)).await;
    let amqp = Amqp::connect().await;
    let request = |session: &str, for_app: &str, attempt: u32, original: &str| ReshareRequest {
        kind: "reshare.request".into(),
        source_session_id: session.to_string(),
        for_application_id: for_app.to_string(),
        reason: "token_expired".into(),
        attempt,
        original_message_id: original.to_string(),
    };
    let send = |r: ReshareRequest| {
        let amqp = &amqp;
        let exchange = world.names.reshare_exchange();
        let key = Names::reshare_key(&world.issuer_app.application_id);
        let world = &world;
        async move {
            // Signed by the receiver's key, as a real receiver does (issue #9: unsigned requests are refused).
            let body = serde_json::to_vec(&r).unwrap();
            let signature = world.receiver_key.sign(&body);
            let headers = [
                ("x-pb-signature", signature.as_str()),
                ("x-pb-key-id", world.receiver_key.key_id()),
            ];
            amqp.publish(&exchange, &key, &body, &headers).await
        }
    };
    let received = "partner_bridge_reshare_requests_total{direction=\"received\"}";

    let session = world.session(SessionKind::User, "Approved", "user-r").await;
    let event = world.event(&session, SessionKind::User, "Approved");
    world.publish_event(&amqp, &event).await;
    let first = tap.wait_count(1).await[0].envelope();

    // The receiver found the first token expired: a fresh one, about the same event.
    send(request(&session, &sponsor_id, 1, &first.message_id)).await;
    let tokens = tap.wait_count(2).await;
    let second = tokens[1].envelope();
    check_token(&world, &tokens[1], &event, &sponsor_id, 3600);
    assert_ne!(second.message_id, first.message_id);
    assert_eq!(second.event_id, first.event_id);
    assert_eq!(second.source_vendor_data, first.source_vendor_data);

    // The same request again (the receiver retried it): a newer token is already on its way, nothing minted.
    send(request(&session, &sponsor_id, 1, &first.message_id)).await;
    wait_metric(&issuer, received, 2.0).await;
    wait_metric(&issuer, &shares("sponsor-bank", "skipped_valid"), 1.0).await;
    assert_eq!(tap.now().await.len(), 2);

    // The second token expired too: the second and last reshare allowed.
    send(request(&session, &sponsor_id, 2, &second.message_id)).await;
    let third = tap.wait_count(3).await[2].envelope();
    assert_ne!(third.message_id, second.message_id);

    // A third reshare is over issuer.max_reshares = 2: dead-lettered for an operator.
    send(request(&session, &sponsor_id, 3, &third.message_id)).await;
    // A session this bridge never shared with the partner (or its ledger row was pruned): refused, never minted.
    let unknown = world
        .session(SessionKind::Business, "IN_REVIEW", "company-r")
        .await;
    send(request(&unknown, &sponsor_id, 1, "a-pruned-message-id")).await;
    // A request for an application that is not a partner.
    let stranger = uuid::Uuid::new_v4().to_string();
    send(request(&session, &stranger, 1, &third.message_id)).await;

    let copies = dead.wait_count(3).await;
    let mut reasons: Vec<String> = copies.iter().map(Taken::reason).collect();
    reasons.sort();
    assert_eq!(reasons, ["not_shared", "reshare_limit", "unknown_partner"]);
    let limit = copies
        .iter()
        .find(|c| c.reason() == "reshare_limit")
        .unwrap();
    let refused: ReshareRequest = serde_json::from_slice(&limit.body).unwrap();
    assert_eq!(refused.attempt, 3);

    wait_metric(&issuer, received, 6.0).await;
    assert_eq!(
        tap.now().await.len(),
        3,
        "three tokens for the session, none for the one never shared"
    );
    assert!(
        tap.now()
            .await
            .iter()
            .all(|t| t.envelope().source_session_id != unknown)
    );
    assert_eq!(world.control.stats().await.unwrap().shares, 3);
    assert_eq!(
        metric_of(&issuer, &dead_lettered(&reshare_queue, "reshare_limit")),
        1.0
    );
    assert_eq!(amqp.depth(&reshare_queue).await, 0);

    tap.close().await;
    dead.close().await;
    amqp.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

// ---- webhooks ------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_listener_may_share_port_zero_with_admin_but_not_a_fixed_port() {
    let world = World::new("iss-hook-cfg").await;
    // Port 0 gives each listener its own free port: valid, and they really differ once bound.
    let config = world.config(&issuer_toml_with(&world, &webhook_toml()));
    let issuer = world.start(config).await;
    assert_ne!(issuer.webhook_addr(), Some(issuer.admin_addr()));
    issuer.stop().await.unwrap();
    // The same fixed address for both cannot work and is refused, naming the key.
    let fixed = set(
        &set(
            &issuer_toml_with(&world, &webhook_toml()),
            "listen = \"127.0.0.1:0\"\n[retry]",
            "listen = \"127.0.0.1:19464\"\n[retry]",
        ),
        "listen = \"127.0.0.1:0\"\nsecret",
        "listen = \"127.0.0.1:19464\"\nsecret",
    );
    let config = partner_bridge::config::Config::from_toml(&fixed).unwrap();
    let error = config.validate().unwrap_err();
    assert_eq!(error.key, "issuer.webhook.listen");
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_webhook_is_on_the_broker_before_its_200_and_becomes_a_token() {
    let world = World::new("iss-hook").await;
    let toml = issuer_toml_with(&world, &webhook_toml());
    let tokens = Tap::tokens(&world, &world.partner_app.application_id).await;
    // A second queue on the onboarding exchange sees every event the intake publishes.
    let events_tap = Tap::bind(
        &world.names.onboarding_exchange(),
        "topic",
        "onboarding.finished",
    )
    .await;
    let issuer = world.start(world.config(&toml)).await;

    // Posted by hand, to look at the broker the moment the 200 arrives.
    let session = world.session(SessionKind::User, "Approved", "user-h").await;
    let body = webhook_body(&session, "Approved", Utc::now().timestamp());
    let bytes = serde_json::to_vec(&body).unwrap();
    let (status, answer) =
        post_webhook(&issuer, &bytes, &signed_headers(WEBHOOK_SECRET, &body)).await;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (200, Some("accepted")),
        "{answer}"
    );
    let queued = events_tap.now().await;
    assert_eq!(
        queued.len(),
        1,
        "the event was confirmed by the broker before the 200"
    );
    let event: OnboardingFinished = serde_json::from_slice(&queued[0].body).unwrap();
    assert_eq!(event.session_id, session);
    assert_eq!(event.status, "Approved");
    assert_eq!(event.session_kind, Some(SessionKind::User));
    assert_eq!(
        event.vendor_data.as_deref(),
        Some(format!("hook-{session}").as_str())
    );
    assert_eq!(event.event_id, body["event_id"].as_str().unwrap());
    assert_eq!(queued[0].header("x-pb-source").as_deref(), Some("webhook"));
    let p = &queued[0].properties;
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(
        p.kind().as_ref().map(|s| s.as_str()),
        Some("onboarding.finished")
    );
    assert_eq!(
        p.app_id().as_ref().map(|s| s.as_str()),
        Some("partner-bridge")
    );
    let token = tokens.wait_count(1).await;
    let envelope = token[0].envelope();
    assert_eq!(envelope.source_session_id, session);
    assert_eq!(envelope.event_id, event.event_id);

    // Delivered by the sandbox as Didit would (a registered destination, its own body bytes and signatures).
    let url = format!(
        "http://{}/webhooks/didit",
        issuer.webhook_addr().expect("webhook intake")
    );
    world
        .control
        .add_webhook_destination(
            world.issuer_app.api_key.expose(),
            &url,
            Some(WEBHOOK_SECRET),
        )
        .await
        .unwrap();
    let kyb = world
        .session(SessionKind::Business, "APPROVED", "company-h")
        .await;
    let token = wait_for("a token for the KYB session", WAIT, || async {
        tokens
            .now()
            .await
            .into_iter()
            .map(|t| t.envelope())
            .find(|e| e.source_session_id == kyb)
    })
    .await;
    assert_eq!(token.session_kind, SessionKind::Business);
    assert_eq!(token.source_status, "APPROVED");
    let deliveries = world.control.webhook_deliveries().await.unwrap();
    let delivery = deliveries
        .iter()
        .find(|d| d.session_id == kyb)
        .expect("the sandbox recorded its delivery");
    assert_eq!(
        (delivery.status_code, delivery.delivered),
        (Some(200), true)
    );

    wait_metric(&issuer, &events("webhook", "processed"), 2.0).await;
    assert_eq!(metric_of(&issuer, &webhook_requests("accepted")), 2.0);
    assert_eq!(tokens.now().await.len(), 2);

    tokens.close().await;
    events_tap.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stale_and_replayed_webhooks_are_refused_and_counted() {
    let world = World::new("iss-hook-bad").await;
    let toml = issuer_toml_with(&world, &webhook_toml());
    let events_tap = Tap::bind(
        &world.names.onboarding_exchange(),
        "topic",
        "onboarding.finished",
    )
    .await;
    let tokens = Tap::tokens(&world, &world.partner_app.application_id).await;
    let issuer = world.start(world.config(&toml)).await;
    let session = world.session(SessionKind::User, "Approved", "user-b").await;
    let now = Utc::now().timestamp();

    // Signed with another secret.
    let body = webhook_body(&session, "Approved", now);
    let bytes = serde_json::to_vec(&body).unwrap();
    let (status, answer) =
        post_webhook(&issuer, &bytes, &signed_headers("not-the-secret", &body)).await;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (401, Some("bad_signature"))
    );
    // No signature at all.
    let (status, _) = post_webhook(&issuer, &bytes, &[("x-timestamp", now.to_string())]).await;
    assert_eq!(status, 401);
    // Right secret, but the body was changed after signing.
    let mut changed = body.clone();
    changed["status"] = json!("Declined");
    let (status, answer) = post_webhook(
        &issuer,
        &serde_json::to_vec(&changed).unwrap(),
        &signed_headers(WEBHOOK_SECRET, &body),
    )
    .await;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (401, Some("bad_signature"))
    );
    assert_eq!(metric_of(&issuer, &webhook_requests("bad_signature")), 3.0);

    // Correctly signed, ten minutes old.
    let stale = webhook_body(&session, "Approved", now - 600);
    let (status, answer) = post_webhook(
        &issuer,
        &serde_json::to_vec(&stale).unwrap(),
        &signed_headers(WEBHOOK_SECRET, &stale),
    )
    .await;
    assert_eq!((status, answer["outcome"].as_str()), (401, Some("stale")));
    assert_eq!(metric_of(&issuer, &webhook_requests("stale")), 1.0);
    assert!(
        events_tap.now().await.is_empty(),
        "nothing refused reached the broker"
    );

    // A good delivery, then the very same bytes again: a replay, answered 200 `duplicate` (Didit's retry of an
    // accepted delivery must not look like a failure) and not published again.
    let headers = signed_headers(WEBHOOK_SECRET, &body);
    let (status, _) = post_webhook(&issuer, &bytes, &headers).await;
    assert_eq!(status, 200);
    let (status, answer) = post_webhook(&issuer, &bytes, &headers).await;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (200, Some("duplicate"))
    );
    assert_eq!(metric_of(&issuer, &webhook_requests("duplicate")), 1.0);

    // An unfinished status: 200 (so Didit stops), nothing published.
    let pending = webhook_body(&session, "In Progress", now);
    let (status, answer) = post_webhook(
        &issuer,
        &serde_json::to_vec(&pending).unwrap(),
        &signed_headers(WEBHOOK_SECRET, &pending),
    )
    .await;
    assert_eq!((status, answer["outcome"].as_str()), (200, Some("ignored")));
    assert_eq!(metric_of(&issuer, &webhook_requests("ignored")), 1.0);
    assert_eq!(
        metric_of(&issuer, &events("webhook", "ignored_unfinished")),
        1.0
    );

    assert_eq!(
        events_tap.now().await.len(),
        1,
        "only the one good delivery became an event"
    );
    tokens.wait_count(1).await;
    wait_metric(&issuer, &events("webhook", "processed"), 1.0).await;
    assert_eq!(tokens.now().await.len(), 1);
    assert_eq!(metric_of(&issuer, &webhook_requests("accepted")), 1.0);

    tokens.close().await;
    events_tap.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_while_the_broker_is_down_gets_503_and_its_retry_is_accepted() {
    let world = World::new("iss-hook-down").await;
    let proxy = Proxy::start().await;
    let toml = set(
        &issuer_toml_with(&world, &webhook_toml()),
        &format!("url = \"{}\"", amqp_url()),
        &format!("url = \"{}\"", proxy.amqp_url()),
    );
    let tokens = Tap::tokens(&world, &world.partner_app.application_id).await;
    let issuer = world.start(world.config(&toml)).await;
    let session = world.session(SessionKind::User, "Approved", "user-d").await;
    let body = webhook_body(&session, "Approved", Utc::now().timestamp());
    let bytes = serde_json::to_vec(&body).unwrap();
    let headers = signed_headers(WEBHOOK_SECRET, &body);

    proxy.refuse(true);
    proxy.cut();
    let (status, answer) = post_webhook(&issuer, &bytes, &headers).await;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (503, Some("broker_unavailable")),
        "{answer}"
    );
    assert_eq!(
        metric_of(&issuer, &webhook_requests("broker_unavailable")),
        1.0
    );

    // Didit delivers the same bytes again once the broker is back: accepted, not taken for a replay.
    proxy.refuse(false);
    let (status, answer) = wait_for("the retried delivery accepted", WAIT, || async {
        let (status, answer) = post_webhook(&issuer, &bytes, &headers).await;
        // Until the intake's connection is back the answer stays 503 (Didit would retry later).
        (status != 503).then_some((status, answer))
    })
    .await;
    assert_eq!(
        (status, answer["outcome"].as_str()),
        (200, Some("accepted")),
        "{answer}"
    );
    let token = tokens.wait_count(1).await;
    assert_eq!(token[0].envelope().source_session_id, session);
    wait_metric(&issuer, &events("webhook", "processed"), 1.0).await;
    assert_eq!(tokens.now().await.len(), 1);
    assert_eq!(metric_of(&issuer, &webhook_requests("duplicate")), 0.0);

    tokens.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}
