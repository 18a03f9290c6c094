//! The consuming loop: one durable pull consumer on HERALD_ACTIONS, filtered to the kinds this
//! replica runs and shared by every replica (same durable name), with at most `concurrency`
//! actions in flight. Messages are fetched only as slots free up, so nothing waits in a local
//! buffer while its ack timer runs.
//!
//! One delivery goes: decode → circuit breaker → Redis claim → execute (lease and ack timer kept
//! alive) → outcome → done marker / DLQ → ack. The outcome is published before the ack, and the
//! dead letter is stored before the original is terminated, so a crash anywhere repeats work
//! rather than losing it; the repeat meets the lease or the `done` marker.
//!
//! Attempts: the attempt number is JetStream's delivery count minus the deliveries that were put
//! back without running (circuit open, lease busy), counted in Redis (`dedup.rs`). A delivery cut
//! short by a crash counts as an attempt. The consumer has no MaxDeliver: the worker itself
//! dead-letters once `retry.max_attempts` is spent. Every attempt publishes one ActionOutcome
//! (succeeded, retrying or dead-lettered), a delivery of an already-done action publishes a
//! `duplicate` one, and a put-back delivery publishes none: it was not an attempt.
//!
//! Redis down: a claim, `done` marker or release that cannot reach Redis is retried every
//! `redis_retry` while the message is held (ack timer renewed), and the loop fetches nothing new
//! until Redis answers. Dedup is never skipped; actions wait and then run exactly once.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer::pull, message::PublishMessage};
use chrono::Utc;
use futures::StreamExt;
use herald_shared::dlq::{self, DeadLetter};
use herald_shared::messages::{self, ActionOutcome, ActionRequest, OutcomeStatus};
use herald_shared::subjects::{self, ACTIONS_STREAM, DlqSource};
use herald_shared::{SCHEMA_VERSION, headers, telemetry};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::breaker::{Admission, Breakers, Verdict};
use crate::dedup::{Claim, Dedup, DedupError, Lease};
use crate::error::ActionError;
use crate::kind::{ActionKind, Registry, Success};
use crate::settings::Settings;

/// The `Herald-Dead-Lettered-By` of this service's dead letters.
pub const SERVICE: &str = "action-worker";

/// Upper bound of the wait before a busy lease is looked at again.
const BUSY_RECHECK: Duration = Duration::from_secs(1);

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
    settings: Settings,
    redis_up: watch::Sender<bool>,
    shutdown: CancellationToken,
}

