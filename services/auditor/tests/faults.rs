//! What no real server does on demand, through a fault-injecting double in front of a real
//! osmem-server: 429 on some items of a 200 bulk, a 503 for a whole bulk, a bulk that outlives
//! the client's timeout, a mapping error on one item. Retryable failures are sent again until
//! stored, once each; a refused document goes to the DLQ with the cluster's reason and is
//! never sent again.

mod common;

use std::time::Duration;

use common::faulty::{BulkFault, FaultyCluster};
use common::{Stack, event};
use futures::StreamExt;
use herald_auditor::Kind;
use herald_shared::subjects::DLQ_STREAM;
use herald_shared::{EntityEvent, Op, headers};
use herald_test_support::OpenSearchServer;
use serde_json::json;

async fn stack_behind_faults(
    adjust: impl FnOnce(&mut herald_auditor::AuditorSettings),
) -> (Stack, FaultyCluster) {
    let osmem = OpenSearchServer::start();
    let faults = FaultyCluster::start(osmem.url()).await;
    let stack = Stack::start_on(Some(osmem), faults.url.clone(), "herald".into(), adjust).await;
    (stack, faults)
}

fn orders(n: usize) -> Vec<EntityEvent> {
    (0..n)
        .map(|k| event("Order", Op::Insert, &k.to_string(), json!({"id": k})))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_answered_429_inside_a_200_bulk_are_sent_again_until_stored() {
    let (stack, faults) = stack_behind_faults(|_| {}).await;
    let events = orders(10);
    let (slow, slower) = (events[2].id.to_string(), events[7].id.to_string());
    faults.too_many_requests(&slow, 1);
    faults.too_many_requests(&slower, 3);
    for e in &events {
        stack.publish_event(e).await;
    }
    stack.search_until(&[("type", "event")], 10).await;
    stack.settled().await;
    assert_eq!(faults.sent(&slow), 2);
    assert_eq!(faults.sent(&slower), 4);
    assert_eq!(faults.sent(&events[0].id.to_string()), 1);
    assert_eq!(stack.count(Kind::Event).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_that_fails_whole_or_outlives_its_timeout_is_sent_again() {
    // A short client timeout, so a stalled bulk outlives it quickly.
    let (stack, faults) = stack_behind_faults(|s| s.request_timeout = Duration::from_secs(2)).await;
    faults.next_bulk(BulkFault::Status(503));
    // Longer than the client's 2 s timeout; forwarded afterwards, so the retry meets the
    // documents already stored (409) and counts them as stored.
    faults.next_bulk(BulkFault::Stall(Duration::from_secs(3)));
    let events = orders(5);
    for e in &events {
        stack.publish_event(e).await;
    }
    stack.search_until(&[("type", "event")], 5).await;
    stack.settled().await;
    assert!(
        faults.bulk_requests() >= 3,
        "{} bulks",
        faults.bulk_requests()
    );
    // The first bulk held the first event: refused whole, then timed out, then stored.
    assert!(faults.sent(&events[0].id.to_string()) >= 3);
    assert_eq!(stack.count(Kind::Event).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_document_is_dead_lettered_with_the_clusters_reason_and_never_retried() {
    let (stack, faults) = stack_behind_faults(|_| {}).await;
    let events = orders(5);
    let refused = events[3].id.to_string();
    faults.mapping_error(&refused);
    for e in &events {
        stack.publish_event(e).await;
    }
    stack.search_until(&[("type", "event")], 4).await;
    // The dead letter is on record too (it is not the refused document: its id is `<id>:dlq`).
    let letters = stack
        .search_until(&[("type", "dead_letter"), ("event_id", &refused)], 1)
        .await;
    let error = letters[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("mapper_parsing_exception: failed to parse field [data]"),
        "{error}"
    );
    stack.settled().await;
    assert_eq!(
        faults.sent(&refused),
        1,
        "a refused document is never sent again"
    );

    let dlq = stack.js.get_stream(DLQ_STREAM).await.expect("dlq");
    let reader = dlq
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await
        .expect("reader");
    let mut messages = reader
        .fetch()
        .max_messages(5)
        .messages()
        .await
        .expect("fetch");
    let message = messages
        .next()
        .await
        .expect("one dead letter")
        .expect("readable");
    let h = message.headers.clone().unwrap_or_default();
    assert_eq!(
        h.get(headers::ORIGINAL_SUBJECT)
            .map(|v| v.as_str().to_owned()),
        Some("herald.events.Order.insert".to_owned())
    );
    assert_eq!(
        h.get(headers::MSG_ID).map(|v| v.as_str().to_owned()),
        Some(format!("{refused}:dlq"))
    );
    assert_eq!(
        h.get(headers::DEAD_LETTERED_BY)
            .map(|v| v.as_str().to_owned()),
        Some("auditor".to_owned())
    );
}
