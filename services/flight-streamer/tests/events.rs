//! Event tickets against a real nats-server and PostgreSQL, read with arrow-flight's client.

mod common;

use std::time::Duration;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type, TimeUnit, TimestampMicrosecondType};
use arrow_flight::{FlightDescriptor, Ticket};
use chrono::{DateTime, TimeDelta, Utc};
use common::{Reader, Stack, event, rows, sequences};
use futures::TryStreamExt;
use herald_shared::Op;
use serde_json::json;

fn time(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .expect("time")
        .with_timezone(&Utc)
}

#[tokio::test]
async fn the_seed_ticket_replays_the_entity_since_a_time_in_stream_order_with_real_types() {
    let stack = Stack::start_with(|s| s.batch_rows = 4).await;
    let since = time("2026-01-24T00:00:00Z");
    let mut expected = Vec::new();
    // One committed before `since` (excluded), one exactly at it (included), then later ones.
    let early = stack
        .new_order("1.50", "new", since - TimeDelta::seconds(1))
        .await;
    stack.publish(&early).await;
    for i in 0..10 {
        let order = stack
            .new_order(&format!("{i}.25"), "new", since + TimeDelta::seconds(i))
            .await;
        expected.push(stack.publish(&order).await);
        let customer = event(
            "Customer",
            Op::Insert,
            None,
            Some(
                json!({"id": i, "email": "x", "name": "y", "created_at": "2026-01-24T00:00:00+00:00"}),
            ),
            since,
        );
        stack.publish(&customer).await;
    }
    let updated = stack.new_order("9.99", "new", since).await;
    let mut after = updated.data.clone().expect("row");
    after["status"] = json!("paid");
    let update = event(
        "Order",
        Op::Update,
        updated.data.clone(),
        Some(after),
        since,
    );
    expected.push(stack.publish(&update).await);

    let mut client = stack.client().await;
    let messages = Reader::open(&mut client, "observer_events:Order:2026-01-24T00:00:00Z")
        .await
        .all()
        .await;
    assert_eq!(
        sequences(&messages),
        expected,
        "every Order event since, in stream order"
    );
    assert!(
        messages.iter().all(|m| m.batch.num_rows() <= 4),
        "batches hold batch_rows"
    );
    let last = messages.last().expect("a batch");
    assert_eq!(
        last.cursor,
        expected.last().copied(),
        "the cursor is the last sequence"
    );

    let schema = last.batch.schema();
    let type_of = |name: &str| {
        schema
            .field_with_name(name)
            .expect(name)
            .data_type()
            .clone()
    };
    assert_eq!(type_of("row_id"), DataType::Int64);
    assert_eq!(type_of("customer_id"), DataType::Int64);
    assert_eq!(type_of("total"), DataType::Float64);
    assert_eq!(type_of("status"), DataType::Utf8);
    assert_eq!(
        type_of("created_at"),
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
    );
    assert_eq!(type_of("at"), type_of("created_at"));
    assert_eq!(type_of("seq"), DataType::UInt64);
    assert_eq!(type_of("before_status"), DataType::Utf8);

    let first = &messages[0].batch;
    let totals = first
        .column_by_name("total")
        .expect("total")
        .as_primitive::<Float64Type>();
    assert_eq!(totals.value(0), 0.25);
    let ids = first
        .column_by_name("row_id")
        .expect("id")
        .as_primitive::<Int64Type>();
    assert!(ids.value(0) > 0);
    assert!(
        first
            .column_by_name("before_total")
            .expect("before")
            .is_null(0),
        "an insert has no before"
    );
    let at = first
        .column_by_name("at")
        .expect("at")
        .as_primitive::<TimestampMicrosecondType>();
    assert_eq!(
        at.value(0),
        since.timestamp_micros(),
        "`since` is inclusive"
    );

    let update_row = &last.batch;
    let n = update_row.num_rows() - 1;
    assert_eq!(
        update_row
            .column_by_name("op")
            .expect("op")
            .as_string::<i32>()
            .value(n),
        "update"
    );
    assert_eq!(
        update_row
            .column_by_name("status")
            .expect("s")
            .as_string::<i32>()
            .value(n),
        "paid"
    );
    assert_eq!(
        update_row
            .column_by_name("before_status")
            .expect("b")
            .as_string::<i32>()
            .value(n),
        "new"
    );
    let changed = update_row
        .column_by_name("changed")
        .expect("changed")
        .as_list::<i32>();
    let changed = changed.value(n);
    assert_eq!(
        changed.as_string::<i32>().iter().collect::<Vec<_>>(),
        [Some("status")]
    );
}

