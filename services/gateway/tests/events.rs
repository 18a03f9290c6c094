//! The heart of the gateway: every committed change becomes exactly one event, in commit order
//! per key, whoever made it and whatever crashes in between.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::World;
use herald_gateway::relay::{Pass, Relay, RelaySettings};
use herald_shared::{Op, headers};
use herald_test_support::NatsServer;
use serde_json::json;

fn relay(world: &World) -> Relay {
    Relay::new(
        world.db.clone(),
        world.nats.jetstream.clone(),
        world.nats.client.server_info().max_payload,
        RelaySettings::default(),
    )
}

async fn install(world: &World) {
    let file = herald_gateway::SchemaFile::parse(common::SCHEMA).expect("schema");
    herald_gateway::capture::install(&world.db, &file)
        .await
        .expect("install capture");
}

async fn outbox_depth(world: &World) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM herald_outbox")
        .fetch_one(&world.db)
        .await
        .expect("count outbox")
}

#[tokio::test]
async fn a_change_made_straight_in_sql_becomes_exactly_one_event() {
    let world = World::start().await;
    let gateway = world.gateway().await;
    sqlx::raw_sql(
        "INSERT INTO customers (id, name, email) VALUES (1, 'Ada', 'ada@example.com');
         UPDATE customers SET email = 'ada@lovelace.org' WHERE id = 1;
         UPDATE customers SET email = email WHERE id = 1;
         DELETE FROM customers WHERE id = 1;",
    )
    .execute(&world.db)
    .await
    .expect("write straight in SQL");

    let stored = world.wait_for_events(3).await;
    assert_eq!(stored.len(), 3, "a no-op update writes no event");
    let events: Vec<_> = stored.iter().map(|s| s.event()).collect();
    for (s, e) in stored.iter().zip(&events) {
        assert_eq!(s.header(headers::MSG_ID), Some(e.id.to_string()));
        assert_eq!(e.id.get_version_num(), 7, "event ids are UUIDv7");
        assert_eq!(
            s.subject,
            format!(
                "herald.events.Customer.{}.{}.0",
                e.op,
                herald_shared::subjects::key_token(&e.key)
            ),
            "keyed, and partitioned by the stream"
        );
        assert_eq!(e.entity, "Customer");
        assert_eq!(e.key, "1");
        assert_eq!(e.actor, None, "nobody is named for a plain SQL change");
        assert!(
            s.header(headers::TRACEPARENT).is_some(),
            "every event carries a trace"
        );
    }
    let ops: Vec<Op> = events.iter().map(|e| e.op).collect();
    assert_eq!(ops, [Op::Insert, Op::Update, Op::Delete]);
    let ada = json!({"id": 1, "name": "Ada", "email": "ada@example.com"});
    let ada_after = json!({"id": 1, "name": "Ada", "email": "ada@lovelace.org"});
    assert_eq!(events[0].data, Some(ada.clone()));
    assert_eq!(events[0].before, None);
    assert_eq!(events[0].changed, None);
    assert_eq!(events[1].before, Some(ada));
    assert_eq!(events[1].data, Some(ada_after.clone()));
    assert_eq!(events[1].changed, Some(vec!["email".to_owned()]));
    assert_eq!(events[2].data, None);
    assert_eq!(events[2].before, Some(ada_after));
    // One simple-query batch is one implicit transaction: one txid, times in change order.
    assert!(events.iter().all(|e| e.tx == events[0].tx));
    assert!(events.windows(2).all(|w| w[0].at <= w[1].at));
    // UUIDv7 orders by its millisecond timestamp; within one millisecond the stream sequence
    // (checked above through `ops`) is the order.
    let millis = |id: &uuid::Uuid| id.as_u128() >> 80;
    assert!(
        events
            .windows(2)
            .all(|w| millis(&w[0].id) <= millis(&w[1].id))
    );
    herald_test_support::eventually_async("an empty outbox", Duration::from_secs(10), || async {
        (outbox_depth(&world).await == 0).then_some(())
    })
    .await;
    gateway.stop().await;
}

