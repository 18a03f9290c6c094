//! `herald export` (the real binary) against a flight-streamer started in-process over a real
//! PostgreSQL and nats-server: every output format holds every row, typed; a refused filter
//! fails with the streamer's reason and leaves no file.

mod common;

use std::fs::File;

use arrow::array::AsArray;
use arrow::datatypes::{DataType, Float64Type};
use common::HERALD;
use herald_flight_streamer::FlightSettings;
use herald_shared::config::{NatsConfig, StreamsConfig};
use herald_shared::streams;
use herald_test_support::{NatsServer, Postgres, workspace_root};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "cli-test-flight-token-0123";

struct Streamer {
    _nats: NatsServer,
    _postgres: Postgres,
    url: String,
    shutdown: CancellationToken,
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn streamer_with_orders(n: usize) -> Streamer {
    let nats = NatsServer::start();
    let postgres = Postgres::start();
    let pool = postgres.with_shop_schema().await;
    sqlx::query(
        "INSERT INTO customers (email, name) VALUES ('a@example.com', 'A'); \
         ",
    )
    .execute(&pool)
    .await
    .expect("customer");
    sqlx::query(
        "INSERT INTO orders (customer_id, status, total) \
         SELECT 1, CASE WHEN i % 2 = 0 THEN 'paid' ELSE 'new' END, i * 1.5 \
         FROM generate_series(1, $1) AS i",
    )
    .bind(i32::try_from(n).expect("small"))
    .execute(&pool)
    .await
    .expect("orders");
    let config = NatsConfig {
        url: nats.url(),
        ..Default::default()
    };
    let connection = herald_shared::nats::connect(&config, "flight-streamer")
        .await
        .expect("NATS");
    streams::ensure(
        &connection.jetstream,
        &StreamsConfig::default(),
        &[streams::EVENTS],
    )
    .await
    .expect("streams");
    let settings = FlightSettings {
        listen: "127.0.0.1:0".parse().expect("address"),
        database_url: postgres.url(),
        schema_file: workspace_root().join("examples/shop/gateway-schema.toml"),
        token: TOKEN.into(),
        batch_rows: 100,
        ..Default::default()
    };
    let shutdown = CancellationToken::new();
    let running = herald_flight_streamer::start(settings, &connection, pool, shutdown.clone())
        .await
        .expect("flight-streamer");
    Streamer {
        url: format!("http://{}", running.address),
        _nats: nats,
        _postgres: postgres,
        shutdown,
    }
}

async fn herald(streamer: &Streamer, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(HERALD)
        .env_remove("HERALD_FLIGHT_URL")
        .env("HERALD_FLIGHT_TOKEN", TOKEN)
        .arg("export")
        .args(args)
        .args(["--flight-url", &streamer.url])
        .kill_on_drop(true)
        .output()
        .await
        .expect("run herald export")
}

#[tokio::test]
async fn export_writes_parquet_arrow_and_csv_with_every_row_typed() {
    let streamer = streamer_with_orders(1000).await;
    let dir = tempfile::tempdir().expect("temp dir");
    for name in ["orders.parquet", "orders.arrow", "orders.csv"] {
        let path = dir.path().join(name);
        let output = herald(
            &streamer,
            &[
                "orders",
                "--where",
                "status=paid",
                "--columns",
                "id,total,created_at",
                "--out",
                path.to_str().expect("utf-8 path"),
            ],
        )
        .await;
        assert!(
            output.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("exported 500 rows of orders"), "{stdout}");
        assert!(
            output.stderr.is_empty(),
            "not a terminal: no progress shown"
        );
    }

    let parquet = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        File::open(dir.path().join("orders.parquet")).expect("parquet file"),
    )
    .expect("a parquet file")
    .build()
    .expect("reader");
    let batches: Vec<_> = parquet.collect::<Result<_, _>>().expect("batches");
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 500);
    let schema = batches[0].schema();
    assert_eq!(
        schema.field_with_name("id").expect("id").data_type(),
        &DataType::Int64
    );
    let totals: f64 = batches
        .iter()
        .flat_map(|b| {
            b.column_by_name("total")
                .expect("total")
                .as_primitive::<Float64Type>()
                .values()
                .to_vec()
        })
        .sum();
    // Paid orders are the even i in 1..=1000, each with total 1.5 i.
    assert_eq!(totals, 1.5 * (2..=1000).step_by(2).sum::<i32>() as f64);

    let arrow = arrow::ipc::reader::FileReader::try_new(
        File::open(dir.path().join("orders.arrow")).expect("arrow file"),
        None,
    )
    .expect("an Arrow IPC file");
    let rows: usize = arrow.map(|b| b.expect("batch").num_rows()).sum();
    assert_eq!(rows, 500);

    let csv = std::fs::read_to_string(dir.path().join("orders.csv")).expect("csv");
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("id,total,created_at"));
    assert_eq!(lines.count(), 500);
}

#[tokio::test]
async fn a_refused_filter_fails_with_the_reason_and_leaves_no_file() {
    let streamer = streamer_with_orders(3).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("orders.parquet");
    let output = herald(
        &streamer,
        &[
            "orders",
            "--where",
            "status=paid;drop table orders",
            "--out",
            path.to_str().expect("path"),
        ],
    )
    .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("contains `;`"), "{stderr}");
    assert!(!path.exists());
    assert!(
        std::fs::read_dir(dir.path()).expect("dir").next().is_none(),
        "no partial file"
    );

    let output = herald(&streamer, &["orders", "--out", "orders.xlsx"]).await;
    assert!(String::from_utf8_lossy(&output.stderr).contains(".parquet, .arrow or .csv"));
}

#[tokio::test]
async fn on_a_terminal_the_progress_is_a_bar_over_the_rows_the_streamer_counts() {
    let streamer = streamer_with_orders(1000).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("orders.csv");
    let command = format!(
        "{HERALD} export orders --out {} --flight-url {}",
        path.to_str().expect("path"),
        streamer.url
    );
    // util-linux `script` runs the command on a pseudo-terminal and copies what it draws.
    let output = tokio::process::Command::new("script")
        .args(["-qefc", &command, "/dev/null"])
        .env_remove("HERALD_FLIGHT_URL")
        .env("HERALD_FLIGHT_TOKEN", TOKEN)
        .env("TERM", "xterm")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run herald export on a terminal");
    let drawn = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{drawn}");
    assert!(
        drawn.contains("1,000/1,000 rows"),
        "a bar to the count: {drawn}"
    );
    assert!(path.exists());
}
