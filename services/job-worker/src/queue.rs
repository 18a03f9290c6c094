//! The job queue in Redis. Every state change is one Lua script, so Redis applies it whole or not
//! at all, and every script also appends the status event (and, for a dead job, the dead letter)
//! to the outbox stream in the same step — a transition cannot happen without its event.
//!
//! Keys (`P` = the configured prefix):
//! - `P:job:<id>` hash: the request, state, attempt, owner token, timestamps, last error, result.
//!   Pending, running and delayed jobs never expire; finished ones expire after `terminal_ttl`.
//! - `P:q:<queue>:pending` sorted set, scored by priority (higher first) then submit time.
//! - `P:q:<queue>:running` sorted set, scored by lease deadline (ms).
//! - `P:q:<queue>:delayed` sorted set, scored by when the retry is due (ms).
//! - `P:q:<queue>:{succeeded,dead,cancelled}` sorted sets, scored by finish time, for listing.
//! - `P:queues` set of every queue seen; `P:outbox` stream of events still to publish.
//! - `P:outbox:parked` stream of outbox entries that can never be published (a result above the
//!   NATS max payload, an id that is no header value), each with its `reason`: set aside so they
//!   cannot block the events behind them, and kept for an operator.
//!
//! Why a job is never lost: it is in exactly one of pending, running or delayed from the moment
//! it is stored until it finishes, and every move between them is one script. A claim moves it
//! to `running` with a lease deadline instead of removing it, so a worker that dies holding it
//! only delays it: the reaper moves jobs whose deadline passed back to `pending`.
//!
//! Why a job never runs twice at once: a claim writes a fresh owner token into the job; the
//! heartbeat, completion and release scripts act only when the token still matches. A worker
//! that stalls past its lease finds, on waking, that the job was re-queued (and perhaps claimed
//! by someone else): its heartbeat reports the lease lost, its handler is cancelled and its
//! result is not recorded. Redis time (`TIME`) is the only clock, so worker clock skew cannot
//! shorten a lease.
//!
//! Where at-least-once remains: a handler that finished but whose worker died before the
//! completion script ran will run again once the lease expires. Handlers must be idempotent; the
//! `http` handler sends the job id as `Idempotency-Key`. A job whose lease expires on its last
//! allowed attempt goes dead rather than looping forever on a worker-killing input.
//!
//! Keys are computed inside the scripts, so this layout needs a single Redis (or one hash slot);
//! it is not written for Redis Cluster.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use herald_shared::{JobRequest, JobState};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use serde_json::Value;

use crate::settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Redis is unreachable or refused the command; the caller retries.
    #[error("redis: {0}")]
    Unavailable(#[from] redis::RedisError),
    /// Redis answered with something the scripts never write.
    #[error("unexpected reply from redis: {0}")]
    Corrupt(String),
}

/// Priorities beyond this are ordered as if they were at it: the pending score packs priority and
/// submit time (ms) into one f64 without losing precision.
pub const MAX_PRIORITY: i32 = 400;
const PRIORITY_STEP: f64 = 1e13;

/// A job this worker holds a lease on.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: String,
    pub queue: String,
    /// 1 for the first run, counted over the job's whole life.
    pub attempt: u32,
    /// Attempts made before the job was last retried from `dead`; the retry policy counts from here.
    pub base: u32,
    /// The stored JobRequest JSON.
    pub request: String,
    pub traceparent: Option<String>,
    pub token: String,
}

impl Claimed {
    /// The attempt number the retry policy sees.
    pub fn policy_attempt(&self) -> u32 {
        self.attempt.saturating_sub(self.base)
    }
}

/// How one run of a job ended, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded {
        result: Value,
    },
    /// Will run again after `delay`.
    Failed {
        error: String,
        delay: Duration,
    },
    Dead {
        error: String,
    },
    Cancelled,
    /// Not run to the end (shutdown): back to pending, attempt kept.
    Released,
}

impl Outcome {
    fn state(&self) -> &'static str {
        match self {
            Outcome::Succeeded { .. } => JobState::Succeeded.as_str(),
            Outcome::Failed { .. } => JobState::Failed.as_str(),
            Outcome::Dead { .. } => JobState::Dead.as_str(),
            Outcome::Cancelled => JobState::Cancelled.as_str(),
            Outcome::Released => JobState::Pending.as_str(),
        }
    }
}

