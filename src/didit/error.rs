//! What a Didit answer means, as one typed outcome ([`DiditError`]) with one decision next to it
//! ([`DiditError::disposition`]): the two tables of DESIGN.md §4, row by row.
//!
//! Everything here is pure: [`classify`] takes an operation, an HTTP status, the headers and the body (plus what the
//! caller knows: its application id, the share token's claims, the secrets to scrub, the time) and returns a
//! [`Verdict`]. The one question that cannot be answered from the answer alone, whether an ambiguous 401 on import
//! was about the API key or the share token, comes back as [`Verdict::AskProbe`], and [`resolve_probe`] finishes it
//! once the client has asked Didit whether its key still works. The HTTP calls themselves live in
//! [`super::client`]; retries, pauses and dead-letters belong to the pipelines, which act on the disposition.
//!
//! Texts that Didit sends back (`detail`) are kept for the operator, but scrubbed of the API key, the share token and
//! anything that looks like a JWT first, and shortened: an error never carries a secret.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, RETRY_AFTER};

use crate::didit::wire::{ErrorBody, ShareTokenClaims, codes};

/// The longest wait a `Retry-After` or `X-RateLimit-Reset` can ask for. Didit's rate limit is a 60 s sliding window;
/// a longer demand is a mistake or an outage, and the pipelines' own backoff takes over after this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// `X-RateLimit-Reset` values below this (2001-09-09) are taken as seconds from now rather than an epoch time:
/// some gateways send the delta, and reading `30` as 1970 would mean retrying at once.
const EPOCH_THRESHOLD: u64 = 1_000_000_000;

/// Longest `detail` kept in an error, in characters.
const MAX_DETAIL_CHARS: usize = 300;

/// Which Didit call an answer belongs to; also the `operation` label of `didit_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `POST /v3/session/{id}/share/` (issuer).
    Share,
    /// `POST /v3/session/import-shared/` (receiver).
    Import,
    /// `GET /v3/session/{id}/decision/`.
    Decision,
    /// `GET /v3/sessions/?limit=1`: is the API key accepted?
    Probe,
    /// `GET /v3/sessions/` with filters: finding a session (the receiver's lost-answer lookup).
    List,
    /// `DELETE /v3/session/{id}/delete/` (receiver, on an erasure notice with `receiver.on_erasure = "delete"`).
    Delete,
}

impl Operation {
    /// The metric label: `share`, `import`, `decision`, `probe` or `list`.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Share => "share",
            Operation::Import => "import",
            Operation::Decision => "decision",
            Operation::Probe => "probe",
            Operation::List => "list",
            Operation::Delete => "delete",
        }
    }

    /// Whether Didit counts it against the key's write limit (`generic-write`: POST, PATCH, DELETE). Reads have
    /// their own, larger scope and are not paced.
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Operation::Share | Operation::Import | Operation::Delete
        )
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every way a Didit call can fail, one variant per row of DESIGN.md §4. The comment on each variant names its
/// [`Disposition`]; [`DiditError::disposition`] is the authority. `Display` is written for an operator and never
/// contains the API key or a share token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DiditError {
    /// 401 or 403 about the API key or its privileges (share, decision, probe; import when the answer or a probe
    /// says so) → `Pause("credentials")`.
    #[error("Didit rejected the API key (HTTP {status}){}; check the key and its privileges", detail_suffix(.detail))]
    ApiKeyRejected {
        /// 401 or 403.
        status: u16,
        /// Didit's explanation, scrubbed.
        detail: Option<String>,
    },
    /// 400 on share (session not finished, TTL out of range, bad application id) → `DeadLetter("share_rejected")`.
    #[error("Didit refused to share the session{}{}", code_suffix(.code), detail_suffix(.detail))]
    ShareRejected {
        /// Didit's stable code, when given.
        code: Option<String>,
        /// Didit's explanation, scrubbed.
        detail: Option<String>,
    },
    /// 404 on share or decision → `DeadLetter("session_not_found")`.
    #[error("Didit does not know the session (HTTP 404){}", detail_suffix(.detail))]
    SessionNotFound {
        /// Didit's explanation, scrubbed.
        detail: Option<String>,
    },
    /// 403 on import: the session was already imported into this application → `Duplicate` (a success).
    #[error("the session was already imported into this application (HTTP 403){}", detail_suffix(.detail))]
    AlreadyImported {
        /// Didit's explanation, scrubbed.
        detail: Option<String>,
    },
    /// 403 on import: the token names another application → `DeadLetter("misrouted")`.
    #[error("the share token is meant for another application (HTTP 403){}", detail_suffix(.detail))]
    NotForApplication {
        /// Didit's explanation, scrubbed.
        detail: Option<String>,
    },
    /// 403 on import for any other reason → `DeadLetter("forbidden")`; never taken for a success.
    #[error("Didit refused the import (HTTP 403){}{}", code_suffix(.code), detail_suffix(.detail))]
    Forbidden {
        /// Didit's stable code, when given.
        code: Option<String>,
        /// Didit's explanation, scrubbed.
        detail: Option<String>,
    },
    /// 401 on import about the share token → `Reshare` (the issuer mints a fresh one).
    #[error(
        "Didit rejected the share token as {} (HTTP 401){}",
        if *.expired { "expired" } else { "invalid" },
        detail_suffix(.detail)
    )]
    TokenRejected {
        /// The token's lifetime is over (by Didit's code, or by its own `exp` claim).
        expired: bool,
        /// Didit's explanation, scrubbed.
        detail: Option<String>,
    },
    /// 404 on import: the original session no longer exists → `DeadLetter("source_gone")`.
    #[error("the shared session no longer exists at the issuer (HTTP 404){}", detail_suffix(.detail))]
    SourceGone {
        /// Didit's explanation, scrubbed.
        detail: Option<String>,
    },
    /// 404 on import: the workflow is not in this application → `Pause("workflow_missing")`.
    #[error(
        "the configured import workflow does not exist in this Didit application (HTTP 404){}; check receiver.workflow_user / receiver.workflow_business",
        detail_suffix(.detail)
    )]
    WorkflowNotFound {
        /// Didit's explanation, scrubbed.
        detail: Option<String>,
    },
    /// 400 on import → `DeadLetter("rejected")`.
    #[error("Didit rejected the import request (HTTP 400){}{}", code_suffix(.code), detail_suffix(.detail))]
    ImportRejected {
        /// Didit's stable code, when given.
        code: Option<String>,
        /// Didit's explanation, scrubbed.
        detail: Option<String>,
    },
    /// 429 → `Retry { after: retry_after }`.
    #[error("Didit's rate limit was hit (HTTP 429){}", wait_suffix(.retry_after))]
    RateLimited {
        /// From `Retry-After`, else `X-RateLimit-Reset`; `None` when neither was usable.
        retry_after: Option<Duration>,
    },
    /// Not sent: the key's write budget has no room before this delivery's hold deadline → `Retry { after: wait }`;
    /// not a failure ([`DiditError::is_pacing`]).
    #[error("Didit's write limit for this API key leaves no room for at least {} ms; the message waits in the retry queue", .wait.as_millis())]
    Paced {
        /// The earliest the write could go, from now.
        wait: Duration,
    },
    /// 5xx, with or without a body → `Retry { after: None }`.
    #[error("Didit had a server error (HTTP {status})")]
    Server {
        /// The 5xx status.
        status: u16,
    },
    /// No complete answer within the configured timeout → `Retry { after: None }`.
    #[error("Didit did not answer within the configured timeout (didit.timeout_ms)")]
    Timeout,
    /// The connection could not be made or broke before the answer was complete → `Retry { after: None }`.
    #[error("cannot talk to Didit: {0}")]
    Connect(String),
    /// An answer no row of the tables covers. The disposition depends on the status (see
    /// [`DiditError::disposition`]): a 2xx whose body cannot be read, 408, 409 and 425 are retried; 402 and 3xx
    /// pause; any other status is dead-lettered as `unexpected`.
    #[error("unexpected answer from Didit (HTTP {status}){}", detail_suffix(.detail))]
    Unexpected {
        /// The HTTP status.
        status: u16,
        /// What was wrong, or Didit's explanation, scrubbed.
        detail: Option<String>,
    },
    /// The client cannot be built or the API key cannot be read or sent → `Pause("credentials")`.
    #[error("Didit client configuration: {0}")]
    Config(String),
}

