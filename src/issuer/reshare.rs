//! The `reshare.request` consumer: a receiver found its token expired and asks for a fresh one.
//!
//! The request names the session, the receiving application and the envelope whose token expired. Because a fresh
//! token lets Didit clone personal data into the asking application, a request is honoured only when all of these
//! hold, checked in this order (each refusal is dead-lettered with its reason and counted in
//! `dead_letters_total{queue,reason}`):
//! 1. `for_application_id` is an `[[issuer.partners]]` entry (`unknown_partner`);
//! 2. the request is signed (`x-pb-signature`, `x-pb-key-id`, exactly as `share_token` envelopes are) by one of that
//!    partner's `public_keys` (`unsigned`, `bad_signature`); a partner with no key configured is refused
//!    (`no_partner_key`) unless `issuer.allow_unsigned_reshare` — then unsigned requests pass too;
//! 3. the issuer's ledger shows the session was shared with that partner (`not_shared`: a request for a session this
//!    partner never received, or whose share row was pruned, is refused rather than trusted);
//! 4. the pair has been reshared fewer than `issuer.max_reshares` times (`reshare_limit`);
//! 5. Didit's current decision is a finished status (`share_rejected`) that the partner's `statuses` and
//!    `session_kinds` still accept (`policy_refused`: the session was declined since, or the policy narrowed).
//!
//! Then the issuer mints again for that partner only — unless a newer token than the expired one is already on its
//! way (the ledger's last message id differs and is still valid). The fresh envelope carries the event id, time and
//! vendor data of the first token's ledger row, and Didit's current status and kind.
//!
//! An honoured request is recorded in the audit log as `reshare_answered` (after the fresh token's own
//! `share_minted` and `token_published`, or with status `already_valid` when a newer token is on its way) before
//! the request is acked, keyed by the request (partner, session, expired envelope, attempt) so that a redelivery
//! records it once. Refusals are dead-lettered, and so recorded as `dead_lettered`.

use std::sync::Arc;

use tokio::time::Instant;

use crate::amqp::consumer::{Decision, Handler, Incoming};
use crate::audit::ActKind;
use crate::config::PartnerConfig;
use crate::didit::wire::SessionDecision;
use crate::envelope::{self, Message};
use crate::issuer::mint::{MintRequest, Minted, Minter, Source};
use crate::keys::{PublicKeys, Refused};
use crate::metrics::pipeline;
use crate::retry::with_backoff;

/// A partner and the keys its reshare requests must be signed with.
#[derive(Debug, Clone)]
pub(crate) struct ResharePartner {
    pub config: PartnerConfig,
    pub keys: PublicKeys,
}

/// Why a request is refused: the dead-letter reason and a sentence for a person.
#[derive(Debug, PartialEq)]
pub(crate) struct Refusal {
    pub reason: &'static str,
    pub detail: String,
}

impl From<Refusal> for Decision {
    fn from(r: Refusal) -> Decision {
        Decision::DeadLetter {
            reason: r.reason,
            detail: r.detail,
        }
    }
}

/// Checks the `x-pb-signature` / `x-pb-key-id` headers of a request body against a partner's keys. Pure, so each
/// row of the rule is unit-tested.
///
/// With a key id, only the key of that id is tried (a receiver rotating keys names the one it used); without one,
/// any configured key that verifies is accepted.
pub(crate) fn check_signature(
    body: &[u8],
    signature: Option<&str>,
    key_id: Option<&str>,
    partner: &ResharePartner,
    allow_unsigned: bool,
) -> Result<(), Refusal> {
    let name = &partner.config.name;
    if partner.keys.is_empty() {
        if allow_unsigned {
            return Ok(());
        }
        return Err(Refusal {
            reason: "no_partner_key",
            detail: format!(
                "partner {name} has no public_keys configured, so its reshare requests cannot be verified"
            ),
        });
    }
    let Some(signature) = signature else {
        if allow_unsigned {
            return Ok(());
        }
        return Err(Refusal {
            reason: "unsigned",
            detail: "reshare request carries no x-pb-signature header".into(),
        });
    };
    match partner.keys.verify(body, signature, key_id) {
        Ok(key) => {
            tracing::debug!(partner = %name, key_id = key.key_id(), "reshare request signature verified");
            Ok(())
        }
        Err(Refused::UnknownKey(id)) => Err(Refusal {
            reason: "bad_signature",
            detail: format!(
                "signed with key {id}, which is not one of partner {name}'s public_keys"
            ),
        }),
        Err(Refused::Bad(_)) => Err(Refusal {
            reason: "bad_signature",
            detail: format!("signature does not verify against partner {name}'s public_keys"),
        }),
    }
}

/// Handles `reshare.request` deliveries.
pub(crate) struct ReshareHandler {
    pub minter: Arc<Minter>,
    pub partners: Vec<ResharePartner>,
    pub allow_unsigned: bool,
    pub max_reshares: u32,
    pub max_message_bytes: usize,
}

