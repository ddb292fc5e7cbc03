//! Erasure and rectification notices, issuer side (GDPR Art. 19: tell every recipient of a person's data).
//!
//! A request names a session and a kind (`partner-bridge notify`, or a `subject.notice.requested` from the
//! issuer's backend on the onboarding exchange). Its recipients are every partner the audit log shows a
//! `token_published` act for that session, joined with every configured partner the ledger still has a share row
//! for (the ledger's rows age out with `ledger.retention_days`, the audit log's are kept five years; either one is
//! enough to be told). A session never shared has no recipient and the request sends nothing (and says so).
//!
//! For each recipient a row in `notices_sent` is written first (one per request and recipient: a redelivered
//! request finds its rows and sends nothing new), then a signed `subject.notice` is published on the tokens
//! exchange with key `notice.<recipient application id>` — the same Ed25519 key and headers as share tokens. A
//! notice stays open until the recipient's signed `subject.notice.ack` arrives (reshare exchange, key
//! `notice-ack.<own application id>`), verified against that partner's `public_keys` like a reshare request.
//! Open notices are sent again, with the same `notice_id`, every `issuer.notice_retry_secs`
//! ([`run_retries`]); the receiver's ledger makes a repeat harmless. `notices_unacknowledged{partner}` counts the
//! open ones. The audit log gets `notice_sent` (first send), and `notice_acknowledged` (first ack).

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::amqp::Names;
use crate::amqp::consumer::{Decision, Handler, Incoming};
use crate::amqp::publisher::{Outgoing, Publisher};
use crate::audit::{Act, ActKind, AuditLog, Side};
use crate::config::PartnerConfig;
use crate::envelope::{self, Message, NoticeKind, NoticeRequested, SubjectNotice};
use crate::issuer::reshare::{ResharePartner, check_signature};
use crate::keys::SigningKeys;
use crate::ledger::{AckRecorded, Ledger, LedgerError, SentNotice};
use crate::metrics::{Metrics, pipeline};

/// Open notices read per retry round.
const RETRY_BATCH: i64 = 200;

/// Sends notices and keeps them until acknowledged. Shared by the `notify` command and the running issuer.
#[derive(Clone)]
pub struct Notifier {
    /// The issuer's ledger.
    pub ledger: Ledger,
    /// The audit log (recipients, and the acts recorded).
    pub audit: AuditLog,
    /// Publishes on the token broker (`issuer.tokens_url`, else `amqp.url`).
    pub tokens: Publisher,
    /// Partners whose tokens go to a broker of their own (`issuer.partners[].tokens_url`), by application id: their
    /// notices go there too, beside their tokens.
    pub partner_tokens: HashMap<String, Publisher>,
    /// Names under the prefix.
    pub names: Names,
    /// Signs every notice.
    pub signing_key: SigningKeys,
    /// The issuer's application.
    pub application_id: String,
    /// The configured partners (names and agreements).
    pub partners: Vec<PartnerConfig>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// What one request led to.
#[derive(Debug, Clone)]
pub struct Issued {
    /// One row per recipient (empty: the session was never shared, nobody is told).
    pub notices: Vec<SentNotice>,
    /// The notices whose publish failed now (they are sent again by the running issuer).
    pub not_sent: Vec<(String, String)>,
}

impl Notifier {
    fn partner_by_id(&self, application_id: &str) -> Option<&PartnerConfig> {
        self.partners
            .iter()
            .find(|p| p.application_id == application_id)
    }

