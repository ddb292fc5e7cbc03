//! Logging setup: `tracing` to stdout, one JSON object per line (for log shippers) or pretty (for terminals). The
//! filter comes from `RUST_LOG` when set, else from `log.level`. Secrets cannot reach a log line: they are redacted
//! types (see `secret`).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Safe to call more than once (later calls are ignored), so tests and the demo can
/// call it freely.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // lapin logs returned (unroutable) messages with their bodies at WARN, and a body may hold a share token:
        // only its errors are let through, whatever the configured level says.
        .add_directive("lapin=error".parse().expect("static directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.with_target(false).compact().try_init(),
    };
}
