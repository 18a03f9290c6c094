//! A custom worker's messages are audited like a built-in worker's: the outcomes and the dead
//! letter of the custom kind `invoice`, published byte for byte as
//! `examples/python/custom_worker.py` publishes them (its JSON, its headers, its timestamps),
//! are indexed, found by search and in the event's trail, and counted in the metrics the
//! Grafana dashboard plots, beside a built-in webhook's.

mod common;

use async_nats::HeaderMap;
use common::{Backend, Stack, WAIT, event};
use herald_shared::{Op, OutcomeStatus, headers};
use herald_test_support::eventually_async;
use serde_json::{Value, json};

const KIND: &str = "invoice";
const OBSERVER: &str = "order_invoiced";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// `now()` of custom_worker.py: `isoformat(timespec="milliseconds")` with `Z`.
fn python_now() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// What `Worker.outcome` publishes: the dict in its order, `json.dumps` spacing, the
/// `<action id>:<attempt>` Msg-Id and the action's traceparent.
async fn publish_python_outcome(
    stack: &Stack,
    event_id: &str,
    attempt: u32,
    status: &str,
    error: Option<&str>,
    http_status: u16,
) {
    let action = format!("{event_id}:{OBSERVER}:0");
    let body = format!(
        r#"{{"action_id": "{action}", "event_id": "{event_id}", "kind": "{KIND}", "observer": "{OBSERVER}", "attempt": {attempt}, "status": "{status}", "latency_ms": 12, "error": {error}, "http_status": {http_status}, "schema_version": 1, "at": "{at}"}}"#,
        error = json!(error),
        at = python_now(),
    );
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, format!("{action}:{attempt}").as_str());
    h.insert(headers::TRACEPARENT, TRACEPARENT);
    stack
        .publish_with(
            format!("herald.outcomes.{KIND}.{OBSERVER}"),
            body.into_bytes(),
            h,
        )
        .await;
}

/// What `Worker.dead_letter` publishes for a 422 on the first attempt: the ActionRequest as it
/// came, its non-`Nats-` headers, and every Herald-* header the worker sets.
async fn publish_python_dead_letter(stack: &Stack, action_request: &Value) {
    let action = action_request["id"].as_str().expect("action id").to_owned();
    let stamp = python_now();
    let mut h = HeaderMap::new();
    h.insert(headers::TRACEPARENT, TRACEPARENT);
    h.insert(headers::MSG_ID, format!("{action}:dlq").as_str());
    h.insert(
        headers::ORIGINAL_SUBJECT,
        format!("herald.actions.{KIND}.{OBSERVER}").as_str(),
    );
    h.insert(headers::ORIGINAL_MSG_ID, action.as_str());
    h.insert(
        headers::ERROR,
        "the invoicing service refused the invoice with 422: {\"error\": \"total too high\"}",
    );
    h.insert(headers::ATTEMPTS, "1");
    h.insert(headers::FIRST_FAILED_AT, stamp.as_str());
    h.insert(headers::DEAD_LETTERED_AT, stamp.as_str());
    h.insert(headers::DEAD_LETTERED_BY, "custom-worker.py");
    h.insert(headers::HTTP_STATUS, "422");
    h.insert(headers::RESPONSE_SNIPPET, "{\"error\": \"total too high\"}");
    stack
        .publish_with(
            "herald.dlq.actions".to_owned(),
            action_request.to_string().into_bytes(),
            h,
        )
        .await;
}

