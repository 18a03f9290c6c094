//! `herald tail`: live messages, one JSON line each, only those the filter selects, until Ctrl-C.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use herald_test_support::NatsServer;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

const WAIT: Duration = Duration::from_secs(10);

/// Starts `herald tail <filter>` and waits until it says it is following.
async fn tail(url: &str, filter: &str) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = command(url, &["tail", filter])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herald tail");
    let stderr = child.stderr.take().expect("stderr piped");
    let mut stderr = BufReader::new(stderr).lines();
    let ready = tokio::time::timeout(WAIT, async {
        while let Some(line) = stderr.next_line().await.expect("read stderr") {
            if line.contains("following") {
                return line;
            }
        }
        panic!("herald tail exited before following");
    })
    .await
    .expect("herald tail follows in time");
    assert!(
        ready.contains(filter) || ready.contains("herald."),
        "{ready}"
    );
    let stdout = child.stdout.take().expect("stdout piped");
    (child, BufReader::new(stdout).lines())
}

async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> serde_json::Value {
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("a line in time")
        .expect("read stdout")
        .expect("herald tail still running");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

fn interrupt(child: &Child) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("run kill");
    assert!(status.success());
}

#[tokio::test]
async fn tail_prints_new_matching_messages_as_json_lines_until_interrupted() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    publish_original(&js, "herald.events.Order.insert", "before", r#"{"n":0}"#).await;

    let (mut child, mut lines) = tail(&nats.url(), "herald.*.Order.>").await;
    publish_original(&js, "herald.events.Customer.insert", "other", r#"{"n":1}"#).await;
    publish_original(&js, "herald.events.Order.update", "e2", r#"{"n":2}"#).await;
    publish_original(&js, "herald.events.Order.update", "e2", r#"{"n":2}"#).await;
    js.publish("herald.events.Order.delete", "not json".into())
        .await
        .expect("publish")
        .await
        .expect("stored");

    let first = next_line(&mut lines).await;
    assert_eq!(first["stream"], "HERALD_EVENTS");
    assert_eq!(first["seq"], 3);
    assert_eq!(first["subject"], "herald.events.Order.update");
    assert_eq!(first["data"]["n"], 2);
    assert_eq!(first["headers"]["Nats-Msg-Id"], "e2");
    // The duplicate was absorbed by JetStream, so the next line is the message after it.
    let second = next_line(&mut lines).await;
    assert_eq!(second["seq"], 4);
    assert_eq!(second["data"], "not json");

    interrupt(&child);
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn tail_follows_subjects_outside_every_stream() {
    let nats = NatsServer::start();
    provisioned(&nats).await;
    let (mut child, mut lines) = tail(&nats.url(), "herald.control.jobs.>").await;
    let client = nats.client().await;
    client
        .publish("herald.control.jobs.list", "{}".into())
        .await
        .expect("publish");
    client.flush().await.expect("flush");
    let line = next_line(&mut lines).await;
    assert_eq!(line["stream"], serde_json::Value::Null);
    assert_eq!(line["subject"], "herald.control.jobs.list");
    interrupt(&child);
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn a_wide_filter_follows_every_stream_it_touches() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    let (mut child, mut lines) = tail(&nats.url(), "herald.>").await;
    for (subject, msg_id) in [
        ("herald.events.Order.insert", "e1"),
        ("herald.jobs.status.default", "j1:running:1"),
        ("herald.dlq.actions", "a1:dlq"),
    ] {
        publish_original(&js, subject, msg_id, "{}").await;
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        let line = next_line(&mut lines).await;
        seen.push((
            line["stream"].as_str().unwrap_or_default().to_owned(),
            line["subject"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("HERALD_DLQ".to_owned(), "herald.dlq.actions".to_owned()),
            (
                "HERALD_EVENTS".to_owned(),
                "herald.events.Order.insert".to_owned()
            ),
            (
                "HERALD_JOBS".to_owned(),
                "herald.jobs.status.default".to_owned()
            ),
        ]
    );
    interrupt(&child);
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits in time")
        .expect("wait");
    assert!(status.success(), "{status}");
}
