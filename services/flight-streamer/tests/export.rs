//! Export tickets and authentication against a real PostgreSQL, read with arrow-flight's client.

mod common;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{
    DataType, Date32Type, Float64Type, Int64Type, TimeUnit, TimestampMicrosecondType,
};
use arrow_flight::{FlightDescriptor, Ticket};
use common::{Reader, Stack, TOKEN, code, rows};
use futures::TryStreamExt;
use serde_json::json;

const SAMPLES: &str = "
    create table samples (
        id bigint primary key,
        small smallint, big bigint, price numeric(10,2), ratio double precision, flag boolean,
        happened timestamptz, local_time timestamp, day date, doc jsonb, note text, ref uuid
    );
    insert into samples values
        (1, 7, 9000000000, 12.34, 0.5, true, '2026-01-24T10:00:00Z', '2026-01-24 10:00:00',
         '2026-01-24', '{\"a\": [1, 2]}', 'hello', '00000000-0000-0000-0000-000000000001'),
        (2, null, null, null, null, null, null, null, null, null, null, null);
";

const SAMPLES_SCHEMA: &str = r#"
[entities.Sample]
table = "samples"
key = "id"
fields = { id = "Int", small = "Int", big = "Int", price = "Float", ratio = "Float", flag = "Boolean", happened = "String", local_time = "String", day = "String", doc = "JSON", note = "String", ref = "ID" }
"#;

#[tokio::test]
async fn an_export_has_a_typed_column_per_field_and_nulls_in_every_type() {
    let dir = tempfile::tempdir().expect("temp dir");
    let schema_file = dir.path().join("schema.toml");
    std::fs::write(&schema_file, SAMPLES_SCHEMA).expect("write schema file");
    let stack = Stack::start_with_sql(SAMPLES, |s| s.schema_file = schema_file).await;
    let mut client = stack.client().await;
    let messages = Reader::open(&mut client, "export:samples")
        .await
        .all()
        .await;
    assert_eq!(rows(&messages), 2);
    let batch = &messages[0].batch;
    let schema = batch.schema();
    let type_of = |name: &str| {
        schema
            .field_with_name(name)
            .expect(name)
            .data_type()
            .clone()
    };
    for (name, wanted) in [
        ("small", DataType::Int64),
        ("big", DataType::Int64),
        ("price", DataType::Float64),
        ("ratio", DataType::Float64),
        ("flag", DataType::Boolean),
        (
            "happened",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        ),
        (
            "local_time",
            DataType::Timestamp(TimeUnit::Microsecond, None),
        ),
        ("day", DataType::Date32),
        ("doc", DataType::Utf8),
        ("note", DataType::Utf8),
        ("ref", DataType::Utf8),
    ] {
        assert_eq!(type_of(name), wanted, "{name}");
        let column = batch.column_by_name(name).expect(name);
        assert_eq!(column.null_count(), 1, "{name} has one null");
    }
    let row = (0..2)
        .find(|&i| {
            batch
                .column_by_name("id")
                .expect("id")
                .as_primitive::<Int64Type>()
                .value(i)
                == 1
        })
        .expect("row 1");
    let col = |name: &str| batch.column_by_name(name).expect(name);
    assert_eq!(
        col("big").as_primitive::<Int64Type>().value(row),
        9_000_000_000
    );
    assert_eq!(col("price").as_primitive::<Float64Type>().value(row), 12.34);
    assert!(col("flag").as_boolean().value(row));
    let happened = chrono::DateTime::parse_from_rfc3339("2026-01-24T10:00:00Z").expect("time");
    assert_eq!(
        col("happened")
            .as_primitive::<TimestampMicrosecondType>()
            .value(row),
        happened.timestamp_micros()
    );
    assert_eq!(
        col("local_time")
            .as_primitive::<TimestampMicrosecondType>()
            .value(row),
        happened.timestamp_micros()
    );
    assert_eq!(col("day").as_primitive::<Date32Type>().value(row), 20_477);
    let doc: serde_json::Value =
        serde_json::from_str(col("doc").as_string::<i32>().value(row)).expect("JSON text");
    assert_eq!(doc, json!({"a": [1, 2]}));
    assert_eq!(
        col("ref").as_string::<i32>().value(row),
        "00000000-0000-0000-0000-000000000001"
    );
}

