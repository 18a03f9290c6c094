//! When a replayed dead letter counts as accepted, so that `dlq replay` may delete it.
//!
//! For most subjects, JetStream storing the replay is acceptance: whoever consumes it next sees
//! it as a fresh message. A job submission is different: the job worker absorbs a submission
//! whose job it already knows, so the CLI waits for the job worker's own word, the job's
//! `pending` status published after the replay was stored, before the dead letter goes.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use herald_shared::subjects::{self, JOBS_STREAM, JOBS_SUBMIT_ALL};
use herald_shared::{JobRequest, JobState, JobStatus, messages};

/// How long a job replay may take to be taken up by a job worker.
pub const JOB_ACCEPT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error(
        "no job worker took job `{job}` up within {timeout:?} (is one running? is the job alive already?)"
    )]
    NotTakenUp { job: String, timeout: Duration },
    #[error("cannot watch the job's status events: {0}")]
    Watch(String),
}

/// The job a replay to `subject` submits, if it is a decodable job submission.
pub fn replayed_job(subject: &str, body: &[u8]) -> Option<JobRequest> {
    let prefix = JOBS_SUBMIT_ALL.trim_end_matches(".>");
    subjects::tail_tokens(subject, prefix)?;
    messages::decode::<JobRequest>(body).ok()
}

/// Waits for `job`'s `pending` status stored after `replay_seq` in HERALD_JOBS.
pub async fn job_taken_up(
    js: &jetstream::Context,
    job: &JobRequest,
    replay_seq: u64,
    timeout: Duration,
) -> Result<(), AcceptError> {
    let watch = |e: &dyn std::fmt::Display| AcceptError::Watch(e.to_string());
    let subject = subjects::job_status(&job.queue).map_err(|e| watch(&e))?;
    let stream = js.get_stream(JOBS_STREAM).await.map_err(|e| watch(&e))?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject,
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: replay_seq,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| watch(&e))?;
    let mut statuses = consumer.messages().await.map_err(|e| watch(&e))?;
    let found = tokio::time::timeout(timeout, async {
        while let Some(Ok(message)) = statuses.next().await {
            let status: Result<JobStatus, _> = messages::decode(&message.payload);
            if status.is_ok_and(|s| s.job_id == job.id && s.state == JobState::Pending) {
                return true;
            }
        }
        false
    })
    .await;
    match found {
        Ok(true) => Ok(()),
        _ => Err(AcceptError::NotTakenUp {
            job: job.id.clone(),
            timeout,
        }),
    }
}
