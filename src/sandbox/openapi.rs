//! `/openapi.json`: an OpenAPI 3.0 description of the Didit routes the sandbox serves, kept honest to what the
//! handlers in [`super::routes`] do (statuses, bodies, error codes, the `x-api-key` scheme, the rate-limit
//! headers), so contract tools can be pointed at it. Didit's operations are tagged `didit`; the sandbox's own
//! control routes (`/sandbox/...`, no API key) are described too, tagged `test-only`, because tests, demos and people
//! drive the sandbox through them — a client generated for Didit should leave that tag out.

use std::sync::OnceLock;

use serde_json::{Value, json};

use crate::didit::wire::codes;

fn error_response(description: &str, codes: &[&str]) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {
            "allOf": [{"$ref": "#/components/schemas/Error"}],
            "properties": {"code": {"type": "string", "enum": codes}}
        }}}
    })
}

/// Answers every Didit route can give: a bad key, and the injected 429 and 5xx faults.
fn common_errors() -> Vec<(&'static str, Value)> {
    vec![
        (
            "401",
            json!({"$ref": "#/components/responses/Unauthorized"}),
        ),
        (
            "429",
            json!({"$ref": "#/components/responses/TooManyRequests"}),
        ),
        ("500", json!({"$ref": "#/components/responses/ServerError"})),
        ("502", json!({"$ref": "#/components/responses/ServerError"})),
        (
            "503",
            json!({"$ref": "#/components/responses/ServiceUnavailable"}),
        ),
        ("504", json!({"$ref": "#/components/responses/ServerError"})),
    ]
}

fn operation(
    id: &str,
    summary: &str,
    body: Option<&str>,
    success: (&str, Value),
    errors: Vec<(&str, Value)>,
    write: bool,
    path_param: Option<&str>,
) -> Value {
    let mut responses = serde_json::Map::new();
    let (status, mut ok) = success;
    if write {
        ok["headers"] = json!({
            "X-RateLimit-Limit": {"$ref": "#/components/headers/X-RateLimit-Limit"},
            "X-RateLimit-Remaining": {"$ref": "#/components/headers/X-RateLimit-Remaining"},
            "X-RateLimit-Reset": {"$ref": "#/components/headers/X-RateLimit-Reset"}
        });
    }
    responses.insert(status.to_string(), ok);
    // Route-specific answers come last so they replace the common ones (import's 401 has more codes).
    for (code, value) in common_errors().into_iter().chain(errors) {
        responses.insert(code.to_string(), value);
    }
    let mut op = json!({
        "operationId": id,
        "summary": summary,
        "security": [{"ApiKeyAuth": []}],
        "responses": responses,
    });
    if let Some(schema) = body {
        op["requestBody"] = json!({
            "required": true,
            "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
        });
    }
    if let Some(name) = path_param {
        op["parameters"] = json!([{
            "name": name, "in": "path", "required": true,
            "schema": {"type": "string", "format": "uuid"}
        }]);
    }
    op
}

fn json_ok(description: &str, schema: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
    })
}

fn feature_array() -> Value {
    json!({"type": "array", "nullable": true, "items": {"$ref": "#/components/schemas/FeatureReport"}})
}

/// The document (built once).
pub fn document() -> Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(build).clone()
}

