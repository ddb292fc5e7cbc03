//! Our own messages (DESIGN.md §2): `onboarding.finished`, `share_token`, `import.result`, `reshare.request`,
//! how a body is parsed into one (or refused with a reason that goes into `x-pb-reason`), and the issuer's Ed25519
//! signature over the exact body bytes of a `share_token` envelope.
//!
//! This module knows neither AMQP nor Didit's HTTP API: it turns bytes into messages and back.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD};
use chrono::{DateTime, SecondsFormat, Utc};
use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::didit::wire::{SessionKind, SessionStatus};
use crate::secret::ShareToken;

/// `app_id` of every message we publish.
pub const APP_ID: &str = "partner-bridge";
/// Header carrying `ed25519:<base64 signature of the body>`.
pub const HEADER_SIGNATURE: &str = "x-pb-signature";
/// Header carrying the signing key's id.
pub const HEADER_KEY_ID: &str = "x-pb-key-id";
/// Dead-letter reason (a fixed word such as `share_rejected`).
pub const HEADER_REASON: &str = "x-pb-reason";
/// Dead-letter detail (a sentence for a person).
pub const HEADER_DETAIL: &str = "x-pb-detail";
/// Which delivery attempt of this message this is (1 for the first).
pub const HEADER_ATTEMPT: &str = "x-pb-attempt";
/// On dead-lettered copies of an onboarding event: the partner that copy is about.
pub const HEADER_PARTNER: &str = "x-pb-partner";
/// On retried onboarding events: the partner application ids still to be served (comma-separated).
pub const HEADER_PENDING_PARTNERS: &str = "x-pb-pending-partners";
/// Set by `dead-letters replay` on every message it moves back (the replay run's id): the receiver resets the
/// session's reshare counter when it sees it, so a replayed `expired` token gets a fresh round of reshares.
pub const HEADER_REPLAYED: &str = "x-pb-replayed";

/// Message `type` values.
pub mod types {
    /// Issuer input.
    pub const ONBOARDING_FINISHED: &str = "onboarding.finished";
    /// Issuer → receiver.
    pub const SHARE_TOKEN: &str = "share_token";
    /// Receiver → its backend.
    pub const IMPORT_RESULT: &str = "import.result";
    /// Receiver → issuer.
    pub const RESHARE_REQUEST: &str = "reshare.request";
    /// Issuer's backend (or `partner-bridge notify`) → issuer: tell every recipient of a session.
    pub const NOTICE_REQUESTED: &str = "subject.notice.requested";
    /// Issuer → receiver (and receiver → its backend).
    pub const NOTICE: &str = "subject.notice";
    /// Receiver → issuer.
    pub const NOTICE_ACK: &str = "subject.notice.ack";
}

/// Why a body is not a message we accept. `reason` is the `x-pb-reason` word.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct BadMessage {
    /// A fixed word: `malformed_json`, `unknown_type`, `missing_field`, `invalid_field`, `oversized`,
    /// `unsigned`, `bad_signature`, `unknown_issuer`.
    pub reason: &'static str,
    /// What exactly, for a person.
    pub detail: String,
}

impl BadMessage {
    /// A new refusal.
    pub fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// RFC 3339 with seconds precision and `Z`, the way every timestamp in our messages is written.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `onboarding.finished`: a verification finished at the issuer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OnboardingFinished {
    /// Always `onboarding.finished`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Unique per event (dedupe key).
    pub event_id: String,
    /// The Didit session.
    pub session_id: String,
    /// Status in either casing.
    pub status: String,
    /// `user` (default) or `business`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_kind: Option<SessionKind>,
    /// The issuer's own id for the entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_data: Option<String>,
    /// When the verification finished (default: when received).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurred_at: Option<DateTime<Utc>>,
    /// Partner application ids (default: every partner whose policy matches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partners: Option<Vec<String>>,
}

