//! Per-stage lag, from the messages' own timestamps rather than from the bench's polling:
//! commit → event is the event's stored time in HERALD_EVENTS minus its `at` (the commit time the
//! capture trigger wrote); event → action is the action's stored time in HERALD_ACTIONS minus its
//! event's stored time; action → webhook is the sink's wall-clock arrival minus the action's
//! stored time. Every process runs on this one machine, so their clocks are the same clock.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use herald_shared::messages::{ActionRequest, EntityEvent};
use serde::Serialize;

use crate::report::Latency;

#[derive(Debug, thiserror::Error)]
pub enum LagError {
    #[error("reading {subject}: {message}")]
    Read { subject: String, message: String },
}

#[derive(Debug, Serialize)]
pub struct StageLags {
    pub commit_to_event_ms: Latency,
    pub event_to_action_ms: Latency,
    pub action_to_webhook_ms: Latency,
}

/// Stored time (JetStream's) and body of each message on `subject`, up to `expected` of them.
async fn read<T: serde::de::DeserializeOwned>(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    expected: usize,
) -> Result<Vec<(DateTime<Utc>, T)>, LagError> {
    let fail = |message: String| LagError::Read {
        subject: subject.to_owned(),
        message,
    };
    let reader = js
        .get_stream(stream)
        .await
        .map_err(|e| fail(e.to_string()))?
        .create_consumer(consumer::pull::Config {
            filter_subject: subject.to_owned(),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .map_err(|e| fail(e.to_string()))?;
    let pending = reader
        .clone()
        .info()
        .await
        .map_err(|e| fail(e.to_string()))?
        .num_pending as usize;
    let mut messages = reader
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await
        .map_err(|e| fail(e.to_string()))?;
    let mut out = Vec::with_capacity(pending.min(expected));
    for _ in 0..pending {
        let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_secs(10), messages.next()).await
        else {
            break;
        };
        let message = message.map_err(|e| fail(e.to_string()))?;
        let stored = message.info().map_err(|e| fail(e.to_string()))?.published;
        let stored = DateTime::<Utc>::from_timestamp_nanos(stored.unix_timestamp_nanos() as i64);
        if let Ok(body) = serde_json::from_slice::<T>(&message.payload) {
            out.push((stored, body));
        }
    }
    Ok(out)
}

fn millis(later: DateTime<Utc>, earlier: DateTime<Utc>) -> f64 {
    (later - earlier).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
}

/// The lags of the orders in `orders` (their keys), read back from the streams and the sink.
pub async fn measure(
    js: &jetstream::Context,
    events_subject: &str,
    actions_subject: &str,
    orders: &HashMap<String, std::time::Instant>,
    webhooks: &HashMap<String, SystemTime>,
) -> Result<StageLags, LagError> {
    let events: Vec<(DateTime<Utc>, EntityEvent)> = read(
        js,
        herald_shared::subjects::EVENTS_STREAM,
        events_subject,
        orders.len(),
    )
    .await?;
    let actions: Vec<(DateTime<Utc>, ActionRequest)> = read(
        js,
        herald_shared::subjects::ACTIONS_STREAM,
        actions_subject,
        orders.len(),
    )
    .await?;
    let mut event_stored = HashMap::new();
    let mut commit_to_event = Vec::new();
    for (stored, event) in events {
        if orders.contains_key(&event.key) {
            commit_to_event.push(millis(stored, event.at));
            event_stored.entry(event.key).or_insert(stored);
        }
    }
    let mut event_to_action = Vec::new();
    let mut action_to_webhook = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (stored, action) in actions {
        // A put-back or retry is a scheduled copy stored again on the same subject later; the
        // action's lag runs from its first store (stream order).
        if !seen.insert(action.id.clone()) {
            continue;
        }
        let key = &action.event.key;
        if let Some(event) = event_stored.get(key) {
            event_to_action.push(millis(stored, *event));
        }
        if let Some(arrived) = webhooks.get(key) {
            action_to_webhook.push(millis(DateTime::<Utc>::from(*arrived), stored));
        }
    }
    Ok(StageLags {
        commit_to_event_ms: Latency::from_samples(commit_to_event),
        event_to_action_ms: Latency::from_samples(event_to_action),
        action_to_webhook_ms: Latency::from_samples(action_to_webhook),
    })
}
