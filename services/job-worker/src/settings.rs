//! The job worker's own settings, under `[service]` (`HERALD_SERVICE__<KEY>` in the environment).
//! Defaults live here, once; `validate` names every bad key.

use std::collections::BTreeMap;
use std::time::Duration;

use herald_shared::config::{Problems, Validate};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub redis_url: String,
    /// Every Redis key this service writes starts with `<key_prefix>:`.
    pub key_prefix: String,
    /// The durable JetStream consumer on `herald.jobs.submit.>`, shared by every instance.
    pub consumer: String,
    /// Jobs run at once per queue by this instance, unless `queue_concurrency` names the queue.
    pub concurrency: usize,
    pub queue_concurrency: BTreeMap<String, usize>,
    /// How long a claimed job stays ours without a heartbeat; a dead worker's jobs come back
    /// after at most this long. Heartbeats go every third of it.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often expired leases are reaped, due retries promoted and queue depth measured.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// How often an idle queue looks for work that another instance stored.
    #[serde(with = "humantime_serde")]
    pub poll: Duration,
    /// How long a finished (succeeded, dead, cancelled) job stays readable.
    #[serde(with = "humantime_serde")]
    pub terminal_ttl: Duration,
    /// At shutdown, how long running jobs may finish before they are released to the queue.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            redis_url: "redis://127.0.0.1:6379".into(),
            key_prefix: "herald".into(),
            consumer: "job-worker".into(),
            concurrency: 8,
            queue_concurrency: BTreeMap::new(),
            lease: Duration::from_secs(30),
            tick: Duration::from_millis(250),
            poll: Duration::from_millis(500),
            terminal_ttl: Duration::from_secs(7 * 24 * 3600),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

impl Settings {
    pub fn concurrency_of(&self, queue: &str) -> usize {
        self.queue_concurrency
            .get(queue)
            .copied()
            .unwrap_or(self.concurrency)
    }

    pub fn heartbeat(&self) -> Duration {
        self.lease / 3
    }
}

impl Validate for Settings {
    fn validate(&self, problems: &mut Problems) {
        if !(self.redis_url.starts_with("redis://") || self.redis_url.starts_with("rediss://")) {
            problems.push("redis_url", "must be redis://host:port");
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            problems.push("key_prefix", "must be non-empty without white space");
        }
        if herald_shared::subjects::token("a consumer name", &self.consumer).is_err() {
            problems.push(
                "consumer",
                "must be one subject token (no `.`, wildcard or space)",
            );
        }
        if self.concurrency == 0 {
            problems.push("concurrency", "must be at least 1");
        }
        for (queue, limit) in &self.queue_concurrency {
            if *limit == 0 {
                problems.push(&format!("queue_concurrency.{queue}"), "must be at least 1");
            }
        }
        if self.lease < Duration::from_millis(300) {
            problems.push(
                "lease",
                "must be at least 300ms (heartbeats go every third of it)",
            );
        }
        for (key, value) in [
            ("tick", self.tick),
            ("poll", self.poll),
            ("terminal_ttl", self.terminal_ttl),
        ] {
            if value.is_zero() {
                problems.push(key, "must be positive");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_setting_is_named() {
        let settings = Settings {
            redis_url: "http://x".into(),
            consumer: "a.b".into(),
            concurrency: 0,
            queue_concurrency: BTreeMap::from([("slow".to_owned(), 0)]),
            lease: Duration::from_millis(10),
            tick: Duration::ZERO,
            ..Settings::default()
        };
        let mut problems = Problems::default();
        settings.validate(&mut problems);
        let text = problems.into_result().expect_err("invalid").to_string();
        for key in [
            "redis_url",
            "consumer",
            "concurrency",
            "queue_concurrency.slow",
            "lease",
            "tick",
        ] {
            assert!(text.contains(key), "{key} missing from {text}");
        }
    }
}
