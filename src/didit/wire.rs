//! Didit's JSON on the wire: requests, responses, the decision payload, statuses in both casings, share-token
//! claims and error bodies. Shared by the client (`didit::client`) and the emulator (`sandbox`), so the two can
//! never disagree about a field name. Unknown fields are kept (`extra`) or ignored, never an error: Didit adds
//! fields over time.

use std::fmt;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::secret::ShareToken;

/// `user` (KYC) or `business` (KYB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum SessionKind {
    /// A person (KYC).
    User,
    /// A company (KYB).
    Business,
}

impl SessionKind {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::User => "user",
            SessionKind::Business => "business",
        }
    }

    /// Parses `user` / `business` (any casing).
    pub fn parse(s: &str) -> Option<SessionKind> {
        match s.to_ascii_lowercase().as_str() {
            "user" => Some(SessionKind::User),
            "business" => Some(SessionKind::Business),
            _ => None,
        }
    }
}

impl fmt::Display for SessionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A session status. Didit writes KYC statuses in Title Case (`In Review`) and KYB statuses in UPPER_SNAKE
/// (`IN_REVIEW`); [`SessionStatus::parse`] accepts both and [`SessionStatus::for_kind`] writes the casing a kind uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionStatus {
    /// Link created, not opened.
    NotStarted,
    /// User mid-flow.
    InProgress,
    /// Every check passed (finished).
    Approved,
    /// A check failed (finished).
    Declined,
    /// Flagged for compliance review (finished).
    InReview,
    /// KYB: waiting for a party.
    AwaitingUser,
    /// Resubmission requested.
    Resubmitted,
    /// The link aged out.
    Expired,
    /// Opened but not finished in time.
    Abandoned,
    /// An approved KYC past its expiration policy.
    KycExpired,
}

const ALL_STATUSES: [SessionStatus; 10] = [
    SessionStatus::NotStarted,
    SessionStatus::InProgress,
    SessionStatus::Approved,
    SessionStatus::Declined,
    SessionStatus::InReview,
    SessionStatus::AwaitingUser,
    SessionStatus::Resubmitted,
    SessionStatus::Expired,
    SessionStatus::Abandoned,
    SessionStatus::KycExpired,
];

impl SessionStatus {
    /// Every status.
    pub fn all() -> &'static [SessionStatus] {
        &ALL_STATUSES
    }

    /// KYC spelling: `In Review`, `Kyc Expired`.
    pub fn title(self) -> &'static str {
        match self {
            SessionStatus::NotStarted => "Not Started",
            SessionStatus::InProgress => "In Progress",
            SessionStatus::Approved => "Approved",
            SessionStatus::Declined => "Declined",
            SessionStatus::InReview => "In Review",
            SessionStatus::AwaitingUser => "Awaiting User",
            SessionStatus::Resubmitted => "Resubmitted",
            SessionStatus::Expired => "Expired",
            SessionStatus::Abandoned => "Abandoned",
            SessionStatus::KycExpired => "Kyc Expired",
        }
    }

    /// KYB spelling: `IN_REVIEW`.
    pub fn upper_snake(self) -> &'static str {
        match self {
            SessionStatus::NotStarted => "NOT_STARTED",
            SessionStatus::InProgress => "IN_PROGRESS",
            SessionStatus::Approved => "APPROVED",
            SessionStatus::Declined => "DECLINED",
            SessionStatus::InReview => "IN_REVIEW",
            SessionStatus::AwaitingUser => "AWAITING_USER",
            SessionStatus::Resubmitted => "RESUBMITTED",
            SessionStatus::Expired => "EXPIRED",
            SessionStatus::Abandoned => "ABANDONED",
            SessionStatus::KycExpired => "KYC_EXPIRED",
        }
    }

    /// The spelling Didit uses for this kind of session.
    pub fn for_kind(self, kind: SessionKind) -> &'static str {
        match kind {
            SessionKind::User => self.title(),
            SessionKind::Business => self.upper_snake(),
        }
    }

    /// Parses either casing (and tolerates `in review`, `In_Review`, extra spaces).
    pub fn parse(s: &str) -> Option<SessionStatus> {
        let norm: String = s
            .trim()
            .chars()
            .map(|c| {
                if c == ' ' || c == '-' {
                    '_'
                } else {
                    c.to_ascii_uppercase()
                }
            })
            .collect();
        ALL_STATUSES
            .iter()
            .copied()
            .find(|st| st.upper_snake() == norm)
    }

    /// Approved, Declined and In Review: the only statuses Didit lets you share.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            SessionStatus::Approved | SessionStatus::Declined | SessionStatus::InReview
        )
    }
}

