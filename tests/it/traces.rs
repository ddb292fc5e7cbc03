//! Trace context across the hop (docs/tracing.md): a `traceparent` that comes with an `onboarding.finished` event
//! is continued by the issuer (the `share_token` carries the same trace id), and the receiver starts its own trace
//! linked to the issuer's (the `import.result` carries the receiver's `traceparent` and the issuer's in
//! `x-pb-linked-traceparent`). An event without one gets a new trace; a malformed one is ignored, not propagated and
//! not a reason to dead-letter. Spans go to an OTLP endpoint only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use partner_bridge::didit::wire::SessionKind;
use partner_bridge::envelope::ImportOutcome;
use partner_bridge::trace::{HEADER_LINKED, HEADER_TRACEPARENT, HEADER_TRACESTATE, TraceContext};

use crate::support::bridge::{Amqp, Collector, Got, World};
use crate::support::faults::{Binary, binary_config, dead_queues, non_empty, showing_log};
use crate::support::t_receiver::Tap;
use crate::support::webhooks;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn context(got: &Got, header: &str) -> TraceContext {
    let value = got
        .header(header)
        .unwrap_or_else(|| panic!("no {header} header on {:?}", got.headers));
    TraceContext::parse(value, None).unwrap_or_else(|| panic!("{header} {value:?} is not valid"))
}

/// Runs one event with `headers` through issuer and receiver (in-process, one broker) and returns the token and
/// the `import.result` as published.
async fn one_event(name: &str, headers: &[(&str, &str)]) -> (Got, Got) {
    let world = World::new(name).await;
    let receiver = world.start_receiver(false).await;
    let issuer = world.start_issuer().await;
    let tokens = Tap::start(&world.names.tokens_exchange(), "#").await;
    let results = Collector::start(&world.results_queue()).await;
    let amqp = Amqp::connect().await;
    let id = world.session(SessionKind::User, "Approved", "v1").await;
    let event = world.event(&id, SessionKind::User, "Approved");
    amqp.publish(
        &world.names.onboarding_exchange(),
        "onboarding.finished",
        &serde_json::to_vec(&event).unwrap(),
        headers,
    )
    .await;
    let result = results.wait_count(1, Duration::from_secs(30)).await[0].clone();
    let token = tokens.wait_count(1, Duration::from_secs(10)).await[0]
        .got
        .clone();
    let outcome = results.results()[0].outcome;
    assert_eq!(outcome, ImportOutcome::Imported, "the event is imported");
    let dead = non_empty(&amqp, &dead_queues(&world)).await;
    assert!(dead.is_empty(), "nothing dead-lettered: {dead:?}");
    amqp.close().await;
    issuer.stop().await.unwrap();
    receiver.stop().await.unwrap();
    world.cleanup().await;
    (token, result)
}

/// The issuer continues the event's trace; the receiver's `import.result` is in the receiver's own trace and names
/// the issuer's.
///
/// On the old code no message carried a `traceparent`: the token's is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_sent_with_an_event_reaches_the_token_and_the_import_result() {
    let (token, result) = one_event(
        "trace-parent",
        &[
            (HEADER_TRACEPARENT, TRACEPARENT),
            (HEADER_TRACESTATE, "vendor=abc"),
        ],
    )
    .await;
    let on_token = context(&token, HEADER_TRACEPARENT);
    assert_eq!(
        on_token.trace_id_hex(),
        TRACE_ID,
        "the token continues the event's trace"
    );
    assert_ne!(
        hex::encode(on_token.span_id),
        "00f067aa0ba902b7",
        "under a span of the issuer's"
    );
    assert_eq!(
        token.header(HEADER_TRACESTATE),
        Some("vendor=abc"),
        "tracestate is passed on"
    );
    assert_eq!(
        token.header(HEADER_LINKED),
        None,
        "the issuer parents its own organisation's trace"
    );

    let own = context(&result, HEADER_TRACEPARENT);
    assert_ne!(
        own.trace_id_hex(),
        TRACE_ID,
        "the receiver's trace is its own"
    );
    let linked = context(&result, HEADER_LINKED);
    assert_eq!(linked.trace_id_hex(), TRACE_ID, "and links to the issuer's");
    assert_eq!(
        linked,
        TraceContext {
            state: None,
            ..on_token
        },
        "exactly the token's context"
    );
}

/// An event without a `traceparent` is the start of a trace: the issuer makes one, and the receiver links to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_without_traceparent_gets_a_new_trace_from_the_issuer() {
    let (token, result) = one_event("trace-none", &[]).await;
    let on_token = context(&token, HEADER_TRACEPARENT);
    let linked = context(&result, HEADER_LINKED);
    assert_eq!(linked.trace_id, on_token.trace_id);
    assert_ne!(
        context(&result, HEADER_TRACEPARENT).trace_id,
        on_token.trace_id
    );
}

/// A malformed `traceparent` is dropped: the event is still shared and imported (not dead-lettered), and the token
/// carries a valid new trace instead of the bad value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_traceparent_is_ignored() {
    let bad = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
    let (token, result) = one_event(
        "trace-bad",
        &[(HEADER_TRACEPARENT, bad), (HEADER_TRACESTATE, "vendor=abc")],
    )
    .await;
    let on_token = context(&token, HEADER_TRACEPARENT);
    assert_ne!(on_token.trace_id_hex(), TRACE_ID, "not the malformed trace");
    assert_eq!(
        token.header(HEADER_TRACESTATE),
        None,
        "no tracestate without its traceparent"
    );
    assert_eq!(context(&result, HEADER_LINKED).trace_id, on_token.trace_id);
}

/// Every OTLP request body an in-test collector received.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Request>>>);

/// One request: its path and its body.
type Request = (String, Vec<u8>);

