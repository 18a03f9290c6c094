//! `herald jobs`: list, show, cancel and retry the job worker's jobs.
//!
//! The job worker owns its Redis queue, so the CLI never reads Redis: it asks the worker over core
//! NATS request/reply on `herald.control.jobs.<verb>`, with the worker's own request and reply
//! types (`herald_job_worker::control`) as the contract, so the two cannot drift apart. Workers
//! answer in one queue group: one request, one reply, whichever instance takes it.
//!
//! A request nobody answers fails at once (no responders) or after the NATS request timeout, and
//! the error names the subject, because "which service should have answered" is the first thing
//! an operator needs to know. Refusals (cancel of a finished job, retry of a job that is not dead)
//! exit non-zero, so scripts can tell "done" from "nothing changed".

use std::io::Write;

use async_nats::{RequestError, RequestErrorKind};
use chrono::{DateTime, SecondsFormat, Utc};
use herald_job_worker::control::{ControlReply, JobRef, JobView, ListRequest};
use herald_job_worker::queue::{CancelOutcome, RetryOutcome};
use herald_shared::JobState;
use herald_shared::subjects::{
    JOBS_CONTROL_CANCEL, JOBS_CONTROL_LIST, JOBS_CONTROL_RETRY, JOBS_CONTROL_SHOW,
};
use serde::Serialize;

use crate::connection::Session;