/// What a pipeline does about a [`DiditError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The work is already done: treat as a success (and ack).
    Duplicate,
    /// Try again: after the pipeline's backoff (`None`) or after exactly `after`.
    Retry {
        /// The wait Didit asked for.
        after: Option<Duration>,
    },
    /// Give up on this message: dead-letter it with this `x-pb-reason` word.
    DeadLetter {
        /// The `x-pb-reason` word.
        reason: &'static str,
    },
    /// The receiver asks the issuer for a fresh share token.
    Reshare,
    /// Stop consuming (nothing is lost), fail `/readyz`, probe with backoff, resume when fixed.
    Pause {
        /// `credentials` or `workflow_missing`.
        reason: &'static str,
    },
}

impl DiditError {
    /// What to do about this error (DESIGN.md §4).
    pub fn disposition(&self) -> Disposition {
        match self {
            DiditError::ApiKeyRejected { .. } | DiditError::Config(_) => Disposition::Pause {
                reason: "credentials",
            },
            DiditError::ShareRejected { .. } => Disposition::DeadLetter {
                reason: "share_rejected",
            },
            DiditError::SessionNotFound { .. } => Disposition::DeadLetter {
                reason: "session_not_found",
            },
            DiditError::AlreadyImported { .. } => Disposition::Duplicate,
            DiditError::NotForApplication { .. } => Disposition::DeadLetter {
                reason: "misrouted",
            },
            DiditError::Forbidden { .. } => Disposition::DeadLetter {
                reason: "forbidden",
            },
            DiditError::TokenRejected { .. } => Disposition::Reshare,
            DiditError::SourceGone { .. } => Disposition::DeadLetter {
                reason: "source_gone",
            },
            DiditError::WorkflowNotFound { .. } => Disposition::Pause {
                reason: "workflow_missing",
            },
            DiditError::ImportRejected { .. } => Disposition::DeadLetter { reason: "rejected" },
            DiditError::RateLimited { retry_after } => Disposition::Retry {
                after: *retry_after,
            },
            DiditError::Paced { wait } => Disposition::Retry { after: Some(*wait) },
            DiditError::Server { .. } | DiditError::Timeout | DiditError::Connect(_) => {
                Disposition::Retry { after: None }
            }
            DiditError::Unexpected { status, .. } => unexpected_disposition(*status),
        }
    }

    /// True for the key's rate limit (a 429, or a write the budget could not fit before the deadline): the message
    /// is fine and waits its turn, so going through the retry queue for it does not count an attempt
    /// (`retry.max_attempts`) and never dead-letters.
    pub fn is_pacing(&self) -> bool {
        matches!(
            self,
            DiditError::RateLimited { .. } | DiditError::Paced { .. }
        )
    }

    /// The `status` label of `didit_requests_total` for this error: the HTTP code, or `timeout`, `connect_error`
    /// (connection refused or broken), `error` (configuration).
    pub fn status_label(&self) -> String {
        match self {
            DiditError::ApiKeyRejected { status, .. }
            | DiditError::Server { status }
            | DiditError::Unexpected { status, .. } => status.to_string(),
            DiditError::ShareRejected { .. } | DiditError::ImportRejected { .. } => "400".into(),
            DiditError::TokenRejected { .. } => "401".into(),
            DiditError::AlreadyImported { .. }
            | DiditError::NotForApplication { .. }
            | DiditError::Forbidden { .. } => "403".into(),
            DiditError::SessionNotFound { .. }
            | DiditError::SourceGone { .. }
            | DiditError::WorkflowNotFound { .. } => "404".into(),
            DiditError::RateLimited { .. } => "429".into(),
            DiditError::Paced { .. } => "paced".into(),
            DiditError::Timeout => "timeout".into(),
            DiditError::Connect(_) => "connect_error".into(),
            DiditError::Config(_) => "error".into(),
        }
    }
}

