//! The `share_token` consumer: one envelope in, one decision out (DESIGN.md §2, §4, §5).
//!
//! In order: the body must parse; the issuer must be configured (or unknown issuers explicitly allowed); the Ed25519
//! signature must verify against that issuer's key (or unsigned envelopes explicitly allowed); the token must be for
//! this application. Then the receiver ledger is claimed for (issuer application, source session): an imported
//! session is answered `duplicate` without calling Didit. An expired token is never sent to Didit: the issuer is asked
//! for a fresh one (at most `receiver.max_reshares` times). Otherwise the token is imported with the workflow of its
//! kind, `vendor_data` from the template and `trust_review` from the issuer's policy; every answer ends as the import
//! table of DESIGN.md §4 says, and each outcome is published as `import.result` before the envelope is acked.
//!
//! Ack ordering: import → ledger row → `import.result` confirmed → ack. A crash after the import but before the ledger
//! row means a redelivery gets 403 already-imported (reported `duplicate`); a crash after the ledger row but before the
//! result is published means the redelivery finds `result_published = false` and publishes `imported` then — once
//! the crashed delivery's lease has run out, so that a second token handled while the first is still publishing
//! waits and reports `duplicate` instead of a second `imported`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::Names;
use crate::amqp::consumer::{Decision, Handler, Incoming};
use crate::amqp::publisher::{Outgoing, Publisher};
use crate::config::RetryConfig;
use crate::didit::client::DiditClient;
use crate::didit::error::Disposition;
use crate::didit::wire::{ImportRequest, SessionDecision, ShareTokenClaims};
use crate::envelope::{
    self, ImportOutcome, ImportResult, Message, ReshareRequest, ShareTokenEnvelope, VerifyingKey,
};
use crate::ledger::{Claim, ImportRecord, LeaseKey, Ledger};
use crate::metrics::{Metrics, pipeline};
use crate::receiver::outcome::{outcome_for_reason, render_vendor_data, workflow_for};
use crate::retry::{Failure, with_backoff};

/// An issuer this receiver trusts.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub name: String,
    pub application_id: String,
    pub key: Option<VerifyingKey>,
    pub trust_review: bool,
}

/// Handles `share_token` deliveries.
pub(crate) struct TokenHandler {
    pub client: DiditClient,
    pub ledger: Ledger,
    pub publisher: Publisher,
    pub names: Names,
    pub application_id: String,
    pub peers: Vec<Peer>,
    pub allow_unsigned: bool,
    pub allow_unknown_issuers: bool,
    pub workflow_user: Option<String>,
    pub workflow_business: Option<String>,
    pub vendor_template: String,
    pub max_reshares: u32,
    pub max_message_bytes: usize,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    pub retry: RetryConfig,
    pub lease: Duration,
}

/// Everything known about one token while it is handled.
struct Job<'a> {
    envelope: &'a ShareTokenEnvelope,
    peer: Peer,
    deadline: Instant,
}

