//! Webhooks per second to a loopback sink with Redis dedup on, and the p50/p99 latency from
//! publishing an ActionRequest to the receiver getting the signed request, against a baseline
//! measured in the same run: a bare loop that signs and POSTs the same requests at the same
//! concurrency to the same sink, with no NATS and no Redis. Prints its figures and the ratio;
//! asserts nothing. `cargo bench -p herald-action-worker --bench webhooks [-- <actions>]`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use axum::http::HeaderMap as HttpHeaders;
use chrono::Utc;
use herald_action_worker::Settings;
use herald_shared::messages::{ActionRequest, EntityEvent, Op};
use herald_shared::{RetryPolicy, SCHEMA_VERSION, headers, subjects};
use herald_test_support::{NatsServer, RedisServer};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// When the sink first saw each webhook-id, and how many distinct ids it has seen: the phases
/// wait on the count, which costs nothing, and read the times once at the end (scanning the map
/// while the burst ran took a quarter of the process and held the lock the sink records under).
#[derive(Default)]
struct Sink {
    arrivals: Mutex<HashMap<String, Instant>>,
    seen: std::sync::atomic::AtomicUsize,
}

type Arrivals = Arc<Sink>;

const CONCURRENCY: usize = 128;
/// Publish acks awaited together while the actions are published.
const ACK_WINDOW: usize = 1_000;
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The baseline: `concurrency` tasks that build, sign and POST the same requests the worker would
/// send (event JSON body, Standard Webhooks headers) straight to the sink. No NATS, no Redis.
async fn bare_posts(url: &str, count: usize, concurrency: usize) -> anyhow::Result<Duration> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let key = herald_action_worker::webhook::secret_key(SECRET)?;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, next, key, url) =
                (client.clone(), next.clone(), key.clone(), url.to_owned());
            tokio::spawn(async move {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= count {
                        return anyhow::Ok(());
                    }
                    let mut request = request(&url, index);
                    request.id = format!("bare:{}", request.id);
                    let body = serde_json::to_vec(&request.event)?;
                    let timestamp = Utc::now().timestamp();
                    let signature =
                        herald_action_worker::webhook::sign(&key, &request.id, timestamp, &body);
                    let response = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("webhook-id", &request.id)
                        .header("webhook-timestamp", timestamp.to_string())
                        .header("webhook-signature", signature)
                        .body(body)
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await?;
                    anyhow::ensure!(
                        response.status().is_success(),
                        "sink answered {}",
                        response.status()
                    );
                    response.bytes().await?;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(started.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let count: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5_000);
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let jetstream = nats.jetstream().await;
    herald_shared::streams::ensure_all(&jetstream, &Default::default()).await?;

    let arrivals: Arrivals = Arc::default();
    let recorded = arrivals.clone();
    let app = axum::Router::new().fallback(move |headers: HttpHeaders| {
        let recorded = recorded.clone();
        async move {
            if let Some(id) = headers.get("webhook-id").and_then(|v| v.to_str().ok()) {
                let mut arrivals = recorded.arrivals.lock().expect("arrivals lock");
                if !arrivals.contains_key(id) {
                    arrivals.insert(id.to_owned(), Instant::now());
                    recorded
                        .seen
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let settings = Settings {
        redis_url: redis.url(),
        ssrf_allow: vec!["127.0.0.1".into()],
        concurrency: CONCURRENCY,
        // One sink takes every request, as in the baseline: at the default share of 8 per
        // destination the other 120 slots would only put actions back.
        per_destination_concurrency: CONCURRENCY,
        webhook_secrets: HashMap::from([("bench".into(), SECRET.into())]),
        ..Settings::default()
    };
    let shutdown = CancellationToken::new();
    let dedup = herald_action_worker::dedup(&settings)?;
    let worker = tokio::spawn(herald_action_worker::run(
        jetstream.clone(),
        settings,
        dedup,
        shutdown.clone(),
    ));

    let bare = bare_posts(&url, count, CONCURRENCY).await?;
    println!(
        "baseline: bare loop signing and POSTing {count} requests to the same sink, concurrency {CONCURRENCY}: {:.2}s = {:.0} webhooks/s",
        bare.as_secs_f64(),
        count as f64 / bare.as_secs_f64()
    );
    let subject = subjects::action("webhook", "bench")?;
    let burst = phase(&jetstream, &subject, &url, &arrivals, count, None).await?;
    report(&format!("burst of {count}"), &burst);
    println!(
        "burst of {count}: ratio to the bare POST loop {:.2}",
        (burst.delivered as f64 / burst.elapsed.as_secs_f64())
            / (count as f64 / bare.as_secs_f64())
    );
    let paced = phase(
        &jetstream,
        &subject,
        &url,
        &arrivals,
        count / 5,
        Some(Duration::from_millis(5)),
    )
    .await?;
    report(&format!("{} paced at 200/s", count / 5), &paced);
    shutdown.cancel();
    worker.await??;
    Ok(())
}

struct Phase {
    delivered: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// Publishes `count` actions (all at once, or one per `pace`) and waits for the sink to see them.
async fn phase(
    jetstream: &async_nats::jetstream::Context,
    subject: &str,
    url: &str,
    arrivals: &Arrivals,
    count: usize,
    pace: Option<Duration>,
) -> anyhow::Result<Phase> {
    let mut published = HashMap::with_capacity(count);
    // Phases run one after another with fresh ids, so what the sink sees from here on is ours.
    let seen_before = arrivals.seen.load(std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let mut acks = Vec::with_capacity(ACK_WINDOW);
    for index in 0..count {
        let request = request(url, index);
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, request.id.as_str());
        let body = serde_json::to_vec(&request)?;
        published.insert(request.id.clone(), Instant::now());
        acks.push(
            jetstream
                .send_publish(
                    subject.to_owned(),
                    PublishMessage::build().payload(body.into()).headers(h),
                )
                .await?,
        );
        // Awaited in windows: the context lets 5,000 acks be outstanding (shared with the
        // worker's own publishes), and holding more would stop every publish.
        if acks.len() == ACK_WINDOW {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
        if let Some(pace) = pace {
            tokio::time::sleep(pace).await;
        }
    }
    for ack in acks {
        ack.await?;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let seen = || arrivals.seen.load(std::sync::atomic::Ordering::Relaxed) - seen_before;
    while seen() < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    let arrivals = arrivals.arrivals.lock().expect("arrivals lock");
    let mut latencies: Vec<Duration> = published
        .iter()
        .filter_map(|(id, p)| arrivals.get(id).map(|at| at.saturating_duration_since(*p)))
        .collect();
    latencies.sort();
    Ok(Phase {
        delivered: latencies.len(),
        elapsed,
        latencies,
    })
}

fn report(name: &str, phase: &Phase) {
    let pct = |p: f64| {
        phase.latencies[((phase.latencies.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e3
    };
    println!(
        "{name}: {} delivered in {:.2}s = {:.0} webhooks/s (dedup on, signed, loopback sink, concurrency 128)",
        phase.delivered,
        phase.elapsed.as_secs_f64(),
        phase.delivered as f64 / phase.elapsed.as_secs_f64()
    );
    if !phase.latencies.is_empty() {
        println!(
            "{name}: latency publish → receiver p50 {:.1} ms, p99 {:.1} ms",
            pct(0.50),
            pct(0.99)
        );
    }
}

fn request(url: &str, index: usize) -> ActionRequest {
    let event = EntityEvent {
        id: Uuid::now_v7(),
        entity: "Order".into(),
        op: Op::Insert,
        key: index.to_string(),
        data: Some(serde_json::json!({"id": index, "status": "new"})),
        before: None,
        changed: None,
        at: Utc::now(),
        actor: None,
        tx: index as i64,
        schema_version: SCHEMA_VERSION,
    };
    ActionRequest {
        id: ActionRequest::action_id(event.id, "bench", 0),
        kind: "webhook".into(),
        observer: "bench".into(),
        action_index: 0,
        config: serde_json::json!({ "url": url }),
        retry: RetryPolicy::default(),
        timeout_ms: 5_000,
        event,
        created_at: Utc::now(),
        schema_version: SCHEMA_VERSION,
        order: None,
    }
}
