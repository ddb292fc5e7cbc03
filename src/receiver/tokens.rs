//! The `share_token` consumer: one envelope in, one decision out (DESIGN.md §2, §4, §5).
//!
//! In order: the body must parse; the issuer must be configured (or unknown issuers explicitly allowed); the Ed25519
//! signature must verify against that issuer's key (or unsigned envelopes explicitly allowed); the token must be for
//! this application. Then the receiver ledger is claimed for (issuer application, source session): an imported
//! session is answered `duplicate` without calling Didit (naming the imported session). An expired token is never sent to Didit: the issuer is asked
//! for a fresh one (at most `receiver.max_reshares` times). Otherwise the token is imported with the workflow of its
//! kind, `vendor_data` from the template and `trust_review` from the issuer's policy; every answer ends as the import
//! table of DESIGN.md §4 says, and each outcome is published as `import.result` before the envelope is acked.
//!
//! Ack ordering: intent → import → ledger row → `import.result` confirmed → ack. A crash after the ledger row but
//! before the result is published means the redelivery finds `result_published = false` and publishes `imported`
//! then — once the crashed delivery's lease has run out, so that a second token handled while the first is still
//! publishing waits and reports `duplicate` instead of a second `imported`. A failed ledger write is never acked
//! (the message is retried; nothing after Didit's answer is lost).
//!
//! # The import intent (DESIGN.md §5)
//!
//! Didit refuses the same *token* twice, not the same *session*: a second token for a session (a re-mint after a
//! publish-confirm timeout, a duplicate event after the first token's lifetime, a reshare) imports it again. So
//! before Didit is called, the ledger gets an intent for (issuer, source session): the token's SHA-256 digest, the
//! envelope's message id, the holder, the `vendor_data` sent and the time ([`Ledger::begin_import`]). It stays
//! until the import is recorded, or until the import is known not to have happened (a definite refusal on the very
//! first call, or the list lookup below finding nothing); leases lapse and are voided at restart, the intent does
//! not. While it stands, no other token for the session is sent to Didit:
//! - the same token (its redelivery, its retry copy) replays itself: 201 means it had not been imported, 403
//!   already-imported means it had — and the session Didit made is then found as for a lost answer;
//! - another token first resolves the intent through Didit's list (`GET /v3/sessions/`, below): found → the
//!   earlier import is recorded and reported `imported`, and this token is not sent; absent → the intent is
//!   cleared and this token goes ahead; the list cannot tell → this delivery is retried, waiting for the earlier
//!   envelope (named in the retry detail) to come back and replay its own token.
//!
//! Why the token itself is not stored: it is a bearer credential for this application (with our API key it imports
//! a person's verification), so keeping it in a database other people administer, even for its lifetime of at
//! most a day, is a cost; the digest names it well enough to tell "the same token" from "another token". The
//! envelope that carries it comes back whenever its handling did not end (a crash leaves it unacked, a retry
//! leaves a copy in `.retry`), so the token is at hand whenever a replay is possible at all; and when another
//! token gets there first, the list answers the question a replay would (did the import happen?) and also names
//! the session, which a replay's 403 never does. The price: when the list cannot tell (no `vendor_data` and no
//! `shared_from_session` in the listing, or more rows than a lookup reads) and the earlier envelope never returns
//! (dead-lettered after `retry.max_attempts`), the later token waits until an operator replays the earlier one from
//! the dead-letter queue — it is never imported a second time.
//!
//! # A lost answer
//!
//! When Didit imported but its answer was lost (a timeout, a reset connection, a crash), the replay gets 403
//! already-imported. Instead of reporting `duplicate` without a session, the receiver looks the session up with
//! `GET /v3/sessions/?vendor_data=<what it sent>&session_kind=<kind>&date_from=<the day before>` (Didit's documented
//! list filters; exact `vendor_data`, newest first, `next` followed for a few pages). The row whose
//! `shared_from_session` is the source session is the import; when the list does not report that field, a single
//! row counts only if `receiver.vendor_data` names `{source_session_id}` (so the value is unique per source).
//! That session is recorded and published as `imported` with its id. Only when the list cannot name it (an empty
//! `vendor_data` without provenance in the list, two imports of the same source, a deleted session) is the outcome
//! `duplicate`, with the reason — never a guess.
//!
//! # The audit log
//!
//! Every act is recorded before the envelope is settled, and a failed audit write is a failed ledger write (the
//! pipeline pauses, the envelope comes back): `token_received` once the checks pass (keyed by the envelope, so a
//! redelivery records nothing new), `imported` or `duplicate` before the `import.result` is published (an import
//! keyed by its session, so the delivery that finally reports it records it once, whichever that is), and
//! `reshare_requested` before the request is published (keyed by the envelope, the attempt and a replay). A
//! dead-letter is recorded by the consumer ([`crate::amqp::consumer`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::amqp::Names;
use crate::amqp::consumer::{Decision, Handler, Incoming};
use crate::amqp::publisher::{Outgoing, Publisher};
use crate::audit::{self, Act, ActKind, AuditLog, Side};
use crate::config::RetryConfig;
use crate::didit::client::{DiditClient, SessionQuery};
use crate::didit::error::Disposition;
use crate::didit::wire::{ImportRequest, ImportedSession, SessionSummary, ShareTokenClaims};
use crate::envelope::{
    self, ImportOutcome, ImportResult, Message, ReshareRequest, ShareTokenEnvelope,
};
use crate::keys::{PublicKeys, Refused, SigningKeys};
use crate::ledger::{
    Claim, ImportIntent, ImportRecord, IntentClaim, LeaseKey, Ledger, LedgerError,
};
use crate::metrics::{Metrics, pipeline};
use crate::receiver::outcome::{
    Located, locate_import, outcome_for_reason, render_vendor_data, vendor_data_names_the_source,
    workflow_for,
};
use crate::retry::{Failure, with_backoff};

