//! Dispatching: HERALD_EVENTS → observers → HERALD_ACTIONS.
//!
//! One durable pull consumer reads the events. Each event goes to one of N ordered lanes chosen
//! by hash(entity, key): a lane handles its events strictly one after another, so events of one
//! key publish their actions in stream order, while different keys proceed in parallel.
//!
//! A lane takes the events queued for it (up to a batch), publishes every request of every
//! matching observer action of those events at once, in stream order (Msg-Id = action id),
//! awaits all the JetStream acks, and only then acks the events: a crash
//! anywhere before the ack redelivers the event, and the re-published actions are absorbed by
//! the stream's Msg-Id de-duplication. When JetStream refuses a publish the lane retries in
//! place (keeping the event alive with progress acks) rather than NAKing: a NAKed event would
//! come back after later events of its key and break their order. Only a lane told to stop
//! while still failing lets go of its event, with a NAK delay (JetStream ignores the consumer's
//! BackOff list for NAKs, so the delay travels with the NAK). A batch is retried whole: if
//! JetStream stored part of it before failing, the stored part is absorbed on retry, and only
//! then can an earlier event's action land after a later one's of the same key.
//!
//! A refusal that no retry can change (`publish::PublishFailure::is_permanent`: a request over
//! `max_payload`, a subject no stream stores, one this user may not publish on) is not retried
//! in place: that event is dead-lettered with the reason, and the lane goes on with the rest of
//! the batch. A lane told to stop while retrying NAKs its batch and then every event still
//! queued for it, without dispatching them: acking a later event of the same key after the NAK
//! would publish its actions before the earlier event's.
//!
//! Events that cannot be dispatched at all (bad JSON, unknown schema_version, an event whose
//! subject does not match its body) are dead-lettered to `herald.dlq.events` and terminated;
//! they never block the stream. So is an event on which an observer's condition fails at run
//! time, or whose requests cannot be built: the other observers' actions are published, and the
//! dead letter names the failing observer and why, so the failure is on record and the event
//! can be replayed once the observer is fixed (what was published already is absorbed by
//! Msg-Id). Every dead letter goes through `consume::Settler`; an event counts as done for the
//! checkpoint only once its dead letter is stored.
//!
//! Requests of an ordered observer also get their place in their key's line before they are
//! published, and the lines' places are saved before the events are acked (`order.rs`).

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer, message::PublishMessage};
use futures::StreamExt;
use herald_shared::consume::{Disposition, Settled, Settler};
use herald_shared::publish::{self, PublishFailure};
use herald_shared::subjects::{self, DlqSource, EVENTS_STREAM};
use herald_shared::{ActionRequest, EntityEvent, headers, messages, telemetry};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{self, Tracker};
use crate::observers::{ObserverSet, Observers};
use crate::order::{self, Lines};
use crate::partition::Partition;
use crate::settings::DispatcherSettings;

/// Names the dispatcher in dead letters.
pub const SERVICE: &str = "dispatcher";

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The consumer or its message stream failed (server restart, consumer re-created by a
    /// rewind); binding again later works.
    #[error("event consumer unavailable: {0}")]
    Consumer(String),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error(transparent)]
    Order(#[from] order::OrderError),
}

fn consumer_error(e: impl std::fmt::Display) -> DispatchError {
    DispatchError::Consumer(e.to_string())
}

/// Publishing an event's requests failed; the event must not be acked.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot encode an action request: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("JetStream refused an action request: {0}")]
    Publish(#[from] jetstream::context::PublishError),
}

/// What the dispatcher needs to run, shared by the lanes.
pub struct Dispatcher {
    pub js: jetstream::Context,
    pub settings: DispatcherSettings,
    pub observers: Arc<Observers>,
    /// Events taken from the stream since start (redeliveries included).
    pub events: AtomicU64,
    settler: Settler,
}

/// What an event triggers under one observer set.
#[derive(Debug, Default)]
pub struct Plan {
    /// The requests to publish, each with its subject, in observer and action order.
    pub requests: Vec<(String, ActionRequest)>,
    /// Observers that failed on the event (a condition error at run time, a request that cannot
    /// be built), each as `observer <name>: <why>`. The event is dead-lettered with these.
    pub failures: Vec<String>,
}

