//! [`Publisher`]: confirmed, `mandatory` publishing on one channel of a [`Link`], where only a plain broker ack
//! counts as delivered.
//!
//! Every message is published persistent with `mandatory = true` on a channel in confirm mode, and the caller
//! waits for that message's confirm (with a timeout). The outcomes, and the metric `publish_confirms_total{result}`
//! they count:
//! - `Confirmation::Ack` with no returned message: `Ok` (`ack`);
//! - a `basic.return` (no queue bound for the routing key): [`PublishError::Returned`] (`returned`), although
//!   lapin reports it as an ack;
//! - a nack: [`PublishError::Nacked`] (`nack`);
//! - no confirm within the timeout: [`PublishError::Timeout`] (`timeout`), and the channel is replaced;
//! - the channel or connection failed (including a publish to a missing exchange, which makes the broker close
//!   the channel): [`PublishError::Connection`] (`error`), and the next publish opens a new channel.
//!
//! Many publishes may be in flight at once on the one channel. **Attributing returns correctly** takes care:
//! the broker sends `basic.return` just before the ack covering that message, but it coalesces acks
//! (`multiple = true`), and lapin 4.12 hands each waiting returned message to whichever confirm of the batch
//! its hash map yields first — so the unroutable message may be reported acked and a delivered one returned. A
//! lost token is worse than a duplicate, so confirms are not read by their publishers but by one collector task
//! per channel, in publish order: when the oldest confirm resolves, it waits for lapin to finish the ack frame
//! being applied (`wait_for_confirms` takes the lock lapin holds while resolving one ack frame), takes every
//! confirm that has resolved since, repeats until no more resolve, and then matches the returned messages of
//! that closed set to their publishes by identity (exchange, routing key, message id and body). RabbitMQ sends a
//! return before the ack frames of the flush that covers its message, and such a flush may begin with a
//! `multiple` ack for older messages only, so a return can also be seen one set early: unmatched returns are
//! kept for the next sets. Publish order equals delivery-tag order because sending a message and queueing it for
//! the collector happen under one lock.

use std::collections::VecDeque;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::{Instrument, debug, warn};

use super::connection::Link;
use super::{AmqpError, HeaderValue, field_table, short};
use crate::envelope::APP_ID;
use crate::metrics::Metrics;

/// How many times the collector re-checks for confirms resolved by the same ack frames before settling.
const MAX_CLOSURE_ROUNDS: usize = 1000;
/// Returned messages kept while waiting for their publish's confirm (they normally wait one ack frame).
const MAX_UNMATCHED_RETURNS: usize = 10_000;

/// One message to publish with our standard properties.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// The exchange (`""` for the default exchange).
    pub exchange: &'a str,
    /// The routing key.
    pub routing_key: &'a str,
    /// The JSON body.
    pub body: &'a [u8],
    /// AMQP `message_id`.
    pub message_id: &'a str,
    /// AMQP `type` (the message's `type` field).
    pub kind: &'a str,
    /// Headers (`x-pb-*`).
    pub headers: Vec<(String, HeaderValue)>,
}

/// Why a publish did not count as delivered. Every variant means "not delivered as far as we know": the caller
/// keeps the source message (nack with requeue, answer 503) and tries again later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The broker refused the message (`basic.nack`).
    #[error("the broker refused the message (nack)")]
    Nacked,
    /// No queue is bound for the routing key (`basic.return` of a `mandatory` publish).
    #[error("the broker returned the message as unroutable: {reply_code} {reply_text}")]
    Returned {
        /// AMQP reply code (312 `NO_ROUTE`).
        reply_code: u16,
        /// The broker's text.
        reply_text: String,
    },
    /// No confirm arrived within the confirm timeout.
    #[error("no publisher confirm within the timeout")]
    Timeout,
    /// The channel or connection failed, or the broker is unreachable.
    #[error("broker connection or channel failed: {0}")]
    Connection(String),
    /// The link is closed (shutting down).
    #[error("shutting down")]
    Cancelled,
    /// The message cannot be expressed in AMQP (a name or id longer than 255 bytes).
    #[error("invalid message: {0}")]
    Invalid(String),
}

impl PublishError {
    /// The `result` label of `publish_confirms_total` for this failure.
    pub fn metric_label(&self) -> &'static str {
        match self {
            PublishError::Nacked => "nack",
            PublishError::Returned { .. } => "returned",
            PublishError::Timeout => "timeout",
            PublishError::Connection(_) | PublishError::Cancelled | PublishError::Invalid(_) => {
                "error"
            }
        }
    }
}

