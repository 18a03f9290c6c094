//! The Redis queue's fencing, checked through its API against a real Redis: a worker whose lease
//! expired cannot record anything for a job someone else re-claimed, and a job whose lease keeps
//! expiring goes dead instead of looping.

use std::time::Duration;

use chrono::Utc;
use herald_job_worker::queue::{Heartbeat, Outcome};
use herald_job_worker::{Queue, Settings};
use herald_shared::{JobRequest, RetryPolicy, SCHEMA_VERSION};
use herald_test_support::{RedisServer, eventually_async};
use serde_json::{Value, json};

const SHORT: Duration = Duration::from_millis(100);

fn request(id: &str, max_attempts: u32) -> JobRequest {
    JobRequest {
        id: id.into(),
        queue: "q".into(),
        job_type: "test".into(),
        payload: Value::Null,
        priority: 0,
        retry: RetryPolicy {
            max_attempts,
            ..RetryPolicy::default()
        },
        timeout_ms: 1000,
        action_id: None,
        submitted_at: Utc::now(),
        schema_version: SCHEMA_VERSION,
    }
}

async fn queue(redis: &RedisServer) -> Queue {
    Queue::connect(&Settings {
        redis_url: redis.url(),
        ..Settings::default()
    })
    .await
    .expect("connect to redis")
}

async fn store(queue: &Queue, job: &JobRequest) {
    let body = serde_json::to_string(job).expect("serialise");
    assert!(queue.store(job, &body, "").await.expect("store"));
}

/// Ticks until the expired lease is reaped.
async fn reap(queue: &Queue) -> herald_job_worker::queue::Tick {
    eventually_async(
        "the expired lease to be reaped",
        Duration::from_secs(5),
        || async {
            let tick = queue.tick("q", 100).await.expect("tick");
            (tick.reaped > 0).then_some(tick)
        },
    )
    .await
}

#[tokio::test]
async fn a_worker_that_lost_its_lease_cannot_overwrite_the_new_owner() {
    let redis = RedisServer::start();
    let queue = queue(&redis).await;
    store(&queue, &request("j", 3)).await;

    let stalled = queue.claim("q", 1, SHORT).await.expect("claim").remove(0);
    reap(&queue).await;
    let current = queue
        .claim("q", 1, Duration::from_secs(30))
        .await
        .expect("claim again")
        .remove(0);
    assert_eq!((stalled.attempt, current.attempt), (1, 2));

    assert_eq!(
        queue.heartbeat(&stalled, SHORT).await.expect("heartbeat"),
        Heartbeat::Lost
    );
    let late = Outcome::Succeeded {
        result: json!("stale"),
    };
    assert!(!queue.complete(&stalled, &late).await.expect("complete"));
    assert_eq!(
        queue.heartbeat(&current, SHORT).await.expect("heartbeat"),
        Heartbeat::Held
    );
    let fields = queue.job("j").await.expect("read").expect("job exists");
    assert_eq!(fields.get("state").map(String::as_str), Some("running"));
    assert_eq!(fields.get("owner"), Some(&current.token));

    let done = Outcome::Succeeded {
        result: json!("fresh"),
    };
    assert!(queue.complete(&current, &done).await.expect("complete"));
    let fields = queue.job("j").await.expect("read").expect("job exists");
    assert_eq!(fields.get("result").map(String::as_str), Some("\"fresh\""));
}

