//! The dispatcher's checkpoint: the highest HERALD_EVENTS sequence at and below which every
//! event is fully dispatched (its actions stored, the event acked).
//!
//! Events finish out of order (many lanes run at once), so the checkpoint is not "the last
//! sequence done" but the one just below the oldest event still in flight. Tracking what is in
//! flight, rather than what is done, also steps over sequence gaps (messages removed by
//! retention are never delivered, and would stall a "contiguous done prefix" forever).
//!
//! The checkpoint is persisted in the JetStream KV bucket `herald_checkpoints`, one per
//! partition, keyed by the partition's name (`partition::Partition`; the dispatcher's name when
//! there is one partition). A dispatcher's checkpoint as a whole is the lowest of its
//! partitions': every event at or below it is dispatched, whichever partition it is in. It is what a lost or re-created durable consumer starts from, and what the
//! operator moves to rewind (`set`): that deletes the durable consumer and re-creates it at the
//! chosen sequence or time.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use herald_shared::streams;
use herald_shared::subjects::EVENTS_STREAM;

use crate::partition::Partition;
use crate::settings::DispatcherSettings;

/// The KV bucket holding one checkpoint per dispatcher name.
pub const BUCKET: &str = "herald_checkpoints";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// JetStream did not answer or refused; trying again later may work.
    #[error("checkpoint store unavailable: {0}")]
    Unavailable(String),
    /// The stored value is not a sequence number.
    #[error("checkpoint for {name} is corrupt: {value:?}")]
    Corrupt { name: String, value: String },
    #[error("cannot re-create the consumer {name}: {message}")]
    Consumer { name: String, message: String },
}

fn unavailable(e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Unavailable(e.to_string())
}

/// Which events are in flight, and so where the checkpoint stands.
#[derive(Debug)]
pub struct Tracker {
    state: Mutex<TrackerState>,
}

#[derive(Debug)]
struct TrackerState {
    in_flight: BTreeSet<u64>,
    /// The highest sequence ever handed out.
    delivered: u64,
    /// Where the checkpoint stood when tracking began.
    floor: u64,
}

