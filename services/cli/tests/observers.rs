//! `herald observers check`: every action kind an observers file uses is read by some consumer
//! on HERALD_ACTIONS, or the command says which is not, and fails.

mod common;

use async_nats::jetstream::consumer::pull;
use common::*;
use herald_shared::subjects::ACTIONS_STREAM;
use herald_test_support::NatsServer;
use tempfile::NamedTempFile;

const OBSERVERS: &str = r#"custom_kinds = ["fax"]

[[observer]]
name = "order_created"
entity = "Order"
ops = ["insert"]

[[observer.action]]
kind = "webhook"
url = "https://example.test/hook"

[[observer.action]]
kind = "fax"
number = "+1 555 0100"
"#;

async fn consumer(js: &async_nats::jetstream::Context, name: &str, filters: &[&str]) {
    js.get_stream(ACTIONS_STREAM)
        .await
        .expect("stream")
        .create_consumer(pull::Config {
            durable_name: Some(name.into()),
            filter_subjects: filters.iter().map(|f| (*f).to_owned()).collect(),
            ..Default::default()
        })
        .await
        .expect("consumer");
}

#[tokio::test]
async fn a_kind_no_consumer_serves_is_reported_and_the_check_fails() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    let file = NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), OBSERVERS).expect("write");
    let path = file.path().to_str().expect("utf-8 path");
    consumer(
        &js,
        "action-worker",
        &["herald.actions.webhook.>", "herald.actions.slack.>"],
    )
    .await;

    let output = run(&nats.url(), &["observers", "check", path]).await;
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stdout.contains("webhook  served by action-worker"),
        "{stdout}"
    );
    assert!(
        stdout.contains("fax  NOT SERVED (used by order_created)"),
        "{stdout}"
    );
    assert!(stderr.contains("fax"), "{stderr}");

    consumer(&js, "fax-worker", &["herald.actions.fax.>"]).await;
    let out = succeed(&nats.url(), &["observers", "check", path, "--json"]).await;
    let kinds: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(kinds.len(), 2);
    assert_eq!(kinds[0]["kind"], "fax");
    assert_eq!(kinds[0]["consumers"], serde_json::json!(["fax-worker"]));
}

#[tokio::test]
async fn a_misspelt_kind_is_refused_with_its_key_and_line() {
    let nats = NatsServer::start();
    let file = NamedTempFile::new().expect("temp file");
    std::fs::write(
        file.path(),
        OBSERVERS.replace("kind = \"webhook\"", "kind = \"webhok\""),
    )
    .expect("write");
    let path = file.path().to_str().expect("utf-8 path");
    let stderr = fail(&nats.url(), &["observers", "check", path]).await;
    assert!(
        stderr.contains("line 9: observer[0].action[0].kind: unknown action kind `webhok`"),
        "{stderr}"
    );
}
