//! The sandbox's error answers: one enum, each variant with the HTTP status and the stable `code` Didit's clients
//! branch on (`crate::didit::wire::codes`), rendered as `{"detail": "...", "code": "..."}`.
//!
//! The rendered response carries a [`RejectedWith`] extension naming the code, so the Didit-route middleware can
//! count every rejection in `GET /sandbox/stats` without knowing which handler produced it.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::didit::wire::{ErrorBody, codes};

/// The start of the detail text of a share of an unfinished session.
pub const NOT_FINISHED_DETAIL: &str =
    "Only finished sessions (Approved, Declined, In Review) can be shared.";
/// The detail text of an import whose source session is gone.
pub const SOURCE_GONE_DETAIL: &str = "Original session no longer exists.";

/// An error answer of a Didit route (and of the control routes, which reuse the shape).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 401: no key, an unknown key, or a revoked one.
    #[error("Invalid or missing API key")]
    InvalidApiKey,
    /// 403: the key lacks the privilege the route needs.
    #[error("You do not have permission to perform this action.")]
    PermissionDenied,
    /// 400: a malformed body or query.
    #[error("{0}")]
    Validation(String),
    /// 400 on share: `ttl_in_seconds` not an integer in 60..=86400.
    #[error("{0}")]
    InvalidTtl(String),
    /// 400 on share: `for_application_id` missing, unknown, deleted or the caller itself.
    #[error("{0}")]
    InvalidApplication(String),
    /// 400 on share: the session is not Approved, Declined or In Review.
    #[error("{0}")]
    SessionNotFinished(String),
    /// 404: no such session visible to the caller (or, on import, the source is gone).
    #[error("{0}")]
    SessionNotFound(String),
    /// 401 on import: the token is malformed or its signature does not verify.
    #[error("{0}")]
    InvalidShareToken(String),
    /// 401 on import: the token's `exp` has passed.
    #[error("{0}")]
    ShareTokenExpired(String),
    /// 403 on import: the token names another application.
    #[error("{0}")]
    TokenNotForApplication(String),
    /// 404: the workflow is not in the caller's application.
    #[error("{0}")]
    WorkflowNotFound(String),
    /// 400 on import: the workflow is of the other kind.
    #[error("{0}")]
    WorkflowKindMismatch(String),
    /// 403 on import: this token was already imported into this application.
    #[error("{0}")]
    AlreadyImported(String),
    /// 429: over the per-key write budget (the rate-limit headers are added by the caller).
    #[error("Request was throttled.")]
    RateLimited,
    /// 5xx injected by the fault settings; `with_body: false` answers with no body at all, as Didit's 5xx may.
    #[error("{detail}")]
    Internal {
        /// 500, 502, 503 or 504.
        status: StatusCode,
        /// Human text.
        detail: String,
        /// Whether to send the JSON body.
        with_body: bool,
    },
    /// 404 for a path no route serves.
    #[error("Not found.")]
    NotFound,
    /// 405 for a method the path does not serve.
    #[error("Method not allowed.")]
    MethodNotAllowed,
}

/// Response extension naming the `code` of an error answer, read by the stats middleware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RejectedWith(pub &'static str);

impl ApiError {
    /// The HTTP status of the answer.
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidApiKey
            | ApiError::InvalidShareToken(_)
            | ApiError::ShareTokenExpired(_) => StatusCode::UNAUTHORIZED,
            ApiError::PermissionDenied
            | ApiError::TokenNotForApplication(_)
            | ApiError::AlreadyImported(_) => StatusCode::FORBIDDEN,
            ApiError::Validation(_)
            | ApiError::InvalidTtl(_)
            | ApiError::InvalidApplication(_)
            | ApiError::SessionNotFinished(_)
            | ApiError::WorkflowKindMismatch(_) => StatusCode::BAD_REQUEST,
            ApiError::SessionNotFound(_) | ApiError::WorkflowNotFound(_) | ApiError::NotFound => {
                StatusCode::NOT_FOUND
            }
            ApiError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal { status, .. } => *status,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// The stable machine code of the answer.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidApiKey => codes::INVALID_API_KEY,
            ApiError::PermissionDenied => codes::PERMISSION_DENIED,
            ApiError::Validation(_) => codes::VALIDATION_ERROR,
            ApiError::InvalidTtl(_) => codes::INVALID_TTL,
            ApiError::InvalidApplication(_) => codes::INVALID_APPLICATION,
            ApiError::SessionNotFinished(_) => codes::SESSION_NOT_FINISHED,
            ApiError::SessionNotFound(_) => codes::SESSION_NOT_FOUND,
            ApiError::InvalidShareToken(_) => codes::INVALID_SHARE_TOKEN,
            ApiError::ShareTokenExpired(_) => codes::SHARE_TOKEN_EXPIRED,
            ApiError::TokenNotForApplication(_) => codes::TOKEN_NOT_FOR_APPLICATION,
            ApiError::WorkflowNotFound(_) => codes::WORKFLOW_NOT_FOUND,
            ApiError::WorkflowKindMismatch(_) => codes::WORKFLOW_KIND_MISMATCH,
            ApiError::AlreadyImported(_) => codes::ALREADY_IMPORTED,
            ApiError::RateLimited => codes::RATE_LIMITED,
            ApiError::Internal { .. } => codes::INTERNAL_ERROR,
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
        }
    }

    /// The session-not-found answer every route gives for an unknown or foreign session id.
    pub fn session_not_found() -> ApiError {
        ApiError::SessionNotFound("Session not found.".to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let code = self.code();
        let mut response = match &self {
            ApiError::Internal {
                with_body: false, ..
            } => status.into_response(),
            _ => (status, Json(ErrorBody::new(code, self.to_string()))).into_response(),
        };
        response.extensions_mut().insert(RejectedWith(code));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_codes_follow_the_contract() {
        let cases = [
            (ApiError::InvalidApiKey, 401, "invalid_api_key"),
            (ApiError::PermissionDenied, 403, "permission_denied"),
            (
                ApiError::AlreadyImported(String::new()),
                403,
                "already_imported",
            ),
            (
                ApiError::TokenNotForApplication(String::new()),
                403,
                "token_not_for_application",
            ),
            (
                ApiError::InvalidShareToken(String::new()),
                401,
                "invalid_share_token",
            ),
            (
                ApiError::ShareTokenExpired(String::new()),
                401,
                "share_token_expired",
            ),
            (
                ApiError::SessionNotFound(String::new()),
                404,
                "session_not_found",
            ),
            (
                ApiError::WorkflowNotFound(String::new()),
                404,
                "workflow_not_found",
            ),
            (
                ApiError::WorkflowKindMismatch(String::new()),
                400,
                "workflow_kind_mismatch",
            ),
            (
                ApiError::SessionNotFinished(String::new()),
                400,
                "session_not_finished",
            ),
            (ApiError::InvalidTtl(String::new()), 400, "invalid_ttl"),
            (
                ApiError::InvalidApplication(String::new()),
                400,
                "invalid_application",
            ),
            (ApiError::Validation(String::new()), 400, "validation_error"),
            (ApiError::RateLimited, 429, "rate_limited"),
        ];
        for (error, status, code) in cases {
            assert_eq!(error.status_code().as_u16(), status, "{error:?}");
            assert_eq!(error.code(), code);
        }
    }
}
