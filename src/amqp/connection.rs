//! [`Link`]: one supervised connection to one broker URL, shared by the consumers and the publisher of a role.
//!
//! The URL may list several nodes of one RabbitMQ cluster (`amqp://n1/…,amqp://n2/…`, which is what `amqp.urls`
//! becomes; see [`SecretUrl::addresses`]). The link then connects to one node at a time, starting with the first:
//! when its connection is lost, or an attempt fails, the next attempt goes to the next node (round-robin), with
//! the same backoff between failed attempts as for a single URL. A loss is followed by an immediate attempt on the
//! next node, so a stopped node costs one reconnect, not a backoff. Every connect and reconnect logs the node
//! (`node = i/n`, URL with the password masked), and the health part names it while it is down.
//!
//! The link holds at most one lapin [`Connection`] and hands out that connection while lapin reports it
//! `Connected`. Otherwise the next caller connects a new one; one attempt runs at a time and the others wait for
//! its result, and failed attempts are spaced by jittered exponential backoff (see the recovery model in
//! [`crate::amqp`]). The link owns the metric `amqp_connected{pipeline}`, the health part `amqp:<pipeline>` and
//! the counter `amqp_reconnects_total`; the broker URL only ever appears with its password masked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, Event};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{AmqpError, Backoff};
use crate::config::AmqpConfig;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::secret::SecretUrl;

/// The frame size asked for when the URL names none (`?frame_max=`): RabbitMQ's own default, so the negotiated
/// size is what it would be anyway. Asking up front matters for memory: lapin sizes its two I/O ring buffers (32
/// frames each) from the frame size it knows when the connection starts; knowing none, it starts them small and
/// grows both to 4 MiB after the handshake by writing zeros into every page — 8 MiB resident per idle
/// connection. Sized up front, the buffers are allocated zeroed and only pages that traffic touches count.
const DEFAULT_FRAME_MAX: u32 = 131_072;

/// How a link connects.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// AMQP heartbeat (a dead TCP connection is noticed after about twice this).
    pub heartbeat: Duration,
    /// Limit for one connection attempt (TCP, TLS and the AMQP handshake).
    pub connect_timeout: Duration,
    /// First delay between failed attempts.
    pub backoff_min: Duration,
    /// Largest delay between failed attempts.
    pub backoff_max: Duration,
    /// Shown in the RabbitMQ management UI (`connection_name` client property).
    pub connection_name: String,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions {
            heartbeat: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            connection_name: "partner-bridge".to_string(),
        }
    }
}

impl LinkOptions {
    /// Options from `[amqp]`, with `connection_name` shown to the broker's operators.
    pub fn from_config(amqp: &AmqpConfig, connection_name: impl Into<String>) -> LinkOptions {
        LinkOptions {
            heartbeat: Duration::from_secs(u64::from(amqp.heartbeat_s)),
            connection_name: connection_name.into(),
            ..LinkOptions::default()
        }
    }
}

/// One supervised connection to one broker. Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct Link {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// The whole setting (one URL or a list), for messages about the link as a whole.
    url: SecretUrl,
    /// The addresses to try, in order: one per cluster node (one for a plain URL).
    nodes: Vec<SecretUrl>,
    pipeline: &'static str,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    options: LinkOptions,
    state: Mutex<State>,
    closed: AtomicBool,
}

#[derive(Debug)]
struct State {
    current: Option<Current>,
    /// A connection was made before: the next one is a reconnection.
    had_connection: bool,
    backoff: Backoff,
    /// No new attempt before this instant (spacing failed attempts).
    next_attempt: Option<Instant>,
    last_error: Option<AmqpError>,
    /// The index in `nodes` of the address the current (or next) connection uses.
    node: usize,
}

#[derive(Debug)]
struct Current {
    connection: Arc<Connection>,
    /// Stops the event watcher of this connection when it is replaced or the link is dropped.
    watcher: CancellationToken,
}

impl Drop for Current {
    fn drop(&mut self) {
        self.watcher.cancel();
    }
}

