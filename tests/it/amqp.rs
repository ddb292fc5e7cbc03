//! The AMQP layer against the real broker: topology, confirms, consumer decisions, concurrency, re-subscription,
//! shutdown, dead-letter tools, and a connection cut mid-stream through a TCP proxy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt, join_all};
use lapin::options::{BasicGetOptions, BasicRejectOptions, QueueDeleteOptions};
use lapin::{Channel, Connection, ConnectionProperties};
use partner_bridge::amqp::dead_letters::{list_dead, replay_dead};
use partner_bridge::amqp::topology::{issuer_intake_plan, issuer_tokens_plan, receiver_plan};
use partner_bridge::amqp::{
    AmqpError, ConsumerSpec, DeadLetterCopy, Decision, Entity, Handler, HeaderValue, Incoming,
    Link, LinkOptions, Names, Outgoing, PauseControl, PublishError, Publisher, QueueSettings,
    declare, queue_depth, run_consumer,
};
use partner_bridge::health::Health;
use partner_bridge::metrics::Metrics;
use partner_bridge::secret::SecretUrl;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::bridge::metric;
use crate::support::proxy::Proxy;
use crate::support::{amqp_url, unique_prefix, wait_for};

const PIPELINE: &str = "receiver_tokens";
const OWN_APP: &str = "recv-app";
const DEADLINE: Duration = Duration::from_secs(15);

/// One test's world: its own prefix, metrics, health, a link and publisher, and an inspection connection.
struct Fixture {
    names: Names,
    settings: QueueSettings,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    link: Link,
    publisher: Publisher,
    shutdown: CancellationToken,
    inspect: Connection,
}

impl Fixture {
    async fn new(test: &str, settings: QueueSettings) -> Fixture {
        Fixture::with_url(test, settings, amqp_url()).await
    }

    async fn with_url(test: &str, settings: QueueSettings, url: String) -> Fixture {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new());
        let options = LinkOptions {
            heartbeat: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(500),
            connection_name: format!("partner-bridge test {test}"),
        };
        let link = Link::new(
            SecretUrl::new(url),
            PIPELINE,
            metrics.clone(),
            health.clone(),
            options,
        );
        let publisher = Publisher::new(link.clone(), Duration::from_secs(5), metrics.clone());
        let inspect = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("inspection connection");
        Fixture {
            names: Names::new(&unique_prefix(test)),
            settings,
            metrics,
            health,
            link,
            publisher,
            shutdown: CancellationToken::new(),
            inspect,
        }
    }

    fn queue(&self) -> String {
        self.names.receiver_tokens_queue()
    }

    fn plan(&self) -> Vec<Entity> {
        receiver_plan(&self.names, &self.settings, OWN_APP)
    }

    async fn channel(&self) -> Channel {
        self.inspect
            .create_channel()
            .await
            .expect("inspection channel")
    }

    async fn declare(&self, plan: &[Entity]) -> Result<(), AmqpError> {
        declare(&self.channel().await, plan).await
    }

    async fn depth(&self, queue: &str) -> u32 {
        queue_depth(&self.channel().await, queue)
            .await
            .expect("queue exists")
    }

    async fn wait_depth(&self, queue: &str, expected: u32) {
        wait_for(
            &format!("{queue} to hold {expected} messages"),
            DEADLINE,
            || async { (self.depth(queue).await == expected).then_some(()) },
        )
        .await
    }

    /// Publishes a test message straight into `queue` (default exchange) with our publisher.
    async fn put(&self, queue: &str, id: &str, body: &[u8]) {
        self.publisher
            .publish(Outgoing {
                exchange: "",
                routing_key: queue,
                body,
                message_id: id,
                kind: "share_token",
                headers: vec![],
            })
            .await
            .expect("test publish confirmed");
    }

    /// Takes one message off `queue` (auto-ack).
    async fn take(&self, queue: &str) -> Option<lapin::message::Delivery> {
        self.channel()
            .await
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
            .map(|m| m.delivery)
    }

    fn spec(&self, concurrency: usize, max_attempts: u32) -> ConsumerSpec {
        ConsumerSpec {
            queue: self.queue(),
            pipeline: PIPELINE,
            prefetch: 20,
            concurrency,
            max_attempts,
            retry_delay_ms: self.settings.retry_delay_ms,
            declare: self.plan(),
            audit: None,
        }
    }

    fn pause(&self) -> PauseControl {
        PauseControl::new(PIPELINE, self.health.clone(), self.metrics.clone())
    }

    fn start<H: Handler>(
        &self,
        spec: ConsumerSpec,
        handler: Arc<H>,
        pause: PauseControl,
        grace: Duration,
    ) -> JoinHandle<()> {
        tokio::spawn(run_consumer(
            self.link.clone(),
            self.publisher.clone(),
            spec,
            handler,
            pause,
            self.shutdown.clone(),
            grace,
            self.metrics.clone(),
            self.health.clone(),
        ))
    }

    async fn stop(&self, consumer: JoinHandle<()>) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, consumer)
            .await
            .expect("consumer stops")
            .expect("consumer task");
    }

    fn metric(&self, series: &str) -> f64 {
        metric(&self.metrics.encode(), series)
    }

    /// Deletes what the test declared (best effort; names are unique anyway).
    async fn cleanup(&self, plans: &[Vec<Entity>]) {
        let channel = self.channel().await;
        for entity in plans.iter().flatten() {
            match entity {
                Entity::Queue { name, .. } => {
                    let _ = channel
                        .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                Entity::Exchange { name, .. } => {
                    let _ = channel
                        .exchange_delete(name.as_str().into(), Default::default())
                        .await;
                }
                _ => {}
            }
        }
        self.link.close().await;
    }
}

