//! The relay: moves committed outbox rows to JetStream, then deletes them.
//!
//! Shape and why:
//! - One relay at a time. Each pass opens a transaction and takes a transaction-scoped advisory
//!   lock on a constant (`pg_try_advisory_xact_lock`); a replica that does not get it stands by
//!   for this pass. The lock lives exactly as long as the rows it claimed stay locked, so there is
//!   never a second relay that could publish a later event of a key while an earlier one is held
//!   elsewhere (plain `SKIP LOCKED` across replicas would allow exactly that). Replicas take over
//!   within one poll interval of a leader dying, because its transaction dies with it.
//! - Rows are read in `seq` order (`FOR UPDATE`, no `SKIP LOCKED`: under the lease nothing else
//!   locks outbox rows, and skipping an operator's lock could only reorder events). No high-water
//!   mark is kept: a transaction that commits late with a small `seq` is found on the next pass.
//! - Every publish carries Nats-Msg-Id = event id and is acked by JetStream before its row is
//!   deleted in the same transaction; a crash between the two republishes, and JetStream's
//!   duplicate window absorbs the repeat.
//! - Per-key order survives a failed publish: a batch goes out in waves, each holding at most one
//!   event per key, and a key whose event failed sends nothing more until the next pass.
//! - An event that cannot be published (larger than the server's max payload with its headers
//!   counted, larger than the stream's maximum message or header size (JetStream errors 10054
//!   and 10097), or an entity name that is no subject token) never blocks the outbox: it moves to
//!   `herald_outbox_failed` with its reason, after a small notice naming it is stored in
//!   `herald.dlq.events`.
//! - An event the server refuses otherwise (another stream limit, a permission complaint;
//!   sorted by `herald_shared::publish::verdict`) is tried `max_attempts` times with growing pauses, recorded in `herald_outbox_attempts`; while it waits, only its
//!   own key waits (claiming skips held keys), then it is moved aside like the above. Timeouts
//!   and lost connections are outages, not the row's fault: they are retried without counting.
//! - Header values come from outside (SQL `set_config`, an HTTP header): a `traceparent` that is
//!   not W3C-valid is dropped with a warning and the event starts its own trace, so no CR/LF or
//!   over-long value ever reaches async-nats.
//! - `at` is the writing transaction's commit time when PostgreSQL records commit timestamps
//!   (`track_commit_timestamp = on`, read per pass), else the time of the change.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishAckFuture, PublishError};
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use herald_shared::dlq::{self, DeadLetter};
use herald_shared::publish::{self, Verdict};
use herald_shared::subjects::{self, DlqSource};
use herald_shared::{EntityEvent, Op, SCHEMA_VERSION, headers, telemetry, traceparent};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::capture::CHANNEL;

/// The advisory lock every replica's relay competes for ("herald" in ASCII).
const LEASE_KEY: i64 = 0x6865_7261_6c64;

/// The longest pause between two tries of a refused event.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Who dead-letters, in `Herald-Dead-Lettered-By`.
const SERVICE: &str = "gateway";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySettings {
    /// Relay outbox rows from this replica. Off only for replicas that should serve GraphQL alone.
    pub enabled: bool,
    /// Rows claimed per pass.
    pub batch_size: u32,
    /// How often to look for rows when no NOTIFY arrives (a lost notification, a standby replica).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// The pause after a failed pass before the next one, and before the second try of an
    /// event the server refused (doubling per try, at most 30 s).
    #[serde(with = "humantime_serde")]
    pub retry_delay: Duration,
    /// Tries of an event the server refuses before it moves to `herald_outbox_failed`.
    pub max_attempts: u32,
    /// Connections of the relay's own pool, apart from GraphQL's, so heavy queries cannot starve
    /// it (LISTEN takes one more of its own).
    pub max_connections: u32,
    /// Put every column of an entity's table in its events' `data`/`before`, not only the
    /// fields the schema file exposes (off: a column GraphQL hides never leaks through events).
    pub all_columns_in_events: bool,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            retry_delay: Duration::from_millis(500),
            max_attempts: 5,
            max_connections: 2,
            all_columns_in_events: false,
        }
    }
}

