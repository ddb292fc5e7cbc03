//! Guarantees at the failure edges (issue #8, items 6–8), against the real broker and, where the operator's tools
//! or the process lifecycle are the subject, the real binary:
//! - `dead-letters replay` moves only what `.dead` held when it started, however fast replayed messages fail again;
//! - a per-partner onboarding dead letter (`x-pb-partner`) is replayed for that partner only;
//! - the receiver's reshare counter moves only on a confirmed request and starts again on a replay;
//! - a consumer without a known dead-letter exchange settles each delivery once;
//! - a split whose delivery is requeued does not publish its copies again;
//! - SIGTERM with a broker that stopped answering: the process still exits within one drain deadline.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use partner_bridge::amqp::{
    ConsumerSpec, DeadLetterCopy, Decision, Handler, HeaderValue, Incoming, Link, LinkOptions,
    Names, PauseControl, Publisher, QueueSettings, run_consumer,
};
use partner_bridge::didit::wire::SessionKind;
use partner_bridge::envelope::{OnboardingFinished, ReshareRequest};
use partner_bridge::health::Health;
use partner_bridge::metrics::Metrics;
use partner_bridge::secret::SecretUrl;
use tokio_util::sync::CancellationToken;

use crate::support::bridge::{Amqp, World, metric_of};
use crate::support::faults::{BIN, Binary, binary_config, set_key, showing_log};
use crate::support::proxy::Proxy;
use crate::support::t_receiver::{
    declare_issuer_queues, drain_n, envelope_for, mint, publish_signed, receiver_dead_queue,
    receiver_toml_with,
};
use crate::support::{amqp_url, unique_prefix, wait_for};

const WAIT: Duration = Duration::from_secs(20);

