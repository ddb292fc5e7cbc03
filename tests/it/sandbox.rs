//! The Didit sandbox over real HTTP (`Sandbox::start("127.0.0.1:0")`): every documented rule of share and
//! import, both session kinds, the TTL edges, auth and privileges, per-application visibility, the write limit,
//! faults, the virtual clock, stats, fixtures, and signed webhook deliveries to a small receiver.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use partner_bridge::didit::signature;
use partner_bridge::didit::wire::{SessionDecision, SessionKind};
use partner_bridge::sandbox::{
    ApplicationInfo, Control, FaultEndpoint, FaultSettings, RateLimitHeaders, Sandbox,
    SandboxOptions, SessionInfo, Settings,
};
use serde_json::{Value, json};

use crate::support::wait_for;

const NOT_FINISHED_PREFIX: &str =
    "Only finished sessions (Approved, Declined, In Review) can be shared.";

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

struct Env {
    sandbox: Sandbox,
    control: Control,
    a: ApplicationInfo,
    b: ApplicationInfo,
    http: reqwest::Client,
    base: String,
}

async fn env_with(options: SandboxOptions) -> Env {
    let sandbox = Sandbox::start("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap();
    let control = sandbox.control();
    let apps = sandbox.initial_applications();
    let (a, b) = if apps.len() == 2 {
        (apps[0].clone(), apps[1].clone())
    } else {
        (
            control.create_application("a").await.unwrap(),
            control.create_application("b").await.unwrap(),
        )
    };
    let base = sandbox.base_url();
    Env {
        sandbox,
        control,
        a,
        b,
        http: http(),
        base,
    }
}

async fn env() -> Env {
    env_with(SandboxOptions {
        rate_limit: false,
        ..SandboxOptions::default()
    })
    .await
}

fn key(app: &ApplicationInfo) -> &str {
    app.api_key.expose()
}

impl Env {
    async fn call(
        &self,
        method: reqwest::Method,
        api_key: Option<&str>,
        path: &str,
        body: Option<Value>,
    ) -> Answer {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = api_key {
            request = request.header("x-api-key", k);
        }
        if let Some(b) = body {
            request = request.json(&b);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn post(&self, api_key: &str, path: &str, body: Value) -> Answer {
        self.call(reqwest::Method::POST, Some(api_key), path, Some(body))
            .await
    }

    async fn get(&self, api_key: &str, path: &str) -> Answer {
        self.call(reqwest::Method::GET, Some(api_key), path, None)
            .await
    }

    async fn session(
        &self,
        app: &ApplicationInfo,
        kind: SessionKind,
        status: &str,
        vendor: Option<&str>,
    ) -> SessionInfo {
        self.control
            .create_session(&app.application_id, kind, status, vendor)
            .await
            .unwrap()
    }

    async fn share(&self, from: &ApplicationInfo, session_id: &str, body: Value) -> Answer {
        self.post(key(from), &format!("/v3/session/{session_id}/share/"), body)
            .await
    }

    async fn share_to(
        &self,
        from: &ApplicationInfo,
        session_id: &str,
        to: &ApplicationInfo,
    ) -> String {
        let answer = self
            .share(
                from,
                session_id,
                json!({ "for_application_id": to.application_id }),
            )
            .await;
        assert_eq!(answer.status, 201, "{}", answer.body);
        answer.body["share_token"].as_str().unwrap().to_string()
    }

    async fn import(&self, into: &ApplicationInfo, body: Value) -> Answer {
        self.post(key(into), "/v3/session/import-shared/", body)
            .await
    }

    async fn import_token(
        &self,
        into: &ApplicationInfo,
        token: &str,
        kind: SessionKind,
        trust_review: bool,
    ) -> Answer {
        self.import(
            into,
            json!({
                "share_token": token,
                "workflow_id": into.workflows.for_kind(kind),
                "vendor_data": format!("{}-imported", into.name),
                "trust_review": trust_review,
            }),
        )
        .await
    }
}

fn claims(token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT has three parts");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap()
}

fn jwt_header(token: &str) -> Value {
    serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap()
}

const KINDS: [SessionKind; 2] = [SessionKind::User, SessionKind::Business];

#[tokio::test]
async fn share_mints_an_hs256_jwt_with_exactly_the_documented_claims_for_both_kinds() {
    let e = env().await;
    for kind in KINDS {
        let s = e.session(&e.a, kind, "Approved", Some("u-1")).await;
        let answer = e
            .share(
                &e.a,
                &s.session_id,
                json!({ "for_application_id": e.b.application_id }),
            )
            .await;
        assert_eq!(answer.status, 201, "{}", answer.body);
        assert_eq!(
            answer.body["for_application_id"],
            e.b.application_id.as_str()
        );
        assert_eq!(answer.body["session_kind"], kind.as_str());
        let token = answer.body["share_token"].as_str().unwrap();
        assert!(!token.contains('='), "base64url without padding");
        assert_eq!(jwt_header(token), json!({"alg": "HS256", "typ": "JWT"}));
        let c = claims(token);
        let mut names: Vec<&String> = c.as_object().unwrap().keys().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "exp",
                "for_application_id",
                "from_application_id",
                "iat",
                "session_id",
                "session_kind"
            ]
        );
        assert_eq!(c["session_id"], s.session_id.as_str());
        assert_eq!(c["session_kind"], kind.as_str());
        assert_eq!(c["from_application_id"], e.a.application_id.as_str());
        assert_eq!(c["for_application_id"], e.b.application_id.as_str());
        assert_eq!(
            c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
            3600,
            "default TTL"
        );
    }
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn ttl_edges_59_and_86401_are_rejected_60_and_86400_accepted() {
    let e = env().await;
    let s = e.session(&e.a, SessionKind::User, "Approved", None).await;
    for (ttl, expected) in [
        (json!(59), None),
        (json!(60), Some(60)),
        (json!(86400), Some(86400)),
        (json!(86401), None),
        (json!(0), None),
        (json!(-60), None),
        (json!("3600"), None),
        (json!(3600.5), None),
        (Value::Null, Some(3600)),
    ] {
        let answer = e
            .share(
                &e.a,
                &s.session_id,
                json!({ "for_application_id": e.b.application_id, "ttl_in_seconds": ttl }),
            )
            .await;
        match expected {
            Some(lifetime) => {
                assert_eq!(answer.status, 201, "ttl {ttl}: {}", answer.body);
                let c = claims(answer.body["share_token"].as_str().unwrap());
                assert_eq!(
                    c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
                    lifetime
                );
            }
            None => {
                assert_eq!(answer.status, 400, "ttl {ttl}: {}", answer.body);
                assert_eq!(answer.code(), "invalid_ttl");
            }
        }
    }
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn only_finished_sessions_can_be_shared_in_both_casings() {
    let e = env().await;
    for kind in KINDS {
        for status in [
            "Not Started",
            "In Progress",
            "Abandoned",
            "Expired",
            "Resubmitted",
            "Awaiting User",
            "Kyc Expired",
        ] {
            let s = e.session(&e.a, kind, status, None).await;
            let answer = e
                .share(
                    &e.a,
                    &s.session_id,
                    json!({ "for_application_id": e.b.application_id }),
                )
                .await;
            assert_eq!(answer.status, 400, "{kind} {status}");
            assert_eq!(answer.code(), "session_not_finished");
            assert!(
                answer.body["detail"]
                    .as_str()
                    .unwrap()
                    .starts_with(NOT_FINISHED_PREFIX)
            );
        }
        for status in ["Approved", "DECLINED", "in review"] {
            let s = e.session(&e.a, kind, status, None).await;
            let answer = e
                .share(
                    &e.a,
                    &s.session_id,
                    json!({ "for_application_id": e.b.application_id }),
                )
                .await;
            assert_eq!(answer.status, 201, "{kind} {status}: {}", answer.body);
        }
    }
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn for_application_id_must_exist_be_live_and_differ_from_the_caller() {
    let e = env().await;
    let s = e.session(&e.a, SessionKind::User, "Approved", None).await;
    let gone = e.control.create_application("gone").await.unwrap();
    e.control
        .delete_application(&gone.application_id)
        .await
        .unwrap();
    for body in [
        json!({}),
        json!({ "for_application_id": "" }),
        json!({ "for_application_id": uuid::Uuid::new_v4().to_string() }),
        json!({ "for_application_id": "not-a-uuid" }),
        json!({ "for_application_id": e.a.application_id }),
        json!({ "for_application_id": gone.application_id }),
        json!({ "for_application_id": 42 }),
    ] {
        let answer = e.share(&e.a, &s.session_id, body.clone()).await;
        assert_eq!(
            (answer.status, answer.code()),
            (400, "invalid_application"),
            "{body}"
        );
    }
    let malformed = e
        .http
        .post(format!("{}/v3/session/{}/share/", e.base, s.session_id))
        .header("x-api-key", key(&e.a))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    assert_eq!(
        malformed.json::<Value>().await.unwrap()["code"],
        "validation_error"
    );
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn api_key_and_privileges() {
    let e = env().await;
    let s = e.session(&e.a, SessionKind::User, "Approved", None).await;
    let path = format!("/v3/session/{}/share/", s.session_id);
    let body = json!({ "for_application_id": e.b.application_id });
    let expected_401 = json!({"detail": "Invalid or missing API key", "code": "invalid_api_key"});
    let missing = e
        .call(reqwest::Method::POST, None, &path, Some(body.clone()))
        .await;
    assert_eq!((missing.status, &missing.body), (401, &expected_401));
    let wrong = e.post("not-a-key", &path, body.clone()).await;
    assert_eq!((wrong.status, &wrong.body), (401, &expected_401));
    // Header names are case-insensitive.
    let upper = e
        .http
        .post(format!("{}{path}", e.base))
        .header("X-API-KEY", key(&e.a))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(upper.status(), 201);

    let reader = e
        .control
        .create_application_with_privileges("reader", &["read:sessions"])
        .await
        .unwrap();
    let rs = e
        .session(&reader, SessionKind::User, "Approved", None)
        .await;
    let denied = e
        .share(
            &reader,
            &rs.session_id,
            json!({ "for_application_id": e.b.application_id }),
        )
        .await;
    assert_eq!(denied.status, 403);
    assert_eq!(
        denied.body,
        json!({"code": "permission_denied", "detail": "You do not have permission to perform this action."})
    );
    // Reading still works; importing needs write:sessions too, and is refused before anything else.
    let read = e
        .get(
            key(&reader),
            &format!("/v3/session/{}/decision/", rs.session_id),
        )
        .await;
    assert_eq!(read.status, 200);
    let token = e.share_to(&e.a, &s.session_id, &reader).await;
    let import = e
        .import_token(&reader, &token, SessionKind::User, true)
        .await;
    assert_eq!((import.status, import.code()), (403, "permission_denied"));
    let empty = e.import(&reader, json!({})).await;
    assert_eq!((empty.status, empty.code()), (403, "permission_denied"));
    // A key without read:sessions cannot list, but can share and import.
    let writer = e
        .control
        .create_application_with_privileges("writer", &["write:sessions"])
        .await
        .unwrap();
    let list = e.get(key(&writer), "/v3/sessions/").await;
    assert_eq!((list.status, list.code()), (403, "permission_denied"));
    let token = e.share_to(&e.a, &s.session_id, &writer).await;
    let imported = e
        .import_token(&writer, &token, SessionKind::User, true)
        .await;
    assert_eq!(imported.status, 201);
    assert_eq!(e.control.stats().await.unwrap().imports.len(), 1);
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn import_is_a_full_clone_with_fresh_ids_for_both_kinds() {
    let e = env().await;
    // Payloads are seeded by session number: make the source's number differ from the clone's, so equal arrays
    // can only come from cloning.
    for _ in 0..3 {
        e.session(&e.a, SessionKind::User, "Declined", None).await;
    }
    for kind in KINDS {
        let source = e
            .session(&e.a, kind, "Approved", Some("issuer-user-42"))
            .await;
        let token = e.share_to(&e.a, &source.session_id, &e.b).await;
        let answer = e.import_token(&e.b, &token, kind, true).await;
        assert_eq!(answer.status, 201, "{}", answer.body);
        let clone: SessionDecision = serde_json::from_value(answer.body.clone()).unwrap();
        assert_ne!(clone.session_id, source.session_id);
        assert_ne!(clone.session_id, "");
        assert_ne!(clone.session_number, Some(source.session_number));
        assert_eq!(clone.session_kind, Some(kind));
        assert_eq!(
            clone.shared_from_session.as_deref(),
            Some(source.session_id.as_str())
        );
        assert_eq!(clone.vendor_data.as_deref(), Some("sponsor-bank-imported"));
        assert_eq!(
            clone.workflow_id.as_deref(),
            Some(e.b.workflows.for_kind(kind))
        );
        assert_eq!(answer.body["session_url"], Value::Null);
        assert!(answer.body["created_at"].is_string());
        assert_eq!(
            clone.status,
            if kind == SessionKind::User {
                "Approved"
            } else {
                "APPROVED"
            }
        );

        // Every feature array of the source is in the clone, item for item.
        let source_json = serde_json::to_value(&source.decision).unwrap();
        let arrays = match kind {
            SessionKind::User => SessionDecision::KYC_ARRAYS,
            SessionKind::Business => SessionDecision::KYB_ARRAYS,
        };
        let mut compared = 0;
        for (name, value) in source_json.as_object().unwrap() {
            if value.is_array() && name != "features" {
                assert_eq!(&answer.body[name], value, "{kind}: {name} differs");
                compared += 1;
            }
        }
        for name in arrays {
            if source_json[*name].is_array() {
                assert!(
                    answer.body[*name].as_array().is_some_and(|a| !a.is_empty()),
                    "{name}"
                );
            }
        }
        assert!(compared >= 6, "{kind}: only {compared} arrays");
        for item in answer.body[if kind == SessionKind::User {
            "id_verifications"
        } else {
            "key_people_checks"
        }]
        .as_array()
        .unwrap()
        {
            assert!(item["node_id"].is_string() && item["status"].is_string());
        }

        // The clone belongs to B: B reads it, A does not.
        let read = e
            .get(
                key(&e.b),
                &format!("/v3/session/{}/decision/", clone.session_id),
            )
            .await;
        assert_eq!(read.status, 200);
        assert_eq!(read.body["shared_from_session"], source.session_id.as_str());
        assert_eq!(
            e.get(
                key(&e.a),
                &format!("/v3/session/{}/decision/", clone.session_id)
            )
            .await
            .status,
            404
        );
    }
    // Fresh session numbers come from B's own sequence.
    let listed = e.get(key(&e.b), "/v3/sessions/?session_kind=all").await;
    assert_eq!(listed.body["count"], 2);
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn trust_review_false_lands_in_review_true_keeps_the_status_in_the_kind_casing() {
    let e = env().await;
    let cases = [
        (SessionKind::User, "Approved", Some(false), "In Review"),
        (SessionKind::User, "Approved", None, "In Review"),
        (SessionKind::User, "Approved", Some(true), "Approved"),
        (SessionKind::User, "Declined", Some(true), "Declined"),
        (SessionKind::User, "In Review", Some(true), "In Review"),
        (SessionKind::Business, "APPROVED", Some(false), "IN_REVIEW"),
        (SessionKind::Business, "Approved", None, "IN_REVIEW"),
        (SessionKind::Business, "approved", Some(true), "APPROVED"),
        (SessionKind::Business, "Declined", Some(true), "DECLINED"),
    ];
    for (kind, source_status, trust, expected) in cases {
        let s = e.session(&e.a, kind, source_status, None).await;
        let token = e.share_to(&e.a, &s.session_id, &e.b).await;
        let mut body = json!({ "share_token": token, "workflow_id": e.b.workflows.for_kind(kind) });
        if let Some(t) = trust {
            body["trust_review"] = json!(t);
        }
        let answer = e.import(&e.b, body).await;
        assert_eq!(answer.status, 201, "{}", answer.body);
        assert_eq!(
            answer.body["status"], expected,
            "{kind} {source_status} trust {trust:?}"
        );
    }
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn import_errors_follow_the_documented_precedence() {
    let e = env().await;
    let c = e.control.create_application("c").await.unwrap();
    let s = e.session(&e.a, SessionKind::User, "Approved", None).await;
    let token = e.share_to(&e.a, &s.session_id, &e.b).await;
    let user_wf = e.b.workflows.user.clone();

    let cases: Vec<(&ApplicationInfo, Value, u16, &str)> = vec![
        (
            &e.b,
            json!({ "workflow_id": user_wf }),
            400,
            "validation_error",
        ),
        (
            &e.b,
            json!({ "share_token": token }),
            400,
            "validation_error",
        ),
        (
            &e.b,
            json!({ "share_token": token, "workflow_id": user_wf, "trust_review": "yes" }),
            400,
            "validation_error",
        ),
        (
            &e.b,
            json!({ "share_token": "garbage", "workflow_id": user_wf }),
            401,
            "invalid_share_token",
        ),
        (
            &e.b,
            json!({ "share_token": format!("{token}x"), "workflow_id": user_wf }),
            401,
            "invalid_share_token",
        ),
        // A token for B presented by C, even with C's own valid workflow.
        (
            &c,
            json!({ "share_token": token, "workflow_id": c.workflows.user }),
            403,
            "token_not_for_application",
        ),
        // ... and with an unknown workflow: the token's application is checked first.
        (
            &c,
            json!({ "share_token": token, "workflow_id": uuid::Uuid::new_v4().to_string() }),
            403,
            "token_not_for_application",
        ),
        (
            &e.b,
            json!({ "share_token": token, "workflow_id": uuid::Uuid::new_v4().to_string() }),
            404,
            "workflow_not_found",
        ),
        (
            &e.b,
            json!({ "share_token": token, "workflow_id": e.a.workflows.user }),
            404,
            "workflow_not_found",
        ),
        (
            &e.b,
            json!({ "share_token": token, "workflow_id": e.b.workflows.business }),
            400,
            "workflow_kind_mismatch",
        ),
    ];
    for (app, body, status, code) in cases {
        let answer = e.import(app, body.clone()).await;
        assert_eq!(
            (answer.status, answer.code()),
            (status, code),
            "{body}: {}",
            answer.body
        );
        assert!(answer.body["detail"].is_string());
    }
    // None of the refused attempts imported anything: the first good one succeeds, the second is a duplicate.
    assert_eq!(
        e.import_token(&e.b, &token, SessionKind::User, false)
            .await
            .status,
        201
    );
    let again = e.import_token(&e.b, &token, SessionKind::User, false).await;
    assert_eq!((again.status, again.code()), (403, "already_imported"));
    // Duplicate is checked after the workflow...
    let bad_wf = e
        .import(
            &e.b,
            json!({ "share_token": token, "workflow_id": uuid::Uuid::new_v4().to_string() }),
        )
        .await;
    assert_eq!(bad_wf.code(), "workflow_not_found");
    // ... and before the source session.
    e.control.delete_session(&s.session_id).await.unwrap();
    let dup_of_gone = e.import_token(&e.b, &token, SessionKind::User, false).await;
    assert_eq!(
        (dup_of_gone.status, dup_of_gone.code()),
        (403, "already_imported")
    );
    // Expiry comes before the token's application.
    let s2 = e.session(&e.a, SessionKind::User, "Approved", None).await;
    let short = e
        .share(
            &e.a,
            &s2.session_id,
            json!({ "for_application_id": e.b.application_id, "ttl_in_seconds": 60 }),
        )
        .await;
    let short = short.body["share_token"].as_str().unwrap().to_string();
    e.control.advance_clock(61).await.unwrap();
    let expired_elsewhere = e
        .import(
            &c,
            json!({ "share_token": short, "workflow_id": c.workflows.user }),
        )
        .await;
    assert_eq!(
        (expired_elsewhere.status, expired_elsewhere.code()),
        (401, "share_token_expired")
    );
    let stats = e.control.stats().await.unwrap();
    assert_eq!(stats.import_count(&s.session_id, &e.b.application_id), 1);
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn a_token_imports_once_per_application_but_a_second_token_imports_again() {
    let e = env().await;
    for kind in KINDS {
        let s = e.session(&e.a, kind, "Approved", None).await;
        let first = e.share_to(&e.a, &s.session_id, &e.b).await;
        assert_eq!(e.import_token(&e.b, &first, kind, true).await.status, 201);
        let dup = e.import_token(&e.b, &first, kind, true).await;
        assert_eq!((dup.status, dup.code()), (403, "already_imported"));
        // A new token for the same session (another TTL, so other claims) is another token.
        let second = e
            .share(
                &e.a,
                &s.session_id,
                json!({ "for_application_id": e.b.application_id, "ttl_in_seconds": 3601 }),
            )
            .await;
        let second = second.body["share_token"].as_str().unwrap().to_string();
        assert_ne!(first, second);
        assert_eq!(e.import_token(&e.b, &second, kind, true).await.status, 201);
        let stats = e.control.stats().await.unwrap();
        assert_eq!(stats.import_count(&s.session_id, &e.b.application_id), 2);
    }
    let stats = e.control.stats().await.unwrap();
    assert_eq!(stats.shares, 4);
    assert_eq!(stats.rejected("already_imported"), 2);
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn tokens_expire_on_the_virtual_clock() {
    let e = env().await;
    let s = e
        .session(&e.a, SessionKind::Business, "Approved", None)
        .await;
    let mint = |ttl: i64| {
        let e = &e;
        let id = s.session_id.clone();
        async move {
            let a = e
                .share(
                    &e.a,
                    &id,
                    json!({ "for_application_id": e.b.application_id, "ttl_in_seconds": ttl }),
                )
                .await;
            a.body["share_token"].as_str().unwrap().to_string()
        }
    };
    let still_valid = mint(60).await;
    let before = claims(&still_valid)["iat"].as_i64().unwrap();
    // 55 of the 60 seconds pass on the virtual clock (the margin absorbs real seconds ticking meanwhile).
    let clock = e.control.advance_clock(55).await.unwrap();
    assert!(clock.now >= before + 55 && clock.offset_seconds == 55);
    assert_eq!(
        e.import_token(&e.b, &still_valid, SessionKind::Business, true)
            .await
            .status,
        201
    );
    let expiring = mint(60).await;
    assert!(
        claims(&expiring)["iat"].as_i64().unwrap() >= before + 55,
        "iat follows the virtual clock"
    );
    e.control.advance_clock(60).await.unwrap();
    let expired = e
        .import_token(&e.b, &expiring, SessionKind::Business, true)
        .await;
    assert_eq!(
        (expired.status, expired.code()),
        (401, "share_token_expired")
    );
    assert!(
        e.control.advance_clock(-1).await.is_err(),
        "the clock only moves forward"
    );
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn a_deleted_source_session_is_gone_for_decision_share_and_import() {
    let e = env().await;
    let s = e.session(&e.a, SessionKind::User, "Approved", None).await;
    let token = e.share_to(&e.a, &s.session_id, &e.b).await;
    let deleted = e
        .call(
            reqwest::Method::DELETE,
            Some(key(&e.a)),
            &format!("/v3/session/{}/delete/", s.session_id),
            None,
        )
        .await;
    assert_eq!(deleted.status, 204);
    let decision = e
        .get(
            key(&e.a),
            &format!("/v3/session/{}/decision/", s.session_id),
        )
        .await;
    assert_eq!(
        (decision.status, decision.code()),
        (404, "session_not_found")
    );
    let share = e
        .share(
            &e.a,
            &s.session_id,
            json!({ "for_application_id": e.b.application_id }),
        )
        .await;
    assert_eq!((share.status, share.code()), (404, "session_not_found"));
    let import = e.import_token(&e.b, &token, SessionKind::User, true).await;
    assert_eq!((import.status, import.code()), (404, "session_not_found"));
    assert_eq!(import.body["detail"], "Original session no longer exists.");
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn importing_creates_the_vendor_entity_when_missing() {
    let e = env().await;
    assert!(
        e.control
            .entities(&e.b.application_id)
            .await
            .unwrap()
            .is_empty()
    );
    let before = e.control.stats().await.unwrap().entities;
    for (kind, vendor) in [
        (SessionKind::User, Some("partner-user-7")),
        (SessionKind::User, Some("partner-user-7")),
        (SessionKind::Business, Some("partner-user-7")),
        (SessionKind::User, None),
    ] {
        let s = e.session(&e.a, kind, "Approved", None).await;
        let token = e.share_to(&e.a, &s.session_id, &e.b).await;
        let mut body = json!({ "share_token": token, "workflow_id": e.b.workflows.for_kind(kind) });
        if let Some(v) = vendor {
            body["vendor_data"] = json!(v);
        }
        assert_eq!(e.import(&e.b, body).await.status, 201);
    }
    let entities = e.control.entities(&e.b.application_id).await.unwrap();
    assert_eq!(
        entities.len(),
        2,
        "one user and one business entity: {entities:?}"
    );
    let user = entities
        .iter()
        .find(|x| x.session_kind == SessionKind::User)
        .unwrap();
    assert_eq!(
        (user.vendor_data.as_str(), user.sessions),
        ("partner-user-7", 2)
    );
    assert_eq!(e.control.stats().await.unwrap().entities, before + 2);
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn sessions_are_visible_only_to_their_own_application() {
    let e = env().await;
    let s = e.session(&e.a, SessionKind::User, "Approved", None).await;
    let paths = [
        (
            reqwest::Method::GET,
            format!("/v3/session/{}/decision/", s.session_id),
            None,
        ),
        (
            reqwest::Method::PATCH,
            format!("/v3/session/{}/update-status/", s.session_id),
            Some(json!({ "new_status": "Declined" })),
        ),
        (
            reqwest::Method::DELETE,
            format!("/v3/session/{}/delete/", s.session_id),
            None,
        ),
        (
            reqwest::Method::POST,
            format!("/v3/session/{}/share/", s.session_id),
            Some(json!({ "for_application_id": e.a.application_id })),
        ),
    ];
    for (method, path, body) in paths {
        let answer = e.call(method.clone(), Some(key(&e.b)), &path, body).await;
        assert_eq!(
            (answer.status, answer.code()),
            (404, "session_not_found"),
            "{method} {path}"
        );
    }
    assert_eq!(e.get(key(&e.b), "/v3/sessions/").await.body["count"], 0);
    let own = e
        .get(
            key(&e.a),
            &format!("/v3/session/{}/decision/", s.session_id),
        )
        .await;
    assert_eq!(
        (own.status, own.body["status"].as_str()),
        (200, Some("Approved"))
    );
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn create_session_answers_201_and_reuses_an_unfinished_session_per_vendor_data() {
    let e = env().await;
    let create = |wf: String, vendor: &'static str, meta: Value| {
        let e = &e;
        async move {
            e.post(
                key(&e.a),
                "/v3/session/",
                json!({ "workflow_id": wf, "vendor_data": vendor, "metadata": meta, "callback": "https://example.com/cb" }),
            )
            .await
        }
    };
    let first = create(e.a.workflows.user.clone(), "v-1", json!({"n": 1})).await;
    assert_eq!(first.status, 201, "{}", first.body);
    for field in [
        "session_id",
        "session_number",
        "session_token",
        "url",
        "workflow_id",
        "callback",
    ] {
        assert!(!first.body[field].is_null(), "{field}");
    }
    assert_eq!(first.body["status"], "Not Started");
    assert_eq!(first.body["session_kind"], "user");
    let again = create(e.a.workflows.user.clone(), "v-1", json!({"n": 2})).await;
    assert_eq!(again.status, 201);
    assert_eq!(again.body["session_id"], first.body["session_id"]);
    assert_eq!(again.body["metadata"], json!({"n": 2}));
    let other_vendor = create(e.a.workflows.user.clone(), "v-2", json!({})).await;
    assert_ne!(other_vendor.body["session_id"], first.body["session_id"]);
    let kyb = create(e.a.workflows.business.clone(), "v-1", json!({})).await;
    assert_eq!(
        (
            kyb.body["session_kind"].as_str(),
            kyb.body["status"].as_str()
        ),
        (Some("business"), Some("NOT_STARTED"))
    );
    // Once finished, the session is never reused.
    let id = first.body["session_id"].as_str().unwrap();
    e.control.set_status(id, "Approved").await.unwrap();
    let fresh = create(e.a.workflows.user.clone(), "v-1", json!({})).await;
    assert_ne!(fresh.body["session_id"], first.body["session_id"]);
    let decision = e
        .get(key(&e.a), &format!("/v3/session/{id}/decision/"))
        .await;
    assert!(
        decision.body["id_verifications"].is_array(),
        "the finished flow filled the decision"
    );

    let missing = e
        .post(key(&e.a), "/v3/session/", json!({ "vendor_data": "x" }))
        .await;
    assert_eq!((missing.status, missing.code()), (400, "validation_error"));
    let unknown = e
        .post(
            key(&e.a),
            "/v3/session/",
            json!({ "workflow_id": uuid::Uuid::new_v4().to_string() }),
        )
        .await;
    assert_eq!(
        (unknown.status, unknown.code()),
        (404, "workflow_not_found")
    );
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn update_status_follows_didit_rules() {
    let e = env().await;
    let path = |id: &str| format!("/v3/session/{id}/update-status/");
    let patch = |id: String, status: &'static str| {
        let e = &e;
        async move {
            e.call(
                reqwest::Method::PATCH,
                Some(key(&e.a)),
                &path(&id),
                Some(json!({ "new_status": status })),
            )
            .await
        }
    };
    let s = e.session(&e.a, SessionKind::User, "In Review", None).await;
    let ok = patch(s.session_id.clone(), "Approved").await;
    assert_eq!(
        (ok.status, &ok.body),
        (200, &json!({ "session_id": s.session_id }))
    );
    assert_eq!(
        e.get(
            key(&e.a),
            &format!("/v3/session/{}/decision/", s.session_id)
        )
        .await
        .body["status"],
        "Approved"
    );
    assert_eq!(
        patch(s.session_id.clone(), "Approved").await.status,
        200,
        "same status is a no-op"
    );
    for bad in ["In Review", "Not Started", "Nonsense"] {
        let answer = patch(s.session_id.clone(), bad).await;
        assert_eq!(
            (answer.status, answer.code()),
            (400, "validation_error"),
            "{bad}"
        );
    }
    let unstarted = e
        .session(&e.a, SessionKind::User, "In Progress", None)
        .await;
    assert_eq!(
        patch(unstarted.session_id.clone(), "Approved").await.status,
        400
    );
    let kyb = e
        .session(&e.a, SessionKind::Business, "DECLINED", None)
        .await;
    assert_eq!(
        patch(kyb.session_id.clone(), "Resubmitted").await.status,
        200
    );
    assert_eq!(
        e.get(
            key(&e.a),
            &format!("/v3/session/{}/decision/", kyb.session_id)
        )
        .await
        .body["status"],
        "RESUBMITTED"
    );
    assert_eq!(
        patch(uuid::Uuid::new_v4().to_string(), "Approved")
            .await
            .status,
        404
    );
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn session_list_is_paginated() {
    let e = env().await;
    for i in 0..5 {
        e.session(&e.a, SessionKind::User, "Approved", Some(&format!("v{i}")))
            .await;
    }
    let first = e.get(key(&e.a), "/v3/sessions/?limit=2").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body["count"], 5);
    assert_eq!(first.body["results"].as_array().unwrap().len(), 2);
    assert_eq!(
        first.body["results"][0]["vendor_data"], "v4",
        "newest first"
    );
    assert_eq!(first.body["previous"], Value::Null);
    assert!(first.body["next"].as_str().unwrap().contains("offset=2"));
    let last = e.get(key(&e.a), "/v3/sessions/?limit=2&offset=4").await;
    assert_eq!(last.body["results"].as_array().unwrap().len(), 1);
    assert_eq!(last.body["next"], Value::Null);
    assert!(last.body["previous"].is_string());
    let bad = e.get(key(&e.a), "/v3/sessions/?limit=abc").await;
    assert_eq!((bad.status, bad.code()), (400, "validation_error"));
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn the_write_limit_answers_429_with_didit_headers_and_can_be_switched_off() {
    // The older behaviour, headers on every write; the default (only on 429) is the next test.
    let e = env_with(SandboxOptions {
        writes_per_minute: 3,
        rate_limit_headers: RateLimitHeaders::Always,
        ..SandboxOptions::default()
    })
    .await;
    let s = e.session(&e.a, SessionKind::User, "Approved", None).await;
    let body = json!({ "for_application_id": e.b.application_id });
    let started = chrono::Utc::now().timestamp();
    for remaining in ["2", "1", "0"] {
        let answer = e.share(&e.a, &s.session_id, body.clone()).await;
        assert_eq!(answer.status, 201);
        assert_eq!(answer.header("x-ratelimit-limit"), Some("3"));
        assert_eq!(answer.header("x-ratelimit-remaining"), Some(remaining));
        let reset: i64 = answer.header("x-ratelimit-reset").unwrap().parse().unwrap();
        assert!(reset >= started && reset <= started + 61);
    }
    let throttled = e.share(&e.a, &s.session_id, body.clone()).await;
    assert_eq!(throttled.status, 429);
    assert_eq!(
        throttled.body,
        json!({"detail": "Request was throttled.", "code": "rate_limited"})
    );
    let retry_after: u64 = throttled.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after));
    assert_eq!(throttled.header("x-ratelimit-remaining"), Some("0"));
    assert!(throttled.header("x-ratelimit-reset").is_some());
    // Error answers of writes carry the headers too; reads are not limited; other keys have their own window.
    assert_eq!(e.get(key(&e.a), "/v3/sessions/").await.status, 200);
    let other = e
        .post(key(&e.b), "/v3/session/import-shared/", json!({}))
        .await;
    assert_eq!(
        (other.status, other.header("x-ratelimit-remaining")),
        (400, Some("2"))
    );
    assert_eq!(
        e.control.stats().await.unwrap().shares,
        3,
        "the throttled share minted nothing"
    );

    let settings = e.control.settings(false, 3).await.unwrap();
    assert!(!settings.rate_limit);
    let free = e.share(&e.a, &s.session_id, body.clone()).await;
    assert_eq!(free.status, 201);
    assert!(free.header("x-ratelimit-limit").is_none());
    assert_eq!(e.control.stats().await.unwrap().rejected("rate_limited"), 1);
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn rate_limit_headers_come_only_with_429_by_default_and_the_limit_and_window_are_settable() {
    let e = env_with(SandboxOptions {
        writes_per_minute: 2,
        ..SandboxOptions::default()
    })
    .await;
    let s = e.session(&e.a, SessionKind::User, "Approved", None).await;
    let body = json!({ "for_application_id": e.b.application_id });
    for _ in 0..2 {
        let answer = e.share(&e.a, &s.session_id, body.clone()).await;
        assert_eq!(answer.status, 201);
        assert_eq!(answer.header("x-ratelimit-limit"), None);
        assert_eq!(answer.header("x-ratelimit-remaining"), None);
    }
    let throttled = e.share(&e.a, &s.session_id, body.clone()).await;
    assert_eq!(throttled.status, 429);
    assert_eq!(throttled.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(throttled.header("x-ratelimit-remaining"), Some("0"));
    assert!(throttled.header("x-ratelimit-reset").is_some());
    assert!(throttled.header("retry-after").is_some());
    let stats = e.control.stats().await.unwrap();
    assert_eq!((stats.writes, stats.rejected("rate_limited")), (3, 1));

    // A higher limit over a shorter window: the same shape, sooner.
    let settings = e
        .control
        .set_settings(Settings {
            rate_limit: true,
            writes_per_minute: 3,
            window_ms: 1_000,
            rate_limit_headers: RateLimitHeaders::On429,
        })
        .await
        .unwrap();
    assert_eq!((settings.writes_per_minute, settings.window_ms), (3, 1_000));
    for _ in 0..3 {
        assert_eq!(e.share(&e.a, &s.session_id, body.clone()).await.status, 201);
    }
    let throttled = e.share(&e.a, &s.session_id, body.clone()).await;
    assert_eq!(throttled.status, 429);
    assert_eq!(throttled.header("retry-after"), Some("1"));
    let mut open = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if e.share(&e.a, &s.session_id, body.clone()).await.status == 201 {
            open = true;
            break;
        }
    }
    assert!(open, "the 1 s window let nothing through");
    let bad = e
        .control
        .set_settings(Settings {
            rate_limit: true,
            writes_per_minute: 3,
            window_ms: 5,
            rate_limit_headers: RateLimitHeaders::Always,
        })
        .await;
    assert!(bad.is_err(), "a 5 ms window is refused");
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn faults_fail_throttle_delay_and_hang_before_any_state_change() {
    let e = env().await;
    let s = e.session(&e.a, SessionKind::User, "Approved", None).await;
    let body = json!({ "for_application_id": e.b.application_id });
    e.control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::Share,
            error_rate: 1.0,
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..8 {
        let answer = e.share(&e.a, &s.session_id, body.clone()).await;
        assert!(
            matches!(answer.status, 500 | 502 | 503),
            "{}",
            answer.status
        );
        if !answer.body.is_null() {
            assert_eq!(answer.code(), "internal_error");
        }
    }
    assert_eq!(
        e.control.stats().await.unwrap().shares,
        0,
        "a faulted share mints nothing"
    );
    // The fault is scoped to share: import still answers normally.
    let token_less = e.import(&e.b, json!({})).await;
    assert_eq!(token_less.status, 400);

    e.control.clear_faults().await.unwrap();
    let token = e.share_to(&e.a, &s.session_id, &e.b).await;
    e.control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::Import,
            rate_limit_rate: 1.0,
            ..Default::default()
        })
        .await
        .unwrap();
    let throttled = e.import_token(&e.b, &token, SessionKind::User, true).await;
    assert_eq!((throttled.status, throttled.code()), (429, "rate_limited"));
    assert_eq!(throttled.header("retry-after"), Some("1"));
    assert!(throttled.header("x-ratelimit-reset").is_some());
    assert!(
        e.control.stats().await.unwrap().imports.is_empty(),
        "a faulted import imports nothing"
    );

    e.control.clear_faults().await.unwrap();
    e.control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::All,
            latency_ms: 300,
            ..Default::default()
        })
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(
        e.import_token(&e.b, &token, SessionKind::User, true)
            .await
            .status,
        201
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "latency is added"
    );

    e.control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::All,
            hang_rate: 1.0,
            ..Default::default()
        })
        .await
        .unwrap();
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    let hung = impatient
        .get(format!("{}/v3/sessions/", e.base))
        .header("x-api-key", key(&e.a))
        .send()
        .await;
    assert!(hung.is_err_and(|err| err.is_timeout()));
    assert!(
        e.control
            .set_faults(FaultSettings {
                error_rate: 2.0,
                ..Default::default()
            })
            .await
            .is_err()
    );
    let stats = e.control.stats().await.unwrap();
    assert_eq!(stats.rejected("internal_error"), 8);
    assert_eq!(stats.rejected("rate_limited"), 1);
    // Shutdown answers the hung request instead of waiting for it.
    let stopping = Instant::now();
    e.sandbox.shutdown().await;
    assert!(stopping.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn revoked_keys_stop_working_and_the_new_key_works() {
    let e = env().await;
    let s = e.session(&e.a, SessionKind::User, "Approved", None).await;
    let new_key = e.control.revoke_key(&e.a.application_id).await.unwrap();
    let old = e
        .share(
            &e.a,
            &s.session_id,
            json!({ "for_application_id": e.b.application_id }),
        )
        .await;
    assert_eq!((old.status, old.code()), (401, "invalid_api_key"));
    assert_eq!(e.get(key(&e.a), "/v3/sessions/").await.status, 401);
    let fresh = e
        .post(
            new_key.expose(),
            &format!("/v3/session/{}/share/", s.session_id),
            json!({ "for_application_id": e.b.application_id }),
        )
        .await;
    assert_eq!(fresh.status, 201);
    assert_eq!(
        e.control.stats().await.unwrap().rejected("invalid_api_key"),
        2
    );
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn a_removed_workflow_is_404_until_one_is_added_back() {
    let e = env().await;
    let s = e.session(&e.a, SessionKind::User, "Approved", None).await;
    let token = e.share_to(&e.a, &s.session_id, &e.b).await;
    e.control
        .remove_workflow(&e.b.application_id, &e.b.workflows.user)
        .await
        .unwrap();
    let missing = e.import_token(&e.b, &token, SessionKind::User, true).await;
    assert_eq!(
        (missing.status, missing.code()),
        (404, "workflow_not_found")
    );
    let repaired = e
        .control
        .add_workflow(&e.b.application_id, SessionKind::User)
        .await
        .unwrap();
    let answer = e
        .import(
            &e.b,
            json!({ "share_token": token, "workflow_id": repaired }),
        )
        .await;
    assert_eq!(answer.status, 201);
    assert_eq!(answer.body["workflow_id"], repaired.as_str());
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn stats_count_shares_imports_and_every_rejection_by_code() {
    let e = env().await;
    let s = e
        .session(&e.a, SessionKind::Business, "Approved", None)
        .await;
    let token = e.share_to(&e.a, &s.session_id, &e.b).await;
    assert_eq!(
        e.import_token(&e.b, &token, SessionKind::Business, true)
            .await
            .status,
        201
    );
    e.import_token(&e.b, &token, SessionKind::Business, true)
        .await;
    e.import(
        &e.b,
        json!({ "share_token": "x.y.z", "workflow_id": e.b.workflows.business }),
    )
    .await;
    e.share(
        &e.a,
        &s.session_id,
        json!({ "for_application_id": e.b.application_id, "ttl_in_seconds": 5 }),
    )
    .await;
    e.get("nope", "/v3/sessions/").await;
    let stats = e.control.stats().await.unwrap();
    assert_eq!(stats.shares, 1);
    assert_eq!(stats.imports.len(), 1);
    assert_eq!(stats.imports[0].source_session_id, s.session_id);
    assert_eq!(stats.imports[0].application_id, e.b.application_id);
    assert_eq!(stats.imports[0].count, 1);
    for code in [
        "already_imported",
        "invalid_share_token",
        "invalid_ttl",
        "invalid_api_key",
    ] {
        assert_eq!(stats.rejected(code), 1, "{code}: {:?}", stats.rejections);
    }
    assert_eq!(stats.rejections.values().sum::<u64>(), 4);
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn openapi_describes_every_didit_route() {
    let e = env().await;
    let doc: Value = e
        .http
        .get(format!("{}/openapi.json", e.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    assert_eq!(
        doc["components"]["securitySchemes"]["ApiKeyAuth"],
        json!({"type": "apiKey", "in": "header", "name": "x-api-key"})
    );
    for (path, method) in [
        ("/v3/session/", "post"),
        ("/v3/session/{sessionId}/decision/", "get"),
        ("/v3/session/{sessionId}/update-status/", "patch"),
        ("/v3/session/{sessionId}/delete/", "delete"),
        ("/v3/session/{sessionId}/share/", "post"),
        ("/v3/session/import-shared/", "post"),
        ("/v3/sessions/", "get"),
        ("/v3/webhook/destinations/", "post"),
        ("/v3/webhook/destinations/", "get"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
    }
    let import = &doc["paths"]["/v3/session/import-shared/"]["post"]["responses"];
    for status in ["201", "400", "401", "403", "404", "429"] {
        assert!(import[status].is_object(), "import {status}");
    }
    assert!(
        import["403"].to_string().contains("already_imported")
            && import["403"]
                .to_string()
                .contains("token_not_for_application")
    );
    let unknown = e.get(key(&e.a), "/v3/nothing-here/").await;
    assert_eq!((unknown.status, unknown.code()), (404, "not_found"));
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn fixtures_replace_the_default_applications_and_unknown_fields_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let app_a = uuid::Uuid::new_v4().to_string();
    let app_b = uuid::Uuid::new_v4().to_string();
    let session = uuid::Uuid::new_v4().to_string();
    let fixture = json!({
        "applications": [
            {"name": "fintech-a", "application_id": app_a, "api_key": "fixture-key-a",
             "workflows": {"user": uuid::Uuid::new_v4().to_string(), "business": uuid::Uuid::new_v4().to_string()}},
            {"name": "bank-b", "application_id": app_b, "api_key": "fixture-key-b",
             "workflows": {"user": uuid::Uuid::new_v4().to_string(), "business": uuid::Uuid::new_v4().to_string()},
             "privileges": ["read:sessions", "write:sessions"]}
        ],
        "sessions": [{"application_id": app_a, "session_kind": "user", "status": "Approved",
                      "vendor_data": "user-1", "session_id": session}]
    });
    let path = dir.path().join("fixture.json");
    std::fs::write(&path, serde_json::to_vec(&fixture).unwrap()).unwrap();
    let e = env_with(SandboxOptions {
        fixture: Some(path),
        rate_limit: false,
        ..SandboxOptions::default()
    })
    .await;
    assert_eq!(e.a.application_id, app_a);
    assert_eq!(e.a.api_key.expose(), "fixture-key-a");
    let token = e.share_to(&e.a, &session, &e.b).await;
    assert_eq!(claims(&token)["session_id"], session.as_str());
    e.sandbox.shutdown().await;

    let mut bad = fixture.clone();
    bad["applications"][0]["privilges"] = json!([]);
    let bad_path = dir.path().join("bad.json");
    std::fs::write(&bad_path, serde_json::to_vec(&bad).unwrap()).unwrap();
    let err = Sandbox::start(
        "127.0.0.1:0".parse().unwrap(),
        SandboxOptions {
            fixture: Some(bad_path),
            ..SandboxOptions::default()
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("privilges"), "{err}");
}

// ---- webhooks ------------------------------------------------------------------------------------------------

/// A tiny receiver standing in for a partner's webhook endpoint: records every delivery and answers 500 to the
/// first `fail_first` of them.
#[derive(Clone, Default)]
struct Receiver {
    received: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    fail_first: Arc<Mutex<usize>>,
}

impl Receiver {
    async fn start(fail_first: usize) -> (Receiver, String) {
        let receiver = Receiver::default();
        *receiver.fail_first.lock().unwrap() = fail_first;
        let state = receiver.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move {
                    state.received.lock().unwrap().push((headers, body));
                    let mut fail = state.fail_first.lock().unwrap();
                    if *fail > 0 {
                        *fail -= 1;
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::OK
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, url)
    }

    fn all(&self) -> Vec<(HeaderMap, Bytes)> {
        self.received.lock().unwrap().clone()
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("{name} missing"))
        .to_str()
        .unwrap()
}

/// Checks all three signatures and the timestamp the way a receiver must.
fn assert_signed(secret: &str, headers: &HeaderMap, body: &[u8]) -> Value {
    let value: Value = serde_json::from_slice(body).unwrap();
    assert!(signature::verify_raw(
        secret,
        body,
        header(headers, "x-signature")
    ));
    assert!(signature::verify_v2(
        secret,
        &value,
        header(headers, "x-signature-v2")
    ));
    let timestamp = value["timestamp"].as_i64().unwrap();
    assert_eq!(header(headers, "x-timestamp"), timestamp.to_string());
    assert!(signature::verify_simple(
        secret,
        timestamp,
        value["session_id"].as_str().unwrap(),
        value["status"].as_str().unwrap(),
        value["webhook_type"].as_str().unwrap(),
        header(headers, "x-signature-simple"),
    ));
    assert!(
        (chrono::Utc::now().timestamp() - timestamp).abs() < 300,
        "fresh on the real clock"
    );
    assert_eq!(
        header(headers, "user-agent"),
        "DiditWebhook/2.0 +https://didit.me"
    );
    assert_eq!(header(headers, "content-type"), "application/json");
    value
}

#[tokio::test]
async fn webhooks_are_signed_three_ways_retried_and_recorded() {
    let e = env().await;
    let (receiver, url) = Receiver::start(1).await;
    let secret = "whsec_sandbox_test_secret";
    let destination = e
        .control
        .add_webhook_destination(key(&e.a), &url, Some(secret))
        .await
        .unwrap();
    assert_eq!(
        destination.secret_shared_key.as_ref().map(|s| s.expose()),
        Some(secret)
    );
    assert!(destination.enabled);
    // The list shows the destination without its secret.
    let listed = e.get(key(&e.a), "/v3/webhook/destinations/").await;
    assert_eq!(listed.body[0]["uuid"], destination.uuid.as_str());
    assert!(listed.body[0].get("secret_shared_key").is_none());

    let s = e
        .session(&e.a, SessionKind::User, "Approved", Some("user-ü"))
        .await;
    let received = wait_for("the retried delivery", Duration::from_secs(10), || {
        let r = receiver.all();
        async move { (r.len() >= 2).then_some(r) }
    })
    .await;
    assert_eq!(received[0].1, received[1].1, "a retry sends the same body");
    let (headers, body) = &received[1];
    let value = assert_signed(secret, headers, body);
    assert_eq!(value["session_id"], s.session_id.as_str());
    assert_eq!(value["status"], "Approved");
    assert_eq!(value["webhook_type"], "status.updated");
    assert_eq!(value["session_kind"], "user");
    assert_eq!(value["vendor_data"], "user-ü");
    assert_eq!(value["workflow_id"], e.a.workflows.user.as_str());
    assert!(value["event_id"].is_string() && value["created_at"].is_i64());
    assert!(value["decision"]["id_verifications"].is_array());
    let raw = std::str::from_utf8(body).unwrap();
    assert!(
        raw.contains(".0,") || raw.contains(".0}"),
        "floats stay floats in the raw body"
    );
    assert!(!raw.is_ascii(), "Unicode is sent as UTF-8, not escaped");

    // The V2 signature survives re-serialisation (as a proxy or framework would do); the raw one does not.
    let reserialised = serde_json::to_vec_pretty(&value).unwrap();
    let reparsed: Value = serde_json::from_slice(&reserialised).unwrap();
    assert!(signature::verify_v2(
        secret,
        &reparsed,
        header(headers, "x-signature-v2")
    ));
    assert!(!signature::verify_raw(
        secret,
        &reserialised,
        header(headers, "x-signature")
    ));

    let deliveries = wait_for("the delivery record", Duration::from_secs(5), || {
        let control = e.control.clone();
        async move {
            let d = control.webhook_deliveries().await.unwrap();
            (!d.is_empty()).then_some(d)
        }
    })
    .await;
    assert_eq!(deliveries.len(), 1);
    assert_eq!(
        (
            deliveries[0].attempts,
            deliveries[0].status_code,
            deliveries[0].delivered
        ),
        (2, Some(200), true)
    );
    assert_eq!(deliveries[0].event_id, value["event_id"].as_str().unwrap());

    // Setting the same status again sends nothing; a change sends one more.
    e.control
        .update_status(key(&e.a), &s.session_id, "Approved")
        .await
        .unwrap();
    e.control
        .update_status(key(&e.a), &s.session_id, "Declined")
        .await
        .unwrap();
    let third = wait_for("the status change delivery", Duration::from_secs(5), || {
        let r = receiver.all();
        async move { (r.len() >= 3).then(|| r[2].clone()) }
    })
    .await;
    let changed = assert_signed(secret, &third.0, &third.1);
    assert_eq!(changed["status"], "Declined");
    assert_ne!(changed["event_id"], value["event_id"]);
    wait_for("two delivery records", Duration::from_secs(5), || {
        let control = e.control.clone();
        async move { (control.webhook_deliveries().await.unwrap().len() == 2).then_some(()) }
    })
    .await;
    assert_eq!(
        receiver.all().len(),
        3,
        "the same-status update sent nothing"
    );
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn imports_notify_the_receiving_application_and_kyb_payloads_say_business() {
    let e = env().await;
    let (receiver, url) = Receiver::start(0).await;
    let destination = e
        .control
        .add_webhook_destination(key(&e.b), &url, None)
        .await
        .unwrap();
    let secret = destination
        .secret_shared_key
        .clone()
        .expect("a generated secret");
    assert!(!secret.is_empty());
    let s = e
        .session(&e.a, SessionKind::Business, "APPROVED", Some("company-1"))
        .await;
    let token = e.share_to(&e.a, &s.session_id, &e.b).await;
    let imported = e
        .import_token(&e.b, &token, SessionKind::Business, false)
        .await;
    let (headers, body) = wait_for("the import's webhook", Duration::from_secs(5), || {
        let r = receiver.all();
        async move { r.first().cloned() }
    })
    .await;
    let value = assert_signed(secret.expose(), &headers, &body);
    assert_eq!(value["session_id"], imported.body["session_id"]);
    assert_eq!(value["status"], "IN_REVIEW");
    assert_eq!(value["session_kind"], "business");
    assert_eq!(
        value["decision"]["shared_from_session"],
        s.session_id.as_str()
    );
    assert!(value["decision"]["registry_checks"].is_array());
    e.sandbox.shutdown().await;
}

#[tokio::test]
async fn resending_a_webhook_answers_the_exact_body_and_headers() {
    let e = env().await;
    let (receiver, url) = Receiver::start(0).await;
    let secret = "whsec_resend";
    e.control
        .add_webhook_destination(key(&e.a), &url, Some(secret))
        .await
        .unwrap();
    let s = e.session(&e.a, SessionKind::User, "In Review", None).await;
    wait_for("the first delivery", Duration::from_secs(5), || {
        let n = receiver.all().len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    let sent = e.control.resend_webhook(&s.session_id).await.unwrap();
    assert!(sent.delivered);
    assert_eq!(sent.attempts, 1);
    let all = receiver.all();
    assert_eq!(all.len(), 2);
    let (headers, body) = &all[1];
    assert_eq!(sent.body.as_bytes(), &body[..]);
    for name in [
        "x-signature",
        "x-signature-v2",
        "x-signature-simple",
        "x-timestamp",
    ] {
        assert_eq!(sent.headers[name], header(headers, name), "{name}");
    }
    let first: Value = serde_json::from_slice(&all[0].1).unwrap();
    let again = assert_signed(secret, headers, body);
    assert_eq!(
        again["event_id"], first["event_id"],
        "a resend is the same event"
    );
    assert_eq!(again["status"], "In Review");
    // A session whose application has no destination cannot be re-sent.
    let quiet = e.session(&e.b, SessionKind::User, "Approved", None).await;
    assert!(e.control.resend_webhook(&quiet.session_id).await.is_err());
    e.sandbox.shutdown().await;
}
