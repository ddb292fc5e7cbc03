//! Wiring and lifecycle: builds every part from a validated [`Config`], runs it, and shuts it down in order.
//!
//! Start: metrics and health first, then the admin server (so `/livez` answers and `/readyz` explains what is not
//! ready yet), the ledger, then per role the Didit client, broker links, publishers and consumers. Nothing blocks on
//! the broker: a link connects in the background and readiness says so until it does.
//!
//! Shutdown (SIGTERM/SIGINT cancels the token): `/readyz` turns 503 at once; consumers stop taking deliveries and
//! drain in-flight work within `shutdown.grace_s` (what is left goes back to the broker, unacked); the webhook
//! listener stops accepting and finishes its requests; every broker connection is closed; the admin server stops
//! last, so the scrape that sees the drain still works. One deadline, `shutdown.grace_s` + [`DRAIN_MARGIN`] from
//! the signal, bounds all of it, whatever the broker does (see [`Running::wait`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::AdminServer;
use crate::amqp::consumer::{ConsumerSpec, DeadLetterAudit, PauseControl, run_consumer};
use crate::amqp::publisher::Publisher;
use crate::amqp::topology::{self, Entity, QueueSettings};
use crate::amqp::{HeaderValue, Link, LinkOptions, Names};
use crate::audit::{AuditLog, Side};
use crate::config::{AuditConfig, Config, next_webhook_secret_source};
use crate::didit::client::DiditClient;
use crate::didit::pacing::Pacing;
use crate::health::Health;
use crate::issuer::mint::Minter;
use crate::issuer::notices::{NoticeAckHandler, NoticeRequestHandler, Notifier, run_retries};
use crate::issuer::onboarding::OnboardingHandler;
use crate::issuer::reshare::{ReshareHandler, ResharePartner};
use crate::issuer::webhook::{self, WebhookState};
use crate::keys::{PublicKeys, SigningKeys};
use crate::ledger::Ledger;
use crate::metrics::{Metrics, pipeline};
use crate::receiver::notices::NoticeHandler;
use crate::receiver::tokens::{Peer, TokenHandler};
use crate::secret::SecretUrl;

/// How often the ledger is checked for writability (readiness) and pruned.
const LEDGER_CHECK_EVERY: Duration = Duration::from_secs(2);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// How often the token publisher's idle link is checked for a lost connection.
/// The health part that keeps `/readyz` at 503 until `start` has created every part that gates readiness.
/// The readiness part held while [`start`] is still building the parts.
const CONNECTION_CHECK_EVERY: Duration = Duration::from_millis(250);
const STARTUP_PART: &str = "startup";
/// The drain ends at most this long after `shutdown.grace_s`: the whole shutdown (consumers cancelled and drained,
/// the webhook listener, every broker connection closed, the admin server) fits in `grace_s` + this margin, so a
/// `terminationGracePeriodSeconds` of `grace_s` + 10 s is never overrun, even by a broker that stopped answering.
pub const DRAIN_MARGIN: Duration = Duration::from_secs(5);

/// A running bridge.
pub struct Running {
    /// The exclusive lock on `state_dir`, held until the process ends (see [`lock_state_dir`]).
    _state_lock: std::fs::File,
    admin_addr: SocketAddr,
    webhook_addr: Option<SocketAddr>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    links: Vec<Link>,
    admin_stop: CancellationToken,
    admin_task: JoinHandle<std::io::Result<()>>,
    grace: Duration,
    audit: AuditLog,
}

impl Running {
    /// Where `/metrics`, `/livez` and `/readyz` are served.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Where `POST /webhooks/didit` is served, when the webhook intake is configured.
    pub fn webhook_addr(&self) -> Option<SocketAddr> {
        self.webhook_addr
    }

    /// The process's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The process's readiness.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Cancelling this token starts the shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits for the shutdown token, then shuts down in order (see the module doc), all of it within
    /// `shutdown.grace_s` + [`DRAIN_MARGIN`].
    pub async fn wait(self) -> anyhow::Result<()> {
        self.shutdown.cancelled().await;
        let deadline = tokio::time::Instant::now() + self.grace + DRAIN_MARGIN;
        self.health.set_draining();
        tracing::info!(grace_s = self.grace.as_secs(), "draining");
        self.tasks.close();
        // Consumers bound their own drain by the grace; the margin covers a webhook request finishing its confirm
        // and the connection closes below.
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "some tasks did not finish within the grace period; their messages return to the broker"
            );
        }
        // Every handler has recorded its acts by now: sign the head so the whole run is covered.
        match self.audit.checkpoint(crate::audit::kinds::SHUTDOWN).await {
            Ok(Some(c)) => {
                self.metrics.audit_checkpoint(crate::audit::kinds::SHUTDOWN);
                tracing::info!(seq = c.seq, "audit checkpoint written on shutdown");
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "audit checkpoint not written on shutdown"),
        }
        // Every link closes at once, under the same deadline (each also bounds its own close): a broker that stopped
        // answering costs the margin once, not once per link. What is not closed by then is dropped with the
        // process, and the broker returns its unacked deliveries to their queues.
        let closing = futures_util::future::join_all(self.links.iter().map(Link::close));
        if tokio::time::timeout_at(deadline, closing).await.is_err() {
            tracing::warn!("broker connections not closed within the drain deadline; leaving them");
        }
        self.admin_stop.cancel();
        // The admin server stops last but does not get to stretch the deadline either (a slow scrape).
        let admin_deadline = deadline.max(tokio::time::Instant::now() + Duration::from_secs(1));
        match tokio::time::timeout_at(admin_deadline, self.admin_task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "admin server ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "admin server task failed"),
            Err(_) => tracing::warn!("admin server did not stop in time; leaving it"),
        }
        tracing::info!("stopped");
        Ok(())
    }

    /// Starts the shutdown and waits for it to finish.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }
}

