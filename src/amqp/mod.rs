//! The AMQP layer: names, topology, one supervised connection per broker, a confirming publisher and supervised
//! consumers. It knows RabbitMQ and lapin; it knows nothing of Didit and decides nothing about messages (handlers
//! in `issuer/` and `receiver/` return a [`consumer::Decision`], this layer carries it out).
//!
//! # The connection model
//!
//! **Our supervisor is authoritative; lapin's automatic recovery is deliberately left off.** lapin 4 can recover a
//! connection by itself (`ConnectionProperties::enable_auto_recover`) and replay channels, QoS, confirm mode,
//! declarations and consumers on the *same* `Connection` object. We need a supervisor anyway (the broker cancels
//! consumers when a queue is deleted or a node restarts, and that is not a connection failure lapin recovers from),
//! and the two would fight:
//! - dropping a `Channel` or `Consumer` while lapin is reconnecting does not close it (`ChannelCloser` and
//!   `ConsumerCanceler` only act while the channel is `Connected`), so a channel our supervisor abandoned would
//!   be replayed by lapin with its consumer: a zombie subscription that takes up to `prefetch` deliveries nobody
//!   reads, holds them unacked until the connection dies, and pushes their quorum-queue delivery count towards
//!   `x-delivery-limit`;
//! - a replay step that fails (a queue deleted meanwhile, a changed argument) turns into a connection error in
//!   lapin's internal RPC loop and the recovery starts over, with no way for us to see why;
//! - a `Connection` that is `Reconnecting` cannot be closed (`Connection::close` needs `Connected`), so a
//!   supervisor that gives up on it leaks an I/O thread that keeps reconnecting.
//!
//! So a lapin `Connection` here lives exactly as long as its TCP connection. Everything after a loss is rebuilt by
//! us, always in the same order, which is the whole recovery model:
//!
//! 1. [`connection::Link`] owns at most one open connection to one broker URL. [`connection::Link::connection`]
//!    returns it while lapin reports it `Connected`; otherwise it connects a new one, retrying with jittered
//!    exponential backoff (100 ms → 10 s by default) until it succeeds or the caller's shutdown token fires. Only
//!    one attempt runs at a time; other callers wait for its result. It keeps `amqp_connected{pipeline}` and the
//!    health part `amqp:<pipeline>` current (a watcher on lapin's event stream flips them as soon as the
//!    connection errors) and counts `amqp_reconnects_total` for every connection made after a loss.
//! 2. Every user opens its **own channel** on that connection: one per consumer, one per [`publisher::Publisher`].
//!    Channels are never shared, so a channel error (a publish to a missing exchange, a precondition failure)
//!    kills one user's channel and nobody else's.
//! 3. A consumer ([`consumer::run_consumer`]) on every (re)start: takes the link's connection, opens its channel,
//!    sets `basic_qos(prefetch)`, re-declares its topology plan, subscribes. A consumer stream that ends (the
//!    broker cancelled us), an `Err` delivery, a failed setup step or a failed republish ends that session: health
//!    part `consumer:<queue>` turns not ready, and after a jittered backoff it starts over from step 1. When the
//!    failure was the connection's (lapin no longer reports it connected, or an operation timed out on it), the
//!    consumer invalidates *that* connection ([`connection::Link::invalidate_if`]); an invalidation that names an
//!    older connection is ignored, so one consumer's failure never tears down the connection another consumer
//!    just rebuilt.
//! 4. The publisher opens its confirm-mode channel lazily and drops it after any channel or connection error or a
//!    confirm timeout; the next publish opens a new one. A publish never waits through a reconnect loop: if the
//!    broker is unreachable it fails at once (a webhook must answer 503, a consumer must nack), and the link makes
//!    at most one connection attempt per backoff interval.
//!
//! Deliveries taken on a channel that died are not acked anymore (lapin poisons their ackers): the broker
//! redelivers them, and the ledger absorbs the duplicate. An ack that fails is logged, never retried on another
//! channel (delivery tags belong to their channel). A broker `connection.blocked` (resource alarm) is not a
//! failure: publishes simply wait for their confirm, and time out if the alarm outlasts `confirm_timeout`.
//!
//! # Publishing
//!
//! Every publish is `mandatory` on a channel in confirm mode; only a plain broker ack is success. A nack, a
//! `basic.return` (unroutable), a confirm timeout or a channel error is a failure the caller must handle (nack the
//! source message with requeue, answer 503). See [`publisher`] for how returns are attributed correctly when the
//! broker acks many publishes at once.
//!
//! # Where to read next
//! - [`topology`]: the queues and exchanges of DESIGN.md §3, as a plan that can be printed and declared;
//! - [`connection`]: the supervised link;
//! - [`publisher`]: confirms, returns, timeouts;
//! - [`consumer`]: decisions, retries, dead-letters, pauses, bounded concurrency, shutdown;
//! - [`dead_letters`]: listing and replaying `.dead` queues for the CLI.

