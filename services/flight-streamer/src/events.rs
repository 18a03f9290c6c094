//! Event tickets: entity events read from `HERALD_EVENTS` through an ordered, ephemeral
//! consumer (no acks, in memory), so a reader never creates a durable consumer nor moves
//! anyone's checkpoint.
//!
//! The flight-streamer's NATS user may not delete consumers (a subject permission cannot tell
//! its consumers from anyone else's), so a cancelled stream's consumer is removed by the server
//! itself: it is created with an inactivity threshold of `INACTIVE_THRESHOLD`, and a pull
//! consumer is inactive once no pull request of its reader is waiting, which is at once when
//! the reader goes. While the reader is alive a pull request is always waiting, except while a
//! slow client holds the producer back for longer than the threshold; the server may then
//! remove the consumer, and `ordered` creates a new one from the last sequence it delivered,
//! with the same threshold, so nothing is missed or repeated and a cancelled stream's consumer
//! is gone `INACTIVE_THRESHOLD` after its client, recreated or not.
//!
//! A replay runs from the ticket's start to the stream's last sequence at the moment of the
//! request, then ends. In follow mode it then tails live events; a partial batch is sent after
//! `linger` without news, and an empty batch after `keepalive`, so an idle tail still shows
//! it is alive. Every batch carries its last stream sequence as the resume cursor; a ticket
//! with `after_seq` set to it continues with exactly the next event.
//!
//! `since` / `until` are on the event's commit time `at`. The consumer starts at the first
//! event *stored* at or after `since`: an event is stored after it is committed, so none with
//! `at >= since` is stored before that point; the few stored later but committed earlier are
//! filtered out here.
//!
//! A stored message that is not a version-1 event of the entity (none should exist: the
//! gateway dead-letters what it cannot publish) is skipped, logged and counted in
//! `herald_flight_skipped_events_total`, and the cursor moves past it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self, consumer::AckPolicy};
use futures::StreamExt;
use herald_shared::subjects::{self, EVENTS_STREAM};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tonic::Status;

use crate::event_batch::{self, EventBatch};
use crate::frames::{FIRST_BATCH_ROWS, Frame};
use crate::ordered::Ordered;
use crate::schema::EntityTypes;
use crate::ticket::EventsTicket;

pub const SKIPPED_EVENTS: &str = "herald_flight_skipped_events_total";

/// The first batch is sent at most this long after its first row, whatever `FIRST_BATCH_ROWS`
/// says: during a replay events are always ready, so without it the client waits for 1024 of
/// them to be pulled and converted (6-8 ms in release) before seeing any.
pub const FIRST_BATCH_WITHIN: Duration = Duration::from_millis(1);

/// How long the server keeps an event ticket's consumer once its reader has gone.
pub const INACTIVE_THRESHOLD: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("the ticket is not valid: {0}")]
    Ticket(String),
    #[error("cannot read {EVENTS_STREAM}: {0}")]
    Stream(String),
}

impl From<EventsError> for Status {
    fn from(e: EventsError) -> Self {
        match e {
            EventsError::Ticket(_) => Status::invalid_argument(e.to_string()),
            EventsError::Stream(_) => Status::unavailable(e.to_string()),
        }
    }
}

/// How batches are cut and an idle tail is kept alive.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub rows: usize,
    pub bytes: usize,
    pub linger: Duration,
    pub keepalive: Duration,
}

fn filters(types: &EntityTypes, ticket: &EventsTicket) -> Result<Vec<String>, EventsError> {
    let bad = |e: subjects::InvalidToken| EventsError::Ticket(e.to_string());
    if ticket.ops.is_empty() {
        return Ok(vec![subjects::events_of(&types.entity).map_err(bad)?]);
    }
    let mut filters = Vec::with_capacity(ticket.ops.len() * 2);
    for op in &ticket.ops {
        filters.extend(subjects::events_of_op(&types.entity, *op).map_err(bad)?);
    }
    Ok(filters)
}