/// What a heartbeat learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    Held,
    CancelRequested,
    /// The job is no longer ours: the lease expired and the reaper took it back.
    Lost,
}

/// What one maintenance pass over a queue did, and how deep the queue is per state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tick {
    pub reaped: u64,
    pub promoted: u64,
    pub dead: u64,
    pub depth: Vec<(JobState, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelOutcome {
    /// It was pending or waiting for a retry and is now cancelled.
    Cancelled,
    /// It is running; its handler's cancellation token fires at the next heartbeat.
    Cancelling,
    /// It had already finished in the given state; nothing changed.
    AlreadyFinished(JobState),
    NotFound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryOutcome {
    /// Back in its queue as pending.
    Requeued,
    /// Only dead jobs are retried; it is in this state.
    NotDead(JobState),
    NotFound,
}

/// Shared by every script: the prefix and terminal TTL come first in ARGV.
const PRELUDE: &str = r#"
local P = ARGV[1]
local TTL = ARGV[2]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function job_key(id) return P .. ':job:' .. id end
local function set_key(queue, set) return P .. ':q:' .. queue .. ':' .. set end
local function emit(id, state, attempt, at, err, result)
  local job = redis.call('HMGET', job_key(id), 'queue', 'job_type', 'traceparent')
  local fields = {'kind', 'status', 'job', id, 'queue', job[1], 'type', job[2], 'state', state,
    'attempt', attempt, 'at', at, 'traceparent', job[3] or ''}
  if err and err ~= '' then
    table.insert(fields, 'error')
    table.insert(fields, err)
  end
  if result and result ~= '' then
    table.insert(fields, 'result')
    table.insert(fields, result)
  end
  redis.call('XADD', P .. ':outbox', '*', unpack(fields))
end
local function finish(id, queue, state, attempt, now, err, result)
  local key = job_key(id)
  redis.call('HSET', key, 'state', state, 'finished_at', now, 'updated_at', now)
  redis.call('HDEL', key, 'owner', 'cancel')
  if err ~= '' then redis.call('HSET', key, 'last_error', err) end
  if result ~= '' then redis.call('HSET', key, 'result', result) end
  redis.call('ZADD', set_key(queue, state), now, id)
  redis.call('PEXPIRE', key, TTL)
  emit(id, state, attempt, now, err, result)
  if state == 'dead' then
    local job = redis.call('HMGET', key, 'request', 'traceparent', 'first_failed_at', 'base')
    redis.call('XADD', P .. ':outbox', '*', 'kind', 'dlq', 'job', id, 'queue', queue,
      'request', job[1], 'traceparent', job[2] or '', 'attempt', attempt, 'error', err,
      'at', now, 'first_failed_at', job[3] or now, 'base', job[4] or '0')
  end
end
local function requeue(id, queue, attempt, now)
  local key = job_key(id)
  if redis.call('HGET', key, 'cancel') then
    finish(id, queue, 'cancelled', attempt, now, 'cancelled by request', '')
    return
  end
  redis.call('HSET', key, 'state', 'pending', 'updated_at', now)
  redis.call('HDEL', key, 'owner')
  redis.call('ZADD', set_key(queue, 'pending'), redis.call('HGET', key, 'score'), id)
  emit(id, 'pending', attempt, now)
end
"#;

/// ARGV: id, queue, job_type, score, request, traceparent, max_attempts. 1 = stored, 0 = known.
const STORE: &str = r#"
local id, queue = ARGV[3], ARGV[4]
local key = job_key(id)
if redis.call('EXISTS', key) == 1 then return 0 end
local now = now_ms()
redis.call('HSET', key, 'id', id, 'queue', queue, 'job_type', ARGV[5], 'score', ARGV[6],
  'request', ARGV[7], 'traceparent', ARGV[8], 'max_attempts', ARGV[9], 'state', 'pending',
  'attempt', 0, 'base', 0, 'created_at', now, 'updated_at', now)
redis.call('ZADD', set_key(queue, 'pending'), ARGV[6], id)
redis.call('SADD', P .. ':queues', queue)
emit(id, 'pending', 0, now)
return 1
"#;

/// ARGV: queue, lease_ms, token, count. Returns id, attempt, base, request, traceparent per job.
const CLAIM: &str = r#"
local queue, lease, token = ARGV[3], tonumber(ARGV[4]), ARGV[5]
local pending = set_key(queue, 'pending')
local ids = redis.call('ZRANGE', pending, 0, tonumber(ARGV[6]) - 1)
local out = {}
if #ids == 0 then return out end
local now = now_ms()
for _, id in ipairs(ids) do
  redis.call('ZREM', pending, id)
  local key = job_key(id)
  if redis.call('EXISTS', key) == 1 then
    redis.call('ZADD', set_key(queue, 'running'), now + lease, id)
    local attempt = redis.call('HINCRBY', key, 'attempt', 1)
    redis.call('HSET', key, 'state', 'running', 'owner', token, 'started_at', now, 'updated_at', now)
    emit(id, 'running', attempt, now)
    local job = redis.call('HMGET', key, 'base', 'request', 'traceparent')
    for _, v in ipairs({id, tostring(attempt), job[1], job[2], job[3] or ''}) do
      table.insert(out, v)
    end
  end
end
return out
"#;

/// ARGV: queue, id, token, lease_ms. 0 = lost, 1 = held, 2 = held but cancel requested.
const HEARTBEAT: &str = r#"
local key = job_key(ARGV[4])
if redis.call('HGET', key, 'owner') ~= ARGV[5] then return 0 end
redis.call('ZADD', set_key(ARGV[3], 'running'), 'XX', now_ms() + tonumber(ARGV[6]), ARGV[4])
if redis.call('HGET', key, 'cancel') then return 2 end
return 1
"#;

/// ARGV: queue, id, token, state, error, result, delay_ms. 1 = recorded, 0 = not ours any more.
const COMPLETE: &str = r#"
local queue, id, state, err = ARGV[3], ARGV[4], ARGV[6], ARGV[7]
local key = job_key(id)
if redis.call('HGET', key, 'owner') ~= ARGV[5] then return 0 end
local now = now_ms()
redis.call('ZREM', set_key(queue, 'running'), id)
local attempt = tonumber(redis.call('HGET', key, 'attempt'))
if state == 'failed' or state == 'dead' then
  redis.call('HSETNX', key, 'first_failed_at', now)
end
if state == 'failed' then
  redis.call('HSET', key, 'state', 'failed', 'last_error', err, 'updated_at', now)
  redis.call('HDEL', key, 'owner')
  redis.call('ZADD', set_key(queue, 'delayed'), now + tonumber(ARGV[9]), id)
  emit(id, 'failed', attempt, now, err)
elseif state == 'pending' then
  requeue(id, queue, attempt, now)
else
  finish(id, queue, state, attempt, now, err, ARGV[8])
end
return 1
"#;

/// ARGV: queue, limit. Reaps expired leases, promotes due retries, trims finished listings.
const TICK: &str = r#"
local queue, limit = ARGV[3], tonumber(ARGV[4])
local now = now_ms()
local running = set_key(queue, 'running')
local reaped, promoted, dead = 0, 0, 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', running, '-inf', now, 'LIMIT', 0, limit)) do
  redis.call('ZREM', running, id)
  local key = job_key(id)
  if redis.call('EXISTS', key) == 1 then
    reaped = reaped + 1
    local job = redis.call('HMGET', key, 'attempt', 'base', 'max_attempts')
    local attempt = tonumber(job[1])
    if attempt - tonumber(job[2]) >= tonumber(job[3]) then
      redis.call('HSETNX', key, 'first_failed_at', now)
      finish(id, queue, 'dead', attempt, now,
        'lease expired on the last allowed attempt (' .. attempt .. '): the worker died or stalled', '')
      dead = dead + 1
    else
      requeue(id, queue, attempt, now)
    end
  end
end
local delayed = set_key(queue, 'delayed')
for _, id in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, limit)) do
  redis.call('ZREM', delayed, id)
  if redis.call('EXISTS', job_key(id)) == 1 then
    promoted = promoted + 1
    requeue(id, queue, tonumber(redis.call('HGET', job_key(id), 'attempt')), now)
  end