pub mod connection;
pub mod consumer;
pub mod dead_letters;
pub mod publisher;
pub mod topology;

use std::fmt;
use std::time::Duration;

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

pub use connection::{Link, LinkOptions};
pub use consumer::{
    ConsumerSpec, DeadLetterCopy, Decision, Handler, Incoming, PauseControl, run_consumer,
};
pub use publisher::{Outgoing, PublishError, Publisher};
pub use topology::{Entity, QueueSettings, declare, queue_depth};

/// Every exchange and queue name of DESIGN.md §3, derived from the configured prefix (`amqp.prefix`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// Names under `prefix` (`partner-bridge` by default).
    pub fn new(prefix: &str) -> Names {
        Names {
            prefix: prefix.to_string(),
        }
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `{p}.onboarding`: topic exchange for `onboarding.finished` events.
    pub fn onboarding_exchange(&self) -> String {
        format!("{}.onboarding", self.prefix)
    }

    /// `{p}.issuer.onboarding`: the issuer's intake queue (quorum), bound with `onboarding.finished`.
    pub fn issuer_onboarding_queue(&self) -> String {
        format!("{}.issuer.onboarding", self.prefix)
    }

    /// `{p}.tokens`: topic exchange for share tokens, keys `token.<application id>`.
    pub fn tokens_exchange(&self) -> String {
        format!("{}.tokens", self.prefix)
    }

    /// `{p}.receiver.tokens`: the receiver's token queue (quorum), bound with `token.<own application id>`.
    pub fn receiver_tokens_queue(&self) -> String {
        format!("{}.receiver.tokens", self.prefix)
    }

    /// `{p}.reshare`: topic exchange for reshare requests, keys `reshare.<issuer application id>`.
    pub fn reshare_exchange(&self) -> String {
        format!("{}.reshare", self.prefix)
    }

    /// `{p}.issuer.reshare`: the issuer's reshare queue (quorum), bound with `reshare.<own application id>`.
    pub fn issuer_reshare_queue(&self) -> String {
        format!("{}.issuer.reshare", self.prefix)
    }

    /// `{p}.issuer.notices`: the issuer's queue of `subject.notice.requested` (quorum), bound to the onboarding
    /// exchange with `subject.notice.requested`.
    pub fn issuer_notices_queue(&self) -> String {
        format!("{}.issuer.notices", self.prefix)
    }

    /// `{p}.issuer.notice-acks`: the issuer's queue of `subject.notice.ack` (quorum), bound to the reshare exchange
    /// with `notice-ack.<own application id>`.
    pub fn issuer_notice_acks_queue(&self) -> String {
        format!("{}.issuer.notice-acks", self.prefix)
    }

    /// `{p}.receiver.notices`: the receiver's queue of `subject.notice` (quorum), bound to the tokens exchange with
    /// `notice.<own application id>`.
    pub fn receiver_notices_queue(&self) -> String {
        format!("{}.receiver.notices", self.prefix)
    }

    /// `{p}.imports`: topic exchange for `import.result` outcomes, keys `import.<outcome>`.
    pub fn imports_exchange(&self) -> String {
        format!("{}.imports", self.prefix)
    }

    /// `{p}.dead-letter`: direct exchange; the routing key is the name of the queue a message left.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead-letter", self.prefix)
    }

    /// `<queue>.dead`: where messages leaving `queue` for good wait for an operator.
    pub fn dead_queue(queue: &str) -> String {
        format!("{queue}.dead")
    }

    /// `<queue>.retry`: where messages wait `amqp.retry_delay_ms` before returning to `queue`.
    pub fn retry_queue(queue: &str) -> String {
        format!("{queue}.retry")
    }

    /// `token.<id>`: routing key of a share token for application `id`.
    pub fn token_key(application_id: &str) -> String {
        format!("token.{application_id}")
    }

    /// `reshare.<id>`: routing key of a reshare request to issuer application `id`.
    pub fn reshare_key(application_id: &str) -> String {
        format!("reshare.{application_id}")
    }

    /// `notice.<id>`: routing key of a `subject.notice` for recipient application `id` (tokens exchange).
    pub fn notice_key(application_id: &str) -> String {
        format!("notice.{application_id}")
    }

    /// `notice-ack.<id>`: routing key of a `subject.notice.ack` to issuer application `id` (reshare exchange).
    pub fn notice_ack_key(application_id: &str) -> String {
        format!("notice-ack.{application_id}")
    }

    /// `notice.<kind>`: routing key of a notice passed on to the receiver's backend (imports exchange).
    pub fn backend_notice_key(kind: &str) -> String {
        format!("notice.{kind}")
    }

    /// `import.<outcome>`: routing key of an import result.
    pub fn import_key(outcome: &str) -> String {
        format!("import.{outcome}")
    }
}

