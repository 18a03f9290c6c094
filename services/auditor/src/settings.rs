//! The auditor's own settings, under `[service]` in the config file (`HERALD_SERVICE__<KEY>` in
//! the environment). Defaults live here, once.

use std::net::SocketAddr;
use std::time::Duration;

use herald_shared::RetryPolicy;
use herald_shared::config::{Problems, Validate};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditorSettings {
    /// The Elasticsearch or OpenSearch node, e.g. `http://127.0.0.1:9200`.
    pub cluster_url: String,
    /// Basic authentication for the cluster, when it asks for it.
    pub cluster_user: Option<String>,
    pub cluster_password: Option<String>,
    /// How long one request to the cluster (a bulk, a search) may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Index and template names start with this: `<prefix>-events-2026.12`.
    pub index_prefix: String,
    /// Indices whose month ended longer ago than this are deleted; 0 keeps them forever.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Names the durable consumers: `<consumer_prefix>-events`, `-outcomes`, `-jobs`, `-dlq`.
    pub consumer_prefix: String,
    /// A bulk request carries at most this many documents...
    pub bulk_max_docs: usize,
    /// ...and at most this many bytes of documents...
    pub bulk_max_bytes: usize,
    /// ...and waits at most this long for more after its first one.
    #[serde(with = "humantime_serde")]
    pub bulk_max_wait: Duration,
    /// First delay before re-sending documents the cluster could not take (429, 5xx, down).
    #[serde(with = "humantime_serde")]
    pub retry_initial_delay: Duration,
    /// The longest delay between two re-sends; also how soon indexing resumes after an outage.
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// How long JetStream waits for an ack before redelivering; a bulk being retried keeps its
    /// messages alive with progress acks.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Where the search API listens.
    pub api_listen: SocketAddr,
    /// The bearer token the search API requires (`Authorization: Bearer <token>`).
    pub api_token: String,
}

impl Default for AuditorSettings {
    fn default() -> Self {
        Self {
            cluster_url: "http://127.0.0.1:9200".into(),
            cluster_user: None,
            cluster_password: None,
            request_timeout: Duration::from_secs(30),
            index_prefix: "herald".into(),
            retention: Duration::ZERO,
            consumer_prefix: "auditor".into(),
            bulk_max_docs: 1_000,
            bulk_max_bytes: 5 * 1024 * 1024,
            bulk_max_wait: Duration::from_millis(200),
            retry_initial_delay: Duration::from_millis(200),
            retry_max_delay: Duration::from_secs(5),
            ack_wait: Duration::from_secs(60),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_token: String::new(),
        }
    }
}

/// Shorter tokens are too easy to guess for an API that shows every change ever made.
const MIN_TOKEN_LEN: usize = 16;

impl AuditorSettings {
    /// The backoff between re-sends: exponential with jitter up to `retry_max_delay`, never
    /// giving up (a document that can be stored later is never dropped).
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: u32::MAX,
            initial_delay_ms: millis(self.retry_initial_delay).max(1),
            max_delay_ms: millis(self.retry_max_delay).max(1),
            multiplier: 2.0,
            jitter: true,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Validate for AuditorSettings {
    fn validate(&self, problems: &mut Problems) {
        match url::Url::parse(&self.cluster_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => problems.push("cluster_url", "must be an http:// or https:// URL"),
        }
        if self.cluster_user.is_some() != self.cluster_password.is_some() {
            problems.push(
                "cluster_password",
                "cluster_user and cluster_password go together",
            );
        }
        if self.request_timeout < Duration::from_millis(100) {
            problems.push("request_timeout", "must be at least 100ms");
        }
        let lowercase_token = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        };
        if !lowercase_token(&self.index_prefix) {
            problems.push(
                "index_prefix",
                "must be lowercase letters, digits, `-` or `_` (index names are)",
            );
        }
        if let Err(e) = herald_shared::subjects::token("a consumer prefix", &self.consumer_prefix) {
            problems.push("consumer_prefix", e.to_string());
        }
        if !(1..=10_000).contains(&self.bulk_max_docs) {
            problems.push("bulk_max_docs", "must be between 1 and 10000");
        }
        if self.bulk_max_bytes < 1024 {
            problems.push("bulk_max_bytes", "must be at least 1024");
        }
        if self.bulk_max_wait.is_zero() {
            problems.push("bulk_max_wait", "must be positive");
        }
        if self.retry_initial_delay.is_zero() {
            problems.push("retry_initial_delay", "must be positive");
        }
        if self.retry_max_delay < self.retry_initial_delay {
            problems.push("retry_max_delay", "must not be below retry_initial_delay");
        }
        if self.ack_wait < Duration::from_secs(1) {
            problems.push("ack_wait", "must be at least 1s");
        } else if self.ack_wait <= self.request_timeout {
            problems.push(
                "ack_wait",
                "must be longer than request_timeout, or a slow bulk is redelivered while it runs",
            );
        }
        if self.retry_max_delay >= self.ack_wait {
            problems.push(
                "retry_max_delay",
                "must be shorter than ack_wait, or held messages are redelivered between re-sends",
            );
        }
        if self.api_token.len() < MIN_TOKEN_LEN {
            problems.push(
                "api_token",
                format!("must be at least {MIN_TOKEN_LEN} characters"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_key_is_named() {
        let settings = AuditorSettings {
            cluster_url: "ftp://x".into(),
            cluster_user: Some("u".into()),
            index_prefix: "Herald".into(),
            bulk_max_docs: 0,
            api_token: "short".into(),
            ..AuditorSettings::default()
        };
        let mut problems = Problems::default();
        settings.validate(&mut problems);
        let text = problems.into_result().expect_err("invalid").to_string();
        for key in [
            "cluster_url",
            "cluster_password",
            "index_prefix",
            "bulk_max_docs",
            "api_token",
        ] {
            assert!(text.contains(key), "{key} missing from {text}");
        }
    }

    #[test]
    fn the_defaults_with_a_token_are_valid() {
        let settings = AuditorSettings {
            api_token: "a-long-enough-token".into(),
            ..AuditorSettings::default()
        };
        let mut problems = Problems::default();
        settings.validate(&mut problems);
        assert!(problems.into_result().is_ok());
    }
}