fn deliver_policy(ticket: &EventsTicket) -> Result<DeliverPolicy, EventsError> {
    if let Some(after) = ticket.after_seq {
        return Ok(DeliverPolicy::ByStartSequence {
            start_sequence: after.saturating_add(1),
        });
    }
    match ticket.since {
        Some(since) => {
            let nanos = since
                .timestamp_nanos_opt()
                .ok_or_else(|| EventsError::Ticket(format!("`since` {since} is out of range")))?;
            let start_time = OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
                .map_err(|e| EventsError::Ticket(e.to_string()))?;
            Ok(DeliverPolicy::ByStartTime { start_time })
        }
        None => Ok(DeliverPolicy::All),
    }
}

fn check(ticket: &EventsTicket) -> Result<(), EventsError> {
    if ticket.follow && ticket.until.is_some() {
        return Err(EventsError::Ticket(
            "a follow ticket has no `until` (it ends when the client stops reading)".into(),
        ));
    }
    if let (Some(since), Some(until)) = (ticket.since, ticket.until)
        && until < since
    {
        return Err(EventsError::Ticket("`until` is before `since`".into()));
    }
    Ok(())
}

fn consumer_name() -> String {
    format!("flight_{}", uuid::Uuid::now_v7().simple())
}

/// Rows a ticket will yield, where that is known without reading: -1 for a live tail and for
/// a ticket with `until` (the time bound is only known row by row).
pub async fn count(
    js: &jetstream::Context,
    types: &EntityTypes,
    ticket: &EventsTicket,
) -> Result<i64, EventsError> {
    check(ticket)?;
    if ticket.follow || ticket.until.is_some() {
        return Ok(-1);
    }
    let stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|e| EventsError::Stream(e.to_string()))?;
    // A consumer that is never read: the server counts what it would deliver, then drops it.
    let consumer = stream
        .create_consumer(pull::Config {
            name: Some(consumer_name()),
            filter_subjects: filters(types, ticket)?,
            deliver_policy: deliver_policy(ticket)?,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(5),
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .map_err(|e| EventsError::Stream(e.to_string()))?;
    let pending = consumer.cached_info().num_pending;
    Ok(i64::try_from(pending).unwrap_or(i64::MAX))
}

/// An opened event ticket, ready to produce.
pub struct Opened {
    messages: Ordered,
    /// Events the consumer had to deliver when it was created.
    pending: u64,
    /// The stream's last sequence at the request: a replay ends there.
    end: u64,
}

pub async fn open(
    js: &jetstream::Context,
    types: &EntityTypes,
    ticket: &EventsTicket,
) -> Result<Opened, EventsError> {
    check(ticket)?;
    let stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|e| EventsError::Stream(e.to_string()))?;
    let end = stream.cached_info().state.last_sequence;
    let mut ordered = pull::OrderedConfig {
        name: Some(consumer_name()),
        deliver_policy: deliver_policy(ticket)?,
        ..Default::default()
    };
    match filters(types, ticket)?.as_slice() {
        [one] => ordered.filter_subject = one.clone(),
        many => ordered.filter_subjects = many.to_vec(),
    }
    // The consumer an ordered config makes, but with a short inactivity threshold (async-nats
    // fixes it at 30 s for ordered consumers), kept by every consumer `Ordered` recreates.
    let mut config: pull::Config = ordered.into();
    config.inactive_threshold = INACTIVE_THRESHOLD;
    let created = stream
        .create_consumer(config.clone())
        .await
        .map_err(|e| EventsError::Stream(e.to_string()))?;
    let pending = created.cached_info().num_pending;
    let messages = Ordered::new(js.clone(), EVENTS_STREAM, config, created)
        .await
        .map_err(|e| EventsError::Stream(e.to_string()))?;
    Ok(Opened {
        messages,
        pending,
        end,
    })
}

