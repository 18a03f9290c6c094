//! Exactly-once effect across redeliveries and replicas, through Redis leases.
//!
//! `dedup:<action id>` is claimed with `SET NX PX <lease>` holding `running:<worker>:<nonce>`,
//! kept alive while the action runs (PEXPIRE through a compare-and-set on the owner token, so a
//! worker whose lease already passed to another cannot extend it), and set to `done` with a long
//! TTL once the effect is durable. A delivery that finds `done` is a duplicate (acked, not run);
//! one that finds `running` waits (another worker is on it, or a crashed one whose lease has not
//! expired yet). A retried failure releases its lease (compare-and-delete) so the retry need not
//! wait for it to expire; a dead-lettered action releases it too, so a replay from the DLQ runs.
//!
//! The `done` marker is `done:<stream sequence>:<attempt>:<http status>:<latency ms>`: a
//! redelivery of the message that succeeded can publish the success's outcome when the worker
//! that succeeded could not. The first failure
//! of an action is kept in `dedup:<action id>:first_failed` (RFC 3339), for its dead letter.
//!
//! Attempts are JetStream deliveries minus the deliveries that were only put back without running
//! (lease busy, circuit open). Those deferrals are counted per stream message in
//! `dedup:<action id>:deferred:<stream sequence>`, read atomically with the claim.
//!
//! Redis being down is never read as "not a duplicate": every call here returns
//! `DedupError::Unavailable`, and the worker holds the message and stops fetching until Redis
//! answers again (see `worker.rs`).

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupSettings {
    /// How long a claim survives its worker without being extended: the delay before a crashed
    /// worker's action is run again.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How long a done action is remembered. Redeliveries and replays within it are absorbed.
    #[serde(with = "humantime_serde")]
    pub done_ttl: Duration,
    /// How long to wait for Redis to answer one command before treating it as down.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for DedupSettings {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            done_ttl: Duration::from_secs(7 * 24 * 3600),
            timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    #[error("Redis is unavailable: {0}")]
    Unavailable(#[from] redis::RedisError),
    #[error("unexpected answer from the claim script: {0}")]
    Protocol(String),
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This worker holds the lease; `deferrals` deliveries of this message were put back unrun.
    Claimed { lease: Lease, deferrals: u32 },
    /// The action's effect is already done; how, when the marker says (markers written before
    /// this field existed are a bare `done`).
    Done(Option<Completed>),
    /// Another worker (or a crashed one) holds the lease.
    Busy,
}

/// The successful attempt a `done` marker records, so its outcome can be published by a later
/// delivery if the first publish failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The stream message whose delivery succeeded.
    pub stream_sequence: u64,
    pub attempt: u32,
    pub http_status: Option<u16>,
    pub latency_ms: u64,
}

impl Completed {
    /// `done:<stream sequence>:<attempt>:<http status or ->:<latency ms>`
    fn marker(&self) -> String {
        let status = self
            .http_status
            .map_or_else(|| "-".to_owned(), |s| s.to_string());
        format!(
            "done:{}:{}:{status}:{}",
            self.stream_sequence, self.attempt, self.latency_ms
        )
    }

    fn parse(marker: &str) -> Option<Self> {
        let mut parts = marker.strip_prefix("done:")?.split(':');
        let stream_sequence = parts.next()?.parse().ok()?;
        let attempt = parts.next()?.parse().ok()?;
        let http_status = match parts.next()? {
            "-" => None,
            status => Some(status.parse().ok()?),
        };
        let latency_ms = parts.next()?.parse().ok()?;
        Some(Self {
            stream_sequence,
            attempt,
            http_status,
            latency_ms,
        })
    }
}

/// A held claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    key: String,
    token: String,
}

const CLAIM: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, tonumber(redis.call('GET', KEYS[2]) or '0'), ''}
end
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, 4) == 'done' then return {2, 0, held} end
return {3, 0, ''}
";

const FIRST_FAILURE: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
return redis.call('GET', KEYS[1])
";

const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

const DEFER: &str = r"
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return n
";

#[derive(Clone)]
pub struct Dedup {
    redis: ConnectionManager,
    settings: DedupSettings,
    worker: String,
    claim: Script,
    extend: Script,
    release: Script,
    defer: Script,
    first_failure: Script,
}