impl From<AmqpError> for PublishError {
    fn from(error: AmqpError) -> Self {
        match error {
            AmqpError::Cancelled => PublishError::Cancelled,
            AmqpError::InvalidName(name) => PublishError::Invalid(format!("name too long: {name}")),
            other => PublishError::Connection(other.to_string()),
        }
    }
}

/// A confirming publisher with its own channel on a [`Link`]. Cheap to clone; clones share the channel.
#[derive(Clone, Debug)]
pub struct Publisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    link: Link,
    confirm_timeout: Duration,
    metrics: Arc<Metrics>,
    slot: Mutex<Option<Arc<PubChannel>>>,
}

#[derive(Debug)]
struct PubChannel {
    channel: Channel,
    connection: Arc<Connection>,
    /// Sending a message and queueing it for the collector happen under this lock, so that the collector's
    /// order is the broker's delivery-tag order.
    outbox: Mutex<mpsc::UnboundedSender<Entry>>,
    failed: AtomicBool,
}

impl Publisher {
    /// A publisher on `link`; its channel opens on the first publish.
    pub fn new(link: Link, confirm_timeout: Duration, metrics: Arc<Metrics>) -> Publisher {
        Publisher {
            inner: Arc::new(Inner {
                link,
                confirm_timeout,
                metrics,
                slot: Mutex::new(None),
            }),
        }
    }

    /// The link this publisher publishes on.
    pub fn link(&self) -> &Link {
        &self.inner.link
    }

    /// Publishes `msg` persistent, as JSON, with `message_id`, `timestamp` (now), `type`, `app_id` and headers,
    /// `mandatory`, and waits for its confirm. `Ok` only on a plain broker ack.
    ///
    /// Inside traced work (a handled message, a webhook; see `trace`) the message also carries `traceparent`,
    /// `tracestate` and `x-pb-linked-traceparent`, and the publish is a span with the messaging attributes.
    pub async fn publish(&self, msg: Outgoing<'_>) -> Result<(), PublishError> {
        let span = tracing::info_span!(
            "publish",
            otel.name = %format!("publish {}", msg.exchange),
            otel.kind = "producer",
            messaging.system = "rabbitmq",
            "messaging.operation.type" = "publish",
            messaging.destination.name = %msg.exchange,
            messaging.rabbitmq.destination.routing_key = %msg.routing_key,
            messaging.message.id = %msg.message_id,
        );
        let mut msg = msg;
        for (name, value) in crate::trace::outgoing_headers(&span) {
            if !msg.headers.iter().any(|(k, _)| k == name) {
                msg.headers
                    .push((name.to_string(), HeaderValue::Str(value)));
            }
        }
        self.publish_traced(msg).instrument(span).await
    }

    async fn publish_traced(&self, msg: Outgoing<'_>) -> Result<(), PublishError> {
        let properties = match outgoing_properties(&msg) {
            Ok(properties) => properties,
            Err(error) => {
                self.inner.metrics.publish_confirm(error.metric_label());
                return Err(error);
            }
        };
        self.publish_raw(msg.exchange, msg.routing_key, msg.body, properties)
            .await
    }

