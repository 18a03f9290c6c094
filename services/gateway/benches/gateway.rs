//! Prints: list-query latency through the gateway against the same rows through plain sqlx (and
//! their ratio), committed GraphQL mutations per second and the events per second the relay
//! published for them, and the relay's drain rate for a backlog written straight in SQL.
//!
//! Real servers from the test harness, on this machine. `cargo bench -p herald-gateway`.

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
const BACKLOG: i32 = 20_000;

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

    // 1. A list of 50 orders with their customer: gateway vs the same rows through plain sqlx.
    let query = serde_json::json!({"query":
        "{ orderList(where: {status: {eq: \"paid\"}, total: {gte: 100}}, order_by: [{total: DESC}], limit: 50) { id status total customer { name } } }"});
    let mut through_gateway = Vec::with_capacity(QUERIES);
    for _ in 0..QUERIES {
        let started = Instant::now();
        let body: serde_json::Value = http
            .post(&url)
            .header("x-api-key", API_KEY)
            .json(&query)
            .send()
            .await
            .expect("post")
            .json()
            .await
            .expect("json");
        through_gateway.push(started.elapsed());
        assert_eq!(body["data"]["orderList"].as_array().map(Vec::len), Some(50));
    }
    // The same query as an automatic persisted query: registered once, then sent by hash only
    // (the parsed document comes from the cache).
    let text = query["query"].as_str().expect("query text");
    let hash = format!(
        "{:x}",
        <sha2::Sha256 as sha2::Digest>::digest(text.as_bytes())
    );
    let persisted = |with_text: bool| {
        let mut body = serde_json::json!({"extensions": {"persistedQuery": {"version": 1, "sha256Hash": hash}}});
        if with_text {
            body["query"] = serde_json::Value::String(text.to_owned());
        }
        body
    };
    http.post(&url)
        .header("x-api-key", API_KEY)
        .json(&persisted(true))
        .send()
        .await
        .expect("register");
    let by_hash = persisted(false);
    let mut through_apq = Vec::with_capacity(QUERIES);
    for _ in 0..QUERIES {
        let started = Instant::now();
        let body: serde_json::Value = http
            .post(&url)
            .header("x-api-key", API_KEY)
            .json(&by_hash)
            .send()
            .await
            .expect("post")
            .json()
            .await
            .expect("json");
        through_apq.push(started.elapsed());
        assert_eq!(
            body["data"]["orderList"].as_array().map(Vec::len),
            Some(50),
            "{body}"
        );
    }
    let mut through_sqlx = Vec::with_capacity(QUERIES);
    for _ in 0..QUERIES {
        let started = Instant::now();
        let rows: Vec<(i32, String, Option<f64>, Option<String>)> =
            sqlx::query_as(
                "SELECT o.id, o.status, o.total::float8, c.name FROM orders o \
                 LEFT JOIN customers c ON c.id = o.customer_id \
                 WHERE o.status = $1 AND o.total >= $2::numeric ORDER BY o.total DESC, o.id LIMIT 50",
            )
            .bind("paid")
            .bind(100.0_f64)
            .fetch_all(&db)
            .await
            .expect("sqlx");
        through_sqlx.push(started.elapsed());
        assert_eq!(rows.len(), 50);
    }
    through_gateway.sort();
    through_apq.sort();
    through_sqlx.sort();
    let (g50, s50) = (
        percentile(&through_gateway, 0.5),
        percentile(&through_sqlx, 0.5),
    );
    println!(
        "list query (50 rows + nested customer), {QUERIES} runs: gateway p50 {:?} p99 {:?} | plain sqlx p50 {:?} p99 {:?} | ratio p50 {:.2}x",
        g50,
        percentile(&through_gateway, 0.99),
        s50,
        percentile(&through_sqlx, 0.99),
        g50.as_secs_f64() / s50.as_secs_f64()
    );
    let a50 = percentile(&through_apq, 0.5);
    println!(
        "same list query as a persisted query (hash only), {QUERIES} runs: gateway p50 {:?} p99 {:?} | ratio to plain sqlx p50 {:.2}x",
        a50,
        percentile(&through_apq, 0.99),
        a50.as_secs_f64() / s50.as_secs_f64()
    );

    // 2. Committed mutations per second, and events per second published for them.
    let before = stream_messages(&nats.jetstream).await;
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                for i in 0..MUTATIONS / WRITERS {
                    let body = serde_json::json!({"query": format!(
                        "mutation {{ createCustomer(input: {{name: \"w{w}-{i}\"}}) {{ id }} }}")});
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
    let committed = started.elapsed();
    let total = (MUTATIONS / WRITERS * WRITERS) as u64;
    let drained = wait_for(&nats.jetstream, before + total).await - started;
    println!(
        "mutations: {total} by {WRITERS} concurrent clients in {committed:?} = {:.0} committed/s; all events published after {drained:?} = {:.0} events/s",
        total as f64 / committed.as_secs_f64(),
        total as f64 / drained.as_secs_f64()
    );

    // 3. The relay alone: a backlog committed straight in SQL, drained to JetStream.
    let before = stream_messages(&nats.jetstream).await;
    let started = Instant::now();
    sqlx::query("INSERT INTO customers (name) SELECT 'bulk ' || g FROM generate_series(1, $1) g")
        .bind(BACKLOG)
        .execute(&db)
        .await
        .expect("bulk insert");
    let inserted = started.elapsed();
    let drained = wait_for(&nats.jetstream, before + BACKLOG as u64).await - started;
    println!(
        "relay: {BACKLOG} events committed in one SQL statement ({inserted:?}), all published after {drained:?} = {:.0} events/s",
        f64::from(BACKLOG) / drained.as_secs_f64()
    );

    shutdown.cancel();
    running.wait().await;
}
