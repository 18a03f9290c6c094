//! Trace context crosses a NATS message: the consumer's span joins the producer's trace.

use herald_shared::config::TelemetryConfig;
use herald_shared::telemetry;
use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

#[test]
fn a_consumer_span_continues_the_producer_trace() {
    let _guard = telemetry::init("test", &TelemetryConfig::default()).expect("telemetry");

    let producer = tracing::info_span!("publish");
    let mut headers = async_nats::HeaderMap::new();
    let produced_trace = producer.in_scope(|| {
        telemetry::inject_context(&mut headers);
        tracing::Span::current()
            .context()
            .span()
            .span_context()
            .trace_id()
    });
    let traceparent = telemetry::traceparent(Some(&headers)).expect("traceparent header");
    assert!(
        traceparent.contains(&produced_trace.to_string()),
        "{traceparent} does not carry {produced_trace}"
    );

    let consumer = tracing::info_span!("consume");
    telemetry::adopt_context(&consumer, Some(&headers));
    let consumed_trace = consumer.context().span().span_context().trace_id();
    assert_eq!(consumed_trace, produced_trace);
}
