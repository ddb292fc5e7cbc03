//! The Didit client against a scripted HTTP stub: every row of DESIGN.md §4's two tables becomes the expected
//! `DiditError` and `Disposition`, the key travels in `x-api-key` and can be rotated, every call is counted, and no
//! error or `Debug` output ever shows the key or a share token.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use partner_bridge::config::DiditAccess;
use partner_bridge::didit::client::{DiditClient, DiditError, Disposition};
use partner_bridge::didit::wire::{ImportRequest, SessionKind, codes};
use partner_bridge::metrics::Metrics;
use partner_bridge::secret::{Secret, SecretSource, ShareToken};
use serde_json::json;

use crate::support::stub_didit::{Reply, Route, StubDidit};

const APP: &str = "0b6f3a52-8f7e-4b59-9a43-5d1f0c2e7a11";
const ISSUER_APP: &str = "c3d2e1f0-1a2b-4c3d-8e4f-5a6b7c8d9e0f";
const OTHER_APP: &str = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d";
const SESSION: &str = "20bb3c3b-6146-439f-84a4-bd30d00ac6a2";
const WORKFLOW: &str = "9f9b1234-aaaa-4bbb-8ccc-1234567890ab";
const KEY: &str = "sk_test_stub_key_0123456789";

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A JWT-shaped share token with real claims (the signature is not checked by anyone here).
fn token(for_application_id: &str, expires_in: i64) -> String {
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let now = unix_now();
    format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(json!({"alg": "HS256", "typ": "JWT"})),
        b64(json!({
            "session_id": SESSION, "session_kind": "user", "from_application_id": ISSUER_APP,
            "for_application_id": for_application_id, "iat": now - 60, "exp": now + expires_in,
        }))
    )
}

fn access(base_url: &str, key: SecretSource, timeout: Duration) -> DiditAccess {
    DiditAccess {
        base_url: base_url.to_string(),
        application_id: APP.to_string(),
        api_key: key,
        timeout,
        connect_timeout: Duration::from_secs(2),
    }
}

fn client_for(stub: &StubDidit) -> (DiditClient, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let client = DiditClient::new(
        &access(
            &stub.url(),
            SecretSource::Inline(Secret::new(KEY)),
            Duration::from_secs(5),
        ),
        metrics.clone(),
    )
    .expect("client");
    (client, metrics)
}

fn import_request(token: &str) -> ImportRequest {
    ImportRequest {
        share_token: ShareToken::new(token),
        workflow_id: WORKFLOW.into(),
        vendor_data: Some("receiver-user-7".into()),
        trust_review: false,
    }
}

fn share_ok(status: u16, token: &str) -> Reply {
    Reply::json(
        status,
        json!({"share_token": token, "for_application_id": OTHER_APP, "session_kind": "user"}),
    )
}

fn imported(status: u16) -> Reply {
    Reply::json(
        status,
        json!({
            "session_id": "11111111-2222-4333-8444-555555555555", "session_number": 43762, "session_kind": "user",
            "status": "In Review", "shared_from_session": SESSION, "vendor_data": "receiver-user-7",
            "workflow_id": WORKFLOW, "session_url": null,
            "id_verifications": [{"node_id": "n1", "status": "Approved", "document_type": "Passport"}],
            "face_matches": [{"status": "Approved", "score": 91.5}],
        }),
    )
}

async fn share_err(stub: &StubDidit, client: &DiditClient, reply: Reply) -> DiditError {
    stub.set(Route::Share, reply);
    client
        .share(SESSION, OTHER_APP, 600)
        .await
        .expect_err("the share should fail")
}

async fn import_err(
    stub: &StubDidit,
    client: &DiditClient,
    reply: Reply,
    token: &str,
) -> DiditError {
    stub.set(Route::Import, reply);
    client
        .import(&import_request(token))
        .await
        .expect_err("the import should fail")
}

