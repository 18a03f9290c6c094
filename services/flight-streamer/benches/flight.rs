//! Events and exports through the flight-streamer, against the baseline a user would otherwise
//! write, measured in the same run: the same events pulled from JetStream as JSON and decoded
//! into the same typed columns (no Flight, no Arrow).
//!
//! Exports read a 10-column table (six numeric, four text columns) made for the bench, served
//! from a schema file that adds it to the shop's; beside the export over Flight the bench
//! prints what PostgreSQL alone delivers (the same cursor read and decoded by sqlx without
//! Arrow, and the raw binary COPY of the same rows), so the figures say where the time goes.
//!
//! `cargo bench -p herald-flight-streamer`; `HERALD_BENCH_EVENTS` and `HERALD_BENCH_ROWS` change
//! the sizes (default 200 000 each; the issue's figure is for 1 000 000). Prints, asserts nothing.

use std::time::{Duration, Instant};

use arrow_flight::decode::DecodedPayload;
use arrow_flight::{FlightClient, Ticket};
use async_nats::jetstream::{self, consumer::pull};
use chrono::Utc;
use futures::StreamExt;
use herald_flight_streamer::FlightSettings;
use herald_shared::config::{NatsConfig, StreamsConfig};
use herald_shared::subjects::EVENTS_STREAM;
use herald_shared::{EntityEvent, Op, SCHEMA_VERSION, streams};
use herald_test_support::{NatsServer, Postgres, workspace_root};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "bench-flight-token-0123456789";

fn size(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resets the process's peak RSS (VmHWM) to its current RSS, so the next `peak_rss_mib` is the
/// peak of what ran since (Linux: `clear_refs` value 5); false where that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<f64>().ok())
        })
        .map_or(0.0, |pages| pages * 4096.0 / (1024.0 * 1024.0))
}