// ---- the binary's one-shot commands ---------------------------------------------------------------------------

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// `partner-bridge dead-letters replay --config FILE --queue QUEUE`, as an operator runs it.
async fn replay(config: &Path, queue: &str) -> Ran {
    let mut command = tokio::process::Command::new(BIN);
    command
        .args(["dead-letters", "replay", "--config"])
        .arg(config)
        .args(["--queue", queue])
        .kill_on_drop(true);
    for (key, _) in std::env::vars() {
        if key.starts_with("PARTNER_BRIDGE") || key == "RUST_LOG" {
            command.env_remove(key);
        }
    }
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("dead-letters replay finishes within 60 s")
        .expect("the binary runs");
    Ran {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn write_config(world: &World, name: &str, toml: &str) -> PathBuf {
    let path = world.dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, toml).expect("write config");
    path
}

fn dead_lettered_sum(running: &partner_bridge::app::Running, queue: &str) -> f64 {
    let prefix = format!("partner_bridge_dead_lettered_total{{queue=\"{queue}\"");
    running
        .metrics()
        .encode()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Two dead letters that fail again the moment they are back (bodies that are no share token). The replay moves
/// exactly those two and stops: the copies the receiver dead-letters again while it runs are not taken a second
/// time, and `.dead` holds the same two afterwards.
///
/// Old code: the replay pulled until `--limit` (100) or until `.dead` was momentarily empty, so the same two messages
/// went round and round ("moved 18" for two dead letters) and the count printed was not the count of messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_dead_letters_that_fail_again_moves_each_once() {
    let world = World::new("edge-replay").await;
    let receiver = world.start_receiver(false).await;
    let amqp = Amqp::connect().await;
    let queue = world.names.receiver_tokens_queue();
    let dead = receiver_dead_queue(&world);
    for n in 0..2 {
        amqp.publish(
            &world.names.tokens_exchange(),
            &Names::token_key(&world.partner_app.application_id),
            format!("{{\"type\":\"share_token\",\"n\":{n}}}").as_bytes(),
            &[],
        )
        .await;
    }
    wait_for("two dead letters", WAIT, || async {
        (amqp.depth(&dead).await == 2).then_some(())
    })
    .await;
    assert_eq!(dead_lettered_sum(&receiver, &queue), 2.0);

    let path = write_config(&world, "receiver", &world.receiver_toml(false));
    let ran = replay(&path, &queue).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(
        ran.stdout.trim(),
        format!("moved 2 message(s) from {dead} back to {queue}"),
        "{ran:?}"
    );
    // Both failed once more, and nothing else happened to them.
    wait_for("both dead-lettered again", WAIT, || async {
        (dead_lettered_sum(&receiver, &queue) >= 4.0).then_some(())
    })
    .await;
    wait_for("the two back in .dead", WAIT, || async {
        (amqp.depth(&dead).await == 2 && amqp.depth(&queue).await == 0).then_some(())
    })
    .await;
    assert_eq!(dead_lettered_sum(&receiver, &queue), 4.0);
    let back = amqp.drain(&dead).await;
    assert_eq!(back.len(), 2);
    assert!(
        back.iter().all(|m| m.header("x-pb-replayed").is_some()),
        "a replayed message says so"
    );

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

/// An issuer with two partners, one of them not configured yet: the event's share for it is dead-lettered with
/// `x-pb-partner`. The operator adds the partner and replays: only that partner is served; the other partner's
/// pipeline is not touched at all (no share, not even a ledger check), and the sandbox minted exactly one more token.
///
/// Old code: `x-pb-partner` was written but never read, so the replayed event re-ran every partner it names (the
/// served one came out as `skipped_valid` only because its token was still valid — after its expiry it would have
/// been minted and sent again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_partner_onboarding_dead_letter_is_replayed_for_that_partner_only() {
    let world = World::new("edge-partner").await;
    let bank_b = world.control.create_application("bank-b").await.unwrap();
    let amqp = Amqp::connect().await;
    let onboarding = world.names.issuer_onboarding_queue();
    let dead = Names::dead_queue(&onboarding);
    let issuer = world.start_issuer().await;
    let tokens = crate::support::faults::tap_tokens(&world, &amqp).await;
    let session = world
        .session(SessionKind::User, "Approved", "edge-partner")
        .await;
    let event = OnboardingFinished {
        partners: Some(vec![
            world.partner_app.application_id.clone(),
            bank_b.application_id.clone(),
        ]),
        ..world.event(&session, SessionKind::User, "Approved")
    };
    world.publish_event(&amqp, &event).await;
    wait_for("bank-b's dead letter", WAIT, || async {
        (amqp.depth(&dead).await == 1).then_some(())
    })
    .await;
    let first = drain_n(&amqp, &tokens, 1, WAIT).await;
    assert_eq!(
        first[0].json()["for_application_id"],
        world.partner_app.application_id.as_str()
    );
    assert_eq!(world.control.stats().await.unwrap().shares, 1);
    issuer.stop().await.unwrap();

    // The operator configures bank-b and restarts the issuer (same ledger), then replays.
    let toml = format!(
        r#"{}
[[issuer.partners]]
name = "bank-b"
application_id = "{}"
ttl_seconds = 3600
statuses = ["Approved"]
session_kinds = ["user"]
"#,
        world.issuer_toml(),
        bank_b.application_id
    );
    let issuer = world.start(world.config(&toml)).await;
    let path = write_config(&world, "issuer", &toml);
    let ran = replay(&path, &onboarding).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    assert_eq!(
        ran.stdout.trim(),
        format!("moved 1 message(s) from {dead} back to {onboarding}")
    );
    let second = drain_n(&amqp, &tokens, 1, WAIT).await;
    assert_eq!(second.len(), 1);
    assert_eq!(
        second[0].json()["for_application_id"],
        bank_b.application_id.as_str()
    );
    wait_for("the replayed event settled", WAIT, || async {
        (amqp.depth(&onboarding).await == 0 && amqp.depth(&dead).await == 0).then_some(())
    })
    .await;
    assert_eq!(
        metric_of(
            &issuer,
            "partner_bridge_shares_total{partner=\"bank-b\",outcome=\"minted\"}"
        ),
        1.0
    );
    let sponsor: Vec<String> = issuer
        .metrics()
        .encode()
        .lines()
        .filter(|l| l.starts_with("partner_bridge_shares_total{partner=\"sponsor-bank\""))
        .filter(|l| !l.ends_with(" 0"))
        .map(str::to_string)
        .collect();
    assert!(
        sponsor.is_empty(),
        "the partner already served is not touched by the replay: {sponsor:?}"
    );
    assert_eq!(
        world.control.stats().await.unwrap().shares,
        2,
        "one share per partner in all"
    );
    assert!(amqp.drain(&tokens).await.is_empty(), "no third token");

    amqp.close().await;
    issuer.stop().await.unwrap();
    world.cleanup().await;
}

/// The reshare counter counts confirmed requests only, and a replay starts it again.
/// 1. No issuer queue is bound yet, so every reshare request is unroutable: the token is retried until
///    `retry.max_attempts` and dead-lettered `retries_exhausted` — and the counter has not moved.
/// 2. With the issuer's queue declared, three stale tokens of the session get requests 1, 2 and 3
///    (`receiver.max_reshares` = 3); the fourth is dead-lettered `expired`.
/// 3. `dead-letters replay` of that `expired` token: the receiver sees `x-pb-replayed`, resets the counter and sends
///    a request (attempt 1) instead of dead-lettering the token again.
///
/// Old code: the counter was bumped before the publish, so step 1 used up all three reshares without sending one
/// (step 2's first token went straight to `expired`), and a replayed `expired` token was re-dead-lettered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reshare_counter_moves_only_on_confirmed_requests_and_restarts_on_replay() {
    let world = World::new("edge-reshare").await;
    let amqp = Amqp::connect().await;
    let toml = receiver_toml_with(&world, false, &[("max_reshares", "3")]);
    let toml = set_key(&toml, "max_attempts", "3");
    let receiver = world.start(world.config(&toml)).await;
    let dead = receiver_dead_queue(&world);
    let reshare_queue = world.names.issuer_reshare_queue();

    let session = world.session(SessionKind::User, "Approved", "stale").await;
    let share = mint(
        &world,
        &world.issuer_app,
        &session,
        &world.partner_app.application_id,
        3600,
    )
    .await;
    let stale = || {
        let mut envelope = envelope_for(&world, &share, &session, "Approved", None);
        envelope.expires_at = Utc::now() - chrono::Duration::seconds(5);
        envelope
    };

    // 1. Unroutable requests.
    publish_signed(&world, &amqp, &stale()).await;
    let exhausted = drain_n(&amqp, &dead, 1, WAIT).await;
    assert_eq!(
        exhausted[0].header("x-pb-reason"),
        Some("retries_exhausted"),
        "the requests failed, so no reshare was used up: {:?}",
        exhausted[0].header("x-pb-detail")
    );
    assert_eq!(
        metric_of(
            &receiver,
            "partner_bridge_reshare_requests_total{direction=\"sent\"}"
        ),
        0.0
    );

    // 2. Routable: requests 1..=3, then `expired`.
    declare_issuer_queues(&world, &amqp).await;
    for attempt in 1..=3 {
        publish_signed(&world, &amqp, &stale()).await;
        let requests = drain_n(&amqp, &reshare_queue, 1, WAIT).await;
        assert_eq!(requests.len(), 1);
        let request: ReshareRequest = serde_json::from_slice(&requests[0].body).unwrap();
        assert_eq!(request.attempt, attempt);
    }
    let last = stale();
    publish_signed(&world, &amqp, &last).await;
    wait_for("the expired token in .dead", WAIT, || async {
        (amqp.depth(&dead).await == 1).then_some(())
    })
    .await;
    assert_eq!(amqp.depth(&reshare_queue).await, 0, "no fourth request");

    // 3. Replay: a request is sent, the token is not dead-lettered again.
    let path = write_config(&world, "receiver", &toml);
    let queue = world.names.receiver_tokens_queue();
    let ran = replay(&path, &queue).await;
    assert_eq!(ran.code, 0, "{ran:?}");
    assert!(ran.stdout.starts_with("moved 1 message(s)"), "{ran:?}");
    let requests = drain_n(&amqp, &reshare_queue, 1, WAIT).await;
    assert_eq!(requests.len(), 1, "the replay led to a reshare request");
    let request: ReshareRequest = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(request.attempt, 1, "the replay restarted the counter");
    assert_eq!(request.original_message_id, last.message_id);
    wait_for("the replayed token acked", WAIT, || async {
        (amqp.depth(&queue).await == 0 && amqp.depth(&dead).await == 0).then_some(())
    })
    .await;
    assert_eq!(
        metric_of(
            &receiver,
            "partner_bridge_reshare_requests_total{direction=\"sent\"}"
        ),
        4.0
    );
    assert!(world.control.stats().await.unwrap().imports.is_empty());

    amqp.close().await;
    receiver.stop().await.unwrap();
    world.cleanup().await;
}