#[tokio::test]
async fn events_committed_while_no_relay_runs_all_arrive_exactly_once() {
    let world = World::start().await;
    install(&world).await;
    sqlx::query("INSERT INTO counters (id, n) SELECT g, 0 FROM generate_series(1, 300) g")
        .execute(&world.db)
        .await
        .expect("insert");
    assert!(
        world.events().await.is_empty(),
        "nothing publishes without a relay"
    );
    assert_eq!(
        outbox_depth(&world).await,
        300,
        "the events wait in the outbox"
    );

    let gateway = world.gateway().await;
    let stored = world.wait_for_events(300).await;
    let ids: HashSet<_> = stored.iter().map(|s| s.event().id).collect();
    assert_eq!(ids.len(), 300);
    gateway.stop().await;
    assert_eq!(world.events().await.len(), 300);
}

#[tokio::test]
async fn a_relay_crash_after_publish_before_delete_duplicates_nothing_in_the_stream() {
    let world = World::start().await;
    install(&world).await;
    sqlx::query("INSERT INTO counters (id, n) SELECT g, 0 FROM generate_series(1, 20) g")
        .execute(&world.db)
        .await
        .expect("insert");
    // Keep a copy of the rows as they were, then publish and delete them: restoring the copy is
    // exactly the state a relay leaves when it dies after JetStream's ack but before its commit.
    sqlx::query("CREATE TABLE outbox_copy AS SELECT * FROM herald_outbox")
        .execute(&world.db)
        .await
        .expect("copy");
    let relay = relay(&world);
    assert_eq!(relay.pass().await.expect("pass"), Pass::Handled(20));
    assert_eq!(world.events().await.len(), 20);
    sqlx::query("INSERT INTO herald_outbox SELECT * FROM outbox_copy")
        .execute(&world.db)
        .await
        .expect("restore");

    assert_eq!(relay.pass().await.expect("second pass"), Pass::Handled(20));
    assert_eq!(outbox_depth(&world).await, 0);
    let stored = world.events().await;
    assert_eq!(
        stored.len(),
        20,
        "JetStream absorbed the republished events by Msg-Id"
    );
}

#[tokio::test]
async fn two_concurrent_relays_publish_each_event_once() {
    let world = World::start().await;
    install(&world).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let settings = RelaySettings {
        batch_size: 7,
        poll_interval: Duration::from_millis(20),
        ..Default::default()
    };
    let relays: Vec<_> = (0..2)
        .map(|_| {
            let relay = Relay::new(
                world.db.clone(),
                world.nats.jetstream.clone(),
                world.nats.client.server_info().max_payload,
                settings.clone(),
            );
            tokio::spawn(relay.run(shutdown.clone()))
        })
        .collect();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let db = world.db.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    sqlx::query("INSERT INTO counters (id, n) VALUES ($1, 0)")
                        .bind(w * 1000 + i)
                        .execute(&db)
                        .await
                        .expect("insert");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let stored = world.wait_for_events(200).await;
    herald_test_support::eventually_async("an empty outbox", Duration::from_secs(10), || async {
        (outbox_depth(&world).await == 0).then_some(())
    })
    .await;
    shutdown.cancel();
    for relay in relays {
        relay.await.expect("relay");
    }
    let stored_again = world.events().await;
    assert_eq!(stored_again.len(), 200, "no event was published twice");
    let ids: HashSet<_> = stored.iter().map(|s| s.event().id).collect();
    assert_eq!(ids.len(), 200);
}

