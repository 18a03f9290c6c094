//! Running the real `herald` binary against a real nats-server, and reading back what it did.

#![allow(dead_code)] // each test binary uses its own part of this helper

use std::process::Output;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::StreamMessage};
use chrono::Utc;
use herald_shared::config::StreamsConfig;
use herald_shared::dlq::{self, DeadLetter};
use herald_shared::subjects::DlqSource;
use herald_test_support::NatsServer;

pub const HERALD: &str = env!("CARGO_BIN_EXE_herald");

/// `herald <args>` against `url`, isolated from the caller's HERALD_* settings.
pub fn command(url: &str, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(HERALD);
    for (name, _) in std::env::vars() {
        if name.starts_with("HERALD_") {
            command.env_remove(name);
        }
    }
    command.arg("--nats-url").arg(url).args(args);
    command.kill_on_drop(true);
    command
}

pub async fn run(url: &str, args: &[&str]) -> Output {
    command(url, args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run herald {args:?}: {e}"))
}

/// Runs `herald <args>` and returns its stdout, failing the test if it failed.
pub async fn succeed(url: &str, args: &[&str]) -> String {
    let output = run(url, args).await;
    assert!(
        output.status.success(),
        "herald {args:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `herald <args>` and returns stdout and stderr, failing the test if it failed.
pub async fn succeed_with_stderr(url: &str, args: &[&str]) -> (String, String) {
    let output = run(url, args).await;
    assert!(
        output.status.success(),
        "herald {args:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs `herald <args>` on a pseudo-terminal (util-linux `script`), as a person at a terminal
/// would, and returns everything it wrote there, stdout and stderr together.
pub async fn on_a_terminal(url: &str, args: &[&str]) -> String {
    let line = std::iter::once(HERALD)
        .chain(["--nats-url", url])
        .chain(args.iter().copied())
        .map(|word| format!("'{word}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut command = tokio::process::Command::new("script");
    for (name, _) in std::env::vars() {
        if name.starts_with("HERALD_") {
            command.env_remove(name);
        }
    }
    let output = command
        .args(["--quiet", "--return", "--command", &line, "/dev/null"])
        .env("TERM", "xterm")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run `script` (util-linux) for herald {args:?}: {e}"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "herald {args:?} on a terminal failed:\n{text}"
    );
    text
}

/// Runs `herald <args>`, expects it to fail, and returns its stderr.
pub async fn fail(url: &str, args: &[&str]) -> String {
    let output = run(url, args).await;
    assert!(
        !output.status.success(),
        "herald {args:?} succeeded:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The JSON lines of a `--json` output.
pub fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

pub async fn provisioned(nats: &NatsServer) -> jetstream::Context {
    let js = nats.jetstream().await;
    herald_shared::streams::ensure_all(&js, &StreamsConfig::default())
        .await
        .expect("provision the streams");
    js
}

/// Publishes a message to its stream as a service would, with a Msg-Id and a trace context.
pub async fn publish_original(
    js: &jetstream::Context,
    subject: &str,
    msg_id: &str,
    body: &'static str,
) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(herald_shared::headers::MSG_ID, msg_id);
    headers.insert(
        herald_shared::headers::TRACEPARENT,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    js.publish_with_headers(subject.to_owned(), headers.clone(), body.into())
        .await
        .expect("publish the original")
        .await
        .expect("original stored");
    headers
}

/// Dead-letters a message the way every service does.
pub async fn dead_letter(
    js: &jetstream::Context,
    source: DlqSource,
    subject: &str,
    msg_id: &str,
    error: &str,
    body: &'static str,
    original_headers: Option<&HeaderMap>,
) {
    let letter = DeadLetter {
        source,
        original_subject: subject.to_owned(),
        original_msg_id: msg_id.to_owned(),
        error: error.to_owned(),
        attempts: 5,
        first_failed_at: Utc::now(),
    };
    dlq::publish(js, &letter, body.into(), original_headers, "test")
        .await
        .expect("dead letter stored");
}

pub async fn messages_in(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .expect("stream exists")
        .get_info()
        .await
        .expect("stream info")
        .state
        .messages
}

pub async fn stored(js: &jetstream::Context, stream: &str, seq: u64) -> StreamMessage {
    js.get_stream(stream)
        .await
        .expect("stream exists")
        .direct_get(seq)
        .await
        .unwrap_or_else(|e| panic!("{stream} seq {seq}: {e}"))
}

pub fn header(message: &StreamMessage, name: &str) -> Option<String> {
    message.headers.get(name).map(|v| v.as_str().to_owned())
}