impl Dedup {
    /// Connects lazily: a worker starts while Redis is down and waits for it (see `worker.rs`).
    pub fn new(url: &str, settings: DedupSettings, worker: &str) -> Result<Self, DedupError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let redis = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            redis,
            settings,
            worker: worker.to_owned(),
            claim: Script::new(CLAIM),
            extend: Script::new(EXTEND),
            release: Script::new(RELEASE),
            defer: Script::new(DEFER),
            first_failure: Script::new(FIRST_FAILURE),
        })
    }

    pub fn lease_duration(&self) -> Duration {
        self.settings.lease
    }

    fn key(action_id: &str) -> String {
        format!("dedup:{action_id}")
    }

    fn deferrals_key(action_id: &str, stream_sequence: u64) -> String {
        format!("dedup:{action_id}:deferred:{stream_sequence}")
    }

    pub async fn claim(&self, action_id: &str, stream_sequence: u64) -> Result<Claim, DedupError> {
        let key = Self::key(action_id);
        let token = format!("running:{}:{}", self.worker, uuid::Uuid::now_v7());
        let (state, deferrals, held): (u32, u32, String) = self
            .claim
            .key(&key)
            .key(Self::deferrals_key(action_id, stream_sequence))
            .arg(&token)
            .arg(millis(self.settings.lease))
            .invoke_async(&mut self.redis.clone())
            .await?;
        match state {
            1 => Ok(Claim::Claimed {
                lease: Lease { key, token },
                deferrals,
            }),
            2 => Ok(Claim::Done(Completed::parse(&held))),
            3 => Ok(Claim::Busy),
            other => Err(DedupError::Protocol(other.to_string())),
        }
    }

    /// Renews the lease; `false` when it is no longer ours (it expired and another took it).
    pub async fn extend(&self, lease: &Lease) -> Result<bool, DedupError> {
        let renewed: i64 = self
            .extend
            .key(&lease.key)
            .arg(&lease.token)
            .arg(millis(self.settings.lease))
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(renewed == 1)
    }

    /// Records that the effect is done, and how. Unconditional: the effect happened whoever
    /// holds the lease now.
    pub async fn complete(&self, lease: &Lease, completed: &Completed) -> Result<(), DedupError> {
        redis::cmd("SET")
            .arg(&lease.key)
            .arg(completed.marker())
            .arg("PX")
            .arg(millis(self.settings.done_ttl))
            .query_async::<()>(&mut self.redis.clone())
            .await?;
        Ok(())
    }

    /// Gives the lease up early, if it is still ours.
    pub async fn release(&self, lease: &Lease) -> Result<(), DedupError> {
        let _: i64 = self
            .release
            .key(&lease.key)
            .arg(&lease.token)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }

    /// Counts one delivery of this stream message that was put back without running; answers
    /// how many there have been, this one included.
    pub async fn defer(&self, action_id: &str, stream_sequence: u64) -> Result<u32, DedupError> {
        let deferrals: i64 = self
            .defer
            .key(Self::deferrals_key(action_id, stream_sequence))
            .arg(millis(self.settings.done_ttl))
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(u32::try_from(deferrals).unwrap_or(u32::MAX))
    }

    /// When the action first failed: now, if this is its first failure (recorded, kept as long
    /// as `done` markers), or the time recorded at the first one.
    pub async fn first_failure(&self, action_id: &str) -> Result<DateTime<Utc>, DedupError> {
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let recorded: String = self
            .first_failure
            .key(format!("dedup:{action_id}:first_failed"))
            .arg(&now)
            .arg(millis(self.settings.done_ttl))
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(DateTime::parse_from_rfc3339(&recorded)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(|_| Utc::now()))
    }

    /// Answers when Redis does; for readiness and for resuming after an outage.
    /// How the Redis holding the done marks persists them (`herald_shared::redis_persistence`).
    pub async fn persistence(&self) -> herald_shared::redis_persistence::Persistence {
        herald_shared::redis_persistence::check(&mut self.redis.clone()).await
    }

    /// Waits until Redis answers (or `stop`), then reports once what a Redis crash would cost:
    /// a lost done mark lets a delivered action run again.
    pub async fn report_persistence(&self, stop: &tokio_util::sync::CancellationToken) {
        loop {
            if self.ping().await.is_ok() {
                let persistence = self.persistence().await;
                herald_shared::redis_persistence::report(
                    &persistence,
                    "done marks (a delivered action whose mark is lost may run again)",
                );
                return;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    pub async fn ping(&self) -> Result<(), DedupError> {
        redis::cmd("PING")
            .query_async::<String>(&mut self.redis.clone())
            .await?;
        Ok(())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_markers_round_trip_and_a_bare_done_is_still_done() {
        let completed = Completed {
            stream_sequence: 42,
            attempt: 3,
            http_status: Some(204),
            latency_ms: 17,
        };
        assert_eq!(Completed::parse(&completed.marker()), Some(completed));
        let silent = Completed {
            stream_sequence: 1,
            attempt: 1,
            http_status: None,
            latency_ms: 0,
        };
        assert_eq!(Completed::parse(&silent.marker()), Some(silent));
        assert_eq!(Completed::parse("done"), None);
    }
}
