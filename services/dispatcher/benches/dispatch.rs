//! Events/s through the dispatcher against baselines measured in the same run, each with its ratio:
//! a bare pull consumer that only acks each event (the ceiling), and a bare loop that consumes an
//! event, publishes N requests with a Msg-Id, awaits their acks and then acks the event (what the
//! dispatcher must do at least, with no observers, conditions or lanes). Two cases: 10 observers
//! with 5 matching (N = 5), and 1 observer matching (N = 1).
//!
//! `cargo bench -p herald-dispatcher` (HERALD_BENCH_EVENTS to change the event count).
//!
//! `HERALD_BENCH_CLUSTER=1 cargo bench -p herald-dispatcher`: instead, events/s dispatched by 1,
//! 2 and 4 dispatchers sharing HERALD_EVENTS' 4 partitions on a 3-node cluster with R3 streams
//! (1 observer matching, so 1 action per event). Each count has its own dispatcher name and
//! observer: its processes start on an emptied stream and settle their shares (every partition
//! held, the shares even, every consumer created: lease moves while processes join are not
//! measured), then the events are published, and the rate is events over the time from the
//! first publish to the last event acked. The publishing time is printed beside it: a rate close
//! to it means the dispatchers kept up with the publisher, so their ceiling is higher.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use chrono::Utc;
use futures::StreamExt;
use herald_dispatcher::partition::{Health, Partition};
use herald_dispatcher::{DispatcherSettings, Observers, lease};
use herald_shared::config::StreamsConfig;
use herald_shared::subjects::{self, EVENTS_STREAM};
use herald_shared::{EntityEvent, Op, SCHEMA_VERSION, headers, streams};
use herald_test_support::{NatsCluster, NatsServer};
use tokio_util::sync::CancellationToken;

fn observers_file(observers: usize) -> String {
    observers_named("o", observers)
}

/// `observers` observers named `<prefix><i>`, every other one matching.
fn observers_named(prefix: &str, observers: usize) -> String {
    let mut text = String::new();
    for i in 0..observers {
        // Same entity and operation for all: the half that does not match is rejected by its
        // condition, so every observer costs an evaluation.
        let condition = if i % 2 == 0 {
            "data.n >= 0"
        } else {
            "data.n < 0"
        };
        text.push_str(&format!(
            "[[observer]]\nname = \"{prefix}{i}\"\nentity = \"Order\"\nops = [\"insert\"]\n\
             condition = '{condition}'\n\n[[observer.action]]\nkind = \"webhook\"\n\
             url = \"https://example.test/{i}\"\n\n"
        ));
    }
    text
}