async fn orders(stack: &Stack, n: usize) {
    for i in 0..n {
        let status = if i % 2 == 0 { "paid" } else { "new" };
        stack
            .new_order(&format!("{i}.50"), status, chrono::Utc::now())
            .await;
    }
}

#[tokio::test]
async fn the_seed_and_json_export_tickets_filter_with_bound_values_in_many_batches() {
    let stack = Stack::start_with(|s| s.batch_rows = 3).await;
    orders(&stack, 10).await;
    let mut client = stack.client().await;
    let messages = Reader::open(
        &mut client,
        "export:orders:created_at>2026-01-01:id,total,customer_id",
    )
    .await
    .all()
    .await;
    assert_eq!(rows(&messages), 10);
    assert!(
        messages.len() >= 4,
        "batch_rows = 3 cuts 10 rows into 4 batches"
    );
    let schema = messages[0].batch.schema();
    let names: Vec<_> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["id", "total", "customer_id"]);

    let ticket = json!({
        "export": "orders", "columns": ["id", "status"],
        "where": {"status": {"eq": "paid"}, "total": {"gte": 2}}
    })
    .to_string();
    let messages = Reader::open(&mut client, ticket).await.all().await;
    assert_eq!(rows(&messages), 4, "paid orders 2.50, 4.50, 6.50, 8.50");
    let text = Reader::open(&mut client, "export:orders:status=paid&total>=2:id")
        .await
        .all()
        .await;
    assert_eq!(rows(&text), 4, "the text form means the same");

    let info = client
        .get_flight_info(FlightDescriptor::new_path(vec![
            "export".into(),
            "orders".into(),
        ]))
        .await
        .expect("GetFlightInfo");
    assert_eq!(
        info.total_records, 10,
        "every order, counted at the request"
    );
    let paid =
        json!({"export": "orders", "where": {"status": {"eq": "paid"}, "total": {"gte": 2}}})
            .to_string();
    let info = client
        .get_flight_info(FlightDescriptor::new_cmd(paid))
        .await
        .expect("GetFlightInfo");
    assert_eq!(info.total_records, 4, "the filter's rows");
}

#[tokio::test]
async fn an_export_that_cannot_be_counted_in_time_reports_minus_one_and_still_reads() {
    let stack = Stack::start().await;
    orders(&stack, 3).await;
    let mut client = stack.client().await;
    // A writer holding the table: the count waits on the lock past its timeout.
    let mut blocker = stack.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .expect("lock");
    let started = std::time::Instant::now();
    let info = client
        .get_flight_info(FlightDescriptor::new_path(vec![
            "export".into(),
            "orders".into(),
        ]))
        .await
        .expect("GetFlightInfo answers without the count");
    assert_eq!(info.total_records, -1, "unknown, not a wrong number");
    assert!(
        started.elapsed() < herald_flight_streamer::export::COUNT_TIMEOUT * 20,
        "the count gave up after its timeout, took {:?}",
        started.elapsed()
    );
    blocker.rollback().await.expect("unlock");
    let messages = Reader::open(&mut client, "export:orders").await.all().await;
    assert_eq!(rows(&messages), 3);
}