impl Handler for ReshareHandler {
    /// Another organisation's message: its trace is linked, not continued (docs/tracing.md).
    fn trace_relation(&self) -> crate::trace::Relation {
        crate::trace::Relation::Link
    }

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
        let Some(known) = self
            .partners
            .iter()
            .find(|p| p.config.application_id == request.for_application_id)
        else {
            return Decision::DeadLetter {
                reason: "unknown_partner",
                detail: format!(
                    "reshare asked for application {}, which is not an [[issuer.partners]] entry",
                    request.for_application_id
                ),
            };
        };
        let partner = &known.config;
        if let Err(refusal) = check_signature(
            &msg.body,
            msg.header(envelope::HEADER_SIGNATURE),
            msg.header(envelope::HEADER_KEY_ID),
            known,
            self.allow_unsigned,
        ) {
            tracing::warn!(source_session_id = %request.source_session_id, partner = %partner.name, reason = refusal.reason, "reshare request refused");
            return refusal.into();
        }
        let previous = match m
            .ledger
            .share(&request.source_session_id, &partner.application_id)
            .await
        {
            Ok(Some(previous)) => previous,
            Ok(None) => {
                tracing::warn!(source_session_id = %request.source_session_id, partner = %partner.name, "reshare asked for a session never shared with this partner");
                return Decision::DeadLetter {
                    reason: "not_shared",
                    detail: format!(
                        "the ledger has no share of session {} with partner {} (never shared, or its row was pruned)",
                        request.source_session_id, partner.name
                    ),
                };
            }
            Err(e) => return crate::probe::ledger_decision(&e),
        };
        let reshares = previous.reshares;
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
        let decision = match self
            .current_decision(&request.source_session_id, deadline)
            .await
        {
            Ok(decision) => decision,
            Err(decision) => return decision,
        };
        let source = match current_source(partner, &decision, previous) {
            Ok(source) => source,
            Err(refusal) => {
                tracing::warn!(source_session_id = %request.source_session_id, partner = %partner.name, reason = refusal.reason, "reshare refused by policy");
                return refusal.into();
            }
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
                let answered = m
                    .act(ActKind::ReshareAnswered, partner, &source)
                    .message(&request.original_message_id)
                    .status(if minted == Minted::Published {
                        "minted"
                    } else {
                        "already_valid"
                    })
                    .reason(request.reason.clone())
                    .once(format!(
                        "{}:{}:{}:{}",
                        partner.application_id,
                        request.source_session_id,
                        request.original_message_id,
                        request.attempt
                    ));
                if let Err(failed) = m.record(partner, answered).await {
                    return minted_decision(failed);
                }
                m.metrics.success(pipeline::ISSUER_RESHARE);
                Decision::Ack
            }
            other => minted_decision(other),
        }
    }
}

/// The decision for a request whose mint did not answer it.
fn minted_decision(minted: Minted) -> Decision {
    match minted {
        Minted::DeadLetter { reason, detail } => Decision::DeadLetter { reason, detail },
        Minted::Retry { detail } => Decision::Retry {
            detail,
            headers: Vec::new(),
        },
        Minted::Paced { detail } => Decision::Defer {
            detail,
            headers: Vec::new(),
        },
        Minted::Pause { reason, detail } => Decision::Pause { reason, detail },
        Minted::Shutdown => Decision::Requeue,
        // Answered: the caller records and acks.
        Minted::Published | Minted::AlreadyValid => Decision::Ack,
    }
}

/// What the fresh token says: the first token's event, Didit's current status and kind, if the partner's policy
/// still accepts them.
fn current_source(
    partner: &PartnerConfig,
    decision: &SessionDecision,
    recorded: crate::ledger::ShareRecord,
) -> Result<Source, Refusal> {
    let session_id = &recorded.source_session_id;
    let Some(status) = decision.parsed_status().filter(|s| s.is_finished()) else {
        return Err(Refusal {
            reason: "share_rejected",
            detail: format!(
                "session {session_id} is {:?} now, not a finished status",
                decision.status
            ),
        });
    };
    let kind = decision.kind();
    if !partner.accepts(status, kind) {
        return Err(Refusal {
            reason: "policy_refused",
            detail: format!(
                "session {session_id} is {status:?} ({kind:?}) now, which partner {}'s statuses/session_kinds do not accept",
                partner.name
            ),
        });
    }
    Ok(Source {
        session_id: recorded.source_session_id,
        kind,
        status,
        vendor_data: recorded.vendor_data,
        event_id: recorded.event_id,
        occurred_at: recorded.occurred_at,
    })
}