impl Handler for TokenHandler {
    async fn handle(&self, msg: Incoming) -> Decision {
        let deadline = Instant::now() + self.retry.hold_max();
        let envelope = match envelope::parse(&msg.body, self.max_message_bytes) {
            Ok(Message::ShareToken(envelope)) => envelope,
            Ok(_) => {
                return self.refuse(
                    "unknown",
                    "unknown_type",
                    format!("expected {} on this queue", envelope::types::SHARE_TOKEN),
                );
            }
            Err(bad) => {
                tracing::warn!(message_id = ?msg.message_id, reason = bad.reason, detail = %bad.detail, "bad share_token envelope");
                return self.refuse("unknown", bad.reason, bad.detail);
            }
        };
        let peer = match self
            .peers
            .iter()
            .find(|p| p.application_id == envelope.from_application_id)
        {
            Some(peer) => peer.clone(),
            None if self.allow_unknown_issuers => Peer {
                name: "unknown".into(),
                application_id: envelope.from_application_id.clone(),
                key: None,
                trust_review: false,
            },
            None => {
                return self.refuse(
                    "unknown",
                    "unknown_issuer",
                    format!(
                        "application {} is not a [[receiver.issuers]] entry",
                        envelope.from_application_id
                    ),
                );
            }
        };
        if let Err(decision) = self.check_signature(&msg, &peer) {
            return decision;
        }
        let job = Job {
            envelope: &envelope,
            peer,
            deadline,
        };
        let claims = ShareTokenClaims::peek(envelope.share_token.expose());
        let claimed_for = claims.as_ref().map(|c| c.for_application_id.as_str());
        if envelope.for_application_id != self.application_id
            || claimed_for.is_some_and(|id| id != self.application_id)
        {
            let detail = format!(
                "token is for application {}, this receiver is {}",
                claimed_for.unwrap_or(&envelope.for_application_id),
                self.application_id
            );
            return self.finish_failed(&job, "misrouted", detail).await;
        }
        // The ledger keys on the envelope's session and issuer: a token that says otherwise would be recorded under
        // the wrong key and escape the one-import guarantee. Only the issuer's own key can sign such an envelope,
        // but a bug there must not become a second import here.
        if let Some(c) = &claims
            && (c.session_id != envelope.source_session_id
                || c.from_application_id != envelope.from_application_id)
        {
            return self.refuse(
                &job.peer.name,
                "invalid_field",
                format!(
                    "the token is for session {} from application {}, the envelope says session {} from {}",
                    c.session_id, c.from_application_id, envelope.source_session_id, envelope.from_application_id
                ),
            );
        }
        tracing::debug!(message_id = %envelope.message_id, source_session_id = %envelope.source_session_id, issuer = %job.peer.name, "token received");
        self.import(&job, claims.as_ref()).await
    }
}

impl TokenHandler {
    /// A message that is not a token we can act on: dead-letter it and count it.
    fn refuse(&self, issuer: &str, reason: &'static str, detail: String) -> Decision {
        self.metrics.import(issuer, "bad_message");
        Decision::DeadLetter { reason, detail }
    }

    fn check_signature(&self, msg: &Incoming, peer: &Peer) -> Result<(), Decision> {
        let Some(signature) = msg.header(envelope::HEADER_SIGNATURE) else {
            if self.allow_unsigned {
                return Ok(());
            }
            return Err(self.refuse(
                &peer.name,
                "unsigned",
                "envelope carries no x-pb-signature header".into(),
            ));
        };
        let Some(key) = &peer.key else {
            // An unknown issuer, explicitly allowed: there is no key to check against.
            return Ok(());
        };
        if let Some(key_id) = msg.header(envelope::HEADER_KEY_ID)
            && key_id != key.key_id()
        {
            return Err(self.refuse(
                &peer.name,
                "bad_signature",
                format!(
                    "signed with key {key_id}, but issuer {} is configured with key {}",
                    peer.name,
                    key.key_id()
                ),
            ));
        }
        key.verify(&msg.body, signature)
            .map_err(|bad| self.refuse(&peer.name, bad.reason, bad.detail))
    }

