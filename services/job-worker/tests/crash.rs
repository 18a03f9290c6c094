//! No loss and no double run across crashes: a worker process killed with SIGKILL mid-job, and
//! Redis killed and restarted (append-only file) while a job runs and while one is submitted.

mod common;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use common::{Child, Events, Servers, TestHandler, WAIT, Worker, job, settings, submit};
use futures::FutureExt;
use herald_job_worker::Registry;
use herald_shared::subjects::JOBS_STREAM;
use herald_shared::{JobState, headers};
use herald_test_support::{RedisServer, eventually, eventually_async};
use serde_json::json;
use tokio::sync::Notify;

/// An HTTP receiver that counts calls, records their idempotency keys and can hold a call open.
#[derive(Clone, Default)]
struct Sink {
    started: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    hold: Arc<AtomicBool>,
    keys: Arc<Mutex<Vec<String>>>,
    never: Arc<Notify>,
}

impl Sink {
    async fn serve(&self) -> String {
        let app = Router::new()
            .route("/job", post(call))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind sink");
        let address = listener.local_addr().expect("sink address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}/job")
    }
}

async fn call(State(sink): State<Sink>, request_headers: HeaderMap) -> &'static str {
    sink.started.fetch_add(1, Ordering::SeqCst);
    let key = request_headers
        .get(headers::IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    sink.keys.lock().expect("keys lock").push(key);
    if sink.hold.load(Ordering::SeqCst) {
        // Held until the worker that made the call dies.
        sink.never.notified().await;
    }
    sink.answered.fetch_add(1, Ordering::SeqCst);
    "ok"
}