/// Pages of `GET /v3/sessions/` one lookup reads at most (100 rows each).
const LOOKUP_PAGES: usize = 10;

/// Lower-case hex SHA-256 of a share token: how the ledger names a token without holding it.
fn token_digest(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// How another token's unresolved intent ended.
enum Resolution {
    /// It did not import: the intent is cleared, this token may go ahead.
    NotImported,
    /// The message's decision is made (imported and reported, or retry, pause, requeue).
    Decided(Decision),
}

/// An issuer this receiver trusts.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub name: String,
    pub application_id: String,
    /// `None`: an unknown issuer, explicitly allowed.
    pub key: Option<PublicKeys>,
    pub trust_review: bool,
    /// `[[receiver.issuers]] agreement_id`: when set, tokens must carry exactly this one.
    pub agreement_id: Option<String>,
}

/// Checks a message's `x-pb-signature` / `x-pb-key-id` against the issuer's keys (share tokens and notices alike):
/// the refusal's reason and detail, or `Ok`. Unsigned passes only with `allow_unsigned`; an unknown issuer allowed
/// in (no key) passes.
pub(crate) fn verify_signature(
    msg: &Incoming,
    peer: &Peer,
    allow_unsigned: bool,
) -> Result<(), (&'static str, String)> {
    let Some(signature) = msg.header(envelope::HEADER_SIGNATURE) else {
        if allow_unsigned {
            return Ok(());
        }
        return Err((
            "unsigned",
            "message carries no x-pb-signature header".into(),
        ));
    };
    let Some(keys) = &peer.key else {
        // An unknown issuer, explicitly allowed: there is no key to check against.
        return Ok(());
    };
    match keys.verify(&msg.body, signature, msg.header(envelope::HEADER_KEY_ID)) {
        Ok(key) => {
            tracing::debug!(issuer = %peer.name, key_id = key.key_id(), "signature verified");
            Ok(())
        }
        Err(Refused::UnknownKey(key_id)) => Err((
            "bad_signature",
            format!(
                "signed with key {key_id}, which is not one of issuer {}'s configured public keys ({})",
                peer.name,
                keys.all()
                    .iter()
                    .map(|k| k.key_id())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
        Err(Refused::Bad(bad)) => Err((bad.reason, bad.detail)),
    }
}

/// Handles `share_token` deliveries.
pub(crate) struct TokenHandler {
    pub client: DiditClient,
    pub ledger: Ledger,
    /// Every act is recorded here before its envelope is settled.
    pub audit: AuditLog,
    pub publisher: Publisher,
    pub names: Names,
    pub application_id: String,
    pub peers: Vec<Peer>,
    /// Signs `reshare.request`s (`receiver.signing_key_file`); `None` sends them unsigned.
    pub signing_key: Option<SigningKeys>,
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
    /// `dead-letters replay` moved this token back (`x-pb-replayed`): its reshare counter starts again.
    replayed: bool,
    /// That replay's id (the header's value).
    replay_id: Option<String>,
}

impl Handler for TokenHandler {
    /// Another organisation's message: its trace is linked, not continued (docs/tracing.md).
    fn trace_relation(&self) -> crate::trace::Relation {
        crate::trace::Relation::Link
    }

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
                tracing::warn!(message_id = %msg.message_id.as_deref().unwrap_or(""), reason = bad.reason, detail = %bad.detail, "bad share_token envelope");
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
                agreement_id: None,
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
        if let Some(expected) = &peer.agreement_id
            && envelope.agreement_id.as_ref() != Some(expected)
        {
            tracing::warn!(message_id = %envelope.message_id, source_session_id = %envelope.source_session_id, issuer = %peer.name, "token under another data-sharing agreement; dead-lettering");
            return self.refuse(
                &peer.name,
                "agreement_mismatch",
                match &envelope.agreement_id {
                    Some(got) => format!(
                        "the token names agreement {got:?}; the agreement with issuer {} is {expected:?}",
                        peer.name
                    ),
                    None => format!(
                        "the token names no agreement; the agreement with issuer {} is {expected:?}",
                        peer.name
                    ),
                },
            );
        }
        let job = Job {
            envelope: &envelope,
            peer,
            deadline,
            replayed: msg.header(envelope::HEADER_REPLAYED).is_some(),
            replay_id: msg.header(envelope::HEADER_REPLAYED).map(str::to_string),
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
        let mut received = self
            .act(ActKind::TokenReceived, &job)
            .status(envelope.source_status.clone())
            .once(&envelope.message_id);
        received.vendor_data = envelope.source_vendor_data.clone();
        if let Err(decision) = self.record(&job, received).await {
            return decision;
        }
        self.import(&job, claims.as_ref()).await
    }
}

impl TokenHandler {
    /// The agreement with the issuer of `application_id`, as configured.
    fn agreement_of(&self, application_id: &str) -> Option<String> {
        self.peers
            .iter()
            .find(|p| p.application_id == application_id)
            .and_then(|p| p.agreement_id.clone())
    }

    /// An act about this job's token, on the receiver side.
    fn act(&self, kind: ActKind, job: &Job<'_>) -> Act {
        let envelope = job.envelope;
        let mut act = Act::new(kind, Side::Receiver)
            .partner(&job.peer.name, &job.peer.application_id)
            .session(&envelope.source_session_id)
            .event(&envelope.event_id)
            .message(&envelope.message_id)
            .token(&audit::token_id(envelope.share_token.expose()));
        // The agreement configured for the issuer, else the one the token names.
        act.agreement_id = job
            .peer
            .agreement_id
            .clone()
            .or_else(|| envelope.agreement_id.clone());
        act
    }

    /// Records `act`; a failure is a failed ledger write (the envelope is kept: pause, or retry).
    async fn record(&self, job: &Job<'_>, act: Act) -> Result<(), Decision> {
        match self.audit.record(act).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.ledger_failed(job, &e)),
        }
    }

    /// A message that is not a token we can act on: dead-letter it and count it.
    fn refuse(&self, issuer: &str, reason: &'static str, detail: String) -> Decision {
        self.metrics.import(issuer, "bad_message");
        Decision::DeadLetter { reason, detail }
    }

    fn check_signature(&self, msg: &Incoming, peer: &Peer) -> Result<(), Decision> {
        verify_signature(msg, peer, self.allow_unsigned)
            .map_err(|(reason, detail)| self.refuse(&peer.name, reason, detail))
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
                    None => return self.already_imported(job, record, None).await,
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

        let vendor_data = render_vendor_data(
            &self.vendor_template,
            envelope.source_vendor_data.as_deref(),
            &envelope.source_session_id,
            &job.peer.name,
        );
        // The intent goes in before Didit is called: from here on, whoever handles this session knows that an
        // import may have happened without a row.
        let token_digest = token_digest(envelope.share_token.expose());
        let mut resolved_others = 0;
        let replay = loop {
            let intent = ImportIntent {
                token_digest: token_digest.clone(),
                message_id: envelope.message_id.clone(),
                holder: holder.clone(),
                vendor_data: vendor_data.clone(),
                at: Utc::now(),
            };
            let begun = self
                .ledger
                .begin_import(
                    &job.peer.application_id,
                    &envelope.source_session_id,
                    &intent,
                )
                .await;
            match begun {
                Ok(IntentClaim::Recorded { replay }) => break replay,
                Ok(IntentClaim::Done(record)) => {
                    self.release(job, &holder).await;
                    if self.result_pending_until(&record).is_some() {
                        // Recorded a moment ago by a delivery still publishing its result: let it report.
                        return self.retry(
                            job,
                            "another delivery is importing this session right now".into(),
                        );
                    }
                    return self.already_imported(job, record, None).await;
                }
                Ok(IntentClaim::Pending(other)) if resolved_others < 3 => {
                    resolved_others += 1;
                    match self.resolve_other(job, &holder, &other).await {
                        Resolution::NotImported => continue,
                        Resolution::Decided(decision) => return decision,
                    }
                }
                Ok(IntentClaim::Pending(other)) => {
                    self.release(job, &holder).await;
                    return self.retry(
                        job,
                        format!(
                            "tokens for this session keep replacing each other (last: envelope {})",
                            other.message_id
                        ),
                    );
                }
                Err(e) => {
                    self.release(job, &holder).await;
                    return self.ledger_failed(job, &e);
                }
            }
        };

        let request = ImportRequest {
            share_token: envelope.share_token.clone(),
            workflow_id,
            vendor_data,
            trust_review: job.peer.trust_review,
        };
        // Whether Didit may have acted on this token before the answer that ends this handling: an earlier
        // attempt of the same intent (a redelivery, a retry copy) or an earlier call in this handling's backoff.
        let calls = AtomicU32::new(0);
        let imported = with_backoff(
            &self.retry,
            job.deadline,
            "import",
            &self.metrics,
            &self.shutdown,
            || {
                calls.fetch_add(1, Ordering::Relaxed);
                self.client.import_by(&request, Some(job.deadline))
            },
        )
        .await;
        let may_have_imported = replay || calls.load(Ordering::Relaxed) > 1;
        match imported {
            Ok(decision) => self.imported(job, &holder, &request, decision).await,
            Err(Failure::Shutdown) => {
                // The intent stays: the requeued delivery replays the token.
                self.release(job, &holder).await;
                Decision::Requeue
            }
            Err(Failure::Didit(e)) => {
                let detail = e.to_string();
                match e.disposition() {
                    Disposition::Duplicate => self.lost_answer(job, &holder, &request).await,
                    Disposition::Reshare => {
                        self.abandon_unless(job, &token_digest, may_have_imported)
                            .await;
                        self.release(job, &holder).await;
                        self.reshare(job, &detail).await
                    }
                    Disposition::Pause { reason } => {
                        self.release(job, &holder).await;
                        self.metrics.import(&job.peer.name, "paused");
                        tracing::error!(issuer = %job.peer.name, reason, error = %detail, "import impossible until an operator acts; pausing");
                        Decision::Pause { reason, detail }
                    }
                    Disposition::Retry { .. } if e.is_pacing() => {
                        // Only the key's rate limit is in the way (a 429, or no room before the hold deadline):
                        // the intent stays as for any retry, and the wait costs no attempt.
                        self.release(job, &holder).await;
                        self.metrics.import(&job.peer.name, "paced");
                        Decision::Defer {
                            detail,
                            headers: Vec::new(),
                        }
                    }
                    Disposition::Retry { .. } => {
                        // A 5xx, a timeout or a broken connection may come after Didit acted: the intent stays,
                        // and the next attempt replays the token.
                        self.release(job, &holder).await;
                        self.retry(job, detail)
                    }
                    Disposition::DeadLetter { reason } => {
                        self.abandon_unless(job, &token_digest, may_have_imported)
                            .await;
                        self.release(job, &holder).await;
                        self.finish_failed(job, reason, detail).await
                    }
                }
            }
        }
    }

    /// A ledger call failed: pause while the ledger is unavailable (nothing is dead-lettered because the ledger was
    /// down, and no attempt is used up), retry for anything else; the message is kept either way.
    fn ledger_failed(&self, job: &Job<'_>, e: &LedgerError) -> Decision {
        let decision = crate::probe::ledger_decision(e);
        let outcome = if matches!(decision, Decision::Pause { .. }) {
            "paused"
        } else {
            "retried"
        };
        self.metrics.import(&job.peer.name, outcome);
        decision
    }

    /// Counts a retry and keeps the message.
    fn retry(&self, job: &Job<'_>, detail: String) -> Decision {
        self.metrics.import(&job.peer.name, "retried");
        Decision::Retry {
            detail,
            headers: Vec::new(),
        }
    }

    /// Clears this token's intent after a definite refusal, unless an earlier attempt with it may have reached
    /// Didit (then it stays, and the next token for the session resolves it through the list lookup).
    async fn abandon_unless(&self, job: &Job<'_>, token_digest: &str, may_have_imported: bool) {
        if may_have_imported {
            return;
        }
        if let Err(e) = self
            .ledger
            .abandon_import_intent(
                &job.peer.application_id,
                &job.envelope.source_session_id,
                token_digest,
            )
            .await
        {
            tracing::warn!(error = %e, "could not clear the import intent; the next token for the session looks the session up first");
        }
    }

    /// Another token's import of this session is unresolved (its holder crashed between Didit's answer and the
    /// ledger row, or its answer was lost). Its token is not at hand (only its digest is stored), so the question
    /// "did Didit import it?" is asked of Didit's list instead: found → that import is recorded and reported as
    /// `imported` (the backend learns the session); absent → the intent is cleared and this token may go ahead;
    /// unknown → this delivery waits (retry) for the earlier envelope, named in the detail, to come back and replay
    /// its own token.
    async fn resolve_other(&self, job: &Job<'_>, holder: &str, other: &ImportIntent) -> Resolution {
        let envelope = job.envelope;
        tracing::info!(message_id = %envelope.message_id, source_session_id = %envelope.source_session_id, issuer = %job.peer.name, earlier_message_id = %other.message_id, "an earlier token's import of this session is unresolved; looking it up");
        let located = match self
            .locate(job, other.vendor_data.as_deref(), other.at)
            .await
        {
            Ok(located) => located,
            Err(decision) => {
                self.release(job, holder).await;
                return Resolution::Decided(decision);
            }
        };
        match located {
            Located::Found(session) => {
                let record = self.record_from(job, &session, other.vendor_data.clone());
                Resolution::Decided(self.record_and_report(job, holder, record).await)
            }
            Located::Absent => {
                match self
                    .ledger
                    .abandon_import_intent(
                        &job.peer.application_id,
                        &envelope.source_session_id,
                        &other.token_digest,
                    )
                    .await
                {
                    Ok(()) => {
                        tracing::info!(source_session_id = %envelope.source_session_id, earlier_message_id = %other.message_id, "the earlier token was not imported; this one goes ahead");
                        Resolution::NotImported
                    }
                    Err(e) => {
                        self.release(job, holder).await;
                        Resolution::Decided(self.ledger_failed(job, &e))
                    }
                }
            }
            Located::Unknown(why) => {
                self.release(job, holder).await;
                tracing::warn!(source_session_id = %envelope.source_session_id, earlier_message_id = %other.message_id, why = %why, "an earlier token's import is unresolved and the list cannot tell; waiting for that envelope to come back");
                Resolution::Decided(self.retry(
                    job,
                    format!(
                        "the import of an earlier token for this session (envelope {}) is unresolved and Didit's \
                         list cannot tell whether it happened ({why}); that envelope replays its token when it \
                         comes back",
                        other.message_id
                    ),
                ))
            }
        }
    }

    /// Didit says this token was imported here already, and the ledger has no row: the first answer was lost (a
    /// timeout, a reset connection, a crash before the row). The session Didit created is looked up, recorded and
    /// reported as `imported`; only when the list cannot name it is the outcome `duplicate`, with the reason.
    async fn lost_answer(&self, job: &Job<'_>, holder: &str, request: &ImportRequest) -> Decision {
        let envelope = job.envelope;
        // The first attempt with this token came at most one token lifetime (Didit's maximum: a day) ago.
        let since = Utc::now() - chrono::Duration::days(1);
        let located = match self
            .locate(job, request.vendor_data.as_deref(), since)
            .await
        {
            Ok(located) => located,
            Err(decision) => {
                self.release(job, holder).await;
                return decision;
            }
        };
        let why = match located {
            Located::Found(session) => {
                tracing::info!(message_id = %envelope.message_id, source_session_id = %envelope.source_session_id, issuer = %job.peer.name, imported_session_id = %session.session_id, "Didit's answer was lost; found the session it imported");
                let record = self.record_from(job, &session, request.vendor_data.clone());
                return self.record_and_report(job, holder, record).await;
            }
            Located::Absent => {
                "Didit says this token was imported, but its list shows no session imported from the source"
                    .to_string()
            }
            Located::Unknown(why) => why,
        };
        tracing::warn!(message_id = %envelope.message_id, source_session_id = %envelope.source_session_id, issuer = %job.peer.name, why = %why, "Didit says already imported and the session cannot be found; reporting duplicate");
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
        if let Err(e) = self.ledger.complete_import(&record, holder).await {
            // Not acked: without the row a later token would be sent to Didit again.
            tracing::warn!(error = %e, message_id = %envelope.message_id, "could not record the import; retrying");
            self.release(job, holder).await;
            return self.ledger_failed(job, &e);
        }
        self.already_imported(
            job,
            record,
            Some(format!(
                "session already imported into this application; the imported session is not known: {why}"
            )),
        )
        .await
    }

    /// Asks Didit's list which session imported this source: `GET /v3/sessions/?vendor_data=<sent>&session_kind=
    /// <kind>&date_from=<day before the first attempt>&limit=100`, following `next` for at most
    /// [`LOOKUP_PAGES`] pages (docs.didit.me/sessions-api/list-sessions: `vendor_data` is an exact filter, the
    /// list is newest first). Without a `vendor_data` (the template rendered nothing) only the date bounds it, and
    /// `shared_from_session` must say which row is the import. A retryable or pausing failure of the lookup is the
    /// message's decision; any other failure makes the answer unknown.
    async fn locate(
        &self,
        job: &Job<'_>,
        vendor_data: Option<&str>,
        since: DateTime<Utc>,
    ) -> Result<Located, Decision> {
        let query = SessionQuery {
            vendor_data: vendor_data.map(str::to_string),
            session_kind: Some(job.envelope.session_kind.into()),
            date_from: Some((since - chrono::Duration::days(1)).date_naive()),
            limit: Some(100),
            ..SessionQuery::default()
        };
        let listed = with_backoff(
            &self.retry,
            job.deadline,
            "list",
            &self.metrics,
            &self.shutdown,
            || self.client.list_sessions(&query, LOOKUP_PAGES),
        )
        .await;
        match listed {
            Ok(listing) => Ok(locate_import(
                &listing.sessions,
                listing.complete,
                &job.envelope.source_session_id,
                vendor_data.is_some() && vendor_data_names_the_source(&self.vendor_template),
            )),
            Err(Failure::Shutdown) => Err(Decision::Requeue),
            Err(Failure::Didit(e)) => match e.disposition() {
                Disposition::Retry { .. } => {
                    Err(self.retry(job, format!("looking up the import: {e}")))
                }
                Disposition::Pause { reason } => {
                    self.metrics.import(&job.peer.name, "paused");
                    Err(Decision::Pause {
                        reason,
                        detail: format!("looking up the import: {e}"),
                    })
                }
                _ => Ok(Located::Unknown(format!("the lookup failed: {e}"))),
            },
        }
    }

    /// The ledger record of an import found in Didit's list.
    fn record_from(
        &self,
        job: &Job<'_>,
        session: &SessionSummary,
        vendor_data: Option<String>,
    ) -> ImportRecord {
        ImportRecord {
            issuer_application_id: job.peer.application_id.clone(),
            source_session_id: job.envelope.source_session_id.clone(),
            imported_session_id: Some(session.session_id.clone()),
            session_number: session.session_number,
            status: Some(session.status.clone()).filter(|s| !s.is_empty()),
            session_kind: session.session_kind.unwrap_or(job.envelope.session_kind),
            vendor_data: session.vendor_data.clone().or(vendor_data),
            trust_review: job.peer.trust_review,
            imported_at: Utc::now(),
            result_published: false,
        }
    }

    /// Records an import found by the lookup and reports it as `imported`; never acks without the row.
    async fn record_and_report(
        &self,
        job: &Job<'_>,
        holder: &str,
        record: ImportRecord,
    ) -> Decision {
        if let Err(e) = self.ledger.complete_import(&record, holder).await {
            tracing::warn!(error = %e, message_id = %job.envelope.message_id, "could not record the import; retrying");
            self.release(job, holder).await;
            return self.ledger_failed(job, &e);
        }
        self.metrics
            .import(&job.peer.name, ImportOutcome::Imported.as_str());
        self.publish_and_ack(job, &record, ImportOutcome::Imported, None)
            .await
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
        decision: ImportedSession,
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
            // The import happened but is not recorded: never ack. The intent stays, so the redelivery replays the
            // token, gets 403 already-imported and finds the session through the list lookup.
            tracing::warn!(error = %e, message_id = %envelope.message_id, imported_session_id = %decision.session_id, "imported but not recorded in the ledger; retrying");
            self.release(job, holder).await;
            return self.ledger_failed(job, &e);
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
        self.publish_and_ack(job, &record, ImportOutcome::Imported, None)
            .await
    }

    /// The ledger (or Didit) says this session is already imported here. `why` replaces the default reason of a
    /// `duplicate`.
    async fn already_imported(
        &self,
        job: &Job<'_>,
        record: ImportRecord,
        why: Option<String>,
    ) -> Decision {
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
        let reason = (outcome == ImportOutcome::Duplicate).then(|| {
            why.unwrap_or_else(|| "session already imported into this application".to_string())
        });
        self.publish_and_ack(job, &record, outcome, reason).await
    }

    async fn publish_and_ack(
        &self,
        job: &Job<'_>,
        record: &ImportRecord,
        outcome: ImportOutcome,
        reason: Option<String>,
    ) -> Decision {
        let kind = if outcome == ImportOutcome::Imported {
            ActKind::Imported
        } else {
            ActKind::Duplicate
        };
        let mut act = self.act(kind, job);
        act.imported_session_id = record.imported_session_id.clone();
        act.status = record.status.clone();
        act.reason = reason.clone();
        act.vendor_data = record.vendor_data.clone();
        let act = match kind {
            // One import, one act, whichever delivery gets to report it.
            ActKind::Imported => act.once(format!(
                "{}:{}:{}",
                record.issuer_application_id,
                record.source_session_id,
                record.imported_session_id.as_deref().unwrap_or("-")
            )),
            _ => act.once(&job.envelope.message_id),
        };
        if let Err(decision) = self.record(job, act).await {
            return decision;
        }
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
            agreement_id: self.agreement_of(&record.issuer_application_id),
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
            agreement_id: job
                .peer
                .agreement_id
                .clone()
                .or_else(|| envelope.agreement_id.clone()),
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
    ///
    /// The counter counts requests the broker confirmed: it is read first, and bumped only after the publish is
    /// confirmed, so a request that failed (unroutable, nacked, timed out) is retried without using up one of
    /// `max_reshares`. A token replayed by `dead-letters replay` (`x-pb-replayed`) resets it first: the operator
    /// asks for a new round. Two expired tokens of one session handled at the very same moment may both send a
    /// request for the same count (one extra request, which the issuer answers with one more token and this
    /// ledger absorbs as a duplicate); the bound still holds once the counter is bumped.
    async fn reshare(&self, job: &Job<'_>, why: &str) -> Decision {
        let envelope = job.envelope;
        let (issuer, session) = (&job.peer.application_id, &envelope.source_session_id);
        if job.replayed
            && let Err(e) = self.ledger.reset_reshares(issuer, session).await
        {
            return self.ledger_failed(job, &e);
        }
        let sent = match self.ledger.reshares(issuer, session).await {
            Ok(n) => n,
            Err(e) => return crate::probe::ledger_decision(&e),
        };
        if sent >= self.max_reshares {
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
        let attempt = sent + 1;
        // Recorded before the request goes out: a failed publish comes back with the same attempt (the counter is
        // bumped only after a confirm), which the key absorbs.
        let asked = self
            .act(ActKind::ReshareRequested, job)
            .reason("token_expired")
            .status(format!("attempt {attempt}"))
            .once(format!(
                "{}:{attempt}:{}",
                envelope.message_id,
                job.replay_id.as_deref().unwrap_or("")
            ));
        if let Err(decision) = self.record(job, asked).await {
            return decision;
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
                // Signed like a token, so the issuer knows the request comes from this partner.
                headers: self
                    .signing_key
                    .iter()
                    .flat_map(|keys| keys.signature_headers(&body))
                    .collect(),
            })
            .await;
        match published {
            Ok(()) => {
                if let Err(e) = self.ledger.bump_reshares(issuer, session).await {
                    // The request is out: retrying would send another. The count stays one short, which at worst
                    // allows one more request than max_reshares.
                    tracing::warn!(error = %e, "reshare requested but not counted in the ledger");
                }
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
