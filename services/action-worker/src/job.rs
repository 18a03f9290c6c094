//! The `job` kind: hands long work to the job-worker pool by publishing a JobRequest to
//! `herald.jobs.submit.<queue>`. The job id is the action id and is also the Msg-Id, so a
//! repeated attempt (after a crash) is absorbed by JetStream's duplicate window; the attempt
//! succeeds once JetStream has stored the request.
//!
//! Config: `queue` and `job_type` (required), `payload` (default the triggering event),
//! `priority` (default 0), `retry` (default policy), `timeout_ms` (default the request's).

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use futures::future::BoxFuture;
use herald_shared::{ActionRequest, JobRequest, RetryPolicy, SCHEMA_VERSION, headers, subjects};
use serde::Deserialize;
use serde_json::Value;

use crate::error::ActionError;
use crate::kind::{self, ActionKind, Success};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub queue: String,
    pub job_type: String,
    pub payload: Option<Value>,
    #[serde(default)]
    pub priority: i32,
    pub retry: Option<RetryPolicy>,
    pub timeout_ms: Option<u64>,
}

pub struct Job {
    jetstream: jetstream::Context,
}

impl Job {
    pub fn new(jetstream: jetstream::Context) -> Self {
        Self { jetstream }
    }

    async fn run(&self, request: &ActionRequest) -> Result<Success, ActionError> {
        let config: JobConfig = kind::config(request)?;
        let subject =
            subjects::job_submit(&config.queue).map_err(|e| ActionError::bad_config("job", e))?;
        let retry = config.retry.unwrap_or_default();
        let problems = retry.problems("retry");
        if let Some((key, problem)) = problems.first() {
            return Err(ActionError::bad_config("job", format!("{key}: {problem}")));
        }
        let job = JobRequest {
            id: request.id.clone(),
            queue: config.queue,
            job_type: config.job_type,
            payload: config.payload.unwrap_or_else(|| kind::event_json(request)),
            priority: config.priority,
            retry,
            timeout_ms: config.timeout_ms.unwrap_or(request.timeout_ms),
            action_id: Some(request.id.clone()),
            submitted_at: chrono::Utc::now(),
            schema_version: SCHEMA_VERSION,
        };
        let body = serde_json::to_vec(&job)
            .map_err(|e| ActionError::permanent(format!("cannot serialise the job: {e}")))?;
        let mut headers = HeaderMap::new();
        headers.insert(headers::MSG_ID, job.id.as_str());
        herald_shared::telemetry::inject_context(&mut headers);
        let message = PublishMessage::build()
            .payload(body.into())
            .headers(headers);
        self.jetstream
            .send_publish(subject, message)
            .await
            .map_err(|e| ActionError::transient(format!("cannot publish the job: {e}")))?
            .await
            .map_err(|e| ActionError::transient(format!("JetStream did not store the job: {e}")))?;
        Ok(Success::default())
    }
}

impl ActionKind for Job {
    fn name(&self) -> &'static str {
        "job"
    }

    fn destination(&self, request: &ActionRequest) -> Result<Option<String>, ActionError> {
        kind::config::<JobConfig>(request)?;
        Ok(None)
    }

    fn execute<'a>(
        &'a self,
        request: &'a ActionRequest,
    ) -> BoxFuture<'a, Result<Success, ActionError>> {
        Box::pin(self.run(request))
    }
}
