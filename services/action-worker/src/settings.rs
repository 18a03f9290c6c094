//! The worker's own settings (`[service]` in TOML, `HERALD_SERVICE__<KEY>` in the environment),
//! with every default in one place and validation that names every bad key.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use herald_shared::config::{Files, Problems, Validate};
use serde::{Deserialize, Serialize};

use crate::breaker::BreakerSettings;
use crate::ca::ExtraRoots;
use crate::dedup::DedupSettings;
use crate::email::SmtpSettings;
use crate::ssrf::SsrfGuard;
use crate::webhook;

/// The kinds this build implements.
pub const BUILTIN_KINDS: [&str; 4] = herald_shared::messages::BUILTIN_ACTION_KINDS;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub redis_url: String,
    /// The durable consumer on HERALD_ACTIONS; replicas with the same name and `kinds` share
    /// the work. A replica running other kinds than the built-in set uses
    /// `<consumer>_<kind>_<kind>...` (sorted), so replicas with different kinds never rewrite
    /// each other's filter.
    pub consumer: String,
    /// This replica's name in lease tokens and logs; default `action-worker-<pid>-<random>`.
    pub worker_name: Option<String>,
    /// Which kinds this replica runs (each becomes a filter subject `herald.actions.<kind>.>`).
    pub kinds: Vec<String>,
    /// Actions in flight at once in this replica.
    pub concurrency: usize,
    /// Actions running against one destination (`host:port`) at once, at most, so a slow or
    /// hanging receiver cannot take every slot; as many more as the destination clears in half
    /// a second at its recent pace (at least four times this) wait for a place without a slot
    /// (at most 16 × `concurrency` waiting in all), the rest are put back.
    pub per_destination_concurrency: usize,
    /// JetStream's redelivery timer; renewed while an action runs or waits for Redis.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Actions delivered and not yet acked, at most, on the consumer. Actions waiting for a
    /// retry count against it, so it bounds how many a failing receiver can hold back; the
    /// server's default (1000) is far too small for that.
    pub max_ack_pending: i64,
    /// The longest a receiver's `Retry-After` may postpone a retry; a longer one is cut to this.
    #[serde(with = "humantime_serde")]
    pub retry_after_ceiling: Duration,
    /// How long an action of an ordered observer waits for the previous action of its line
    /// (observer, action, entity key) to be settled, counted from the first wait since the line
    /// last moved:
    /// past it, the action runs out of line, with a warning (a predecessor retrying for that
    /// long, or a line mark lost with Redis, must not stop the line for ever).
    #[serde(with = "humantime_serde")]
    pub order_patience: Duration,
    /// How often a worker that lost Redis tries again.
    #[serde(with = "humantime_serde")]
    pub redis_retry: Duration,
    pub dedup: DedupSettings,
    pub breaker: BreakerSettings,
    /// Internal destinations that are allowed anyway: CIDRs, addresses or host names.
    pub ssrf_allow: Vec<String>,
    /// Observer name → `whsec_` secret for signing its webhooks.
    pub webhook_secrets: HashMap<String, String>,
    pub smtp: SmtpSettings,
    /// A PEM bundle of CA certificates trusted besides the public roots, for webhooks and Slack
    /// over HTTPS and for SMTP over TLS or STARTTLS (receivers behind a private CA).
    pub ca_file: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            redis_url: "redis://127.0.0.1:6379".into(),
            consumer: "action-worker".into(),
            worker_name: None,
            kinds: BUILTIN_KINDS.iter().map(|k| (*k).to_owned()).collect(),
            concurrency: 32,
            per_destination_concurrency: 8,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 100_000,
            retry_after_ceiling: Duration::from_secs(3600),
            order_patience: Duration::from_secs(600),
            redis_retry: Duration::from_millis(500),
            dedup: DedupSettings::default(),
            breaker: BreakerSettings::default(),
            ssrf_allow: Vec::new(),
            webhook_secrets: HashMap::new(),
            smtp: SmtpSettings::default(),
            ca_file: None,
        }
    }
}

impl Settings {
    /// The durable consumer's name for this replica's kinds (see `consumer`).
    pub fn consumer_name(&self) -> String {
        let mut kinds: Vec<&str> = self.kinds.iter().map(String::as_str).collect();
        kinds.sort_unstable();
        kinds.dedup();
        let mut builtin = BUILTIN_KINDS.to_vec();
        builtin.sort_unstable();
        if kinds == builtin {
            self.consumer.clone()
        } else {
            format!("{}_{}", self.consumer, kinds.join("_"))
        }
    }

    pub fn worker_name(&self) -> String {
        self.worker_name.clone().unwrap_or_else(|| {
            let nonce = uuid::Uuid::now_v7().simple().to_string();
            format!(
                "action-worker-{}-{}",
                std::process::id(),
                &nonce[nonce.len() - 6..]
            )
        })
    }
}