impl Link {
    /// A link to `url` for `pipeline` (a [`crate::metrics::pipeline`] name). Nothing connects until
    /// [`Link::connection`] is called.
    pub fn new(
        url: SecretUrl,
        pipeline: &'static str,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        options: LinkOptions,
    ) -> Link {
        let backoff = Backoff::new(options.backoff_min, options.backoff_max);
        health.not_ready(
            &health_part(pipeline),
            format!("not yet connected to {}", url.redacted()),
        );
        metrics.amqp_connected(pipeline, false);
        let mut nodes = url.addresses();
        if nodes.is_empty() {
            nodes.push(url.clone());
        }
        Link {
            shared: Arc::new(Shared {
                nodes,
                url,
                pipeline,
                metrics,
                health,
                options,
                state: Mutex::new(State {
                    current: None,
                    had_connection: false,
                    backoff,
                    next_attempt: None,
                    last_error: None,
                    node: 0,
                }),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// The pipeline this link reports for.
    pub fn pipeline(&self) -> &'static str {
        self.shared.pipeline
    }

    /// The broker URL with its password masked (every node's, for a cluster list).
    pub fn redacted_url(&self) -> String {
        self.shared.url.redacted()
    }

    /// The address of the node the link is connected to (or will try next), with its password masked.
    pub async fn node_url(&self) -> String {
        let state = self.shared.state.lock().await;
        self.shared.nodes[state.node].redacted()
    }

    /// The current open connection, connecting (and reconnecting after failures, with jittered exponential
    /// backoff) until it succeeds. `Err` only when `shutdown` fires or the link was closed
    /// ([`AmqpError::Cancelled`]).
    pub async fn connection(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Arc<Connection>, AmqpError> {
        loop {
            let wait = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(AmqpError::Cancelled),
                attempt = self.attempt() => match attempt {
                    Ok(connection) => return Ok(connection),
                    Err(AmqpError::Cancelled) => return Err(AmqpError::Cancelled),
                    Err(_) => self.until_next_attempt().await,
                },
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(AmqpError::Cancelled),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The current open connection, or at most one connection attempt if there is none and the backoff allows
    /// one now; otherwise the last connection error at once. For callers that must not wait through a reconnect
    /// loop (a publish whose caller answers 503 or nacks).
    pub async fn try_connection(&self) -> Result<Arc<Connection>, AmqpError> {
        self.attempt().await
    }

    /// A user of the current connection saw it fail: close it, so that the next [`Link::connection`] reconnects.
    pub fn invalidate(&self) {
        let link = self.clone();
        tokio::spawn(async move {
            let mut state = link.shared.state.lock().await;
            if let Some(current) = state.current.take() {
                link.lost(&mut state, "invalidated after an error on it".to_string());
                retire(current);
            }
        });
    }

    /// Like [`Link::invalidate`], but only if `connection` is still the current one: a failure seen on an older
    /// connection must not tear down the one another user has just made.
    pub async fn invalidate_if(&self, connection: &Arc<Connection>) {
        let mut state = self.shared.state.lock().await;
        let is_current = state
            .current
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(&current.connection, connection));
        if is_current && let Some(current) = state.current.take() {
            self.lost(&mut state, "invalidated after an error on it".to_string());
            retire(current);
        }
    }

    /// Graceful close at shutdown: closes the connection (unacked deliveries return to their queues) and refuses
    /// to connect again.
    pub async fn close(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        let mut state = self.shared.state.lock().await;
        if let Some(current) = state.current.take() {
            current.watcher.cancel();
            if current.connection.status().connected() {
                let closing = current
                    .connection
                    .close(200, "partner-bridge shutting down".into());
                if tokio::time::timeout(Duration::from_secs(5), closing)
                    .await
                    .is_err()
                {
                    warn!(
                        pipeline = self.shared.pipeline,
                        "broker connection did not close within 5 s"
                    );
                }
            }
        }
        self.shared
            .metrics
            .amqp_connected(self.shared.pipeline, false);
        self.shared.health.not_ready(
            &health_part(self.shared.pipeline),
            "connection closed (shutting down)",
        );
    }

    /// One step: the live connection, or one attempt when allowed, or the last error.
    async fn attempt(&self) -> Result<Arc<Connection>, AmqpError> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(AmqpError::Cancelled);
        }
        let mut state = self.shared.state.lock().await;
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(AmqpError::Cancelled);
        }
        if let Some(current) = &state.current {
            if current.connection.status().connected() {
                return Ok(current.connection.clone());
            }
            let status = current.connection.status().state_debug();
            if let Some(current) = state.current.take() {
                self.lost(&mut state, format!("connection {status}"));
                retire(current);
            }
        }
        if let Some(at) = state.next_attempt
            && Instant::now() < at
        {
            return Err(state.last_error.clone().unwrap_or_else(|| {
                self.connect_error(&self.shared.nodes[state.node], "waiting to reconnect")
            }));
        }
        let node = state.node;
        let url = &self.shared.nodes[node];
        let of = self.shared.nodes.len();
        let at = format!("{}/{of}", node + 1);
        match self.connect(url).await {
            Ok(connection) => {
                let connection = Arc::new(connection);
                let watcher = CancellationToken::new();
                self.watch(&connection, watcher.clone());
                state.current = Some(Current {
                    connection: connection.clone(),
                    watcher,
                });
                state.backoff.reset();
                state.next_attempt = None;
                state.last_error = None;
                if state.had_connection {
                    self.shared.metrics.amqp_reconnect();
                    info!(pipeline = self.shared.pipeline, node = %at, %url, "reconnected to the broker");
                } else {
                    info!(pipeline = self.shared.pipeline, node = %at, %url, "connected to the broker");
                }
                state.had_connection = true;
                self.shared
                    .metrics
                    .amqp_connected(self.shared.pipeline, true);
                self.shared.health.ready(&health_part(self.shared.pipeline));
                Ok(connection)
            }
            Err(error) => {
                let delay = state.backoff.next_delay();
                state.next_attempt = Some(Instant::now() + delay);
                state.last_error = Some(error.clone());
                // The next attempt goes to the next node of a cluster list.
                state.node = (node + 1) % of;
                warn!(pipeline = self.shared.pipeline, node = %at, %error, retry_in_ms = delay.as_millis() as u64, "cannot connect to the broker");
                self.shared
                    .metrics
                    .amqp_connected(self.shared.pipeline, false);
                self.shared
                    .health
                    .not_ready(&health_part(self.shared.pipeline), error.to_string());
                Err(error)
            }
        }
    }

    async fn until_next_attempt(&self) -> Duration {
        let state = self.shared.state.lock().await;
        state
            .next_attempt
            .map(|at| at.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    fn connect_error(&self, url: &SecretUrl, reason: &str) -> AmqpError {
        AmqpError::Connect {
            url: url.redacted(),
            reason: reason.to_string(),
        }
    }

    async fn connect(&self, url: &SecretUrl) -> Result<Connection, AmqpError> {
        let options = &self.shared.options;
        let mut uri: AMQPUri = url.expose().parse().map_err(|e: String| {
            self.connect_error(url, &format!("invalid URL: {}", self.scrub(&e)))
        })?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(options.heartbeat.as_secs().min(u64::from(u16::MAX)) as u16);
        }
        if uri.query.frame_max.is_none() {
            uri.query.frame_max = Some(DEFAULT_FRAME_MAX);
        }
        if uri.query.connection_timeout.is_none() {
            uri.query.connection_timeout = Some(options.connect_timeout.as_millis() as u64);
        }
        let properties = ConnectionProperties::default()
            .with_connection_name(options.connection_name.clone().into())
            .with_client_property("product".into(), "partner-bridge".into())
            .with_client_property("version".into(), env!("CARGO_PKG_VERSION").into());
        debug!(pipeline = self.shared.pipeline, %url, "connecting to the broker");
        match tokio::time::timeout(
            options.connect_timeout,
            Connection::connect_uri(uri, properties),
        )
        .await
        {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(error)) => Err(self.connect_error(url, &self.scrub(&error.to_string()))),
            Err(_) => Err(self.connect_error(
                url,
                &format!("no answer within {:?}", options.connect_timeout),
            )),
        }
    }

    /// Removes the nodes' passwords from a message, should a library ever echo one.
    fn scrub(&self, text: &str) -> String {
        let mut text = text.to_string();
        for node in &self.shared.nodes {
            let password = node
                .expose()
                .parse::<AMQPUri>()
                .map(|uri| uri.authority.userinfo.password)
                .unwrap_or_default();
            if password.len() >= 3 {
                text = text.replace(&password, "***");
            }
        }
        text
    }

    /// Marks the link down (the caller holds the state lock and has taken the connection out).
    /// With a cluster list the next attempt goes to the next node: the one we were on may be the one that left.
    fn lost(&self, state: &mut State, why: String) {
        state.next_attempt = None;
        let node = &self.shared.nodes[state.node];
        let of = self.shared.nodes.len();
        let at = format!("{}/{of}", state.node + 1);
        state.node = (state.node + 1) % of;
        self.shared
            .metrics
            .amqp_connected(self.shared.pipeline, false);
        let next = if of > 1 {
            format!(
                "; reconnecting to {}",
                self.shared.nodes[state.node].redacted()
            )
        } else {
            "; reconnecting".to_string()
        };
        self.shared.health.not_ready(
            &health_part(self.shared.pipeline),
            format!("connection to {} lost ({why}){next}", node.redacted()),
        );
        warn!(pipeline = self.shared.pipeline, node = %at, url = %node, reason = %why, "broker connection lost");
    }

    /// Flips metrics and health as soon as lapin reports the connection failed, even if nobody is using it.
    fn watch(&self, connection: &Arc<Connection>, stop: CancellationToken) {
        let mut events = Box::pin(connection.events_listener());
        // Weak references only: the watcher must not keep the link or the connection alive.
        let shared = Arc::downgrade(&self.shared);
        let weak = Arc::downgrade(connection);
        let pipeline = self.shared.pipeline;
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => return,
                    event = events.next() => event,
                };
                match event {
                    None => return,
                    Some(Event::Error(error)) => {
                        let Some(connection) = weak.upgrade() else {
                            return;
                        };
                        // lapin also reports channel errors here (a channel the broker closed): only a
                        // connection that is no longer connected is lost.
                        if connection.status().connected() {
                            continue;
                        }
                        let Some(shared) = shared.upgrade() else {
                            return;
                        };
                        let link = Link { shared };
                        let mut state = link.shared.state.lock().await;
                        let is_current = state
                            .current
                            .as_ref()
                            .is_some_and(|current| Arc::ptr_eq(&current.connection, &connection));
                        if is_current && let Some(current) = state.current.take() {
                            link.lost(&mut state, link.scrub(&error.to_string()));
                            retire(current);
                        }
                        return;
                    }
                    Some(Event::ConnectionBlocked(reason)) => {
                        warn!(pipeline, %reason, "broker blocked publishing (resource alarm)");
                    }
                    Some(Event::ConnectionUnblocked) => {
                        info!(pipeline, "broker unblocked publishing");
                    }
                    Some(_) => {}
                }
            }
        });
    }
}

/// Lets go of a connection that is no longer current: stops its watcher and closes it if it still looks open,
/// so that channels and consumers on it end (their deliveries go back to the queue) instead of lingering.
fn retire(current: Current) {
    current.watcher.cancel();
    let connection = current.connection.clone();
    drop(current);
    if connection.status().connected() {
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                connection.close(200, "replaced by a new connection".into()),
            )
            .await;
        });
    }
}

fn health_part(pipeline: &str) -> String {
    format!("amqp:{pipeline}")
}

/// A compact name for a lapin connection state, for log lines.
trait StateDebug {
    fn state_debug(&self) -> &'static str;
}

impl StateDebug for lapin::ConnectionStatus {
    fn state_debug(&self) -> &'static str {
        if self.connected() {
            "connected"
        } else if self.connecting() {
            "connecting"
        } else if self.closing() {
            "closing"
        } else if self.closed() {
            "closed"
        } else if self.errored() {
            "failed"
        } else if self.reconnecting() {
            "reconnecting"
        } else {
            "not started"
        }
    }
}