/// The value of the sample `name{labels…}` in Prometheus text, where every `label="value"` pair is present.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn requests(metrics: &Metrics, operation: &str, status: &str) -> f64 {
    sample(
        &metrics.encode(),
        "partner_bridge_didit_requests_total",
        &[("operation", operation), ("status", status)],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn share_200_and_201_are_success_and_send_the_documented_request() {
    let stub = StubDidit::start().await;
    let (client, _) = client_for(&stub);
    let minted = token(OTHER_APP, 3600);
    for status in [201, 200, 202] {
        stub.set(Route::Share, share_ok(status, &minted));
        let answer = client
            .share(SESSION, OTHER_APP, 600)
            .await
            .expect("share succeeds");
        assert_eq!(answer.share_token.expose(), minted);
        assert_eq!(answer.for_application_id, OTHER_APP);
        assert_eq!(answer.session_kind, Some(SessionKind::User));
    }
    let sent = stub.last(Route::Share);
    assert_eq!(sent.method, "POST");
    assert_eq!(sent.path, format!("/v3/session/{SESSION}/share/"));
    assert_eq!(sent.header("x-api-key").as_deref(), Some(KEY));
    assert_eq!(
        sent.header("content-type").as_deref(),
        Some("application/json")
    );
    let agent = sent.header("user-agent").unwrap_or_default();
    assert!(agent.starts_with("partner-bridge/"), "{agent}");
    assert_eq!(
        sent.json(),
        json!({"for_application_id": OTHER_APP, "ttl_in_seconds": 600})
    );
}

#[tokio::test]
async fn share_failures_follow_the_share_table() {
    let stub = StubDidit::start().await;
    let (client, _) = client_for(&stub);

    let e = share_err(
        &stub,
        &client,
        Reply::error(
            400,
            codes::SESSION_NOT_FINISHED,
            "Only finished sessions can be shared.",
        ),
    )
    .await;
    assert!(
        matches!(&e, DiditError::ShareRejected { code: Some(c), .. } if c == codes::SESSION_NOT_FINISHED),
        "{e:?}"
    );
    assert_eq!(
        e.disposition(),
        Disposition::DeadLetter {
            reason: "share_rejected"
        }
    );

    let e = share_err(
        &stub,
        &client,
        Reply::error(401, codes::INVALID_API_KEY, "Invalid or missing API key"),
    )
    .await;
    assert!(
        matches!(e, DiditError::ApiKeyRejected { status: 401, .. }),
        "{e:?}"
    );
    assert_eq!(
        e.disposition(),
        Disposition::Pause {
            reason: "credentials"
        }
    );

    let e = share_err(
        &stub,
        &client,
        Reply::error(403, codes::PERMISSION_DENIED, "You do not have permission."),
    )
    .await;
    assert!(
        matches!(e, DiditError::ApiKeyRejected { status: 403, .. }),
        "{e:?}"
    );
    assert_eq!(
        e.disposition(),
        Disposition::Pause {
            reason: "credentials"
        }
    );

    let e = share_err(&stub, &client, Reply::detail(404, "Not found.")).await;
    assert!(matches!(e, DiditError::SessionNotFound { .. }), "{e:?}");
    assert_eq!(
        e.disposition(),
        Disposition::DeadLetter {
            reason: "session_not_found"
        }
    );

    let e = share_err(
        &stub,
        &client,
        Reply::error(500, codes::INTERNAL_ERROR, "boom"),
    )
    .await;
    assert!(matches!(e, DiditError::Server { status: 500 }), "{e:?}");
    assert_eq!(e.disposition(), Disposition::Retry { after: None });

    let e = share_err(&stub, &client, Reply::empty(502)).await;
    assert!(matches!(e, DiditError::Server { status: 502 }), "{e:?}");
    assert_eq!(e.disposition(), Disposition::Retry { after: None });

    let e = share_err(
        &stub,
        &client,
        Reply::text(503, "<html>upstream unavailable</html>"),
    )
    .await;
    assert!(matches!(e, DiditError::Server { status: 503 }), "{e:?}");

    // A success whose body cannot be read: retried (a second share is harmless), never taken for a token.
    let e = share_err(&stub, &client, Reply::text(201, "created")).await;
    assert!(
        matches!(e, DiditError::Unexpected { status: 201, .. }),
        "{e:?}"
    );
    assert_eq!(e.disposition(), Disposition::Retry { after: None });

    // A token that is empty or names another partner is never handed over.
    let e = share_err(&stub, &client, share_ok(201, "")).await;
    assert!(
        matches!(e, DiditError::Unexpected { status: 201, .. }),
        "{e:?}"
    );
    let wrong = Reply::json(
        201,
        json!({"share_token": token(APP, 3600), "for_application_id": APP}),
    );
    let e = share_err(&stub, &client, wrong).await;
    assert!(
        matches!(e, DiditError::Unexpected { status: 201, .. }),
        "{e:?}"
    );
    assert_eq!(e.disposition(), Disposition::Retry { after: None });

    // Redirects are not followed (the key would travel with them).
    let e = share_err(
        &stub,
        &client,
        Reply::empty(301).header("location", "http://127.0.0.1:1/elsewhere"),
    )
    .await;
    assert!(
        matches!(e, DiditError::Unexpected { status: 301, .. }),
        "{e:?}"
    );
    assert_eq!(
        e.disposition(),
        Disposition::Pause {
            reason: "credentials"
        }
    );
}

#[tokio::test]
async fn share_429_waits_as_told() {
    let stub = StubDidit::start().await;
    let (client, _) = client_for(&stub);
    let wait = |e: &DiditError| match (e, e.disposition()) {
        (DiditError::RateLimited { retry_after }, Disposition::Retry { after }) => {
            assert_eq!(*retry_after, after);
            after
        }
        _ => panic!("expected a rate limit, got {e:?}"),
    };

    let e = share_err(
        &stub,
        &client,
        Reply::error(429, codes::RATE_LIMITED, "slow down").header("retry-after", "3"),
    )
    .await;
    assert_eq!(wait(&e), Some(Duration::from_secs(3)));

    let at = chrono::Utc::now() + chrono::Duration::seconds(30);
    let date = at.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    let e = share_err(
        &stub,
        &client,
        Reply::empty(429).header("retry-after", &date),
    )
    .await;
    let after = wait(&e).expect("a wait from the HTTP date");
    assert!(
        after <= Duration::from_secs(30) && after > Duration::ZERO,
        "{after:?}"
    );

    let reset = (unix_now() + 20).to_string();
    let e = share_err(
        &stub,
        &client,
        Reply::empty(429)
            .header("x-ratelimit-reset", &reset)
            .header("x-ratelimit-limit", "300")
            .header("x-ratelimit-remaining", "0"),
    )
    .await;
    let after = wait(&e).expect("a wait from X-RateLimit-Reset");
    assert!(
        after <= Duration::from_secs(20) && after > Duration::ZERO,
        "{after:?}"
    );

    let e = share_err(&stub, &client, Reply::empty(429)).await;
    assert_eq!(wait(&e), None);
}

#[tokio::test]
async fn share_timeout_and_refused_connection_are_retried() {
    let stub = StubDidit::start().await;
    let metrics = Arc::new(Metrics::new());
    let client = DiditClient::new(
        &access(
            &stub.url(),
            SecretSource::Inline(Secret::new(KEY)),
            Duration::from_millis(300),
        ),
        metrics.clone(),
    )
    .unwrap();
    let e = share_err(&stub, &client, Reply::hang()).await;
    assert!(matches!(e, DiditError::Timeout), "{e:?}");
    assert_eq!(e.disposition(), Disposition::Retry { after: None });
    assert_eq!(requests(&metrics, "share", "timeout"), 1.0);

    // A port nobody listens on: bind one, learn it, let it go.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let refused = DiditClient::new(
        &access(
            &format!("http://{closed}"),
            SecretSource::Inline(Secret::new(KEY)),
            Duration::from_secs(2),
        ),
        metrics.clone(),
    )
    .unwrap();
    let e = refused
        .share(SESSION, OTHER_APP, 600)
        .await
        .expect_err("nobody listens");
    assert!(matches!(e, DiditError::Connect(_)), "{e:?}");
    assert_eq!(e.disposition(), Disposition::Retry { after: None });
    assert!(
        !e.to_string().contains(SESSION),
        "the URL stays out of the error: {e}"
    );
    assert!(e.to_string().contains("refused"), "the cause is kept: {e}");
    assert_eq!(requests(&metrics, "share", "connect_error"), 1.0);
}