    /// Who received `session_id`: application id → (name, agreement).
    pub async fn recipients(
        &self,
        session_id: &str,
    ) -> Result<BTreeMap<String, (String, Option<String>)>, LedgerError> {
        let mut out = BTreeMap::new();
        for r in self.audit.recipients(session_id).await? {
            let configured = self.partner_by_id(&r.partner_application_id);
            let name = configured
                .map(|p| p.name.clone())
                .or(r.partner.clone())
                .unwrap_or_else(|| r.partner_application_id.clone());
            let agreement = configured
                .and_then(|p| p.agreement_id.clone())
                .or(r.agreement_id.clone());
            out.insert(r.partner_application_id.clone(), (name, agreement));
        }
        for p in &self.partners {
            if !out.contains_key(&p.application_id)
                && self
                    .ledger
                    .share(session_id, &p.application_id)
                    .await?
                    .is_some()
            {
                out.insert(
                    p.application_id.clone(),
                    (p.name.clone(), p.agreement_id.clone()),
                );
            }
        }
        Ok(out)
    }

    /// Records one notice per recipient of the request's session and sends those never sent. A redelivered
    /// request returns the rows of the first and sends nothing again (the retry loop owns open notices).
    pub async fn issue(
        &self,
        request: &NoticeRequested,
        now: DateTime<Utc>,
    ) -> Result<Issued, LedgerError> {
        let recipients = self.recipients(&request.session_id).await?;
        let mut notices = Vec::new();
        for (application_id, (name, agreement)) in recipients {
            let row = self
                .ledger
                .record_notice(&SentNotice {
                    notice_id: uuid::Uuid::now_v7().to_string(),
                    request_id: request.request_id.clone(),
                    session_id: request.session_id.clone(),
                    partner: name,
                    partner_application_id: application_id,
                    agreement_id: agreement,
                    kind: request.notice_kind.as_str().to_string(),
                    reason: request.reason.clone(),
                    requested_at: now,
                    sends: 0,
                    last_sent_at: None,
                    acked_at: None,
                    action: None,
                    imported_session_id: None,
                })
                .await?;
            notices.push(row);
        }
        let mut not_sent = Vec::new();
        for row in &mut notices {
            if row.sends > 0 || row.acked_at.is_some() {
                continue;
            }
            match self.send(row).await {
                Ok(()) => {
                    row.sends += 1;
                    row.last_sent_at = Some(Utc::now());
                }
                Err(SendError::Ledger(e)) => return Err(e),
                Err(SendError::Publish(detail)) => {
                    not_sent.push((row.notice_id.clone(), detail));
                }
            }
        }
        if notices.is_empty() {
            tracing::info!(session_id = %request.session_id, kind = request.notice_kind.as_str(), "notice requested for a session never shared: nobody to tell");
        }
        self.refresh_gauge().await;
        Ok(Issued { notices, not_sent })
    }

    /// The notice as the recipient gets it.
    fn notice_of(&self, row: &SentNotice) -> SubjectNotice {
        SubjectNotice {
            kind: envelope::types::NOTICE.to_string(),
            notice_id: row.notice_id.clone(),
            notice_kind: NoticeKind::parse(&row.kind).unwrap_or(NoticeKind::Erasure),
            source_session_id: row.session_id.clone(),
            from_application_id: self.application_id.clone(),
            for_application_id: row.partner_application_id.clone(),
            agreement_id: row.agreement_id.clone(),
            reason: row.reason.clone(),
            issued_at: row.requested_at,
            imported_session_id: None,
            action: None,
        }
    }

