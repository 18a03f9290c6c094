//! What a Redis restart would keep. Intake acks a submission once Redis has stored it, so the
//! promise holds only as far as Redis persists: with AOF and `appendfsync always` an acked job
//! survives a crash of Redis or of the machine; with `everysec` it survives a Redis crash but an
//! OS crash or power loss may lose about the last second; without AOF a restart loses what was
//! stored since the last snapshot, or everything. Checked once at start and reported.
//!
//! Lives here because `shared` has no Redis client; the action worker's dedup marks would use
//! the same check.

use redis::aio::ConnectionLike;

/// How the Redis in use persists writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Persistence {
    /// AOF on, with this `appendfsync` policy (`None` when `CONFIG` is disabled).
    AppendOnly { fsync: Option<String> },
    /// No AOF: only RDB snapshots, if any.
    SnapshotsOnly,
    /// Redis would not say.
    Unknown(String),
}

impl Persistence {
    /// Whether an acked write survives a machine crash.
    pub fn is_durable(&self) -> bool {
        matches!(self, Persistence::AppendOnly { fsync: Some(f) } if f == "always")
    }
}

/// Asks Redis, with `CONFIG GET` and, where CONFIG is renamed away, `INFO persistence`.
pub async fn check(redis: &mut impl ConnectionLike) -> Persistence {
    let config: Result<Vec<String>, _> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("append*")
        .query_async(redis)
        .await;
    if let Ok(pairs) = config {
        let get = |name: &str| {
            pairs
                .chunks(2)
                .find(|kv| kv[0] == name)
                .and_then(|kv| kv.get(1).cloned())
        };
        return match get("appendonly").as_deref() {
            Some("yes") => Persistence::AppendOnly {
                fsync: get("appendfsync"),
            },
            Some(_) => Persistence::SnapshotsOnly,
            None => Persistence::Unknown("CONFIG GET answered no appendonly".into()),
        };
    }
    let info: Result<String, _> = redis::cmd("INFO")
        .arg("persistence")
        .query_async(redis)
        .await;
    match info {
        Ok(text) if text.lines().any(|l| l.trim() == "aof_enabled:1") => {
            Persistence::AppendOnly { fsync: None }
        }
        Ok(text) if text.contains("aof_enabled:") => Persistence::SnapshotsOnly,
        Ok(_) => Persistence::Unknown("INFO persistence has no aof_enabled".into()),
        Err(e) => Persistence::Unknown(e.to_string()),
    }
}

/// Logs what a crash would cost: a warning unless acked writes survive a machine crash.
pub fn report(persistence: &Persistence) {
    match persistence {
        p if p.is_durable() => {
            tracing::info!("Redis persists every write (AOF, appendfsync always)")
        }
        Persistence::AppendOnly { fsync: Some(fsync) } => tracing::warn!(
            appendfsync = %fsync,
            "Redis AOF is not fsynced on every write: an OS crash or power loss can lose about the \
             last second of acked jobs (set appendfsync always)"
        ),
        Persistence::AppendOnly { fsync: None } => tracing::warn!(
            "Redis AOF is on, but CONFIG is disabled so its fsync policy is unknown; the promise \
             needs appendfsync always"
        ),
        Persistence::SnapshotsOnly => tracing::warn!(
            "Redis has no AOF: a Redis restart loses acked jobs stored since the last snapshot \
             (set appendonly yes, appendfsync always)"
        ),
        Persistence::Unknown(why) => {
            tracing::warn!(%why, "cannot tell whether Redis persists acked jobs")
        }
    }
}