#[tokio::test]
async fn import_201_and_200_are_success() {
    let stub = StubDidit::start().await;
    let (client, _) = client_for(&stub);
    let jwt = token(APP, 3600);
    for status in [201, 200] {
        stub.set(Route::Import, imported(status));
        let decision = client
            .import(&import_request(&jwt))
            .await
            .expect("import succeeds");
        assert_eq!(decision.session_number, Some(43762));
        assert_eq!(decision.shared_from_session.as_deref(), Some(SESSION));
        assert_eq!(decision.kind(), SessionKind::User);
        assert_eq!(decision.status, "In Review");
        assert_eq!(decision.id_verifications.as_ref().map(Vec::len), Some(1));
    }
    let sent = stub.last(Route::Import);
    assert_eq!(sent.method, "POST");
    assert_eq!(sent.path, "/v3/session/import-shared/");
    assert_eq!(sent.header("x-api-key").as_deref(), Some(KEY));
    assert_eq!(
        sent.json(),
        json!({"share_token": jwt, "workflow_id": WORKFLOW, "vendor_data": "receiver-user-7", "trust_review": false})
    );
}

#[tokio::test]
async fn import_403_is_told_apart_by_code_then_detail_then_claim() {
    let stub = StubDidit::start().await;
    let (client, _) = client_for(&stub);
    let ours = token(APP, 3600);
    let theirs = token(OTHER_APP, 3600);

    let e = import_err(
        &stub,
        &client,
        Reply::error(403, codes::ALREADY_IMPORTED, "Session already imported."),
        &ours,
    )
    .await;
    assert!(matches!(e, DiditError::AlreadyImported { .. }), "{e:?}");
    assert_eq!(e.disposition(), Disposition::Duplicate);

    let e = import_err(
        &stub,
        &client,
        Reply::error(403, codes::TOKEN_NOT_FOR_APPLICATION, "Wrong app."),
        &ours,
    )
    .await;
    assert!(matches!(e, DiditError::NotForApplication { .. }), "{e:?}");
    assert_eq!(
        e.disposition(),
        Disposition::DeadLetter {
            reason: "misrouted"
        }
    );

    let e = import_err(
        &stub,
        &client,
        Reply::error(403, "source_session_locked", "No."),
        &ours,
    )
    .await;
    assert!(matches!(e, DiditError::Forbidden { .. }), "{e:?}");
    assert_eq!(
        e.disposition(),
        Disposition::DeadLetter {
            reason: "forbidden"
        }
    );

    let e = import_err(
        &stub,
        &client,
        Reply::error(403, codes::PERMISSION_DENIED, "No."),
        &ours,
    )
    .await;
    assert!(
        matches!(e, DiditError::ApiKeyRejected { status: 403, .. }),
        "{e:?}"
    );
    assert_eq!(
        e.disposition(),
        Disposition::Pause {
            reason: "credentials"
        }
    );

    let e = import_err(
        &stub,
        &client,
        Reply::detail(403, "This session has already been imported."),
        &ours,
    )
    .await;
    assert!(matches!(e, DiditError::AlreadyImported { .. }), "{e:?}");
    assert_eq!(e.disposition(), Disposition::Duplicate);

    let e = import_err(
        &stub,
        &client,
        Reply::detail(403, "Token not intended for your application."),
        &ours,
    )
    .await;
    assert!(matches!(e, DiditError::NotForApplication { .. }), "{e:?}");

    // A bare 403: the token's own claim decides.
    let e = import_err(&stub, &client, Reply::empty(403), &theirs).await;
    assert!(matches!(e, DiditError::NotForApplication { .. }), "{e:?}");
    assert_eq!(
        e.disposition(),
        Disposition::DeadLetter {
            reason: "misrouted"
        }
    );
    let e = import_err(&stub, &client, Reply::empty(403), &ours).await;
    assert!(matches!(e, DiditError::Forbidden { .. }), "{e:?}");
    assert_eq!(
        e.disposition(),
        Disposition::DeadLetter {
            reason: "forbidden"
        }
    );

    // None of these needed to ask Didit anything else.
    assert_eq!(stub.count(Route::Probe), 0);
}

