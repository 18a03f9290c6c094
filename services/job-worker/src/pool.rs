//! The worker pool: one lane per queue, each running at most its configured number of jobs at
//! once, claiming from Redis (queue.rs) as permits free up. A busy slot does not go back to its
//! lane between jobs: the script that records a job's outcome also leases the queue's next
//! pending job to it (BullMQ's fetch-next-on-finish), so each job costs one round trip on the
//! critical path instead of two. A lane sleeps until woken (a job was stored or promoted in this
//! process) or until its poll interval passes (another instance stored one), so an idle pool costs
//! one claim per queue per poll.
//!
//! A running job holds a lease that a heartbeat extends every third of the lease. A heartbeat
//! that finds the lease lost, or heartbeats failing for two thirds of a lease (Redis unreachable),
//! stop the handler: by then the reaper may have handed the job to another worker, and two runs
//! at once are what the lease exists to prevent. A heartbeat that finds a cancel request fires
//! the handler's cancellation token.
//!
//! Shutdown: lanes stop claiming; running jobs get `drain_timeout` to finish; the rest are
//! cancelled and released back to pending with their attempt kept, so nothing is lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use herald_shared::{JobRequest, JobState, headers, messages, telemetry};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::handler::{HandlerError, JobHandler, Registry};
use crate::queue::{Claimed, Heartbeat, Outcome, Queue};
use crate::settings::Settings;

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Queue,
    registry: Registry,
    settings: Settings,
    /// Nudges the outbox publisher after a transition.
    outbox: Arc<Notify>,
    lanes: Mutex<HashMap<String, Arc<Notify>>>,
    tasks: TaskTracker,
    /// Stop claiming.
    stop: CancellationToken,
    /// Drain deadline passed: cancel and release what still runs.
    release: CancellationToken,
}

impl Pool {
    pub fn new(queue: Queue, registry: Registry, settings: Settings, outbox: Arc<Notify>) -> Self {
        Self {
            inner: Arc::new(Inner {
                queue,
                registry,
                settings,
                outbox,
                lanes: Mutex::new(HashMap::new()),
                tasks: TaskTracker::new(),
                stop: CancellationToken::new(),
                release: CancellationToken::new(),
            }),
        }
    }

    /// Tells `queue`'s lane that work may be waiting, starting the lane on first sight.
    pub fn wake(&self, queue: &str) {
        if self.inner.stop.is_cancelled() {
            return;
        }
        let notify = {
            let mut lanes = self
                .inner
                .lanes
                .lock()
                .expect("the lane map lock is never held across a panic");
            match lanes.get(queue) {
                Some(notify) => notify.clone(),
                None => {
                    let notify = Arc::new(Notify::new());
                    lanes.insert(queue.to_owned(), notify.clone());
                    let pool = self.clone();
                    let name = queue.to_owned();
                    let lane_notify = notify.clone();
                    // A root span: a lane lives as long as the pool, and as a child it would
                    // hold open (and never export) the span of whatever first woke it.
                    self.inner.tasks.spawn(
                        async move { pool.lane(name, lane_notify).await }
                            .instrument(tracing::info_span!(parent: None, "lane", queue)),
                    );
                    notify
                }
            }
        };
        notify.notify_one();
    }

