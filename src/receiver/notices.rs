//! Erasure and rectification notices, receiver side: the `subject.notice` consumer (queue `P.receiver.notices`,
//! bound to the tokens exchange with `notice.<own application id>`).
//!
//! In order: the body must parse; the issuer must be a `[[receiver.issuers]]` entry (`unknown_issuer`; unknown
//! issuers are never allowed here, whatever `allow_unknown_issuers` says); the signature must verify against its
//! keys exactly as a share token's (`unsigned`, `bad_signature`); the notice must be for this application
//! (`misrouted`). Each refusal is dead-lettered with its reason and counted.
//!
//! Then, exactly once per notice (the ledger's `notices_received` row, keyed by issuer and notice id):
//! 1. an erasure, where `receiver.on_erasure = "delete"`, deletes the imported copy of the session in this Didit
//!    application (`DELETE /v3/session/{id}/delete/`; a 404 means it is gone already) — the copy is the one the
//!    import ledger recorded for (issuer, source session); without one there is nothing to delete;
//! 2. the notice is published to this application's backend on the imports exchange, key `notice.<kind>`, with
//!    `imported_session_id` and `action` (`deleted` or `notified`) added;
//! 3. a signed `subject.notice.ack` goes back to the issuer (reshare exchange, key `notice-ack.<issuer app id>`).
//!
//! A redelivered or resent notice finds its row: steps 1 and 2 are not repeated, the acknowledgement is sent again
//! (the first may be what was lost). The audit log gets `notice_received` once per notice. The consumer runs with
//! a concurrency of one, so two copies of one notice are never handled at the same moment.

use std::sync::Arc;

use chrono::Utc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::Names;
use crate::amqp::consumer::{Decision, Handler, Incoming};
use crate::amqp::publisher::{Outgoing, Publisher};
use crate::audit::{Act, ActKind, AuditLog, Side};
use crate::config::{OnErasure, RetryConfig};
use crate::didit::client::DiditClient;
use crate::envelope::{self, Message, NoticeAck, NoticeAction, NoticeKind, SubjectNotice};
use crate::keys::SigningKeys;
use crate::ledger::{Ledger, ReceivedNotice};
use crate::metrics::{Metrics, pipeline};
use crate::receiver::tokens::{Peer, verify_signature};
use crate::retry::with_backoff;

/// Handles `subject.notice` deliveries.
pub(crate) struct NoticeHandler {
    pub client: DiditClient,
    pub ledger: Ledger,
    pub audit: AuditLog,
    pub publisher: Publisher,
    pub names: Names,
    pub application_id: String,
    pub peers: Vec<Peer>,
    pub signing_key: Option<SigningKeys>,
    pub allow_unsigned: bool,
    pub on_erasure: OnErasure,
    pub max_message_bytes: usize,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    pub retry: RetryConfig,
}

impl Handler for NoticeHandler {
    async fn handle(&self, msg: Incoming) -> Decision {
        let notice = match envelope::parse(&msg.body, self.max_message_bytes) {
            Ok(Message::Notice(n)) => n,
            Ok(_) => {
                return Decision::DeadLetter {
                    reason: "unknown_type",
                    detail: format!("expected {} on this queue", envelope::types::NOTICE),
                };
            }
            Err(bad) => {
                return Decision::DeadLetter {
                    reason: bad.reason,
                    detail: bad.detail,
                };
            }
        };
        let Some(peer) = self
            .peers
            .iter()
            .find(|p| p.application_id == notice.from_application_id && p.key.is_some())
        else {
            return Decision::DeadLetter {
                reason: "unknown_issuer",
                detail: format!(
                    "notice from application {}, which is not a [[receiver.issuers]] entry",
                    notice.from_application_id
                ),
            };
        };
        if let Err((reason, detail)) = verify_signature(&msg, peer, self.allow_unsigned) {
            tracing::warn!(notice_id = %notice.notice_id, issuer = %peer.name, reason, "notice refused");
            return Decision::DeadLetter { reason, detail };
        }
        if notice.for_application_id != self.application_id {
            return Decision::DeadLetter {
                reason: "misrouted",
                detail: format!(
                    "notice is for application {}, this receiver is {}",
                    notice.for_application_id, self.application_id
                ),
            };
        }
        self.act_on(&notice, peer).await
    }
}