impl Worker {
    pub fn new(
        jetstream: jetstream::Context,
        registry: Registry,
        dedup: Dedup,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            jetstream,
            registry,
            dedup,
            breakers: Breakers::new(settings.breaker.clone()),
            settings,
            redis_up: watch::Sender::new(true),
            shutdown,
        }
    }

    /// Consumes until shutdown, then waits for the actions in flight to finish.
    pub async fn run(self) -> Result<(), WorkerError> {
        let worker = Arc::new(self);
        let filter_subjects = worker
            .registry
            .names()
            .filter(|k| worker.settings.kinds.iter().any(|s| s == k))
            .map(subjects::actions_of_kind)
            .collect::<Result<Vec<_>, _>>()?;
        let stream = worker.jetstream.get_stream(ACTIONS_STREAM).await?;
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some(worker.settings.consumer.clone()),
                description: Some("Herald action workers".into()),
                filter_subjects,
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: worker.settings.ack_wait,
                max_deliver: -1,
                ..Default::default()
            })
            .await?;
        tracing::info!(consumer = %worker.settings.consumer, kinds = ?worker.settings.kinds, "consuming actions");

        let slots = Arc::new(Semaphore::new(worker.settings.concurrency));
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

    async fn handle(self: Arc<Self>, message: jetstream::Message, _slot: OwnedSemaphorePermit) {
        metrics::gauge!("herald_actions_in_flight").increment(1.0);
        let span = tracing::info_span!("action", subject = %message.subject);
        telemetry::adopt_context(&span, message.headers.as_ref());
        self.deliver(&message).instrument(span).await;
        metrics::gauge!("herald_actions_in_flight").decrement(1.0);
    }

    async fn deliver(&self, message: &jetstream::Message) {
        let (delivered, sequence) = match message.info() {
            Ok(info) => (
                u32::try_from(info.delivered).unwrap_or(u32::MAX),
                info.stream_sequence,
            ),
            Err(_) => (1, 0),
        };
        let request: ActionRequest = match messages::decode(&message.payload) {
            Ok(request) => request,
            Err(e) => {
                self.dead_letter(
                    message,
                    None,
                    &format!("undecodable action request: {e}"),
                    delivered,
                )
                .await;
                return;
            }
        };
        let (kind, destination) = match self.accept(message, &request) {
            Ok(accepted) => accepted,
            Err(error) => {
                metrics::counter!("herald_actions_failed_total", "kind" => request.kind.clone(), "class" => error.class())
                    .increment(1);
                self.give_up(message, &request, delivered, &error, 0).await;
                return;
            }
        };

        if let Some(host) = &destination
            && let Admission::Wait(delay) = self.breakers.admit(host, Instant::now())
        {
            tracing::debug!(host, ?delay, "circuit open; putting the action back");
            self.put_back(message, &request, sequence, delay).await;
            return;
        }

        let claim = self
            .with_redis(message, || self.dedup.claim(&request.id, sequence))
            .await;
        let (lease, deferrals) = match claim {
            None => return,
            Some(Claim::Done) => {
                metrics::counter!("herald_actions_dedup_hits_total", "kind" => request.kind.clone())
                    .increment(1);
                self.finish_duplicate(message, &request, delivered).await;
                return;
            }
            Some(Claim::Busy) => {
                if let Some(host) = &destination {
                    // The admission was a probe perhaps; nothing was learned about the host.
                    self.breakers.record(host, Verdict::Unknown, Instant::now());
                }
                let delay = BUSY_RECHECK.min(self.dedup.lease_duration() / 2);
                self.put_back(message, &request, sequence, delay).await;
                return;
            }
            Some(Claim::Claimed { lease, deferrals }) => (lease, deferrals),
        };
        let attempt = delivered.saturating_sub(deferrals).max(1);

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

        self.settle(message, &request, attempt, &lease, result, elapsed)
            .await;
    }

    /// Records how an executed attempt ended, in the order the promise needs: outcome, then the
    /// done marker / lease release / dead letter, then the ack, NAK or term.
    async fn settle(
        &self,
        message: &jetstream::Message,
        request: &ActionRequest,
        attempt: u32,
        lease: &Lease,
        result: Result<Success, ActionError>,
        elapsed: Duration,
    ) {
        match result {
            Ok(success) => {
                metrics::counter!("herald_actions_succeeded_total", "kind" => request.kind.clone())
                    .increment(1);
                let mut outcome = outcome(request, attempt, OutcomeStatus::Succeeded, elapsed);
                outcome.http_status = success.http_status;
                if !self.publish_outcome(message, &outcome).await {
                    // The effect is done but unrecorded: the lease runs out and a redelivery
                    // repeats it (absorbed by webhook-id / Msg-Id), publishing the outcome then.
                    nak(message, BUSY_RECHECK).await;
                    return;
                }
                if self
                    .with_redis(message, || self.dedup.complete(lease))
                    .await
                    .is_none()
                {
                    return;
                }
                if let Err(e) = message.ack().await {
                    tracing::warn!(error = %e, "ack failed; the redelivery will find the action done");
                }
            }
            Err(error) => {
                metrics::counter!("herald_actions_failed_total", "kind" => request.kind.clone(), "class" => error.class())
                    .increment(1);
                let next = match &error {
                    ActionError::Transient(f) => request
                        .retry
                        .delay_after(attempt)
                        .map(|delay| f.retry_after.map_or(delay, |asked| asked.max(delay))),
                    ActionError::Permanent(_) => None,
                };
                match next {
                    Some(delay) => {
                        tracing::info!(attempt, ?delay, %error, "action failed; retrying");
                        let mut outcome =
                            outcome(request, attempt, OutcomeStatus::Retrying, elapsed);
                        describe(&mut outcome, &error);
                        if !self.publish_outcome(message, &outcome).await {
                            // Unreported, the attempt is repeated once its lease runs out.
                            nak(message, BUSY_RECHECK).await;
                        } else if self
                            .with_redis(message, || self.dedup.release(lease))
                            .await
                            .is_some()
                        {
                            nak(message, delay).await;
                        }
                    }
                    None => {
                        if self
                            .give_up(message, request, attempt, &error, elapsed.as_millis())
                            .await
                        {
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
        }
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

    /// NAKs a delivery that did not run, counting it so it spends no attempt.
    async fn put_back(
        &self,
        message: &jetstream::Message,
        request: &ActionRequest,
        sequence: u64,
        delay: Duration,
    ) {
        if self
            .with_redis(message, || self.dedup.defer(&request.id, sequence))
            .await
            .is_some()
        {
            nak(message, delay).await;
        }
    }

    async fn finish_duplicate(
        &self,
        message: &jetstream::Message,
        request: &ActionRequest,
        delivered: u32,
    ) {
        let outcome = outcome(request, delivered, OutcomeStatus::Duplicate, Duration::ZERO);
        if self.publish_outcome(message, &outcome).await {
            if let Err(e) = message.ack().await {
                tracing::warn!(error = %e, "ack of a duplicate failed");
            }
        } else {
            nak(message, BUSY_RECHECK).await;
        }
    }

    /// Dead-letters an action with its outcome; `true` once the dead letter is stored.
    async fn give_up(
        &self,
        message: &jetstream::Message,
        request: &ActionRequest,
        attempt: u32,
        error: &ActionError,
        latency_ms: u128,
    ) -> bool {
        let mut outcome = outcome(
            request,
            attempt,
            OutcomeStatus::DeadLettered,
            Duration::from_millis(u64::try_from(latency_ms).unwrap_or(u64::MAX)),
        );
        describe(&mut outcome, error);
        if !self.publish_outcome(message, &outcome).await {
            nak(message, BUSY_RECHECK).await;
            return false;
        }
        let reason = format!("{error} (after {attempt} attempt(s))");
        self.dead_letter(message, Some(error), &reason, attempt)
            .await
    }

    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        error: Option<&ActionError>,
        reason: &str,
        attempts: u32,
    ) -> bool {
        let letter =
            DeadLetter::for_message(DlqSource::Actions, message, reason, attempts, Utc::now());
        let mut extra = message.headers.clone().unwrap_or_default();
        if let Some(failure) = error.map(ActionError::failure) {
            if let Some(status) = failure.http_status {
                extra.insert(headers::HTTP_STATUS, status.to_string().as_str());
            }
            if let Some(snippet) = &failure.snippet {
                extra.insert(headers::RESPONSE_SNIPPET, one_line(snippet).as_str());
            }
        }
        match dlq::publish(
            &self.jetstream,
            &letter,
            message.payload.clone(),
            Some(&extra),
            SERVICE,
        )
        .await
        {
            Ok(()) => {
                if let Err(e) = message.ack_with(AckKind::Term).await {
                    tracing::warn!(error = %e, "could not terminate a dead-lettered action");
                }
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot dead-letter; the action will be redelivered");
                nak(message, BUSY_RECHECK).await;
                false
            }
        }
    }

    /// Publishes an outcome and waits for JetStream to store it.
    async fn publish_outcome(&self, message: &jetstream::Message, outcome: &ActionOutcome) -> bool {
        let subject = match subjects::outcome(&outcome.kind, &outcome.observer) {
            Ok(subject) => subject,
            Err(e) => {
                tracing::error!(error = %e, "no outcome subject for this action");
                return true;
            }
        };
        let body = match serde_json::to_vec(outcome) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialise an outcome");
                return true;
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(headers::MSG_ID, outcome_msg_id(message, outcome).as_str());
        telemetry::inject_context(&mut headers);
        let message = PublishMessage::build()
            .payload(body.into())
            .headers(headers);
        let stored = async {
            self.jetstream.send_publish(subject, message).await?.await?;
            Ok::<_, jetstream::context::PublishError>(())
        };
        match stored.await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot publish the outcome");
                false
            }
        }
    }
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
/// dispatcher published it (Msg-Id = action id). Another copy of the same action — a DLQ replay
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
    match message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::MSG_ID))
    {
        Some(id) if id.as_str() == outcome.action_id => outcome.msg_id(),
        Some(id) => format!("{}:{}", id.as_str(), outcome.attempt),
        None => format!("{}@{sequence}:{}", outcome.action_id, outcome.attempt),
    }
}

fn describe(outcome: &mut ActionOutcome, error: &ActionError) {
    outcome.error = Some(error.to_string());
    outcome.http_status = error.failure().http_status;
}

fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

async fn nak(message: &jetstream::Message, delay: Duration) {
    if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
        // Unacknowledged, it comes back after ack_wait anyway.
        tracing::warn!(error = %e, "NAK failed");
    }
}
