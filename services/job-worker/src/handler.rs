//! What runs a job: the `JobHandler` trait and the registry that maps a job type to its handler.
//! Adding a job type is one file with one implementation and one `register` line. Handlers get a
//! cancellation token because cancellation is cooperative: the pool never aborts a handler
//! mid-write, it asks, and a handler that honours the token stops at a safe point.
//!
//! Errors are classified by the handler, which knows its protocol: transient errors are retried
//! with the job's backoff policy, permanent ones send the job to `dead` at once.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use herald_shared::JobRequest;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub mod http;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Worth another attempt (timeout, 5xx, connection refused, ...).
    #[error("{0}")]
    Transient(String),
    /// Will fail again the same way (bad payload, 4xx, ...): dead at once.
    #[error("{0}")]
    Permanent(String),
}

/// Runs jobs of one type. Must be idempotent: a job whose worker died after the handler finished
/// but before success was recorded runs again (see queue.rs).
pub trait JobHandler: Send + Sync + 'static {
    /// Runs `job` once; `Ok` carries the result kept in the job record.
    fn run<'a>(
        &'a self,
        job: &'a JobRequest,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<Value, HandlerError>>;
}

/// Job type → handler.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn JobHandler>>,
}

impl Registry {
    /// An empty registry; most callers want `with_builtins`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The handlers every job worker has: `http`.
    pub fn with_builtins() -> Self {
        Self::new().register(http::JOB_TYPE, http::HttpHandler::new())
    }

    pub fn register(mut self, job_type: &str, handler: impl JobHandler) -> Self {
        self.handlers.insert(job_type.to_owned(), Arc::new(handler));
        self
    }

    pub fn get(&self, job_type: &str) -> Option<Arc<dyn JobHandler>> {
        self.handlers.get(job_type).cloned()
    }
}
