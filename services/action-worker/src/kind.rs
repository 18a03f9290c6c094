//! The action-kind abstraction: each built-in kind (webhook, slack, email, job) is one small
//! implementation of `ActionKind` in its own file, with its own typed config deserialised from
//! the request's `config`; adding a kind is adding a file and a line in `Registry::builtin`.
//!
//! `execute` returns a boxed future rather than being an `async fn` because the registry holds
//! kinds as trait objects, and `async fn` in a trait is not object safe.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use herald_shared::ActionRequest;
use serde::de::DeserializeOwned;

use crate::error::ActionError;

/// What a successful attempt reports in its outcome.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Success {
    pub http_status: Option<u16>,
}

pub trait ActionKind: Send + Sync {
    /// The `<kind>` subject token this implementation serves.
    fn name(&self) -> &'static str;

    /// The destination whose circuit breaker guards this action (`host:port`), if it has one.
    /// A bad config is reported here already, before any lease is taken.
    fn destination(&self, request: &ActionRequest) -> Result<Option<String>, ActionError>;

    fn execute<'a>(
        &'a self,
        request: &'a ActionRequest,
    ) -> BoxFuture<'a, Result<Success, ActionError>>;
}

/// The kinds this worker runs, by name.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn ActionKind>>,
}

impl Registry {
    pub fn with(mut self, kind: impl ActionKind + 'static) -> Self {
        self.kinds.insert(kind.name(), Arc::new(kind));
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn ActionKind>> {
        self.kinds.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }
}

/// Reads a kind's typed config from the request, a bad one being a permanent failure.
pub fn config<T: DeserializeOwned>(request: &ActionRequest) -> Result<T, ActionError> {
    serde_json::from_value(request.config.clone())
        .map_err(|e| ActionError::bad_config(&request.kind, e))
}

/// The event as JSON: the context of every template and the default webhook body.
pub fn event_json(request: &ActionRequest) -> serde_json::Value {
    serde_json::to_value(&request.event).unwrap_or(serde_json::Value::Null)
}