impl herald_shared::config::Validate for RelaySettings {
    fn validate(&self, problems: &mut herald_shared::config::Problems) {
        if self.batch_size == 0 || self.batch_size > 10_000 {
            problems.push("batch_size", "must be between 1 and 10000");
        }
        if self.poll_interval.is_zero() {
            problems.push("poll_interval", "must be positive");
        }
        if self.retry_delay.is_zero() {
            problems.push("retry_delay", "must be positive");
        }
        if self.max_attempts == 0 {
            problems.push("max_attempts", "must be at least 1");
        }
        if self.max_connections == 0 {
            problems.push("max_connections", "must be at least 1");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// PostgreSQL failed; the pass rolled back and will be tried again.
    #[error("outbox database error: {0}")]
    Database(#[from] sqlx::Error),
    /// JetStream did not ack an event; its row stays and is published again on a later pass.
    #[error("publishing event {id} failed: {reason}")]
    Publish { id: Uuid, reason: String },
    /// The DLQ notice for an unpublishable event was not stored; the row stays.
    #[error("dead-lettering event {id} failed: {source}")]
    DeadLetter {
        id: Uuid,
        #[source]
        source: dlq::DlqError,
    },
}

/// What one pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Another replica holds the lease.
    Standby,
    /// Rows handled (published or moved to the failed table); a full batch means more may wait.
    Handled(usize),
}

#[derive(Debug, sqlx::FromRow)]
struct OutboxRow {
    seq: i64,
    id: Uuid,
    entity: String,
    op: String,
    key: String,
    data: Option<Value>,
    before: Option<Value>,
    changed: Option<Vec<String>>,
    tx: i64,
    at: DateTime<Utc>,
    actor: Option<String>,
    traceparent: Option<String>,
    /// The writing transaction's commit time, when PostgreSQL records it.
    committed_at: Option<DateTime<Utc>>,
    /// Earlier tries the server refused.
    attempts: i32,
}

impl OutboxRow {
    /// What the contract calls `at`: commit time, or the change time when it is not recorded.
    fn at(&self) -> DateTime<Utc> {
        self.committed_at.unwrap_or(self.at)
    }
}

/// Why an outbox row can never be published as it is.
#[derive(Debug)]
struct Unpublishable {
    row_seq: i64,
    id: Uuid,
    subject: String,
    reason: String,
    size: usize,
    attempts: u32,
}

/// A row whose publish the server refused on this pass.
struct Refused {
    seq: i64,
    id: Uuid,
    entity: String,
    key: String,
    subject: String,
    attempts: u32,
    reason: String,
}

#[derive(Clone)]
pub struct Relay {
    pool: PgPool,
    js: jetstream::Context,
    settings: RelaySettings,
    max_payload: usize,
}

impl Relay {
    /// `max_payload` is the NATS server's limit (`client.server_info().max_payload`).
    pub fn new(
        pool: PgPool,
        js: jetstream::Context,
        max_payload: usize,
        settings: RelaySettings,
    ) -> Self {
        Self {
            pool,
            js,
            settings,
            max_payload,
        }
    }

    /// Relays until `shutdown`; a pass in progress finishes (its acks are awaited and its rows
    /// deleted) before returning.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut listener = self.listen().await;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let wait = match self.pass().await {
                Ok(Pass::Handled(n)) if n >= self.settings.batch_size as usize => continue,
                Ok(_) => self.settings.poll_interval,
                Err(e) => {
                    tracing::warn!(error = %e, "relay pass failed; retrying");
                    self.settings.retry_delay
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                notified = wake(&mut listener) => {
                    if !notified {
                        // The listener broke; poll until it reconnects on the next pass.
                        listener = self.listen().await;
                    }
                }
            }
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let connected = async {
            let mut listener = PgListener::connect_with(&self.pool).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        match connected {
            Ok(listener) => Some(listener),
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN for outbox notifications; polling only");
                None
            }
        }
    }

    /// One pass: take the lease, claim a batch in `seq` order (skipping keys whose head waits
    /// for a retry), publish it, delete what was acked, record or move aside what was refused.
    pub async fn pass(&self) -> Result<Pass, RelayError> {
        let mut tx = self.pool.begin().await?;
        let (leader, commit_times, last_seq): (bool, bool, i64) = sqlx::query_as(
            "SELECT pg_try_advisory_xact_lock($1), \
                    current_setting('track_commit_timestamp') = 'on', \
                    (SELECT last_value FROM public.herald_outbox_seq_seq)",
        )
        .bind(LEASE_KEY)
        .fetch_one(&mut *tx)
        .await?;
        if !leader {
            return Ok(Pass::Standby);
        }
        let rows: Vec<OutboxRow> = sqlx::query_as(
            "SELECT o.seq, o.id, o.entity, o.op, o.key, o.data, o.before, o.changed, o.tx, o.at, \
                    o.actor, o.traceparent, \
                    CASE WHEN $2 THEN pg_xact_commit_timestamp(o.xmin) END AS committed_at, \
                    coalesce(a.attempts, 0) AS attempts \
             FROM herald_outbox o LEFT JOIN herald_outbox_attempts a ON a.seq = o.seq \
             WHERE NOT EXISTS (SELECT 1 FROM herald_outbox_attempts h \
                               WHERE h.entity = o.entity AND h.key = o.key AND h.retry_at > now()) \
             ORDER BY o.seq LIMIT $1 FOR UPDATE OF o",
        )
        .bind(i64::from(self.settings.batch_size))
        .bind(commit_times)
        .fetch_all(&mut *tx)
        .await?;
        let claimed = rows.len();
        let oldest = rows.first().map(|r| r.seq);
        let retried: Vec<i64> = rows
            .iter()
            .filter(|r| r.attempts > 0)
            .map(|r| r.seq)
            .collect();
        let span = tracing::info_span!("relay.pass", rows = claimed);
        let mut outcome = self.publish_batch(rows).instrument(span).await;
        for refused in std::mem::take(&mut outcome.refused) {
            if refused.attempts >= self.settings.max_attempts {
                outcome.unpublishable.push(Unpublishable {
                    row_seq: refused.seq,
                    id: refused.id,
                    subject: refused.subject,
                    reason: format!(
                        "refused by NATS {} times, last: {}",
                        refused.attempts, refused.reason
                    ),
                    size: 0,
                    attempts: refused.attempts,
                });
            } else {
                self.hold(&mut tx, &refused).await?;
            }
        }
        for failed in &outcome.unpublishable {
            // A dead letter that cannot be stored now leaves its row for a later pass; the rest
            // of the pass still counts.
            if let Err(e) = self.dead_letter(&mut tx, failed).await {
                outcome.error.get_or_insert(e);
            }
        }
        sqlx::query("DELETE FROM herald_outbox WHERE seq = ANY($1)")
            .bind(&outcome.published)
            .execute(&mut *tx)
            .await?;
        if !retried.is_empty() {
            sqlx::query("DELETE FROM herald_outbox_attempts WHERE seq = ANY($1) AND seq = ANY($2)")
                .bind(&retried)
                .bind(&outcome.published)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        // No count(*) per pass: the sequence numbers issued since the oldest row claimed bound
        // the depth from above (rolled-back writes also take numbers).
        let depth = oldest.map_or(0, |oldest| {
            (last_seq - oldest + 1 - outcome.published.len() as i64).max(0)
        });
        metrics::gauge!("herald_gateway_outbox_depth").set(depth as f64);
        metrics::counter!("herald_gateway_events_published_total")
            .increment(outcome.published.len() as u64);
        match outcome.error {
            Some(e) => Err(e),
            None => Ok(Pass::Handled(claimed)),
        }
    }

    async fn publish_batch(&self, rows: Vec<OutboxRow>) -> BatchOutcome {
        let mut outcome = BatchOutcome::default();
        let mut failed_keys: HashSet<(String, String)> = HashSet::new();
        for wave in waves(rows) {
            let started = Instant::now();
            let mut pending: Vec<(OutboxRow, String, PublishAckFuture)> =
                Vec::with_capacity(wave.len());
            for row in wave {
                let identity = (row.entity.clone(), row.key.clone());
                if failed_keys.contains(&identity) {
                    continue;
                }
                let (subject, message) = match self.prepare(&row) {
                    Ok(prepared) => prepared,
                    Err(failed) => {
                        outcome.unpublishable.push(failed);
                        continue;
                    }
                };
                match self.js.send_publish(subject.clone(), message).await {
                    Ok(ack) => pending.push((row, subject, ack)),
                    Err(e) => {
                        failed_keys.insert(identity);
                        outcome.fail(row, subject, e);
                    }
                }
            }
            for (row, subject, ack) in pending {
                match ack.await {
                    Ok(_) => {
                        let lag = (Utc::now() - row.at()).to_std().unwrap_or_default();
                        metrics::histogram!("herald_gateway_relay_lag_seconds")
                            .record(lag.as_secs_f64());
                        outcome.published.push(row.seq);
                    }
                    Err(e) => {
                        failed_keys.insert((row.entity.clone(), row.key.clone()));
                        outcome.fail(row, subject, e);
                    }
                }
            }
            metrics::histogram!("herald_gateway_publish_latency_seconds")
                .record(started.elapsed().as_secs_f64());
        }
        outcome
    }

    /// The subject and message for one row, or why it can never be published.
    fn prepare(&self, row: &OutboxRow) -> Result<(String, PublishMessage), Unpublishable> {
        let unpublishable = |subject: String, reason: String, size: usize| Unpublishable {
            row_seq: row.seq,
            id: row.id,
            subject,
            reason,
            size,
            attempts: 1,
        };
        let raw_subject = format!("herald.events.{}.{}", row.entity, row.op);
        let op: Op = row
            .op
            .parse()
            .map_err(|e: String| unpublishable(raw_subject.clone(), e, 0))?;
        // The key token lets HERALD_EVENTS partition by key, so dispatchers share the work.
        let subject = subjects::keyed_event(&row.entity, op, &row.key)
            .map_err(|e| unpublishable(raw_subject.clone(), e.to_string(), 0))?;
        let event = EntityEvent {
            id: row.id,
            entity: row.entity.clone(),
            op,
            key: row.key.clone(),
            data: row.data.clone(),
            before: row.before.clone(),
            changed: row.changed.clone(),
            at: row.at(),
            actor: row.actor.clone(),
            tx: row.tx,
            schema_version: SCHEMA_VERSION,
        };
        let body = serde_json::to_vec(&event).map_err(|e| {
            unpublishable(
                subject.clone(),
                format!("cannot serialise the event: {e}"),
                0,
            )
        })?;
        let headers = event_headers(row);
        let size = body.len() + header_bytes(&headers);
        if size > self.max_payload {
            return Err(unpublishable(
                subject,
                format!(
                    "event {} is {} bytes with its headers, above the NATS max payload of {} bytes",
                    row.id, size, self.max_payload
                ),
                size,
            ));
        }
        Ok((
            subject,
            PublishMessage::build()
                .payload(Bytes::from(body))
                .headers(headers),
        ))
    }

    /// Records a refused try: the row (and so its key) waits, the rest of the outbox goes on.
    async fn hold(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        refused: &Refused,
    ) -> Result<(), RelayError> {
        let exponent = refused.attempts.saturating_sub(1).min(16);
        let delay = self
            .settings
            .retry_delay
            .saturating_mul(1 << exponent)
            .min(MAX_RETRY_DELAY);
        sqlx::query(
            "INSERT INTO herald_outbox_attempts (seq, entity, key, attempts, last_error, retry_at) \
             VALUES ($1, $2, $3, $4, $5, clock_timestamp() + $6 * interval '1 millisecond') \
             ON CONFLICT (seq) DO UPDATE SET attempts = EXCLUDED.attempts, \
                 last_error = EXCLUDED.last_error, retry_at = EXCLUDED.retry_at",
        )
        .bind(refused.seq)
        .bind(&refused.entity)
        .bind(&refused.key)
        .bind(refused.attempts as i32)
        .bind(&refused.reason)
        .bind(delay.as_millis() as f64)
        .execute(&mut **tx)
        .await?;
        tracing::warn!(
            event = %refused.id,
            attempts = refused.attempts,
            error = %refused.reason,
            retry_in = ?delay,
            "NATS refused an event; its key waits, the others go on"
        );
        Ok(())
    }

    /// Stores a notice in the DLQ, then moves the row to `herald_outbox_failed`, in the pass's
    /// transaction: the notice is durable before the row leaves the outbox.
    async fn dead_letter(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        failed: &Unpublishable,
    ) -> Result<(), RelayError> {
        let notice = serde_json::json!({
            "event_id": failed.id,
            "subject": failed.subject,
            "size_bytes": failed.size,
            "max_payload": self.max_payload,
            "error": failed.reason,
            "stored_in": "herald_outbox_failed",
        });
        let letter = DeadLetter {
            source: DlqSource::Events,
            original_subject: failed.subject.clone(),
            original_msg_id: failed.id.to_string(),
            error: failed.reason.clone(),
            attempts: failed.attempts,
            first_failed_at: Utc::now(),
        };
        dlq::publish(
            &self.js,
            &letter,
            Bytes::from(notice.to_string()),
            None,
            SERVICE,
        )
        .await
        .map_err(|source| RelayError::DeadLetter {
            id: failed.id,
            source,
        })?;
        sqlx::query(
            "WITH moved AS (DELETE FROM herald_outbox WHERE seq = $1 RETURNING *), \
                  forgotten AS (DELETE FROM herald_outbox_attempts WHERE seq = $1) \
             INSERT INTO herald_outbox_failed \
             SELECT moved.*, clock_timestamp(), $2 FROM moved",
        )
        .bind(failed.row_seq)
        .bind(&failed.reason)
        .execute(&mut **tx)
        .await?;
        metrics::counter!("herald_gateway_events_failed_total").increment(1);
        tracing::error!(event = %failed.id, reason = %failed.reason, "event cannot be published; moved to herald_outbox_failed");
        Ok(())
    }
}

/// `Nats-Msg-Id` and a `traceparent`: the writer's when it is valid, else the relay's span's,
/// else one derived from the event id, so every event carries a trace.
fn event_headers(row: &OutboxRow) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(headers::MSG_ID, row.id.to_string().as_str());
    let writer = row
        .traceparent
        .as_deref()
        .and_then(|parent| match traceparent::parse(parent) {
            Ok(parsed) => Some(parsed.to_string()),
            Err(e) => {
                tracing::warn!(event = %row.id, error = %e, "dropping the writer's invalid traceparent");
                None
            }
        });
    // Publishing the event is a hop of its own, in the writer's trace when the row has one.
    let span = tracing::info_span!("relay.publish", event_id = %row.id);
    if let Some(parent) = &writer {
        let mut carrier = HeaderMap::new();
        carrier.insert(headers::TRACEPARENT, parent.as_str());
        telemetry::adopt_context(&span, Some(&carrier));
    }
    span.in_scope(|| telemetry::inject_context(&mut headers));
    if headers.get(headers::TRACEPARENT).is_none()
        && let Some(parent) = &writer
    {
        // No span recorded here: the writer's trace goes on unchanged.
        headers.insert(headers::TRACEPARENT, parent.as_str());
    }
    if headers.get(headers::TRACEPARENT).is_none() {
        // No writer's trace and no sampled span here (e.g. a log filter above `info` disables
        // the relay's span): the event starts its own trace, its id being the event id.
        let parent = format!("00-{}-{:016x}-01", row.id.simple(), span_id_for(row.id));
        headers.insert(headers::TRACEPARENT, parent.as_str());
    }
    headers
}

/// The bytes `headers` take on the wire (`NATS/1.0` line, `Name: value` lines, blank line):
/// the server's max payload counts them with the body.
fn header_bytes(headers: &HeaderMap) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(|v| name.len() + 2 + v.as_str().len() + 2)
                .sum::<usize>()
        })
        .sum();
    "NATS/1.0\r\n".len() + lines + 2
}