    /// Publishes one notice (signed, confirmed, mandatory) and records the send.
    async fn send(&self, row: &SentNotice) -> Result<(), SendError> {
        let notice = self.notice_of(row);
        let body = serde_json::to_vec(&notice).expect("notices serialise");
        let exchange = self.names.tokens_exchange();
        let routing_key = Names::notice_key(&row.partner_application_id);
        self.partner_tokens
            .get(&row.partner_application_id)
            .unwrap_or(&self.tokens)
            .publish(Outgoing {
                exchange: &exchange,
                routing_key: &routing_key,
                body: &body,
                message_id: &row.notice_id,
                kind: envelope::types::NOTICE,
                headers: self.signing_key.signature_headers(&body),
            })
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, notice_id = %row.notice_id, partner = %row.partner, %routing_key, "notice not confirmed; it is sent again later");
                SendError::Publish(format!(
                    "publishing subject.notice to {exchange} with key {routing_key} failed: {e}"
                ))
            })?;
        self.ledger
            .notice_sent(&row.notice_id, Utc::now())
            .await
            .map_err(SendError::Ledger)?;
        let mut act = Act::new(ActKind::NoticeSent, Side::Issuer)
            .partner(&row.partner, &row.partner_application_id)
            .session(&row.session_id)
            .message(&row.notice_id)
            .once(&row.notice_id);
        act.agreement_id = row.agreement_id.clone();
        act.reason = Some(row.kind.clone());
        act.event_id = Some(row.request_id.clone());
        self.audit.record(act).await.map_err(SendError::Ledger)?;
        self.metrics
            .notice(&row.partner, if row.sends == 0 { "sent" } else { "resent" });
        tracing::info!(notice_id = %row.notice_id, partner = %row.partner, session_id = %row.session_id, kind = %row.kind, sends = row.sends + 1, "notice sent");
        Ok(())
    }

    /// Sends again every open notice last sent `retry` ago or more (or never sent). Returns how many went out.
    pub async fn resend_due(&self, retry: Duration) -> Result<usize, LedgerError> {
        let before = Utc::now() - chrono::Duration::from_std(retry).unwrap_or_default();
        let due = self.ledger.notices_due(before, RETRY_BATCH).await?;
        let mut sent = 0;
        for row in &due {
            match self.send(row).await {
                Ok(()) => sent += 1,
                Err(SendError::Ledger(e)) => return Err(e),
                // The broker is down or the recipient's queue is missing: the next round tries again.
                Err(SendError::Publish(_)) => break,
            }
        }
        self.refresh_gauge().await;
        Ok(sent)
    }

    /// Sets `notices_unacknowledged{partner}` from the ledger (0 for every configured partner with none open).
    pub async fn refresh_gauge(&self) {
        match self.ledger.unacknowledged_notices().await {
            Ok(counts) => {
                for p in &self.partners {
                    let n = counts
                        .iter()
                        .find(|(name, _)| name == &p.name)
                        .map_or(0, |(_, n)| *n);
                    self.metrics.notices_unacknowledged(&p.name, n);
                }
                for (name, n) in counts {
                    if !self.partners.iter().any(|p| p.name == name) {
                        self.metrics.notices_unacknowledged(&name, n);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot count unacknowledged notices"),
        }
    }
}

enum SendError {
    Ledger(LedgerError),
    Publish(String),
}

/// Sends open notices again every `retry` until they are acknowledged (runs in the issuer process).
pub async fn run_retries(notifier: Notifier, retry: Duration, shutdown: CancellationToken) {
    // Checked more often than `retry`, so that a notice waits about `retry`, not up to twice that.
    let tick = (retry / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
    notifier.refresh_gauge().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(tick) => {}
        }
        match notifier.resend_due(retry).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(notices = n, "unacknowledged notices sent again"),
            Err(e) => tracing::warn!(error = %e, "cannot read open notices; trying again later"),
        }
    }
}

/// Handles `subject.notice.requested` deliveries (queue `P.issuer.notices`).
pub(crate) struct NoticeRequestHandler {
    pub notifier: Notifier,
    pub max_message_bytes: usize,
}

impl Handler for NoticeRequestHandler {
    async fn handle(&self, msg: Incoming) -> Decision {
        let request = match envelope::parse(&msg.body, self.max_message_bytes) {
            Ok(Message::NoticeRequested(r)) => r,
            Ok(_) => {
                return Decision::DeadLetter {
                    reason: "unknown_type",
                    detail: format!(
                        "expected {} on this queue",
                        envelope::types::NOTICE_REQUESTED
                    ),
                };
            }
            Err(bad) => {
                return Decision::DeadLetter {
                    reason: bad.reason,
                    detail: bad.detail,
                };
            }
        };
        match self.notifier.issue(&request, Utc::now()).await {
            Ok(issued) => {
                // Notices not confirmed now are recorded: the retry loop sends them.
                tracing::info!(request_id = %request.request_id, session_id = %request.session_id, recipients = issued.notices.len(), not_sent = issued.not_sent.len(), "notice request handled");
                self.notifier.metrics.success(pipeline::ISSUER_NOTICES);
                Decision::Ack
            }
            Err(e) => crate::probe::ledger_decision(&e),
        }
    }
}

