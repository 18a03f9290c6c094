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
//! Ordered observers' lines (`ActionRequest::order`) are kept here too, in `order:<line>`: a
//! hash whose `done` is the highest event sequence of the line whose action is settled
//! (succeeded, or dead-lettered), and whose `since` is when an action first found its
//! predecessor unsettled after the last advance. The claim takes a lease only when the
//! request's `after` is settled, or when the line has not moved for the patience given (a
//! predecessor stuck in retries, a mark lost with Redis): then the action runs out of line,
//! and the claim says so. The clock is Redis's own, one for every worker.
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
    /// `out_of_line`: an ordered action whose predecessor is still unsettled, its line having
    /// waited that long, past the patience.
    Claimed {
        lease: Lease,
        deferrals: u32,
        out_of_line: Option<Duration>,
    },
    /// The action's effect is already done; how, when the marker says (markers written before
    /// this field existed are a bare `done`).
    Done(Option<Completed>),
    /// Another worker (or a crashed one) holds the lease.
    Busy,
    /// The action's predecessor in its line is not settled yet; the line has been waiting
    /// that long.
    Waiting(Duration),
}

/// An ordered action's line and place, as a claim and a settlement need them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinePlace {
    /// `ActionRequest::order_line`.
    pub line: String,
    pub sequence: u64,
    /// The predecessor's sequence; 0 when it waits for nothing.
    pub after: u64,
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

/// KEYS: the action's mark, its deferrals, its line (any key when it has none). ARGV: lease
/// token, lease ms, `after` (0: none), patience ms, line TTL ms. Answers {1, deferrals, ms out
/// of line or ''}, {2, 0, done marker}, {3, 0, ''} (busy) or {4, ms waited, ''}.
const CLAIM: &str = r"
local held = redis.call('GET', KEYS[1])
if held then
  if string.sub(held, 1, 4) == 'done' then return {2, 0, held} end
  return {3, 0, ''}
end
local late = ''
local after = tonumber(ARGV[3])
if after > 0 and tonumber(redis.call('HGET', KEYS[3], 'done') or '0') < after then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSETNX', KEYS[3], 'since', now)
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
  local waited = now - tonumber(redis.call('HGET', KEYS[3], 'since'))
  if waited < tonumber(ARGV[4]) then return {4, waited, ''} end
  late = tostring(waited)
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, tonumber(redis.call('GET', KEYS[2]) or '0'), late}
";

/// The Lua that moves a line on to `seq` (never back); the wait clock starts again with the
/// next waiter. Shared by `ADVANCE` and `COMPLETE`.
macro_rules! move_line_on {
    () => {
        r"
local function move_on(line, seq, ttl)
  if seq > tonumber(redis.call('HGET', line, 'done') or '0') then
    redis.call('HSET', line, 'done', seq)
    redis.call('HDEL', line, 'since')
  end
  redis.call('PEXPIRE', line, ttl)
end
"
    };
}

/// Moves a line on. KEYS[1]: the line. ARGV: sequence, TTL ms.
const ADVANCE: &str = concat!(
    move_line_on!(),
    "move_on(KEYS[1], tonumber(ARGV[1]), ARGV[2])\nreturn 1\n"
);

/// Marks the action done and moves its line on, in one step. KEYS: the mark, the line (any key
/// when it has none). ARGV: marker, TTL ms, sequence (0: no line).
const COMPLETE: &str = concat!(
    move_line_on!(),
    r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local seq = tonumber(ARGV[3])
if seq > 0 then move_on(KEYS[2], seq, ARGV[2]) end
return 1
"
);

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
    advance: Script,
    complete: Script,
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
            advance: Script::new(ADVANCE),
            complete: Script::new(COMPLETE),
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

    fn line_key(line: &str) -> String {
        format!("order:{line}")
    }

    /// Claims the action, unless it is done, running elsewhere, or (for an ordered action,
    /// `place`) waiting for its predecessor for less than `patience`.
    pub async fn claim(
        &self,
        action_id: &str,
        stream_sequence: u64,
        place: Option<&LinePlace>,
        patience: Duration,
    ) -> Result<Claim, DedupError> {
        let key = Self::key(action_id);
        let token = format!("running:{}:{}", self.worker, uuid::Uuid::now_v7());
        let line = place.map_or_else(|| key.clone(), |p| Self::line_key(&p.line));
        let (state, count, text): (u32, u64, String) = self
            .claim
            .key(&key)
            .key(Self::deferrals_key(action_id, stream_sequence))
            .key(line)
            .arg(&token)
            .arg(millis(self.settings.lease))
            .arg(place.map_or(0, |p| p.after))
            .arg(millis(patience))
            .arg(millis(self.settings.done_ttl))
            .invoke_async(&mut self.redis.clone())
            .await?;
        match state {
            1 => Ok(Claim::Claimed {
                lease: Lease { key, token },
                deferrals: u32::try_from(count).unwrap_or(u32::MAX),
                out_of_line: text.parse().ok().map(Duration::from_millis),
            }),
            2 => Ok(Claim::Done(Completed::parse(&text))),
            3 => Ok(Claim::Busy),
            4 => Ok(Claim::Waiting(Duration::from_millis(count))),
            other => Err(DedupError::Protocol(other.to_string())),
        }
    }

    /// Moves the line of a settled action on (a dead letter: its successors need not wait).
    pub async fn advance(&self, place: &LinePlace) -> Result<(), DedupError> {
        let _: i64 = self
            .advance
            .key(Self::line_key(&place.line))
            .arg(place.sequence)
            .arg(millis(self.settings.done_ttl))
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(())
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

    /// Records that the effect is done, and how, and moves an ordered action's line on in the
    /// same step. Unconditional: the effect happened whoever holds the lease now.
    pub async fn complete(
        &self,
        lease: &Lease,
        completed: &Completed,
        place: Option<&LinePlace>,
    ) -> Result<(), DedupError> {
        let _: i64 = self
            .complete
            .key(&lease.key)
            .key(place.map_or_else(|| lease.key.clone(), |p| Self::line_key(&p.line)))
            .arg(completed.marker())
            .arg(millis(self.settings.done_ttl))
            .arg(place.map_or(0, |p| p.sequence))
            .invoke_async(&mut self.redis.clone())
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
