//! The built-in `http` job: call a URL and succeed on 2xx. The payload names the call
//! (`url`, optional `method`, `body`, `headers`); the job's `timeout_ms` bounds it, so a long
//! export or report endpoint can take minutes. The job id goes along as `Idempotency-Key`: when a
//! worker dies after the call but before recording success, the job runs again, and the receiver
//! can recognise the repeat.
//!
//! 4xx answers are permanent except 408 (timeout) and 429 (rate limit); 5xx and network errors
//! are transient.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use herald_shared::JobRequest;
use herald_shared::headers::IDEMPOTENCY_KEY;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{HandlerError, JobHandler};

pub const JOB_TYPE: &str = "http";

/// The longest response body kept as the job's result.
const MAX_RESULT_BYTES: usize = 16 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Call {
    url: String,
    #[serde(default = "post")]
    method: String,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

fn post() -> String {
    "POST".into()
}

pub struct HttpHandler {
    client: reqwest::Client,
}

impl HttpHandler {
    pub fn new() -> Self {
        Self {
            client: reqwest::Client::new(),
        }
    }

    async fn call(&self, job: &JobRequest) -> Result<Value, HandlerError> {
        let call: Call = serde_json::from_value(job.payload.clone())
            .map_err(|e| HandlerError::Permanent(format!("bad http job payload: {e}")))?;
        let method = reqwest::Method::from_bytes(call.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| HandlerError::Permanent(format!("bad HTTP method `{}`", call.method)))?;
        let url = reqwest::Url::parse(&call.url)
            .map_err(|e| HandlerError::Permanent(format!("bad url `{}`: {e}", call.url)))?;
        let mut request = self
            .client
            .request(method, url)
            .timeout(Duration::from_millis(job.timeout_ms.max(1)))
            .header(IDEMPOTENCY_KEY, job.id.as_str());
        for (name, value) in &call.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some(body) = &call.body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| HandlerError::Transient(format!("request failed: {e}")))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| HandlerError::Transient(format!("reading the response failed: {e}")))?;
        let body = &bytes[..bytes.len().min(MAX_RESULT_BYTES)];
        let body = serde_json::from_slice::<Value>(body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
        if status.is_success() {
            return Ok(json!({ "status": status.as_u16(), "body": body }));
        }
        let error = format!("{} answered {status}", call.url);
        let retryable = status.is_server_error()
            || status == reqwest::StatusCode::REQUEST_TIMEOUT
            || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
        Err(if retryable {
            HandlerError::Transient(error)
        } else {
            HandlerError::Permanent(error)
        })
    }
}

impl Default for HttpHandler {
    fn default() -> Self {
        Self::new()
    }
}

impl JobHandler for HttpHandler {
    fn run<'a>(
        &'a self,
        job: &'a JobRequest,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<Value, HandlerError>> {
        async move {
            tokio::select! {
                result = self.call(job) => result,
                () = cancel.cancelled() => Err(HandlerError::Transient("cancelled".into())),
            }
        }
        .boxed()
    }
}