async fn collector(addr: &str) -> Option<(SocketAddr, Received)> {
    let listener = tokio::net::TcpListener::bind(addr).await.ok()?;
    let bound = listener.local_addr().unwrap();
    let received = Received::default();
    let app = axum::Router::new()
        .route(
            "/{*path}",
            post(
                |State(r): State<Received>, uri: axum::http::Uri, body: Bytes| async move {
                    r.0.lock()
                        .unwrap()
                        .push((uri.path().to_string(), body.to_vec()));
                    axum::http::StatusCode::OK
                },
            ),
        )
        .with_state(received.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Some((bound, received))
}

/// Runs the binary (both roles) with `env` (and no OTLP variables of the test's own environment), pushes one
/// traced event through it, and stops it with SIGTERM.
async fn run_binary(world: &World, name: &str, env: &[(&str, String)]) {
    let (config, admin) = binary_config(world, 4, 5);
    let log = world.dir.path().join(format!("{name}.log"));
    let mut vars: Vec<(&str, Option<String>)> = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", None),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None),
        ("OTEL_BSP_SCHEDULE_DELAY", Some("100".into())),
    ];
    vars.retain(|(k, _)| !env.iter().any(|(name, _)| name == k));
    vars.extend(env.iter().map(|(k, v)| (*k, Some(v.clone()))));
    let mut binary = Binary::start_with(&config, admin, log.clone(), &vars).await;
    showing_log(&log, async {
        let results = Collector::start(&world.results_queue()).await;
        let amqp = Amqp::connect().await;
        let id = world.session(SessionKind::User, "Approved", name).await;
        let event = world.event(&id, SessionKind::User, "Approved");
        amqp.publish(
            &world.names.onboarding_exchange(),
            "onboarding.finished",
            &serde_json::to_vec(&event).unwrap(),
            &[(HEADER_TRACEPARENT, TRACEPARENT)],
        )
        .await;
        results.wait_count(1, Duration::from_secs(30)).await;
        amqp.close().await;
    })
    .await;
    binary.terminate();
    let status = binary.exited_within(Duration::from_secs(20)).await;
    assert!(status.success(), "exit after SIGTERM: {status}");
}

/// With `OTEL_EXPORTER_OTLP_ENDPOINT` the spans arrive at the collector (OTLP/HTTP protobuf on `/v1/traces`),
/// among them spans of the event's trace (its 16 trace-id bytes are in a request body). Without it (only a
/// metrics endpoint and an empty traces endpoint set), nothing is sent: not to the collector, and not to the
/// default `127.0.0.1:4318` when that port can be watched.
///
/// On the old code nothing was ever exported: the wait for the trace id fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_only_when_an_endpoint_is_set() {
    let world = World::new("trace-otlp").await;
    let (addr, received) = collector("127.0.0.1:0").await.unwrap();
    let default_port = collector("127.0.0.1:4318").await;

    run_binary(
        &world,
        "without",
        &[
            (
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                format!("http://{addr}"),
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", String::new()),
        ],
    )
    .await;
    assert!(
        received.0.lock().unwrap().is_empty(),
        "nothing exported without an endpoint"
    );
    if let Some((_, default)) = &default_port {
        assert!(
            default.0.lock().unwrap().is_empty(),
            "nothing sent to the default endpoint"
        );
    }

    run_binary(
        &world,
        "with",
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}"))],
    )
    .await;
    let trace_id = hex::decode(TRACE_ID).unwrap();
    let requests = received.0.lock().unwrap().clone();
    assert!(
        !requests.is_empty(),
        "spans were exported\n{}",
        crate::support::faults::log_tail(&world.dir.path().join("with.log"))
    );
    assert!(
        requests.iter().all(|(path, _)| path == "/v1/traces"),
        "OTLP/HTTP traces path: {:?}",
        requests.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    assert!(
        requests.iter().any(|(_, body)| body
            .windows(trace_id.len())
            .any(|w| w == trace_id.as_slice())),
        "a span of the event's trace was exported"
    );
    if let Some((_, default)) = &default_port {
        assert!(
            default.0.lock().unwrap().is_empty(),
            "the configured endpoint only"
        );
    }
    world.cleanup().await;
}

/// A webhook's HTTP `traceparent` is the parent of the event the intake queues, so the issuer's trace goes on from
/// Didit's call.
///
/// On the old code the queued event had no `traceparent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhooks_http_traceparent_goes_on_in_the_event_it_queues() {
    let world = World::new("trace-hook").await;
    let running = world
        .start(world.config(&webhooks::both_with_intake(&world)))
        .await;
    let tap = Tap::start(&world.names.onboarding_exchange(), "onboarding.finished").await;
    let session = world.session(SessionKind::User, "Approved", "hook").await;
    let body = webhooks::body(&session, "Approved", chrono::Utc::now().timestamp());
    let mut headers = webhooks::headers(&body, webhooks::Sig::V2, None);
    headers.push((HEADER_TRACEPARENT, TRACEPARENT.to_string()));
    let (status, _) = webhooks::post(
        &webhooks::patient_http(),
        running.webhook_addr().expect("the intake is configured"),
        &webhooks::bytes_of(&body),
        &headers,
    )
    .await
    .expect("the intake answers");
    assert_eq!(status, 200);
    let event = tap.wait_count(1, Duration::from_secs(10)).await[0]
        .got
        .clone();
    let on_event = context(&event, HEADER_TRACEPARENT);
    assert_eq!(
        on_event.trace_id_hex(),
        TRACE_ID,
        "the event continues the caller's trace"
    );
    assert_ne!(hex::encode(on_event.span_id), "00f067aa0ba902b7");
    running.stop().await.unwrap();
    world.cleanup().await;
}
