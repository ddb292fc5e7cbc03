//! Trace context across the hop (docs/tracing.md): W3C `traceparent` / `tracestate` in AMQP headers, and the spans
//! the bridge opens per message handled, per publish and per Didit call.
//!
//! The context is carried in a task-local ([`scope`]) set by the consumer around each handler and by the webhook
//! around its publish; [`crate::amqp::publisher`] stamps every message it publishes with it. This works whether or
//! not spans are exported: the ids come from the OpenTelemetry span when the OTLP layer is installed
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`, see `telemetry`), and are made here otherwise, so a message always carries a
//! valid `traceparent`.
//!
//! Within one organisation (the issuer handling an `onboarding.finished` event or a webhook) the incoming
//! `traceparent` is the parent. Across organisations (the receiver handling a `share_token`, the issuer handling a
//! `reshare.request`) the handler starts its own trace and *links* to the sender's: the sender's `traceparent` is
//! kept as [`HEADER_LINKED`] on what it publishes, and as a span link when exported.

use std::future::Future;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C Trace Context header naming the trace and the parent span.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// The W3C Trace Context vendor header, passed along unchanged.
pub const HEADER_TRACESTATE: &str = "tracestate";
/// The other organisation's `traceparent` this work is linked to (not parented by): on a receiver's
/// `import.result` and `reshare.request`, the issuer's; on a token minted for a reshare, the receiver's.
pub const HEADER_LINKED: &str = "x-pb-linked-traceparent";

/// One W3C trace context: trace id, parent (span) id, flags, and the opaque `tracestate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// 8 bytes, not all zero.
    pub span_id: [u8; 8],
    /// Bit 0: sampled.
    pub flags: u8,
    /// `tracestate`, when one came with it (passed along, never interpreted).
    pub state: Option<String>,
}

impl TraceContext {
    /// Parses a `traceparent` value (version `00`, or a later version read as `00`); `None` when malformed, so a
    /// bad header is ignored rather than propagated.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<TraceContext> {
        let value = traceparent.trim();
        let parts: Vec<&str> = value.split('-').collect();
        if parts.len() < 4 {
            return None;
        }
        let (version, trace, span, flags) = (parts[0], parts[1], parts[2], parts[3]);
        let lower_hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !lower_hex(version, 2)
            || version == "ff"
            || !lower_hex(trace, 32)
            || !lower_hex(span, 16)
        {
            return None;
        }
        if !lower_hex(flags, 2) || (version == "00" && parts.len() != 4) {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        hex::decode_to_slice(trace, &mut trace_id).ok()?;
        hex::decode_to_slice(span, &mut span_id).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        let state = tracestate
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= 512 && s.is_ascii())
            .map(str::to_string);
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
            state,
        })
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            self.flags
        )
    }

    /// The trace id in hex, as tests and logs show it.
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// A new trace, sampled.
    fn root() -> TraceContext {
        TraceContext {
            trace_id: nonzero(),
            span_id: nonzero(),
            flags: 1,
            state: None,
        }
    }

    /// A child in the same trace: a new span id.
    fn child(&self) -> TraceContext {
        TraceContext {
            span_id: nonzero(),
            ..self.clone()
        }
    }

    fn span_context(&self) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            TraceFlags::new(self.flags),
            true,
            self.state
                .as_deref()
                .and_then(|s| s.parse::<TraceState>().ok())
                .unwrap_or_default(),
        )
    }
}

fn nonzero<const N: usize>() -> [u8; N] {
    loop {
        let bytes: [u8; N] = rand::random();
        if bytes != [0; N] {
            return bytes;
        }
    }
}

/// The context of the work in progress, and the other organisation's trace it links to.
#[derive(Debug, Clone)]
pub struct Current {
    /// This work's own context: the next hop's parent.
    pub context: TraceContext,
    /// The other organisation's context, when this work started from its message.
    pub linked: Option<TraceContext>,
}

tokio::task_local! {
    static CURRENT: Current;
}

/// How a handler relates to the trace that came with its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// The same organisation's trace: continue it (the incoming span is the parent).
    Parent,
    /// Another organisation's trace: start a new one that links to it.
    Link,
}

/// Gives `span` its place in the trace: under `incoming` (when `Parent` and one came), or in a new trace linked to
/// it (when `Link`), or a new trace. Returns the span's own context, to carry onward.
pub fn begin(span: &Span, incoming: Option<TraceContext>, relation: Relation) -> Current {
    let (parent, linked) = match relation {
        Relation::Parent => (incoming, None),
        Relation::Link => (None, incoming),
    };
    if let Some(parent) = &parent {
        let _ = span.set_parent(
            opentelemetry::Context::new().with_remote_span_context(parent.span_context()),
        );
    }
    if let Some(linked) = &linked {
        span.add_link(linked.span_context());
    }
    let context = own_context(span).unwrap_or_else(|| match &parent {
        Some(parent) => parent.child(),
        None => TraceContext::root(),
    });
    let context = TraceContext {
        state: parent.and_then(|p| p.state).or(context.state),
        ..context
    };
    Current { context, linked }
}

/// The span's ids when it is an exported OpenTelemetry span; `None` without the OTLP layer.
fn own_context(span: &Span) -> Option<TraceContext> {
    let otel = span.context();
    let ctx = otel.span().span_context().clone();
    ctx.is_valid().then(|| TraceContext {
        trace_id: ctx.trace_id().to_bytes(),
        span_id: ctx.span_id().to_bytes(),
        flags: ctx.trace_flags().to_u8(),
        state: None,
    })
}

/// Runs `fut` with `current` as the trace context its publishes carry.
pub fn scope<F: Future>(current: Current, fut: F) -> impl Future<Output = F::Output> {
    CURRENT.scope(current, fut)
}

/// The context of the work in progress, if any.
pub fn current() -> Option<Current> {
    CURRENT.try_with(Clone::clone).ok()
}

/// The trace headers a message published now carries, for a publish whose span is `span`: `traceparent` (the
/// publish span as parent, or a child of the work in progress), `tracestate`, and [`HEADER_LINKED`]. Empty outside
/// any traced work.
pub fn outgoing_headers(span: &Span) -> Vec<(&'static str, String)> {
    let Some(current) = current() else {
        return Vec::new();
    };
    // The publish span is already under the work's span (the current one), so only its ids are read here.
    let context = own_context(span).unwrap_or_else(|| current.context.child());
    let mut headers = vec![(HEADER_TRACEPARENT, context.traceparent())];
    if let Some(state) = &current.context.state {
        headers.push((HEADER_TRACESTATE, state.clone()));
    }
    if let Some(linked) = &current.linked {
        headers.push((HEADER_LINKED, linked.traceparent()));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_the_w3c_example() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = TraceContext::parse(tp, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(ctx.traceparent(), tp);
        assert_eq!(ctx.state.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn malformed_values_are_refused() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad, None).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn without_the_otlp_layer_ids_are_made_locally() {
        let incoming = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        );
        let parent = begin(&Span::none(), incoming.clone(), Relation::Parent);
        assert_eq!(parent.context.trace_id, incoming.as_ref().unwrap().trace_id);
        assert_ne!(parent.context.span_id, incoming.as_ref().unwrap().span_id);
        let linked = begin(&Span::none(), incoming.clone(), Relation::Link);
        assert_ne!(linked.context.trace_id, incoming.as_ref().unwrap().trace_id);
        assert_eq!(linked.linked, incoming);
    }
}
