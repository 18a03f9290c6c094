//! Publishes what the queue scripts wrote to the outbox stream: job status transitions to
//! `herald.jobs.status.<queue>` and dead jobs to `herald.dlq.jobs`. An entry is deleted only
//! after JetStream acked it, so a transition is never lost while NATS is down or this process
//! dies: it is published late, or twice, and the second copy is absorbed by its Msg-Id
//! (`<job id>:<state>:<attempt>` for status, `<job id>:dlq` for the dead letter).
//!
//! Entries are read in stream order and status publishes are pipelined on one connection, so
//! events of one job reach the stream in the order they happened. Several instances may publish
//! the same entries at once; Msg-Id de-duplication makes that harmless.
//!
//! An entry that can never be published (fields the scripts never write, a result above the NATS
//! max payload or the stream's message size, a job id that is no header value, or one the server
//! refused otherwise `MAX_REFUSALS` times; `herald_shared::publish::verdict` sorts the failures)
//! is set aside: a small notice goes to `herald.dlq.jobs`, then the entry moves to
//! `P:outbox:parked` with its reason, and the entries behind it go on. An outage (a timeout, a
//! lost connection) is waited out instead, without reordering anything.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use herald_shared::dlq::{self, DeadLetter};
use herald_shared::publish::{self, PublishFailure, Verdict};
use herald_shared::subjects::{self, DlqSource};
use herald_shared::{JobState, JobStatus, SCHEMA_VERSION, headers, telemetry, traceparent};
use tokio::sync::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::SERVICE;
use crate::queue::{OutboxEntry, Queue, QueueError};

const BATCH: usize = 256;

/// Refusals by the server (an answer, not an outage) before an entry is set aside.
const MAX_REFUSALS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("publishing a job status on {subject} failed: {error}")]
    Publish {
        subject: String,
        #[source]
        error: PublishError,
    },
    #[error(transparent)]
    Dlq(#[from] dlq::DlqError),
    /// An entry that cannot be published as written; set aside so it cannot block every later
    /// event.
    #[error("unusable outbox entry {id}: {reason}")]
    Unusable { id: String, reason: String },
    /// The server refused an entry; it is tried again, and set aside after `MAX_REFUSALS`.
    #[error("outbox entry {id} refused ({count} of {MAX_REFUSALS}): {reason}")]
    Refused {
        id: String,
        count: u32,
        reason: String,
    },
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
    /// Refusals per outbox entry id, while the entry is still being tried.
    refusals: Mutex<HashMap<String, u32>>,
}

/// What to do about an entry that failed.
enum Failure {
    /// It can never be published: set it aside.
    Permanent(String),
    /// The server refused it: try again, up to `MAX_REFUSALS` times.
    Refused(String),
    /// An outage: stop this batch and wait.
    Outage(OutboxError),
}

