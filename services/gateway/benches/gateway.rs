//! Prints: list-query latency through the gateway (by text and by persisted-query hash, both
//! answered from compiled plans, and through a gateway without plans) against the same rows
//! through plain sqlx, interleaved in one run (and their ratios), committed GraphQL mutations per second and the events per second the relay
//! published for them, and the relay's drain rate for a backlog written straight in SQL.
//!
//! Real servers from the test harness, on this machine. `cargo bench -p herald-gateway`;
//! `HERALD_BENCH_ONLY=relay` runs the relay part alone (for a profiler), `HERALD_BENCH_BACKLOG`
//! sets its size (default 20k); `HERALD_BENCH_ONLY=mutations` runs the mutations and their
//! baseline alone, `HERALD_BENCH_MUTATIONS` sets how many (default 3000).

use std::time::{Duration, Instant};

use herald_gateway::GatewaySettings;
use herald_shared::config::{NatsConfig, StreamsConfig};
use herald_shared::streams;
use herald_test_support::{NatsServer, Postgres};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const SCHEMA: &str = r#"
[entities.Customer]
table = "customers"
key = "id"
fields = { id = "Int", name = "String" }

[entities.Order]
table = "orders"
key = "id"
fields = { id = "Int", customer_id = "Int", status = "String", total = "Float" }

[entities.Order.relations.customer]
entity = "Customer"
kind = "one"
from = "customer_id"
to = "id"
"#;

const API_KEY: &str = "bench-api-key-0123456789";
const QUERIES: usize = 500;
const MUTATIONS: usize = 3000;
const WRITERS: usize = 8;
/// Mutation rounds, each followed by its baseline.
const ROUNDS: usize = 6;
const BACKLOG: i32 = 20_000;
/// The relay's default batch: the baseline publishes in windows of the same size.
const WINDOW: usize = 500;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn stream_messages(js: &async_nats::jetstream::Context) -> u64 {
    js.get_stream(herald_shared::subjects::EVENTS_STREAM)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .state
        .messages
}