end
local depth = {}
for _, set in ipairs({'pending', 'running', 'delayed', 'succeeded', 'dead', 'cancelled'}) do
  if set == 'succeeded' or set == 'dead' or set == 'cancelled' then
    redis.call('ZREMRANGEBYSCORE', set_key(queue, set), '-inf', now - tonumber(TTL))
  end
  table.insert(depth, redis.call('ZCARD', set_key(queue, set)))
end
return {reaped, promoted, dead, unpack(depth)}
"#;

/// ARGV: id. Returns what happened (see CancelOutcome).
const CANCEL: &str = r#"
local id = ARGV[3]
local key = job_key(id)
local state = redis.call('HGET', key, 'state')
if not state then return 'missing' end
local queue = redis.call('HGET', key, 'queue')
local attempt = tonumber(redis.call('HGET', key, 'attempt'))
if state == 'pending' or state == 'failed' then
  if state == 'pending' then
    redis.call('ZREM', set_key(queue, 'pending'), id)
  else
    redis.call('ZREM', set_key(queue, 'delayed'), id)
  end
  finish(id, queue, 'cancelled', attempt, now_ms(), 'cancelled by request', '')
  return 'cancelled'
end
if state == 'running' then
  redis.call('HSET', key, 'cancel', '1')
  return 'cancelling'
