//! One way to start the job worker in a test: real NATS and Redis from herald_test_support, the
//! service from its lib (in-process, with test handlers) or as its binary (for kill -9), and a
//! recorder of every status event that reached the stream.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use futures::future::BoxFuture;
use herald_job_worker::control::ControlReply;
use herald_job_worker::{HandlerError, JobHandler, Queue, Registry, Settings};
use herald_shared::config::{NatsConfig, StreamsConfig};
use herald_shared::subjects::{self, JOBS_STATUS_ALL, JOBS_STREAM};
use herald_shared::{JobRequest, JobState, JobStatus, RetryPolicy, SCHEMA_VERSION, streams};
use herald_test_support::{NatsServer, RedisServer, eventually};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(15);

/// Short leases and ticks, so crash recovery and retries happen within a test's seconds.
pub fn settings(redis_url: &str) -> Settings {
    Settings {
        redis_url: redis_url.to_owned(),
        lease: Duration::from_millis(1500),
        tick: Duration::from_millis(50),
        poll: Duration::from_millis(100),
        drain_timeout: Duration::from_secs(2),
        ..Settings::default()
    }
}

/// The real servers of one test, with the streams provisioned.
pub struct Servers {
    pub nats: NatsServer,
    pub redis: RedisServer,
    pub jetstream: jetstream::Context,
    pub client: async_nats::Client,
}

impl Servers {
    pub async fn start() -> Self {
        Self::with_redis(RedisServer::start()).await
    }

    pub async fn with_redis(redis: RedisServer) -> Self {
        let nats = NatsServer::start();
        let client = nats.client().await;
        let jetstream = jetstream::new(client.clone());
        streams::ensure(
            &jetstream,
            &StreamsConfig::default(),
            &[streams::JOBS, streams::DLQ],
        )
        .await
        .expect("provision streams");
        Self {
            nats,
            redis,
            jetstream,
            client,
        }
    }

    pub async fn nats(&self) -> herald_shared::nats::Nats {
        herald_shared::nats::connect(
            &NatsConfig {
                url: self.nats.url(),
                ..NatsConfig::default()
            },
            "job-worker-test",
        )
        .await
        .expect("connect to nats")
    }
}

/// A worker running in this process.
pub struct Worker {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), herald_job_worker::RunError>>,
}

impl Worker {
    pub async fn start(servers: &Servers, settings: Settings, registry: Registry) -> Self {
        let queue = Queue::connect(&settings).await.expect("connect to redis");
        let nats = servers.nats().await;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(herald_job_worker::run(
            settings,
            nats,
            queue,
            registry,
            shutdown.clone(),
        ));
        Self { shutdown, task }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("worker task")
            .expect("worker stopped cleanly");
    }
}

/// The worker binary, for kill -9.
pub struct Child(pub std::process::Child);

impl Child {
    pub fn spawn(servers: &Servers, settings: &Settings) -> Self {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_herald-job-worker"))
            .env("HERALD_NATS__URL", servers.nats.url())
            .env("HERALD_SERVICE__REDIS_URL", &settings.redis_url)
            .env(
                "HERALD_SERVICE__LEASE",
                format!("{}ms", settings.lease.as_millis()),
            )
            .env(
                "HERALD_SERVICE__TICK",
                format!("{}ms", settings.tick.as_millis()),
            )
            .env(
                "HERALD_SERVICE__POLL",
                format!("{}ms", settings.poll.as_millis()),
            )
            .env(
                "HERALD_SERVICE__DRAIN_TIMEOUT",
                format!("{}ms", settings.drain_timeout.as_millis()),
            )
            .env("HERALD_TELEMETRY__LOG_FORMAT", "pretty")
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start herald-job-worker");
        Self(child)
    }

    /// SIGTERM, then waits for the process to exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let signalled = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(signalled.success(), "kill -TERM failed");
        self.0.wait().expect("wait for the worker").success()
    }

    /// SIGKILL: a crash, not a shutdown.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fast retry policy for tests.
pub fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_delay_ms: 100,
        max_delay_ms: 400,
        multiplier: 2.0,
        jitter: true,
    }
}

pub fn job(id: &str, queue: &str, job_type: &str, payload: Value) -> JobRequest {
    JobRequest {
        id: id.to_owned(),
        queue: queue.to_owned(),
        job_type: job_type.to_owned(),
        payload,
        priority: 0,
        retry: policy(3),
        timeout_ms: 30_000,
        action_id: None,
        submitted_at: Utc::now(),
        schema_version: SCHEMA_VERSION,
    }
}