/// `share_token`: a minted token on its way to one partner.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShareTokenEnvelope {
    /// Always `share_token`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Unique per envelope (also the AMQP `message_id`).
    pub message_id: String,
    /// The onboarding event that caused it.
    pub event_id: String,
    /// The Didit share token.
    pub share_token: ShareToken,
    /// `user` or `business`.
    pub session_kind: SessionKind,
    /// The issuer's session.
    pub source_session_id: String,
    /// The issuer's application.
    pub from_application_id: String,
    /// The partner's application.
    pub for_application_id: String,
    /// The source session's status.
    pub source_status: String,
    /// The issuer's id for the entity, only where the partner's policy allows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_vendor_data: Option<String>,
    /// When Didit minted the token.
    pub minted_at: DateTime<Utc>,
    /// When the token stops working.
    pub expires_at: DateTime<Utc>,
    /// When the verification finished.
    pub occurred_at: DateTime<Utc>,
    /// The data-sharing agreement the token falls under (`[[issuer.partners]] agreement_id`), when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement_id: Option<String>,
}

/// The outcome of one token at the receiver.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ImportOutcome {
    /// A new session exists in this application.
    Imported,
    /// This session was already imported here (success).
    Duplicate,
    /// The issuer's session no longer exists.
    SourceGone,
    /// The token was meant for another application.
    Misrouted,
    /// Didit refused the import (400) or forbade it (403).
    Rejected,
    /// The token expired and no fresh one could be had.
    Expired,
}

impl ImportOutcome {
    /// The wire word (and routing key suffix).
    pub fn as_str(self) -> &'static str {
        match self {
            ImportOutcome::Imported => "imported",
            ImportOutcome::Duplicate => "duplicate",
            ImportOutcome::SourceGone => "source_gone",
            ImportOutcome::Misrouted => "misrouted",
            ImportOutcome::Rejected => "rejected",
            ImportOutcome::Expired => "expired",
        }
    }

    /// Every outcome.
    pub const ALL: [ImportOutcome; 6] = [
        ImportOutcome::Imported,
        ImportOutcome::Duplicate,
        ImportOutcome::SourceGone,
        ImportOutcome::Misrouted,
        ImportOutcome::Rejected,
        ImportOutcome::Expired,
    ];
}

/// `import.result`: what happened to a token, for the receiver's own backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImportResult {
    /// Always `import.result`.
    #[serde(rename = "type")]
    pub kind: String,
    /// What happened.
    pub outcome: ImportOutcome,
    /// The issuer's session.
    pub source_session_id: String,
    /// The issuer's application.
    pub from_application_id: String,
    /// The new session in this application (imported, and duplicate when known).
    pub imported_session_id: Option<String>,
    /// Its session number.
    pub session_number: Option<i64>,
    /// Its status.
    pub status: Option<String>,
    /// `user` or `business`.
    pub session_kind: SessionKind,
    /// The `vendor_data` the import used.
    pub vendor_data: Option<String>,
    /// Whether the issuer's decision was kept.
    pub trust_review: bool,
    /// When this side finished with the token.
    pub imported_at: DateTime<Utc>,
    /// Why, for outcomes other than `imported`.
    pub reason: Option<String>,
    /// The data-sharing agreement with the issuer (`[[receiver.issuers]] agreement_id`, else the token's); null
    /// when neither names one.
    #[serde(default)]
    pub agreement_id: Option<String>,
}

/// `reshare.request`: the receiver asks the issuer for a fresh token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReshareRequest {
    /// Always `reshare.request`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The issuer's session.
    pub source_session_id: String,
    /// The receiver's application.
    pub for_application_id: String,
    /// Why (`token_expired`).
    pub reason: String,
    /// 1 for the first request about this session.
    pub attempt: u32,
    /// The envelope whose token expired.
    pub original_message_id: String,
}

/// What a notice is about (GDPR Art. 17 and 16, passed on to every recipient under Art. 19).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    /// The person's data was erased at the source: recipients should erase their copy.
    Erasure,
    /// The person's data was rectified at the source: recipients should update theirs.
    Rectification,
}