#[tokio::test]
async fn a_worker_killed_mid_job_loses_nothing_and_the_job_completes_exactly_once() {
    let servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let sink = Sink::default();
    sink.hold.store(true, Ordering::SeqCst);
    let url = sink.serve().await;
    let settings = settings(&servers.redis.url());

    let mut doomed = Child::spawn(&servers, &settings);
    submit(
        &servers.jetstream,
        &job(
            "k1",
            "default",
            "http",
            json!({ "url": url, "body": {"n": 1} }),
        ),
    )
    .await;
    eventually("the first worker to call the sink", WAIT, || {
        (sink.started.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    doomed.kill();
    sink.hold.store(false, Ordering::SeqCst);

    let survivor = Worker::start(&servers, settings, Registry::with_builtins()).await;
    events.wait_for("k1", JobState::Succeeded).await;

    // Re-queued only once the dead worker's lease expired, then run to success once.
    assert_eq!(
        events.states("k1"),
        [
            (JobState::Pending, 0),
            (JobState::Running, 1),
            (JobState::Pending, 1),
            (JobState::Running, 2),
            (JobState::Succeeded, 2),
        ]
    );
    assert_eq!(sink.started.load(Ordering::SeqCst), 2);
    assert_eq!(sink.answered.load(Ordering::SeqCst), 1);
    assert_eq!(*sink.keys.lock().expect("keys lock"), ["k1", "k1"]);
    survivor.stop().await;
}

#[tokio::test]
async fn a_redis_restart_loses_no_job_and_runs_none_twice() {
    let mut servers = Servers::with_redis(RedisServer::start_with_aof()).await;
    let events = Events::record(&servers.jetstream).await;
    let gate = Arc::new(Notify::new());
    let opened = gate.clone();
    let handler = TestHandler::new(move |job, _| {
        let gate = opened.clone();
        async move {
            if job.id == "held" {
                gate.notified().await;
            }
            Ok(json!(job.id))
        }
        .boxed()
    });
    let mut settings = settings(&servers.redis.url());
    // Long enough that the outage cannot cost the running job its lease.
    settings.lease = Duration::from_secs(6);
    let worker = Worker::start(
        &servers,
        settings,
        Registry::new().register("test", handler.clone()),
    )
    .await;

    submit(
        &servers.jetstream,
        &job("held", "default", "test", json!({})),
    )
    .await;
    events.wait_for("held", JobState::Running).await;

    servers.redis.kill();
    let sequence = submit(
        &servers.jetstream,
        &job("during", "default", "test", json!({})),
    )
    .await;
    // The submission reaches the worker while Redis is down: it must not be acked, only retried.
    let stream = servers
        .jetstream
        .get_stream(JOBS_STREAM)
        .await
        .expect("jobs stream");
    eventually_async("the worker to receive the submission", WAIT, || async {
        let mut consumer = stream
            .get_consumer::<pull::Config>("job-worker")
            .await
            .ok()?;
        let info = consumer.info().await.ok()?;
        (info.delivered.stream_sequence >= sequence && info.ack_floor.stream_sequence < sequence)
            .then_some(())
    })
    .await;
    servers.redis.restart();
    gate.notify_one();

    events.wait_for("held", JobState::Succeeded).await;
    events.wait_for("during", JobState::Succeeded).await;
    assert_eq!(handler.runs("held"), 1);
    assert_eq!(handler.runs("during"), 1);
    for id in ["held", "during"] {
        let succeeded = events
            .states(id)
            .iter()
            .filter(|(s, _)| *s == JobState::Succeeded)
            .count();
        assert_eq!(succeeded, 1, "{id}: {:?}", events.states(id));
    }
    worker.stop().await;
}

#[tokio::test]
async fn transitions_made_while_nats_is_down_are_published_when_it_returns() {
    let mut servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let gate = Arc::new(Notify::new());
    let opened = gate.clone();
    let finished = Arc::new(AtomicBool::new(false));
    let done = finished.clone();
    let handler = TestHandler::new(move |job, _| {
        let gate = opened.clone();
        let done = done.clone();
        async move {
            gate.notified().await;
            done.store(true, Ordering::SeqCst);
            Ok(json!(job.id))
        }
        .boxed()
    });
    let settings = settings(&servers.redis.url());
    let worker = Worker::start(
        &servers,
        settings.clone(),
        Registry::new().register("test", handler.clone()),
    )
    .await;
    submit(&servers.jetstream, &job("n1", "default", "test", json!({}))).await;
    events.wait_for("n1", JobState::Running).await;

    servers.nats.kill();
    gate.notify_one();
    let queue = herald_job_worker::Queue::connect(&settings)
        .await
        .expect("connect to redis");
    eventually_async(
        "the job to succeed in Redis while NATS is down",
        WAIT,
        || async {
            let fields = queue.job("n1").await.ok()??;
            (fields.get("state").map(String::as_str) == Some("succeeded")).then_some(())
        },
    )
    .await;
    assert!(finished.load(Ordering::SeqCst));
    servers.nats.restart();

    let after = Events::record(&servers.nats.jetstream().await).await;
    let seen = after.wait_for("n1", JobState::Succeeded).await;
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
    assert_eq!(handler.runs("n1"), 1);
    worker.stop().await;
}

#[tokio::test]
async fn sigterm_releases_a_job_still_running_at_the_drain_deadline_and_exits_cleanly() {
    let servers = Servers::start().await;
    let events = Events::record(&servers.jetstream).await;
    let sink = Sink::default();
    sink.hold.store(true, Ordering::SeqCst);
    let url = sink.serve().await;
    let mut settings = settings(&servers.redis.url());
    settings.drain_timeout = Duration::from_millis(300);

    let mut stopping = Child::spawn(&servers, &settings);
    submit(
        &servers.jetstream,
        &job("t1", "default", "http", json!({ "url": url })),
    )
    .await;
    eventually("the worker to call the sink", WAIT, || {
        (sink.started.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    assert!(stopping.terminate(), "the worker did not exit cleanly");
    // Released at shutdown, not left for the reaper: pending again right after running.
    eventually("t1 released", WAIT, || {
        events
            .states("t1")
            .contains(&(JobState::Pending, 1))
            .then_some(())
    })
    .await;

    sink.hold.store(false, Ordering::SeqCst);
    let next = Worker::start(&servers, settings, Registry::with_builtins()).await;
    events.wait_for("t1", JobState::Succeeded).await;
    assert_eq!(
        events.states("t1"),
        [
            (JobState::Pending, 0),
            (JobState::Running, 1),
            (JobState::Pending, 1),
            (JobState::Running, 2),
            (JobState::Succeeded, 2),
        ]
    );
    assert_eq!(sink.answered.load(Ordering::SeqCst), 1);
    next.stop().await;
}