impl ReshareHandler {
    /// Didit's decision now: a session may have been declined, or changed kind, since the first token.
    async fn current_decision(
        &self,
        session_id: &str,
        deadline: Instant,
    ) -> Result<SessionDecision, Decision> {
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
        decision.map_err(|failure| {
            crate::retry::decision_for(failure, ToString::to_string, |detail| {
                Decision::DeadLetter {
                    reason: "share_rejected",
                    detail: format!("unexpected answer to decision: {detail}"),
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::didit::wire::SessionKind;
    use crate::didit::wire::SessionStatus;
    use crate::envelope::SigningKey;
    use crate::ledger::ShareRecord;
    use chrono::Utc;

    fn partner(keys: &[&SigningKey]) -> ResharePartner {
        ResharePartner {
            config: PartnerConfig {
                name: "bank".into(),
                application_id: "a".into(),
                ttl_seconds: 3600,
                statuses: vec!["Approved".into()],
                session_kinds: vec![SessionKind::User],
                share_vendor_data: false,
                public_keys: Vec::new(),
                public_key_files: Vec::new(),
                tokens_url: None,
                tokens_url_file: None,
                agreement_id: None,
            },
            keys: PublicKeys::new(keys.iter().map(|k| k.verifying_key()).collect(), vec![]),
        }
    }

    fn reason(r: Result<(), Refusal>) -> &'static str {
        r.err().map(|r| r.reason).unwrap_or("ok")
    }

    #[test]
    fn signatures_are_checked_against_the_partners_keys_row_by_row() {
        let (old, new, stranger) = (
            SigningKey::generate(),
            SigningKey::generate(),
            SigningKey::generate(),
        );
        let p = partner(&[&old, &new]);
        let body = br#"{"type":"reshare.request"}"#;
        let check = |sig: Option<&str>, id: Option<&str>, allow| {
            reason(check_signature(body, sig, id, &p, allow))
        };
        let signed = new.sign(body);
        assert_eq!(check(Some(&signed), Some(new.key_id()), false), "ok");
        // Rotation: either configured key, with or without a key id.
        assert_eq!(
            check(Some(&old.sign(body)), Some(old.key_id()), false),
            "ok"
        );
        assert_eq!(check(Some(&old.sign(body)), None, false), "ok");
        assert_eq!(check(None, None, false), "unsigned");
        assert_eq!(check(None, None, true), "ok");
        // Forged: another key, named or not; a right key id on a wrong signature; another body.
        let forged = stranger.sign(body);
        assert_eq!(
            check(Some(&forged), Some(stranger.key_id()), false),
            "bad_signature"
        );
        assert_eq!(check(Some(&forged), None, false), "bad_signature");
        assert_eq!(
            check(Some(&forged), Some(new.key_id()), false),
            "bad_signature"
        );
        assert_eq!(
            check(Some(&old.sign(body)), Some(new.key_id()), false),
            "bad_signature"
        );
        assert_eq!(
            reason(check_signature(b"{}", Some(&signed), None, &p, false)),
            "bad_signature"
        );
        assert_eq!(check(Some("ed25519:AAAA"), None, true), "bad_signature");
        // A partner without keys: refused unless explicitly allowed.
        let keyless = partner(&[]);
        assert_eq!(
            reason(check_signature(body, Some(&signed), None, &keyless, false)),
            "no_partner_key"
        );
        assert_eq!(
            reason(check_signature(body, None, None, &keyless, false)),
            "no_partner_key"
        );
        assert_eq!(
            reason(check_signature(body, None, None, &keyless, true)),
            "ok"
        );
    }

    fn decision(status: &str, kind: &str) -> SessionDecision {
        serde_json::from_value(serde_json::json!({
            "session_id": "s", "status": status, "session_kind": kind, "vendor_data": "didit-side"
        }))
        .unwrap()
    }

    fn record() -> ShareRecord {
        ShareRecord {
            source_session_id: "s".into(),
            partner_application_id: "a".into(),
            message_id: "m".into(),
            event_id: "e".into(),
            session_kind: SessionKind::User,
            status: "Approved".into(),
            vendor_data: Some("recorded".into()),
            occurred_at: Utc::now(),
            minted_at: Utc::now(),
            expires_at: Utc::now(),
            reshares: 0,
        }
    }

    #[test]
    fn the_partners_policy_is_applied_to_didits_current_decision() {
        let p = partner(&[]).config;
        let ok = current_source(&p, &decision("Approved", "user"), record()).unwrap();
        assert_eq!(ok.status, SessionStatus::Approved);
        assert_eq!(ok.event_id, "e");
        assert_eq!(ok.vendor_data.as_deref(), Some("recorded"));
        let r = |d| current_source(&p, &d, record()).unwrap_err().reason;
        assert_eq!(r(decision("Declined", "user")), "policy_refused");
        assert_eq!(r(decision("APPROVED", "business")), "policy_refused");
        assert_eq!(r(decision("In Progress", "user")), "share_rejected");
    }
}