impl NoticeKind {
    /// The wire word (and routing key suffix towards the receiver's backend).
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::Erasure => "erasure",
            NoticeKind::Rectification => "rectification",
        }
    }

    /// Reads the wire word.
    pub fn parse(s: &str) -> Option<NoticeKind> {
        match s {
            "erasure" => Some(NoticeKind::Erasure),
            "rectification" => Some(NoticeKind::Rectification),
            _ => None,
        }
    }
}

/// `subject.notice.requested`: the issuer's backend asks the bridge to tell every recipient of a session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NoticeRequested {
    /// Always `subject.notice.requested`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Unique per request (dedupe key: a redelivered request sends nothing more).
    pub request_id: String,
    /// The issuer's Didit session the person's data came from.
    pub session_id: String,
    /// `erasure` or `rectification`.
    #[serde(rename = "kind")]
    pub notice_kind: NoticeKind,
    /// A sentence for the recipients (no personal data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `subject.notice`: an erasure or rectification notice for one recipient, signed like a `share_token`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SubjectNotice {
    /// Always `subject.notice`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Unique per (request, recipient); also the AMQP `message_id`. Every resend carries the same id.
    pub notice_id: String,
    /// `erasure` or `rectification`.
    #[serde(rename = "kind")]
    pub notice_kind: NoticeKind,
    /// The issuer's session.
    pub source_session_id: String,
    /// The issuer's application.
    pub from_application_id: String,
    /// The recipient's application.
    pub for_application_id: String,
    /// The data-sharing agreement with the recipient, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement_id: Option<String>,
    /// A sentence for the recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the notice was first issued.
    pub issued_at: DateTime<Utc>,
    /// Receiver → its backend only: the imported copy of the session in this application, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_session_id: Option<String>,
    /// Receiver → its backend only: what the receiver did (`deleted` or `notified`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<NoticeAction>,
}

/// What the receiver did with a notice.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum NoticeAction {
    /// Published to the backend only.
    Notified,
    /// The imported copy was deleted in Didit, and the notice published to the backend.
    Deleted,
}

impl NoticeAction {
    /// The wire word.
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeAction::Notified => "notified",
            NoticeAction::Deleted => "deleted",
        }
    }
}

/// `subject.notice.ack`: the receiver acted on a notice. Signed by the receiver.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NoticeAck {
    /// Always `subject.notice.ack`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The notice acknowledged.
    pub notice_id: String,
    /// The issuer's session.
    pub source_session_id: String,
    /// The issuer's application (where the ack goes).
    pub from_application_id: String,
    /// The receiver's application (who acknowledges).
    pub for_application_id: String,
    /// The imported copy, when there was one.
    pub imported_session_id: Option<String>,
    /// `notified` or `deleted`.
    pub action: NoticeAction,
    /// When the receiver acted (the first time; a redelivered notice is acknowledged with the same time).
    pub acted_at: DateTime<Utc>,
}

/// Any message we consume.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `onboarding.finished`
    OnboardingFinished(OnboardingFinished),
    /// `share_token`
    ShareToken(Box<ShareTokenEnvelope>),
    /// `reshare.request`
    ReshareRequest(ReshareRequest),
    /// `import.result`
    ImportResult(ImportResult),
    /// `subject.notice.requested`
    NoticeRequested(NoticeRequested),
    /// `subject.notice`
    Notice(Box<SubjectNotice>),
    /// `subject.notice.ack`
    NoticeAck(NoticeAck),
}