impl From<OutboxError> for Failure {
    fn from(e: OutboxError) -> Self {
        match &e {
            OutboxError::Unusable { reason, .. } => Failure::Permanent(reason.clone()),
            OutboxError::Dlq(dlq::DlqError::Publish(p)) => match p {
                PublishFailure::TooLarge(reason) => Failure::Permanent(reason.clone()),
                PublishFailure::PermissionDenied(_) | PublishFailure::ScheduleRefused(_) => {
                    Failure::Refused(p.to_string())
                }
                PublishFailure::NoStream(_) | PublishFailure::Transient(_) => Failure::Outage(e),
            },
            OutboxError::Dlq(dlq::DlqError::Body(_)) => Failure::Outage(e),
            OutboxError::Publish { subject, error } => match publish::verdict(subject, error) {
                Verdict::SetAside(failure) => Failure::Permanent(failure.to_string()),
                Verdict::Refused(failure) => Failure::Refused(failure.to_string()),
                Verdict::Outage(_) => Failure::Outage(e),
            },
            OutboxError::Queue(_) | OutboxError::Refused { .. } => Failure::Outage(e),
        }
    }
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
            refusals: Mutex::new(HashMap::new()),
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
        let mut acks: Vec<(&OutboxEntry, String, PublishAckFuture)> =
            Vec::with_capacity(entries.len());
        for entry in &entries {
            let published = match entry.fields.get("kind").map(String::as_str) {
                Some("status") => match self.send_status(entry).await {
                    Ok((subject, ack)) => {
                        acks.push((entry, subject, ack));
                        continue;
                    }
                    Err(e) => Err(e),
                },
                Some("dlq") => {
                    // The dead letter must not overtake the `dead` status sent before it.
                    self.settle(&mut acks).await?;
                    self.dead_letter(entry).await
                }
                other => Err(unusable(entry, format!("unknown kind {other:?}"))),
            };
            if let Err(e) = published {
                self.failed(entry, e.into()).await?;
            }
        }
        self.settle(&mut acks).await?;
        // Every entry read is now published or parked (any other outcome returned above).
        if let Some(last) = entries.last() {
            self.queue.outbox_trim(&last.id).await?;
        }
        let mut refusals = self.refusals.lock().await;
        for entry in &entries {
            refusals.remove(&entry.id);
        }
        Ok(entries.len())
    }

    /// Awaits the pending status acks in order.
    async fn settle(
        &self,
        acks: &mut Vec<(&OutboxEntry, String, PublishAckFuture)>,
    ) -> Result<(), OutboxError> {
        for (entry, subject, ack) in acks.drain(..) {
            if let Err(error) = ack.await {
                let failure = OutboxError::Publish { subject, error };
                self.failed(entry, failure.into()).await?;
            }
        }
        Ok(())
    }

    /// Sets a permanently failing entry aside; an error stops the batch (nothing after the entry
    /// is deleted, so order holds and repeats are absorbed).
    async fn failed(&self, entry: &OutboxEntry, failure: Failure) -> Result<(), OutboxError> {
        let reason = match failure {
            Failure::Outage(e) => return Err(e),
            Failure::Permanent(reason) => reason,
            Failure::Refused(reason) => {
                let mut refusals = self.refusals.lock().await;
                let count = refusals.entry(entry.id.clone()).or_insert(0);
                *count += 1;
                if *count < MAX_REFUSALS {
                    return Err(OutboxError::Refused {
                        id: entry.id.clone(),
                        count: *count,
                        reason,
                    });
                }
                refusals.remove(&entry.id);
                format!("refused {MAX_REFUSALS} times, last: {reason}")
            }
        };
        self.park(entry, &reason).await
    }

    /// A notice in the DLQ first (so `herald dlq list` shows it), then the entry moves to the
    /// parked stream. A crash in between repeats the notice under the same Msg-Id.
    async fn park(&self, entry: &OutboxEntry, reason: &str) -> Result<(), OutboxError> {
        let field = |name: &str| entry.fields.get(name).map(String::as_str).unwrap_or("");
        let queue = field("queue");
        let original_subject = subjects::job_status(queue)
            .or_else(|_| subjects::job_submit("unknown"))
            .map_err(|e| unusable(entry, e.to_string()))?;
        let notice = serde_json::json!({
            "outbox_entry": entry.id,
            "kind": field("kind"),
            "job": field("job"),
            "queue": queue,
            "state": field("state"),
            "attempt": field("attempt"),
            "bytes": entry.fields.values().map(String::len).sum::<usize>(),
            "error": reason,
            "parked_in": self.queue.parked_key(),
        });
        let letter = DeadLetter {
            source: DlqSource::Jobs,
            original_subject,
            // Outbox entry ids (`<ms>-<n>`) are always header-safe, unlike a job id may be.
            original_msg_id: format!("job-outbox:{}", entry.id),
            error: reason.to_owned(),
            attempts: 1,
            first_failed_at: Utc::now(),
        };
        dlq::publish(
            &self.jetstream,
            &letter,
            Bytes::from(notice.to_string()),
            None,
            SERVICE,
        )
        .await?;
        self.queue.park(entry, reason).await?;
        metrics::counter!("herald_jobs_outbox_parked_total").increment(1);
        tracing::error!(entry = %entry.id, %reason, "job outbox entry set aside in the parked stream");
        Ok(())
    }

    async fn send_status(
        &self,
        entry: &OutboxEntry,
    ) -> Result<(String, PublishAckFuture), OutboxError> {
        let status = status_of(entry)?;
        let subject =
            subjects::job_status(&status.queue).map_err(|e| unusable(entry, e.to_string()))?;
        let body = serde_json::to_vec(&status).map_err(|e| unusable(entry, e.to_string()))?;
        let msg_id = status.msg_id();
        if !header_safe(&msg_id) {
            return Err(unusable(entry, "the job id cannot be a header value"));
        }
        let headers = traced_headers(&entry.fields, &msg_id);
        match self
            .jetstream
            .send_publish(
                subject.clone(),
                PublishMessage::build()
                    .payload(Bytes::from(body))
                    .headers(headers),
            )
            .await
        {
            Ok(ack) => Ok((subject, ack)),
            Err(error) => Err(OutboxError::Publish { subject, error }),
        }
    }

    async fn dead_letter(&self, entry: &OutboxEntry) -> Result<(), OutboxError> {
        let unusable = |reason: String| unusable(entry, reason);
        let field = |name: &str| entry.fields.get(name).cloned().unwrap_or_default();
        let job_id = field("job");
        if !header_safe(&job_id) {
            return Err(unusable("the job id cannot be a header value".into()));
        }
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
        if let Ok(parent) = traceparent::parse(&field("traceparent")) {
            original.insert(headers::TRACEPARENT, parent.to_string().as_str());
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
    if let Some(parent) = fields
        .get("traceparent")
        .and_then(|t| traceparent::parse(t).ok())
    {
        incoming.insert(headers::TRACEPARENT, parent.to_string().as_str());
    }
    let span = tracing::info_span!("job status", msg_id);
    telemetry::adopt_context(&span, Some(&incoming));
    let mut out = HeaderMap::new();
    span.in_scope(|| telemetry::inject_context(&mut out));
    out.insert(headers::MSG_ID, msg_id);
    out
}

/// A value async-nats accepts in a header, small enough not to crowd the payload.
fn header_safe(value: &str) -> bool {
    value.len() <= 1024 && !value.contains(['\r', '\n'])
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
