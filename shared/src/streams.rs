//! The five Herald streams and their idempotent provisioning. File storage, Msg-Id duplicate
//! window and retention come from `StreamsConfig`; running `ensure` again with the same config
//! changes nothing, with a new config updates the stream in place.

use async_nats::jetstream::{self, kv, stream};

use crate::config::StreamsConfig;
use crate::subjects::{
    ACTIONS_ALL, ACTIONS_STREAM, DLQ_ALL, DLQ_STREAM, EVENTS_ALL, EVENTS_STREAM, JOBS_STATUS_ALL,
    JOBS_STREAM, JOBS_SUBMIT_ALL, OUTCOMES_ALL, OUTCOMES_STREAM,
};

/// One stream of the subject map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: &'static str,
    pub subjects: &'static [&'static str],
    pub description: &'static str,
}

pub const EVENTS: StreamSpec = StreamSpec {
    name: EVENTS_STREAM,
    subjects: &[EVENTS_ALL],
    description: "Entity events: one per committed row change",
};
pub const ACTIONS: StreamSpec = StreamSpec {
    name: ACTIONS_STREAM,
    subjects: &[ACTIONS_ALL],
    description: "Action requests emitted by observers",
};
pub const OUTCOMES: StreamSpec = StreamSpec {
    name: OUTCOMES_STREAM,
    subjects: &[OUTCOMES_ALL],
    description: "One outcome per action attempt",
};
pub const JOBS: StreamSpec = StreamSpec {
    name: JOBS_STREAM,
    subjects: &[JOBS_SUBMIT_ALL, JOBS_STATUS_ALL],
    description: "Job submissions and job status transitions",
};
pub const DLQ: StreamSpec = StreamSpec {
    name: DLQ_STREAM,
    subjects: &[DLQ_ALL],
    description: "Dead letters with their reason, original subject and attempts",
};

pub const ALL: [StreamSpec; 5] = [EVENTS, ACTIONS, OUTCOMES, JOBS, DLQ];

#[derive(Debug, thiserror::Error)]
#[error("cannot provision stream {stream}: {source}")]
pub struct ProvisionError {
    pub stream: &'static str,
    #[source]
    pub source: jetstream::context::CreateStreamError,
}

/// JetStream's "temporarily unavailable" answer: a cluster electing its meta leader.
const JETSTREAM_TEMPORARILY_UNAVAILABLE: u64 = 10008;

impl ProvisionError {
    /// Whether asking again later may succeed: JetStream did not answer in time, or answered
    /// that it is in flux. A refused configuration is not.
    pub fn is_transient(&self) -> bool {
        use jetstream::context::CreateStreamErrorKind as Kind;
        match self.source.kind() {
            Kind::TimedOut | Kind::JetStreamUnavailable => true,
            Kind::JetStream(api) => api.error_code().0 == JETSTREAM_TEMPORARILY_UNAVAILABLE,
            _ => false,
        }
    }
}

/// A KV bucket Herald keeps its place in could not be opened or created.
#[derive(Debug, thiserror::Error)]
#[error("bucket {bucket} unavailable: {reason}")]
pub struct BucketError {
    pub bucket: String,
    pub reason: String,
}

/// Opens the KV bucket `config.bucket`, creating it first when missing with as many copies as
/// the stream `like` has: a bucket that records progress through a stream (checkpoints, leases,
/// first failures) must survive every node loss the stream survives, whoever creates it first.
/// Processes starting together may race to create it; the loser opens what the winner made.
pub async fn key_value(
    js: &jetstream::Context,
    mut config: kv::Config,
    like: &str,
) -> Result<kv::Store, BucketError> {
    let fail = |reason: String| BucketError {
        bucket: config.bucket.clone(),
        reason,
    };
    if let Ok(store) = js.get_key_value(&config.bucket).await {
        return Ok(store);
    }
    let mut stream = js.get_stream(like).await.map_err(|e| fail(e.to_string()))?;
    let replicas = stream
        .info()
        .await
        .map_err(|e| fail(e.to_string()))?
        .config
        .num_replicas;
    config.num_replicas = replicas.max(1);
    let bucket = config.bucket.clone();
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        Err(created) => js.get_key_value(&bucket).await.map_err(|_| BucketError {
            bucket,
            reason: created.to_string(),
        }),
    }
}

