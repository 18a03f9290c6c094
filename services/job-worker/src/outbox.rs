//! Publishes what the queue scripts wrote to the outbox stream: job status transitions to
//! `herald.jobs.status.<queue>` and dead jobs to `herald.dlq.jobs`. An entry is deleted only
//! after JetStream acked it, so a transition is never lost while NATS is down or this process
//! dies: it is published late, or twice, and the second copy is absorbed by its Msg-Id
//! (`<job id>:<state>:<attempt>` for status, `<job id>:dlq` for the dead letter).
//!
//! Entries are read in stream order and status publishes are pipelined on one connection, so
//! events of one job reach the stream in the order they happened. Several instances may publish
//! the same entries at once; Msg-Id de-duplication makes that harmless.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use herald_shared::dlq::{self, DeadLetter};
use herald_shared::subjects::{self, DlqSource};
use herald_shared::{JobState, JobStatus, SCHEMA_VERSION, headers, telemetry};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::SERVICE;
use crate::queue::{OutboxEntry, Queue, QueueError};

const BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("publishing a job status failed: {0}")]
    Publish(#[from] jetstream::context::PublishError),
    #[error(transparent)]
    Dlq(#[from] dlq::DlqError),
    /// An entry that cannot be published as written; logged and dropped so it cannot block every
    /// later event.
    #[error("unusable outbox entry {id}: {reason}")]
    Unusable { id: String, reason: String },
}

fn unusable(entry: &OutboxEntry, reason: impl Into<String>) -> OutboxError {
    OutboxError::Unusable {
        id: entry.id.clone(),
        reason: reason.into(),
    }
}

pub struct Outbox {
    queue: Queue,
    jetstream: jetstream::Context,
    wake: Arc<Notify>,
    poll: Duration,
}

impl Outbox {
    pub fn new(
        queue: Queue,
        jetstream: jetstream::Context,
        wake: Arc<Notify>,
        poll: Duration,
    ) -> Self {
        Self {
            queue,
            jetstream,
            wake,
            poll,
        }
    }

    /// Publishes until `stop`, then publishes what is left once more and returns.
    pub async fn run(self, stop: CancellationToken) {
        let mut failures = 0u32;
        loop {
            match self.flush().await {
                Ok(n) if n == BATCH => continue,
                Ok(_) => {
                    failures = 0;
                    tokio::select! {
                        () = self.wake.notified() => {}
                        () = tokio::time::sleep(self.poll) => {}
                        () = stop.cancelled() => break,
                    }
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "job events not published yet; retrying");
                    let delay = Duration::from_millis(50 * 2u64.pow(failures.min(5)));
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.cancelled() => break,
                    }
                }
            }
        }
        loop {
            match self.flush().await {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) => {
                    // Left in Redis: the next instance to start publishes it.
                    tracing::warn!(error = %e, "job events left unpublished at shutdown");
                    break;
                }
            }
        }
    }

    /// Publishes the oldest batch; returns how many entries it handled.
    async fn flush(&self) -> Result<usize, OutboxError> {
        let entries = self.queue.outbox(BATCH).await?;
        if entries.is_empty() {
            return Ok(0);
        }
        let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(entries.len());
        for entry in &entries {
            let published = match entry.fields.get("kind").map(String::as_str) {
                Some("status") => self.send_status(entry).await.map(|ack| acks.push(ack)),
                Some("dlq") => {
                    // The dead letter must not overtake the `dead` status sent before it.
                    for ack in acks.drain(..) {
                        ack.await?;
                    }
                    self.dead_letter(entry).await
                }
                other => Err(unusable(entry, format!("unknown kind {other:?}"))),
            };
            match published {
                Ok(()) => {}
                Err(e @ OutboxError::Unusable { .. }) => {
                    tracing::error!(error = %e, "dropping outbox entry");
                }
                Err(e) => return Err(e),
            }
        }
        for ack in acks {
            ack.await?;
        }
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        self.queue.outbox_done(&ids).await?;
        Ok(entries.len())
    }

    async fn send_status(&self, entry: &OutboxEntry) -> Result<PublishAckFuture, OutboxError> {
        let status = status_of(entry)?;
        let subject =
            subjects::job_status(&status.queue).map_err(|e| unusable(entry, e.to_string()))?;
        let body = serde_json::to_vec(&status).map_err(|e| unusable(entry, e.to_string()))?;
        let headers = traced_headers(&entry.fields, &status.msg_id());
        self.jetstream
            .send_publish(
                subject,
                PublishMessage::build()
                    .payload(Bytes::from(body))
                    .headers(headers),
            )
            .await
            .map_err(OutboxError::from)
    }

    async fn dead_letter(&self, entry: &OutboxEntry) -> Result<(), OutboxError> {
        let unusable = |reason: String| unusable(entry, reason);
        let field = |name: &str| entry.fields.get(name).cloned().unwrap_or_default();
        let job_id = field("job");
        let queue = field("queue");
        let original_subject = subjects::job_submit(&queue).map_err(|e| unusable(e.to_string()))?;
        let attempts = field("attempt")
            .parse()
            .map_err(|_| unusable("bad attempt".into()))?;
        let first_failed_at = millis(&field("first_failed_at")).map_err(unusable)?;
        // A job retried from dead and dead again is a new dead letter, not a repeat of the first.
        let base = field("base");
        let original_msg_id = if base.is_empty() || base == "0" {
            job_id.clone()
        } else {
            format!("{job_id}:retry-{base}")
        };
        let letter = DeadLetter {
            source: DlqSource::Jobs,
            original_subject,
            original_msg_id,
            error: field("error"),
            attempts,
            first_failed_at,
        };
        let mut original = HeaderMap::new();
        original.insert(headers::MSG_ID, job_id.as_str());
        let traceparent = field("traceparent");
        if !traceparent.is_empty() {
            original.insert(headers::TRACEPARENT, traceparent.as_str());
        }
        dlq::publish(
            &self.jetstream,
            &letter,
            Bytes::from(field("request")),
            Some(&original),
            SERVICE,
        )
        .await?;
        metrics::counter!("herald_jobs_dead_letters_total", "queue" => queue).increment(1);
        Ok(())
    }
}