/// Runs the bridge until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = crate::shutdown::on_signal();
    let running = start(config, shutdown).await?;
    tracing::info!(admin = %running.admin_addr(), "partner-bridge running");
    running.wait().await
}

/// Starts every part of a validated configuration; `shutdown` stops it.
pub async fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Running> {
    for warning in config.warnings() {
        tracing::warn!(%warning, "unsafe or incomplete configuration");
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let state_lock = lock_state_dir(&config.state_dir)?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new());
    // Not ready until every part below has registered: the admin server answers from the start, and without this
    // The admin server answers from the moment it is bound, while the parts that gate readiness (ledger, links,
    // `/readyz` would say 200 while no link or consumer exists yet (before the ledger registers, and between the
    // consumers) are still being created: without this part, an empty or half-filled health map reads as ready.
    // ledger being ready and the first broker link).
    health.not_ready(STARTUP_PART, "starting");
    let tasks = TaskTracker::new();
    let grace = Duration::from_secs(config.shutdown.grace_s);

    let admin = AdminServer::bind(config.admin.listen, metrics.clone(), health.clone())
        .await
        .with_context(|| format!("cannot listen on admin.listen {}", config.admin.listen))?
        .with_limits(config.http.limits());
    let admin_addr = admin.local_addr()?;
    tracing::info!(listener = "admin", addr = %admin_addr, "listening (/metrics, /livez, /readyz)");
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin.serve(admin_stop.clone()));

    health.not_ready("ledger", "opening");
    let ledger_url = config.ledger_url();
    let ledger = open_ledger(&config).await?;
    ledger
        .check_writable()
        .await
        .with_context(|| format!("the ledger at {} is not writable", ledger_url.redacted()))?;
    match ledger.void_leases_of_previous_run().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            leases = n,
            "voided ledger claims left by an earlier run of this process"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "could not void earlier claims; they lapse with their leases")
        }
    }
    // One audit log per process, in the ledger's database; its checkpoints are signed with the issuer's key (or,
    // for a receiver only, the receiver's key, if it has one).
    let issuer_keys = if config.issuer.enabled {
        Some(
            SigningKeys::load(
                &config.signing_key_source()?,
                signing_key_config_name(&config),
                config.known_public_keys(),
                Some(metrics.clone()),
            )
            .map_err(|e| anyhow::anyhow!("invalid signing key: {e}"))?,
        )
    } else {
        None
    };
    let receiver_keys = match (
        config.receiver.enabled,
        config.receiver_signing_key_source(),
    ) {
        (true, Some((source, name))) => Some(
            SigningKeys::load(
                &source,
                name,
                config.known_public_keys(),
                Some(metrics.clone()),
            )
            .map_err(|e| anyhow::anyhow!("invalid receiver signing key: {e}"))?,
        ),
        _ => None,
    };
    let audit_keys = issuer_keys.clone().or_else(|| receiver_keys.clone());
    let audit_first = audit_keys.as_ref().map(SigningKeys::first);
    let audit = AuditLog::open(
        &ledger,
        audit_keys,
        audit_first.as_ref(),
        config.ledger.timeout(),
    )
    .await
    .with_context(|| {
        format!(
            "cannot open the audit log in the ledger at {}",
            ledger_url.redacted()
        )
    })?;
    audit.set_metrics(metrics.clone());
    health.ready("ledger");
    tasks.spawn(keep_audit(
        audit.clone(),
        metrics.clone(),
        config.audit.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(watch_ledger(
        ledger.clone(),
        health.clone(),
        config.ledger.retention_days,
        shutdown.clone(),
    ));

    let names = Names::new(&config.amqp.prefix);
    let settings = QueueSettings::from_config(&config.amqp);
    let amqp_url = config.amqp_url()?;
    let confirm_timeout = Duration::from_millis(config.amqp.confirm_timeout_ms);
    // Short, and renewed while its work lives (see `Ledger::keep_alive`): a dead replica's keys move within it.
    let lease = config.ledger.lease();
    let mut links = Vec::new();
    let mut pipelines = Vec::new();
    let mut queues = Vec::new();
    let mut webhook_addr = None;
    let link_for = |url: &SecretUrl, pipeline: &'static str| {
        Link::new(
            url.clone(),
            pipeline,
            metrics.clone(),
            health.clone(),
            LinkOptions::from_config(&config.amqp, format!("partner-bridge {pipeline}")),
        )
    };

    // One write budget per Didit API key, whichever roles and pipelines use it (DESIGN.md §6).
    let pacing = Pacing::new(
        config.didit.writes_per_minute,
        config.didit.rate_window(),
        metrics.clone(),
    );
    if config.issuer.enabled {
        let access = config.issuer_didit()?;
        let client = DiditClient::paced(&access, metrics.clone(), &pacing, "issuer")
            .map_err(|e| anyhow::anyhow!("cannot build the issuer's Didit client: {e}"))?;
        let signing_key = issuer_keys
            .clone()
            .expect("loaded above for the issuer role");
        tracing::info!(key_id = signing_key.signer().key_id(), application_id = %access.application_id, "issuer role enabled");

        // One supervised link per broker the tokens go to (DESIGN: a partner's broker being down pauses only that
        // partner); on each broker that is not `amqp.url`, the reshare queue is consumed too (`remote_reshare`).
        let token_brokers = config.token_brokers()?;
        let mut partner_tokens = std::collections::HashMap::new();
        let mut remote_reshare = Vec::new();
        let mut remote_acks = Vec::new();
        let mut tokens_link = None;
        for (url, served) in &token_brokers {
            let served_names: Vec<&str> = served
                .iter()
                .map(|&i| config.issuer.partners[i].name.as_str())
                .collect();
            let label = served_names.join("+");
            let link = match tokens_link {
                None => link_for(url, pipeline::ISSUER_TOKENS),
                Some(_) => link_for(url, leak(format!("{}:{label}", pipeline::ISSUER_TOKENS))),
            };
            tasks.spawn(declare_in_background(
                link.clone(),
                topology::issuer_tokens_plan(&names),
                health.clone(),
                shutdown.clone(),
            ));
            if url.expose() != amqp_url.expose() {
                let label = if label.is_empty() {
                    "tokens_url"
                } else {
                    &label
                };
                let reshare = link_for(url, leak(format!("{}:{label}", pipeline::ISSUER_RESHARE)));
                remote_reshare.push(reshare);
                let acks = link_for(
                    url,
                    leak(format!("{}:{label}", pipeline::ISSUER_NOTICE_ACKS)),
                );
                remote_acks.push(acks);
            }
            if tokens_link.is_none() {
                tokens_link = Some(link);
            } else {
                let publisher = Publisher::new(link.clone(), confirm_timeout, metrics.clone());
                for &i in served {
                    partner_tokens.insert(
                        config.issuer.partners[i].application_id.clone(),
                        publisher.clone(),
                    );
                }
                links.push(link);
            }
        }
        let tokens_link = tokens_link.expect("the default token broker comes first");
        let intake_plan = topology::issuer_intake_plan(&names, &settings, &access.application_id);
        let onboarding_link = link_for(&amqp_url, pipeline::ISSUER_ONBOARDING);
        let reshare_link = link_for(&amqp_url, pipeline::ISSUER_RESHARE);
        let onboarding_publisher =
            Publisher::new(onboarding_link.clone(), confirm_timeout, metrics.clone());
        let reshare_publisher =
            Publisher::new(reshare_link.clone(), confirm_timeout, metrics.clone());
        let tokens_publisher =
            Publisher::new(tokens_link.clone(), confirm_timeout, metrics.clone());
        let notifier = Notifier {
            ledger: ledger.clone(),
            audit: audit.clone(),
            tokens: tokens_publisher.clone(),
            partner_tokens: partner_tokens.clone(),
            names: names.clone(),
            signing_key: signing_key.clone(),
            application_id: access.application_id.clone(),
            partners: config.issuer.partners.clone(),
            metrics: metrics.clone(),
        };
        let minter = Arc::new(Minter {
            client: client.clone(),
            ledger: ledger.clone(),
            audit: audit.clone(),
            tokens: tokens_publisher,
            partner_tokens,
            names: names.clone(),
            signing_key,
            application_id: access.application_id.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            shutdown: shutdown.clone(),
            retry: config.retry.clone(),
            lease,
        });

        tasks.spawn(crate::probe::check_key_at_start(
            client.clone(),
            "issuer",
            config.api_key_origin("issuer"),
            health.clone(),
            shutdown.clone(),
        ));
        let issuer_audit = DeadLetterAudit {
            log: audit.clone(),
            side: Side::Issuer,
            names: config
                .issuer
                .partners
                .iter()
                .map(|p| (p.application_id.clone(), p.name.clone()))
                .collect(),
        };
        let onboarding_pause =
            PauseControl::new(pipeline::ISSUER_ONBOARDING, health.clone(), metrics.clone());
        tasks.spawn(crate::probe::run_audited(
            onboarding_pause.clone(),
            client.clone(),
            ledger.clone(),
            Some(audit.clone()),
            pipeline::ISSUER_ONBOARDING,
            shutdown.clone(),
        ));
        tasks.spawn(run_consumer(
            onboarding_link.clone(),
            onboarding_publisher.clone(),
            ConsumerSpec {
                queue: names.issuer_onboarding_queue(),
                pipeline: pipeline::ISSUER_ONBOARDING,
                prefetch: config.amqp.prefetch,
                concurrency: config.issuer_concurrency(),
                max_attempts: config.retry.max_attempts,
                retry_delay_ms: config.amqp.retry_delay_ms,
                declare: intake_plan.clone(),
                audit: Some(issuer_audit.clone()),
            },
            Arc::new(OnboardingHandler {
                minter: minter.clone(),
                partners: config.issuer.partners.clone(),
                max_message_bytes: config.amqp.max_message_bytes,
                max_attempts: config.retry.max_attempts,
            }),
            onboarding_pause,
            shutdown.clone(),
            grace,
            metrics.clone(),
            health.clone(),
        ));

        let mut reshare_partners = Vec::new();
        for (i, partner) in config.issuer.partners.iter().enumerate() {
            let (fixed, files) = config.partner_key_sources(i)?;
            reshare_partners.push(ResharePartner {
                config: partner.clone(),
                keys: PublicKeys::load(fixed, files, Some(metrics.clone()))
                    .map_err(|e| anyhow::anyhow!("partner {}: {e}", partner.name))?,
            });
        }
        let reshare_pause =
            PauseControl::new(pipeline::ISSUER_RESHARE, health.clone(), metrics.clone());
        tasks.spawn(crate::probe::run_audited(
            reshare_pause.clone(),
            client.clone(),
            ledger.clone(),
            Some(audit.clone()),
            pipeline::ISSUER_RESHARE,
            shutdown.clone(),
        ));
        let reshare_handler = Arc::new(ReshareHandler {
            minter,
            partners: reshare_partners.clone(),
            allow_unsigned: config.issuer.allow_unsigned_reshare,
            max_reshares: config.issuer.max_reshares,
            max_message_bytes: config.amqp.max_message_bytes,
        });
        let reshare_spec = |declare| ConsumerSpec {
            queue: names.issuer_reshare_queue(),
            pipeline: pipeline::ISSUER_RESHARE,
            prefetch: config.amqp.prefetch,
            concurrency: config.issuer_concurrency(),
            max_attempts: config.retry.max_attempts,
            retry_delay_ms: config.amqp.retry_delay_ms,
            declare,
            audit: Some(issuer_audit.clone()),
        };
        // The reshare queue on every token broker that is not `amqp.url`: a receiver publishes its requests on
        // its own broker. Each consumer retries and dead-letters on its broker; the handler (and the pause) is
        // the one of `amqp.url`'s.
        let remote_plan =
            topology::issuer_remote_reshare_plan(&names, &settings, &access.application_id);
        for link in remote_reshare {
            tasks.spawn(run_consumer(
                link.clone(),
                Publisher::new(link.clone(), confirm_timeout, metrics.clone()),
                reshare_spec(remote_plan.clone()),
                reshare_handler.clone(),
                reshare_pause.clone(),
                shutdown.clone(),
                grace,
                metrics.clone(),
                health.clone(),
            ));
            links.push(link);
        }
        tasks.spawn(run_consumer(
            reshare_link.clone(),
            reshare_publisher,
            reshare_spec(intake_plan.clone()),
            reshare_handler,
            reshare_pause,
            shutdown.clone(),
            grace,
            metrics.clone(),
            health.clone(),
        ));

        // Notices: requests in on the onboarding exchange, acknowledgements in on the reshare exchange, open
        // notices sent again until acknowledged.
        let notices_link = link_for(&amqp_url, pipeline::ISSUER_NOTICES);
        let acks_link = link_for(&amqp_url, pipeline::ISSUER_NOTICE_ACKS);
        for (link, queue, pipeline_name) in [
            (
                &notices_link,
                names.issuer_notices_queue(),
                pipeline::ISSUER_NOTICES,
            ),
            (
                &acks_link,
                names.issuer_notice_acks_queue(),
                pipeline::ISSUER_NOTICE_ACKS,
            ),
        ] {
            let pause = PauseControl::new(pipeline_name, health.clone(), metrics.clone());
            tasks.spawn(crate::probe::run_audited(
                pause.clone(),
                client.clone(),
                ledger.clone(),
                Some(audit.clone()),
                pipeline_name,
                shutdown.clone(),
            ));
            let spec = ConsumerSpec {
                queue,
                pipeline: pipeline_name,
                prefetch: config.amqp.prefetch,
                concurrency: 1,
                max_attempts: config.retry.max_attempts,
                retry_delay_ms: config.amqp.retry_delay_ms,
                declare: intake_plan.clone(),
                audit: Some(issuer_audit.clone()),
            };
            let publisher = Publisher::new(link.clone(), confirm_timeout, metrics.clone());
            if pipeline_name == pipeline::ISSUER_NOTICES {
                tasks.spawn(run_consumer(
                    link.clone(),
                    publisher,
                    spec,
                    Arc::new(NoticeRequestHandler {
                        notifier: notifier.clone(),
                        max_message_bytes: config.amqp.max_message_bytes,
                    }),
                    pause,
                    shutdown.clone(),
                    grace,
                    metrics.clone(),
                    health.clone(),
                ));
            } else {
                let acks_handler = Arc::new(NoticeAckHandler {
                    notifier: notifier.clone(),
                    partners: reshare_partners.clone(),
                    allow_unsigned: config.issuer.allow_unsigned_reshare,
                    max_message_bytes: config.amqp.max_message_bytes,
                });
                // Acknowledgements from receivers on a partner's broker arrive there, like their reshare requests.
                for remote in std::mem::take(&mut remote_acks) {
                    tasks.spawn(run_consumer(
                        remote.clone(),
                        Publisher::new(remote.clone(), confirm_timeout, metrics.clone()),
                        ConsumerSpec {
                            queue: names.issuer_notice_acks_queue(),
                            declare: remote_plan.clone(),
                            ..spec.clone()
                        },
                        acks_handler.clone(),
                        pause.clone(),
                        shutdown.clone(),
                        grace,
                        metrics.clone(),
                        health.clone(),
                    ));
                    links.push(remote);
                }
                tasks.spawn(run_consumer(
                    link.clone(),
                    publisher,
                    spec,
                    acks_handler,
                    pause,
                    shutdown.clone(),
                    grace,
                    metrics.clone(),
                    health.clone(),
                ));
            }
        }
        tasks.spawn(run_retries(
            notifier,
            Duration::from_secs(config.issuer.notice_retry_secs),
            shutdown.clone(),
        ));

        if let Some(webhook_config) = &config.issuer.webhook {
            let listener = tokio::net::TcpListener::bind(webhook_config.listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on issuer.webhook.listen {}",
                        webhook_config.listen
                    )
                })?;
            let addr = listener.local_addr()?;
            tracing::info!(listener = "webhook", %addr, "listening (Didit webhooks)");
            webhook_addr = Some(addr);
            let state = Arc::new(WebhookState {
                secret: config.webhook_secret_source(webhook_config)?,
                next_secret: next_webhook_secret_source(webhook_config).map(|(s, _)| s),
                accept_raw: webhook_config.accept_raw_signature,
                accept_simple: webhook_config.accept_simple_signature,
                max_skew_s: webhook_config.max_skew_s,
                max_body_bytes: webhook_config.max_body_bytes,
                // Opening a publishing channel (two steps) and the confirm are each bounded by the confirm timeout.
                lease: 3 * confirm_timeout + Duration::from_secs(5),
                publisher: onboarding_publisher,
                names: names.clone(),
                ledger: ledger.clone(),
                metrics: metrics.clone(),
            });
            let stop = shutdown.clone();
            let limits = config.http.limits();
            tasks.spawn(async move {
                let served = crate::http_server::serve(
                    listener,
                    webhook::router(state),
                    limits,
                    async move { stop.cancelled().await },
                )
                .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "webhook listener failed");
                }
            });
            pipelines.push(pipeline::ISSUER_WEBHOOK);
        }
        links.extend([
            onboarding_link,
            reshare_link,
            tokens_link,
            notices_link,
            acks_link,
        ]);
        pipelines.extend([
            pipeline::ISSUER_ONBOARDING,
            pipeline::ISSUER_RESHARE,
            pipeline::ISSUER_TOKENS,
            pipeline::ISSUER_NOTICES,
            pipeline::ISSUER_NOTICE_ACKS,
        ]);
        queues.extend([
            names.issuer_onboarding_queue(),
            names.issuer_reshare_queue(),
            names.issuer_notices_queue(),
            names.issuer_notice_acks_queue(),
        ]);
    }

    if config.receiver.enabled {
        let access = config.receiver_didit()?;
        let client = DiditClient::paced(&access, metrics.clone(), &pacing, "receiver")
            .map_err(|e| anyhow::anyhow!("cannot build the receiver's Didit client: {e}"))?;
        let reshare_key = receiver_keys.clone();
        tracing::info!(application_id = %access.application_id, reshare_key_id = reshare_key.as_ref().map(|k| k.signer().key_id().to_string()), "receiver role enabled");
        let mut peers = Vec::new();
        for (i, peer) in config.receiver.issuers.iter().enumerate() {
            peers.push(Peer {
                name: peer.name.clone(),
                application_id: peer.application_id.clone(),
                key: Some({
                    let (fixed, files) = config.issuer_key_sources(i)?;
                    PublicKeys::load(fixed, files, Some(metrics.clone()))
                        .map_err(|e| anyhow::anyhow!("issuer {}: {e}", peer.name))?
                }),
                trust_review: peer.trust_review,
                agreement_id: peer.agreement_id.clone(),
            });
        }
        let tokens_queue = receiver_tokens_queue(&config, &names);
        let mut plan = topology::receiver_plan_on(
            &names,
            &settings,
            &access.application_id,
            &tokens_queue,
            &receiver_notices_queue(&config, &names),
        );
        if config.receiver.results_queue {
            plan = topology::combine([plan, results_queue_plan(&names, &settings)]);
        }
        let receiver_audit = DeadLetterAudit {
            log: audit.clone(),
            side: Side::Receiver,
            names: config
                .receiver
                .issuers
                .iter()
                .map(|p| (p.application_id.clone(), p.name.clone()))
                .collect(),
        };
        let notices_link = link_for(&amqp_url, pipeline::RECEIVER_NOTICES);
        let notices_pause =
            PauseControl::new(pipeline::RECEIVER_NOTICES, health.clone(), metrics.clone());
        tasks.spawn(crate::probe::run_audited(
            notices_pause.clone(),
            client.clone(),
            ledger.clone(),
            Some(audit.clone()),
            pipeline::RECEIVER_NOTICES,
            shutdown.clone(),
        ));
        let notices_publisher =
            Publisher::new(notices_link.clone(), confirm_timeout, metrics.clone());
        tasks.spawn(run_consumer(
            notices_link.clone(),
            notices_publisher.clone(),
            ConsumerSpec {
                queue: receiver_notices_queue(&config, &names),
                pipeline: pipeline::RECEIVER_NOTICES,
                prefetch: config.amqp.prefetch,
                // One at a time: two copies of a notice are never acted on at once.
                concurrency: 1,
                max_attempts: config.retry.max_attempts,
                retry_delay_ms: config.amqp.retry_delay_ms,
                declare: plan.clone(),
                audit: Some(receiver_audit.clone()),
            },
            Arc::new(NoticeHandler {
                client: client.clone(),
                ledger: ledger.clone(),
                audit: audit.clone(),
                publisher: notices_publisher,
                names: names.clone(),
                application_id: access.application_id.clone(),
                peers: peers.clone(),
                signing_key: reshare_key.clone(),
                allow_unsigned: config.receiver.allow_unsigned,
                on_erasure: config.receiver.on_erasure,
                max_message_bytes: config.amqp.max_message_bytes,
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
                retry: config.retry.clone(),
            }),
            notices_pause,
            shutdown.clone(),
            grace,
            metrics.clone(),
            health.clone(),
        ));
        links.push(notices_link);
        pipelines.push(pipeline::RECEIVER_NOTICES);
        queues.push(receiver_notices_queue(&config, &names));
        let link = link_for(&amqp_url, pipeline::RECEIVER_TOKENS);
        let publisher = Publisher::new(link.clone(), confirm_timeout, metrics.clone());
        tasks.spawn(crate::probe::check_key_at_start(
            client.clone(),
            "receiver",
            config.api_key_origin("receiver"),
            health.clone(),
            shutdown.clone(),
        ));
        let pause = PauseControl::new(pipeline::RECEIVER_TOKENS, health.clone(), metrics.clone());
        tasks.spawn(crate::probe::run_audited(
            pause.clone(),
            client.clone(),
            ledger.clone(),
            Some(audit.clone()),
            pipeline::RECEIVER_TOKENS,
            shutdown.clone(),
        ));
        tasks.spawn(run_consumer(
            link.clone(),
            publisher.clone(),
            ConsumerSpec {
                queue: tokens_queue.clone(),
                pipeline: pipeline::RECEIVER_TOKENS,
                prefetch: config.amqp.prefetch,
                concurrency: config.receiver_concurrency(),
                max_attempts: config.retry.max_attempts,
                retry_delay_ms: config.amqp.retry_delay_ms,
                declare: plan,
                audit: Some(receiver_audit.clone()),
            },
            Arc::new(TokenHandler {
                client,
                ledger: ledger.clone(),
                audit: audit.clone(),
                publisher,
                names: names.clone(),
                application_id: access.application_id.clone(),
                peers,
                signing_key: reshare_key,
                allow_unsigned: config.receiver.allow_unsigned,
                allow_unknown_issuers: config.receiver.allow_unknown_issuers,
                workflow_user: config.receiver.workflow_user.clone(),
                workflow_business: config.receiver.workflow_business.clone(),
                vendor_template: config.receiver.vendor_data.clone(),
                max_reshares: config.receiver.max_reshares,
                max_message_bytes: config.amqp.max_message_bytes,
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
                retry: config.retry.clone(),
                lease,
            }),
            pause,
            shutdown.clone(),
            grace,
            metrics.clone(),
            health.clone(),
        ));
        links.push(link);
        pipelines.push(pipeline::RECEIVER_TOKENS);
        queues.push(tokens_queue);
    }

    let partners: Vec<String> = config
        .issuer
        .partners
        .iter()
        .map(|p| p.name.clone())
        .collect();
    let issuers: Vec<String> = config
        .receiver
        .issuers
        .iter()
        .map(|p| p.name.clone())
        .collect();
    metrics.init_known(&partners, &issuers, &queues, &pipelines);
    // Every link's part exists by now (registered when the link was created, "not yet connected"), and the
    // consumer and topology tasks register their own parts first thing: from here on the parts speak for
    // themselves.
    health.remove(STARTUP_PART);

    Ok(Running {
        _state_lock: state_lock,
        admin_addr,
        webhook_addr,
        metrics,
        health,
        shutdown,
        tasks,
        links,
        admin_stop,
        admin_task,
        grace,
        audit,
    })
}