/// Parses a body into one of our messages, or says precisely why not.
pub fn parse(body: &[u8], max_bytes: usize) -> Result<Message, BadMessage> {
    if body.len() > max_bytes {
        return Err(BadMessage::new(
            "oversized",
            format!("body is {} bytes, limit {max_bytes}", body.len()),
        ));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| BadMessage::new("malformed_json", format!("not JSON: {e}")))?;
    let Value::Object(map) = &value else {
        return Err(BadMessage::new("malformed_json", "not a JSON object"));
    };
    let kind = match map.get("type") {
        None | Some(Value::Null) => {
            return Err(BadMessage::new("missing_field", "missing field `type`"));
        }
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(BadMessage::new("invalid_field", "`type` is not a string")),
    };
    let message = match kind.as_str() {
        types::ONBOARDING_FINISHED => Message::OnboardingFinished(typed(value)?),
        types::SHARE_TOKEN => Message::ShareToken(Box::new(typed(value)?)),
        types::RESHARE_REQUEST => Message::ReshareRequest(typed(value)?),
        types::IMPORT_RESULT => Message::ImportResult(typed(value)?),
        types::NOTICE_REQUESTED => Message::NoticeRequested(typed(value)?),
        types::NOTICE => Message::Notice(Box::new(typed(value)?)),
        types::NOTICE_ACK => Message::NoticeAck(typed(value)?),
        other => {
            return Err(BadMessage::new(
                "unknown_type",
                format!("unknown message type {:?}", truncate(other, 64)),
            ));
        }
    };
    check_required(&message)?;
    Ok(message)
}

fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, BadMessage> {
    serde_json::from_value(value).map_err(|e| {
        let text = e.to_string();
        if text.starts_with("missing field") {
            BadMessage::new("missing_field", text)
        } else {
            BadMessage::new("invalid_field", text)
        }
    })
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Empty strings are as missing as absent fields; statuses must be statuses.
fn check_required(message: &Message) -> Result<(), BadMessage> {
    fn present(value: &str, field: &str) -> Result<(), BadMessage> {
        if value.trim().is_empty() {
            Err(BadMessage::new(
                "missing_field",
                format!("field `{field}` is empty"),
            ))
        } else {
            Ok(())
        }
    }
    match message {
        Message::OnboardingFinished(m) => {
            present(&m.event_id, "event_id")?;
            present(&m.session_id, "session_id")?;
            present(&m.status, "status")?;
            if SessionStatus::parse(&m.status).is_none() {
                return Err(BadMessage::new(
                    "invalid_field",
                    format!("unknown status {:?}", truncate(&m.status, 64)),
                ));
            }
        }
        Message::ShareToken(m) => {
            present(&m.message_id, "message_id")?;
            present(m.share_token.expose(), "share_token")?;
            present(&m.source_session_id, "source_session_id")?;
            present(&m.from_application_id, "from_application_id")?;
            present(&m.for_application_id, "for_application_id")?;
        }
        Message::ReshareRequest(m) => {
            present(&m.source_session_id, "source_session_id")?;
            present(&m.for_application_id, "for_application_id")?;
        }
        Message::ImportResult(m) => {
            present(&m.source_session_id, "source_session_id")?;
        }
        Message::NoticeRequested(m) => {
            present(&m.request_id, "request_id")?;
            present(&m.session_id, "session_id")?;
        }
        Message::Notice(m) => {
            present(&m.notice_id, "notice_id")?;
            present(&m.source_session_id, "source_session_id")?;
            present(&m.from_application_id, "from_application_id")?;
            present(&m.for_application_id, "for_application_id")?;
        }
        Message::NoticeAck(m) => {
            present(&m.notice_id, "notice_id")?;
            present(&m.from_application_id, "from_application_id")?;
            present(&m.for_application_id, "for_application_id")?;
        }
    }
    Ok(())
}

/// The issuer's Ed25519 signing key.
#[derive(Clone)]
pub struct SigningKey {
    inner: ed25519_dalek::SigningKey,
    key_id: String,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey(id={}, <redacted>)", self.key_id)
    }
}

/// Problems with key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not base64.
    #[error("not valid base64")]
    NotBase64,
    /// Not 32 bytes.
    #[error("must decode to 32 bytes (got {0})")]
    WrongLength(usize),
    /// Not a point on the curve.
    #[error("not a valid Ed25519 public key")]
    InvalidPoint,
}

