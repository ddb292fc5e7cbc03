//! The `onboarding.finished` consumer: one event in, one decision out (DESIGN.md §2, §4, §5).
//!
//! A bad body is dead-lettered with its reason; an unfinished status is acked and counted; otherwise every partner
//! the policy selects gets a token (concurrently). The event is acked only when every partner's token is confirmed
//! by the broker, was still valid, or that partner's failure is dead-lettered (a copy of the event with
//! `x-pb-partner` and the reason). Partners that need more time go back through the retry queue with their ids in
//! `x-pb-pending-partners`, so the ones already served are not served twice.
//!
//! A dead-lettered copy that comes back (`dead-letters replay`, which also sets `x-pb-replayed`, or an operator's
//! shovel) is about one partner: an event carrying `x-pb-partner` is served for that partner only, whatever its
//! `partners` field or `x-pb-pending-partners` say, so replaying one partner's failure never re-runs the others. A
//! partner that is still not configured is dead-lettered again as `unknown_partner`. A replayed `retries_exhausted`
//! event has no `x-pb-partner` but keeps its `x-pb-pending-partners`, so it too serves only the partners left.

use std::sync::Arc;

use chrono::Utc;
use futures_util::future::join_all;
use tokio::time::Instant;

use crate::amqp::HeaderValue;
use crate::amqp::consumer::{DeadLetterCopy, Decision, Handler, Incoming};
use crate::config::PartnerConfig;
use crate::didit::wire::{SessionKind, SessionStatus};
use crate::envelope::{self, Message};
use crate::issuer::mint::{MintRequest, Minted, Minter, Source};
use crate::issuer::policy;
use crate::metrics::pipeline;

/// Header set on events made from webhooks (`webhook`) and on those `partner-bridge backfill` publishes
/// (`backfill`), so `events_total` can tell sources apart.
pub const HEADER_SOURCE: &str = "x-pb-source";

/// Handles `onboarding.finished` deliveries.
pub(crate) struct OnboardingHandler {
    pub minter: Arc<Minter>,
    pub partners: Vec<PartnerConfig>,
    pub max_message_bytes: usize,
    /// `retry.max_attempts`: a retry of the last attempt is a dead-letter (`retries_exhausted`).
    pub max_attempts: u32,
}