/// Answers no table row covers, by status:
/// - a 2xx whose body cannot be read: Didit may have done the work, and repeating it is safe (a second share mints
///   another token; a second import comes back 403 already imported, a `Duplicate`), bounded by `max_attempts`;
/// - 408, 409, 425: transient by definition;
/// - 402 (the account cannot pay for the call) and 3xx (redirects are never followed, so that the API key cannot
///   travel to another host; a redirect means `didit.base_url` is wrong): every message would fail the same way
///   until an operator acts, so pause and lose nothing;
/// - anything else (405, 410, 413, 422, …): this request will not succeed as it is, dead-letter `unexpected`
///   (replayable once understood).
fn unexpected_disposition(status: u16) -> Disposition {
    match status {
        200..=299 | 408 | 409 | 425 => Disposition::Retry { after: None },
        300..=399 | 402 => Disposition::Pause {
            reason: "credentials",
        },
        _ => Disposition::DeadLetter {
            reason: "unexpected",
        },
    }
}

fn detail_suffix(detail: &Option<String>) -> String {
    match detail {
        Some(d) if !d.is_empty() => format!(": {d}"),
        _ => String::new(),
    }
}

fn code_suffix(code: &Option<String>) -> String {
    match code {
        Some(c) if !c.is_empty() => format!(" ({c})"),
        _ => String::new(),
    }
}

fn wait_suffix(after: &Option<Duration>) -> String {
    match after {
        Some(d) => format!("; Didit asks to wait {} s", d.as_secs_f64().ceil() as u64),
        None => String::new(),
    }
}

/// One HTTP answer, as the classifier sees it.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    /// The HTTP status.
    pub status: u16,
    /// The response headers.
    pub headers: &'a HeaderMap,
    /// The response body (possibly empty, possibly not JSON).
    pub body: &'a [u8],
}

/// What the caller knows besides the answer.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// Our own Didit application id (tells a misrouted token from a refused one).
    pub application_id: &'a str,
    /// The share token's claims, on import, when the token is readable.
    pub claims: Option<&'a ShareTokenClaims>,
    /// Strings that must never appear in an error (the API key, the share token); removed from `detail`.
    pub secrets: &'a [&'a str],
    /// The current time (rate-limit resets and token expiry are measured against it).
    pub now: SystemTime,
}

/// The classifier's answer.
#[derive(Debug)]
pub enum Verdict {
    /// A 2xx: the caller reads the body.
    Success,
    /// A failure with its typed outcome.
    Failed(DiditError),
    /// A 401 on import that neither `code` nor `detail` attributes to the key or the token: ask Didit whether the key
    /// is accepted ([`super::client::DiditClient::probe`]) and finish with [`resolve_probe`].
    AskProbe {
        /// Didit's explanation, scrubbed.
        detail: Option<String>,
    },
}

/// Turns one answer into a [`Verdict`] (DESIGN.md §4).
pub fn classify(op: Operation, answer: &Answer<'_>, ctx: &Context<'_>) -> Verdict {
    let status = answer.status;
    if (200..300).contains(&status) {
        return Verdict::Success;
    }
    let (code, detail) = read_error(answer.body, ctx.secrets);
    let failed = Verdict::Failed;
    match (status, op) {
        (429, _) => failed(DiditError::RateLimited {
            retry_after: retry_after(answer.headers, ctx.now),
        }),
        (500..=599, _) => failed(DiditError::Server { status }),
        (401, Operation::Import) => classify_import_401(code, detail, ctx),
        (403, Operation::Import) => failed(classify_import_403(code, detail, ctx)),
        (401 | 403, _) => failed(DiditError::ApiKeyRejected { status, detail }),
        (400, Operation::Share) => failed(DiditError::ShareRejected { code, detail }),
        (400, Operation::Import) => failed(DiditError::ImportRejected { code, detail }),
        (404, Operation::Share | Operation::Decision | Operation::Delete) => {
            failed(DiditError::SessionNotFound { detail })
        }
        (404, Operation::Import) => failed(classify_import_404(code, detail)),
        _ => failed(DiditError::Unexpected { status, detail }),
    }
}

/// Finishes an ambiguous 401 on import once the key has been probed: an accepted key means the token was refused
/// (expired when its own `exp` claim has passed); a refused key means the key; a probe that could not tell (timeout,
/// 5xx, rate limit, …) is returned as it is, so the import is retried later and nothing is guessed.
pub fn resolve_probe(
    probe: Result<(), DiditError>,
    detail: Option<String>,
    claims: Option<&ShareTokenClaims>,
    now: SystemTime,
) -> DiditError {
    match probe {
        Ok(()) => DiditError::TokenRejected {
            expired: claims.is_some_and(|c| claim_expired(c, now)),
            detail,
        },
        Err(DiditError::ApiKeyRejected { .. }) => DiditError::ApiKeyRejected {
            status: 401,
            detail,
        },
        Err(other) => other,
    }
}