impl NoticeHandler {
    async fn act_on(&self, notice: &SubjectNotice, peer: &Peer) -> Decision {
        let deadline = Instant::now() + self.retry.hold_max();
        let imported = match self
            .ledger
            .import(&peer.application_id, &notice.source_session_id)
            .await
        {
            Ok(record) => record.and_then(|r| r.imported_session_id),
            Err(e) => return crate::probe::ledger_decision(&e),
        };
        let row = match self
            .ledger
            .receive_notice(&ReceivedNotice {
                issuer_application_id: peer.application_id.clone(),
                notice_id: notice.notice_id.clone(),
                source_session_id: notice.source_session_id.clone(),
                kind: notice.notice_kind.as_str().to_string(),
                received_at: Utc::now(),
                imported_session_id: imported,
                deleted_at: None,
                published_at: None,
                action: None,
            })
            .await
        {
            Ok(row) => row,
            Err(e) => return crate::probe::ledger_decision(&e),
        };
        let repeat = row.published_at.is_some();
        self.metrics
            .notice(&peer.name, if repeat { "duplicate" } else { "received" });
        let mut act = Act::new(ActKind::NoticeReceived, Side::Receiver)
            .partner(&peer.name, &peer.application_id)
            .session(&notice.source_session_id)
            .message(&notice.notice_id)
            .once(format!("{}:{}", peer.application_id, notice.notice_id));
        act.agreement_id = notice.agreement_id.clone().or(peer.agreement_id.clone());
        act.imported_session_id = row.imported_session_id.clone();
        act.reason = Some(notice.notice_kind.as_str().to_string());
        if let Err(e) = self.audit.record(act).await {
            return crate::probe::ledger_decision(&e);
        }

        let mut deleted = row.deleted_at.is_some();
        if !deleted
            && notice.notice_kind == NoticeKind::Erasure
            && self.on_erasure == OnErasure::Delete
            && let Some(imported) = &row.imported_session_id
        {
            if let Err(decision) = self.delete(imported, deadline).await {
                return decision;
            }
            if let Err(e) = self
                .ledger
                .notice_deleted(&peer.application_id, &notice.notice_id, Utc::now())
                .await
            {
                // Deleted in Didit: a retry deletes again, which Didit answers 404 (gone), so nothing is lost.
                return crate::probe::ledger_decision(&e);
            }
            self.metrics.notice(&peer.name, "deleted");
            tracing::info!(notice_id = %notice.notice_id, issuer = %peer.name, imported_session_id = %imported, "imported copy deleted on an erasure notice");
            deleted = true;
        }
        let action = if deleted {
            NoticeAction::Deleted
        } else {
            NoticeAction::Notified
        };

        if row.published_at.is_none() {
            let mut to_backend = notice.clone();
            to_backend.imported_session_id = row.imported_session_id.clone();
            to_backend.action = Some(action);
            if let Err(detail) = self.publish_to_backend(&to_backend).await {
                return Decision::Retry {
                    detail,
                    headers: Vec::new(),
                };
            }
            if let Err(e) = self
                .ledger
                .notice_published(
                    &peer.application_id,
                    &notice.notice_id,
                    action.as_str(),
                    Utc::now(),
                )
                .await
            {
                tracing::warn!(error = %e, "notice published but not marked; a redelivery may publish it again");
            }
            if action == NoticeAction::Notified {
                self.metrics.notice(&peer.name, "notified");
            }
        }

        let acted_at = row.deleted_at.or(row.published_at).unwrap_or_else(Utc::now);
        let ack = NoticeAck {
            kind: envelope::types::NOTICE_ACK.to_string(),
            notice_id: notice.notice_id.clone(),
            source_session_id: notice.source_session_id.clone(),
            from_application_id: notice.from_application_id.clone(),
            for_application_id: self.application_id.clone(),
            imported_session_id: row.imported_session_id.clone(),
            action,
            acted_at,
        };
        if let Err(detail) = self.send_ack(&ack).await {
            return Decision::Retry {
                detail,
                headers: Vec::new(),
            };
        }
        self.metrics.notice(&peer.name, "ack_sent");
        self.metrics.success(pipeline::RECEIVER_NOTICES);
        Decision::Ack
    }

    /// Deletes the imported copy, retrying in process within the hold; maps Didit's answer like every call.
    async fn delete(&self, session_id: &str, deadline: Instant) -> Result<(), Decision> {
        let deleted = with_backoff(
            &self.retry,
            deadline,
            "delete",
            &self.metrics,
            &self.shutdown,
            || self.client.delete_session(session_id, Some(deadline)),
        )
        .await;
        deleted.map(drop).map_err(|failure| {
            crate::retry::decision_for(
                failure,
                |e| format!("deleting imported session {session_id}: {e}"),
                |detail| Decision::Retry {
                    detail,
                    headers: Vec::new(),
                },
            )
        })
    }

    async fn publish_to_backend(&self, notice: &SubjectNotice) -> Result<(), String> {
        let body = serde_json::to_vec(notice).expect("notices serialise");
        let routing_key = Names::backend_notice_key(notice.notice_kind.as_str());
        self.publish(
            &self.names.imports_exchange(),
            &routing_key,
            envelope::types::NOTICE,
            &body,
            Vec::new(),
        )
        .await
        .map_err(|e| format!("{e} (is a queue bound to the imports exchange for notice.#?)"))
    }

    async fn send_ack(&self, ack: &NoticeAck) -> Result<(), String> {
        let body = serde_json::to_vec(ack).expect("acks serialise");
        let headers = self
            .signing_key
            .iter()
            .flat_map(|keys| keys.signature_headers(&body))
            .collect();
        let routing_key = Names::notice_ack_key(&ack.from_application_id);
        self.publish(
            &self.names.reshare_exchange(),
            &routing_key,
            envelope::types::NOTICE_ACK,
            &body,
            headers,
        )
        .await
        .map_err(|e| format!("{e} (has the issuer declared its notice-acks queue?)"))
    }

    /// Publishes one message (confirmed, mandatory); a failure is counted as a publish retry.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        kind: &str,
        body: &[u8],
        headers: Vec<(String, crate::amqp::HeaderValue)>,
    ) -> Result<(), String> {
        let message_id = uuid::Uuid::now_v7().to_string();
        self.publisher
            .publish(Outgoing {
                exchange,
                routing_key,
                body,
                message_id: &message_id,
                kind,
                headers,
            })
            .await
            .map_err(|e| {
                self.metrics.retry("publish");
                format!("publishing {kind} to {exchange} with key {routing_key} failed: {e}")
            })
    }
}