/// The value of one of our headers (`x-pb-*`) or a queue argument, without lapin's types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    /// A string (AMQP long string).
    Str(String),
    /// An integer (AMQP long-long int).
    Int(i64),
}

impl HeaderValue {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::Str(s) => Some(s),
            HeaderValue::Int(_) => None,
        }
    }

    /// The integer, if this is one or a string holding one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            HeaderValue::Int(i) => Some(*i),
            HeaderValue::Str(s) => s.trim().parse().ok(),
        }
    }

    /// Converts an AMQP value; `None` for kinds we do not carry (tables, arrays, floats, booleans…).
    pub(crate) fn from_amqp(value: &AMQPValue) -> Option<HeaderValue> {
        Some(match value {
            AMQPValue::LongString(s) => {
                HeaderValue::Str(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            AMQPValue::ShortString(s) => HeaderValue::Str(s.as_str().to_string()),
            AMQPValue::ShortShortInt(i) => HeaderValue::Int(i64::from(*i)),
            AMQPValue::ShortShortUInt(i) => HeaderValue::Int(i64::from(*i)),
            AMQPValue::ShortInt(i) => HeaderValue::Int(i64::from(*i)),
            AMQPValue::ShortUInt(i) => HeaderValue::Int(i64::from(*i)),
            AMQPValue::LongInt(i) => HeaderValue::Int(i64::from(*i)),
            AMQPValue::LongUInt(i) => HeaderValue::Int(i64::from(*i)),
            AMQPValue::LongLongInt(i) => HeaderValue::Int(*i),
            AMQPValue::Timestamp(t) => HeaderValue::Int(i64::try_from(*t).ok()?),
            _ => return None,
        })
    }

    /// The AMQP value written on the wire.
    pub(crate) fn to_amqp(&self) -> AMQPValue {
        match self {
            HeaderValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
            HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
        }
    }
}

impl fmt::Display for HeaderValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderValue::Str(s) => write!(f, "{s:?}"),
            HeaderValue::Int(i) => write!(f, "{i}"),
        }
    }
}