fn header(delivery: &lapin::message::Delivery, name: &str) -> Option<HeaderValue> {
    let table = delivery.properties.headers().as_ref()?;
    let value = table.inner().get(name)?;
    match value {
        lapin::types::AMQPValue::LongString(s) => Some(HeaderValue::Str(
            String::from_utf8_lossy(s.as_bytes()).into(),
        )),
        lapin::types::AMQPValue::LongLongInt(i) => Some(HeaderValue::Int(*i)),
        lapin::types::AMQPValue::LongInt(i) => Some(HeaderValue::Int(i64::from(*i))),
        other => Some(HeaderValue::Str(format!("{other:?}"))),
    }
}

type Decide = Box<dyn Fn(Incoming) -> BoxFuture<'static, Decision> + Send + Sync>;

/// A handler that records every message and decides with a closure.
struct Recorder {
    seen: Mutex<Vec<Incoming>>,
    decide: Decide,
}

impl Recorder {
    fn new(
        decide: impl Fn(Incoming) -> BoxFuture<'static, Decision> + Send + Sync + 'static,
    ) -> Arc<Recorder> {
        Arc::new(Recorder {
            seen: Mutex::new(Vec::new()),
            decide: Box::new(decide),
        })
    }

    fn always(decision: Decision) -> Arc<Recorder> {
        Recorder::new(move |_| {
            let decision = decision.clone();
            async move { decision }.boxed()
        })
    }

