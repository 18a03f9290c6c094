//! One way to finish with a consumed JetStream message, for every Herald consumer (dispatcher,
//! action worker, job intake, auditor, custom workers written in Rust).
//!
//! A handler looks at one message and returns a `Disposition`: acknowledge it, retry it after a
//! delay (spending one of its attempts, or not: a deferral), or give up on it and dead-letter it
//! with a reason. Any disposition may carry publications to make first (an outcome, say).
//! `Settler::settle` is the one piece of code that turns a disposition into JetStream calls, in
//! the order the promise needs:
//!
//! 1. every publication first, each acknowledged by its stream (PubAck);
//! 2. then, for a dead letter, the dead letter itself, stored (`dlq::publish`);
//! 3. only then the ack, the NAK with its delay, or the TERM.
//!
//! A publication or dead letter that fails for a while leaves the message unsettled and NAKed
//! after `failure_delay`, so it comes again and the whole disposition is retried; nothing was
//! acked, so nothing is lost, and publications keyed by Msg-Id are absorbed on the repeat. One
//! that can never be stored (`publish::PublishFailure::is_permanent`: too large, not permitted,
//! no stream) is never retried in place: a publication made first is dropped with an error log
//! and a count (`herald_publications_dropped_total`), and the disposition goes on.
//!
//! `Herald-First-Failed-At` is the time of the first failed attempt. A handler that knows it
//! (it keeps it somewhere durable, as the action worker does in Redis) says so; otherwise the
//! settler remembers when it first retried a stream message: in memory, and, when built with
//! `remembering_first_failures` (the dispatcher), also in the JetStream KV bucket
//! `herald_first_failures` under `<prefix>.<stream sequence>`, so the time survives a restart of
//! the consumer. A key is written once, at the first failure, read when the
//! message is dead-lettered, and deleted when the message is settled for good; the bucket's
//! `FIRST_FAILURES_MAX_AGE` removes what a crash left behind. A consumer re-created from its
//! ack floor (the dispatcher's, after a restart or a lease handover) delivers a message that
//! failed before as a first delivery again, which on its own would never look up the bucket:
//! such a consumer calls `Settler::recall_first_failures` first, so that the keys already
//! stored are known and deleted when their messages are settled. Without either, the dead-lettering
//! delivery is the first failure.
//!
//! A retry NAKed with a delay holds its message unacknowledged until it comes back, counting
//! against the consumer's `max_ack_pending`. A settler built `rescheduling` (the action worker)
//! settles a retry or deferral instead by storing a scheduled copy of the message and acking the
//! original (`schedule`), so waiting retries hold nothing; the copy carries the attempts made
//! and the first failure, which a later retry or dead letter of it reads back. A consumer that
//! must keep a key's messages in order (the dispatcher) keeps the NAK: a copy comes back behind
//! later messages.
//!
//! A consumer that settles many messages at once (the auditor, after one bulk request) hands
//! them to `Settler::settle_all`, which settles them concurrently, each exactly as `settle`
//! would, and answers in their order.
//!
//! A consumer of `HERALD_DLQ` itself has nowhere to dead-letter to (a dead letter of a dead
//! letter would come back to it): `Settler::for_dlq_consumer` makes a settler whose dead-letter
//! disposition logs the reason at error level and terminates the message, which stays in the
//! DLQ stream where it already is.
//!
//! Every settled message is counted: `herald_settled_total{service, disposition}` with
//! disposition = ack | retry | defer | dead_letter | unsettled.
//!
//! A consumer is a loop of decode → handle → settle:
//!
//! ```no_run
//! # use std::time::Duration;
//! # use futures::StreamExt;
//! # use herald_shared::consume::{Disposition, Publication, Settler};
//! # use herald_shared::subjects::DlqSource;
//! # async fn consume(js: async_nats::jetstream::Context, mut messages: async_nats::jetstream::consumer::pull::Stream) {
//! let settler = Settler::new(js, DlqSource::Jobs, "job-worker", Duration::from_secs(1));
//! while let Some(Ok(message)) = messages.next().await {
//!     let disposition = match herald_shared::messages::decode::<serde_json::Value>(&message.payload) {
//!         Err(e) => Disposition::dead_letter(e.to_string()),
//!         Ok(job) => match Publication::json("herald.jobs.status.default", "job-1:queued:1", &job) {
//!             Ok(status) => Disposition::ack().publishing_first(status),
//!             Err(e) => Disposition::dead_letter(format!("cannot encode: {e}")),
//!         },
//!     };
//!     settler.settle(&message, disposition).await;
//! }
//! # }
//! ```

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::dlq::{self, DeadLetter};
use crate::headers;
use crate::publish::{self, PublishFailure};
use crate::schedule::{self, ScheduleSubject};
use crate::subjects::DlqSource;

