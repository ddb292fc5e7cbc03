//! Minting one share token for one partner and publishing it: the unit of work both the onboarding consumer and
//! the reshare consumer are made of.
//!
//! Order matters, and is what makes "never lose, never import twice" hold on this side:
//! 1. claim (source session, partner) in the ledger — a duplicate event in flight elsewhere waits or retries later,
//!    and a token still valid from an earlier event means there is nothing to do;
//! 2. share through Didit, retrying in process within the delivery's hold deadline;
//! 3. publish the signed envelope and wait for the broker's confirm;
//! 4. only then complete the ledger row (a crash before this mints again on redelivery, which the receiver's ledger
//!    absorbs; recording before publishing could lose the token for good).
//!
//! The audit log gets two acts per token, each before anything is settled: `share_minted` once Didit answered
//! (before the publish) and `token_published` once the broker confirmed it (before the ledger row). A failed audit
//! write is a failed ledger write: the claim is released and the delivery pauses the pipeline (or is retried), so
//! the event comes back and mints again — a token whose `token_published` could not be recorded is on the broker
//! all the same (the receiver's ledger absorbs the second one), and the audit log shows both mints.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::consumer::Decision;
use crate::amqp::publisher::{Outgoing, PublishError, Publisher};
use crate::amqp::{HeaderValue, Names};
use crate::audit::{self, Act, ActKind, AuditLog, Side};
use crate::config::{PartnerConfig, RetryConfig};
use crate::didit::client::DiditClient;
use crate::didit::error::Disposition;
use crate::didit::wire::{SessionKind, SessionStatus, ShareTokenClaims};
use crate::envelope::{self, ShareTokenEnvelope};
use crate::health::Health;
use crate::keys::SigningKeys;
use crate::ledger::{Claim, LeaseKey, Ledger, ShareRecord};
use crate::metrics::Metrics;
use crate::retry::{Failure, with_backoff};

/// What the issuer needs to mint and publish.
pub(crate) struct Minter {
    pub client: DiditClient,
    pub ledger: Ledger,
    /// Every token minted and published is recorded here before its delivery is settled.
    pub audit: AuditLog,
    /// Publishes the tokens of every partner without a broker of its own (`issuer.tokens_url`, else `amqp.url`).
    pub tokens: Publisher,
    /// Partners whose tokens go to a broker of their own (`issuer.partners[].tokens_url`), by application id: one
    /// publisher per broker, shared by the partners on it.
    pub partner_tokens: HashMap<String, Publisher>,
    pub names: Names,
    /// The issuer's key set; its newest key signs (re-read on change).
    pub signing_key: SigningKeys,
    pub application_id: String,
    pub metrics: Arc<Metrics>,
    /// Readiness: a partner whose tokens come back unroutable is a `/readyz` reason until one is delivered.
    pub health: Arc<Health>,
    pub shutdown: CancellationToken,
    pub retry: RetryConfig,
    /// How long a claim protects a (session, partner) pair from concurrent minting.
    pub lease: Duration,
}

/// The `/readyz` part that names a partner whose tokens are unroutable.
pub(crate) fn unroutable_part(partner: &str) -> String {
    format!("unroutable:{partner}")
}

/// The verification being shared.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub session_id: String,
    pub kind: SessionKind,
    pub status: SessionStatus,
    pub vendor_data: Option<String>,
    pub event_id: String,
    pub occurred_at: DateTime<Utc>,
}

/// How minting for one partner ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Minted {
    /// A new token is on the broker.
    Published,
    /// A token from an earlier event is still valid: nothing to do.
    AlreadyValid,
    /// This partner's share failed for good.
    DeadLetter {
        reason: &'static str,
        detail: String,
    },
    /// Try again later through the retry queue.
    Retry { detail: String },
    /// Only Didit's rate limit stands in the way: through the retry queue without counting an attempt.
    Paced { detail: String },
    /// The pipeline must pause (credentials).
    Pause {
        reason: &'static str,
        detail: String,
    },
    /// Shutdown interrupted the work.
    Shutdown,
}

