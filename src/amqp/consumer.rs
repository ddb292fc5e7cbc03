//! Supervised consumers: [`run_consumer`] takes deliveries from one queue, hands each to a [`Handler`] (at most
//! `concurrency` at once) and carries out the [`Decision`] it returns — ack, delayed retry through `<queue>.retry`
//! (counting an attempt, or not when the message only waits for Didit's rate limit), dead-letter with a reason,
//! pause, requeue, or split into dead-lettered copies.
//!
//! The rule that keeps messages safe: **a delivery is acked only after everything it caused is confirmed by the
//! broker.** A retry or dead-letter copy is published with a confirm first; if that fails, the original is nacked
//! with requeue (never acked) and the consumer restarts its session (re-declaring its topology, which recreates
//! a deleted `.retry` or `.dead` queue). If an ack or nack itself fails (the channel is gone), it is logged: the
//! broker redelivers, and the ledger absorbs the duplicate.
//!
//! A session is one channel with one subscription. It ends when the consumer stream ends (the broker cancelled
//! us: queue deleted, node restarting), yields an error, or a republish fails; the consumer then waits a jittered
//! backoff and starts over (see the recovery model in [`crate::amqp`]). While paused ([`PauseControl`]), the
//! subscription is cancelled, in-flight work finishes, and the channel is closed so that prefetched deliveries
//! go back to the queue; consuming resumes when the pipeline calls [`PauseControl::resume`]. On shutdown the
//! subscription is cancelled, in-flight handlers get `grace` to finish, and whatever is still unacked returns to
//! the queue when the channel closes.
//!
//! **One deadline bounds the drain.** The first time a consumer sees the shutdown it fixes its drain deadline at
//! `now + grace`; cancelling the subscription and waiting for in-flight handlers share it (a broker that stopped
//! answering cannot stretch `basic.cancel` past it), and closing the channel afterwards is bounded by
//! [`CLOSE_TIMEOUT`]. [`crate::app`] bounds the whole process's drain (consumers, webhook, connection closes) by
//! `grace` plus a fixed margin on top of that.
//!
//! **One settle per delivery, always.** A decision is carried out with at most one ack, nack or reject of the
//! delivery. Without a known dead-letter exchange (no `x-dead-letter-exchange` for the queue in the plan), a
//! decision that dead-letters anything ends in a single `reject` of the whole original — the broker dead-letters it
//! per the queue's own arguments or policy — and nothing else of that decision is carried out (no copy, no retry,
//! no ack after it).
//!
//! **A split is not repeated by a requeue.** [`Decision::Split`] publishes its dead-letter copies before it carries
//! out `then`; if a later step fails (a copy or the retry publish is not confirmed), the delivery is requeued and
//! the handler decides the same split again on the redelivery. The consumer remembers, per delivery (message id,
//! attempt and body) and in this process, which copies the broker already confirmed, and publishes only the
//! missing ones; the memory is dropped once the delivery is settled. A crash of the process between a confirmed
//! copy and the settle, or a redelivery to another replica, can still repeat a copy once (at-least-once; a replay
//! of a repeated copy is absorbed by the ledger).
//!
//! **Every dead-letter is in the audit log first.** With a [`DeadLetterAudit`] in the spec, each dead-lettered
//! message (a [`Decision::DeadLetter`], a split copy, `retries_exhausted`, a reject without a dead-letter exchange)
//! is recorded as a `dead_lettered` act before its copy is published, keyed so that a redelivery records it once.
//! When the act cannot be recorded, nothing of the decision is carried out: the delivery is parked in the retry
//! queue (no attempt counted) and the pipeline pauses for `ledger`, exactly as a handler does for a failed ledger
//! write.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, warn};

use super::connection::Link;
use super::publisher::{PublishError, Publisher};
use super::topology::{Entity, declare};
use super::{AmqpError, Backoff, HeaderValue, Names, short, truncate};
use crate::audit::{Act, ActKind, AuditLog, Side};
use crate::envelope::{
    HEADER_ATTEMPT, HEADER_DETAIL, HEADER_PARTNER, HEADER_REASON, HEADER_REPLAYED,
};
use crate::health::Health;
use crate::ledger::LedgerError;
use crate::metrics::Metrics;

/// Longest `x-pb-detail` written on a dead-lettered message.
pub const MAX_DETAIL_BYTES: usize = 1000;
/// Limit for each setup step of a session (open channel, qos, declare, consume).
const SETUP_TIMEOUT: Duration = Duration::from_secs(15);
/// Limit for one ack, nack or reject. lapin can leave one pending forever when the connection fails under it;
/// an unbounded wait would keep the handler's concurrency permit (and `in_flight`) for good, so every broker blip
/// could take a permit until the consumer stopped taking deliveries at all.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Limit for closing a consumer channel once the drain is over (the drain deadline itself is `grace`).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Deliveries whose confirmed split copies are remembered at once (oldest forgotten first).
const SPLIT_MEMORY: usize = 4096;
/// Backoff between sessions.
const RESTART_MIN: Duration = Duration::from_millis(100);
const RESTART_MAX: Duration = Duration::from_secs(10);

/// One delivery, as a handler sees it (no lapin types).
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The body.
    pub body: Vec<u8>,
    /// String and integer headers (other kinds, such as `x-death`, are left out).
    pub headers: BTreeMap<String, HeaderValue>,
    /// AMQP `message_id`.
    pub message_id: Option<String>,
    /// AMQP `type`.
    pub kind: Option<String>,
    /// AMQP `timestamp` (unix seconds).
    pub timestamp: Option<u64>,
    /// The broker delivered this message before (to us or another consumer).
    pub redelivered: bool,
    /// The `x-pb-attempt` header: 1 for a first delivery, incremented by each [`Decision::Retry`].
    pub attempt: u32,
    /// The queue it came from.
    pub queue: String,
}

impl Incoming {
    /// A string header's value (`x-pb-signature`, `x-pb-pending-partners`, …); `None` when absent or not a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(HeaderValue::as_str)
    }
}

