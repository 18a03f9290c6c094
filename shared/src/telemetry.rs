//! Logs and traces. Logs are JSON (or pretty, for a terminal) through `tracing`; spans are
//! OpenTelemetry spans, exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Trace
//! context crosses NATS as a W3C `traceparent` header, so one trace spans gateway → dispatcher →
//! worker → job. Spans get real ids even with no exporter, so `traceparent` always propagates.

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryConfig};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter: {0}")]
    Filter(String),
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("a global subscriber is already set: {0}")]
    AlreadySet(String),
}

/// Flushes spans still buffered when dropped at the end of `main`.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("telemetry shutdown: {e}");
        }
    }
}

pub fn init(service: &str, config: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(from_env) if !from_env.is_empty() => EnvFilter::try_new(from_env),
        _ => EnvFilter::try_new(&config.log_level),
    }
    .map_err(|e| TelemetryError::Filter(e.to_string()))?;

    let mut provider = SdkTracerProvider::builder().with_resource(
        opentelemetry_sdk::Resource::builder()
            .with_service_name(format!("herald-{service}"))
            .build(),
    );
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        provider = provider.with_batch_exporter(exporter);
    }
    let provider = provider.build();
    let tracer = provider.tracer(format!("herald-{service}"));
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let fmt = match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer().boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init()
        .map_err(|e| TelemetryError::AlreadySet(e.to_string()))?;
    Ok(TelemetryGuard { provider })
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        crate::headers::insert_safe(self.0, key, &value);
    }
}

/// Reads only the trace headers, and only valid ones: a malformed `traceparent` (or an
/// over-long `tracestate`) from outside is dropped with a warning, and a new trace starts.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let value = self.0.get(key).map(|v| v.as_str())?;
        if key.eq_ignore_ascii_case(crate::headers::TRACEPARENT) {
            return checked_traceparent(value);
        }
        if key.eq_ignore_ascii_case(crate::headers::TRACESTATE) {
            return checked_tracestate(value);
        }
        Some(value)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// The longest `tracestate` passed on (W3C Trace Context: 512 characters at least must be
/// propagated; more may be cut).
const MAX_TRACESTATE_LEN: usize = 512;

fn checked_traceparent(value: &str) -> Option<&str> {
    match crate::traceparent::parse(value) {
        Ok(_) => Some(value),
        Err(e) => {
            metrics::counter!("herald_invalid_traceparents_total").increment(1);
            tracing::warn!(
                error = %e,
                traceparent = %crate::headers::safe_value(value, 80),
                "invalid traceparent dropped; starting a new trace"
            );
            None
        }
    }
}

fn checked_tracestate(value: &str) -> Option<&str> {
    if value.len() <= MAX_TRACESTATE_LEN && value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        Some(value)
    } else {
        tracing::warn!(bytes = value.len(), "invalid tracestate dropped");
        None
    }
}

/// Writes the current span's trace context into outgoing NATS headers.
pub fn inject_context(headers: &mut HeaderMap) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
}

/// Makes `span` a child of the trace carried by incoming NATS headers, if any.
pub fn adopt_context(span: &tracing::Span, headers: Option<&HeaderMap>) {
    if let Some(headers) = headers {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        // A missing or malformed traceparent (dropped by the extractor) starts a new trace.
        let _ = span.set_parent(parent);
    }
}

/// The W3C `traceparent` value in `headers`, if there is a valid one (an invalid one is dropped
/// with a warning).
pub fn traceparent(headers: Option<&HeaderMap>) -> Option<String> {
    headers
        .and_then(|h| h.get(crate::headers::TRACEPARENT))
        .and_then(|v| checked_traceparent(v.as_str()))
        .map(str::to_owned)
}

/// Whether text taken from outside (an HTTP header, a SQL setting) is a `traceparent` worth
/// carrying; an invalid one is logged and counted (`herald_invalid_traceparents_total`).
pub fn accept_traceparent(value: &str) -> Option<&str> {
    checked_traceparent(value)
}