impl From<&str> for HeaderValue {
    fn from(value: &str) -> Self {
        HeaderValue::Str(value.to_string())
    }
}

impl From<String> for HeaderValue {
    fn from(value: String) -> Self {
        HeaderValue::Str(value)
    }
}

impl From<i64> for HeaderValue {
    fn from(value: i64) -> Self {
        HeaderValue::Int(value)
    }
}

/// Builds a lapin field table from our pairs (later pairs win).
pub(crate) fn field_table<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a HeaderValue)>,
) -> Result<FieldTable, AmqpError> {
    let mut table = FieldTable::default();
    for (key, value) in pairs {
        table.insert(short(key)?, value.to_amqp());
    }
    Ok(table)
}

/// A lapin short string, refusing (instead of panicking on) names longer than AMQP allows.
pub(crate) fn short(s: &str) -> Result<ShortString, AmqpError> {
    ShortString::try_new(s).map_err(|_| AmqpError::InvalidName(s.chars().take(64).collect()))
}

/// What went wrong talking to the broker (outside publishing, see [`PublishError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmqpError {
    /// Shutdown was requested (or the link was closed) while waiting.
    #[error("shutting down")]
    Cancelled,
    /// The broker could not be reached or refused the connection.
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The broker URL with its password masked.
        url: String,
        /// Why, as lapin or the OS said it.
        reason: String,
    },
    /// The connection failed under an operation (I/O error, missed heartbeats, connection closed by the broker).
    #[error("broker connection lost during {operation}: {reason}")]
    ConnectionLost {
        /// What we were doing.
        operation: String,
        /// Why.
        reason: String,
    },
    /// The broker closed the channel or refused an operation on it (access refused, resource locked…).
    #[error("broker refused {operation}: {reason}")]
    Channel {
        /// What we were doing.
        operation: String,
        /// The broker's reply.
        reason: String,
    },
    /// The broker refused an operation whose precondition does not hold (`PRECONDITION_FAILED`).
    #[error("broker refused {operation}: {reason}")]
    Precondition {
        /// What we were doing.
        operation: String,
        /// The broker's reply.
        reason: String,
    },
    /// A queue or exchange that must exist does not.
    #[error("{what} does not exist on the broker ({reason})")]
    NotFound {
        /// The entity.
        what: String,
        /// The broker's reply.
        reason: String,
    },
    /// An existing queue or exchange was declared with other arguments than the configuration asks for.
    #[error(
        "{entity} already exists on the broker with different settings ({reason}). RabbitMQ cannot change the \
         arguments of an existing queue or exchange: either set amqp.delivery_limit / amqp.retry_delay_ms back to \
         the values it was created with, or drain it and delete it (with its .retry and .dead queues) so it is \
         recreated; `partner-bridge topology show` prints what this configuration expects"
    )]
    TopologyMismatch {
        /// The entity, e.g. `queue partner-bridge.issuer.onboarding`.
        entity: String,
        /// The broker's reply (`PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' …`).
        reason: String,
    },
    /// An operation did not complete in time (the connection is presumed wedged).
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What we were doing.
        operation: String,
        /// How long we waited.
        after: Duration,
    },
    /// A name longer than AMQP's 255 bytes (check `amqp.prefix`).
    #[error("name too long for AMQP (255 bytes at most): {0}…")]
    InvalidName(String),
}

impl AmqpError {
    /// Whether the connection itself is suspect, so the link should be rebuilt rather than only the channel.
    pub fn is_connection_level(&self) -> bool {
        matches!(
            self,
            AmqpError::Connect { .. }
                | AmqpError::ConnectionLost { .. }
                | AmqpError::Timeout { .. }
        )
    }