/// A dead-lettered copy made from one delivery (e.g. one partner's share failed while others succeeded).
#[derive(Debug, Clone)]
pub struct DeadLetterCopy {
    /// The copy's body.
    pub body: Vec<u8>,
    /// The `x-pb-reason` word.
    pub reason: &'static str,
    /// The `x-pb-detail` sentence.
    pub detail: String,
    /// Headers added to the original's (e.g. `x-pb-partner`).
    pub headers: Vec<(String, HeaderValue)>,
}

/// What to do with a delivery, as decided by a [`Handler`].
#[derive(Debug, Clone)]
pub enum Decision {
    /// Done: ack.
    Ack,
    /// Try again later: a copy (same body and properties, these headers set, `x-pb-attempt` incremented) goes to
    /// `<queue>.retry` and comes back after `amqp.retry_delay_ms`; then the original is acked. Past
    /// `max_attempts` the message is dead-lettered as `retries_exhausted` with this detail instead.
    Retry {
        /// Why, for the log and a later dead-letter.
        detail: String,
        /// Headers to set on the copy (e.g. `x-pb-pending-partners`).
        headers: Vec<(String, HeaderValue)>,
    },
    /// Not now, and not a failure (Didit's rate limit for the key has no room within `retry.hold_max_s`): a copy
    /// with these headers set goes to `<queue>.retry` **without** counting an attempt (`x-pb-attempt` unchanged),
    /// then the original is acked. Never dead-lettered for it, however often it comes back.
    Defer {
        /// Why, for the log.
        detail: String,
        /// Headers to set on the copy (e.g. `x-pb-pending-partners`).
        headers: Vec<(String, HeaderValue)>,
    },
    /// Give up on it: a copy with `x-pb-reason` and `x-pb-detail` goes to `<queue>.dead` (through the
    /// dead-letter exchange), then the original is acked. Counted in `dead_lettered_total`.
    DeadLetter {
        /// A fixed word (`bad_message`, `share_rejected`, …).
        reason: &'static str,
        /// A sentence for an operator.
        detail: String,
    },
    /// The message is fine but the pipeline is not (key revoked, workflow missing): a copy goes to `<queue>.retry`
    /// without counting an attempt, the original is acked, and the consumer pauses until resumed.
    Pause {
        /// `credentials`, `workflow_missing` or `ledger` (see [`crate::probe`]).
        reason: &'static str,
        /// What the pipeline saw.
        detail: String,
    },
    /// Hand it back to the queue now (nack with requeue), e.g. because the process is shutting down.
    Requeue,
    /// Dead-letter each copy (counted), then apply `then` to the original.
    Split {
        /// The copies to dead-letter.
        copies: Vec<DeadLetterCopy>,
        /// What to do with the original afterwards.
        then: Box<Decision>,
    },
}

/// Decides what to do with one delivery. Handlers should be pure where they can: one message in, one decision
/// out, I/O at the edges; the consumer does all the acking and republishing.
pub trait Handler: Send + Sync + 'static {
    /// Handles one delivery.
    fn handle(&self, msg: Incoming) -> impl Future<Output = Decision> + Send;

    /// How this handler's work relates to the `traceparent` its messages carry (docs/tracing.md): the same
    /// organisation's trace is continued; a handler of another organisation's messages overrides this with
    /// [`crate::trace::Relation::Link`].
    fn trace_relation(&self) -> crate::trace::Relation {
        crate::trace::Relation::Parent
    }
}

/// Pauses and resumes one pipeline's consumers. Cheap to clone.
///
/// While paused, the health part `paused:<pipeline>` is not ready (so `/readyz` fails) and
/// `paused{pipeline,reason}` is 1.
#[derive(Clone, Debug)]
pub struct PauseControl {
    inner: Arc<PauseInner>,
}

#[derive(Debug)]
struct PauseInner {
    pipeline: &'static str,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    state: watch::Sender<Option<&'static str>>,
}

impl PauseControl {
    /// A control for `pipeline`, not paused.
    pub fn new(pipeline: &'static str, health: Arc<Health>, metrics: Arc<Metrics>) -> PauseControl {
        PauseControl {
            inner: Arc::new(PauseInner {
                pipeline,
                health,
                metrics,
                state: watch::Sender::new(None),
            }),
        }
    }

    /// Pauses consuming because of `reason` (`credentials`, `workflow_missing`, `ledger`).
    pub fn pause(&self, reason: &'static str) {
        self.pause_because(reason, "");
    }

    /// Pauses consuming because of `reason`, with a detail shown in `/readyz`.
    pub fn pause_because(&self, reason: &'static str, detail: &str) {
        let inner = &self.inner;
        let previous = inner.state.send_replace(Some(reason));
        if let Some(previous) = previous
            && previous != reason
        {
            inner.metrics.paused(inner.pipeline, previous, false);
        }
        inner.metrics.paused(inner.pipeline, reason, true);
        let text = if detail.is_empty() {
            format!("paused: {reason}")
        } else {
            format!("paused: {reason}: {}", truncate(detail, 200))
        };
        inner.health.not_ready(&self.health_part(), text);
        if previous.is_none() {
            warn!(
                pipeline = inner.pipeline,
                reason, detail, "pipeline paused; messages wait in the queue"
            );
        }
    }

    /// Resumes consuming.
    pub fn resume(&self) {
        let inner = &self.inner;
        if let Some(reason) = inner.state.send_replace(None) {
            inner.metrics.paused(inner.pipeline, reason, false);
            info!(pipeline = inner.pipeline, reason, "pipeline resumed");
        }
        inner.health.ready(&self.health_part());
    }

    /// Why the pipeline is paused, if it is.
    pub fn is_paused(&self) -> Option<&'static str> {
        *self.inner.state.borrow()
    }

    /// Returns once the pipeline is not paused.
    pub async fn wait_resumed(&self) {
        let mut state = self.inner.state.subscribe();
        let _ = state.wait_for(Option::is_none).await;
    }

    /// Returns once the pipeline is paused, with the reason.
    pub async fn wait_paused(&self) -> &'static str {
        let mut state = self.inner.state.subscribe();
        let reason = match state.wait_for(Option::is_some).await {
            Ok(reason) => *reason,
            Err(_) => None,
        };
        match reason {
            Some(reason) => reason,
            // The sender lives as long as this control: never reached.
            None => std::future::pending().await,
        }
    }

    fn health_part(&self) -> String {
        format!("paused:{}", self.inner.pipeline)
    }
}