async fn wait_for(js: &async_nats::jetstream::Context, n: u64) -> Instant {
    loop {
        if stream_messages(js).await >= n {
            return Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::main]
async fn main() {
    let pg = Postgres::start();
    let nats_server = NatsServer::start();
    let db = PgPool::connect(&pg.url()).await.expect("pg");
    sqlx::raw_sql(
        "CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL);
         CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers(id),
                              status text NOT NULL, total numeric(10,2));
         INSERT INTO customers (name) SELECT 'customer ' || g FROM generate_series(1, 1000) g;
         INSERT INTO orders (customer_id, status, total)
           SELECT 1 + g % 1000, (ARRAY['new','paid','shipped'])[1 + g % 3], g % 500
           FROM generate_series(1, 20000) g;",
    )
    .execute(&db)
    .await
    .expect("seed");
    let nats = herald_shared::nats::connect(
        &NatsConfig {
            url: nats_server.url(),
            ..Default::default()
        },
        "gateway-bench",
    )
    .await
    .expect("nats");
    streams::ensure(
        &nats.jetstream,
        &StreamsConfig::default(),
        &[streams::EVENTS, streams::DLQ],
    )
    .await
    .expect("streams");
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("schema.toml"), SCHEMA).expect("schema");
    let mut settings = GatewaySettings {
        database_url: pg.url(),
        schema_file: dir.path().join("schema.toml"),
        listen: "127.0.0.1:0".parse().expect("addr"),
        max_connections: 20,
        ..Default::default()
    };
    settings
        .auth
        .api_keys
        .insert(API_KEY.into(), "bench".into());
    let shutdown = CancellationToken::new();
    let running = herald_gateway::start(&settings, &nats, shutdown.clone())
        .await
        .expect("gateway");
    let url = format!("http://{}/graphql", running.address);
    let http = reqwest::Client::new();
    let only = std::env::var("HERALD_BENCH_ONLY").ok();
    let backlog: i32 = std::env::var("HERALD_BENCH_BACKLOG")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(BACKLOG);
    let mutations: usize = std::env::var("HERALD_BENCH_MUTATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(MUTATIONS);
    match only.as_deref() {
        Some("relay") => relay(&db, &nats, backlog).await,
        Some("mutations") => {
            mutations_against_plain_inserts(&db, &nats, &http, &url, mutations).await
        }
        _ => {
            queries(&db, &nats, &settings, &http, &url).await;
            mutations_against_plain_inserts(&db, &nats, &http, &url, mutations).await;
            relay(&db, &nats, backlog).await;
        }
    }

    shutdown.cancel();
    running.wait().await;
}

/// Part 1: list queries against plain sqlx.
async fn queries(
    db: &PgPool,
    nats: &herald_shared::nats::Nats,
    settings: &GatewaySettings,
    http: &reqwest::Client,
    url: &str,
) {
    let url = url.to_owned();

    // 1. A list of 50 orders with their customer: through the gateway (by text, answered from
    // its compiled plan; by persisted-query hash; and by a gateway without plans, where the
    // engine parses, validates and resolves every request) against the same rows through plain
    // sqlx. The four are interleaved request by request, so each ratio compares one moment of
    // this (shared, loaded) machine with itself.
    let mut engine_settings = settings.clone();
    engine_settings.graphql.compiled_plans = 0;
    engine_settings.relay.enabled = false;
    let engine_shutdown = CancellationToken::new();
    let engine = herald_gateway::start(&engine_settings, nats, engine_shutdown.clone())
        .await
        .expect("the gateway without plans");
    let engine_url = format!("http://{}/graphql", engine.address);
    let text = "{ orderList(where: {status: {eq: \"paid\"}, total: {gte: 100}}, order_by: [{total: DESC}], limit: 50) { id status total customer { name } } }";
    let hash = format!(
        "{:x}",
        <sha2::Sha256 as sha2::Digest>::digest(text.as_bytes())
    );
    let by_text = serde_json::json!({ "query": text });
    let by_hash =
        serde_json::json!({"extensions": {"persistedQuery": {"version": 1, "sha256Hash": hash}}});
    let mut register = by_hash.clone();
    register["query"] = serde_json::Value::String(text.to_owned());
    let post = |url: &str, body: &serde_json::Value| {
        let request = http.post(url).header("x-api-key", API_KEY).json(body);
        async move {
            let started = Instant::now();
            let body: serde_json::Value = request
                .send()
                .await
                .expect("post")
                .json()
                .await
                .expect("json");
            let took = started.elapsed();
            assert_eq!(
                body["data"]["orderList"].as_array().map(Vec::len),
                Some(50),
                "{body}"
            );
            took
        }
    };
    // The seed's baseline joins before it sorts; the second one looks the customer up for the
    // 50 rows of the page only, as the gateway's statement does (typed rows, no JSON).
    const JOINED: &str = "SELECT o.id, o.status, o.total::float8, c.name FROM orders o \
         LEFT JOIN customers c ON c.id = o.customer_id \
         WHERE o.status = $1 AND o.total >= $2::numeric ORDER BY o.total DESC, o.id LIMIT 50";
    const PAGED: &str = "SELECT o.id, o.status, o.total::float8, \
         (SELECT c.name FROM customers c WHERE c.id = o.customer_id) FROM orders o \
         WHERE o.status = $1 AND o.total >= $2::numeric ORDER BY o.total DESC, o.id LIMIT 50";
    let pool = db;
    let plain_sqlx = |sql: &'static str| async move {
        let started = Instant::now();
        let rows: Vec<(i32, String, Option<f64>, Option<String>)> = sqlx::query_as(sql)
            .bind("paid")
            .bind(100.0_f64)
            .fetch_all(pool)
            .await
            .expect("sqlx");
        let took = started.elapsed();
        assert_eq!(rows.len(), 50);
        took
    };
    post(&url, &register).await;
    const WARM_UP: usize = 50;
    let (mut through_gateway, mut through_apq, mut through_engine, mut through_sqlx) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut through_paged = Vec::new();
    for i in 0..WARM_UP + QUERIES {
        let took = (
            post(&url, &by_text).await,
            post(&url, &by_hash).await,
            post(&engine_url, &by_text).await,
            plain_sqlx(JOINED).await,
            plain_sqlx(PAGED).await,
        );
        if i >= WARM_UP {
            through_gateway.push(took.0);
            through_apq.push(took.1);
            through_engine.push(took.2);
            through_sqlx.push(took.3);
            through_paged.push(took.4);
        }
    }
    engine_shutdown.cancel();
    engine.wait().await;
    for runs in [
        &mut through_gateway,
        &mut through_apq,
        &mut through_engine,
        &mut through_sqlx,
        &mut through_paged,
    ] {
        runs.sort();
    }
    let s50 = percentile(&through_sqlx, 0.5);
    let q50 = percentile(&through_paged, 0.5);
    println!(
        "list query (50 rows + nested customer), {QUERIES} interleaved runs each; plain sqlx (join) p50 {:?} p99 {:?}; plain sqlx (per-page lookup, the gateway's plan shape) p50 {:?} p99 {:?}",
        s50,
        percentile(&through_sqlx, 0.99),
        q50,
        percentile(&through_paged, 0.99),
    );
    for (name, runs) in [
        ("gateway, by text (compiled plan)", &through_gateway),
        (
            "gateway, persisted query by hash (compiled plan)",
            &through_apq,
        ),
        (
            "gateway without plans (engine every request)",
            &through_engine,
        ),
    ] {
        let p50 = percentile(runs, 0.5);
        println!(
            "  {name}: p50 {p50:?} p99 {:?} | ratio p50 to plain sqlx (join) {:.2}x, to plain sqlx (per-page lookup) {:.2}x",
            percentile(runs, 0.99),
            p50.as_secs_f64() / s50.as_secs_f64(),
            p50.as_secs_f64() / q50.as_secs_f64()
        );
    }
}

