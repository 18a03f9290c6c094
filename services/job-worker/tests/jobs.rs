//! The job worker's promises, checked against real NATS and Redis with the worker in-process.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Events, Servers, TestHandler, WAIT, Worker, control, job, settings, submit};
use futures::FutureExt;
use futures::StreamExt;
use herald_job_worker::control::ControlReply;
use herald_job_worker::queue::{CancelOutcome, RetryOutcome};
use herald_job_worker::{HandlerError, Registry};
use herald_shared::dlq::DeadLetterInfo;
use herald_shared::subjects::{
    DLQ_STREAM, DlqSource, JOBS_CONTROL_CANCEL, JOBS_CONTROL_LIST, JOBS_CONTROL_RETRY,
    JOBS_CONTROL_SHOW,
};
use herald_shared::{JobRequest, JobState, headers};
use herald_test_support::eventually;
use serde_json::json;

fn succeeding() -> TestHandler {
    TestHandler::new(|job, _| async move { Ok(json!({ "done": job.id })) }.boxed())
}

/// The dead letters stored for jobs, in stream order.
async fn dead_letters(js: &async_nats::jetstream::Context) -> Vec<async_nats::jetstream::Message> {
    let stream = js.get_stream(DLQ_STREAM).await.expect("dlq stream");
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: DlqSource::Jobs.subject(),
            ..Default::default()
        })
        .await
        .expect("dlq consumer");
    let mut batch = consumer
        .fetch()
        .max_messages(100)
        .expires(Duration::from_millis(300))
        .messages()
        .await
        .expect("fetch dead letters");
    let mut out = Vec::new();
    while let Some(Ok(message)) = batch.next().await {
        out.push(message);
    }
    out
}

async fn dead_letter_for(
    js: &async_nats::jetstream::Context,
    job_id: &str,
) -> async_nats::jetstream::Message {
    let wanted = format!("{job_id}:dlq");
    for _ in 0..50 {
        let found = dead_letters(js).await.into_iter().find(|m| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(headers::MSG_ID))
                .is_some_and(|v| v.as_str() == wanted)
        });
        if let Some(found) = found {
            return found;
        }
    }
    panic!("no dead letter for {job_id}");
}

#[tokio::test]
async fn a_submitted_job_succeeds_with_pending_running_succeeded_events_in_order() {
    let servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let handler = succeeding();
    let worker = Worker::start(
        &servers,
        settings(&servers.redis.url()),
        Registry::new().register("test", handler.clone()),
    )
    .await;

    submit(&servers.jetstream, &job("j1", "default", "test", json!({}))).await;
    let seen = events.wait_for("j1", JobState::Succeeded).await;

    assert_eq!(
        seen.iter()
            .map(|s| (s.state, s.attempt))
            .collect::<Vec<_>>(),
        [
            (JobState::Pending, 0),
            (JobState::Running, 1),
            (JobState::Succeeded, 1)
        ]
    );
    assert_eq!(seen[2].result, Some(json!({ "done": "j1" })));
    assert!(seen.windows(2).all(|w| w[0].at <= w[1].at));
    assert_eq!(handler.runs("j1"), 1);
    worker.stop().await;
}

#[tokio::test]
async fn a_duplicate_submission_is_stored_and_run_once() {
    let servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let handler = succeeding();
    let worker = Worker::start(
        &servers,
        settings(&servers.redis.url()),
        Registry::new().register("test", handler.clone()),
    )
    .await;

    let first = job("dup", "default", "test", json!({}));
    submit(&servers.jetstream, &first).await;
    events.wait_for("dup", JobState::Succeeded).await;
    // The same job id again, under another Msg-Id so JetStream stores it: Redis must absorb it.
    let body = serde_json::to_vec(&first).expect("serialise");
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, "dup-resent");
    let resent = servers
        .jetstream
        .publish_with_headers("herald.jobs.submit.default", h, body.into())
        .await
        .expect("publish")
        .await
        .expect("stored")
        .sequence;

    let stream = servers
        .jetstream
        .get_stream(herald_shared::subjects::JOBS_STREAM)
        .await
        .expect("stream");
    eventually_acked(&stream, resent).await;
    assert_eq!(handler.runs("dup"), 1);
    assert_eq!(
        events
            .states("dup")
            .iter()
            .filter(|(s, _)| *s == JobState::Pending)
            .count(),
        1
    );
    worker.stop().await;
}

