//! `herald streams`: provisioning is idempotent and never loses what the streams hold.

mod common;

use common::*;
use herald_shared::subjects::EVENTS_STREAM;
use herald_test_support::NatsServer;

#[tokio::test]
async fn streams_init_is_idempotent_and_keeps_what_the_streams_hold() {
    let nats = NatsServer::start();

    let before = json_lines(&succeed(&nats.url(), &["streams", "info", "--json"]).await);
    assert_eq!(before.len(), 5);
    assert!(
        before.iter().all(|row| row["exists"] == false),
        "{before:?}"
    );

    let first = succeed(&nats.url(), &["streams", "init"]).await;
    for name in [
        "HERALD_EVENTS",
        "HERALD_ACTIONS",
        "HERALD_OUTCOMES",
        "HERALD_JOBS",
        "HERALD_DLQ",
    ] {
        assert!(first.contains(name), "{name} missing from:\n{first}");
    }
    let js = nats.jetstream().await;
    publish_original(&js, "herald.events.Order.insert", "e1", "{}").await;

    let second = succeed(&nats.url(), &["streams", "init"]).await;
    assert_eq!(first, second);
    assert_eq!(messages_in(&js, EVENTS_STREAM).await, 1);

    let after = json_lines(&succeed(&nats.url(), &["streams", "info", "--json"]).await);
    assert!(after.iter().all(|row| row["exists"] == true), "{after:?}");
    let events = after
        .iter()
        .find(|row| row["stream"] == EVENTS_STREAM)
        .expect("events row");
    assert_eq!(events["messages"], 1);
    assert_eq!(events["last_seq"], 1);
    let table = succeed(&nats.url(), &["streams", "info"]).await;
    assert!(table.contains("HERALD_EVENTS"), "{table}");
}

#[tokio::test]
async fn streams_init_applies_the_configured_retention() {
    let nats = NatsServer::start();
    let output = command(&nats.url(), &["streams", "init"])
        .env("HERALD_STREAMS__DLQ__MAX_AGE", "3d")
        .env("HERALD_STREAMS__DLQ__MAX_BYTES", "1048576")
        .output()
        .await
        .expect("run herald");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let config = nats
        .jetstream()
        .await
        .get_stream("HERALD_DLQ")
        .await
        .expect("DLQ")
        .get_info()
        .await
        .expect("info")
        .config;
    assert_eq!(
        config.max_age,
        std::time::Duration::from_secs(3 * 24 * 3600)
    );
    assert_eq!(config.max_bytes, 1_048_576);
}

#[tokio::test]
async fn an_unreachable_server_fails_fast_with_its_address() {
    let url = format!("nats://127.0.0.1:{}", herald_test_support::free_port());
    let err = fail(&url, &["streams", "info"]).await;
    assert!(
        err.contains("cannot connect to NATS") && err.contains(&url),
        "{err}"
    );
}

#[tokio::test]
async fn a_bad_setting_is_named() {
    let err = fail("http://127.0.0.1:4222", &["streams", "info"]).await;
    assert!(err.contains("nats.url"), "{err}");
}

#[tokio::test]
async fn settings_come_from_the_config_file_when_no_flag_overrides_them() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("herald.toml");
    std::fs::write(
        &file,
        format!(
            "[nats]\nurl = \"{}\"\n\n[streams.jobs]\nmax_age = \"5d\"\nmax_bytes = -1\n",
            nats.url()
        ),
    )
    .expect("write config");
    let mut command = tokio::process::Command::new(HERALD);
    for (name, _) in std::env::vars() {
        if name.starts_with("HERALD_") {
            command.env_remove(name);
        }
    }
    let output = command
        .arg("--config")
        .arg(&file)
        .args(["streams", "init"])
        .output()
        .await
        .expect("run herald");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let config = nats
        .jetstream()
        .await
        .get_stream("HERALD_JOBS")
        .await
        .expect("jobs stream")
        .get_info()
        .await
        .expect("info")
        .config;
    assert_eq!(
        config.max_age,
        std::time::Duration::from_secs(5 * 24 * 3600)
    );
}

#[tokio::test]
async fn a_password_given_as_a_flag_is_taken_as_written() {
    // Environment values are parsed (`123` becomes a number); a flag must not be.
    let nats =
        NatsServer::start_with(r#"authorization { users = [ { user: ops, password: "12345" } ] }"#);
    let out = succeed(
        &nats.url(),
        &["--user", "ops", "--password", "12345", "streams", "init"],
    )
    .await;
    assert!(out.contains("HERALD_DLQ"), "{out}");
    let refused = fail(
        &nats.url(),
        &["--user", "ops", "--password", "54321", "streams", "info"],
    )
    .await;
    assert!(refused.contains("cannot connect to NATS"), "{refused}");
}