impl Handler for OnboardingHandler {
    async fn handle(&self, msg: Incoming) -> Decision {
        let metrics = &self.minter.metrics;
        let source_label = match msg.header(HEADER_SOURCE) {
            Some("webhook") => "webhook",
            Some("backfill") => "backfill",
            _ => "amqp",
        };
        let deadline = Instant::now() + self.minter.retry.hold_max();
        let event = match envelope::parse(&msg.body, self.max_message_bytes) {
            Ok(Message::OnboardingFinished(event)) => event,
            Ok(_) => {
                metrics.event(source_label, "bad_message");
                return Decision::DeadLetter {
                    reason: "unknown_type",
                    detail: format!(
                        "expected {} on this queue",
                        envelope::types::ONBOARDING_FINISHED
                    ),
                };
            }
            Err(bad) => {
                metrics.event(source_label, "bad_message");
                tracing::warn!(message_id = %msg.message_id.as_deref().unwrap_or(""), reason = bad.reason, detail = %bad.detail, "bad onboarding event");
                return Decision::DeadLetter {
                    reason: bad.reason,
                    detail: bad.detail,
                };
            }
        };
        let status = SessionStatus::parse(&event.status).expect("parse() checked the status");
        if !status.is_finished() {
            metrics.event(source_label, "ignored_unfinished");
            tracing::info!(event_id = %event.event_id, source_session_id = %event.session_id, status = %status, "status not finished; nothing to share");
            return Decision::Ack;
        }
        let kind = event.session_kind.unwrap_or(SessionKind::User);
        let only_partner = msg
            .header(envelope::HEADER_PARTNER)
            .filter(|id| !id.is_empty());
        if let Some(id) = only_partner
            && !self.partners.iter().any(|p| p.application_id == id)
        {
            metrics.event(source_label, "dead_lettered");
            return Decision::DeadLetter {
                reason: "unknown_partner",
                detail: format!("no [[issuer.partners]] entry has application_id {id}"),
            };
        }
        let pending: Option<Vec<String>> = match only_partner {
            // A dead-lettered copy for one partner, back again: that partner only.
            Some(id) => Some(vec![id.to_string()]),
            None => msg.header(envelope::HEADER_PENDING_PARTNERS).map(|s| {
                s.split(',')
                    .filter(|id| !id.is_empty())
                    .map(str::to_string)
                    .collect()
            }),
        };
        let selection = policy::select(
            &self.partners,
            status,
            kind,
            event.partners.as_deref(),
            pending.as_deref(),
        );

        let mut copies: Vec<DeadLetterCopy> = selection
            .unknown
            .iter()
            .map(|id| DeadLetterCopy {
                body: msg.body.clone(),
                reason: "unknown_partner",
                detail: format!("no [[issuer.partners]] entry has application_id {id}"),
                headers: vec![(
                    envelope::HEADER_PARTNER.to_string(),
                    HeaderValue::Str(id.clone()),
                )],
            })
            .collect();
        for refused in &selection.refused {
            tracing::info!(event_id = %event.event_id, partner = %refused.name, status = %status, kind = %kind, "partner named by the event does not receive this status or kind");
        }
        if selection.partners.is_empty() {
            metrics.event(
                source_label,
                if copies.is_empty() {
                    "no_matching_partner"
                } else {
                    "dead_lettered"
                },
            );
            return split(copies, Decision::Ack);
        }

        let source = Source {
            session_id: event.session_id.clone(),
            kind,
            status,
            vendor_data: event.vendor_data.clone(),
            event_id: event.event_id.clone(),
            occurred_at: event.occurred_at.unwrap_or_else(Utc::now),
        };
        let results = join_all(selection.partners.iter().map(|partner| {
            self.minter.mint(MintRequest {
                partner,
                source: &source,
                stale_message_id: None,
                deadline,
            })
        }))
        .await;

        let mut retry = Vec::new();
        let mut retry_detail = Vec::new();
        // Partners waiting only for Didit's rate limit: pending like `retry`, but their wait counts no attempt.
        let mut paced = Vec::new();
        let mut pause = None;
        let mut shutdown = false;
        let mut published = 0;
        for (partner, result) in selection.partners.iter().zip(results) {
            match result {
                Minted::Published => published += 1,
                Minted::AlreadyValid => {}
                Minted::DeadLetter { reason, detail } => copies.push(DeadLetterCopy {
                    body: msg.body.clone(),
                    reason,
                    detail: format!("partner {}: {detail}", partner.name),
                    headers: vec![(
                        envelope::HEADER_PARTNER.to_string(),
                        HeaderValue::Str(partner.application_id.clone()),
                    )],
                }),
                Minted::Retry { detail } => {
                    retry.push(partner.application_id.clone());
                    retry_detail.push(format!("partner {}: {detail}", partner.name));
                }
                Minted::Paced { detail } => {
                    paced.push(partner.application_id.clone());
                    retry_detail.push(format!("partner {}: {detail}", partner.name));
                }
                Minted::Pause { reason, detail } => pause = Some((reason, detail)),
                Minted::Shutdown => shutdown = true,
            }
        }
        if shutdown {
            // Partners already served are in the ledger; the rest are served when the event comes back.
            return Decision::Requeue;
        }
        if let Some((reason, detail)) = pause {
            metrics.event(source_label, "retried");
            return Decision::Pause { reason, detail };
        }
        if retry.is_empty() && !paced.is_empty() {
            metrics.event(source_label, "retried");
            return split(
                copies,
                Decision::Defer {
                    detail: retry_detail.join("; "),
                    headers: vec![(
                        envelope::HEADER_PENDING_PARTNERS.to_string(),
                        HeaderValue::Str(paced.join(",")),
                    )],
                },
            );
        }
        if !retry.is_empty() && !paced.is_empty() && msg.attempt >= self.max_attempts {
            // The partners whose attempts are used up are dead-lettered one by one; the ones only waiting for the
            // rate limit keep waiting, with no attempt counted.
            for partner in selection
                .partners
                .iter()
                .filter(|p| retry.contains(&p.application_id))
            {
                metrics.share(&partner.name, "exhausted");
                copies.push(DeadLetterCopy {
                    body: msg.body.clone(),
                    reason: "retries_exhausted",
                    detail: retry_detail.join("; "),
                    headers: vec![(
                        envelope::HEADER_PARTNER.to_string(),
                        HeaderValue::Str(partner.application_id.clone()),
                    )],
                });
            }
            metrics.event(source_label, "retried");
            return split(
                copies,
                Decision::Defer {
                    detail: retry_detail.join("; "),
                    headers: vec![(
                        envelope::HEADER_PENDING_PARTNERS.to_string(),
                        HeaderValue::Str(paced.join(",")),
                    )],
                },
            );
        }
        if !retry.is_empty() {
            // A partner that failed for real counts the attempt; the ones only waiting for the rate limit go along.
            let pending: Vec<String> = retry.iter().chain(&paced).cloned().collect();
            if msg.attempt >= self.max_attempts {
                // The consumer dead-letters this retry as `retries_exhausted`; say so per partner.
                for partner in selection
                    .partners
                    .iter()
                    .filter(|p| retry.contains(&p.application_id))
                {
                    metrics.share(&partner.name, "exhausted");
                }
                metrics.event(source_label, "dead_lettered");
            } else {
                metrics.event(source_label, "retried");
            }
            return split(
                copies,
                Decision::Retry {
                    detail: retry_detail.join("; "),
                    headers: vec![(
                        envelope::HEADER_PENDING_PARTNERS.to_string(),
                        HeaderValue::Str(pending.join(",")),
                    )],
                },
            );
        }
        let outcome = if published > 0 {
            metrics.success(pipeline::ISSUER_ONBOARDING);
            "processed"
        } else if copies.is_empty() {
            "duplicate"
        } else {
            "dead_lettered"
        };
        metrics.event(source_label, outcome);
        split(copies, Decision::Ack)
    }
}

fn split(copies: Vec<DeadLetterCopy>, then: Decision) -> Decision {
    if copies.is_empty() {
        then
    } else {
        Decision::Split {
            copies,
            then: Box::new(then),
        }
    }
}
