//! How an action attempt fails, and what that means for the message: a transient failure is
//! retried after a delay (NAK), a permanent one goes to the DLQ at once. The class is a variant,
//! not a string, so the worker can match on it; the rest (status, snippet, `Retry-After`) is what
//! the DLQ and the outcome record.

use std::time::Duration;

/// What is known about one failed attempt.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Failure {
    pub reason: String,
    pub http_status: Option<u16>,
    /// The start of the receiver's answer, for the DLQ and the audit trail.
    pub snippet: Option<String>,
    /// The receiver's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
}

impl Failure {
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            ..Self::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ActionError {
    /// Worth trying again later: 408, 429, 5xx, timeouts, refused connections, a NATS hiccup.
    #[error("transient failure: {}", .0.reason)]
    Transient(Failure),
    /// Trying again cannot help: other 4xx, a bad action config, a refused destination.
    #[error("permanent failure: {}", .0.reason)]
    Permanent(Failure),
}

impl ActionError {
    pub fn transient(reason: impl Into<String>) -> Self {
        Self::Transient(Failure::new(reason))
    }

    pub fn permanent(reason: impl Into<String>) -> Self {
        Self::Permanent(Failure::new(reason))
    }

    /// A bad `config` of an action: the observer file is wrong, no retry will fix it.
    pub fn bad_config(kind: &str, error: impl std::fmt::Display) -> Self {
        Self::permanent(format!("invalid {kind} action config: {error}"))
    }

    pub fn failure(&self) -> &Failure {
        match self {
            Self::Transient(f) | Self::Permanent(f) => f,
        }
    }

    /// The `class` label of `herald_actions_failed_total`.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Transient(_) => "transient",
            Self::Permanent(_) => "permanent",
        }
    }
}

/// Whether an HTTP status is worth retrying. Only meaningful for non-2xx statuses.
pub fn is_transient_status(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_rate_limits_and_server_errors_are_transient_other_4xx_are_not() {
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(is_transient_status(status), "{status}");
        }
        for status in [400, 401, 403, 404, 410, 422] {
            assert!(!is_transient_status(status), "{status}");
        }
    }
}