/// Publishes a submission; returns its stream sequence.
pub async fn submit(js: &jetstream::Context, job: &JobRequest) -> u64 {
    let subject = subjects::job_submit(&job.queue).expect("valid queue");
    let body = serde_json::to_vec(job).expect("serialise job");
    js.send_publish(
        subject,
        jetstream::message::PublishMessage::build()
            .payload(Bytes::from(body))
            .headers(herald_job_worker::intake::submission_headers(job)),
    )
    .await
    .expect("publish submission")
    .await
    .expect("submission stored")
    .sequence
}

/// Sends a job management request and decodes the reply.
pub async fn control(client: &async_nats::Client, subject: &str, body: Value) -> ControlReply {
    let reply = client
        .request(subject.to_owned(), body.to_string().into())
        .await
        .expect("control reply");
    serde_json::from_slice(&reply.payload).expect("control reply JSON")
}

/// Every status event stored in the stream, in stream order.
#[derive(Clone, Default)]
pub struct Events {
    seen: Arc<Mutex<Vec<JobStatus>>>,
}

impl Events {
    pub async fn record(js: &jetstream::Context) -> Self {
        let events = Self::default();
        let stream = js.get_stream(JOBS_STREAM).await.expect("jobs stream");
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: JOBS_STATUS_ALL.to_owned(),
                ..Default::default()
            })
            .await
            .expect("ordered consumer");
        let mut messages = consumer.messages().await.expect("status messages");
        let seen = events.seen.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = messages.next().await {
                let status: JobStatus =
                    herald_shared::messages::decode(&message.payload).expect("a JobStatus");
                seen.lock().expect("events lock").push(status);
            }
        });
        events
    }

    pub fn of(&self, job_id: &str) -> Vec<JobStatus> {
        self.seen
            .lock()
            .expect("events lock")
            .iter()
            .filter(|s| s.job_id == job_id)
            .cloned()
            .collect()
    }

    pub fn states(&self, job_id: &str) -> Vec<(JobState, u32)> {
        self.of(job_id)
            .iter()
            .map(|s| (s.state, s.attempt))
            .collect()
    }

    /// Waits for `job_id` to reach `state` and returns its events so far.
    pub async fn wait_for(&self, job_id: &str, state: JobState) -> Vec<JobStatus> {
        eventually(&format!("job {job_id} {}", state.as_str()), WAIT, || {
            let events = self.of(job_id);
            events.iter().any(|s| s.state == state).then_some(events)
        })
        .await
    }
}

type Behaviour = dyn Fn(JobRequest, CancellationToken) -> BoxFuture<'static, Result<Value, HandlerError>>
    + Send
    + Sync;

/// A handler made of a closure, counting its runs per job id.
#[derive(Clone)]
pub struct TestHandler {
    behaviour: Arc<Behaviour>,
    runs: Arc<Mutex<HashMap<String, usize>>>,
    order: Arc<Mutex<Vec<String>>>,
    pub total: Arc<AtomicUsize>,
}

impl TestHandler {
    pub fn new(
        behaviour: impl Fn(
            JobRequest,
            CancellationToken,
        ) -> BoxFuture<'static, Result<Value, HandlerError>>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            behaviour: Arc::new(behaviour),
            runs: Arc::default(),
            order: Arc::default(),
            total: Arc::default(),
        }
    }

    /// A handler that holds the job named `gate` until the returned `Notify` is notified and
    /// finishes every other job at once: a way to keep a queue's only slot busy.
    pub fn gated() -> (Self, Arc<tokio::sync::Notify>) {
        let gate = Arc::new(tokio::sync::Notify::new());
        let opened = gate.clone();
        let handler = Self::new(move |job, _| {
            let gate = opened.clone();
            Box::pin(async move {
                if job.id == "gate" {
                    gate.notified().await;
                }
                Ok(Value::Null)
            })
        });
        (handler, gate)
    }

    pub fn runs(&self, job_id: &str) -> usize {
        self.runs
            .lock()
            .expect("runs lock")
            .get(job_id)
            .copied()
            .unwrap_or(0)
    }

    pub fn order(&self) -> Vec<String> {
        self.order.lock().expect("order lock").clone()
    }
}

impl JobHandler for TestHandler {
    fn run<'a>(
        &'a self,
        job: &'a JobRequest,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<Value, HandlerError>> {
        *self
            .runs
            .lock()
            .expect("runs lock")
            .entry(job.id.clone())
            .or_default() += 1;
        self.order.lock().expect("order lock").push(job.id.clone());
        self.total.fetch_add(1, Ordering::SeqCst);
        (self.behaviour)(job.clone(), cancel)
    }
}