fn decode32(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = B64.decode(text.trim()).map_err(|_| KeyError::NotBase64)?;
    let len = bytes.len();
    bytes.try_into().map_err(|_| KeyError::WrongLength(len))
}

/// The key id of a public key: its RFC 7638 JWK thumbprint, i.e. base64url (no padding) of the SHA-256 of
/// `{"crv":"Ed25519","kty":"OKP","x":"<base64url public key>"}` (RFC 8037's members, in lexicographic order, no
/// whitespace). The same id any JOSE library computes for the key.
fn key_id_of(public: &ed25519_dalek::VerifyingKey) -> String {
    let jwk = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(public.as_bytes())
    );
    URL_SAFE_NO_PAD.encode(Sha256::digest(jwk.as_bytes()))
}

/// The key id earlier versions sent in `x-pb-key-id`: the first 8 bytes of the key's SHA-256, hex. Still
/// accepted for the same key, so that envelopes signed before an upgrade verify after it.
fn legacy_key_id_of(public: &ed25519_dalek::VerifyingKey) -> String {
    hex::encode(&Sha256::digest(public.as_bytes())[..8])
}

impl SigningKey {
    /// A fresh random key.
    pub fn generate() -> SigningKey {
        let mut seed = [0u8; 32];
        rand::fill(&mut seed);
        Self::from_seed(seed)
    }

    fn from_seed(seed: [u8; 32]) -> SigningKey {
        let inner = ed25519_dalek::SigningKey::from_bytes(&seed);
        let key_id = key_id_of(&inner.verifying_key());
        SigningKey { inner, key_id }
    }

    /// Reads the base64 seed `keygen` writes.
    pub fn from_base64(text: &str) -> Result<SigningKey, KeyError> {
        Ok(Self::from_seed(decode32(text)?))
    }

    /// The base64 seed (for `keygen` only).
    pub fn to_base64(&self) -> String {
        B64.encode(self.inner.to_bytes())
    }

    /// The key id carried in `x-pb-key-id`.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The matching public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey::from_dalek(self.inner.verifying_key())
    }

    /// Whether this key's 32 secret bytes are those of `public`: a public key pasted where the private one belongs
    /// (both are 32 bytes of base64, so the text alone cannot tell them apart).
    pub fn is_public_key(&self, public: &VerifyingKey) -> bool {
        self.inner.to_bytes() == *public.inner.as_bytes()
    }

    /// `ed25519:<base64 signature>` of exactly these bytes.
    pub fn sign(&self, body: &[u8]) -> String {
        format!("ed25519:{}", B64.encode(self.inner.sign(body).to_bytes()))
    }
}

/// An issuer's Ed25519 public key, as the receiver holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyingKey {
    inner: ed25519_dalek::VerifyingKey,
    key_id: String,
    legacy_key_id: String,
}

impl VerifyingKey {
    /// Reads a base64 public key.
    pub fn from_base64(text: &str) -> Result<VerifyingKey, KeyError> {
        let inner = ed25519_dalek::VerifyingKey::from_bytes(&decode32(text)?)
            .map_err(|_| KeyError::InvalidPoint)?;
        Ok(Self::from_dalek(inner))
    }

    fn from_dalek(inner: ed25519_dalek::VerifyingKey) -> VerifyingKey {
        VerifyingKey {
            key_id: key_id_of(&inner),
            legacy_key_id: legacy_key_id_of(&inner),
            inner,
        }
    }

    /// Whether `id` (an `x-pb-key-id` value) names this key: its RFC 7638 thumbprint, or the hex id that earlier
    /// versions sent.
    pub fn has_id(&self, id: &str) -> bool {
        id == self.key_id || id == self.legacy_key_id
    }

    /// Base64 of the 32 key bytes.
    pub fn to_base64(&self) -> String {
        B64.encode(self.inner.as_bytes())
    }