async fn publish_events(js: &jetstream::Context, count: usize) -> usize {
    let mut acks = Vec::with_capacity(1024);
    let mut bytes = 0;
    for n in 0..count {
        let row = json!({
            "id": n, "customer_id": n % 100, "status": "new", "total": 12.5 + n as f64,
            "created_at": "2026-01-24T10:00:00.123456+00:00"
        });
        let event = EntityEvent {
            id: uuid::Uuid::now_v7(),
            entity: "Order".into(),
            op: Op::Insert,
            key: n.to_string(),
            data: Some(row),
            before: None,
            changed: None,
            at: Utc::now(),
            actor: Some("bench".into()),
            tx: n as i64,
            schema_version: SCHEMA_VERSION,
        };
        let body = serde_json::to_vec(&event).expect("json");
        bytes += body.len();
        acks.push(
            js.publish("herald.events.Order.insert", body.into())
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
    bytes
}

/// What a user would otherwise write: pull the JSON and decode each event into typed columns.
async fn json_baseline(js: &jetstream::Context, count: usize) -> (Duration, usize) {
    let started = Instant::now();
    let stream = js.get_stream(EVENTS_STREAM).await.expect("stream");
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: "herald.events.Order.>".into(),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut ids = Vec::with_capacity(count);
    let mut ats = Vec::with_capacity(count);
    let mut row_ids: Vec<Option<i64>> = Vec::with_capacity(count);
    let mut customers: Vec<Option<i64>> = Vec::with_capacity(count);
    let mut totals: Vec<Option<f64>> = Vec::with_capacity(count);
    let mut statuses: Vec<Option<String>> = Vec::with_capacity(count);
    let mut created: Vec<Option<i64>> = Vec::with_capacity(count);
    while ids.len() < count {
        let message = messages.next().await.expect("more").expect("message");
        let event: EntityEvent = serde_json::from_slice(&message.payload).expect("event");
        let row = event.data.unwrap_or(Value::Null);
        ids.push(event.id.to_string());
        ats.push(event.at.timestamp_micros());
        row_ids.push(row["id"].as_i64());
        customers.push(row["customer_id"].as_i64());
        totals.push(row["total"].as_f64());
        statuses.push(row["status"].as_str().map(str::to_owned));
        created.push(
            row["created_at"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.timestamp_micros()),
        );
    }
    (started.elapsed(), ids.len())
}

/// The Flight messages of `ticket`, as they come.
async fn do_get(
    client: &mut FlightClient,
    ticket: &str,
) -> arrow_flight::decode::FlightDataDecoder {
    client
        .do_get(Ticket::new(ticket.to_owned()))
        .await
        .expect("DoGet")
        .into_inner()
}

/// Time from DoGet to the first record batch of `ticket`, the stream dropped right after it
/// (the server then ends its consumer or cursor): the median of `times` requests in a row.
async fn first_batch_again(client: &mut FlightClient, ticket: &str, times: usize) -> Duration {
    let mut took = Vec::with_capacity(times);
    for _ in 0..times {
        let started = Instant::now();
        let mut decoder = do_get(client, ticket).await;
        while let Some(data) = decoder.next().await {
            if let DecodedPayload::RecordBatch(_) = data.expect("a message").payload {
                took.push(started.elapsed());
                break;
            }
        }
    }
    took.sort();
    took.get(took.len() / 2).copied().unwrap_or_default()
}

struct Read {
    rows: usize,
    bytes: usize,
    first_batch: Duration,
    elapsed: Duration,
    /// Peak RSS during the stream above the RSS before it: the stream's memory on both ends
    /// (server and client run in this process), so an upper bound of the server's share.
    rss_growth: f64,
    /// The process's peak RSS before the stream reset it.
    process_peak: f64,
}

async fn read(client: &mut FlightClient, ticket: &str) -> Read {
    let before = rss_mib();
    let process_peak = peak_rss_mib();
    let exact_peak = reset_peak_rss();
    let mut peak = before;
    // After the RSS bookkeeping: resetting the peak walks every page table of this process
    // (milliseconds once it holds a few hundred MiB), which is the bench's cost, not Flight's.
    let started = Instant::now();
    let mut decoder = do_get(client, ticket).await;
    let (mut rows, mut bytes, mut first_batch) = (0, 0, None);
    while let Some(data) = decoder.next().await {
        let data = data.expect("a message");
        bytes += data.inner.data_body.len() + data.inner.data_header.len();
        if let DecodedPayload::RecordBatch(batch) = data.payload {
            first_batch.get_or_insert_with(|| started.elapsed());
            rows += batch.num_rows();
            if rows % 65_536 < batch.num_rows() {
                peak = peak.max(rss_mib());
            }
        }
    }
    Read {
        rows,
        bytes,
        first_batch: first_batch.unwrap_or_default(),
        elapsed: started.elapsed(),
        // The kernel's peak since the reset when it could be reset (it sees spikes between
        // samples), else the largest sample.
        rss_growth: if exact_peak {
            peak_rss_mib() - before
        } else {
            peak - before
        },
        process_peak,
    }
}

const BENCH_TABLE: &str = "CREATE TABLE bench_rows (
    id bigint PRIMARY KEY, account_id integer NOT NULL, quantity integer, amount numeric(12,2),
    price double precision, score real, sku text NOT NULL, name text, region text, note text)";

const BENCH_ROWS: &str = "INSERT INTO bench_rows \
    SELECT i, i % 1000, (i % 50)::int, i * 0.25, i * 1.5, (i % 100) / 3.0, \
           'SKU-' || i, 'item name ' || (i % 977), \
           (ARRAY['eu-west', 'us-east', 'ap-south'])[1 + i % 3], \
           CASE WHEN i % 10 = 0 THEN NULL ELSE 'a short note about row ' || i END \
    FROM generate_series(1, $1) AS i";

const BENCH_ENTITY: &str = r#"
[entities.BenchRow]
table = "bench_rows"
key = "id"
fields = { id = "Int", account_id = "Int", quantity = "Int", amount = "Float", price = "Float", score = "Float", sku = "String", name = "String", region = "String", note = "String" }
"#;

const BENCH_SELECT: &str = "SELECT \"account_id\"::int8, \"amount\"::float8, \"id\"::int8, \
    \"name\"::text, \"note\"::text, \"price\"::float8, \"quantity\"::int8, \"region\"::text, \
    \"score\"::float8, \"sku\"::text FROM \"bench_rows\" WHERE TRUE";

/// What the cursor read costs without Arrow: the export's select, fetched as the export does
/// and every value decoded by sqlx.
async fn postgres_cursor(pool: &sqlx::PgPool, rows: usize) -> (usize, Duration) {
    use futures::TryStreamExt;
    use sqlx::Row;
    let started = Instant::now();
    let mut tx = pool.begin().await.expect("transaction");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DECLARE bench_cursor NO SCROLL CURSOR FOR {BENCH_SELECT}"
    )))
    .execute(&mut *tx)
    .await
    .expect("declare");
    let mut seen = 0;
    let mut checksum = 0i64;
    loop {
        let mut fetched = 0;
        let mut stream = sqlx::query("FETCH FORWARD 65536 FROM bench_cursor").fetch(&mut *tx);
        while let Some(row) = stream.try_next().await.expect("row") {
            fetched += 1;
            for i in [0, 2, 6] {
                checksum += row.try_get::<Option<i64>, _>(i).expect("int").unwrap_or(0);
            }
            for i in [1, 5, 8] {
                checksum += row
                    .try_get::<Option<f64>, _>(i)
                    .expect("float")
                    .unwrap_or(0.0) as i64;
            }
            for i in [3, 4, 7, 9] {
                checksum += row
                    .try_get::<Option<&str>, _>(i)
                    .expect("text")
                    .map_or(0, str::len) as i64;
            }
        }
        drop(stream);
        seen += fetched;
        if fetched < 65_536 {
            break;
        }
    }
    tx.rollback().await.expect("rollback");
    assert_eq!(seen, rows);
    std::hint::black_box(checksum);
    (seen, started.elapsed())
}