/// A non-zero span id derived from the event id's random bits.
fn span_id_for(id: Uuid) -> u64 {
    let bytes = id.as_bytes();
    let mut tail = [0u8; 8];
    tail.copy_from_slice(&bytes[8..16]);
    u64::from_be_bytes(tail).max(1)
}

/// Waits for a notification; `false` when the listener is gone or broke. The notifications
/// already received with it are taken too: each says only that some transaction committed, and
/// the next pass reads everything committed before it starts, so one pass answers them all
/// (without this, writers committing one by one cost the relay one pass each, most finding
/// nothing left to publish).
async fn wake(listener: &mut Option<PgListener>) -> bool {
    match listener {
        Some(listener) => {
            let woken = listener.recv().await.is_ok();
            while listener.next_buffered().is_some() {}
            woken
        }
        None => std::future::pending().await,
    }
}

#[derive(Default)]
struct BatchOutcome {
    published: Vec<i64>,
    unpublishable: Vec<Unpublishable>,
    refused: Vec<Refused>,
    error: Option<RelayError>,
}

impl BatchOutcome {
    /// Sorts a failed publish (`publish::verdict`): a message the server can never store is set
    /// aside at once, a refusal holds the row's key for a retry (set aside after
    /// `relay.max_attempts`), an outage ends the pass.
    fn fail(&mut self, row: OutboxRow, subject: String, error: PublishError) {
        let attempts = row.attempts.max(0) as u32 + 1;
        match publish::verdict(&subject, &error) {
            Verdict::SetAside(failure) => self.unpublishable.push(Unpublishable {
                row_seq: row.seq,
                id: row.id,
                subject,
                reason: failure.to_string(),
                size: 0,
                attempts,
            }),
            Verdict::Refused(failure) => self.refused.push(Refused {
                seq: row.seq,
                id: row.id,
                entity: row.entity,
                key: row.key,
                subject,
                attempts,
                reason: failure.to_string(),
            }),
            Verdict::Outage(failure) => {
                self.error.get_or_insert(RelayError::Publish {
                    id: row.id,
                    reason: failure.to_string(),
                });
            }
        }
    }
}

