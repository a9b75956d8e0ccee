//! Traces across processes (`--otlp-endpoint`): the services' `tracing` spans become
//! OpenTelemetry spans exported over OTLP/gRPC, and W3C trace context (`traceparent`) rides in
//! gRPC metadata from client to coordinator to participants, so one transaction is one trace.
//!
//! Off unless an endpoint is configured: then no OpenTelemetry layer is installed, Treaty's spans
//! (DEBUG level) are disabled under the default log filter, and nothing here formats or parses a
//! `traceparent` ([`exporting`] is one relaxed load). A malformed or missing `traceparent` is
//! ignored: the span starts a trace of its own (or, on a participant, none is made).

use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use tracing::instrument::{Instrument, Instrumented};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Whether spans are exported (an OTLP endpoint was configured at start). Read on hot paths, so
/// a plain flag rather than a look at the subscriber.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports traces; when not, callers skip everything trace-related.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Where and how a service exports its spans (`--otlp-endpoint` and friends).
#[derive(Debug, Clone)]
pub struct TraceExport {
    /// The OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// `service.name` (unless `OTEL_SERVICE_NAME` says otherwise).
    pub service_name: &'static str,
    /// Further resource attributes: which instance this is (`treaty.shard`, `treaty.coordinator`).
    pub resource: Vec<(&'static str, String)>,
    /// How often finished spans are sent; `None`: the SDK's (`OTEL_BSP_SCHEDULE_DELAY`, 5 s).
    pub export_interval: Option<Duration>,
}

/// The collector to export to: the one configured, else the standard `OTEL_EXPORTER_OTLP_ENDPOINT`;
/// `None` (no export) when neither is set or either is empty.
pub fn otlp_endpoint(configured: Option<String>) -> Option<String> {
    configured
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .map(|endpoint| endpoint.trim().to_owned())
        .filter(|endpoint| !endpoint.is_empty())
}

/// Why trace export could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter for {endpoint:?}")]
    Exporter {
        endpoint: String,
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Holds the exporter while the service runs; [`TracingGuard::shutdown`] sends what is left.
#[must_use = "shut it down after the service stops, or the last spans are lost"]
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl TracingGuard {
    pub(crate) fn off() -> Self {
        Self { provider: None }
    }

    pub(crate) fn on(provider: SdkTracerProvider) -> Self {
        Self {
            provider: Some(provider),
        }
    }

    /// Flushes and stops the exporter. Its batch thread blocks on the export, which needs this
    /// runtime's workers (tonic), so the wait runs off them.
    pub async fn shutdown(mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        let stopped = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(error)) = stopped {
            tracing::warn!(%error, "trace exporter did not shut down cleanly");
        }
    }
}

/// The exporter and its OpenTelemetry tracer. Must run inside the tokio runtime: tonic's channel
/// starts its tasks there (the connection itself is made lazily, so a collector that is down
/// costs nothing at start).
pub(crate) fn start_export(export: &TraceExport) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(export.endpoint.clone())
        .build()
        .map_err(|source| TelemetryError::Exporter {
            endpoint: export.endpoint.clone(),
            source,
        })?;
    let mut batch = BatchConfigBuilder::default();
    if let Some(interval) = export.export_interval {
        batch = batch.with_scheduled_delay(interval);
    }
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch.build())
        .build();
    let mut resource = opentelemetry_sdk::Resource::builder();
    // The standard variable wins, as in every OpenTelemetry SDK.
    if std::env::var_os("OTEL_SERVICE_NAME").is_none_or(|name| name.is_empty()) {
        resource = resource.with_service_name(export.service_name);
    }
    let resource = resource
        .with_attributes(
            export
                .resource
                .iter()
                .map(|(key, value)| opentelemetry::KeyValue::new(*key, value.clone())),
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(provider)
}

/// The layer that turns Treaty's spans into OpenTelemetry spans, and the filter that picks them:
/// every span of Treaty's crates (they are DEBUG, below the default log filter) and their INFO
/// and louder events; nothing of the libraries underneath (tonic, h2, sqlx).
pub(crate) fn otel_layer<S>(
    provider: &SdkTracerProvider,
) -> impl tracing_subscriber::Layer<S> + Send + Sync + 'static
where
    S: tracing::Subscriber + Send + Sync + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    use tracing_subscriber::Layer as _;
    let tracer = provider.tracer("treaty");
    let treaty_only = tracing_subscriber::filter::filter_fn(|metadata| {
        metadata.target().starts_with("treaty")
            && (metadata.is_span() || *metadata.level() <= tracing::Level::INFO)
    })
    // Nothing at TRACE: lets `tracing` skip those callsites (and `log` records) outright.
    .with_max_level_hint(tracing_subscriber::filter::LevelFilter::DEBUG);
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Source locations and thread names on every span cost more than they tell here.
        .with_location(false)
        .with_threads(false)
        .with_filter(treaty_only)
}