/// Waits until the submission at stream `sequence` (and every one before it) is acked.
async fn eventually_acked(stream: &async_nats::jetstream::stream::Stream, sequence: u64) {
    herald_test_support::eventually_async("the submission acked", WAIT, || async {
        let info = stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>("job-worker")
            .await
            .ok()?
            .info()
            .await
            .ok()?
            .clone();
        (info.ack_floor.stream_sequence >= sequence && info.num_ack_pending == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn retries_wait_within_the_backoff_policy_bounds_then_succeed() {
    let servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let flaky = TestHandler::new(move |_, _| {
        let call = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if call < 2 {
                Err(HandlerError::Transient("try again".into()))
            } else {
                Ok(json!("finally"))
            }
        }
        .boxed()
    });
    let worker = Worker::start(
        &servers,
        settings(&servers.redis.url()),
        Registry::new().register("flaky", flaky.clone()),
    )
    .await;
    let mut request = job("b1", "default", "flaky", json!({}));
    request.retry.max_attempts = 5;
    submit(&servers.jetstream, &request).await;
    let seen = events.wait_for("b1", JobState::Succeeded).await;

    let at = |state: JobState, attempt: u32| {
        seen.iter()
            .find(|s| s.state == state && s.attempt == attempt)
            .unwrap_or_else(|| panic!("no {state:?} {attempt} in {seen:?}"))
            .at
    };
    // Policy: 100ms then 200ms, each plus up to one more delay of jitter; promotion adds up to a
    // tick and a claim up to a poll, hence the slack on the upper bound only.
    let slack = Duration::from_millis(400);
    for (failed, lower, upper) in [(1, 100, 200), (2, 200, 400)] {
        let waited = (at(JobState::Running, failed + 1) - at(JobState::Failed, failed))
            .to_std()
            .expect("running after failed");
        assert!(
            waited >= Duration::from_millis(lower),
            "attempt {} came {waited:?} after the failure, before the {lower}ms backoff",
            failed + 1
        );
        assert!(
            waited <= Duration::from_millis(upper) + slack,
            "attempt {} came {waited:?} after the failure",
            failed + 1
        );
    }
    assert_eq!(flaky.runs("b1"), 3);
    worker.stop().await;
}

#[tokio::test]
async fn a_job_out_of_attempts_goes_dead_and_to_the_dlq_with_reason_and_attempts() {
    let servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let failing = TestHandler::new(|_, _| {
        async { Err(HandlerError::Transient("upstream down".into())) }.boxed()
    });
    let worker = Worker::start(
        &servers,
        settings(&servers.redis.url()),
        Registry::new().register("failing", failing.clone()),
    )
    .await;
    let request = job("d1", "default", "failing", json!({"x": 1}));
    submit(&servers.jetstream, &request).await;
    let seen = events.wait_for("d1", JobState::Dead).await;

    assert_eq!(
        seen.iter()
            .map(|s| (s.state, s.attempt))
            .collect::<Vec<_>>(),
        [
            (JobState::Pending, 0),
            (JobState::Running, 1),
            (JobState::Failed, 1),
            (JobState::Pending, 1),
            (JobState::Running, 2),
            (JobState::Failed, 2),
            (JobState::Pending, 2),
            (JobState::Running, 3),
            (JobState::Dead, 3),
        ]
    );
    assert_eq!(failing.runs("d1"), 3);
    let letter = dead_letter_for(&servers.jetstream, "d1").await;
    let info = DeadLetterInfo::from_headers(letter.headers.as_ref().expect("headers"))
        .expect("dlq headers");
    assert_eq!(info.attempts, 3);
    assert!(info.error.contains("upstream down"), "{}", info.error);
    assert_eq!(info.original_subject, "herald.jobs.submit.default");
    let body: JobRequest = serde_json::from_slice(&letter.payload).expect("the JobRequest");
    assert_eq!(body, request);
    worker.stop().await;
}

#[tokio::test]
async fn a_permanent_error_is_dead_at_once() {
    let servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let refusing =
        TestHandler::new(|_, _| async { Err(HandlerError::Permanent("bad input".into())) }.boxed());
    let worker = Worker::start(
        &servers,
        settings(&servers.redis.url()),
        Registry::new().register("refusing", refusing.clone()),
    )
    .await;
    submit(
        &servers.jetstream,
        &job("p1", "default", "refusing", json!({})),
    )
    .await;
    let seen = events.wait_for("p1", JobState::Dead).await;
    assert_eq!(seen.last().map(|s| s.attempt), Some(1));
    assert_eq!(
        seen.last().and_then(|s| s.error.clone()).as_deref(),
        Some("bad input")
    );
    assert_eq!(refusing.runs("p1"), 1);
    dead_letter_for(&servers.jetstream, "p1").await;
    worker.stop().await;
}

#[tokio::test]
async fn an_unknown_job_type_is_dead_lettered_with_its_reason() {
    let servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let worker = Worker::start(&servers, settings(&servers.redis.url()), Registry::new()).await;
    submit(
        &servers.jetstream,
        &job("u1", "default", "teleport", json!({})),
    )
    .await;
    let seen = events.wait_for("u1", JobState::Dead).await;
    let error = seen
        .last()
        .and_then(|s| s.error.clone())
        .unwrap_or_default();
    assert!(error.contains("teleport"), "{error}");
    let letter = dead_letter_for(&servers.jetstream, "u1").await;
    let info = DeadLetterInfo::from_headers(letter.headers.as_ref().expect("headers"))
        .expect("dlq headers");
    assert!(info.error.contains("no handler"), "{}", info.error);
    worker.stop().await;
}

#[tokio::test]
async fn a_malformed_submission_is_dead_lettered_not_stuck() {
    let servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let handler = succeeding();
    let worker = Worker::start(
        &servers,
        settings(&servers.redis.url()),
        Registry::new().register("test", handler.clone()),
    )
    .await;
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, "garbage-1");
    servers
        .jetstream
        .publish_with_headers("herald.jobs.submit.default", h, "{not json".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    submit(
        &servers.jetstream,
        &job("after", "default", "test", json!({})),
    )
    .await;
    events.wait_for("after", JobState::Succeeded).await;
    let letter = dead_letter_for(&servers.jetstream, "garbage-1").await;
    let info = DeadLetterInfo::from_headers(letter.headers.as_ref().expect("headers"))
        .expect("dlq headers");
    assert!(info.error.contains("malformed JSON"), "{}", info.error);
    worker.stop().await;
}

#[tokio::test]
async fn higher_priority_jobs_run_first() {
    let servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let (handler, gate) = TestHandler::gated();
    let mut settings = settings(&servers.redis.url());
    settings.queue_concurrency.insert("serial".into(), 1);
    let worker = Worker::start(
        &servers,
        settings,
        Registry::new().register("test", handler.clone()),
    )
    .await;

    submit(
        &servers.jetstream,
        &job("gate", "serial", "test", json!({})),
    )
    .await;
    events.wait_for("gate", JobState::Running).await;
    for (id, priority) in [("low", -5), ("mid", 0), ("high", 7), ("mid2", 0)] {
        let mut request = job(id, "serial", "test", json!({}));
        request.priority = priority;
        submit(&servers.jetstream, &request).await;
        events.wait_for(id, JobState::Pending).await;
    }
    gate.notify_one();
    events.wait_for("low", JobState::Succeeded).await;
    assert_eq!(handler.order(), ["gate", "high", "mid", "mid2", "low"]);
    worker.stop().await;
}

#[tokio::test]
async fn a_running_job_is_cancelled_cooperatively_on_request() {
    let servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let handler = TestHandler::new(|_, cancel| {
        async move {
            cancel.cancelled().await;
            Err(HandlerError::Transient("stopped on request".into()))
        }
        .boxed()
    });
    let worker = Worker::start(
        &servers,
        settings(&servers.redis.url()),
        Registry::new().register("slow", handler.clone()),
    )
    .await;
    submit(&servers.jetstream, &job("c1", "default", "slow", json!({}))).await;
    events.wait_for("c1", JobState::Running).await;

    let reply = control(
        &servers.client,
        JOBS_CONTROL_CANCEL,
        json!({"job_id": "c1"}),
    )
    .await;
    assert_eq!(
        reply,
        ControlReply::Cancel {
            job_id: "c1".into(),
            outcome: CancelOutcome::Cancelling
        }
    );
    let seen = events.wait_for("c1", JobState::Cancelled).await;
    assert_eq!(
        seen.last().map(|s| (s.state, s.attempt)),
        Some((JobState::Cancelled, 1))
    );
    assert_eq!(handler.runs("c1"), 1);
    let ControlReply::Job { job } =
        control(&servers.client, JOBS_CONTROL_SHOW, json!({"job_id": "c1"})).await
    else {
        panic!("show answered something else");
    };
    assert_eq!(job.state, JobState::Cancelled);
    worker.stop().await;
}

#[tokio::test]
async fn a_dead_job_can_be_listed_and_retried_with_a_fresh_budget() {
    let servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let healed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = healed.clone();
    let handler = TestHandler::new(move |_, _| {
        let ok = flag.load(Ordering::SeqCst);
        async move {
            if ok {
                Ok(json!("fixed"))
            } else {
                Err(HandlerError::Permanent("broken".into()))
            }
        }
        .boxed()
    });
    let worker = Worker::start(
        &servers,
        settings(&servers.redis.url()),
        Registry::new().register("test", handler.clone()),
    )
    .await;
    submit(&servers.jetstream, &job("r1", "default", "test", json!({}))).await;
    events.wait_for("r1", JobState::Dead).await;

    let ControlReply::Jobs { jobs } = control(
        &servers.client,
        JOBS_CONTROL_LIST,
        json!({"queue": "default", "state": "dead"}),
    )
    .await
    else {
        panic!("list answered something else");
    };
    assert_eq!(
        jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        ["r1"]
    );
    assert_eq!(jobs[0].last_error.as_deref(), Some("broken"));

    healed.store(true, Ordering::SeqCst);
    let reply = control(&servers.client, JOBS_CONTROL_RETRY, json!({"job_id": "r1"})).await;
    assert_eq!(
        reply,
        ControlReply::Retry {
            job_id: "r1".into(),
            outcome: RetryOutcome::Requeued
        }
    );
    let seen = events.wait_for("r1", JobState::Succeeded).await;
    assert_eq!(
        seen.iter()
            .map(|s| (s.state, s.attempt))
            .collect::<Vec<_>>(),
        [
            (JobState::Pending, 0),
            (JobState::Running, 1),
            (JobState::Dead, 1),
            (JobState::Pending, 1),
            (JobState::Running, 2),
            (JobState::Succeeded, 2),
        ]
    );
    let again = control(&servers.client, JOBS_CONTROL_RETRY, json!({"job_id": "r1"})).await;
    assert_eq!(
        again,
        ControlReply::Retry {
            job_id: "r1".into(),
            outcome: RetryOutcome::NotDead(JobState::Succeeded)
        }
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_pending_job_is_cancelled_at_once_and_never_runs() {
    let servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let (handler, gate) = TestHandler::gated();
    let mut settings = settings(&servers.redis.url());
    settings.concurrency = 1;
    let worker = Worker::start(
        &servers,
        settings,
        Registry::new().register("test", handler.clone()),
    )
    .await;
    submit(
        &servers.jetstream,
        &job("gate", "default", "test", json!({})),
    )
    .await;
    events.wait_for("gate", JobState::Running).await;
    submit(
        &servers.jetstream,
        &job("waiting", "default", "test", json!({})),
    )
    .await;
    events.wait_for("waiting", JobState::Pending).await;

    let reply = control(
        &servers.client,
        JOBS_CONTROL_CANCEL,
        json!({"job_id": "waiting"}),
    )
    .await;
    assert_eq!(
        reply,
        ControlReply::Cancel {
            job_id: "waiting".into(),
            outcome: CancelOutcome::Cancelled
        }
    );
    gate.notify_one();
    events.wait_for("gate", JobState::Succeeded).await;
    submit(
        &servers.jetstream,
        &job("later", "default", "test", json!({})),
    )
    .await;
    events.wait_for("later", JobState::Succeeded).await;
    assert_eq!(handler.runs("waiting"), 0);
    assert_eq!(
        events.states("waiting"),
        [(JobState::Pending, 0), (JobState::Cancelled, 0)]
    );
    let missing = control(
        &servers.client,
        JOBS_CONTROL_SHOW,
        json!({"job_id": "nope"}),
    )
    .await;
    assert_eq!(
        missing,
        ControlReply::NotFound {
            job_id: "nope".into()
        }
    );
    worker.stop().await;
}

#[tokio::test]
async fn at_shutdown_a_job_past_the_drain_deadline_is_released_and_finished_by_the_next_worker() {
    let servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let stubborn = TestHandler::new(|_, _| futures::future::pending().boxed());
    let mut first_settings = settings(&servers.redis.url());
    first_settings.drain_timeout = Duration::from_millis(200);
    let first = Worker::start(
        &servers,
        first_settings,
        Registry::new().register("test", stubborn.clone()),
    )
    .await;
    submit(&servers.jetstream, &job("s1", "default", "test", json!({}))).await;
    events.wait_for("s1", JobState::Running).await;
    first.stop().await;
    eventually("s1 released", WAIT, || {
        events
            .states("s1")
            .contains(&(JobState::Pending, 1))
            .then_some(())
    })
    .await;

    let finisher = succeeding();
    let second = Worker::start(
        &servers,
        settings(&servers.redis.url()),
        Registry::new().register("test", finisher.clone()),
    )
    .await;
    events.wait_for("s1", JobState::Succeeded).await;
    assert_eq!(stubborn.runs("s1"), 1);
    assert_eq!(finisher.runs("s1"), 1);
    assert_eq!(
        events.states("s1"),
        [
            (JobState::Pending, 0),
            (JobState::Running, 1),
            (JobState::Pending, 1),
            (JobState::Running, 2),
            (JobState::Succeeded, 2),
        ]
    );
    second.stop().await;
}