/// Splits a batch (in `seq` order) into waves holding at most one event per entity key, the
/// n-th wave holding each key's n-th event, so a key's events are acked one after another.
fn waves(rows: Vec<OutboxRow>) -> Vec<Vec<OutboxRow>> {
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    let mut waves: Vec<Vec<OutboxRow>> = Vec::new();
    for row in rows {
        let n = seen
            .entry((row.entity.clone(), row.key.clone()))
            .or_insert(0);
        if waves.len() <= *n {
            waves.push(Vec::new());
        }
        waves[*n].push(row);
        *n += 1;
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, key: &str) -> OutboxRow {
        OutboxRow {
            seq,
            id: Uuid::now_v7(),
            entity: "Order".into(),
            op: "update".into(),
            key: key.into(),
            data: None,
            before: None,
            changed: None,
            tx: 1,
            at: Utc::now(),
            actor: None,
            traceparent: None,
            committed_at: None,
            attempts: 0,
        }
    }

    #[test]
    fn a_wave_holds_at_most_one_event_per_key_in_seq_order() {
        let batch = vec![
            row(1, "a"),
            row(2, "b"),
            row(3, "a"),
            row(4, "a"),
            row(5, "c"),
        ];
        let waves: Vec<Vec<i64>> = waves(batch)
            .into_iter()
            .map(|wave| wave.into_iter().map(|r| r.seq).collect())
            .collect();
        assert_eq!(waves, vec![vec![1, 2, 5], vec![3], vec![4]]);
    }
}
