//! The auditor against a real OpenSearch-compatible server (osmem-server, started by the
//! harness): every kind indexed with the right fields, the trail of a pipeline run, replays and
//! redeliveries stored once, poison messages dead-lettered, search and its pages.

mod common;

use common::{Backend, Stack, event_at, scenarios};
use herald_auditor::document::Document;
use herald_auditor::{Cluster, Kind, bulk, classify::ItemVerdict};
use herald_shared::Op;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trail_of_a_pipeline_run_has_every_piece() {
    scenarios::the_trail_of_a_pipeline_run_has_every_piece(Backend::Osmem).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_and_redeliveries_are_never_indexed_twice() {
    scenarios::replays_and_redeliveries_are_never_indexed_twice(Backend::Osmem).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_are_dead_lettered_and_do_not_block() {
    scenarios::undecodable_messages_are_dead_lettered_and_do_not_block(Backend::Osmem).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_filters_pages_and_refuses_bad_parameters() {
    scenarios::search_filters_pages_and_refuses_bad_parameters(Backend::Osmem).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_land_in_the_month_of_their_own_time() {
    scenarios::documents_land_in_the_month_of_their_own_time(Backend::Osmem).await;
}

/// `search_after` on (time, id) pages past the 10,000 hits a `from` offset could reach. The
/// documents go in through the auditor's own bulk path (no NATS: 10k messages would only slow
/// the test down), with many sharing one millisecond so the id tie-break is what keeps order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_pages_go_past_ten_thousand_hits() {
    let stack = Stack::start(Backend::Osmem).await;
    let cluster =
        Cluster::new(&common::settings(&stack.cluster_url, &stack.prefix)).expect("client");
    cluster.setup().await.expect("templates");
    let base = chrono::Utc::now() - chrono::Duration::hours(1);
    let total = 10_050;
    let documents: Vec<Document> = (0..total)
        .map(|n| {
            let at = base + chrono::Duration::milliseconds(n / 4);
            let e = event_at("Order", Op::Insert, &n.to_string(), json!({"id": n}), at);
            let message = herald_auditor::document::Incoming {
                subject: "herald.events.Order.insert".into(),
                headers: None,
                payload: serde_json::to_vec(&e).expect("encode").into(),
                published: at,
                sequence: 0,
            };
            Kind::Event.document(&message).expect("a document")
        })
        .collect();
    for chunk in documents.chunks(1_000) {
        let refs: Vec<&Document> = chunk.iter().collect();
        let verdicts = bulk::send(&cluster, &refs).await.expect("bulk");
        assert!(
            verdicts
                .iter()
                .all(|v| *v == ItemVerdict::Stored { duplicate: false })
        );
    }
    cluster.refresh().await.expect("refresh");

    let mut seen = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut query = vec![("size", "500")];
        if let Some(c) = &cursor {
            query.push(("cursor", c));
        }
        let page = stack.search(&query).await;
        pages += 1;
        for id in common::ids(page["hits"].as_array().expect("hits")) {
            assert!(seen.insert(id), "a hit came twice");
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
        assert!(pages < 30, "paging does not end");
    }
    assert_eq!(seen.len(), total as usize);
}

/// Retention deletes whole monthly indices whose month ended longer ago than the setting, and
/// keeps the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_months_past_their_age() {
    let stack = Stack::start(Backend::Osmem).await;
    let now = chrono::Utc::now();
    let old = now - chrono::Duration::days(200);
    stack
        .publish_event(&event_at("Order", Op::Insert, "old", json!({"id": 1}), old))
        .await;
    stack
        .publish_event(&event_at("Order", Op::Insert, "new", json!({"id": 2}), now))
        .await;
    stack.search_until(&[("type", "event")], 2).await;
    let cluster =
        Cluster::new(&common::settings(&stack.cluster_url, &stack.prefix)).expect("client");
    let deleted = herald_auditor::retention::sweep(&cluster, chrono::Duration::days(90), now)
        .await
        .expect("sweep");
    assert_eq!(deleted, [Kind::Event.index("herald", old)]);
    let left = stack.search_until(&[("type", "event")], 1).await;
    assert_eq!(left[0]["key"], "new");
}