impl fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.title())
    }
}

/// `POST /v3/session/{id}/share/` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShareRequest {
    /// The receiving application.
    pub for_application_id: String,
    /// Token lifetime, 60..=86400 (Didit's default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_in_seconds: Option<i64>,
}

/// `POST /v3/session/{id}/share/` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShareResponse {
    /// The HS256 JWT; a secret (never logged).
    pub share_token: ShareToken,
    /// Echo of the receiving application.
    pub for_application_id: String,
    /// Kind of the shared session (absent in older answers: `user`).
    #[serde(default)]
    pub session_kind: Option<SessionKind>,
}

/// `POST /v3/session/import-shared/` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImportRequest {
    /// The JWT from share.
    pub share_token: ShareToken,
    /// A workflow of the token's kind in the receiving application.
    pub workflow_id: String,
    /// The receiver's own id for the person or company.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_data: Option<String>,
    /// Keep the original status (`true`) or land in review (`false`).
    #[serde(default)]
    pub trust_review: bool,
}

/// One feature report (an item of `id_verifications`, `registry_checks`, …): `node_id`, `status`, and whatever
/// else the feature carries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct FeatureReport {
    /// The workflow node that produced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The feature's own status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Every other field, untouched.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// A session as `GET /v3/session/{id}/decision/` and `import-shared` return it, for KYC and KYB alike.
/// Feature arrays are `None` when absent or `null` (not run, or not of this kind).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct SessionDecision {
    /// The session id.
    pub session_id: String,
    /// Per-application sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_number: Option<i64>,
    /// `user` or `business`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_kind: Option<SessionKind>,
    /// Hosted flow URL (`null` for imported sessions).
    #[serde(default)]
    pub session_url: Option<String>,
    /// Status in the kind's casing.
    pub status: String,
    /// The workflow the session ran in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    /// The application's own id for the entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_data: Option<String>,
    /// Set on imported sessions: the original session in the issuing application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_from_session: Option<String>,
    /// Features the workflow ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Vec<String>>,
    /// Free-form metadata given at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// Creation time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// KYC: document checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_verifications: Option<Vec<FeatureReport>>,
    /// KYC: NFC chip reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfc_verifications: Option<Vec<FeatureReport>>,
    /// KYC: liveness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_checks: Option<Vec<FeatureReport>>,
    /// KYC: selfie against document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub face_matches: Option<Vec<FeatureReport>>,
    /// KYC: proof of address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poa_verifications: Option<Vec<FeatureReport>>,
    /// KYC: government database checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_validations: Option<Vec<FeatureReport>>,
    /// Both: phone checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_verifications: Option<Vec<FeatureReport>>,
    /// Both: email checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_verifications: Option<Vec<FeatureReport>>,
    /// Both: sanctions, PEP and adverse media.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aml_screenings: Option<Vec<FeatureReport>>,
    /// Both: IP and device analysis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_analyses: Option<Vec<FeatureReport>>,
    /// Both: questionnaire answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub questionnaire_responses: Option<Vec<FeatureReport>>,
    /// KYB: company registry lookups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_checks: Option<Vec<FeatureReport>>,
    /// KYB: UBOs, directors and officers, each with their own checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_people_checks: Option<Vec<FeatureReport>>,
    /// KYB: company documents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_verifications: Option<Vec<FeatureReport>>,
    /// Every other field, untouched.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl SessionDecision {
    /// The status, parsed from either casing.
    pub fn parsed_status(&self) -> Option<SessionStatus> {
        SessionStatus::parse(&self.status)
    }

    /// The kind, `user` when absent (Didit's rule for old sessions).
    pub fn kind(&self) -> SessionKind {
        self.session_kind.unwrap_or(SessionKind::User)
    }

    /// Names of the KYC feature arrays (`phone_verifications` and the like appear in both kinds).
    pub const KYC_ARRAYS: &'static [&'static str] = &[
        "id_verifications",
        "nfc_verifications",
        "liveness_checks",
        "face_matches",
        "poa_verifications",
        "database_validations",
        "phone_verifications",
        "email_verifications",
        "aml_screenings",
        "ip_analyses",
    ];

    /// Names of the KYB feature arrays.
    pub const KYB_ARRAYS: &'static [&'static str] = &[
        "registry_checks",
        "key_people_checks",
        "document_verifications",
        "aml_screenings",
        "phone_verifications",
        "email_verifications",
        "questionnaire_responses",
    ];
}

