mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use herald_shared::dlq::DeadLetterInfo;
use herald_shared::{Op, SCHEMA_VERSION};
use herald_test_support::NatsServer;
use serde_json::json;

const OBSERVERS: &str = r#"
[[observer]]
name = "order_shipped"
entity = "Order"
ops = ["update"]
condition = 'changed_to("status", "shipped") && data.total >= 100'

[[observer.action]]
kind = "webhook"
url = "https://example.test/shipped"

[[observer.action]]
kind = "slack"
channel = "orders"

[[observer]]
name = "order_any"
entity = "Order"
ops = ["insert", "update"]

[[observer.action]]
kind = "job"
queue = "default"

[[observer]]
name = "user_created"
entity = "User"
ops = ["insert"]

[[observer.action]]
kind = "email"
to = "ops@example.test"
"#;

#[tokio::test]
async fn matching_observers_emit_exactly_the_expected_action_requests() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    let file = write_file(OBSERVERS);
    let app = App::spawn(&js, settings("dispatcher", file.path())).await;

    let mut shipped = event(
        "Order",
        Op::Update,
        "1",
        json!({"status": "shipped", "total": 100.00}),
    );
    shipped.before = Some(json!({"status": "paid", "total": 100}));
    shipped.changed = Some(vec!["status".into()]);
    let mut cheap = event(
        "Order",
        Op::Update,
        "2",
        json!({"status": "shipped", "total": 5}),
    );
    cheap.changed = Some(vec!["status".into()]);
    let created = event("Order", Op::Insert, "3", json!({"status": "new"}));
    let deleted = event("Order", Op::Delete, "3", json!({}));
    let user = event("User", Op::Insert, "u1", json!({"name": "ann"}));
    for e in [&shipped, &cheap, &created, &deleted, &user] {
        publish_event(&js, e).await;
    }

    let expected: BTreeSet<(String, String)> = [
        (format!("{}:order_shipped:0", shipped.id), "webhook"),
        (format!("{}:order_shipped:1", shipped.id), "slack"),
        (format!("{}:order_any:0", shipped.id), "job"),
        (format!("{}:order_any:0", cheap.id), "job"),
        (format!("{}:order_any:0", created.id), "job"),
        (format!("{}:user_created:0", user.id), "email"),
    ]
    .into_iter()
    .map(|(id, kind)| (id, kind.to_owned()))
    .collect();
    wait_for_actions(&js, expected.len() as u64).await;
    wait_until_drained(&js, "dispatcher").await;
    let requests = actions(&js).await;
    let got: BTreeSet<(String, String)> = requests
        .iter()
        .map(|r| (r.id.clone(), r.kind.clone()))
        .collect();
    assert_eq!(got, expected);
    assert_eq!(requests.len(), expected.len(), "no request twice");

    let webhook = requests
        .iter()
        .find(|r| r.kind == "webhook")
        .expect("webhook request");
    assert_eq!(
        webhook.config,
        json!({"url": "https://example.test/shipped"})
    );
    assert_eq!(webhook.event, shipped);
    assert_eq!(webhook.action_index, 0);
    assert_eq!(webhook.schema_version, SCHEMA_VERSION);
    app.stop().await;
}

#[tokio::test]
async fn poison_events_are_dead_lettered_with_their_reason_and_the_stream_moves_on() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    let file = write_file(OBSERVERS);
    let app = App::spawn(&js, settings("dispatcher", file.path())).await;

    publish_raw(&js, "herald.events.Order.insert", b"{not json").await;
    let mut future =
        serde_json::to_value(event("Order", Op::Insert, "9", json!({}))).expect("json");
    future["schema_version"] = json!(99);
    publish_raw(
        &js,
        "herald.events.Order.insert",
        future.to_string().as_bytes(),
    )
    .await;
    let misrouted = event("User", Op::Insert, "u9", json!({}));
    publish_raw(
        &js,
        "herald.events.Order.insert",
        &serde_json::to_vec(&misrouted).expect("json"),
    )
    .await;
    let good = event("Order", Op::Insert, "10", json!({}));
    publish_event(&js, &good).await;

    wait_for_actions(&js, 1).await;
    assert_eq!(actions(&js).await[0].id, format!("{}:order_any:0", good.id));
    let letters = herald_test_support::eventually_async("three dead letters", WAIT, || async {
        let letters = dead_letters(&js).await;
        (letters.len() >= 3).then_some(letters)
    })
    .await;
    let reasons: Vec<String> = letters
        .iter()
        .map(|(subject, h, _)| {
            assert_eq!(subject, "herald.dlq.events");
            let info =
                DeadLetterInfo::from_headers(h.as_ref().expect("headers")).expect("dead letter");
            assert_eq!(info.original_subject, "herald.events.Order.insert");
            info.error
        })
        .collect();
    assert!(reasons[0].contains("malformed JSON"), "{reasons:?}");
    assert!(reasons[1].contains("schema_version 99"), "{reasons:?}");
    assert!(
        reasons[2].contains("herald.events.User.insert"),
        "{reasons:?}"
    );
    assert_eq!(
        letters[0].2.as_ref(),
        b"{not json",
        "the original body is kept"
    );
    wait_until_drained(&js, "dispatcher").await;
    app.stop().await;
}

