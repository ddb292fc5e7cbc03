//! Every metric the bridge exposes (DESIGN.md §7), defined once, with typed label sets and one small recording
//! function per fact. Names are a contract with dashboards and alerts: prefix `partner_bridge_`, counters end in
//! `_total` (added by the encoder). Labels come from config names and fixed word lists only, never from ids.
//!
//! Pipelines hold an `Arc<Metrics>` and call the functions below; nothing else touches the registry.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Buckets for Didit calls: 5 ms … 30 s.
const DIDIT_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
];
/// Buckets for end-to-end times and token ages: 10 ms … 1 day (tokens may wait in a queue for hours).
const E2E_BUCKETS: [f64; 18] = [
    0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.425, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    3600.0, 86400.0,
];

/// Pipelines, as they appear in `pipeline` labels.
pub mod pipeline {
    /// Issuer: `onboarding.finished` consumer.
    pub const ISSUER_ONBOARDING: &str = "issuer_onboarding";
    /// Issuer: `reshare.request` consumer.
    pub const ISSUER_RESHARE: &str = "issuer_reshare";
    /// Issuer: token publisher (its own broker connection).
    pub const ISSUER_TOKENS: &str = "issuer_tokens";
    /// Issuer: webhook intake.
    pub const ISSUER_WEBHOOK: &str = "issuer_webhook";
    /// Receiver: `share_token` consumer.
    pub const RECEIVER_TOKENS: &str = "receiver_tokens";
    /// Issuer: `subject.notice.requested` consumer.
    pub const ISSUER_NOTICES: &str = "issuer_notices";
    /// Issuer: `subject.notice.ack` consumer.
    pub const ISSUER_NOTICE_ACKS: &str = "issuer_notice_acks";
    /// Receiver: `subject.notice` consumer.
    pub const RECEIVER_NOTICES: &str = "receiver_notices";
    /// Every pipeline name.
    pub const ALL: [&str; 8] = [
        ISSUER_ONBOARDING,
        ISSUER_RESHARE,
        ISSUER_TOKENS,
        ISSUER_WEBHOOK,
        RECEIVER_TOKENS,
        ISSUER_NOTICES,
        ISSUER_NOTICE_ACKS,
        RECEIVER_NOTICES,
    ];
    /// The pipelines that consume a queue (and so can pause and retry deliveries).
    pub const CONSUMERS: [&str; 6] = [
        ISSUER_ONBOARDING,
        ISSUER_RESHARE,
        RECEIVER_TOKENS,
        ISSUER_NOTICES,
        ISSUER_NOTICE_ACKS,
        RECEIVER_NOTICES,
    ];
}

/// `{source, outcome}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// `amqp`, `webhook` or `backfill` (events published by `partner-bridge backfill`, header `x-pb-source`).
    pub source: &'static str,
    /// `processed`, `ignored_unfinished`, `no_matching_partner`, `duplicate`, `bad_message`, `retried`, `dead_lettered`.
    pub outcome: &'static str,
}

/// `{outcome}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// A fixed word.
    pub outcome: &'static str,
}

/// `{partner, outcome}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShareLabels {
    /// The partner's configured name.
    pub partner: String,
    /// `minted`, `skipped_valid`, `rejected`, `not_found`, `retried`, `paused`, `exhausted`, `failed`.
    pub outcome: &'static str,
}

/// `{partner, outcome}` of `backfill_sessions_total`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackfillLabels {
    /// The partner's configured name.
    pub partner: String,
    /// One of [`BACKFILL_OUTCOMES`].
    pub outcome: &'static str,
}

/// `{partner}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartnerLabels {
    /// The partner's configured name.
    pub partner: String,
}

/// `{issuer, outcome}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImportLabels {
    /// The issuer's configured name (`unknown` for unlisted issuers).
    pub issuer: String,
    /// An `import.result` outcome, or `reshare_requested`, `forbidden`, `retried`, `paused`, `bad_message`.
    pub outcome: &'static str,
}

