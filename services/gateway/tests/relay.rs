//! The relay under hostile input: values from SQL or HTTP that would break a NATS header, events
//! the server refuses, and a GraphQL pool that is exhausted. None of them may stop the relay or
//! hold up keys other than the one at fault.

mod common;

use std::time::Duration;

use async_nats::jetstream::stream::{Config as StreamConfig, DiscardPolicy};
use common::World;
use herald_gateway::relay::RelaySettings;
use herald_shared::headers;
use herald_shared::subjects::EVENTS_STREAM;
use herald_test_support::eventually_async;

const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn outbox_len(world: &World, table: &'static str) -> i64 {
    let sql = match table {
        "herald_outbox" => "SELECT count(*) FROM herald_outbox",
        "herald_outbox_failed" => "SELECT count(*) FROM herald_outbox_failed",
        _ => "SELECT count(*) FROM herald_outbox_attempts",
    };
    sqlx::query_scalar(sql)
        .fetch_one(&world.db)
        .await
        .expect("count rows")
}

async fn set_max_message_size(world: &World, bytes: i32) {
    let mut stream = world
        .nats
        .jetstream
        .get_stream(EVENTS_STREAM)
        .await
        .expect("events stream");
    let config = StreamConfig {
        max_message_size: bytes,
        ..stream.info().await.expect("stream info").config.clone()
    };
    world
        .nats
        .jetstream
        .update_stream(config)
        .await
        .expect("update the events stream");
}

#[tokio::test]
async fn a_traceparent_with_a_newline_set_in_sql_cannot_stop_the_relay() {
    let world = World::start().await;
    let gateway = world.gateway().await;
    let poisons = [
        format!("{VALID}\nX: 1"),
        format!("00-{}-00f067aa0ba902b7-01", "a".repeat(64 * 1024)),
    ];
    for (id, poison) in poisons.iter().enumerate() {
        let mut tx = world.db.begin().await.expect("begin");
        sqlx::query("SELECT set_config('herald.traceparent', $1, true)")
            .bind(poison)
            .execute(&mut *tx)
            .await
            .expect("set the traceparent");
        sqlx::query("INSERT INTO customers (id, name) VALUES ($1, 'Mallory')")
            .bind(id as i32 + 1)
            .execute(&mut *tx)
            .await
            .expect("insert");
        tx.commit().await.expect("commit");
    }
    let mut tx = world.db.begin().await.expect("begin");
    sqlx::query("SELECT set_config('herald.traceparent', $1, true)")
        .bind(VALID)
        .execute(&mut *tx)
        .await
        .expect("set the traceparent");
    sqlx::query("INSERT INTO customers (id, name) VALUES (3, 'Ada')")
        .execute(&mut *tx)
        .await
        .expect("insert");
    tx.commit().await.expect("commit");

    let stored = world.wait_for_events(3).await;
    for (n, event) in stored.iter().enumerate() {
        let parent = event.header(headers::TRACEPARENT).expect("a traceparent");
        assert!(
            herald_shared::traceparent::is_valid(&parent),
            "event {n} carries {parent:?}"
        );
    }
    assert_ne!(
        stored[0].header(headers::TRACEPARENT).as_deref(),
        Some(VALID)
    );
    assert_eq!(
        stored[2].header(headers::TRACEPARENT).as_deref(),
        Some(VALID),
        "a valid writer's trace is kept"
    );
    assert!(
        gateway.not_ready(&world.nats).await.is_empty(),
        "the relay still runs"
    );
    assert_eq!(outbox_len(&world, "herald_outbox").await, 0);
    gateway.stop().await;
}