/// The requests an event triggers under `set`. An observer that fails on the event is counted,
/// logged and listed in `failures`; the others still emit their requests.
pub fn plan(set: &ObserverSet, event: &EntityEvent) -> Plan {
    let mut plan = Plan::default();
    let scope = std::cell::OnceCell::new();
    for observer in &set.observers {
        match observer.matches(event, &scope) {
            Ok(true) => match observer.requests(event) {
                Ok(r) => {
                    metrics::counter!("herald_dispatcher_matched_total", "observer" => observer.name.clone())
                        .increment(1);
                    plan.requests.extend(r);
                }
                Err(e) => {
                    tracing::error!(observer = %observer.name, error = %e, "observer cannot publish");
                    plan.failures.push(format!(
                        "observer {}: cannot build its requests: {e}",
                        observer.name
                    ));
                }
            },
            Ok(false) => {}
            Err(e) => {
                metrics::counter!("herald_dispatcher_condition_errors_total", "observer" => observer.name.clone())
                    .increment(1);
                tracing::warn!(event_id = %event.id, error = %e, "condition failed; observer skipped for this event");
                plan.failures
                    .push(format!("{e} (condition failed at run time)"));
            }
        }
    }
    plan
}

/// One request ready to publish, its headers (Msg-Id, trace context) already set.
pub struct Outgoing {
    subject: String,
    headers: HeaderMap,
    request: ActionRequest,
}

impl Outgoing {
    /// Carries the current span's trace context, so build it inside the event's span.
    pub fn new(subject: String, request: ActionRequest) -> Self {
        let mut headers = HeaderMap::new();
        headers::insert_safe(&mut headers, headers::MSG_ID, &request.id);
        telemetry::inject_context(&mut headers);
        Self {
            subject,
            headers,
            request,
        }
    }
}

/// Publish acks in flight per process: async-nats lets 5000 wait on one context, and a
/// publisher that holds permits while waiting for more would deadlock once all are taken.
pub const ACKS_IN_FLIGHT: usize = 4096;

/// Publishes the requests in order, `window` at a time (all sent, then all acks awaited), and
/// returns once JetStream has stored every one.
pub async fn publish_all(
    js: &jetstream::Context,
    outgoing: &[Outgoing],
    window: usize,
) -> Result<(), PublishError> {
    for chunk in outgoing.chunks(window.max(1)) {
        let mut acks = Vec::with_capacity(chunk.len());
        for out in chunk {
            let message = PublishMessage::build()
                .payload(serde_json::to_vec(&out.request)?.into())
                .headers(out.headers.clone());
            acks.push(js.send_publish(out.subject.clone(), message).await?);
        }
        for ack in futures::future::join_all(acks.into_iter().map(|a| a.into_future())).await {
            ack?;
        }
    }
    metrics::counter!("herald_dispatcher_actions_emitted_total").increment(outgoing.len() as u64);
    Ok(())
}

/// Publishes the requests in order, `window` at a time, like `publish_all`, but reports for each
/// request whether JetStream stored it, so one refused request does not sink the others.
pub async fn publish_each(
    js: &jetstream::Context,
    outgoing: &[&Outgoing],
    window: usize,
) -> Vec<Result<(), PublishFailure>> {
    let mut results = Vec::with_capacity(outgoing.len());
    for chunk in outgoing.chunks(window.max(1)) {
        let mut acks = Vec::with_capacity(chunk.len());
        for out in chunk {
            let sent = match serde_json::to_vec(&out.request) {
                Ok(body) => {
                    let message = PublishMessage::build()
                        .payload(body.into())
                        .headers(out.headers.clone());
                    js.send_publish(out.subject.clone(), message)
                        .await
                        .map_err(|e| publish::classify(&out.subject, &e))
                }
                Err(e) => Err(PublishFailure::TooLarge(format!("cannot encode: {e}"))),
            };
            acks.push((out.subject.as_str(), sent));
        }
        let stored =
            futures::future::join_all(acks.into_iter().map(|(subject, sent)| async move {
                match sent {
                    Ok(ack) => ack
                        .await
                        .map(|_| ())
                        .map_err(|e| publish::classify(subject, &e)),
                    Err(e) => Err(e),
                }
            }))
            .await;
        for result in stored {
            results.push(match result {
                Err(e) => Err(publish::confirm(js, e).await),
                ok => ok,
            });
        }
    }
    let emitted = results.iter().filter(|r| r.is_ok()).count();
    metrics::counter!("herald_dispatcher_actions_emitted_total").increment(emitted as u64);
    results
}