/// What the receiver reads of `import-shared`'s answer: the new session's identity and status. The answer is the
/// full decision (every feature report); decoding only these fields skips the rest without building it, which was
/// a tenth of the receiver's CPU per import.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ImportedSession {
    /// The new session's id in this application.
    pub session_id: String,
    /// Per-application sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_number: Option<i64>,
    /// `user` or `business`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_kind: Option<SessionKind>,
    /// Status in the kind's casing.
    pub status: String,
    /// The application's own id for the entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_data: Option<String>,
}

/// One row of `GET /v3/sessions/` (Didit's list: a summary, not the full decision). Every field but the id and the
/// status is optional: the list's documented shape is only `count`, `next`, `previous`, `results`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct SessionSummary {
    /// The session id.
    pub session_id: String,
    /// Per-application sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_number: Option<i64>,
    /// `user` or `business`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_kind: Option<SessionKind>,
    /// Status in the kind's casing.
    #[serde(default)]
    pub status: String,
    /// The workflow the session ran in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    /// The application's own id for the entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_data: Option<String>,
    /// `None`: the list does not report the field at all; `Some(None)`: reported, the session is not an import;
    /// `Some(Some(id))`: imported from session `id`. The difference matters: only a list that reports the field can
    /// tell an imported session from the entity's own sessions.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub shared_from_session: Option<Option<String>>,
    /// Creation time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// Every other field, untouched.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A field that is present (even as `null`) becomes `Some(..)`; an absent one stays `None` through `default`.
fn present<'de, D>(deserializer: D) -> Result<Option<Option<String>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Option::<String>::deserialize(deserializer).map(Some)
}

/// One page of `GET /v3/sessions/`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct SessionPage {
    /// Matching sessions (Didit: exact for KYC, capped at 100 for KYB; follow `next` rather than trusting it).
    #[serde(default)]
    pub count: Option<u64>,
    /// The next page's URL, `null` on the last page.
    #[serde(default)]
    pub next: Option<String>,
    /// The previous page's URL.
    #[serde(default)]
    pub previous: Option<String>,
    /// This page, newest first.
    #[serde(default)]
    pub results: Vec<SessionSummary>,
}

/// Didit's error body: `{"detail": "...", "code": "..."}`. Either may be missing; a 500 may have no body at all.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ErrorBody {
    /// Human text (may change; do not match on it first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Stable machine code when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Field errors and anything else.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ErrorBody {
    /// A body with both fields.
    pub fn new(code: &str, detail: impl Into<String>) -> Self {
        Self {
            detail: Some(detail.into()),
            code: Some(code.to_string()),
            extra: Map::new(),
        }
    }

    /// Parses whatever came back; non-JSON bodies become an empty error body.
    pub fn parse(body: &[u8]) -> ErrorBody {
        serde_json::from_slice::<ErrorBody>(body).unwrap_or_default()
    }
}

/// Stable error codes the sandbox returns and the client recognises first.
pub mod codes {
    /// 401: missing, wrong or revoked API key.
    pub const INVALID_API_KEY: &str = "invalid_api_key";
    /// 403: the key lacks the privilege for this action.
    pub const PERMISSION_DENIED: &str = "permission_denied";
    /// 403 on import: this token was already imported into this application.
    pub const ALREADY_IMPORTED: &str = "already_imported";
    /// 403 on import: the token names another application.
    pub const TOKEN_NOT_FOR_APPLICATION: &str = "token_not_for_application";
    /// 401 on import: the token is malformed or its signature does not verify.
    pub const INVALID_SHARE_TOKEN: &str = "invalid_share_token";
    /// 401 on import: the token's `exp` has passed.
    pub const SHARE_TOKEN_EXPIRED: &str = "share_token_expired";
    /// 404: the session (or, on import, the original session) does not exist.
    pub const SESSION_NOT_FOUND: &str = "session_not_found";
    /// 404 on import: the workflow is not in this application.
    pub const WORKFLOW_NOT_FOUND: &str = "workflow_not_found";
    /// 400 on import: the workflow is of the other kind.
    pub const WORKFLOW_KIND_MISMATCH: &str = "workflow_kind_mismatch";
    /// 400 on share: the session is not Approved, Declined or In Review.
    pub const SESSION_NOT_FINISHED: &str = "session_not_finished";
    /// 400 on share: `ttl_in_seconds` outside 60..=86400.
    pub const INVALID_TTL: &str = "invalid_ttl";
    /// 400 on share: `for_application_id` missing, unknown, deleted or the caller itself.
    pub const INVALID_APPLICATION: &str = "invalid_application";
    /// 400: a malformed request body.
    pub const VALIDATION_ERROR: &str = "validation_error";
    /// 429: too many requests for this key.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// 5xx injected by the sandbox's fault settings.
    pub const INTERNAL_ERROR: &str = "internal_error";
}

