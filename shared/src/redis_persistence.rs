//! What a Redis restart would keep, for the services that keep state in Redis (the job worker's
//! queue, the action worker's dedup marks and first-failure times). Enabled by the `redis`
//! feature.
//!
//! Intake acks a submission once Redis has stored it, and the action worker acks an action once
//! its `done` mark is written, so the promise holds only as far as Redis persists: with AOF and
//! `appendfsync always` an acked write survives a crash of Redis or of the machine; with
//! `everysec` it survives a Redis crash but an OS crash or power loss may lose about the last
//! second; without AOF a restart loses what was stored since the last snapshot, or everything.
//! Each service checks once at start and reports it (`report`).

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
/// `stored` names what would be lost, in the plural ("acked jobs", "done marks").
pub fn report(persistence: &Persistence, stored: &str) {
    match persistence {
        p if p.is_durable() => {
            tracing::info!("Redis persists every write (AOF, appendfsync always)")
        }
        Persistence::AppendOnly { fsync: Some(fsync) } => tracing::warn!(
            appendfsync = %fsync,
            "Redis AOF is not fsynced on every write: an OS crash or power loss can lose about the \
             last second of {stored} (set appendfsync always)"
        ),
        Persistence::AppendOnly { fsync: None } => tracing::warn!(
            "Redis AOF is on, but CONFIG is disabled so its fsync policy is unknown; the promise \
             needs appendfsync always"
        ),
        Persistence::SnapshotsOnly => tracing::warn!(
            "Redis has no AOF: a Redis restart loses the {stored} stored since the last snapshot \
             (set appendonly yes, appendfsync always)"
        ),
        Persistence::Unknown(why) => {
            tracing::warn!(%why, "cannot tell whether Redis persists {stored}")
        }
    }
}
