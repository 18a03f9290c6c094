//! One indexer per kind: a durable pull consumer on its stream, messages gathered into bulks
//! (bounded by count, bytes and time), each message acked only once its document is stored.
//!
//! A bulk is read item by item. Stored and duplicate (409) items are acked; refused items are
//! dead-lettered with the cluster's reason and never sent again; 429 and 5xx items, and every
//! item of a request that failed as a whole (cluster down, timeout), are sent again after a
//! growing delay, while progress acks keep JetStream from redelivering them meanwhile. So while
//! the cluster is down an indexer holds its bulk, acks nothing and pulls nothing new, and
//! resumes by itself when the cluster answers again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use herald_shared::consume::{self, Disposition, Settler};
use herald_shared::streams::{self, StreamSpec};
use herald_shared::subjects::{DLQ_ALL, DlqSource, EVENTS_ALL, JOBS_STATUS_ALL, OUTCOMES_ALL};
use tokio_util::sync::CancellationToken;

use crate::bulk;
use crate::classify::ItemVerdict;
use crate::cluster::Cluster;
use crate::document::{Document, Incoming, Kind};
use crate::health::Health;
use crate::settings::AuditorSettings;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The consumer or its message stream failed (NATS restart); binding again later works.
    #[error("the {kind} consumer is unavailable: {reason}")]
    Consumer { kind: &'static str, reason: String },
}

/// The stream and filter a kind is read from.
pub fn source(kind: Kind) -> (StreamSpec, &'static str) {
    match kind {
        Kind::Event => (streams::EVENTS, EVENTS_ALL),
        Kind::Outcome => (streams::OUTCOMES, OUTCOMES_ALL),
        Kind::Job => (streams::JOBS, JOBS_STATUS_ALL),
        Kind::DeadLetter => (streams::DLQ, DLQ_ALL),
    }
}

/// The durable consumer's name: `<prefix>-events`, `-outcomes`, `-jobs`, `-dlq`.
pub fn consumer_name(prefix: &str, kind: Kind) -> String {
    let part = match kind {
        Kind::Event => "events",
        Kind::Outcome => "outcomes",
        Kind::Job => "jobs",
        Kind::DeadLetter => "dlq",
    };
    format!("{prefix}-{part}")
}

/// Names the auditor in dead letters (`Herald-Dead-Lettered-By`) and in `herald_settled_total`.
pub const SERVICE: &str = "auditor";

/// Where a message of `kind` is dead-lettered. Dead letters themselves are not: they already
/// are in the DLQ stream, and dead-lettering one again would feed it back to this consumer.
pub fn dlq_source(kind: Kind) -> Option<DlqSource> {
    match kind {
        Kind::Event => Some(DlqSource::Events),
        Kind::Outcome => Some(DlqSource::Actions),
        Kind::Job => Some(DlqSource::Jobs),
        Kind::DeadLetter => None,
    }
}

pub struct Indexer {
    pub kind: Kind,
    pub js: jetstream::Context,
    pub cluster: Arc<Cluster>,
    pub settings: Arc<AuditorSettings>,
    pub health: Arc<Health>,
    /// The shared settling path: acks, delayed NAKs and dead letters.
    settler: Settler,
}

struct Pending {
    message: jetstream::Message,
    document: Document,
}

impl Indexer {
    pub fn new(
        kind: Kind,
        js: jetstream::Context,
        cluster: Arc<Cluster>,
        settings: Arc<AuditorSettings>,
        health: Arc<Health>,
    ) -> Self {
        // A disposition that could not be carried out (the DLQ unreachable) comes again after
        // the longest retry delay.
        let failure_delay = settings.retry_max_delay;
        let settler = match dlq_source(kind) {
            Some(source) => Settler::new(js.clone(), source, SERVICE, failure_delay),
            None => Settler::for_dlq_consumer(js.clone(), SERVICE, failure_delay),
        };
        Self {
            kind,
            js,
            cluster,
            settings,
            health,
            settler,
        }
    }