/// Options of one mint.
pub(crate) struct MintRequest<'a> {
    pub partner: &'a PartnerConfig,
    pub source: &'a Source,
    /// The reshare path: the envelope whose token expired; forces a fresh mint even if the ledger says it is valid.
    pub stale_message_id: Option<&'a str>,
    pub deadline: Instant,
}

impl Minter {
    /// The publisher of `application_id`'s tokens: its own broker's, else the default one.
    pub fn tokens_for(&self, application_id: &str) -> &Publisher {
        self.partner_tokens
            .get(application_id)
            .unwrap_or(&self.tokens)
    }

    /// Mints and publishes a token for one partner, following the order in the module doc.
    pub async fn mint(&self, req: MintRequest<'_>) -> Minted {
        let partner = req.partner;
        let holder = uuid::Uuid::new_v4().to_string();
        let previous = loop {
            let claim = self
                .ledger
                .claim_share(
                    &req.source.session_id,
                    &partner.application_id,
                    &holder,
                    self.lease,
                    Duration::ZERO,
                    req.stale_message_id,
                    Utc::now(),
                )
                .await;
            match claim {
                Ok(Claim::Acquired { previous }) => break previous,
                Ok(Claim::Done(record)) => {
                    tracing::info!(
                        source_session_id = %req.source.session_id,
                        partner = %partner.name,
                        message_id = %record.message_id,
                        "token from an earlier event still valid; not minting again"
                    );
                    self.metrics.share(&partner.name, "skipped_valid");
                    return Minted::AlreadyValid;
                }
                Ok(Claim::Busy { until }) => {
                    // Another delivery is minting this pair right now; it will finish or its lease will lapse.
                    let wait = (until - Utc::now())
                        .to_std()
                        .unwrap_or_default()
                        .min(Duration::from_millis(100));
                    if Instant::now() + wait > req.deadline || self.shutdown.is_cancelled() {
                        return Minted::Retry {
                            detail: format!(
                                "another delivery is minting for partner {} right now",
                                partner.name
                            ),
                        };
                    }
                    tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, partner = %partner.name, "ledger call failed");
                    return match crate::probe::ledger_decision(&e) {
                        Decision::Pause { reason, detail } => {
                            self.metrics.share(&partner.name, "paused");
                            Minted::Pause { reason, detail }
                        }
                        _ => Minted::Retry {
                            detail: format!("ledger: {e}"),
                        },
                    };
                }
            }
        };
        // Held as long as this mint works on it (backoffs, the publish's confirm); lapses soon after a crash.
        let _alive = self.ledger.keep_alive(
            LeaseKey::Share {
                source_session_id: req.source.session_id.clone(),
                partner_application_id: partner.application_id.clone(),
            },
            &holder,
            self.lease,
        );