#[tokio::test]
async fn events_of_one_key_reach_the_stream_in_commit_order_under_concurrent_writers() {
    let world = World::start().await;
    install(&world).await;
    sqlx::query("INSERT INTO counters (id, n) SELECT g, 0 FROM generate_series(1, 3) g")
        .execute(&world.db)
        .await
        .expect("insert");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let settings = RelaySettings {
        batch_size: 5,
        poll_interval: Duration::from_millis(10),
        ..Default::default()
    };
    let relays: Vec<_> = (0..2)
        .map(|_| {
            let relay = Relay::new(
                world.db.clone(),
                world.nats.jetstream.clone(),
                world.nats.client.server_info().max_payload,
                settings.clone(),
            );
            tokio::spawn(relay.run(shutdown.clone()))
        })
        .collect();
    // Six writers race to increment three counters; each increment's value is its commit order
    // for that key, because the row lock serialises writers of one row.
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let db = world.db.clone();
            tokio::spawn(async move {
                for i in 0..40 {
                    let id = (w + i) % 3 + 1;
                    sqlx::query("UPDATE counters SET n = n + 1 WHERE id = $1")
                        .bind(id)
                        .execute(&db)
                        .await
                        .expect("update");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let stored = world.wait_for_events(3 + 240).await;
    shutdown.cancel();
    for relay in relays {
        relay.await.expect("relay");
    }
    let mut last: HashMap<String, i64> = HashMap::new();
    for event in stored.iter().map(|s| s.event()) {
        let n = event
            .data
            .as_ref()
            .and_then(|d| d["n"].as_i64())
            .expect("n");
        let previous = last.insert(event.key.clone(), n);
        if let Some(previous) = previous {
            assert_eq!(
                n,
                previous + 1,
                "key {} went from {previous} to {n}",
                event.key
            );
        }
    }
    assert_eq!(last.values().sum::<i64>(), 240);
}

#[tokio::test]
async fn an_event_above_the_nats_max_payload_is_set_aside_without_blocking_later_events() {
    let world = World::start_with_nats(NatsServer::start_with("max_payload: 65536")).await;
    let gateway = world.gateway().await;
    let big = "x".repeat(100_000);
    sqlx::query("INSERT INTO orders (id, status, note) VALUES (1, 'new', $1)")
        .bind(&big)
        .execute(&world.db)
        .await
        .expect("insert a big row");
    sqlx::query("INSERT INTO orders (id, status) VALUES (2, 'new')")
        .execute(&world.db)
        .await
        .expect("insert a small row");

    let stored = world.wait_for_events(1).await;
    assert_eq!(
        stored[0].event().key,
        "2",
        "the later event was not blocked"
    );
    let letters =
        herald_test_support::eventually_async("a dead letter", Duration::from_secs(10), || async {
            let letters = world.dead_letters().await;
            (!letters.is_empty()).then_some(letters)
        })
        .await;
    // The notice is stored before the relay's transaction that moves the row commits.
    let (failed_id, reason): (uuid::Uuid, String) = herald_test_support::eventually_async(
        "the big event kept in herald_outbox_failed",
        Duration::from_secs(10),
        || async {
            sqlx::query_as("SELECT id, reason FROM herald_outbox_failed")
                .fetch_optional(&world.db)
                .await
                .expect("query herald_outbox_failed")
        },
    )
    .await;
    let error = letters[0].header(headers::ERROR).expect("Herald-Error");
    assert!(
        error.contains("65536") && error.contains(&failed_id.to_string()),
        "{error}"
    );
    assert!(reason.contains("max payload"), "{reason}");
    assert_eq!(
        letters[0].header(headers::ORIGINAL_MSG_ID),
        Some(failed_id.to_string())
    );
    // The subject it was to be published on, key token included, so a replay is partitioned.
    assert_eq!(
        letters[0].header(headers::ORIGINAL_SUBJECT),
        Some(format!(
            "herald.events.Order.insert.{}",
            herald_shared::subjects::key_token("1")
        ))
    );
    herald_test_support::eventually_async("an empty outbox", Duration::from_secs(10), || async {
        (outbox_depth(&world).await == 0).then_some(())
    })
    .await;
    assert_eq!(world.events().await.len(), 1);
    gateway.stop().await;
}

#[tokio::test]
async fn a_transaction_that_commits_late_is_never_skipped() {
    let world = World::start().await;
    install(&world).await;
    let relay = relay(&world);
    // The early transaction takes the smaller outbox seq but commits after a later one has been
    // relayed: a high-water mark would skip it forever.
    let mut early = world.db.begin().await.expect("begin");
    sqlx::query("INSERT INTO counters (id, n) VALUES (1, 0)")
        .execute(&mut *early)
        .await
        .expect("insert in the early transaction");
    sqlx::query("INSERT INTO counters (id, n) VALUES (2, 0)")
        .execute(&world.db)
        .await
        .expect("insert and commit");
    assert_eq!(relay.pass().await.expect("pass"), Pass::Handled(1));
    early.commit().await.expect("commit late");
    assert_eq!(relay.pass().await.expect("pass"), Pass::Handled(1));
    let keys: Vec<String> = world.events().await.iter().map(|s| s.event().key).collect();
    assert_eq!(keys, ["2", "1"]);
}

#[tokio::test]
async fn events_wait_in_the_outbox_while_nats_is_down_and_arrive_when_it_returns() {
    let mut world = World::start().await;
    let gateway = world.gateway().await;
    world.nats_server.kill();
    sqlx::query("INSERT INTO counters (id, n) SELECT g, 0 FROM generate_series(1, 50) g")
        .execute(&world.db)
        .await
        .expect("insert while NATS is down");
    world.nats_server.restart();
    let stored = world.wait_for_events(50).await;
    let ids: HashSet<_> = stored.iter().map(|s| s.event().id).collect();
    assert_eq!(ids.len(), 50);
    herald_test_support::eventually_async("an empty outbox", Duration::from_secs(10), || async {
        (outbox_depth(&world).await == 0).then_some(())
    })
    .await;
    assert_eq!(world.events().await.len(), 50);
    gateway.stop().await;
}

#[tokio::test]
async fn the_relay_reports_depth_lag_and_publish_latency() {
    let metrics = herald_shared::admin::metrics_handle();
    let world = World::start().await;
    install(&world).await;
    sqlx::query("INSERT INTO counters (id, n) VALUES (1, 0)")
        .execute(&world.db)
        .await
        .expect("insert");
    relay(&world).pass().await.expect("pass");
    let page = metrics.render();
    for name in [
        "herald_gateway_outbox_depth",
        "herald_gateway_relay_lag_seconds",
        "herald_gateway_publish_latency_seconds",
        "herald_gateway_events_published_total",
    ] {
        assert!(page.contains(name), "{name} missing from:\n{page}");
    }
}

#[tokio::test]
async fn two_gateway_replicas_start_together_and_relay_each_change_once() {
    let world = World::start().await;
    let (first, second) = tokio::join!(world.gateway(), world.gateway());
    let key = ("x-api-key", common::API_KEY);
    for i in 0..20 {
        let replica = if i % 2 == 0 { &first } else { &second };
        let (_, body) = replica
            .post(
                &format!("mutation {{ createCounter(input: {{id: {i}, n: 0}}) {{ id }} }}"),
                json!({}),
                &[key],
            )
            .await;
        assert!(body.get("errors").is_none(), "{body}");
    }
    world.wait_for_events(20).await;
    herald_test_support::eventually_async("an empty outbox", Duration::from_secs(10), || async {
        (outbox_depth(&world).await == 0).then_some(())
    })
    .await;
    let stored = world.events().await;
    let ids: HashSet<_> = stored.iter().map(|s| s.event().id).collect();
    assert_eq!((stored.len(), ids.len()), (20, 20));
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn a_truncate_becomes_one_delete_event_per_row() {
    let world = World::start().await;
    install(&world).await;
    sqlx::raw_sql("INSERT INTO counters (id, n) VALUES (1, 10), (2, 20); TRUNCATE counters;")
        .execute(&world.db)
        .await
        .expect("insert then truncate");
    relay(&world).pass().await.expect("pass");
    let events: Vec<_> = world.events().await.iter().map(|s| s.event()).collect();
    let deletes: Vec<_> = events.iter().filter(|e| e.op == Op::Delete).collect();
    assert_eq!(events.len(), 4);
    assert_eq!(deletes.len(), 2);
    let mut befores: Vec<_> = deletes
        .iter()
        .map(|e| (e.key.clone(), e.before.clone()))
        .collect();
    befores.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        befores,
        [
            ("1".to_owned(), Some(json!({"id": 1, "n": 10}))),
            ("2".to_owned(), Some(json!({"id": 2, "n": 20}))),
        ]
    );
    assert!(deletes.iter().all(|e| e.data.is_none()));
}

#[tokio::test]
async fn a_commit_wakes_the_relay_through_notify_without_waiting_for_the_poll() {
    let world = World::start().await;
    let mut settings = world.settings();
    settings.relay.poll_interval = Duration::from_secs(600);
    let gateway = world.gateway_with(settings).await;
    // Let the relay finish its first pass and settle into waiting.
    herald_test_support::eventually_async(
        "the relay listening",
        Duration::from_secs(10),
        || async {
            let listening: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
            )
            .fetch_one(&world.db)
            .await
            .expect("pg_stat_activity");
            (listening > 0).then_some(())
        },
    )
    .await;
    sqlx::query("INSERT INTO counters (id, n) VALUES (1, 0)")
        .execute(&world.db)
        .await
        .expect("insert");
    let stored = world.wait_for_events(1).await;
    assert_eq!(stored[0].event().key, "1");
    gateway.stop().await;
}