#[tokio::test]
async fn a_json_ticket_filters_ops_and_until_exclusive_and_reports_its_count() {
    let stack = Stack::start().await;
    let t0 = time("2026-02-01T00:00:00Z");
    let mut inserts = Vec::new();
    for i in 0..5 {
        let order = stack
            .new_order("2.00", "new", t0 + TimeDelta::seconds(i))
            .await;
        inserts.push(stack.publish(&order).await);
        let deleted = event(
            "Order",
            Op::Delete,
            order.data.clone(),
            None,
            t0 + TimeDelta::seconds(i),
        );
        stack.publish(&deleted).await;
    }
    let mut client = stack.client().await;
    let ticket = json!({
        "events": "Order", "since": "2026-02-01T00:00:00Z", "until": "2026-02-01T00:00:03Z",
        "ops": ["insert"]
    })
    .to_string();
    let messages = Reader::open(&mut client, ticket).await.all().await;
    assert_eq!(
        sequences(&messages),
        inserts[..3],
        "inserts at t0..t0+2s; until is exclusive"
    );

    let deletes = json!({"events": "Order", "ops": ["delete"]}).to_string();
    let info = client
        .get_flight_info(FlightDescriptor::new_cmd(deletes.clone()))
        .await
        .expect("GetFlightInfo");
    assert_eq!(info.total_records, 5);
    let messages = Reader::open(&mut client, deletes).await.all().await;
    assert_eq!(rows(&messages), 5);
    // A delete carries the row before it in the field columns as well as in before_*.
    let batch = &messages[0].batch;
    assert_eq!(
        batch
            .column_by_name("total")
            .expect("t")
            .as_primitive::<Float64Type>()
            .value(0),
        2.0
    );
    assert!(!batch.column_by_name("before_total").expect("b").is_null(0));

    let follow = json!({"events": "Order", "follow": true}).to_string();
    let info = client
        .get_flight_info(FlightDescriptor::new_cmd(follow))
        .await
        .expect("GetFlightInfo");
    assert_eq!(info.total_records, -1, "a live tail has no total");
}

#[tokio::test]
async fn follow_mode_tails_new_events_within_a_second_and_keeps_an_idle_stream_alive() {
    let stack = Stack::start_with(|s| s.keepalive = Duration::from_millis(200)).await;
    let before = stack.new_order("1.00", "new", Utc::now()).await;
    let first = stack.publish(&before).await;
    let mut client = stack.client().await;
    let mut reader = Reader::open(
        &mut client,
        json!({"events": "Order", "follow": true}).to_string(),
    )
    .await;
    let replay = reader.next_rows(Duration::from_secs(5)).await;
    assert_eq!(sequences(&[replay]), [first]);

    // Idle: an empty batch with the same schema and the cursor, not a header-less message.
    let idle = tokio::time::timeout(Duration::from_secs(5), reader.next())
        .await
        .expect("a keep-alive in time")
        .expect("no error")
        .expect("the stream goes on");
    assert_eq!(idle.batch.num_rows(), 0);
    assert_eq!(idle.cursor, Some(first));
    assert!(idle.batch.schema().field_with_name("total").is_ok());

    let live = stack.new_order("3.00", "paid", Utc::now()).await;
    let seq = stack.publish(&live).await;
    let message = reader.next_rows(Duration::from_secs(1)).await;
    assert_eq!(
        sequences(&[message]),
        [seq],
        "a live event arrives within a second"
    );
}