    async fn import(&self, job: &Job<'_>, claims: Option<&ShareTokenClaims>) -> Decision {
        let envelope = job.envelope;
        let Some(workflow_id) = workflow_for(
            envelope.session_kind,
            self.workflow_user.as_deref(),
            self.workflow_business.as_deref(),
        ) else {
            let detail = format!(
                "no workflow configured for {} sessions (receiver.workflow_{})",
                envelope.session_kind, envelope.session_kind
            );
            return self.finish_failed(job, "no_workflow", detail).await;
        };
        let holder = uuid::Uuid::new_v4().to_string();
        loop {
            let claim = self
                .ledger
                .claim_import(
                    &job.peer.application_id,
                    &envelope.source_session_id,
                    &holder,
                    self.lease,
                    Utc::now(),
                )
                .await;
            let until = match claim {
                Ok(Claim::Acquired { .. }) => break,
                Ok(Claim::Done(record)) => match self.result_pending_until(&record) {
                    Some(until) => until,
                    None => return self.already_imported(job, record).await,
                },
                Ok(Claim::Busy { until }) => until,
                Err(e) => {
                    self.metrics.import(&job.peer.name, "retried");
                    return crate::probe::ledger_decision(&e);
                }
            };
            let wait = (until - Utc::now())
                .to_std()
                .unwrap_or_default()
                .min(Duration::from_millis(100));
            if Instant::now() + wait > job.deadline || self.shutdown.is_cancelled() {
                self.metrics.import(&job.peer.name, "retried");
                return Decision::Retry {
                    detail: "another delivery is importing this session right now".into(),
                    headers: Vec::new(),
                };
            }
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
        // Renewed while this delivery works on the session; lapses within `ledger.lease_ms` if the process dies.
        let _alive = self.ledger.keep_alive(
            LeaseKey::Import {
                issuer_application_id: job.peer.application_id.clone(),
                source_session_id: envelope.source_session_id.clone(),
            },
            &holder,
            self.lease,
        );

        let now = Utc::now();
        let expired_by_claim = claims
            .and_then(|c| DateTime::<Utc>::from_timestamp(c.exp, 0))
            .is_some_and(|exp| exp <= now);
        if envelope.expires_at <= now || expired_by_claim {
            self.release(job, &holder).await;
            tracing::info!(message_id = %envelope.message_id, source_session_id = %envelope.source_session_id, issuer = %job.peer.name, "token expired before import; asking the issuer for a fresh one");
            return self
                .reshare(job, "token expired before it could be imported")
                .await;
        }

        let request = ImportRequest {
            share_token: envelope.share_token.clone(),
            workflow_id,
            vendor_data: render_vendor_data(
                &self.vendor_template,
                envelope.source_vendor_data.as_deref(),
                &envelope.source_session_id,
                &job.peer.name,
            ),
            trust_review: job.peer.trust_review,
        };
        let imported = with_backoff(
            &self.retry,
            job.deadline,
            "import",
            &self.metrics,
            &self.shutdown,
            || self.client.import(&request),
        )
        .await;
        match imported {
            Ok(decision) => self.imported(job, &holder, &request, decision).await,
            Err(Failure::Shutdown) => {
                self.release(job, &holder).await;
                Decision::Requeue
            }
            Err(Failure::Didit(e)) => {
                let detail = e.to_string();
                match e.disposition() {
                    Disposition::Duplicate => {
                        // Didit says this token was imported here already (a crash after the import, before our
                        // ledger row): success, without the new session's id.
                        let record = ImportRecord {
                            issuer_application_id: job.peer.application_id.clone(),
                            source_session_id: envelope.source_session_id.clone(),
                            imported_session_id: None,
                            session_number: None,
                            status: None,
                            session_kind: envelope.session_kind,
                            vendor_data: request.vendor_data.clone(),
                            trust_review: request.trust_review,
                            imported_at: Utc::now(),
                            result_published: false,
                        };
                        if let Err(e) = self.ledger.complete_import(&record, &holder).await {
                            tracing::warn!(error = %e, "could not record the duplicate import");
                        }
                        self.already_imported(job, record).await
                    }
                    Disposition::Reshare => {
                        self.release(job, &holder).await;
                        self.reshare(job, &detail).await
                    }
                    Disposition::Pause { reason } => {
                        self.release(job, &holder).await;
                        self.metrics.import(&job.peer.name, "paused");
                        tracing::error!(issuer = %job.peer.name, reason, error = %detail, "import impossible until an operator acts; pausing");
                        Decision::Pause { reason, detail }
                    }
                    Disposition::Retry { .. } => {
                        self.release(job, &holder).await;
                        self.metrics.import(&job.peer.name, "retried");
                        Decision::Retry {
                            detail,
                            headers: Vec::new(),
                        }
                    }
                    Disposition::DeadLetter { reason } => {
                        self.release(job, &holder).await;
                        self.finish_failed(job, reason, detail).await
                    }
                }
            }
        }
    }

    /// A recorded import whose `import.result` is not confirmed yet still belongs to the delivery that made it,
    /// for as long as that delivery's lease would have lasted: it is publishing the result right now (a second
    /// token for the session, handled at the same moment, must then wait and report `duplicate`, not `imported`
    /// again), or it died (then, after the lease, whoever comes next publishes `imported` for it).
    fn result_pending_until(&self, record: &ImportRecord) -> Option<DateTime<Utc>> {
        if record.result_published || record.imported_session_id.is_none() {
            return None;
        }
        let lease = chrono::Duration::from_std(self.lease).unwrap_or(chrono::Duration::MAX);
        let until = record.imported_at.checked_add_signed(lease)?;
        (until > Utc::now()).then_some(until)
    }

    async fn release(&self, job: &Job<'_>, holder: &str) {
        if let Err(e) = self
            .ledger
            .release_import(
                &job.peer.application_id,
                &job.envelope.source_session_id,
                holder,
            )
            .await
        {
            tracing::warn!(error = %e, "could not release ledger claim; it lapses with its lease");
        }
    }

    async fn imported(
        &self,
        job: &Job<'_>,
        holder: &str,
        request: &ImportRequest,
        decision: SessionDecision,
    ) -> Decision {
        let envelope = job.envelope;
        let now = Utc::now();
        let record = ImportRecord {
            issuer_application_id: job.peer.application_id.clone(),
            source_session_id: envelope.source_session_id.clone(),
            imported_session_id: Some(decision.session_id.clone()),
            session_number: decision.session_number,
            status: Some(decision.status.clone()),
            session_kind: decision.session_kind.unwrap_or(envelope.session_kind),
            vendor_data: decision
                .vendor_data
                .clone()
                .or_else(|| request.vendor_data.clone()),
            trust_review: request.trust_review,
            imported_at: now,
            result_published: false,
        };
        if let Err(e) = self.ledger.complete_import(&record, holder).await {
            // The import happened; without the row a redelivery gets 403 already-imported and reports duplicate.
            tracing::warn!(error = %e, message_id = %envelope.message_id, "imported but not recorded in the ledger");
        }
        self.metrics
            .import(&job.peer.name, ImportOutcome::Imported.as_str());
        self.metrics
            .token_age_at_import((now - envelope.minted_at).to_std().unwrap_or_default());
        self.metrics
            .end_to_end((now - envelope.occurred_at).to_std().unwrap_or_default());
        tracing::info!(
            message_id = %envelope.message_id,
            source_session_id = %envelope.source_session_id,
            issuer = %job.peer.name,
            imported_session_id = %decision.session_id,
            status = %decision.status,
            "session imported"
        );
        self.publish_and_ack(&record, ImportOutcome::Imported, None)
            .await
    }

    /// The ledger (or Didit) says this session is already imported here.
    async fn already_imported(&self, job: &Job<'_>, record: ImportRecord) -> Decision {
        // A row whose result never reached the backend is reported as the import it was.
        let outcome = if record.result_published || record.imported_session_id.is_none() {
            ImportOutcome::Duplicate
        } else {
            ImportOutcome::Imported
        };
        if outcome == ImportOutcome::Duplicate {
            self.metrics
                .import(&job.peer.name, ImportOutcome::Duplicate.as_str());
            tracing::info!(message_id = %job.envelope.message_id, source_session_id = %job.envelope.source_session_id, issuer = %job.peer.name, "session already imported; acking as duplicate");
        }
        let reason = (outcome == ImportOutcome::Duplicate)
            .then(|| "session already imported into this application".to_string());
        self.publish_and_ack(&record, outcome, reason).await
    }

    async fn publish_and_ack(
        &self,
        record: &ImportRecord,
        outcome: ImportOutcome,
        reason: Option<String>,
    ) -> Decision {
        let result = ImportResult {
            kind: envelope::types::IMPORT_RESULT.to_string(),
            outcome,
            source_session_id: record.source_session_id.clone(),
            from_application_id: record.issuer_application_id.clone(),
            imported_session_id: record.imported_session_id.clone(),
            session_number: record.session_number,
            status: record.status.clone(),
            session_kind: record.session_kind,
            vendor_data: record.vendor_data.clone(),
            trust_review: record.trust_review,
            imported_at: record.imported_at,
            reason,
        };
        if let Err(detail) = self.publish_result(&result).await {
            return Decision::Retry {
                detail,
                headers: Vec::new(),
            };
        }
        if outcome == ImportOutcome::Imported
            && !record.result_published
            && let Err(e) = self
                .ledger
                .mark_result_published(&record.issuer_application_id, &record.source_session_id)
                .await
        {
            tracing::warn!(error = %e, "could not mark the result published; a redelivery may publish it again");
        }
        self.metrics.success(pipeline::RECEIVER_TOKENS);
        Decision::Ack
    }

    async fn publish_result(&self, result: &ImportResult) -> Result<(), String> {
        let body = serde_json::to_vec(result).expect("results serialise");
        let message_id = uuid::Uuid::now_v7().to_string();
        let exchange = self.names.imports_exchange();
        let routing_key = Names::import_key(result.outcome.as_str());
        self.publisher
            .publish(Outgoing {
                exchange: &exchange,
                routing_key: &routing_key,
                body: &body,
                message_id: &message_id,
                kind: envelope::types::IMPORT_RESULT,
                headers: Vec::new(),
            })
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, %exchange, %routing_key, "import.result not confirmed; will retry (is a queue bound to the imports exchange?)");
                self.metrics.retry("publish");
                format!("publishing import.result to {exchange} with key {routing_key} failed: {e}")
            })
    }

    /// A failure that ends the token: report it to the backend, then dead-letter the envelope.
    async fn finish_failed(&self, job: &Job<'_>, reason: &'static str, detail: String) -> Decision {
        let envelope = job.envelope;
        let outcome = outcome_for_reason(reason);
        self.metrics.import(
            &job.peer.name,
            if reason == "forbidden" {
                "forbidden"
            } else {
                outcome.as_str()
            },
        );
        tracing::warn!(
            message_id = %envelope.message_id,
            source_session_id = %envelope.source_session_id,
            issuer = %job.peer.name,
            reason,
            detail = %detail,
            "token not imported; dead-lettering"
        );
        let result = ImportResult {
            kind: envelope::types::IMPORT_RESULT.to_string(),
            outcome,
            source_session_id: envelope.source_session_id.clone(),
            from_application_id: envelope.from_application_id.clone(),
            imported_session_id: None,
            session_number: None,
            status: None,
            session_kind: envelope.session_kind,
            vendor_data: None,
            trust_review: job.peer.trust_review,
            imported_at: Utc::now(),
            reason: Some(format!("{reason}: {detail}")),
        };
        if let Err(detail) = self.publish_result(&result).await {
            return Decision::Retry {
                detail,
                headers: Vec::new(),
            };
        }
        Decision::DeadLetter { reason, detail }
    }

    /// Asks the issuer for a fresh token, or gives up with `expired` after `max_reshares` requests.
    async fn reshare(&self, job: &Job<'_>, why: &str) -> Decision {
        let envelope = job.envelope;
        let attempt = match self
            .ledger
            .bump_reshares(&job.peer.application_id, &envelope.source_session_id)
            .await
        {
            Ok(n) => n,
            Err(e) => return crate::probe::ledger_decision(&e),
        };
        if attempt > self.max_reshares {
            return self
                .finish_failed(
                    job,
                    "expired",
                    format!(
                        "{why}; already asked the issuer {} time(s) (receiver.max_reshares)",
                        self.max_reshares
                    ),
                )
                .await;
        }
        let request = ReshareRequest {
            kind: envelope::types::RESHARE_REQUEST.to_string(),
            source_session_id: envelope.source_session_id.clone(),
            for_application_id: self.application_id.clone(),
            reason: "token_expired".into(),
            attempt,
            original_message_id: envelope.message_id.clone(),
        };
        let body = serde_json::to_vec(&request).expect("requests serialise");
        let message_id = uuid::Uuid::now_v7().to_string();
        let exchange = self.names.reshare_exchange();
        let routing_key = Names::reshare_key(&job.peer.application_id);
        let published = self
            .publisher
            .publish(Outgoing {
                exchange: &exchange,
                routing_key: &routing_key,
                body: &body,
                message_id: &message_id,
                kind: envelope::types::RESHARE_REQUEST,
                headers: Vec::new(),
            })
            .await;
        match published {
            Ok(()) => {
                self.metrics.reshare_request("sent");
                self.metrics.import(&job.peer.name, "reshare_requested");
                tracing::info!(message_id = %envelope.message_id, source_session_id = %envelope.source_session_id, issuer = %job.peer.name, attempt, "reshare requested");
                Decision::Ack
            }
            Err(e) => {
                self.metrics.retry("publish");
                Decision::Retry {
                    detail: format!(
                        "publishing reshare.request to {exchange} with key {routing_key} failed: {e}"
                    ),
                    headers: Vec::new(),
                }
            }
        }
    }
}
