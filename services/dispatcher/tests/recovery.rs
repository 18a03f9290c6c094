mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;
use herald_dispatcher::checkpoint::{self, Target};
use herald_dispatcher::{ObserverSet, backfill};
use herald_shared::Op;
use herald_shared::subjects::EVENTS_STREAM;
use herald_test_support::NatsServer;
use serde_json::json;

const TWO_ACTIONS: &str = r#"
[[observer]]
name = "order_changed"
entity = "Order"
ops = ["insert", "update"]

[[observer.action]]
kind = "webhook"
url = "https://example.test/a"

[[observer.action]]
kind = "job"
queue = "default"
"#;

/// The real binary, with a config file of its own.
struct Process {
    child: Child,
    _config: tempfile::NamedTempFile,
}

impl Process {
    fn start(nats: &NatsServer, observers: &Path) -> Self {
        let config = write_file(&format!(
            "[nats]\nurl = \"{}\"\n[telemetry]\nlog_level = \"warn\"\n[service]\nname = \"dispatcher\"\n\
             observers = \"{}\"\nlanes = 8\nbatch = 32\nack_wait = \"2s\"\nlease_ttl = \"2s\"\n\
             checkpoint_interval = \"100ms\"\n",
            nats.url(),
            observers.display()
        ));
        let child = Command::new(env!("CARGO_BIN_EXE_herald-dispatcher"))
            .arg("--config")
            .arg(config.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start herald-dispatcher");
        Self {
            child,
            _config: config,
        }
    }

    /// SIGKILL: a crash, not a shutdown.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn a_dispatcher_killed_mid_stream_loses_no_action_and_stores_none_twice() {
    const EVENTS: u64 = 600;
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    let file = write_file(TWO_ACTIONS);
    let mut events = Vec::new();
    for n in 0..EVENTS {
        let e = event(
            "Order",
            Op::Insert,
            &format!("k{}", n % 50),
            json!({"n": n}),
        );
        publish_event(&js, &e).await;
        events.push(e);
    }

    let mut first = Process::start(&nats, file.path());
    herald_test_support::eventually_async("the first actions", WAIT, || async {
        (action_count(&js).await >= 100).then_some(())
    })
    .await;
    first.kill();
    let stored_at_kill = action_count(&js).await;

    let _second = Process::start(&nats, file.path());
    wait_for_actions(&js, EVENTS * 2).await;
    wait_until_drained(&js, "dispatcher").await;

    let requests = actions(&js).await;
    let ids: BTreeSet<&str> = requests.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        requests.len() as u64,
        EVENTS * 2,
        "killed at {stored_at_kill}: duplicates stored"
    );
    let expected: BTreeSet<String> = events
        .iter()
        .flat_map(|e| (0..2).map(move |i| format!("{}:order_changed:{i}", e.id)))
        .collect();
    assert_eq!(ids, expected.iter().map(String::as_str).collect());

    // The previous holder's unacked events came back before anything newer of their key.
    let mut per_key: std::collections::BTreeMap<&str, Vec<i64>> = Default::default();
    for r in requests.iter().filter(|r| r.action_index == 0) {
        let n = r
            .event
            .data
            .as_ref()
            .and_then(|d| d["n"].as_i64())
            .expect("n");
        per_key.entry(r.event.key.as_str()).or_default().push(n);
    }
    for (key, ns) in per_key {
        assert!(
            ns.is_sorted(),
            "actions of {key} out of order after the crash: {ns:?}"
        );
    }
}

