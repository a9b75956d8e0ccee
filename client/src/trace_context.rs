//! What every call carries in its gRPC metadata: the client's bearer token, when it has one
//! (`ClientBuilder::bearer_token`), and with the `otel` feature the current span's trace context
//! (W3C `traceparent`), written by the application's global OpenTelemetry propagator, so the
//! coordinator's transaction continues the caller's trace. Without the feature, or with no active
//! span or no propagator set (`opentelemetry::global::set_text_map_propagator`), calls carry no
//! trace context and cost nothing more.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};
use treaty_proto::pb::coordinator_client::CoordinatorClient;

/// The interceptor every call goes through.
#[derive(Clone, Default)]
pub(crate) struct CallMetadata {
    /// `Bearer <token>`, marked sensitive so that no debug output shows it.
    authorization: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for CallMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallMetadata")
            .field("bearer_token", &self.authorization.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl CallMetadata {
    /// Calls that present `token`; `None` when the token cannot be sent in a header.
    pub(crate) fn with_token(token: &str) -> Option<Self> {
        let mut value = MetadataValue::try_from(format!("Bearer {}", token.trim())).ok()?;
        value.set_sensitive(true);
        Some(Self {
            authorization: Some(value),
        })
    }
}

impl Interceptor for CallMetadata {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.authorization {
            request.metadata_mut().insert("authorization", value.clone());
        }
        inject(request)
    }
}

/// A coordinator client whose calls carry the token and the caller's trace context.
pub(crate) type Coordinator = CoordinatorClient<InterceptedService<Channel, CallMetadata>>;

pub(crate) fn coordinator(channel: Channel, metadata: &CallMetadata) -> Coordinator {
    CoordinatorClient::with_interceptor(channel, metadata.clone())
}

#[cfg(not(feature = "otel"))]
fn inject(request: Request<()>) -> Result<Request<()>, Status> {
    Ok(request)
}

/// Runs when the call is sent, in the caller's task: the current span is the caller's.
#[cfg(feature = "otel")]
fn inject(mut request: Request<()>) -> Result<Request<()>, Status> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    let context = tracing::Span::current().context();
    if context.span().span_context().is_valid() {
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.inject_context(&context, &mut Metadata(request.metadata_mut()));
        });
    }
    Ok(request)
}

/// gRPC metadata as a carrier for the propagator.
#[cfg(feature = "otel")]
struct Metadata<'a>(&'a mut tonic::metadata::MetadataMap);

#[cfg(feature = "otel")]
impl opentelemetry::propagation::Injector for Metadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        // A key or value metadata cannot hold is left out: the call goes untraced, not failed.
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

#[cfg(all(test, feature = "otel"))]
mod tests {
    use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn a_call_inside_a_span_carries_its_traceparent_and_one_outside_carries_none() {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        tracing::subscriber::with_default(subscriber, || {
            let untraced = inject(Request::new(())).unwrap();
            assert!(untraced.metadata().get("traceparent").is_none());

            let span = tracing::info_span!("the application's request");
            let _entered = span.enter();
            let trace_id = span.context().span().span_context().trace_id().to_string();
            let traced = inject(Request::new(())).unwrap();
            let traceparent = traced.metadata().get("traceparent").unwrap().to_str().unwrap();
            assert!(
                traceparent.starts_with(&format!("00-{trace_id}-")),
                "{traceparent}"
            );
        });
    }
}