impl Validate for Settings {
    fn validate(&self, problems: &mut Problems) {
        if !(self.redis_url.starts_with("redis://") || self.redis_url.starts_with("rediss://")) {
            problems.push(
                "redis_url",
                "must be redis://host:port or rediss://host:port",
            );
        }
        if let Err(e) = herald_shared::subjects::token("a consumer name", &self.consumer) {
            problems.push("consumer", e.to_string());
        }
        if self.kinds.is_empty() {
            problems.push("kinds", "must name at least one kind");
        }
        for kind in &self.kinds {
            if !BUILTIN_KINDS.contains(&kind.as_str()) {
                problems.push(
                    "kinds",
                    format!("unknown kind `{kind}` (built in: {BUILTIN_KINDS:?})"),
                );
            }
        }
        if self.concurrency == 0 {
            problems.push("concurrency", "must be at least 1");
        }
        if self.ack_wait < Duration::from_millis(300) {
            problems.push("ack_wait", "must be at least 300ms");
        }
        if !(1..=self.concurrency.max(1)).contains(&self.per_destination_concurrency) {
            problems.push(
                "per_destination_concurrency",
                "must be between 1 and concurrency",
            );
        }
        if self.max_ack_pending < i64::try_from(self.concurrency).unwrap_or(i64::MAX) {
            problems.push("max_ack_pending", "must be at least concurrency");
        }
        if self.retry_after_ceiling.is_zero() {
            problems.push("retry_after_ceiling", "must be positive");
        }
        if self.order_patience.is_zero() {
            problems.push("order_patience", "must be positive");
        }
        if self.redis_retry.is_zero() || self.redis_retry >= self.ack_wait {
            problems.push("redis_retry", "must be positive and below ack_wait");
        }
        if self.dedup.lease < Duration::from_millis(300) {
            problems.push("dedup.lease", "must be at least 300ms");
        }
        if self.dedup.done_ttl <= self.dedup.lease {
            problems.push("dedup.done_ttl", "must be longer than dedup.lease");
        }
        if self.dedup.timeout.is_zero() {
            problems.push("dedup.timeout", "must be positive");
        }
        if self.breaker.failure_threshold == 0 {
            problems.push("breaker.failure_threshold", "must be at least 1");
        }
        if self.breaker.cool_down.is_zero() {
            problems.push("breaker.cool_down", "must be positive");
        }
        if let Err(e) = SsrfGuard::new(&self.ssrf_allow) {
            problems.push("ssrf_allow", e.to_string());
        }
        for (observer, secret) in &self.webhook_secrets {
            if let Err(e) = webhook::secret_key(secret) {
                problems.push(&format!("webhook_secrets.{observer}"), e.to_string());
            }
        }
        if self.smtp.username.is_some() != self.smtp.password.is_some() {
            problems.push("smtp.password", "username and password go together");
        }
        if self.smtp.from.parse::<lettre::message::Mailbox>().is_err() {
            problems.push("smtp.from", "must be an email address");
        }
    }

    fn check_files(&self, files: &mut Files) {
        if let Some(path) = &self.ca_file {
            files.loaded("ca_file", path, ExtraRoots::load(path));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        let mut problems = Problems::default();
        Settings::default().validate(&mut problems);
        assert!(problems.into_result().is_ok());
    }

    #[test]
    fn the_example_config_loads_and_matches_the_defaults() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("action-worker.example.toml");
        let config: herald_shared::service::ServiceConfig<Settings> =
            herald_shared::config::load_with_env(Some(&path), [("", ""); 0])
                .expect("example is valid");
        let defaults = Settings::default();
        assert_eq!(config.service.kinds, defaults.kinds);
        assert_eq!(config.service.dedup, defaults.dedup);
        assert_eq!(config.service.breaker, defaults.breaker);
        assert_eq!(config.service.smtp, defaults.smtp);
        assert_eq!(
            (config.service.concurrency, config.service.ack_wait),
            (defaults.concurrency, defaults.ack_wait)
        );
        assert_eq!(
            (
                config.service.max_ack_pending,
                config.service.retry_after_ceiling
            ),
            (defaults.max_ack_pending, defaults.retry_after_ceiling)
        );
    }

    #[test]
    fn replicas_with_different_kinds_get_different_consumers() {
        let all = Settings::default();
        assert_eq!(all.consumer_name(), "action-worker");
        let webhooks = Settings {
            kinds: vec!["webhook".into()],
            ..Settings::default()
        };
        let mail = Settings {
            kinds: vec!["slack".into(), "email".into()],
            ..Settings::default()
        };
        assert_eq!(webhooks.consumer_name(), "action-worker_webhook");
        assert_eq!(mail.consumer_name(), "action-worker_email_slack");
    }

    #[test]
    fn every_bad_key_is_named() {
        let settings = Settings {
            redis_url: "http://x".into(),
            kinds: vec!["fax".into()],
            concurrency: 0,
            ssrf_allow: vec!["not a host/1".into()],
            webhook_secrets: HashMap::from([("o".into(), "nope".into())]),
            ..Settings::default()
        };
        let mut problems = Problems::default();
        settings.validate(&mut problems);
        let text = problems.into_result().expect_err("invalid").to_string();
        for key in [
            "redis_url",
            "kinds",
            "concurrency",
            "ssrf_allow",
            "webhook_secrets.o",
        ] {
            assert!(text.contains(key), "{key} missing from {text}");
        }
    }
}