    fn seen(&self) -> Vec<Incoming> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Handler for Recorder {
    async fn handle(&self, msg: Incoming) -> Decision {
        self.seen.lock().unwrap().push(msg.clone());
        (self.decide)(msg).await
    }
}

fn settings(delivery_limit: u32) -> QueueSettings {
    QueueSettings {
        delivery_limit,
        retry_delay_ms: 200,
    }
}

#[tokio::test]
async fn topology_declares_idempotently_and_routes() {
    let f = Fixture::new("topo", settings(5)).await;
    let intake = issuer_intake_plan(&f.names, &f.settings, "issuer-app");
    let tokens = issuer_tokens_plan(&f.names);
    let receiver = f.plan();
    for plan in [&intake, &tokens, &receiver] {
        f.declare(plan).await.expect("first declare");
        f.declare(plan).await.expect("declaring again is a no-op");
    }
    for plan in [&intake, &receiver] {
        for entity in plan {
            if let Entity::Queue { name, .. } = entity {
                assert_eq!(f.depth(name).await, 0, "{name} exists and is empty");
            }
        }
    }
    let send = |exchange: String, key: String| {
        let publisher = f.publisher.clone();
        async move {
            publisher
                .publish(Outgoing {
                    exchange: &exchange,
                    routing_key: &key,
                    body: b"{}",
                    message_id: "m",
                    kind: "test",
                    headers: vec![],
                })
                .await
        }
    };
    send(f.names.onboarding_exchange(), "onboarding.finished".into())
        .await
        .unwrap();
    send(f.names.tokens_exchange(), Names::token_key(OWN_APP))
        .await
        .unwrap();
    send(f.names.reshare_exchange(), Names::reshare_key("issuer-app"))
        .await
        .unwrap();
    f.wait_depth(&f.names.issuer_onboarding_queue(), 1).await;
    f.wait_depth(&f.names.receiver_tokens_queue(), 1).await;
    f.wait_depth(&f.names.issuer_reshare_queue(), 1).await;
    let misrouted = send(f.names.tokens_exchange(), Names::token_key("someone-else")).await;
    assert!(
        matches!(
            misrouted,
            Err(PublishError::Returned {
                reply_code: 312,
                ..
            })
        ),
        "{misrouted:?}"
    );
    // A message rejected from a work queue goes to its .dead queue through the dead-letter exchange.
    let channel = f.channel().await;
    let got = channel
        .basic_get(f.queue().as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("a message");
    got.delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    f.wait_depth(&Names::dead_queue(&f.queue()), 1).await;

    // Changed settings on existing queues fail with a message an operator can act on.
    let changed = receiver_plan(&f.names, &settings(6), OWN_APP);
    let error = f
        .declare(&changed)
        .await
        .expect_err("delivery limit changed");
    let text = error.to_string();
    assert!(
        matches!(error, AmqpError::TopologyMismatch { .. }),
        "{error:?}"
    );
    assert!(
        text.contains(&f.queue()) && text.contains("amqp.delivery_limit"),
        "{text}"
    );
    let slower = receiver_plan(
        &f.names,
        &QueueSettings {
            delivery_limit: 5,
            retry_delay_ms: 300,
        },
        OWN_APP,
    );
    let error = f.declare(&slower).await.expect_err("retry delay changed");
    assert!(
        error.to_string().contains(&Names::retry_queue(&f.queue())),
        "{error}"
    );
    f.cleanup(&[intake, tokens, receiver]).await;
}

#[tokio::test]
async fn retry_queue_returns_messages_after_its_ttl_and_delivery_limit_dead_letters() {
    let f = Fixture::new("ttl", settings(1)).await;
    f.declare(&f.plan()).await.unwrap();
    let queue = f.queue();
    f.put(&Names::retry_queue(&queue), "r1", b"{\"n\":1}").await;
    f.wait_depth(&queue, 1).await;
    assert_eq!(f.depth(&Names::retry_queue(&queue)).await, 0);
    let back = f.take(&queue).await.expect("the retried message is back");
    assert_eq!(back.data, b"{\"n\":1}");

    // x-delivery-limit = 1: the broker dead-letters a message returned more than once.
    f.put(&queue, "poison", b"{}").await;
    let channel = f.channel().await;
    wait_for(
        "the over-delivered message to reach .dead",
        DEADLINE,
        || async {
            if let Some(m) = channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .unwrap()
            {
                m.delivery
                    .acker
                    .nack(lapin::options::BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    })
                    .await
                    .unwrap();
            }
            (f.depth(&Names::dead_queue(&queue)).await == 1).then_some(())
        },
    )
    .await;
    let infos = list_dead(&f.channel().await, &queue, 10).await.unwrap();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].message_id.as_deref(), Some("poison"));
    assert_eq!(infos[0].reason, "delivery_limit");
    f.cleanup(&[f.plan()]).await;
}

#[tokio::test]
async fn publisher_counts_only_plain_acks() {
    let f = Fixture::new("pub", settings(5)).await;
    f.declare(&f.plan()).await.unwrap();
    let out = |exchange: String, key: &'static str| {
        let publisher = f.publisher.clone();
        async move {
            publisher
                .publish(Outgoing {
                    exchange: &exchange,
                    routing_key: key,
                    body: b"{}",
                    message_id: "m",
                    kind: "test",
                    headers: vec![("x-pb-key-id".into(), HeaderValue::Str("k".into()))],
                })
                .await
        }
    };
    out(f.names.tokens_exchange(), "token.recv-app")
        .await
        .expect("routed: ack");
    let returned = out(f.names.tokens_exchange(), "token.nobody").await;
    assert!(
        matches!(returned, Err(PublishError::Returned { .. })),
        "{returned:?}"
    );
    let missing = out(format!("{}.missing", f.names.prefix()), "x").await;
    match missing {
        Err(PublishError::Connection(text)) => assert!(text.contains("NOT_FOUND"), "{text}"),
        other => panic!("a publish to a missing exchange must fail, got {other:?}"),
    }
    // The broker closed that channel; the next publish opens a new one.
    out(f.names.tokens_exchange(), "token.recv-app")
        .await
        .expect("channel reopened");
    f.wait_depth(&f.queue(), 2).await;
    let delivered = f.take(&f.queue()).await.unwrap();
    let p = &delivered.properties;
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(
        p.app_id().as_ref().map(|s| s.as_str()),
        Some("partner-bridge")
    );
    assert_eq!(p.kind().as_ref().map(|s| s.as_str()), Some("test"));
    assert!(p.timestamp().is_some());
    assert_eq!(
        header(&delivered, "x-pb-key-id"),
        Some(HeaderValue::Str("k".into()))
    );
    assert_eq!(
        f.metric("partner_bridge_publish_confirms_total{result=\"ack\"}"),
        2.0
    );
    assert_eq!(
        f.metric("partner_bridge_publish_confirms_total{result=\"returned\"}"),
        1.0
    );
    assert_eq!(
        f.metric("partner_bridge_publish_confirms_total{result=\"error\"}"),
        1.0
    );
    f.cleanup(&[f.plan()]).await;
}