    /// Publishes `body` with the given properties (a copy of a delivery's, for dead-letters, retries and
    /// replays), with the same guarantees as [`Publisher::publish`].
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let result = self
            .send_and_confirm(exchange, routing_key, body, properties)
            .await;
        let label = match &result {
            Ok(()) => "ack",
            Err(error) => error.metric_label(),
        };
        self.inner.metrics.publish_confirm(label);
        if let Err(error) = &result {
            debug!(exchange, routing_key, %error, "publish not confirmed");
        }
        result
    }

    async fn send_and_confirm(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let exchange_name = short(exchange)?;
        let key = short(routing_key)?;
        let identity = Identity::new(
            exchange,
            routing_key,
            properties.message_id().as_ref().map(|id| id.as_str()),
            body,
        );
        let pub_channel = self.channel().await?;
        let (reply, confirmed) = oneshot::channel();
        {
            let outbox = pub_channel.outbox.lock().await;
            let channel = pub_channel.channel.clone();
            let body = body.to_vec();
            let mut sending: BoxFuture<'static, lapin::Result<Confirmation>> =
                Box::pin(async move {
                    let options = BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    };
                    channel
                        .basic_publish(exchange_name, key, options, &body, properties)
                        .await?
                        .await
                });
            // The first poll registers the delivery tag and queues the frames, synchronously: it must happen
            // under the outbox lock so that tag order and collector order agree.
            let stage = match futures_util::poll!(&mut sending) {
                Poll::Ready(result) => Stage::Done(Box::new(result)),
                Poll::Pending => Stage::Waiting(sending),
            };
            if outbox
                .send(Entry {
                    identity,
                    stage,
                    reply,
                })
                .is_err()
            {
                pub_channel.failed.store(true, Ordering::SeqCst);
                return Err(PublishError::Connection("publishing channel closed".into()));
            }
        }
        let result = match tokio::time::timeout(self.inner.confirm_timeout, confirmed).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PublishError::Connection("publishing channel closed".into())),
            Err(_) => Err(PublishError::Timeout),
        };
        if matches!(
            result,
            Err(PublishError::Timeout | PublishError::Connection(_))
        ) {
            // A channel that lost a confirm or failed cannot be trusted: the next publish opens a new one.
            pub_channel.failed.store(true, Ordering::SeqCst);
            if !pub_channel.connection.status().connected() {
                self.inner.link.invalidate_if(&pub_channel.connection).await;
            }
        }
        result
    }

    /// The open publishing channel, opening a new one (on the link's current connection) when needed.
    async fn channel(&self) -> Result<Arc<PubChannel>, PublishError> {
        let mut slot = self.inner.slot.lock().await;
        if let Some(current) = slot.as_ref() {
            if !current.failed.load(Ordering::SeqCst) && current.channel.status().connected() {
                return Ok(current.clone());
            }
            if let Some(old) = slot.take() {
                retire(old);
            }
        }
        let connection = self.inner.link.try_connection().await?;
        let limit = self.inner.confirm_timeout;
        let opened = async {
            let channel = super::timed(
                "opening the publishing channel",
                limit,
                connection.create_channel(),
            )
            .await?;
            super::timed(
                "confirm.select",
                limit,
                channel.confirm_select(ConfirmSelectOptions::default()),
            )
            .await?;
            Ok::<_, AmqpError>(channel)
        }
        .await;
        let channel = match opened {
            Ok(channel) => channel,
            Err(error) => {
                if error.is_connection_level() || !connection.status().connected() {
                    self.inner.link.invalidate_if(&connection).await;
                }
                return Err(error.into());
            }
        };
        let (outbox, queue) = mpsc::unbounded_channel();
        tokio::spawn(collect(channel.clone(), queue));
        let opened = Arc::new(PubChannel {
            channel,
            connection,
            outbox: Mutex::new(outbox),
            failed: AtomicBool::new(false),
        });
        *slot = Some(opened.clone());
        Ok(opened)
    }
}

/// Closes a replaced publishing channel: its pending confirms fail (their publishers have given up or will be
/// told "connection"), which ends its collector.
fn retire(old: Arc<PubChannel>) {
    if old.channel.status().connected() {
        let channel = old.channel.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                channel.close(200, "replaced".into()),
            )
            .await;
        });
    }
}

/// The AMQP properties of an [`Outgoing`] message.
fn outgoing_properties(msg: &Outgoing<'_>) -> Result<BasicProperties, PublishError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let headers = field_table(msg.headers.iter().map(|(k, v)| (k.as_str(), v)))?;
    Ok(BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(short(msg.message_id)?)
        .with_timestamp(now)
        .with_type(short(msg.kind)?)
        .with_app_id(APP_ID.into())
        .with_headers(headers))
}

/// What identifies a published message in a `basic.return`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    exchange: String,
    routing_key: String,
    fingerprint: u64,
}

impl Identity {
    fn new(exchange: &str, routing_key: &str, message_id: Option<&str>, body: &[u8]) -> Identity {
        let mut hasher = DefaultHasher::new();
        message_id.hash(&mut hasher);
        body.hash(&mut hasher);
        Identity {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            fingerprint: hasher.finish(),
        }
    }
}

/// One publish waiting for its confirm in the collector.
struct Entry {
    identity: Identity,
    stage: Stage,
    reply: oneshot::Sender<Result<(), PublishError>>,
}

enum Stage {
    Waiting(BoxFuture<'static, lapin::Result<Confirmation>>),
    Done(Box<lapin::Result<Confirmation>>),
}

impl Entry {
    async fn resolve(&mut self) {
        if let Stage::Waiting(sending) = &mut self.stage {
            let result = sending.await;
            self.stage = Stage::Done(Box::new(result));
        }
    }