/// What one consumer consumes and how.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// The queue.
    pub queue: String,
    /// The pipeline (a [`crate::metrics::pipeline`] name) for metrics.
    pub pipeline: &'static str,
    /// Unacked deliveries the broker may push ahead (`basic.qos`).
    pub prefetch: u16,
    /// Handlers running at once.
    pub concurrency: usize,
    /// Deliveries of one message through [`Decision::Retry`] before `retries_exhausted`.
    pub max_attempts: u32,
    /// The `.retry` queue's delay (for log lines; the queue's TTL is in the plan).
    pub retry_delay_ms: u64,
    /// The topology plan to (re)declare at each session start. Its entry for `queue` names the dead-letter
    /// exchange used for [`Decision::DeadLetter`].
    pub declare: Vec<Entity>,
    /// Where dead-letters are recorded (`None`: nowhere, for tests of the consumer alone).
    pub audit: Option<DeadLetterAudit>,
}

/// The audit log a consumer records its dead-letters in, and who it is.
#[derive(Debug, Clone)]
pub struct DeadLetterAudit {
    /// The process's audit log.
    pub log: AuditLog,
    /// The side the consumer works for.
    pub side: Side,
    /// Counterparts' configured names by application id (partners on the issuer side, issuers on the receiver's).
    pub names: Vec<(String, String)>,
}

impl DeadLetterAudit {
    /// The `dead_lettered` act of `body` (a copy of `delivery`, with `extra` headers) leaving `queue` for
    /// `reason`. Ids come from the message where it has them (`x-pb-partner`, the body's session, event, token and
    /// applications); its dedupe key names the delivery (queue, message id, attempt, replay, body, partner,
    /// reason), so a redelivery of the same decision records nothing new while a replayed message that fails again
    /// is a new act.
    fn act(
        &self,
        queue: &str,
        delivery: &Delivery,
        body: &[u8],
        reason: &str,
        extra: &[(String, HeaderValue)],
    ) -> Act {
        use sha2::Digest;
        let original = incoming(delivery, queue);
        let header = |name: &str| {
            extra
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| v.as_str())
                .or_else(|| original.header(name))
                .map(str::to_string)
        };
        let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let field = |name: &str| {
            json.as_ref()
                .and_then(|v| v.get(name))
                .and_then(serde_json::Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let counterpart = header(HEADER_PARTNER).or_else(|| match self.side {
            Side::Issuer => field("for_application_id"),
            Side::Receiver => field("from_application_id"),
        });
        let message_id = original.message_id.clone().unwrap_or_default();
        let mut act = Act::new(ActKind::DeadLettered, self.side).reason(reason);
        if let Some(app) = &counterpart {
            act.partner = self
                .names
                .iter()
                .find(|(id, _)| id == app)
                .map(|(_, name)| name.clone());
            act.partner_application_id = Some(app.clone());
        }
        act.session_id = field("source_session_id").or_else(|| field("session_id"));
        act.event_id = field("event_id");
        act.token_id = field("share_token").map(|t| crate::audit::token_id(&t));
        act.message_id = Some(message_id.clone()).filter(|m| !m.is_empty());
        let mut key = sha2::Sha256::new();
        for part in [
            queue.to_string(),
            message_id,
            original.attempt.to_string(),
            header(HEADER_REPLAYED).unwrap_or_default(),
            counterpart.unwrap_or_default(),
            reason.to_string(),
            hex::encode(sha2::Sha256::digest(body)),
        ] {
            key.update((part.len() as u64).to_be_bytes());
            key.update(part.as_bytes());
        }
        act.once(hex::encode(key.finalize()))
    }
}

/// Why a decision could not be carried out; the delivery is still unsettled.
#[derive(Debug)]
enum ApplyError {
    /// A retry or dead-letter copy was not confirmed: requeue and restart the session.
    Publish(PublishError),
    /// A dead-letter could not be recorded in the audit log: park the delivery and pause, as for the ledger.
    Audit(LedgerError),
}

impl From<PublishError> for ApplyError {
    fn from(e: PublishError) -> Self {
        ApplyError::Publish(e)
    }
}

impl From<AmqpError> for ApplyError {
    fn from(e: AmqpError) -> Self {
        ApplyError::Publish(e.into())
    }
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Publish(e) => e.fmt(f),
            ApplyError::Audit(e) => write!(f, "audit log: {e}"),
        }
    }
}

impl ConsumerSpec {
    /// The dead-letter exchange of `queue`, from its `x-dead-letter-exchange` argument in the plan.
    pub fn dead_letter_exchange(&self) -> Option<String> {
        self.declare.iter().find_map(|entity| match entity {
            Entity::Queue { name, .. } if *name == self.queue => entity
                .argument("x-dead-letter-exchange")
                .and_then(HeaderValue::as_str)
                .map(str::to_string),
            _ => None,
        })
    }
}

struct Ctx<H> {
    link: Link,
    publisher: Publisher,
    spec: ConsumerSpec,
    dead_letter_exchange: Option<String>,
    handler: Arc<H>,
    pause: PauseControl,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    part: String,
    /// Set the first time the shutdown is seen: `now + grace`, shared by every step of the drain.
    drain_deadline: OnceLock<Instant>,
    grace: Duration,
    /// Split copies confirmed for deliveries not settled yet (see the module doc).
    split_done: Mutex<SplitMemory>,
}

impl<H> Ctx<H> {
    /// The one deadline of this consumer's drain, fixed when first asked for.
    fn drain_deadline(&self) -> Instant {
        *self
            .drain_deadline
            .get_or_init(|| Instant::now() + self.grace)
    }
}

/// Which dead-letter copies of which deliveries the broker already confirmed. Keys are hashes: a delivery by its
/// message id, attempt and body; a copy by its body, reason, detail and headers.
#[derive(Default)]
struct SplitMemory {
    done: HashMap<u64, HashSet<u64>>,
    order: VecDeque<u64>,
}

impl SplitMemory {
    fn contains(&self, delivery: u64, copy: u64) -> bool {
        self.done.get(&delivery).is_some_and(|c| c.contains(&copy))
    }

