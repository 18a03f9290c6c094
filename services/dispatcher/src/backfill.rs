//! Backfill: run ONE observer over history (`herald observers backfill <observer> --since`).
//!
//! A separate, ordered ephemeral consumer reads the observer's entity from `since` up to the
//! stream's last event at the moment the backfill starts (events arriving later are the live
//! dispatcher's job). Only that observer is evaluated, so other observers are never re-run;
//! its requests carry the same action ids the live path uses, so running a backfill twice, or
//! over events the live dispatcher already handled for it, stores nothing twice (Msg-Id).

use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use herald_shared::subjects::{self, EVENTS_STREAM};
use herald_shared::{EntityEvent, messages};

use crate::checkpoint::to_offset;
use crate::dispatch::{Outgoing, PublishError, publish_all};
use crate::observers::Observer;

/// Requests published per pipelined round.
const ROUND: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("events stream unavailable: {0}")]
    Stream(String),
    #[error("observer cannot publish: {0}")]
    Subject(#[from] subjects::InvalidToken),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

fn stream_error(e: impl std::fmt::Display) -> BackfillError {
    BackfillError::Stream(e.to_string())
}

/// What a backfill did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackfillReport {
    pub events: u64,
    pub matched: u64,
    pub requests: u64,
    /// Events that could not be read (they are the live dispatcher's DLQ business).
    pub skipped: u64,
}

/// Evaluates `observer` over the events of its entity stored since `since`, publishing its
/// requests. Returns once every event present at the start has been seen.
pub async fn run(
    js: &jetstream::Context,
    observer: &Observer,
    since: DateTime<Utc>,
) -> Result<BackfillReport, BackfillError> {
    run_with_progress(js, observer, since, |_, _| {}).await
}

/// `run`, telling `progress` after each event what has been done so far and how many events
/// there are to read in all (those stored for the entity since `since` when it started).
pub async fn run_with_progress(
    js: &jetstream::Context,
    observer: &Observer,
    since: DateTime<Utc>,
    mut progress: impl FnMut(&BackfillReport, u64),
) -> Result<BackfillReport, BackfillError> {
    let mut stream = js.get_stream(EVENTS_STREAM).await.map_err(stream_error)?;
    let last = stream
        .info()
        .await
        .map_err(stream_error)?
        .state
        .last_sequence;
    let mut report = BackfillReport::default();
    let reader = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subjects::events_of(&observer.entity)?,
            deliver_policy: consumer::DeliverPolicy::ByStartTime {
                start_time: to_offset(since),
            },
            ..Default::default()
        })
        .await
        .map_err(stream_error)?;
    // Nothing stored for the entity since `since` means no message will ever come to end on.
    let pending = reader.cached_info().num_pending;
    if pending == 0 {
        return Ok(report);
    }
    let mut messages = reader.messages().await.map_err(stream_error)?;
    let mut round = Vec::with_capacity(ROUND);
    while let Some(message) = messages.next().await {
        let message = message.map_err(stream_error)?;
        let (sequence, remaining) = message
            .info()
            .map(|i| (i.stream_sequence, i.pending))
            .map_err(stream_error)?;
        if sequence > last {
            break;
        }
        report.events += 1;
        match messages::decode::<EntityEvent>(&message.payload) {
            Ok(event) => match observer.matches(&event, &std::cell::OnceCell::new()) {
                Ok(true) => {
                    report.matched += 1;
                    round.extend(
                        observer
                            .requests(&event)?
                            .into_iter()
                            .map(|(subject, request)| Outgoing::new(subject, request)),
                    );
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "condition failed during backfill"),
            },
            Err(_) => report.skipped += 1,
        }
        if round.len() >= ROUND {
            publish_all(js, &round, ROUND).await?;
            report.requests += round.len() as u64;
            round.clear();
        }
        progress(&report, pending);
        if sequence == last || remaining == 0 {
            break;
        }
    }
    publish_all(js, &round, ROUND).await?;
    report.requests += round.len() as u64;
    progress(&report, pending);
    Ok(report)
}
