//! The consuming loop: one durable pull consumer on HERALD_ACTIONS per set of kinds (its name is
//! derived from the kinds, so replicas running different kinds never overwrite each other's
//! filter), shared by the replicas that run the same kinds, with at most `concurrency` actions in
//! flight. Messages are fetched only as slots free up, so nothing waits in a local buffer while
//! its ack timer runs.
//!
//! One delivery goes: decode → circuit breaker → Redis claim → execute (lease and ack timer kept
//! alive) → done marker / lease release → outcome → ack, NAK or dead letter. Everything after the
//! Redis step is one `Disposition` settled by the shared `consume::Settler`: the outcome is
//! published before the ack, and the dead letter is stored before the original is terminated, so
//! a crash anywhere repeats work rather than losing it. A success is marked done (with its
//! attempt, status and latency) before its outcome is published: an outcome that cannot be
//! published never makes the action run again; the redelivery finds it done and publishes the
//! `succeeded` outcome then (same Msg-Id, so a repeat is absorbed).
//!
//! Retries and put-backs hold nothing: the shared settler is built `rescheduling`, so a retry
//! (or a put-back) stores a scheduled copy of the action on
//! `herald.actions._scheduled.<kind>.<observer>.<token>` that the server publishes on the
//! action's subject when its delay is over, and acks the delivery (`herald_shared::schedule`).
//! However many actions wait for a retry, none counts against `max_ack_pending`, and one
//! destination's failures never delay another's actions. Actions are not run in key order
//! (`concurrency` run at once, and a retry comes back behind later actions), except those of an
//! ordered observer: each waits, put back without spending an attempt, until the previous action
//! of its line is settled (`dedup.rs`, contracts/README.md "Ordered observers").
//!
//! Attempts: the attempt number is the attempts of earlier copies (`Herald-Attempts` on a
//! scheduled copy) plus JetStream's delivery count of this copy, minus the deliveries that were
//! put back without running (circuit open, lease busy, pace), counted in Redis (`dedup.rs`). A
//! delivery cut short by a crash counts as an attempt. The consumer has no MaxDeliver: the
//! worker itself dead-letters once `retry.max_attempts` is spent, or earlier when the next retry
//! would come after HERALD_ACTIONS' retention deletes the action. A receiver's `Retry-After` is honoured up
//! to `retry_after_ceiling`. The time of the first failure is kept in Redis and becomes the dead
//! letter's `Herald-First-Failed-At`. Every attempt publishes one ActionOutcome (succeeded,
//! retrying or dead-lettered), a delivery of an already-done action publishes a `duplicate` one,
//! and a put-back delivery publishes none: it was not an attempt.
//!
//! One destination cannot take every slot: at most `per_destination_concurrency` requests run
//! against one `host:port` at once (`pace.rs`; a place is held from the claim until the
//! destination answers, not while the action is settled); as many more as the destination clears
//! within `PACE_PATIENCE` at its recent pace wait for a place with their slot given back (at most
//! `WAITING_PER_SLOT` × `concurrency` in all), and the rest are put back without spending an
//! attempt.
//!
//! Redis down: a claim, `done` marker or release that cannot reach Redis is retried every
//! `redis_retry` while the message is held (ack timer renewed), and the loop fetches nothing new
//! until Redis answers. Dedup is never skipped; actions wait and then run exactly once.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::pull};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use herald_shared::consume::{Disposition, Publication, Settled, Settler};
use herald_shared::messages::{self, ActionOutcome, ActionRequest, OutcomeStatus};
use herald_shared::subjects::{self, ACTIONS_STREAM, DlqSource};
use herald_shared::{SCHEMA_VERSION, headers, schedule, telemetry};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::breaker::{Admission, Breakers, Verdict};
use crate::dedup::{Claim, Completed, Dedup, DedupError, Lease, LinePlace};
use crate::error::ActionError;
use crate::kind::{ActionKind, Registry, Success};
use crate::pace::{Pacer, Place};
use crate::settings::Settings;

/// The `Herald-Dead-Lettered-By` of this service's dead letters.
pub const SERVICE: &str = "action-worker";