// ---- the consumer, through the library ------------------------------------------------------------------------

type Decide = Box<dyn Fn(&Incoming) -> Decision + Send + Sync>;

/// A handler that records what it saw and decides with a closure.
struct Recorder {
    seen: Mutex<Vec<Incoming>>,
    decide: Decide,
}

impl Recorder {
    fn new(decide: impl Fn(&Incoming) -> Decision + Send + Sync + 'static) -> Arc<Recorder> {
        Arc::new(Recorder {
            seen: Mutex::new(Vec::new()),
            decide: Box::new(decide),
        })
    }

    fn seen(&self) -> Vec<Incoming> {
        self.seen.lock().unwrap().clone()
    }
}

impl Handler for Recorder {
    async fn handle(&self, msg: Incoming) -> Decision {
        let decision = (self.decide)(&msg);
        self.seen.lock().unwrap().push(msg);
        decision
    }
}

struct Lib {
    names: Names,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    link: Link,
    publisher: Publisher,
    shutdown: CancellationToken,
    amqp: Amqp,
}

impl Lib {
    async fn new(test: &str) -> Lib {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new());
        let link = Link::new(
            SecretUrl::new(amqp_url()),
            "receiver_tokens",
            metrics.clone(),
            health.clone(),
            LinkOptions {
                heartbeat: Duration::from_secs(5),
                connect_timeout: Duration::from_secs(5),
                backoff_min: Duration::from_millis(50),
                backoff_max: Duration::from_millis(500),
                connection_name: format!("partner-bridge test {test}"),
            },
        );
        let publisher = Publisher::new(link.clone(), Duration::from_secs(5), metrics.clone());
        Lib {
            names: Names::new(&unique_prefix(test)),
            metrics,
            health,
            link,
            publisher,
            shutdown: CancellationToken::new(),
            amqp: Amqp::connect().await,
        }
    }

    fn start<H: Handler>(
        &self,
        spec: ConsumerSpec,
        handler: Arc<H>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(run_consumer(
            self.link.clone(),
            self.publisher.clone(),
            spec,
            handler,
            PauseControl::new("receiver_tokens", self.health.clone(), self.metrics.clone()),
            self.shutdown.clone(),
            Duration::from_secs(2),
            self.metrics.clone(),
            self.health.clone(),
        ))
    }

    async fn ready(&self) {
        wait_for("the consumer consuming", WAIT, || async {
            self.health.check().ok()
        })
        .await;
    }

    async fn put(&self, queue: &str, body: &[u8]) {
        self.amqp.publish("", queue, body, &[]).await;
    }

    async fn delete(&self, queues: &[String]) {
        for queue in queues {
            let _ = self
                .amqp
                .channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }

    async fn stop(self, consumer: tokio::task::JoinHandle<()>) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, consumer)
            .await
            .expect("the consumer stops")
            .unwrap();
        self.link.close().await;
        self.amqp.close().await;
    }
}