end
return state
"#;

/// ARGV: id. A dead job goes back to pending with its attempts kept and a fresh retry budget.
const RETRY: &str = r#"
local id = ARGV[3]
local key = job_key(id)
local state = redis.call('HGET', key, 'state')
if not state then return 'missing' end
if state ~= 'dead' then return state end
local queue = redis.call('HGET', key, 'queue')
local attempt = redis.call('HGET', key, 'attempt')
redis.call('ZREM', set_key(queue, 'dead'), id)
redis.call('PERSIST', key)
redis.call('HSET', key, 'base', attempt)
redis.call('HDEL', key, 'finished_at', 'first_failed_at')
redis.call('SADD', P .. ':queues', queue)
requeue(id, queue, tonumber(attempt), now_ms())
return 'pending'
"#;

/// ARGV: id, queue, job_type, score, request, traceparent, max_attempts, replay key. A submission
/// re-published from the DLQ: a dead job (or one whose record expired) runs again as a new
/// attempt series, keeping its attempt count so every status event keeps its own Msg-Id. The
/// replay key is remembered, so a repeat of the same replay is absorbed. 1 = stored or re-armed,
/// 0 = absorbed (the same replay again, or the job is alive or finished otherwise).
const STORE_REPLAY: &str = r#"
local id, queue, replay = ARGV[3], ARGV[4], ARGV[10]
local key = job_key(id)
local state = redis.call('HGET', key, 'state')
if not state then
  local now = now_ms()
  redis.call('HSET', key, 'id', id, 'queue', queue, 'job_type', ARGV[5], 'score', ARGV[6],
    'request', ARGV[7], 'traceparent', ARGV[8], 'max_attempts', ARGV[9], 'state', 'pending',
    'attempt', 0, 'base', 0, 'created_at', now, 'updated_at', now, 'replay', replay)
  redis.call('ZADD', set_key(queue, 'pending'), ARGV[6], id)
  redis.call('SADD', P .. ':queues', queue)
  emit(id, 'pending', 0, now)
  return 1
end
if redis.call('HGET', key, 'replay') == replay or state ~= 'dead' then return 0 end
local attempt = redis.call('HGET', key, 'attempt')
redis.call('ZREM', set_key(queue, 'dead'), id)
redis.call('PERSIST', key)
redis.call('HSET', key, 'base', attempt, 'replay', replay, 'request', ARGV[7],
  'max_attempts', ARGV[9])
redis.call('HDEL', key, 'finished_at', 'first_failed_at')
redis.call('SADD', P .. ':queues', queue)
requeue(id, queue, tonumber(attempt), now_ms())
return 1
"#;

struct Scripts {
    store: Script,
    store_replay: Script,
    claim: Script,
    heartbeat: Script,
    complete: Script,
    tick: Script,
    cancel: Script,
    retry: Script,
}

impl Scripts {
    fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{PRELUDE}{body}"));
        Self {
            store: script(STORE),
            store_replay: script(STORE_REPLAY),
            claim: script(CLAIM),
            heartbeat: script(HEARTBEAT),
            complete: script(COMPLETE),
            tick: script(TICK),
            cancel: script(CANCEL),
            retry: script(RETRY),
        }
    }
}