/// Gives each request of an ordered observer its place in its line, the batch's events in
/// stream order. Repeating it after a failure gives the same places.
async fn place(
    observers: &ObserverSet,
    outgoing: &mut [(usize, Outgoing)],
    batch: &[Work],
    lines: &mut Lines,
) -> Result<(), order::OrderError> {
    // Most observer sets have no ordered observer: no lookup per request then.
    if !observers.observers.iter().any(|o| o.ordered) {
        return Ok(());
    }
    for (index, out) in outgoing.iter_mut() {
        if observers
            .get(&out.request.observer)
            .is_some_and(|o| o.ordered)
        {
            let line = out.request.order_line();
            out.request.order = Some(lines.place(&line, batch[*index].sequence).await?);
        }
    }
    Ok(())
}

/// What every request of one partition's tenure carries, so that who published it is on
/// record: `Herald-Partition` (`<index>/<count>`) and `Herald-Lease-Revision` (the tenure).
struct Stamp {
    partition: String,
    tenure: String,
    /// Lanes of all partitions together, which share the acks in flight.
    lanes: usize,
}

impl Stamp {
    fn apply(&self, headers: &mut HeaderMap) {
        headers::insert_safe(headers, headers::PARTITION, &self.partition);
        headers::insert_safe(headers, headers::LEASE_REVISION, &self.tenure);
    }
}

/// Whether a lane may go on dispatching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Open,
    Halted,
}

async fn nak(message: &jetstream::Message, delay: Duration) {
    if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
        tracing::warn!(error = %e, "NAK failed; the event is redelivered after ack_wait");
    }
}

/// One event on its way through a lane.
struct Work {
    message: jetstream::Message,
    sequence: u64,
    event: EntityEvent,
    received: Instant,
}

impl Dispatcher {
    pub fn new(
        js: jetstream::Context,
        settings: DispatcherSettings,
        observers: Arc<Observers>,
    ) -> Self {
        // First failures outlive a restart (a dead letter names the real first failure).
        let settler = Settler::new(js.clone(), DlqSource::Events, SERVICE, settings.retry_delay)
            .remembering_first_failures(format!("dispatcher.{}", settings.name));
        Self {
            js,
            settings,
            observers,
            events: AtomicU64::new(0),
            settler,
        }
    }