#[tokio::test]
async fn a_restart_resumes_from_the_checkpoint_without_replaying_the_log() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    let file = write_file(TWO_ACTIONS);
    for n in 0..40 {
        publish_event(&js, &event("Order", Op::Insert, "1", json!({"n": n}))).await;
    }
    let app = App::spawn(&js, settings("dispatcher", file.path())).await;
    wait_for_actions(&js, 80).await;
    wait_until_drained(&js, "dispatcher").await;
    assert_eq!(app.stop().await.events, 40);
    let saved = checkpoint::show(&js, "dispatcher")
        .await
        .expect("show")
        .expect("saved");
    assert_eq!(saved.sequence, 40);

    // Even with the durable consumer gone, the stored checkpoint says where to start.
    js.get_stream(EVENTS_STREAM)
        .await
        .expect("stream")
        .delete_consumer("dispatcher")
        .await
        .expect("delete consumer");
    for n in 40..50 {
        publish_event(&js, &event("Order", Op::Insert, "1", json!({"n": n}))).await;
    }
    let app = App::spawn(&js, settings("dispatcher", file.path())).await;
    wait_for_actions(&js, 100).await;
    wait_until_drained(&js, "dispatcher").await;
    assert_eq!(app.stop().await.events, 10, "only the new events are read");
    let saved = checkpoint::show(&js, "dispatcher")
        .await
        .expect("show")
        .expect("saved");
    assert_eq!(saved.sequence, 50);
}

#[tokio::test]
async fn rewinding_dispatches_again_from_a_sequence_or_a_time_and_repeats_are_absorbed() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    let file = write_file(TWO_ACTIONS);
    for n in 0..10 {
        publish_event(&js, &event("Order", Op::Insert, "1", json!({"n": n}))).await;
    }
    let middle = chrono::Utc::now();
    for n in 10..20 {
        publish_event(&js, &event("Order", Op::Insert, "1", json!({"n": n}))).await;
    }
    let app = App::spawn(&js, settings("dispatcher", file.path())).await;
    wait_for_actions(&js, 40).await;
    wait_until_drained(&js, "dispatcher").await;
    app.stop().await;

    let by_sequence = checkpoint::set(&js, "dispatcher", Target::Sequence(16))
        .await
        .expect("rewind");
    assert_eq!(by_sequence, 15);
    let app = App::spawn(&js, settings("dispatcher", file.path())).await;
    wait_until_drained(&js, "dispatcher").await;
    assert_eq!(app.stop().await.events, 5);

    let by_time = checkpoint::set(&js, "dispatcher", Target::Time(middle))
        .await
        .expect("rewind");
    assert_eq!(by_time, 10);
    assert_eq!(
        checkpoint::show(&js, "dispatcher")
            .await
            .expect("show")
            .map(|c| c.sequence),
        Some(10)
    );
    let app = App::spawn(&js, settings("dispatcher", file.path())).await;
    wait_until_drained(&js, "dispatcher").await;
    assert_eq!(app.stop().await.events, 10);
    assert_eq!(
        action_count(&js).await,
        40,
        "re-dispatched actions are absorbed by Msg-Id"
    );
}

#[tokio::test]
async fn a_backfill_runs_only_the_named_observer_over_history() {
    let nats = NatsServer::start();
    let js = jetstream(&nats).await;
    let text = format!(
        "{TWO_ACTIONS}\n[[observer]]\nname = \"big_orders\"\nentity = \"Order\"\nops = [\"insert\"]\n\
         condition = 'data.n >= 5'\n\n[[observer.action]]\nkind = \"slack\"\nchannel = \"big\"\n"
    );
    let set = ObserverSet::parse(&text).expect("valid");
    let since = chrono::Utc::now() - chrono::Duration::minutes(1);
    for n in 0..15 {
        publish_event(
            &js,
            &event("Order", Op::Insert, &n.to_string(), json!({"n": n})),
        )
        .await;
        publish_event(
            &js,
            &event("User", Op::Insert, &n.to_string(), json!({"n": n})),
        )
        .await;
    }
    let observer = set.get("big_orders").expect("declared");
    let report = backfill::run(&js, observer, since).await.expect("backfill");
    assert_eq!(
        (report.events, report.matched, report.requests),
        (15, 10, 10)
    );
    let requests = actions(&js).await;
    assert_eq!(
        by_observer(&requests).into_iter().collect::<Vec<_>>(),
        vec![("big_orders".to_owned(), 10)]
    );

    let again = backfill::run(&js, observer, since)
        .await
        .expect("backfill again");
    assert_eq!(again.requests, 10);
    assert_eq!(
        action_count(&js).await,
        10,
        "a second backfill stores nothing twice"
    );
}