/// One entry of the outbox stream, as the scripts wrote it.
#[derive(Debug, Clone)]
pub struct OutboxEntry {
    pub id: String,
    pub fields: HashMap<String, String>,
}

/// The job queue; cheap to clone (one multiplexed connection that reconnects by itself).
#[derive(Clone)]
pub struct Queue {
    redis: ConnectionManager,
    prefix: String,
    terminal_ttl_ms: u64,
    scripts: Arc<Scripts>,
}

impl Queue {
    pub async fn connect(settings: &Settings) -> Result<Self, QueueError> {
        let client = redis::Client::open(settings.redis_url.as_str())?;
        // Bounded timeouts: while Redis is down, calls fail fast and callers retry, instead of
        // every loop hanging on a dead socket.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let redis = ConnectionManager::new_with_config(client, config).await?;
        Ok(Self {
            redis,
            prefix: settings.key_prefix.clone(),
            terminal_ttl_ms: settings.terminal_ttl.as_millis() as u64,
            scripts: Arc::new(Scripts::new()),
        })
    }

    fn invoke<'a>(&self, script: &'a Script) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        invocation.arg(&self.prefix).arg(self.terminal_ttl_ms);
        invocation
    }

    fn job_key(&self, id: &str) -> String {
        format!("{}:job:{id}", self.prefix)
    }

    fn set_key(&self, queue: &str, set: &str) -> String {
        format!("{}:q:{queue}:{set}", self.prefix)
    }

    fn outbox_key(&self) -> String {
        format!("{}:outbox", self.prefix)
    }

    /// Where unpublishable outbox entries are kept.
    pub fn parked_key(&self) -> String {
        format!("{}:outbox:parked", self.prefix)
    }

    /// How the Redis in use persists writes.
    pub async fn persistence(&self) -> herald_shared::redis_persistence::Persistence {
        herald_shared::redis_persistence::check(&mut self.redis.clone()).await
    }

    pub async fn ping(&self) -> Result<(), QueueError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }

    /// The pending score: higher priority first, then earlier submission.
    pub fn score(job: &JobRequest) -> f64 {
        let priority = job.priority.clamp(-MAX_PRIORITY, MAX_PRIORITY);
        -f64::from(priority) * PRIORITY_STEP + job.submitted_at.timestamp_millis().max(0) as f64
    }

    /// Stores a submitted job as pending unless a job with its id is already known. Returns
    /// whether it was new.
    pub async fn store(
        &self,
        job: &JobRequest,
        request: &str,
        traceparent: &str,
    ) -> Result<bool, QueueError> {
        let stored: i64 = self
            .invoke(&self.scripts.store)
            .arg(&job.id)
            .arg(&job.queue)
            .arg(&job.job_type)
            .arg(Self::score(job))
            .arg(request)
            .arg(traceparent)
            .arg(job.retry.max_attempts.max(1))
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(stored == 1)
    }

    /// Stores a replay of a dead-lettered submission (see `STORE_REPLAY`); `replay` names the
    /// replay (its Msg-Id), so a repeat of it is absorbed. Returns whether the job runs again.
    pub async fn store_replay(
        &self,
        job: &JobRequest,
        request: &str,
        traceparent: &str,
        replay: &str,
    ) -> Result<bool, QueueError> {
        let stored: i64 = self
            .invoke(&self.scripts.store_replay)
            .arg(&job.id)
            .arg(&job.queue)
            .arg(&job.job_type)
            .arg(Self::score(job))
            .arg(request)
            .arg(traceparent)
            .arg(job.retry.max_attempts.max(1))
            .arg(replay)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(stored == 1)
    }

    /// Leases up to `count` of the highest-priority pending jobs of `queue`.
    pub async fn claim(
        &self,
        queue: &str,
        count: usize,
        lease: Duration,
    ) -> Result<Vec<Claimed>, QueueError> {
        let token = uuid::Uuid::now_v7().to_string();
        let flat: Vec<String> = self
            .invoke(&self.scripts.claim)
            .arg(queue)
            .arg(lease.as_millis() as u64)
            .arg(&token)
            .arg(count)
            .invoke_async(&mut self.redis.clone())
            .await?;
        flat.chunks(5)
            .map(|job| match job {
                [id, attempt, base, request, traceparent] => Ok(Claimed {
                    id: id.clone(),
                    queue: queue.to_owned(),
                    attempt: parse(attempt)?,
                    base: parse(base)?,
                    request: request.clone(),
                    traceparent: Some(traceparent.clone()).filter(|t| !t.is_empty()),
                    token: token.clone(),
                }),
                _ => Err(QueueError::Corrupt(format!("claim returned {flat:?}"))),
            })
            .collect()
    }

    pub async fn heartbeat(&self, job: &Claimed, lease: Duration) -> Result<Heartbeat, QueueError> {
        let answer: i64 = self
            .invoke(&self.scripts.heartbeat)
            .arg(&job.queue)
            .arg(&job.id)
            .arg(&job.token)
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(match answer {
            1 => Heartbeat::Held,
            2 => Heartbeat::CancelRequested,
            _ => Heartbeat::Lost,
        })
    }

    /// Records how a run ended. `false` when the lease was lost: another worker owns the job now
    /// (or this very transition was already recorded by an earlier try whose reply was lost).
    pub async fn complete(&self, job: &Claimed, outcome: &Outcome) -> Result<bool, QueueError> {
        let (error, result, delay) = match outcome {
            Outcome::Succeeded { result } => (String::new(), result.to_string(), 0),
            Outcome::Failed { error, delay } => (error.clone(), String::new(), delay.as_millis()),
            Outcome::Dead { error } => (error.clone(), String::new(), 0),
            Outcome::Cancelled => ("cancelled by request".to_owned(), String::new(), 0),
            Outcome::Released => (String::new(), String::new(), 0),
        };
        let recorded: i64 = self
            .invoke(&self.scripts.complete)
            .arg(&job.queue)
            .arg(&job.id)
            .arg(&job.token)
            .arg(outcome.state())
            .arg(error)
            .arg(result)
            .arg(delay as u64)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(recorded == 1)
    }

    /// Reaps expired leases, promotes due retries and measures `queue`.
    pub async fn tick(&self, queue: &str, limit: usize) -> Result<Tick, QueueError> {
        let numbers: Vec<u64> = self
            .invoke(&self.scripts.tick)
            .arg(queue)
            .arg(limit)
            .invoke_async(&mut self.redis.clone())
            .await?;
        let [reaped, promoted, dead, depth @ ..] = numbers.as_slice() else {
            return Err(QueueError::Corrupt(format!("tick returned {numbers:?}")));
        };
        let states = [
            JobState::Pending,
            JobState::Running,
            JobState::Failed,
            JobState::Succeeded,
            JobState::Dead,
            JobState::Cancelled,
        ];
        Ok(Tick {
            reaped: *reaped,
            promoted: *promoted,
            dead: *dead,
            depth: states.into_iter().zip(depth.iter().copied()).collect(),
        })
    }

    /// Every queue a job was ever submitted to.
    pub async fn queues(&self) -> Result<Vec<String>, QueueError> {
        let key = format!("{}:queues", self.prefix);
        Ok(self.redis.clone().smembers(key).await?)
    }

    pub async fn cancel(&self, id: &str) -> Result<CancelOutcome, QueueError> {
        let answer: String = self
            .invoke(&self.scripts.cancel)
            .arg(id)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(match answer.as_str() {
            "cancelled" => CancelOutcome::Cancelled,
            "cancelling" => CancelOutcome::Cancelling,
            "missing" => CancelOutcome::NotFound,
            other => CancelOutcome::AlreadyFinished(other.parse().map_err(QueueError::Corrupt)?),
        })
    }

    pub async fn retry(&self, id: &str) -> Result<RetryOutcome, QueueError> {
        let answer: String = self
            .invoke(&self.scripts.retry)
            .arg(id)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(match answer.as_str() {
            "pending" => RetryOutcome::Requeued,
            "missing" => RetryOutcome::NotFound,
            other => RetryOutcome::NotDead(other.parse().map_err(QueueError::Corrupt)?),
        })
    }

    /// The job hash, or `None` when no such job is known (or it expired).
    pub async fn job(&self, id: &str) -> Result<Option<HashMap<String, String>>, QueueError> {
        let fields: HashMap<String, String> = self.redis.clone().hgetall(self.job_key(id)).await?;
        Ok(Some(fields).filter(|f| !f.is_empty()))
    }

    /// Up to `limit` jobs of `queue` in `state`, first in line first.
    pub async fn list(
        &self,
        queue: &str,
        state: JobState,
        limit: usize,
    ) -> Result<Vec<HashMap<String, String>>, QueueError> {
        let set = match state {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Failed => "delayed",
            JobState::Succeeded => "succeeded",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        };
        let ids: Vec<String> = self
            .redis
            .clone()
            .zrange(self.set_key(queue, set), 0, limit.max(1) as isize - 1)
            .await?;
        // Redis refuses an empty pipeline ("empty command"), and a state with no jobs is common.
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.hgetall(self.job_key(id));
        }
        let jobs: Vec<HashMap<String, String>> = pipe.query_async(&mut self.redis.clone()).await?;
        // A finished job may expire before its listing entry is trimmed.
        Ok(jobs.into_iter().filter(|j| !j.is_empty()).collect())
    }

    /// The oldest `count` outbox entries.
    pub async fn outbox(&self, count: usize) -> Result<Vec<OutboxEntry>, QueueError> {
        let reply: redis::streams::StreamRangeReply = self
            .redis
            .clone()
            .xrange_count(self.outbox_key(), "-", "+", count)
            .await?;
        reply
            .ids
            .into_iter()
            .map(|entry| {
                let fields = entry
                    .map
                    .into_iter()
                    .map(|(k, v)| {
                        redis::from_redis_value::<String>(v)
                            .map(|v| (k, v))
                            .map_err(|e| QueueError::Corrupt(e.to_string()))
                    })
                    .collect::<Result<_, _>>()?;
                Ok(OutboxEntry {
                    id: entry.id,
                    fields,
                })
            })
            .collect()
    }

    /// Moves an outbox entry that can never be published to `P:outbox:parked` with its reason,
    /// in one step, so it no longer holds up the entries behind it.
    pub async fn park(&self, entry: &OutboxEntry, reason: &str) -> Result<(), QueueError> {
        let mut fields: Vec<(&str, &str)> = entry
            .fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        fields.push(("outbox_id", entry.id.as_str()));
        fields.push(("reason", reason));
        let _: () = redis::pipe()
            .atomic()
            .xadd(self.parked_key(), "*", &fields)
            .ignore()
            .xdel(self.outbox_key(), &[entry.id.as_str()])
            .ignore()
            .query_async(&mut self.redis.clone())
            .await?;
        Ok(())
    }

    /// Forgets outbox entries once they are published.
    pub async fn outbox_done(&self, ids: &[String]) -> Result<(), QueueError> {
        if ids.is_empty() {
            return Ok(());
        }
        let _: u64 = self.redis.clone().xdel(self.outbox_key(), ids).await?;
        Ok(())
    }
}

