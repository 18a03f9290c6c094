//! `herald jobs`: the job worker's jobs can be listed, shown, cancelled and retried from the CLI,
//! against a real job worker (in-process, from its lib) on real NATS and Redis.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use common::*;
use futures::FutureExt;
use futures::future::BoxFuture;
use herald_job_worker::{HandlerError, JobHandler, Queue, Registry, Settings};
use herald_shared::config::NatsConfig;
use herald_shared::subjects::{self, JOBS_CONTROL_LIST};
use herald_shared::{JobRequest, RetryPolicy, SCHEMA_VERSION};
use herald_test_support::{NatsServer, RedisServer, eventually_async};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

/// Succeeds, or fails permanently while `failures` is above zero, counting its runs.
#[derive(Clone, Default)]
struct Flaky {
    failures: Arc<AtomicUsize>,
    runs: Arc<AtomicUsize>,
}

impl JobHandler for Flaky {
    fn run<'a>(
        &'a self,
        job: &'a JobRequest,
        _cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<Value, HandlerError>> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let failing = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        async move {
            if failing {
                Err(HandlerError::Permanent("the receiver said no".into()))
            } else {
                Ok(json!({ "done": job.id }))
            }
        }
        .boxed()
    }
}

/// Runs until its cancellation token fires.
struct Patient;

impl JobHandler for Patient {
    fn run<'a>(
        &'a self,
        _job: &'a JobRequest,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<Value, HandlerError>> {
        async move {
            cancel.cancelled().await;
            Err(HandlerError::Transient("stopped on request".into()))
        }
        .boxed()
    }
}

/// Real NATS and Redis, with a job worker running in this process.
struct App {
    nats: NatsServer,
    _redis: RedisServer,
    js: jetstream::Context,
    stop: CancellationToken,
    worker: JoinHandle<Result<(), herald_job_worker::RunError>>,
}

impl App {
    async fn spawn(registry: Registry) -> Self {
        let nats = NatsServer::start();
        let redis = RedisServer::start();
        let js = provisioned(&nats).await;
        // Short leases: a cancel request reaches a running handler at its next heartbeat.
        let settings = Settings {
            redis_url: redis.url(),
            lease: Duration::from_millis(900),
            tick: Duration::from_millis(50),
            poll: Duration::from_millis(100),
            drain_timeout: Duration::from_secs(2),
            ..Settings::default()
        };
        let queue = Queue::connect(&settings).await.expect("connect to redis");
        let connection = herald_shared::nats::connect(
            &NatsConfig {
                url: nats.url(),
                ..NatsConfig::default()
            },
            "cli-jobs-test",
        )
        .await
        .expect("connect to nats");
        let stop = CancellationToken::new();
        let worker = tokio::spawn(herald_job_worker::run(
            settings,
            connection,
            queue,
            registry,
            stop.clone(),
        ));
        Self {
            nats,
            _redis: redis,
            js,
            stop,
            worker,
        }
    }

    fn url(&self) -> String {
        self.nats.url()
    }

    async fn submit(&self, id: &str, queue: &str, job_type: &str) {
        let job = JobRequest {
            id: id.to_owned(),
            queue: queue.to_owned(),
            job_type: job_type.to_owned(),
            payload: json!({ "n": id }),
            priority: 0,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_delay_ms: 100,
                max_delay_ms: 400,
                multiplier: 2.0,
                jitter: true,
            },
            timeout_ms: 30_000,
            action_id: None,
            submitted_at: Utc::now(),
            schema_version: SCHEMA_VERSION,
        };
        let subject = subjects::job_submit(queue).expect("valid queue name");
        self.js
            .send_publish(
                subject,
                jetstream::message::PublishMessage::build()
                    .payload(serde_json::to_vec(&job).expect("encode job").into())
                    .headers(herald_job_worker::intake::submission_headers(&job)),
            )
            .await
            .expect("publish submission")
            .await
            .expect("submission stored");
    }

    /// Waits, through `herald jobs show --json`, until the job is in `state`; returns the job.
    async fn wait_for(&self, id: &str, state: &str) -> Value {
        let url = self.url();
        eventually_async(&format!("job {id} {state}"), WAIT, || {
            let url = url.clone();
            async move {
                let output = run(&url, &["jobs", "show", id, "--json"]).await;
                let job: Value = serde_json::from_slice(&output.stdout).ok()?;
                (job["state"] == state).then_some(job)
            }
        })
        .await
    }

    async fn stop(self) {
        self.stop.cancel();
        self.worker
            .await
            .expect("worker task")
            .expect("worker stopped cleanly");
    }
}

fn ids(rows: &[Value]) -> Vec<&str> {
    let mut ids: Vec<&str> = rows.iter().filter_map(|r| r["id"].as_str()).collect();
    ids.sort_unstable();
    ids
}

/// Two succeeded jobs in `reports`, a succeeded and a dead one in `mail`.
async fn app_with_finished_jobs() -> App {
    let broken = Flaky::default();
    broken.failures.store(usize::MAX, Ordering::SeqCst);
    let app = App::spawn(
        Registry::new()
            .register("ok", Flaky::default())
            .register("broken", broken),
    )
    .await;
    app.submit("mail-1", "mail", "ok").await;
    app.submit("mail-2", "mail", "broken").await;
    app.submit("report-1", "reports", "ok").await;
    app.submit("report-2", "reports", "ok").await;
    app.wait_for("mail-1", "succeeded").await;
    app.wait_for("mail-2", "dead").await;
    app.wait_for("report-1", "succeeded").await;
    app.wait_for("report-2", "succeeded").await;
    app
}

