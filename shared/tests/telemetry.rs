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

#[test]
fn an_invalid_traceparent_is_dropped_and_a_new_trace_starts() {
    let _guard = telemetry::init("test", &TelemetryConfig::default()).expect("telemetry");
    let zero_trace = opentelemetry::trace::TraceId::INVALID;
    for hostile in [
        "00-abc-def-01".to_owned(),
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_owned(),
        format!(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 {}",
            "x".repeat(64 * 1024)
        ),
    ] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(herald_shared::headers::TRACEPARENT, hostile.as_str());
        assert_eq!(
            telemetry::traceparent(Some(&headers)),
            None,
            "{hostile:.60}"
        );
        let consumer = tracing::info_span!("consume");
        telemetry::adopt_context(&consumer, Some(&headers));
        let mut outgoing = async_nats::HeaderMap::new();
        consumer.in_scope(|| telemetry::inject_context(&mut outgoing));
        let carried = telemetry::traceparent(Some(&outgoing)).expect("a new, valid traceparent");
        assert!(!carried.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_ne!(
            consumer.context().span().span_context().trace_id(),
            zero_trace
        );
    }
}