fn classify_import_401(code: Option<String>, detail: Option<String>, ctx: &Context<'_>) -> Verdict {
    match code.as_deref() {
        Some(codes::INVALID_API_KEY) => {
            return Verdict::Failed(DiditError::ApiKeyRejected {
                status: 401,
                detail,
            });
        }
        Some(codes::INVALID_SHARE_TOKEN) => {
            return Verdict::Failed(DiditError::TokenRejected {
                expired: false,
                detail,
            });
        }
        Some(codes::SHARE_TOKEN_EXPIRED) => {
            return Verdict::Failed(DiditError::TokenRejected {
                expired: true,
                detail,
            });
        }
        _ => {}
    }
    let text = detail.as_deref().unwrap_or("").to_ascii_lowercase();
    // The key's words first: "Invalid or missing API key", DRF's "Authentication credentials were not provided".
    if mentions_key(&text) {
        return Verdict::Failed(DiditError::ApiKeyRejected {
            status: 401,
            detail,
        });
    }
    if text.contains("token") || text.contains("expired") || text.contains("jwt") {
        // "Share token invalid or expired": the claim says which, when it can be read.
        let expired = match ctx.claims {
            Some(c) => claim_expired(c, ctx.now),
            None => text.contains("expired") && !text.contains("invalid"),
        };
        return Verdict::Failed(DiditError::TokenRejected { expired, detail });
    }
    Verdict::AskProbe { detail }
}

fn classify_import_403(
    code: Option<String>,
    detail: Option<String>,
    ctx: &Context<'_>,
) -> DiditError {
    match code.as_deref() {
        Some(codes::ALREADY_IMPORTED) => return DiditError::AlreadyImported { detail },
        Some(codes::TOKEN_NOT_FOR_APPLICATION) => return DiditError::NotForApplication { detail },
        // Some Didit pages say auth failures are 403, and import needs `write:sessions` like share does: a key
        // problem (a refused key, or one lacking the privilege) pauses (nothing lost), as DESIGN §4's "401 or 403
        // about the API key or its privileges" row says, instead of dead-lettering every message as `forbidden`.
        Some(codes::INVALID_API_KEY | codes::PERMISSION_DENIED | BILLING_SUSPENDED) => {
            return DiditError::ApiKeyRejected {
                status: 403,
                detail,
            };
        }
        Some(_) => return DiditError::Forbidden { code, detail },
        None => {}
    }
    let text = detail.as_deref().unwrap_or("").to_ascii_lowercase();
    if text.contains("already imported") || text.contains("already been imported") {
        return DiditError::AlreadyImported { detail };
    }
    if text.contains("not intended for your application")
        || text.contains("not for this application")
        || text.contains("not intended for this application")
        || text.contains("another application")
    {
        return DiditError::NotForApplication { detail };
    }
    if mentions_key(&text) {
        return DiditError::ApiKeyRejected {
            status: 403,
            detail,
        };
    }
    // The body does not say; the token does (its payload is readable without Didit's key).
    let misrouted = ctx
        .claims
        .filter(|claims| claims.for_application_id != ctx.application_id);
    // A permission text ("You do not have permission to perform this action.", Django REST framework's default, or
    // Didit's "key lacks access" / IP list / balance answers, contract §5) is about the key or the account: every
    // import would fail alike, so pause (nothing lost) rather than dead-letter each message as `forbidden`. Unless
    // the token itself names another application: that one message is misrouted, and pausing would only bring it
    // back to the same 403 after each probe.
    if misrouted.is_none() && mentions_permission(&text) {
        return DiditError::ApiKeyRejected {
            status: 403,
            detail,
        };
    }
    match misrouted {
        Some(claims) => DiditError::NotForApplication {
            detail: Some(match detail {
                Some(d) => format!(
                    "{d} (the token names application {})",
                    claims.for_application_id
                ),
                None => format!("the token names application {}", claims.for_application_id),
            }),
        },
        None => DiditError::Forbidden { code, detail },
    }
}

/// A 404 on import names the original session or the workflow. Without a code or a detail that mentions the
/// workflow, the original session is assumed gone: that dead-letters one message (replayable), whereas assuming a
/// missing workflow would pause the pipeline, and a single vanished session would then block it for good (the
/// message comes back, 404s again, pauses again). Didit's documented texts name the workflow when it is the cause.
fn classify_import_404(code: Option<String>, detail: Option<String>) -> DiditError {
    match code.as_deref() {
        Some(codes::SESSION_NOT_FOUND) => DiditError::SourceGone { detail },
        Some(codes::WORKFLOW_NOT_FOUND) => DiditError::WorkflowNotFound { detail },
        _ if detail
            .as_deref()
            .is_some_and(|d| d.to_ascii_lowercase().contains("workflow")) =>
        {
            DiditError::WorkflowNotFound { detail }
        }
        _ => DiditError::SourceGone { detail },
    }
}

/// Didit's `code` for an account whose contract or billing is suspended (403, contract §5): no call succeeds until
/// an operator acts, like a key without privileges.
const BILLING_SUSPENDED: &str = "contract_billing_suspended";

/// A 403 text about what the key or account may do rather than about this one request (contract §5: the key lacks
/// access to the resource or action, the request comes from outside the key's IP list, the balance is
/// insufficient; Django REST framework's default "You do not have permission to perform this action.").
fn mentions_permission(lower: &str) -> bool {
    [
        "permission",
        "privilege",
        "not authorized",
        "not authorised",
        "lacks access",
        "does not have access",
        "ip address",
        "ip list",
        "allowed ips",
        "allowlist",
        "whitelist",
        "balance",
        "billing",
        "credits",
    ]
    .iter()
    .any(|needle| lower.contains(needle))
}

fn mentions_key(lower: &str) -> bool {
    lower.contains("api key")
        || lower.contains("api-key")
        || lower.contains("api_key")
        || lower.contains("credentials")
        || lower.contains("authentication")
}

