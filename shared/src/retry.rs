//! Retry policies: exponential backoff with jitter, built on `backon` (the `backoff` crate is
//! unmaintained, RUSTSEC-2025-0012). A policy travels inside ActionRequest and JobRequest, so the
//! worker that retries uses exactly what the observer declared.
//!
//! JetStream redelivers a NAKed message after the delay given with the NAK, ignoring the
//! consumer's BackOff list, so workers ask `delay_after(attempt)` and NAK with that delay.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. 1 means never retry.
    pub max_attempts: u32,
    pub initial_delay_ms: u64,
    pub max_delay_ms: u64,
    pub multiplier: f32,
    /// Adds up to one more delay at random (never past `max_delay_ms`), so retries from many
    /// failures do not arrive together.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay_ms: 1_000,
            max_delay_ms: 300_000,
            multiplier: 2.0,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// Every problem with the policy, each named by its key below `prefix`.
    pub fn problems(&self, prefix: &str) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.max_attempts == 0 {
            problems.push((
                format!("{prefix}.max_attempts"),
                "must be at least 1".into(),
            ));
        }
        if self.initial_delay_ms == 0 {
            problems.push((
                format!("{prefix}.initial_delay_ms"),
                "must be positive".into(),
            ));
        }
        if self.max_delay_ms < self.initial_delay_ms {
            problems.push((
                format!("{prefix}.max_delay_ms"),
                "must not be below initial_delay_ms".into(),
            ));
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            problems.push((
                format!("{prefix}.multiplier"),
                "must be a number >= 1".into(),
            ));
        }
        problems
    }

    fn builder(&self) -> ExponentialBuilder {
        let builder = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.initial_delay_ms))
            .with_max_delay(Duration::from_millis(self.max_delay_ms))
            .with_factor(self.multiplier)
            .with_max_times(self.max_attempts.saturating_sub(1) as usize);
        if self.jitter {
            builder.with_jitter()
        } else {
            builder
        }
    }

    /// The delay before the attempt that follows attempt number `attempt` (1-based), or `None`
    /// when `attempt` was the last one allowed.
    pub fn delay_after(&self, attempt: u32) -> Option<Duration> {
        if attempt == 0 {
            return Some(Duration::ZERO);
        }
        // backon adds jitter after capping, so cap again: max_delay_ms is a real ceiling. Whole
        // milliseconds, because backon multiplies by an f32.
        let max = Duration::from_millis(self.max_delay_ms);
        self.builder()
            .build()
            .nth(attempt as usize - 1)
            .map(|d| Duration::from_millis(d.as_millis() as u64).min(max))
    }

    /// The same policy as a `backon` builder, for in-process retry loops.
    pub fn backoff(&self) -> ExponentialBuilder {
        self.builder()
    }
}

/// Runs `op` until it succeeds, waiting longer after each failure (100 ms, doubling up to 5 s),
/// for steps a service cannot go on without but that fail only while the cluster is in flux (a
/// bucket being created by two processes at once, a stream electing a leader): ending the
/// process over them would leave its work undone until something restarts it. `None` when
/// `shutdown` comes first.
pub async fn until_ok<T, E, F, Fut>(what: &str, shutdown: &CancellationToken, op: F) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times();
    let retried = op
        .retry(backoff)
        .notify(|e, delay| tracing::warn!(error = %e, ?delay, "{what} unavailable; trying again"));
    tokio::select! {
        _ = shutdown.cancelled() => None,
        done = retried => done.ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: bool) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_delay_ms: 100,
            max_delay_ms: 500,
            multiplier: 2.0,
            jitter,
        }
    }

    #[test]
    fn delays_grow_exponentially_up_to_the_cap_then_stop() {
        let p = policy(false);
        let delays: Vec<_> = (1..=5).map(|a| p.delay_after(a)).collect();
        assert_eq!(
            delays,
            vec![
                Some(Duration::from_millis(100)),
                Some(Duration::from_millis(200)),
                Some(Duration::from_millis(400)),
                Some(Duration::from_millis(500)),
                None,
            ]
        );
    }

    #[test]
    fn jitter_stays_within_one_extra_delay() {
        let p = policy(true);
        for _ in 0..50 {
            let d = p.delay_after(2).expect("attempt 2 of 5 retries");
            assert!(
                d >= Duration::from_millis(200) && d <= Duration::from_millis(400),
                "{d:?}"
            );
        }
    }

    #[test]
    fn jitter_never_pushes_a_delay_past_the_ceiling() {
        let p = policy(true);
        for _ in 0..50 {
            assert!(p.delay_after(4).expect("attempt 4 of 5") <= Duration::from_millis(500));
        }
    }

    #[test]
    fn one_attempt_means_no_retry() {
        let p = RetryPolicy {
            max_attempts: 1,
            ..policy(false)
        };
        assert_eq!(p.delay_after(1), None);
    }

    #[test]
    fn bad_policies_name_every_bad_key() {
        let p = RetryPolicy {
            max_attempts: 0,
            initial_delay_ms: 10,
            max_delay_ms: 5,
            multiplier: 0.5,
            jitter: false,
        };
        let keys: Vec<_> = p.problems("retry").into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "retry.max_attempts",
                "retry.max_delay_ms",
                "retry.multiplier"
            ]
        );
    }
}