/// The value of one sample of `name` whose labels include all of `labels`, from a Prometheus
/// text page.
fn sample(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_kinds_outcomes_and_dead_letter_are_audited_like_built_in_ones() {
    // nextest runs each test in its own process: this recorder counts this test's work only.
    let metrics = herald_shared::admin::metrics_handle();
    let stack = Stack::start(Backend::Osmem).await;

    // One order invoiced after a 503, one refused with 422 and dead-lettered.
    let flaky = event(
        "Order",
        Op::Insert,
        "120",
        json!({"id": 120, "total": 120.0}),
    );
    let refused = event(
        "Order",
        Op::Insert,
        "999",
        json!({"id": 999, "total": 999.0}),
    );
    stack.publish_event(&flaky).await;
    stack.publish_event(&refused).await;
    let (flaky_id, refused_id) = (flaky.id.to_string(), refused.id.to_string());
    publish_python_outcome(
        &stack,
        &flaky_id,
        1,
        "retrying",
        Some("the invoicing service answered 503"),
        503,
    )
    .await;
    publish_python_outcome(&stack, &flaky_id, 2, "succeeded", None, 200).await;
    publish_python_outcome(
        &stack,
        &refused_id,
        1,
        "dead_lettered",
        Some("the invoicing service refused the invoice with 422"),
        422,
    )
    .await;
    let action_request = json!({
        "id": format!("{refused_id}:{OBSERVER}:0"),
        "kind": KIND,
        "observer": OBSERVER,
        "config": {"url": "http://127.0.0.1:9901/invoices", "currency": "EUR"},
        "retry": {"max_attempts": 3, "initial_delay_ms": 200, "multiplier": 2.0, "max_delay_ms": 5000, "jitter": false},
        "timeout_ms": 5000,
        "event": refused,
        "schema_version": 1,
    });
    publish_python_dead_letter(&stack, &action_request).await;

    // A built-in kind's outcome and dead letter, through the shared Rust paths, to compare.
    let webhook = common::outcome(
        &flaky,
        1,
        OutcomeStatus::DeadLettered,
        410,
        chrono::Utc::now(),
    );
    stack.publish_outcome(&webhook).await;
    stack
        .publish_dead_letter(
            herald_shared::subjects::DlqSource::Actions,
            "herald.actions.webhook.notify",
            &webhook.action_id,
            json!({"id": webhook.action_id, "event": flaky, "schema_version": 1})
                .to_string()
                .into_bytes(),
            "receiver answered 410",
        )
        .await;

    // Found by the custom kind's name, like any kind: three outcomes and the dead letter.
    let found = stack.search_until(&[("kind", KIND)], 4).await;
    let letters: Vec<&Value> = found
        .iter()
        .filter(|d| d["type"] == "dead_letter")
        .collect();
    assert_eq!(letters.len(), 1, "{found:?}");
    assert_eq!(letters[0]["kind"], KIND);
    assert_eq!(letters[0]["observer"], OBSERVER, "{}", letters[0]);
    let outcomes = stack
        .search_until(&[("kind", KIND), ("type", "outcome")], 3)
        .await;
    let mut seen: Vec<(String, i64, String)> = outcomes
        .iter()
        .map(|o| {
            (
                o["event_id"].as_str().unwrap_or_default().to_owned(),
                o["attempt"].as_i64().unwrap_or_default(),
                o["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    seen.sort();
    let mut expected = vec![
        (flaky_id.clone(), 1, "retrying".to_owned()),
        (flaky_id.clone(), 2, "succeeded".to_owned()),
        (refused_id.clone(), 1, "dead_lettered".to_owned()),
    ];
    expected.sort();
    assert_eq!(seen, expected);

    // The refused order's trail: its event, the dead-lettered attempt and the dead letter with
    // every header the Python worker set.
    let trail = eventually_async("the refused order's trail", WAIT, || async {
        let (status, body) = stack.trail(refused.id).await;
        let complete =
            !body["event"].is_null() && body["items"].as_array().map_or(0, Vec::len) == 2;
        (status == 200 && complete).then_some(body)
    })
    .await;
    herald_test_support::contract::Schemas::load().assert_valid(
        "audit-trail",
        &trail,
        "a custom kind's trail",
    );
    let items = trail["items"].as_array().expect("items");
    assert_eq!(items[0]["type"], "outcome");
    assert_eq!(items[0]["kind"], KIND);
    assert_eq!(items[0]["http_status"], 422);
    let letter = &items[1];
    assert_eq!(letter["type"], "dead_letter", "{trail}");
    assert_eq!(letter["source"], "actions");
    assert_eq!(
        letter["original_subject"],
        format!("herald.actions.{KIND}.{OBSERVER}")
    );
    assert_eq!(
        letter["original_msg_id"],
        format!("{refused_id}:{OBSERVER}:0")
    );
    assert_eq!(letter["attempts"], 1);
    assert_eq!(letter["http_status"], 422);
    assert_eq!(letter["dead_lettered_by"], "custom-worker.py");
    assert!(
        letter["error"].as_str().is_some_and(|e| e.contains("422")),
        "{letter}"
    );
    assert!(letter["first_failed_at"].is_string(), "{letter}");

    // The same fields as a built-in kind's dead letter: nothing is missing from the custom one.
    let builtin = stack
        .search_until(
            &[("type", "dead_letter"), ("event_id", flaky_id.as_str())],
            1,
        )
        .await;
    let filled = |doc: &Value| -> Vec<String> {
        let mut keys: Vec<String> = doc
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        keys
    };
    let missing: Vec<String> = filled(&builtin[0])
        .into_iter()
        .filter(|k| !filled(letter).contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "the custom dead letter lacks {missing:?}"
    );

    // Counted where the dashboard looks, beside the built-in kind, once each.
    stack.settled().await;
    let page = metrics.render();
    for (labels, n) in [
        (vec![("kind", KIND), ("status", "retrying")], 1.0),
        (vec![("kind", KIND), ("status", "succeeded")], 1.0),
        (vec![("kind", KIND), ("status", "dead_lettered")], 1.0),
        (vec![("kind", "webhook"), ("status", "dead_lettered")], 1.0),
    ] {
        assert_eq!(
            sample(&page, "herald_auditor_outcomes_total", &labels),
            Some(n),
            "{labels:?} in:\n{page}"
        );
    }
    for (labels, n) in [
        (
            vec![
                ("source", "actions"),
                ("kind", KIND),
                ("by", "custom-worker.py"),
            ],
            1.0,
        ),
        (
            vec![
                ("source", "actions"),
                ("kind", "webhook"),
                ("by", "action-worker"),
            ],
            1.0,
        ),
    ] {
        assert_eq!(
            sample(&page, "herald_auditor_dead_letters_total", &labels),
            Some(n),
            "{labels:?} in:\n{page}"
        );
    }

    // A redelivery of everything (a new consumer starting over) stores nothing twice and
    // counts nothing twice.
    let mut again = stack;
    again.stop_auditor().await;
    let js = again.js.clone();
    for kind in herald_auditor::Kind::ALL {
        let (spec, _) = herald_auditor::indexer::source(kind);
        let name = herald_auditor::indexer::consumer_name("auditor", kind);
        js.get_stream(spec.name)
            .await
            .expect("stream")
            .delete_consumer(&name)
            .await
            .expect("delete the consumer");
    }
    again.start_auditor(|_| {}).await;
    again.settled().await;
    let page = metrics.render();
    assert_eq!(
        sample(
            &page,
            "herald_auditor_dead_letters_total",
            &[("kind", KIND)]
        ),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(
            &page,
            "herald_auditor_outcomes_total",
            &[("kind", KIND), ("status", "succeeded")]
        ),
        Some(1.0),
        "{page}"
    );
}

/// A dead-letter index made by an older auditor, whose strict mapping lacks the `kind` and
/// `observer` fields, takes this auditor's dead letters: starting, it puts the current
/// properties on the existing indices, not only in the template for the next month's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_made_before_a_field_was_added_takes_documents_with_it() {
    let osmem = herald_test_support::OpenSearchServer::start();
    let url = osmem.url();
    let http = reqwest::Client::new();
    let now = chrono::Utc::now();
    let index = herald_auditor::document::Kind::DeadLetter.index("herald", now);
    let mut old = herald_auditor::cluster::template(
        herald_auditor::document::Kind::DeadLetter,
        "herald",
        herald_auditor::cluster::Flavor::OpenSearch,
    )["template"]["mappings"]
        .clone();
    let properties = old["properties"].as_object_mut().expect("properties");
    properties.remove("kind");
    properties.remove("observer");
    let created = http
        .put(format!("{url}/{index}"))
        .json(&json!({"mappings": old}))
        .send()
        .await
        .expect("create the old index");
    assert!(created.status().is_success(), "{:?}", created.text().await);

    let stack = Stack::start_on(Some(osmem), url, "herald".into(), |_| {}).await;
    stack
        .publish_dead_letter(
            herald_shared::subjects::DlqSource::Actions,
            &format!("herald.actions.{KIND}.{OBSERVER}"),
            "0190e6d8-0000-7000-8000-000000000001:order_invoiced:0",
            b"{}".to_vec(),
            "the invoicing service answered 422",
        )
        .await;
    let found = stack
        .search_until(&[("type", "dead_letter"), ("kind", KIND)], 1)
        .await;
    assert_eq!(found[0]["observer"], OBSERVER, "{}", found[0]);
}
