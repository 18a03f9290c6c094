//! Events/s through the dispatcher (10 observers, half of them matching, one action each)
//! against the ceiling measured in the same run: a bare pull consumer that only acks each event.
//!
//! `cargo bench -p herald-dispatcher` (HERALD_BENCH_EVENTS to change the event count).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use chrono::Utc;
use futures::StreamExt;
use herald_dispatcher::{DispatcherSettings, Observers};
use herald_shared::config::StreamsConfig;
use herald_shared::subjects::EVENTS_STREAM;
use herald_shared::{EntityEvent, Op, SCHEMA_VERSION, headers, streams};
use herald_test_support::NatsServer;
use tokio_util::sync::CancellationToken;

fn observers_file() -> String {
    let mut text = String::new();
    for i in 0..10 {
        // Same entity and operation for all: the half that does not match is rejected by its
        // condition, so every observer costs an evaluation.
        let condition = if i % 2 == 0 {
            "data.n >= 0"
        } else {
            "data.n < 0"
        };
        text.push_str(&format!(
            "[[observer]]\nname = \"o{i}\"\nentity = \"Order\"\nops = [\"insert\"]\n\
             condition = '{condition}'\n\n[[observer.action]]\nkind = \"webhook\"\n\
             url = \"https://example.test/{i}\"\n\n"
        ));
    }
    text
}

async fn publish_events(js: &jetstream::Context, count: u64) {
    let mut acks = Vec::with_capacity(1024);
    for n in 0..count {
        let event = EntityEvent {
            id: uuid::Uuid::now_v7(),
            entity: "Order".into(),
            op: Op::Insert,
            key: (n % 1000).to_string(),
            data: Some(serde_json::json!({"n": n, "status": "new"})),
            before: None,
            changed: None,
            at: Utc::now(),
            actor: None,
            tx: n as i64,
            schema_version: SCHEMA_VERSION,
        };
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, event.id.to_string().as_str());
        let body = serde_json::to_vec(&event).expect("json");
        acks.push(
            js.publish_with_headers("herald.events.Order.insert", h, body.into())
                .await
                .expect("publish"),
        );
        if acks.len() == 1024 {
            for ack in acks.drain(..) {
                ack.await.expect("stored");
            }
        }
    }
    for ack in acks {
        ack.await.expect("stored");
    }
}

/// A durable pull consumer that acks each event and does nothing else.
async fn ceiling(js: &jetstream::Context, count: u64) -> f64 {
    let stream = js.get_stream(EVENTS_STREAM).await.expect("stream");
    let reader: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("ceiling".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 4096,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let started = Instant::now();
    let mut messages = reader
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await
        .expect("messages");
    for _ in 0..count {
        let message = messages.next().await.expect("message").expect("ok");
        message.ack().await.expect("ack");
    }
    count as f64 / started.elapsed().as_secs_f64()
}

async fn dispatcher(js: &jetstream::Context, count: u64) -> f64 {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), observers_file()).expect("write");
    let settings = DispatcherSettings {
        name: "bench".into(),
        observers: file.path().to_owned(),
        ..Default::default()
    };
    let observers = Arc::new(Observers::load(file.path()).expect("valid"));
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let run = tokio::spawn(herald_dispatcher::run(
        js.clone(),
        settings,
        observers,
        shutdown.clone(),
    ));
    let stream = js.get_stream(EVENTS_STREAM).await.expect("stream");
    loop {
        if let Ok(info) = stream.consumer_info("bench").await
            && info.ack_floor.stream_sequence >= count
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    shutdown.cancel();
    run.await.expect("task").expect("run");
    rate
}

#[tokio::main]
async fn main() {
    let count: u64 = std::env::var("HERALD_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let nats = NatsServer::start();
    let js = nats.jetstream().await;
    streams::ensure(&js, &StreamsConfig::default(), &herald_dispatcher::STREAMS)
        .await
        .expect("streams");
    publish_events(&js, count).await;

    let bare = ceiling(&js, count).await;
    let dispatched = dispatcher(&js, count).await;
    println!("events: {count}; 10 observers, 5 matching, 1 action each (5 actions per event)");
    println!("bare ack-each consumer: {bare:>10.0} events/s");
    println!("dispatcher:             {dispatched:>10.0} events/s");
    println!("ratio:                  {:>10.2}", dispatched / bare);
}
