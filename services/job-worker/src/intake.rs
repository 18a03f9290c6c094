//! Intake: a durable pull consumer on `herald.jobs.submit.>`. Each submission is stored in Redis
//! (one Lua script: dedup by job id, pending set, `pending` event into the outbox) and only then
//! acked, so an acked job is durable. A duplicate submission (a re-delivery, or the same id sent
//! twice) finds its job already stored and is acked without effect — for as long as the job record
//! lives (until `terminal_ttl` after it finished). A replay from the DLQ (it carries
//! `Herald-Replayed-From`) is not a duplicate: a dead job runs again as a new attempt series,
//! and a repeat of the same replay is absorbed by its Msg-Id. Undecodable submissions, and job
//! ids that could not travel in a header or a Redis key, go
//! to `herald.dlq.jobs` with the reason; while Redis is unreachable submissions are NAKed with a
//! delay and come back. Every submission is settled by the shared `herald_shared::consume::
//! Settler`, like the dispatcher's events and the action worker's actions.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use herald_shared::consume::{Disposition, Settler};
use herald_shared::subjects::{self, DlqSource, JOBS_STREAM, JOBS_SUBMIT_ALL};
use herald_shared::{JobRequest, headers, messages, telemetry};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::SERVICE;
use crate::pool::Pool;
use crate::queue::Queue;

/// Submissions stored at once; each waits on one Redis script, so overlapping them hides the
/// round trip.
const IN_FLIGHT: usize = 256;

/// The longest job id accepted: it travels in every status event's Msg-Id.
pub const MAX_JOB_ID_LEN: usize = 256;