/// Part 2: committed mutations per second, and events per second published for them, against
/// the same INSERTs through plain sqlx. The two alternate in rounds (each round's events all
/// published before its baseline starts), so the ratio compares the same moments of this
/// (shared, loaded) machine rather than two phases seconds apart.
async fn mutations_against_plain_inserts(
    db: &PgPool,
    nats: &herald_shared::nats::Nats,
    http: &reqwest::Client,
    url: &str,
    mutations: usize,
) {
    let per_writer = (mutations / WRITERS / ROUNDS).max(1);
    let total = (per_writer * WRITERS * ROUNDS) as u64;
    let (mut committed, mut drained, mut plain) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for round in 0..ROUNDS {
        let before = stream_messages(&nats.jetstream).await;
        let started = Instant::now();
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (http, url) = (http.clone(), url.to_owned());
                tokio::spawn(async move {
                    for i in 0..per_writer {
                        let body = serde_json::json!({"query": format!(
                            "mutation {{ createCustomer(input: {{name: \"r{round}-w{w}-{i}\"}}) {{ id }} }}")});
                        let answer: serde_json::Value = http
                            .post(&url)
                            .header("x-api-key", API_KEY)
                            .json(&body)
                            .send()
                            .await
                            .expect("post")
                            .json()
                            .await
                            .expect("json");
                        assert!(answer.get("errors").is_none(), "{answer}");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.expect("writer");
        }
        committed += started.elapsed();
        let events = (per_writer * WRITERS) as u64;
        drained += wait_for(&nats.jetstream, before + events).await - started;

        // The baseline: the same INSERT through plain sqlx by the same number of clients, with
        // capture off (no outbox row, no notify, no GraphQL, no HTTP): the row trigger and,
        // since the notify moved to a statement trigger of its own, that one too.
        sqlx::raw_sql(
            "ALTER TABLE customers DISABLE TRIGGER herald_capture, \
             DISABLE TRIGGER herald_capture_notify",
        )
        .execute(db)
        .await
        .expect("capture off");
        let started = Instant::now();
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let db = db.clone();
                tokio::spawn(async move {
                    for i in 0..per_writer {
                        let _: (i32,) =
                            sqlx::query_as("INSERT INTO customers (name) VALUES ($1) RETURNING id")
                                .bind(format!("plain r{round}-w{w}-{i}"))
                                .fetch_one(&db)
                                .await
                                .expect("insert");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.expect("writer");
        }
        plain += started.elapsed();
        sqlx::raw_sql(
            "ALTER TABLE customers ENABLE TRIGGER herald_capture, \
             ENABLE TRIGGER herald_capture_notify",
        )
        .execute(db)
        .await
        .expect("capture on");
    }
    println!(
        "mutations: {total} by {WRITERS} concurrent clients in {ROUNDS} rounds, {committed:?} in all = {:.0} committed/s; all events published after {drained:?} = {:.0} events/s",
        total as f64 / committed.as_secs_f64(),
        total as f64 / drained.as_secs_f64()
    );
    println!(
        "baseline: the same {total} INSERTs through plain sqlx by {WRITERS} clients, capture and notify triggers off, alternating with them, in {plain:?} = {:.0}/s; gateway mutations ratio {:.2}",
        total as f64 / plain.as_secs_f64(),
        plain.as_secs_f64() / committed.as_secs_f64()
    );
}

/// Part 3: the relay alone, a backlog committed straight in SQL and drained to JetStream; then,
/// in the same run, the baseline: the same number of event-sized messages with a Msg-Id
/// published straight to the stream in windows of the relay's batch size (no PostgreSQL).
async fn relay(db: &PgPool, nats: &herald_shared::nats::Nats, backlog: i32) {
    let before = stream_messages(&nats.jetstream).await;
    let started = Instant::now();
    sqlx::query("INSERT INTO customers (name) SELECT 'bulk ' || g FROM generate_series(1, $1) g")
        .bind(backlog)
        .execute(db)
        .await
        .expect("bulk insert");
    let inserted = started.elapsed();
    let done = wait_for(&nats.jetstream, before + backlog as u64).await;
    let drained = done - started;
    // The statement's own time is the capture trigger's; the relay starts publishing only once
    // it has committed, so the drain after commit is the relay's rate alone.
    let after_commit = drained.saturating_sub(inserted);
    let relay_rate = f64::from(backlog) / after_commit.as_secs_f64();
    println!(
        "relay: {backlog} events committed in one SQL statement ({inserted:?}, {:.0} rows/s through the capture trigger), all published after {drained:?} = {:.0} events/s; drain after commit {after_commit:?} = {relay_rate:.0} events/s",
        f64::from(backlog) / inserted.as_secs_f64(),
        f64::from(backlog) / drained.as_secs_f64(),
    );

    let bare = bare_publish(&nats.jetstream, backlog as usize).await;
    let bare_rate = f64::from(backlog) / bare.as_secs_f64();
    println!(
        "baseline: {backlog} events serialised and published with a Msg-Id straight to HERALD_EVENTS, acks awaited per window of {WINDOW}, in {bare:?} = {bare_rate:.0} events/s; relay drain ratio {:.2}",
        relay_rate / bare_rate
    );
}

/// What the relay's publishing costs without PostgreSQL: events like the relay's (a customer
/// row, Msg-Id and traceparent headers) serialised, published, and acked window by window.
async fn bare_publish(js: &async_nats::jetstream::Context, count: usize) -> Duration {
    use herald_shared::{EntityEvent, Op, SCHEMA_VERSION, headers, subjects};
    let started = Instant::now();
    let mut next = 0;
    while next < count {
        let end = (next + WINDOW).min(count);
        let mut acks = Vec::with_capacity(end - next);
        for i in next..end {
            let event = EntityEvent {
                id: uuid::Uuid::now_v7(),
                entity: "Customer".into(),
                op: Op::Insert,
                key: i.to_string(),
                data: Some(serde_json::json!({"id": i, "name": format!("bare {i}")})),
                before: None,
                changed: None,
                at: chrono::Utc::now(),
                actor: None,
                tx: 1,
                schema_version: SCHEMA_VERSION,
            };
            let mut h = async_nats::HeaderMap::new();
            h.insert(headers::MSG_ID, event.id.to_string().as_str());
            let parent = format!("00-{}-{:016x}-01", event.id.simple(), i + 1);
            h.insert(headers::TRACEPARENT, parent.as_str());
            let subject =
                subjects::keyed_event(&event.entity, event.op, &event.key).expect("subject");
            let body = serde_json::to_vec(&event).expect("event json");
            acks.push(
                js.send_publish(
                    subject,
                    async_nats::jetstream::message::PublishMessage::build()
                        .payload(body.into())
                        .headers(h),
                )
                .await
                .expect("publish"),
            );
        }
        next = end;
        for ack in acks {
            ack.await.expect("ack");
        }
    }
    started.elapsed()
}