/// Upper bound of the wait before a busy lease is looked at again.
const BUSY_RECHECK: Duration = Duration::from_secs(1);
/// The wait before an action put back for its destination's pace comes again.
const PACE_RECHECK: Duration = Duration::from_millis(500);
/// The wait before an ordered action whose predecessor is unsettled looks again: at least the
/// first, at most the second.
const ORDER_RECHECK: Duration = Duration::from_millis(200);
const ORDER_RECHECK_MAX: Duration = Duration::from_secs(5);
/// How long an action over its destination's share waits for a place before it is put back.
const PACE_PATIENCE: Duration = Duration::from_millis(500);
/// How many actions may wait for a place in all, per slot. A waiting action holds no slot, only
/// its message (unacknowledged, for at most `PACE_PATIENCE`), so a burst to one fast receiver
/// waits its turn instead of being put back and fetched again.
const WAITING_PER_SLOT: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot open the HERALD_ACTIONS stream: {0}")]
    Stream(#[from] jetstream::context::GetStreamError),
    #[error("cannot create the consumer: {0}")]
    Consumer(#[from] jetstream::stream::ConsumerError),
    #[error("an action kind token is invalid: {0}")]
    Subject(#[from] subjects::InvalidToken),
}

pub struct Worker {
    jetstream: jetstream::Context,
    registry: Registry,
    dedup: Dedup,
    breakers: Breakers,
    pacer: Pacer,
    /// One permit per action in flight (`concurrency`); an action waiting for its
    /// destination's pace gives its permit back meanwhile.
    slots: Arc<Semaphore>,
    settings: Settings,
    redis_up: watch::Sender<bool>,
    shutdown: CancellationToken,
    settler: Settler,
    /// HERALD_ACTIONS' `max_age`, when it has one: no retry may be scheduled past it.
    retention: Option<Duration>,
}

impl Worker {
    pub fn new(
        jetstream: jetstream::Context,
        registry: Registry,
        dedup: Dedup,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> Self {
        let settler = Settler::new(jetstream.clone(), DlqSource::Actions, SERVICE, BUSY_RECHECK)
            .rescheduling(subjects::scheduled_action);
        Self {
            jetstream,
            registry,
            dedup,
            breakers: Breakers::new(settings.breaker.clone()),
            pacer: Pacer::new(
                settings.per_destination_concurrency,
                settings.concurrency.saturating_mul(WAITING_PER_SLOT),
            ),
            slots: Arc::new(Semaphore::new(settings.concurrency)),
            settings,
            redis_up: watch::Sender::new(true),
            shutdown,
            settler,
            retention: None,
        }
    }

    /// Consumes until shutdown, then waits for the actions in flight to finish.
    pub async fn run(mut self) -> Result<(), WorkerError> {
        let filter_subjects = self
            .registry
            .names()
            .filter(|k| self.settings.kinds.iter().any(|s| s == k))
            .map(subjects::actions_of_kind)
            .collect::<Result<Vec<_>, _>>()?;
        let stream = self.jetstream.get_stream(ACTIONS_STREAM).await?;
        let max_age = stream.cached_info().config.max_age;
        self.retention = (!max_age.is_zero()).then_some(max_age);
        let name = self.settings.consumer_name();
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(name.clone()),
                description: Some(format!(
                    "Herald action workers for {:?}",
                    self.settings.kinds
                )),
                filter_subjects,
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: self.settings.ack_wait,
                max_ack_pending: self.settings.max_ack_pending,
                max_deliver: -1,
                ..Default::default()
            })
            .await?;
        tracing::info!(consumer = %name, kinds = ?self.settings.kinds, "consuming actions");
        let worker = Arc::new(self);

        let slots = Arc::clone(&worker.slots);
        let tasks = TaskTracker::new();
        let mut redis_up = worker.redis_up.subscribe();
        loop {
            // Paused while Redis is down: held messages retry it and flip this back.
            tokio::select! {
                _ = worker.shutdown.cancelled() => break,
                up = redis_up.wait_for(|up| *up) => if up.is_err() { break },
            }
            let first = tokio::select! {
                _ = worker.shutdown.cancelled() => break,
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break,
                },
            };
            let wanted = 1 + slots.available_permits();
            let batch = consumer
                .batch()
                .max_messages(wanted)
                .expires(Duration::from_secs(1))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(error = %e, "fetching actions failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let mut first = Some(first);
            while let Some(next) = batch.next().await {
                let message = match next {
                    Ok(message) => message,
                    Err(e) => {
                        tracing::warn!(error = %e, "a fetched message could not be read");
                        continue;
                    }
                };
                let slot = match first.take() {
                    Some(slot) => slot,
                    None => match slots.clone().acquire_owned().await {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                };
                tasks.spawn(worker.clone().handle(message, slot));
            }
        }
        tasks.close();
        tasks.wait().await;
        Ok(())
    }

    async fn handle(self: Arc<Self>, message: jetstream::Message, slot: OwnedSemaphorePermit) {
        metrics::gauge!("herald_actions_in_flight").increment(1.0);
        let span = tracing::info_span!("action", subject = %message.subject);
        telemetry::adopt_context(&span, message.headers.as_ref());
        self.deliver(&message, slot).instrument(span).await;
        metrics::gauge!("herald_actions_in_flight").decrement(1.0);
    }

    /// `slot` is this delivery's permit of `slots`, held until it is settled.
    async fn deliver(&self, message: &jetstream::Message, slot: OwnedSemaphorePermit) {
        let mut slot = Some(slot);
        let (delivered, sequence) = match message.info() {
            Ok(info) => (
                u32::try_from(info.delivered).unwrap_or(u32::MAX),
                info.stream_sequence,
            ),
            Err(_) => (1, 0),
        };
        // Attempts made on the copies this one was scheduled from.
        let prior = schedule::prior_attempts(message);
        let request: ActionRequest = match messages::decode(&message.payload) {
            Ok(request) => request,
            Err(e) => {
                let undecodable =
                    Disposition::dead_letter(format!("undecodable action request: {e}"));
                self.settler
                    .settle(message, undecodable.attempts(prior + delivered))
                    .await;
                return;
            }
        };
        let (kind, destination) = match self.accept(message, &request) {
            Ok(accepted) => accepted,
            Err(error) => {
                metrics::counter!("herald_actions_failed_total", "kind" => request.kind.clone(), "class" => error.class())
                    .increment(1);
                let Some(first_failed_at) = self.first_failure(message, &request).await else {
                    return;
                };
                let disposition = self.give_up(
                    message,
                    &request,
                    prior.saturating_add(delivered),
                    &error,
                    Duration::ZERO,
                    first_failed_at,
                );
                if self.settler.settle(message, disposition).await == Settled::DeadLettered {
                    self.leave_line(message, &request).await;
                }
                return;
            }
        };

        // Paced before the breaker is asked: a probe it admits must run.
        let pace_place = match &destination {
            Some(host) => match self.pacer.enter(host) {
                Some(place) => Some(place),
                None => match self.wait_for_place(host, &mut slot).await {
                    Some(place) => Some(place),
                    None => {
                        tracing::debug!(
                            host,
                            "destination at its share of slots; putting the action back"
                        );
                        self.put_back(message, &request, (prior, delivered), PACE_RECHECK)
                            .await;
                        return;
                    }
                },
            },
            None => None,
        };
        if let Some(host) = &destination
            && let Admission::Wait(delay) = self.breakers.admit(host, Instant::now())
        {
            tracing::debug!(host, ?delay, "circuit open; putting the action back");
            self.put_back(message, &request, (prior, delivered), delay)
                .await;
            return;
        }

        let place = place_in_line(&request);
        let patience = self.settings.order_patience;
        let claim = self
            .with_redis(message, || {
                self.dedup
                    .claim(&request.id, sequence, place.as_ref(), patience)
            })
            .await;
        let (lease, deferrals) = match claim {
            None => return,
            Some(Claim::Done(completed)) => {
                metrics::counter!("herald_actions_dedup_hits_total", "kind" => request.kind.clone())
                    .increment(1);
                self.finish_duplicate(message, &request, delivered, completed)
                    .await;
                return;
            }
            Some(unclaimed @ (Claim::Busy | Claim::Waiting(_))) => {
                if let Some(host) = &destination {
                    // The admission was a probe perhaps; nothing was learned about the host.
                    self.breakers.record(host, Verdict::Unknown, Instant::now());
                }
                let delay = if let Claim::Waiting(waited) = unclaimed {
                    metrics::counter!("herald_actions_order_waits_total", "kind" => request.kind.clone())
                        .increment(1);
                    tracing::debug!(
                        ?waited,
                        "the previous action of this line is not settled; putting the action back"
                    );
                    // Soon at first (the predecessor is usually running), less often the longer
                    // the line has waited (a predecessor waiting out a retry or a crashed
                    // worker's lease), so a long wait does not fill the stream with put-backs.
                    (waited / 4).clamp(ORDER_RECHECK, ORDER_RECHECK_MAX)
                } else {
                    BUSY_RECHECK.min(self.dedup.lease_duration() / 2)
                };
                self.put_back(message, &request, (prior, delivered), delay)
                    .await;
                return;
            }
            Some(Claim::Claimed {
                lease,
                deferrals,
                out_of_line,
            }) => {
                if let Some(waited) = out_of_line {
                    metrics::counter!("herald_actions_out_of_line_total", "kind" => request.kind.clone())
                        .increment(1);
                    tracing::warn!(
                        ?waited,
                        line = %request.order_line(),
                        "the previous action of this line is still not settled after the \
                         patience; running this one out of line"
                    );
                }
                (lease, deferrals)
            }
        };
        let attempt = prior.saturating_add(delivered.saturating_sub(deferrals).max(1));

        metrics::counter!("herald_actions_executed_total", "kind" => request.kind.clone())
            .increment(1);
        let started = Instant::now();
        let result = {
            let keep_alive = self.keep_alive(message, &lease);
            tokio::select! {
                result = kind.execute(&request) => result,
                never = keep_alive => match never {},
            }
        };
        let elapsed = started.elapsed();
        metrics::histogram!("herald_action_duration_seconds", "kind" => request.kind.clone())
            .record(elapsed.as_secs_f64());

        if let Some(host) = &destination {
            let verdict = match &result {
                Ok(_) => Verdict::Healthy,
                Err(ActionError::Transient(_)) => Verdict::Failing,
                Err(ActionError::Permanent(f)) if f.http_status.is_some() => Verdict::Healthy,
                Err(ActionError::Permanent(_)) => Verdict::Unknown,
            };
            self.breakers.record(host, verdict, Instant::now());
        }
        // The destination is done with this action: its place goes to the next one while this
        // one is settled (Redis, the outcome's publish ack, the message's ack), which the
        // destination never sees.
        if let Some(pace_place) = pace_place {
            pace_place.ran();
        }

        self.settle(message, &request, attempt, &lease, result, elapsed)
            .await;
    }

    /// Moves the line of an ordered action that was dead-lettered on, so its successors run.
    async fn leave_line(&self, message: &jetstream::Message, request: &ActionRequest) {
        if let Some(place) = place_in_line(request)
            && self
                .with_redis(message, || self.dedup.advance(&place))
                .await
                .is_none()
        {
            tracing::warn!("line not moved on; its next action runs after the patience");
        }
    }

    /// Records how an executed attempt ended. A success is marked done in Redis before anything
    /// else, so an outcome that cannot be published never makes the action run again (the
    /// redelivery finds it done and publishes the outcome then). A failure releases the lease
    /// and retries, or dead-letters; outcomes, dead letters, acks, NAKs and TERMs all go through
    /// the shared `Settler`.
    async fn settle(
        &self,
        message: &jetstream::Message,
        request: &ActionRequest,
        attempt: u32,
        lease: &Lease,
        result: Result<Success, ActionError>,
        elapsed: Duration,
    ) {
        let error = match result {
            Ok(success) => {
                metrics::counter!("herald_actions_succeeded_total", "kind" => request.kind.clone())
                    .increment(1);
                let completed = Completed {
                    stream_sequence: message
                        .info()
                        .map(|i| i.stream_sequence)
                        .unwrap_or_default(),
                    attempt,
                    http_status: success.http_status,
                    latency_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                };
                let place = place_in_line(request);
                if self
                    .with_redis(message, || {
                        self.dedup.complete(lease, &completed, place.as_ref())
                    })
                    .await
                    .is_none()
                {
                    return;
                }
                let mut ack = Disposition::ack();
                if let Some(outcome) = self.publication(message, &succeeded(request, &completed)) {
                    ack = ack.publishing_first(outcome);
                }
                self.settler.settle(message, ack).await;
                return;
            }
            Err(error) => error,
        };
        metrics::counter!("herald_actions_failed_total", "kind" => request.kind.clone(), "class" => error.class())
            .increment(1);
        let Some(first_failed_at) = self.first_failure(message, request).await else {
            return;
        };
        let next = match &error {
            ActionError::Transient(f) => request.retry.delay_after(attempt).map(|delay| {
                let ceiling = self.settings.retry_after_ceiling;
                f.retry_after
                    .map_or(delay, |asked| asked.min(ceiling).max(delay))
            }),
            ActionError::Permanent(_) => None,
        };
        let next = match next {
            Some(delay) => match self.outlived_by(message, delay) {
                None => Ok(delay),
                Some(retention) => Err(format!(
                    "{error}; its next attempt, in {}, would come after the stream's retention \
                     ({}) deletes it",
                    humantime_serde::re::humantime::format_duration(delay),
                    humantime_serde::re::humantime::format_duration(retention)
                )),
            },
            None => Err(error.to_string()),
        };
        match next {
            Ok(delay) => {
                tracing::info!(attempt, ?delay, %error, "action failed; retrying");
                let mut outcome = outcome(request, attempt, OutcomeStatus::Retrying, elapsed);
                describe(&mut outcome, &error);
                // Released first: the retry need not wait for the lease to expire.
                if self
                    .with_redis(message, || self.dedup.release(lease))
                    .await
                    .is_none()
                {
                    return;
                }
                let mut retry = Disposition::retry(delay)
                    .attempts(attempt)
                    .first_failed_at(Some(first_failed_at));
                if let Some(outcome) = self.publication(message, &outcome) {
                    retry = retry.publishing_first(outcome);
                }
                self.settler.settle(message, retry).await;
            }
            Err(reason) => {
                let mut disposition =
                    self.give_up(message, request, attempt, &error, elapsed, first_failed_at);
                if let Disposition::DeadLetter(give_up) = &mut disposition {
                    give_up.reason = format!("{reason} (after {attempt} attempt(s))");
                }
                if self.settler.settle(message, disposition).await == Settled::DeadLettered {
                    self.leave_line(message, request).await;
                    // A replay from the DLQ must run again, so the lease goes, not `done`.
                    if self
                        .with_redis(message, || self.dedup.release(lease))
                        .await
                        .is_none()
                    {
                        tracing::warn!("lease not released; it expires on its own");
                    }
                }
            }
        }
    }

    /// The stream's retention when waiting `delay` would let it delete the action first.
    fn outlived_by(&self, message: &jetstream::Message, delay: Duration) -> Option<Duration> {
        let retention = self.retention?;
        let published = message.info().ok()?.published;
        let now = i128::from(Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX));
        let age_nanos = u64::try_from(now - published.unix_timestamp_nanos()).unwrap_or(0);
        let age = Duration::from_nanos(age_nanos);
        let margin = self.settings.ack_wait;
        (age + delay + margin >= retention).then_some(retention)
    }

    /// When this action first failed, recorded in Redis at the first failure.
    async fn first_failure(
        &self,
        message: &jetstream::Message,
        request: &ActionRequest,
    ) -> Option<DateTime<Utc>> {
        self.with_redis(message, || self.dedup.first_failure(&request.id))
            .await
    }

    /// The checks a request passes before anything runs: its subject, kind, retry policy and
    /// kind-specific config. Failing one is permanent.
    fn accept(
        &self,
        message: &jetstream::Message,
        request: &ActionRequest,
    ) -> Result<(Arc<dyn ActionKind>, Option<String>), ActionError> {
        let prefix = subjects::ACTIONS_ALL.trim_end_matches(".>");
        let tokens = subjects::tail_tokens(&message.subject, prefix).unwrap_or_default();
        if tokens != [request.kind.as_str(), request.observer.as_str()] {
            return Err(ActionError::permanent(format!(
                "published on `{}` but names kind `{}` and observer `{}`",
                message.subject, request.kind, request.observer
            )));
        }
        let kind = self.registry.get(&request.kind).cloned().ok_or_else(|| {
            ActionError::permanent(format!("unknown action kind `{}`", request.kind))
        })?;
        if let Some((key, problem)) = request.retry.problems("retry").into_iter().next() {
            return Err(ActionError::permanent(format!(
                "invalid retry policy: {key} {problem}"
            )));
        }
        let destination = kind.destination(request)?;
        Ok((kind, destination))
    }

    /// Renews the lease and the ack timer until dropped.
    async fn keep_alive(&self, message: &jetstream::Message, lease: &Lease) -> Infallible {
        let every = self.dedup.lease_duration().min(self.settings.ack_wait) / 3;
        loop {
            tokio::time::sleep(every).await;
            match self.dedup.extend(lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!("lease lost while the action ran; another worker may repeat it")
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew the lease"),
            }
            if let Err(e) = message.ack_with(AckKind::Progress).await {
                tracing::warn!(error = %e, "cannot renew the ack timer");
            }
        }
    }

    /// Runs a Redis operation until it succeeds, holding the message meanwhile and pausing the
    /// fetch loop. `None` when shut down first; the message is then put back.
    async fn with_redis<T, F, Fut>(&self, message: &jetstream::Message, op: F) -> Option<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, DedupError>>,
    {
        loop {
            match op().await {
                Ok(value) => {
                    self.redis_up
                        .send_if_modified(|up| !std::mem::replace(up, true));
                    return Some(value);
                }
                Err(e) => {
                    if self
                        .redis_up
                        .send_if_modified(|up| std::mem::replace(up, false))
                    {
                        tracing::error!(error = %e, "Redis unavailable: pausing consumption until it answers");
                    }
                    if let Err(e) = message.ack_with(AckKind::Progress).await {
                        tracing::warn!(error = %e, "cannot renew the ack timer");
                    }
                    tokio::select! {
                        _ = self.shutdown.cancelled() => {
                            nak(message, Duration::ZERO).await;
                            return None;
                        }
                        () = tokio::time::sleep(self.settings.redis_retry) => {}
                    }
                }
            }
        }
    }

    /// Waits up to `PACE_PATIENCE` for a place against `host`, with the delivery's `slot` given
    /// back meanwhile so that other destinations' actions run, and taken again afterwards, so
    /// that running or putting back is bounded by `concurrency` as before. `None` when the
    /// destination's queue is full, the wait is over or the worker shuts down; the delivery is
    /// then put back.
    async fn wait_for_place(
        &self,
        host: &str,
        slot: &mut Option<OwnedSemaphorePermit>,
    ) -> Option<Place> {
        drop(slot.take());
        let place = tokio::select! {
            _ = self.shutdown.cancelled() => None,
            place = self.pacer.enter_within(host, PACE_PATIENCE) => place,
        };
        *slot = Arc::clone(&self.slots).acquire_owned().await.ok();
        place
    }

    /// Puts back a delivery that did not run, counting it so it spends no attempt. `attempts` are
    /// the earlier copies' attempts and this copy's delivery count.
    async fn put_back(
        &self,
        message: &jetstream::Message,
        request: &ActionRequest,
        (prior, delivered): (u32, u32),
        delay: Duration,
    ) {
        let sequence = message.info().map_or(0, |i| i.stream_sequence);
        if let Some(deferrals) = self
            .with_redis(message, || self.dedup.defer(&request.id, sequence))
            .await
        {
            let made = prior.saturating_add(delivered.saturating_sub(deferrals));
            self.settler
                .settle(message, Disposition::defer(delay).attempts(made))
                .await;
        }
    }

    /// A delivery of an action already done. The redelivery of the very message that succeeded
    /// (its outcome could not be published then) publishes that `succeeded` outcome, under the
    /// Msg-Id it would have had; any other delivery publishes a `duplicate` one. Then the ack.
    async fn finish_duplicate(
        &self,
        message: &jetstream::Message,
        request: &ActionRequest,
        delivered: u32,
        completed: Option<Completed>,
    ) {
        let sequence = message.info().map(|i| i.stream_sequence).ok();
        let outcome = match completed {
            Some(completed) if Some(completed.stream_sequence) == sequence => {
                succeeded(request, &completed)
            }
            _ => outcome(request, delivered, OutcomeStatus::Duplicate, Duration::ZERO),
        };
        let mut ack = Disposition::ack();
        if let Some(outcome) = self.publication(message, &outcome) {
            ack = ack.publishing_first(outcome);
        }
        self.settler.settle(message, ack).await;
    }

    /// The dead letter for an action given up on, its `dead_lettered` outcome published first.
    fn give_up(
        &self,
        message: &jetstream::Message,
        request: &ActionRequest,
        attempt: u32,
        error: &ActionError,
        latency: Duration,
        first_failed_at: DateTime<Utc>,
    ) -> Disposition {
        let mut outcome = outcome(request, attempt, OutcomeStatus::DeadLettered, latency);
        describe(&mut outcome, error);
        let mut letter = Disposition::dead_letter(format!("{error} (after {attempt} attempt(s))"))
            .attempts(attempt)
            .first_failed_at(Some(first_failed_at));
        let failure = error.failure();
        if let Some(status) = failure.http_status {
            letter = letter.header(headers::HTTP_STATUS, status.to_string());
        }
        if let Some(snippet) = &failure.snippet {
            letter = letter.header(headers::RESPONSE_SNIPPET, snippet.clone());
        }
        if let Some(outcome) = self.publication(message, &outcome) {
            letter = letter.publishing_first(outcome);
        }
        letter
    }

    /// An outcome ready to publish on `herald.outcomes.<kind>.<observer>`, or `None` (logged)
    /// when the action's names cannot make that subject.
    fn publication(
        &self,
        message: &jetstream::Message,
        outcome: &ActionOutcome,
    ) -> Option<Publication> {
        let subject = match subjects::outcome(&outcome.kind, &outcome.observer) {
            Ok(subject) => subject,
            Err(e) => {
                tracing::error!(error = %e, "no outcome subject for this action");
                return None;
            }
        };
        match Publication::json(subject, &outcome_msg_id(message, outcome), outcome) {
            Ok(publication) => Some(publication),
            Err(e) => {
                tracing::error!(error = %e, "cannot serialise an outcome");
                None
            }
        }
    }
}

/// An ordered action's line and place (`ActionRequest::order`), for its claim and settlement.
fn place_in_line(request: &ActionRequest) -> Option<LinePlace> {
    request.order.map(|order| LinePlace {
        line: request.order_line(),
        sequence: order.sequence,
        after: order.after.unwrap_or(0),
    })
}

fn succeeded(request: &ActionRequest, completed: &Completed) -> ActionOutcome {
    let mut outcome = outcome(
        request,
        completed.attempt,
        OutcomeStatus::Succeeded,
        Duration::from_millis(completed.latency_ms),
    );
    outcome.http_status = completed.http_status;
    outcome
}

fn outcome(
    request: &ActionRequest,
    attempt: u32,
    status: OutcomeStatus,
    latency: Duration,
) -> ActionOutcome {
    ActionOutcome {
        action_id: request.id.clone(),
        event_id: request.event.id,
        kind: request.kind.clone(),
        observer: request.observer.clone(),
        attempt,
        status,
        latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
        error: None,
        http_status: None,
        at: Utc::now(),
        schema_version: SCHEMA_VERSION,
    }
}

/// The outcome's Msg-Id: `<action id>:<attempt>` (`ActionOutcome::msg_id`) for the action as the
/// dispatcher published it (Msg-Id = action id) and its scheduled retries, which name that
/// Msg-Id in `Herald-Original-Msg-Id` and go on counting its attempts. Another copy of the same action — a DLQ replay
/// (Msg-Id `<action id>:replay:<seq>`) or a copy published without a Msg-Id — numbers its
/// attempts from 1 again, so its outcomes are keyed by that copy's own Msg-Id (or stream
/// sequence) instead; otherwise JetStream would absorb them as repeats of the first copy's.
/// A duplicate's delivery count can equal a real attempt's, so it is keyed apart too.
fn outcome_msg_id(message: &jetstream::Message, outcome: &ActionOutcome) -> String {
    let sequence = message
        .info()
        .map(|i| i.stream_sequence)
        .unwrap_or_default();
    if outcome.status == OutcomeStatus::Duplicate {
        return format!("{}:duplicate:{sequence}", outcome.action_id);
    }
    match schedule::original_msg_id(message) {
        Some(id) if id == outcome.action_id => outcome.msg_id(),
        Some(id) => format!("{id}:{}", outcome.attempt),
        None => format!("{}@{sequence}:{}", outcome.action_id, outcome.attempt),
    }
}

fn describe(outcome: &mut ActionOutcome, error: &ActionError) {
    outcome.error = Some(error.to_string());
    outcome.http_status = error.failure().http_status;
}

async fn nak(message: &jetstream::Message, delay: Duration) {
    if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
        // Unacknowledged, it comes back after ack_wait anyway.
        tracing::warn!(error = %e, "NAK failed");
    }
}