/// `Nats-Msg-Id` plus the job's trace context, carried on from the submission.
fn traced_headers(fields: &HashMap<String, String>, msg_id: &str) -> HeaderMap {
    let mut incoming = HeaderMap::new();
    if let Some(traceparent) = fields.get("traceparent").filter(|t| !t.is_empty()) {
        incoming.insert(headers::TRACEPARENT, traceparent.as_str());
    }
    let span = tracing::info_span!("job status", msg_id);
    telemetry::adopt_context(&span, Some(&incoming));
    let mut out = HeaderMap::new();
    span.in_scope(|| telemetry::inject_context(&mut out));
    out.insert(headers::MSG_ID, msg_id);
    out
}

fn status_of(entry: &OutboxEntry) -> Result<JobStatus, OutboxError> {
    let unusable = |reason: String| unusable(entry, reason);
    let field = |name: &str| {
        entry
            .fields
            .get(name)
            .cloned()
            .ok_or_else(|| unusable(format!("no `{name}`")))
    };
    let state: JobState = field("state")?.parse().map_err(unusable)?;
    let attempt = field("attempt")?
        .parse()
        .map_err(|_| unusable("bad attempt".into()))?;
    let result = match entry.fields.get("result") {
        Some(text) => Some(serde_json::from_str(text).map_err(|e| unusable(e.to_string()))?),
        None => None,
    };
    Ok(JobStatus {
        job_id: field("job")?,
        queue: field("queue")?,
        job_type: field("type")?,
        state,
        attempt,
        error: entry.fields.get("error").cloned(),
        result,
        at: millis(&field("at")?).map_err(unusable)?,
        schema_version: SCHEMA_VERSION,
    })
}

fn millis(text: &str) -> Result<DateTime<Utc>, String> {
    text.parse::<i64>()
        .ok()
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .ok_or_else(|| format!("`{text}` is not a time in ms"))
}

/// Runs the outbox in its own span so its logs are easy to find.
pub fn spawn(outbox: Outbox, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(outbox.run(stop).instrument(tracing::info_span!("outbox")))
}