/// First failures remembered at most; past it the oldest are forgotten (their dead letters then
/// date the first failure at the dead-lettering delivery).
const REMEMBERED_FAILURES: usize = 100_000;

/// The KV bucket holding first-failure times across restarts (see the module docs).
pub const FIRST_FAILURES_BUCKET: &str = "herald_first_failures";
/// How long a first-failure time is kept without its message being settled.
pub const FIRST_FAILURES_MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);
/// Messages `Settler::settle_all` settles at the same time.
const SETTLE_CONCURRENCY: usize = 64;

/// A message to publish (and see stored) before the consumed one is settled.
#[derive(Debug, Clone)]
pub struct Publication {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

impl Publication {
    pub fn new(subject: impl Into<String>, headers: HeaderMap, payload: Bytes) -> Self {
        Self {
            subject: subject.into(),
            headers,
            payload,
        }
    }

    /// `value` as JSON, with `Nats-Msg-Id: msg_id` and the current span's trace context.
    pub fn json<T: Serialize>(
        subject: impl Into<String>,
        msg_id: &str,
        value: &T,
    ) -> Result<Self, serde_json::Error> {
        let payload = serde_json::to_vec(value)?;
        let mut headers = HeaderMap::new();
        headers::insert_safe(&mut headers, headers::MSG_ID, msg_id);
        crate::telemetry::inject_context(&mut headers);
        Ok(Self::new(subject, headers, payload.into()))
    }
}

/// Why and how a message is given up on.
#[derive(Debug, Clone)]
pub struct GiveUp {
    /// `Herald-Error`: one line, cut at 1024 bytes.
    pub reason: String,
    /// `Herald-Attempts`; `None` takes JetStream's delivery count.
    pub attempts: Option<u32>,
    /// `Herald-First-Failed-At` when the handler knows it (see the module docs).
    pub first_failed_at: Option<DateTime<Utc>>,
    /// More headers for the dead letter (e.g. `Herald-Http-Status`), made safe on the way.
    pub headers: Vec<(&'static str, String)>,
    pub publish_first: Vec<Publication>,
}

/// What to do with one consumed message.
#[derive(Debug, Clone)]
pub enum Disposition {
    /// Its effect is durable: acknowledge it.
    Ack { publish_first: Vec<Publication> },
    /// Deliver it again after `delay` (NAK with delay, or a scheduled copy for a settler built
    /// `rescheduling`). `spends_attempt` is false for a delivery put back without being tried (a
    /// busy lease, an open circuit): a deferral.
    Retry {
        delay: Duration,
        spends_attempt: bool,
        /// For a scheduled copy: the attempts made so far (default: those of earlier copies plus
        /// JetStream's delivery count, less this one for a deferral).
        attempts: Option<u32>,
        /// For a scheduled copy: the first failure, when the handler knows it.
        first_failed_at: Option<DateTime<Utc>>,
        publish_first: Vec<Publication>,
    },
    /// Store it in the DLQ with its reason, then terminate it.
    DeadLetter(Box<GiveUp>),
}

impl Disposition {
    pub fn ack() -> Self {
        Self::Ack {
            publish_first: Vec::new(),
        }
    }