    fn insert(&mut self, delivery: u64, copy: u64) {
        if !self.done.contains_key(&delivery) {
            self.order.push_back(delivery);
            while self.order.len() > SPLIT_MEMORY {
                if let Some(old) = self.order.pop_front() {
                    self.done.remove(&old);
                }
            }
        }
        self.done.entry(delivery).or_default().insert(copy);
    }

    fn forget(&mut self, delivery: u64) {
        if self.done.remove(&delivery).is_some() {
            self.order.retain(|d| *d != delivery);
        }
    }
}

fn delivery_key(delivery: &Delivery, attempt: u32) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str())
        .hash(&mut hasher);
    attempt.hash(&mut hasher);
    delivery.data.hash(&mut hasher);
    hasher.finish()
}

fn copy_key(copy: &DeadLetterCopy) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    copy.body.hash(&mut hasher);
    copy.reason.hash(&mut hasher);
    copy.detail.hash(&mut hasher);
    for (name, value) in &copy.headers {
        name.hash(&mut hasher);
        format!("{value:?}").hash(&mut hasher);
    }
    hasher.finish()
}

/// What publishing a dead-letter copy did.
enum DeadLettered {
    /// The copy is confirmed in `<queue>.dead`; the original is still unsettled.
    Copied,
    /// No dead-letter exchange is known: the original itself was rejected, which was its one settle.
    RejectedOriginal,
}

enum SessionEnd {
    /// Shutdown was requested; `drained` tells whether in-flight work finished within the grace.
    Shutdown { drained: bool },
    /// The pipeline paused; in-flight work has finished and the channel is closed.
    Paused,
    /// Something failed; start over after a backoff. `consumed` tells whether deliveries flowed before.
    Failed { reason: String, consumed: bool },
}

enum Stop {
    Shutdown,
    Paused,
    Failed(String),
}

/// Consumes `spec.queue` until `shutdown` is cancelled (see the module doc). Returns after in-flight work
/// finished or `grace` ran out.
#[allow(clippy::too_many_arguments)]
pub async fn run_consumer<H: Handler>(
    link: Link,
    publisher: Publisher,
    spec: ConsumerSpec,
    handler: Arc<H>,
    pause: PauseControl,
    shutdown: CancellationToken,
    grace: Duration,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) {
    // The same queue consumed on another broker (the issuer's reshare queue on each token broker) has a part of
    // its own, named after that broker's link.
    let part = if link.pipeline() == spec.pipeline {
        format!("consumer:{}", spec.queue)
    } else {
        format!("consumer:{}@{}", spec.queue, link.pipeline())
    };
    health.not_ready(&part, "starting");
    let dead_letter_exchange = spec.dead_letter_exchange();
    if dead_letter_exchange.is_none() {
        warn!(
            queue = %spec.queue,
            "the declare plan names no dead-letter exchange for this queue; dead-letters fall back to reject"
        );
    }
    let ctx = Arc::new(Ctx {
        link,
        publisher,
        dead_letter_exchange,
        handler,
        pause,
        metrics,
        health,
        part,
        spec,
        drain_deadline: OnceLock::new(),
        grace,
        split_done: Mutex::new(SplitMemory::default()),
    });
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(ctx.spec.concurrency.max(1)));
    let mut backoff = Backoff::new(RESTART_MIN, RESTART_MAX);
    let mut drained = false;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        if let Some(reason) = ctx.pause.is_paused() {
            ctx.health
                .not_ready(&ctx.part, format!("paused ({reason})"));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ctx.pause.wait_resumed() => continue,
            }
        }
        match session(&ctx, &tracker, &permits, &shutdown).await {
            SessionEnd::Shutdown { drained: done } => {
                drained = done;
                break;
            }
            SessionEnd::Paused => backoff.reset(),
            SessionEnd::Failed { reason, consumed } => {
                if consumed {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                warn!(queue = %ctx.spec.queue, %reason, retry_in_ms = delay.as_millis() as u64, "consumer stopped; restarting");
                ctx.health
                    .not_ready(&ctx.part, format!("{reason}; restarting"));
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    if !drained {
        // Handlers of earlier sessions may still run (their acks will fail and the broker redelivers); they get
        // what is left of the one drain deadline, not a grace of their own.
        tracker.close();
        let _ = tokio::time::timeout_at(ctx.drain_deadline(), tracker.wait()).await;
    }
    ctx.health.not_ready(&ctx.part, "stopped (shutting down)");
    info!(queue = %ctx.spec.queue, "consumer stopped");
}

async fn session<H: Handler>(
    ctx: &Arc<Ctx<H>>,
    tracker: &TaskTracker,
    permits: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let connection = match ctx.link.connection(shutdown).await {
        Ok(connection) => connection,
        Err(_) => return SessionEnd::Shutdown { drained: false },
    };
    let tag = format!(
        "partner-bridge.{}.{}",
        ctx.spec.pipeline,
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let setup = tokio::select! {
        _ = shutdown.cancelled() => return SessionEnd::Shutdown { drained: false },
        setup = subscribe(ctx, &connection, &tag) => setup,
    };
    let (channel, mut consumer) = match setup {
        Ok(subscribed) => subscribed,
        Err(error) => {
            if error.is_connection_level() || !connection.status().connected() {
                ctx.link.invalidate_if(&connection).await;
            }
            return SessionEnd::Failed {
                reason: format!("cannot consume from {}: {error}", ctx.spec.queue),
                consumed: false,
            };
        }
    };
    ctx.health.ready(&ctx.part);
    info!(queue = %ctx.spec.queue, prefetch = ctx.spec.prefetch, concurrency = ctx.spec.concurrency, "consuming");
    let session_tasks = TaskTracker::new();
    let fault = CancellationToken::new();
    let mut consumed = false;
    let stop = loop {
        // A permit first, then a delivery: a delivery is only taken when a handler can start on it.
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Stop::Shutdown,
            _ = ctx.pause.wait_paused() => break Stop::Paused,
            _ = fault.cancelled() => break Stop::Failed("republishing a retry or dead-letter copy failed".into()),
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break Stop::Shutdown,
            },
        };
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Stop::Shutdown,
            _ = ctx.pause.wait_paused() => break Stop::Paused,
            _ = fault.cancelled() => break Stop::Failed("republishing a retry or dead-letter copy failed".into()),
            next = consumer.next() => next,
        };
        match next {
            None => {
                break Stop::Failed(format!(
                    "the broker cancelled the subscription to {} (queue deleted or node restarting)",
                    ctx.spec.queue
                ));
            }
            Some(Err(error)) => break Stop::Failed(format!("consumer error: {error}")),
            Some(Ok(delivery)) => {
                consumed = true;
                let task = handle_delivery(ctx.clone(), delivery, fault.clone(), permit);
                tracker.spawn(session_tasks.track_future(task));
            }
        }
    };
    let tag = ShortString::try_new(tag).unwrap_or_else(|_| ShortString::from(""));
    match stop {
        Stop::Shutdown => {
            ctx.health.not_ready(&ctx.part, "draining (shutting down)");
            let deadline = ctx.drain_deadline();
            tracker.close();
            // The cancel and the in-flight handlers share the deadline: a broker that stopped answering must not
            // hold `basic.cancel` for its own timeout on top of the grace.
            let drained = tokio::time::timeout_at(deadline, async {
                tokio::join!(cancel_subscription(&channel, tag), tracker.wait());
            })
            .await
            .is_ok();
            if !drained {
                warn!(queue = %ctx.spec.queue, grace_ms = ctx.grace.as_millis() as u64, "handlers still running after the grace period; their messages go back to the queue");
            }
            close_channel(&channel).await;
            SessionEnd::Shutdown { drained }
        }
        Stop::Paused => {
            let reason = ctx.pause.is_paused().unwrap_or("paused");
            ctx.health
                .not_ready(&ctx.part, format!("paused ({reason})"));
            cancel_subscription(&channel, tag).await;
            session_tasks.close();
            tokio::select! {
                _ = session_tasks.wait() => {}
                _ = shutdown.cancelled() => {
                    tracker.close();
                    let drained = tokio::time::timeout_at(ctx.drain_deadline(), tracker.wait()).await.is_ok();
                    close_channel(&channel).await;
                    return SessionEnd::Shutdown { drained };
                }
            }
            // Prefetched deliveries nobody took go back to the queue with the channel.
            close_channel(&channel).await;
            SessionEnd::Paused
        }
        Stop::Failed(reason) => {
            ctx.health.not_ready(&ctx.part, reason.clone());
            if !connection.status().connected() {
                ctx.link.invalidate_if(&connection).await;
            } else {
                // Let in-flight handlers settle on this channel, then close it so that prefetched deliveries
                // return to the queue.
                session_tasks.close();
                tokio::spawn(async move {
                    session_tasks.wait().await;
                    close_channel(&channel).await;
                });
            }
            SessionEnd::Failed { reason, consumed }
        }
    }
}

