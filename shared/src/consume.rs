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
//! settler remembers when it first retried a stream message (for as long as the process lives),
//! and without either the dead-lettering delivery is the first failure.
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
use crate::publish;
use crate::subjects::DlqSource;

/// First failures remembered at most; past it the oldest are forgotten (their dead letters then
/// date the first failure at the dead-lettering delivery).
const REMEMBERED_FAILURES: usize = 100_000;

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
    /// Deliver it again after `delay` (NAK with delay). `spends_attempt` is false for a delivery
    /// put back without being tried (a busy lease, an open circuit): a deferral.
    Retry {
        delay: Duration,
        spends_attempt: bool,
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
            publish_first: Vec::new(),
        }
    }

    /// Not tried this time; deliver it again after `delay` without counting an attempt.
    pub fn defer(delay: Duration) -> Self {
        Self::Retry {
            delay,
            spends_attempt: false,
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

    /// For a dead letter: the attempts made (default: JetStream's delivery count).
    pub fn attempts(mut self, attempts: u32) -> Self {
        if let Self::DeadLetter(give_up) = &mut self {
            give_up.attempts = Some(attempts);
        }
        self
    }

    /// For a dead letter: when the first attempt failed, if the handler knows.
    pub fn first_failed_at(mut self, at: Option<DateTime<Utc>>) -> Self {
        if let Self::DeadLetter(give_up) = &mut self {
            give_up.first_failed_at = at.or(give_up.first_failed_at);
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
        }
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
        match disposition {
            Disposition::Ack { publish_first } => {
                if let Err(reason) = self.publish_first(&publish_first).await {
                    return self.unsettled(message, reason).await;
                }
                self.forget(sequence);
                if let Err(e) = message.ack().await {
                    // The effect is stored; a redelivery meets it again and is absorbed.
                    tracing::warn!(error = %e, "ack failed; the message will be redelivered");
                }
                Settled::Acked
            }
            Disposition::Retry {
                delay,
                spends_attempt,
                publish_first,
            } => {
                if let Err(reason) = self.publish_first(&publish_first).await {
                    return self.unsettled(message, reason).await;
                }
                if spends_attempt {
                    self.remember_failure(sequence);
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
                    self.forget(sequence);
                    if let Err(e) = message.ack_with(AckKind::Term).await {
                        tracing::warn!(error = %e, "could not terminate a dead letter");
                    }
                    return Settled::DeadLettered;
                };
                let first_failed_at = give_up
                    .first_failed_at
                    .or_else(|| self.recalled_failure(sequence))
                    .unwrap_or_else(Utc::now);
                let attempts = give_up.attempts.unwrap_or_else(|| delivery_count(message));
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
                        self.forget(sequence);
                        if let Err(e) = message.ack_with(AckKind::Term).await {
                            // The dead letter is stored; a redelivery is dead-lettered again
                            // under the same Msg-Id and absorbed.
                            tracing::warn!(error = %e, "could not terminate a dead-lettered message");
                        }
                        Settled::DeadLettered
                    }
                    Err(e) => {
                        self.remember_failure(sequence);
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

    fn remember_failure(&self, sequence: Option<u64>) {
        let Some(sequence) = sequence else { return };
        let mut failures = self.failures();
        failures.entry(sequence).or_insert_with(Utc::now);
        while failures.len() > REMEMBERED_FAILURES {
            failures.pop_first();
        }
    }

    fn recalled_failure(&self, sequence: Option<u64>) -> Option<DateTime<Utc>> {
        self.failures().get(&sequence?).copied()
    }

    fn forget(&self, sequence: Option<u64>) {
        if let Some(sequence) = sequence {
            self.failures().remove(&sequence);
        }
    }
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