#[tokio::test]
async fn import_401_by_code() {
    let stub = StubDidit::start().await;
    let (client, _) = client_for(&stub);
    let jwt = token(APP, 3600);

    let e = import_err(
        &stub,
        &client,
        Reply::error(401, codes::INVALID_API_KEY, "Invalid API key"),
        &jwt,
    )
    .await;
    assert!(
        matches!(e, DiditError::ApiKeyRejected { status: 401, .. }),
        "{e:?}"
    );
    assert_eq!(
        e.disposition(),
        Disposition::Pause {
            reason: "credentials"
        }
    );

    let e = import_err(
        &stub,
        &client,
        Reply::error(401, codes::INVALID_SHARE_TOKEN, "Bad token"),
        &jwt,
    )
    .await;
    assert!(
        matches!(e, DiditError::TokenRejected { expired: false, .. }),
        "{e:?}"
    );
    assert_eq!(e.disposition(), Disposition::Reshare);

    let e = import_err(
        &stub,
        &client,
        Reply::error(401, codes::SHARE_TOKEN_EXPIRED, "Expired"),
        &jwt,
    )
    .await;
    assert!(
        matches!(e, DiditError::TokenRejected { expired: true, .. }),
        "{e:?}"
    );
    assert_eq!(e.disposition(), Disposition::Reshare);

    assert_eq!(stub.count(Route::Probe), 0);
}