#[tokio::test]
async fn concurrent_publishes_are_all_confirmed_and_returns_reach_the_right_publish() {
    let f = Fixture::new("many", settings(5)).await;
    f.declare(&f.plan()).await.unwrap();
    let exchange = f.names.tokens_exchange();
    let total = 2000;
    let mut routed = 0u32;
    // Several rounds: the broker coalesces acks differently each time, and a wrong attribution shows up rarely.
    for round in 0..3 {
        let results = join_all((0..total).map(|i| {
            let publisher = f.publisher.clone();
            let exchange = exchange.clone();
            async move {
                // Every seventh message has no queue bound for its key.
                let key = if i % 7 == 0 {
                    "token.nobody".to_string()
                } else {
                    Names::token_key(OWN_APP)
                };
                let id = format!("m-{round}-{i}");
                let body = format!("{{\"i\":{i}}}");
                let result = publisher
                    .publish(Outgoing {
                        exchange: &exchange,
                        routing_key: &key,
                        body: body.as_bytes(),
                        message_id: &id,
                        kind: "test",
                        headers: vec![],
                    })
                    .await;
                (i, result)
            }
        }))
        .await;
        for (i, result) in &results {
            if i % 7 == 0 {
                assert!(
                    matches!(result, Err(PublishError::Returned { .. })),
                    "message {i}: {result:?}"
                );
            } else {
                assert_eq!(result, &Ok(()), "message {i}");
            }
        }
        routed += (0..total).filter(|i| i % 7 != 0).count() as u32;
    }
    f.wait_depth(&f.queue(), routed).await;
    assert_eq!(
        f.metric("partner_bridge_publish_confirms_total{result=\"ack\"}"),
        f64::from(routed)
    );
    f.cleanup(&[f.plan()]).await;
}

#[tokio::test]
async fn consumer_acks() {
    let f = Fixture::new("ack", settings(5)).await;
    let handler = Recorder::always(Decision::Ack);
    let consumer = f.start(
        f.spec(4, 3),
        handler.clone(),
        f.pause(),
        Duration::from_secs(2),
    );
    wait_for("consumer ready", DEADLINE, || async {
        f.health.check().is_ok().then_some(())
    })
    .await;
    for i in 0..5 {
        f.put(&f.queue(), &format!("a{i}"), b"{}").await;
    }
    wait_for("5 messages handled", DEADLINE, || async {
        (handler.count() == 5).then_some(())
    })
    .await;
    f.stop(consumer).await;
    // Nothing was left unacked: after the consumer's channel closed, the queue is empty.
    assert_eq!(f.depth(&f.queue()).await, 0);
    assert!(
        handler
            .seen()
            .iter()
            .all(|m| m.attempt == 1 && m.queue == f.queue())
    );
    assert_eq!(
        f.metric("partner_bridge_in_flight{pipeline=\"receiver_tokens\"}"),
        0.0
    );
    f.cleanup(&[f.plan()]).await;
}