    /// The key id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Checks an `x-pb-signature` header value against the body bytes.
    pub fn verify(&self, body: &[u8], header: &str) -> Result<(), BadMessage> {
        let encoded = header.strip_prefix("ed25519:").ok_or_else(|| {
            BadMessage::new(
                "bad_signature",
                "signature is not of the form ed25519:<base64>",
            )
        })?;
        let bytes = B64
            .decode(encoded.trim())
            .map_err(|_| BadMessage::new("bad_signature", "signature is not base64"))?;
        let signature = ed25519_dalek::Signature::from_slice(&bytes)
            .map_err(|_| BadMessage::new("bad_signature", "signature has the wrong length"))?;
        self.inner
            .verify(body, &signature)
            .map_err(|_| BadMessage::new("bad_signature", "signature does not match the body"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_cover_the_exact_bytes() {
        let key = SigningKey::generate();
        let public = VerifyingKey::from_base64(&key.verifying_key().to_base64()).unwrap();
        assert_eq!(public.key_id(), key.key_id());
        let body = br#"{"type":"share_token"}"#;
        let sig = key.sign(body);
        assert!(public.verify(body, &sig).is_ok());
        assert_eq!(
            public
                .verify(br#"{"type":"share_token" }"#, &sig)
                .unwrap_err()
                .reason,
            "bad_signature"
        );
        let other = SigningKey::generate().verifying_key();
        assert!(other.verify(body, &sig).is_err());
        let again = SigningKey::from_base64(&key.to_base64()).unwrap();
        assert_eq!(again.key_id(), key.key_id());
    }

    /// RFC 8037 appendix A.1 (the key) and A.3 (its RFC 7638 thumbprint).
    #[test]
    fn key_ids_are_rfc7638_thumbprints() {
        let seed = URL_SAFE_NO_PAD
            .decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
            .unwrap();
        let key = SigningKey::from_base64(&B64.encode(seed)).unwrap();
        let public = key.verifying_key();
        assert_eq!(
            URL_SAFE_NO_PAD.encode(B64.decode(public.to_base64()).unwrap()),
            "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
        );
        assert_eq!(key.key_id(), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
        assert_eq!(public.key_id(), key.key_id());
        assert!(public.has_id("kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"));
        // The id earlier versions sent still names the same key.
        let legacy = hex::encode(&Sha256::digest(B64.decode(public.to_base64()).unwrap())[..8]);
        assert!(public.has_id(&legacy));
        assert!(!SigningKey::generate().verifying_key().has_id(&legacy));
        assert!(!key.is_public_key(&SigningKey::generate().verifying_key()));
    }

    #[test]
    fn bad_bodies_get_a_reason() {
        let r = |b: &[u8]| parse(b, 1024).unwrap_err().reason;
        assert_eq!(r(b"not json"), "malformed_json");
        assert_eq!(r(b"[1,2]"), "malformed_json");
        assert_eq!(r(br#"{"event_id":"e"}"#), "missing_field");
        assert_eq!(r(br#"{"type":"nope"}"#), "unknown_type");
        assert_eq!(
            r(br#"{"type":"onboarding.finished","event_id":"e","status":"Approved"}"#),
            "missing_field"
        );
        assert_eq!(
            r(br#"{"type":"onboarding.finished","event_id":"e","session_id":"","status":"Approved"}"#),
            "missing_field"
        );
        assert_eq!(
            r(br#"{"type":"onboarding.finished","event_id":"e","session_id":"s","status":"Bogus"}"#),
            "invalid_field"
        );
        assert_eq!(parse(&[b' '; 2048], 1024).unwrap_err().reason, "oversized");
        let ok = parse(
            br#"{"type":"onboarding.finished","event_id":"e","session_id":"s","status":"IN_REVIEW","extra":1}"#,
            1024,
        )
        .unwrap();
        assert!(matches!(ok, Message::OnboardingFinished(_)));
    }
}
