//! `herald checkpoint` and `herald observers`: a dispatcher's checkpoint can be read and moved
//! (and a moved checkpoint is where the dispatcher resumes), one observer can be backfilled over
//! history without re-running the others, and an observers file can be tried on an event.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use chrono::{SecondsFormat, Utc};
use common::*;
use herald_dispatcher::{DispatcherSettings, Observers, Summary};
use herald_shared::subjects::ACTIONS_STREAM;
use herald_shared::{EntityEvent, Op, SCHEMA_VERSION, headers, subjects};
use herald_test_support::{NatsServer, eventually_async};
use serde_json::{Value, json};
use tempfile::NamedTempFile;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

const OBSERVERS: &str = r#"
[[observer]]
name = "every_order"
entity = "Order"
ops = ["insert"]

[[observer.action]]
kind = "webhook"
url = "https://example.test/orders"

[[observer]]
name = "big_orders"
entity = "Order"
ops = ["insert"]
condition = 'data.n >= 5'

[[observer.action]]
kind = "slack"
channel = "big"

[[observer.action]]
kind = "job"
queue = "default"

[[observer]]
name = "new_users"
entity = "User"
ops = ["insert"]

[[observer.action]]
kind = "email"
to = "ops@example.test"
"#;

fn observers_file(text: &str) -> NamedTempFile {
    let file = NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), text).expect("write the observers file");
    file
}

fn path(file: &NamedTempFile) -> &str {
    file.path().to_str().expect("a UTF-8 temp path")
}

fn event(entity: &str, n: i64) -> EntityEvent {
    EntityEvent {
        id: uuid::Uuid::now_v7(),
        entity: entity.into(),
        op: Op::Insert,
        key: n.to_string(),
        data: Some(json!({ "n": n })),
        before: None,
        changed: None,
        at: Utc::now(),
        actor: Some("tester".into()),
        tx: 1,
        schema_version: SCHEMA_VERSION,
    }
}

async fn publish(js: &jetstream::Context, event: &EntityEvent) -> u64 {
    let subject = subjects::event(&event.entity, event.op).expect("valid subject");
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, event.id.to_string().as_str());
    let body = serde_json::to_vec(event).expect("encode event");
    js.publish_with_headers(subject, h, body.into())
        .await
        .expect("publish")
        .await
        .expect("stored")
        .sequence
}

/// A dispatcher running in this process, named `dispatcher`.
struct Dispatcher {
    stop: CancellationToken,
    task: JoinHandle<Summary>,
}

impl Dispatcher {
    fn spawn(js: &jetstream::Context, observers: &NamedTempFile) -> Self {
        let settings = DispatcherSettings {
            observers: observers.path().to_owned(),
            checkpoint_interval: Duration::from_millis(100),
            retry_delay: Duration::from_millis(100),
            lease_ttl: Duration::from_secs(2),
            ..DispatcherSettings::default()
        };
        let observers = Arc::new(Observers::load(observers.path()).expect("valid observers"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(herald_dispatcher::run(
            js.clone(),
            settings,
            observers,
            herald_dispatcher::partition::Health::new(),
            stop.clone(),
        ));
        Self { stop, task }
    }

    /// Graceful stop; returns how many events it read.
    async fn stop(self) -> u64 {
        self.stop.cancel();
        self.task.await.expect("dispatcher task").events
    }
}

async fn checkpoint(url: &str) -> Value {
    let shown = json_lines(&succeed(url, &["checkpoint", "show", "--json"]).await);
    shown.into_iter().next().expect("one JSON object")
}

async fn wait_for_checkpoint(url: &str, sequence: u64) -> Value {
    eventually_async(&format!("checkpoint {sequence}"), WAIT, || async {
        let shown = checkpoint(url).await;
        (shown["checkpoint"] == sequence).then_some(shown)
    })
    .await
}

/// Action requests stored for one observer.
async fn stored_for(js: &jetstream::Context, observer: &str) -> u64 {
    js.get_stream(ACTIONS_STREAM)
        .await
        .expect("actions stream")
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("herald.actions.*.{observer}"),
            ..Default::default()
        })
        .await
        .expect("ordered consumer")
        .cached_info()
        .num_pending
}

#[tokio::test]
async fn a_moved_checkpoint_is_shown_and_is_where_the_dispatcher_resumes() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    let file = observers_file(OBSERVERS);
    for n in 1..=3 {
        publish(&js, &event("Order", n)).await;
    }
    let middle = Utc::now();
    for n in 4..=6 {
        publish(&js, &event("Order", n)).await;
    }

    let never = checkpoint(&nats.url()).await;
    assert_eq!(never["checkpoint"], Value::Null, "{never}");
    assert_eq!(never["stream_last_sequence"], 6);

    let dispatcher = Dispatcher::spawn(&js, &file);
    let shown = wait_for_checkpoint(&nats.url(), 6).await;
    assert_eq!(shown["dispatcher"], "dispatcher");
    assert_eq!(shown["lag"], 0);
    assert_eq!(dispatcher.stop().await, 6);

    let out = succeed(&nats.url(), &["checkpoint", "set", "--sequence", "4"]).await;
    assert_eq!(out.trim(), "dispatcher checkpoint 4");
    let table = succeed(&nats.url(), &["checkpoint", "show"]).await;
    for line in [
        "dispatcher: dispatcher",
        "checkpoint: 4",
        "stream last sequence: 6",
        "lag: 2",
    ] {
        assert!(table.lines().any(|l| l == line), "no `{line}` in\n{table}");
    }

    // Only the events after the new checkpoint are read again.
    let dispatcher = Dispatcher::spawn(&js, &file);
    wait_for_checkpoint(&nats.url(), 6).await;
    assert_eq!(dispatcher.stop().await, 2);

    let at = middle.to_rfc3339_opts(SecondsFormat::Micros, true);
    let out = succeed(&nats.url(), &["checkpoint", "set", "--time", &at]).await;
    assert_eq!(out.trim(), "dispatcher checkpoint 3");
    let dispatcher = Dispatcher::spawn(&js, &file);
    wait_for_checkpoint(&nats.url(), 6).await;
    assert_eq!(dispatcher.stop().await, 3);

    let other = json_lines(
        &succeed(
            &nats.url(),
            &["checkpoint", "show", "--dispatcher", "other", "--json"],
        )
        .await,
    );
    assert_eq!(other[0]["checkpoint"], Value::Null);
    let both = fail(
        &nats.url(),
        &["checkpoint", "set", "--sequence", "1", "--time", &at],
    )
    .await;
    assert!(both.contains("cannot be used with"), "{both}");
    let bad_time = fail(&nats.url(), &["checkpoint", "set", "--time", "yesterday"]).await;
    assert!(bad_time.contains("not an RFC 3339 time"), "{bad_time}");
}

