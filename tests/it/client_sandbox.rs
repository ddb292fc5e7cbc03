//! The typed Didit client against the sandbox, over real HTTP: every row of both tables of DESIGN.md §4 is
//! produced for real (a revoked key, an unfinished session, a removed workflow, a moved clock, injected faults, a
//! stopped server, …) and must come back as the expected `DiditError` variant and `Disposition`.
//!
//! The one row the sandbox cannot produce is import's "403, anything else → forbidden" (its only 403s are the
//! duplicate, the misrouted token and the missing privilege); `didit_client` covers it against a scripted stub.
//!
//! Where it matters, the sandbox's own counters (`GET /sandbox/stats`) confirm that the situation really happened
//! on the Didit side (the expected error code was answered, an import was or was not made), so a test cannot pass
//! because of an unrelated failure. Each test starts its own sandbox on 127.0.0.1:0, so they run in parallel.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use partner_bridge::config::DiditAccess;
use partner_bridge::didit::client::{DiditClient, DiditError, Disposition};
use partner_bridge::didit::wire::{
    ImportRequest, SessionDecision, SessionKind, ShareResponse, ShareTokenClaims, codes,
};
use partner_bridge::metrics::Metrics;
use partner_bridge::sandbox::{
    ApplicationInfo, Control, FaultEndpoint, FaultSettings, Sandbox, SandboxOptions, SessionInfo,
};
use partner_bridge::secret::{Secret, SecretSource, ShareToken};
use serde_json::Value;

const TTL: u32 = 600;

/// A sandbox with two applications (the issuer and the receiver) and a typed client for each.
struct Env {
    sandbox: Sandbox,
    control: Control,
    issuer: ApplicationInfo,
    receiver: ApplicationInfo,
    issuer_client: DiditClient,
    receiver_client: DiditClient,
    receiver_metrics: Arc<Metrics>,
}

fn access(sandbox: &Sandbox, app: &ApplicationInfo, key: SecretSource) -> DiditAccess {
    DiditAccess {
        base_url: sandbox.base_url(),
        application_id: app.application_id.clone(),
        api_key: key,
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
    }
}

fn client(access: &DiditAccess) -> (DiditClient, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let client = DiditClient::new(access, metrics.clone()).expect("client builds");
    (client, metrics)
}

fn inline(app: &ApplicationInfo) -> SecretSource {
    SecretSource::Inline(app.api_key.clone())
}

async fn start() -> Env {
    let sandbox = Sandbox::start(
        "127.0.0.1:0".parse().unwrap(),
        SandboxOptions {
            default_applications: false,
            ..SandboxOptions::default()
        },
    )
    .await
    .expect("sandbox starts");
    let control = sandbox.control();
    let issuer = control.create_application("issuer").await.unwrap();
    let receiver = control.create_application("receiver").await.unwrap();
    let (issuer_client, _) = client(&access(&sandbox, &issuer, inline(&issuer)));
    let (receiver_client, receiver_metrics) =
        client(&access(&sandbox, &receiver, inline(&receiver)));
    Env {
        sandbox,
        control,
        issuer,
        receiver,
        issuer_client,
        receiver_client,
        receiver_metrics,
    }
}

impl Env {
    async fn session(&self, kind: SessionKind, status: &str) -> SessionInfo {
        self.control
            .create_session(
                &self.issuer.application_id,
                kind,
                status,
                Some("issuer-user-42"),
            )
            .await
            .expect("session created")
    }

    /// A finished session of the issuer, shared with the receiver.
    async fn shared(&self, kind: SessionKind, status: &str) -> (SessionInfo, ShareResponse) {
        let source = self.session(kind, status).await;
        let share = self
            .issuer_client
            .share(&source.session_id, &self.receiver.application_id, TTL)
            .await
            .expect("share succeeds");
        (source, share)
    }

    fn import_request(&self, token: &ShareToken, kind: SessionKind, trust: bool) -> ImportRequest {
        ImportRequest {
            share_token: token.clone(),
            workflow_id: self.receiver.workflows.for_kind(kind).to_string(),
            vendor_data: Some("receiver-user-7".to_string()),
            trust_review: trust,
        }
    }

    async fn import_err(&self, request: &ImportRequest) -> DiditError {
        self.receiver_client
            .import(request)
            .await
            .expect_err("the import should fail")
    }

    async fn share_err(&self, session_id: &str, for_app: &str, ttl: u32) -> DiditError {
        self.issuer_client
            .share(session_id, for_app, ttl)
            .await
            .expect_err("the share should fail")
    }

    /// How many error answers with `code` the sandbox gave.
    async fn rejected(&self, code: &str) -> u64 {
        self.control.stats().await.unwrap().rejected(code)
    }