#[tokio::test]
async fn injection_attempts_in_export_tickets_are_refused_with_a_clear_error() {
    let stack = Stack::start().await;
    orders(&stack, 2).await;
    let mut client = stack.client().await;
    for (ticket, wanted) in [
        (
            "export:orders:status=paid;DROP TABLE orders:id",
            "contains `;`",
        ),
        ("export:orders:status=paid--:id", "contains `--`"),
        (
            "export:orders:id=(select max(id) from customers):id",
            "contains `(`",
        ),
        ("export:orders:id>0 OR 1=1:id", "is an integer"),
        ("export:orders:id>0:id,(select 1)", "no column `(select 1)`"),
        (
            "export:orders::id;drop table orders",
            "no column `id;drop table orders`",
        ),
        ("export:orders:password=x:id", "no column `password`"),
        ("export:pg_shadow::", "no table `pg_shadow`"),
        (
            "export:orders; drop table orders::",
            "no table `orders; drop table orders`",
        ),
        (
            r#"{"export": "orders", "where": {"id": {"gt": "1; drop table orders"}}}"#,
            "contains `;`",
        ),
        (
            r#"{"export": "orders", "where": {"id": {"between": [1, 2]}}}"#,
            "unknown filter operator",
        ),
    ] {
        let err = match Reader::try_open(&mut client, ticket).await {
            Err(e) => e,
            Ok(reader) => panic!("{ticket} was accepted ({} rows)", rows(&reader.all().await)),
        };
        assert!(err.to_string().contains(wanted), "{ticket}: {err}");
        assert!(
            matches!(
                code(&err),
                Some(tonic::Code::InvalidArgument | tonic::Code::NotFound)
            ),
            "{ticket}: a Flight error naming the fault: {err}"
        );
    }
    let still: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&stack.pool)
        .await
        .expect("orders is still there");
    assert_eq!(still, 2);
}

#[tokio::test]
async fn every_rpc_without_the_token_is_unauthenticated_and_handshake_hands_it_out() {
    let stack = Stack::start().await;
    let mut anonymous = stack.anonymous().await;
    let unauthenticated = |e: arrow_flight::error::FlightError| {
        assert_eq!(code(&e), Some(tonic::Code::Unauthenticated), "{e}");
    };
    unauthenticated(
        anonymous
            .list_flights("")
            .await
            .err()
            .expect("ListFlights refused"),
    );
    unauthenticated(
        anonymous
            .get_flight_info(FlightDescriptor::new_path(vec![
                "events".into(),
                "Order".into(),
            ]))
            .await
            .expect_err("GetFlightInfo refused"),
    );
    unauthenticated(
        anonymous
            .get_schema(FlightDescriptor::new_path(vec![
                "export".into(),
                "orders".into(),
            ]))
            .await
            .expect_err("GetSchema refused"),
    );
    unauthenticated(
        anonymous
            .do_get(Ticket::new("export:orders"))
            .await
            .expect_err("DoGet refused"),
    );
    let mut wrong = stack.anonymous().await;
    wrong
        .add_header("authorization", "Bearer test-flight-token-0123456788")
        .expect("header");
    unauthenticated(
        wrong
            .list_flights("")
            .await
            .err()
            .expect("a wrong token is refused"),
    );
    unauthenticated(
        anonymous
            .handshake("not the token")
            .await
            .expect_err("a wrong handshake is refused"),
    );

    let payload = anonymous
        .handshake(TOKEN)
        .await
        .expect("handshake with the token");
    assert_eq!(payload, TOKEN.as_bytes());
    let token = std::str::from_utf8(&payload).expect("text");
    anonymous
        .add_header("authorization", &format!("Bearer {token}"))
        .expect("header");
    let flights: Vec<_> = anonymous
        .list_flights("")
        .await
        .expect("the handshake's token opens every RPC")
        .try_collect()
        .await
        .expect("flights");
    assert_eq!(flights.len(), 6);
}