/// A link label made at start-up from the configuration (a partner's broker): metric and health labels are
/// `&'static str`, and a process makes these once per start.
fn leak(label: String) -> &'static str {
    Box::leak(label.into_boxed_str())
}

/// The lock file inside `state_dir`.
pub const STATE_LOCK_FILE: &str = "partner-bridge.lock";

/// Opens the configured ledger (`ledger.url`, default SQLite under `state_dir`) with its timeout and TLS settings;
/// the error names the ledger, its password redacted.
pub async fn open_ledger(config: &Config) -> anyhow::Result<Ledger> {
    let url = config.ledger_url();
    Ledger::open_with_tls(&url, config.ledger.timeout(), &config.ledger.tls_settings())
        .await
        .with_context(|| format!("cannot open the ledger at {}", url.redacted()))
}

/// Takes an exclusive lock on `state_dir` (creating it when missing), or fails naming the process that holds it.
///
/// One directory, one process: the embedded ledger voids every lease it finds at start-up ("leases of the previous
/// run"), which is right only if no other live process can hold one; two processes on one SQLite file would also
/// fight over its writer lock. The lock is an OS file lock (`flock`), so it dies with its process however that
/// ends (SIGKILL included): a restarted replica is never locked out by its own dead predecessor.
pub fn lock_state_dir(state_dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create state_dir {}", state_dir.display()))?;
    let path = state_dir.join(STATE_LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open the state_dir lock {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() {
                String::new()
            } else {
                format!(" (pid {holder})")
            };
            anyhow::bail!(
                "state_dir {} is in use by another partner-bridge process{holder}: each process needs a state_dir                  of its own (replicas share a PostgreSQL ledger, never a state_dir)",
                state_dir.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    // Who holds it, for the message above; best effort.
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(file, "{}", std::process::id());
    let _ = file.flush();
    Ok(file)
}

/// The receiver's token queue: `receiver.queue_name`, else `<prefix>.receiver.tokens`.
pub fn receiver_tokens_queue(config: &Config, names: &Names) -> String {
    config
        .receiver
        .queue_name
        .clone()
        .unwrap_or_else(|| names.receiver_tokens_queue())
}

/// The receiver's notice queue: `<prefix>.receiver.notices`, or beside a configured `receiver.queue_name` (its name
/// with `.tokens` replaced by `.notices`, else with `.notices` appended), so two receivers sharing a broker and
/// prefix never take each other's notices.
pub fn receiver_notices_queue(config: &Config, names: &Names) -> String {
    match &config.receiver.queue_name {
        None => names.receiver_notices_queue(),
        Some(queue) => match queue.strip_suffix(".tokens") {
            Some(stem) => format!("{stem}.notices"),
            None => format!("{queue}.notices"),
        },
    }
}

/// Everything the configured roles declare, on every broker they use (for `topology show|declare` and cleanup).
pub fn declared_topology(config: &Config) -> Vec<Entity> {
    let names = Names::new(&config.amqp.prefix);
    let settings = QueueSettings::from_config(&config.amqp);
    let mut plans = Vec::new();
    if config.issuer.enabled {
        if let Ok(access) = config.issuer_didit() {
            plans.push(topology::issuer_intake_plan(
                &names,
                &settings,
                &access.application_id,
            ));
        }
        plans.push(topology::issuer_tokens_plan(&names));
    }
    if config.receiver.enabled {
        if let Ok(access) = config.receiver_didit() {
            plans.push(topology::receiver_plan_on(
                &names,
                &settings,
                &access.application_id,
                &receiver_tokens_queue(config, &names),
                &receiver_notices_queue(config, &names),
            ));
        }
        if config.receiver.results_queue {
            plans.push(results_queue_plan(&names, &settings));
        }
    }
    topology::combine(plans)
}

/// The receiver's default outbox for `import.result`: `<prefix>.receiver.results`, bound with `import.#`, so results
/// are kept (and publishes are confirmed as routed) even before the partner's backend binds a queue of its own.
pub fn results_queue_plan(names: &Names, settings: &QueueSettings) -> Vec<Entity> {
    let queue = format!("{}.receiver.results", names.prefix());
    let dead = Names::dead_queue(&queue);
    vec![
        Entity::Exchange {
            name: names.imports_exchange(),
            kind: "topic",
        },
        Entity::Exchange {
            name: names.dead_letter_exchange(),
            kind: "direct",
        },
        Entity::Queue {
            name: queue.clone(),
            arguments: vec![
                ("x-queue-type".into(), HeaderValue::Str("quorum".into())),
                (
                    "x-delivery-limit".into(),
                    HeaderValue::Int(i64::from(settings.delivery_limit)),
                ),
                (
                    "x-dead-letter-exchange".into(),
                    HeaderValue::Str(names.dead_letter_exchange()),
                ),
                (
                    "x-dead-letter-routing-key".into(),
                    HeaderValue::Str(queue.clone()),
                ),
            ],
        },
        Entity::Queue {
            name: dead.clone(),
            arguments: vec![("x-queue-type".into(), HeaderValue::Str("quorum".into()))],
        },
        Entity::Binding {
            queue: queue.clone(),
            exchange: names.imports_exchange(),
            routing_key: "import.#".into(),
        },
        Entity::Binding {
            queue: queue.clone(),
            exchange: names.imports_exchange(),
            routing_key: "notice.#".into(),
        },
        Entity::Binding {
            queue: dead,
            exchange: names.dead_letter_exchange(),
            routing_key: queue,
        },
    ]
}

/// Connects a link that has no consumer (the token publisher) and declares its plan, retrying until it works, so
/// readiness reflects the token broker too and the first publish finds its exchange. Nothing else uses this link
/// while no token is published, so the task then stays to reconnect (and declare again) whenever the connection is
/// lost; otherwise `/readyz` would stay 503 after a broker blip until the next token happened to be published.
async fn declare_in_background(
    link: Link,
    plan: Vec<Entity>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let part = format!("topology:{}", link.pipeline());
    health.not_ready(&part, "not declared yet");
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = async {
            let connection = link.connection(&shutdown).await?;
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| crate::amqp::AmqpError::from_lapin("opening a channel", &e))?;
            topology::declare(&channel, &plan).await?;
            let _ = channel.close(200, "declared".into()).await;
            Ok::<_, crate::amqp::AmqpError>(connection)
        };
        match attempt.await {
            Ok(connection) => {
                health.ready(&part);
                delay = Duration::from_millis(100);
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = connection_lost(&connection) => {}
                }
            }
            Err(e) => {
                if shutdown.is_cancelled() {
                    return;
                }
                tracing::warn!(error = %e, pipeline = link.pipeline(), "cannot declare topology yet");
                health.not_ready(&part, e.to_string());
                link.invalidate();
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Resolves once `connection` is no longer connected. Polled: lapin hands each connection event to one listener
/// only, and the link's own watcher must keep receiving them.
async fn connection_lost(connection: &lapin::Connection) {
    while connection.status().connected() {
        tokio::time::sleep(CONNECTION_CHECK_EVERY).await;
    }
}

/// Signs the audit chain's head every `audit.checkpoint_interval_secs` (an idle log writes none) and prunes rows
/// older than `audit.retention_days` (at start, then hourly) behind a signed `prune` checkpoint. The shutdown
/// checkpoint is written by [`Running::wait`], once every handler has finished.
async fn keep_audit(
    audit: AuditLog,
    metrics: Arc<Metrics>,
    config: AuditConfig,
    shutdown: CancellationToken,
) {
    let interval = config.checkpoint_interval();
    let mut last_prune: Option<tokio::time::Instant> = None;
    let mut next_checkpoint = tokio::time::Instant::now() + interval;
    loop {
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            let cutoff =
                chrono::Utc::now() - chrono::Duration::days(i64::from(config.retention_days));
            match audit.prune(cutoff).await {
                Ok(0) => {}
                Ok(n) => {
                    metrics.audit_checkpoint(crate::audit::kinds::PRUNE);
                    tracing::info!(
                        rows = n,
                        retention_days = config.retention_days,
                        "audit log pruned behind a signed checkpoint"
                    )
                }
                Err(e) => tracing::warn!(error = %e, "audit log pruning failed"),
            }
            last_prune = Some(tokio::time::Instant::now());
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(next_checkpoint) => {}
        }
        next_checkpoint = tokio::time::Instant::now() + interval;
        match audit.checkpoint(crate::audit::kinds::PERIODIC).await {
            Ok(Some(c)) => {
                metrics.audit_checkpoint(crate::audit::kinds::PERIODIC);
                tracing::debug!(seq = c.seq, "audit checkpoint written");
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "audit checkpoint not written; trying again next interval")
            }
        }
    }
}

/// Keeps the ledger's readiness current and prunes old rows.
async fn watch_ledger(
    ledger: Ledger,
    health: Arc<Health>,
    retention_days: u32,
    shutdown: CancellationToken,
) {
    let mut last_prune: Option<tokio::time::Instant> = None;
    loop {
        match ledger.check_writable().await {
            Ok(()) => health.ready("ledger"),
            Err(e) => {
                tracing::error!(error = %e, "ledger not writable: no message can be processed safely");
                health.not_ready("ledger", e.to_string());
            }
        }
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
            let cutoff = chrono::Utc::now() - chrono::Duration::days(i64::from(retention_days));
            match ledger.prune(cutoff).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(rows = n, retention_days, "ledger pruned"),
                Err(e) => tracing::warn!(error = %e, "ledger pruning failed"),
            }
            last_prune = Some(tokio::time::Instant::now());
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(LEDGER_CHECK_EVERY) => {}
        }
    }
}

/// The config key the issuer's signing key was given under, for logs and metrics.
fn signing_key_config_name(config: &Config) -> &'static str {
    if config.issuer.signing_key.is_some() {
        "issuer.signing_key"
    } else {
        "issuer.signing_key_file"
    }
}