#[tokio::test]
async fn a_backfill_runs_only_the_named_observer_and_repeating_it_stores_nothing_twice() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    let file = observers_file(OBSERVERS);
    let since =
        (Utc::now() - chrono::Duration::seconds(1)).to_rfc3339_opts(SecondsFormat::Millis, true);
    for n in 0..10 {
        publish(&js, &event("Order", n)).await;
        publish(&js, &event("User", n)).await;
    }
    let backfill = [
        "observers",
        "backfill",
        "big_orders",
        "--file",
        path(&file),
        "--since",
        &since,
    ];

    let (out, err) = succeed_with_stderr(&nats.url(), &backfill).await;
    assert_eq!(err, "", "not a terminal: no progress bar");
    assert_eq!(
        out.trim(),
        format!(
            "backfilled big_orders since {since}: 10 events read, 5 matched, 10 requests \
             published, 0 unreadable skipped"
        )
    );
    assert_eq!(stored_for(&js, "big_orders").await, 10);
    assert_eq!(stored_for(&js, "every_order").await, 0);
    assert_eq!(stored_for(&js, "new_users").await, 0);

    let shown = on_a_terminal(&nats.url(), &backfill).await;
    assert!(shown.contains("10/10 events"), "{shown:?}");
    assert!(shown.contains("5 matched, 10 requests"), "{shown:?}");
    assert_eq!(stored_for(&js, "big_orders").await, 10);

    let unknown = fail(
        &nats.url(),
        &[
            "observers",
            "backfill",
            "tiny_orders",
            "--file",
            path(&file),
            "--since",
            &since,
        ],
    )
    .await;
    assert!(
        unknown.contains("there is no observer tiny_orders")
            && unknown.contains("every_order, big_orders, new_users"),
        "{unknown}"
    );
}

#[tokio::test]
async fn a_dry_run_shows_the_matching_observers_and_their_requests_without_publishing() {
    let file = observers_file(OBSERVERS);
    let big = serde_json::to_string(&event("Order", 7)).expect("encode");
    // No NATS: a dry run must not need it.
    let url = "nats://127.0.0.1:1";

    let out = succeed(url, &["observers", "test", path(&file), "--event", &big]).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("every_order  herald.actions.webhook.every_order  "),
        "{out}"
    );
    assert!(
        lines[1].starts_with("big_orders  herald.actions.slack.big_orders  "),
        "{out}"
    );
    assert!(
        lines[2].starts_with("big_orders  herald.actions.job.big_orders  "),
        "{out}"
    );

    let tested = json_lines(
        &succeed(
            url,
            &["observers", "test", path(&file), "--event", &big, "--json"],
        )
        .await,
    );
    assert_eq!(tested[0]["matched"], json!(["every_order", "big_orders"]));
    assert_eq!(tested[0]["errors"], json!([]));
    let requests = tested[0]["requests"].as_array().expect("requests");
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[1]["subject"], "herald.actions.slack.big_orders");
    assert_eq!(requests[1]["request"]["config"]["channel"], "big");
    assert_eq!(requests[1]["request"]["event"]["key"], "7");

    let small = serde_json::to_string(&event("Order", 2)).expect("encode");
    let out = succeed(url, &["observers", "test", path(&file), "--event", &small]).await;
    assert_eq!(out.lines().count(), 1, "{out}");
    let deleted = serde_json::to_string(&EntityEvent {
        op: Op::Delete,
        ..event("Order", 7)
    })
    .expect("encode");
    let out = succeed(
        url,
        &["observers", "test", path(&file), "--event", &deleted],
    )
    .await;
    assert_eq!(out.trim(), "(no observer matches)");

    let needs_total = observers_file(
        "[[observer]]\nname = \"needs_total\"\nentity = \"Order\"\nops = [\"insert\"]\n\
         condition = 'data.total > 100'\n\n[[observer.action]]\nkind = \"slack\"\n",
    );
    let output = run(
        url,
        &["observers", "test", path(&needs_total), "--event", &big],
    )
    .await;
    assert!(
        !output.status.success(),
        "a failed condition must fail the dry run"
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("condition failed: observer needs_total:") && printed.contains("total"),
        "{printed}"
    );

    let bad_event = fail(url, &["observers", "test", path(&file), "--event", "{}"]).await;
    assert!(bad_event.contains("not a valid EntityEvent"), "{bad_event}");
    let broken =
        observers_file("[[observer]]\nname = \"x\"\nentity = \"Order\"\nops = [\"nope\"]\n");
    let invalid = fail(url, &["observers", "test", path(&broken), "--event", &big]).await;
    assert!(invalid.contains("line 4"), "{invalid}");
}