    /// A failed attempt, to be tried again after `delay`.
    pub fn retry(delay: Duration) -> Self {
        Self::Retry {
            delay,
            spends_attempt: true,
            attempts: None,
            first_failed_at: None,
            publish_first: Vec::new(),
        }
    }

    /// Not tried this time; deliver it again after `delay` without counting an attempt.
    pub fn defer(delay: Duration) -> Self {
        Self::Retry {
            delay,
            spends_attempt: false,
            attempts: None,
            first_failed_at: None,
            publish_first: Vec::new(),
        }
    }

    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Self::DeadLetter(Box::new(GiveUp {
            reason: reason.into(),
            attempts: None,
            first_failed_at: None,
            headers: Vec::new(),
            publish_first: Vec::new(),
        }))
    }

    /// Publishes `publication` (and waits for its stream to store it) before settling.
    pub fn publishing_first(mut self, publication: Publication) -> Self {
        match &mut self {
            Self::Ack { publish_first } | Self::Retry { publish_first, .. } => {
                publish_first.push(publication);
            }
            Self::DeadLetter(give_up) => give_up.publish_first.push(publication),
        }
        self
    }

    /// For a dead letter or a scheduled retry: the attempts made (default: JetStream's delivery
    /// count, plus the attempts of earlier scheduled copies).
    pub fn attempts(mut self, made: u32) -> Self {
        match &mut self {
            Self::DeadLetter(give_up) => give_up.attempts = Some(made),
            Self::Retry { attempts, .. } => *attempts = Some(made),
            Self::Ack { .. } => {}
        }
        self
    }

    /// For a dead letter or a scheduled retry: when the first attempt failed, if the handler
    /// knows.
    pub fn first_failed_at(mut self, at: Option<DateTime<Utc>>) -> Self {
        match &mut self {
            Self::DeadLetter(give_up) => give_up.first_failed_at = at.or(give_up.first_failed_at),
            Self::Retry {
                first_failed_at, ..
            } => *first_failed_at = at.or(*first_failed_at),
            Self::Ack { .. } => {}
        }
        self
    }

    /// For a dead letter: one more header describing the failure.
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        if let Self::DeadLetter(give_up) = &mut self {
            give_up.headers.push((name, value.into()));
        }
        self
    }

    /// The `disposition` label of `herald_settled_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Ack { .. } => "ack",
            Self::Retry {
                spends_attempt: true,
                ..
            } => "retry",
            Self::Retry { .. } => "defer",
            Self::DeadLetter(_) => "dead_letter",
        }
    }
}

/// What settling did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Acked,
    /// NAKed with the disposition's delay.
    Retrying,
    /// The dead letter is stored and the message terminated (for a settler made with
    /// `Settler::for_dlq_consumer`: the message, already a dead letter, is terminated).
    DeadLettered,
    /// Something the disposition needed stored was not (the reason is logged); the message was
    /// NAKed after `failure_delay` and the disposition will be decided again on redelivery.
    Unsettled(String),
}

/// Settles the messages of one consumer. Shared by all the consumer's tasks.
pub struct Settler {
    js: jetstream::Context,
    /// `None` for a consumer of the DLQ itself (`for_dlq_consumer`).
    source: Option<DlqSource>,
    service: String,
    failure_delay: Duration,
    first_failures: Mutex<BTreeMap<u64, DateTime<Utc>>>,
    /// The key prefix in `FIRST_FAILURES_BUCKET`, when first failures are kept there.
    durable_prefix: Option<String>,
    durable: tokio::sync::OnceCell<jetstream::kv::Store>,
    /// Where retries' scheduled copies go, for a settler built `rescheduling`.
    schedule: Option<ScheduleSubject>,
}

