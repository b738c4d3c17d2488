//! OTLP export of traces (OTLP/HTTP, protobuf) when `otlp_endpoint` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set: every span (requests, jobs, provider calls) goes to the
//! collector in batches from a background thread; logs stay on stderr either way.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use switchyard_core::telemetry::ExtraLayer;

/// Flushes and stops the exporter when dropped (at the end of `main`).
pub struct OtelGuard(SdkTracerProvider);

impl Drop for OtelGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            eprintln!("switchyard: flushing traces failed: {e}");
        }
    }
}

/// The endpoint's traces URL (`…/v1/traces` appended to a base URL).
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    }
}

/// The exporting layer for `role`, or `None` without an endpoint.
pub fn layer(
    endpoint: Option<&str>,
    role: &str,
) -> anyhow::Result<Option<(ExtraLayer, OtelGuard)>> {
    let Some(endpoint) = endpoint.filter(|e| !e.trim().is_empty()) else {
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(traces_url(endpoint))
        .build()
        .map_err(|e| anyhow::anyhow!("OTLP exporter for {endpoint}: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(format!("switchyard-{role}"))
                .build(),
        )
        .build();
    let tracer = provider.tracer("switchyard");
    let layer: ExtraLayer = Box::new(tracing_opentelemetry::layer().with_tracer(tracer));
    Ok(Some((layer, OtelGuard(provider))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_added_once() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }
}
