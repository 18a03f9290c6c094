//! A circuit breaker per destination host, so a receiver that is down is not hammered by every
//! queued action and does not spend their attempts: after `failure_threshold` consecutive
//! transient failures the circuit opens; while open, actions for that host are put back (NAK with
//! the remaining cool-down) without running; after the cool-down one probe is let through
//! (half-open) and its result closes or re-opens the circuit.
//!
//! The breaker lives in each worker's memory: replicas learn about a dead host independently,
//! which costs at most `failure_threshold` failures per replica and needs no coordination.
//! Time is passed in, so the state machine is tested without sleeping.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Consecutive transient failures that open a circuit.
    pub failure_threshold: u32,
    /// How long an open circuit waits before letting a probe through.
    #[serde(with = "humantime_serde")]
    pub cool_down: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cool_down: Duration::from_secs(30),
        }
    }
}

/// Whether an action for a host may run now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Proceed,
    /// The circuit is open (or a probe is out): try again after this long.
    Wait(Duration),
}

/// What an attempt said about the host's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It answered (2xx, or a 4xx: a receiver that refuses is still up).
    Healthy,
    /// Timeout, refused connection, 408/429/5xx.
    Failing,
    /// The attempt never reached the host (bad config, SSRF refusal).
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Circuit {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_started: Instant },
}

impl Circuit {
    /// The `herald_action_breaker_state` value: 0 closed, 1 half-open, 2 open.
    fn gauge(self) -> f64 {
        match self {
            Circuit::Closed { .. } => 0.0,
            Circuit::HalfOpen { .. } => 1.0,
            Circuit::Open { .. } => 2.0,
        }
    }
}

#[derive(Debug)]
pub struct Breakers {
    settings: BreakerSettings,
    circuits: Mutex<HashMap<String, Circuit>>,
}

impl Breakers {
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            circuits: Mutex::new(HashMap::new()),
        }
    }

    pub fn admit(&self, host: &str, now: Instant) -> Admission {
        let cool_down = self.settings.cool_down;
        self.update(host, |circuit| match *circuit {
            Circuit::Closed { .. } => Admission::Proceed,
            Circuit::Open { until } if now < until => Admission::Wait(until - now),
            Circuit::Open { .. } => {
                *circuit = Circuit::HalfOpen { probe_started: now };
                Admission::Proceed
            }
            // A probe that never reported (its worker crashed) must not wedge the circuit.
            Circuit::HalfOpen { probe_started } if now >= probe_started + cool_down => {
                *circuit = Circuit::HalfOpen { probe_started: now };
                Admission::Proceed
            }
            Circuit::HalfOpen { probe_started } => Admission::Wait(probe_started + cool_down - now),
        })
    }

    pub fn record(&self, host: &str, verdict: Verdict, now: Instant) {
        let settings = &self.settings;
        self.update(host, |circuit| {
            *circuit = match (*circuit, verdict) {
                (_, Verdict::Healthy) => Circuit::Closed { failures: 0 },
                (Circuit::Closed { failures }, Verdict::Failing)
                    if failures + 1 < settings.failure_threshold =>
                {
                    Circuit::Closed {
                        failures: failures + 1,
                    }
                }
                (Circuit::Open { until }, Verdict::Failing) => Circuit::Open { until },
                (_, Verdict::Failing) => Circuit::Open {
                    until: now + settings.cool_down,
                },
                // The probe learned nothing; let the next action probe at once.
                (Circuit::HalfOpen { .. }, Verdict::Unknown) => Circuit::Open { until: now },
                (unchanged, Verdict::Unknown) => unchanged,
            };
        });
    }

    fn update<T>(&self, host: &str, change: impl FnOnce(&mut Circuit) -> T) -> T {
        let mut circuits = self
            .circuits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let circuit = circuits
            .entry(host.to_owned())
            .or_insert(Circuit::Closed { failures: 0 });
        let before = *circuit;
        let result = change(circuit);
        if circuit.gauge() != before.gauge() {
            tracing::info!(host, from = ?before, to = ?*circuit, "circuit breaker changed state");
        }
        metrics::gauge!("herald_action_breaker_state", "host" => host.to_owned())
            .set(circuit.gauge());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breakers() -> Breakers {
        Breakers::new(BreakerSettings {
            failure_threshold: 2,
            cool_down: Duration::from_secs(10),
        })
    }

    #[test]
    fn opens_after_consecutive_failures_half_opens_after_the_cool_down_and_closes_on_success() {
        let b = breakers();
        let t0 = Instant::now();
        assert_eq!(b.admit("h", t0), Admission::Proceed);
        b.record("h", Verdict::Failing, t0);
        assert_eq!(
            b.admit("h", t0),
            Admission::Proceed,
            "one failure is not enough"
        );
        b.record("h", Verdict::Failing, t0);
        assert_eq!(
            b.admit("h", t0 + Duration::from_secs(4)),
            Admission::Wait(Duration::from_secs(6))
        );
        assert_eq!(
            b.admit("other", t0),
            Admission::Proceed,
            "circuits are per host"
        );

        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.admit("h", t1), Admission::Proceed, "the probe");
        assert!(
            matches!(b.admit("h", t1), Admission::Wait(_)),
            "only one probe"
        );
        b.record("h", Verdict::Healthy, t1);
        assert_eq!(b.admit("h", t1), Admission::Proceed);
    }

    #[test]
    fn a_failed_probe_reopens_for_another_cool_down() {
        let b = breakers();
        let t0 = Instant::now();
        b.record("h", Verdict::Failing, t0);
        b.record("h", Verdict::Failing, t0);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.admit("h", t1), Admission::Proceed);
        b.record("h", Verdict::Failing, t1);
        assert_eq!(
            b.admit("h", t1 + Duration::from_secs(1)),
            Admission::Wait(Duration::from_secs(9))
        );
    }

    #[test]
    fn a_success_between_failures_resets_the_count() {
        let b = breakers();
        let t0 = Instant::now();
        b.record("h", Verdict::Failing, t0);
        b.record("h", Verdict::Healthy, t0);
        b.record("h", Verdict::Failing, t0);
        assert_eq!(b.admit("h", t0), Admission::Proceed);
    }

    #[test]
    fn a_probe_that_never_reports_does_not_wedge_the_circuit() {
        let b = breakers();
        let t0 = Instant::now();
        b.record("h", Verdict::Failing, t0);
        b.record("h", Verdict::Failing, t0);
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.admit("h", t1), Admission::Proceed);
        assert_eq!(
            b.admit("h", t1 + Duration::from_secs(10)),
            Admission::Proceed
        );
    }
}