    /// Stops claiming, lets running jobs finish within the drain timeout, then releases the
    /// rest. Returns when no job of this pool is running any more.
    pub async fn drain(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        let timeout = self.inner.settings.drain_timeout;
        if tokio::time::timeout(timeout, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?timeout,
                "jobs still running at the drain deadline; releasing them"
            );
            self.inner.release.cancel();
            self.inner.tasks.wait().await;
        }
    }

    async fn lane(self, queue: String, notify: Arc<Notify>) {
        let inner = &self.inner;
        let limit = inner.settings.concurrency_of(&queue);
        let permits = Arc::new(Semaphore::new(limit));
        loop {
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                () = inner.stop.cancelled() => return,
            };
            let free = permits.available_permits() + 1;
            match inner.queue.claim(&queue, free, inner.settings.lease).await {
                Ok(jobs) if jobs.is_empty() => {
                    drop(permit);
                    tokio::select! {
                        () = notify.notified() => {}
                        () = tokio::time::sleep(inner.settings.poll) => {}
                        () = inner.stop.cancelled() => return,
                    }
                }
                Ok(jobs) => {
                    inner.outbox.notify_one();
                    let mut permit = Some(permit);
                    for job in jobs {
                        // Only this loop takes permits, and it claimed no more than were free.
                        let permit = permit.take().unwrap_or_else(|| {
                            permits
                                .clone()
                                .try_acquire_owned()
                                .expect("claimed at most as many jobs as free permits")
                        });
                        let pool = self.clone();
                        inner
                            .tasks
                            .spawn(async move { pool.run(job, permit).await });
                    }
                }
                Err(e) => {
                    drop(permit);
                    tracing::warn!(error = %e, "cannot claim jobs; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(inner.settings.poll) => {}
                        () = inner.stop.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Runs `job`, then, while the queue has work and the pool is not stopping, the job its
    /// completion leased next, all under the one permit.
    async fn run(self, job: Claimed, _permit: OwnedSemaphorePermit) {
        let mut next = Some(job);
        while let Some(job) = next {
            next = self.run_one(job).await;
        }
    }

    /// Runs one job and records its outcome; returns the job leased with the record, if any.
    async fn run_one(&self, job: Claimed) -> Option<Claimed> {
        let span =
            tracing::info_span!("job", id = %job.id, queue = %job.queue, attempt = job.attempt);
        let mut carried = async_nats::HeaderMap::new();
        if let Some(traceparent) = &job.traceparent {
            carried.insert(headers::TRACEPARENT, traceparent.as_str());
        }
        telemetry::adopt_context(&span, Some(&carried));
        async {
            let started = Instant::now();
            let request: JobRequest = match messages::decode(job.request.as_bytes()) {
                Ok(request) => request,
                Err(e) => {
                    let error = format!("the stored request is unreadable: {e}");
                    return self
                        .record(&job, "unknown", Outcome::Dead { error }, started)
                        .await;
                }
            };
            let Some(handler) = self.inner.registry.get(&request.job_type) else {
                let error = format!(
                    "no handler is registered for job type `{}`",
                    request.job_type
                );
                return self
                    .record(&job, &request.job_type, Outcome::Dead { error }, started)
                    .await;
            };
            match self.execute(&job, &request, handler.as_ref()).await {
                Some(outcome) => self.record(&job, &request.job_type, outcome, started).await,
                // The lease was lost: nothing to record, and the permit goes back to the lane.
                None => None,
            }
        }
        .instrument(span)
        .await
    }

    /// Runs the handler under heartbeat; `None` when the lease was lost (nothing to record).
    async fn execute(
        &self,
        job: &Claimed,
        request: &JobRequest,
        handler: &dyn JobHandler,
    ) -> Option<Outcome> {
        let settings = &self.inner.settings;
        let cancel = CancellationToken::new();
        let timeout = Duration::from_millis(request.timeout_ms.max(1));
        let work = tokio::time::timeout(timeout, handler.run(request, cancel.clone()));
        tokio::pin!(work);
        let beat = settings.heartbeat();
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + beat, beat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_held = Instant::now();
        let mut cancel_requested = false;
        let result = loop {
            tokio::select! {
                result = &mut work => break result,
                _ = heartbeat.tick() => {
                    let sent = Instant::now();
                    match tokio::time::timeout(beat, self.inner.queue.heartbeat(job, settings.lease)).await {
                        Ok(Ok(Heartbeat::Held)) => last_held = sent,
                        Ok(Ok(Heartbeat::CancelRequested)) => {
                            last_held = sent;
                            if !cancel_requested {
                                tracing::info!("cancel requested; asking the handler to stop");
                            }
                            cancel_requested = true;
                            cancel.cancel();
                        }
                        Ok(Ok(Heartbeat::Lost)) => {
                            tracing::warn!("lease lost (the job was re-queued); stopping the handler");
                            cancel.cancel();
                            return None;
                        }
                        Ok(Err(e)) => tracing::warn!(error = %e, "heartbeat failed"),
                        Err(_) => tracing::warn!("heartbeat timed out"),
                    }
                    if last_held.elapsed() >= settings.lease * 2 / 3 {
                        tracing::warn!("no heartbeat for two thirds of the lease; stopping the handler");
                        cancel.cancel();
                        return None;
                    }
                }
                () = self.inner.release.cancelled() => {
                    cancel.cancel();
                    return Some(Outcome::Released);
                }
            }
        };
        Some(match result {
            Ok(Ok(result)) => Outcome::Succeeded { result },
            _ if cancel_requested => Outcome::Cancelled,
            Ok(Err(HandlerError::Permanent(error))) => Outcome::Dead { error },
            Ok(Err(HandlerError::Transient(error))) => retry_or_die(request, job, error),
            Err(_) => retry_or_die(request, job, format!("timed out after {timeout:?}")),
        })
    }

    /// Records the outcome, retrying while Redis is unreachable, and unless the pool is stopping
    /// (or the job was released for the stop), leases the queue's next job in the same step (on
    /// the first try only). Giving up is safe: the lease expires and the job runs again.
    async fn record(
        &self,
        job: &Claimed,
        job_type: &str,
        outcome: Outcome,
        started: Instant,
    ) -> Option<Claimed> {
        let queue = &self.inner.queue;
        // Only the first try leases a next job: a try whose reply was lost may have leased one
        // already (to a token nobody holds; the reaper takes it back), and every retry doing the
        // same would strand one more job per lost reply.
        let mut first_try = true;
        let recorded = (|| {
            let first = std::mem::replace(&mut first_try, false);
            let chain =
                first && !self.inner.stop.is_cancelled() && !matches!(outcome, Outcome::Released);
            queue.complete_and_claim(job, &outcome, chain.then_some(self.inner.settings.lease))
        })
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(1))
                .with_max_times(30),
        )
        .notify(|e, delay| tracing::warn!(error = %e, ?delay, "cannot record the job outcome yet"))
        .await;
        // A next job is leased only with a recorded completion, whose notify below covers the
        // leased job's `running` event too.
        let (recorded, next) = match recorded {
            Ok((recorded, next)) => (Ok(recorded), next),
            Err(e) => (Err(e), None),
        };
        match recorded {
            Ok(true) => {
                self.inner.outbox.notify_one();
                let state = match &outcome {
                    Outcome::Succeeded { .. } => JobState::Succeeded,
                    Outcome::Failed { .. } => JobState::Failed,
                    Outcome::Dead { .. } => JobState::Dead,
                    Outcome::Cancelled => JobState::Cancelled,
                    Outcome::Released => JobState::Pending,
                };
                let labels = [
                    ("queue", job.queue.clone()),
                    ("job_type", job_type.to_owned()),
                ];
                metrics::counter!("herald_jobs_completed_total", "state" => state.as_str())
                    .increment(1);
                metrics::histogram!("herald_job_duration_seconds", &labels)
                    .record(started.elapsed().as_secs_f64());
                match &outcome {
                    Outcome::Failed { error, delay } => {
                        metrics::counter!("herald_jobs_retries_total", &labels).increment(1);
                        tracing::info!(%error, ?delay, "job failed; will retry");
                    }
                    Outcome::Dead { error } => {
                        metrics::counter!("herald_jobs_dead_total", &labels).increment(1);
                        tracing::warn!(%error, "job is dead");
                    }
                    _ => tracing::debug!(state = state.as_str(), "job finished"),
                }
                if matches!(outcome, Outcome::Failed { .. } | Outcome::Released) {
                    // A retry is promoted by the tick; a released job can be claimed at once.
                    self.wake(&job.queue);
                }
            }
            Ok(false) => tracing::warn!("outcome not recorded: the job is no longer ours"),
            Err(e) => tracing::error!(error = %e, "outcome not recorded; the job will run again"),
        }
        next
    }
}

fn retry_or_die(request: &JobRequest, job: &Claimed, error: String) -> Outcome {
    let attempt = job.policy_attempt();
    match request.retry.delay_after(attempt) {
        Some(delay) => Outcome::Failed { error, delay },
        None => Outcome::Dead {
            error: format!("gave up after {attempt} attempts: {error}"),
        },
    }
}
