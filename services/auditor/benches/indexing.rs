//! Documents/s the auditor indexes from an event backlog into osmem-server, against a baseline
//! measured in the same run: the same documents sent with the same bulk size straight to the
//! cluster, without NATS. Then the lag behind the stream while events arrive at a paced
//! 1,000/s.
//!
//! `cargo bench -p herald-auditor` (HERALD_BENCH_EVENTS: backlog size, default 20000 so a run
//! takes a couple of minutes; 100000 for the figure. HERALD_BENCH_PACED_SECONDS: length
//! of the paced run, default 10).

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use chrono::Utc;
use herald_auditor::document::{Document, Incoming};
use herald_auditor::{Auditor, AuditorSettings, Cluster, Kind, bulk, indexer};
use herald_shared::{EntityEvent, Op, SCHEMA_VERSION, headers, streams};
use herald_test_support::{NatsServer, OpenSearchServer};
use tokio_util::sync::CancellationToken;

const BULK: usize = 1_000;

fn count_from_env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn event(n: u64) -> EntityEvent {
    EntityEvent {
        id: uuid::Uuid::now_v7(),
        entity: "Order".into(),
        op: Op::Update,
        key: (n % 5_000).to_string(),
        data: Some(
            serde_json::json!({"id": n, "status": "shipped", "total": 129.5, "customer": {"name": "Ada", "tier": "gold"}}),
        ),
        before: Some(serde_json::json!({"id": n, "status": "paid", "total": 129.5})),
        changed: Some(vec!["status".into()]),
        at: Utc::now(),
        actor: Some("user-1".into()),
        tx: n as i64,
        schema_version: SCHEMA_VERSION,
    }
}

async fn publish(js: &jetstream::Context, events: &[EntityEvent]) {
    let mut acks = Vec::with_capacity(1024);
    for e in events {
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, e.id.to_string().as_str());
        let body = serde_json::to_vec(e).expect("json");
        let message = PublishMessage::build().payload(body.into()).headers(h);
        acks.push(
            js.send_publish("herald.events.Order.update", message)
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

fn settings(url: &str, prefix: &str) -> AuditorSettings {
    AuditorSettings {
        cluster_url: url.to_owned(),
        index_prefix: prefix.to_owned(),
        bulk_max_docs: BULK,
        bulk_max_wait: Duration::from_millis(20),
        api_token: "bench-token-0123456789".into(),
        ..AuditorSettings::default()
    }
}

/// The same documents, the same bulk size, one bulk after another: what the cluster takes
/// without NATS, consumers or acks in the way.
async fn baseline(url: &str, events: &[EntityEvent]) -> f64 {
    let cluster = Cluster::new(&settings(url, "baseline")).expect("client");
    cluster.setup().await.expect("templates");
    let documents: Vec<Document> = events
        .iter()
        .map(|e| {
            let message = Incoming {
                subject: "herald.events.Order.update".into(),
                headers: None,
                payload: serde_json::to_vec(e).expect("json").into(),
                published: e.at,
                sequence: 0,
            };
            Kind::Event.document(&message).expect("document")
        })
        .collect();
    let started = Instant::now();
    for chunk in documents.chunks(BULK) {
        let refs: Vec<&Document> = chunk.iter().collect();
        bulk::send(&cluster, &refs).await.expect("bulk");
    }
    events.len() as f64 / started.elapsed().as_secs_f64()
}

async fn backlog(js: &jetstream::Context) -> u64 {
    let name = indexer::consumer_name("auditor", Kind::Event);
    match js.get_stream("HERALD_EVENTS").await {
        Ok(stream) => match stream.consumer_info(&name).await {
            Ok(info) => info.num_pending + info.num_ack_pending as u64,
            Err(_) => u64::MAX,
        },
        Err(_) => u64::MAX,
    }
}

#[tokio::main]
async fn main() {
    let total = count_from_env("HERALD_BENCH_EVENTS", 20_000);
    let paced_seconds = count_from_env("HERALD_BENCH_PACED_SECONDS", 10);
    let nats = NatsServer::start();
    let osmem = OpenSearchServer::start();
    let js = nats.jetstream().await;
    streams::ensure_all(&js, &Default::default())
        .await
        .expect("streams");

    let events: Vec<EntityEvent> = (0..total).map(event).collect();
    let bare = baseline(&osmem.url(), &events).await;

    publish(&js, &events).await;
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let auditor = Auditor::start(
        js.clone(),
        settings(&osmem.url(), "herald"),
        shutdown.clone(),
    )
    .await
    .expect("auditor");
    while backlog(&js).await != 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let through = total as f64 / started.elapsed().as_secs_f64();

    // Paced: 1,000 events/s in steps of 10 every 10 ms, sampling the lag meanwhile.
    let mut worst = 0;
    let mut samples = Vec::new();
    let paced_total = paced_seconds * 1_000;
    let begin = Instant::now();
    for step in 0..paced_total / 10 {
        let batch: Vec<EntityEvent> = (0..10).map(|n| event(step * 10 + n)).collect();
        publish(&js, &batch).await;
        if step % 10 == 0 {
            let lag = backlog(&js).await;
            worst = worst.max(lag);
            samples.push(lag);
        }
        let due = begin + Duration::from_millis((step + 1) * 10);
        tokio::time::sleep_until(due.into()).await;
    }
    let last_published = Instant::now();
    while backlog(&js).await != 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain = last_published.elapsed();
    samples.sort_unstable();
    let median = samples.get(samples.len() / 2).copied().unwrap_or(0);

    println!("auditor indexing, {total} events of backlog into osmem-server, bulks of {BULK}:");
    println!("  baseline (bare bulk indexing, no NATS): {bare:>9.0} docs/s");
    println!(
        "  auditor (consume, bulk, ack):          {through:>9.0} docs/s  ({:.2} of baseline)",
        through / bare
    );
    println!(
        "paced 1000 events/s for {paced_seconds} s: lag median {median} events, worst {worst} events; \
         caught up {:.0} ms after the last publish",
        drain.as_secs_f64() * 1000.0
    );
    shutdown.cancel();
    auditor.wait().await;
}