    /// The durable consumer, ready to deliver in stream order.
    ///
    /// When it is missing (first start, or lost) it is created to start just after the stored
    /// checkpoint, so a lost consumer never means replaying the whole log. When it still has
    /// unacked events, they belong to a previous holder of the lease that died or stopped
    /// mid-batch: JetStream would redeliver them only after ack_wait, AFTER newer events of the
    /// same keys. So the consumer is re-created at its ack floor: everything past the floor comes
    /// again in stream order, and what was already published is absorbed by Msg-Id.
    async fn consumer(
        &self,
        partition: &Partition,
    ) -> Result<consumer::PullConsumer, DispatchError> {
        let stream = self
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(consumer_error)?;
        let name = &partition.name;
        let start_after = match stream.consumer_info(name).await {
            Ok(info) if info.num_ack_pending == 0 => {
                return stream.get_consumer(name).await.map_err(consumer_error);
            }
            Ok(info) => {
                tracing::info!(
                    unacked = info.num_ack_pending,
                    ack_floor = info.ack_floor.stream_sequence,
                    "re-delivering a previous holder's unacked events in order"
                );
                stream.delete_consumer(name).await.map_err(consumer_error)?;
                Some(info.ack_floor.stream_sequence)
            }
            Err(_) => checkpoint::show_one(&self.js, name)
                .await?
                .map(|c| c.sequence),
        };
        let deliver_policy = match start_after {
            Some(sequence) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: sequence + 1,
            },
            None => consumer::DeliverPolicy::All,
        };
        let consumer = stream
            .create_consumer(checkpoint::consumer_config(
                name,
                &partition.filters,
                deliver_policy,
                self.settings.ack_wait,
                self.settings.max_ack_pending(),
            ))
            .await
            .map_err(consumer_error)?;
        // Events that failed under the previous consumer come again as first deliveries; their
        // first-failure keys must be known to be removed when they are settled.
        self.settler.recall_first_failures().await;
        Ok(consumer)
    }

    /// Dispatches one partition, holding the lease of tenure `tenure`, until `stop`; returns
    /// after every event taken has been acked (or, when its actions could not be stored,
    /// NAKed) and the partition's checkpoint saved.
    pub async fn consume(
        self: &Arc<Self>,
        partition: &Partition,
        tenure: u64,
        stop: &CancellationToken,
    ) -> Result<(), DispatchError> {
        let mut consumer = self.consumer(partition).await?;
        let info = consumer.info().await.map_err(consumer_error)?;
        let tracker = Arc::new(Tracker::new(info.ack_floor.stream_sequence));
        let store = checkpoint::bucket(&self.js).await?;
        let lines = order::bucket(&self.js).await?;
        let stamp = Arc::new(Stamp {
            partition: format!("{}/{}", partition.index, partition.count),
            tenure: tenure.to_string(),
            lanes: self.settings.lanes * partition.count as usize,
        });

        let mut lanes = JoinSet::new();
        let mut senders = Vec::with_capacity(self.settings.lanes);
        for _ in 0..self.settings.lanes {
            let (tx, rx) = mpsc::channel(self.settings.batch);
            senders.push(tx);
            lanes.spawn(Arc::clone(self).lane(
                rx,
                Lines::new(lines.clone()),
                Arc::clone(&tracker),
                Arc::clone(&stamp),
                stop.clone(),
            ));
        }
        let saving = CancellationToken::new();
        let saver = tokio::spawn(Arc::clone(self).save_periodically(
            store.clone(),
            partition.name.clone(),
            Arc::clone(&tracker),
            saving.clone(),
        ));

        let read = self.read(&consumer, &senders, &tracker, stop).await;
        // Closing the lanes' queues lets each finish what it holds, in order, and end.
        drop(senders);
        while lanes.join_next().await.is_some() {}
        saving.cancel();
        if let Err(e) = saver.await {
            tracing::warn!(error = %e, "checkpoint saver ended abnormally");
        }
        checkpoint::save(&store, &partition.name, tracker.checkpoint()).await?;
        read
    }

    async fn read(
        &self,
        consumer: &consumer::PullConsumer,
        lanes: &[mpsc::Sender<Work>],
        tracker: &Tracker,
        stop: &CancellationToken,
    ) -> Result<(), DispatchError> {
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(self.settings.batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(10))
            .messages()
            .await
            .map_err(consumer_error)?;
        let hasher = std::collections::hash_map::RandomState::new();
        let mut last_delivery: Option<u64> = None;
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                next = messages.next() => match next {
                    Some(Ok(message)) => message,
                    Some(Err(e)) => return Err(consumer_error(e)),
                    None => return Err(DispatchError::Consumer("message stream ended".into())),
                },
            };
            let received = Instant::now();
            let sequence = match message.info() {
                Ok(info) => {
                    // The consumer numbers its deliveries 1, 2, 3…: a jump means deliveries
                    // were lost on the way (a cluster node died with them in flight, or the
                    // consumer's new leader knew less than the old one). JetStream would send
                    // the lost ones again only after ack_wait, behind later events of their keys;
                    // binding again re-creates the consumer at its ack floor, in order.
                    if let Some(last) = last_delivery
                        && info.consumer_sequence != last + 1
                    {
                        tracing::warn!(
                            last_delivery = last,
                            delivery = info.consumer_sequence,
                            stream_sequence = info.stream_sequence,
                            "deliveries out of line; binding to the consumer again"
                        );
                        return Err(DispatchError::Consumer(format!(
                            "delivery {} followed delivery {last}",
                            info.consumer_sequence
                        )));
                    }
                    last_delivery = Some(info.consumer_sequence);
                    info.stream_sequence
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a message without JetStream metadata; ignored");
                    continue;
                }
            };
            metrics::counter!("herald_dispatcher_events_total").increment(1);
            self.events.fetch_add(1, Ordering::Relaxed);
            tracker.start(sequence);
            let event = match self.decode(&message) {
                Ok(event) => event,
                Err(reason) => {
                    // Unstored, the dead letter is tried again on redelivery; until then the
                    // checkpoint stays below this event.
                    let settled = self
                        .settler
                        .settle(&message, Disposition::dead_letter(reason))
                        .await;
                    if settled == Settled::DeadLettered {
                        tracker.finish(sequence);
                    }
                    continue;
                }
            };
            let lane = (hasher.hash_one((&event.entity, &event.key)) % lanes.len() as u64) as usize;
            let work = Work {
                message,
                sequence,
                event,
                received,
            };
            if lanes[lane].send(work).await.is_err() {
                // A lane only ends when its queue closes; this cannot happen while reading.
                return Err(DispatchError::Consumer(
                    "a dispatch lane ended early".into(),
                ));
            }
        }
    }

    /// The event in a message, or why it cannot be dispatched. The subject must agree with the
    /// body: `herald.events.<Entity>.<op>`, optionally followed by the key's token and the
    /// partition (a key token of another key would put the event in the wrong partition, and
    /// so out of order with its key's other events).
    fn decode(&self, message: &jetstream::Message) -> Result<EntityEvent, String> {
        let event: EntityEvent = messages::decode(&message.payload).map_err(|e| e.to_string())?;
        let expected = subjects::event(&event.entity, event.op).map_err(|e| e.to_string())?;
        let key_token = subjects::key_token(&event.key);
        let agrees = match message.subject.strip_prefix(expected.as_str()) {
            Some("") => true,
            Some(rest) => {
                let mut tail = rest.strip_prefix('.').unwrap_or("-").split('.');
                tail.next() == Some(key_token.as_str())
                    && tail.next().is_none_or(|p| p.parse::<u32>().is_ok())
                    && tail.next().is_none()
            }
            None => false,
        };
        if agrees {
            Ok(event)
        } else {
            Err(format!(
                "event published on {} but its body says {expected}.{key_token}",
                message.subject
            ))
        }
    }

    /// Takes whatever is queued (up to a batch), publishes the requests of all those events in
    /// stream order in one pipelined round, then acks them. One connection stores publishes in
    /// the order sent, so the batch keeps the per-key order while paying one round trip for
    /// many events instead of one each.
    async fn lane(
        self: Arc<Self>,
        mut queue: mpsc::Receiver<Work>,
        mut lines: Lines,
        tracker: Arc<Tracker>,
        stamp: Arc<Stamp>,
        stop: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(self.settings.batch);
        let mut halted = false;
        while queue.recv_many(&mut batch, self.settings.batch).await > 0 {
            if halted {
                // An earlier event of these keys was NAKed: none of its successors may go first.
                for work in &batch {
                    nak(&work.message, self.settings.retry_delay).await;
                }
            } else {
                halted = self
                    .dispatch(&batch, &mut lines, &tracker, &stamp, &stop)
                    .await
                    == Lane::Halted;
            }
            batch.clear();
        }
    }

    /// Dispatches one batch; `Lane::Halted` when told to stop while JetStream still refused it,
    /// the batch then being NAKed.
    async fn dispatch(
        &self,
        batch: &[Work],
        lines: &mut Lines,
        tracker: &Tracker,
        stamp: &Stamp,
        stop: &CancellationToken,
    ) -> Lane {
        // One snapshot for the whole batch, whatever reloads happen meanwhile.
        let observers = self.observers.snapshot();
        let mut outgoing = Vec::new();
        let mut failures: Vec<Vec<String>> = Vec::with_capacity(batch.len());
        for (index, work) in batch.iter().enumerate() {
            let span = tracing::info_span!("dispatch", event_id = %work.event.id, entity = %work.event.entity, key = %work.event.key);
            telemetry::adopt_context(&span, work.message.headers.as_ref());
            let _entered = span.enter();
            let plan = plan(&observers, &work.event);
            outgoing.extend(plan.requests.into_iter().map(|(subject, request)| {
                let mut out = Outgoing::new(subject, request);
                stamp.apply(&mut out.headers);
                (index, out)
            }));
            failures.push(plan.failures);
        }
        let mut delay = self.settings.retry_delay;
        // Ordered observers' requests take their places in their lines before they go out.
        while let Err(error) = place(&observers, &mut outgoing, batch, lines).await {
            if self.wait_to_retry(batch, stop, &mut delay, &error).await == Lane::Halted {
                return Lane::Halted;
            }
        }
        // Every lane of every partition this process may serve can be publishing at once;
        // together they stay within ACKS_IN_FLIGHT.
        let window = (ACKS_IN_FLIGHT / stamp.lanes).max(1);
        let mut pending: Vec<&(usize, Outgoing)> = outgoing.iter().collect();
        loop {
            let sent: Vec<&Outgoing> = pending.iter().map(|(_, out)| out).collect();
            let results = publish_each(&self.js, &sent, window).await;
            let mut again = Vec::with_capacity(pending.len());
            let mut transient = None;
            for (entry, result) in pending.iter().zip(results) {
                let (index, out) = *entry;
                match result {
                    Err(e) if e.is_permanent() => failures[*index].push(format!(
                        "action request {} on {} can never be published: {e}",
                        out.request.id, out.subject
                    )),
                    Err(e) => {
                        transient.get_or_insert(e);
                        again.push(*entry);
                    }
                    Ok(()) => again.push(*entry),
                }
            }
            let Some(error) = transient else { break };
            // The rest of the batch is published again, in order: what was stored is absorbed
            // by Msg-Id, and no later request of a key overtakes an earlier one.
            pending = again;
            if self.wait_to_retry(batch, stop, &mut delay, &error).await == Lane::Halted {
                return Lane::Halted;
            }
        }
        // The places go into the bucket before the events are acked (see `order.rs`).
        while let Err(error) = lines.save().await {
            if self.wait_to_retry(batch, stop, &mut delay, &error).await == Lane::Halted {
                return Lane::Halted;
            }
        }
        for (work, failures) in batch.iter().zip(failures) {
            let disposition = if failures.is_empty() {
                Disposition::ack()
            } else {
                Disposition::dead_letter(failures.join("; "))
            };
            match self.settler.settle(&work.message, disposition).await {
                Settled::Acked | Settled::DeadLettered => tracker.finish(work.sequence),
                // NAKed: redelivered, dispatched again (absorbed) and dead-lettered then.
                Settled::Retrying | Settled::Unsettled(_) => {}
            }
            metrics::histogram!("herald_dispatcher_dispatch_seconds")
                .record(work.received.elapsed().as_secs_f64());
        }
        Lane::Open
    }

    /// After a failure that retrying may mend: keeps the batch's events alive and waits
    /// `delay` (doubling it for next time), or, when told to stop, NAKs the batch and halts.
    async fn wait_to_retry(
        &self,
        batch: &[Work],
        stop: &CancellationToken,
        delay: &mut Duration,
        error: &(dyn std::fmt::Display + Sync),
    ) -> Lane {
        tracing::warn!(%error, ?delay, "batch not dispatched; retrying in place");
        if stop.is_cancelled() {
            for work in batch {
                nak(&work.message, *delay).await;
            }
            return Lane::Halted;
        }
        for work in batch {
            herald_shared::consume::progress(&work.message).await;
        }
        tokio::time::sleep(*delay).await;
        *delay = (*delay * 2).min(self.settings.ack_wait / 2);
        Lane::Open
    }

    async fn save_periodically(
        self: Arc<Self>,
        store: jetstream::kv::Store,
        name: String,
        tracker: Arc<Tracker>,
        stop: CancellationToken,
    ) {
        let mut saved = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.settings.checkpoint_interval) => {}
            }
            let current = tracker.checkpoint();
            if saved != Some(current) {
                match checkpoint::save(&store, &name, current).await {
                    Ok(()) => saved = Some(current),
                    Err(e) => tracing::warn!(error = %e, "cannot save the checkpoint; will retry"),
                }
            }
            if let Ok(mut stream) = self.js.get_stream(EVENTS_STREAM).await
                && let Ok(info) = stream.info().await
            {
                let lag = info.state.last_sequence.saturating_sub(current);
                metrics::gauge!("herald_dispatcher_lag", "consumer" => name.clone())
                    .set(lag as f64);
            }
        }
    }
}