/// Opens the session's channel, sets the prefetch, declares the plan and subscribes.
async fn subscribe<H: Handler>(
    ctx: &Ctx<H>,
    connection: &Connection,
    tag: &str,
) -> Result<(Channel, lapin::Consumer), AmqpError> {
    let channel = super::timed(
        "opening a consumer channel",
        SETUP_TIMEOUT,
        connection.create_channel(),
    )
    .await?;
    super::timed(
        "basic.qos",
        SETUP_TIMEOUT,
        channel.basic_qos(ctx.spec.prefetch, BasicQosOptions::default()),
    )
    .await?;
    declare(&channel, &ctx.spec.declare).await?;
    let consumer = super::timed(
        &format!("subscribing to queue {}", ctx.spec.queue),
        SETUP_TIMEOUT,
        channel.basic_consume(
            short(&ctx.spec.queue)?,
            short(tag)?,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    Ok((channel, consumer))
}

async fn cancel_subscription(channel: &Channel, tag: ShortString) {
    if channel.status().connected() {
        let _ = super::timed(
            "basic.cancel",
            SETUP_TIMEOUT,
            channel.basic_cancel(tag, BasicCancelOptions::default()),
        )
        .await;
    }
}

async fn close_channel(channel: &Channel) {
    if channel.status().connected() {
        let _ = super::timed(
            "closing a consumer channel",
            CLOSE_TIMEOUT,
            channel.close(200, "OK".into()),
        )
        .await;
    }
}

/// Runs the handler on one delivery and carries out its decision.
async fn handle_delivery<H: Handler>(
    ctx: Arc<Ctx<H>>,
    delivery: Delivery,
    fault: CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let _permit = permit;
    let _in_flight = ctx.metrics.in_flight(ctx.spec.pipeline);
    let incoming = incoming(&delivery, &ctx.spec.queue);
    let message_id = incoming.message_id.clone().unwrap_or_default();
    let attempt = incoming.attempt;
    let span = process_span(&delivery, &ctx.spec.queue, &message_id);
    let traced = crate::trace::begin(
        &span,
        incoming_trace(&incoming),
        ctx.handler.trace_relation(),
    );
    let handled = crate::trace::scope(traced, ctx.handler.handle(incoming)).instrument(span);
    let decision = match AssertUnwindSafe(handled).catch_unwind().await {
        Ok(decision) => decision,
        Err(_) => {
            error!(queue = %ctx.spec.queue, %message_id, "handler panicked; dead-lettering the message");
            Decision::DeadLetter {
                reason: "handler_panicked",
                detail: "the handler panicked on this message".into(),
            }
        }
    };
    let pause_after = match &decision {
        Decision::Pause { reason, detail } => Some((*reason, detail.clone())),
        _ => None,
    };
    match apply(&ctx, &delivery, attempt, decision).await {
        Ok(()) => {}
        Err(ApplyError::Audit(error)) => {
            // As a handler does with a failed ledger write: the message waits in the retry queue (no attempt
            // counted), the pipeline pauses until the database answers again, nothing is dead-lettered unrecorded.
            warn!(queue = %ctx.spec.queue, %message_id, %error, "dead-letter not recorded in the audit log; parking the message and pausing");
            let parked = match copy_properties(&delivery.properties, &[], &[]) {
                Ok(properties) => ctx
                    .publisher
                    .publish_raw(
                        "",
                        &Names::retry_queue(&ctx.spec.queue),
                        &delivery.data,
                        properties,
                    )
                    .await
                    .map_err(ApplyError::Publish),
                Err(e) => Err(e.into()),
            };
            match parked {
                Ok(()) => {
                    settle(&ctx, &delivery, Settle::Ack, &message_id).await;
                }
                Err(e) => {
                    warn!(queue = %ctx.spec.queue, %message_id, error = %e, "could not park; returning the message to the queue");
                    settle(&ctx, &delivery, Settle::Requeue, &message_id).await;
                    fault.cancel();
                }
            }
            ctx.pause
                .pause_because(crate::probe::LEDGER, &format!("audit log: {error}"));
        }
        Err(error) => {
            warn!(queue = %ctx.spec.queue, %message_id, %error, "could not republish; returning the message to the queue");
            settle(&ctx, &delivery, Settle::Requeue, &message_id).await;
            fault.cancel();
        }
    }
    if let Some((reason, detail)) = pause_after {
        ctx.pause.pause_because(reason, &detail);
    }
}

/// Carries out `decision` with at most one settle of `delivery` (see the module doc); `Err` means a republish
/// failed and the delivery is still unsettled.
async fn apply<H: Handler>(
    ctx: &Ctx<H>,
    delivery: &Delivery,
    attempt: u32,
    mut decision: Decision,
) -> Result<(), ApplyError> {
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.to_string())
        .unwrap_or_default();
    let queue = ctx.spec.queue.as_str();
    let key = delivery_key(delivery, attempt);
    while let Decision::Split { copies, then } = decision {
        for copy in copies {
            let copy_id = copy_key(&copy);
            if lock(&ctx.split_done).contains(key, copy_id) {
                info!(%queue, %message_id, reason = copy.reason, "dead-letter copy already confirmed before a requeue; not publishing it again");
                continue;
            }
            match dead_letter(
                ctx,
                delivery,
                &copy.body,
                copy.reason,
                &copy.detail,
                &copy.headers,
            )
            .await?
            {
                DeadLettered::Copied => lock(&ctx.split_done).insert(key, copy_id),
                DeadLettered::RejectedOriginal => return Ok(()),
            }
        }
        decision = *then;
    }
    // `true` once the delivery is settled for good (acked or rejected).
    let settled = match decision {
        Decision::Ack => {
            let settled = settle(ctx, delivery, Settle::Ack, &message_id).await;
            if settled {
                ctx.metrics.success(ctx.spec.pipeline);
            }
            settled
        }
        Decision::Requeue => {
            // Handed back, not done: the redelivery must still find the copies confirmed so far.
            settle(ctx, delivery, Settle::Requeue, &message_id).await;
            false
        }
        Decision::Retry { detail, headers } => {
            let next = attempt.saturating_add(1);
            if next > ctx.spec.max_attempts {
                warn!(%queue, %message_id, attempt, %detail, "retries exhausted; dead-lettering");
                match dead_letter(
                    ctx,
                    delivery,
                    &delivery.data,
                    "retries_exhausted",
                    &detail,
                    &headers,
                )
                .await?
                {
                    DeadLettered::Copied => settle(ctx, delivery, Settle::Ack, &message_id).await,
                    DeadLettered::RejectedOriginal => true,
                }
            } else {
                let mut set = headers;
                set.push((
                    HEADER_ATTEMPT.to_string(),
                    HeaderValue::Int(i64::from(next)),
                ));
                let properties = copy_properties(&delivery.properties, &set, &[])?;
                ctx.publisher
                    .publish_raw("", &Names::retry_queue(queue), &delivery.data, properties)
                    .await?;
                info!(%queue, %message_id, attempt = next, retry_in_ms = ctx.spec.retry_delay_ms, %detail, "retry scheduled");
                ctx.metrics.delivery_retry(ctx.spec.pipeline);
                settle(ctx, delivery, Settle::Ack, &message_id).await
            }
        }
        Decision::Defer { detail, headers } => {
            let properties = copy_properties(&delivery.properties, &headers, &[])?;
            ctx.publisher
                .publish_raw("", &Names::retry_queue(queue), &delivery.data, properties)
                .await?;
            info!(%queue, %message_id, attempt, retry_in_ms = ctx.spec.retry_delay_ms, %detail, "waiting for the rate limit in the retry queue (no attempt counted)");
            settle(ctx, delivery, Settle::Ack, &message_id).await
        }
        Decision::DeadLetter { reason, detail } => {
            match dead_letter(ctx, delivery, &delivery.data, reason, &detail, &[]).await? {
                DeadLettered::Copied => settle(ctx, delivery, Settle::Ack, &message_id).await,
                DeadLettered::RejectedOriginal => true,
            }
        }
        Decision::Pause { reason, detail } => {
            let properties = copy_properties(&delivery.properties, &[], &[])?;
            ctx.publisher
                .publish_raw("", &Names::retry_queue(queue), &delivery.data, properties)
                .await?;
            info!(%queue, %message_id, reason, %detail, "message parked in the retry queue while pausing");
            settle(ctx, delivery, Settle::Ack, &message_id).await
        }
        Decision::Split { .. } => unreachable!("splits were unrolled above"),
    };
    if settled {
        // Settled for good: a later delivery of the same bytes is a new one, whose copies are its own. When the
        // settle failed, the broker redelivers it, and the copies already confirmed must not be published again.
        lock(&ctx.split_done).forget(key);
    }
    Ok(())
}

fn lock(memory: &Mutex<SplitMemory>) -> std::sync::MutexGuard<'_, SplitMemory> {
    // The memory holds no invariant a panic could break halfway: a poisoned lock is still usable.
    memory
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Publishes a dead-letter copy of `delivery` (with `body`) to `<queue>.dead` and counts it. Without a known
/// dead-letter exchange it rejects the original instead — that reject is the delivery's one settle, and the caller
/// must not settle it again.
async fn dead_letter<H: Handler>(
    ctx: &Ctx<H>,
    delivery: &Delivery,
    body: &[u8],
    reason: &'static str,
    detail: &str,
    extra: &[(String, HeaderValue)],
) -> Result<DeadLettered, ApplyError> {
    let queue = ctx.spec.queue.as_str();
    if let Some(audit) = &ctx.spec.audit {
        // Recorded before anything leaves: a failure here changes nothing, and a redelivery records it once.
        audit
            .log
            .record(audit.act(queue, delivery, body, reason, extra))
            .await
            .map_err(ApplyError::Audit)?;
    }
    let Some(exchange) = ctx.dead_letter_exchange.as_deref() else {
        // No dead-letter exchange known: let the broker dead-letter the original per the queue's arguments.
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_default();
        warn!(%queue, %message_id, reason, detail = %truncate(detail, MAX_DETAIL_BYTES), "no dead-letter exchange known; rejecting the whole message (the rest of its decision is dropped)");
        settle(ctx, delivery, Settle::Reject, &message_id).await;
        ctx.metrics.dead_lettered(queue, reason);
        return Ok(DeadLettered::RejectedOriginal);
    };
    let mut set: Vec<(String, HeaderValue)> = extra.to_vec();
    set.push((
        HEADER_REASON.to_string(),
        HeaderValue::Str(reason.to_string()),
    ));
    set.push((
        HEADER_DETAIL.to_string(),
        HeaderValue::Str(truncate(detail, MAX_DETAIL_BYTES)),
    ));
    let properties = copy_properties(&delivery.properties, &set, &[])?;
    ctx.publisher
        .publish_raw(exchange, queue, body, properties)
        .await?;
    ctx.metrics.dead_lettered(queue, reason);
    warn!(
        %queue,
        message_id = %delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str())
            .unwrap_or(""),
        reason,
        detail = %truncate(detail, MAX_DETAIL_BYTES),
        "message dead-lettered"
    );
    Ok(DeadLettered::Copied)
}