impl Settler {
    /// `source` names the DLQ its dead letters go to, `service` their `Herald-Dead-Lettered-By`;
    /// a message whose disposition could not be carried out comes again after `failure_delay`.
    pub fn new(
        js: jetstream::Context,
        source: DlqSource,
        service: impl Into<String>,
        failure_delay: Duration,
    ) -> Self {
        Self {
            js,
            source: Some(source),
            service: service.into(),
            failure_delay,
            first_failures: Mutex::new(BTreeMap::new()),
            durable_prefix: None,
            durable: tokio::sync::OnceCell::new(),
            schedule: None,
        }
    }

    /// A settler for a consumer of `HERALD_DLQ`: its dead-letter disposition publishes nothing
    /// (the message already is a dead letter); it logs the reason and terminates the message.
    pub fn for_dlq_consumer(
        js: jetstream::Context,
        service: impl Into<String>,
        failure_delay: Duration,
    ) -> Self {
        Self {
            js,
            source: None,
            service: service.into(),
            failure_delay,
            first_failures: Mutex::new(BTreeMap::new()),
            durable_prefix: None,
            durable: tokio::sync::OnceCell::new(),
            schedule: None,
        }
    }

    /// Also keeps first-failure times in `FIRST_FAILURES_BUCKET` under `<prefix>.<stream
    /// sequence>` (`prefix` one or more KV key tokens, e.g. `dispatcher.<name>`), so a
    /// dead letter made after a restart still names the first failure.
    pub fn remembering_first_failures(mut self, prefix: impl Into<String>) -> Self {
        self.durable_prefix = Some(prefix.into());
        self
    }