/// Reads the opened ticket into frames on `frames` until the replay ends (or, following, until
/// the client goes away: `frames` closes and this returns at once, dropping the consumer).
pub async fn produce(
    opened: Opened,
    types: Arc<EntityTypes>,
    ticket: EventsTicket,
    batching: Batching,
    frames: mpsc::Sender<Result<Frame, Status>>,
) {
    let Opened {
        mut messages,
        pending,
        end,
    } = opened;
    let mut batch = EventBatch::new(types.clone());
    let mut cursor = ticket.after_seq;
    let mut replaying = pending > 0;
    let mut row_limit = batching.rows.min(FIRST_BATCH_ROWS);
    let mut first_row = Instant::now();
    loop {
        if !replaying && batch.rows() > 0 && !flush(&mut batch, cursor, &frames).await {
            return;
        }
        if !replaying && !ticket.follow {
            return;
        }
        let first = row_limit != batching.rows;
        let wait = if batch.rows() > 0 {
            // The first batch goes as soon as no event is ready at once.
            if first {
                Duration::ZERO
            } else {
                batching.linger
            }
        } else {
            batching.keepalive
        };
        let next = tokio::select! {
            _ = frames.closed() => return,
            next = tokio::time::timeout(wait, messages.next()) => next,
        };
        let message = match next {
            Err(_idle) => {
                let sent = if batch.rows() > 0 {
                    row_limit = batching.rows;
                    flush(&mut batch, cursor, &frames).await
                } else if replaying {
                    true
                } else {
                    let empty = arrow::record_batch::RecordBatch::new_empty(types.events.clone());
                    frames
                        .send(Ok(Frame {
                            batch: empty,
                            cursor,
                        }))
                        .await
                        .is_ok()
                };
                if !sent {
                    return;
                }
                continue;
            }
            Ok(None) => {
                let _ = frames
                    .send(Err(Status::unavailable("the event consumer ended")))
                    .await;
                return;
            }
            Ok(Some(Err(e))) => {
                let _ = frames
                    .send(Err(Status::unavailable(format!(
                        "cannot read {EVENTS_STREAM}: {e}"
                    ))))
                    .await;
                return;
            }
            Ok(Some(Ok(message))) => message,
        };
        let (seq, left) = match message.info() {
            Ok(info) => (info.stream_sequence, info.pending),
            Err(e) => {
                let _ = frames
                    .send(Err(Status::internal(format!(
                        "a message without metadata: {e}"
                    ))))
                    .await;
                return;
            }
        };
        if !ticket.follow && seq > end {
            // Stored after the request: not part of this replay.
            replaying = false;
            continue;
        }
        cursor = Some(seq);
        match event_batch::parse(&message.payload) {
            Ok(event) => {
                let inside = ticket.since.is_none_or(|since| event.at >= since)
                    && ticket.until.is_none_or(|until| event.at < until);
                if inside && let Err(e) = batch.push(&event, seq) {
                    skip(seq, &e.to_string());
                }
            }
            Err(e) => skip(seq, &e.to_string()),
        }
        if replaying && (seq >= end || left == 0) {
            replaying = false;
        }
        if first && batch.rows() == 1 {
            first_row = Instant::now();
        }
        let due = first && first_row.elapsed() >= FIRST_BATCH_WITHIN;
        if due || batch.rows() >= row_limit || batch.bytes() >= batching.bytes {
            if !flush(&mut batch, cursor, &frames).await {
                return;
            }
            row_limit = batching.rows;
        }
    }
}

fn skip(seq: u64, reason: &str) {
    metrics::counter!(SKIPPED_EVENTS).increment(1);
    tracing::warn!(
        seq,
        reason,
        "skipped a stored message that is not a readable event"
    );
}

/// Sends the batch built so far; false when the client has gone.
async fn flush(
    batch: &mut EventBatch,
    cursor: Option<u64>,
    frames: &mpsc::Sender<Result<Frame, Status>>,
) -> bool {
    let frame = batch
        .finish()
        .map(|batch| Frame { batch, cursor })
        .map_err(|e| Status::internal(format!("cannot build a record batch: {e}")));
    let failed = frame.is_err();
    frames.send(frame).await.is_ok() && !failed
}
