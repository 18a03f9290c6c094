//! One way to start the dispatcher in tests (in-process, or as the real binary for kill -9),
//! publish events, and read back what landed in the streams.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use chrono::Utc;
use futures::StreamExt;
use herald_dispatcher::{DispatcherSettings, Observers, Summary};
use herald_shared::config::{NatsConfig, StreamsConfig};
use herald_shared::subjects::{ACTIONS_STREAM, DLQ_STREAM, EVENTS_STREAM};
use herald_shared::{ActionRequest, EntityEvent, Op, SCHEMA_VERSION, headers, streams};
use herald_test_support::{NatsServer, eventually_async};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(20);

pub fn settings(name: &str, observers: &Path) -> DispatcherSettings {
    DispatcherSettings {
        name: name.to_owned(),
        observers: observers.to_owned(),
        lanes: 8,
        batch: 64,
        ack_wait: Duration::from_secs(5),
        retry_delay: Duration::from_millis(100),
        checkpoint_interval: Duration::from_millis(100),
        lease_ttl: Duration::from_secs(2),
    }
}

/// A JetStream context with the dispatcher's streams provisioned.
pub async fn jetstream(nats: &NatsServer) -> jetstream::Context {
    jetstream_with(nats, &StreamsConfig::default()).await
}

/// A JetStream context with the dispatcher's streams provisioned as `streams` says.
pub async fn jetstream_with(nats: &NatsServer, streams: &StreamsConfig) -> jetstream::Context {
    jetstream_at(&nats.url(), streams).await
}

/// The same against any server or cluster `url` (comma-separated for a cluster).
pub async fn jetstream_at(url: &str, streams: &StreamsConfig) -> jetstream::Context {
    let config = NatsConfig {
        url: url.to_owned(),
        ..Default::default()
    };
    let connection = herald_shared::nats::connect(&config, "dispatcher-test")
        .await
        .expect("connect");
    streams::ensure(&connection.jetstream, streams, &herald_dispatcher::STREAMS)
        .await
        .expect("provision streams");
    connection.jetstream
}

/// A dispatcher running in this process.
pub struct App {
    pub observers: Arc<Observers>,
    shutdown: CancellationToken,
    task: JoinHandle<Summary>,
}

impl App {
    pub async fn spawn(js: &jetstream::Context, settings: DispatcherSettings) -> Self {
        let observers =
            Arc::new(Observers::load(&settings.observers).expect("valid observers file"));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(herald_dispatcher::run(
            js.clone(),
            settings,
            Arc::clone(&observers),
            herald_dispatcher::partition::Health::new(),
            shutdown.clone(),
        ));
        Self {
            observers,
            shutdown,
            task,
        }
    }

    /// Graceful stop: finishes in-flight events and saves the checkpoint.
    pub async fn stop(self) -> Summary {
        self.shutdown.cancel();
        self.task.await.expect("dispatcher task")
    }
}

pub fn write_file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), text).expect("write");
    file
}

pub fn event(entity: &str, op: Op, key: &str, data: serde_json::Value) -> EntityEvent {
    EntityEvent {
        id: uuid::Uuid::now_v7(),
        entity: entity.into(),
        op,
        key: key.into(),
        data: Some(data),
        before: None,
        changed: None,
        at: Utc::now(),
        actor: Some("tester".into()),
        tx: 1,
        schema_version: SCHEMA_VERSION,
    }
}

pub async fn publish_event(js: &jetstream::Context, event: &EntityEvent) -> u64 {
    let subject = herald_shared::subjects::event(&event.entity, event.op).expect("valid subject");
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, event.id.to_string().as_str());
    js.publish_with_headers(subject, h, serde_json::to_vec(event).expect("json").into())
        .await
        .expect("publish")
        .await
        .expect("stored")
        .sequence
}

/// Publishes as the relay does: on the keyed subject, which HERALD_EVENTS partitions.
pub async fn publish_keyed_event(js: &jetstream::Context, event: &EntityEvent) -> u64 {
    let subject = herald_shared::subjects::keyed_event(&event.entity, event.op, &event.key)
        .expect("valid subject");
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, event.id.to_string().as_str());
    js.publish_with_headers(subject, h, serde_json::to_vec(event).expect("json").into())
        .await
        .expect("publish")
        .await
        .expect("stored")
        .sequence
}

pub async fn publish_raw(js: &jetstream::Context, subject: &str, body: &[u8]) {
    js.publish(subject.to_owned(), body.to_vec().into())
        .await
        .expect("publish")
        .await
        .expect("stored");
}

/// Every message of a stream, in stream order, as (subject, headers, body).
pub async fn read_all(
    js: &jetstream::Context,
    stream: &str,
) -> Vec<(String, Option<HeaderMap>, bytes::Bytes)> {
    let stream = js.get_stream(stream).await.expect("stream");
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig::default())
        .await
        .expect("ordered consumer");
    let mut pending = reader.cached_info().num_pending;
    let mut out = Vec::new();
    if pending == 0 {
        return out;
    }
    let mut messages = reader.messages().await.expect("messages");
    while pending > 0 {
        let message = messages.next().await.expect("message").expect("message ok");
        pending = message.info().expect("info").pending;
        out.push((
            message.subject.to_string(),
            message.headers.clone(),
            message.payload.clone(),
        ));
    }
    out
}

pub async fn actions(js: &jetstream::Context) -> Vec<ActionRequest> {
    read_all(js, ACTIONS_STREAM)
        .await
        .into_iter()
        .map(|(subject, h, body)| {
            let request: ActionRequest = serde_json::from_slice(&body).expect("ActionRequest");
            let msg_id = h
                .as_ref()
                .and_then(|h| h.get(headers::MSG_ID))
                .map(|v| v.to_string());
            assert_eq!(
                msg_id.as_deref(),
                Some(request.id.as_str()),
                "Msg-Id is the action id"
            );
            assert_eq!(
                subject,
                herald_shared::subjects::action(&request.kind, &request.observer).expect("subject")
            );
            request
        })
        .collect()
}

pub async fn action_count(js: &jetstream::Context) -> u64 {
    let mut stream = js.get_stream(ACTIONS_STREAM).await.expect("stream");
    stream.info().await.expect("info").state.messages
}

pub async fn dead_letters(
    js: &jetstream::Context,
) -> Vec<(String, Option<HeaderMap>, bytes::Bytes)> {
    read_all(js, DLQ_STREAM).await
}

/// Waits until the stream holds exactly `expected` actions.
pub async fn wait_for_actions(js: &jetstream::Context, expected: u64) {
    eventually_async(&format!("{expected} actions"), WAIT, || async {
        (action_count(js).await >= expected).then_some(())
    })
    .await;
}

/// Waits until the durable consumer has nothing pending or unacked.
pub async fn wait_until_drained(js: &jetstream::Context, name: &str) {
    let stream = js.get_stream(EVENTS_STREAM).await.expect("stream");
    eventually_async("the dispatcher to ack every event", WAIT, || async {
        let info = stream.consumer_info(name).await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await;
}

/// Requests per observer.
pub fn by_observer(requests: &[ActionRequest]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in requests {
        *counts.entry(r.observer.clone()).or_default() += 1;
    }
    counts
}