/// `{direction}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `sent` (receiver) or `received` (issuer).
    pub direction: &'static str,
}

/// `{operation, status}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DiditLabels {
    /// `share`, `import`, `decision`, `probe`.
    pub operation: &'static str,
    /// The HTTP status code, or `timeout`, `connect_error`, `error`.
    pub status: String,
}

/// `{peer, event}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NoticeLabels {
    /// The partner (issuer side) or issuer (receiver side) by configured name.
    pub peer: String,
    /// Issuer: `sent`, `resent`, `acknowledged`; receiver: `received`, `duplicate`, `deleted`, `notified`,
    /// `ack_sent`.
    pub event: &'static str,
}

/// Notice events counted on the issuer side, per partner.
pub const ISSUER_NOTICE_EVENTS: [&str; 3] = ["sent", "resent", "acknowledged"];
/// Notice events counted on the receiver side, per issuer.
pub const RECEIVER_NOTICE_EVENTS: [&str; 5] =
    ["received", "duplicate", "deleted", "notified", "ack_sent"];

/// `{operation}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// `share`, `import`, `decision`, `probe`, `publish`.
    pub operation: &'static str,
}

/// `{queue, reason}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabels {
    /// The queue the message came from (configured names).
    pub queue: String,
    /// The `x-pb-reason` word.
    pub reason: &'static str,
}

/// `{result}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfirmLabels {
    /// `ack`, `nack`, `returned`, `timeout`, `error`.
    pub result: &'static str,
}

/// `{pipeline}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabels {
    /// One of [`pipeline::ALL`].
    pub pipeline: &'static str,
}

/// `{pipeline, reason}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PausedLabels {
    /// One of [`pipeline::ALL`].
    pub pipeline: &'static str,
    /// `credentials`, `workflow_missing` or `ledger`.
    pub reason: &'static str,
}

/// `{key}`, never a key itself: for the rate limiter, the roles using one Didit API key (`issuer`, `receiver`,
/// `issuer+receiver`); for key file reloads, the config key the file was given under (`issuer.signing_key_file`,
/// `didit.api_key_file`, …).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    /// The roles using the key, or the config key of the file.
    pub key: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Buckets for waits on the rate limit: 1 ms … 2 min (a full window is 60 s).
const LIMITER_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];

fn limiter_histogram() -> Histogram {
    Histogram::new(LIMITER_BUCKETS)
}

fn didit_histogram() -> Histogram {
    Histogram::new(DIDIT_BUCKETS)
}

/// All metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    events: Family<EventLabels, Counter>,
    webhook_requests: Family<OutcomeLabels, Counter>,
    shares: Family<ShareLabels, Counter>,
    tokens_published: Family<PartnerLabels, Counter>,
    unroutable: Family<PartnerLabels, Counter>,
    imports: Family<ImportLabels, Counter>,
    reshare_requests: Family<DirectionLabels, Counter>,
    didit_requests: Family<DiditLabels, Counter>,
    didit_duration: HistogramFamily<OperationLabels>,
    didit_rate_limited: Family<OperationLabels, Counter>,
    limiter_wait: HistogramFamily<KeyLabels>,
    limiter_deferred: Family<KeyLabels, Counter>,
    retries: Family<OperationLabels, Counter>,
    dead_lettered: Family<DeadLetterLabels, Counter>,
    publish_confirms: Family<ConfirmLabels, Counter>,
    token_age: Histogram,
    end_to_end: Histogram,
    in_flight: Family<PipelineLabels, Gauge>,
    amqp_connected: Family<PipelineLabels, Gauge>,
    amqp_reconnects: Counter,
    paused: Family<PausedLabels, Gauge>,
    last_success: Family<PipelineLabels, Gauge<f64, AtomicU64>>,
    key_reload_errors: Family<KeyLabels, Counter>,
    delivery_retries: Family<PipelineLabels, Counter>,
    backfill_sessions: Family<BackfillLabels, Counter>,
    notices: Family<NoticeLabels, Counter>,
    notices_unacknowledged: Family<PartnerLabels, Gauge>,
    audit_rows: Family<ActLabels, Counter>,
    audit_write_failures: Counter,
    audit_checkpoints: Family<CheckpointLabels, Counter>,
}