        let outcome = self.share_and_publish(&req, previous.as_ref()).await;
        match &outcome {
            Ok(record) => {
                if let Err(e) = self.ledger.complete_share(record, &holder).await {
                    // The token is on the broker; a lost ledger row only means a redelivered event mints again,
                    // and the receiver's ledger absorbs that.
                    tracing::warn!(error = %e, message_id = %record.message_id, "token published but not recorded");
                }
                Minted::Published
            }
            Err(result) => {
                if let Err(e) = self
                    .ledger
                    .release_share(&req.source.session_id, &partner.application_id, &holder)
                    .await
                {
                    tracing::warn!(error = %e, "could not release ledger claim; it lapses with its lease");
                }
                result.clone()
            }
        }
    }

    /// An act about `source` shared with `partner`, on the issuer side.
    pub(crate) fn act(&self, kind: ActKind, partner: &PartnerConfig, source: &Source) -> Act {
        let mut act = Act::new(kind, Side::Issuer)
            .partner(&partner.name, &partner.application_id)
            .session(&source.session_id)
            .event(&source.event_id);
        act.vendor_data = source.vendor_data.clone();
        act.agreement_id = partner.agreement_id.clone();
        act
    }

    /// Records `act`; a failure ends the mint as a failed ledger write would (pause while the database is
    /// unavailable, else retry), so nothing is settled without its act.
    pub(crate) async fn record(&self, partner: &PartnerConfig, act: Act) -> Result<(), Minted> {
        let kind = act.kind;
        match self.audit.record(act).await {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, partner = %partner.name, act = %kind, "audit act not recorded");
                Err(match crate::probe::ledger_decision(&e) {
                    Decision::Pause { reason, detail } => {
                        self.metrics.share(&partner.name, "paused");
                        Minted::Pause {
                            reason,
                            detail: format!("audit log: {detail}"),
                        }
                    }
                    _ => {
                        self.metrics.share(&partner.name, "retried");
                        Minted::Retry {
                            detail: format!("audit log: {e}"),
                        }
                    }
                })
            }
        }
    }

    async fn share_and_publish(
        &self,
        req: &MintRequest<'_>,
        previous: Option<&ShareRecord>,
    ) -> Result<ShareRecord, Minted> {
        let partner = req.partner;
        let source = req.source;
        let tokens = self.tokens_for(&partner.application_id);
        // The partner's broker is down (each partner's broker is its own link): no token is minted that could not
        // be delivered, and only this partner waits; the outcome is the one of an unconfirmed publish.
        if let Err(e) = tokens.link().try_connection().await {
            self.metrics.share(&partner.name, "retried");
            self.metrics.retry("publish");
            tracing::warn!(
                source_session_id = %source.session_id,
                partner = %partner.name,
                broker = %tokens.link().redacted_url(),
                error = %e,
                "the partner's token broker is unavailable; will mint later"
            );
            return Err(Minted::Retry {
                detail: format!(
                    "the token broker {} is unavailable: {e}",
                    tokens.link().redacted_url()
                ),
            });
        }
        let shared = with_backoff(
            &self.retry,
            req.deadline,
            "share",
            &self.metrics,
            &self.shutdown,
            || {
                self.client.share_by(
                    &source.session_id,
                    &partner.application_id,
                    partner.ttl_seconds,
                    Some(req.deadline),
                )
            },
        )
        .await;
        let response = match shared {
            Ok(response) => response,
            Err(Failure::Shutdown) => return Err(Minted::Shutdown),
            Err(Failure::Didit(e)) => {
                let detail = e.to_string();
                let result = match e.disposition() {
                    Disposition::Retry { .. } if e.is_pacing() => {
                        self.metrics.share(&partner.name, "paced");
                        Minted::Paced { detail }
                    }
                    Disposition::Retry { .. } => {
                        self.metrics.share(&partner.name, "retried");
                        Minted::Retry { detail }
                    }
                    Disposition::Pause { reason } => {
                        self.metrics.share(&partner.name, "paused");
                        Minted::Pause { reason, detail }
                    }
                    Disposition::DeadLetter { reason } => {
                        self.metrics.share(
                            &partner.name,
                            if reason == "session_not_found" {
                                "not_found"
                            } else {
                                "rejected"
                            },
                        );
                        Minted::DeadLetter { reason, detail }
                    }
                    Disposition::Duplicate | Disposition::Reshare => {
                        self.metrics.share(&partner.name, "failed");
                        Minted::DeadLetter {
                            reason: "share_rejected",
                            detail: format!("unexpected answer to share: {detail}"),
                        }
                    }
                };
                tracing::warn!(
                    source_session_id = %source.session_id,
                    partner = %partner.name,
                    error = %e,
                    "share failed"
                );
                return Err(result);
            }
        };

        let minted_at = Utc::now();
        let claims = ShareTokenClaims::peek(response.share_token.expose());
        let kind = response
            .session_kind
            .or_else(|| claims.as_ref().and_then(|c| c.session_kind))
            .unwrap_or(source.kind);
        let expires_at = claims
            .as_ref()
            .and_then(|c| DateTime::<Utc>::from_timestamp(c.exp, 0))
            .unwrap_or(minted_at + chrono::Duration::seconds(i64::from(partner.ttl_seconds)));
        let message_id = uuid::Uuid::now_v7().to_string();
        let token_id = audit::token_id(response.share_token.expose());
        let status = source.status.for_kind(kind).to_string();
        self.record(
            partner,
            self.act(ActKind::ShareMinted, partner, source)
                .message(&message_id)
                .token(&token_id)
                .status(status.clone())
                .once(&token_id),
        )
        .await?;
        let envelope = ShareTokenEnvelope {
            kind: envelope::types::SHARE_TOKEN.to_string(),
            message_id: message_id.clone(),
            event_id: source.event_id.clone(),
            share_token: response.share_token,
            session_kind: kind,
            source_session_id: source.session_id.clone(),
            from_application_id: self.application_id.clone(),
            for_application_id: partner.application_id.clone(),
            source_status: source.status.for_kind(kind).to_string(),
            source_vendor_data: if partner.share_vendor_data {
                source.vendor_data.clone()
            } else {
                None
            },
            minted_at,
            expires_at,
            occurred_at: source.occurred_at,
            agreement_id: partner.agreement_id.clone(),
        };
        let body = serde_json::to_vec(&envelope).expect("envelopes serialise");
        let signer = self.signing_key.signer();
        let signature = signer.sign(&body);
        let routing_key = Names::token_key(&partner.application_id);
        let exchange = self.names.tokens_exchange();
        let published = tokens
            .publish(Outgoing {
                exchange: &exchange,
                routing_key: &routing_key,
                body: &body,
                message_id: &message_id,
                kind: envelope::types::SHARE_TOKEN,
                headers: vec![
                    (
                        envelope::HEADER_SIGNATURE.to_string(),
                        HeaderValue::Str(signature),
                    ),
                    (
                        envelope::HEADER_KEY_ID.to_string(),
                        HeaderValue::Str(signer.key_id().to_string()),
                    ),
                ],
            })
            .await;
        if let Err(e) = published {
            self.metrics.share(&partner.name, "retried");
            self.metrics.retry("publish");
            if let PublishError::Returned {
                reply_code,
                reply_text,
            } = &e
            {
                // Nothing consumes this partner's tokens yet: its receiver has not declared its queue (see
                // docs/topology.md). Name the partner and the routing key where an operator looks.
                self.metrics.unroutable(&partner.name);
                self.health.not_ready(
                    &unroutable_part(&partner.name),
                    format!(
                        "tokens for partner {} come back unroutable ({reply_code} {reply_text}): no queue is bound to {exchange} for routing key {routing_key}; start the partner's receiver or declare its queue",
                        partner.name
                    ),
                );
                tracing::error!(
                    %message_id,
                    source_session_id = %source.session_id,
                    partner = %partner.name,
                    %routing_key,
                    %exchange,
                    "token unroutable: no queue is bound for the partner's routing key (its receiver has not declared its queue); will mint again"
                );
                return Err(Minted::Retry {
                    detail: format!("publishing to {exchange} with key {routing_key} failed: {e}"),
                });
            }
            tracing::warn!(
                %message_id,
                source_session_id = %source.session_id,
                partner = %partner.name,
                error = %e,
                "token not confirmed by the broker; will mint again"
            );
            return Err(Minted::Retry {
                detail: format!("publishing to {exchange} with key {routing_key} failed: {e}"),
            });
        }
        // Before the ledger row: a failure here releases the claim, and the event that comes back mints again.
        self.record(
            partner,
            self.act(ActKind::TokenPublished, partner, source)
                .message(&message_id)
                .token(&token_id)
                .status(status)
                .once(&message_id),
        )
        .await?;
        self.metrics.share(&partner.name, "minted");
        self.metrics.token_published(&partner.name);
        self.health.remove(&unroutable_part(&partner.name));
        tracing::info!(
            %message_id,
            source_session_id = %source.session_id,
            partner = %partner.name,
            expires_at = %envelope::rfc3339(expires_at),
            "token published"
        );
        Ok(ShareRecord {
            source_session_id: source.session_id.clone(),
            partner_application_id: partner.application_id.clone(),
            message_id,
            event_id: source.event_id.clone(),
            session_kind: kind,
            status: source.status.for_kind(kind).to_string(),
            vendor_data: source.vendor_data.clone(),
            occurred_at: source.occurred_at,
            minted_at,
            expires_at,
            reshares: previous.map(|p| p.reshares).unwrap_or(0)
                + u32::from(req.stale_message_id.is_some()),
        })
    }
}
