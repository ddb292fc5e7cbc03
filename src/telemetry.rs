//! Logging setup: `tracing` to stdout, one JSON object per line (for log shippers) or pretty (for terminals). The
//! filter comes from `RUST_LOG` when set, else from `log.level`. Secrets cannot reach a log line: they are redacted
//! types (see `secret`).
//!
//! `partner-bridge run` also exports its spans (see `trace` and docs/tracing.md) over OTLP/HTTP (protobuf) when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, and only then: without either,
//! no exporter is built, no export thread is started and nothing is sent anywhere. The exporter reads the other
//! standard `OTEL_*` variables itself (headers, timeout, `OTEL_BSP_*` batching).

use std::sync::{Mutex, OnceLock};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::LogFormat;

/// Installs the global subscriber. Safe to call more than once (later calls are ignored), so tests and the demo can
/// call it freely.
pub fn init(format: LogFormat, level: &str) {
    // lapin logs returned (unroutable) messages with their bodies at WARN, and a body may hold a share token:
    // only its errors are let through, whatever the configured level says.
    install(format, level, &["lapin=error"], None);
}

/// [`init`] for `partner-bridge run`: also exports spans over OTLP when an endpoint variable is set (module doc).
/// Call [`shutdown`] before the process exits so the last spans are sent.
pub fn init_run(format: LogFormat, level: &str) {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let export = otlp_configured(env);
    let otel = export.then(otlp_layer).flatten();
    install(format, level, &["lapin=error"], otel);
}

/// Whether OTLP export is asked for: `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` set
/// and not empty.
pub fn otlp_configured(env: impl Fn(&str) -> Option<String>) -> bool {
    env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

static PROVIDER: OnceLock<Mutex<Option<SdkTracerProvider>>> = OnceLock::new();

/// The OTLP exporter and the layer that turns the bridge's spans into OpenTelemetry spans; `None` (with a line on
/// stderr) when the exporter cannot be built, so a bad endpoint never stops the bridge.
fn otlp_layer() -> Option<BoxedLayer> {
    // reqwest is built without a TLS provider of its own: the process's (ring, as everywhere else) comes first.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("warning: OTLP trace export disabled: {e}");
            return None;
        }
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("partner-bridge")
                .build(),
        )
        .build();
    let tracer = provider.tracer("partner-bridge");
    let _ = PROVIDER.set(Mutex::new(Some(provider)));
    // Only the bridge's own spans (messages handled, publishes, Didit calls, webhooks), whatever the log level.
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(Targets::new().with_target("partner_bridge", tracing::Level::INFO));
    Some(Box::new(layer))
}

/// Sends the spans still buffered and stops the exporter; nothing when export is off.
pub fn shutdown() {
    let provider = PROVIDER
        .get()
        .and_then(|p| p.lock().ok().and_then(|mut p| p.take()));
    if let Some(provider) = provider
        && let Err(e) = provider.shutdown()
    {
        eprintln!("warning: OTLP trace export did not finish: {e}");
    }
}

/// Logging for one-shot commands run from a terminal (`topology declare`, `dead-letters`): the AMQP client's own
/// lines (lapin and amq-protocol, e.g. "connection failed" with internal detail, once per retry) are dropped
/// entirely; the command prints its own error, which says what failed and where.
pub fn init_cli(level: &str) {
    install(LogFormat::Pretty, level, &CLI_QUIET, None);
}

/// Targets a CLI command never shows: the AMQP client's internals (prefixes: `amq_protocol` covers its `_tcp`,
/// `_uri` and `_types` crates).
pub const CLI_QUIET: [&str; 2] = ["lapin=off", "amq_protocol=off"];

fn install(format: LogFormat, level: &str, directives: &[&str], otel: Option<BoxedLayer>) {
    let mut filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    for directive in directives {
        filter = filter.add_directive(directive.parse().expect("static directive"));
    }
    // Colours only for a terminal: a pretty log redirected to a file or a pipe stays plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let fmt: BoxedLayer = match format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => fmt.with_target(false).compact().with_filter(filter).boxed(),
    };
    let mut layers = vec![fmt];
    layers.extend(otel);
    let _ = tracing_subscriber::registry().with(layers).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_only_with_an_endpoint() {
        let none = |_: &str| None;
        assert!(!otlp_configured(none));
        let traces = |name: &str| {
            (name == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .then(|| "http://127.0.0.1:4318/v1/traces".to_string())
        };
        assert!(otlp_configured(traces));
        let base = |name: &str| {
            (name == "OTEL_EXPORTER_OTLP_ENDPOINT").then(|| "http://c:4318".to_string())
        };
        assert!(otlp_configured(base));
    }
}
