//! Job management over core NATS request/reply, for the CLI: list jobs by queue and state, show
//! one, cancel one, retry a dead one. Subjects are `herald.control.jobs.<verb>` (list, show,
//! cancel, retry); instances answer in one queue group, so each request gets one reply. Requests
//! and replies are JSON: the types below are the contract (`ControlReply` is tagged by `reply`).
//!
//! Cancel is cooperative for a running job: the job is flagged, and the worker that runs it fires
//! the handler's cancellation token at its next heartbeat (within a third of the lease); the job
//! ends `cancelled` when the handler returns. A pending or delayed job is cancelled at once.
//!
//! Retry puts a dead job back to pending. Its attempt count is kept (status Msg-Ids
//! `<id>:<state>:<attempt>` stay unique, so JetStream does not drop the new events as
//! duplicates) and it gets a fresh retry budget: the policy counts attempts from the retry.

use chrono::{DateTime, TimeZone, Utc};
use futures::StreamExt;
use herald_shared::subjects::{
    JOBS_CONTROL_ALL, JOBS_CONTROL_CANCEL, JOBS_CONTROL_LIST, JOBS_CONTROL_RETRY, JOBS_CONTROL_SHOW,
};
use herald_shared::{JobRequest, JobState, messages};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use tokio_util::sync::CancellationToken;

use crate::queue::{CancelOutcome, Queue, QueueError, RetryOutcome};

/// Every instance answers in this group, so one request gets one reply.
const QUEUE_GROUP: &str = "herald-job-worker";
const DEFAULT_LIMIT: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot subscribe to job management requests: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
}

/// `herald.control.jobs.list`. No queue: every queue; no state: every state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ListRequest {
    pub queue: Option<String>,
    pub state: Option<JobState>,
    /// Per queue and state; 100 when absent.
    pub limit: Option<usize>,
}

/// `herald.control.jobs.{show,cancel,retry}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRef {
    pub job_id: String,
}

/// One job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub id: String,
    pub queue: String,
    pub job_type: String,
    pub state: JobState,
    /// Runs so far, over the job's whole life.
    pub attempt: u32,
    /// Attempts made before its last retry from dead (0 if never retried).
    pub retried_after_attempt: u32,
    pub last_error: Option<String>,
    pub result: Option<Value>,
    pub created_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    pub cancel_requested: bool,
    pub request: Option<JobRequest>,
}

impl JobView {
    fn from_fields(fields: &HashMap<String, String>) -> Result<Self, String> {
        let text = |name: &str| fields.get(name).cloned();
        let required = |name: &str| text(name).ok_or_else(|| format!("job has no `{name}`"));
        let number = |name: &str| text(name).and_then(|t| t.parse::<u32>().ok()).unwrap_or(0);
        let time = |name: &str| {
            text(name)
                .and_then(|t| t.parse::<i64>().ok())
                .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        };
        Ok(Self {
            id: required("id")?,
            queue: required("queue")?,
            job_type: required("job_type")?,
            state: required("state")?.parse()?,
            attempt: number("attempt"),
            retried_after_attempt: number("base"),
            last_error: text("last_error"),
            result: text("result").and_then(|r| serde_json::from_str(&r).ok()),
            created_at: time("created_at"),
            started_at: time("started_at"),
            finished_at: time("finished_at"),
            updated_at: time("updated_at"),
            cancel_requested: fields.contains_key("cancel"),
            request: text("request").and_then(|r| messages::decode(r.as_bytes()).ok()),
        })
    }
}

/// Every answer, tagged by `reply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum ControlReply {
    Jobs {
        jobs: Vec<JobView>,
    },
    Job {
        job: Box<JobView>,
    },
    Cancel {
        job_id: String,
        outcome: CancelOutcome,
    },
    Retry {
        job_id: String,
        outcome: RetryOutcome,
    },
    NotFound {
        job_id: String,
    },
    Error {
        message: String,
    },
}

/// Answers requests until `stop`.
pub async fn run(
    client: async_nats::Client,
    queue: Queue,
    stop: CancellationToken,
) -> Result<(), ControlError> {
    let mut requests = client
        .queue_subscribe(JOBS_CONTROL_ALL, QUEUE_GROUP.to_owned())
        .await?;
    loop {
        let request = tokio::select! {
            request = requests.next() => request,
            () = stop.cancelled() => return Ok(()),
        };
        let Some(request) = request else {
            return Ok(());
        };
        let Some(reply_to) = request.reply.clone() else {
            continue;
        };
        let reply = answer(&queue, request.subject.as_str(), &request.payload).await;
        let body = match serde_json::to_vec(&reply) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a control reply");
                continue;
            }
        };
        if let Err(e) = client.publish(reply_to, body.into()).await {
            tracing::warn!(error = %e, "cannot send a control reply");
        }
    }
}

async fn answer(queue: &Queue, subject: &str, body: &[u8]) -> ControlReply {
    let result = match subject {
        JOBS_CONTROL_LIST => match serde_json::from_slice::<ListRequest>(body) {
            Ok(request) => list(queue, request).await,
            Err(e) => return bad_request(e),
        },
        JOBS_CONTROL_SHOW | JOBS_CONTROL_CANCEL | JOBS_CONTROL_RETRY => {
            let JobRef { job_id } = match serde_json::from_slice(body) {
                Ok(request) => request,
                Err(e) => return bad_request(e),
            };
            match subject {
                JOBS_CONTROL_SHOW => show(queue, job_id).await,
                JOBS_CONTROL_CANCEL => queue
                    .cancel(&job_id)
                    .await
                    .map(|outcome| ControlReply::Cancel { job_id, outcome }),
                _ => queue
                    .retry(&job_id)
                    .await
                    .map(|outcome| ControlReply::Retry { job_id, outcome }),
            }
        }
        other => {
            return ControlReply::Error {
                message: format!("unknown request subject {other}"),
            };
        }
    };
    result.unwrap_or_else(|e| ControlReply::Error {
        message: e.to_string(),
    })
}

fn bad_request(e: serde_json::Error) -> ControlReply {
    ControlReply::Error {
        message: format!("bad request: {e}"),
    }
}

async fn show(queue: &Queue, job_id: String) -> Result<ControlReply, QueueError> {
    Ok(match queue.job(&job_id).await? {
        None => ControlReply::NotFound { job_id },
        Some(fields) => match JobView::from_fields(&fields) {
            Ok(job) => ControlReply::Job { job: Box::new(job) },
            Err(message) => ControlReply::Error { message },
        },
    })
}

async fn list(queue: &Queue, request: ListRequest) -> Result<ControlReply, QueueError> {
    let queues = match request.queue {
        Some(name) => vec![name],
        None => queue.queues().await?,
    };
    let states: Vec<JobState> = match request.state {
        Some(state) => vec![state],
        None => JobState::ALL.to_vec(),
    };
    let limit = request.limit.unwrap_or(DEFAULT_LIMIT);
    let mut jobs = Vec::new();
    for name in &queues {
        for state in &states {
            for fields in queue.list(name, *state, limit).await? {
                match JobView::from_fields(&fields) {
                    Ok(job) => jobs.push(job),
                    Err(e) => tracing::warn!(error = %e, "skipping an unreadable job record"),
                }
            }
        }
    }
    Ok(ControlReply::Jobs { jobs })
}