impl Tracker {
    pub fn new(floor: u64) -> Self {
        Self {
            state: Mutex::new(TrackerState {
                in_flight: BTreeSet::new(),
                delivered: floor,
                floor,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TrackerState> {
        // A panic while holding this lock leaves plain integers behind, still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An event starts. A redelivery of an event at or below the checkpoint changes nothing.
    pub fn start(&self, sequence: u64) {
        let mut state = self.state();
        if sequence > state.floor {
            state.in_flight.insert(sequence);
            state.delivered = state.delivered.max(sequence);
        }
    }

    /// An event is fully dispatched (or dead-lettered).
    pub fn finish(&self, sequence: u64) {
        let mut state = self.state();
        state.in_flight.remove(&sequence);
        let checkpoint = match state.in_flight.first() {
            Some(oldest) => oldest - 1,
            None => state.delivered,
        };
        state.floor = state.floor.max(checkpoint);
    }

    pub fn checkpoint(&self) -> u64 {
        self.state().floor
    }
}

/// A stored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub sequence: u64,
    pub updated: Option<DateTime<Utc>>,
}

/// The checkpoint bucket, created on first use with as many copies as HERALD_EVENTS.
pub async fn bucket(js: &jetstream::Context) -> Result<kv::Store, CheckpointError> {
    let config = kv::Config {
        bucket: BUCKET.to_owned(),
        description:
            "Per-partition checkpoint: every event of the partition at or below it is dispatched"
                .into(),
        history: 5,
        ..Default::default()
    };
    streams::key_value(js, config, EVENTS_STREAM)
        .await
        .map_err(unavailable)
}

/// How many partitions HERALD_EVENTS has (the stream's own record of it).
pub async fn partitions(js: &jetstream::Context) -> Result<u32, CheckpointError> {
    let mut stream = js.get_stream(EVENTS_STREAM).await.map_err(unavailable)?;
    let info = stream.info().await.map_err(unavailable)?;
    Ok(herald_shared::streams::event_partitions(&info.config))
}

/// `herald checkpoint show`: the stored checkpoint of one dispatcher, if any: the lowest of its
/// partitions' (none while a partition has none).
pub async fn show(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<Checkpoint>, CheckpointError> {
    let mut lowest: Option<Checkpoint> = None;
    for partition in Partition::all(name, partitions(js).await?) {
        let Some(checkpoint) = show_one(js, &partition.name).await? else {
            return Ok(None);
        };
        if lowest
            .as_ref()
            .is_none_or(|l| checkpoint.sequence < l.sequence)
        {
            lowest = Some(checkpoint);
        }
    }
    Ok(lowest)
}

/// The stored checkpoint of one partition, by its name.
pub async fn show_one(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<Checkpoint>, CheckpointError> {
    let store = bucket(js).await?;
    let Some(entry) = store.entry(name).await.map_err(unavailable)? else {
        return Ok(None);
    };
    if entry.operation != kv::Operation::Put {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&entry.value).into_owned();
    let sequence = text.parse().map_err(|_| CheckpointError::Corrupt {
        name: name.to_owned(),
        value: text.clone(),
    })?;
    let updated = DateTime::<Utc>::from_timestamp_nanos(
        i64::try_from(entry.created.unix_timestamp_nanos()).unwrap_or(i64::MAX),
    );
    Ok(Some(Checkpoint {
        sequence,
        updated: Some(updated),
    }))
}

/// Stores a checkpoint.
pub async fn save(store: &kv::Store, name: &str, sequence: u64) -> Result<(), CheckpointError> {
    store
        .put(name, Bytes::from(sequence.to_string()))
        .await
        .map_err(unavailable)?;
    Ok(())
}

/// Where to rewind to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Dispatch again from this stream sequence (inclusive).
    Sequence(u64),
    /// Dispatch again every event stored at or after this time.
    Time(DateTime<Utc>),
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(sequence) = s.parse::<u64>() {
            return Ok(Target::Sequence(sequence.max(1)));
        }
        DateTime::parse_from_rfc3339(s)
            .map(|t| Target::Time(t.with_timezone(&Utc)))
            .map_err(|_| format!("`{s}` is neither a stream sequence nor an RFC 3339 time"))
    }
}

/// The durable consumer's configuration; one place, so `set` re-creates exactly what the
/// dispatcher would have created.
pub fn consumer_config(
    name: &str,
    filters: &[String],
    deliver_policy: consumer::DeliverPolicy,
    ack_wait: Duration,
    max_ack_pending: i64,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(name.to_owned()),
        filter_subjects: filters.to_vec(),
        description: Some("herald dispatcher: events to observer actions".into()),
        deliver_policy,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        max_ack_pending,
        // Redelivery is bounded by NAK delays and the dispatcher's own DLQ decisions; a server
        // side limit would drop an event silently.
        max_deliver: -1,
        ..Default::default()
    }
}

/// `herald checkpoint set <seq|time>`: re-creates the durable consumer of every partition so
/// dispatch starts again at `target`, and stores the new checkpoints. Each consumer keeps its
/// ack_wait and max_ack_pending (the defaults when there was none). Meant to run while the
/// dispatcher is stopped; a running one re-binds to the new consumers. Returns the new
/// checkpoint (the lowest of the partitions').
pub async fn set(
    js: &jetstream::Context,
    name: &str,
    target: Target,
) -> Result<u64, CheckpointError> {
    let mut lowest = u64::MAX;
    for partition in Partition::all(name, partitions(js).await?) {
        lowest = lowest.min(set_one(js, &partition, target).await?);
    }
    Ok(lowest)
}

/// `set` for one partition.
pub async fn set_one(
    js: &jetstream::Context,
    partition: &Partition,
    target: Target,
) -> Result<u64, CheckpointError> {
    let name = partition.name.as_str();
    let stream = js.get_stream(EVENTS_STREAM).await.map_err(unavailable)?;
    let deliver_policy = match target {
        Target::Sequence(start_sequence) => {
            consumer::DeliverPolicy::ByStartSequence { start_sequence }
        }
        Target::Time(at) => consumer::DeliverPolicy::ByStartTime {
            start_time: to_offset(at),
        },
    };
    let consumer_error = |e: &dyn std::fmt::Display| CheckpointError::Consumer {
        name: name.to_owned(),
        message: e.to_string(),
    };
    let (ack_wait, max_ack_pending) = match stream.consumer_info(name).await {
        Ok(info) => {
            stream
                .delete_consumer(name)
                .await
                .map_err(|e| consumer_error(&e))?;
            (info.config.ack_wait, info.config.max_ack_pending)
        }
        Err(_) => {
            let defaults = DispatcherSettings::default();
            (defaults.ack_wait, defaults.max_ack_pending())
        }
    };
    let mut created: consumer::PullConsumer = stream
        .create_consumer(consumer_config(
            name,
            &partition.filters,
            deliver_policy,
            ack_wait,
            max_ack_pending,
        ))
        .await
        .map_err(|e| consumer_error(&e))?;
    // The server resolves a start time to a sequence; the consumer reports the sequence just
    // before its start as already delivered, which is exactly the new checkpoint.
    let info = created.info().await.map_err(|e| consumer_error(&e))?;
    let sequence = info.delivered.stream_sequence;
    save(&bucket(js).await?, name, sequence).await?;
    Ok(sequence)
}

/// chrono to the `time` type async-nats speaks.
pub(crate) fn to_offset(at: DateTime<Utc>) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
        at.timestamp_nanos_opt().unwrap_or(i64::MAX),
    ))
    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checkpoint_stays_below_the_oldest_event_in_flight() {
        let tracker = Tracker::new(0);
        for sequence in 1..=5 {
            tracker.start(sequence);
        }
        tracker.finish(2);
        tracker.finish(3);
        assert_eq!(tracker.checkpoint(), 0, "1 is still in flight");
        tracker.finish(1);
        assert_eq!(tracker.checkpoint(), 3);
        tracker.finish(5);
        assert_eq!(tracker.checkpoint(), 3, "4 is still in flight");
        tracker.finish(4);
        assert_eq!(tracker.checkpoint(), 5);
    }

    #[test]
    fn gaps_left_by_retention_do_not_stall_the_checkpoint() {
        let tracker = Tracker::new(10);
        tracker.start(14);
        tracker.start(20);
        tracker.finish(20);
        assert_eq!(tracker.checkpoint(), 13);
        tracker.finish(14);
        assert_eq!(tracker.checkpoint(), 20);
    }

    #[test]
    fn redeliveries_below_the_checkpoint_change_nothing() {
        let tracker = Tracker::new(0);
        tracker.start(1);
        tracker.finish(1);
        tracker.start(1);
        tracker.finish(1);
        assert_eq!(tracker.checkpoint(), 1);
    }

    #[test]
    fn targets_parse_as_sequence_or_time() {
        assert_eq!("42".parse(), Ok(Target::Sequence(42)));
        assert!(matches!(
            "2026-01-01T00:00:00Z".parse::<Target>(),
            Ok(Target::Time(_))
        ));
        assert!("yesterday".parse::<Target>().is_err());
    }
}