    fn try_resolve(&mut self) -> bool {
        if let Stage::Waiting(sending) = &mut self.stage {
            match sending.now_or_never() {
                Some(result) => self.stage = Stage::Done(Box::new(result)),
                None => return false,
            }
        }
        true
    }

    fn confirmed(
        self,
    ) -> (
        Identity,
        Confirmed,
        oneshot::Sender<Result<(), PublishError>>,
    ) {
        let result = match self.stage {
            Stage::Waiting(_) => Err(None),
            Stage::Done(result) => (*result).map_err(Some),
        };
        let confirmed = match result {
            Err(None) => Confirmed::Failed("confirm not resolved".into()),
            Err(Some(error)) => Confirmed::Failed(error.to_string()),
            Ok(Confirmation::Ack(returned)) => Confirmed::Ack(returned.map(Returned::of)),
            Ok(Confirmation::Nack(returned)) => Confirmed::Nack(returned.map(Returned::of)),
            Ok(Confirmation::NotRequested) => {
                Confirmed::Failed("publisher confirms are not enabled on the channel".into())
            }
        };
        (self.identity, confirmed, self.reply)
    }
}

/// Reads the confirms of one channel in publish order and settles them in closed sets (see the module doc).
async fn collect(channel: Channel, mut queue: mpsc::UnboundedReceiver<Entry>) {
    let mut pending: VecDeque<Entry> = VecDeque::new();
    let mut unmatched: Vec<Returned> = Vec::new();
    loop {
        if pending.is_empty() {
            match queue.recv().await {
                Some(entry) => pending.push_back(entry),
                None => return,
            }
        }
        if let Some(oldest) = pending.front_mut() {
            oldest.resolve().await;
        }
        let mut settled = 1;
        for _ in 0..MAX_CLOSURE_ROUNDS {
            ack_frame_barrier(&channel);
            while let Ok(entry) = queue.try_recv() {
                pending.push_back(entry);
            }
            let before = settled;
            while settled < pending.len() && pending[settled].try_resolve() {
                settled += 1;
            }
            if settled == before {
                break;
            }
        }
        let batch: Vec<_> = pending.drain(..settled).map(Entry::confirmed).collect();
        let (items, replies): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|(identity, confirmed, reply)| ((identity, confirmed), reply))
            .unzip();
        for (reply, outcome) in replies.into_iter().zip(attribute(items, &mut unmatched)) {
            let _ = reply.send(outcome);
        }
    }
}

/// Waits until lapin has finished applying the ack or nack frame it may be applying now on `channel`.
///
/// lapin resolves every confirm covered by one `basic.ack` (and hands out waiting returned messages) while
/// holding the channel's acknowledgement lock; `wait_for_confirms` takes that lock on its first poll. It is
/// polled once and dropped, never awaited (it would wait for the newest publish).
fn ack_frame_barrier(channel: &Channel) {
    drop(channel.wait_for_confirms().now_or_never());
}

/// A returned message, reduced to what attribution needs.
#[derive(Debug, Clone)]
struct Returned {
    identity: Identity,
    reply_code: u16,
    reply_text: String,
}

impl Returned {
    fn of(message: lapin::message::BasicReturnMessage) -> Returned {
        let delivery = &message.delivery;
        Returned {
            identity: Identity::new(
                delivery.exchange.as_str(),
                delivery.routing_key.as_str(),
                delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str()),
                &delivery.data,
            ),
            reply_code: message.reply_code,
            reply_text: message.reply_text.to_string(),
        }
    }
}

/// One confirm as lapin reported it (the returned message possibly belonging to another publish of the set).
#[derive(Debug, Clone)]
enum Confirmed {
    Ack(Option<Returned>),
    Nack(Option<Returned>),
    Failed(String),
}