enum Settle {
    Ack,
    Requeue,
    Reject,
}

/// Acks, nacks or rejects; `true` when the broker got it. A failure is logged: the broker will redeliver.
async fn settle<H: Handler>(
    ctx: &Ctx<H>,
    delivery: &Delivery,
    how: Settle,
    message_id: &str,
) -> bool {
    let (what, settling) = match how {
        Settle::Ack => (
            "ack",
            delivery.acker.ack(BasicAckOptions::default()).boxed(),
        ),
        Settle::Requeue => (
            "nack",
            delivery
                .acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .boxed(),
        ),
        Settle::Reject => (
            "reject",
            delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .boxed(),
        ),
    };
    let Ok(result) = tokio::time::timeout(SETTLE_TIMEOUT, settling).await else {
        warn!(queue = %ctx.spec.queue, %message_id, what, timeout_ms = SETTLE_TIMEOUT.as_millis() as u64, "delivery not settled in time (connection lost under it?); the broker will redeliver it if it was not");
        return false;
    };
    match result {
        Ok(true) => true,
        Ok(false) => {
            warn!(queue = %ctx.spec.queue, %message_id, what, "delivery not settled: its channel is gone; the broker will redeliver it");
            false
        }
        Err(error) => {
            warn!(queue = %ctx.spec.queue, %message_id, what, %error, "delivery not settled; the broker will redeliver it");
            false
        }
    }
}