#[tokio::test]
async fn ambiguous_import_401_probes_the_key_once() {
    let stub = StubDidit::start().await;
    let (client, metrics) = client_for(&stub);

    // The key is accepted: the token was refused (and the claim says whether it had expired).
    stub.set(
        Route::Probe,
        Reply::json(
            200,
            json!({"count": 0, "next": null, "previous": null, "results": []}),
        ),
    );
    let e = import_err(&stub, &client, Reply::empty(401), &token(APP, 3600)).await;
    assert!(
        matches!(e, DiditError::TokenRejected { expired: false, .. }),
        "{e:?}"
    );
    assert_eq!(e.disposition(), Disposition::Reshare);
    assert_eq!(stub.count(Route::Probe), 1);
    let probe = stub.last(Route::Probe);
    assert_eq!(probe.query.as_deref(), Some("limit=1"));
    assert_eq!(probe.header("x-api-key").as_deref(), Some(KEY));

    let e = import_err(
        &stub,
        &client,
        Reply::detail(401, "Unauthorized"),
        &token(APP, -5),
    )
    .await;
    assert!(
        matches!(e, DiditError::TokenRejected { expired: true, .. }),
        "{e:?}"
    );
    assert_eq!(stub.count(Route::Probe), 2);

    // The key is refused: the 401 was about the key.
    stub.set(
        Route::Probe,
        Reply::error(401, codes::INVALID_API_KEY, "Invalid or missing API key"),
    );
    let e = import_err(&stub, &client, Reply::empty(401), &token(APP, 3600)).await;
    assert!(
        matches!(e, DiditError::ApiKeyRejected { status: 401, .. }),
        "{e:?}"
    );
    assert_eq!(
        e.disposition(),
        Disposition::Pause {
            reason: "credentials"
        }
    );
    assert_eq!(stub.count(Route::Probe), 3);

    // The probe cannot tell: nothing is guessed, the import is retried.
    stub.set(Route::Probe, Reply::empty(503));
    let e = import_err(&stub, &client, Reply::empty(401), &token(APP, 3600)).await;
    assert!(matches!(e, DiditError::Server { status: 503 }), "{e:?}");
    assert_eq!(e.disposition(), Disposition::Retry { after: None });

    assert_eq!(requests(&metrics, "import", "401"), 4.0);
    assert_eq!(requests(&metrics, "probe", "200"), 2.0);
    assert_eq!(requests(&metrics, "probe", "401"), 1.0);
    assert_eq!(requests(&metrics, "probe", "503"), 1.0);
}

