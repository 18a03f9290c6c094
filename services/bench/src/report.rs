//! The figures of one run and how they are shown: a table for a person, the same as JSON for a
//! machine. A rate whose stage did not finish within the timeout says so (`complete: false`)
//! instead of passing off a partial count as the pipeline's speed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Report {
    pub mutations_requested: usize,
    pub concurrency: usize,
    /// Mutations per second of an open-loop run; `None` for the closed loop.
    pub rate: Option<f64>,
    pub failed_mutations: usize,
    pub mutations: Throughput,
    pub events: Throughput,
    pub actions: Throughput,
    pub webhooks: Throughput,
    /// Webhook requests received, repeats included.
    pub webhook_deliveries: u64,
    /// Commit (the answer arrived) → first webhook.
    pub latency_ms: Latency,
    /// Open loop: the mutation's due time → first webhook.
    pub scheduled_latency_ms: Option<Latency>,
    /// Per stage, from the messages' own timestamps; `None` when the streams could not be read.
    pub stage_lag: Option<crate::lag::StageLags>,
    /// VmHWM of each service process, KiB; `None` when /proc could not tell.
    pub peak_rss_kib: BTreeMap<String, Option<u64>>,
}

/// `count` items of a stage, the last of them `seconds` after the first mutation was sent.
#[derive(Debug, Serialize)]
pub struct Throughput {
    pub count: u64,
    pub expected: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub complete: bool,
}

impl Throughput {
    pub fn new(count: u64, expected: u64, elapsed: Duration) -> Self {
        let seconds = elapsed.as_secs_f64();
        let per_second = if seconds > 0.0 {
            count as f64 / seconds
        } else {
            0.0
        };
        Self {
            count,
            expected,
            seconds,
            per_second,
            complete: count >= expected,
        }
    }
}

/// Commit (the mutation's answer arrived) → the order's first webhook received.
#[derive(Debug, Serialize, PartialEq)]
pub struct Latency {
    pub samples: usize,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
}

impl Latency {
    pub fn from_samples(mut millis: Vec<f64>) -> Self {
        millis.sort_by(f64::total_cmp);
        Self {
            samples: millis.len(),
            p50: percentile(&millis, 50.0),
            p99: percentile(&millis, 99.0),
            p999: percentile(&millis, 99.9),
            max: millis.last().copied(),
        }
    }
}