    /// Settles retries and deferrals with a scheduled copy on `subject(original subject, copy's
    /// Msg-Id)` and an ack, instead of a NAK (see the module docs and `schedule`). A message
    /// whose subject `subject` does not cover, or a stream that refuses schedules, is NAKed.
    pub fn rescheduling(mut self, subject: ScheduleSubject) -> Self {
        self.schedule = Some(subject);
        self
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Carries out `disposition` for `message`; see the module docs for the order.
    pub async fn settle(&self, message: &jetstream::Message, disposition: Disposition) -> Settled {
        let label = disposition.label();
        let settled = self.carry_out(message, disposition).await;
        let label = match settled {
            Settled::Unsettled(_) => "unsettled",
            _ => label,
        };
        metrics::counter!("herald_settled_total", "service" => self.service.clone(), "disposition" => label)
            .increment(1);
        settled
    }

    /// Settles every message with its disposition, concurrently (a bounded number at a time),
    /// each as `settle` would; the answers are in the order of `items`.
    pub async fn settle_all(&self, items: Vec<(&jetstream::Message, Disposition)>) -> Vec<Settled> {
        let mut settled = Vec::with_capacity(items.len());
        let mut items = items.into_iter();
        loop {
            let chunk: Vec<_> = items
                .by_ref()
                .take(SETTLE_CONCURRENCY)
                .map(|(message, disposition)| self.settle(message, disposition))
                .collect();
            if chunk.is_empty() {
                return settled;
            }
            settled.extend(futures::future::join_all(chunk).await);
        }
    }

    async fn carry_out(&self, message: &jetstream::Message, disposition: Disposition) -> Settled {
        let sequence = message.info().map(|i| i.stream_sequence).ok();
        let redelivered = delivery_count(message) > 1;
        match disposition {
            Disposition::Ack { publish_first } => {
                if let Err(reason) = self.publish_first(&publish_first).await {
                    return self.unsettled(message, reason).await;
                }
                self.forget(sequence, redelivered).await;
                if let Err(e) = message.ack().await {
                    // The effect is stored; a redelivery meets it again and is absorbed.
                    tracing::warn!(error = %e, "ack failed; the message will be redelivered");
                }
                Settled::Acked
            }
            Disposition::Retry {
                delay,
                spends_attempt,
                attempts,
                first_failed_at,
                publish_first,
            } => {
                if let Err(reason) = self.publish_first(&publish_first).await {
                    return self.unsettled(message, reason).await;
                }
                if let Some(subject) = self.schedule {
                    let attempts = attempts.unwrap_or_else(|| {
                        schedule::prior_attempts(message)
                            .saturating_add(delivery_count(message))
                            .saturating_sub(u32::from(!spends_attempt))
                    });
                    let first_failed_at = first_failed_at
                        .or_else(|| {
                            schedule::Copy::of(message.headers.as_ref())
                                .and_then(|c| c.first_failed_at)
                        })
                        .or_else(|| spends_attempt.then(Utc::now));
                    match self
                        .reschedule(message, subject, delay, attempts, first_failed_at)
                        .await
                    {
                        Ok(true) => {
                            self.forget(sequence, redelivered).await;
                            if let Err(e) = message.ack().await {
                                // Redelivered, it schedules a copy under the same Msg-Id,
                                // which is absorbed.
                                tracing::warn!(error = %e, "ack after scheduling a retry failed; the message will be redelivered");
                            }
                            return Settled::Retrying;
                        }
                        Ok(false) => {}
                        Err(reason) => return self.unsettled(message, reason).await,
                    }
                }
                if spends_attempt {
                    self.remember_failure(sequence).await;
                }
                nak(message, delay).await;
                Settled::Retrying
            }
            Disposition::DeadLetter(give_up) => {
                if let Err(reason) = self.publish_first(&give_up.publish_first).await {
                    return self.unsettled(message, reason).await;
                }
                let Some(source) = self.source else {
                    tracing::error!(subject = %message.subject, reason = %give_up.reason, "a dead letter cannot be handled; it stays in the DLQ stream only");
                    self.forget(sequence, redelivered).await;
                    if let Err(e) = message.ack_with(AckKind::Term).await {
                        tracing::warn!(error = %e, "could not terminate a dead letter");
                    }
                    return Settled::DeadLettered;
                };
                let copy = schedule::Copy::of(message.headers.as_ref());
                let first_failed_at = match give_up.first_failed_at {
                    Some(at) => Some(at),
                    None => self.recalled_failure(sequence).await,
                }
                .or_else(|| copy.as_ref().and_then(|c| c.first_failed_at))
                .unwrap_or_else(Utc::now);
                let attempts = give_up.attempts.unwrap_or_else(|| {
                    copy.map_or(0, |c| c.attempts)
                        .saturating_add(delivery_count(message))
                });
                let letter = DeadLetter::for_message(
                    source,
                    message,
                    give_up.reason.as_str(),
                    attempts,
                    first_failed_at,
                );
                let mut original = message.headers.clone().unwrap_or_default();
                for (name, value) in &give_up.headers {
                    headers::insert_safe(&mut original, name, value);
                }
                match dlq::publish(
                    &self.js,
                    &letter,
                    message.payload.clone(),
                    Some(&original),
                    &self.service,
                )
                .await
                {
                    Ok(()) => {
                        self.forget(sequence, redelivered).await;
                        if let Err(e) = message.ack_with(AckKind::Term).await {
                            // The dead letter is stored; a redelivery is dead-lettered again
                            // under the same Msg-Id and absorbed.
                            tracing::warn!(error = %e, "could not terminate a dead-lettered message");
                        }
                        Settled::DeadLettered
                    }
                    Err(e) => {
                        self.remember_failure(sequence).await;
                        let reason = format!("the dead letter was not stored: {e}");
                        if e.is_permanent() {
                            tracing::error!(error = %e, "the DLQ refuses this dead letter; check the DLQ stream and this user's permissions");
                        }
                        self.unsettled(message, reason).await
                    }
                }
            }
        }
    }

    async fn publish_first(&self, publications: &[Publication]) -> Result<(), String> {
        for p in publications {
            match publish::publish(&self.js, &p.subject, p.headers.clone(), p.payload.clone()).await
            {
                Ok(_) => {}
                Err(e) if e.is_permanent() => {
                    metrics::counter!("herald_publications_dropped_total", "service" => self.service.clone(), "class" => e.class())
                        .increment(1);
                    tracing::error!(subject = %p.subject, error = %e, "a publication can never be stored; dropped, settling the message anyway");
                }
                Err(e) => return Err(format!("publishing on {} failed: {e}", p.subject)),
            }
        }
        Ok(())
    }

    /// Stores the scheduled copy that brings `message` back after `delay`: `Ok(true)` once
    /// stored, `Ok(false)` when it cannot be (the subject is not covered, the stream refuses
    /// schedules: the caller NAKs instead), `Err` for a failure worth trying again.
    async fn reschedule(
        &self,
        message: &jetstream::Message,
        subject: ScheduleSubject,
        delay: Duration,
        attempts: u32,
        first_failed_at: Option<DateTime<Utc>>,
    ) -> Result<bool, String> {
        let at = Utc::now()
            + chrono::Duration::from_std(delay).unwrap_or_else(|_| chrono::Duration::days(3650));
        let Some(copy) = schedule::copy(message, subject, at, attempts, first_failed_at) else {
            return Ok(false);
        };
        match publish::publish(&self.js, &copy.subject, copy.headers, copy.payload).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_permanent() => {
                metrics::counter!("herald_retries_held_total", "service" => self.service.clone(), "class" => e.class())
                    .increment(1);
                if matches!(e, PublishFailure::ScheduleRefused(_)) {
                    tracing::warn!(error = %e, "the stream refuses message schedules; this retry is a NAK and holds its message meanwhile");
                } else {
                    tracing::error!(subject = %copy.subject, error = %e, "a retry's scheduled copy cannot be stored; NAKed instead");
                }
                Ok(false)
            }
            Err(e) => Err(format!(
                "scheduling the retry on {} failed: {e}",
                copy.subject
            )),
        }
    }