/// The stream metadata key recording HERALD_EVENTS' partition count, which the dispatcher reads
/// from the stream itself so it never disagrees with what the stream writes.
pub const PARTITIONS_METADATA: &str = "herald.event_partitions";

/// HERALD_EVENTS' subject transform: a keyed event `herald.events.<Entity>.<op>.<key>` gets the
/// partition of its entity and key token appended, NATS's deterministic `partition(N, ...)`
/// (FNV-1a of the tokens, modulo N), so every event of one key lands in one partition.
pub fn partition_transform(partitions: u32) -> stream::SubjectTransform {
    stream::SubjectTransform {
        source: crate::subjects::EVENTS_KEYED.to_owned(),
        destination: format!(
            "herald.events.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{wildcard(3)}}}}.{{{{partition({partitions},1,3)}}}}"
        ),
    }
}

/// The partition count a HERALD_EVENTS stream was provisioned with (1 for a stream from before
/// partitioning, which has no transform).
pub fn event_partitions(config: &stream::Config) -> u32 {
    config
        .metadata
        .get(PARTITIONS_METADATA)
        .and_then(|n| n.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// The JetStream configuration of one stream.
pub fn stream_config(spec: &StreamSpec, config: &StreamsConfig) -> stream::Config {
    let limits = config.limits(spec.name);
    let (subject_transform, metadata) = if spec.name == EVENTS_STREAM {
        (
            Some(partition_transform(config.event_partitions)),
            [(
                PARTITIONS_METADATA.to_owned(),
                config.event_partitions.to_string(),
            )]
            .into(),
        )
    } else {
        (None, Default::default())
    };
    stream::Config {
        name: spec.name.to_owned(),
        description: Some(spec.description.to_owned()),
        subjects: spec.subjects.iter().map(|s| (*s).to_owned()).collect(),
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        num_replicas: config.replicas,
        duplicate_window: config.duplicate_window,
        max_age: limits.max_age,
        max_bytes: limits.max_bytes,
        // Direct get lets the CLI and Flight read single messages cheaply.
        allow_direct: true,
        subject_transform,
        metadata,
        // The action worker's retries wait as message schedules (`schedule`); the server turns
        // rollup headers on with schedules, so they are asked for too, or every provisioning
        // would ask to turn them off again.
        allow_message_schedules: spec.name == ACTIONS_STREAM,
        allow_rollup: spec.name == ACTIONS_STREAM,
        ..Default::default()
    }
}

/// Creates each stream that does not exist and brings each that does to `config`. With the
/// DLQ comes the object store bucket for dead-letter bodies too large to travel inline
/// (`dlq::BODIES_BUCKET`): whoever may dead-letter may need it.
pub async fn ensure(
    js: &jetstream::Context,
    config: &StreamsConfig,
    specs: &[StreamSpec],
) -> Result<(), ProvisionError> {
    for spec in specs {
        js.create_or_update_stream(stream_config(spec, config))
            .await
            .map_err(|source| ProvisionError {
                stream: spec.name,
                source,
            })?;
    }
    if specs.contains(&DLQ) {
        js.create_or_update_stream(crate::dlq::bodies_stream_config(config))
            .await
            .map_err(|source| ProvisionError {
                stream: crate::dlq::BODIES_STREAM,
                source,
            })?;
    }
    Ok(())
}

/// Every Herald stream.
pub async fn ensure_all(
    js: &jetstream::Context,
    config: &StreamsConfig,
) -> Result<(), ProvisionError> {
    ensure(js, config, &ALL).await
}