    /// Indexes until `stop`, binding to the consumer again whenever it fails.
    pub async fn run(self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            match self.consume(&stop).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "indexing interrupted; binding to the consumer again");
                    self.health.indexer(self.kind, Some(e.to_string()));
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(self.settings.retry_max_delay) => {}
                    }
                }
            }
        }
    }

    fn consumer_error(&self, e: impl std::fmt::Display) -> IndexError {
        IndexError::Consumer {
            kind: self.kind.as_str(),
            reason: e.to_string(),
        }
    }

    async fn consumer(&self) -> Result<consumer::PullConsumer, IndexError> {
        let (spec, filter) = source(self.kind);
        let stream = self
            .js
            .get_stream(spec.name)
            .await
            .map_err(|e| self.consumer_error(e))?;
        let name = consumer_name(&self.settings.consumer_prefix, self.kind);
        let max_ack_pending =
            i64::try_from(self.settings.bulk_max_docs.saturating_mul(2)).unwrap_or(i64::MAX);
        stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name),
                description: Some(format!("herald auditor: {} documents", self.kind.as_str())),
                filter_subject: filter.to_owned(),
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: self.settings.ack_wait,
                max_ack_pending,
                // Nothing may be dropped by the server: the indexer decides what is retried and
                // what is dead-lettered.
                max_deliver: -1,
                ..Default::default()
            })
            .await
            .map_err(|e| self.consumer_error(e))
    }

    async fn consume(&self, stop: &CancellationToken) -> Result<(), IndexError> {
        let consumer = self.consumer().await?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(self.settings.bulk_max_docs)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(10))
            .messages()
            .await
            .map_err(|e| self.consumer_error(e))?;
        self.health.indexer(self.kind, None);
        loop {
            let Some(batch) = self.gather(&mut messages, stop).await? else {
                return Ok(());
            };
            self.index(batch, stop).await;
        }
    }

    /// The next bulk's messages: waits for one, then takes what arrives within
    /// `bulk_max_wait`, up to the count and byte bounds. `None` once `stop` is cancelled.
    async fn gather(
        &self,
        messages: &mut consumer::pull::Stream,
        stop: &CancellationToken,
    ) -> Result<Option<Vec<jetstream::Message>>, IndexError> {
        let first = tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            next = messages.next() => match next {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Err(self.consumer_error(e)),
                None => return Err(self.consumer_error("the message stream ended")),
            },
        };
        let mut bytes = first.payload.len();
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + self.settings.bulk_max_wait;
        while batch.len() < self.settings.bulk_max_docs && bytes < self.settings.bulk_max_bytes {
            match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(Ok(message))) => {
                    bytes += message.payload.len();
                    batch.push(message);
                }
                // A stream error surfaces on the next wait; this bulk goes out first.
                Ok(Some(Err(_)) | None) | Err(_) => break,
            }
        }
        Ok(Some(batch))
    }

    /// Indexes one bulk's messages, settling each, retrying what can be stored later until it
    /// is or until `stop` (then those are NAKed, to come back to whoever consumes next).
    async fn index(&self, batch: Vec<jetstream::Message>, stop: &CancellationToken) {
        let kind = self.kind.as_str();
        let mut pending = Vec::with_capacity(batch.len());
        let mut unreadable = Vec::new();
        for message in batch {
            match self.kind.document(&incoming(&message)) {
                Ok(document) => pending.push(Pending { message, document }),
                Err(reason) => unreadable.push((message, reason)),
            }
        }
        let refusals = unreadable
            .iter()
            .map(|(message, reason)| (message, self.refused(reason)))
            .collect();
        self.settler.settle_all(refusals).await;
        let policy = self.settings.retry_policy();
        let mut attempt = 0;
        while !pending.is_empty() {
            attempt += 1;
            let verdicts = self.send(&pending).await;
            let mut again = Vec::new();
            let mut done = Vec::with_capacity(pending.len());
            for (item, verdict) in pending.into_iter().zip(verdicts) {
                match verdict {
                    ItemVerdict::Stored { duplicate } => {
                        if duplicate {
                            metrics::counter!("herald_auditor_duplicates_total", "kind" => kind)
                                .increment(1);
                        } else {
                            metrics::counter!("herald_auditor_indexed_total", "kind" => kind)
                                .increment(1);
                            item.document.count_stored();
                        }
                        done.push((item.message, Disposition::ack()));
                    }
                    ItemVerdict::Refused(reason) => {
                        tracing::warn!(kind, id = %item.document.id, %reason, "document refused by the cluster");
                        let disposition = self.refused(&reason);
                        done.push((item.message, disposition));
                    }
                    ItemVerdict::Retry(reason) => {
                        metrics::counter!("herald_auditor_failed_items_total", "kind" => kind)
                            .increment(1);
                        tracing::debug!(kind, id = %item.document.id, %reason, "document not stored yet");
                        again.push(item);
                    }
                }
            }
            let (messages, dispositions): (Vec<_>, Vec<_>) = done.into_iter().unzip();
            self.settler
                .settle_all(messages.iter().zip(dispositions).collect())
                .await;
            pending = again;
            if pending.is_empty() {
                break;
            }
            let delay = policy
                .delay_after(attempt)
                .unwrap_or(self.settings.retry_max_delay);
            if stop.is_cancelled() {
                let deferred = pending
                    .iter()
                    .map(|item| (&item.message, Disposition::defer(delay)))
                    .collect();
                self.settler.settle_all(deferred).await;
                return;
            }
            for item in &pending {
                consume::progress(&item.message).await;
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One verdict per pending document. A request that failed as a whole makes every document
    /// a retry; a whole body the cluster refused (not for load) is sent again one document at
    /// a time, so only the document at fault is refused.
    async fn send(&self, pending: &[Pending]) -> Vec<ItemVerdict> {
        if let Err(reason) = self.health.ensure_setup(&self.cluster).await {
            return vec![ItemVerdict::Retry(reason); pending.len()];
        }
        let documents: Vec<&Document> = pending.iter().map(|p| &p.document).collect();
        let started = Instant::now();
        let sent = bulk::send(&self.cluster, &documents).await;
        metrics::histogram!("herald_auditor_bulk_seconds", "kind" => self.kind.as_str())
            .record(started.elapsed().as_secs_f64());
        match sent {
            Ok(verdicts) => {
                self.health.cluster_ok();
                verdicts
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(kind = self.kind.as_str(), error = %e, "bulk failed; it will be sent again");
                self.health.cluster_failed(&e.to_string());
                vec![ItemVerdict::Retry(e.to_string()); pending.len()]
            }
            Err(e) if documents.len() == 1 => vec![ItemVerdict::Refused(e.to_string())],
            Err(e) => {
                tracing::warn!(kind = self.kind.as_str(), error = %e, "bulk refused whole; sending its documents one by one");
                let mut verdicts = Vec::with_capacity(documents.len());
                for document in documents {
                    verdicts.push(match bulk::send(&self.cluster, &[document]).await {
                        Ok(mut v) => v.pop().unwrap_or(ItemVerdict::Retry("no answer".into())),
                        Err(e) if e.is_transient() => ItemVerdict::Retry(e.to_string()),
                        Err(e) => ItemVerdict::Refused(e.to_string()),
                    });
                }
                verdicts
            }
        }
    }

    /// A document that can never be stored: dead-lettered with the reason (a dead letter's
    /// own document is only logged; the entry stays in the DLQ stream).
    fn refused(&self, reason: &str) -> Disposition {
        metrics::counter!("herald_auditor_refused_total", "kind" => self.kind.as_str())
            .increment(1);
        Disposition::dead_letter(reason)
    }
}

/// The parts of a JetStream message a document is built from.
pub fn incoming(message: &jetstream::Message) -> Incoming {
    let (published, sequence) = match message.info() {
        Ok(info) => (
            DateTime::from_timestamp(info.published.unix_timestamp(), info.published.nanosecond())
                .unwrap_or_else(Utc::now),
            info.stream_sequence,
        ),
        Err(_) => (Utc::now(), 0),
    };
    Incoming {
        subject: message.subject.to_string(),
        headers: message.headers.clone(),
        payload: message.payload.clone(),
        published,
        sequence,
    }
}