#[tokio::test]
async fn an_over_long_http_traceparent_is_dropped_not_carried() {
    let world = World::start().await;
    let gateway = world.gateway().await;
    let long = format!("00-{}-00f067aa0ba902b7-01", "a".repeat(8 * 1024));
    let (status, body) = gateway
        .post(
            "mutation { createCustomer(input: {name: \"Eve\"}) { id } }",
            serde_json::json!({}),
            &[
                ("traceparent", long.as_str()),
                ("x-api-key", common::API_KEY),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let stored = world.wait_for_events(1).await;
    let parent = stored[0].header(headers::TRACEPARENT).expect("traceparent");
    assert!(herald_shared::traceparent::is_valid(&parent), "{parent:?}");
    gateway.stop().await;
}

/// At most `limit` messages per subject (entity and op) on the events stream, refusing new ones
/// (JetStream error 10077): a refusal that is no size limit. `None` lifts it.
async fn limit_per_subject(world: &World, limit: Option<i64>) {
    let mut stream = world
        .nats
        .jetstream
        .get_stream(EVENTS_STREAM)
        .await
        .expect("events stream");
    let current = stream.info().await.expect("stream info").config.clone();
    let config = match limit {
        Some(n) => StreamConfig {
            max_messages_per_subject: n,
            discard: DiscardPolicy::New,
            discard_new_per_subject: true,
            ..current
        },
        None => StreamConfig {
            max_messages_per_subject: -1,
            discard: DiscardPolicy::Old,
            discard_new_per_subject: false,
            ..current
        },
    };
    world
        .nats
        .jetstream
        .update_stream(config)
        .await
        .expect("update the events stream");
}

/// 470 rows of one key that the server refuses (a per-subject limit, not a size) sit at the head
/// of the outbox. The other keys' events arrive while that key is still held; the refused rows
/// move aside after bounded tries, and once the limit is lifted the key's remaining events follow
/// in order.
#[tokio::test]
async fn five_hundred_refused_rows_of_one_key_hold_only_that_key() {
    let world = World::start().await;
    // Room for the 20 customer inserts and 30 of the order's updates.
    limit_per_subject(&world, Some(30)).await;
    let mut settings = world.settings();
    settings.relay = RelaySettings {
        poll_interval: Duration::from_millis(100),
        retry_delay: Duration::from_millis(300),
        max_attempts: 3,
        ..Default::default()
    };
    let gateway = world.gateway_with(settings).await;
    sqlx::raw_sql(
        "INSERT INTO orders (id, status) VALUES (1, 'new');
         DO $$ BEGIN
           FOR i IN 1..500 LOOP
             UPDATE orders SET note = 'n' || i WHERE id = 1;
           END LOOP;
         END $$;
         INSERT INTO customers (id, name) SELECT i, 'c' || i FROM generate_series(1, 20) AS i;",
    )
    .execute(&world.db)
    .await
    .expect("write the rows");

    eventually_async(
        "the other keys' events while order 1 is held",
        Duration::from_secs(20),
        || async {
            let customers = world
                .events()
                .await
                .iter()
                .filter(|s| s.subject.starts_with("herald.events.Customer."))
                .count();
            (customers == 20).then_some(())
        },
    )
    .await;
    assert!(
        outbox_len(&world, "herald_outbox").await > 400,
        "order 1's rows are still waiting: only their own key is held"
    );
    let error: String =
        eventually_async("the refusal recorded", Duration::from_secs(10), || async {
            sqlx::query_scalar(
                "SELECT last_error FROM herald_outbox_attempts UNION ALL \
                 SELECT reason FROM herald_outbox_failed LIMIT 1",
            )
            .fetch_optional(&world.db)
            .await
            .expect("read attempts")
        })
        .await;
    assert!(error.contains("maximum messages"), "{error}");
    eventually_async(
        "a refused row moved aside after its tries",
        Duration::from_secs(20),
        || async { (outbox_len(&world, "herald_outbox_failed").await >= 1).then_some(()) },
    )
    .await;

    limit_per_subject(&world, None).await;
    eventually_async("an empty outbox", Duration::from_secs(30), || async {
        (outbox_len(&world, "herald_outbox").await == 0).then_some(())
    })
    .await;
    let failed = outbox_len(&world, "herald_outbox_failed").await as usize;
    let orders: Vec<_> = world
        .events()
        .await
        .iter()
        .filter(|s| s.subject.starts_with("herald.events.Order."))
        .map(|s| s.event())
        .collect();
    assert_eq!(
        orders.len() + failed,
        501,
        "every row is an event or set aside"
    );
    let notes: Vec<usize> = orders
        .iter()
        .filter_map(|e| {
            e.data.as_ref()?["note"]
                .as_str()?
                .trim_start_matches('n')
                .parse()
                .ok()
        })
        .collect();
    assert!(
        notes.windows(2).all(|w| w[0] < w[1]),
        "order 1's events stay in commit order"
    );
    let notices = world
        .dead_letters()
        .await
        .iter()
        .filter(|l| {
            l.header(headers::ERROR)
                .is_some_and(|e| e.contains("refused"))
        })
        .count();
    assert_eq!(notices, failed, "one dead letter per row set aside");
    assert_eq!(outbox_len(&world, "herald_outbox_attempts").await, 0);
    gateway.stop().await;
}

/// Rows larger than the stream's maximum message size (JetStream error 10054) can never be
/// stored there: each is set aside at its first refusal (no retries held against its key), the
/// other keys flow, and the key's later events go on once they fit.
#[tokio::test]
async fn rows_too_large_for_the_stream_are_set_aside_at_once() {
    let world = World::start().await;
    set_max_message_size(&world, 4096).await;
    let mut settings = world.settings();
    settings.relay = RelaySettings {
        poll_interval: Duration::from_millis(100),
        retry_delay: Duration::from_secs(3600),
        max_attempts: 3,
        ..Default::default()
    };
    let gateway = world.gateway_with(settings).await;
    sqlx::raw_sql(
        "INSERT INTO orders (id, status) VALUES (1, 'new');
         DO $$ BEGIN
           FOR i IN 1..50 LOOP
             UPDATE orders SET note = repeat('x', 5000) || i WHERE id = 1;
           END LOOP;
         END $$;
         INSERT INTO customers (id, name) SELECT i, 'c' || i FROM generate_series(1, 20) AS i;
         UPDATE orders SET note = 'small' WHERE id = 1;
         UPDATE orders SET status = 'paid' WHERE id = 1;",
    )
    .execute(&world.db)
    .await
    .expect("write the rows");

    // With a one-hour pause between tries, only setting aside at once empties the outbox.
    eventually_async("an empty outbox", Duration::from_secs(60), || async {
        (outbox_len(&world, "herald_outbox").await == 0).then_some(())
    })
    .await;
    // The 50 large updates, and the one that shrinks the note (its `before` is still large).
    assert_eq!(outbox_len(&world, "herald_outbox_failed").await, 51);
    assert_eq!(
        outbox_len(&world, "herald_outbox_attempts").await,
        0,
        "no size refusal was held for a retry"
    );
    let reasons: Vec<String> = sqlx::query_scalar("SELECT reason FROM herald_outbox_failed")
        .fetch_all(&world.db)
        .await
        .expect("read reasons");
    assert!(
        reasons.iter().all(|r| r.contains("too large")),
        "{reasons:?}"
    );
    let events = world.events().await;
    let customers = events
        .iter()
        .filter(|s| s.subject.starts_with("herald.events.Customer."))
        .count();
    assert_eq!(customers, 20);
    let notes: Vec<Option<String>> = events
        .iter()
        .filter(|s| s.subject.starts_with("herald.events.Order."))
        .map(|s| {
            let event = s.event();
            event
                .data
                .as_ref()
                .and_then(|d| d["note"].as_str().map(str::to_owned))
        })
        .collect();
    assert_eq!(
        notes,
        vec![None, Some("small".to_owned())],
        "the insert, then the update that fits"
    );
    let notices = world
        .dead_letters()
        .await
        .iter()
        .filter(|l| {
            l.header(headers::ERROR)
                .is_some_and(|e| e.contains("too large"))
        })
        .count();
    assert_eq!(notices, 51, "one dead letter per row set aside");
    gateway.stop().await;
}

#[tokio::test]
async fn the_relay_keeps_going_while_every_graphql_connection_is_taken() {
    let world = World::start().await;
    let mut settings = world.settings();
    settings.max_connections = 1;
    let gateway = world.gateway_with(settings).await;
    let _held = gateway
        .graphql_pool()
        .acquire()
        .await
        .expect("take the only connection");
    sqlx::query("INSERT INTO customers (id, name) VALUES (1, 'Ada')")
        .execute(&world.db)
        .await
        .expect("insert straight in SQL");
    let stored = world.wait_for_events(1).await;
    assert_eq!(stored[0].event().key, "1");
    drop(_held);
    gateway.stop().await;
}

#[tokio::test]
async fn at_is_the_commit_time_not_the_change_time() {
    let world = World::start().await;
    let gateway = world.gateway().await;
    sqlx::raw_sql(
        "BEGIN;
         INSERT INTO customers (id, name, email) VALUES (1, 'Slow', clock_timestamp()::text);
         SELECT pg_sleep(0.5);
         COMMIT;",
    )
    .execute(&world.db)
    .await
    .expect("a slow transaction");
    let event = world.wait_for_events(1).await[0].event();
    let data = event.data.expect("data");
    let changed_at: chrono::DateTime<chrono::Utc> = chrono::DateTime::parse_from_str(
        data["email"].as_str().expect("time"),
        "%Y-%m-%d %H:%M:%S%.f%#z",
    )
    .expect("a timestamp")
    .into();
    let after_change = event.at - changed_at;
    assert!(
        after_change >= chrono::Duration::milliseconds(450),
        "`at` is {after_change:?} after the change, so not the commit time"
    );
    gateway.stop().await;
}

async fn add_password_hash(world: &World) {
    sqlx::query("ALTER TABLE customers ADD COLUMN password_hash text")
        .execute(&world.db)
        .await
        .expect("add a hidden column");
}

#[tokio::test]
async fn a_column_the_schema_file_does_not_expose_never_reaches_an_event() {
    let world = World::start().await;
    add_password_hash(&world).await;
    let gateway = world.gateway().await;
    sqlx::raw_sql(
        "INSERT INTO customers (id, name, password_hash) VALUES (1, 'Ada', '$argon2id$secret');
         UPDATE customers SET password_hash = '$argon2id$rotated' WHERE id = 1;
         UPDATE customers SET name = 'Ada L.' WHERE id = 1;
         TRUNCATE customers, orders;",
    )
    .execute(&world.db)
    .await
    .expect("write");
    let stored = world.wait_for_events(3).await;
    assert_eq!(
        stored.len(),
        3,
        "a change to hidden columns only is no event: {:?}",
        stored.iter().map(|s| s.subject.clone()).collect::<Vec<_>>()
    );
    for s in &stored {
        let body = String::from_utf8_lossy(&s.payload);
        assert!(
            !body.contains("argon2id") && !body.contains("password_hash"),
            "{body}"
        );
    }
    assert_eq!(stored[1].event().changed, Some(vec!["name".to_owned()]));
    gateway.stop().await;
}

#[tokio::test]
async fn every_column_reaches_events_when_configured_so() {
    let world = World::start().await;
    add_password_hash(&world).await;
    let mut settings = world.settings();
    settings.relay.all_columns_in_events = true;
    let gateway = world.gateway_with(settings).await;
    sqlx::query("INSERT INTO customers (id, name, password_hash) VALUES (1, 'Ada', 'h')")
        .execute(&world.db)
        .await
        .expect("insert");
    let event = world.wait_for_events(1).await[0].event();
    assert_eq!(event.data.expect("data")["password_hash"], "h");
    gateway.stop().await;
}