#[tokio::test]
async fn import_404_400_429_and_5xx() {
    let stub = StubDidit::start().await;
    let (client, _) = client_for(&stub);
    let jwt = token(APP, 3600);

    let e = import_err(
        &stub,
        &client,
        Reply::error(404, codes::SESSION_NOT_FOUND, "Gone."),
        &jwt,
    )
    .await;
    assert!(matches!(e, DiditError::SourceGone { .. }), "{e:?}");
    assert_eq!(
        e.disposition(),
        Disposition::DeadLetter {
            reason: "source_gone"
        }
    );

    let e = import_err(
        &stub,
        &client,
        Reply::error(404, codes::WORKFLOW_NOT_FOUND, "No workflow."),
        &jwt,
    )
    .await;
    assert!(matches!(e, DiditError::WorkflowNotFound { .. }), "{e:?}");
    assert_eq!(
        e.disposition(),
        Disposition::Pause {
            reason: "workflow_missing"
        }
    );

    let e = import_err(
        &stub,
        &client,
        Reply::detail(404, "Original session no longer exists."),
        &jwt,
    )
    .await;
    assert!(matches!(e, DiditError::SourceGone { .. }), "{e:?}");

    let e = import_err(
        &stub,
        &client,
        Reply::detail(404, "workflow_id not found in your application."),
        &jwt,
    )
    .await;
    assert!(matches!(e, DiditError::WorkflowNotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("workflow"), "{e}");

    let e = import_err(
        &stub,
        &client,
        Reply::error(
            400,
            codes::WORKFLOW_KIND_MISMATCH,
            "KYB token, KYC workflow",
        ),
        &jwt,
    )
    .await;
    assert!(
        matches!(&e, DiditError::ImportRejected { code: Some(c), .. } if c == codes::WORKFLOW_KIND_MISMATCH),
        "{e:?}"
    );
    assert_eq!(
        e.disposition(),
        Disposition::DeadLetter { reason: "rejected" }
    );

    let e = import_err(
        &stub,
        &client,
        Reply::empty(429).header("retry-after", "4"),
        &jwt,
    )
    .await;
    assert_eq!(
        e.disposition(),
        Disposition::Retry {
            after: Some(Duration::from_secs(4))
        }
    );

    for status in [500, 502, 504] {
        let e = import_err(&stub, &client, Reply::empty(status), &jwt).await;
        assert!(
            matches!(e, DiditError::Server { status: s } if s == status),
            "{e:?}"
        );
        assert_eq!(e.disposition(), Disposition::Retry { after: None });
    }
}

#[tokio::test]
async fn decision_reads_the_session_and_404s_are_session_not_found() {
    let stub = StubDidit::start().await;
    let (client, _) = client_for(&stub);
    stub.set(
        Route::Decision,
        Reply::json(
            200,
            json!({"session_id": SESSION, "session_kind": "business", "status": "APPROVED",
                   "registry_checks": [{"status": "Approved"}], "some_new_field": 1}),
        ),
    );
    let decision = client.decision(SESSION).await.expect("decision");
    assert_eq!(decision.kind(), SessionKind::Business);
    assert_eq!(
        decision.parsed_status().map(|s| s.is_finished()),
        Some(true)
    );
    let sent = stub.last(Route::Decision);
    assert_eq!(sent.path, format!("/v3/session/{SESSION}/decision/"));
    assert_eq!(sent.header("x-api-key").as_deref(), Some(KEY));

    stub.set(Route::Decision, Reply::detail(404, "Not found."));
    let e = client.decision(SESSION).await.expect_err("404");
    assert!(matches!(e, DiditError::SessionNotFound { .. }), "{e:?}");

    stub.set(Route::Probe, Reply::json(200, json!({"results": []})));
    client.probe().await.expect("the key is accepted");
    stub.set(
        Route::Probe,
        Reply::error(403, codes::PERMISSION_DENIED, "no"),
    );
    let e = client.probe().await.expect_err("refused");
    assert!(
        matches!(e, DiditError::ApiKeyRejected { status: 403, .. }),
        "{e:?}"
    );
}

#[tokio::test]
async fn reload_key_picks_up_a_changed_key_file() {
    let stub = StubDidit::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("didit-api-key");
    std::fs::write(&path, "sk_first_key_aaaa\n").unwrap();
    let client = DiditClient::new(
        &access(
            &stub.url(),
            SecretSource::File(path.clone()),
            Duration::from_secs(5),
        ),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    stub.set(Route::Probe, Reply::json(200, json!({"results": []})));

    client.probe().await.unwrap();
    assert_eq!(
        stub.last(Route::Probe).header("x-api-key").as_deref(),
        Some("sk_first_key_aaaa")
    );
    assert!(!client.reload_key().unwrap(), "same file, same key");

    std::fs::write(&path, "sk_second_key_bbbb\n").unwrap();
    assert!(
        client.reload_key().unwrap(),
        "a changed file is a changed key"
    );
    assert!(!client.reload_key().unwrap());
    let clone = client.clone();
    clone.probe().await.unwrap();
    assert_eq!(
        stub.last(Route::Probe).header("x-api-key").as_deref(),
        Some("sk_second_key_bbbb")
    );

    // A broken file is an error, and the last good key stays in use.
    std::fs::write(&path, "").unwrap();
    assert!(client.reload_key().is_err());
    std::fs::remove_file(&path).unwrap();
    let e = client.reload_key().unwrap_err();
    assert!(!e.to_string().contains("sk_second"), "{e}");
    client.probe().await.unwrap();
    assert_eq!(
        stub.last(Route::Probe).header("x-api-key").as_deref(),
        Some("sk_second_key_bbbb")
    );

    // An inline key has nothing to reload.
    let (inline, _) = client_for(&stub);
    assert!(!inline.reload_key().unwrap());
}

#[tokio::test]
async fn every_call_is_counted_by_operation_and_status() {
    let stub = StubDidit::start().await;
    let (client, metrics) = client_for(&stub);
    stub.set(Route::Share, share_ok(201, &token(OTHER_APP, 3600)));
    client.share(SESSION, OTHER_APP, 600).await.unwrap();
    client.share(SESSION, OTHER_APP, 600).await.unwrap();
    stub.set(Route::Share, Reply::empty(502));
    let _ = client.share(SESSION, OTHER_APP, 600).await;
    stub.set(
        Route::Import,
        Reply::error(403, codes::ALREADY_IMPORTED, "dup"),
    );
    let _ = client.import(&import_request(&token(APP, 3600))).await;
    stub.set(Route::Decision, Reply::empty(404));
    let _ = client.decision(SESSION).await;

    assert_eq!(requests(&metrics, "share", "201"), 2.0);
    assert_eq!(requests(&metrics, "share", "502"), 1.0);
    assert_eq!(requests(&metrics, "import", "403"), 1.0);
    assert_eq!(requests(&metrics, "decision", "404"), 1.0);
    let text = metrics.encode();
    let count = sample(
        &text,
        "partner_bridge_didit_request_duration_seconds_count",
        &[("operation", "share")],
    );
    assert_eq!(count, Some(3.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "partner_bridge_didit_request_duration_seconds_count",
            &[("operation", "import")]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn neither_the_key_nor_the_token_ever_shows() {
    let stub = StubDidit::start().await;
    let (client, _) = client_for(&stub);
    let jwt = token(APP, 3600);
    let debug = format!("{client:?}");
    assert!(!debug.contains(KEY), "{debug}");

    // A Didit that echoes what it was sent, in every kind of answer.
    let echo = format!("you sent key {KEY} and token {jwt}");
    let mut errors = Vec::new();
    for reply in [
        Reply::detail(400, &echo),
        Reply::detail(401, &echo),
        Reply::detail(401, &format!("share token {jwt} invalid")),
        Reply::error(401, codes::INVALID_API_KEY, &echo),
        Reply::detail(403, &echo),
        Reply::error(403, codes::PERMISSION_DENIED, &echo),
        Reply::detail(404, &echo),
        Reply::detail(429, &echo),
        Reply::text(500, &echo),
        Reply::text(418, &echo),
        Reply::json(201, json!({ "session_id": 5, "status": jwt, "note": echo })),
        Reply::text(201, &echo),
    ] {
        stub.set(Route::Probe, Reply::json(200, json!({"results": []})));
        errors.push(import_err(&stub, &client, reply, &jwt).await);
    }
    for reply in [
        Reply::detail(400, &echo),
        Reply::detail(403, &echo),
        Reply::json(200, json!({ "share_token": 1, "x": jwt })),
    ] {
        errors.push(share_err(&stub, &client, reply).await);
    }
    for e in &errors {
        for text in [format!("{e}"), format!("{e:?}")] {
            assert!(!text.contains(KEY), "key in {text}");
            assert!(!text.contains(&jwt), "token in {text}");
            assert!(!text.contains("eyJ"), "JWT-looking text in {text}");
        }
    }
    // The texts are still useful: they say what happened.
    assert!(
        errors[0].to_string().contains("<redacted>"),
        "{}",
        errors[0]
    );
}