/// A delivery as a handler sees it.
/// The span of one delivery handled, with the OpenTelemetry messaging attributes (docs/tracing.md).
fn process_span(delivery: &Delivery, queue: &str, message_id: &str) -> tracing::Span {
    tracing::info_span!(
        "process",
        otel.name = %format!("process {queue}"),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        "messaging.operation.type" = "process",
        messaging.destination.name = %delivery.exchange.as_str(),
        messaging.destination.subscription.name = %queue,
        messaging.rabbitmq.destination.routing_key = %delivery.routing_key.as_str(),
        messaging.message.id = %message_id,
    )
}

/// The `traceparent` (and `tracestate`) a delivery came with; `None` when absent or malformed (ignored).
fn incoming_trace(msg: &Incoming) -> Option<crate::trace::TraceContext> {
    crate::trace::TraceContext::parse(
        msg.header(crate::trace::HEADER_TRACEPARENT)?,
        msg.header(crate::trace::HEADER_TRACESTATE),
    )
}

fn incoming(delivery: &Delivery, queue: &str) -> Incoming {
    let properties = &delivery.properties;
    let headers: BTreeMap<String, HeaderValue> = properties
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .filter_map(|(k, v)| HeaderValue::from_amqp(v).map(|v| (k.as_str().to_string(), v)))
                .collect()
        })
        .unwrap_or_default();
    let attempt = headers
        .get(HEADER_ATTEMPT)
        .and_then(HeaderValue::as_int)
        .filter(|a| *a >= 1)
        .map(|a| u32::try_from(a).unwrap_or(u32::MAX))
        .unwrap_or(1);
    Incoming {
        body: delivery.data.clone(),
        headers,
        message_id: properties.message_id().as_ref().map(|id| id.to_string()),
        kind: properties.kind().as_ref().map(|k| k.to_string()),
        timestamp: *properties.timestamp(),
        redelivered: delivery.redelivered,
        attempt,
        queue: queue.to_string(),
    }
}