#[tokio::test]
async fn resuming_from_the_cursor_misses_nothing_and_repeats_nothing() {
    let stack = Stack::start_with(|s| s.batch_rows = 7).await;
    let mut all = Vec::new();
    for _ in 0..50 {
        let order = stack.new_order("1.00", "new", Utc::now()).await;
        all.push(stack.publish(&order).await);
    }
    let mut client = stack.client().await;
    let mut reader = Reader::open(&mut client, "observer_events:Order").await;
    let mut seen = Vec::new();
    let mut cursor = None;
    for _ in 0..3 {
        let message = reader.next().await.expect("batch").expect("more");
        seen.extend(sequences(std::slice::from_ref(&message)));
        cursor = message.cursor;
    }
    drop(reader);
    let cursor = cursor.expect("a cursor in app_metadata");
    assert_eq!(Some(&cursor), seen.last());
    let ticket = json!({"events": "Order", "after_seq": cursor}).to_string();
    let rest = Reader::open(&mut client, ticket).await.all().await;
    seen.extend(sequences(&rest));
    assert_eq!(seen, all);
}

#[tokio::test]
async fn list_flights_names_every_entity_and_table_with_the_schema_doget_sends() {
    let stack = Stack::start().await;
    let order = stack.new_order("1.00", "new", Utc::now()).await;
    stack.publish(&order).await;
    let mut client = stack.client().await;
    let flights: Vec<_> = client
        .list_flights("")
        .await
        .expect("ListFlights")
        .try_collect()
        .await
        .expect("flights");
    let paths: Vec<Vec<String>> = flights
        .iter()
        .map(|f| {
            f.flight_descriptor
                .as_ref()
                .expect("descriptor")
                .path
                .clone()
        })
        .collect();
    for wanted in [
        ["events", "Customer"],
        ["events", "Order"],
        ["events", "OrderItem"],
        ["export", "customers"],
        ["export", "orders"],
        ["export", "order_items"],
    ] {
        assert!(
            paths.contains(&wanted.map(String::from).to_vec()),
            "{wanted:?} in {paths:?}"
        );
    }
    let orders = flights
        .iter()
        .find(|f| {
            f.flight_descriptor
                .as_ref()
                .is_some_and(|d| d.path == ["events", "Order"])
        })
        .expect("Order events");
    assert_eq!(orders.total_records, 1);
    let listed = orders.clone().try_decode_schema().expect("schema");
    let ticket = orders.endpoint[0].ticket.clone().expect("ticket");
    let schema = client
        .get_schema(FlightDescriptor::new_path(vec![
            "events".into(),
            "Order".into(),
        ]))
        .await
        .expect("GetSchema");
    assert_eq!(schema, listed);
    let messages = Reader::open(&mut client, ticket.ticket).await.all().await;
    assert_eq!(messages[0].batch.schema().as_ref(), &listed);

    let err = Reader::try_open(&mut client, "observer_events:Nope")
        .await
        .err()
        .expect("unknown entity");
    assert!(err.to_string().contains("no entity `Nope`"), "{err}");
    let _ = Ticket::new("unused");
}

#[tokio::test]
async fn a_row_above_the_message_limit_fails_its_stream_and_the_server_goes_on() {
    let stack = Stack::start_with(|s| s.max_message_bytes = 64 * 1024).await;
    let mut big = stack.new_order("1.00", "new", Utc::now()).await;
    big.data.as_mut().expect("row")["status"] = json!("x".repeat(100 * 1024));
    stack.publish(&big).await;
    let mut client = stack.client().await;
    let mut reader = Reader::open(&mut client, "observer_events:Order").await;
    let err = reader
        .next()
        .await
        .err()
        .expect("the oversize row fails the stream");
    assert!(err.to_string().contains("message limit"), "{err}");
    let info = client
        .get_flight_info(FlightDescriptor::new_path(vec![
            "events".into(),
            "Order".into(),
        ]))
        .await
        .expect("the server still answers");
    assert_eq!(info.total_records, 1);
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096
}

/// The process's peak RSS since `reset_peak_resident` (VmHWM), which sees the spikes between
/// two samples of `resident_bytes`.
fn peak_resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    kib * 1024
}