/// The claims of a share token. Readable without Didit's key (the payload is base64url JSON); never trusted for
/// anything but telling apart Didit's answers and noticing expiry before a call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShareTokenClaims {
    /// The shared session.
    pub session_id: String,
    /// Kind of the session (absent in pre-unification tokens: `user`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_kind: Option<SessionKind>,
    /// The issuing application.
    pub from_application_id: String,
    /// The only application that can import it.
    pub for_application_id: String,
    /// Issued at (unix seconds).
    pub iat: i64,
    /// Expires at (unix seconds).
    pub exp: i64,
}

impl ShareTokenClaims {
    /// Reads the claims of a JWT without verifying its signature.
    pub fn peek(token: &str) -> Option<ShareTokenClaims> {
        let payload = token.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// A webhook delivery's body as far as the bridge reads it (`status.updated` and friends).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct WebhookPayload {
    /// The session the event is about.
    #[serde(default)]
    pub session_id: Option<String>,
    /// The session's status.
    #[serde(default)]
    pub status: Option<String>,
    /// `status.updated`, `data.updated`, …
    #[serde(default)]
    pub webhook_type: Option<String>,
    /// `user` or `business` (KYB payloads carry it).
    #[serde(default)]
    pub session_kind: Option<SessionKind>,
    /// The application's id for the entity.
    #[serde(default)]
    pub vendor_data: Option<String>,
    /// The session's workflow.
    #[serde(default)]
    pub workflow_id: Option<String>,
    /// Unix seconds when the delivery was made (signed by `X-Signature-Simple`).
    #[serde(default)]
    pub timestamp: Option<i64>,
    /// Unix seconds when the event happened.
    #[serde(default)]
    pub created_at: Option<i64>,
    /// Unique event id when present.
    #[serde(default)]
    pub event_id: Option<String>,
    /// The decision (present for finished statuses).
    #[serde(default)]
    pub decision: Option<Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_parse_in_both_casings() {
        for st in SessionStatus::all() {
            assert_eq!(SessionStatus::parse(st.title()), Some(*st));
            assert_eq!(SessionStatus::parse(st.upper_snake()), Some(*st));
        }
        assert_eq!(
            SessionStatus::parse("in review"),
            Some(SessionStatus::InReview)
        );
        assert_eq!(SessionStatus::parse("Not Finished"), None);
        assert!(SessionStatus::InReview.is_finished());
        assert!(!SessionStatus::InProgress.is_finished());
        assert_eq!(
            SessionStatus::InReview.for_kind(SessionKind::Business),
            "IN_REVIEW"
        );
    }

    #[test]
    fn peeks_at_the_documented_example_token() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            br#"{"session_id":"20bb3c3b-6146-439f-84a4-bd30d00ac6a2","from_application_id":"dbd20e34-42e9-4f2c-ba91-cf0762016f64","for_application_id":"a5f3bca2-46e2-411e-90ef-a580900a57ee","iat":1753630666,"exp":1753634266}"#,
        );
        let token = format!("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.{payload}.sig");
        let claims = ShareTokenClaims::peek(&token).unwrap();
        assert_eq!(claims.exp - claims.iat, 3600);
        assert_eq!(claims.session_kind, None);
        assert_eq!(
            claims.for_application_id,
            "a5f3bca2-46e2-411e-90ef-a580900a57ee"
        );
    }
}