/// PostgreSQL's own ceiling for the same rows: binary COPY, bytes counted, nothing decoded.
async fn postgres_copy(pool: &sqlx::PgPool) -> (usize, Duration) {
    use sqlx::postgres::PgPoolCopyExt;
    let started = Instant::now();
    let statement = format!("COPY ({BENCH_SELECT}) TO STDOUT (FORMAT binary)");
    let mut stream = pool.copy_out_raw(&statement).await.expect("copy");
    let mut bytes = 0;
    while let Some(chunk) = stream.next().await {
        bytes += chunk.expect("chunk").len();
    }
    (bytes, started.elapsed())
}

/// The same comparison from Python, as an analyst meets it: `read_pandas` over Flight against
/// nats-py + `json.loads` + `pd.DataFrame` (benches/pandas_baseline.py).
async fn pandas(flight: &str, nats_url: &str, events: usize) {
    let python = workspace_root().join(".venv/bin/python");
    let script = workspace_root().join("services/flight-streamer/benches/pandas_baseline.py");
    let output = tokio::process::Command::new(&python)
        .arg(script)
        .args([
            &format!("grpc://{flight}"),
            TOKEN,
            nats_url,
            &events.to_string(),
        ])
        .output()
        .await;
    let summary = match output {
        Ok(output) if output.status.success() => {
            serde_json::from_slice::<Value>(&output.stdout).unwrap_or(Value::Null)
        }
        Ok(output) => {
            println!(
                "pandas comparison skipped: {}",
                String::from_utf8_lossy(&output.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            return;
        }
        Err(e) => {
            println!(
                "pandas comparison skipped: {} ({e}); run scripts/install-deps",
                python.display()
            );
            return;
        }
    };
    let (Some(flight_s), Some(json_s)) = (summary["flight_s"].as_f64(), summary["json_s"].as_f64())
    else {
        println!("pandas comparison skipped: unexpected output {summary}");
        return;
    };
    let rate = |s: f64| events as f64 / s;
    println!(
        "pandas via Flight:     {:>10.0} events/s  ({flight_s:.2} s to a typed DataFrame)",
        rate(flight_s)
    );
    println!(
        "pandas via JSON:       {:>10.0} events/s  ({json_s:.2} s: nats-py pull, json.loads, DataFrame, to_datetime)",
        rate(json_s)
    );
    println!(
        "ratio Flight / JSON:   {:>10.2}x (pandas)",
        json_s / flight_s
    );
}

#[tokio::main]
async fn main() {
    let events = size("HERALD_BENCH_EVENTS", 200_000);
    let rows = size("HERALD_BENCH_ROWS", 200_000);
    let nats = NatsServer::start();
    let postgres = Postgres::start();
    let pool = postgres.with_shop_schema().await;
    sqlx::query("INSERT INTO customers (email, name) VALUES ('bench@example.com', 'Bench')")
        .execute(&pool)
        .await
        .expect("customer");
    sqlx::raw_sql(BENCH_TABLE)
        .execute(&pool)
        .await
        .expect("bench table");
    sqlx::query(BENCH_ROWS)
        .bind(i64::try_from(rows).expect("rows"))
        .execute(&pool)
        .await
        .expect("bench rows");
    sqlx::query("VACUUM ANALYZE bench_rows")
        .execute(&pool)
        .await
        .expect("vacuum");
    let schema_dir = tempfile::tempdir().expect("temp dir");
    let schema_file = schema_dir.path().join("schema.toml");
    let shop = std::fs::read_to_string(workspace_root().join("examples/shop/gateway-schema.toml"))
        .expect("shop schema file");
    std::fs::write(&schema_file, format!("{shop}\n{BENCH_ENTITY}")).expect("schema file");
    let config = NatsConfig {
        url: nats.url(),
        ..Default::default()
    };
    let connection = herald_shared::nats::connect(&config, "flight-bench")
        .await
        .expect("NATS");
    streams::ensure(
        &connection.jetstream,
        &StreamsConfig::default(),
        &[streams::EVENTS],
    )
    .await
    .expect("streams");
    let json_bytes = publish_events(&connection.jetstream, events).await;

    let settings = FlightSettings {
        listen: "127.0.0.1:0".parse().expect("address"),
        database_url: postgres.url(),
        schema_file,
        token: TOKEN.into(),
        ..Default::default()
    };
    let shutdown = CancellationToken::new();
    let running =
        herald_flight_streamer::start(settings, &connection, pool.clone(), shutdown.clone())
            .await
            .expect("flight-streamer");
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", running.address))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client = FlightClient::new(channel);
    client
        .add_header("authorization", &format!("Bearer {TOKEN}"))
        .expect("header");

    let (baseline, decoded) = json_baseline(&connection.jetstream, events).await;
    let flight = read(&mut client, "observer_events:Order").await;
    assert_eq!(flight.rows, events, "every event arrived");
    assert_eq!(decoded, events);
    let export = read(&mut client, "export:bench_rows").await;
    // Again, with nats-server's per-block subject state for the events' wildcard filter now
    // loaded: the first request pays for loading it (it grows with the stream), later ones not.
    let events_again = first_batch_again(&mut client, "observer_events:Order", 5).await;
    let export_again = first_batch_again(&mut client, "export:bench_rows", 5).await;
    let cursor = postgres_cursor(&pool, rows).await;
    let copy = postgres_copy(&pool).await;

    let per_s = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    let mb_s = |b: usize, d: Duration| b as f64 / 1e6 / d.as_secs_f64();
    println!(
        "flight-streamer bench: {events} events ({:.1} MB of JSON), {rows} rows",
        json_bytes as f64 / 1e6
    );
    println!(
        "events over Flight:    {:>10.0} events/s  {:>7.1} MB/s of Arrow  {:>7.1} MB/s of JSON read  first batch {:>6.1} ms  stream peak RSS +{:.1} MiB",
        per_s(flight.rows, flight.elapsed),
        mb_s(flight.bytes, flight.elapsed),
        mb_s(json_bytes, flight.elapsed),
        flight.first_batch.as_secs_f64() * 1e3,
        flight.rss_growth,
    );
    println!(
        "baseline JSON decode:  {:>10.0} events/s  (ordered consumer + serde_json into the same columns, no transport)",
        per_s(decoded, baseline)
    );
    println!(
        "ratio Flight / JSON:   {:>10.2}x",
        baseline.as_secs_f64() / flight.elapsed.as_secs_f64()
    );
    println!(
        "export over Flight:    {:>10.0} rows/s    {:>7.1} MB/s of Arrow  first batch {:>6.1} ms  stream peak RSS +{:.1} MiB",
        per_s(export.rows, export.elapsed),
        mb_s(export.bytes, export.elapsed),
        export.first_batch.as_secs_f64() * 1e3,
        export.rss_growth,
    );
    println!(
        "first batch, 5 requests more (median): events {:.1} ms, export {:.1} ms",
        events_again.as_secs_f64() * 1e3,
        export_again.as_secs_f64() * 1e3,
    );
    println!(
        "  PostgreSQL alone:    {:>10.0} rows/s    (the same cursor, FETCH 65536, decoded by sqlx, no Arrow)",
        per_s(cursor.0, cursor.1)
    );
    println!(
        "  PostgreSQL alone:    {:>10.0} rows/s    {:>7.1} MB/s (binary COPY of the same select, bytes only)",
        per_s(rows, copy.1),
        mb_s(copy.0, copy.1)
    );
    println!(
        "memory per stream (peak RSS above the RSS before it, server and client ends): events +{:.1} MiB, export +{:.1} MiB (target < 100 MB)",
        flight.rss_growth, export.rss_growth,
    );
    println!(
        "peak RSS of the process (streamer, client, baseline): {:.1} MiB",
        peak_rss_mib()
            .max(flight.process_peak)
            .max(export.process_peak)
    );
    // HERALD_BENCH_PANDAS=0 skips it (its JSON path takes minutes for 1M events).
    if std::env::var("HERALD_BENCH_PANDAS").as_deref() != Ok("0") {
        pandas(&running.address.to_string(), &nats.url(), events).await;
    }
    shutdown.cancel();
    running.wait().await;
}
