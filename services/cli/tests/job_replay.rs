//! `herald dlq replay` of a dead job: the job runs again, and the dead letter is deleted only
//! once the job worker took the replay up, never merely because JetStream stored it.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::{fail, json_lines, provisioned, succeed};
use herald_job_worker::{Queue, Registry, Settings};
use herald_shared::subjects::{self, DlqSource, JOBS_STATUS_ALL, JOBS_STREAM};
use herald_shared::{JobRequest, JobState, JobStatus, RetryPolicy, SCHEMA_VERSION};
use herald_test_support::{NatsServer, RedisServer, eventually_async};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

fn job(id: &str) -> JobRequest {
    JobRequest {
        id: id.into(),
        queue: "default".into(),
        // No handler serves it: dead at once, and dead again after a replay.
        job_type: "unserved".into(),
        payload: serde_json::Value::Null,
        priority: 0,
        retry: RetryPolicy::default(),
        timeout_ms: 1000,
        action_id: None,
        submitted_at: chrono::Utc::now(),
        schema_version: SCHEMA_VERSION,
    }
}

async fn submit(js: &jetstream::Context, job: &JobRequest) {
    js.send_publish(
        subjects::job_submit(&job.queue).expect("subject"),
        jetstream::message::PublishMessage::build()
            .payload(serde_json::to_vec(job).expect("json").into())
            .headers(herald_job_worker::intake::submission_headers(job)),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
}

async fn statuses(js: &jetstream::Context, job_id: &str) -> Vec<(JobState, u32)> {
    let stream = js.get_stream(JOBS_STREAM).await.expect("jobs stream");
    let mut out = Vec::new();
    let mut next = 1;
    while let Ok(message) = stream
        .direct_get_next_for_subject(JOBS_STATUS_ALL, Some(next))
        .await
    {
        next = message.sequence + 1;
        if let Ok(status) = herald_shared::messages::decode::<JobStatus>(&message.payload)
            && status.job_id == job_id
        {
            out.push((status.state, status.attempt));
        }
    }
    out
}

async fn dead_letters(url: &str) -> Vec<serde_json::Value> {
    json_lines(&succeed(url, &["dlq", "list", "--json", "--source", "jobs"]).await)
}

#[tokio::test]
async fn a_replayed_dead_job_runs_again_and_its_dead_letter_goes_once_taken_up() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let js = provisioned(&nats).await;
    let settings = Settings {
        redis_url: redis.url(),
        ..Settings::default()
    };
    let queue = Queue::connect(&settings).await.expect("redis");
    let worker_nats = herald_shared::nats::connect(
        &herald_shared::config::NatsConfig {
            url: nats.url(),
            ..Default::default()
        },
        "job-worker",
    )
    .await
    .expect("nats");
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(herald_job_worker::run(
        settings,
        worker_nats,
        queue,
        Registry::new(),
        shutdown.clone(),
    ));
    submit(&js, &job("j1")).await;
    let first = eventually_async("the first dead letter", WAIT, || async {
        dead_letters(&nats.url()).await.into_iter().next()
    })
    .await;
    let seq = first["seq"].as_u64().expect("seq").to_string();

    let out = succeed(&nats.url(), &["dlq", "replay", &seq]).await;
    assert!(out.contains("entry removed"), "{out}");
    let again = eventually_async("the replay's own dead letter", WAIT, || async {
        dead_letters(&nats.url()).await.into_iter().next()
    })
    .await;
    assert_ne!(again["seq"], first["seq"], "the first entry was removed");
    assert_eq!(
        again["original_msg_id"], "j1:retry-1",
        "a new attempt series"
    );
    assert_eq!(
        statuses(&js, "j1").await,
        [
            (JobState::Pending, 0),
            (JobState::Running, 1),
            (JobState::Dead, 1),
            (JobState::Pending, 1),
            (JobState::Running, 2),
            (JobState::Dead, 2),
        ]
    );
    shutdown.cancel();
    worker.await.expect("worker task").expect("worker stops");
}

#[tokio::test]
async fn a_job_replay_no_job_worker_takes_up_keeps_its_dead_letter() {
    let nats = NatsServer::start();
    let js = provisioned(&nats).await;
    common::dead_letter(
        &js,
        DlqSource::Jobs,
        "herald.jobs.submit.default",
        "j2",
        "unknown job type",
        r#"{"id":"j2","queue":"default","job_type":"unserved","payload":null,"priority":0,
            "retry":{"max_attempts":3,"initial_delay_ms":100,"max_delay_ms":1000,"multiplier":2.0,
            "jitter":false},"timeout_ms":1000,"action_id":null,
            "submitted_at":"2026-01-01T00:00:00Z","schema_version":1}"#,
        None,
    )
    .await;
    let seq = dead_letters(&nats.url()).await[0]["seq"]
        .as_u64()
        .expect("seq")
        .to_string();
    let err = fail(&nats.url(), &["dlq", "replay", &seq]).await;
    assert!(err.contains("not yet accepted"), "{err}");
    assert_eq!(
        dead_letters(&nats.url()).await.len(),
        1,
        "the entry is kept"
    );
}
