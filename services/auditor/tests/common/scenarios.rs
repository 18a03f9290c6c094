//! The promise tests that run against any cluster: `tests/indexing.rs` runs them on an
//! osmem-server the harness starts, `tests/elasticsearch.rs` on the real cluster at
//! `HERALD_TEST_ELASTICSEARCH_URL` when one is set.

use std::collections::BTreeSet;

use async_nats::HeaderMap;
use chrono::{DateTime, Duration as Span, Utc};
use futures::StreamExt;
use herald_auditor::Kind;
use herald_shared::subjects::{self, DLQ_STREAM, DlqSource};
use herald_shared::{JobState, Op, OutcomeStatus, headers};
use herald_test_support::eventually_async;
use serde_json::{Value, json};

use super::{Backend, Stack, WAIT, event, event_at, ids, job, outcome};

/// A pipeline run — the event, a webhook that failed once then succeeded, the job it started
/// (pending → running → succeeded) and a dead letter of a second action — is one trail, in
/// time order, and every piece is searchable on its own fields.
pub async fn the_trail_of_a_pipeline_run_has_every_piece(backend: Backend) {
    let stack = Stack::start(backend).await;
    let t0 = Utc::now() - Span::seconds(60);
    let at = |s: i64| t0 + Span::seconds(s);
    let order = event_at(
        "Order",
        Op::Update,
        "1042",
        json!({"id": 1042, "status": "shipped", "customer": {"name": "Ada Lovelace"}}),
        at(0),
    );
    stack.publish_event(&order).await;
    stack
        .publish_outcome(&outcome(&order, 1, OutcomeStatus::Retrying, 503, at(1)))
        .await;
    stack
        .publish_outcome(&outcome(&order, 2, OutcomeStatus::Succeeded, 200, at(3)))
        .await;
    for (n, state) in [JobState::Pending, JobState::Running, JobState::Succeeded]
        .into_iter()
        .enumerate()
    {
        stack
            .publish_job(&job(&order, state, 1, at(4 + n as i64)))
            .await;
    }
    let action =
        json!({"id": format!("{}:slack:1", order.id), "event": order, "schema_version": 1});
    stack
        .publish_dead_letter(
            DlqSource::Actions,
            "herald.actions.slack.shipped",
            &format!("{}:slack:1", order.id),
            action.to_string().into_bytes(),
            "receiver answered 410",
        )
        .await;

    let trail = eventually_async("the whole trail", WAIT, || async {
        let (status, body) = stack.trail(order.id).await;
        let complete =
            !body["event"].is_null() && body["items"].as_array().map_or(0, Vec::len) == 6;
        (status == 200 && complete).then_some(body)
    })
    .await;
    let event = &trail["event"];
    assert_eq!(event["type"], "event");
    assert_eq!(event["entity"], "Order");
    assert_eq!(event["key"], "1042");
    assert_eq!(event["op"], "update");
    assert_eq!(event["changed"], json!(["status"]));
    assert_eq!(event["data"]["status"], "shipped");
    assert!(
        event.get("text").is_none(),
        "the derived full-text field is not shown"
    );
    let items = trail["items"].as_array().expect("items");
    let kinds: Vec<&str> = items
        .iter()
        .map(|i| i["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        kinds,
        ["outcome", "outcome", "job", "job", "job", "dead_letter"],
        "{trail}"
    );
    assert_eq!(items[0]["attempt"], 1);
    assert_eq!(items[0]["http_status"], 503);
    assert_eq!(items[0]["status"], "retrying");
    assert_eq!(items[1]["status"], "succeeded");
    assert_eq!(items[1]["latency_ms"], 34);
    assert_eq!(items[4]["status"], "succeeded");
    assert_eq!(items[4]["result"]["status"], 200);
    assert_eq!(items[5]["error"], "receiver answered 410");
    assert_eq!(items[5]["original_subject"], "herald.actions.slack.shipped");
    let times: Vec<&str> = items
        .iter()
        .map(|i| i["at"].as_str().unwrap_or(""))
        .collect();
    let mut sorted = times.clone();
    sorted.sort_unstable();
    assert_eq!(times, sorted, "a trail is in time order");

    // The same pieces through search, by their own fields and by the row's values.
    let hits = stack
        .search_until(&[("type", "event"), ("q", "lovelace")], 1)
        .await;
    assert_eq!(hits[0]["id"], order.id.to_string());
    stack
        .search_until(&[("observer", "notify"), ("status", "succeeded")], 1)
        .await;
    stack
        .search_until(&[("type", "job"), ("queue", "default")], 3)
        .await;
    stack.search_until(&[("q", "data.status:shipped")], 1).await;

    // The answers are what contracts/schemas publishes: every kind in one page, the trail, and
    // the error bodies.
    let schemas = herald_test_support::contract::Schemas::load();
    schemas.assert_valid("audit-trail", &trail, "a real trail");
    let everything = stack
        .search_until(&[("event_id", &order.id.to_string())], 7)
        .await;
    let page = stack
        .search(&[("event_id", &order.id.to_string()), ("size", "3")])
        .await;
    assert!(page["next_cursor"].is_string(), "{page}");
    schemas.assert_valid("audit-search-page", &page, "a real page with a next cursor");
    let last = stack
        .search(&[("event_id", &order.id.to_string()), ("size", "500")])
        .await;
    assert!(last["next_cursor"].is_null());
    schemas.assert_valid("audit-search-page", &last, "a real last page");
    let kinds: BTreeSet<&str> = everything
        .iter()
        .filter_map(|d| d["type"].as_str())
        .collect();
    assert_eq!(kinds.len(), 4, "every kind is checked: {kinds:?}");
    for (status, body) in [
        stack.get("/v1/search", &[("size", "501")]).await,
        stack.get("/v1/trail/not-a-uuid", &[]).await,
        stack.trail(uuid::Uuid::now_v7()).await,
    ] {
        assert!(status == 400 || status == 404, "{status} {body}");
        schemas.assert_valid("audit-error", &body, "an error answer");
    }
}

/// `create` with the message's own id: a redelivery, a replay from the DLQ, or a consumer
/// that starts over from the beginning of every stream all meet stored documents (409) and
/// count as stored; nothing is indexed twice.
pub async fn replays_and_redeliveries_are_never_indexed_twice(backend: Backend) {
    let mut stack = Stack::start(backend).await;
    let order = event("Order", Op::Insert, "7", json!({"id": 7, "status": "new"}));
    stack.publish_event(&order).await;
    stack
        .publish_outcome(&outcome(
            &order,
            1,
            OutcomeStatus::Succeeded,
            200,
            Utc::now(),
        ))
        .await;
    stack
        .publish_dead_letter(
            DlqSource::Events,
            "herald.events.Order.insert",
            &order.id.to_string(),
            serde_json::to_vec(&order).expect("encode"),
            "an observer condition failed",
        )
        .await;
    stack
        .search_until(&[("event_id", &order.id.to_string())], 3)
        .await;

    // The CLI's replay: the same body on the original subject under a fresh Msg-Id.
    let mut replay = HeaderMap::new();
    replay.insert(headers::MSG_ID, format!("{}:replay:3", order.id).as_str());
    replay.insert(headers::REPLAYED_FROM, "3");
    let subject = subjects::event("Order", Op::Insert).expect("subject");
    stack
        .publish_with(subject, serde_json::to_vec(&order).expect("encode"), replay)
        .await;
    stack.settled().await;

    // Every consumer starts over: everything is delivered again.
    stack.stop_auditor().await;
    for kind in Kind::ALL {
        let (spec, _) = herald_auditor::indexer::source(kind);
        let name = herald_auditor::indexer::consumer_name("auditor", kind);
        let stream = stack.js.get_stream(spec.name).await.expect("stream");
        stream
            .delete_consumer(&name)
            .await
            .expect("consumer deleted");
    }
    stack.start_auditor(|_| {}).await;
    stack.settled().await;

    let hits = stack
        .search_until(&[("event_id", &order.id.to_string())], 3)
        .await;
    let kinds: BTreeSet<&str> = hits
        .iter()
        .map(|h| h["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds, BTreeSet::from(["event", "outcome", "dead_letter"]));
    assert_eq!(stack.count(Kind::Event).await, 1);
    assert_eq!(stack.count(Kind::DeadLetter).await, 1);
}

/// A message that can never be a document (not JSON, an unknown schema_version) is
/// dead-lettered with its reason and does not hold up the ones behind it; the dead letter is
/// then itself on record.
pub async fn undecodable_messages_are_dead_lettered_and_do_not_block(backend: Backend) {
    let stack = Stack::start(backend).await;
    stack
        .publish(
            "herald.events.Order.insert".into(),
            b"{not json".to_vec(),
            "bad-1",
        )
        .await;
    let mut future =
        serde_json::to_value(event("Order", Op::Insert, "2", json!({"id": 2}))).expect("encode");
    future["schema_version"] = json!(2);
    stack
        .publish(
            "herald.events.Order.insert".into(),
            future.to_string().into_bytes(),
            "bad-2",
        )
        .await;
    let good = event("Order", Op::Insert, "3", json!({"id": 3}));
    stack.publish_event(&good).await;
    stack
        .search_until(&[("type", "event"), ("key", "3")], 1)
        .await;

    let letters = stack
        .search_until(
            &[("type", "dead_letter"), ("q", "dead_lettered_by:auditor")],
            2,
        )
        .await;
    let errors: BTreeSet<String> = letters
        .iter()
        .map(|l| l["error"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        errors.iter().any(|e| e.starts_with("malformed JSON")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("unsupported schema_version 2")),
        "{errors:?}"
    );
    assert!(
        letters
            .iter()
            .all(|l| l["original_subject"] == "herald.events.Order.insert")
    );

    let stream = stack.js.get_stream(DLQ_STREAM).await.expect("dlq");
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await
        .expect("reader");
    let mut messages = consumer
        .fetch()
        .max_messages(10)
        .messages()
        .await
        .expect("fetch");
    let mut by_auditor = 0;
    while let Some(Ok(message)) = messages.next().await {
        let h = message.headers.clone().unwrap_or_default();
        if h.get(headers::DEAD_LETTERED_BY).map(|v| v.as_str()) == Some("auditor") {
            by_auditor += 1;
        }
    }
    assert_eq!(by_auditor, 2);
}

/// Search: filters, full text, time bounds, newest first, pages through a cursor without a gap
/// or a repeat, and clear 400s (with none of the cluster's words) for bad parameters.
pub async fn search_filters_pages_and_refuses_bad_parameters(backend: Backend) {
    let stack = Stack::start(backend).await;
    let base = Utc::now() - Span::minutes(30);
    let mut published = Vec::new();
    for n in 0..23 {
        let (entity, op) = if n % 3 == 0 {
            ("Customer", Op::Insert)
        } else {
            ("Order", Op::Update)
        };
        let status = if n % 2 == 0 { "shipped" } else { "paid" };
        let e = event_at(
            entity,
            op,
            &n.to_string(),
            json!({"id": n, "status": status}),
            base + Span::seconds(n),
        );
        stack.publish_event(&e).await;
        published.push(e);
    }
    let all = stack
        .search_until(&[("type", "event"), ("size", "500")], 23)
        .await;
    let newest_first: Vec<String> = published.iter().rev().map(|e| e.id.to_string()).collect();
    assert_eq!(ids(&all), newest_first);

    let orders = stack
        .search(&[("entity", "Order"), ("op", "update"), ("size", "100")])
        .await;
    assert_eq!(orders["hits"].as_array().map(Vec::len), Some(15));
    let shipped = stack.search(&[("q", "shipped"), ("size", "100")]).await;
    assert_eq!(shipped["hits"].as_array().map(Vec::len), Some(12));
    let since = rfc3339(base + Span::seconds(10));
    let until = rfc3339(base + Span::seconds(14));
    let window = stack.search(&[("since", &since), ("until", &until)]).await;
    assert_eq!(window["hits"].as_array().map(Vec::len), Some(5));

    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut query = vec![("type", "event"), ("size", "7")];
        if let Some(c) = &cursor {
            query.push(("cursor", c));
        }
        let page = stack.search(&query).await;
        paged.extend(ids(page["hits"].as_array().expect("hits")));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(paged, newest_first, "pages cover every hit once, in order");

    let refused: [(&[(&str, &str)], &str); 5] = [
        (&[("size", "501")], "size"),
        (&[("colour", "red")], "colour"),
        (&[("cursor", "bm90LWEtY3Vyc29y")], "cursor"),
        (&[("since", "last tuesday")], "since"),
        (&[("q", "shipped AND (")], "`q`"),
    ];
    for (query, named) in refused {
        let (status, body) = stack.get("/v1/search", query).await;
        assert_eq!(status, 400, "{query:?}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(named), "{query:?}: {error}");
        assert!(!error.contains("exception"), "cluster text leaked: {error}");
    }
    let (status, _) = stack.get("/v1/trail/not-a-uuid", &[]).await;
    assert_eq!(status, 400);
    let (status, _) = stack.trail(uuid::Uuid::now_v7()).await;
    assert_eq!(status, 404);

    for token in [None, Some("wrong-token-wrong-token")] {
        let mut request = stack.http.get(format!("{}/v1/search", stack.api));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        let response = request.send().await.expect("answer");
        assert_eq!(response.status().as_u16(), 401);
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Indices are monthly by the document's own time, and strict: a document of last March lands
/// in March's index, and the mapping refuses fields nobody declared.
pub async fn documents_land_in_the_month_of_their_own_time(backend: Backend) {
    let stack = Stack::start(backend).await;
    let march = DateTime::parse_from_rfc3339("2025-03-14T09:26:53Z")
        .expect("time")
        .with_timezone(&Utc);
    let old = event_at("Order", Op::Insert, "1", json!({"id": 1}), march);
    stack.publish_event(&old).await;
    stack.search_until(&[("key", "1")], 1).await;
    let index = format!("{}-events-2025.03", stack.prefix);
    let mapping: Value = stack
        .http
        .get(format!("{}/{index}/_mapping", stack.storage_url()))
        .send()
        .await
        .expect("mapping")
        .json()
        .await
        .expect("mapping json");
    let mappings = &mapping[&index]["mappings"];
    assert_eq!(mappings["dynamic"], "strict", "{mapping}");
    let flat = mappings["properties"]["data"]["type"]
        .as_str()
        .unwrap_or_default();
    assert!(flat == "flat_object" || flat == "flattened", "{mapping}");
}