fn build() -> Value {
    let not_found_session = error_response(
        "No such session in your application.",
        &[codes::SESSION_NOT_FOUND],
    );
    let forbidden = error_response(
        "The API key lacks the write:sessions privilege.",
        &[codes::PERMISSION_DENIED],
    );
    let read_forbidden = error_response(
        "The API key lacks the read:sessions privilege.",
        &[codes::PERMISSION_DENIED],
    );
    let validation = error_response("Malformed body.", &[codes::VALIDATION_ERROR]);

    let mut decision_props = serde_json::Map::new();
    for (name, schema) in [
        ("session_id", json!({"type": "string", "format": "uuid"})),
        ("session_number", json!({"type": "integer"})),
        (
            "session_kind",
            json!({"$ref": "#/components/schemas/SessionKind"}),
        ),
        ("session_url", json!({"type": "string", "nullable": true})),
        (
            "status",
            json!({"$ref": "#/components/schemas/SessionStatus"}),
        ),
        ("environment", json!({"type": "string"})),
        ("workflow_id", json!({"type": "string", "format": "uuid"})),
        (
            "features",
            json!({"type": "array", "nullable": true, "items": {"type": "string"}}),
        ),
        ("vendor_data", json!({"type": "string", "nullable": true})),
        ("metadata", json!({"type": "object", "nullable": true})),
        ("callback", json!({"type": "string", "nullable": true})),
        (
            "shared_from_session",
            json!({"type": "string", "format": "uuid", "nullable": true,
                   "description": "Set on imported sessions: the original session in the issuing application."}),
        ),
        (
            "created_at",
            json!({"type": "string", "format": "date-time"}),
        ),
        (
            "business_session_id",
            json!({"type": "string", "format": "uuid"}),
        ),
    ] {
        decision_props.insert(name.to_string(), schema);
    }
    for name in [
        "id_verifications",
        "nfc_verifications",
        "liveness_checks",
        "face_matches",
        "poa_verifications",
        "proof_of_address",
        "database_validations",
        "phone_verifications",
        "email_verifications",
        "aml_screenings",
        "ip_analyses",
        "registry_checks",
        "key_people_checks",
        "document_verifications",
        "questionnaire_responses",
        "questionnaires",
    ] {
        decision_props.insert(name.to_string(), feature_array());
    }

    let mut paths = json!({
        "/v3/session/": {"post": operation(
            "createSession", "Create a verification session", Some("CreateSessionRequest"),
            ("201", json_ok("The new session, or the caller's unfinished session for the same workflow and \
                             vendor_data.", "CreateSessionResponse")),
            vec![("400", validation.clone()), ("403", forbidden.clone()),
                 ("404", error_response("Unknown workflow.", &[codes::WORKFLOW_NOT_FOUND]))],
            true, None)},
        "/v3/session/{sessionId}/decision/": {"get": operation(
            "getDecision", "Retrieve a session's decision", None,
            ("200", json_ok("The full decision.", "Decision")),
            vec![("403", read_forbidden.clone()), ("404", not_found_session.clone())],
            false, Some("sessionId"))},
        "/v3/session/{sessionId}/update-status/": {"patch": operation(
            "updateStatus", "Approve, decline or request resubmission", Some("UpdateStatusRequest"),
            ("200", json_ok("Updated (or already in that status: no change, no webhook).", "UpdateStatusResponse")),
            vec![("400", validation.clone()), ("403", forbidden.clone()), ("404", not_found_session.clone())],
            true, Some("sessionId"))},
        "/v3/session/{sessionId}/delete/": {"delete": operation(
            "deleteSession", "Delete a session", None,
            ("204", json!({"description": "Deleted."})),
            vec![("403", forbidden.clone()), ("404", not_found_session.clone())],
            true, Some("sessionId"))},
        "/v3/session/{sessionId}/share/": {"post": operation(
            "shareSession", "Mint a share token for a finished session", Some("ShareRequest"),
            ("201", json_ok("The share token.", "ShareResponse")),
            vec![
                ("400", error_response(
                    "Bad TTL, bad for_application_id, unfinished session (detail starts \"Only finished sessions \
                     (Approved, Declined, In Review) can be shared.\") or malformed body.",
                    &[codes::INVALID_TTL, codes::INVALID_APPLICATION, codes::SESSION_NOT_FINISHED,
                      codes::VALIDATION_ERROR])),
                ("403", forbidden.clone()),
                ("404", not_found_session.clone()),
            ],
            true, Some("sessionId"))},
        "/v3/session/import-shared/": {"post": operation(
            "importSharedSession", "Import a shared session into the caller's application", Some("ImportRequest"),
            ("201", json_ok("The new session: a full clone of the source.", "Decision")),
            vec![
                ("400", error_response("Malformed body, or a workflow of the other kind.",
                    &[codes::VALIDATION_ERROR, codes::WORKFLOW_KIND_MISMATCH])),
                ("401", error_response("Invalid API key, or share token invalid or expired.",
                    &[codes::INVALID_API_KEY, codes::INVALID_SHARE_TOKEN, codes::SHARE_TOKEN_EXPIRED])),
                ("403", error_response("Token not intended for your application, or already imported into it.",
                    &[codes::TOKEN_NOT_FOR_APPLICATION, codes::ALREADY_IMPORTED])),
                ("404", error_response("workflow_id not found in your application, or the original session no \
                                        longer exists.", &[codes::WORKFLOW_NOT_FOUND, codes::SESSION_NOT_FOUND])),
            ],
            true, None)},
        "/v3/sessions/": {"get": {
            "operationId": "listSessions",
            "summary": "List the caller's sessions, newest first",
            "description": "Filters are ANDed. session_kind=all concatenates one page of KYC and one of KYB \
                sessions (up to 2 x limit rows); next and previous keep the filters.",
            "security": [{"ApiKeyAuth": []}],
            "parameters": [
                {"name": "vendor_data", "in": "query", "schema": {"type": "string"},
                 "description": "Exact match."},
                {"name": "status", "in": "query", "schema": {"type": "string"},
                 "description": "A status in either casing (APPROVED, In Review, ...)."},
                {"name": "session_kind", "in": "query",
                 "schema": {"type": "string", "enum": ["user", "business", "all"], "default": "user"}},
                {"name": "workflow_id", "in": "query", "schema": {"type": "string", "format": "uuid"}},
                {"name": "date_from", "in": "query", "schema": {"type": "string"},
                 "description": "Created on or after: a date (YYYY-MM-DD, from its first second) or an ISO 8601 time."},
                {"name": "date_to", "in": "query", "schema": {"type": "string"},
                 "description": "Created on or before: a date (through its last second) or an ISO 8601 time."},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 50}},
                {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}}
            ],
            "responses": {
                "200": json_ok("One page.", "SessionList"),
                "400": validation.clone(),
                "401": {"$ref": "#/components/responses/Unauthorized"},
                "403": read_forbidden.clone(),
                "429": {"$ref": "#/components/responses/TooManyRequests"},
                "500": {"$ref": "#/components/responses/ServerError"},
                "502": {"$ref": "#/components/responses/ServerError"},
                "503": {"$ref": "#/components/responses/ServiceUnavailable"},
                "504": {"$ref": "#/components/responses/ServerError"}
            }
        }},
        "/v3/webhook/destinations/": {
            "post": operation(
                "createWebhookDestination", "Create a webhook destination", Some("WebhookDestinationRequest"),
                ("201", json_ok("The destination, with its secret.", "WebhookDestination")),
                vec![("400", validation.clone())], true, None),
            "get": {
                "operationId": "listWebhookDestinations",
                "summary": "List webhook destinations (oldest first, without secrets)",
                "security": [{"ApiKeyAuth": []}],
                "responses": {
                    "200": {"description": "Every destination.", "content": {"application/json": {"schema": {
                        "type": "array", "items": {"$ref": "#/components/schemas/WebhookDestination"}}}}},
                    "401": {"$ref": "#/components/responses/Unauthorized"},
                    "429": {"$ref": "#/components/responses/TooManyRequests"},
                    "500": {"$ref": "#/components/responses/ServerError"},
                    "502": {"$ref": "#/components/responses/ServerError"},
                    "503": {"$ref": "#/components/responses/ServiceUnavailable"},
                    "504": {"$ref": "#/components/responses/ServerError"}
                }
            }
        },
        "/v3/webhook/destinations/{destinationUuid}/": {"get": operation(
            "getWebhookDestination", "Get one webhook destination with its secret", None,
            ("200", json_ok("The destination.", "WebhookDestination")),
            vec![("404", error_response("No such destination.", &["not_found"]))],
            false, Some("destinationUuid"))}
    });
    let schemas = json!({
        "Error": {
            "type": "object",
            "required": ["detail", "code"],
            "properties": {"detail": {"type": "string"}, "code": {"type": "string"}}
        },
        "SessionKind": {"type": "string", "enum": ["user", "business"]},
        "SessionStatus": {
            "type": "string",
            "description": "KYC sessions use Title Case, KYB sessions UPPER_SNAKE.",
            "enum": ["Not Started", "In Progress", "Approved", "Declined", "In Review", "Awaiting User",
                     "Resubmitted", "Expired", "Abandoned", "Kyc Expired",
                     "NOT_STARTED", "IN_PROGRESS", "APPROVED", "DECLINED", "IN_REVIEW", "AWAITING_USER",
                     "RESUBMITTED", "EXPIRED", "ABANDONED", "KYC_EXPIRED"]
        },
        "FeatureReport": {
            "type": "object",
            "required": ["node_id", "status"],
            "properties": {"node_id": {"type": "string"}, "status": {"type": "string"}},
            "additionalProperties": true
        },
        "Decision": {
            "type": "object",
            "required": ["session_id", "session_number", "session_kind", "status", "workflow_id"],
            "properties": decision_props,
            "additionalProperties": true
        },
        "CreateSessionRequest": {
            "type": "object",
            "required": ["workflow_id"],
            "properties": {
                "workflow_id": {"type": "string", "format": "uuid"},
                "vendor_data": {"type": "string"},
                "callback": {"type": "string"},
                "metadata": {"type": "object"}
            }
        },
        "CreateSessionResponse": {
            "type": "object",
            "required": ["session_id", "session_number", "session_token", "status", "workflow_id", "url",
                         "session_kind"],
            "properties": {
                "session_id": {"type": "string", "format": "uuid"},
                "session_number": {"type": "integer"},
                "session_token": {"type": "string"},
                "session_kind": {"$ref": "#/components/schemas/SessionKind"},
                "vendor_data": {"type": "string", "nullable": true},
                "metadata": {"type": "object", "nullable": true},
                "status": {"$ref": "#/components/schemas/SessionStatus"},
                "workflow_id": {"type": "string", "format": "uuid"},
                "callback": {"type": "string", "nullable": true},
                "url": {"type": "string"},
                "created_at": {"type": "string", "format": "date-time"}
            }
        },
        "UpdateStatusRequest": {
            "type": "object",
            "required": ["new_status"],
            "properties": {
                "new_status": {"type": "string", "enum": ["Approved", "Declined", "Resubmitted"]},
                "comment": {"type": "string"}
            }
        },
        "UpdateStatusResponse": {
            "type": "object",
            "required": ["session_id"],
            "properties": {"session_id": {"type": "string", "format": "uuid"}}
        },
        "ShareRequest": {
            "type": "object",
            "required": ["for_application_id"],
            "properties": {
                "for_application_id": {"type": "string", "format": "uuid",
                    "description": "Must exist, must not be deleted, must differ from the caller."},
                "ttl_in_seconds": {"type": "integer", "minimum": 60, "maximum": 86400, "default": 3600}
            }
        },
        "ShareResponse": {
            "type": "object",
            "required": ["share_token", "for_application_id", "session_kind"],
            "properties": {
                "share_token": {"type": "string", "description": "HS256 JWT with claims session_id, \
                    session_kind, from_application_id, for_application_id, iat, exp."},
                "for_application_id": {"type": "string", "format": "uuid"},
                "session_kind": {"$ref": "#/components/schemas/SessionKind"}
            }
        },
        "ImportRequest": {
            "type": "object",
            "required": ["share_token", "workflow_id"],
            "properties": {
                "share_token": {"type": "string"},
                "workflow_id": {"type": "string", "format": "uuid",
                    "description": "A workflow of the token's kind in the caller's application."},
                "vendor_data": {"type": "string"},
                "trust_review": {"type": "boolean", "default": false,
                    "description": "true keeps the source status; false lands In Review (KYB: IN_REVIEW)."}
            }
        },
        "SessionList": {
            "type": "object",
            "required": ["count", "next", "previous", "results"],
            "properties": {
                "count": {"type": "integer"},
                "next": {"type": "string", "nullable": true},
                "previous": {"type": "string", "nullable": true},
                "results": {"type": "array", "items": {"type": "object", "properties": {
                    "session_id": {"type": "string", "format": "uuid"},
                    "session_number": {"type": "integer"},
                    "session_kind": {"$ref": "#/components/schemas/SessionKind"},
                    "status": {"$ref": "#/components/schemas/SessionStatus"},
                    "workflow_id": {"type": "string", "format": "uuid"},
                    "vendor_data": {"type": "string", "nullable": true},
                    "session_url": {"type": "string", "nullable": true},
                    "shared_from_session": {"type": "string", "nullable": true},
                    "created_at": {"type": "string", "format": "date-time"}
                }}}
            }
        },
        "WebhookDestinationRequest": {
            "type": "object",
            "required": ["url"],
            "properties": {
                "url": {"type": "string", "format": "uri"},
                "label": {"type": "string"},
                "enabled": {"type": "boolean", "default": true},
                "webhook_version": {"type": "string", "enum": ["v1", "v2", "v3"], "default": "v3"},
                "secret_shared_key": {"type": "string", "description": "Generated when not given."},
                "subscribed_events": {"type": "array", "items": {"type": "string", "enum": super::state::WEBHOOK_EVENTS},
                                      "default": ["status.updated"]}
            }
        },
        "WebhookDestination": {
            "type": "object",
            "required": ["uuid", "label", "url", "enabled", "webhook_version", "subscribed_events",
                         "created_at", "updated_at"],
            "properties": {
                "uuid": {"type": "string", "format": "uuid"},
                "label": {"type": "string"},
                "url": {"type": "string"},
                "enabled": {"type": "boolean"},
                "webhook_version": {"type": "string"},
                "secret_shared_key": {"type": "string", "description": "Only in create and get-one answers."},
                "secret_last4": {"type": "string"},
                "subscribed_events": {"type": "array", "items": {"type": "string"}},
                "created_at": {"type": "string", "format": "date-time"},
                "updated_at": {"type": "string", "format": "date-time"},
                "deliveries_count": {"type": "integer"},
                "failed_deliveries_count": {"type": "integer"},
                "last_delivery_at": {"type": "string", "format": "date-time", "nullable": true}
            }
        }
    });
    let mut components = json!({
    "securitySchemes": {"ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
    "headers": {
        "X-RateLimit-Limit": {"schema": {"type": "integer"}, "description": "Writes allowed per 60 s window."},
        "X-RateLimit-Remaining": {"schema": {"type": "integer"}, "description": "Writes left in the window."},
        "X-RateLimit-Reset": {"schema": {"type": "integer"}, "description": "Unix seconds when the window frees a slot."},
        "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}
    },
    "responses": {
        "Unauthorized": error_response("Missing, unknown or revoked API key.", &[codes::INVALID_API_KEY]),
        "TooManyRequests": {
            "description": "Over the per-key write limit (or an injected 429). The X-RateLimit-* headers come only with \
                            this answer, unless the sandbox sends them always (rate_limit_headers).",
            "headers": {
                "Retry-After": {"$ref": "#/components/headers/Retry-After"},
                "X-RateLimit-Limit": {"$ref": "#/components/headers/X-RateLimit-Limit"},
                "X-RateLimit-Remaining": {"$ref": "#/components/headers/X-RateLimit-Remaining"},
                "X-RateLimit-Reset": {"$ref": "#/components/headers/X-RateLimit-Reset"}
            },
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        },
        "ServerError": error_response("Injected fault.", &[codes::INTERNAL_ERROR]),
        "ServiceUnavailable": {
            "description": "Injected fault; the body may be empty.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        }
    }});
    components["schemas"] = schemas;
    if let (Some(paths), Some(control)) = (paths.as_object_mut(), control_paths().as_object()) {
        for operations in paths.values_mut().filter_map(Value::as_object_mut) {
            for operation in operations.values_mut() {
                operation["tags"] = json!(["didit"]);
            }
        }
        paths.extend(control.clone());
    }
    if let (Some(schemas), Some(control)) = (
        components["schemas"].as_object_mut(),
        control_schemas().as_object(),
    ) {
        schemas.extend(control.clone());
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Didit verification API (partner-bridge sandbox)",
            "version": "3",
            "description": "The Didit routes served by the partner-bridge sandbox, with Didit's B2B Reusable KYC \
                semantics. Every error answer is {\"detail\", \"code\"}. Writes (POST, PATCH, DELETE) are limited \
                per API key (default 300 per 60 s sliding window) and carry X-RateLimit-* headers. 5xx answers only \
                occur when faults are injected; a 503 may have no body. Operations tagged test-only are the \
                sandbox's control routes: they exist only here, need no API key, and answer errors in the same shape."
        },
        "tags": [
            {"name": "didit", "description": "Didit's verification API, as the sandbox emulates it."},
            {"name": "test-only", "description": "Sandbox control routes for tests, demos and people: create \
                applications and sessions, play the end user, inject faults, move the clock, read what happened. \
                Not part of Didit's API."}
        ],
        "servers": [{"url": "/"}],
        "security": [{"ApiKeyAuth": []}],
        "paths": paths,
        "components": components
    })
}