#[tokio::test]
async fn events_of_one_key_keep_their_order_under_concurrency() {
    const KEYS: usize = 24;
    const PER_KEY: usize = 30;
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    let file = write_file(OBSERVERS);
    // Interleave keys so every lane holds several keys and every key has many events queued.
    for n in 0..PER_KEY {
        for k in 0..KEYS {
            publish_event(
                &js,
                &event("Order", Op::Insert, &format!("k{k}"), json!({"n": n})),
            )
            .await;
        }
    }
    let app = App::spawn(&js, settings("dispatcher", file.path())).await;
    wait_for_actions(&js, (KEYS * PER_KEY) as u64).await;

    let mut seen: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for request in actions(&js).await {
        let n = request
            .event
            .data
            .as_ref()
            .and_then(|d| d["n"].as_i64())
            .expect("n");
        seen.entry(request.event.key.clone()).or_default().push(n);
    }
    assert_eq!(seen.len(), KEYS);
    let in_order: Vec<i64> = (0..PER_KEY as i64).collect();
    for (key, ns) in &seen {
        assert_eq!(ns, &in_order, "actions of {key} out of stream order");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_standby_replica_dispatches_nothing_until_the_active_one_stops() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    let file = write_file(OBSERVERS);
    let active = App::spawn(&js, settings("dispatcher", file.path())).await;
    publish_event(&js, &event("Order", Op::Insert, "1", json!({}))).await;
    wait_for_actions(&js, 1).await;
    let standby = App::spawn(&js, settings("dispatcher", file.path())).await;
    for n in 0..20 {
        publish_event(&js, &event("Order", Op::Insert, "1", json!({"n": n}))).await;
    }
    wait_for_actions(&js, 21).await;
    wait_until_drained(&js, "dispatcher").await;
    assert_eq!(active.stop().await.events, 21);

    for n in 20..30 {
        publish_event(&js, &event("Order", Op::Insert, "1", json!({"n": n}))).await;
    }
    wait_for_actions(&js, 31).await;
    wait_until_drained(&js, "dispatcher").await;
    assert_eq!(
        standby.stop().await.events,
        10,
        "the standby took over after the hand-over"
    );
}

#[tokio::test]
async fn a_condition_that_fails_on_an_event_skips_only_that_observer() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    let file = write_file(OBSERVERS);
    let app = App::spawn(&js, settings("dispatcher", file.path())).await;
    // order_shipped reads data.total, which this event lacks.
    let mut e = event("Order", Op::Update, "1", json!({"status": "shipped"}));
    e.changed = Some(vec!["status".into()]);
    publish_event(&js, &e).await;
    let next = event("Order", Op::Insert, "2", json!({}));
    publish_event(&js, &next).await;
    wait_for_actions(&js, 2).await;
    wait_until_drained(&js, "dispatcher").await;
    let ids: Vec<String> = actions(&js).await.into_iter().map(|r| r.id).collect();
    assert_eq!(
        ids,
        vec![
            format!("{}:order_any:0", e.id),
            format!("{}:order_any:0", next.id)
        ]
    );
    app.stop().await;
}

#[tokio::test]
async fn publishing_more_requests_than_acks_may_wait_at_once_completes() {
    use herald_dispatcher::dispatch::{ACKS_IN_FLIGHT, Outgoing, publish_all};
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    let mut text =
        String::from("[[observer]]\nname = \"wide\"\nentity = \"Order\"\nops = [\"insert\"]\n");
    for i in 0..6 {
        text.push_str(&format!(
            "\n[[observer.action]]\nkind = \"job\"\nqueue = \"q{i}\"\n"
        ));
    }
    let set = herald_dispatcher::ObserverSet::parse(&text).expect("valid");
    let observer = set.get("wide").expect("declared");
    // 6000 requests: more than the 5000 publish acks async-nats lets wait on one context.
    let outgoing: Vec<Outgoing> = (0..1000)
        .flat_map(|n| {
            observer
                .requests(&event("Order", Op::Insert, "1", json!({"n": n})))
                .expect("subjects")
        })
        .map(|(subject, request)| Outgoing::new(subject, request))
        .collect();
    tokio::time::timeout(WAIT, publish_all(&js, &outgoing, ACKS_IN_FLIGHT))
        .await
        .expect("publishing did not stall")
        .expect("stored");
    assert_eq!(action_count(&js).await, 6000);
}
