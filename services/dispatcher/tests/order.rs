//! Ordered observers: each request names its own event's sequence and the previous one of its
//! line (observer, action, entity key), and the lines outlive a dispatcher. Real NATS.

mod common;

use std::collections::BTreeMap;

use common::*;
use herald_shared::{ActionOrder, Op};
use herald_test_support::NatsServer;
use serde_json::json;

const OBSERVERS: &str = r#"
[[observer]]
name = "order_line"
entity = "Order"
ops = ["insert", "update"]
condition = 'data.status != "draft"'
ordered = true

[[observer.action]]
kind = "webhook"
url = "https://example.test/a"

[[observer.action]]
kind = "job"
queue = "default"

[[observer]]
name = "order_any"
entity = "Order"
ops = ["insert", "update"]

[[observer.action]]
kind = "job"
queue = "default"
"#;

/// Publishes an update of order `key` as the relay does; answers its stream sequence.
async fn publish(
    js: &async_nats::jetstream::Context,
    sequences: &mut BTreeMap<uuid::Uuid, u64>,
    key: &str,
    status: &str,
) -> u64 {
    let e = event("Order", Op::Update, key, json!({ "status": status }));
    let sequence = publish_keyed_event(js, &e).await;
    sequences.insert(e.id, sequence);
    sequence
}

/// The order of every request of `observer`, by (action index, key, event sequence).
async fn orders(
    js: &async_nats::jetstream::Context,
    observer: &str,
    sequences: &BTreeMap<uuid::Uuid, u64>,
) -> BTreeMap<(u32, String, u64), Option<ActionOrder>> {
    actions(js)
        .await
        .into_iter()
        .filter(|r| r.observer == observer)
        .map(|r| {
            let sequence = sequences[&r.event.id];
            ((r.action_index, r.event.key.clone(), sequence), r.order)
        })
        .collect()
}

#[tokio::test]
async fn an_ordered_observer_chains_each_key_s_actions_and_the_chain_outlives_the_dispatcher() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    let file = write_file(OBSERVERS);
    let app = App::spawn(&js, settings("dispatcher", file.path())).await;

    let mut sequences = BTreeMap::new();
    let a1 = publish(&js, &mut sequences, "1", "new").await;
    let b1 = publish(&js, &mut sequences, "2", "new").await;
    // Not matched by order_line: no place in its line, and no gap either.
    let draft = publish(&js, &mut sequences, "1", "draft").await;
    let a2 = publish(&js, &mut sequences, "1", "paid").await;
    let a3 = publish(&js, &mut sequences, "1", "shipped").await;
    // order_line: two actions for each of four events; order_any: one for each of five.
    wait_for_actions(&js, 13).await;
    wait_until_drained(&js, "dispatcher").await;
    app.stop().await;

    let place = |sequence, after| Some(ActionOrder { sequence, after });
    let mut expected = BTreeMap::new();
    for index in 0..2 {
        expected.insert((index, "1".to_owned(), a1), place(a1, None));
        expected.insert((index, "1".to_owned(), a2), place(a2, Some(a1)));
        expected.insert((index, "1".to_owned(), a3), place(a3, Some(a2)));
        expected.insert((index, "2".to_owned(), b1), place(b1, None));
    }
    assert_eq!(orders(&js, "order_line", &sequences).await, expected);
    let unordered = orders(&js, "order_any", &sequences).await;
    assert_eq!(unordered.len(), 5);
    assert!(
        unordered.values().all(Option::is_none),
        "an observer not declared ordered has no line: {unordered:?}"
    );
    assert!(draft > b1);

    // A new dispatcher (a new tenure, nothing in memory) goes on where the lines stopped.
    let app = App::spawn(&js, settings("dispatcher", file.path())).await;
    let a4 = publish(&js, &mut sequences, "1", "delivered").await;
    wait_for_actions(&js, 16).await;
    wait_until_drained(&js, "dispatcher").await;
    app.stop().await;
    let lines = orders(&js, "order_line", &sequences).await;
    for index in 0..2 {
        assert_eq!(
            lines[&(index, "1".to_owned(), a4)],
            place(a4, Some(a3)),
            "action {index} of the fourth event follows the third"
        );
    }
}