/// One control operation: tagged `test-only`, no API key, JSON in and out, errors as `{"detail", "code"}`.
fn control(
    id: &str,
    summary: &str,
    body: Option<Value>,
    success: (&str, Value),
    params: &[&str],
) -> Value {
    let (status, ok) = success;
    let mut responses = serde_json::Map::new();
    responses.insert(status.to_string(), ok);
    if body.is_some() {
        responses.insert(
            "400".into(),
            error_response(
                "Malformed body or an unknown field (named in detail).",
                &[codes::VALIDATION_ERROR],
            ),
        );
    }
    if !params.is_empty() {
        responses.insert(
            "404".into(),
            json!({"description": "No such application, session or workflow.",
                   "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}),
        );
    }
    let mut op = json!({
        "operationId": id,
        "summary": summary,
        "tags": ["test-only"],
        "security": [],
        "responses": responses,
    });
    if let Some(schema) = body {
        op["requestBody"] =
            json!({"required": true, "content": {"application/json": {"schema": schema}}});
    }
    if !params.is_empty() {
        op["parameters"] = Value::Array(
            params
                .iter()
                .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
                .collect(),
        );
    }
    op
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn ok(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn no_content(description: &str) -> (&'static str, Value) {
    ("204", json!({"description": description}))
}

fn array_of(name: &str) -> Value {
    json!({"type": "array", "items": schema_ref(name)})
}

/// The `/sandbox/...` routes of `super::control`.
fn control_paths() -> Value {
    let app = || {
        ok(
            "The application, with its API key.",
            schema_ref("SandboxApplication"),
        )
    };
    let session = || {
        ok(
            "The session and its full decision.",
            schema_ref("SandboxSession"),
        )
    };
    json!({
        "/sandbox/applications": {
            "post": control("sandboxCreateApplication", "Create an application with a key and one workflow per kind",
                Some(json!({"type": "object", "required": ["name"], "additionalProperties": false, "properties": {
                    "name": {"type": "string"},
                    "privileges": {"type": "array", "items": {"type": "string", "enum": ["read:sessions", "write:sessions"]},
                                   "description": "Default: both."}}})),
                ("201", app()), &[]),
            "get": control("sandboxListApplications", "List the applications with their keys", None,
                ("200", ok("Every application.", array_of("SandboxApplication"))), &[])
        },
        "/sandbox/applications/{id}": {
            "delete": control("sandboxDeleteApplication", "Delete an application (its key stops working)", None,
                no_content("Deleted."), &["id"])
        },
        "/sandbox/applications/{id}/revoke-key": {
            "post": control("sandboxRevokeKey", "Revoke the application's key and issue a new one", None,
                ("200", ok("The new key; the old one answers 401 from now on.", json!({"type": "object",
                    "required": ["application_id", "api_key"],
                    "properties": {"application_id": {"type": "string"}, "api_key": {"type": "string"}}}))),
                &["id"])
        },
        "/sandbox/applications/{id}/keys": {
            "post": control("sandboxAddKey", "Issue one more API key for the application (the others keep working)", None,
                ("201", ok("The additional key, for a rotation: move to it, then revoke the old one.", json!({"type": "object",
                    "required": ["application_id", "api_key"],
                    "properties": {"application_id": {"type": "string"}, "api_key": {"type": "string"}}}))),
                &["id"])
        },
        "/sandbox/applications/{id}/workflows": {
            "post": control("sandboxAddWorkflow", "Add a workflow of one kind",
                Some(json!({"type": "object", "required": ["kind"], "additionalProperties": false,
                            "properties": {"kind": schema_ref("SessionKind")}})),
                ("201", ok("The new workflow.", json!({"type": "object",
                    "required": ["workflow_id", "kind", "application_id"],
                    "properties": {"workflow_id": {"type": "string", "format": "uuid"}, "kind": schema_ref("SessionKind"),
                                   "application_id": {"type": "string"}}}))),
                &["id"])
        },
        "/sandbox/applications/{id}/workflows/{workflow_id}": {
            "delete": control("sandboxRemoveWorkflow", "Remove a workflow (imports into it answer workflow_not_found)",
                None, no_content("Removed."), &["id", "workflow_id"])
        },
        "/sandbox/applications/{id}/entities": {
            "get": control("sandboxEntities", "The application's vendor entities (users and businesses)", None,
                ("200", ok("Every entity.", array_of("SandboxEntity"))), &["id"])
        },
        "/sandbox/sessions": {
            "post": control("sandboxCreateSession", "Create a session in any status, with a realistic decision",
                Some(json!({"type": "object", "required": ["application_id", "session_kind", "status"],
                    "additionalProperties": false, "properties": {
                        "application_id": {"type": "string"},
                        "session_kind": schema_ref("SessionKind"),
                        "status": schema_ref("SessionStatus"),
                        "vendor_data": {"type": "string"},
                        "workflow_id": {"type": "string", "description": "Default: the application's workflow of that kind."},
                        "metadata": {"type": "object"},
                        "session_id": {"type": "string", "format": "uuid", "description": "Default: a fresh one."}}})),
                ("201", session()), &[])
        },
        "/sandbox/sessions/{id}": {
            "get": control("sandboxGetSession", "Any application's session", None, ("200", session()), &["id"]),
            "delete": control("sandboxDeleteSession", "Delete a session (its imports then answer session_not_found)",
                None, no_content("Deleted."), &["id"])
        },
        "/sandbox/sessions/{id}/status": {
            "post": control("sandboxSetStatus", "Play the end user: move a session to any status (a webhook is sent)",
                Some(json!({"type": "object", "required": ["status"], "additionalProperties": false,
                            "properties": {"status": schema_ref("SessionStatus")}})),
                ("200", session()), &["id"])
        },
        "/sandbox/sessions/{id}/webhook": {
            "post": control("sandboxResendWebhook",
                "Send the current status.updated again (same event_id, fresh timestamp) to every destination", None,
                ("200", ok("What was sent.", json!({"type": "object", "required": ["sent"],
                    "properties": {"sent": array_of("SandboxSentWebhook")}}))),
                &["id"])
        },
        "/sandbox/faults": {
            "post": control("sandboxSetFaults", "Inject faults into share, import or every /v3 route; {} clears them",
                Some(schema_ref("SandboxFaultSettings")),
                ("200", ok("The faults in force.", schema_ref("SandboxFaultState"))), &[]),
            "get": control("sandboxGetFaults", "The faults in force", None,
                ("200", ok("The faults in force.", schema_ref("SandboxFaultState"))), &[])
        },
        "/sandbox/clock": {
            "post": control("sandboxAdvanceClock", "Move the sandbox's clock forward (token expiry without waiting)",
                Some(json!({"type": "object", "required": ["advance_seconds"], "additionalProperties": false,
                            "properties": {"advance_seconds": {"type": "integer", "minimum": 0}}})),
                ("200", ok("The virtual time.", schema_ref("SandboxClock"))), &[]),
            "get": control("sandboxGetClock", "The sandbox's virtual time", None,
                ("200", ok("The virtual time.", schema_ref("SandboxClock"))), &[])
        },
        "/sandbox/settings": {
            "post": control("sandboxSetSettings", "Switch the per-key write limit or change it (test-only: a \
                higher limit or a shorter window keeps a test short with the same shape)",
                Some(json!({"type": "object", "additionalProperties": false, "properties": {
                    "rate_limit": {"type": "boolean"}, "writes_per_minute": {"type": "integer", "minimum": 1},
                    "window_ms": {"type": "integer", "minimum": 100, "maximum": 3_600_000,
                                  "description": "The sliding window (Didit's: 60000)."},
                    "rate_limit_headers": {"type": "string", "enum": ["on_429", "always"],
                        "description": "on_429: X-RateLimit-* headers only on 429 answers, as Didit documents it \
                                        now (default); always: on every answer to a write, as an older revision did."}}})),
                ("200", ok("The settings in force.", schema_ref("SandboxSettings"))), &[]),
            "get": control("sandboxGetSettings", "The write-limit settings", None,
                ("200", ok("The settings in force.", schema_ref("SandboxSettings"))), &[])
        },
        "/sandbox/stats": {
            "get": control("sandboxStats", "What happened: shares, imports per source session, rejections by code",
                None, ("200", ok("The counters.", schema_ref("SandboxStats"))), &[])
        },
        "/sandbox/webhook-deliveries": {
            "get": control("sandboxWebhookDeliveries", "Finished webhook deliveries, oldest first", None,
                ("200", ok("Every finished delivery.", array_of("SandboxWebhookDelivery"))), &[])
        }
    })
}

/// The shapes of `super::model` the control routes answer with.
fn control_schemas() -> Value {
    let string = json!({"type": "string"});
    let nullable_int = json!({"type": "integer", "nullable": true});
    json!({
        "SandboxApplication": {
            "type": "object",
            "required": ["name", "application_id", "api_key", "workflows", "privileges"],
            "properties": {
                "name": string, "application_id": {"type": "string", "format": "uuid"}, "api_key": string,
                "workflows": {"type": "object", "required": ["user", "business"],
                              "properties": {"user": {"type": "string", "format": "uuid"},
                                             "business": {"type": "string", "format": "uuid"}}},
                "privileges": {"type": "array", "items": string}
            }
        },
        "SandboxSession": {
            "type": "object",
            "required": ["application_id", "session_id", "session_number", "session_kind", "status", "workflow_id",
                         "decision"],
            "properties": {
                "application_id": string, "session_id": {"type": "string", "format": "uuid"},
                "session_number": {"type": "integer"}, "session_kind": schema_ref("SessionKind"),
                "status": schema_ref("SessionStatus"), "vendor_data": {"type": "string", "nullable": true},
                "workflow_id": string, "decision": schema_ref("Decision")
            }
        },
        "SandboxEntity": {
            "type": "object",
            "required": ["entity_id", "application_id", "session_kind", "vendor_data", "sessions"],
            "properties": {"entity_id": string, "application_id": string, "session_kind": schema_ref("SessionKind"),
                           "vendor_data": string, "sessions": {"type": "integer"}}
        },
        "SandboxFaultSettings": {
            "type": "object",
            "additionalProperties": false,
            "description": "Rates are probabilities in 0..1 (missing = 0). One draw per request decides, in this \
                order, between hang, error, rate limit, dropped answer and withheld answer; latency applies to every \
                matching request.",
            "properties": {
                "endpoint": {"type": "string", "enum": ["share", "import", "*"], "default": "*"},
                "latency_ms": {"type": "integer", "minimum": 0},
                "error_rate": {"type": "number", "minimum": 0, "maximum": 1, "description": "Answers 500, 502 or 503."},
                "rate_limit_rate": {"type": "number", "minimum": 0, "maximum": 1,
                                    "description": "Answers 429 with Retry-After: 1."},
                "hang_rate": {"type": "number", "minimum": 0, "maximum": 1,
                              "description": "Never answered (until shutdown or 120 s)."},
                "drop_response_rate": {"type": "number", "minimum": 0, "maximum": 1,
                    "description": "Carried out in full, then the connection is reset without an answer: Didit \
                        acted, the client sees a connection error."},
                "hang_after_rate": {"type": "number", "minimum": 0, "maximum": 1,
                    "description": "Carried out, then the answer is withheld until the sandbox stops or 120 s pass: \
                        lets a test kill the client between Didit's action and the client's record of it."}
            }
        },
        "SandboxFaultState": {
            "type": "object", "required": ["faults"],
            "properties": {"faults": array_of("SandboxFaultSettings")}
        },
        "SandboxClock": {
            "type": "object", "required": ["now", "offset_seconds"],
            "properties": {"now": {"type": "integer", "description": "Virtual time, unix seconds."},
                           "offset_seconds": {"type": "integer", "description": "How far ahead of the real clock."}}
        },
        "SandboxSettings": {
            "type": "object", "required": ["rate_limit", "writes_per_minute", "window_ms", "rate_limit_headers"],
            "properties": {"rate_limit": {"type": "boolean"}, "writes_per_minute": {"type": "integer"},
                           "window_ms": {"type": "integer"},
                           "rate_limit_headers": {"type": "string", "enum": ["on_429", "always"]}}
        },
        "SandboxStats": {
            "type": "object", "required": ["shares", "imports", "rejections"],
            "properties": {
                "shares": {"type": "integer", "description": "Share tokens minted."},
                "imports": {"type": "array", "items": {"type": "object",
                    "required": ["source_session_id", "application_id", "count"],
                    "properties": {"source_session_id": string, "application_id": string,
                                   "count": {"type": "integer"}}},
                    "description": "Successful imports per (source session, importing application)."},
                "rejections": {"type": "object", "additionalProperties": {"type": "integer"},
                               "description": "Error answers of the Didit routes by code (faults and 429s included)."},
                "writes": {"type": "integer",
                           "description": "Write requests to the Didit routes (429s included): the denominator of the 429 share."},
                "entities": {"type": "integer"}, "sessions": {"type": "integer"},
                "webhook_deliveries": {"type": "integer"}
            }
        },
        "SandboxSentWebhook": {
            "type": "object",
            "required": ["destination_uuid", "url", "body", "headers", "attempts", "delivered"],
            "properties": {"destination_uuid": string, "url": string,
                           "body": {"type": "string", "description": "The raw body, byte for byte."},
                           "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                           "status_code": nullable_int, "attempts": {"type": "integer"},
                           "delivered": {"type": "boolean"}}
        },
        "SandboxWebhookDelivery": {
            "type": "object",
            "required": ["delivery_id", "event_id", "destination_uuid", "url", "application_id", "session_id",
                         "status", "webhook_type", "attempts", "delivered"],
            "properties": {"delivery_id": string, "event_id": string, "destination_uuid": string, "url": string,
                           "application_id": string, "session_id": string, "status": string,
                           "webhook_type": string, "attempts": {"type": "integer"},
                           "status_code": nullable_int, "delivered": {"type": "boolean"},
                           "error": {"type": "string", "nullable": true}}
        }
    })
}
