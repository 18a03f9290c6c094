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