/// `{act}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActLabels {
    /// An audit act's name (`share_minted`, `imported`, …).
    pub act: &'static str,
}

/// `{kind}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckpointLabels {
    /// `periodic`, `shutdown` or `prune`.
    pub kind: &'static str,
}

/// Event outcomes.
pub const EVENT_OUTCOMES: [&str; 7] = [
    "processed",
    "ignored_unfinished",
    "no_matching_partner",
    "duplicate",
    "bad_message",
    "retried",
    "dead_lettered",
];
/// Webhook request outcomes. `duplicate`: a retry of a delivery whose event is already queued (200); `busy`: the same
/// delivery is being queued by another request (503). `replay` is no longer answered (a replayed delivery is a
/// `duplicate` or `stale`); it stays so that dashboards and alerts that name it keep working.
pub const WEBHOOK_OUTCOMES: [&str; 11] = [
    "accepted",
    "duplicate",
    "busy",
    "ignored",
    "bad_signature",
    "stale",
    "replay",
    "malformed",
    "too_large",
    "broker_unavailable",
    "unsupported_type",
];
/// Share outcomes.
pub const SHARE_OUTCOMES: [&str; 9] = [
    "minted",
    "skipped_valid",
    "rejected",
    "not_found",
    "retried",
    "paced",
    "paused",
    "exhausted",
    "failed",
];
/// Import outcomes beyond [`crate::envelope::ImportOutcome`].
pub const EXTRA_IMPORT_OUTCOMES: [&str; 6] = [
    "reshare_requested",
    "forbidden",
    "retried",
    "paced",
    "paused",
    "bad_message",
];
/// What `partner-bridge backfill` did with each session it listed (`backfill_sessions_total{partner, outcome}`):
/// `published` (its event confirmed by the broker), `already_done` (published by an earlier, interrupted run with
/// the same arguments), `skipped_policy` (the partner's policy refuses its status or kind), `skipped_filter` (outside
/// the command's filters), `would_publish` (`--dry-run`).
pub const BACKFILL_OUTCOMES: [&str; 5] = [
    "published",
    "already_done",
    "skipped_policy",
    "skipped_filter",
    "would_publish",
];
/// Publisher confirm results.
pub const CONFIRM_RESULTS: [&str; 5] = ["ack", "nack", "returned", "timeout", "error"];
/// Pause reasons.
pub const PAUSE_REASONS: [&str; 3] = ["credentials", "workflow_missing", "ledger"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric (all at zero) plus `build_info` and the `process_*` collector.
    pub fn new() -> Metrics {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("partner_bridge");
        let m = Metrics {
            registry: Registry::default(),
            events: Family::default(),
            webhook_requests: Family::default(),
            shares: Family::default(),
            tokens_published: Family::default(),
            unroutable: Family::default(),
            imports: Family::default(),
            reshare_requests: Family::default(),
            didit_requests: Family::default(),
            didit_duration: Family::new_with_constructor(didit_histogram),
            didit_rate_limited: Family::default(),
            limiter_wait: Family::new_with_constructor(limiter_histogram),
            limiter_deferred: Family::default(),
            retries: Family::default(),
            dead_lettered: Family::default(),
            publish_confirms: Family::default(),
            token_age: Histogram::new(E2E_BUCKETS),
            end_to_end: Histogram::new(E2E_BUCKETS),
            in_flight: Family::default(),
            amqp_connected: Family::default(),
            amqp_reconnects: Counter::default(),
            paused: Family::default(),
            last_success: Family::default(),
            key_reload_errors: Family::default(),
            delivery_retries: Family::default(),
            backfill_sessions: Family::default(),
            notices: Family::default(),
            notices_unacknowledged: Family::default(),
            audit_rows: Family::default(),
            audit_write_failures: Counter::default(),
            audit_checkpoints: Family::default(),
        };
        registry.register(
            "key_reload_errors",
            "Key, secret and key-set files that became unreadable or invalid while running (the last good keys stay in use)",
            m.key_reload_errors.clone(),
        );
        registry.register(
            "build",
            "Build information of the running binary",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "events",
            "Onboarding events taken in, by source and outcome",
            m.events.clone(),
        );
        registry.register(
            "webhook_requests",
            "Didit webhook deliveries received, by outcome",
            m.webhook_requests.clone(),
        );
        registry.register(
            "shares",
            "Share attempts per partner, by outcome",
            m.shares.clone(),
        );
        registry.register(
            "tokens_published",
            "Share token envelopes confirmed by the broker, per partner",
            m.tokens_published.clone(),
        );
        registry.register(
            "unroutable",
            "Share token envelopes the broker returned as unroutable (312 NO_ROUTE: no queue bound for the partner's routing key), per partner",
            m.unroutable.clone(),
        );
        registry.register(
            "imports",
            "Tokens handled by the receiver, per issuer and outcome",
            m.imports.clone(),
        );
        registry.register(
            "reshare_requests",
            "Reshare requests sent (receiver) and received (issuer)",
            m.reshare_requests.clone(),
        );
        registry.register(
            "didit_requests",
            "Didit API calls by operation and HTTP status",
            m.didit_requests.clone(),
        );
        registry.register(
            "didit_request_duration_seconds",
            "Didit API call duration in seconds",
            m.didit_duration.clone(),
        );
        registry.register(
            "didit_rate_limited",
            "Didit answers 429 (rate limited), by operation",
            m.didit_rate_limited.clone(),
        );
        registry.register(
            "didit_limiter_wait_seconds",
            "Time a Didit write waited for room under the key's rate limit, per key (named by its roles)",
            m.limiter_wait.clone(),
        );
        registry.register(
            "didit_limiter_deferred",
            "Messages sent through the retry queue because the key's rate limit had no room within retry.hold_max_s \
             (no attempt counted), per key",
            m.limiter_deferred.clone(),
        );
        registry.register(
            "retries",
            "Retries scheduled, in process or through the retry queue",
            m.retries.clone(),
        );
        registry.register(
            "dead_lettered",
            "Messages dead-lettered, by source queue and reason",
            m.dead_lettered.clone(),
        );
        registry.register(
            "publish_confirms",
            "Publisher confirms by result (only ack is a delivery)",
            m.publish_confirms.clone(),
        );
        registry.register(
            "token_age_at_import_seconds",
            "Age of a share token when the receiver imports it, in seconds",
            m.token_age.clone(),
        );
        registry.register(
            "end_to_end_seconds",
            "Time from the verification finishing to its import at the partner, in seconds",
            m.end_to_end.clone(),
        );
        registry.register(
            "in_flight",
            "Messages being handled now, per pipeline",
            m.in_flight.clone(),
        );
        registry.register(
            "amqp_connected",
            "1 while the pipeline's broker connection is up",
            m.amqp_connected.clone(),
        );
        registry.register(
            "amqp_reconnects",
            "Broker reconnections after a lost connection",
            m.amqp_reconnects.clone(),
        );
        registry.register(
            "paused",
            "1 while a pipeline is paused (credentials rejected, workflow missing, ledger unavailable)",
            m.paused.clone(),
        );
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the pipeline's last successful message",
            m.last_success.clone(),
        );
        // Not in DESIGN.md's list: the per-pipeline count of failed attempts that the stall alert needs. An attempt
        // that fails fast is in flight for milliseconds, which a 15 s scrape of `in_flight` never sees.
        registry.register(
            "delivery_retries",
            "Deliveries sent to the retry queue after an attempt that did not succeed, per consuming pipeline",
            m.delivery_retries.clone(),
        );
        // Counted by the `backfill` command only (its summary, and its own `--metrics-addr`); a running bridge shows
        // a backfill as `events_total{source="backfill"}`.
        registry.register(
            "backfill_sessions",
            "Sessions a backfill listed, per partner, by what it did with them (published, already_done, \
             skipped_policy, skipped_filter, would_publish)",
            m.backfill_sessions.clone(),
        );
        registry.register(
            "notices",
            "Erasure and rectification notices, per peer (partner or issuer) and event",
            m.notices.clone(),
        );
        registry.register(
            "notices_unacknowledged",
            "Notices sent to the partner that it has not acknowledged yet (each is sent again every issuer.notice_retry_secs)",
            m.notices_unacknowledged.clone(),
        );
        registry.register(
            "audit_rows",
            "Rows appended to the audit log, per act (share_minted, token_published, imported, …)",
            m.audit_rows.clone(),
        );
        registry.register(
            "audit_write_failures",
            "Audit log writes that failed (the message that caused the act was not settled and comes back)",
            m.audit_write_failures.clone(),
        );
        registry.register(
            "audit_checkpoints",
            "Signed audit checkpoints written, per kind (periodic, shutdown, prune)",
            m.audit_checkpoints.clone(),
        );
        for act in crate::audit::ActKind::ALL {
            m.audit_rows
                .get_or_create(&ActLabels { act: act.as_str() })
                .get();
        }
        Metrics {
            registry: root,
            ..m
        }
    }

    /// An audit row was appended for `act`.
    pub fn audit_row(&self, act: &'static str) {
        self.audit_rows.get_or_create(&ActLabels { act }).inc();
    }

    /// An audit write failed.
    pub fn audit_write_failure(&self) {
        self.audit_write_failures.inc();
    }

    /// A signed audit checkpoint of `kind` was written.
    pub fn audit_checkpoint(&self, kind: &'static str) {
        self.audit_checkpoints
            .get_or_create(&CheckpointLabels { kind })
            .inc();
    }

    /// Initialises every series whose labels are known from the configuration, so dashboards and `rate()` see zeros
    /// rather than gaps: partners, issuers, queues and pipelines.
    pub fn init_known(
        &self,
        partners: &[String],
        issuers: &[String],
        queues: &[String],
        pipelines: &[&'static str],
    ) {
        for source in ["amqp", "webhook", "backfill"] {
            for outcome in EVENT_OUTCOMES {
                let _ = self.events.get_or_create(&EventLabels { source, outcome });
            }
        }
        for outcome in WEBHOOK_OUTCOMES {
            let _ = self
                .webhook_requests
                .get_or_create(&OutcomeLabels { outcome });
        }
        for partner in partners {
            for outcome in SHARE_OUTCOMES {
                let _ = self.shares.get_or_create(&ShareLabels {
                    partner: partner.clone(),
                    outcome,
                });
            }
            let _ = self.tokens_published.get_or_create(&PartnerLabels {
                partner: partner.clone(),
            });
            let _ = self.unroutable.get_or_create(&PartnerLabels {
                partner: partner.clone(),
            });
            for event in ISSUER_NOTICE_EVENTS {
                let _ = self.notices.get_or_create(&NoticeLabels {
                    peer: partner.clone(),
                    event,
                });
            }
            let _ = self.notices_unacknowledged.get_or_create(&PartnerLabels {
                partner: partner.clone(),
            });
        }
        for issuer in issuers {
            for event in RECEIVER_NOTICE_EVENTS {
                let _ = self.notices.get_or_create(&NoticeLabels {
                    peer: issuer.clone(),
                    event,
                });
            }
            for outcome in crate::envelope::ImportOutcome::ALL
                .iter()
                .map(|o| o.as_str())
                .chain(EXTRA_IMPORT_OUTCOMES)
            {
                let _ = self.imports.get_or_create(&ImportLabels {
                    issuer: issuer.clone(),
                    outcome,
                });
            }
        }
        for direction in ["sent", "received"] {
            let _ = self
                .reshare_requests
                .get_or_create(&DirectionLabels { direction });
        }
        for operation in ["share", "import", "decision", "probe"] {
            let _ = self
                .didit_duration
                .get_or_create(&OperationLabels { operation });
        }
        for operation in ["share", "import", "publish"] {
            let _ = self.retries.get_or_create(&OperationLabels { operation });
        }
        for operation in ["share", "import"] {
            let _ = self
                .didit_rate_limited
                .get_or_create(&OperationLabels { operation });
        }
        for queue in queues {
            for reason in ["bad_message", "retries_exhausted"] {
                let _ = self.dead_lettered.get_or_create(&DeadLetterLabels {
                    queue: queue.clone(),
                    reason,
                });
            }
        }
        for result in CONFIRM_RESULTS {
            let _ = self
                .publish_confirms
                .get_or_create(&ConfirmLabels { result });
        }
        for &pipeline in pipelines {
            let labels = PipelineLabels { pipeline };
            let _ = self.in_flight.get_or_create(&labels);
            let _ = self.last_success.get_or_create(&labels);
            // The webhook intake publishes over the onboarding pipeline's connection: it has none of its own.
            if pipeline != pipeline::ISSUER_WEBHOOK {
                let _ = self.amqp_connected.get_or_create(&labels);
            }
            // Only consumers pause.
            if pipeline::CONSUMERS.contains(&pipeline) {
                let _ = self.delivery_retries.get_or_create(&labels);
                for reason in PAUSE_REASONS {
                    let _ = self
                        .paused
                        .get_or_create(&PausedLabels { pipeline, reason });
                }
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// A backfill handled one listed session for `partner` (one of [`BACKFILL_OUTCOMES`]).
    pub fn backfill_session(&self, partner: &str, outcome: &'static str) {
        self.backfill_sessions
            .get_or_create(&BackfillLabels {
                partner: partner.to_string(),
                outcome,
            })
            .inc();
    }

    /// Sets every backfill series of `partner` to exist (at zero), for the command's own `/metrics`.
    pub fn init_backfill(&self, partner: &str) {
        for outcome in BACKFILL_OUTCOMES {
            let _ = self.backfill_sessions.get_or_create(&BackfillLabels {
                partner: partner.to_string(),
                outcome,
            });
        }
    }

    /// An onboarding event was taken in.
    pub fn event(&self, source: &'static str, outcome: &'static str) {
        self.events
            .get_or_create(&EventLabels { source, outcome })
            .inc();
    }

    /// A webhook delivery was answered.
    pub fn webhook_request(&self, outcome: &'static str) {
        self.webhook_requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// A share attempt for a partner ended.
    pub fn share(&self, partner: &str, outcome: &'static str) {
        self.shares
            .get_or_create(&ShareLabels {
                partner: partner.to_string(),
                outcome,
            })
            .inc();
    }

    /// A token envelope for `partner` came back unroutable (`basic.return`, 312 `NO_ROUTE`).
    pub fn unroutable(&self, partner: &str) {
        self.unroutable
            .get_or_create(&PartnerLabels {
                partner: partner.to_string(),
            })
            .inc();
    }

    /// Counts one token envelope confirmed for `partner`.
    pub fn token_published(&self, partner: &str) {
        self.tokens_published
            .get_or_create(&PartnerLabels {
                partner: partner.to_string(),
            })
            .inc();
    }

    /// The receiver finished with a token.
    pub fn import(&self, issuer: &str, outcome: &'static str) {
        self.imports
            .get_or_create(&ImportLabels {
                issuer: issuer.to_string(),
                outcome,
            })
            .inc();
    }

    /// A key or secret file is watched under this config key: its error counter starts at zero, so that the first
    /// error is an increase Prometheus can see.
    pub fn key_watched(&self, key: &str) {
        let _ = self.key_reload_errors.get_or_create(&KeyLabels {
            key: key.to_string(),
        });
    }

    /// A key or secret file that is re-read on change could not be used (the last good value stays in use).
    pub fn key_reload_error(&self, key: &str) {
        self.key_reload_errors
            .get_or_create(&KeyLabels {
                key: key.to_string(),
            })
            .inc();
    }

    /// A notice event (see [`NoticeLabels`]).
    pub fn notice(&self, peer: &str, event: &'static str) {
        self.notices
            .get_or_create(&NoticeLabels {
                peer: peer.to_string(),
                event,
            })
            .inc();
    }

    /// How many notices `partner` has not acknowledged.
    pub fn notices_unacknowledged(&self, partner: &str, n: u64) {
        self.notices_unacknowledged
            .get_or_create(&PartnerLabels {
                partner: partner.to_string(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A reshare request was sent or received.
    pub fn reshare_request(&self, direction: &'static str) {
        self.reshare_requests
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    /// A Didit call finished with `status` (HTTP code or `timeout`, `connect_error`, `error`) after `elapsed`.
    pub fn didit_request(&self, operation: &'static str, status: &str, elapsed: Duration) {
        self.didit_requests
            .get_or_create(&DiditLabels {
                operation,
                status: status.to_string(),
            })
            .inc();
        self.didit_duration
            .get_or_create(&OperationLabels { operation })
            .observe(elapsed.as_secs_f64());
    }

    /// Didit answered 429 to `operation`.
    pub fn didit_rate_limited(&self, operation: &'static str) {
        self.didit_rate_limited
            .get_or_create(&OperationLabels { operation })
            .inc();
    }

    /// A write waited `waited` for room under the rate limit of the key used by `key` (its roles).
    pub fn limiter_wait(&self, key: &str, waited: Duration) {
        self.limiter_wait
            .get_or_create(&KeyLabels {
                key: key.to_string(),
            })
            .observe(waited.as_secs_f64());
    }

    /// A write could not fit under the key's rate limit before its message's hold deadline.
    pub fn limiter_deferred(&self, key: &str) {
        self.limiter_deferred
            .get_or_create(&KeyLabels {
                key: key.to_string(),
            })
            .inc();
    }

    /// A retry was scheduled.
    pub fn retry(&self, operation: &'static str) {
        self.retries
            .get_or_create(&OperationLabels { operation })
            .inc();
    }

    /// A consumer of `pipeline` sent a delivery to its retry queue (another attempt follows after
    /// `amqp.retry_delay_ms`). Not counted: the last attempt (dead-lettered as `retries_exhausted`) and a message
    /// parked while the pipeline pauses.
    pub fn delivery_retry(&self, pipeline: &'static str) {
        self.delivery_retries
            .get_or_create(&PipelineLabels { pipeline })
            .inc();
    }

    /// A message left `queue` for its dead-letter queue.
    pub fn dead_lettered(&self, queue: &str, reason: &'static str) {
        self.dead_lettered
            .get_or_create(&DeadLetterLabels {
                queue: queue.to_string(),
                reason,
            })
            .inc();
    }

    /// A publisher confirm arrived (or did not).
    pub fn publish_confirm(&self, result: &'static str) {
        self.publish_confirms
            .get_or_create(&ConfirmLabels { result })
            .inc();
    }

    /// Age of a token at import.
    pub fn token_age_at_import(&self, age: Duration) {
        self.token_age.observe(age.as_secs_f64());
    }

    /// Time from the verification finishing to the import.
    pub fn end_to_end(&self, elapsed: Duration) {
        self.end_to_end.observe(elapsed.as_secs_f64());
    }

    /// Marks one message in flight until the guard drops.
    pub fn in_flight(self: &Arc<Self>, pipeline: &'static str) -> InFlight {
        self.in_flight
            .get_or_create(&PipelineLabels { pipeline })
            .inc();
        InFlight {
            metrics: self.clone(),
            pipeline,
        }
    }

    /// The pipeline's broker connection went up or down.
    pub fn amqp_connected(&self, pipeline: &'static str, up: bool) {
        self.amqp_connected
            .get_or_create(&PipelineLabels { pipeline })
            .set(i64::from(up));
    }

    /// A lost broker connection was re-established.
    pub fn amqp_reconnect(&self) {
        self.amqp_reconnects.inc();
    }

    /// A pipeline paused or resumed.
    pub fn paused(&self, pipeline: &'static str, reason: &'static str, paused: bool) {
        self.paused
            .get_or_create(&PausedLabels { pipeline, reason })
            .set(i64::from(paused));
    }

    /// A pipeline finished a message successfully now.
    pub fn success(&self, pipeline: &'static str) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        self.last_success
            .get_or_create(&PipelineLabels { pipeline })
            .set(now);
    }
}

/// Decrements `in_flight` when dropped.
#[derive(Debug)]
pub struct InFlight {
    metrics: Arc<Metrics>,
    pipeline: &'static str,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics
            .in_flight
            .get_or_create(&PipelineLabels {
                pipeline: self.pipeline,
            })
            .dec();
    }
}

/// `process_*` metrics read from `/proc/self` on each scrape (Linux; nothing elsewhere).
#[derive(Debug)]
struct ProcessCollector;

/// What `/proc/self` tells about this process.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessStats {
    /// Resident set size in bytes.
    pub resident_bytes: u64,
    /// Virtual memory in bytes.
    pub virtual_bytes: u64,
    /// User + system CPU seconds.
    pub cpu_seconds: f64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The fd limit.
    pub max_fds: u64,
    /// Start time, unix seconds.
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// Reads the current process's figures; `None` where `/proc` is not available.
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may contain spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = 100.0; // USER_HZ on Linux
        let page = 4096u64;
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        let start_ticks: f64 = fields.get(19)?.parse().ok()?;
        let vsize: u64 = fields.get(20)?.parse().ok()?;
        let rss_pages: u64 = fields.get(21)?.parse().ok()?;
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("btime ")
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
        });
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
            })
            .unwrap_or(0);
        Some(ProcessStats {
            resident_bytes: rss_pages * page,
            virtual_bytes: vsize,
            cpu_seconds: (utime + stime) / ticks,
            open_fds,
            max_fds,
            start_time_seconds: boot_time.unwrap_or(0.0) + start_ticks / ticks,
        })
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stats) = ProcessStats::read() else {
            return Ok(());
        };
        let gauges: [(&str, &str, f64); 5] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                stats.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                stats.virtual_bytes as f64,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                stats.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                stats.max_fds as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                stats.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            let metric_encoder =
                encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric_encoder)?;
        }
        let cpu = ConstCounter::new(stats.cpu_seconds);
        let metric_encoder = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?;
        cpu.encode(metric_encoder)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_contract_names() {
        let m = Arc::new(Metrics::new());
        m.init_known(
            &["bank".into()],
            &["fintech".into()],
            &["pb.q".into()],
            &pipeline::ALL,
        );
        m.share("bank", "minted");
        let _g = m.in_flight(pipeline::RECEIVER_TOKENS);
        let text = m.encode();
        for name in [
            "partner_bridge_build_info{version=",
            "partner_bridge_events_total{",
            "partner_bridge_webhook_requests_total{",
            "partner_bridge_shares_total{partner=\"bank\",outcome=\"minted\"} 1",
            "partner_bridge_tokens_published_total{",
            "partner_bridge_unroutable_total{",
            "partner_bridge_imports_total{",
            "partner_bridge_reshare_requests_total{",
            "partner_bridge_didit_request_duration_seconds_bucket{",
            "partner_bridge_retries_total{",
            "partner_bridge_dead_lettered_total{",
            "partner_bridge_publish_confirms_total{",
            "partner_bridge_token_age_at_import_seconds_bucket",
            "partner_bridge_end_to_end_seconds_bucket",
            "partner_bridge_in_flight{pipeline=\"receiver_tokens\"} 1",
            "partner_bridge_amqp_connected{",
            "partner_bridge_amqp_reconnects_total",
            "partner_bridge_paused{",
            "partner_bridge_last_success_timestamp_seconds{",
            "partner_bridge_delivery_retries_total{pipeline=\"issuer_reshare\"} 0",
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