/// Deletes a plan when dropped during a panic: a failing library-level test never reaches its own cleanup, and
/// leaked quorum queues slow the shared broker down for everyone.
struct DeleteOnPanic(Vec<partner_bridge::amqp::Entity>);

impl Drop for DeleteOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let plan = std::mem::take(&mut self.0);
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async {
                let amqp = Amqp::connect().await;
                for entity in &plan {
                    let _ = partner_bridge::amqp::topology::delete(
                        &amqp.channel,
                        std::slice::from_ref(entity),
                    )
                    .await;
                }
                amqp.close().await;
            });
        })
        .join();
    }
}

/// A `tracing` writer into a shared buffer (the test's log, read back by the test).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A consumer whose plan names no dead-letter exchange for its queue (the queue itself has one, declared by the
/// operator): each dead-lettered delivery is rejected once — the broker moves it to the operator's dead queue — and
/// nothing settles it a second time. Three messages, each handled exactly once, none redelivered, three in the dead
/// queue, and no "not settled" warning.
///
/// Old code: the fallback rejected the delivery and then the consumer acked it as well. lapin 4's acker refuses the
/// second settle locally (`Ok(false)`, so the channel itself survives), and the consumer logged "delivery not
/// settled: its channel is gone; the broker will redeliver it" — a false alarm on every dead letter, and a second
/// settle that a broker would answer with PRECONDITION_FAILED. The log is captured on this current-thread runtime,
/// where the consumer's tasks run on the test's thread.
#[tokio::test]
async fn the_no_dlx_fallback_settles_each_delivery_once() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("partner_bridge=info")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let lib = Lib::new("edge-nodlx").await;
    let queue = format!("{}.work", lib.names.prefix());
    let operator_dead = format!("{}.operator-dead", lib.names.prefix());
    let _cleanup = DeleteOnPanic(
        [&queue, &operator_dead]
            .iter()
            .map(|name| partner_bridge::amqp::Entity::Queue {
                name: name.to_string(),
                arguments: Vec::new(),
            })
            .collect(),
    );
    let channel = &lib.amqp.channel;
    channel
        .queue_declare(
            operator_dead.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(operator_dead.as_str().into()),
    );
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .unwrap();
    for n in 0..3 {
        lib.put(&queue, format!("{{\"n\":{n}}}").as_bytes()).await;
    }
    let handler = Recorder::new(|_| Decision::DeadLetter {
        reason: "bad_message",
        detail: "test".into(),
    });
    let spec = ConsumerSpec {
        queue: queue.clone(),
        pipeline: "receiver_tokens",
        prefetch: 10,
        concurrency: 1,
        max_attempts: 3,
        retry_delay_ms: 200,
        declare: Vec::new(),
        audit: None,
    };
    let consumer = lib.start(spec, handler.clone());
    wait_for("three in the operator's dead queue", WAIT, || async {
        (lib.amqp.depth(&operator_dead).await == 3).then_some(())
    })
    .await;
    let seen = handler.seen();
    assert_eq!(seen.len(), 3, "each handled once");
    assert!(seen.iter().all(|m| !m.redelivered), "none redelivered");
    assert_eq!(lib.amqp.depth(&queue).await, 0);
    let log = captured.text();
    assert!(log.contains("no dead-letter exchange known"), "{log}");
    assert!(
        !log.contains("not settled"),
        "a delivery was settled twice:\n{log}"
    );
    let series =
        format!("partner_bridge_dead_lettered_total{{queue=\"{queue}\",reason=\"bad_message\"}}");
    assert_eq!(
        crate::support::bridge::metric(&lib.metrics.encode(), &series),
        3.0
    );
    lib.delete(&[queue, operator_dead]).await;
    lib.stop(consumer).await;
}

