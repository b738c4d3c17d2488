//! Joins a job's span to the submitter's trace for OpenTelemetry export (a no-op when no OTLP
//! layer is installed): the span's parent becomes the remote span of the job's `traceparent`.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use switchyard_core::telemetry::TraceParent;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub(crate) fn join(span: &tracing::Span, tp: &TraceParent) {
    let (Ok(trace), Ok(parent)) = (
        TraceId::from_hex(&tp.trace_id),
        SpanId::from_hex(&tp.parent_id),
    ) else {
        return;
    };
    let flags = if tp.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let remote = SpanContext::new(trace, parent, flags, true, TraceState::default());
    let cx = opentelemetry::Context::new().with_remote_span_context(remote);
    let _ = span.set_parent(cx);
}