/// Settles a closed set of confirms: returned messages are matched to publishes by identity, whichever confirm
/// lapin attached them to. `unmatched` carries returns across sets: RabbitMQ sends a `basic.return` before the
/// ack covering its message, but that may be an earlier ack frame (`multiple`, for older messages) than the one
/// confirming the returned message, so a return can be seen one set before its publish is.
fn attribute(
    items: Vec<(Identity, Confirmed)>,
    unmatched: &mut Vec<Returned>,
) -> Vec<Result<(), PublishError>> {
    unmatched.extend(items.iter().filter_map(|(_, confirmed)| match confirmed {
        Confirmed::Ack(Some(r)) | Confirmed::Nack(Some(r)) => Some(r.clone()),
        _ => None,
    }));
    let mut take_return = |identity: &Identity| -> Option<Returned> {
        let position = unmatched.iter().position(|r| &r.identity == identity)?;
        Some(unmatched.remove(position))
    };
    let outcomes = items
        .iter()
        .map(|(identity, confirmed)| match confirmed {
            Confirmed::Failed(reason) => Err(PublishError::Connection(reason.clone())),
            Confirmed::Nack(_) => {
                let _ = take_return(identity);
                Err(PublishError::Nacked)
            }
            Confirmed::Ack(_) => match take_return(identity) {
                Some(r) => Err(PublishError::Returned {
                    reply_code: r.reply_code,
                    reply_text: r.reply_text,
                }),
                None => Ok(()),
            },
        })
        .collect();
    if unmatched.len() > MAX_UNMATCHED_RETURNS {
        let dropped = unmatched.len() - MAX_UNMATCHED_RETURNS;
        warn!(
            dropped,
            "returned messages that match no publish; forgetting the oldest"
        );
        unmatched.drain(..dropped);
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Identity {
        Identity::new("ex", "key", Some(&format!("m{n}")), b"{}")
    }

    fn ret(n: u8) -> Returned {
        Returned {
            identity: id(n),
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
        }
    }

    #[test]
    fn a_return_handed_to_the_wrong_confirm_fails_the_right_publish() {
        // lapin gave message 3's return to message 1's confirm.
        let outcomes = attribute(
            vec![
                (id(1), Confirmed::Ack(Some(ret(3)))),
                (id(2), Confirmed::Ack(None)),
                (id(3), Confirmed::Ack(None)),
            ],
            &mut Vec::new(),
        );
        assert_eq!(outcomes[0], Ok(()));
        assert_eq!(outcomes[1], Ok(()));
        assert!(matches!(
            outcomes[2],
            Err(PublishError::Returned {
                reply_code: 312,
                ..
            })
        ));
    }

    #[test]
    fn nacks_failures_and_plain_acks() {
        let outcomes = attribute(
            vec![
                (id(1), Confirmed::Nack(None)),
                (id(2), Confirmed::Failed("channel closed".into())),
                (id(3), Confirmed::Ack(Some(ret(3)))),
                (id(4), Confirmed::Ack(None)),
            ],
            &mut Vec::new(),
        );
        assert_eq!(outcomes[0], Err(PublishError::Nacked));
        assert!(matches!(outcomes[1], Err(PublishError::Connection(_))));
        assert!(matches!(outcomes[2], Err(PublishError::Returned { .. })));
        assert_eq!(outcomes[3], Ok(()));
    }

    #[test]
    fn a_return_seen_one_batch_early_fails_its_publish_in_the_next() {
        // ack(multiple, 2) took message 3's return; ack(3) came in the next frame.
        let mut unmatched = Vec::new();
        let first = attribute(
            vec![
                (id(1), Confirmed::Ack(None)),
                (id(2), Confirmed::Ack(Some(ret(3)))),
            ],
            &mut unmatched,
        );
        assert_eq!(first, [Ok(()), Ok(())]);
        assert_eq!(unmatched.len(), 1);
        let second = attribute(vec![(id(3), Confirmed::Ack(None))], &mut unmatched);
        assert!(matches!(second[0], Err(PublishError::Returned { .. })));
        assert!(unmatched.is_empty());
    }

    #[test]
    fn identities_differ_by_message_and_route() {
        assert_ne!(id(1), id(2));
        assert_ne!(
            Identity::new("ex", "a", None, b"x"),
            Identity::new("ex", "b", None, b"x")
        );
        assert_eq!(
            Identity::new("ex", "a", None, b"x"),
            Identity::new("ex", "a", None, b"x")
        );
    }

    #[test]
    fn outgoing_messages_carry_the_contract_properties() {
        let msg = Outgoing {
            exchange: "pb.tokens",
            routing_key: "token.a",
            body: b"{}",
            message_id: "m-1",
            kind: "share_token",
            headers: vec![("x-pb-key-id".into(), HeaderValue::Str("k1".into()))],
        };
        let p = outgoing_properties(&msg).unwrap();
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("m-1"));
        assert_eq!(p.kind().as_ref().map(|s| s.as_str()), Some("share_token"));
        assert_eq!(
            p.app_id().as_ref().map(|s| s.as_str()),
            Some("partner-bridge")
        );
        assert!(p.timestamp().is_some());
        assert!(p.headers().as_ref().unwrap().contains_key("x-pb-key-id"));
    }
}