/// A split (one dead-letter copy, then a retry) whose retry publish fails — the `.retry` queue was deleted under the
/// running consumer, so the copy is unroutable — is requeued; on the redelivery the consumer (which re-declared its
/// topology) publishes only what is missing: `.dead` holds one copy, not one per requeue.
///
/// Old code: every requeue republished every copy of the split (two copies here, more with every further failure).
#[tokio::test]
async fn a_requeued_split_does_not_publish_its_copies_again() {
    let lib = Lib::new("edge-split").await;
    let settings = QueueSettings {
        delivery_limit: 10,
        retry_delay_ms: 200,
    };
    let plan = partner_bridge::amqp::topology::receiver_plan(&lib.names, &settings, "edge-app");
    let queue = lib.names.receiver_tokens_queue();
    let dead = Names::dead_queue(&queue);
    let retry = Names::retry_queue(&queue);
    let _cleanup = DeleteOnPanic(plan.clone());
    let handler = Recorder::new(|msg| {
        if msg.attempt > 1 {
            return Decision::Ack;
        }
        Decision::Split {
            copies: vec![DeadLetterCopy {
                body: msg.body.clone(),
                reason: "share_rejected",
                detail: "partner bank-b: 400".into(),
                headers: vec![("x-pb-partner".into(), HeaderValue::Str("bank-b".into()))],
            }],
            then: Box::new(Decision::Retry {
                detail: "partner bank-a: 503".into(),
                headers: vec![(
                    "x-pb-pending-partners".into(),
                    HeaderValue::Str("bank-a".into()),
                )],
            }),
        }
    });
    let spec = ConsumerSpec {
        queue: queue.clone(),
        pipeline: "receiver_tokens",
        prefetch: 10,
        concurrency: 1,
        max_attempts: 5,
        retry_delay_ms: settings.retry_delay_ms,
        declare: plan.clone(),
        audit: None,
    };
    let consumer = lib.start(spec, handler.clone());
    lib.ready().await;
    lib.delete(std::slice::from_ref(&retry)).await;
    lib.put(&queue, b"{\"event\":1}").await;

    wait_for("the retried copy handled", WAIT, || async {
        handler.seen().iter().any(|m| m.attempt == 2).then_some(())
    })
    .await;
    let firsts = handler.seen().iter().filter(|m| m.attempt == 1).count();
    assert!(
        firsts >= 2,
        "the first delivery was requeued and handled again ({firsts})"
    );
    wait_for("the queues settled", WAIT, || async {
        (lib.amqp.depth(&queue).await == 0 && lib.amqp.depth(&retry).await == 0).then_some(())
    })
    .await;
    let copies = lib.amqp.drain(&dead).await;
    assert_eq!(
        copies.len(),
        1,
        "one dead-letter copy, whatever the requeues: {:?}",
        copies
            .iter()
            .map(|c| c.header("x-pb-partner"))
            .collect::<Vec<_>>()
    );
    assert_eq!(copies[0].header("x-pb-partner"), Some("bank-b"));
    lib.stop(consumer).await;
    let amqp = Amqp::connect().await;
    let _ = partner_bridge::amqp::topology::delete(&amqp.channel, &plan).await;
    amqp.close().await;
}