fn parse<T: std::str::FromStr>(text: &str) -> Result<T, QueueError> {
    text.parse()
        .map_err(|_| QueueError::Corrupt(format!("`{text}` is not a number")))
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use herald_shared::{RetryPolicy, SCHEMA_VERSION};

    use super::*;

    fn job(priority: i32, submitted_ms: i64) -> JobRequest {
        JobRequest {
            id: "j".into(),
            queue: "q".into(),
            job_type: "http".into(),
            payload: Value::Null,
            priority,
            retry: RetryPolicy::default(),
            timeout_ms: 1000,
            action_id: None,
            submitted_at: Utc
                .timestamp_millis_opt(submitted_ms)
                .single()
                .expect("valid"),
            schema_version: SCHEMA_VERSION,
        }
    }

    #[test]
    fn higher_priority_scores_first_then_earlier_submission() {
        let now = 1_764_000_000_000;
        assert!(Queue::score(&job(5, now + 1_000_000)) < Queue::score(&job(1, now)));
        assert!(Queue::score(&job(1, now)) < Queue::score(&job(1, now + 1)));
        assert!(Queue::score(&job(-3, now)) > Queue::score(&job(0, now + 1_000_000)));
    }

    #[test]
    fn extreme_priorities_are_clamped_not_wrapped() {
        let now = 1_764_000_000_000;
        assert_eq!(
            Queue::score(&job(i32::MAX, now)),
            Queue::score(&job(MAX_PRIORITY, now))
        );
        assert!(Queue::score(&job(i32::MIN, now)) > Queue::score(&job(0, now)));
    }
}