#[tokio::test]
async fn a_client_that_goes_away_ends_its_export_query_at_once() {
    let stack = Stack::start_with(|s| s.batch_rows = 1000).await;
    sqlx::raw_sql(
        "INSERT INTO customers (email, name) VALUES ('big@example.com', 'Big'); \
         INSERT INTO orders (customer_id, total) \
         SELECT (SELECT max(id) FROM customers), i FROM generate_series(1, 100000) AS i;",
    )
    .execute(&stack.pool)
    .await
    .expect("a big table");
    // The streamer's backends still inside an export's COPY (or its transaction).
    let exporting = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE query LIKE 'COPY (SELECT%' AND state <> 'idle'",
        )
        .fetch_one(&stack.pool)
        .await
        .expect("pg_stat_activity")
    };
    let mut client = stack.client().await;
    let mut reader = Reader::open(&mut client, "export:orders").await;
    let first = reader.next().await.expect("a batch").expect("rows");
    assert_eq!(first.batch.num_rows(), 1000);
    herald_test_support::eventually_async(
        "the export to be running its COPY",
        std::time::Duration::from_secs(10),
        || async { (exporting().await == 1).then_some(()) },
    )
    .await;
    drop(reader);
    herald_test_support::eventually_async(
        "the COPY to end once the client is gone",
        std::time::Duration::from_secs(5),
        || async { (exporting().await == 0).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn an_export_refused_by_the_database_leaves_its_connection_usable() {
    let stack = Stack::start().await;
    sqlx::raw_sql(
        "INSERT INTO customers (email, name) VALUES ('one@example.com', 'One'); \
         INSERT INTO orders (customer_id, total) SELECT max(id), 5 FROM customers;",
    )
    .execute(&stack.pool)
    .await
    .expect("an order");
    let mut client = stack.client().await;
    for _ in 0..3 {
        // A date PostgreSQL's cast refuses (22008), found only when the COPY starts.
        let ticket = json!({"export": "orders", "where": {"created_at": {"gt": "2026-02-30"}}});
        let err = match Reader::try_open(&mut client, ticket.to_string()).await {
            Err(e) => e,
            Ok(reader) => {
                let mut reader = reader;
                match reader.next().await {
                    Err(e) => e,
                    Ok(m) => panic!("refused date accepted: {:?}", m.map(|m| m.batch)),
                }
            }
        };
        assert_eq!(code(&err), Some(tonic::Code::InvalidArgument), "{err}");
        let ok = Reader::open(&mut client, "export:orders:total>=1:id,total")
            .await
            .all()
            .await;
        assert_eq!(rows(&ok), 1, "the next export reads");
    }
    // No pooled connection was left inside the refused export's transaction.
    herald_test_support::eventually_async(
        "no backend left in a transaction",
        std::time::Duration::from_secs(5),
        || async {
            let left: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
            )
            .fetch_one(&stack.pool)
            .await
            .expect("pg_stat_activity");
            (left == 0).then_some(())
        },
    )
    .await;
}

const MEASURES: &str = "
    create table measures (id bigint primary key, amount numeric);
    insert into measures select i, i * 0.5 from generate_series(1, 5000) as i;
    -- Beyond float8's range: its cast to the column's float64 fails when COPY reaches it.
    insert into measures values (5001, 1e400);
";

const MEASURES_SCHEMA: &str = r#"
[entities.Measure]
table = "measures"
key = "id"
fields = { id = "Int", amount = "Float" }
"#;

#[tokio::test]
async fn a_value_refused_mid_copy_ends_its_stream_with_a_clear_status_and_the_server_goes_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let schema_file = dir.path().join("schema.toml");
    std::fs::write(&schema_file, MEASURES_SCHEMA).expect("write schema file");
    let stack = Stack::start_with_sql(MEASURES, |s| {
        s.schema_file = schema_file;
        s.batch_rows = 1000;
    })
    .await;
    let mut client = stack.client().await;
    for _ in 0..3 {
        let mut reader = Reader::open(&mut client, "export:measures").await;
        let mut read = 0;
        let err = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                match reader.next().await {
                    Ok(Some(message)) => read += message.batch.num_rows(),
                    Ok(None) => panic!("the export ended without its refused row ({read} rows)"),
                    Err(e) => return e,
                }
            }
        })
        .await
        .expect("the stream ends instead of hanging");
        assert!(
            read > 0,
            "the refusal comes mid-stream, after rows were sent"
        );
        assert!(read < 5001, "the refused row is not sent: {read}");
        assert_eq!(code(&err), Some(tonic::Code::FailedPrecondition), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("`measures`") && text.contains("out of range"),
            "names the table and PostgreSQL's reason: {text}"
        );
        let ok = Reader::open(&mut client, "export:measures:id<=10:id,amount")
            .await
            .all()
            .await;
        assert_eq!(rows(&ok), 10, "the next export reads");
    }
    herald_test_support::eventually_async(
        "no backend left in a transaction",
        std::time::Duration::from_secs(5),
        || async {
            let left: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
            )
            .fetch_one(&stack.pool)
            .await
            .expect("pg_stat_activity");
            (left == 0).then_some(())
        },
    )
    .await;
}