#[tokio::test]
async fn a_job_whose_lease_expires_on_its_last_attempt_goes_dead_with_a_dead_letter() {
    let redis = RedisServer::start();
    let queue = queue(&redis).await;
    store(&queue, &request("poison", 1)).await;

    queue.claim("q", 1, SHORT).await.expect("claim");
    let tick = reap(&queue).await;
    assert_eq!(tick.dead, 1);
    assert!(queue.claim("q", 1, SHORT).await.expect("claim").is_empty());
    let fields = queue
        .job("poison")
        .await
        .expect("read")
        .expect("job exists");
    assert_eq!(fields.get("state").map(String::as_str), Some("dead"));
    let outbox = queue.outbox(100).await.expect("outbox");
    let kinds: Vec<_> = outbox
        .iter()
        .map(|e| {
            (
                e.fields.get("kind").cloned().unwrap_or_default(),
                e.fields.get("state").cloned().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("status".into(), "pending".into()),
            ("status".into(), "running".into()),
            ("status".into(), "dead".into()),
            ("dlq".into(), String::new()),
        ]
    );
}

#[tokio::test]
async fn the_worker_can_tell_whether_redis_persists_acked_jobs() {
    use herald_shared::redis_persistence::Persistence;
    let plain = RedisServer::start();
    let aof = RedisServer::start_with_aof();
    let settings = |url: String| Settings {
        redis_url: url,
        ..Settings::default()
    };
    let plain = Queue::connect(&settings(plain.url())).await.expect("redis");
    let aof = Queue::connect(&settings(aof.url())).await.expect("redis");
    assert_eq!(plain.persistence().await, Persistence::SnapshotsOnly);
    let durable = aof.persistence().await;
    assert_eq!(
        durable,
        Persistence::AppendOnly {
            fsync: Some("always".into())
        }
    );
    assert!(durable.is_durable());
}

/// Redis's own count of script calls (EVALSHA and EVAL) so far.
async fn script_calls(redis: &RedisServer) -> u64 {
    let client = redis::Client::open(redis.url()).expect("client");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await
        .expect("INFO");
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[tokio::test]
async fn concurrent_stores_and_completions_share_script_calls_and_each_gets_its_own_answer() {
    let redis = RedisServer::start();
    let queue = queue(&redis).await;
    let jobs: Vec<JobRequest> = (0..300).map(|n| request(&format!("b{n}"), 3)).collect();
    let before = script_calls(&redis).await;
    // 300 new jobs and one repeat of the first, all at once.
    let stores = futures::future::join_all(jobs.iter().chain(&jobs[..1]).map(|job| {
        let queue = queue.clone();
        let body = serde_json::to_string(job).expect("serialise");
        async move { queue.store(job, &body, "").await.expect("store") }
    }))
    .await;
    assert!(
        stores[..300].iter().all(|stored| *stored),
        "every new job stored"
    );
    assert!(!stores[300], "the repeat is absorbed");
    let stored_calls = script_calls(&redis).await - before;
    assert!(
        stored_calls < 301,
        "301 stores took {stored_calls} script calls"
    );

    let mut claimed = Vec::new();
    while claimed.len() < 300 {
        let batch = queue
            .claim("q", 300, Duration::from_secs(30))
            .await
            .expect("claim");
        assert!(!batch.is_empty(), "all 300 are pending");
        claimed.extend(batch);
    }
    // One completion with a token that is not the owner's, among 300 that are.
    let mut stale = claimed[0].clone();
    stale.token = "not-the-owner".into();
    let before = script_calls(&redis).await;
    let done = Outcome::Succeeded { result: json!(1) };
    let recorded = futures::future::join_all(
        std::iter::once(&stale)
            .chain(&claimed)
            .map(|job| queue.complete(job, &done)),
    )
    .await;
    assert!(
        !recorded[0].as_ref().expect("complete"),
        "a stale token records nothing"
    );
    assert!(
        recorded[1..].iter().all(|r| *r.as_ref().expect("complete")),
        "every owner's completion recorded"
    );
    let completion_calls = script_calls(&redis).await - before;
    assert!(
        completion_calls < 301,
        "301 completions took {completion_calls} script calls"
    );
    for job in &claimed {
        let fields = queue.job(&job.id).await.expect("read").expect("job exists");
        assert_eq!(
            fields.get("state").map(String::as_str),
            Some("succeeded"),
            "{}",
            job.id
        );
    }
}

#[tokio::test]
async fn a_completion_leases_the_next_pending_job_by_priority_in_the_same_step() {
    let redis = RedisServer::start();
    let queue = queue(&redis).await;
    store(&queue, &request("first", 3)).await;
    let low = request("low", 3);
    store(&queue, &low).await;
    let urgent = JobRequest {
        priority: 5,
        ..request("urgent", 3)
    };
    store(&queue, &urgent).await;

    let first = queue.claim("q", 1, SHORT).await.expect("claim").remove(0);
    assert_eq!(first.id, "urgent", "the highest priority is claimed first");
    let done = Outcome::Succeeded { result: json!(1) };
    let (recorded, next) = queue
        .complete_and_claim(&first, &done, Some(Duration::from_secs(30)))
        .await
        .expect("complete and claim");
    assert!(recorded);
    let next = next.expect("a pending job was leased with the completion");
    assert_eq!((next.id.as_str(), next.attempt), ("first", 1));
    assert_ne!(
        next.token, first.token,
        "the next job has its own lease token"
    );
    let fields = queue.job("first").await.expect("read").expect("job exists");
    assert_eq!(fields.get("state").map(String::as_str), Some("running"));
    assert_eq!(fields.get("owner"), Some(&next.token));
    assert_eq!(
        queue.heartbeat(&next, SHORT).await.expect("heartbeat"),
        Heartbeat::Held,
        "the chained lease is in the running set like a claimed one"
    );

    // Without a lease asked for, nothing more is taken; with one and an empty queue, none comes.
    let (recorded, none) = queue
        .complete_and_claim(&next, &done, None)
        .await
        .expect("complete");
    assert!(recorded && none.is_none());
    let last = queue.claim("q", 5, SHORT).await.expect("claim").remove(0);
    assert_eq!(last.id, "low");
    let (recorded, none) = queue
        .complete_and_claim(&last, &done, Some(SHORT))
        .await
        .expect("complete");
    assert!(recorded && none.is_none());

    // Every transition has its event, the chained `running` included, in order per job.
    let events: Vec<(String, String)> = queue
        .outbox(100)
        .await
        .expect("outbox")
        .iter()
        .map(|e| (e.fields["job"].clone(), e.fields["state"].clone()))
        .collect();
    for job in ["urgent", "first", "low"] {
        let states: Vec<&str> = events
            .iter()
            .filter(|(id, _)| id == job)
            .map(|(_, state)| state.as_str())
            .collect();
        assert_eq!(states, ["pending", "running", "succeeded"], "{job}");
    }
}

#[tokio::test]
async fn trimming_the_outbox_keeps_entries_written_after_the_read() {
    let redis = RedisServer::start();
    let queue = queue(&redis).await;
    store(&queue, &request("a", 3)).await;
    store(&queue, &request("b", 3)).await;
    let read = queue.outbox(100).await.expect("outbox");
    assert_eq!(read.len(), 2);
    // Written while the first two were being published.
    store(&queue, &request("c", 3)).await;

    queue
        .outbox_trim(&read[1].id)
        .await
        .expect("trim the published entries");
    let left = queue.outbox(100).await.expect("outbox");
    let jobs: Vec<&str> = left.iter().map(|e| e.fields["job"].as_str()).collect();
    assert_eq!(jobs, ["c"]);
    // A second publisher trimming the same read again changes nothing.
    queue.outbox_trim(&read[1].id).await.expect("trim again");
    assert_eq!(queue.outbox(100).await.expect("outbox").len(), 1);
}

#[tokio::test]
async fn a_claim_that_fails_midway_leaves_the_job_where_the_reaper_finds_it() {
    let redis = RedisServer::start();
    let queue = queue(&redis).await;
    store(&queue, &request("broken", 3)).await;
    // A record no script writes: the lease cannot count its attempt.
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut raw = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let _: () = redis::AsyncCommands::hset(&mut raw, "herald:job:broken", "attempt", "x")
        .await
        .expect("corrupt the record");

    assert!(queue.claim("q", 1, SHORT).await.is_err(), "the claim fails");
    let running: Vec<String> = redis::AsyncCommands::zrange(&mut raw, "herald:q:q:running", 0, -1)
        .await
        .expect("read the running set");
    assert_eq!(
        running,
        ["broken"],
        "popped from pending, the job is in running, not nowhere"
    );
    let _: () = redis::AsyncCommands::hset(&mut raw, "herald:job:broken", "attempt", 0)
        .await
        .expect("mend the record");
    let tick = reap(&queue).await;
    assert_eq!(tick.reaped, 1);
    let again = queue.claim("q", 1, SHORT).await.expect("claim").remove(0);
    assert_eq!(again.id, "broken");
}