/// `count` Order inserts over 1,000 keys, unkeyed (`herald.events.Order.insert`) or, for
/// partitioned dispatch, on each key's subject.
async fn publish_events(js: &jetstream::Context, count: u64, keyed: bool) {
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
        let subject = if keyed {
            subjects::keyed_event(&event.entity, event.op, &event.key).expect("valid")
        } else {
            subjects::event(&event.entity, event.op).expect("valid")
        };
        acks.push(
            js.publish_with_headers(subject, h, body.into())
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
    let mut messages = bare_consumer(js, "ceiling").await;
    let started = Instant::now();
    for _ in 0..count {
        let message = messages.next().await.expect("message").expect("ok");
        message.ack().await.expect("ack");
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// The dispatcher's floor: consume an event, publish `fanout` requests with a Msg-Id each, await
/// their acks, then ack the event. No observers, conditions, lanes or checkpoints.
async fn bare_dispatch(js: &jetstream::Context, count: u64, fanout: usize) -> f64 {
    let name = format!("bare{fanout}");
    let mut messages = bare_consumer(js, &name).await;
    let subjects: Vec<String> = (0..fanout)
        .map(|i| format!("herald.actions.webhook.{name}{i}"))
        .collect();
    let started = Instant::now();
    let mut acks = Vec::with_capacity(fanout);
    for _ in 0..count {
        let message = messages.next().await.expect("message").expect("ok");
        let event: EntityEvent = serde_json::from_slice(&message.payload).expect("event");
        for (i, subject) in subjects.iter().enumerate() {
            let mut h = HeaderMap::new();
            h.insert(headers::MSG_ID, format!("{}:{name}:{i}", event.id).as_str());
            let body = serde_json::to_vec(&event).expect("json");
            acks.push(
                js.publish_with_headers(subject.clone(), h, body.into())
                    .await
                    .expect("publish"),
            );
        }
        for ack in acks.drain(..) {
            ack.await.expect("stored");
        }
        message.ack().await.expect("ack");
    }
    count as f64 / started.elapsed().as_secs_f64()
}

async fn bare_consumer(js: &jetstream::Context, name: &str) -> consumer::pull::Stream {
    let stream = js.get_stream(EVENTS_STREAM).await.expect("stream");
    let reader: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(name.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 4096,
            ..Default::default()
        })
        .await
        .expect("consumer");
    reader
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await
        .expect("messages")
}

async fn dispatcher(js: &jetstream::Context, count: u64, name: &str, observers: usize) -> f64 {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), observers_file(observers)).expect("write");
    let settings = DispatcherSettings {
        name: name.into(),
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
        herald_dispatcher::partition::Health::new(),
        shutdown.clone(),
    ));
    let stream = js.get_stream(EVENTS_STREAM).await.expect("stream");
    loop {
        if let Ok(info) = stream.consumer_info(name).await
            && info.ack_floor.stream_sequence >= count
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    shutdown.cancel();
    run.await.expect("task");
    rate
}

/// The partitions of the cluster mode, and the lease TTL that lets processes joining at once
/// settle their shares within a few seconds.
const CLUSTER_PARTITIONS: u32 = 4;
const CLUSTER_LEASE_TTL: Duration = Duration::from_secs(2);

/// `processes` dispatchers sharing the partitions, each on its own connection to the cluster,
/// dispatch `count` events published once their shares settled. Returns events/s, the
/// publishing time and the CPU seconds this process (dispatchers and publisher) used meanwhile.
async fn dispatchers_on(
    cluster: &NatsCluster,
    count: u64,
    processes: usize,
) -> (f64, Duration, f64) {
    let name = format!("cluster{processes}");
    let js = cluster.jetstream().await;
    let stream = js.get_stream(EVENTS_STREAM).await.expect("stream");
    stream.purge().await.expect("purge the events stream");
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), observers_named(&format!("{name}o"), 1)).expect("write");
    let observers = Arc::new(Observers::load(file.path()).expect("valid"));
    let shutdown = CancellationToken::new();
    let mut runs = Vec::new();
    for _ in 0..processes {
        let settings = DispatcherSettings {
            name: name.clone(),
            observers: file.path().to_owned(),
            lease_ttl: CLUSTER_LEASE_TTL,
            ..Default::default()
        };
        runs.push(tokio::spawn(herald_dispatcher::run(
            cluster.jetstream().await,
            settings,
            Arc::clone(&observers),
            Health::new(),
            shutdown.clone(),
        )));
    }
    let partitions = Partition::all(&name, CLUSTER_PARTITIONS);
    // Events not yet acked by the partitions' consumers, once all of them exist.
    let left = || async {
        let mut left = 0;
        for partition in &partitions {
            let info = stream.consumer_info(&partition.name).await.ok()?;
            left += info.num_pending + info.num_ack_pending as u64;
        }
        Some(left)
    };
    let store = lease::bucket(&js, CLUSTER_LEASE_TTL).await.expect("leases");
    let even = CLUSTER_PARTITIONS as usize / processes;
    loop {
        let mut shares = std::collections::BTreeMap::<String, usize>::new();
        for partition in &partitions {
            if let Ok(Some(holder)) = store.get(&partition.name).await {
                *shares
                    .entry(String::from_utf8_lossy(&holder).into_owned())
                    .or_default() += 1;
            }
        }
        if shares.len() == processes
            && shares.values().all(|n| *n == even)
            && left().await.is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let cpu_before = cpu_seconds();
    publish_events(&js, count, true).await;
    let publishing = started.elapsed();
    while left().await != Some(0) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    shutdown.cancel();
    for run in runs {
        run.await.expect("task");
    }
    (rate, publishing, cpu)
}

