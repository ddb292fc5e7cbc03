//! Logging setup: `tracing` to stdout, one JSON object per line (for log shippers) or pretty (for terminals). The
//! filter comes from `RUST_LOG` when set, else from `log.level`. Secrets cannot reach a log line: they are redacted
//! types (see `secret`).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Safe to call more than once (later calls are ignored), so tests and the demo can
/// call it freely.
pub fn init(format: LogFormat, level: &str) {
    // lapin logs returned (unroutable) messages with their bodies at WARN, and a body may hold a share token:
    // only its errors are let through, whatever the configured level says.
    install(format, level, &["lapin=error"]);
}

/// Logging for one-shot commands run from a terminal (`topology declare`, `dead-letters`): the AMQP client's own
/// lines (lapin and amq-protocol, e.g. "connection failed" with internal detail, once per retry) are dropped
/// entirely; the command prints its own error, which says what failed and where.
pub fn init_cli(level: &str) {
    install(LogFormat::Pretty, level, &CLI_QUIET);
}

/// Targets a CLI command never shows: the AMQP client's internals (prefixes: `amq_protocol` covers its `_tcp`,
/// `_uri` and `_types` crates).
pub const CLI_QUIET: [&str; 2] = ["lapin=off", "amq_protocol=off"];

fn install(format: LogFormat, level: &str, directives: &[&str]) {
    let mut filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    for directive in directives {
        filter = filter.add_directive(directive.parse().expect("static directive"));
    }
    // Colours only for a terminal: a pretty log redirected to a file or a pipe stays plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