#[tokio::test]
async fn consumer_retries_until_attempts_are_exhausted() {
    let f = Fixture::new("retry", settings(5)).await;
    let handler = Recorder::always(Decision::Retry {
        detail: "didit answered 503".into(),
        headers: vec![(
            "x-pb-pending-partners".into(),
            HeaderValue::Str("p1,p2".into()),
        )],
    });
    let consumer = f.start(
        f.spec(2, 3),
        handler.clone(),
        f.pause(),
        Duration::from_secs(2),
    );
    f.declare(&f.plan()).await.unwrap();
    f.put(&f.queue(), "r", b"{\"x\":1}").await;
    let dead = Names::dead_queue(&f.queue());
    f.wait_depth(&dead, 1).await;
    let attempts: Vec<u32> = handler.seen().iter().map(|m| m.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    assert_eq!(
        handler.seen()[1].headers.get("x-pb-pending-partners"),
        Some(&HeaderValue::Str("p1,p2".into()))
    );
    let d = f.take(&dead).await.unwrap();
    assert_eq!(d.data, b"{\"x\":1}");
    assert_eq!(
        header(&d, "x-pb-reason"),
        Some(HeaderValue::Str("retries_exhausted".into()))
    );
    assert_eq!(
        header(&d, "x-pb-detail"),
        Some(HeaderValue::Str("didit answered 503".into()))
    );
    assert_eq!(header(&d, "x-pb-attempt"), Some(HeaderValue::Int(3)));
    assert_eq!(
        d.properties.message_id().as_ref().map(|s| s.as_str()),
        Some("r")
    );
    let series = format!(
        "partner_bridge_dead_lettered_total{{queue=\"{}\",reason=\"retries_exhausted\"}}",
        f.queue()
    );
    assert_eq!(f.metric(&series), 1.0);
    f.stop(consumer).await;
    assert_eq!(f.depth(&f.queue()).await, 0);
    f.cleanup(&[f.plan()]).await;
}

#[tokio::test]
async fn consumer_dead_letters_with_reason_and_detail() {
    let f = Fixture::new("dead", settings(5)).await;
    let handler = Recorder::always(Decision::DeadLetter {
        reason: "bad_message",
        detail: format!("missing field `session_id` {}", "x".repeat(2000)),
    });
    let consumer = f.start(
        f.spec(2, 3),
        handler.clone(),
        f.pause(),
        Duration::from_secs(2),
    );
    f.declare(&f.plan()).await.unwrap();
    f.put(&f.queue(), "bad", b"not json").await;
    let dead = Names::dead_queue(&f.queue());
    f.wait_depth(&dead, 1).await;
    let d = f.take(&dead).await.unwrap();
    assert_eq!(d.data, b"not json");
    assert_eq!(
        header(&d, "x-pb-reason"),
        Some(HeaderValue::Str("bad_message".into()))
    );
    let Some(HeaderValue::Str(detail)) = header(&d, "x-pb-detail") else {
        panic!("detail header")
    };
    assert!(
        detail.starts_with("missing field `session_id`") && detail.len() < 1100,
        "{}",
        detail.len()
    );
    f.stop(consumer).await;
    assert_eq!(f.depth(&f.queue()).await, 0);
    f.cleanup(&[f.plan()]).await;
}

#[tokio::test]
async fn consumer_pauses_parks_the_message_and_resumes() {
    let f = Fixture::new("pause", settings(5)).await;
    let pause = f.pause();
    let resumed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handler = Recorder::new({
        let resumed = resumed.clone();
        move |_msg| {
            let decision = if resumed.load(Ordering::SeqCst) {
                Decision::Ack
            } else {
                Decision::Pause {
                    reason: "credentials",
                    detail: "401 from Didit".into(),
                }
            };
            async move { decision }.boxed()
        }
    });
    let consumer = f.start(
        f.spec(2, 3),
        handler.clone(),
        pause.clone(),
        Duration::from_secs(2),
    );
    f.declare(&f.plan()).await.unwrap();
    f.put(&f.queue(), "p1", b"{}").await;
    wait_for("pipeline paused", DEADLINE, || async {
        pause.is_paused().map(|_| ())
    })
    .await;
    assert_eq!(pause.is_paused(), Some("credentials"));
    let reasons = f.health.check().expect_err("not ready while paused");
    assert!(
        reasons.iter().any(|r| r.contains("paused:receiver_tokens")),
        "{reasons:?}"
    );
    // The parked copy comes back from .retry, and a new message arrives: neither is taken while paused.
    f.put(&f.queue(), "p2", b"{}").await;
    f.wait_depth(&f.queue(), 2).await;
    assert_eq!(handler.count(), 1);
    resumed.store(true, Ordering::SeqCst);
    pause.resume();
    wait_for("both handled after resume", DEADLINE, || async {
        (handler.count() == 3).then_some(())
    })
    .await;
    let seen = handler.seen();
    let again = seen
        .iter()
        .skip(1)
        .find(|m| m.message_id.as_deref() == Some("p1"))
        .expect("p1 again");
    assert_eq!(again.attempt, 1, "a pause does not count an attempt");
    f.stop(consumer).await;
    assert_eq!(f.depth(&f.queue()).await, 0);
    assert_eq!(f.depth(&Names::dead_queue(&f.queue())).await, 0);
    f.cleanup(&[f.plan()]).await;
}

#[tokio::test]
async fn consumer_split_dead_letters_copies_then_acks_the_original() {
    let f = Fixture::new("split", settings(5)).await;
    let copy = |partner: &str| DeadLetterCopy {
        body: format!("{{\"partner\":\"{partner}\"}}").into_bytes(),
        reason: "share_rejected",
        detail: format!("400 for {partner}"),
        headers: vec![("x-pb-partner".into(), HeaderValue::Str(partner.into()))],
    };
    let handler = Recorder::always(Decision::Split {
        copies: vec![copy("bank-a"), copy("bank-b")],
        then: Box::new(Decision::Ack),
    });
    let consumer = f.start(
        f.spec(2, 3),
        handler.clone(),
        f.pause(),
        Duration::from_secs(2),
    );
    f.declare(&f.plan()).await.unwrap();
    f.put(&f.queue(), "s", b"{\"original\":true}").await;
    let dead = Names::dead_queue(&f.queue());
    f.wait_depth(&dead, 2).await;
    let mut partners = Vec::new();
    for _ in 0..2 {
        let d = f.take(&dead).await.unwrap();
        assert_eq!(
            header(&d, "x-pb-reason"),
            Some(HeaderValue::Str("share_rejected".into()))
        );
        let Some(HeaderValue::Str(partner)) = header(&d, "x-pb-partner") else {
            panic!("partner header")
        };
        assert_eq!(
            d.data,
            format!("{{\"partner\":\"{partner}\"}}").into_bytes()
        );
        partners.push(partner);
    }
    partners.sort();
    assert_eq!(partners, ["bank-a", "bank-b"]);
    f.stop(consumer).await;
    assert_eq!(f.depth(&f.queue()).await, 0, "the original was acked");
    let series = format!(
        "partner_bridge_dead_lettered_total{{queue=\"{}\",reason=\"share_rejected\"}}",
        f.queue()
    );
    assert_eq!(f.metric(&series), 2.0);
    f.cleanup(&[f.plan()]).await;
}

#[tokio::test]
async fn consumer_never_runs_more_handlers_than_its_concurrency() {
    let f = Fixture::new("conc", settings(5)).await;
    let current = Arc::new(AtomicUsize::new(0));
    let highest = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let handler = Recorder::new({
        let (current, highest, gate) = (current.clone(), highest.clone(), gate.clone());
        move |_msg| {
            let (current, highest, gate) = (current.clone(), highest.clone(), gate.clone());
            async move {
                let now = current.fetch_add(1, Ordering::SeqCst) + 1;
                highest.fetch_max(now, Ordering::SeqCst);
                gate.acquire().await.expect("gate").forget();
                current.fetch_sub(1, Ordering::SeqCst);
                Decision::Ack
            }
            .boxed()
        }
    });
    let consumer = f.start(
        f.spec(3, 3),
        handler.clone(),
        f.pause(),
        Duration::from_secs(2),
    );
    f.declare(&f.plan()).await.unwrap();
    for i in 0..12 {
        f.put(&f.queue(), &format!("c{i}"), b"{}").await;
    }
    wait_for("three handlers running", DEADLINE, || async {
        (current.load(Ordering::SeqCst) == 3).then_some(())
    })
    .await;
    assert_eq!(
        f.metric("partner_bridge_in_flight{pipeline=\"receiver_tokens\"}"),
        3.0
    );
    gate.add_permits(12);
    wait_for("all handled", DEADLINE, || async {
        (handler.count() == 12).then_some(())
    })
    .await;
    assert_eq!(highest.load(Ordering::SeqCst), 3);
    f.stop(consumer).await;
    assert_eq!(f.depth(&f.queue()).await, 0);
    f.cleanup(&[f.plan()]).await;
}

#[tokio::test]
async fn consumer_resubscribes_when_its_queue_is_deleted() {
    let f = Fixture::new("resub", settings(5)).await;
    let handler = Recorder::always(Decision::Ack);
    let consumer = f.start(
        f.spec(2, 3),
        handler.clone(),
        f.pause(),
        Duration::from_secs(2),
    );
    f.declare(&f.plan()).await.unwrap();
    f.put(&f.queue(), "before", b"{}").await;
    wait_for("first message handled", DEADLINE, || async {
        (handler.count() == 1).then_some(())
    })
    .await;
    // Deleting the queue makes the broker cancel the subscription: the consumer stream ends.
    f.channel()
        .await
        .queue_delete(f.queue().as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    // The consumer re-declares its plan and subscribes again; a message sent to the recreated queue is handled.
    wait_for(
        "message after re-subscription handled",
        DEADLINE,
        || async {
            let channel = f.channel().await;
            if queue_depth(&channel, &f.queue()).await.is_ok() && handler.count() == 1 {
                let _ = f
                    .publisher
                    .publish(Outgoing {
                        exchange: "",
                        routing_key: &f.queue(),
                        body: b"{}",
                        message_id: "after",
                        kind: "test",
                        headers: vec![],
                    })
                    .await;
            }
            handler
                .seen()
                .iter()
                .any(|m| m.message_id.as_deref() == Some("after"))
                .then_some(())
        },
    )
    .await;
    wait_for("consumer ready again", DEADLINE, || async {
        f.health.check().is_ok().then_some(())
    })
    .await;
    f.stop(consumer).await;
    f.cleanup(&[f.plan()]).await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_work_within_the_grace_and_returns_the_rest() {
    let f = Fixture::new("drain", settings(5)).await;
    let release = Arc::new(Notify::new());
    let handler = Recorder::new({
        let release = release.clone();
        move |msg| {
            let release = release.clone();
            async move {
                if msg.message_id.as_deref() == Some("quick") {
                    release.notified().await;
                    Decision::Ack
                } else {
                    // Never finishes: the grace runs out and the message must go back to the queue.
                    std::future::pending::<Decision>().await
                }
            }
            .boxed()
        }
    });
    let consumer = f.start(
        f.spec(2, 3),
        handler.clone(),
        f.pause(),
        Duration::from_millis(1500),
    );
    f.declare(&f.plan()).await.unwrap();
    f.put(&f.queue(), "quick", b"{}").await;
    f.put(&f.queue(), "stuck", b"{}").await;
    wait_for("both in flight", DEADLINE, || async {
        (handler.count() == 2).then_some(())
    })
    .await;
    f.shutdown.cancel();
    release.notify_one();
    tokio::time::timeout(DEADLINE, consumer)
        .await
        .expect("consumer returns after the grace")
        .unwrap();
    f.wait_depth(&f.queue(), 1).await;
    let left = f.take(&f.queue()).await.unwrap();
    assert_eq!(
        left.properties.message_id().as_ref().map(|s| s.as_str()),
        Some("stuck")
    );
    assert!(left.redelivered);
    f.cleanup(&[f.plan()]).await;
}

#[tokio::test]
async fn dead_letters_list_and_replay_round_trip() {
    let f = Fixture::new("dlq", settings(5)).await;
    f.declare(&f.plan()).await.unwrap();
    let queue = f.queue();
    for (i, reason) in ["bad_message", "expired", "forbidden"].iter().enumerate() {
        f.publisher
            .publish(Outgoing {
                exchange: &f.names.dead_letter_exchange(),
                routing_key: &queue,
                body: format!("{{\"share_token\":\"eyJsecret{i}\",\"n\":{i}}}").as_bytes(),
                message_id: &format!("d{i}"),
                kind: "share_token",
                headers: vec![
                    ("x-pb-reason".into(), HeaderValue::Str((*reason).into())),
                    (
                        "x-pb-detail".into(),
                        HeaderValue::Str(format!("detail {i}")),
                    ),
                    ("x-pb-attempt".into(), HeaderValue::Int(4)),
                ],
            })
            .await
            .unwrap();
    }
    let dead = Names::dead_queue(&queue);
    f.wait_depth(&dead, 3).await;
    let listed = list_dead(&f.channel().await, &queue, 10).await.unwrap();
    let mut reasons: Vec<&str> = listed.iter().map(|i| i.reason.as_str()).collect();
    reasons.sort();
    assert_eq!(reasons, ["bad_message", "expired", "forbidden"]);
    assert!(
        listed.iter().all(|i| !i.body_preview.contains("eyJ")),
        "tokens are masked"
    );
    assert!(
        listed
            .iter()
            .all(|i| i.kind.as_deref() == Some("share_token"))
    );
    assert!(
        listed
            .iter()
            .any(|i| i.detail.as_deref() == Some("detail 1"))
    );
    f.wait_depth(&dead, 3).await; // listing took nothing
    assert_eq!(
        list_dead(&f.channel().await, &queue, 2)
            .await
            .unwrap()
            .len(),
        2
    );
    f.wait_depth(&dead, 3).await;

    let replayed = replay_dead(&f.channel().await, &f.publisher, &queue, 10)
        .await
        .unwrap();
    assert_eq!(replayed.moved, 3);
    f.wait_depth(&queue, 3).await;
    assert_eq!(f.depth(&dead).await, 0);
    let back = f.take(&queue).await.unwrap();
    assert_eq!(header(&back, "x-pb-reason"), None);
    assert_eq!(header(&back, "x-pb-detail"), None);
    assert_eq!(header(&back, "x-pb-attempt"), Some(HeaderValue::Int(1)));
    assert!(
        String::from_utf8_lossy(&back.data).contains("eyJsecret"),
        "the body itself is untouched"
    );
    f.cleanup(&[f.plan()]).await;
}

#[tokio::test]
async fn a_connection_cut_mid_stream_loses_nothing() {
    let proxy = Proxy::start().await;
    let f = Fixture::with_url("cut", settings(20), proxy.amqp_url()).await;
    let handled: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let handler = Recorder::new({
        let handled = handled.clone();
        move |msg| {
            let id = msg.message_id.clone().unwrap_or_default();
            *handled.lock().unwrap().entry(id).or_default() += 1;
            async { Decision::Ack }.boxed()
        }
    });
    let consumer = f.start(
        f.spec(8, 5),
        handler.clone(),
        f.pause(),
        Duration::from_secs(2),
    );
    f.declare(&f.plan()).await.unwrap();
    let total = 600usize;
    // The producer publishes through the proxied link too, retrying each message until it is confirmed.
    let producer = tokio::spawn({
        let publisher = f.publisher.clone();
        let queue = f.queue();
        let (link, never) = (f.link.clone(), CancellationToken::new());
        async move {
            for i in 0..total {
                let id = format!("cut-{i}");
                let body = format!("{{\"i\":{i}}}");
                loop {
                    let sent = publisher
                        .publish(Outgoing {
                            exchange: "",
                            routing_key: &queue,
                            body: body.as_bytes(),
                            message_id: &id,
                            kind: "test",
                            headers: vec![],
                        })
                        .await;
                    if sent.is_ok() {
                        break;
                    }
                    // Wait (through the link's own backoff) until the broker is reachable again.
                    link.connection(&never).await.expect("link open");
                }
            }
        }
    });
    let distinct = |handled: &Arc<Mutex<HashMap<String, usize>>>| handled.lock().unwrap().len();
    wait_for("a third handled", DEADLINE, || async {
        (distinct(&handled) >= total / 3).then_some(())
    })
    .await;
    proxy.cut();
    wait_for("two thirds handled", DEADLINE, || async {
        (distinct(&handled) >= 2 * total / 3).then_some(())
    })
    .await;
    // Second cut with the broker unreachable for a while: the link must notice and report it.
    proxy.refuse(true);
    proxy.cut();
    wait_for("the link reports the loss", DEADLINE, || async {
        (f.metric("partner_bridge_amqp_connected{pipeline=\"receiver_tokens\"}") == 0.0)
            .then_some(())
    })
    .await;
    let reasons = f.health.check().expect_err("not ready while disconnected");
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("amqp:receiver_tokens")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().all(|r| !r.contains("guest:guest")),
        "password shown: {reasons:?}"
    );
    proxy.refuse(false);
    tokio::time::timeout(DEADLINE, producer)
        .await
        .expect("producer finishes")
        .unwrap();
    wait_for("every message handled", DEADLINE, || async {
        (distinct(&handled) == total).then_some(())
    })
    .await;
    wait_for("queue drained", DEADLINE, || async {
        (f.depth(&f.queue()).await == 0).then_some(())
    })
    .await;
    f.stop(consumer).await;
    // Nothing unacked came back when the consumer's channel closed, and nothing was dead-lettered.
    assert_eq!(f.depth(&f.queue()).await, 0);
    assert_eq!(f.depth(&Names::dead_queue(&f.queue())).await, 0);
    assert!(
        f.metric("partner_bridge_amqp_reconnects_total") >= 2.0,
        "{}",
        f.metrics.encode()
    );
    assert!(proxy.accepted() >= 3);
    f.cleanup(&[f.plan()]).await;
}

#[tokio::test]
async fn consumer_requeue_hands_the_message_back_for_redelivery() {
    let f = Fixture::new("requeue", settings(5)).await;
    let handler = Recorder::new(|msg| {
        let decision = if msg.redelivered {
            Decision::Ack
        } else {
            Decision::Requeue
        };
        async move { decision }.boxed()
    });
    let consumer = f.start(
        f.spec(1, 3),
        handler.clone(),
        f.pause(),
        Duration::from_secs(2),
    );
    f.declare(&f.plan()).await.unwrap();
    f.put(&f.queue(), "rq", b"{}").await;
    wait_for("handled twice", DEADLINE, || async {
        (handler.count() == 2).then_some(())
    })
    .await;
    let seen = handler.seen();
    assert!(!seen[0].redelivered && seen[1].redelivered);
    assert_eq!(seen[1].attempt, 1, "a requeue is not a retry");
    f.stop(consumer).await;
    assert_eq!(f.depth(&f.queue()).await, 0);
    f.cleanup(&[f.plan()]).await;
}