/// Nearest-rank percentile of sorted samples: the smallest sample with at least `p`% of the
/// samples at or below it, so every figure shown is one that was measured.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    // The small epsilon keeps float error (99.9 / 100 * 1000 = 999.0000000000001) from moving
    // the rank one sample up.
    let rank = (p / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

impl Report {
    pub fn table(&self) -> String {
        let mut out = String::new();
        let rate = |t: &Throughput| {
            let note = if t.complete {
                String::new()
            } else {
                format!("  INCOMPLETE: {} of {}", t.count, t.expected)
            };
            format!(
                "{:>10.1}/s  ({} in {:.2}s){note}",
                t.per_second, t.count, t.seconds
            )
        };
        let ms = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.1} ms"));
        let load = match self.rate {
            Some(rate) => format!("open loop at {rate}/s"),
            None => format!("{} concurrent clients", self.concurrency),
        };
        let _ = writeln!(
            out,
            "herald-bench: {} mutations, {load}, {} failed",
            self.mutations_requested, self.failed_mutations
        );
        let _ = writeln!(out, "{:-<64}", "");
        let _ = writeln!(
            out,
            "{:<28}{}",
            "mutations (createOrder)",
            rate(&self.mutations)
        );
        let _ = writeln!(
            out,
            "{:<28}{}",
            "events (HERALD_EVENTS)",
            rate(&self.events)
        );
        let _ = writeln!(out, "{:<28}{}", "actions dispatched", rate(&self.actions));
        let _ = writeln!(out, "{:<28}{}", "webhooks delivered", rate(&self.webhooks));
        let _ = writeln!(
            out,
            "{:<28}{:>10}",
            "webhook deliveries (all)", self.webhook_deliveries
        );
        let mut latency = |name: &str, l: &Latency| {
            let _ = writeln!(
                out,
                "{name:<28}p50 {}  p99 {}  p99.9 {}  max {}  ({} samples)",
                ms(l.p50),
                ms(l.p99),
                ms(l.p999),
                ms(l.max),
                l.samples
            );
        };
        if let Some(l) = &self.scheduled_latency_ms {
            latency("due -> webhook", l);
        }
        latency("commit -> webhook", &self.latency_ms);
        if let Some(lags) = &self.stage_lag {
            latency("  commit -> event", &lags.commit_to_event_ms);
            latency("  event -> action", &lags.event_to_action_ms);
            latency("  action -> webhook", &lags.action_to_webhook_ms);
        }
        for (service, kib) in &self.peak_rss_kib {
            let shown = kib.map_or_else(
                || "n/a".to_owned(),
                |k| format!("{:.1} MiB", k as f64 / 1024.0),
            );
            let _ = writeln!(out, "{:<28}{shown:>10}", format!("peak RSS {service}"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_samples() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&samples, 50.0), Some(50.0));
        assert_eq!(percentile(&samples, 99.0), Some(99.0));
        assert_eq!(percentile(&samples, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn latency_sorts_its_samples_before_ranking() {
        let latency = Latency::from_samples(vec![30.0, 10.0, 20.0]);
        assert_eq!(
            latency,
            Latency {
                samples: 3,
                p50: Some(20.0),
                p99: Some(30.0),
                p999: Some(30.0),
                max: Some(30.0)
            }
        );
    }

    #[test]
    fn an_unfinished_stage_is_reported_as_incomplete() {
        let partial = Throughput::new(5, 10, Duration::from_secs(1));
        assert!(!partial.complete);
        assert_eq!(partial.per_second, 5.0);
        let report = Report {
            mutations_requested: 10,
            concurrency: 2,
            rate: None,
            failed_mutations: 0,
            mutations: Throughput::new(10, 10, Duration::from_secs(2)),
            events: Throughput::new(10, 10, Duration::from_secs(2)),
            actions: Throughput::new(10, 10, Duration::from_secs(2)),
            webhooks: partial,
            webhook_deliveries: 5,
            latency_ms: Latency::from_samples(vec![1.0]),
            scheduled_latency_ms: None,
            stage_lag: None,
            peak_rss_kib: BTreeMap::from([("gateway".to_owned(), Some(2048))]),
        };
        let table = report.table();
        assert!(table.contains("INCOMPLETE: 5 of 10"), "{table}");
        assert!(table.contains("2.0 MiB"), "{table}");
    }

    #[test]
    fn an_open_loop_run_shows_latency_from_the_schedule_and_the_stage_lags() {
        let lat = || Latency::from_samples((1..=1000).map(f64::from).collect());
        let report = Report {
            mutations_requested: 1000,
            concurrency: 16,
            rate: Some(1000.0),
            failed_mutations: 0,
            mutations: Throughput::new(1000, 1000, Duration::from_secs(1)),
            events: Throughput::new(1000, 1000, Duration::from_secs(1)),
            actions: Throughput::new(1000, 1000, Duration::from_secs(1)),
            webhooks: Throughput::new(1000, 1000, Duration::from_secs(1)),
            webhook_deliveries: 1000,
            latency_ms: lat(),
            scheduled_latency_ms: Some(lat()),
            stage_lag: Some(crate::lag::StageLags {
                commit_to_event_ms: lat(),
                event_to_action_ms: lat(),
                action_to_webhook_ms: lat(),
            }),
            peak_rss_kib: BTreeMap::new(),
        };
        assert_eq!(report.latency_ms.p999, Some(999.0));
        let table = report.table();
        for line in [
            "open loop at 1000/s",
            "due -> webhook",
            "p99.9 999.0 ms",
            "commit -> event",
            "event -> action",
            "action -> webhook",
        ] {
            assert!(table.contains(line), "{line} missing from\n{table}");
        }
    }
}