/// How long a submission waits before coming back while Redis is unreachable.
const REDIS_DOWN_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("cannot find the {JOBS_STREAM} stream: {0}")]
    Stream(#[from] jetstream::context::GetStreamError),
    #[error("cannot create the submission consumer: {0}")]
    Consumer(#[from] jetstream::stream::ConsumerError),
    #[error("cannot pull submissions: {0}")]
    Pull(#[from] jetstream::consumer::StreamError),
}

/// The durable consumer every instance shares.
pub async fn consumer(
    js: &jetstream::Context,
    name: &str,
) -> Result<jetstream::consumer::Consumer<pull::Config>, IntakeError> {
    let stream = js.get_stream(JOBS_STREAM).await?;
    Ok(stream
        .get_or_create_consumer(
            name,
            pull::Config {
                durable_name: Some(name.to_owned()),
                description: Some("job-worker intake: stores submissions in Redis".into()),
                filter_subject: JOBS_SUBMIT_ALL.to_owned(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 10_000,
                ..Default::default()
            },
        )
        .await?)
}

pub struct Intake {
    pub jetstream: jetstream::Context,
    pub queue: Queue,
    pub pool: Pool,
}

impl Intake {
    pub async fn run(
        self,
        consumer: jetstream::consumer::Consumer<pull::Config>,
        stop: CancellationToken,
    ) -> Result<(), IntakeError> {
        let settler = Settler::new(
            self.jetstream.clone(),
            DlqSource::Jobs,
            SERVICE,
            REDIS_DOWN_DELAY,
        );
        let mut messages = consumer.messages().await?;
        let mut in_flight = FuturesUnordered::new();
        let result = loop {
            tokio::select! {
                message = messages.next(), if in_flight.len() < IN_FLIGHT => match message {
                    Some(Ok(message)) => in_flight.push(self.handle(&settler, message)),
                    Some(Err(e)) => tracing::warn!(error = %e, "pulling submissions failed"),
                    None => {
                        tracing::warn!("submission stream ended; pulling again");
                        match consumer.messages().await {
                            Ok(again) => messages = again,
                            Err(e) => break Err(e.into()),
                        }
                    }
                },
                Some(()) = in_flight.next() => {}
                () = stop.cancelled() => break Ok(()),
            }
        };
        // Submissions being stored finish (and are acked) before intake returns.
        while in_flight.next().await.is_some() {}
        result
    }

    /// Stores one submission and settles it through the shared `Settler`: acked once stored (or
    /// found stored), put back while Redis is unreachable, dead-lettered when it can never be a
    /// job.
    async fn handle(&self, settler: &Settler, message: jetstream::Message) {
        let span = tracing::info_span!("job intake", subject = %message.subject);
        telemetry::adopt_context(&span, message.headers.as_ref());
        async {
            let disposition = self.decide(&message).await;
            settler.settle(&message, disposition).await;
        }
        .instrument(span)
        .await;
    }

    async fn decide(&self, message: &jetstream::Message) -> Disposition {
        let job = match self.check(message) {
            Ok(job) => job,
            Err(reason) => return Disposition::dead_letter(reason),
        };
        let mut carried = HeaderMap::new();
        telemetry::inject_context(&mut carried);
        let traceparent = telemetry::traceparent(Some(&carried)).unwrap_or_default();
        let request = String::from_utf8_lossy(&message.payload);
        let stored = match replay_of(message) {
            Some(replay) => {
                self.queue
                    .store_replay(&job, &request, &traceparent, &replay)
                    .await
            }
            None => self.queue.store(&job, &request, &traceparent).await,
        };
        match stored {
            Ok(true) => {
                metrics::counter!("herald_jobs_submitted_total", "queue" => job.queue.clone())
                    .increment(1);
                self.pool.wake(&job.queue);
                Disposition::ack()
            }
            Ok(false) => {
                tracing::debug!(id = %job.id, "duplicate submission absorbed");
                Disposition::ack()
            }
            Err(e) => {
                // Not tried: Redis is away, which is no fault of the submission.
                tracing::warn!(error = %e, "cannot store a submission; it will come back");
                Disposition::defer(REDIS_DOWN_DELAY)
            }
        }
    }

    /// The submission, or why it cannot be a job.
    fn check(&self, message: &jetstream::Message) -> Result<JobRequest, String> {
        let job: JobRequest = messages::decode(&message.payload).map_err(|e| e.to_string())?;
        let prefix = JOBS_SUBMIT_ALL.trim_end_matches(".>");
        let subject_queue = subjects::tail_tokens(&message.subject, prefix)
            .and_then(|tokens| (tokens.len() == 1).then(|| tokens[0]));
        if subject_queue != Some(job.queue.as_str()) {
            return Err(format!(
                "the job's queue `{}` does not match its subject {}",
                job.queue, message.subject
            ));
        }
        check_id(&job.id)?;
        let problems = job.retry.problems("retry");
        if !problems.is_empty() {
            let text: Vec<String> = problems
                .into_iter()
                .map(|(k, m)| format!("{k}: {m}"))
                .collect();
            return Err(format!("bad retry policy: {}", text.join("; ")));
        }
        Ok(job)
    }
}

/// A job id is one line of visible text of bounded length: it becomes part of Redis keys and of
/// every status event's Msg-Id header.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("the job id is empty".into());
    }
    if id.len() > MAX_JOB_ID_LEN {
        return Err(format!(
            "the job id is {} bytes, above the {MAX_JOB_ID_LEN}-byte limit",
            id.len()
        ));
    }
    if id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("the job id contains white space or control characters".into());
    }
    Ok(())
}

/// The replay's own name when the submission was re-published from the DLQ: its Msg-Id, fixed
/// per DLQ entry, so replaying one entry twice re-arms the job once.
fn replay_of(message: &jetstream::Message) -> Option<String> {
    let found = message.headers.as_ref()?;
    let from = found.get(headers::REPLAYED_FROM)?.as_str();
    Some(
        found
            .get(headers::MSG_ID)
            .map_or_else(|| format!("replay:{from}"), |id| id.as_str().to_owned()),
    )
}

/// The Msg-Id a submission is published with: its job id.
pub fn submission_headers(job: &JobRequest) -> HeaderMap {
    let mut out = HeaderMap::new();
    telemetry::inject_context(&mut out);
    out.insert(headers::MSG_ID, job.id.as_str());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_that_could_break_a_header_or_a_key_are_refused() {
        assert!(check_id("order-1:send-mail:0").is_ok());
        for bad in [
            "",
            "a\nb",
            "a\r",
            "a b",
            "tab\t",
            &"x".repeat(MAX_JOB_ID_LEN + 1),
        ] {
            assert!(check_id(bad).is_err(), "accepted {bad:?}");
        }
    }
}
