//! The `reshare.request` consumer: a receiver found its token expired and asks for a fresh one.
//!
//! The request names the session, the receiving application and the envelope whose token expired. The issuer mints
//! again for that partner only — unless a newer token than the expired one is already on its way (the ledger's last
//! message id differs and is still valid), or the pair has been reshared `issuer.max_reshares` times already, which
//! is dead-lettered as `reshare_limit` for an operator to look at. What the fresh envelope says about the session
//! comes from the ledger row of the first token, or from Didit's decision when the row was pruned.

use std::sync::Arc;

use chrono::Utc;
use tokio::time::Instant;

use crate::amqp::consumer::{Decision, Handler, Incoming};
use crate::config::PartnerConfig;
use crate::didit::error::Disposition;
use crate::didit::wire::SessionStatus;
use crate::envelope::{self, Message};
use crate::issuer::mint::{MintRequest, Minted, Minter, Source};
use crate::metrics::pipeline;
use crate::retry::{Failure, with_backoff};

/// Handles `reshare.request` deliveries.
pub(crate) struct ReshareHandler {
    pub minter: Arc<Minter>,
    pub partners: Vec<PartnerConfig>,
    pub max_reshares: u32,
    pub max_message_bytes: usize,
}

impl Handler for ReshareHandler {
    async fn handle(&self, msg: Incoming) -> Decision {
        let m = &self.minter;
        let deadline = Instant::now() + m.retry.hold_max();
        let request = match envelope::parse(&msg.body, self.max_message_bytes) {
            Ok(Message::ReshareRequest(r)) => r,
            Ok(_) => {
                return Decision::DeadLetter {
                    reason: "unknown_type",
                    detail: format!(
                        "expected {} on this queue",
                        envelope::types::RESHARE_REQUEST
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
        m.metrics.reshare_request("received");
        let Some(partner) = self
            .partners
            .iter()
            .find(|p| p.application_id == request.for_application_id)
        else {
            return Decision::DeadLetter {
                reason: "unknown_partner",
                detail: format!(
                    "reshare asked for application {}, which is not an [[issuer.partners]] entry",
                    request.for_application_id
                ),
            };
        };
        let previous = match m
            .ledger
            .share(&request.source_session_id, &partner.application_id)
            .await
        {
            Ok(previous) => previous,
            Err(e) => return crate::probe::ledger_decision(&e),
        };
        let reshares = previous.as_ref().map(|p| p.reshares).unwrap_or(0);
        if request.attempt > self.max_reshares || reshares >= self.max_reshares {
            tracing::warn!(
                source_session_id = %request.source_session_id,
                partner = %partner.name,
                attempt = request.attempt,
                "reshare limit reached"
            );
            return Decision::DeadLetter {
                reason: "reshare_limit",
                detail: format!(
                    "partner {} asked for a fresh token {} time(s); issuer.max_reshares is {}",
                    partner.name,
                    request.attempt.max(reshares + 1),
                    self.max_reshares
                ),
            };
        }
        let recorded = previous.and_then(|record| {
            SessionStatus::parse(&record.status).map(|status| Source {
                session_id: record.source_session_id,
                kind: record.session_kind,
                status,
                vendor_data: record.vendor_data,
                event_id: record.event_id,
                occurred_at: record.occurred_at,
            })
        });
        let source = match recorded {
            Some(source) => source,
            None => match self
                .source_from_didit(
                    &request.source_session_id,
                    &request.original_message_id,
                    deadline,
                )
                .await
            {
                Ok(source) => source,
                Err(decision) => return decision,
            },
        };
        let minted = m
            .mint(MintRequest {
                partner,
                source: &source,
                stale_message_id: Some(&request.original_message_id),
                deadline,
            })
            .await;
        match minted {
            Minted::Published | Minted::AlreadyValid => {
                m.metrics.success(pipeline::ISSUER_RESHARE);
                Decision::Ack
            }
            Minted::DeadLetter { reason, detail } => Decision::DeadLetter { reason, detail },
            Minted::Retry { detail } => Decision::Retry {
                detail,
                headers: Vec::new(),
            },
            Minted::Pause { reason, detail } => Decision::Pause { reason, detail },
            Minted::Shutdown => Decision::Requeue,
        }
    }
}

impl ReshareHandler {
    /// The ledger no longer knows the session (pruned, or another replica's SQLite): ask Didit what it is.
    async fn source_from_didit(
        &self,
        session_id: &str,
        original_message_id: &str,
        deadline: Instant,
    ) -> Result<Source, Decision> {
        let m = &self.minter;
        let decision = with_backoff(
            &m.retry,
            deadline,
            "decision",
            &m.metrics,
            &m.shutdown,
            || m.client.decision(session_id),
        )
        .await;
        let decision = match decision {
            Ok(decision) => decision,
            Err(Failure::Shutdown) => return Err(Decision::Requeue),
            Err(Failure::Didit(e)) => {
                let detail = e.to_string();
                return Err(match e.disposition() {
                    Disposition::Retry { .. } => Decision::Retry {
                        detail,
                        headers: Vec::new(),
                    },
                    Disposition::Pause { reason } => Decision::Pause { reason, detail },
                    Disposition::DeadLetter { reason } => Decision::DeadLetter { reason, detail },
                    Disposition::Duplicate | Disposition::Reshare => Decision::DeadLetter {
                        reason: "share_rejected",
                        detail: format!("unexpected answer to decision: {detail}"),
                    },
                });
            }
        };
        let Some(status) = decision.parsed_status().filter(|s| s.is_finished()) else {
            return Err(Decision::DeadLetter {
                reason: "share_rejected",
                detail: format!(
                    "session {session_id} is {:?} now, not a finished status",
                    decision.status
                ),
            });
        };
        Ok(Source {
            session_id: session_id.to_string(),
            kind: decision.kind(),
            status,
            vendor_data: decision.vendor_data.clone(),
            event_id: format!("reshare:{original_message_id}"),
            occurred_at: Utc::now(),
        })
    }
}