#[tokio::test]
async fn jobs_are_listed_by_queue_and_state_and_shown_in_full() {
    let app = app_with_finished_jobs().await;

    let dead = json_lines(
        &succeed(
            &app.url(),
            &[
                "jobs", "list", "--queue", "mail", "--state", "dead", "--json",
            ],
        )
        .await,
    );
    assert_eq!(ids(&dead), ["mail-2"]);
    assert_eq!(dead[0]["queue"], "mail");
    assert_eq!(dead[0]["job_type"], "broken");
    assert_eq!(dead[0]["state"], "dead");
    assert_eq!(dead[0]["attempt"], 1);
    assert_eq!(dead[0]["last_error"], "the receiver said no");

    let reports = json_lines(
        &succeed(
            &app.url(),
            &[
                "jobs",
                "list",
                "--queue",
                "reports",
                "--state",
                "succeeded",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(ids(&reports), ["report-1", "report-2"]);
    let limited = json_lines(
        &succeed(
            &app.url(),
            &[
                "jobs",
                "list",
                "--queue",
                "reports",
                "--state",
                "succeeded",
                "--limit",
                "1",
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(limited.len(), 1, "{limited:?}");

    let table = succeed(
        &app.url(),
        &["jobs", "list", "--queue", "mail", "--state", "dead"],
    )
    .await;
    let header = table.lines().next().expect("a header line");
    for column in [
        "ID",
        "QUEUE",
        "TYPE",
        "STATE",
        "ATTEMPT",
        "UPDATED",
        "LAST ERROR",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{table}");
    assert!(rows[0].starts_with("mail-2 "), "{table}");
    assert!(rows[0].contains(" dead "), "{table}");
    assert!(rows[0].ends_with("the receiver said no"), "{table}");

    let shown = succeed(&app.url(), &["jobs", "show", "mail-1"]).await;
    assert!(shown.contains("id: mail-1\n"), "{shown}");
    assert!(shown.contains("queue: mail\n"), "{shown}");
    assert!(shown.contains("state: succeeded\n"), "{shown}");
    assert!(shown.contains("attempt: 1\n"), "{shown}");
    assert!(shown.contains("result: {\"done\":\"mail-1\"}\n"), "{shown}");
    assert!(shown.contains("payload: {\"n\":\"mail-1\"}\n"), "{shown}");

    let missing = fail(&app.url(), &["jobs", "show", "no-such-job"]).await;
    assert!(missing.contains("there is no job no-such-job"), "{missing}");
    let bad_state = fail(&app.url(), &["jobs", "list", "--state", "asleep"]).await;
    assert!(bad_state.contains("asleep"), "{bad_state}");
    app.stop().await;
}

#[tokio::test]
async fn without_filters_every_job_of_every_queue_is_listed() {
    let app = app_with_finished_jobs().await;
    let all = json_lines(&succeed(&app.url(), &["jobs", "list", "--json"]).await);
    assert_eq!(ids(&all), ["mail-1", "mail-2", "report-1", "report-2"]);
    let dead =
        json_lines(&succeed(&app.url(), &["jobs", "list", "--state", "dead", "--json"]).await);
    assert_eq!(ids(&dead), ["mail-2"]);
    let mail =
        json_lines(&succeed(&app.url(), &["jobs", "list", "--queue", "mail", "--json"]).await);
    assert_eq!(ids(&mail), ["mail-1", "mail-2"]);
    let none = succeed(&app.url(), &["jobs", "list", "--queue", "nothing-here"]).await;
    assert!(none.contains("(no jobs)"), "{none}");
    app.stop().await;
}

#[tokio::test]
async fn a_running_job_is_cancelled_and_a_dead_job_is_retried_to_success() {
    let flaky = Flaky::default();
    flaky.failures.store(1, Ordering::SeqCst);
    let app = App::spawn(
        Registry::new()
            .register("patient", Patient)
            .register("flaky", flaky.clone()),
    )
    .await;

    app.submit("long-1", "work", "patient").await;
    app.wait_for("long-1", "running").await;
    let out = succeed(&app.url(), &["jobs", "cancel", "long-1"]).await;
    assert_eq!(out.trim(), "long-1 cancelling");
    let cancelled = app.wait_for("long-1", "cancelled").await;
    assert_eq!(cancelled["last_error"], "cancelled by request");

    app.submit("flaky-1", "work", "flaky").await;
    let dead = app.wait_for("flaky-1", "dead").await;
    assert_eq!(dead["attempt"], 1);
    let out = succeed(&app.url(), &["jobs", "retry", "flaky-1"]).await;
    assert_eq!(out.trim(), "flaky-1 requeued");
    let done = app.wait_for("flaky-1", "succeeded").await;
    assert_eq!(done["attempt"], 2);
    assert_eq!(flaky.runs.load(Ordering::SeqCst), 2);

    let not_dead = fail(&app.url(), &["jobs", "retry", "flaky-1"]).await;
    assert!(
        not_dead.contains("job flaky-1 is succeeded; only dead jobs can be retried"),
        "{not_dead}"
    );
    let finished = fail(&app.url(), &["jobs", "cancel", "flaky-1"]).await;
    assert!(
        finished.contains("job flaky-1 already finished as succeeded; nothing changed"),
        "{finished}"
    );
    let missing = fail(&app.url(), &["jobs", "retry", "no-such-job"]).await;
    assert!(missing.contains("there is no job no-such-job"), "{missing}");
    app.stop().await;
}

#[tokio::test]
async fn without_a_job_worker_the_error_names_the_subject_asked() {
    let nats = NatsServer::start();
    let error = fail(&nats.url(), &["jobs", "list"]).await;
    assert!(error.contains(JOBS_CONTROL_LIST), "{error}");
    assert!(error.contains("herald-job-worker"), "{error}");
}