    async fn unsettled(&self, message: &jetstream::Message, reason: String) -> Settled {
        tracing::warn!(%reason, delay = ?self.failure_delay, "message not settled; it will come again");
        nak(message, self.failure_delay).await;
        Settled::Unsettled(reason)
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, DateTime<Utc>>> {
        self.first_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn remember_failure(&self, sequence: Option<u64>) {
        let Some(sequence) = sequence else { return };
        let first = {
            let mut failures = self.failures();
            let first = !failures.contains_key(&sequence);
            failures.entry(sequence).or_insert_with(Utc::now);
            while failures.len() > REMEMBERED_FAILURES {
                failures.pop_first();
            }
            first
        };
        if !first {
            return;
        }
        let Some((store, key)) = self.durable_key(sequence).await else {
            return;
        };
        let at = self
            .failures()
            .get(&sequence)
            .copied()
            .unwrap_or_else(Utc::now);
        // `create` keeps the first time a previous process may have stored; that one is then
        // the time remembered here too.
        match store.create(&key, at.to_rfc3339().into()).await {
            Ok(_) => {}
            Err(e) if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => {
                if let Some(earlier) = read_time(store, &key).await {
                    self.failures().insert(sequence, earlier);
                }
            }
            Err(e) => tracing::warn!(error = %e, %key, "cannot store a first-failure time"),
        }
    }

    /// Loads every first-failure time stored under this settler's prefix (by an earlier process,
    /// or another holder of the same consumer), so that settling one of those messages removes
    /// its key even at what is now its first delivery. Call it whenever the consumer is
    /// (re-)created; without `remembering_first_failures` it does nothing.
    pub async fn recall_first_failures(&self) {
        let Some(prefix) = self.durable_prefix.as_deref() else {
            return;
        };
        let Some((store, _)) = self.durable_key(0).await else {
            return;
        };
        let mut keys = match store.keys().await {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list first-failure times; those left expire");
                return;
            }
        };
        let mut recalled = 0_usize;
        while let Some(key) = futures::StreamExt::next(&mut keys).await {
            let Ok(key) = key else { break };
            let Some(sequence) = key
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('.'))
                .and_then(|seq| seq.parse::<u64>().ok())
            else {
                continue;
            };
            if let Some(at) = read_time(store, &key).await {
                self.failures().entry(sequence).or_insert(at);
                recalled += 1;
            }
        }
        if recalled > 0 {
            tracing::info!(recalled, "first-failure times recalled");
        }
    }