// ---- shutdown -------------------------------------------------------------------------------------------------

/// The binary (both roles) runs through a proxy that then freezes: the broker stops answering but keeps every
/// connection open. SIGTERM: the process exits within `shutdown.grace_s` + 10 s (the drain deadline is grace + 5 s;
/// the bound is generous on purpose — this is a deadline, not a speed test).
///
/// Old code: `basic.cancel` waited its own 15 s on top of the grace, the consumer channel close another 15 s, and
/// each of the four broker links was closed one after the other with 5 s each — about grace + 27 s in all, past a
/// `terminationGracePeriodSeconds` of grace + 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_against_a_broker_that_stopped_answering_exits_within_the_deadline() {
    let world = World::new("edge-freeze").await;
    let proxy = Proxy::start().await;
    let grace_s = 2;
    let (path, admin) = binary_config(&world, 16, grace_s);
    let toml = std::fs::read_to_string(&path).unwrap();
    let toml = set_key(&toml, "url", &format!("\"{}\"", proxy.amqp_url()));
    std::fs::write(&path, toml).unwrap();
    let log = world.dir.path().join("bridge.log");
    let mut binary = Binary::start(&path, admin, log.clone()).await;
    let links = proxy.live();
    assert!(
        links >= 3,
        "the bridge's links go through the proxy ({links})"
    );

    proxy.freeze(true);
    let signalled = std::time::Instant::now();
    binary.terminate();
    let status = showing_log(
        &log,
        binary.exited_within(Duration::from_secs(grace_s + 10)),
    )
    .await;
    eprintln!("exited {:?} after SIGTERM", signalled.elapsed());
    assert!(
        status.success(),
        "a drain that ran out of time still exits 0: {status:?}"
    );
    proxy.freeze(false);
    drop(proxy);
    world.cleanup().await;
}