/// CPU time this process has used (user + system, every thread), from /proc/self/stat in
/// clock ticks of 1/100 s (Linux's USER_HZ); 0 where it cannot be read.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime, the 14th and 15th fields: the 12th and 13th after the name.
    (ticks(11) + ticks(12)) / 100.0
}

async fn cluster(count: u64) {
    let cluster = NatsCluster::start();
    let js = cluster.jetstream().await;
    let config = StreamsConfig {
        replicas: herald_test_support::CLUSTER_SIZE,
        event_partitions: CLUSTER_PARTITIONS,
        ..StreamsConfig::default()
    };
    streams::ensure(&js, &config, &herald_dispatcher::STREAMS)
        .await
        .expect("streams");
    println!(
        "events: {count} over 1000 keys on a {}-node cluster, R{}, {CLUSTER_PARTITIONS} partitions, 1 action per event",
        herald_test_support::CLUSTER_SIZE,
        herald_test_support::CLUSTER_SIZE,
    );
    let mut previous: Option<f64> = None;
    for processes in [1, 2, 4] {
        let (rate, publishing, cpu) = dispatchers_on(&cluster, count, processes).await;
        let change = previous.map_or(String::new(), |p| {
            format!(", {:.2}x the previous", rate / p)
        });
        println!(
            "{processes} dispatcher(s): {rate:>8.0} events/s ({:.0} per dispatcher{change}); \
             publishing alone took {publishing:.2?} ({:.0} events/s); CPU of dispatchers and \
             publisher {:.0} µs per event",
            rate / processes as f64,
            count as f64 / publishing.as_secs_f64(),
            cpu * 1e6 / count as f64,
        );
        previous = Some(rate);
    }
}

#[tokio::main]
async fn main() {
    let count: u64 = std::env::var("HERALD_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    if std::env::var("HERALD_BENCH_CLUSTER").is_ok_and(|v| v == "1") {
        cluster(count).await;
        return;
    }
    let nats = NatsServer::start();
    let js = nats.jetstream().await;
    streams::ensure(&js, &StreamsConfig::default(), &herald_dispatcher::STREAMS)
        .await
        .expect("streams");
    publish_events(&js, count, false).await;

    let bare = ceiling(&js, count).await;
    let bare5 = bare_dispatch(&js, count, 5).await;
    let dispatched5 = dispatcher(&js, count, "bench", 10).await;
    let bare1 = bare_dispatch(&js, count, 1).await;
    let dispatched1 = dispatcher(&js, count, "bench1", 1).await;
    println!("events: {count}");
    println!("bare ack-each consumer (ceiling):          {bare:>10.0} events/s");
    println!("10 observers, 5 matching, 1 action each (5 actions per event):");
    println!("  bare consume → publish 5 → await → ack: {bare5:>10.0} events/s");
    println!("  dispatcher:                             {dispatched5:>10.0} events/s");
    println!(
        "  ratio to bare publish-5 loop: {:.2}; to ceiling: {:.2}",
        dispatched5 / bare5,
        dispatched5 / bare
    );
    println!("1 observer matching (1 action per event):");
    println!("  bare consume → publish 1 → await → ack: {bare1:>10.0} events/s");
    println!("  dispatcher:                             {dispatched1:>10.0} events/s");
    println!(
        "  ratio to bare publish-1 loop: {:.2}; to ceiling: {:.2}",
        dispatched1 / bare1,
        dispatched1 / bare
    );
}
