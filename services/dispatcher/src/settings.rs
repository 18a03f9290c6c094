//! The dispatcher's own settings, under `[service]` in the config file
//! (`HERALD_SERVICE__<KEY>` in the environment). Defaults live here, once.

use std::path::PathBuf;
use std::time::Duration;

use herald_shared::config::{Files, Problems, Validate};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatcherSettings {
    /// Names the durable consumers, checkpoints and leases: processes sharing a name are one
    /// dispatcher and share HERALD_EVENTS' partitions (`streams.event_partitions`), each
    /// partition served by one of them at a time. With one partition, one is active and the
    /// others stand by.
    pub name: String,
    /// The observers file.
    pub observers: PathBuf,
    /// Ordered lanes: events of one entity key always go to the same lane, and a lane handles
    /// its events one after another. More lanes, more keys dispatched at once.
    pub lanes: usize,
    /// Events fetched per pull request.
    pub batch: usize,
    /// How long JetStream waits for an ack before redelivering an event.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// First delay before publishing an event's actions again after JetStream refused them.
    #[serde(with = "humantime_serde")]
    pub retry_delay: Duration,
    /// How often the checkpoint is saved (and always on shutdown).
    #[serde(with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// How long a partition's lease lives without renewal; another process takes the partition
    /// over after it.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

impl Default for DispatcherSettings {
    fn default() -> Self {
        Self {
            name: "dispatcher".into(),
            observers: PathBuf::from("observers.toml"),
            lanes: 64,
            batch: 256,
            ack_wait: Duration::from_secs(30),
            retry_delay: Duration::from_millis(500),
            checkpoint_interval: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(10),
        }
    }
}

impl DispatcherSettings {
    /// Enough unacked events for every lane to have a full batch queued (up to a cap that keeps
    /// memory flat when the actions stream is slow). Throughput is events in flight divided by
    /// the publish round trip, so a small bound starves the lanes.
    pub fn max_ack_pending(&self) -> i64 {
        i64::try_from(self.lanes.saturating_mul(self.batch).clamp(1, 16_384)).unwrap_or(i64::MAX)
    }
}

impl Validate for DispatcherSettings {
    fn validate(&self, problems: &mut Problems) {
        if let Err(e) = herald_shared::subjects::token("a dispatcher name", &self.name) {
            problems.push("name", e.to_string());
        }
        if self.observers.as_os_str().is_empty() {
            problems.push("observers", "must name the observers file");
        }
        if !(1..=4096).contains(&self.lanes) {
            problems.push("lanes", "must be between 1 and 4096");
        }
        if !(1..=10_000).contains(&self.batch) {
            problems.push("batch", "must be between 1 and 10000");
        }
        if self.ack_wait < Duration::from_secs(1) {
            problems.push("ack_wait", "must be at least 1s");
        }
        if self.retry_delay.is_zero() {
            problems.push("retry_delay", "must be positive");
        }
        if self.checkpoint_interval.is_zero() {
            problems.push("checkpoint_interval", "must be positive");
        }
        if self.lease_ttl < Duration::from_secs(1) {
            problems.push("lease_ttl", "must be at least 1s");
        }
    }

    fn check_files(&self, files: &mut Files) {
        files.loaded(
            "observers",
            &self.observers,
            crate::ObserverSet::load(&self.observers),
        );
    }
}