/// Resets VmHWM to the current RSS (Linux `clear_refs` value 5); false where it cannot.
fn reset_peak_resident() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[tokio::test]
async fn a_slow_reader_slows_the_producer_instead_of_growing_the_server_memory() {
    let stack = Stack::start_with(|s| {
        s.batch_rows = 500;
        s.queued_batches = 2;
    })
    .await;
    // 40k events of about 2 KiB: 80 MiB stored, far more than the bound below.
    let template = stack.new_order("1.00", "new", Utc::now()).await;
    let padding = "x".repeat(2048);
    let total = 40_000;
    let mut acks = Vec::new();
    for _ in 0..total {
        let mut order = event("Order", Op::Insert, None, template.data.clone(), Utc::now());
        order.data.as_mut().expect("row")["status"] = json!(padding);
        let body = serde_json::to_vec(&order).expect("serialise");
        acks.push(
            stack
                .publisher
                .publish("herald.events.Order.insert", body.into())
                .await
                .expect("publish"),
        );
        if acks.len() == 1000 {
            for ack in acks.drain(..) {
                ack.await.expect("stored");
            }
        }
    }
    for ack in acks.drain(..) {
        ack.await.expect("stored");
    }
    let mut client = stack.client().await;
    let mut reader = Reader::open(&mut client, "observer_events:Order").await;
    let mut read = reader
        .next_rows(Duration::from_secs(10))
        .await
        .batch
        .num_rows();
    let baseline = resident_bytes();
    let exact = reset_peak_resident();
    let mut peak = baseline;
    // The slow client: a pause before each batch it takes, long enough in all (8 s) for an
    // unbounded producer to have read the whole stream into memory (it then grows by 60 MiB and
    // more, even in a debug build; bounded, by a few MiB).
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        peak = peak.max(resident_bytes());
        if exact {
            peak = peak.max(peak_resident_bytes());
        }
        read += reader
            .next_rows(Duration::from_secs(10))
            .await
            .batch
            .num_rows();
    }
    let growth = peak.saturating_sub(baseline);
    eprintln!("RSS growth while reading slowly: {} KiB", growth / 1024);
    assert!(
        growth < 40 * 1024 * 1024,
        "RSS grew by {} MiB while the client read slowly",
        growth / (1024 * 1024)
    );
    while let Some(message) = reader.next().await.expect("a batch") {
        read += message.batch.num_rows();
    }
    assert_eq!(read, total, "nothing is lost to the slowness");
}

/// The names of the flight-streamer's consumers on HERALD_EVENTS, as an operator sees them.
async fn flight_consumers(stack: &Stack) -> Vec<String> {
    let admin = async_nats::ConnectOptions::new()
        .user_and_password("cli".into(), herald_test_support::service_password("cli"))
        .connect(stack.nats.url())
        .await
        .expect("connect as cli");
    let stream = async_nats::jetstream::new(admin)
        .get_stream(herald_shared::subjects::EVENTS_STREAM)
        .await
        .expect("HERALD_EVENTS");
    let names: Vec<String> = stream
        .consumer_names()
        .try_collect()
        .await
        .expect("consumer names");
    names
        .into_iter()
        .filter(|n| n.starts_with("flight_"))
        .collect()
}