fn claim_expired(claims: &ShareTokenClaims, now: SystemTime) -> bool {
    claims.exp <= unix_seconds(now)
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// Reads Didit's error body: `code` and a `detail` for the operator. `detail` falls back to `message` / `error`,
/// then to field errors (`{"ttl_in_seconds": ["…"]}`), then to the first line of a non-JSON body (a proxy's
/// page). The result is scrubbed of `secrets` and of anything that looks like a JWT, and shortened.
pub fn read_error(body: &[u8], secrets: &[&str]) -> (Option<String>, Option<String>) {
    let parsed = ErrorBody::parse(body);
    let code = parsed.code.clone().filter(|c| !c.trim().is_empty());
    let detail = parsed
        .detail
        .clone()
        .or_else(|| string_field(&parsed, "message"))
        .or_else(|| string_field(&parsed, "error"))
        .or_else(|| field_errors(&parsed))
        .or_else(|| {
            if serde_json::from_slice::<serde_json::Value>(body).is_ok() {
                return None;
            }
            let text = String::from_utf8_lossy(body);
            let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
            (!text.is_empty()).then_some(text)
        })
        .map(|d| scrub(&d, secrets))
        .filter(|d| !d.is_empty());
    (code.map(|c| scrub(&c, secrets)), detail)
}

fn string_field(body: &ErrorBody, name: &str) -> Option<String> {
    body.extra
        .get(name)
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

fn field_errors(body: &ErrorBody) -> Option<String> {
    let parts: Vec<String> = body
        .extra
        .iter()
        .filter_map(|(field, value)| {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Array(items) => items
                    .iter()
                    .filter_map(|i| i.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
                _ => return None,
            };
            (!text.is_empty()).then(|| format!("{field}: {text}"))
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// Removes every secret and every JWT-looking word from `text`, then shortens it.
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for secret in secrets.iter().filter(|s| s.len() >= 4) {
        out = out.replace(secret, "<redacted>");
    }
    let out = redact_jwts(&out);
    if out.chars().count() > MAX_DETAIL_CHARS {
        let mut short: String = out.chars().take(MAX_DETAIL_CHARS).collect();
        short.push('…');
        short
    } else {
        out
    }
}

/// Replaces `eyJ….….…`-shaped words (a JWT's header always starts with `eyJ`, base64 of `{"`).
fn redact_jwts(text: &str) -> String {
    let is_jwt_char =
        |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' || c == '=';
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.starts_with("eyJ") && word.matches('.').count() >= 2 {
            out.push_str("<redacted>");
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in text.chars() {
        if is_jwt_char(c) {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// How long Didit asks us to wait after a 429: `Retry-After` (seconds, or an HTTP date) if present and readable,
/// else `X-RateLimit-Reset` (epoch seconds; small values are taken as seconds from now) minus `now`. Clamped to
/// `0..=MAX_RETRY_AFTER`; `None` when neither header is usable.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let from_retry_after = header(RETRY_AFTER.as_str()).and_then(|v| {
        if let Ok(secs) = v.parse::<f64>() {
            return secs
                .is_finite()
                .then(|| Duration::from_secs_f64(secs.clamp(0.0, 1e9)));
        }
        let at = parse_http_date(v)?;
        Some(at.duration_since(now).unwrap_or(Duration::ZERO))
    });
    let wait = from_retry_after.or_else(|| {
        let reset = header("x-ratelimit-reset")?.parse::<f64>().ok()?;
        if !reset.is_finite() || reset < 0.0 {
            return None;
        }
        if reset < EPOCH_THRESHOLD as f64 {
            return Some(Duration::from_secs_f64(reset));
        }
        let at = UNIX_EPOCH + Duration::from_secs_f64(reset);
        Some(at.duration_since(now).unwrap_or(Duration::ZERO))
    })?;
    Some(wait.min(MAX_RETRY_AFTER))
}

/// Parses an HTTP date in any of the three forms RFC 9110 lets a recipient accept (IMF-fixdate, RFC 850, asctime).
fn parse_http_date(text: &str) -> Option<SystemTime> {
    const FORMATS: [&str; 3] = [
        "%a, %d %b %Y %H:%M:%S GMT",
        "%A, %d-%b-%y %H:%M:%S GMT",
        "%a %b %e %H:%M:%S %Y",
    ];
    let parsed = FORMATS
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(text, f).ok())?;
    let secs = parsed.and_utc().timestamp();
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    const APP: &str = "11111111-1111-4111-8111-111111111111";
    const OTHER: &str = "22222222-2222-4222-8222-222222222222";

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn claims(for_app: &str, exp: i64) -> ShareTokenClaims {
        ShareTokenClaims {
            session_id: "s".into(),
            session_kind: None,
            from_application_id: OTHER.into(),
            for_application_id: for_app.into(),
            iat: exp - 3600,
            exp,
        }
    }

    fn verdict(
        op: Operation,
        status: u16,
        headers: &HeaderMap,
        body: &str,
        claims: Option<&ShareTokenClaims>,
    ) -> Verdict {
        let ctx = Context {
            application_id: APP,
            claims,
            secrets: &["sk_test_key", "eyJtoken.payload.sig"],
            now: now(),
        };
        classify(
            op,
            &Answer {
                status,
                headers,
                body: body.as_bytes(),
            },
            &ctx,
        )
    }

    fn err(op: Operation, status: u16, body: &str) -> DiditError {
        err_with(op, status, body, None)
    }

    fn err_with(
        op: Operation,
        status: u16,
        body: &str,
        claims: Option<&ShareTokenClaims>,
    ) -> DiditError {
        match verdict(op, status, &HeaderMap::new(), body, claims) {
            Verdict::Failed(e) => e,
            other => panic!("{op} {status} {body}: expected a failure, got {other:?}"),
        }
    }

    fn json(code: &str, detail: &str) -> String {
        serde_json::json!({"code": code, "detail": detail}).to_string()
    }

    fn detail(detail: &str) -> String {
        serde_json::json!({ "detail": detail }).to_string()
    }

    #[test]
    fn every_2xx_is_success() {
        for status in [200, 201, 202, 204] {
            for op in [
                Operation::Share,
                Operation::Import,
                Operation::Decision,
                Operation::Probe,
            ] {
                assert!(matches!(
                    verdict(op, status, &HeaderMap::new(), "", None),
                    Verdict::Success
                ));
            }
        }
    }

    #[test]
    fn share_table() {
        use Operation::Share;
        let e = err(
            Share,
            400,
            &json(
                codes::SESSION_NOT_FINISHED,
                "Only finished sessions can be shared.",
            ),
        );
        assert!(
            matches!(&e, DiditError::ShareRejected { code: Some(c), .. } if c == codes::SESSION_NOT_FINISHED)
        );
        assert_eq!(
            e.disposition(),
            Disposition::DeadLetter {
                reason: "share_rejected"
            }
        );
        for status in [401, 403] {
            let e = err(Share, status, &detail("Invalid or missing API key"));
            assert!(matches!(e, DiditError::ApiKeyRejected { status: s, .. } if s == status));
            assert_eq!(
                e.disposition(),
                Disposition::Pause {
                    reason: "credentials"
                }
            );
        }
        let e = err(Share, 404, "");
        assert!(matches!(e, DiditError::SessionNotFound { detail: None }));
        assert_eq!(
            e.disposition(),
            Disposition::DeadLetter {
                reason: "session_not_found"
            }
        );
        for (status, body) in [
            (500, "{\"detail\":\"boom\"}"),
            (502, ""),
            (503, "<html>bad gateway</html>"),
        ] {
            let e = err(Share, status, body);
            assert!(matches!(e, DiditError::Server { status: s } if s == status));
            assert_eq!(e.disposition(), Disposition::Retry { after: None });
        }
    }

    #[test]
    fn decision_and_probe_follow_the_share_rows() {
        assert!(matches!(
            err(Operation::Decision, 404, ""),
            DiditError::SessionNotFound { .. }
        ));
        assert!(matches!(
            err(Operation::Decision, 401, ""),
            DiditError::ApiKeyRejected { status: 401, .. }
        ));
        assert!(matches!(
            err(Operation::Probe, 403, ""),
            DiditError::ApiKeyRejected { status: 403, .. }
        ));
        assert!(matches!(
            err(Operation::Probe, 404, ""),
            DiditError::Unexpected { status: 404, .. }
        ));
    }

    #[test]
    fn import_403_by_code_then_detail_then_claim() {
        use Operation::Import;
        let e = err(Import, 403, &json(codes::ALREADY_IMPORTED, "x"));
        assert!(matches!(e, DiditError::AlreadyImported { .. }));
        assert_eq!(e.disposition(), Disposition::Duplicate);
        let e = err(Import, 403, &json(codes::TOKEN_NOT_FOR_APPLICATION, "x"));
        assert!(matches!(e, DiditError::NotForApplication { .. }));
        assert_eq!(
            e.disposition(),
            Disposition::DeadLetter {
                reason: "misrouted"
            }
        );
        let e = err(
            Import,
            403,
            &json("source_session_locked", "You may not import this session."),
        );
        assert!(
            matches!(&e, DiditError::Forbidden { code: Some(c), .. } if c == "source_session_locked")
        );
        assert_eq!(
            e.disposition(),
            Disposition::DeadLetter {
                reason: "forbidden"
            }
        );
        // The code wins over a contradicting detail.
        assert!(matches!(
            err(
                Import,
                403,
                &json("source_session_locked", "already imported")
            ),
            DiditError::Forbidden { .. }
        ));
        // A key without the privilege fails every import alike: pause, as for share.
        let e = err(
            Import,
            403,
            &json(codes::PERMISSION_DENIED, "You do not have permission."),
        );
        assert!(matches!(e, DiditError::ApiKeyRejected { status: 403, .. }));
        assert_eq!(
            e.disposition(),
            Disposition::Pause {
                reason: "credentials"
            }
        );

        for text in [
            "Session has already been imported.",
            "This session was ALREADY IMPORTED into your app",
        ] {
            assert!(
                matches!(
                    err(Import, 403, &detail(text)),
                    DiditError::AlreadyImported { .. }
                ),
                "{text}"
            );
        }
        for text in [
            "Token not intended for your application.",
            "token is not for this application",
            "This token belongs to another application",
        ] {
            assert!(
                matches!(
                    err(Import, 403, &detail(text)),
                    DiditError::NotForApplication { .. }
                ),
                "{text}"
            );
        }

        let theirs = claims(OTHER, 1_900_000_000);
        let e = err_with(Import, 403, "", Some(&theirs));
        assert!(
            matches!(&e, DiditError::NotForApplication { detail: Some(d) } if d.contains(OTHER))
        );
        let ours = claims(APP, 1_900_000_000);
        let e = err_with(Import, 403, "", Some(&ours));
        assert!(matches!(
            e,
            DiditError::Forbidden {
                code: None,
                detail: None
            }
        ));
        assert!(matches!(err(Import, 403, ""), DiditError::Forbidden { .. }));
        // Never silently a success.
        assert_ne!(
            err_with(Import, 403, "{}", Some(&ours)).disposition(),
            Disposition::Duplicate
        );
        // A key problem reported as 403 pauses instead of dead-lettering everything.
        assert!(matches!(
            err_with(
                Import,
                403,
                &detail("Authentication credentials were not provided or are invalid."),
                Some(&ours)
            ),
            DiditError::ApiKeyRejected { status: 403, .. }
        ));
    }

    /// Issue #9: Didit's permission answers (contract §5 and the 403 rows) are about the key or the account, so they
    /// pause share and import (`credentials`) instead of dead-lettering each message as `forbidden`; the two
    /// import-specific 403s keep their meaning. Row by row, with and without a token that names this application.
    #[test]
    fn permission_403s_pause_share_and_import_while_the_import_specific_403s_keep_their_meaning() {
        use Operation::{Import, Share};
        let ours = claims(APP, 1_900_000_000);
        let theirs = claims(OTHER, 1_900_000_000);
        let pause = Disposition::Pause {
            reason: "credentials",
        };
        let permission_texts = [
            // Django REST framework's default 403 text.
            "You do not have permission to perform this action.",
            // Didit: the key lacks the privilege, the resource or action, the IP list, the balance.
            "You must have the `write:sessions` privilege",
            "This key lacks access to this resource.",
            "The key does not have access to this action.",
            "Request from an IP address outside the allowed IPs.",
            "Insufficient balance.",
            "Not authorized.",
        ];
        for text in permission_texts {
            for body in [detail(text), json("something_else", text)] {
                let share = err(Share, 403, &body);
                assert_eq!(share.disposition(), pause, "share: {body}");
            }
            for claims in [None, Some(&ours)] {
                let import = err_with(Import, 403, &detail(text), claims);
                assert!(
                    matches!(import, DiditError::ApiKeyRejected { status: 403, .. }),
                    "import {text} (claims {claims:?}): {import:?}"
                );
                assert_eq!(import.disposition(), pause, "import: {text}");
            }
            // A token naming another application is that one message's problem, whatever the text.
            assert!(
                matches!(
                    err_with(Import, 403, &detail(text), Some(&theirs)),
                    DiditError::NotForApplication { .. }
                ),
                "{text} with a token for another application"
            );
        }
        for code in [codes::PERMISSION_DENIED, "contract_billing_suspended"] {
            let import = err(Import, 403, &json(code, "x"));
            assert_eq!(import.disposition(), pause, "import code {code}");
            assert_eq!(
                err(Share, 403, &json(code, "x")).disposition(),
                pause,
                "share code {code}"
            );
        }
        // Unchanged: already imported is a success, not for this application a dead letter, and a 403 that says
        // nothing of the key stays `forbidden`.
        for body in [
            json(
                codes::ALREADY_IMPORTED,
                "You do not have permission to perform this action.",
            ),
            detail("Session has already been imported."),
        ] {
            assert_eq!(
                err_with(Import, 403, &body, Some(&ours)).disposition(),
                Disposition::Duplicate,
                "{body}"
            );
        }
        for body in [
            json(
                codes::TOKEN_NOT_FOR_APPLICATION,
                "You do not have permission to perform this action.",
            ),
            detail("Token not intended for your application."),
        ] {
            assert!(matches!(
                err_with(Import, 403, &body, Some(&ours)),
                DiditError::NotForApplication { .. }
            ));
        }
        assert_eq!(
            err_with(
                Import,
                403,
                &detail("Source session is locked."),
                Some(&ours)
            )
            .disposition(),
            Disposition::DeadLetter {
                reason: "forbidden"
            }
        );
    }

    #[test]
    fn import_401_by_code_then_detail_then_probe() {
        use Operation::Import;
        let e = err(Import, 401, &json(codes::INVALID_API_KEY, "x"));
        assert!(matches!(e, DiditError::ApiKeyRejected { status: 401, .. }));
        assert_eq!(
            e.disposition(),
            Disposition::Pause {
                reason: "credentials"
            }
        );
        let e = err(Import, 401, &json(codes::INVALID_SHARE_TOKEN, "x"));
        assert!(matches!(
            e,
            DiditError::TokenRejected { expired: false, .. }
        ));
        assert_eq!(e.disposition(), Disposition::Reshare);
        assert!(matches!(
            err(Import, 401, &json(codes::SHARE_TOKEN_EXPIRED, "x")),
            DiditError::TokenRejected { expired: true, .. }
        ));

        assert!(matches!(
            err(Import, 401, &detail("Invalid or missing API key")),
            DiditError::ApiKeyRejected { .. }
        ));
        assert!(matches!(
            err(
                Import,
                401,
                &detail("Authentication credentials were not provided or are invalid.")
            ),
            DiditError::ApiKeyRejected { .. }
        ));
        let past = claims(APP, 1_700_000_000);
        let future = claims(APP, 1_900_000_000);
        let text = detail("Share token invalid or expired.");
        assert!(matches!(
            err_with(Import, 401, &text, Some(&past)),
            DiditError::TokenRejected { expired: true, .. }
        ));
        assert!(matches!(
            err_with(Import, 401, &text, Some(&future)),
            DiditError::TokenRejected { expired: false, .. }
        ));
        assert!(matches!(
            err(Import, 401, &detail("The share token has expired")),
            DiditError::TokenRejected { expired: true, .. }
        ));

        for body in ["", "{}", "{\"detail\":\"Unauthorized\"}"] {
            assert!(
                matches!(
                    verdict(Import, 401, &HeaderMap::new(), body, None),
                    Verdict::AskProbe { .. }
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn probe_resolves_the_ambiguous_401() {
        let past = claims(APP, 1_700_000_000);
        let future = claims(APP, 1_900_000_000);
        assert!(matches!(
            resolve_probe(Ok(()), None, Some(&past), now()),
            DiditError::TokenRejected { expired: true, .. }
        ));
        assert!(matches!(
            resolve_probe(Ok(()), None, Some(&future), now()),
            DiditError::TokenRejected { expired: false, .. }
        ));
        let rejected = DiditError::ApiKeyRejected {
            status: 401,
            detail: None,
        };
        let e = resolve_probe(
            Err(rejected),
            Some("Unauthorized".into()),
            Some(&future),
            now(),
        );
        assert!(
            matches!(&e, DiditError::ApiKeyRejected { status: 401, detail: Some(d) } if d == "Unauthorized")
        );
        assert!(matches!(
            resolve_probe(Err(DiditError::Timeout), None, None, now()),
            DiditError::Timeout
        ));
    }

    #[test]
    fn import_404_and_400() {
        use Operation::Import;
        let e = err(
            Import,
            404,
            &json(
                codes::SESSION_NOT_FOUND,
                "Original session no longer exists.",
            ),
        );
        assert!(matches!(e, DiditError::SourceGone { .. }));
        assert_eq!(
            e.disposition(),
            Disposition::DeadLetter {
                reason: "source_gone"
            }
        );
        let e = err(Import, 404, &json(codes::WORKFLOW_NOT_FOUND, "x"));
        assert!(matches!(e, DiditError::WorkflowNotFound { .. }));
        assert_eq!(
            e.disposition(),
            Disposition::Pause {
                reason: "workflow_missing"
            }
        );
        assert!(matches!(
            err(
                Import,
                404,
                &detail("workflow_id not found in your application.")
            ),
            DiditError::WorkflowNotFound { .. }
        ));
        assert!(matches!(
            err(Import, 404, &detail("Original session no longer exists.")),
            DiditError::SourceGone { .. }
        ));
        assert!(matches!(
            err(Import, 404, ""),
            DiditError::SourceGone { .. }
        ));
        let e = err(
            Import,
            400,
            "{\"workflow_id\": [\"Must be a valid UUID.\"]}",
        );
        assert!(
            matches!(&e, DiditError::ImportRejected { code: None, detail: Some(d) } if d == "workflow_id: Must be a valid UUID.")
        );
        assert_eq!(
            e.disposition(),
            Disposition::DeadLetter { reason: "rejected" }
        );
        assert!(matches!(
            err(Import, 503, ""),
            DiditError::Server { status: 503 }
        ));
    }

    #[test]
    fn unexpected_statuses_have_a_documented_disposition() {
        let d = |status| err(Operation::Share, status, "").disposition();
        assert_eq!(
            d(402),
            Disposition::Pause {
                reason: "credentials"
            }
        );
        assert_eq!(
            d(301),
            Disposition::Pause {
                reason: "credentials"
            }
        );
        assert_eq!(d(409), Disposition::Retry { after: None });
        assert_eq!(d(408), Disposition::Retry { after: None });
        assert_eq!(
            d(422),
            Disposition::DeadLetter {
                reason: "unexpected"
            }
        );
        let unreadable = DiditError::Unexpected {
            status: 201,
            detail: None,
        };
        assert_eq!(unreadable.disposition(), Disposition::Retry { after: None });
        assert_eq!(unreadable.status_label(), "201");
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn rate_limit_waits() {
        let wait = |pairs: &[(&'static str, &str)]| retry_after(&headers(pairs), now());
        assert_eq!(wait(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(wait(&[("retry-after", "0")]), Some(Duration::ZERO));
        // 1_800_000_000 is Fri, 15 Jan 2027 08:00:00 GMT.
        assert_eq!(
            wait(&[("retry-after", "Fri, 15 Jan 2027 08:00:12 GMT")]),
            Some(Duration::from_secs(12))
        );
        assert_eq!(
            wait(&[("retry-after", "Friday, 15-Jan-27 08:00:05 GMT")]),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            wait(&[("retry-after", "Fri Jan 15 08:00:03 2027")]),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            wait(&[("retry-after", "Fri, 15 Jan 2027 07:00:00 GMT")]),
            Some(Duration::ZERO)
        );
        assert_eq!(
            wait(&[("x-ratelimit-reset", "1800000042")]),
            Some(Duration::from_secs(42))
        );
        assert_eq!(
            wait(&[("x-ratelimit-reset", "1799999000")]),
            Some(Duration::ZERO)
        );
        assert_eq!(
            wait(&[("x-ratelimit-reset", "30")]),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            wait(&[("retry-after", "3"), ("x-ratelimit-reset", "1800000042")]),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            wait(&[("retry-after", "soon"), ("x-ratelimit-reset", "1800000042")]),
            Some(Duration::from_secs(42))
        );
        assert_eq!(wait(&[("retry-after", "999999")]), Some(MAX_RETRY_AFTER));
        assert_eq!(
            wait(&[("x-ratelimit-reset", "1900000000")]),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(wait(&[]), None);
        assert_eq!(wait(&[("retry-after", "soon")]), None);

        let h = headers(&[("retry-after", "2")]);
        match verdict(Operation::Import, 429, &h, "", None) {
            Verdict::Failed(e) => {
                assert!(
                    matches!(e, DiditError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(2))
                );
                assert_eq!(
                    e.disposition(),
                    Disposition::Retry {
                        after: Some(Duration::from_secs(2))
                    }
                );
                assert!(e.to_string().contains("wait 2 s"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn details_never_carry_secrets() {
        let body = detail(
            "key sk_test_key and token eyJtoken.payload.sig and another eyJhbGci.eyJzdWIi.c2ln here",
        );
        let e = err(Operation::Import, 400, &body);
        let text = format!("{e} {e:?}");
        assert!(!text.contains("sk_test_key"), "{text}");
        assert!(!text.contains("eyJ"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
        let long = detail(&"x".repeat(5000));
        let e = err(Operation::Share, 400, &long);
        assert!(e.to_string().len() < 600);
    }

    #[test]
    fn details_fall_back_to_message_fields_and_plain_text() {
        let (code, d) = read_error(b"{\"message\":\"nope\"}", &[]);
        assert_eq!((code, d.as_deref()), (None, Some("nope")));
        let (_, d) = read_error(b"<html>\n  <h1>403 Forbidden</h1>\n</html>", &[]);
        assert_eq!(d.as_deref(), Some("<html> <h1>403 Forbidden</h1> </html>"));
        assert_eq!(read_error(b"", &[]), (None, None));
        assert_eq!(read_error(b"{}", &[]), (None, None));
    }

    #[test]
    fn status_labels() {
        assert_eq!(DiditError::Timeout.status_label(), "timeout");
        assert_eq!(
            DiditError::Connect("refused".into()).status_label(),
            "connect_error"
        );
        assert_eq!(DiditError::Config("x".into()).status_label(), "error");
        assert_eq!(
            DiditError::TokenRejected {
                expired: true,
                detail: None
            }
            .status_label(),
            "401"
        );
        assert_eq!(
            DiditError::AlreadyImported { detail: None }.status_label(),
            "403"
        );
        assert_eq!(
            DiditError::WorkflowNotFound { detail: None }.status_label(),
            "404"
        );
        assert_eq!(
            DiditError::RateLimited { retry_after: None }.status_label(),
            "429"
        );
    }
}