/// `http::HeaderMap` as a carrier for the W3C propagator.
struct Headers<'a>(&'a http::HeaderMap);
struct HeadersMut<'a>(&'a mut http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator only writes `traceparent` and `tracestate`, always valid names; a value
        // it could not encode is simply not sent.
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Writes the current span's trace context (`traceparent`, `tracestate`) into outgoing request
/// headers. Nothing when not exporting, or when there is no sampled span to continue.
pub fn inject_current(headers: &mut http::HeaderMap) {
    if !exporting() {
        return;
    }
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new().inject_context(&context, &mut HeadersMut(headers));
}

/// The caller's trace context from incoming request headers, if it sent a valid one.
fn remote_context(headers: &http::HeaderMap) -> Option<opentelemetry::Context> {
    let context = TraceContextPropagator::new().extract(&Headers(headers));
    context.span().span_context().is_valid().then_some(context)
}

/// A server span for one incoming call (`rpc` named by its gRPC path), child of the caller's
/// trace; [`tracing::Span::none`] when not exporting or when the caller sent no valid
/// `traceparent` (health probes, a participant's reconciliation: not part of any transaction).
pub fn server_span(headers: &http::HeaderMap, path: &str, shard: Option<&str>) -> tracing::Span {
    if !exporting() {
        return tracing::Span::none();
    }
    let Some(parent) = remote_context(headers) else {
        return tracing::Span::none();
    };
    let span = tracing::debug_span!(
        "rpc",
        otel.name = path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        shard = shard,
        gid = tracing::field::Empty,
        txid = tracing::field::Empty,
    );
    // Fails only for a span that is disabled or already started; this one is neither, and a
    // span without the remote parent is still worth having.
    let _ = span.set_parent(parent);
    span
}

/// Names the transaction a server span serves (`gid`, `txid` attributes), once the request's GID
/// is parsed. Nothing when not exporting.
pub fn record_gid(gid: &crate::Gid) {
    if !exporting() {
        return;
    }
    let span = tracing::Span::current();
    span.record("gid", tracing::field::display(gid));
    span.record("txid", gid.txid());
}

/// A tower layer for a tonic server: runs each call inside [`server_span`], so the handler's spans
/// and events belong to the caller's trace. A pass-through when not exporting.
#[derive(Debug, Clone, Default)]
pub struct ServerSpanLayer {
    shard: Option<std::sync::Arc<str>>,
}

impl ServerSpanLayer {
    /// `shard`: recorded on every span (a participant's); `None` for the coordinator.
    pub fn new(shard: Option<&str>) -> Self {
        Self {
            shard: shard.map(Into::into),
        }
    }
}

impl<S> tower_layer::Layer<S> for ServerSpanLayer {
    type Service = ServerSpan<S>;

    fn layer(&self, inner: S) -> ServerSpan<S> {
        ServerSpan {
            inner,
            shard: self.shard.clone(),
        }
    }
}

/// The service [`ServerSpanLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct ServerSpan<S> {
    inner: S,
    shard: Option<std::sync::Arc<str>>,
}

impl<S, B> tower_service::Service<http::Request<B>> for ServerSpan<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let span = server_span(request.headers(), request.uri().path(), self.shard.as_deref());
        self.inner.call(request).instrument(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_traceparent_is_no_parent() {
        for value in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            let mut headers = http::HeaderMap::new();
            headers.insert("traceparent", http::HeaderValue::from_static(value));
            assert!(remote_context(&headers).is_none(), "{value:?}");
        }
        assert!(remote_context(&http::HeaderMap::new()).is_none());
    }

    #[test]
    fn a_valid_traceparent_is_the_parent() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            http::HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let context = remote_context(&headers).expect("a valid traceparent");
        let span = context.span();
        assert_eq!(
            span.span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(span.span_context().is_remote());
    }

    #[test]
    fn nothing_is_injected_or_made_when_not_exporting() {
        // No test in this binary starts an exporter.
        let mut headers = http::HeaderMap::new();
        inject_current(&mut headers);
        assert!(headers.is_empty());
        headers.insert(
            "traceparent",
            http::HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert!(server_span(&headers, "/treaty.v1.Participant/Prepare", None).is_none());
    }
}