#[derive(Debug, clap::Subcommand)]
pub enum JobsCommand {
    /// List jobs, per queue and state. Table columns: ID, QUEUE, TYPE, STATE, ATTEMPT, UPDATED,
    /// LAST ERROR.
    List {
        /// Only jobs of this queue; every queue without it.
        #[arg(long)]
        queue: Option<String>,
        /// Only jobs in this state: pending, running, succeeded, failed, dead or cancelled.
        #[arg(long)]
        state: Option<JobState>,
        /// At most this many jobs per queue and state.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
        /// One JSON object per line (the job as the worker reports it) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one job in full: state, attempts, timestamps, last error, result and request.
    Show {
        /// The job id.
        id: String,
        /// The job as one JSON object instead of `key: value` lines.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job: a pending or delayed job at once; a running one cooperatively (its handler
    /// is told to stop at its next heartbeat). Prints `<id> cancelled` or `<id> cancelling`.
    Cancel {
        /// The job id.
        id: String,
    },
    /// Put a dead job back in its queue with a fresh retry budget. Prints `<id> requeued`.
    Retry {
        /// The job id.
        id: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("no job worker answers on {subject} (is herald-job-worker running?)")]
    NoResponders { subject: &'static str },
    #[error("no job worker answered on {subject} in time (is herald-job-worker running?)")]
    TimedOut { subject: &'static str },
    #[error("request on {subject} failed: {source}")]
    Request {
        subject: &'static str,
        #[source]
        source: RequestError,
    },
    #[error("the reply on {subject} is not a job worker reply: {source}")]
    BadReply {
        subject: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("unexpected reply on {subject}: {reply}")]
    UnexpectedReply {
        subject: &'static str,
        reply: String,
    },
    #[error("the job worker refused the request on {subject}: {message}")]
    Refused {
        subject: &'static str,
        message: String,
    },
    #[error("there is no job {0}")]
    NotFound(String),
    #[error("job {id} already finished as {}; nothing changed", .state.as_str())]
    AlreadyFinished { id: String, state: JobState },
    #[error("job {id} is {}; only dead jobs can be retried", .state.as_str())]
    NotDead { id: String, state: JobState },
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot encode: {0}")]
    Encode(#[from] serde_json::Error),
}

pub async fn run(
    session: &Session,
    command: JobsCommand,
    out: &mut impl Write,
) -> Result<(), JobsError> {
    let client = &session.nats.client;
    match command {
        JobsCommand::List {
            queue,
            state,
            limit,
            json,
        } => {
            let request = ListRequest {
                queue,
                state,
                limit: Some(usize::try_from(limit).unwrap_or(usize::MAX)),
            };
            match ask(client, JOBS_CONTROL_LIST, &request).await? {
                ControlReply::Jobs { jobs } => list(&jobs, json, out),
                other => Err(unexpected(JOBS_CONTROL_LIST, &other)),
            }
        }
        JobsCommand::Show { id, json } => {
            match ask(client, JOBS_CONTROL_SHOW, &JobRef { job_id: id }).await? {
                ControlReply::Job { job } => show(&job, json, out),
                ControlReply::NotFound { job_id } => Err(JobsError::NotFound(job_id)),
                other => Err(unexpected(JOBS_CONTROL_SHOW, &other)),
            }
        }
        JobsCommand::Cancel { id } => {
            match ask(client, JOBS_CONTROL_CANCEL, &JobRef { job_id: id }).await? {
                ControlReply::Cancel { job_id, outcome } => match outcome {
                    CancelOutcome::Cancelled => Ok(writeln!(out, "{job_id} cancelled")?),
                    CancelOutcome::Cancelling => Ok(writeln!(out, "{job_id} cancelling")?),
                    CancelOutcome::AlreadyFinished(state) => {
                        Err(JobsError::AlreadyFinished { id: job_id, state })
                    }
                    CancelOutcome::NotFound => Err(JobsError::NotFound(job_id)),
                },
                ControlReply::NotFound { job_id } => Err(JobsError::NotFound(job_id)),
                other => Err(unexpected(JOBS_CONTROL_CANCEL, &other)),
            }
        }
        JobsCommand::Retry { id } => {
            match ask(client, JOBS_CONTROL_RETRY, &JobRef { job_id: id }).await? {
                ControlReply::Retry { job_id, outcome } => match outcome {
                    RetryOutcome::Requeued => Ok(writeln!(out, "{job_id} requeued")?),
                    RetryOutcome::NotDead(state) => Err(JobsError::NotDead { id: job_id, state }),
                    RetryOutcome::NotFound => Err(JobsError::NotFound(job_id)),
                },
                ControlReply::NotFound { job_id } => Err(JobsError::NotFound(job_id)),
                other => Err(unexpected(JOBS_CONTROL_RETRY, &other)),
            }
        }
    }
}

/// One request, one decoded reply; the worker's own `Error` reply becomes `Refused`.
async fn ask(
    client: &async_nats::Client,
    subject: &'static str,
    request: &impl Serialize,
) -> Result<ControlReply, JobsError> {
    let body = serde_json::to_vec(request)?;
    let message = client
        .request(subject, body.into())
        .await
        .map_err(|source| match source.kind() {
            RequestErrorKind::NoResponders => JobsError::NoResponders { subject },
            RequestErrorKind::TimedOut => JobsError::TimedOut { subject },
            _ => JobsError::Request { subject, source },
        })?;
    let reply = serde_json::from_slice(&message.payload)
        .map_err(|source| JobsError::BadReply { subject, source })?;
    match reply {
        ControlReply::Error { message } => Err(JobsError::Refused { subject, message }),
        reply => Ok(reply),
    }
}

fn unexpected(subject: &'static str, reply: &ControlReply) -> JobsError {
    JobsError::UnexpectedReply {
        subject,
        reply: serde_json::to_string(reply).unwrap_or_else(|_| format!("{reply:?}")),
    }
}

fn time(at: Option<DateTime<Utc>>) -> String {
    at.map_or_else(
        || "-".to_owned(),
        |at| at.to_rfc3339_opts(SecondsFormat::Millis, true),
    )
}

fn list(jobs: &[JobView], json: bool, out: &mut impl Write) -> Result<(), JobsError> {
    if json {
        for job in jobs {
            writeln!(out, "{}", serde_json::to_string(job)?)?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<36}  {:<16}  {:<16}  {:<9}  {:>7}  {:<24}  LAST ERROR",
        "ID", "QUEUE", "TYPE", "STATE", "ATTEMPT", "UPDATED"
    )?;
    for job in jobs {
        writeln!(
            out,
            "{:<36}  {:<16}  {:<16}  {:<9}  {:>7}  {:<24}  {}",
            job.id,
            job.queue,
            job.job_type,
            job.state.as_str(),
            job.attempt,
            time(job.updated_at),
            job.last_error.as_deref().unwrap_or(""),
        )?;
    }
    if jobs.is_empty() {
        writeln!(out, "(no jobs)")?;
    }
    Ok(())
}

fn show(job: &JobView, json: bool, out: &mut impl Write) -> Result<(), JobsError> {
    if json {
        writeln!(out, "{}", serde_json::to_string(job)?)?;
        return Ok(());
    }
    let json_or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".to_owned());
    let lines = [
        ("id", job.id.clone()),
        ("queue", job.queue.clone()),
        ("type", job.job_type.clone()),
        ("state", job.state.as_str().to_owned()),
        ("attempt", job.attempt.to_string()),
        (
            "retried after attempt",
            job.retried_after_attempt.to_string(),
        ),
        ("cancel requested", job.cancel_requested.to_string()),
        ("created", time(job.created_at)),
        ("started", time(job.started_at)),
        ("finished", time(job.finished_at)),
        ("updated", time(job.updated_at)),
        ("last error", json_or_dash(job.last_error.clone())),
        (
            "result",
            json_or_dash(job.result.as_ref().map(ToString::to_string)),
        ),
        (
            "payload",
            json_or_dash(job.request.as_ref().map(|r| r.payload.to_string())),
        ),
    ];
    for (key, value) in lines {
        writeln!(out, "{key}: {value}")?;
    }
    Ok(())
}