/// Handles `subject.notice.ack` deliveries (queue `P.issuer.notice-acks`).
pub(crate) struct NoticeAckHandler {
    pub notifier: Notifier,
    pub partners: Vec<ResharePartner>,
    pub allow_unsigned: bool,
    pub max_message_bytes: usize,
}

impl Handler for NoticeAckHandler {
    async fn handle(&self, msg: Incoming) -> Decision {
        let ack = match envelope::parse(&msg.body, self.max_message_bytes) {
            Ok(Message::NoticeAck(a)) => a,
            Ok(_) => {
                return Decision::DeadLetter {
                    reason: "unknown_type",
                    detail: format!("expected {} on this queue", envelope::types::NOTICE_ACK),
                };
            }
            Err(bad) => {
                return Decision::DeadLetter {
                    reason: bad.reason,
                    detail: bad.detail,
                };
            }
        };
        let Some(known) = self
            .partners
            .iter()
            .find(|p| p.config.application_id == ack.for_application_id)
        else {
            return Decision::DeadLetter {
                reason: "unknown_partner",
                detail: format!(
                    "notice acknowledged by application {}, which is not an [[issuer.partners]] entry",
                    ack.for_application_id
                ),
            };
        };
        if let Err(refusal) = check_signature(
            &msg.body,
            msg.header(envelope::HEADER_SIGNATURE),
            msg.header(envelope::HEADER_KEY_ID),
            known,
            self.allow_unsigned,
        ) {
            tracing::warn!(notice_id = %ack.notice_id, partner = %known.config.name, reason = refusal.reason, "notice acknowledgement refused");
            return refusal.into();
        }
        let n = &self.notifier;
        let recorded = n
            .ledger
            .ack_notice(
                &ack.notice_id,
                &ack.for_application_id,
                ack.action.as_str(),
                ack.imported_session_id.as_deref(),
                Utc::now(),
            )
            .await;
        match recorded {
            Ok(AckRecorded::New(row)) | Ok(AckRecorded::Again(row)) => {
                let mut act = Act::new(ActKind::NoticeAcknowledged, Side::Issuer)
                    .partner(&row.partner, &row.partner_application_id)
                    .session(&row.session_id)
                    .message(&row.notice_id)
                    .once(&row.notice_id);
                act.agreement_id = row.agreement_id.clone();
                act.imported_session_id = ack.imported_session_id.clone();
                act.status = Some(ack.action.as_str().to_string());
                act.reason = Some(row.kind.clone());
                act.at = ack.acted_at;
                match n.audit.record(act).await {
                    Ok(Some(_)) => {
                        n.metrics.notice(&row.partner, "acknowledged");
                        tracing::info!(notice_id = %row.notice_id, partner = %row.partner, action = ack.action.as_str(), "notice acknowledged");
                    }
                    Ok(None) => {}
                    Err(e) => return crate::probe::ledger_decision(&e),
                }
                n.refresh_gauge().await;
                n.metrics.success(pipeline::ISSUER_NOTICE_ACKS);
                Decision::Ack
            }
            Ok(AckRecorded::Unknown) => Decision::DeadLetter {
                reason: "unknown_notice",
                detail: format!(
                    "no notice {} was sent to partner {}",
                    ack.notice_id, known.config.name
                ),
            },
            Err(e) => crate::probe::ledger_decision(&e),
        }
    }
}