#[tokio::test]
async fn a_cancelled_follow_stream_leaves_no_consumer_on_the_server() {
    let stack = Stack::start_with(|s| s.keepalive = Duration::from_millis(500)).await;
    let order = stack.new_order("1.00", "new", Utc::now()).await;
    let first = stack.publish(&order).await;
    let mut client = stack.client().await;
    let mut reader = Reader::open(
        &mut client,
        json!({"events": "Order", "follow": true}).to_string(),
    )
    .await;
    assert_eq!(
        sequences(&[reader.next_rows(Duration::from_secs(5)).await]),
        [first]
    );
    let consumers = flight_consumers(&stack).await;
    assert_eq!(
        consumers.len(),
        1,
        "one consumer for the stream: {consumers:?}"
    );

    // An idle tail outlives the inactivity threshold with the same consumer: its waiting pull
    // request keeps it active.
    let idle_for = herald_flight_streamer::events::INACTIVE_THRESHOLD * 2;
    let until = tokio::time::Instant::now() + idle_for;
    while tokio::time::Instant::now() < until {
        let idle = reader.next().await.expect("no error").expect("goes on");
        assert_eq!(idle.batch.num_rows(), 0);
    }
    assert_eq!(
        flight_consumers(&stack).await,
        consumers,
        "not removed nor replaced"
    );
    let live = stack.new_order("2.00", "paid", Utc::now()).await;
    let seq = stack.publish(&live).await;
    assert_eq!(
        sequences(&[reader.next_rows(Duration::from_secs(5)).await]),
        [seq]
    );

    // The client cancels: the server-side consumer is gone within a bound well under the 30 s
    // an ordered consumer would otherwise linger.
    drop(reader);
    drop(client);
    let cancelled = tokio::time::Instant::now();
    let bound = Duration::from_secs(15);
    loop {
        let left = flight_consumers(&stack).await;
        if left.is_empty() {
            break;
        }
        assert!(
            cancelled.elapsed() < bound,
            "consumers {left:?} still there {:?} after the client cancelled",
            cancelled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn a_follow_client_that_pauses_past_the_inactivity_threshold_loses_and_repeats_nothing() {
    let stack = Stack::start_with(|s| {
        s.batch_rows = 100;
        s.queued_batches = 1;
        s.keepalive = Duration::from_millis(500);
    })
    .await;
    // 8000 events of about 2 KiB: 16 MiB stored, more than the queue, the consumer's pull and
    // both ends' HTTP/2 windows hold, so a client that stops reading stops the producer.
    let template = stack.new_order("1.00", "new", Utc::now()).await;
    let padding = "x".repeat(2048);
    let publish = |count: usize| {
        let stack = &stack;
        let template = &template;
        let padding = &padding;
        async move {
            let (mut acks, mut seqs) = (Vec::new(), Vec::new());
            for n in 1..=count {
                let mut order = event("Order", Op::Insert, None, template.data.clone(), Utc::now());
                order.data.as_mut().expect("row")["status"] = json!(padding);
                let body = serde_json::to_vec(&order).expect("serialise");
                acks.push(
                    stack
                        .publisher
                        .publish("herald.events.Order.insert", body.into())
                        .await
                        .expect("publish"),
                );
                // A bounded number of acks in flight, as the client allows.
                if acks.len() == 1000 || n == count {
                    for ack in acks.drain(..) {
                        seqs.push(ack.await.expect("stored").sequence);
                    }
                }
            }
            seqs
        }
    };
    let mut expected = publish(8000).await;
    let mut client = stack.client().await;
    let mut reader = Reader::open(
        &mut client,
        json!({"events": "Order", "follow": true}).to_string(),
    )
    .await;
    let mut seen = sequences(&[reader.next_rows(Duration::from_secs(10)).await]);
    let consumers = flight_consumers(&stack).await;
    assert_eq!(consumers.len(), 1, "one consumer: {consumers:?}");

    // The client stops reading for well past the inactivity threshold, while live events keep
    // arriving; the server removes the stalled reader's consumer meanwhile.
    let pause = herald_flight_streamer::events::INACTIVE_THRESHOLD * 3;
    let paused = tokio::time::Instant::now();
    expected.extend(publish(200).await);
    tokio::time::sleep_until(paused + pause).await;
    let during = flight_consumers(&stack).await;
    assert!(
        !during.contains(&consumers[0]),
        "the premise: the server removed the paused stream's consumer ({during:?})"
    );

    // Resumed: every event once, in stream order, including those stored during the pause and
    // one published after it.
    expected.extend(publish(1).await);
    while seen.len() < expected.len() {
        let message = reader.next_rows(Duration::from_secs(10)).await;
        seen.extend(sequences(&[message]));
    }
    assert_eq!(seen.len(), expected.len(), "no event repeated");
    assert!(seen == expected, "every event once, in order");
    let after = flight_consumers(&stack).await;
    assert_eq!(after.len(), 1, "one consumer again: {after:?}");
    assert_ne!(after, consumers, "recreated, not the removed one");

    // The client cancels: the recreated consumer goes as promptly as the first would have, not
    // after the 30 s async-nats gives the consumers its ordered reader recreates.
    drop(reader);
    drop(client);
    let cancelled = tokio::time::Instant::now();
    let bound = herald_flight_streamer::events::INACTIVE_THRESHOLD + Duration::from_secs(5);
    loop {
        let left = flight_consumers(&stack).await;
        if left.is_empty() {
            break;
        }
        assert!(
            cancelled.elapsed() < bound,
            "the recreated consumer {left:?} still there {:?} after the client cancelled",
            cancelled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "recreated consumer gone {:?} after the cancel",
        cancelled.elapsed()
    );
}