    async fn import_count(&self, source_session_id: &str) -> u64 {
        self.control
            .stats()
            .await
            .unwrap()
            .import_count(source_session_id, &self.receiver.application_id)
    }
}

/// No secret ever shows in an error's `Display` or `Debug`.
fn assert_no_secret(e: &DiditError, secrets: &[&str]) {
    let text = format!("{e} {e:?}");
    for secret in secrets {
        assert!(!text.contains(secret), "secret leaked into {text}");
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The value of `partner_bridge_didit_requests_total{operation, status}`.
fn requests(metrics: &Metrics, operation: &str, status: &str) -> f64 {
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("partner_bridge_didit_requests_total{"))
        .find(|l| {
            l.contains(&format!("operation=\"{operation}\""))
                && l.contains(&format!("status=\"{status}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

// ---- share: 200 or 201 -------------------------------------------------------------------------------------

#[tokio::test]
async fn share_of_every_finished_status_mints_a_token_for_the_partner() {
    let env = start().await;
    for (kind, status) in [
        (SessionKind::User, "Approved"),
        (SessionKind::User, "Declined"),
        (SessionKind::User, "In Review"),
        (SessionKind::Business, "APPROVED"),
        (SessionKind::Business, "DECLINED"),
        (SessionKind::Business, "IN_REVIEW"),
    ] {
        let source = env.session(kind, status).await;
        let before = unix_now();
        let share = env
            .issuer_client
            .share(&source.session_id, &env.receiver.application_id, TTL)
            .await
            .unwrap_or_else(|e| panic!("{kind} {status}: {e}"));
        assert_eq!(share.for_application_id, env.receiver.application_id);
        assert_eq!(share.session_kind, Some(kind));
        let claims = ShareTokenClaims::peek(share.share_token.expose()).expect("a readable JWT");
        assert_eq!(claims.session_id, source.session_id);
        assert_eq!(claims.session_kind, Some(kind));
        assert_eq!(claims.from_application_id, env.issuer.application_id);
        assert_eq!(claims.for_application_id, env.receiver.application_id);
        assert_eq!(claims.exp - claims.iat, i64::from(TTL));
        assert!(
            (before - 5..=unix_now() + 5).contains(&claims.iat),
            "iat {}",
            claims.iat
        );
    }
    assert_eq!(env.control.stats().await.unwrap().shares, 6);
}

// ---- share: 400 → share_rejected ---------------------------------------------------------------------------

#[tokio::test]
async fn share_refused_with_400_is_dead_lettered_as_share_rejected() {
    let env = start().await;
    let finished = env.session(SessionKind::User, "Approved").await;
    let to_receiver = env.receiver.application_id.clone();
    let expect = |e: DiditError, code: &str| {
        assert!(
            matches!(&e, DiditError::ShareRejected { code: Some(c), .. } if c == code),
            "{code}: {e:?}"
        );
        assert_eq!(
            e.disposition(),
            Disposition::DeadLetter {
                reason: "share_rejected"
            }
        );
        assert_no_secret(&e, &[env.issuer.api_key.expose()]);
    };

    // TTL outside 60..=86400 (the bounds themselves are fine).
    for ttl in [0, 59, 86_401, u32::MAX] {
        expect(
            env.share_err(&finished.session_id, &to_receiver, ttl).await,
            codes::INVALID_TTL,
        );
    }
    for ttl in [60, 86_400] {
        env.issuer_client
            .share(&finished.session_id, &to_receiver, ttl)
            .await
            .unwrap_or_else(|e| panic!("ttl {ttl}: {e}"));
    }

    // Sessions that are not finished, in both casings.
    for (kind, status) in [
        (SessionKind::User, "Not Started"),
        (SessionKind::User, "In Progress"),
        (SessionKind::User, "Abandoned"),
        (SessionKind::User, "Expired"),
        (SessionKind::User, "Resubmitted"),
        (SessionKind::Business, "IN_PROGRESS"),
        (SessionKind::Business, "AWAITING_USER"),
    ] {
        let session = env.session(kind, status).await;
        let e = env.share_err(&session.session_id, &to_receiver, TTL).await;
        assert!(
            e.to_string().contains("Only finished sessions"),
            "{status}: {e}"
        );
        expect(e, codes::SESSION_NOT_FINISHED);
    }

    // A bad application id: the caller itself, one that does not exist, one that was deleted.
    let issuer_app = env.issuer.application_id.clone();
    expect(
        env.share_err(&finished.session_id, &issuer_app, TTL).await,
        codes::INVALID_APPLICATION,
    );
    expect(
        env.share_err(
            &finished.session_id,
            "00000000-0000-4000-8000-000000000000",
            TTL,
        )
        .await,
        codes::INVALID_APPLICATION,
    );
    let gone = env.control.create_application("gone").await.unwrap();
    env.control
        .delete_application(&gone.application_id)
        .await
        .unwrap();
    expect(
        env.share_err(&finished.session_id, &gone.application_id, TTL)
            .await,
        codes::INVALID_APPLICATION,
    );

    let stats = env.control.stats().await.unwrap();
    assert_eq!(stats.rejected(codes::INVALID_TTL), 4);
    assert_eq!(stats.rejected(codes::SESSION_NOT_FINISHED), 7);
    assert_eq!(stats.rejected(codes::INVALID_APPLICATION), 3);
    assert_eq!(stats.shares, 2, "only the two TTLs at the bounds minted");
}

// ---- share: 401/403 about the key → pause ------------------------------------------------------------------

#[tokio::test]
async fn share_with_a_revoked_key_pauses_on_credentials() {
    let env = start().await;
    let session = env.session(SessionKind::User, "Approved").await;
    let old_key = env.issuer.api_key.expose().to_string();
    env.control
        .revoke_key(&env.issuer.application_id)
        .await
        .unwrap();
    let e = env
        .share_err(&session.session_id, &env.receiver.application_id, TTL)
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
    assert_no_secret(&e, &[&old_key]);
    // The pipeline's probe sees the same refusal, so it stays paused until the key is fixed.
    let probe = env.issuer_client.probe().await.unwrap_err();
    assert!(
        matches!(probe, DiditError::ApiKeyRejected { status: 401, .. }),
        "{probe:?}"
    );
    assert_eq!(env.rejected(codes::INVALID_API_KEY).await, 2);
    assert_eq!(env.control.stats().await.unwrap().shares, 0);
}

#[tokio::test]
async fn share_with_a_key_lacking_write_sessions_pauses_on_credentials() {
    let env = start().await;
    let read_only = env
        .control
        .create_application_with_privileges("read-only", &["read:sessions"])
        .await
        .unwrap();
    let session = env
        .control
        .create_session(
            &read_only.application_id,
            SessionKind::User,
            "Approved",
            None,
        )
        .await
        .unwrap();
    let (read_only_client, _) = client(&access(&env.sandbox, &read_only, inline(&read_only)));
    let e = read_only_client
        .share(&session.session_id, &env.receiver.application_id, TTL)
        .await
        .unwrap_err();
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
    assert_eq!(env.rejected(codes::PERMISSION_DENIED).await, 1);
}

// ---- share: 404 → session_not_found ------------------------------------------------------------------------

#[tokio::test]
async fn share_of_an_unknown_session_is_dead_lettered_as_session_not_found() {
    let env = start().await;
    // Another application's session is as unknown to the issuer as one that never existed.
    let foreign = env
        .control
        .create_session(
            &env.receiver.application_id,
            SessionKind::User,
            "Approved",
            None,
        )
        .await
        .unwrap();
    let deleted = env.session(SessionKind::Business, "APPROVED").await;
    env.control
        .delete_session(&deleted.session_id)
        .await
        .unwrap();
    for id in [
        "7d0c6a4e-3b1f-4c2d-9e8f-0a1b2c3d4e5f",
        foreign.session_id.as_str(),
        deleted.session_id.as_str(),
    ] {
        let e = env.share_err(id, &env.receiver.application_id, TTL).await;
        assert!(
            matches!(e, DiditError::SessionNotFound { .. }),
            "{id}: {e:?}"
        );
        assert_eq!(
            e.disposition(),
            Disposition::DeadLetter {
                reason: "session_not_found"
            }
        );
    }
    assert_eq!(env.rejected(codes::SESSION_NOT_FOUND).await, 3);
}

// ---- 429 → wait, then retry (share and import) -------------------------------------------------------------

#[tokio::test]
async fn the_write_limit_is_retried_after_the_wait_didit_asks_for() {
    let env = start().await;
    env.control.settings(true, 1).await.unwrap();
    let session = env.session(SessionKind::User, "Approved").await;
    let first = env
        .issuer_client
        .share(&session.session_id, &env.receiver.application_id, TTL)
        .await
        .expect("the first write fits the window");
    let e = env
        .share_err(&session.session_id, &env.receiver.application_id, TTL)
        .await;
    let after = match &e {
        DiditError::RateLimited {
            retry_after: Some(after),
        } => *after,
        other => panic!("{other:?}"),
    };
    // One write per 60 s sliding window: the wait is what is left of the window, and never nothing.
    assert!(
        after >= Duration::from_secs(1) && after <= Duration::from_secs(61),
        "{after:?}"
    );
    assert_eq!(e.disposition(), Disposition::Retry { after: Some(after) });
    // The limit is per key: the receiver's first write in the window goes through to Didit's rules.
    let imported = env
        .receiver_client
        .import(&env.import_request(&first.share_token, SessionKind::User, false))
        .await
        .expect("another key has its own window");
    assert_eq!(
        imported.shared_from_session.as_deref(),
        Some(session.session_id.as_str())
    );
    assert_eq!(env.rejected(codes::RATE_LIMITED).await, 1);
}

#[tokio::test]
async fn an_injected_429_asks_for_its_retry_after_on_share_and_import() {
    let env = start().await;
    let (source, share) = env.shared(SessionKind::User, "Approved").await;
    for endpoint in [FaultEndpoint::Share, FaultEndpoint::Import] {
        env.control
            .set_faults(FaultSettings {
                endpoint,
                rate_limit_rate: 1.0,
                ..FaultSettings::default()
            })
            .await
            .unwrap();
    }
    let e = env
        .share_err(&source.session_id, &env.receiver.application_id, TTL)
        .await;
    assert!(
        matches!(e, DiditError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(1)),
        "{e:?}"
    );
    assert_eq!(
        e.disposition(),
        Disposition::Retry {
            after: Some(Duration::from_secs(1))
        }
    );
    let e = env
        .import_err(&env.import_request(&share.share_token, SessionKind::User, false))
        .await;
    assert_eq!(
        e.disposition(),
        Disposition::Retry {
            after: Some(Duration::from_secs(1))
        },
        "{e:?}"
    );
    assert_eq!(env.rejected(codes::RATE_LIMITED).await, 2);
    assert_eq!(env.import_count(&source.session_id).await, 0);
    // Once the fault is gone the same token imports: a 429 changed nothing.
    env.control.clear_faults().await.unwrap();
    env.receiver_client
        .import(&env.import_request(&share.share_token, SessionKind::User, false))
        .await
        .unwrap();
    assert_eq!(env.import_count(&source.session_id).await, 1);
}

// ---- 5xx, timeout, connection error → backoff --------------------------------------------------------------

#[tokio::test]
async fn server_errors_are_retried_with_backoff_on_share_and_import() {
    let env = start().await;
    let (source, share) = env.shared(SessionKind::Business, "APPROVED").await;
    env.control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::All,
            error_rate: 1.0,
            ..FaultSettings::default()
        })
        .await
        .unwrap();
    // 500, 502 and 503, with and without a body, are drawn at random: try enough times to meet several.
    for _ in 0..6 {
        let e = env
            .share_err(&source.session_id, &env.receiver.application_id, TTL)
            .await;
        assert!(
            matches!(e, DiditError::Server { status } if (500..=503).contains(&status)),
            "{e:?}"
        );
        assert_eq!(e.disposition(), Disposition::Retry { after: None });
        let e = env
            .import_err(&env.import_request(&share.share_token, SessionKind::Business, true))
            .await;
        assert!(
            matches!(e, DiditError::Server { status } if (500..=503).contains(&status)),
            "{e:?}"
        );
        assert_eq!(e.disposition(), Disposition::Retry { after: None });
        assert_no_secret(
            &e,
            &[share.share_token.expose(), env.receiver.api_key.expose()],
        );
    }
    assert_eq!(env.rejected(codes::INTERNAL_ERROR).await, 12);
    assert_eq!(env.import_count(&source.session_id).await, 0);
}

#[tokio::test]
async fn a_hanging_didit_times_out_and_is_retried() {
    let env = start().await;
    let (source, share) = env.shared(SessionKind::User, "Approved").await;
    env.control
        .set_faults(FaultSettings {
            endpoint: FaultEndpoint::All,
            hang_rate: 1.0,
            ..FaultSettings::default()
        })
        .await
        .unwrap();
    let short = |app: &ApplicationInfo| DiditAccess {
        timeout: Duration::from_millis(300),
        ..access(&env.sandbox, app, inline(app))
    };
    let (issuer, _) = client(&short(&env.issuer));
    let (receiver, metrics) = client(&short(&env.receiver));
    let e = issuer
        .share(&source.session_id, &env.receiver.application_id, TTL)
        .await
        .unwrap_err();
    assert!(matches!(e, DiditError::Timeout), "{e:?}");
    assert_eq!(e.disposition(), Disposition::Retry { after: None });
    let e = receiver
        .import(&env.import_request(&share.share_token, SessionKind::User, false))
        .await
        .unwrap_err();
    assert!(matches!(e, DiditError::Timeout), "{e:?}");
    assert_eq!(e.disposition(), Disposition::Retry { after: None });
    assert_eq!(requests(&metrics, "import", "timeout"), 1.0);
    // Shutting down answers the hung requests; the test does not wait out the hang.
    env.sandbox.shutdown().await;
}

#[tokio::test]
async fn a_stopped_didit_is_a_connection_error_and_is_retried() {
    let env = start().await;
    let (source, share) = env.shared(SessionKind::User, "Approved").await;
    // Both clients have talked to this sandbox, so their pools hold connections that the shutdown closes.
    env.receiver_client.probe().await.unwrap();
    let Env {
        sandbox,
        receiver,
        issuer_client,
        receiver_client,
        receiver_metrics,
        ..
    } = env;
    sandbox.shutdown().await;
    let e = issuer_client
        .share(&source.session_id, &receiver.application_id, TTL)
        .await
        .unwrap_err();
    assert!(matches!(e, DiditError::Connect(_)), "{e:?}");
    assert_eq!(e.disposition(), Disposition::Retry { after: None });
    let request = ImportRequest {
        share_token: share.share_token.clone(),
        workflow_id: receiver.workflows.user.clone(),
        vendor_data: None,
        trust_review: false,
    };
    let e = receiver_client.import(&request).await.unwrap_err();
    assert!(matches!(e, DiditError::Connect(_)), "{e:?}");
    assert_eq!(e.disposition(), Disposition::Retry { after: None });
    assert_no_secret(&e, &[share.share_token.expose(), receiver.api_key.expose()]);
    assert_eq!(requests(&receiver_metrics, "import", "connect_error"), 1.0);
}

// ---- import: 200 or 201 → imported -------------------------------------------------------------------------

/// The feature arrays of a decision by name (aliases included), for comparing a clone with its source.
fn arrays(decision: &SessionDecision, names: &[&str]) -> Vec<(String, Value)> {
    let value = serde_json::to_value(decision).unwrap();
    names
        .iter()
        .map(|name| {
            (
                name.to_string(),
                value.get(*name).cloned().unwrap_or(Value::Null),
            )
        })
        .collect()
}

#[tokio::test]
async fn import_clones_the_decision_for_both_kinds_and_both_trust_settings() {
    let env = start().await;
    let cases = [
        (SessionKind::User, "Approved", false, "In Review"),
        (SessionKind::User, "Approved", true, "Approved"),
        (SessionKind::User, "Declined", true, "Declined"),
        (SessionKind::User, "Declined", false, "In Review"),
        (SessionKind::Business, "APPROVED", false, "IN_REVIEW"),
        (SessionKind::Business, "APPROVED", true, "APPROVED"),
        (SessionKind::Business, "DECLINED", true, "DECLINED"),
        (SessionKind::Business, "IN_REVIEW", true, "IN_REVIEW"),
    ];
    for (kind, status, trust, expected) in cases {
        let what = format!("{kind} {status} trust_review={trust}");
        let (source, share) = env.shared(kind, status).await;
        let request = env.import_request(&share.share_token, kind, trust);
        let imported = env
            .receiver_client
            .import(&request)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_ne!(imported.session_id, source.session_id, "{what}");
        assert!(!imported.session_id.is_empty(), "{what}");
        assert!(imported.session_number.is_some_and(|n| n > 0), "{what}");
        assert_eq!(imported.session_kind, Some(kind), "{what}");
        assert_eq!(imported.kind(), kind, "{what}");
        assert_eq!(imported.status, expected, "{what}");
        assert_eq!(
            imported.shared_from_session.as_deref(),
            Some(source.session_id.as_str()),
            "{what}"
        );
        assert_eq!(
            imported.vendor_data.as_deref(),
            Some("receiver-user-7"),
            "{what}"
        );
        assert_eq!(
            imported.workflow_id.as_deref(),
            Some(env.receiver.workflows.for_kind(kind)),
            "{what}"
        );
        assert_eq!(
            imported.session_url, None,
            "{what}: imported sessions have no flow"
        );

        // Every feature array is the source's, item for item (the source's decision came from the sandbox).
        let names = match kind {
            SessionKind::User => SessionDecision::KYC_ARRAYS,
            SessionKind::Business => SessionDecision::KYB_ARRAYS,
        };
        let cloned = arrays(&imported, names);
        assert_eq!(cloned, arrays(&source.decision, names), "{what}");
        let present = cloned.iter().filter(|(_, v)| v.is_array()).count();
        assert!(present >= 3, "{what}: only {present} arrays were cloned");
        match kind {
            SessionKind::User => {
                assert!(
                    imported
                        .id_verifications
                        .as_ref()
                        .is_some_and(|a| !a.is_empty())
                );
                assert!(
                    imported
                        .face_matches
                        .as_ref()
                        .is_some_and(|a| !a.is_empty())
                );
                assert_eq!(imported.registry_checks, None, "{what}");
            }
            SessionKind::Business => {
                assert!(
                    imported
                        .registry_checks
                        .as_ref()
                        .is_some_and(|a| !a.is_empty())
                );
                assert!(
                    imported
                        .key_people_checks
                        .as_ref()
                        .is_some_and(|a| !a.is_empty())
                );
                assert_eq!(imported.id_verifications, None, "{what}");
            }
        }
        assert_eq!(
            env.import_count(&source.session_id).await,
            1,
            "{what}: exactly one import"
        );
        // The clone is a real session of the receiver, readable with the receiver's key.
        let read = env
            .receiver_client
            .decision(&imported.session_id)
            .await
            .unwrap();
        assert_eq!(read.status, expected, "{what}");
        assert_eq!(read.shared_from_session, imported.shared_from_session);
    }
    assert_eq!(requests(&env.receiver_metrics, "import", "201"), 8.0);
    // vendor_data created the receiver's entities: one person, one company.
    let entities = env
        .control
        .entities(&env.receiver.application_id)
        .await
        .unwrap();
    assert_eq!(entities.len(), 2, "{entities:?}");
}

// ---- import: 403 → duplicate, misrouted, or pause when it is the key ---------------------------------------

#[tokio::test]
async fn importing_the_same_token_twice_is_a_duplicate() {
    let env = start().await;
    for (kind, status) in [
        (SessionKind::User, "Approved"),
        (SessionKind::Business, "APPROVED"),
    ] {
        let (source, share) = env.shared(kind, status).await;
        let request = env.import_request(&share.share_token, kind, true);
        env.receiver_client.import(&request).await.unwrap();
        let e = env.import_err(&request).await;
        assert!(matches!(e, DiditError::AlreadyImported { .. }), "{e:?}");
        assert_eq!(e.disposition(), Disposition::Duplicate);
        assert_no_secret(&e, &[share.share_token.expose()]);
        // A different trust setting or vendor id does not make it a new import.
        let mut again = env.import_request(&share.share_token, kind, false);
        again.vendor_data = None;
        assert_eq!(
            env.import_err(&again).await.disposition(),
            Disposition::Duplicate
        );
        assert_eq!(env.import_count(&source.session_id).await, 1, "{kind}");
    }
    assert_eq!(env.rejected(codes::ALREADY_IMPORTED).await, 4);
}

#[tokio::test]
async fn a_token_for_another_application_is_dead_lettered_as_misrouted() {
    let env = start().await;
    let third = env.control.create_application("third").await.unwrap();
    let source = env.session(SessionKind::User, "Approved").await;
    let share = env
        .issuer_client
        .share(&source.session_id, &third.application_id, TTL)
        .await
        .unwrap();
    let e = env
        .import_err(&env.import_request(&share.share_token, SessionKind::User, false))
        .await;
    assert!(matches!(e, DiditError::NotForApplication { .. }), "{e:?}");
    assert_eq!(
        e.disposition(),
        Disposition::DeadLetter {
            reason: "misrouted"
        }
    );
    assert_no_secret(&e, &[share.share_token.expose()]);
    assert_eq!(env.rejected(codes::TOKEN_NOT_FOR_APPLICATION).await, 1);
    // The application it was minted for can still use it: a misrouted copy spent nothing.
    let (third_client, _) = client(&access(&env.sandbox, &third, inline(&third)));
    let imported = third_client
        .import(&ImportRequest {
            workflow_id: third.workflows.user.clone(),
            ..env.import_request(&share.share_token, SessionKind::User, false)
        })
        .await
        .unwrap();
    assert_eq!(
        imported.shared_from_session.as_deref(),
        Some(source.session_id.as_str())
    );
}

#[tokio::test]
async fn import_with_a_key_lacking_write_sessions_pauses_on_credentials() {
    let env = start().await;
    let read_only = env
        .control
        .create_application_with_privileges("read-only-receiver", &["read:sessions"])
        .await
        .unwrap();
    let source = env.session(SessionKind::User, "Approved").await;
    let share = env
        .issuer_client
        .share(&source.session_id, &read_only.application_id, TTL)
        .await
        .unwrap();
    let (read_only_client, _) = client(&access(&env.sandbox, &read_only, inline(&read_only)));
    let e = read_only_client
        .import(&ImportRequest {
            workflow_id: read_only.workflows.user.clone(),
            ..env.import_request(&share.share_token, SessionKind::User, false)
        })
        .await
        .unwrap_err();
    // Every import would fail the same way until an operator fixes the key: pause, do not dead-letter them all.
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
    assert_eq!(env.rejected(codes::PERMISSION_DENIED).await, 1);
    assert_eq!(env.control.stats().await.unwrap().imports.len(), 0);
}

// ---- import: 401 → reshare, or pause when it is the key ----------------------------------------------------

#[tokio::test]
async fn an_expired_token_asks_the_issuer_for_a_reshare() {
    let env = start().await;
    for (kind, status) in [
        (SessionKind::User, "Approved"),
        (SessionKind::Business, "APPROVED"),
    ] {
        let source = env.session(kind, status).await;
        let share = env
            .issuer_client
            .share(&source.session_id, &env.receiver.application_id, 60)
            .await
            .unwrap();
        env.control.advance_clock(61).await.unwrap();
        let e = env
            .import_err(&env.import_request(&share.share_token, kind, false))
            .await;
        assert!(
            matches!(e, DiditError::TokenRejected { expired: true, .. }),
            "{kind}: {e:?}"
        );
        assert_eq!(e.disposition(), Disposition::Reshare);
        assert_no_secret(&e, &[share.share_token.expose()]);
        // A fresh token for the same session imports: the reshare the disposition asks for works.
        let fresh = env
            .issuer_client
            .share(&source.session_id, &env.receiver.application_id, 60)
            .await
            .unwrap();
        env.receiver_client
            .import(&env.import_request(&fresh.share_token, kind, false))
            .await
            .unwrap();
        assert_eq!(env.import_count(&source.session_id).await, 1);
    }
    assert_eq!(env.rejected(codes::SHARE_TOKEN_EXPIRED).await, 2);
}

/// `token` with its payload replaced by `claims` (the signature no longer matches).
fn forged(token: &str, claims: &ShareTokenClaims) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap());
    format!("{}.{payload}.{}", parts[0], parts[2])
}

#[tokio::test]
async fn a_garbled_token_asks_the_issuer_for_a_reshare() {
    let env = start().await;
    let (source, share) = env.shared(SessionKind::User, "Approved").await;
    let token = share.share_token.expose();
    let claims = ShareTokenClaims::peek(token).unwrap();
    let mut flipped_sig = token.to_string();
    let last = flipped_sig.pop().unwrap();
    flipped_sig.push(if last == 'A' { 'B' } else { 'A' });
    let longer = ShareTokenClaims {
        exp: claims.exp + 86_400,
        ..claims.clone()
    };
    let garbles = [
        "not-a-jwt".to_string(),
        "eyJhbGciOiJIUzI1NiJ9.e30.c2ln".to_string(),
        token[..token.len() / 2].to_string(),
        flipped_sig,
        forged(token, &longer),
    ];
    for garbled in &garbles {
        let e = env
            .import_err(&env.import_request(
                &ShareToken::new(garbled.clone()),
                SessionKind::User,
                false,
            ))
            .await;
        assert!(
            matches!(e, DiditError::TokenRejected { expired: false, .. }),
            "{garbled}: {e:?}"
        );
        assert_eq!(e.disposition(), Disposition::Reshare);
        assert_no_secret(&e, &[garbled, token]);
    }
    assert_eq!(env.rejected(codes::INVALID_SHARE_TOKEN).await, 5);
    // The genuine token was never spent.
    env.receiver_client
        .import(&env.import_request(&share.share_token, SessionKind::User, false))
        .await
        .unwrap();
    assert_eq!(env.import_count(&source.session_id).await, 1);
}

// ---- import: 404 → source_gone or workflow_missing ---------------------------------------------------------

#[tokio::test]
async fn a_deleted_source_session_is_dead_lettered_as_source_gone() {
    let env = start().await;
    for (kind, status) in [
        (SessionKind::User, "Approved"),
        (SessionKind::Business, "DECLINED"),
    ] {
        let (source, share) = env.shared(kind, status).await;
        env.control
            .delete_session(&source.session_id)
            .await
            .unwrap();
        let e = env
            .import_err(&env.import_request(&share.share_token, kind, true))
            .await;
        assert!(matches!(e, DiditError::SourceGone { .. }), "{kind}: {e:?}");
        assert_eq!(
            e.disposition(),
            Disposition::DeadLetter {
                reason: "source_gone"
            }
        );
        assert_eq!(env.import_count(&source.session_id).await, 0);
    }
    assert_eq!(env.rejected(codes::SESSION_NOT_FOUND).await, 2);
}

#[tokio::test]
async fn a_removed_workflow_pauses_the_receiver_and_nothing_is_spent() {
    let env = start().await;
    for kind in [SessionKind::User, SessionKind::Business] {
        let status = if kind == SessionKind::User {
            "Approved"
        } else {
            "APPROVED"
        };
        let (source, share) = env.shared(kind, status).await;
        let request = env.import_request(&share.share_token, kind, false);
        env.control
            .remove_workflow(&env.receiver.application_id, &request.workflow_id)
            .await
            .unwrap();
        let e = env.import_err(&request).await;
        assert!(
            matches!(e, DiditError::WorkflowNotFound { .. }),
            "{kind}: {e:?}"
        );
        assert_eq!(
            e.disposition(),
            Disposition::Pause {
                reason: "workflow_missing"
            }
        );
        // Fixed by configuring an existing workflow: the same token still imports.
        let workflow_id = env
            .control
            .add_workflow(&env.receiver.application_id, kind)
            .await
            .unwrap();
        let imported = env
            .receiver_client
            .import(&ImportRequest {
                workflow_id: workflow_id.clone(),
                ..request
            })
            .await
            .unwrap();
        assert_eq!(imported.workflow_id.as_deref(), Some(workflow_id.as_str()));
        assert_eq!(env.import_count(&source.session_id).await, 1);
    }
    // A workflow of another application is just as missing.
    let (_, share) = env.shared(SessionKind::User, "Approved").await;
    let e = env
        .import_err(&ImportRequest {
            workflow_id: env.issuer.workflows.user.clone(),
            ..env.import_request(&share.share_token, SessionKind::User, false)
        })
        .await;
    assert!(matches!(e, DiditError::WorkflowNotFound { .. }), "{e:?}");
    assert_eq!(env.rejected(codes::WORKFLOW_NOT_FOUND).await, 3);
}

// ---- import: 400 → rejected --------------------------------------------------------------------------------

#[tokio::test]
async fn a_workflow_of_the_other_kind_is_dead_lettered_as_rejected() {
    let env = start().await;
    for (kind, status, other) in [
        (SessionKind::User, "Approved", SessionKind::Business),
        (SessionKind::Business, "APPROVED", SessionKind::User),
    ] {
        let (source, share) = env.shared(kind, status).await;
        let request = ImportRequest {
            workflow_id: env.receiver.workflows.for_kind(other).to_string(),
            ..env.import_request(&share.share_token, kind, false)
        };
        let e = env.import_err(&request).await;
        assert!(
            matches!(&e, DiditError::ImportRejected { code: Some(c), .. } if c == codes::WORKFLOW_KIND_MISMATCH),
            "{kind}: {e:?}"
        );
        assert_eq!(
            e.disposition(),
            Disposition::DeadLetter { reason: "rejected" }
        );
        assert_eq!(env.import_count(&source.session_id).await, 0);
    }
    assert_eq!(env.rejected(codes::WORKFLOW_KIND_MISMATCH).await, 2);
}

// ---- import: the receiver's key ----------------------------------------------------------------------------

fn write_key(path: &Path, key: &Secret) {
    // Written the way a mounted secret usually is: with a trailing newline.
    std::fs::write(path, format!("{}\n", key.expose())).unwrap();
}

#[tokio::test]
async fn a_revoked_receiver_key_pauses_and_a_reloaded_key_resumes() {
    let env = start().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("didit-api-key");
    write_key(&key_file, &env.receiver.api_key);
    let (receiver, _) = client(&access(
        &env.sandbox,
        &env.receiver,
        SecretSource::File(key_file.clone()),
    ));
    receiver.probe().await.expect("the key from the file works");

    let (source, share) = env.shared(SessionKind::User, "Approved").await;
    let request = env.import_request(&share.share_token, SessionKind::User, true);
    let new_key = env
        .control
        .revoke_key(&env.receiver.application_id)
        .await
        .unwrap();
    let e = receiver.import(&request).await.unwrap_err();
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
    assert_no_secret(
        &e,
        &[
            env.receiver.api_key.expose(),
            new_key.expose(),
            share.share_token.expose(),
        ],
    );
    let probe = receiver.probe().await.unwrap_err();
    assert!(
        matches!(probe, DiditError::ApiKeyRejected { status: 401, .. }),
        "{probe:?}"
    );
    assert!(
        !receiver.reload_key().unwrap(),
        "the file has not changed yet"
    );

    // The operator rotates the secret file; the pipeline reloads it and its probe passes again.
    write_key(&key_file, &new_key);
    assert!(receiver.reload_key().unwrap(), "the new key was picked up");
    receiver.probe().await.expect("the new key is accepted");
    let imported = receiver
        .import(&request)
        .await
        .expect("the paused import goes through");
    assert_eq!(imported.status, "Approved");
    assert_eq!(env.import_count(&source.session_id).await, 1);
    assert_eq!(env.rejected(codes::INVALID_API_KEY).await, 2);
    assert!(!format!("{receiver:?}").contains(new_key.expose()));
}