    /// Classifies a lapin error raised while doing `operation`.
    pub(crate) fn from_lapin(operation: impl Into<String>, error: &lapin::Error) -> AmqpError {
        let operation = operation.into();
        let reason = error.to_string();
        match error.kind() {
            lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
                AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND) => AmqpError::NotFound {
                    what: operation,
                    reason,
                },
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) => {
                    AmqpError::Precondition { operation, reason }
                }
                AMQPErrorKind::Soft(_) => AmqpError::Channel { operation, reason },
                AMQPErrorKind::Hard(_) => AmqpError::ConnectionLost { operation, reason },
            },
            lapin::ErrorKind::InvalidChannelState(..) | lapin::ErrorKind::InvalidChannel(_) => {
                AmqpError::Channel { operation, reason }
            }
            _ => AmqpError::ConnectionLost { operation, reason },
        }
    }
}

/// Runs a broker operation with a time limit, classifying its error.
pub(crate) async fn timed<T>(
    operation: &str,
    limit: Duration,
    fut: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, AmqpError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(AmqpError::from_lapin(operation, &error)),
        Err(_) => Err(AmqpError::Timeout {
            operation: operation.to_string(),
            after: limit,
        }),
    }
}

/// Jittered exponential backoff: each delay is drawn from [d/2, d] where d doubles from `min` up to `max`.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            current: min,
        }
    }

    /// The next delay to wait.
    pub(crate) fn next_delay(&mut self) -> Duration {
        use rand::Rng;
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = ceiling / 2;
        let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
        half + Duration::from_millis(jitter)
    }

    /// Back to the shortest delay (after a success).
    pub(crate) fn reset(&mut self) {
        self.current = self.min;
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_design_table() {
        let n = Names::new("pb");
        assert_eq!(n.onboarding_exchange(), "pb.onboarding");
        assert_eq!(n.issuer_onboarding_queue(), "pb.issuer.onboarding");
        assert_eq!(n.tokens_exchange(), "pb.tokens");
        assert_eq!(n.receiver_tokens_queue(), "pb.receiver.tokens");
        assert_eq!(n.reshare_exchange(), "pb.reshare");
        assert_eq!(n.issuer_reshare_queue(), "pb.issuer.reshare");
        assert_eq!(n.imports_exchange(), "pb.imports");
        assert_eq!(n.dead_letter_exchange(), "pb.dead-letter");
        assert_eq!(
            Names::dead_queue("pb.receiver.tokens"),
            "pb.receiver.tokens.dead"
        );
        assert_eq!(
            Names::retry_queue("pb.receiver.tokens"),
            "pb.receiver.tokens.retry"
        );
        assert_eq!(Names::token_key("app-1"), "token.app-1");
        assert_eq!(Names::reshare_key("app-2"), "reshare.app-2");
        assert_eq!(Names::import_key("imported"), "import.imported");
        assert_eq!(
            Names::new("partner-bridge").issuer_onboarding_queue(),
            "partner-bridge.issuer.onboarding"
        );
    }

    #[test]
    fn header_values_round_trip_through_amqp() {
        for v in [HeaderValue::Str("x".into()), HeaderValue::Int(-3)] {
            assert_eq!(HeaderValue::from_amqp(&v.to_amqp()), Some(v));
        }
        assert_eq!(
            HeaderValue::from_amqp(&AMQPValue::LongInt(7)),
            Some(HeaderValue::Int(7))
        );
        assert_eq!(HeaderValue::from_amqp(&AMQPValue::Boolean(true)), None);
        assert_eq!(HeaderValue::Str(" 4 ".into()).as_int(), Some(4));
    }

    #[test]
    fn backoff_grows_with_jitter_and_stays_bounded() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_millis(1000),
                "{d:?}"
            );
        }
        let late = b.next_delay();
        assert!(late >= Duration::from_millis(500), "{late:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn truncation_respects_characters() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("ééé", 3), "é…");
    }

    #[test]
    fn overlong_names_are_errors_not_panics() {
        assert!(short(&"x".repeat(300)).is_err());
        assert!(short("pb.q").is_ok());
    }
}