/// A copy of `original` (persistent) with headers `set` added or replaced and `remove` dropped.
pub(crate) fn copy_properties(
    original: &BasicProperties,
    set: &[(String, HeaderValue)],
    remove: &[&str],
) -> Result<BasicProperties, AmqpError> {
    let mut headers: BTreeMap<ShortString, lapin::types::AMQPValue> = original
        .headers()
        .as_ref()
        .map(|table| table.inner().clone())
        .unwrap_or_default();
    headers.retain(|key, _| !remove.contains(&key.as_str()));
    for (key, value) in set {
        headers.insert(short(key)?, value.to_amqp());
    }
    Ok(original
        .clone()
        .with_delivery_mode(2)
        .with_headers(FieldTable::from(headers)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_become_incoming_with_attempt_defaulting_to_one() {
        let mut d = Delivery::mock(1, "".into(), "q".into(), true, b"{}".to_vec());
        let mut table = FieldTable::default();
        table.insert("x-pb-reason".into(), HeaderValue::Str("r".into()).to_amqp());
        d.properties = BasicProperties::default()
            .with_message_id("m".into())
            .with_type("share_token".into())
            .with_timestamp(5)
            .with_headers(table.clone());
        let i = incoming(&d, "pb.q");
        assert_eq!(i.attempt, 1);
        assert_eq!(i.message_id.as_deref(), Some("m"));
        assert_eq!(i.kind.as_deref(), Some("share_token"));
        assert_eq!(i.timestamp, Some(5));
        assert!(i.redelivered);
        assert_eq!(
            i.headers.get("x-pb-reason"),
            Some(&HeaderValue::Str("r".into()))
        );
        table.insert("x-pb-attempt".into(), lapin::types::AMQPValue::LongInt(3));
        d.properties = d.properties.clone().with_headers(table);
        assert_eq!(incoming(&d, "pb.q").attempt, 3);
    }

    #[test]
    fn copies_replace_and_strip_headers_and_stay_persistent() {
        let mut table = FieldTable::default();
        table.insert("x-pb-attempt".into(), HeaderValue::Int(2).to_amqp());
        table.insert(
            "x-pb-reason".into(),
            HeaderValue::Str("old".into()).to_amqp(),
        );
        table.insert("keep".into(), HeaderValue::Str("k".into()).to_amqp());
        let original = BasicProperties::default()
            .with_message_id("m".into())
            .with_headers(table);
        let copy = copy_properties(
            &original,
            &[("x-pb-attempt".into(), HeaderValue::Int(3))],
            &["x-pb-reason"],
        )
        .unwrap();
        let h = copy.headers().as_ref().unwrap();
        assert_eq!(
            HeaderValue::from_amqp(&h.inner()["x-pb-attempt"]),
            Some(HeaderValue::Int(3))
        );
        assert!(!h.contains_key("x-pb-reason"));
        assert!(h.contains_key("keep"));
        assert_eq!(*copy.delivery_mode(), Some(2));
        assert_eq!(copy.message_id().as_ref().map(|s| s.as_str()), Some("m"));
    }

    #[test]
    fn the_split_memory_remembers_until_forgotten_and_stays_bounded() {
        let mut memory = SplitMemory::default();
        memory.insert(1, 10);
        memory.insert(1, 11);
        assert!(memory.contains(1, 10) && memory.contains(1, 11));
        assert!(!memory.contains(1, 12) && !memory.contains(2, 10));
        memory.forget(1);
        assert!(!memory.contains(1, 10));
        for delivery in 0..(SPLIT_MEMORY as u64 + 10) {
            memory.insert(delivery, 0);
        }
        assert_eq!(memory.done.len(), SPLIT_MEMORY);
        assert!(!memory.contains(0, 0), "the oldest is forgotten first");
        assert!(memory.contains(SPLIT_MEMORY as u64 + 9, 0));
    }

    #[test]
    fn copies_differing_only_in_their_partner_are_told_apart() {
        let copy = |partner: &str| DeadLetterCopy {
            body: b"{}".to_vec(),
            reason: "share_rejected",
            detail: "400".into(),
            headers: vec![("x-pb-partner".into(), HeaderValue::Str(partner.into()))],
        };
        assert_eq!(copy_key(&copy("a")), copy_key(&copy("a")));
        assert_ne!(copy_key(&copy("a")), copy_key(&copy("b")));
    }

    #[test]
    fn the_dead_letter_exchange_comes_from_the_plan() {
        let names = Names::new("pb");
        let settings = super::super::QueueSettings {
            delivery_limit: 5,
            retry_delay_ms: 100,
            quorum_retry: false,
        };
        let spec = ConsumerSpec {
            queue: names.receiver_tokens_queue(),
            pipeline: crate::metrics::pipeline::RECEIVER_TOKENS,
            prefetch: 10,
            concurrency: 2,
            max_attempts: 3,
            retry_delay_ms: 100,
            declare: super::super::topology::receiver_plan(&names, &settings, "me"),
            audit: None,
        };
        assert_eq!(
            spec.dead_letter_exchange().as_deref(),
            Some("pb.dead-letter")
        );
    }

    struct Noop;
    impl Handler for Noop {
        async fn handle(&self, _msg: Incoming) -> Decision {
            Decision::Ack
        }
    }

    #[test]
    fn the_consumer_future_can_be_spawned() {
        fn assert_send<T: Send + 'static>(_: T) {}
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new());
        let link = Link::new(
            crate::secret::SecretUrl::new("amqp://127.0.0.1:1/%2f"),
            "receiver_tokens",
            metrics.clone(),
            health.clone(),
            super::super::LinkOptions::default(),
        );
        let publisher = Publisher::new(link.clone(), Duration::from_secs(1), metrics.clone());
        let spec = ConsumerSpec {
            queue: "q".into(),
            pipeline: "receiver_tokens",
            prefetch: 1,
            concurrency: 1,
            max_attempts: 1,
            retry_delay_ms: 1,
            declare: Vec::new(),
            audit: None,
        };
        let pause = PauseControl::new("receiver_tokens", health.clone(), metrics.clone());
        assert_send(run_consumer(
            link,
            publisher,
            spec,
            Arc::new(Noop),
            pause,
            CancellationToken::new(),
            Duration::from_secs(1),
            metrics,
            health,
        ));
    }

    #[tokio::test]
    async fn pause_control_reports_and_wakes() {
        let health = Arc::new(Health::new());
        let metrics = Arc::new(Metrics::new());
        let pause = PauseControl::new("receiver_tokens", health.clone(), metrics.clone());
        assert_eq!(pause.is_paused(), None);
        pause.wait_resumed().await;
        let waiter = tokio::spawn({
            let pause = pause.clone();
            async move { pause.wait_paused().await }
        });
        pause.pause_because("credentials", "key revoked");
        assert_eq!(waiter.await.unwrap(), "credentials");
        assert_eq!(pause.is_paused(), Some("credentials"));
        let reasons = health.check().unwrap_err();
        assert!(
            reasons
                .iter()
                .any(|r| r.starts_with("paused:receiver_tokens: paused: credentials")),
            "{reasons:?}"
        );
        assert!(metrics.encode().contains(
            "partner_bridge_paused{pipeline=\"receiver_tokens\",reason=\"credentials\"} 1"
        ));
        pause.resume();
        pause.wait_resumed().await;
        assert!(health.check().is_ok());
        assert!(metrics.encode().contains(
            "partner_bridge_paused{pipeline=\"receiver_tokens\",reason=\"credentials\"} 0"
        ));
    }
}