    /// The first failure remembered here, or else the one stored by an earlier process. The
    /// bucket is asked even at a first delivery: a re-created consumer (the dispatcher's, after
    /// a restart) starts delivery counts again.
    async fn recalled_failure(&self, sequence: Option<u64>) -> Option<DateTime<Utc>> {
        let sequence = sequence?;
        if let Some(at) = self.failures().get(&sequence).copied() {
            return Some(at);
        }
        let (store, key) = self.durable_key(sequence).await?;
        read_time(store, &key).await
    }

    async fn forget(&self, sequence: Option<u64>, redelivered: bool) {
        let Some(sequence) = sequence else { return };
        let known = self.failures().remove(&sequence).is_some();
        // A message settled at its first delivery never failed here: no write per ack. (One that
        // failed before its consumer was re-created is known through `recall_first_failures`.)
        if !(known || redelivered) {
            return;
        }
        if let Some((store, key)) = self.durable_key(sequence).await
            && let Err(e) = store.purge(&key).await
        {
            tracing::warn!(error = %e, %key, "cannot remove a first-failure time; it expires");
        }
    }

    /// The bucket and key for a sequence, when first failures are kept durably and the bucket
    /// can be reached.
    async fn durable_key(&self, sequence: u64) -> Option<(&jetstream::kv::Store, String)> {
        let prefix = self.durable_prefix.as_deref()?;
        let store = self
            .durable
            .get_or_try_init(|| {
                let consumed = self
                    .source
                    .map_or(crate::subjects::DLQ_STREAM, DlqSource::stream);
                first_failures_bucket(&self.js, consumed)
            })
            .await
            .map_err(|e| tracing::warn!(error = %e, "first-failure bucket unavailable"))
            .ok()?;
        Some((store, format!("{prefix}.{sequence}")))
    }
}

async fn read_time(store: &jetstream::kv::Store, key: &str) -> Option<DateTime<Utc>> {
    match store.get(key).await {
        Ok(Some(value)) => std::str::from_utf8(&value)
            .ok()
            .and_then(|text| DateTime::parse_from_rfc3339(text).ok())
            .map(|at| at.with_timezone(&Utc)),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, %key, "cannot read a first-failure time");
            None
        }
    }
}

/// The first-failure bucket, created on first use with as many copies as `consumed`, the
/// stream whose messages it remembers.
pub async fn first_failures_bucket(
    js: &jetstream::Context,
    consumed: &str,
) -> Result<jetstream::kv::Store, String> {
    let config = jetstream::kv::Config {
        bucket: FIRST_FAILURES_BUCKET.to_owned(),
        description: "When each consumed message still being retried first failed".into(),
        history: 1,
        max_age: FIRST_FAILURES_MAX_AGE,
        ..Default::default()
    };
    crate::streams::key_value(js, config, consumed)
        .await
        .map_err(|e| e.to_string())
}

/// JetStream's delivery count of the message, 1 for the first delivery.
pub fn delivery_count(message: &jetstream::Message) -> u32 {
    message
        .info()
        .map_or(1, |i| u32::try_from(i.delivered).unwrap_or(u32::MAX))
}

/// Renews the message's ack timer while a handler is still busy with it.
pub async fn progress(message: &jetstream::Message) {
    if let Err(e) = message.ack_with(AckKind::Progress).await {
        tracing::warn!(error = %e, "cannot renew the ack timer");
    }
}

async fn nak(message: &jetstream::Message, delay: Duration) {
    if let Err(e) = message.ack_with(AckKind::Nak(Some(delay))).await {
        // Unacknowledged, it comes back after ack_wait anyway.
        tracing::warn!(error = %e, "NAK failed");
    }
}
